//! Each log's rules on a node, without I/O: which role the node takes for it, whether it takes
//! a write, whether an append may be acknowledged once it has reached its level, what a leader
//! tells the controller about its sync set and a planned transfer, and where a follower's
//! replication stream may start. The leader's progress, sync set and commit offset are
//! `protocol::replication::Leader`'s, a follower's checks `protocol::replication::Follower`'s
//! and `follower_step`'s, idempotent producers `protocol::idempotence`'s; this module holds the
//! rules that combine them with the controller's record and the node's lease.
//!
//! The real node (`server`) and the cluster simulator (`sim`) both call these: a decision made
//! here is made the same way in both.

use protocol::planted::{self, Bug};
use protocol::replication::{Event, Leader, Progress};
use protocol::Acks;

use crate::controller::meta::{Command, NodeId};

/// What the controller has on record for one log, as a node steers by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub epoch: u64,
    pub leader: Option<NodeId>,
    /// The followers failover may elect: they hold every append acknowledged at `sync`.
    pub sync_set: Vec<NodeId>,
    /// Every node holding the log.
    pub replicas: Vec<NodeId>,
    /// The target of a planned transfer under way.
    pub transfer_to: Option<NodeId>,
    /// While the log has no leader: the last one, which holds every acknowledged append.
    pub last_leader: Option<NodeId>,
}

impl LogRecord {
    /// The record of `log` in the controller's metadata.
    pub fn of(l: &crate::controller::meta::LogMeta) -> LogRecord {
        LogRecord {
            epoch: l.epoch,
            leader: l.leader.clone(),
            sync_set: l.sync_set.clone(),
            replicas: l.replicas.clone(),
            transfer_to: l.transfer.as_ref().map(|t| t.to.clone()),
            last_leader: l.last_leader.clone(),
        }
    }
}

/// A replica that had to create its copy of a log afresh, where the controller had it hold the
/// log (its data directory was wiped or lost), is *recovering*: until it holds everything the
/// leader has committed, it must not count as holding acknowledged appends. The state is
/// durable (the server keeps a marker file in the log's directory), so a crash while it
/// catches up does not make a partial copy look whole.
///
/// Whether a recovering node must first withdraw (`Command::Withdraw`), and not replicate
/// until the controller has recorded it: it is a member of the sync set, the leader, or the
/// last leader of a leaderless log. Each would make failover (or clients) count on records it
/// no longer has.
pub fn must_withdraw(me: &str, record: &LogRecord, recovering: bool) -> bool {
    recovering
        && (record.sync_set.iter().any(|n| n == me)
            || record.last_leader.as_deref() == Some(me)
            || record.leader.as_deref() == Some(me))
}

/// How often a recovering node asks again to withdraw while the record still counts on it.
pub const WITHDRAW_EVERY_MS: u64 = 1000;

/// A node's requests to withdraw from logs whose copy is recovering, per log.
#[derive(Clone, Debug, Default)]
pub struct Withdrawals {
    asked: std::collections::BTreeMap<String, u64>,
}

impl Withdrawals {
    /// Whether node `me` asks the controller now to withdraw from `log` ([`must_withdraw`]),
    /// at most every [`WITHDRAW_EVERY_MS`] per log while the record still counts on it.
    pub fn due(
        &mut self,
        log: &str,
        me: &str,
        record: &LogRecord,
        recovering: bool,
        now_ms: u64,
    ) -> bool {
        if !must_withdraw(me, record, recovering) {
            self.asked.remove(log);
            return false;
        }
        let due = self
            .asked
            .get(log)
            .is_none_or(|at| now_ms.saturating_sub(*at) > WITHDRAW_EVERY_MS);
        if due {
            self.asked.insert(log.to_string(), now_ms);
        }
        due
    }
}

/// Whether a recovering replica has recovered: it holds durably everything the leader has
/// committed, as a frame of its current session told it (`leader_commit`: `None` before the
/// first).
pub fn recovered(durable: u64, leader_commit: Option<u64>) -> bool {
    leader_commit.is_some_and(|c| durable >= c)
}

/// The role a log should have on a node, by the controller's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Lead in this epoch.
    Lead(u64),
    /// Follow this leader, or none for now (no leader; or this node is the recorded leader of
    /// an epoch it may not lead in, and waits for a new one).
    Follow(Option<NodeId>),
}

/// The role node `me` takes for a log the controller has on record. `last_epoch` is the epoch
/// of the last record in its local log (0: empty); `leading_in` the epoch it leads the log in
/// now, if it does; `recovering` whether its copy is recovering (see [`must_withdraw`]). A node
/// leads only in an epoch newer than its log's, or the one it already leads in: after a
/// restart it must ask for a new epoch, since records it wrote but lost unflushed must never
/// share an epoch with different records at the same offsets elsewhere. A recovering copy
/// never leads.
pub fn choose_role(
    me: &str,
    record: &LogRecord,
    last_epoch: u64,
    leading_in: Option<u64>,
    recovering: bool,
) -> Role {
    match &record.leader {
        Some(l) if l == me && recovering => Role::Follow(None),
        Some(l) if l == me && leading_in == Some(record.epoch) => Role::Lead(record.epoch),
        Some(l) if l == me && record.epoch > last_epoch => Role::Lead(record.epoch),
        Some(l) if l == me => Role::Follow(None),
        Some(l) => Role::Follow(Some(l.clone())),
        None => Role::Follow(None),
    }
}

/// How often a node recorded as a log's leader, which may not lead in the recorded epoch, asks
/// the controller again for a new one (ms).
pub const RENEW_EVERY_MS: u64 = 1000;

/// A node's requests for new epochs, per log.
#[derive(Clone, Debug, Default)]
pub struct Renewals {
    asked: std::collections::BTreeMap<String, (u64, u64)>,
}

impl Renewals {
    /// Whether node `me`, which takes `role` for `log` by `record`, asks the controller for a
    /// new epoch now: it is the recorded leader but may not lead in the recorded epoch (after a
    /// restart, see [`choose_role`]), and its copy is not recovering (a recovering copy
    /// withdraws instead). Returns the epoch to renew, at most every [`RENEW_EVERY_MS`] for
    /// the same epoch.
    pub fn due(
        &mut self,
        log: &str,
        me: &str,
        record: &LogRecord,
        role: &Role,
        recovering: bool,
        now_ms: u64,
    ) -> Option<u64> {
        if *role != Role::Follow(None) || record.leader.as_deref() != Some(me) || recovering {
            return None;
        }
        let due = self.asked.get(log).is_none_or(|(e, at)| {
            *e != record.epoch || now_ms.saturating_sub(*at) > RENEW_EVERY_MS
        });
        if !due {
            return None;
        }
        self.asked.insert(log.to_string(), (record.epoch, now_ms));
        Some(record.epoch)
    }
}

/// A node's copy of a log, as steering sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalCopy {
    /// The epoch of its last record (0: empty).
    pub last_epoch: u64,
    /// Where it ends.
    pub end: u64,
    /// The epoch the node leads the log in now, if it does.
    pub leading_in: Option<u64>,
    /// The copy is recovering (see [`must_withdraw`]).
    pub recovering: bool,
}

/// A node's steering of its logs by the controller's record, one log at a time, every round:
/// the role each takes ([`choose_role`]) and what the node proposes for it (a withdrawal
/// while its copy is recovering and the record counts on it, [`Withdrawals`]; a new epoch where
/// it is the recorded leader but may not lead in the recorded epoch, [`Renewals`]). The
/// server's steering task and the simulator's nodes both run it.
#[derive(Clone, Debug, Default)]
pub struct Steering {
    renewals: Renewals,
    withdrawals: Withdrawals,
}

/// What steering decided for one log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steer {
    pub role: Role,
    /// The copy must withdraw before it replicates anything ([`must_withdraw`]).
    pub withdrawing: bool,
    /// Commands to propose to the controller now.
    pub propose: Vec<Command>,
}

impl Steering {
    /// Steer `log` on node `me`, whose copy is `copy`, by the controller's `record`.
    pub fn steer(
        &mut self,
        log: &str,
        me: &str,
        record: &LogRecord,
        copy: LocalCopy,
        now_ms: u64,
    ) -> Steer {
        let role = choose_role(
            me,
            record,
            copy.last_epoch,
            copy.leading_in,
            copy.recovering,
        );
        let mut propose = Vec::new();
        if self
            .withdrawals
            .due(log, me, record, copy.recovering, now_ms)
        {
            propose.push(Command::Withdraw {
                log: log.to_string(),
                node: me.to_string(),
            });
        }
        if let Some(epoch) = self
            .renewals
            .due(log, me, record, &role, copy.recovering, now_ms)
        {
            propose.push(Command::Elect {
                log: log.to_string(),
                epoch,
                leader: me.to_string(),
                start: copy.end,
                sync_set: record.sync_set.clone(),
                unclean: None,
            });
        }
        Steer {
            role,
            withdrawing: must_withdraw(me, record, copy.recovering),
            propose,
        }
    }
}

/// Why a node does not take a write to a log it holds (with a controller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotLeader {
    /// A planned transfer to this node is under way.
    Transferring { to: NodeId },
    /// This node leads the log but has lost contact with the controller (its lease lapsed).
    NoLease,
    /// This node does not lead the log (or not in the recorded epoch).
    NotLeading,
}

/// Whether node `me`, leading the log in `leading_in` (if it leads it), takes a write now:
/// it must lead it in the recorded epoch (`record`; `None`: the log is not on record yet, and
/// its role decides), hold its lease, and no transfer may be under way.
pub fn may_write(
    me: &str,
    leading_in: Option<u64>,
    record: Option<&LogRecord>,
    lease_ok: bool,
) -> Result<(), NotLeader> {
    if let Some(to) = record.and_then(|r| r.transfer_to.as_ref()) {
        return Err(NotLeader::Transferring { to: to.clone() });
    }
    let Some(epoch) = leading_in else {
        return Err(NotLeader::NotLeading);
    };
    let current = record.is_none_or(|r| r.leader.as_deref() == Some(me) && r.epoch == epoch);
    if !current && !planted::active(Bug::StaleEpochAccepted) {
        return Err(NotLeader::NotLeading);
    }
    if !lease_ok {
        return Err(NotLeader::NoLease);
    }
    Ok(())
}

/// Why an append that reached its level may not be acknowledged: its outcome is unknown (it is
/// stored on this node, and may or may not survive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unconfirmed {
    /// The node lost contact with the controller while the append waited.
    NoLease,
    /// The node stopped leading the log (or its epoch ended) while the append waited.
    Deposed,
    /// A planned transfer began, and its target does not hold the append.
    TargetLacks { to: NodeId },
}

/// Whether an append at `acks` that reached its level on node `me` (leading in `epoch`), held
/// by `holders`, may be acknowledged, by the record as the node sees it now (`None`: the log
/// is not on record yet) and its lease (always held without a controller). An append at
/// `acks=none` promises nothing and is always answered.
pub fn confirm(
    me: &str,
    epoch: u64,
    record: Option<&LogRecord>,
    lease_ok: bool,
    acks: Acks,
    holders: &[String],
) -> Result<(), Unconfirmed> {
    if acks == Acks::None {
        return Ok(());
    }
    if !lease_ok {
        return Err(Unconfirmed::NoLease);
    }
    let Some(r) = record else {
        return Ok(());
    };
    let current = r.leader.as_deref() == Some(me) && r.epoch == epoch;
    if !current && !planted::active(Bug::StaleEpochAccepted) {
        return Err(Unconfirmed::Deposed);
    }
    // The target may take over at any moment from what it holds.
    if let Some(to) = &r.transfer_to {
        if !holders.contains(to) {
            return Err(Unconfirmed::TargetLacks { to: to.clone() });
        }
    }
    Ok(())
}

/// Why an append is refused before it is stored, for the level it asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LevelRefusal {
    /// The node took the lead a moment ago and its sync set is still forming: retry.
    Forming { missing: Vec<String> },
    /// `acks` needs `need` replicas in step with the leader, and `have` are.
    NotEnoughReplicas { have: usize, need: usize },
}

/// What a leader does on behalf of a log, beyond answering appends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaderAction {
    /// Ask the controller to record this sync set in `epoch`.
    ProposeSyncSet { epoch: u64, sync_set: Vec<NodeId> },
    /// The planned transfer to `to` may complete: this node takes no writes, and `to` holds its
    /// whole log (ending at `end`) durably.
    CompleteTransfer {
        epoch: u64,
        to: NodeId,
        end: u64,
        sync_set: Vec<NodeId>,
    },
}

impl LeaderAction {
    /// The controller command that carries the action out for `log`.
    pub fn command(self, log: &str) -> Command {
        match self {
            LeaderAction::ProposeSyncSet { epoch, sync_set } => Command::SetSyncSet {
                log: log.to_string(),
                epoch,
                sync_set,
            },
            LeaderAction::CompleteTransfer {
                epoch,
                to,
                end,
                sync_set,
            } => Command::CompleteTransfer {
                log: log.to_string(),
                epoch,
                to,
                start: end,
                sync_set,
            },
        }
    }
}

/// How often a leader proposes its sync set to the controller while the record differs, and
/// asks for a planned transfer to complete (ms).
pub const PROPOSE_EVERY_MS: u64 = 500;

/// A leader's rules for one log around its replication state: when it began leading (the
/// sync set "forms" for a while after), and when it last asked the controller for something.
#[derive(Clone, Debug)]
pub struct LeaderRules {
    since_ms: u64,
    ready_seen: bool,
    proposed_ms: Option<u64>,
    handed_over_ms: Option<u64>,
}

impl LeaderRules {
    /// A leader that began leading at `now_ms`.
    pub fn new(now_ms: u64) -> LeaderRules {
        LeaderRules {
            since_ms: now_ms,
            ready_seen: false,
            proposed_ms: None,
            handed_over_ms: None,
        }
    }

    /// How long this node has led the log (ms).
    pub fn leading_for(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.since_ms)
    }

    /// Whether this leader took the log less than `window_ms` ago and its sync set has not yet
    /// been full and on record: an `acks=sync` append finding it short is answered
    /// `unavailable` (retry) rather than `not_enough_replicas`, since the followers are
    /// expected to join in a moment (right after a failover or a restart).
    pub fn forming(&mut self, state: &Leader, now_ms: u64, window_ms: u64) -> bool {
        if self.ready_seen || state.sync_ready() {
            self.ready_seen = true;
            return false;
        }
        self.leading_for(now_ms) < window_ms
    }

    /// Whether `acks` can be reached at all now; an append that cannot is refused before it is
    /// stored (so `not_enough_replicas` always means "not stored").
    pub fn admit(
        &mut self,
        state: &Leader,
        acks: Acks,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<(), LevelRefusal> {
        match state.progress(acks, u64::MAX) {
            Progress::NotEnoughReplicas { have, need } => {
                if acks == Acks::Sync && self.forming(state, now_ms, window_ms) {
                    Err(LevelRefusal::Forming {
                        missing: state.sync_missing(),
                    })
                } else {
                    Err(LevelRefusal::NotEnoughReplicas { have, need })
                }
            }
            _ => Ok(()),
        }
    }

    /// Keep the controller's record of the sync set in step with the local one, and carry a
    /// planned transfer to its end: called with the record as node `me` sees it, the log's
    /// written `end` and durable `flushed` offsets. Commit waits for the members of both sets
    /// (see `Leader::set_confirmed`); a local change is proposed to the controller at most
    /// every [`PROPOSE_EVERY_MS`]. Once a transfer is on record (so this node takes no more
    /// writes) and its target holds everything written here, durably, the target may lead the
    /// next epoch.
    pub fn on_record(
        &mut self,
        me: &str,
        state: &mut Leader,
        record: &LogRecord,
        end: u64,
        flushed: u64,
        now_ms: u64,
    ) -> (Vec<Event>, Vec<LeaderAction>) {
        if record.leader.as_deref() != Some(me) {
            return (Vec::new(), Vec::new());
        }
        let events = state.set_confirmed(record.sync_set.iter().cloned(), now_ms);
        let mut actions = Vec::new();
        let due =
            |at: Option<u64>| at.is_none_or(|at| now_ms.saturating_sub(at) >= PROPOSE_EVERY_MS);
        if state.unconfirmed() && due(self.proposed_ms) {
            self.proposed_ms = Some(now_ms);
            actions.push(LeaderAction::ProposeSyncSet {
                epoch: record.epoch,
                sync_set: state.sync_set().into_iter().map(str::to_string).collect(),
            });
        }
        if let Some(to) = &record.transfer_to {
            let target_has_all = state.followers().get(to).is_some_and(|f| f.durable >= end);
            if flushed >= end && target_has_all && due(self.handed_over_ms) {
                self.handed_over_ms = Some(now_ms);
                let sync_set = record
                    .sync_set
                    .iter()
                    .filter(|n| *n != to)
                    .cloned()
                    .chain(std::iter::once(me.to_string()))
                    .collect();
                actions.push(LeaderAction::CompleteTransfer {
                    epoch: record.epoch,
                    to: to.clone(),
                    end,
                    sync_set,
                });
            }
        }
        (events, actions)
    }
}

/// Why a leader does not serve a follower's replication stream from `from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamRefusal {
    /// What the follower needs next is no longer stored: it must bootstrap from `start`.
    Bootstrap { start: u64 },
    /// The follower is beyond the leader's end: it must truncate at the epoch divergence point
    /// first.
    Ahead { end: u64 },
}

/// Whether a leader whose log holds `start..end` serves a replication stream from `from`.
pub fn stream_from(from: u64, start: u64, end: u64) -> Result<(), StreamRefusal> {
    if from < start {
        return Err(StreamRefusal::Bootstrap { start });
    }
    if from > end {
        return Err(StreamRefusal::Ahead { end });
    }
    Ok(())
}

/// One follower's replication stream as its leader serves it, without I/O: what goes out next
/// (the records it has not had, or the commit offset alone when only that moved) and what the
/// follower's acknowledgements may count. The server's send loop and the simulator's both
/// follow it; when to send (waiting for records, lingering before a commit-only frame, the
/// catch-up rate) is theirs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbound {
    /// Everything below was sent.
    sent: u64,
    /// The commit offset the last frame carried.
    commit_sent: Option<u64>,
}

/// What an [`Outbound`] stream sends next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// The records from `from` on (as many as a frame holds), with the commit offset.
    Records { from: u64 },
    /// No records: a frame with the commit offset alone, which moved since the last frame
    /// (followers serve reads up to it).
    Commit,
    /// Nothing until the log or the commit offset moves.
    Nothing,
}

impl Outbound {
    /// A stream from `from` of a log that holds `start..end` ([`stream_from`]).
    pub fn open(from: u64, start: u64, end: u64) -> Result<Outbound, StreamRefusal> {
        stream_from(from, start, end)?;
        Ok(Outbound {
            sent: from,
            commit_sent: None,
        })
    }

    /// What to send now that the log is written up to `written` and committed up to
    /// `commit`.
    pub fn next(&self, written: u64, commit: u64) -> Outgoing {
        if self.sent < written {
            Outgoing::Records { from: self.sent }
        } else if self.commit_sent != Some(commit) {
            Outgoing::Commit
        } else {
            Outgoing::Nothing
        }
    }

    /// A frame went out: the records up to `next` (`next` = [`Outbound::sent`] for a
    /// commit-only frame) with commit offset `commit`.
    pub fn sent(&mut self, next: u64, commit: u64) {
        assert!(
            next >= self.sent,
            "a stream goes forward: {next} after {}",
            self.sent
        );
        self.sent = next;
        self.commit_sent = Some(commit);
    }

    /// Everything below this offset was sent.
    pub fn sent_until(&self) -> u64 {
        self.sent
    }

    /// What a follower's report of holding `durable` durably may count: never what was not
    /// sent on this stream (it may have held more from an earlier leader that this one has
    /// not confirmed).
    pub fn counted(&self, durable: u64) -> u64 {
        durable.min(self.sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::replication::{Insufficient, ReplicationConfig};

    fn record(leader: &str, epoch: u64) -> LogRecord {
        LogRecord {
            epoch,
            leader: Some(leader.into()),
            sync_set: vec!["b".into()],
            replicas: vec!["a".into(), "b".into(), "c".into()],
            transfer_to: None,
            last_leader: None,
        }
    }

    #[test]
    fn a_recovering_node_asks_to_withdraw_at_most_every_withdraw_every_ms_per_log() {
        let mut w = Withdrawals::default();
        let r = record("a", 3);
        // b is in the sync set and its copy is recovering.
        assert!(w.due("l", "b", &r, true, 10_000));
        assert!(!w.due("l", "b", &r, true, 10_000 + WITHDRAW_EVERY_MS));
        assert!(
            w.due("m", "b", &r, true, 10_000 + WITHDRAW_EVERY_MS),
            "per log"
        );
        assert!(w.due("l", "b", &r, true, 10_000 + WITHDRAW_EVERY_MS + 1));
        // Once the record no longer counts on it (or its copy has recovered), it stops asking,
        // and asks at once if it must again.
        let mut out = r.clone();
        out.sync_set.clear();
        assert!(!w.due("l", "b", &out, true, 20_000));
        assert!(w.due("l", "b", &r, true, 20_001));
        assert!(!w.due("l", "b", &r, false, 20_002));
        assert!(!w.due("l", "c", &r, true, 20_003), "c is not counted on");
    }

    #[test]
    fn a_replica_that_lost_its_copy_withdraws_until_it_has_caught_up() {
        let mut r = record("a", 3);
        assert!(must_withdraw("a", &r, true));
        assert!(must_withdraw("b", &r, true));
        assert!(!must_withdraw("b", &r, false));
        assert!(!must_withdraw("c", &r, true));
        r.leader = None;
        r.last_leader = Some("c".into());
        assert!(must_withdraw("c", &r, true));
        assert!(!recovered(100, None));
        assert!(!recovered(99, Some(100)));
        assert!(recovered(100, Some(100)));
    }

    #[test]
    fn a_node_leads_only_in_a_newer_epoch_or_the_one_it_leads_in() {
        let r = record("a", 3);
        assert_eq!(choose_role("a", &r, 2, None, false), Role::Lead(3));
        assert_eq!(choose_role("a", &r, 3, Some(3), false), Role::Lead(3));
        // Restarted with records of epoch 3: it waits for a new epoch.
        assert_eq!(choose_role("a", &r, 3, None, false), Role::Follow(None));
        assert_eq!(
            choose_role("b", &r, 3, None, false),
            Role::Follow(Some("a".into()))
        );
        // Its copy lost (wiped): it does not lead.
        assert_eq!(choose_role("a", &r, 0, None, true), Role::Follow(None));
        let mut none = r.clone();
        none.leader = None;
        assert_eq!(choose_role("a", &none, 0, None, false), Role::Follow(None));
    }

    #[test]
    fn a_recorded_leader_that_may_not_lead_asks_for_a_new_epoch_now_and_then() {
        let r = record("a", 3);
        let mut renewals = Renewals::default();
        let waiting = Role::Follow(None);
        assert_eq!(renewals.due("l", "a", &r, &waiting, false, 0), Some(3));
        assert_eq!(renewals.due("l", "a", &r, &waiting, false, 500), None);
        assert_eq!(renewals.due("l", "a", &r, &waiting, false, 1001), Some(3));
        // A recovering copy withdraws instead.
        assert_eq!(renewals.due("l", "a", &r, &waiting, true, 9000), None);
        // Not the recorded leader, or leading already: nothing to ask.
        assert_eq!(renewals.due("l", "b", &r, &waiting, false, 5000), None);
        assert_eq!(
            renewals.due("l", "a", &r, &Role::Lead(3), false, 5000),
            None
        );
    }

    #[test]
    fn writes_need_the_recorded_epoch_the_lease_and_no_transfer() {
        let r = record("a", 3);
        assert_eq!(may_write("a", Some(3), Some(&r), true), Ok(()));
        assert_eq!(
            may_write("a", Some(3), Some(&r), false),
            Err(NotLeader::NoLease)
        );
        assert_eq!(
            may_write("a", Some(2), Some(&r), true),
            Err(NotLeader::NotLeading)
        );
        assert_eq!(
            may_write("b", None, Some(&r), true),
            Err(NotLeader::NotLeading)
        );
        // Not on record yet: the role decides, and the lease.
        assert_eq!(may_write("a", Some(1), None, true), Ok(()));
        assert_eq!(
            may_write("a", Some(1), None, false),
            Err(NotLeader::NoLease)
        );
        assert_eq!(may_write("a", None, None, true), Err(NotLeader::NotLeading));
        let mut t = r.clone();
        t.transfer_to = Some("b".into());
        assert_eq!(
            may_write("a", Some(3), Some(&t), true),
            Err(NotLeader::Transferring { to: "b".into() })
        );
    }

    #[test]
    fn an_append_is_acknowledged_only_by_the_current_leader_and_a_transfer_target_holds_it() {
        let r = record("a", 3);
        let held = ["a".to_string(), "b".to_string()];
        assert_eq!(confirm("a", 3, Some(&r), true, Acks::Sync, &held), Ok(()));
        assert_eq!(
            confirm("a", 3, Some(&r), false, Acks::Leader, &held),
            Err(Unconfirmed::NoLease)
        );
        assert_eq!(
            confirm("a", 2, Some(&r), true, Acks::Sync, &held),
            Err(Unconfirmed::Deposed)
        );
        // acks=none promises nothing; without a controller there is no record to check.
        assert_eq!(confirm("a", 2, Some(&r), false, Acks::None, &[]), Ok(()));
        assert_eq!(confirm("a", 2, None, true, Acks::Sync, &held), Ok(()));
        assert_eq!(
            confirm("a", 2, None, false, Acks::Sync, &held),
            Err(Unconfirmed::NoLease)
        );
        let mut t = r.clone();
        t.transfer_to = Some("c".into());
        assert_eq!(
            confirm("a", 3, Some(&t), true, Acks::Sync, &held),
            Err(Unconfirmed::TargetLacks { to: "c".into() })
        );
    }

    fn leader() -> Leader {
        let cfg = ReplicationConfig {
            sync_replicas: 1,
            sync_lag_records_max: 100,
            sync_lag_ms_max: 1000,
            insufficient: Insufficient::Reject,
        };
        let mut l = Leader::new("a", cfg, 10, 10, 0);
        l.register("b", 0);
        l.register("c", 0);
        l.expect_controller();
        l
    }

    #[test]
    fn a_short_sync_set_is_forming_for_a_while_then_not_enough_replicas() {
        let l = leader();
        let mut rules = LeaderRules::new(1000);
        assert!(matches!(
            rules.admit(&l, Acks::Sync, 1500, 1000),
            Err(LevelRefusal::Forming { .. })
        ));
        assert_eq!(
            rules.admit(&l, Acks::Sync, 2500, 1000),
            Err(LevelRefusal::NotEnoughReplicas { have: 0, need: 1 })
        );
        assert_eq!(rules.admit(&l, Acks::Leader, 2500, 1000), Ok(()));
    }

    #[test]
    fn the_leader_proposes_its_sync_set_and_hands_over_once_the_target_holds_everything() {
        let mut l = leader();
        let mut rules = LeaderRules::new(0);
        l.connected("b", 10, 0);
        let mut r = record("a", 3);
        r.sync_set.clear();
        let (_, actions) = rules.on_record("a", &mut l, &r, 10, 10, 0);
        assert_eq!(
            actions,
            vec![LeaderAction::ProposeSyncSet {
                epoch: 3,
                sync_set: vec!["b".into()]
            }]
        );
        // Not again before PROPOSE_EVERY_MS.
        assert!(rules.on_record("a", &mut l, &r, 10, 10, 100).1.is_empty());
        r.sync_set = vec!["b".into()];
        r.transfer_to = Some("c".into());
        assert!(rules.on_record("a", &mut l, &r, 10, 10, 600).1.is_empty());
        l.connected("c", 10, 600);
        assert_eq!(
            rules.on_record("a", &mut l, &r, 10, 10, 700).1,
            vec![LeaderAction::CompleteTransfer {
                epoch: 3,
                to: "c".into(),
                end: 10,
                sync_set: vec!["b".into(), "a".into()]
            }]
        );
        // Another node's record asks nothing of this one.
        assert!(rules.on_record("b", &mut l, &r, 10, 10, 5000).1.is_empty());
    }

    #[test]
    fn a_stream_starts_inside_the_leaders_log() {
        assert_eq!(stream_from(5, 5, 9), Ok(()));
        assert_eq!(stream_from(9, 5, 9), Ok(()));
        assert_eq!(
            stream_from(4, 5, 9),
            Err(StreamRefusal::Bootstrap { start: 5 })
        );
        assert_eq!(stream_from(10, 5, 9), Err(StreamRefusal::Ahead { end: 9 }));
    }

    #[test]
    fn steering_renews_a_restarted_leaders_epoch_and_withdraws_a_lost_copy_at_their_pace() {
        let mut st = Steering::default();
        let r = record("a", 4);
        let copy = |last_epoch, end, recovering| LocalCopy {
            last_epoch,
            end,
            leading_in: None,
            recovering,
        };
        let restarted = copy(4, 17, false);
        let s = st.steer("l", "a", &r, restarted, 0);
        assert_eq!(s.role, Role::Follow(None));
        assert!(!s.withdrawing);
        assert_eq!(
            s.propose,
            vec![Command::Elect {
                log: "l".into(),
                epoch: 4,
                leader: "a".into(),
                start: 17,
                sync_set: vec!["b".into()],
                unclean: None,
            }]
        );
        assert!(st
            .steer("l", "a", &r, restarted, RENEW_EVERY_MS)
            .propose
            .is_empty());
        assert_eq!(
            st.steer("l", "a", &r, restarted, RENEW_EVERY_MS + 1)
                .propose
                .len(),
            1
        );
        // A sync-set member whose copy is recovering withdraws, and follows meanwhile.
        let lost = copy(0, 0, true);
        let s = st.steer("l", "b", &r, lost, 0);
        assert_eq!(s.role, Role::Follow(Some("a".into())));
        assert!(s.withdrawing);
        assert_eq!(
            s.propose,
            vec![Command::Withdraw {
                log: "l".into(),
                node: "b".into()
            }]
        );
        assert!(st
            .steer("l", "b", &r, lost, WITHDRAW_EVERY_MS)
            .propose
            .is_empty());
    }

    #[test]
    fn a_stream_sends_what_the_follower_has_not_had_and_counts_only_what_it_sent() {
        assert_eq!(
            Outbound::open(4, 5, 9),
            Err(StreamRefusal::Bootstrap { start: 5 })
        );
        let mut out = Outbound::open(6, 5, 9).unwrap();
        // Records first, with the commit offset.
        assert_eq!(out.next(9, 3), Outgoing::Records { from: 6 });
        assert_eq!(out.counted(8), 6, "nothing of this stream was sent yet");
        out.sent(9, 3);
        assert_eq!(out.next(9, 3), Outgoing::Nothing);
        assert_eq!(out.counted(12), 9);
        // The commit offset alone when only it moved.
        assert_eq!(out.next(9, 7), Outgoing::Commit);
        out.sent(9, 7);
        assert_eq!(out.next(9, 7), Outgoing::Nothing);
        assert_eq!(out.next(11, 7), Outgoing::Records { from: 9 });
    }

    #[test]
    #[should_panic(expected = "a stream goes forward")]
    fn a_stream_never_goes_back() {
        let mut out = Outbound::open(6, 5, 9).unwrap();
        out.sent(5, 0);
    }
}
