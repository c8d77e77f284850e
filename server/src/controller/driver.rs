//! The controller's Raft driver: one raft-rs `RawNode` per node, ticked and stepped on a thread
//! of its own, persisting through [`DiskStorage`] before anything it wrote is acknowledged, and
//! applying committed [`Command`]s to the [`ClusterMeta`] every node holds.
//!
//! Membership is static: every member of the configured list is a voter from the start (the
//! same list on every node, checked against what the data dir recorded). The first Raft leader
//! of a new cluster proposes `Init` with a fresh cluster id.
//!
//! Messages to other nodes go through a [`Transport`]: best effort, in any order, possibly
//! lost; Raft retries what matters.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protobuf::Message as _;
use raft::prelude::{Entry, EntryType, Message, MessageType};
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::failover::{decide_with, FailoverConfig, Heard, NodeReport};
use super::meta::{ClusterMeta, Command, Member, NodeId, Refusal};
use super::storage::DiskStorage;

/// Raft ticks per election timeout (randomised by raft-rs between 1x and 2x).
pub const ELECTION_TICKS: usize = 10;
/// Raft ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;
/// Applied entries after which the metadata is snapshotted and the Raft log compacted.
pub const COMPACT_ENTRIES: u64 = 1000;
/// Wire frame kinds: a Raft message (protobuf), a node's report to the leader (JSON), the
/// leader's acknowledgement of a report (JSON [`ReportAck`]).
const WIRE_RAFT: u8 = 1;
const WIRE_REPORT: u8 = 2;
const WIRE_REPORT_ACK: u8 = 3;

/// The controller leader's answer to a report: the lease of its sender.
#[derive(Serialize, Deserialize)]
struct ReportAck {
    /// The leader's Raft term.
    term: u64,
    /// The report's `sent_ms`.
    sent_ms: u64,
}
/// How long the leader waits before proposing the same failover command for a log again.
const REPROPOSE_AFTER: Duration = Duration::from_secs(1);
/// The first and the longest pause before a write that ran out of space is made again.
pub const NO_SPACE_RETRY_MIN: Duration = Duration::from_millis(100);
pub const NO_SPACE_RETRY_MAX: Duration = Duration::from_secs(5);

/// A `Ready` not yet fully handled, and how far it got.
struct Held {
    ready: raft::Ready,
    snapshot_done: bool,
    applied_done: bool,
}

/// The controller's storage ran out of space: until a write succeeds again the node neither
/// votes, nor proposes, nor steps Raft messages (so nothing is acknowledged that is not
/// durable), nor ticks, and its reports say so.
struct Blocked {
    since: Instant,
    /// The last error, for status.
    error: String,
    /// The next pause.
    pause: Duration,
    retry_at: Instant,
    /// The `Ready` whose writes are to be made again.
    held: Option<Held>,
    /// A commit index not yet saved.
    commit: Option<u64>,
}

/// Sends bytes to another member, best effort.
pub trait Transport: Send + Sync + 'static {
    /// Send `frame` to member `to`. Never blocks; a frame that cannot be sent is dropped.
    fn send(&self, to: &NodeId, frame: Bytes);
}

/// What a node needs to run its controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// This node.
    pub node_id: NodeId,
    /// Every member (this node included), the same on every node.
    pub members: BTreeMap<NodeId, Member>,
    /// The directory for the Raft state (inside the node's data dir).
    pub dir: PathBuf,
    /// One Raft tick.
    pub tick: Duration,
    /// Failure detection and election settings; `None`: the controller makes no failover
    /// decisions.
    pub failover: Option<FailoverConfig>,
}

/// The controller's view, published after every change.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub meta: ClusterMeta,
    /// The index of the last applied Raft entry.
    pub applied: u64,
    pub term: u64,
    /// The current Raft leader, if known.
    pub leader: Option<NodeId>,
    /// Set when this node's controller stopped on an error (its storage failed).
    pub failed: Option<String>,
    /// Set while its storage is out of space: (the error, for how long).
    pub no_space: Option<(String, Duration)>,
}

impl State {
    /// Whether this node leads the controller.
    pub fn is_leader(&self, me: &str) -> bool {
        self.leader.as_deref() == Some(me)
    }
}

/// Why a proposal did not apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
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
    NoSpace(String),
}

/// A proposal's entry data.
#[derive(Serialize, Deserialize)]
struct Proposal {
    /// Unique per proposing node: (raft id << 40) + counter.
    id: u64,
    cmd: Command,
}

enum Input {
    Net(NodeId, Bytes),
    Report(NodeReport),
    Propose(Command, oneshot::Sender<Result<(), ProposeError>>),
    Stop,
}

/// A running controller.
pub struct Controller {
    me: NodeId,
    /// The start of this node's latest round trip with the controller leader (ms since the
    /// Unix epoch): when it sent the last report the leader acknowledged, or, leading, when a
    /// majority of the members had last answered it. What its lease is measured from.
    contact_ms: Arc<std::sync::atomic::AtomicU64>,
    /// When each other member last sent a valid controller frame (ms since the Unix epoch).
    peers_ms: Arc<std::sync::Mutex<BTreeMap<NodeId, u64>>>,
    tx: mpsc::UnboundedSender<Input>,
    state: watch::Receiver<Arc<State>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("node {0} is not in the member list")]
    NotAMember(NodeId),
    #[error("controller storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
}

impl Controller {
    /// Open the Raft state in `cfg.dir` and start the driver thread.
    pub fn start(
        cfg: ControllerConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Controller, StartError> {
        let me = cfg
            .members
            .get(&cfg.node_id)
            .ok_or_else(|| StartError::NotAMember(cfg.node_id.clone()))?
            .raft_id;
        let voters: Vec<u64> = cfg.members.values().map(|m| m.raft_id).collect();
        let storage =
            DiskStorage::open(&cfg.dir, &voters).map_err(|e| StartError::Storage(e.to_string()))?;
        let (meta, applied) = match storage.snapshot_data() {
            Some((index, data)) => (
                serde_json::from_slice::<ClusterMeta>(&data)
                    .map_err(|e| StartError::Storage(format!("metadata snapshot: {e}")))?,
                index,
            ),
            None => (ClusterMeta::default(), 0),
        };
        let config = raft::Config {
            id: me,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node =
            RawNode::new(&config, storage, &logger).map_err(|e| StartError::Raft(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let contact_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let peers_ms = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let initial = Arc::new(State {
            meta: meta.clone(),
            applied,
            ..State::default()
        });
        let (state_tx, state) = watch::channel(initial);
        let ids: HashMap<u64, NodeId> = cfg
            .members
            .iter()
            .map(|(id, m)| (m.raft_id, id.clone()))
            .collect();
        let mut driver = Driver {
            node,
            me: cfg.node_id.clone(),
            raft_id: me,
            ids,
            members: cfg.members.clone(),
            meta,
            applied,
            transport,
            pending: HashMap::new(),
            next_proposal: 0,
            state: state_tx,
            failed: None,
            init_term: None,
            failover: cfg.failover,
            heard: BTreeMap::new(),
            listening_since: Instant::now(),
            proposed: HashMap::new(),
            began: BTreeMap::new(),
            contact_ms: contact_ms.clone(),
            peers_ms: peers_ms.clone(),
            answered_ms: BTreeMap::new(),
            started_ms: now_ms(),
            blocked: None,
        };
        // Replay what was committed before a restart, so the metadata is current on return.
        driver.on_ready().map_err(StartError::Storage)?;
        driver.publish();
        let tick = cfg.tick;
        let thread = std::thread::Builder::new()
            .name(format!("controller-{}", cfg.node_id))
            .spawn(move || driver.run(rx, tick))
            .map_err(|e| StartError::Raft(format!("spawn: {e}")))?;
        Ok(Controller {
            me: cfg.node_id,
            contact_ms,
            peers_ms,
            tx,
            state,
            thread: Some(thread),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.me
    }

    /// How long ago this node's latest round trip with the controller leader began (see
    /// `contact_ms`): a node cut off in either direction sees it grow. `None`: it has had none
    /// since it started.
    pub fn since_contact(&self) -> Option<Duration> {
        let at = self.contact_ms.load(std::sync::atomic::Ordering::Relaxed);
        (at > 0).then(|| Duration::from_millis(now_ms().saturating_sub(at)))
    }

    /// The members heard from within `within` (a valid controller frame), this node included.
    pub fn reachable(&self, within: Duration) -> Vec<NodeId> {
        let now = now_ms();
        let peers = self.peers_ms.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<NodeId> = peers
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) < within.as_millis() as u64)
            .map(|(id, _)| id.clone())
            .chain(std::iter::once(self.me.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// A frame received from member `from`.
    pub fn deliver(&self, from: &str, frame: Bytes) {
        let _ = self.tx.send(Input::Net(from.to_string(), frame));
    }

    /// Report this node's logs to the controller leader (call it every few ticks).
    pub fn report(&self, report: NodeReport) {
        let _ = self.tx.send(Input::Report(report));
    }

    /// The controller's state, updated after every change.
    pub fn state(&self) -> watch::Receiver<Arc<State>> {
        self.state.clone()
    }

    /// Propose `cmd` and wait until it is applied on this node (or refused), at most `timeout`.
    pub async fn propose(&self, cmd: Command, timeout: Duration) -> Result<(), ProposeError> {
        let (done, result) = oneshot::channel();
        self.tx
            .send(Input::Propose(cmd, done))
            .map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(timeout, result).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Timeout(timeout)),
        }
    }

    /// Propose `cmd` without waiting for its outcome (the published state shows it).
    pub fn submit(&self, cmd: Command) {
        let (done, _ignored) = oneshot::channel();
        let _ = self.tx.send(Input::Propose(cmd, done));
    }

    /// Stop the driver thread and wait for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let _ = self.tx.send(Input::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Driver {
    node: RawNode<DiskStorage>,
    me: NodeId,
    raft_id: u64,
    ids: HashMap<u64, NodeId>,
    members: BTreeMap<NodeId, Member>,
    meta: ClusterMeta,
    applied: u64,
    transport: Arc<dyn Transport>,
    pending: HashMap<u64, oneshot::Sender<Result<(), ProposeError>>>,
    next_proposal: u64,
    state: watch::Sender<Arc<State>>,
    failed: Option<String>,
    /// The term in which this node proposed `Init`.
    init_term: Option<u64>,
    failover: Option<FailoverConfig>,
    /// The latest report of each member (every member keeps them, the leader decides).
    heard: BTreeMap<NodeId, Heard>,
    /// When this node's controller started: reports have been arriving since.
    listening_since: Instant,
    /// Failover commands proposed recently, per log: (epoch, when).
    proposed: HashMap<String, (u64, Instant)>,
    /// When each log's current epoch began, as this node saw it: (epoch, when).
    began: BTreeMap<String, (u64, Instant)>,
    contact_ms: Arc<std::sync::atomic::AtomicU64>,
    peers_ms: Arc<std::sync::Mutex<BTreeMap<NodeId, u64>>>,
    /// Leading: when each other member last answered a Raft message of this node (ms).
    answered_ms: BTreeMap<NodeId, u64>,
    /// When this controller started (ms since the Unix epoch).
    started_ms: u64,
    /// Set while a storage write is waiting for space.
    blocked: Option<Blocked>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Driver {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>, tick: Duration) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                self.fail(format!("runtime: {e}"));
                return;
            }
        };
        rt.block_on(async move {
            let mut next_tick = Instant::now() + tick;
            while self.failed.is_none() {
                tokio::select! {
                    input = rx.recv() => match input {
                        None | Some(Input::Stop) => break,
                        Some(i) => self.input(i),
                    },
                    _ = tokio::time::sleep_until(next_tick.into()) => {
                        // Out of space, the node does not tick: it starts no election, and as
                        // the leader it sends no heartbeats, so the others elect another.
                        if self.blocked.is_none() {
                            self.node.tick();
                            self.failover();
                        }
                        // Callers that gave up on a proposal are forgotten.
                        self.pending.retain(|_, done| !done.is_closed());
                        next_tick += tick;
                        let now = Instant::now();
                        if next_tick < now {
                            next_tick = now + tick;
                        }
                    }
                }
                // Take whatever else is queued before handling the Ready, so one fdatasync
                // covers it all.
                while let Ok(i) = rx.try_recv() {
                    if matches!(i, Input::Stop) {
                        return;
                    }
                    self.input(i);
                }
                if let Err(e) = self.on_ready() {
                    self.fail(e);
                }
            }
        });
    }

    fn fail(&mut self, why: String) {
        tracing::error!(error = %why, "controller stopped");
        self.failed = Some(why);
        for (_, p) in self.pending.drain() {
            let _ = p.send(Err(ProposeError::Stopped));
        }
        self.publish();
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Report(r) => self.route_report(r),
            Input::Net(from, frame) if frame.first() == Some(&WIRE_REPORT) => {
                match serde_json::from_slice::<NodeReport>(&frame[1..]) {
                    Ok(r) if r.node == from && self.members.contains_key(&from) => {
                        self.heard_from(&from);
                        self.ack_report(&r);
                        self.route_report(r)
                    }
                    Ok(_) => {
                        tracing::warn!(from = %from, "controller: a report about another node")
                    }
                    Err(e) => {
                        tracing::warn!(from = %from, error = %e, "controller: undecodable report")
                    }
                }
            }
            Input::Net(from, frame) if frame.first() == Some(&WIRE_REPORT_ACK) => {
                match serde_json::from_slice::<ReportAck>(&frame[1..]) {
                    Ok(_) if self.blocked.is_some() => self.heard_from(&from),
                    Ok(a) => {
                        self.heard_from(&from);
                        // Only from the leader of this node's current term: an old leader's
                        // acknowledgement says nothing about the decider of today.
                        let r = &self.node.raft;
                        if self.ids.get(&r.leader_id) == Some(&from) && a.term == r.term {
                            self.contact_ms
                                .fetch_max(a.sent_ms, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(from = %from, error = %e, "controller: undecodable report acknowledgement")
                    }
                }
            }
            Input::Net(from, frame) => {
                if frame.first() != Some(&WIRE_RAFT) {
                    tracing::warn!(from = %from, "controller: unknown frame kind");
                    return;
                }
                match Message::parse_from_bytes(&frame[1..]) {
                    // A message must come from the member it names.
                    // Out of space: dropped, as a lossy network would; Raft sends again.
                    Ok(m) if self.blocked.is_some() && self.ids.get(&m.from) == Some(&from) => {
                        self.heard_from(&from)
                    }
                    Ok(m) if self.ids.get(&m.from) == Some(&from) && m.to == self.raft_id => {
                        self.heard_from(&from);
                        // An answer to this node's own message is a round trip: as the
                        // leader, that is what its lease rests on.
                        let answer = matches!(
                            m.get_msg_type(),
                            MessageType::MsgAppendResponse | MessageType::MsgHeartbeatResponse
                        ) && m.term == self.node.raft.term;
                        if let Err(e) = self.node.step(m) {
                            tracing::debug!(error = %e, "controller: raft step");
                        }
                        if answer && self.node.raft.state == StateRole::Leader {
                            self.answered_ms.insert(from.clone(), now_ms());
                            self.leader_contact();
                        }
                    }
                    Ok(_) => {
                        tracing::warn!(from = %from, "controller: a message not from its sender or not for this node")
                    }
                    Err(e) => {
                        tracing::warn!(from = %from, error = %e, "controller: undecodable message")
                    }
                }
            }
            Input::Propose(_, done) if self.blocked.is_some() => {
                let why = self
                    .blocked
                    .as_ref()
                    .map_or(String::new(), |b| b.error.clone());
                let _ = done.send(Err(ProposeError::NoSpace(why)));
            }
            Input::Propose(cmd, done) => {
                self.next_proposal += 1;
                let id = (self.raft_id << 40) + self.next_proposal;
                let data = serde_json::to_vec(&Proposal { id, cmd }).expect("commands serialise");
                match self.node.propose(Vec::new(), data) {
                    Ok(()) => {
                        self.pending.insert(id, done);
                    }
                    Err(_) => {
                        let _ = done.send(Err(ProposeError::NoLeader));
                    }
                }
            }
            Input::Stop => {}
        }
    }

    /// A report, this node's own or one received from its member: every member keeps the
    /// latest of each, so a member that becomes the controller's leader can judge failures at
    /// once instead of first waiting a `leader_timeout` for reports to arrive. This node's own
    /// report goes to every other member.
    fn route_report(&mut self, mut r: NodeReport) {
        if r.node == self.me {
            let now = now_ms();
            let peers = self.peers_ms.lock().unwrap_or_else(|p| p.into_inner());
            r.heard_ms = self
                .members
                .keys()
                .filter(|id| **id != self.me)
                .map(|id| {
                    let at = peers.get(id).copied().unwrap_or(self.started_ms);
                    (id.clone(), now.saturating_sub(at))
                })
                .collect();
            drop(peers);
            r.sent_ms = now;
            r.storage = self.blocked.as_ref().map(|b| b.error.clone());
            // Leading, this node is its own decider; alone, its lease is its own.
            if self.node.raft.state == StateRole::Leader && self.members.len() == 1 {
                self.contact_ms
                    .store(now, std::sync::atomic::Ordering::Relaxed);
            }
            let mut frame = vec![WIRE_REPORT];
            frame.extend(serde_json::to_vec(&r).expect("reports serialise"));
            let frame = Bytes::from(frame);
            for id in self.members.keys().filter(|id| **id != self.me) {
                self.transport.send(id, frame.clone());
            }
        }
        self.heard.insert(
            r.node.clone(),
            Heard {
                at: Instant::now(),
                report: r,
            },
        );
    }

    /// A valid frame arrived from member `from`.
    fn heard_from(&self, from: &str) {
        self.peers_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(from.to_string(), now_ms());
    }

    /// As the leader: acknowledge a member's report, so the member knows its reports reach
    /// the decider (its lease).
    fn ack_report(&self, r: &NodeReport) {
        if self.node.raft.state != StateRole::Leader || r.sent_ms == 0 || self.blocked.is_some() {
            return;
        }
        let ack = ReportAck {
            term: self.node.raft.term,
            sent_ms: r.sent_ms,
        };
        let mut frame = vec![WIRE_REPORT_ACK];
        frame.extend(serde_json::to_vec(&ack).expect("acknowledgements serialise"));
        self.transport.send(&r.node, Bytes::from(frame));
    }

    /// As the leader: the lease starts at the latest moment by which a majority of the members
    /// (this one included) had answered it.
    fn leader_contact(&self) {
        let majority = self.members.len() / 2 + 1;
        let mut answered: Vec<u64> = self.answered_ms.values().copied().collect();
        answered.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(at) = answered.get(majority.saturating_sub(2)) {
            self.contact_ms
                .fetch_max(*at, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// As the leader: propose what failure detection decides.
    fn failover(&mut self) {
        let now = Instant::now();
        // When each log's current epoch began, as this node saw it.
        for (name, l) in &self.meta.logs {
            if self.began.get(name).is_none_or(|(e, _)| *e != l.epoch) {
                self.began.insert(name.clone(), (l.epoch, now));
            }
        }
        let leading = self.node.raft.state == StateRole::Leader;
        let Some(cfg) = self.failover.filter(|_| leading) else {
            return;
        };
        let since = self.listening_since;
        let began: BTreeMap<String, Instant> = self
            .began
            .iter()
            .map(|(n, (_, t))| (n.clone(), *t))
            .collect();
        for cmd in decide_with(&self.meta, &self.heard, now, since, &cfg, now_ms(), &began) {
            let (log, epoch) = match &cmd {
                Command::Elect { log, epoch, .. }
                | Command::Depose { log, epoch, .. }
                | Command::NoLeader { log, epoch, .. }
                | Command::CancelTransfer { log, epoch } => (log.clone(), *epoch),
                _ => continue,
            };
            if self
                .proposed
                .get(&log)
                .is_some_and(|(e, at)| *e == epoch && now.duration_since(*at) < REPROPOSE_AFTER)
            {
                continue;
            }
            tracing::warn!(?cmd, "controller: failover");
            self.proposed.insert(log, (epoch, now));
            let (done, _ignored) = oneshot::channel();
            self.input(Input::Propose(cmd, done));
        }
    }

    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            let Some(to) = self.ids.get(&m.to) else {
                continue;
            };
            let mut frame = Vec::with_capacity(1 + m.compute_size() as usize);
            frame.push(WIRE_RAFT);
            if m.write_to_vec(&mut frame).is_ok() {
                self.transport.send(to, Bytes::from(frame));
            }
        }
    }

    /// Handle raft's `Ready`: send, persist, apply. A write that runs out of space holds the
    /// `Ready` (see [`Driver::blocked`]) and is made again later; any other storage failure
    /// stops the controller.
    fn on_ready(&mut self) -> Result<(), String> {
        if let Some(b) = &mut self.blocked {
            if Instant::now() < b.retry_at {
                return Ok(());
            }
            if let Some(held) = b.held.take() {
                self.finish_ready(held)?;
                if self.blocked.as_ref().is_some_and(|b| b.held.is_some()) {
                    return Ok(());
                }
            }
            if let Some(commit) = self.blocked.as_ref().and_then(|b| b.commit) {
                if let Err(e) = self.node.mut_store().set_commit(commit) {
                    return self.no_space(e, None, Some(commit));
                }
            }
            let since = self.blocked.take().map(|b| b.since);
            tracing::warn!(after = ?since.map(|s| s.elapsed()), "controller: storage writable again; voting and proposing resume");
            self.publish();
        }
        if !self.node.has_ready() {
            self.maybe_init();
            return Ok(());
        }
        let mut ready = self.node.ready();
        if !ready.messages().is_empty() {
            self.send(ready.take_messages());
        }
        self.finish_ready(Held {
            ready,
            snapshot_done: false,
            applied_done: false,
        })
    }

    /// The rest of a `Ready`, from where an earlier attempt stopped.
    fn finish_ready(&mut self, mut held: Held) -> Result<(), String> {
        if !held.snapshot_done && !held.ready.snapshot().is_empty() {
            let snap = held.ready.snapshot().clone();
            let meta: ClusterMeta = serde_json::from_slice(snap.get_data())
                .map_err(|e| format!("a metadata snapshot from the leader: {e}"))?;
            if let Err(e) = self.node.mut_store().apply_snapshot(snap.clone()) {
                return self.no_space(e, Some(held), None);
            }
            self.meta = meta;
            self.applied = snap.get_metadata().index;
        }
        held.snapshot_done = true;
        if !held.applied_done {
            self.apply(held.ready.take_committed_entries());
            held.applied_done = true;
        }
        if !held.ready.entries().is_empty() {
            if let Err(e) = self.node.mut_store().append(held.ready.entries()) {
                return self.no_space(e, Some(held), None);
            }
        }
        if let Some(hs) = held.ready.hs() {
            if let Err(e) = self.node.mut_store().set_hardstate(hs.clone()) {
                return self.no_space(e, Some(held), None);
            }
        }
        let mut ready = held.ready;
        if !ready.persisted_messages().is_empty() {
            self.send(ready.take_persisted_messages());
        }
        let mut light = self.node.advance(ready);
        let mut unsaved_commit = None;
        if let Some(commit) = light.commit_index() {
            // The commit index is not needed for safety: one that could not be saved is saved
            // later, and nothing waits for it.
            match self.node.mut_store().set_commit(commit) {
                Ok(()) => {}
                Err(e) if e.is_no_space() => unsaved_commit = Some((commit, e)),
                Err(e) => return Err(e.to_string()),
            }
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries());
        self.node.advance_apply();
        if self.node.store().entries_since_snapshot() > COMPACT_ENTRIES {
            let data = serde_json::to_vec(&self.meta).expect("metadata serialises");
            let conf = self.node.raft.prs().conf().to_conf_state();
            match self.node.mut_store().compact(self.applied, data, conf) {
                Ok(()) => {}
                // Compaction is tried again after the next entry.
                Err(e) if e.is_no_space() => {
                    tracing::warn!(error = %e, "controller: compaction postponed")
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        self.maybe_init();
        self.publish();
        if let Some((commit, e)) = unsaved_commit {
            return self.no_space(e, None, Some(commit));
        }
        Ok(())
    }

    /// A write ran out of space: hold what is left to do and try again later (doubling the
    /// pause up to [`NO_SPACE_RETRY_MAX`]); any other error stops the controller.
    fn no_space(
        &mut self,
        e: super::storage::StorageError,
        held: Option<Held>,
        commit: Option<u64>,
    ) -> Result<(), String> {
        if !e.is_no_space() {
            return Err(e.to_string());
        }
        let now = Instant::now();
        let b = self.blocked.get_or_insert_with(|| {
            tracing::error!(error = %e, "controller: out of space; not voting or proposing until a write succeeds");
            Blocked {
                since: now,
                error: String::new(),
                pause: NO_SPACE_RETRY_MIN,
                retry_at: now,
                held: None,
                commit: None,
            }
        });
        b.error = e.to_string();
        b.retry_at = now + b.pause;
        b.pause = (b.pause * 2).min(NO_SPACE_RETRY_MAX);
        if held.is_some() {
            b.held = held;
        }
        if commit.is_some() {
            b.commit = commit;
        }
        self.publish();
        Ok(())
    }

    /// A new cluster's first leader forms it (once per term: a proposal lost to a leader
    /// change is made again by the next leader).
    fn maybe_init(&mut self) {
        let term = self.node.raft.term;
        if self.node.raft.state == StateRole::Leader
            && self.meta.cluster_id.is_empty()
            && self.init_term != Some(term)
        {
            self.init_term = Some(term);
            let mut id = [0u8; 8];
            let _ = getrandom::fill(&mut id);
            let cmd = Command::Init {
                cluster_id: id.iter().map(|b| format!("{b:02x}")).collect(),
                members: self.members.clone(),
            };
            let (done, _ignored) = oneshot::channel();
            self.input(Input::Propose(cmd, done));
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            self.applied = e.index;
            if e.data.is_empty() || e.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            let result = match serde_json::from_slice::<Proposal>(&e.data) {
                Ok(p) => {
                    let r = self.meta.apply(&p.cmd).map_err(ProposeError::from);
                    if let Err(err) = &r {
                        tracing::debug!(error = %err, "controller: command refused");
                    }
                    Some((p.id, r))
                }
                Err(err) => {
                    // Every node skips it alike: the state machine stays the same everywhere.
                    tracing::error!(index = e.index, error = %err, "controller: undecodable entry skipped");
                    None
                }
            };
            if let Some((id, r)) = result {
                if let Some(done) = self.pending.remove(&id) {
                    let _ = done.send(r);
                }
            }
        }
    }

    fn publish(&self) {
        let leader = self.ids.get(&self.node.raft.leader_id).cloned();
        let state = State {
            meta: self.meta.clone(),
            applied: self.applied,
            term: self.node.raft.term,
            leader,
            failed: self.failed.clone(),
            no_space: self
                .blocked
                .as_ref()
                .map(|b| (b.error.clone(), b.since.elapsed())),
        };
        self.state.send_replace(Arc::new(state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::failover::LogReport;
    use crate::controller::meta::Policy;
    use std::collections::HashSet;
    use std::sync::{Mutex, Weak};

    /// Controllers of one process wired to each other; a node in `down` neither sends nor
    /// receives.
    #[derive(Default)]
    struct Mesh {
        nodes: Mutex<HashMap<NodeId, Weak<Controller>>>,
        down: Mutex<HashSet<NodeId>>,
    }

    struct Link {
        mesh: Arc<Mesh>,
        from: NodeId,
    }

    impl Transport for Link {
        fn send(&self, to: &NodeId, frame: Bytes) {
            let down = self.mesh.down.lock().unwrap();
            if down.contains(&self.from) || down.contains(to) {
                return;
            }
            drop(down);
            let target = self
                .mesh
                .nodes
                .lock()
                .unwrap()
                .get(to)
                .and_then(Weak::upgrade);
            if let Some(c) = target {
                c.deliver(&self.from, frame);
            }
        }
    }

    const IDS: [&str; 3] = ["a", "b", "c"];

    fn members() -> BTreeMap<NodeId, Member> {
        IDS.iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.to_string(),
                    Member {
                        raft_id: i as u64 + 1,
                        addr: format!("127.0.0.1:{}", 7001 + i),
                    },
                )
            })
            .collect()
    }

    fn start(mesh: &Arc<Mesh>, dir: &std::path::Path, id: &str) -> Arc<Controller> {
        let cfg = ControllerConfig {
            node_id: id.into(),
            members: members(),
            dir: dir.join(id),
            tick: Duration::from_millis(20),
            failover: Some(FailoverConfig {
                leader_timeout: Duration::from_millis(600),
                unclean: false,
            }),
        };
        let link = Arc::new(Link {
            mesh: mesh.clone(),
            from: id.into(),
        });
        let c = Arc::new(Controller::start(cfg, link).unwrap());
        mesh.nodes
            .lock()
            .unwrap()
            .insert(id.into(), Arc::downgrade(&c));
        c
    }

    /// Wait (up to 30 s) until `f` holds for the controller's state.
    fn until(c: &Controller, what: &str, f: impl Fn(&State) -> bool) -> Arc<State> {
        let t = Instant::now();
        loop {
            let s = c.state().borrow().clone();
            if f(&s) {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{}: {what}: {s:?}",
                c.node_id()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn create(c: &Controller) {
        rt().block_on(c.propose(
            Command::CreateLog {
                name: "l".into(),
                replicas: IDS.iter().map(|s| s.to_string()).collect(),
                leader: "a".into(),
                policy: Policy::SyncSet,
                epoch: 1,
                start: 0,
            },
            Duration::from_secs(10),
        ))
        .unwrap();
    }

    fn report(c: &Controller, end: u64) {
        c.report(NodeReport {
            node: c.node_id().into(),
            logs: vec![LogReport {
                log: "l".into(),
                epoch: 1,
                last_epoch: 1,
                end,
                commit: 10,
            }],
            heard_ms: BTreeMap::new(),
            sent_ms: 0,
            storage: None,
        });
    }

    #[test]
    fn a_cluster_forms_agrees_and_survives_a_restart_of_every_node() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = Arc::new(Mesh::default());
        let cs: Vec<_> = IDS.iter().map(|id| start(&mesh, dir.path(), id)).collect();
        let formed = until(&cs[0], "formed", |s| !s.meta.cluster_id.is_empty());
        // Proposed on any node, applied on every node.
        let follower = cs
            .iter()
            .find(|c| !c.state().borrow().is_leader(c.node_id()))
            .unwrap();
        create(follower);
        for c in &cs {
            let s = until(c, "log created", |s| s.meta.logs.contains_key("l"));
            assert_eq!(s.meta.cluster_id, formed.meta.cluster_id);
        }
        // A stale command is refused, and says so.
        let stale = rt().block_on(cs[1].propose(
            Command::SetSyncSet {
                log: "l".into(),
                epoch: 7,
                sync_set: vec![],
            },
            Duration::from_secs(10),
        ));
        assert!(
            matches!(
                stale,
                Err(ProposeError::Refused(Refusal::StaleEpoch { .. }))
            ),
            "{stale:?}"
        );
        let before = cs[0].state().borrow().meta.clone();
        drop(cs);
        mesh.nodes.lock().unwrap().clear();
        let cs: Vec<_> = IDS.iter().map(|id| start(&mesh, dir.path(), id)).collect();
        for c in &cs {
            // Restored from disk before any leader exists.
            assert_eq!(c.state().borrow().meta, before);
        }
        // And they carry on.
        until(&cs[0], "a leader after the restart", |s| s.leader.is_some());
    }

    #[test]
    fn a_silent_leader_is_replaced_and_a_minority_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = Arc::new(Mesh::default());
        let cs: Vec<_> = IDS.iter().map(|id| start(&mesh, dir.path(), id)).collect();
        until(&cs[0], "formed", |s| !s.meta.cluster_id.is_empty());
        create(&cs[0]);
        rt().block_on(cs[0].propose(
            Command::SetSyncSet {
                log: "l".into(),
                epoch: 1,
                sync_set: vec!["b".into()],
            },
            Duration::from_secs(10),
        ))
        .unwrap();
        // Nodes b and c keep reporting; a (the log's leader) falls silent and is cut off.
        mesh.down.lock().unwrap().insert("a".into());
        let t = Instant::now();
        let s = loop {
            report(&cs[1], 10);
            report(&cs[2], 12);
            let s = cs[1].state().borrow().clone();
            if s.meta.logs["l"].epoch == 2 {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no failover: {s:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let l = &s.meta.logs["l"];
        // b is in the sync set; c is ahead but not guaranteed to hold every acknowledged
        // append.
        assert_eq!(l.leader.as_deref(), Some("b"));
        assert_eq!(l.epochs, vec![(1, 0), (2, 10)]);
        // Now only c is left: no majority, no change.
        mesh.down.lock().unwrap().insert("b".into());
        let r = rt().block_on(cs[2].propose(
            Command::Depose {
                log: "l".into(),
                epoch: 2,
                reason: "test".into(),
            },
            Duration::from_secs(2),
        ));
        assert!(
            matches!(
                r,
                Err(ProposeError::Timeout(_)) | Err(ProposeError::NoLeader)
            ),
            "{r:?}"
        );
        assert_eq!(cs[2].state().borrow().meta.logs["l"].epoch, 2);
    }
}
