//! Replication decisions, sans-IO: the leader's view of its followers (progress, the sync set,
//! the commit offset, which level an append has reached) and a follower's next step (fetch,
//! truncate at the epoch divergence point, or bootstrap from a snapshot).
//!
//! Nothing here performs I/O or reads a clock: callers feed events with the current time in
//! milliseconds and act on what comes back. The node drives these from its QUIC streams and its
//! log; tests (and a simulator) drive them directly.
//!
//! Offsets are horizons, as everywhere in replog: a follower's `durable` offset is the first
//! record it does *not* hold durably.

use std::collections::BTreeMap;

use crate::planted::{self, Bug};
use crate::Acks;

/// What to do when an `acks=sync` append cannot get the sync set it needs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Insufficient {
    /// Durability first: the append fails with `not_enough_replicas`.
    Reject,
    /// Availability first: the append is acknowledged at the level it did reach, marked
    /// degraded, and the shortfall is reported.
    Degrade,
}

/// The replication policy of a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Size of the sync set: 0 = asynchronous, 1 = semi-synchronous, every follower = fully
    /// synchronous.
    pub sync_replicas: usize,
    /// A sync follower further behind the leader's end than this many records leaves the set.
    pub sync_lag_records_max: u64,
    /// A sync follower that has not been caught up to the leader's end for this long leaves
    /// the set (Kafka's `replica.lag.time.max.ms`). An idle log is a caught-up log: the clock
    /// starts when the leader's end moves past what the follower holds, not when it was last
    /// heard.
    pub sync_lag_ms_max: u64,
    pub insufficient: Insufficient,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            sync_replicas: 1,
            sync_lag_records_max: 10_000,
            sync_lag_ms_max: 5_000,
            insufficient: Insufficient::Reject,
        }
    }
}

/// The leader's knowledge of one follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowerProgress {
    /// First offset the follower does not hold durably (its acknowledged flush offset).
    pub durable: u64,
    pub connected: bool,
    /// When the follower last acknowledged, or connected.
    pub last_heard_ms: u64,
    /// The leader's end when the follower was last heard: an acknowledgement reaching it
    /// shows the follower was caught up at that earlier moment (Kafka's rule for followers
    /// that keep up with a log that never stops moving).
    pub end_when_heard: u64,
    /// The last moment the follower was known to hold everything the leader had written:
    /// its `durable` reached the leader's end, or the leader's end moved on from a point the
    /// follower held. `None`: never yet.
    pub caught_up_ms: Option<u64>,
    pub in_sync_set: bool,
}

impl FollowerProgress {
    /// The follower was known to hold everything the leader had written at `at_ms` (the
    /// caught-up moment never moves back).
    fn caught_up_at(&mut self, at_ms: u64) {
        self.caught_up_ms = Some(self.caught_up_ms.map_or(at_ms, |c| c.max(at_ms)));
    }
}

/// Why a follower left the sync set.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LeaveReason {
    Disconnected,
    LagRecords,
    LagTime,
    /// It came back holding less than the commit offset (a wiped or restored data dir): it
    /// must catch up before it may count again.
    Regressed,
}

/// Something the caller should log, count or tell others about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A caught-up follower joined the sync set.
    Joined(String),
    /// A follower left the sync set.
    Left(String, LeaveReason),
    /// The commit offset moved forward (it never moves back).
    Committed(u64),
}

/// Where an append stands with respect to the level it asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Not yet: wait for more acknowledgements (or the deadline).
    Pending,
    /// Reached (or, with `degraded`, acknowledged below the level asked for). `replicas`: the
    /// leader (if durable) and the followers that hold the records durably.
    Done {
        replicas: Vec<String>,
        degraded: bool,
    },
    /// The level cannot be reached with the replicas there are: fail the append.
    NotEnoughReplicas { have: usize, need: usize },
}

/// The leader's replication state for one log.
#[derive(Clone, Debug)]
pub struct Leader {
    config: ReplicationConfig,
    /// The leader's own id, named in receipts.
    id: String,
    end: u64,
    flushed: u64,
    commit: u64,
    followers: BTreeMap<String, FollowerProgress>,
    /// The sync set the cluster's controller has on record (see [`Leader::set_confirmed`]).
    confirmed: std::collections::BTreeSet<String>,
    /// Whether a controller keeps a record of the sync set at all.
    controlled: bool,
}

impl Leader {
    /// A leader whose log ends at `end`, durable up to `flushed`, with `commit` as the last commit
    /// offset it knew (it never moves back).
    pub fn new(
        id: impl Into<String>,
        config: ReplicationConfig,
        end: u64,
        flushed: u64,
        commit: u64,
    ) -> Leader {
        Leader {
            config,
            id: id.into(),
            end,
            flushed,
            commit,
            followers: BTreeMap::new(),
            confirmed: Default::default(),
            controlled: false,
        }
    }

    /// The sync set the controller has on record. Failover elects only among the members the
    /// controller knows, so from the first call on:
    /// - an append is committed only once the leader, every local member and every recorded
    ///   member hold it (a member that left locally is still waited for until its removal is
    ///   on record);
    /// - only members both local and on record fill the `sync_replicas` places (one that
    ///   joined locally counts once it is on record), so an append acknowledged at `sync` is
    ///   always held by enough members the controller knows.
    pub fn set_confirmed(
        &mut self,
        ids: impl IntoIterator<Item = String>,
        now_ms: u64,
    ) -> Vec<Event> {
        self.confirmed = ids.into_iter().collect();
        self.controlled = true;
        self.settle(now_ms)
    }

    /// A controller keeps the cluster's record of the sync set, and none has been received
    /// yet: until one is, no member fills a sync-set place (failover could not count on it).
    pub fn expect_controller(&mut self) {
        self.controlled = true;
    }

    /// Members that fill a sync-set place: in the local set and, with a controller, on its
    /// record.
    fn counted(&self) -> impl Iterator<Item = (&String, &FollowerProgress)> {
        self.followers
            .iter()
            .filter(|(id, f)| f.in_sync_set && (!self.controlled || self.confirmed.contains(*id)))
    }

    /// Whether an `acks=sync` append finds its full sync set now (every place filled by a
    /// member the controller, if any, has on record).
    pub fn sync_ready(&self) -> bool {
        self.counted().count() >= self.config.sync_replicas
    }

    /// Why the sync set is not ready, one phrase per follower that could fill a place (for
    /// an operator: who is missing and what it lacks).
    pub fn sync_missing(&self) -> Vec<String> {
        let counted: Vec<&String> = self.counted().map(|(id, _)| id).collect();
        self.followers
            .iter()
            .filter(|(id, _)| !counted.contains(id))
            .map(|(id, f)| {
                let why = if !f.connected {
                    "not connected".to_string()
                } else if !f.in_sync_set {
                    format!("behind by {} records", self.end.saturating_sub(f.durable))
                } else {
                    "caught up, not yet on the controller's record".to_string()
                };
                format!("{id}: {why}")
            })
            .collect()
    }

    /// Whether the local sync set differs from the one on record with the controller.
    pub fn unconfirmed(&self) -> bool {
        self.sync_set()
            .into_iter()
            .ne(self.confirmed.iter().map(String::as_str))
    }

    /// Whether follower `id` (known or not) must hold an append before it commits.
    fn required(&self, id: &str, f: Option<&FollowerProgress>) -> bool {
        f.is_some_and(|f| f.in_sync_set) || self.confirmed.contains(id)
    }

    /// The lowest durable offset among the required followers (`u64::MAX` if none); a
    /// recorded member the leader has never heard from holds nothing.
    fn required_durable(&self) -> u64 {
        let known = self
            .followers
            .iter()
            .filter(|(id, f)| self.required(id, Some(f)))
            .map(|(_, f)| f.durable);
        let unknown = self
            .confirmed
            .iter()
            .filter(|id| !self.followers.contains_key(*id))
            .map(|_| 0);
        known.chain(unknown).min().unwrap_or(u64::MAX)
    }

    pub fn config(&self) -> &ReplicationConfig {
        &self.config
    }

    pub fn commit_offset(&self) -> u64 {
        self.commit
    }

    pub fn followers(&self) -> &BTreeMap<String, FollowerProgress> {
        &self.followers
    }

    /// Members of the sync set, by id.
    pub fn sync_set(&self) -> Vec<&str> {
        self.sync_members().collect()
    }

    /// Members of the sync set, by id, without collecting them.
    fn sync_members(&self) -> impl Iterator<Item = &str> {
        self.followers
            .iter()
            .filter(|(_, f)| f.in_sync_set)
            .map(|(id, _)| id.as_str())
    }

    /// How many sync-set places are empty (the durability debt while degraded).
    pub fn sync_shortfall(&self) -> usize {
        let members = self.sync_members().count();
        self.config.sync_replicas.saturating_sub(members)
    }

    /// Lag of a follower behind the leader's end, in records.
    pub fn lag_records(&self, id: &str) -> Option<u64> {
        self.followers
            .get(id)
            .map(|f| self.end.saturating_sub(f.durable))
    }

    /// The leader appended: its log now ends at `end`. A follower that held everything up to
    /// this moment was caught up until now, however long the log was idle before.
    pub fn appended(&mut self, end: u64, now_ms: u64) {
        if planted::active(Bug::CommitFromWrittenEnd) {
            self.flushed = self.flushed.max(end);
        }
        if end > self.end {
            for f in self.followers.values_mut() {
                if f.durable >= self.end {
                    f.caught_up_at(now_ms);
                }
            }
            self.end = end;
        }
    }

    /// The leader's own fdatasync reached `flushed`.
    pub fn flushed(&mut self, flushed: u64, now_ms: u64) -> Vec<Event> {
        self.flushed = self.flushed.max(flushed);
        self.appended(flushed, now_ms);
        self.settle(now_ms)
    }

    /// Register a follower the leader expects (configured, not yet connected): it counts
    /// among the replicas a quorum is a majority of.
    pub fn register(&mut self, id: &str, now_ms: u64) {
        let end = self.end;
        self.followers
            .entry(id.to_string())
            .or_insert(FollowerProgress {
                durable: 0,
                connected: false,
                last_heard_ms: now_ms,
                end_when_heard: end,
                caught_up_ms: None,
                in_sync_set: false,
            });
    }

    /// A follower connected (or reconnected), holding `durable` records durably. One that comes
    /// back with less than the commit offset leaves the sync set until it has caught up.
    pub fn connected(&mut self, id: &str, durable: u64, now_ms: u64) -> Vec<Event> {
        let end = self.end;
        let f = self
            .followers
            .entry(id.to_string())
            .or_insert(FollowerProgress {
                durable,
                connected: true,
                last_heard_ms: now_ms,
                end_when_heard: end,
                caught_up_ms: None,
                in_sync_set: false,
            });
        f.connected = true;
        f.durable = durable;
        f.last_heard_ms = now_ms;
        f.end_when_heard = end;
        let mut events = Vec::new();
        if f.in_sync_set && durable < self.commit {
            f.in_sync_set = false;
            events.push(Event::Left(id.to_string(), LeaveReason::Regressed));
        }
        events.extend(self.settle(now_ms));
        events
    }

    /// A follower acknowledged that it holds everything below `durable` durably. An
    /// acknowledgement never moves a follower back (a reordered, older one is ignored).
    pub fn acked(&mut self, id: &str, durable: u64, now_ms: u64) -> Vec<Event> {
        if let Some(f) = self.followers.get_mut(id) {
            f.durable = f.durable.max(durable.min(self.end));
            if f.durable >= f.end_when_heard {
                // It holds what the leader had when it was last heard: caught up then.
                let then = f.last_heard_ms;
                f.caught_up_at(then);
            }
            f.last_heard_ms = now_ms;
            f.end_when_heard = self.end;
        }
        self.settle(now_ms)
    }

    /// A follower's stream ended.
    pub fn disconnected(&mut self, id: &str, now_ms: u64) -> Vec<Event> {
        if let Some(f) = self.followers.get_mut(id) {
            f.connected = false;
        }
        self.settle(now_ms)
    }

    /// Time passed: re-check lag bounds.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Event> {
        self.settle(now_ms)
    }

    /// Where an append ending at `next` stands for level `acks`.
    pub fn progress(&self, acks: Acks, next: u64) -> Progress {
        let leader_durable = self.flushed >= next;
        let durable_followers = || {
            self.followers
                .iter()
                .filter(move |(_, f)| f.durable >= next)
                .map(|(id, _)| id)
        };
        // Built only for the answer (it is the receipt's list of holders).
        let holders = || {
            let mut r: Vec<String> = Vec::with_capacity(1 + self.followers.len());
            if leader_durable {
                r.push(self.id.clone());
            }
            r.extend(durable_followers().cloned());
            r
        };
        match acks {
            Acks::None => Progress::Done {
                replicas: holders(),
                degraded: false,
            },
            Acks::Leader => {
                if leader_durable {
                    Progress::Done {
                        replicas: holders(),
                        degraded: false,
                    }
                } else {
                    Progress::Pending
                }
            }
            Acks::Sync => {
                let (have, need) = (self.counted().count(), self.config.sync_replicas);
                let short = have < need;
                if short && self.config.insufficient == Insufficient::Reject {
                    return Progress::NotEnoughReplicas { have, need };
                }
                if leader_durable && self.required_durable() >= next {
                    Progress::Done {
                        replicas: holders(),
                        degraded: short,
                    }
                } else {
                    Progress::Pending
                }
            }
            Acks::Quorum => {
                let replicas = 1 + self.followers.len();
                let need = replicas / 2 + 1;
                let connected = 1 + self.followers.values().filter(|f| f.connected).count();
                if connected < need {
                    return Progress::NotEnoughReplicas {
                        have: connected,
                        need,
                    };
                }
                // A majority, and committed: failover elects from the sync set (policy
                // `sync_set`), so an append the sync set lacks could be lost with the leader
                // even when a majority holds it.
                let have = usize::from(leader_durable) + durable_followers().count();
                if have >= need && leader_durable && self.required_durable() >= next {
                    Progress::Done {
                        replicas: holders(),
                        degraded: false,
                    }
                } else {
                    Progress::Pending
                }
            }
        }
    }

    /// Apply the sync-set rules, then move the commit offset.
    fn settle(&mut self, now_ms: u64) -> Vec<Event> {
        let mut events = Vec::new();
        let (end, cfg) = (self.end, &self.config);
        for (id, f) in self.followers.iter_mut() {
            if f.durable >= end {
                f.caught_up_at(now_ms);
            }
            if !f.in_sync_set {
                continue;
            }
            let behind = end.saturating_sub(f.durable);
            let lagging = if planted::active(Bug::LagByLastHeard) {
                now_ms.saturating_sub(f.last_heard_ms) > cfg.sync_lag_ms_max
            } else {
                behind > 0
                    && now_ms.saturating_sub(f.caught_up_ms.unwrap_or(0)) > cfg.sync_lag_ms_max
            };
            let reason = if !f.connected {
                Some(LeaveReason::Disconnected)
            } else if behind > cfg.sync_lag_records_max {
                Some(LeaveReason::LagRecords)
            } else if lagging {
                Some(LeaveReason::LagTime)
            } else {
                None
            };
            if let Some(r) = reason {
                f.in_sync_set = false;
                events.push(Event::Left(id.clone(), r));
            }
        }
        // Fill empty places with caught-up followers, the most advanced first. A follower
        // counts as caught up when it holds everything the leader has flushed and is within
        // the record lag bound of the leader's end.
        let mut places = self.sync_shortfall();
        if places > 0 {
            let (flushed, lag_max) = (self.flushed, self.config.sync_lag_records_max);
            let mut candidates: Vec<(&String, &FollowerProgress)> = self
                .followers
                .iter()
                .filter(|(_, f)| {
                    f.connected
                        && !f.in_sync_set
                        && f.durable >= flushed
                        && end.saturating_sub(f.durable) <= lag_max
                        && (!planted::active(Bug::LagByLastHeard)
                            || now_ms.saturating_sub(f.last_heard_ms) <= cfg.sync_lag_ms_max)
                })
                .collect();
            candidates.sort_by(|a, b| b.1.durable.cmp(&a.1.durable).then(a.0.cmp(b.0)));
            let joining: Vec<String> = candidates.into_iter().map(|(id, _)| id.clone()).collect();
            for id in joining {
                if places == 0 {
                    break;
                }
                let f = self.followers.get_mut(&id).expect("candidate exists");
                f.in_sync_set = true;
                // It holds all the leader flushed: the lag clock starts now at the latest.
                f.caught_up_at(now_ms);
                events.push(Event::Joined(id));
                places -= 1;
            }
        }
        // The commit offset: durable on the leader and on every sync-set member. It only
        // moves forward: a member that joins is caught up, so it cannot pull it back.
        let commit = self.flushed.min(self.required_durable());
        if commit > self.commit {
            self.commit = commit;
            events.push(Event::Committed(commit));
        }
        // Paired with the rule above: whatever the followers said, the commit offset is never
        // beyond what the leader itself holds durably, nor beyond its log.
        assert!(
            self.commit <= self.flushed,
            "commit beyond the leader's flush"
        );
        assert!(self.flushed <= self.end, "flushed beyond the leader's end");
        events
    }
}

/// What a follower may serve to readers, knowing the leader's commit offset `leader_commit`
/// and holding records durably up to `durable`: committed records it holds durably.
pub fn readable(leader_commit: u64, durable: u64) -> u64 {
    leader_commit.min(durable)
}

/// What a follower knows about its own log.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LocalLog {
    pub start: u64,
    /// Next offset (end of what it holds).
    pub end: u64,
    /// Epoch of its last batch, if it holds any.
    pub last_epoch: Option<u64>,
    /// The commit offset it last learnt from a leader (its high watermark). Not a truncation
    /// point: the leader may have committed more since.
    pub commit: u64,
}

/// What the leader told the follower.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LeaderLog {
    pub epoch: u64,
    /// First offset the leader still stores.
    pub start: u64,
    pub end: u64,
    /// The leader's answer to "where does my last epoch end in your log?": the end offset of
    /// the follower's last epoch in the leader's history (KIP-101), if the follower asked.
    pub end_of_follower_epoch: Option<u64>,
}

/// A follower's next step.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ask the leader where the follower's last epoch ends in its history.
    AskEpochEnd { epoch: u64 },
    /// Remove everything at or after this offset (a divergent suffix), then ask again.
    Truncate { to: u64 },
    /// The leader no longer has what comes next: copy its snapshot (sealed segments) first.
    Bootstrap,
    /// Fetch from this offset.
    Fetch { from: u64 },
}

/// Decide a follower's next step (KIP-101: truncate only at the divergence point the leader
/// names, never at a local high watermark).
pub fn follower_step(local: LocalLog, leader: LeaderLog) -> Step {
    if local.end < leader.start {
        return Step::Bootstrap;
    }
    match local.last_epoch {
        None => Step::Fetch { from: local.end },
        Some(e) if e == leader.epoch => Step::Fetch { from: local.end },
        Some(e) => match leader.end_of_follower_epoch {
            None => Step::AskEpochEnd { epoch: e },
            Some(_) if planted::active(Bug::TruncateBelowCommit) && local.commit < local.end => {
                Step::Truncate { to: local.commit }
            }
            Some(epoch_end) if epoch_end < local.end => {
                if epoch_end < local.start {
                    Step::Bootstrap
                } else {
                    Step::Truncate { to: epoch_end }
                }
            }
            Some(_) => Step::Fetch { from: local.end },
        },
    }
}

/// The leader answered `EpochEnd` with an empty history ((0, 0)) while the follower holds
/// records of an epoch: truncating them all to match could lose acknowledged records, so the
/// follower refuses (and asks again later).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the leader has an empty epoch history (asked about epoch {asked}) while this follower holds records up to {end}; refusing to truncate them")]
pub struct EmptyLeaderHistory {
    /// The epoch the follower asked about.
    pub asked: u64,
    /// Where the follower's log ends.
    pub end: u64,
}

/// A follower's step once the leader has answered its `EpochEnd` question with (`epoch`,
/// `end`): [`follower_step`] with that answer, except that an empty history on the leader
/// never truncates what the follower holds.
pub fn after_epoch_end(local: LocalLog, epoch: u64, end: u64) -> Result<Step, EmptyLeaderHistory> {
    let leader = LeaderLog {
        epoch: 0,
        start: 0,
        end: 0,
        end_of_follower_epoch: Some(end),
    };
    let step = follower_step(local, leader);
    match (step, local.last_epoch) {
        (Step::Truncate { to: 0 }, Some(asked)) if epoch == 0 => Err(EmptyLeaderHistory {
            asked,
            end: local.end,
        }),
        _ => Ok(step),
    }
}

/// Why a follower refuses a replication frame (nothing of it is written).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The frame's epoch is below the highest leader epoch this follower has seen (R2): it
    /// comes from a deposed leader.
    StaleEpoch { seen: u64, got: u64 },
    /// A batch carries an epoch above the leader epoch of its frame.
    FutureBatchEpoch { frame: u64, batch: u64 },
    /// The frame does not continue the follower's log where it ends.
    Gap { expected: u64, got: u64 },
}

/// What a follower checks of a `Replicated` frame besides its batches.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FrameHead {
    /// The leader's epoch.
    pub epoch: u64,
    /// The leader's commit offset.
    pub commit: u64,
    /// Where its batches start (where the last frame ended).
    pub first: u64,
    /// Where its batches end.
    pub next: u64,
}

impl FrameHead {
    pub fn new(epoch: u64, commit: u64, first: u64, next: u64) -> FrameHead {
        FrameHead {
            epoch,
            commit,
            first,
            next,
        }
    }
}

/// A follower's replication state for one log: the highest leader epoch it has seen, how far
/// its log goes (written and durable), and the commit offset the leader last sent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Follower {
    epoch: u64,
    end: u64,
    durable: u64,
    acked: u64,
    leader_commit: u64,
}

impl Follower {
    /// A follower whose log ends at `end`, durable up to `durable`, whose last batch is of
    /// `epoch` (0 if empty).
    pub fn new(end: u64, durable: u64, epoch: u64) -> Follower {
        Follower {
            epoch,
            end,
            durable,
            acked: 0,
            leader_commit: 0,
        }
    }

    /// Check a `Replicated` frame whose batches carry the epochs `batch_epochs`, before any of
    /// it is written. On success the follower expects the next frame at `head.next`.
    pub fn accept(
        &mut self,
        head: FrameHead,
        batch_epochs: impl IntoIterator<Item = u64>,
    ) -> Result<(), Refusal> {
        let FrameHead {
            epoch,
            commit,
            first,
            next,
        } = head;
        if epoch < self.epoch && !planted::active(Bug::StaleEpochAccepted) {
            return Err(Refusal::StaleEpoch {
                seen: self.epoch,
                got: epoch,
            });
        }
        if let Some(b) = batch_epochs.into_iter().find(|&b| b > epoch) {
            return Err(Refusal::FutureBatchEpoch {
                frame: epoch,
                batch: b,
            });
        }
        if first != self.end {
            return Err(Refusal::Gap {
                expected: self.end,
                got: first,
            });
        }
        self.epoch = epoch;
        self.end = self.end.max(next);
        self.leader_commit = self.leader_commit.max(commit);
        Ok(())
    }

    /// The local log has written (not yet durably) up to `written`. Returns the offset to
    /// acknowledge to the leader when it moved: never, since only durable records are
    /// acknowledged (the planted `AckBeforeFollowerFsync` does otherwise).
    pub fn written(&mut self, written: u64) -> Option<u64> {
        if !planted::active(Bug::AckBeforeFollowerFsync) {
            return None;
        }
        let w = written.min(self.end);
        (w > self.acked).then(|| {
            self.acked = w;
            w
        })
    }

    /// The local log is durable up to `durable`. Returns the offset to acknowledge to the
    /// leader, when it moved.
    pub fn flushed(&mut self, durable: u64) -> Option<u64> {
        self.durable = self.durable.max(durable.min(self.end));
        let ack = (self.durable > self.acked).then(|| {
            self.acked = self.durable;
            self.durable
        });
        // Paired with `accept`: nothing is durable (or acknowledged as such) beyond what was
        // accepted, and what is acknowledged is durable.
        assert!(self.durable <= self.end, "durable beyond the accepted end");
        assert!(
            self.acked <= self.durable || planted::active(Bug::AckBeforeFollowerFsync),
            "acknowledged beyond the durable end"
        );
        ack
    }

    /// Highest leader epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Where the local log is durable, as far as it continues the stream (never beyond what
    /// was accepted).
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// What this follower may serve to readers: committed by the leader and durable here.
    pub fn readable(&self) -> u64 {
        readable(self.leader_commit, self.durable)
    }

    /// The leader's commit offset as the last accepted frame brought it.
    pub fn leader_commit(&self) -> u64 {
        self.leader_commit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(k: usize, insufficient: Insufficient) -> ReplicationConfig {
        ReplicationConfig {
            sync_replicas: k,
            sync_lag_records_max: 100,
            sync_lag_ms_max: 1000,
            insufficient,
        }
    }

    fn ids(p: &Progress) -> Vec<String> {
        match p {
            Progress::Done { replicas, .. } => replicas.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn semi_sync_waits_for_the_sync_follower_and_commits() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Reject), 0, 0, 0);
        assert_eq!(l.connected("a", 0, 0), vec![Event::Joined("a".into())]);
        l.connected("b", 0, 0);
        assert_eq!(l.sync_set(), ["a"]);
        l.appended(10, 1);
        assert_eq!(l.flushed(10, 1), vec![]);
        assert_eq!(
            l.progress(Acks::Leader, 10),
            Progress::Done {
                replicas: vec!["L".into()],
                degraded: false
            }
        );
        assert_eq!(l.progress(Acks::Sync, 10), Progress::Pending);
        // The async follower does not count for sync.
        l.acked("b", 10, 2);
        assert_eq!(l.progress(Acks::Sync, 10), Progress::Pending);
        assert_eq!(l.commit_offset(), 0);
        assert_eq!(l.acked("a", 10, 3), vec![Event::Committed(10)]);
        assert_eq!(ids(&l.progress(Acks::Sync, 10)), ["L", "a", "b"]);
    }

    #[test]
    fn members_on_record_with_the_controller_are_waited_for_until_their_removal_is_recorded() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Reject), 0, 0, 0);
        l.connected("a", 0, 0);
        l.connected("b", 0, 0);
        assert_eq!(l.sync_set(), ["a"]);
        // Nothing on record yet: a joined locally, but does not fill the place until the
        // controller knows it.
        l.set_confirmed(Vec::new(), 0);
        assert!(l.unconfirmed());
        l.appended(10, 1);
        l.flushed(10, 1);
        l.acked("a", 10, 2);
        assert_eq!(
            l.progress(Acks::Sync, 10),
            Progress::NotEnoughReplicas { have: 0, need: 1 }
        );
        // On record with b still there (b left locally, its removal not yet recorded): a
        // fills the place, and b must hold an append too before it is acknowledged.
        l.set_confirmed(["a".to_string(), "b".to_string()], 3);
        assert!(matches!(l.progress(Acks::Sync, 10), Progress::Pending));
        l.acked("b", 10, 4);
        assert!(matches!(l.progress(Acks::Sync, 10), Progress::Done { .. }));
        assert_eq!(l.commit_offset(), 10);
        // A recorded member the leader never heard from holds nothing.
        l.set_confirmed(["a".to_string(), "z".to_string()], 5);
        l.appended(20, 6);
        l.flushed(20, 6);
        l.acked("a", 20, 7);
        assert_eq!(l.progress(Acks::Sync, 20), Progress::Pending);
        assert_eq!(l.commit_offset(), 10);
        // Once the record matches the local set, only it counts.
        assert_eq!(
            l.set_confirmed(["a".to_string()], 8),
            vec![Event::Committed(20)]
        );
        assert!(!l.unconfirmed());
    }

    #[test]
    fn a_lagging_or_gone_sync_follower_is_replaced_by_a_caught_up_one() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Reject), 0, 0, 0);
        l.connected("a", 0, 0);
        l.connected("b", 0, 0);
        l.appended(50, 10);
        l.flushed(50, 10);
        l.acked("b", 50, 20);
        // a has been behind and silent for longer than sync_lag_ms_max.
        let ev = l.tick(2000);
        assert_eq!(
            ev,
            vec![
                Event::Left("a".into(), LeaveReason::LagTime),
                Event::Joined("b".into()),
                Event::Committed(50),
            ]
        );
        // b disconnects: nobody caught up is left, and reject refuses sync appends.
        let ev = l.disconnected("b", 2001);
        assert_eq!(ev, vec![Event::Left("b".into(), LeaveReason::Disconnected)]);
        assert_eq!(
            l.progress(Acks::Sync, 50),
            Progress::NotEnoughReplicas { have: 0, need: 1 }
        );
        assert_eq!(l.sync_shortfall(), 1);
        // Lagging by records.
        l.acked("a", 50, 2002);
        assert_eq!(l.sync_set(), ["a"]);
        l.appended(500, 2002);
        assert_eq!(
            l.tick(2003),
            vec![Event::Left("a".into(), LeaveReason::LagRecords)]
        );
    }

    /// A log that sat idle for an hour is a caught-up log: its next append completes at
    /// `sync` at once, and the sync set never changes.
    #[test]
    fn an_idle_log_keeps_its_sync_follower() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Reject), 0, 0, 0);
        assert_eq!(l.connected("a", 0, 0), vec![Event::Joined("a".into())]);
        l.appended(1, 1);
        l.flushed(1, 2);
        assert_eq!(l.acked("a", 1, 3), vec![Event::Committed(1)]);
        // An hour of ticks with nothing to do, and an hour with no tick at all.
        for now in (1_000..3_600_000).step_by(100) {
            assert_eq!(l.tick(now), vec![], "at {now} ms");
        }
        let later = 7_200_000;
        l.appended(2, later);
        assert_ne!(
            l.progress(Acks::Sync, u64::MAX),
            Progress::NotEnoughReplicas { have: 0, need: 1 }
        );
        assert_eq!(l.flushed(2, later + 1), vec![]);
        assert_eq!(l.tick(later + 2), vec![]);
        assert_eq!(l.progress(Acks::Sync, 2), Progress::Pending);
        assert_eq!(l.acked("a", 2, later + 3), vec![Event::Committed(2)]);
        assert_eq!(ids(&l.progress(Acks::Sync, 2)), ["L", "a"]);
        assert_eq!(l.sync_set(), ["a"]);
    }

    /// A connected follower that stops acknowledging while records wait leaves after
    /// `sync_lag_ms_max` from the moment the leader's end passed it, not before.
    #[test]
    fn a_follower_that_stops_acking_leaves_after_the_lag_time_not_before() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Reject), 0, 0, 0);
        l.connected("a", 0, 0);
        l.appended(1, 10);
        l.flushed(1, 10);
        l.acked("a", 1, 12);
        // Idle, then records the follower never acknowledges.
        l.appended(5, 50_000);
        l.flushed(5, 50_001);
        for now in (50_001..=51_000).step_by(7) {
            assert_eq!(l.tick(now), vec![], "at {now} ms");
        }
        assert_eq!(l.tick(51_000), vec![]);
        assert_eq!(
            l.tick(51_001)[0],
            Event::Left("a".into(), LeaveReason::LagTime)
        );
        // Heard, but still behind: an acknowledgement of old records does not bring it back.
        assert_eq!(l.acked("a", 1, 51_002), vec![]);
        assert_eq!(l.sync_set(), Vec::<&str>::new());
        // Caught up: it joins again.
        assert_eq!(l.acked("a", 5, 51_003), vec![Event::Joined("a".into())]);
    }

    /// A follower that acknowledges slowly (a burst takes it 900 ms of a 1000 ms bound) but
    /// catches up between bursts stays, as does one that keeps up with a log that never
    /// stops moving (each acknowledgement reaches the end the leader had at the previous one).
    #[test]
    fn a_slow_follower_that_keeps_catching_up_stays() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Reject), 0, 0, 0);
        l.connected("a", 0, 0);
        let mut end = 0;
        let mut now = 0;
        for _ in 0..50 {
            end += 10;
            l.appended(end, now);
            l.flushed(end, now);
            for step in 1..=9 {
                assert_eq!(l.tick(now + step * 100), vec![]);
            }
            assert_eq!(l.acked("a", end, now + 900), vec![Event::Committed(end)]);
            now += 2_000;
        }
        // Never idle: every 400 ms ten more records, acknowledged 400 ms late, so the follower
        // never reaches the leader's end.
        for _ in 0..50 {
            let before = end;
            end += 10;
            l.appended(end, now);
            l.flushed(end, now);
            let ev = l.acked("a", before, now + 1);
            assert!(!ev.iter().any(|e| matches!(e, Event::Left(..))), "{ev:?}");
            assert_eq!(l.tick(now + 399), vec![]);
            now += 400;
        }
        assert_eq!(l.sync_set(), ["a"]);
    }

    #[test]
    fn degrade_acknowledges_below_the_level_and_says_so() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Degrade), 0, 0, 0);
        l.appended(5, 0);
        l.flushed(5, 0);
        assert_eq!(
            l.progress(Acks::Sync, 5),
            Progress::Done {
                replicas: vec!["L".into()],
                degraded: true
            }
        );
        assert_eq!(
            l.commit_offset(),
            5,
            "with no sync member the leader alone commits"
        );
    }

    #[test]
    fn a_follower_joins_only_when_caught_up_and_commit_never_moves_back() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Reject), 100, 100, 100);
        assert_eq!(
            l.connected("new", 0, 0),
            vec![],
            "an empty follower is not caught up"
        );
        assert_eq!(l.commit_offset(), 100);
        assert_eq!(l.acked("new", 60, 1), vec![]);
        assert_eq!(l.acked("new", 100, 2), vec![Event::Joined("new".into())]);
        assert_eq!(l.commit_offset(), 100);
        // A reordered older acknowledgement is ignored.
        l.acked("new", 40, 3);
        assert_eq!(l.followers()["new"].durable, 100);
        // Coming back wiped: out of the sync set until caught up again.
        assert_eq!(
            l.connected("new", 0, 4),
            vec![Event::Left("new".into(), LeaveReason::Regressed)]
        );
        assert_eq!(
            l.progress(Acks::Sync, 101),
            Progress::NotEnoughReplicas { have: 0, need: 1 }
        );
    }

    #[test]
    fn quorum_needs_a_majority_of_replicas() {
        let mut l = Leader::new("L", cfg(0, Insufficient::Reject), 0, 0, 0);
        // A single replica is its own majority, once it is durable itself.
        assert_eq!(l.progress(Acks::Quorum, 1), Progress::Pending);
        l.connected("a", 0, 0);
        l.connected("b", 0, 0);
        l.appended(3, 1);
        l.flushed(3, 1);
        assert_eq!(l.progress(Acks::Quorum, 3), Progress::Pending);
        l.acked("b", 3, 2);
        assert_eq!(ids(&l.progress(Acks::Quorum, 3)), ["L", "b"]);
        l.disconnected("a", 3);
        l.disconnected("b", 3);
        assert_eq!(
            l.progress(Acks::Quorum, 4),
            Progress::NotEnoughReplicas { have: 1, need: 2 }
        );
        // Asynchronous replication: commit follows the leader alone.
        assert_eq!(l.commit_offset(), 3);
    }

    #[test]
    fn quorum_also_waits_for_the_sync_set_which_failover_elects_from() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Reject), 0, 0, 0);
        l.connected("a", 0, 0);
        l.connected("b", 0, 0);
        assert_eq!(l.sync_set(), ["a"]);
        l.appended(3, 1);
        l.flushed(3, 1);
        l.acked("b", 3, 2);
        // A majority (L and b) holds it, but not the sync set: a failover to a would lose it.
        assert_eq!(l.progress(Acks::Quorum, 3), Progress::Pending);
        l.acked("a", 3, 3);
        assert_eq!(ids(&l.progress(Acks::Quorum, 3)), ["L", "a", "b"]);
    }

    #[test]
    fn registered_followers_count_towards_the_majority_before_they_connect() {
        let mut l = Leader::new("L", cfg(1, Insufficient::Reject), 0, 0, 0);
        l.register("a", 0);
        l.register("b", 0);
        // Three replicas, only the leader reachable: no majority, and no sync set.
        assert_eq!(
            l.progress(Acks::Quorum, 1),
            Progress::NotEnoughReplicas { have: 1, need: 2 }
        );
        assert_eq!(
            l.progress(Acks::Sync, 1),
            Progress::NotEnoughReplicas { have: 0, need: 1 }
        );
        assert!(l
            .followers()
            .values()
            .all(|f| !f.connected && !f.in_sync_set));
        // Registering again does not reset what is known.
        l.connected("a", 0, 1);
        l.register("a", 2);
        assert!(l.followers()["a"].connected);
        assert_eq!(l.sync_set(), ["a"]);
        assert!(matches!(l.progress(Acks::Quorum, 0), Progress::Done { .. }));
    }

    #[test]
    fn followers_refuse_stale_epochs_gaps_and_future_batches_and_serve_only_committed() {
        let mut f = Follower::new(10, 10, 2);
        assert_eq!(
            f.accept(FrameHead::new(1, 50, 10, 12), [1]),
            Err(Refusal::StaleEpoch { seen: 2, got: 1 })
        );
        assert_eq!(
            f.accept(FrameHead::new(3, 50, 11, 12), [3]),
            Err(Refusal::Gap {
                expected: 10,
                got: 11
            })
        );
        assert_eq!(
            f.accept(FrameHead::new(3, 50, 10, 12), [2, 4]),
            Err(Refusal::FutureBatchEpoch { frame: 3, batch: 4 })
        );
        assert_eq!(f.accept(FrameHead::new(3, 11, 10, 12), [2, 3]), Ok(()));
        assert_eq!(f.epoch(), 3);
        // Readers see min(leader commit, local durable).
        assert_eq!(f.readable(), 10);
        assert_eq!(f.flushed(12), Some(12));
        assert_eq!(f.flushed(12), None, "acknowledged once");
        assert_eq!(f.readable(), 11);
        // Once a newer leader was seen, the old one is refused.
        assert_eq!(
            f.accept(FrameHead::new(2, 60, 12, 13), [2]),
            Err(Refusal::StaleEpoch { seen: 3, got: 2 })
        );
    }

    #[test]
    fn an_empty_leader_history_never_truncates_what_a_follower_holds() {
        let local = LocalLog {
            start: 0,
            end: 12,
            last_epoch: Some(3),
            commit: 0,
        };
        // The leader's history is empty: (0, 0).
        assert_eq!(
            after_epoch_end(local, 0, 0),
            Err(EmptyLeaderHistory { asked: 3, end: 12 })
        );
        // Its history begins after epoch 3 at 0 (its first epoch 4): a real divergence point.
        assert_eq!(after_epoch_end(local, 4, 0), Ok(Step::Truncate { to: 0 }));
        // Epoch 3 ends at 7 there: truncate the suffix after it.
        assert_eq!(after_epoch_end(local, 3, 7), Ok(Step::Truncate { to: 7 }));
        // Epoch 3 goes on past the follower's end there: fetch.
        assert_eq!(after_epoch_end(local, 3, 20), Ok(Step::Fetch { from: 12 }));
    }

    #[test]
    fn follower_steps_follow_kip_101() {
        let leader = LeaderLog {
            epoch: 3,
            start: 0,
            end: 100,
            end_of_follower_epoch: None,
        };
        let same = LocalLog {
            start: 0,
            end: 40,
            last_epoch: Some(3),
            commit: 0,
        };
        assert_eq!(follower_step(same, leader), Step::Fetch { from: 40 });
        let empty = LocalLog {
            start: 0,
            end: 0,
            last_epoch: None,
            commit: 0,
        };
        assert_eq!(follower_step(empty, leader), Step::Fetch { from: 0 });
        // An older epoch: ask first, then truncate only at the divergence point.
        let old = LocalLog {
            start: 0,
            end: 90,
            last_epoch: Some(2),
            commit: 0,
        };
        assert_eq!(follower_step(old, leader), Step::AskEpochEnd { epoch: 2 });
        let answered = LeaderLog {
            end_of_follower_epoch: Some(70),
            ..leader
        };
        assert_eq!(follower_step(old, answered), Step::Truncate { to: 70 });
        let no_divergence = LeaderLog {
            end_of_follower_epoch: Some(95),
            ..leader
        };
        assert_eq!(follower_step(old, no_divergence), Step::Fetch { from: 90 });
        // The leader purged what comes next, or the divergence is before what we still hold.
        let purged = LeaderLog {
            start: 500,
            end: 900,
            ..leader
        };
        assert_eq!(follower_step(empty, purged), Step::Bootstrap);
        let trimmed = LocalLog {
            start: 80,
            end: 90,
            last_epoch: Some(2),
            commit: 0,
        };
        assert_eq!(follower_step(trimmed, answered), Step::Bootstrap);
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Append(u64),
            Flush(u64),
            Connect(usize, u64),
            Ack(usize, u64),
            Disconnect(usize),
            Tick(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (1..50u64).prop_map(Op::Append),
                (0..50u64).prop_map(Op::Flush),
                (0..3usize, 0..100u64).prop_map(|(i, d)| Op::Connect(i, d)),
                (0..3usize, 0..100u64).prop_map(|(i, d)| Op::Ack(i, d)),
                (0..3usize).prop_map(Op::Disconnect),
                (0..3000u64).prop_map(Op::Tick),
            ]
        }

        proptest! {
            /// Whatever happens: the commit offset never moves back, never passes what the
            /// leader flushed, and every sync-set member holds it; a sync append is reported
            /// done (not degraded) only when the leader and every member hold it.
            ///
            /// And the lag rule, stated from what the model sees rather than from the code's
            /// bookkeeping: a follower leaves for `LagTime` only if it has not been caught up to
            /// the leader's end for longer than `sync_lag_ms_max` (an idle log is a caught-up
            /// log), and a connected member that has acknowledged nothing while records wait
            /// for it is gone once that bound has passed.
            #[test]
            fn invariants_hold(k in 0..3usize, degrade in any::<bool>(), ops in proptest::collection::vec(op(), 1..80)) {
                let insufficient = if degrade { Insufficient::Degrade } else { Insufficient::Reject };
                let config = cfg(k, insufficient);
                let lag_ms = config.sync_lag_ms_max;
                let mut l = Leader::new("L", config, 0, 0, 0);
                let (mut end, mut flushed, mut now, mut last_commit) = (0u64, 0u64, 0u64, 0u64);
                let names = ["a", "b", "c"];
                // Per follower, as the model sees it: what it holds, the last moment it held
                // everything the leader had written, and since when it has been silent with
                // records waiting (its last word, the moment the end passed it, or joining).
                let mut durable: [Option<u64>; 3] = [None; 3];
                let mut caught_up = [0u64; 3];
                let mut silent_since: [Option<u64>; 3] = [None; 3];
                for op in ops {
                    let events = match op {
                        Op::Append(n) => {
                            for i in 0..3 {
                                if durable[i].is_some_and(|d| d >= end) {
                                    caught_up[i] = now;
                                    silent_since[i] = Some(now);
                                }
                            }
                            end += n;
                            l.appended(end, now);
                            Vec::new()
                        }
                        Op::Flush(n) => { flushed = (flushed + n).min(end); l.flushed(flushed, now) }
                        // A follower holds at most what the leader has written.
                        Op::Connect(i, d) => {
                            durable[i] = Some(d.min(end));
                            silent_since[i] = Some(now);
                            l.connected(names[i], d.min(end), now)
                        }
                        Op::Ack(i, d) => {
                            if durable[i].is_some() {
                                durable[i] = durable[i].map(|old| old.max(d.min(end)));
                                silent_since[i] = Some(now);
                            }
                            l.acked(names[i], d.min(end), now)
                        }
                        Op::Disconnect(i) => l.disconnected(names[i], now),
                        Op::Tick(dt) => { now += dt; l.tick(now) }
                    };
                    for i in 0..3 {
                        if durable[i].is_some_and(|d| d >= end) {
                            caught_up[i] = now;
                        }
                    }
                    for e in &events {
                        match e {
                            Event::Left(id, LeaveReason::LagTime) => {
                                let i = names.iter().position(|n| n == id).unwrap();
                                prop_assert!(
                                    now - caught_up[i] > lag_ms,
                                    "{id} left for LagTime at {now} ms, caught up at {} ms", caught_up[i]
                                );
                            }
                            Event::Joined(id) => {
                                let i = names.iter().position(|n| n == id).unwrap();
                                silent_since[i] = Some(now);
                            }
                            _ => {}
                        }
                    }
                    if matches!(op, Op::Tick(_)) {
                        for (i, id) in names.iter().enumerate() {
                            let Some(f) = l.followers().get(*id) else { continue };
                            let since = silent_since[i].unwrap_or(0);
                            prop_assert!(
                                !(f.in_sync_set && f.connected && f.durable < end && now - since > lag_ms),
                                "{id} silent since {since} ms with records waiting, still a member at {now} ms"
                            );
                        }
                    }
                    let c = l.commit_offset();
                    prop_assert!(c >= last_commit, "commit moved back");
                    prop_assert!(c <= flushed, "commit {c} beyond the leader's flush {flushed}");
                    for id in l.sync_set() {
                        prop_assert!(l.followers()[id].durable >= c, "member {id} lacks the commit");
                    }
                    prop_assert!(l.sync_set().len() <= k);
                    last_commit = c;
                    for next in [c, flushed, end] {
                        if next == 0 { continue; }
                        if let Progress::Done { degraded: false, .. } = l.progress(Acks::Sync, next) {
                            prop_assert!(flushed >= next);
                            prop_assert_eq!(l.sync_set().len(), k);
                            for id in l.sync_set() {
                                prop_assert!(l.followers()[id].durable >= next);
                            }
                        }
                    }
                }
            }
        }
    }
}
