//! The checker: watches a run's history as it happens (receipts, reads, truncations, commit
//! offsets, the controller's epochs) and the logs at the end, and reports the first broken
//! promise.
//!
//! - Every receipt is true: each replica it names holds the records, durably, at those offsets;
//!   one at `sync` names the leader and a full sync set, one at `quorum` a majority.
//! - No append is acknowledged in a stale epoch: by the time of the receipt, no leader of a
//!   newer epoch has begun writing below the append's end; and no leader begins writing below
//!   a record acknowledged in an earlier epoch.
//! - A truncation never removes an acknowledged record (at `sync` or `quorum`).
//! - No read returns beyond the commit offset, and no offset ever holds two payloads among the
//!   records reads returned and appends acknowledged at `sync` or `quorum`.
//! - A leader's commit offset never moves back, nor a follower's readable horizon, for as long
//!   as the node runs.
//! - At the end, after every fault has healed: every acknowledged (`sync`/`quorum`) append and
//!   every record a read returned is in the final log at its offset; no record is stored twice
//!   (so no retried idempotent append either); nothing definitely refused is stored; every
//!   replica holds the same committed records.
//! - Application snapshots: every snapshot stored, copied or served anywhere is the state
//!   after exactly the log's records below its offset (a fold of the final log's records, and
//!   of those retention removed); no offset has two snapshots; a replica's log never starts
//!   past its latest snapshot (retention keeps what a reader needs after it); at the end every
//!   replica holds its leader's latest snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use node_core::controller::meta::ClusterMeta;
use protocol::{Acks, ErrorCode};

use crate::disk::{Batch, Disk};
use crate::msg::Rep;
use crate::Config;

/// One log at the end of a run: its leader's batches, and each other replica's (node index,
/// batches).
pub type Final = (Vec<Batch>, Vec<(usize, Vec<Batch>)>);

/// What the checker has learnt.
pub struct Checker {
    sync_replicas: usize,
    replicas: usize,
    /// Per log: offset -> record id, for records acknowledged at sync or quorum.
    acked: Payloads,
    /// Per log: offset -> the epoch of the acknowledged record's batch.
    acked_epoch: BTreeMap<String, BTreeMap<u64, u64>>,
    /// Per log: offset -> record id, for records returned by reads.
    read: Payloads,
    /// Records a node definitely refused (never stored).
    refused: BTreeSet<u64>,
    /// Per log: epoch -> (the offset its leader began writing at, when it began) (us).
    epochs: BTreeMap<String, BTreeMap<u64, (u64, u64)>>,
    /// Per log: the epochs the controller has recorded.
    recorded: BTreeMap<String, BTreeSet<u64>>,
    /// Per log: the leader of the latest epoch recorded with one.
    last_leader: BTreeMap<String, String>,
    /// Per log: the highest commit offset any leader has had.
    commit: BTreeMap<String, u64>,
    /// Per log, the offset below which retention removed every replica's records, and the
    /// records it removed (by offset): what the replicas held, for the checks that come later.
    purged: BTreeMap<String, u64>,
    archive: Payloads,
    /// When each node's logs were last wiped (us).
    wiped: BTreeMap<usize, u64>,
    /// Per (node, incarnation, epoch, log): the leader's commit offset.
    leader_commit: BTreeMap<(usize, u64, u64, String), u64>,
    /// Per (node, incarnation, log): the follower's readable horizon.
    readable: BTreeMap<(usize, u64, String), u64>,
    /// Per log: offset -> state, for every application snapshot stored, copied or served.
    snapshots: Payloads,
    pub violations: Vec<String>,
    pub stats: Stats,
}

/// Counts for the run's report.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub appends_sent: u64,
    pub receipts: u64,
    pub acked_sync: u64,
    pub reads: u64,
    /// Reads of a client's tail answered with records.
    pub tail_reads: u64,
    pub truncations: u64,
    /// Epochs begun after the first of each log (elections, renewals, transfers).
    pub new_epochs: u64,
    /// New epochs whose leader is another node than the last epoch's (failovers and planned
    /// switchovers).
    pub leader_changes: u64,
    /// Batches damaged at rest (bit rot), and damaged batches the scrub repaired.
    pub rotted: u64,
    pub repaired: u64,
    /// Retention passes that moved a log's start, and copies replaced by bootstrap.
    pub purges: u64,
    pub bootstraps: u64,
    /// Application snapshots stored by leaders, copied by followers and served to readers;
    /// readers that started from a snapshot and read the log on from its offset.
    pub snapshots_put: u64,
    pub snapshots_copied: u64,
    pub snapshots_served: u64,
    pub readers_from_snapshot: u64,
}

/// How long after a node is wiped its leader may still count its acknowledgements: the
/// connection's idle timeout (1 s), with room for the messages on the way.
const WIPE_NOTICED_US: u64 = 3_000_000;

/// Record ids at offsets, per log.
type Payloads = BTreeMap<String, BTreeMap<u64, u64>>;

/// The simulated application's state before any record.
pub const STATE_ZERO: u64 = 0xcbf2_9ce4_8422_2325;

/// The application's state after `ids`, from `state` (FNV-1a over the record ids): a
/// snapshot's content. Any record missing, extra, reordered or changed gives another state.
pub fn fold(state: u64, ids: &[u64]) -> u64 {
    ids.iter().fold(state, |s, id| {
        id.to_le_bytes()
            .iter()
            .fold(s, |s, b| (s ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
    })
}

/// One replica's application snapshot at the end of a run: (node index, its log's start, its
/// latest snapshot (offset, state)).
pub type FinalSnapshot = (usize, u64, Option<(u64, u64)>);

/// Note that `log` holds `ids` from offset `first` in `mine`, and return an offset that now
/// holds two payloads, in `mine` or against `other`: (offset, one, the other).
fn note_payloads(
    mine: &mut Payloads,
    other: &Payloads,
    log: &str,
    first: u64,
    ids: &[u64],
) -> Option<(u64, u64, u64)> {
    let map = mine.entry(log.to_string()).or_default();
    let mut clash = None;
    for (i, id) in ids.iter().enumerate() {
        let o = first + i as u64;
        if let Some(prev) = map.insert(o, *id) {
            if prev != *id {
                clash = Some((o, prev, *id));
            }
        }
        if let Some(theirs) = other.get(log).and_then(|m| m.get(&o)) {
            if theirs != id {
                clash = Some((o, *theirs, *id));
            }
        }
    }
    clash
}

impl Checker {
    pub fn new(cfg: &Config) -> Checker {
        Checker {
            sync_replicas: cfg.sync_replicas.min(cfg.replicas - 1),
            replicas: cfg.replicas,
            acked: BTreeMap::new(),
            acked_epoch: BTreeMap::new(),
            read: BTreeMap::new(),
            refused: BTreeSet::new(),
            epochs: BTreeMap::new(),
            recorded: BTreeMap::new(),
            last_leader: BTreeMap::new(),
            commit: BTreeMap::new(),
            purged: BTreeMap::new(),
            archive: BTreeMap::new(),
            wiped: BTreeMap::new(),
            leader_commit: BTreeMap::new(),
            readable: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            violations: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Node `node` lost every log's copy (its data dir was wiped) at `now`.
    pub fn wiped(&mut self, node: usize, now: u64) {
        self.wiped.insert(node, now);
    }

    /// The highest commit offset of `log` any leader had.
    pub fn commit(&self, log: &str) -> u64 {
        self.commit.get(log).copied().unwrap_or(0)
    }

    /// Retention removed every record of `log` below `floor` from every replica (records all
    /// of them held durably, below the commit offset): `removed`, per node. The replicas must
    /// have held the same records; they are kept here, so that a receipt given later and the
    /// final check still see them.
    pub fn purged(&mut self, log: &str, floor: u64, removed: &[(usize, Vec<Batch>)]) {
        self.stats.purges += 1;
        let p = self.purged.entry(log.to_string()).or_default();
        *p = (*p).max(floor);
        let mut clash = None;
        for (node, batches) in removed {
            for b in batches {
                if let Some(c) =
                    note_payloads(&mut self.archive, &self.acked, log, b.base, &b.records)
                {
                    clash = Some((*node, c));
                }
            }
        }
        if let Some((node, (o, a, b))) = clash {
            self.violation(format!(
                "offset {o} of {log} holds two payloads: {a:#x} and {b:#x} (n{node}'s copy, as retention removed it)"
            ));
        }
    }

    /// The records of `log` at `first..next` that retention removed, if it removed them all.
    fn archived(&self, log: &str, first: u64, next: u64) -> Option<Vec<u64>> {
        let m = self.archive.get(log)?;
        let ids: Vec<u64> = m.range(first..next).map(|(_, id)| *id).collect();
        (ids.len() as u64 == next - first).then_some(ids)
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 16 {
            self.violations.push(what);
        }
    }

    /// A node applied controller metadata: count the epochs committed so far. Returns what is
    /// new, for the trace.
    pub fn saw_meta(&mut self, _now: u64, meta: &ClusterMeta) -> Vec<String> {
        let mut news = Vec::new();
        for (name, l) in &meta.logs {
            let seen = self.recorded.entry(name.clone()).or_default();
            for &(epoch, start) in &l.epochs {
                if seen.insert(epoch) {
                    news.push(format!(
                        "controller: {name} epoch {epoch} (reported end {start}), leader {:?}, sync set {:?}",
                        l.leader, l.sync_set
                    ));
                    if seen.len() > 1 {
                        self.stats.new_epochs += 1;
                    }
                    if *seen.last().expect("inserted") == epoch {
                        if let Some(leader) = &l.leader {
                            let before = self.last_leader.insert(name.clone(), leader.clone());
                            if before.is_some_and(|b| b != *leader) {
                                self.stats.leader_changes += 1;
                            }
                        }
                    }
                }
            }
        }
        news
    }

    /// Node `node` began leading `log` in `epoch`: it writes from `start`, its log's end.
    /// Anything acknowledged at or above `start` in an earlier epoch is lost.
    pub fn leads(&mut self, now: u64, node: usize, log: &str, epoch: u64, start: u64) {
        let seen = self.epochs.entry(log.to_string()).or_default();
        if seen.contains_key(&epoch) {
            return;
        }
        seen.insert(epoch, (start, now));
        let lost = self.acked_epoch.get(log).and_then(|m| {
            m.range(start..)
                .find(|(_, e)| **e < epoch)
                .map(|(o, e)| (*o, *e))
        });
        if let Some((o, e)) = lost {
            self.violation(format!(
                "n{node} leads {log} in epoch {epoch} from {start}, below the record at {o} acknowledged in epoch {e}"
            ));
        }
    }

    /// A leader's commit offset (node, incarnation, epoch).
    pub fn saw_commit(&mut self, _now: u64, who: (usize, u64, u64), log: &str, commit: u64) {
        let c = self.commit.entry(log.to_string()).or_default();
        *c = (*c).max(commit);
        let key = (who.0, who.1, who.2, log.to_string());
        let before = self.leader_commit.insert(key, commit).unwrap_or(0);
        if commit < before {
            self.violation(format!(
                "n{}'s commit offset of {log} moved back from {before} to {commit} in epoch {}",
                who.0, who.2
            ));
        }
    }

    /// A follower's readable horizon.
    pub fn saw_readable(&mut self, _now: u64, node: usize, incarnation: u64, log: &str, at: u64) {
        let before = self
            .readable
            .insert((node, incarnation, log.to_string()), at)
            .unwrap_or(0);
        if at < before {
            self.violation(format!(
                "n{node}'s readable horizon of {log} moved back from {before} to {at}"
            ));
        }
    }

    pub fn sent(&mut self, _records: &[u64]) {
        self.stats.appends_sent += 1;
    }

    /// Node `node` acknowledges an append of `records` to `log` at `acks` with `rep`.
    #[allow(clippy::too_many_arguments)]
    pub fn receipt(
        &mut self,
        (now, since): (u64, u64),
        node: usize,
        log: &str,
        rep: &Rep,
        acks: Acks,
        records: &[u64],
        disks: &[Disk],
    ) {
        let Rep::Receipt {
            first,
            next,
            epoch,
            degraded,
            holders,
            ..
        } = rep
        else {
            return;
        };
        let (first, next, epoch) = (*first, *next, *epoch);
        self.stats.receipts += 1;
        let floor = self.purged.get(log).copied().unwrap_or(0);
        for h in holders {
            // Wiped after the append was taken, or so recently that its leader may not have
            // noticed yet (its connection dies with the node, and the leader learns so within
            // the idle timeout): it may have held the records durably, and acknowledged them,
            // before it lost them (the node then withdraws until it has caught up).
            if self
                .wiped
                .get(h)
                .is_some_and(|at| *at >= since || now - *at <= WIPE_NOTICED_US)
            {
                continue;
            }
            let held = disks[*h].logs.get(log);
            // What retention removed, every replica held durably.
            let (durable, ids) = match next <= floor {
                true => (next, self.archived(log, first, next)),
                false => (
                    held.map_or(0, |l| l.durable_end()),
                    held.and_then(|l| l.ids(first, next)),
                ),
            };
            if durable < next || ids.as_deref() != Some(records) {
                self.violation(format!(
                    "n{node}'s receipt for {log} {first}..{next} (acks={}) names n{h}, which holds {ids:?} durably up to {durable}",
                    acks.name()
                ));
            }
        }
        let need = match acks {
            Acks::Sync if !degraded => 1 + self.sync_replicas,
            Acks::Quorum => self.replicas / 2 + 1,
            Acks::Leader => 1,
            _ => 0,
        };
        if holders.len() < need {
            self.violation(format!(
                "n{node}'s receipt for {log} {first}..{next} at acks={} names {} holders ({holders:?}), fewer than {need}",
                acks.name(),
                holders.len()
            ));
        }
        if acks != Acks::None {
            let newer = self.epochs.get(log).and_then(|e| {
                e.range(epoch + 1..)
                    .find(|(_, (start, seen))| *start < next && *seen < now)
                    .map(|(e, (start, _))| (*e, *start))
            });
            if let Some((e, start)) = newer {
                self.violation(format!(
                    "n{node} acknowledged {log} {first}..{next} in epoch {epoch}, after epoch {e} had begun at {start}"
                ));
            }
        }
    }

    /// A client got a receipt.
    #[allow(clippy::too_many_arguments)]
    pub fn acked(
        &mut self,
        log: &str,
        first: u64,
        next: u64,
        epoch: u64,
        records: &[u64],
        _asked: Acks,
        level: Acks,
        degraded: bool,
    ) {
        if degraded || !matches!(level, Acks::Sync | Acks::Quorum) {
            return;
        }
        self.stats.acked_sync += 1;
        let epochs = self.acked_epoch.entry(log.to_string()).or_default();
        for o in first..next {
            epochs.insert(o, epoch);
        }
        let n = (next - first) as usize;
        let clash = note_payloads(
            &mut self.acked,
            &self.read,
            log,
            first,
            &records[..n.min(records.len())],
        );
        if let Some((o, a, b)) = clash {
            self.violation(format!(
                "offset {o} of {log} holds two payloads: {a:#x} and {b:#x}"
            ));
        }
    }

    /// A client's append was definitely refused: it must never be stored.
    pub fn refused(&mut self, records: &[u64], _code: ErrorCode) {
        self.refused.extend(records.iter().copied());
    }

    /// Node `node` stored (`how`: "put" by a client, "copied" from its leader) or served
    /// ("served") an application snapshot of `log` at `offset`.
    pub fn snapshot(&mut self, node: usize, log: &str, offset: u64, state: u64, how: &str) {
        match how {
            "put" => self.stats.snapshots_put += 1,
            "copied" => self.stats.snapshots_copied += 1,
            _ => self.stats.snapshots_served += 1,
        }
        let known = self.snapshots.entry(log.to_string()).or_default();
        if let Some(other) = known.insert(offset, state) {
            if other != state {
                self.violation(format!(
                    "two snapshots of {log} at {offset}: {other:#x} and {state:#x} (n{node}'s, {how})"
                ));
            }
        }
    }

    /// Node `node`'s copy of `log` starts at `start` and its latest snapshot is at `latest`
    /// (`when`: what just happened): the log must still hold every record after the snapshot.
    pub fn reaches(&mut self, node: usize, log: &str, start: u64, latest: Option<u64>, when: &str) {
        if let Some(offset) = latest.filter(|o| *o < start) {
            self.violation(format!(
                "n{node}'s {log} starts at {start}, past its latest snapshot at {offset} ({when}): the records a reader needs after it are gone"
            ));
        }
    }

    /// A node answered a read.
    pub fn read(&mut self, _now: u64, node: usize, log: &str, rep: &Rep) {
        let Rep::Records { from, ids, .. } = rep else {
            return;
        };
        self.stats.reads += 1;
        let commit = self.commit.get(log).copied().unwrap_or(0);
        let end = from + ids.len() as u64;
        if !ids.is_empty() && end > commit {
            self.violation(format!(
                "n{node} returned {log} {from}..{end}, beyond the highest commit offset {commit}"
            ));
        }
        let clash = note_payloads(&mut self.read, &self.acked, log, *from, ids);
        if let Some((o, a, b)) = clash {
            self.violation(format!(
                "offset {o} of {log} holds two payloads: {a:#x} and {b:#x} (a read from n{node})"
            ));
        }
    }

    /// A node truncated `removed` from `log`. (A record may be stored twice at the same
    /// offset in two epochs: a client resent it to the next leader. Only the acknowledged copy
    /// counts.)
    pub fn truncated(&mut self, _now: u64, node: usize, log: &str, removed: &[Batch]) {
        self.stats.truncations += 1;
        let (Some(acked), Some(epochs)) = (self.acked.get(log), self.acked_epoch.get(log)) else {
            return;
        };
        for b in removed {
            for (i, id) in b.records.iter().enumerate() {
                let o = b.base + i as u64;
                if acked.get(&o) == Some(id) && epochs.get(&o) == Some(&b.epoch) {
                    let what = format!(
                        "n{node} truncated {log} at {}, removing acknowledged record {id:#x} at {o}",
                        removed[0].base
                    );
                    self.violation(what);
                    return;
                }
            }
        }
    }

    /// The end of the run: `finals` holds, per log, the final log's batches (its leader's) and
    /// each replica's batches.
    pub fn finish(
        &mut self,
        finals: &BTreeMap<String, Final>,
        snapshots: &BTreeMap<String, Vec<FinalSnapshot>>,
    ) {
        for (log, (leader, replicas)) in finals {
            // What retention removed, then the leader's log.
            let mut at: BTreeMap<u64, u64> = self.archive.get(log).cloned().unwrap_or_default();
            let mut seen: BTreeMap<u64, u64> = at.iter().map(|(o, id)| (*id, *o)).collect();
            for b in leader {
                for (i, id) in b.records.iter().enumerate() {
                    let o = b.base + i as u64;
                    at.insert(o, *id);
                    if let Some(prev) = seen.insert(*id, o) {
                        self.violation(format!(
                            "record {id:#x} is stored twice in {log}: at {prev} and at {o}"
                        ));
                    }
                    if self.refused.contains(id) {
                        self.violation(format!(
                            "record {id:#x} was refused, yet {log} holds it at {o}"
                        ));
                    }
                }
            }
            let floor = self.purged.get(log).copied().unwrap_or(0);
            let promised = self.acked.get(log).into_iter().flatten();
            let returned = self.read.get(log).into_iter().flatten();
            let mut lost = None;
            for (o, id) in promised.chain(returned) {
                if at.get(o) != Some(id) {
                    lost = Some((*o, *id, at.get(o).copied()));
                    break;
                }
            }
            if let Some((o, id, found)) = lost {
                self.violation(format!(
                    "{log} lost record {id:#x} at {o} (acknowledged or read; the final log has {found:?} there)"
                ));
            }
            self.check_snapshots(log, &at, snapshots.get(log).map_or(&[], |s| &s[..]));
            let end = leader.last().map_or(0, Batch::next);
            for (node, batches) in replicas {
                let other = batches.last().map_or(0, Batch::next);
                let kept = |bs: &[Batch]| -> Vec<(u64, Rc<[u64]>)> {
                    bs.iter()
                        .filter(|b| b.next() > floor)
                        .map(|b| (b.base, b.records.clone()))
                        .collect()
                };
                let same = kept(batches) == kept(leader);
                if !same || other != end {
                    self.violation(format!(
                        "n{node}'s {log} differs from its leader's at the end ({other} against {end} records)"
                    ));
                }
            }
        }
    }

    /// The end of the run, for `log`'s application snapshots: `at` holds every record the log
    /// ever committed (retention's included), by offset; `finals` each replica's log start and
    /// latest snapshot, its leader's first.
    fn check_snapshots(&mut self, log: &str, at: &BTreeMap<u64, u64>, finals: &[FinalSnapshot]) {
        let mut all: BTreeMap<u64, u64> = self.snapshots.get(log).cloned().unwrap_or_default();
        for (node, start, snap) in finals {
            let Some((offset, state)) = *snap else {
                continue;
            };
            self.reaches(*node, log, *start, Some(offset), "at the end");
            if let Some(other) = all.insert(offset, state).filter(|o| *o != state) {
                self.violation(format!(
                    "two snapshots of {log} at {offset}: {other:#x} and {state:#x} (n{node}'s at the end)"
                ));
            }
        }
        // The state after the records below each offset, in one pass over the log.
        let (mut state, mut next) = (STATE_ZERO, 0);
        let mut records = at.iter().peekable();
        for (offset, got) in all {
            while next < offset {
                match records.next_if(|(o, _)| **o == next) {
                    Some((_, id)) => state = fold(state, &[*id]),
                    None => {
                        self.violation(format!(
                            "a snapshot of {log} at {offset} reflects offset {next}, which the log never held"
                        ));
                        return;
                    }
                }
                next += 1;
            }
            if got != state {
                self.violation(format!(
                    "the snapshot of {log} at {offset} is {got:#x}, not the state after its records ({state:#x})"
                ));
            }
        }
        // Every replica copied its leader's latest snapshot (one may hold a newer one: a
        // deposed leader's that no other replica had copied).
        let leader = finals.first().and_then(|f| f.2).map(|s| s.0);
        for (node, _, snap) in finals.iter().skip(1) {
            let offset = snap.map(|s| s.0);
            if offset < leader {
                self.violation(format!(
                    "n{node}'s latest snapshot of {log} is at {offset:?} at the end, its leader's at {leader:?}"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker() -> Checker {
        Checker::new(&Config::default())
    }

    #[test]
    fn a_snapshot_must_be_the_state_after_exactly_the_records_below_its_offset() {
        let at: BTreeMap<u64, u64> = (0..10).map(|o| (o, 100 + o)).collect();
        let ids: Vec<u64> = at.values().copied().collect();
        let after = |n: usize| fold(STATE_ZERO, &ids[..n]);
        // Right: the state after 4 records, on the leader and a follower; nothing at all.
        let mut c = checker();
        c.snapshot(0, "l0", 4, after(4), "put");
        let finals = [(0, 0, Some((4, after(4)))), (1, 2, Some((4, after(4))))];
        c.check_snapshots("l0", &at, &finals);
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        // The state after 3 records, stored at 4.
        let mut c = checker();
        c.snapshot(0, "l0", 4, after(3), "put");
        c.check_snapshots("l0", &at, &[]);
        assert!(
            c.violations[0].contains("not the state after"),
            "{:?}",
            c.violations
        );
        // Two states at one offset.
        let mut c = checker();
        c.snapshot(0, "l0", 4, after(4), "put");
        c.snapshot(1, "l0", 4, after(5), "copied");
        assert!(
            c.violations[0].contains("two snapshots"),
            "{:?}",
            c.violations
        );
        // Beyond the records the log ever held.
        let mut c = checker();
        c.snapshot(0, "l0", 11, after(10), "put");
        c.check_snapshots("l0", &at, &[]);
        assert!(c.violations[0].contains("never held"), "{:?}", c.violations);
        // A replica whose log starts past its snapshot; a follower behind its leader's.
        let mut c = checker();
        let finals = [(0, 6, Some((4, after(4)))), (1, 0, None)];
        c.check_snapshots("l0", &at, &finals);
        assert!(
            c.violations[0].contains("past its latest snapshot"),
            "{:?}",
            c.violations
        );
        assert!(
            c.violations[1].contains("its leader's at Some(4)"),
            "{:?}",
            c.violations
        );
    }
}
