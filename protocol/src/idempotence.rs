//! Idempotent appends: the decision a node makes about a `(producer id, sequence)` pair.
//!
//! A producer numbers its records 0, 1, 2, ...; an append carries the sequence of its first
//! record. The node remembers, per producer, the last [`REMEMBERED_BATCHES`] appends it stored
//! and where. A retry of one of them (same first sequence, same record count) is answered with
//! the original receipt and not stored again; the next expected sequence is stored; anything
//! else is refused. A producer the table does not know (new, or evicted) may start anywhere.
//!
//! The table is rebuilt after a restart from the producer metadata that every idempotent batch
//! carries in the log (`docs/log-format.md`), so a retry after a node crash is still caught.

use std::collections::{HashMap, VecDeque};

/// Appends remembered per producer: how many a producer may have in flight and still have
/// every retry recognised.
pub const REMEMBERED_BATCHES: usize = 8;

/// Where an earlier append was stored.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StoredAppend {
    pub first: u64,
    pub next: u64,
    pub epoch: u64,
}

/// What to do with an idempotent append.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Store it.
    Append,
    /// A retry of an append already stored: answer with its receipt.
    Duplicate(StoredAppend),
    /// Sequences were skipped: `expected` is the next sequence this producer may use.
    SequenceGap { expected: u64 },
    /// Older than anything remembered, or overlapping a stored append differently.
    Stale { expected: u64 },
}

/// What to do with an append (idempotent, conditional, both or neither) before anything of it
/// is written ([`ProducerTable::admit`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Store it.
    Append,
    /// A retry of an append already stored: answer with its receipt.
    Duplicate(StoredAppend),
    /// The producer skipped sequences: `expected` is the next it may use.
    SequenceGap { expected: u64 },
    /// The producer's sequence is older than anything remembered, or overlaps a stored append
    /// differently.
    Stale { expected: u64 },
    /// The log does not end where the append expected: it ends at `actual`.
    OffsetConflict { actual: u64 },
}

#[derive(Debug)]
struct Remembered {
    first_sequence: u64,
    count: u32,
    stored: StoredAppend,
}

#[derive(Debug, Default)]
struct ProducerState {
    batches: VecDeque<Remembered>,
    last_used: u64,
}

/// The per-log producer table.
#[derive(Debug)]
pub struct ProducerTable {
    producers: HashMap<u64, ProducerState>,
    capacity: usize,
    tick: u64,
}

impl ProducerTable {
    /// A table that remembers at most `capacity` producers, evicting the least recently used.
    pub fn new(capacity: usize) -> ProducerTable {
        ProducerTable {
            producers: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Decide about an append of `count` records to a log that ends at `end`: idempotent when
    /// `producer` (id, first sequence) is given, conditional when `expected` (the offset the
    /// log must end at) is. The producer's decision comes first: a retry of a stored
    /// conditional append is a duplicate, not a conflict.
    pub fn admit(
        &mut self,
        producer: Option<(u64, u64)>,
        count: u32,
        expected: Option<u64>,
        end: u64,
    ) -> Admission {
        if let Some((id, first_sequence)) = producer {
            match self.check(id, first_sequence, count) {
                Decision::Append => {}
                Decision::Duplicate(s) => return Admission::Duplicate(s),
                Decision::SequenceGap { expected } => return Admission::SequenceGap { expected },
                Decision::Stale { expected } => return Admission::Stale { expected },
            }
        }
        match expected {
            Some(e) if e != end => Admission::OffsetConflict { actual: end },
            _ => Admission::Append,
        }
    }

    /// Decide about an append of `count` records whose first sequence is `first_sequence`. A
    /// known producer counts as used (for eviction) whatever the decision.
    pub fn check(&mut self, producer_id: u64, first_sequence: u64, count: u32) -> Decision {
        self.tick += 1;
        let tick = self.tick;
        let Some(state) = self.producers.get_mut(&producer_id) else {
            return Decision::Append;
        };
        if crate::planted::active(crate::planted::Bug::IdempotentTwice) {
            return Decision::Append;
        }
        state.last_used = tick;
        let Some(last) = state.batches.back() else {
            return Decision::Append;
        };
        let expected = last.first_sequence.saturating_add(last.count as u64);
        if first_sequence == expected {
            return Decision::Append;
        }
        if let Some(b) = state
            .batches
            .iter()
            .find(|b| b.first_sequence == first_sequence && b.count == count)
        {
            return Decision::Duplicate(b.stored);
        }
        if first_sequence > expected {
            Decision::SequenceGap { expected }
        } else {
            Decision::Stale { expected }
        }
    }

    /// Remember a stored append (after [`Decision::Append`], or while rebuilding from the log).
    pub fn record(
        &mut self,
        producer_id: u64,
        first_sequence: u64,
        count: u32,
        stored: StoredAppend,
    ) {
        self.tick += 1;
        let tick = self.tick;
        let state = self.producers.entry(producer_id).or_default();
        state.last_used = tick;
        if state.batches.len() == REMEMBERED_BATCHES {
            state.batches.pop_front();
        }
        state.batches.push_back(Remembered {
            first_sequence,
            count,
            stored,
        });
        if self.producers.len() > self.capacity {
            self.evict();
        }
    }

    /// Forget every append stored at or after `offset` (the log was truncated there).
    pub fn forget_from(&mut self, offset: u64) {
        for state in self.producers.values_mut() {
            state.batches.retain(|b| b.stored.next <= offset);
        }
        self.producers.retain(|_, s| !s.batches.is_empty());
    }

    /// Drop the least recently used eighth of the table (at least one producer).
    fn evict(&mut self) {
        let mut ages: Vec<(u64, u64)> = self
            .producers
            .iter()
            .map(|(id, s)| (s.last_used, *id))
            .collect();
        ages.sort_unstable();
        let n = (self.producers.len() / 8).max(1);
        for (_, id) in ages.into_iter().take(n) {
            self.producers.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(first: u64, next: u64) -> StoredAppend {
        StoredAppend {
            first,
            next,
            epoch: 1,
        }
    }

    #[test]
    fn a_retried_conditional_append_is_a_duplicate_and_a_moved_log_a_conflict() {
        let mut t = ProducerTable::new(4);
        assert_eq!(t.admit(Some((9, 0)), 2, Some(5), 5), Admission::Append);
        t.record(9, 0, 2, stored(5, 7));
        // The retry finds the log moved on: still the same append, answered as stored.
        assert_eq!(
            t.admit(Some((9, 0)), 2, Some(5), 7),
            Admission::Duplicate(stored(5, 7))
        );
        // A new conditional append where the log has moved is a conflict.
        assert_eq!(
            t.admit(Some((9, 2)), 1, Some(5), 7),
            Admission::OffsetConflict { actual: 7 }
        );
        assert_eq!(
            t.admit(None, 1, Some(6), 7),
            Admission::OffsetConflict { actual: 7 }
        );
        assert_eq!(t.admit(None, 1, None, 7), Admission::Append);
        assert_eq!(
            t.admit(Some((9, 5)), 1, None, 7),
            Admission::SequenceGap { expected: 2 }
        );
    }

    #[test]
    fn retries_get_the_original_receipt() {
        let mut t = ProducerTable::new(16);
        assert_eq!(t.check(9, 0, 2), Decision::Append);
        t.record(9, 0, 2, stored(10, 12));
        assert_eq!(t.check(9, 2, 1), Decision::Append);
        t.record(9, 2, 1, stored(12, 13));
        assert_eq!(t.check(9, 0, 2), Decision::Duplicate(stored(10, 12)));
        assert_eq!(t.check(9, 2, 1), Decision::Duplicate(stored(12, 13)));
        assert_eq!(t.check(9, 5, 1), Decision::SequenceGap { expected: 3 });
        assert_eq!(t.check(9, 1, 1), Decision::Stale { expected: 3 });
        // Another producer is independent, and may start anywhere.
        assert_eq!(t.check(10, 77, 1), Decision::Append);
    }

    #[test]
    fn only_recent_batches_are_remembered() {
        let mut t = ProducerTable::new(16);
        for i in 0..(REMEMBERED_BATCHES as u64 + 1) {
            t.record(1, i, 1, stored(i, i + 1));
        }
        assert_eq!(t.check(1, 0, 1), Decision::Stale { expected: 9 });
        assert_eq!(t.check(1, 1, 1), Decision::Duplicate(stored(1, 2)));
    }

    #[test]
    fn capacity_evicts_least_recently_used() {
        let mut t = ProducerTable::new(4);
        for p in 1..=4 {
            t.record(p, 0, 1, stored(p, p + 1));
        }
        t.record(1, 1, 1, stored(10, 11)); // producer 1 is now the most recent
        assert_eq!(t.check(3, 0, 1), Decision::Duplicate(stored(3, 4))); // and now 3
        t.record(5, 0, 1, stored(11, 12));
        assert_eq!(t.len(), 4);
        assert_eq!(t.check(2, 0, 1), Decision::Append, "producer 2 was evicted");
        assert_eq!(t.check(1, 1, 1), Decision::Duplicate(stored(10, 11)));
        assert_eq!(
            t.check(3, 0, 1),
            Decision::Duplicate(stored(3, 4)),
            "a retry kept 3"
        );
    }

    #[test]
    fn truncation_forgets_what_it_removed() {
        let mut t = ProducerTable::new(4);
        t.record(1, 0, 1, stored(0, 1));
        t.record(1, 1, 1, stored(1, 2));
        t.forget_from(1);
        assert_eq!(t.check(1, 1, 1), Decision::Append);
        t.forget_from(0);
        assert!(t.is_empty());
    }
}
