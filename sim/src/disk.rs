//! Simulated disks: each node's logs and its controller's Raft state.
//!
//! A log write lands in the page cache at once; an fdatasync takes time and makes durable what
//! was written before it was issued. A crash keeps what is durable and, of what is not, any
//! prefix of the writes (the last one kept may be torn, and a torn batch is dropped by
//! recovery, as log-core's crc32c check does). The controller's Raft state is written durably
//! by every call, as `DiskStorage` does (it fsyncs before returning); a full disk refuses its
//! writes with an out-of-space error that leaves nothing changed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use node_core::controller::core::{
    raft_memory, raise_to_snapshot, stored_snapshot, RaftStore, StoreError,
};
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};

/// A batch of records: offsets `base..base + records.len()`, written in `epoch`. A record is
/// a unique id (the workload's), so "byte-identical" is "the same ids at the same offsets".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub base: u64,
    pub epoch: u64,
    /// The idempotent producer and the sequence number of its first record.
    pub producer: Option<(u64, u64)>,
    pub records: Rc<[u64]>,
}

impl Batch {
    pub fn next(&self) -> u64 {
        self.base + self.records.len() as u64
    }
}

/// What bit rot does to a record id as read back.
const ROT: u64 = 0x0bad_0bad_0bad_0bad;

/// One log on one node's disk.
#[derive(Clone, Debug, Default)]
pub struct SimLog {
    /// The first offset it holds (retention moves it; a bootstrap sets it).
    start: u64,
    /// Which copy this is: a bootstrap replaces the copy by a new one, and an fdatasync of
    /// the old one makes nothing of the new one durable.
    copy: u64,
    batches: Vec<Batch>,
    /// How many of `batches` are durable.
    durable: usize,
    /// The copy was created afresh where the node should have held the log, and has not
    /// caught up yet (`node_core::log::must_withdraw`); durable, as the server's marker file.
    pub recovering: bool,
    /// The epoch history, (epoch, its first offset), durable as soon as recorded (log-core's
    /// epochs file): written when a batch of a new epoch is, or when a leader begins one.
    history: Vec<(u64, u64)>,
    /// Durable batches damaged at rest (bit rot), by base offset: their checksum fails, so
    /// they are never served (reads and replication streams stop at them) until repaired
    /// from another replica's copy.
    rotten: BTreeSet<u64>,
}

/// The record ids at `first..next` in `batches`, if they hold exactly those offsets.
fn ids_of(batches: &[Batch], first: u64, next: u64) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    for b in batches {
        for (i, id) in b.records.iter().enumerate() {
            let o = b.base + i as u64;
            if o >= first && o < next {
                out.push(*id);
            }
        }
    }
    (out.len() as u64 == next - first).then_some(out)
}

impl SimLog {
    /// A copy created afresh where the node should have held the log: recovering.
    pub fn afresh() -> SimLog {
        SimLog {
            recovering: true,
            ..SimLog::default()
        }
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> u64 {
        self.batches.last().map_or(self.start, Batch::next)
    }

    pub fn durable_end(&self) -> u64 {
        match self.durable {
            0 => self.start,
            n => self.batches[n - 1].next(),
        }
    }

    /// Bootstrap: the copy is replaced, durably, by an empty one that starts at `start` (its
    /// recovering state stays as it was).
    pub fn replace(&mut self, start: u64) -> Vec<Batch> {
        let removed = std::mem::take(&mut self.batches);
        *self = SimLog {
            start,
            copy: self.copy + 1,
            recovering: self.recovering,
            ..SimLog::default()
        };
        removed
    }

    /// The batches this copy holds durably.
    pub fn durable_batches(&self) -> &[Batch] {
        &self.batches[..self.durable]
    }

    /// Whether this copy holds `b` durably: the same offsets, epoch and records.
    pub fn holds(&self, b: &Batch) -> bool {
        matches!(self.at(b.base), Some(i) if i < self.durable && self.batches[i] == *b)
    }

    /// Retention: remove, durably, the batches wholly below `floor`; the log then starts at
    /// the first batch left (or at `floor`, when none is).
    pub fn purge(&mut self, floor: u64) -> Vec<Batch> {
        let n = self.batches.partition_point(|b| b.next() <= floor);
        let removed: Vec<Batch> = self.batches.drain(..n).collect();
        self.durable -= n.min(self.durable);
        self.start = self
            .batches
            .first()
            .map_or(floor.max(self.start), |b| b.base);
        let start = self.start;
        self.rotten.retain(|base| *base >= start);
        removed
    }

    pub fn last_epoch(&self) -> Option<u64> {
        self.history.last().map(|(e, _)| *e)
    }

    fn observe(&mut self, epoch: u64, at: u64) {
        if self.last_epoch().is_none_or(|last| epoch > last) {
            self.history.push((epoch, at));
        }
    }

    /// A leader begins `epoch` at the log's end, durably, before any batch of it.
    pub fn begin_epoch(&mut self, epoch: u64) {
        let end = self.end();
        self.observe(epoch, end);
    }

    pub fn batches(&self) -> &[Batch] {
        &self.batches
    }

    /// Write a batch (into the page cache): it must continue the log.
    pub fn append(&mut self, b: Batch) {
        assert_eq!(b.base, self.end(), "a write continues the log");
        assert!(!b.records.is_empty());
        self.observe(b.epoch, b.base);
        self.batches.push(b);
    }

    /// What an fdatasync issued now covers: this copy, up to its end.
    pub fn written(&self) -> (u64, u64) {
        (self.copy, self.end())
    }

    /// An fdatasync issued when copy `copy` was written up to `end` completed.
    pub fn synced(&mut self, (copy, end): (u64, u64)) {
        if copy == self.copy {
            let covered = self.batches.partition_point(|b| b.next() <= end);
            self.durable = self.durable.max(covered);
        }
    }

    /// Remove every batch at or after `to` (a batch boundary), durably. Returns what was
    /// removed.
    pub fn truncate(&mut self, to: u64) -> Vec<Batch> {
        assert!(to >= self.start, "truncation within the log");
        let keep = self.batches.partition_point(|b| b.next() <= to);
        assert!(
            keep == self.batches.len() || self.batches[keep].base == to,
            "truncation at a batch boundary"
        );
        let removed = self.batches.split_off(keep);
        self.durable = self.durable.min(keep);
        self.history.retain(|(_, start)| *start < to);
        self.rotten.retain(|base| *base < to);
        removed
    }

    /// A crash: what is durable stays, and of the rest the first `survivors` writes.
    pub fn crash(&mut self, survivors: usize) {
        let keep = (self.durable + survivors).min(self.batches.len());
        self.batches.truncate(keep);
        self.durable = keep;
        let end = self.end();
        self.history.retain(|(_, start)| *start <= end);
        self.rotten.retain(|base| *base < end);
    }

    /// Bit rot: the durable batch at `base` is damaged at rest. Returns whether it was a
    /// durable, sound batch.
    pub fn rot(&mut self, base: u64) -> bool {
        match self.at(base) {
            Some(i) if i < self.durable => self.rotten.insert(base),
            _ => false,
        }
    }

    /// The index of the batch that starts at `base`, if one does.
    fn at(&self, base: u64) -> Option<usize> {
        let i = self.batches.partition_point(|b| b.base < base);
        (self.batches.get(i)?.base == base).then_some(i)
    }

    /// The damaged batches: (base, next, epoch).
    pub fn rotten(&self) -> Vec<(u64, u64, u64)> {
        self.rotten
            .iter()
            .filter_map(|base| self.at(*base).map(|i| &self.batches[i]))
            .map(|b| (b.base, b.next(), b.epoch))
            .collect()
    }

    /// The first damaged batch holding any of the records `from..until`, if there is one: a
    /// read of that range fails its checksum there.
    pub fn rotten_in(&self, from: u64, until: u64) -> Option<u64> {
        if self.rotten.is_empty() {
            return None;
        }
        let i = self.batches.partition_point(|b| b.next() <= from);
        self.batches[i..]
            .iter()
            .take_while(|b| b.base < until)
            .map(|b| b.base)
            .find(|base| self.rotten.contains(base))
    }

    /// Whether this log holds `b`'s offsets and epoch soundly and durably: what a repair may
    /// copy.
    pub fn sound(&self, b: &Batch) -> bool {
        let same = |d: &Batch| d.next() == b.next() && d.epoch == b.epoch;
        matches!(self.at(b.base), Some(i) if i < self.durable && same(&self.batches[i]))
            && !self.rotten.contains(&b.base)
    }

    /// Repair a damaged batch with another replica's copy of it (the same offsets and epoch:
    /// the same leader wrote both). Returns whether it was repaired.
    pub fn repair(&mut self, good: &Batch) -> bool {
        let Some(i) = self
            .at(good.base)
            .filter(|_| self.rotten.contains(&good.base))
        else {
            return false;
        };
        let b = &self.batches[i];
        if b.next() != good.next() || b.epoch != good.epoch {
            return false;
        }
        self.batches[i] = good.clone();
        self.rotten.remove(&good.base);
        true
    }

    /// [`SimLog::read`] as the disk returns it: a damaged batch's records come back garbled
    /// (what a node that skipped the checksum would serve).
    pub fn read_as_stored(&self, from: u64, until: u64) -> Vec<Batch> {
        let mut out = self.read(from, until);
        for b in &mut out {
            if self.rotten.contains(&b.base) {
                b.records = b.records.iter().map(|id| id ^ ROT).collect();
            }
        }
        out
    }

    /// The batches holding records `from..until` (whole batches, starting at the one holding
    /// `from`).
    pub fn read(&self, from: u64, until: u64) -> Vec<Batch> {
        let i = self.batches.partition_point(|b| b.next() <= from);
        self.batches[i..]
            .iter()
            .take_while(|b| b.base < until)
            .cloned()
            .collect()
    }

    /// The record ids at `first..next`, if the log holds exactly those offsets (as written,
    /// damaged or not: what the node stored).
    pub fn ids(&self, first: u64, next: u64) -> Option<Vec<u64>> {
        ids_of(&self.read(first, next), first, next)
    }

    /// [`SimLog::ids`] as the disk returns them: a damaged batch's come back garbled.
    pub fn ids_as_stored(&self, first: u64, next: u64) -> Option<Vec<u64>> {
        ids_of(&self.read_as_stored(first, next), first, next)
    }

    /// Where `epoch` ends in this log (KIP-101): the largest epoch of the history that is at
    /// most `epoch`, and the offset where it ends; the history's first epoch and its start when
    /// it begins after `epoch`; (0, 0) when it is empty (as the server answers `EpochEnd`).
    pub fn epoch_end(&self, epoch: u64) -> (u64, u64) {
        let Some(i) = self.history.iter().rposition(|(e, _)| *e <= epoch) else {
            // The history begins after `epoch` (its first epoch and start), or is empty.
            return self.history.first().copied().unwrap_or((0, 0));
        };
        let end = self
            .history
            .get(i + 1)
            .map_or(self.end(), |(_, start)| *start);
        (self.history[i].0, end)
    }
}

/// The controller's durable Raft state on one node.
#[derive(Clone, Debug, Default)]
pub struct RaftDisk {
    pub hard_state: HardState,
    pub snapshot: Snapshot,
    pub entries: Vec<Entry>,
    /// The disk is full: writes fail with an out-of-space error.
    pub full: bool,
    /// Writes refused because the disk was full.
    pub refused: u64,
}

/// One node's disk.
#[derive(Debug, Default)]
pub struct Disk {
    pub logs: BTreeMap<String, SimLog>,
    /// Per log, the latest application snapshot stored durably: (offset, state). A snapshot
    /// is written whole and made durable before it replaces the last (as the server's
    /// atomic write does), so a crash keeps one or the other.
    pub snapshots: BTreeMap<String, (u64, u64)>,
    pub raft: Rc<RefCell<RaftDisk>>,
}

/// raft-rs storage over a [`RaftDisk`]: reads from memory, every write durable on return.
pub struct SimRaftStore {
    mem: MemStorage,
    disk: Rc<RefCell<RaftDisk>>,
}

/// Memory as a start from `d` builds it.
fn memory(d: &RaftDisk) -> MemStorage {
    raft_memory(&d.snapshot, &d.entries, &d.hard_state).expect("a stored state loads")
}

fn full() -> StoreError {
    StoreError::new(true, std::io::Error::from_raw_os_error(28))
}

impl SimRaftStore {
    /// Open the state on `disk` for a cluster of `voters` (created empty the first time).
    pub fn open(disk: Rc<RefCell<RaftDisk>>, voters: &[u64]) -> SimRaftStore {
        {
            // Created: the snapshot at index 0 carries the membership, as `DiskStorage`'s.
            let mut d = disk.borrow_mut();
            let meta = d.snapshot.mut_metadata();
            if meta.index == 0 && meta.get_conf_state().voters.is_empty() {
                meta.mut_conf_state().voters = voters.to_vec();
            }
        }
        let mem = memory(&disk.borrow());
        SimRaftStore { mem, disk }
    }

    fn writable(&self) -> Result<(), StoreError> {
        let mut d = self.disk.borrow_mut();
        if d.full {
            d.refused += 1;
            return Err(full());
        }
        Ok(())
    }
}

impl RaftStore for SimRaftStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        self.writable()?;
        if entries.is_empty() {
            return Ok(());
        }
        self.mem
            .wl()
            .append(entries)
            .map_err(|e| StoreError::new(false, e))?;
        let mut d = self.disk.borrow_mut();
        let first = entries[0].index;
        d.entries.retain(|e| e.index < first);
        d.entries.extend_from_slice(entries);
        Ok(())
    }

    fn set_hardstate(&mut self, hs: HardState) -> Result<(), StoreError> {
        if self.disk.borrow().hard_state == hs {
            return Ok(());
        }
        self.writable()?;
        self.mem.wl().set_hardstate(hs.clone());
        self.disk.borrow_mut().hard_state = hs;
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        let mut hs = self.disk.borrow().hard_state.clone();
        hs.commit = commit;
        self.set_hardstate(hs)
    }

    fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), StoreError> {
        self.writable()?;
        let (index, term) = (snap.get_metadata().index, snap.get_metadata().term);
        let mut meta_only = Snapshot::default();
        meta_only.set_metadata(snap.get_metadata().clone());
        self.mem
            .wl()
            .apply_snapshot(meta_only)
            .map_err(|e| StoreError::new(false, e))?;
        let mut d = self.disk.borrow_mut();
        d.entries.clear();
        d.snapshot = snap;
        raise_to_snapshot(&mut d.hard_state, index, term);
        let hs = d.hard_state.clone();
        self.mem.wl().set_hardstate(hs);
        Ok(())
    }

    fn compact(&mut self, index: u64, data: Vec<u8>, conf: ConfState) -> Result<(), StoreError> {
        self.writable()?;
        let term = self
            .mem
            .term(index)
            .map_err(|e| StoreError::new(false, e))?;
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let m = snap.mut_metadata();
        m.index = index;
        m.term = term;
        m.set_conf_state(conf);
        let mut d = self.disk.borrow_mut();
        d.entries.retain(|e| e.index > index);
        d.snapshot = snap;
        d.hard_state.commit = d.hard_state.commit.max(index);
        // Memory as a reopen builds it (the snapshot carries the voters).
        self.mem = memory(&d);
        Ok(())
    }

    fn entries_since_snapshot(&self) -> u64 {
        let d = self.disk.borrow();
        d.entries.len() as u64
    }

    fn snapshot_data(&self) -> Option<(u64, Vec<u8>)> {
        let d = self.disk.borrow();
        let index = d.snapshot.get_metadata().index;
        (index > 0).then(|| (index, d.snapshot.data.to_vec()))
    }
}

impl Storage for SimRaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        stored_snapshot(&self.disk.borrow().snapshot, request_index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base: u64, epoch: u64, n: u64) -> Batch {
        Batch {
            base,
            epoch,
            producer: None,
            records: (base..base + n).collect(),
        }
    }

    #[test]
    fn a_crash_keeps_what_is_durable_and_a_prefix_of_the_rest() {
        let mut l = SimLog::default();
        l.append(batch(0, 1, 2));
        l.append(batch(2, 1, 3));
        l.synced((0, 2));
        l.append(batch(5, 2, 1));
        assert_eq!((l.end(), l.durable_end()), (6, 2));
        let mut c = l.clone();
        c.crash(0);
        assert_eq!((c.end(), c.durable_end()), (2, 2));
        l.crash(1);
        assert_eq!((l.end(), l.durable_end()), (5, 5));
    }

    #[test]
    fn retention_moves_the_start_and_a_bootstrap_replaces_the_copy() {
        let mut l = SimLog::default();
        l.append(batch(0, 1, 2));
        l.append(batch(2, 1, 3));
        l.append(batch(5, 1, 1));
        l.synced((0, 5));
        assert!(l.holds(&batch(2, 1, 3)) && !l.holds(&batch(5, 1, 1)));
        // Whole batches only: 3 is inside the second one.
        assert_eq!(l.purge(3).len(), 1);
        assert_eq!((l.start(), l.durable_end(), l.end()), (2, 5, 6));
        assert_eq!(l.read(0, 6)[0].base, 2);
        // An fdatasync of the copy before a bootstrap makes nothing of the new one durable.
        let written = l.written();
        l.replace(10);
        assert_eq!((l.start(), l.end(), l.last_epoch()), (10, 10, None));
        l.append(batch(10, 2, 1));
        l.synced(written);
        assert_eq!(l.durable_end(), 10);
        l.synced(l.written());
        assert_eq!(l.durable_end(), 11);
    }

    #[test]
    fn epoch_ends_and_truncation_follow_the_history() {
        let mut l = SimLog::default();
        l.append(batch(0, 1, 2));
        l.append(batch(2, 1, 2));
        l.append(batch(4, 3, 2));
        assert_eq!(l.epoch_end(1), (1, 4));
        assert_eq!(l.epoch_end(2), (1, 4));
        assert_eq!(l.epoch_end(3), (3, 6));
        assert_eq!(l.epoch_end(0), (1, 0));
        assert_eq!(SimLog::default().epoch_end(3), (0, 0));
        assert_eq!(l.ids(1, 5), Some(vec![1, 2, 3, 4]));
        let removed = l.truncate(4);
        assert_eq!(removed.len(), 1);
        assert_eq!(l.end(), 4);
        assert_eq!(l.ids(3, 5), None);
    }

    #[test]
    fn bit_rot_is_never_read_as_data_and_a_sound_copy_repairs_it() {
        let mut l = SimLog::default();
        l.append(batch(0, 1, 2));
        l.append(batch(2, 1, 2));
        l.synced((0, 2));
        // Only durable batches rot (what is not durable is rewritten, or lost in a crash).
        assert!(!l.rot(2));
        assert!(l.rot(0));
        assert!(!l.rot(0), "already damaged");
        assert_eq!(l.rotten(), vec![(0, 2, 1)]);
        assert_eq!(l.rotten_in(1, 2), Some(0));
        assert_eq!(l.rotten_in(2, 4), None);
        // As stored, the damaged records read back as something else.
        let stored = l.ids_as_stored(0, 2).unwrap();
        assert_ne!(stored, vec![0, 1]);
        assert_eq!(l.ids(0, 2), Some(vec![0, 1]));
        // A copy of another epoch, or other offsets, is not the same batch.
        assert!(!l.repair(&batch(0, 2, 2)));
        assert!(!l.repair(&batch(0, 1, 1)));
        let mut other = SimLog::default();
        other.append(batch(0, 1, 2));
        assert!(!other.sound(&batch(0, 1, 2)), "not durable there");
        other.synced((0, 2));
        assert!(other.sound(&batch(0, 1, 2)));
        assert!(l.repair(&other.read(0, 2)[0]));
        assert_eq!(l.rotten_in(0, 2), None);
        assert_eq!(l.ids_as_stored(0, 2), Some(vec![0, 1]));
        // Truncation and crashes take damaged batches with them.
        assert!(l.rot(0));
        l.truncate(0);
        assert!(l.rotten().is_empty());
    }
}
