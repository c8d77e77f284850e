//! The controller's driver: one [`ControllerCore`] per node (`node_core`), run on a thread of
//! its own. It feeds the core frames from the transport, this node's reports, proposals and
//! ticks, with the node's clock ([`now_ms`]); persists through [`DiskStorage`] (the core
//! writes before anything it wrote is acknowledged); sends what the core queues through a
//! [`Transport`]; answers proposals as they apply; and publishes the state after every change.
//!
//! Messages to other nodes go through the transport: best effort, in any order, possibly
//! lost; Raft retries what matters.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use node_core::controller::core::{ControllerCore, CoreConfig, RaftStore, StoreError};
use tokio::sync::{mpsc, oneshot, watch};

pub use node_core::controller::core::{
    ProposeError, StartError, ELECTION_TICKS, HEARTBEAT_TICKS, NO_SPACE_RETRY_MAX,
    NO_SPACE_RETRY_MIN,
};

use super::failover::{FailoverConfig, NodeReport};
use super::meta::{ClusterMeta, Command, Member, NodeId};
use super::storage::{DiskStorage, StorageError};

/// The node's clock for the controller, in ms: the wall clock when the process first asked,
/// advanced by the monotonic clock since (so it never jumps back, and its figures read as
/// times of day). Leases, reports and failure detection are measured on it.
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, wall) = ORIGIN.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (Instant::now(), wall)
    });
    wall + at.elapsed().as_millis() as u64
}

fn store_error(e: StorageError) -> StoreError {
    StoreError::new(e.is_no_space(), e)
}

impl RaftStore for DiskStorage {
    fn append(&mut self, entries: &[raft::prelude::Entry]) -> Result<(), StoreError> {
        DiskStorage::append(self, entries).map_err(store_error)
    }
    fn set_hardstate(&mut self, hs: raft::prelude::HardState) -> Result<(), StoreError> {
        DiskStorage::set_hardstate(self, hs).map_err(store_error)
    }
    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        DiskStorage::set_commit(self, commit).map_err(store_error)
    }
    fn apply_snapshot(&mut self, snap: raft::prelude::Snapshot) -> Result<(), StoreError> {
        DiskStorage::apply_snapshot(self, snap).map_err(store_error)
    }
    fn compact(
        &mut self,
        index: u64,
        data: Vec<u8>,
        conf: raft::prelude::ConfState,
    ) -> Result<(), StoreError> {
        DiskStorage::compact(self, index, data, conf).map_err(store_error)
    }
    fn entries_since_snapshot(&self) -> u64 {
        DiskStorage::entries_since_snapshot(self)
    }
    fn snapshot_data(&self) -> Option<(u64, Vec<u8>)> {
        DiskStorage::snapshot_data(self)
    }
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

enum Input {
    Net(NodeId, Bytes),
    Report(NodeReport),
    Propose(Command, oneshot::Sender<Result<(), ProposeError>>),
    Stop,
}

/// A running controller.
pub struct Controller {
    me: NodeId,
    /// The core's `contact_ms` (0: none yet), as of its last change.
    contact_ms: Arc<AtomicU64>,
    /// The core's `peers_ms`, as of its last change.
    peers_ms: Arc<Mutex<BTreeMap<NodeId, u64>>>,
    tx: mpsc::UnboundedSender<Input>,
    state: watch::Receiver<Arc<State>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Why [`Controller::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartFail {
    #[error(transparent)]
    Core(#[from] StartError),
    #[error("controller storage: {0}")]
    Storage(#[from] StorageError),
    #[error("cannot start the controller thread: {0}")]
    Thread(std::io::Error),
}

impl Controller {
    /// Open the Raft state in `cfg.dir` and start the driver thread.
    pub fn start(
        cfg: ControllerConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Controller, StartFail> {
        let voters: Vec<u64> = cfg.members.values().map(|m| m.raft_id).collect();
        if !cfg.members.contains_key(&cfg.node_id) {
            return Err(StartError::NotAMember(cfg.node_id.clone()).into());
        }
        let storage = DiskStorage::open(&cfg.dir, &voters)?;
        let mut id = [0u8; 8];
        let _ = getrandom::fill(&mut id);
        let core = ControllerCore::new(
            CoreConfig {
                node_id: cfg.node_id.clone(),
                members: cfg.members.clone(),
                failover: cfg.failover,
                election_ticks: ELECTION_TICKS,
                cluster_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            },
            storage,
            now_ms(),
        )?;
        let (tx, rx) = mpsc::unbounded_channel();
        let contact_ms = Arc::new(AtomicU64::new(0));
        let peers_ms = Arc::new(Mutex::new(BTreeMap::new()));
        let (state_tx, state) = watch::channel(Arc::new(State::default()));
        let driver = Driver {
            core,
            transport,
            pending: HashMap::new(),
            state: state_tx,
            contact_ms: contact_ms.clone(),
            peers_ms: peers_ms.clone(),
        };
        driver.publish();
        let tick = cfg.tick;
        let thread = std::thread::Builder::new()
            .name(format!("controller-{}", cfg.node_id))
            .spawn(move || driver.run(rx, tick))
            .map_err(StartFail::Thread)?;
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

    /// When this node's latest round trip with the controller leader began (on [`now_ms`]'s
    /// clock): a node cut off in either direction sees it age. `None`: it has had none since it
    /// started.
    pub fn contact_ms(&self) -> Option<u64> {
        let at = self.contact_ms.load(Ordering::Relaxed);
        (at > 0).then_some(at)
    }

    /// How long ago [`Controller::contact_ms`] was.
    pub fn since_contact(&self) -> Option<Duration> {
        self.contact_ms()
            .map(|at| Duration::from_millis(now_ms().saturating_sub(at)))
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
    core: ControllerCore<DiskStorage>,
    transport: Arc<dyn Transport>,
    /// Proposals of this node waiting for their outcome, by the core's id.
    pending: HashMap<u64, oneshot::Sender<Result<(), ProposeError>>>,
    state: watch::Sender<Arc<State>>,
    contact_ms: Arc<AtomicU64>,
    peers_ms: Arc<Mutex<BTreeMap<NodeId, u64>>>,
}

impl Driver {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>, tick: Duration) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "controller: no runtime");
                return;
            }
        };
        rt.block_on(async move {
            let mut next_tick = Instant::now() + tick;
            while self.core.failed().is_none() {
                tokio::select! {
                    input = rx.recv() => match input {
                        None | Some(Input::Stop) => break,
                        Some(i) => self.input(i),
                    },
                    _ = tokio::time::sleep_until(next_tick.into()) => {
                        self.core.tick(now_ms());
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
                let _ = self.core.process(now_ms());
                self.flush();
            }
        });
    }

    fn input(&mut self, input: Input) {
        let now = now_ms();
        match input {
            Input::Net(from, frame) => self.core.receive(now, &from, &frame),
            Input::Report(r) => self.core.report(now, r),
            Input::Propose(cmd, done) => match self.core.propose(cmd) {
                Ok(id) => {
                    self.pending.insert(id, done);
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                }
            },
            Input::Stop => {}
        }
    }

    /// Send what the core queued, answer proposals that applied, publish the state.
    fn flush(&mut self) {
        for (to, frame) in self.core.take_outbox() {
            self.transport.send(&to, Bytes::from(frame));
        }
        for (id, outcome) in self.core.take_outcomes() {
            if let Some(done) = self.pending.remove(&id) {
                let _ = done.send(outcome);
            }
        }
        if self.core.failed().is_some() {
            for (_, p) in self.pending.drain() {
                let _ = p.send(Err(ProposeError::Stopped));
            }
        }
        self.contact_ms
            .store(self.core.contact_ms().unwrap_or(0), Ordering::Relaxed);
        {
            let mut peers = self.peers_ms.lock().unwrap_or_else(|p| p.into_inner());
            if *peers != *self.core.peers_ms() {
                peers.clone_from(self.core.peers_ms());
            }
        }
        if self.core.take_changed() {
            self.publish();
        }
    }

    fn publish(&self) {
        let now = now_ms();
        let state = State {
            meta: self.core.meta().clone(),
            applied: self.core.applied(),
            term: self.core.term(),
            leader: self.core.leader().cloned(),
            failed: self.core.failed().map(|h| h.to_string()),
            no_space: self.core.no_space().map(|(e, since)| {
                (
                    e.to_string(),
                    Duration::from_millis(now.saturating_sub(since)),
                )
            }),
        };
        self.state.send_replace(Arc::new(state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::failover::LogReport;
    use crate::controller::meta::{Policy, Refusal};
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
                recovering: false,
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
