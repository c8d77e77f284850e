//! The simulated network between endpoints (nodes, then clients).
//!
//! Two kinds of traffic, as on the real QUIC transport: controller frames, one unidirectional
//! stream each, behave as datagrams (each delayed on its own, so reordered, and lost or
//! duplicated at the configured rates); requests, replies and replication streams are ordered
//! and reliable for as long as their connection lives. A connection between two endpoints dies
//! when a partition cuts either direction or either end crashes: what was in flight on it is
//! lost, and both ends learn of it after [`Net::detect_us`] (QUIC's idle timeout).

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The network's settings and state.
#[derive(Debug)]
pub struct Net {
    /// Directed links that drop everything.
    blocked: BTreeSet<(usize, usize)>,
    /// The generation of each endpoint pair's connection (lowest index first); bumped when it
    /// dies, so what was sent on an older one is dropped.
    generation: BTreeMap<(usize, usize), u64>,
    /// When the last ordered message on each directed link is delivered (they stay in order).
    fifo_at: BTreeMap<(usize, usize), u64>,
    /// One-way delay: a base, plus a uniform jitter up to this (us).
    pub delay_us: (u64, u64),
    /// Controller frames lost, and duplicated (probabilities).
    pub loss: f64,
    pub duplicate: f64,
    /// How long a dead connection takes to be noticed (us).
    pub detect_us: u64,
    /// Per directed pair: the latest moment its sender sent into a dead connection, while
    /// the notice of it is on its way.
    failed_since: BTreeMap<(usize, usize), u64>,
}

/// A message on its way.
#[derive(Debug)]
pub struct Flight {
    pub at: u64,
    pub generation: u64,
    pub ordered: bool,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Default for Net {
    fn default() -> Net {
        Net {
            blocked: BTreeSet::new(),
            generation: BTreeMap::new(),
            fifo_at: BTreeMap::new(),
            delay_us: (150, 1500),
            loss: 0.0,
            duplicate: 0.0,
            detect_us: 1_000_000,
            failed_since: BTreeMap::new(),
        }
    }
}

impl Net {
    pub fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.blocked.contains(&(from, to))
    }

    pub fn generation(&self, a: usize, b: usize) -> u64 {
        self.generation.get(&pair(a, b)).copied().unwrap_or(0)
    }

    /// Kill the connection between `a` and `b` (what is in flight on it is lost).
    pub fn break_connection(&mut self, a: usize, b: usize) {
        *self.generation.entry(pair(a, b)).or_default() += 1;
    }

    /// `from` sent to `to` over a dead connection at `now`. Returns whether a notice must be
    /// scheduled (none is on its way); one on its way covers this send too.
    pub fn send_failed(&mut self, from: usize, to: usize, now: u64) -> bool {
        self.failed_since.insert((from, to), now).is_none()
    }

    /// The notice for `from -> to` arrives: the latest failed send it covers.
    pub fn take_failed(&mut self, from: usize, to: usize) -> Option<u64> {
        self.failed_since.remove(&(from, to))
    }

    /// Cut the directed link `from -> to`; returns whether it was open. The connection dies.
    pub fn block(&mut self, from: usize, to: usize) -> bool {
        let new = self.blocked.insert((from, to));
        if new {
            self.break_connection(from, to);
        }
        new
    }

    pub fn unblock_all(&mut self) {
        self.blocked.clear();
    }

    pub fn blocked_links(&self) -> usize {
        self.blocked.len()
    }

    /// When (and on which connection generation) a message sent now arrives, if it does;
    /// controller frames may also arrive twice (the second time).
    pub fn send(
        &mut self,
        rng: &mut ChaCha8Rng,
        now: u64,
        from: usize,
        to: usize,
        ordered: bool,
    ) -> Vec<Flight> {
        if self.is_blocked(from, to) {
            return Vec::new();
        }
        let generation = self.generation(from, to);
        let (base, jitter) = self.delay_us;
        let mut delay = || base + rng.gen_range(0..=jitter);
        if ordered {
            let last = self.fifo_at.entry((from, to)).or_default();
            let at = (now + delay()).max(*last);
            *last = at;
            return vec![Flight {
                at,
                generation,
                ordered,
            }];
        }
        let (first, second) = (delay(), delay());
        let mut out = Vec::new();
        if !rng.gen_bool(self.loss) {
            out.push(Flight {
                at: now + first,
                generation,
                ordered,
            });
        }
        if rng.gen_bool(self.duplicate) {
            out.push(Flight {
                at: now + first + second,
                generation,
                ordered,
            });
        }
        out
    }

    /// Whether a message in `flight` from `from` to `to` is delivered now.
    pub fn delivers(&self, from: usize, to: usize, flight_generation: u64, ordered: bool) -> bool {
        !self.is_blocked(from, to) && (!ordered || self.generation(from, to) == flight_generation)
    }
}
