//! The controller of one node, without I/O: a raft-rs `RawNode` over a [`RaftStore`], the
//! [`ClusterMeta`] its committed commands build, the reports every member sends every member,
//! failure detection and failover on the Raft leader, and the round trips a node's lease rests
//! on.
//!
//! Events come in as calls ([`ControllerCore::tick`], [`ControllerCore::receive`],
//! [`ControllerCore::report`], [`ControllerCore::propose`]) with the node's clock in ms;
//! [`ControllerCore::process`] then persists what Raft produced through the store (before any
//! message that depends on it is handed out) and applies what committed. What to send and the
//! outcomes of proposals are taken with [`ControllerCore::take_outbox`] and
//! [`ControllerCore::take_outcomes`]. The real node drives it on a thread of its own with a
//! QUIC transport and a store on disk; the simulator drives the same code with a simulated
//! network, clock and store.
//!
//! Membership is static: every member of the configured list is a voter from the start (the
//! same list on every node). The first Raft leader of a new cluster proposes `Init` with the
//! cluster id it was given.
//!
//! The store's writes either succeed durably or fail. A write that fails for want of space
//! holds the rest of the `Ready` and is made again from [`ControllerCore::process`] after a
//! growing pause (0.1 to 5 s); meanwhile the node neither ticks, nor steps Raft messages, nor
//! proposes, nor acknowledges reports, so nothing is acknowledged that is not durable, and its
//! reports say so. Any other failure is final ([`ControllerCore::failed`]).

use std::collections::BTreeMap;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};

use super::failover::{decide_with, FailoverConfig, Heard, NodeReport};
use super::meta::{ClusterMeta, Command, Member, NodeId, Refusal};

/// Raft ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;
/// The range an election timeout is drawn from, in Raft ticks (`[min, max)`), unless the
/// configuration says otherwise.
pub const ELECTION_TICKS: (usize, usize) = (10, 20);
/// Applied entries after which the metadata is snapshotted and the Raft log compacted.
pub const COMPACT_ENTRIES: u64 = 1000;
/// Wire frame kinds: a Raft message (protobuf), a node's report (JSON [`NodeReport`]), the
/// leader's acknowledgement of a report (JSON).
pub const WIRE_RAFT: u8 = 1;
pub const WIRE_REPORT: u8 = 2;
pub const WIRE_REPORT_ACK: u8 = 3;
/// How long the leader waits before proposing the same failover command for a log again.
const REPROPOSE_AFTER_MS: u64 = 1000;
/// The first and the longest pause before a write that ran out of space is made again.
pub const NO_SPACE_RETRY_MIN: Duration = Duration::from_millis(100);
pub const NO_SPACE_RETRY_MAX: Duration = Duration::from_secs(5);

/// The controller leader's answer to a report: the lease of its sender.
#[derive(Serialize, Deserialize)]
struct ReportAck {
    /// The leader's Raft term.
    term: u64,
    /// The report's `sent_ms`.
    sent_ms: u64,
    /// The leader's commit index when it acknowledged: the lease counts only once this node
    /// has applied that far, so that a node whose lease is current also holds every record
    /// decided before its round trip (a new epoch of a log it led, say). 0 from a node of an
    /// earlier version.
    #[serde(default)]
    commit: u64,
}

/// A failed write to the controller's storage.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{cause}")]
pub struct StoreError {
    /// Out of space (ENOSPC, EDQUOT): nothing was reported durable, and the write may be
    /// made again. Any other failure is final.
    pub no_space: bool,
    /// The store's own error.
    pub cause: std::sync::Arc<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    /// A failure of the store's, out of space or not.
    pub fn new(no_space: bool, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError {
            no_space,
            cause: std::sync::Arc::new(cause),
        }
    }
}

/// raft-rs's memory of a stored Raft state, which a [`RaftStore`] serves raft's reads from:
/// the snapshot's metadata (at index 0, before the first snapshot, only its membership), the
/// entries after it, the hard state.
pub fn raft_memory(
    snapshot: &Snapshot,
    entries: &[Entry],
    hs: &HardState,
) -> raft::Result<MemStorage> {
    let mem = MemStorage::new();
    {
        let mut core = mem.wl();
        if snapshot.get_metadata().index > 0 {
            let mut meta_only = Snapshot::default();
            meta_only.set_metadata(snapshot.get_metadata().clone());
            core.apply_snapshot(meta_only)?;
        } else {
            // `MemStorage::apply_snapshot` refuses index 0: set the initial membership directly.
            core.set_conf_state(snapshot.get_metadata().get_conf_state().clone());
        }
        core.append(entries)?;
        core.set_hardstate(hs.clone());
    }
    Ok(mem)
}

/// A hard state that covers a snapshot at (`index`, `term`): a later term with no vote, and
/// the snapshot committed.
pub fn raise_to_snapshot(hs: &mut HardState, index: u64, term: u64) {
    if hs.term < term {
        hs.term = term;
        hs.vote = 0;
    }
    hs.commit = hs.commit.max(index);
}

/// raft-rs's `Storage::snapshot` for a store that keeps `snapshot`, its latest, with its
/// state-machine data (`MemStorage` would make one up at the commit index, without data):
/// temporarily unavailable before the first snapshot, or when it is older than
/// `request_index`, until a later compaction.
pub fn stored_snapshot(snapshot: &Snapshot, request_index: u64) -> raft::Result<Snapshot> {
    let index = snapshot.get_metadata().index;
    if index == 0 || index < request_index {
        return Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable,
        ));
    }
    Ok(snapshot.clone())
}

/// The controller's durable Raft state: raft-rs's `Storage` (reads) and the writes the core
/// makes. Every write is durable when it returns `Ok`.
pub trait RaftStore: raft::Storage {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError>;
    fn set_hardstate(&mut self, hs: HardState) -> Result<(), StoreError>;
    /// Save the commit index (not needed for safety: one lost is learnt again).
    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError>;
    /// Replace everything by a snapshot from the leader.
    fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), StoreError>;
    /// Keep `data` (the metadata as of `index`) as the snapshot and drop the entries it covers.
    fn compact(&mut self, index: u64, data: Vec<u8>, conf: ConfState) -> Result<(), StoreError>;
    /// Entries kept after the snapshot.
    fn entries_since_snapshot(&self) -> u64;
    /// The snapshot's index and data, if there is one.
    fn snapshot_data(&self) -> Option<(u64, Vec<u8>)>;
}

/// What a node needs to run its controller.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This node.
    pub node_id: NodeId,
    /// Every member (this node included), the same on every node.
    pub members: BTreeMap<NodeId, Member>,
    /// Failure detection and election settings; `None`: no failover decisions.
    pub failover: Option<FailoverConfig>,
    /// The range election timeouts are drawn from, in ticks (`[min, max)`).
    pub election_ticks: (usize, usize),
    /// The id the cluster gets if this node forms it (fresh and random).
    pub cluster_id: String,
}

/// Why a proposal did not apply.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProposeError {
    /// The command was applied and refused by the state machine (stale epoch, ...).
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    /// Raft could not take it (no leader known at the moment); nothing was proposed.
    #[error("the controller has no leader")]
    NoLeader,
    /// It may or may not apply later (a leader change lost it, or it is slow).
    #[error("no outcome within {0:?}")]
    Timeout(Duration),
    /// The controller has stopped.
    #[error("the controller has stopped")]
    Stopped,
    /// This node's controller storage is out of space; nothing was proposed.
    #[error("this node's controller storage is out of space: {0}")]
    NoSpace(StoreError),
}

/// Why a controller stopped: it takes no more input, and its node restarts it (see
/// [`ControllerCore::process`]).
#[derive(Clone, Debug, thiserror::Error)]
pub enum Halt {
    /// A storage write failed for a reason other than space.
    #[error("controller storage: {0}")]
    Storage(StoreError),
    /// The leader sent a metadata snapshot that does not decode (the decoder's message).
    #[error("a metadata snapshot from the leader does not decode: {0}")]
    BadSnapshot(String),
}

/// Why a controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("node {0} is not in the member list")]
    NotAMember(NodeId),
    #[error("{0}")]
    Halted(#[from] Halt),
    #[error("controller storage: the metadata snapshot does not decode: {0}")]
    Snapshot(#[from] serde_json::Error),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// A proposal's entry data.
#[derive(Serialize, Deserialize)]
struct Proposal {
    /// Unique per proposing node: (raft id << 40) + counter.
    id: u64,
    cmd: Command,
}

/// A `Ready` not yet fully handled, and how far it got.
struct Held {
    ready: raft::Ready,
    snapshot_done: bool,
    applied_done: bool,
}

/// The storage ran out of space (see the module documentation).
struct Blocked {
    since_ms: u64,
    /// The last error, for status.
    error: StoreError,
    /// The next pause.
    pause: Duration,
    retry_at_ms: u64,
    /// The `Ready` whose writes are to be made again.
    held: Option<Held>,
    /// A commit index not yet saved.
    commit: Option<u64>,
}

/// One node's controller.
pub struct ControllerCore<S: RaftStore> {
    node: RawNode<S>,
    me: NodeId,
    raft_id: u64,
    ids: BTreeMap<u64, NodeId>,
    members: BTreeMap<NodeId, Member>,
    meta: ClusterMeta,
    applied: u64,
    next_proposal: u64,
    failed: Option<Halt>,
    cluster_id: String,
    /// The term in which this node proposed `Init`.
    init_term: Option<u64>,
    failover: Option<FailoverConfig>,
    /// The latest report of each member (every member keeps them, the leader decides).
    heard: BTreeMap<NodeId, Heard>,
    /// When this controller started: reports have been arriving since.
    started_ms: u64,
    /// Failover commands proposed recently, per log: (epoch, when).
    proposed: BTreeMap<String, (u64, u64)>,
    /// When each log's current epoch began, as this node saw it: (epoch, when).
    began: BTreeMap<String, (u64, u64)>,
    /// The start of this node's latest round trip with the controller leader: when it sent
    /// the last report the leader acknowledged, or, leading, when a majority of the members
    /// had last answered it. What its lease is measured from.
    contact_ms: Option<u64>,
    /// An acknowledged round trip that counts once this node has applied the leader's commit
    /// index of the acknowledgement: (its start, that index).
    pending_contact: Option<(u64, u64)>,
    /// When each other member last sent a valid controller frame.
    peers_ms: BTreeMap<NodeId, u64>,
    /// Leading: when each other member last answered a Raft message of this node.
    answered_ms: BTreeMap<NodeId, u64>,
    blocked: Option<Blocked>,
    outbox: Vec<(NodeId, Vec<u8>)>,
    outcomes: Vec<(u64, Result<(), ProposeError>)>,
    /// Set when the published view may have changed.
    changed: bool,
}

/// Whether a node may act as a log's leader: its latest round trip with the controller's
/// leader began less than half of `leader_timeout` ago (by its own clock), and its controller
/// storage is writable. The other half is the margin for clock drift and delays: the
/// controller replaces a leader only after a full `leader_timeout` without its reports (by the
/// controller leader's clock), so a leader cut off stops well before a successor starts.
pub fn lease_holds(
    contact_ms: Option<u64>,
    now_ms: u64,
    leader_timeout: Duration,
    no_space: bool,
) -> bool {
    let valid_for = if crate::planted::active(crate::planted::Bug::LeaseWithoutMargin) {
        leader_timeout
    } else {
        leader_timeout / 2
    };
    !no_space
        && contact_ms.is_some_and(|at| now_ms.saturating_sub(at) < valid_for.as_millis() as u64)
}

impl<S: RaftStore> ControllerCore<S> {
    /// Start from what `store` holds (replaying committed entries, so the metadata is current
    /// on return).
    pub fn new(cfg: CoreConfig, store: S, now_ms: u64) -> Result<Self, StartError> {
        let raft_id = cfg
            .members
            .get(&cfg.node_id)
            .ok_or_else(|| StartError::NotAMember(cfg.node_id.clone()))?
            .raft_id;
        let (meta, applied) = match store.snapshot_data() {
            Some((index, data)) => (serde_json::from_slice::<ClusterMeta>(&data)?, index),
            None => (ClusterMeta::default(), 0),
        };
        let (min, max) = cfg.election_ticks;
        let config = raft::Config {
            id: raft_id,
            election_tick: min,
            min_election_tick: min,
            max_election_tick: max,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&config, store, &logger)?;
        let ids = cfg
            .members
            .iter()
            .map(|(id, m)| (m.raft_id, id.clone()))
            .collect();
        let mut core = ControllerCore {
            node,
            me: cfg.node_id,
            raft_id,
            ids,
            members: cfg.members,
            meta,
            applied,
            next_proposal: 0,
            failed: None,
            cluster_id: cfg.cluster_id,
            init_term: None,
            failover: cfg.failover,
            heard: BTreeMap::new(),
            started_ms: now_ms,
            proposed: BTreeMap::new(),
            began: BTreeMap::new(),
            contact_ms: None,
            pending_contact: None,
            peers_ms: BTreeMap::new(),
            answered_ms: BTreeMap::new(),
            blocked: None,
            outbox: Vec::new(),
            outcomes: Vec::new(),
            changed: true,
        };
        core.process(now_ms)?;
        Ok(core)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.me
    }

    /// The metadata as applied on this node.
    pub fn meta(&self) -> &ClusterMeta {
        &self.meta
    }

    /// The index of the last applied Raft entry.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// The current Raft leader, if known.
    pub fn leader(&self) -> Option<&NodeId> {
        self.ids.get(&self.node.raft.leader_id)
    }

    /// Whether this node leads the controller.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// Set when the controller stopped on a storage failure.
    pub fn failed(&self) -> Option<&Halt> {
        self.failed.as_ref()
    }

    /// While the storage is out of space: the error, and since when.
    pub fn no_space(&self) -> Option<(&StoreError, u64)> {
        self.blocked.as_ref().map(|b| (&b.error, b.since_ms))
    }

    /// See the `contact_ms` field: `None` until the first round trip.
    pub fn contact_ms(&self) -> Option<u64> {
        self.contact_ms
    }

    /// When each other member last sent a valid controller frame.
    pub fn peers_ms(&self) -> &BTreeMap<NodeId, u64> {
        &self.peers_ms
    }

    /// Whether this node may lead logs now (see [`lease_holds`]).
    pub fn lease_ok(&self, now_ms: u64, leader_timeout: Duration) -> bool {
        lease_holds(
            self.contact_ms,
            now_ms,
            leader_timeout,
            self.blocked.is_some(),
        )
    }

    /// Whether anything a reader of the state would see changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Frames to send: (member, bytes). Best effort, in any order; Raft resends what matters.
    pub fn take_outbox(&mut self) -> Vec<(NodeId, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// Proposals that applied (or were refused) on this node since the last call.
    pub fn take_outcomes(&mut self) -> Vec<(u64, Result<(), ProposeError>)> {
        std::mem::take(&mut self.outcomes)
    }

    /// One Raft tick, and, on the leader, the failover decisions. Out of space the node does
    /// not tick: it starts no election, and as the leader it sends no heartbeats, so the others
    /// elect another.
    pub fn tick(&mut self, now_ms: u64) {
        if self.failed.is_some() || self.blocked.is_some() {
            return;
        }
        self.node.tick();
        self.decide_failover(now_ms);
    }

    /// A frame received from member `from` (its identity checked by the transport).
    pub fn receive(&mut self, now_ms: u64, from: &str, frame: &[u8]) {
        if self.failed.is_some() || !self.members.contains_key(from) || from == self.me {
            return;
        }
        match frame.first() {
            Some(&WIRE_REPORT) => match serde_json::from_slice::<NodeReport>(&frame[1..]) {
                Ok(r) if r.node == from => {
                    self.heard_from(now_ms, from);
                    self.ack_report(&r);
                    self.keep_report(now_ms, r);
                }
                Ok(_) => tracing::warn!(from, "controller: a report about another node"),
                Err(e) => tracing::warn!(from, error = %e, "controller: undecodable report"),
            },
            Some(&WIRE_REPORT_ACK) => match serde_json::from_slice::<ReportAck>(&frame[1..]) {
                Ok(_) if self.blocked.is_some() => self.heard_from(now_ms, from),
                Ok(a) => {
                    self.heard_from(now_ms, from);
                    // Only from the leader of this node's current term: an old leader's
                    // acknowledgement says nothing about the decider of today.
                    let r = &self.node.raft;
                    if self.ids.get(&r.leader_id).map(String::as_str) == Some(from)
                        && a.term == r.term
                        && self
                            .pending_contact
                            .is_none_or(|(sent, _)| sent < a.sent_ms)
                    {
                        self.pending_contact = Some((a.sent_ms, a.commit));
                        self.take_contact();
                    }
                }
                Err(e) => {
                    tracing::warn!(from, error = %e, "controller: undecodable report acknowledgement")
                }
            },
            Some(&WIRE_RAFT) => match Message::parse_from_bytes(&frame[1..]) {
                // A message must come from the member it names.
                Ok(m) if self.ids.get(&m.from).map(String::as_str) != Some(from) => {
                    tracing::warn!(from, "controller: a message not from its sender")
                }
                // Out of space: dropped, as a lossy network would; Raft sends again.
                Ok(_) if self.blocked.is_some() => self.heard_from(now_ms, from),
                Ok(m) if m.to == self.raft_id => {
                    self.heard_from(now_ms, from);
                    // An answer to this node's own message is a round trip: as the leader,
                    // that is what its lease rests on.
                    let answer = matches!(
                        m.get_msg_type(),
                        MessageType::MsgAppendResponse | MessageType::MsgHeartbeatResponse
                    ) && m.term == self.node.raft.term;
                    if let Err(e) = self.node.step(m) {
                        tracing::debug!(error = %e, "controller: raft step");
                    }
                    if answer && self.is_leader() {
                        self.answered_ms.insert(from.to_string(), now_ms);
                        self.leader_contact();
                    }
                    self.changed = true;
                }
                Ok(_) => tracing::warn!(from, "controller: a message for another node"),
                Err(e) => tracing::warn!(from, error = %e, "controller: undecodable message"),
            },
            _ => tracing::warn!(from, "controller: unknown frame kind"),
        }
    }

    /// This node's own report: sent to every other member with how long ago this node heard
    /// from each of them, and kept (every member keeps the latest of each, so a member that
    /// becomes the controller's leader can judge failures at once instead of first waiting a
    /// `leader_timeout` for reports to arrive).
    pub fn report(&mut self, now_ms: u64, mut r: NodeReport) {
        if self.failed.is_some() {
            return;
        }
        r.node = self.me.clone();
        r.heard_ms = self
            .members
            .keys()
            .filter(|id| **id != self.me)
            .map(|id| {
                let at = self.peers_ms.get(id).copied().unwrap_or(self.started_ms);
                (id.clone(), now_ms.saturating_sub(at))
            })
            .collect();
        r.sent_ms = now_ms;
        r.storage = self.blocked.as_ref().map(|b| b.error.to_string());
        // Leading alone, this node is its own decider and its lease is its own.
        if self.is_leader() && self.members.len() == 1 {
            self.contact_ms = Some(now_ms);
        }
        let mut frame = vec![WIRE_REPORT];
        frame.extend(serde_json::to_vec(&r).expect("reports serialise"));
        for id in self.members.keys().filter(|id| **id != self.me) {
            self.outbox.push((id.clone(), frame.clone()));
        }
        self.keep_report(now_ms, r);
    }

    fn keep_report(&mut self, now_ms: u64, report: NodeReport) {
        self.heard.insert(
            report.node.clone(),
            Heard {
                at_ms: now_ms,
                report,
            },
        );
    }

    fn heard_from(&mut self, now_ms: u64, from: &str) {
        self.peers_ms.insert(from.to_string(), now_ms);
    }

    /// As the leader: acknowledge a member's report, so the member knows its reports reach
    /// the decider (its lease).
    fn ack_report(&mut self, r: &NodeReport) {
        if !self.is_leader() || r.sent_ms == 0 || self.blocked.is_some() {
            return;
        }
        let ack = ReportAck {
            term: self.node.raft.term,
            sent_ms: r.sent_ms,
            commit: self.node.raft.raft_log.committed,
        };
        let mut frame = vec![WIRE_REPORT_ACK];
        frame.extend(serde_json::to_vec(&ack).expect("acknowledgements serialise"));
        self.outbox.push((r.node.clone(), frame));
    }

    /// The pending round trip counts once this node has applied the leader's commit index of
    /// its acknowledgement.
    fn take_contact(&mut self) {
        if let Some((sent_ms, commit)) = self.pending_contact {
            if self.applied >= commit {
                self.contact_ms = Some(self.contact_ms.unwrap_or(0).max(sent_ms));
                self.pending_contact = None;
            }
        }
    }

    /// As the leader: the lease starts at the latest moment by which a majority of the members
    /// (this one included) had answered it.
    fn leader_contact(&mut self) {
        let majority = self.members.len() / 2 + 1;
        let mut answered: Vec<u64> = self.answered_ms.values().copied().collect();
        answered.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(at) = answered.get(majority.saturating_sub(2)) {
            self.contact_ms = Some(self.contact_ms.unwrap_or(0).max(*at));
        }
    }

    /// Propose `cmd`; its outcome comes from [`ControllerCore::take_outcomes`] under the
    /// returned id once it is applied on this node (or never, if a leader change loses it).
    pub fn propose(&mut self, cmd: Command) -> Result<u64, ProposeError> {
        if self.failed.is_some() {
            return Err(ProposeError::Stopped);
        }
        if let Some(b) = &self.blocked {
            return Err(ProposeError::NoSpace(b.error.clone()));
        }
        self.next_proposal += 1;
        let id = (self.raft_id << 40) + self.next_proposal;
        let data = serde_json::to_vec(&Proposal { id, cmd }).expect("commands serialise");
        self.node
            .propose(Vec::new(), data)
            .map_err(|_| ProposeError::NoLeader)?;
        Ok(id)
    }

    /// As the leader: propose what failure detection decides.
    fn decide_failover(&mut self, now_ms: u64) {
        for (name, l) in &self.meta.logs {
            if self.began.get(name).is_none_or(|(e, _)| *e != l.epoch) {
                self.began.insert(name.clone(), (l.epoch, now_ms));
            }
        }
        let Some(cfg) = self.failover.filter(|_| self.is_leader()) else {
            return;
        };
        // Only with current metadata: a new leader has applied everything committed once an
        // entry of its own term is committed.
        let raft_log = &self.node.raft.raft_log;
        let current = raft_log.applied >= raft_log.committed
            && raft_log.term(raft_log.committed).ok() == Some(self.node.raft.term);
        if !current {
            return;
        }
        let began: BTreeMap<String, u64> = self
            .began
            .iter()
            .map(|(n, (_, t))| (n.clone(), *t))
            .collect();
        let cmds = decide_with(
            &self.meta,
            &self.heard,
            now_ms,
            self.started_ms,
            &cfg,
            &began,
        );
        for cmd in cmds {
            let (log, epoch) = match &cmd {
                Command::Elect { log, epoch, .. }
                | Command::Depose { log, epoch, .. }
                | Command::NoLeader { log, epoch, .. }
                | Command::CancelTransfer { log, epoch } => (log.clone(), *epoch),
                _ => continue,
            };
            if self.proposed.get(&log).is_some_and(|(e, at)| {
                *e == epoch && now_ms.saturating_sub(*at) < REPROPOSE_AFTER_MS
            }) {
                continue;
            }
            tracing::warn!(?cmd, "controller: failover");
            self.proposed.insert(log, (epoch, now_ms));
            let _ = self.propose(cmd);
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let Some(to) = self.ids.get(&m.to) else {
                continue;
            };
            let mut frame = Vec::with_capacity(1 + m.compute_size() as usize);
            frame.push(WIRE_RAFT);
            if m.write_to_vec(&mut frame).is_ok() {
                self.outbox.push((to.clone(), frame));
            }
        }
    }

    /// Handle raft's `Ready`: persist, apply, queue messages. A write that runs out of space
    /// holds the `Ready` and is made again by a later call once its pause has passed; any
    /// other storage failure stops the controller (the error is returned, and kept in
    /// [`ControllerCore::failed`]).
    pub fn process(&mut self, now_ms: u64) -> Result<(), Halt> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let r = self.process_ready(now_ms);
        match &r {
            Ok(()) => self.take_contact(),
            Err(e) => {
                tracing::error!(error = %e, "controller stopped");
                self.failed = Some(e.clone());
                self.changed = true;
            }
        }
        r
    }

    fn process_ready(&mut self, now_ms: u64) -> Result<(), Halt> {
        if let Some(b) = &mut self.blocked {
            if now_ms < b.retry_at_ms {
                return Ok(());
            }
            if let Some(held) = b.held.take() {
                self.finish_ready(now_ms, held)?;
                if self.blocked.as_ref().is_some_and(|b| b.held.is_some()) {
                    return Ok(());
                }
            }
            if let Some(commit) = self.blocked.as_ref().and_then(|b| b.commit) {
                if let Err(e) = self.node.mut_store().set_commit(commit) {
                    return self.out_of_space(now_ms, e, None, Some(commit));
                }
            }
            if let Some(b) = self.blocked.take() {
                tracing::warn!(
                    after_ms = now_ms.saturating_sub(b.since_ms),
                    "controller: storage writable again; voting and proposing resume"
                );
            }
            self.changed = true;
        }
        if !self.node.has_ready() {
            self.maybe_init();
            return Ok(());
        }
        let mut ready = self.node.ready();
        if !ready.messages().is_empty() {
            let msgs = ready.take_messages();
            self.send(msgs);
        }
        self.finish_ready(
            now_ms,
            Held {
                ready,
                snapshot_done: false,
                applied_done: false,
            },
        )
    }

    /// The rest of a `Ready`, from where an earlier attempt stopped.
    fn finish_ready(&mut self, now_ms: u64, mut held: Held) -> Result<(), Halt> {
        self.changed = true;
        if !held.snapshot_done && !held.ready.snapshot().is_empty() {
            let snap = held.ready.snapshot().clone();
            let meta: ClusterMeta = serde_json::from_slice(snap.get_data())
                .map_err(|e| Halt::BadSnapshot(e.to_string()))?;
            if let Err(e) = self.node.mut_store().apply_snapshot(snap.clone()) {
                return self.out_of_space(now_ms, e, Some(held), None);
            }
            self.meta = meta;
            self.applied = snap.get_metadata().index;
        }
        held.snapshot_done = true;
        if !held.applied_done {
            let entries = held.ready.take_committed_entries();
            self.apply(entries);
            held.applied_done = true;
        }
        if !held.ready.entries().is_empty() {
            if let Err(e) = self.node.mut_store().append(held.ready.entries()) {
                return self.out_of_space(now_ms, e, Some(held), None);
            }
        }
        if let Some(hs) = held.ready.hs() {
            if let Err(e) = self.node.mut_store().set_hardstate(hs.clone()) {
                return self.out_of_space(now_ms, e, Some(held), None);
            }
        }
        let mut ready = held.ready;
        if !ready.persisted_messages().is_empty() {
            let msgs = ready.take_persisted_messages();
            self.send(msgs);
        }
        let mut light = self.node.advance(ready);
        let mut unsaved_commit = None;
        if let Some(commit) = light.commit_index() {
            // The commit index is not needed for safety: one that could not be saved is saved
            // later, and nothing waits for it.
            match self.node.mut_store().set_commit(commit) {
                Ok(()) => {}
                Err(e) if e.no_space => unsaved_commit = Some((commit, e)),
                Err(e) => return Err(Halt::Storage(e)),
            }
        }
        let msgs = light.take_messages();
        self.send(msgs);
        let entries = light.take_committed_entries();
        self.apply(entries);
        self.node.advance_apply();
        if self.node.store().entries_since_snapshot() > COMPACT_ENTRIES {
            let data = serde_json::to_vec(&self.meta).expect("metadata serialises");
            let conf = self.node.raft.prs().conf().to_conf_state();
            match self.node.mut_store().compact(self.applied, data, conf) {
                Ok(()) => {}
                // Compaction is tried again after the next entry.
                Err(e) if e.no_space => {
                    tracing::warn!(error = %e, "controller: compaction postponed")
                }
                Err(e) => return Err(Halt::Storage(e)),
            }
        }
        self.maybe_init();
        if let Some((commit, e)) = unsaved_commit {
            return self.out_of_space(now_ms, e, None, Some(commit));
        }
        Ok(())
    }

    /// A write ran out of space: hold what is left to do and try again later (doubling the
    /// pause up to [`NO_SPACE_RETRY_MAX`]); any other error stops the controller.
    fn out_of_space(
        &mut self,
        now_ms: u64,
        e: StoreError,
        held: Option<Held>,
        commit: Option<u64>,
    ) -> Result<(), Halt> {
        if !e.no_space {
            return Err(Halt::Storage(e));
        }
        self.changed = true;
        let b = self.blocked.get_or_insert_with(|| {
            tracing::error!(error = %e, "controller: out of space; not voting or proposing until a write succeeds");
            Blocked {
                since_ms: now_ms,
                error: e.clone(),
                pause: NO_SPACE_RETRY_MIN,
                retry_at_ms: now_ms,
                held: None,
                commit: None,
            }
        });
        b.error = e;
        b.retry_at_ms = now_ms + b.pause.as_millis() as u64;
        b.pause = (b.pause * 2).min(NO_SPACE_RETRY_MAX);
        if held.is_some() {
            b.held = held;
        }
        if commit.is_some() {
            b.commit = commit;
        }
        Ok(())
    }

    /// A new cluster's first leader forms it (once per term: a proposal lost to a leader
    /// change is made again by the next leader).
    fn maybe_init(&mut self) {
        let term = self.node.raft.term;
        if self.is_leader() && self.meta.cluster_id.is_empty() && self.init_term != Some(term) {
            self.init_term = Some(term);
            let cmd = Command::Init {
                cluster_id: self.cluster_id.clone(),
                members: self.members.clone(),
            };
            let _ = self.propose(cmd);
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            // Committed entries apply once each, in order, with no gap.
            assert_eq!(e.index, self.applied + 1, "entries apply in order");
            self.applied = e.index;
            if e.data.is_empty() || e.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            match serde_json::from_slice::<Proposal>(&e.data) {
                Ok(p) => {
                    let r = self.meta.apply(&p.cmd).map_err(ProposeError::from);
                    if let Err(err) = &r {
                        tracing::debug!(error = %err, "controller: command refused");
                    }
                    if p.id >> 40 == self.raft_id {
                        self.outcomes.push((p.id, r));
                    }
                }
                // Every node skips it alike: the state machine stays the same everywhere.
                Err(err) => {
                    tracing::error!(index = e.index, error = %err, "controller: undecodable entry skipped")
                }
            }
        }
    }
}
