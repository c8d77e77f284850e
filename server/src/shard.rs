//! One shard: a thread with a tokio-uring runtime, its QUIC socket, and the logs it owns.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use log_core::{Epoch, Log, Offset};
use protocol::idempotence::{ProducerTable, StoredAppend};
use protocol::{LogInfo, LogReplication, Request};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::{NodeConfig, Role};
use crate::metrics::Metrics;
use crate::Error;

/// What every shard shares (read-only, or atomics).
pub(crate) struct Common {
    pub config: NodeConfig,
    pub node_id: String,
    pub shards: Vec<mpsc::Sender<ShardMsg>>,
    pub metrics: Arc<Metrics>,
    pub tokens: Vec<Vec<u8>>,
    pub started: Instant,
    /// This node's role for every log it holds.
    pub role: Role,
    /// Where clients reach this node (announced to the leader by a follower).
    pub advertise: std::net::SocketAddr,
    /// TLS towards peers: the client configuration to reach a leader, and the verifier of
    /// peer certificates.
    pub peer_client: quinn::ClientConfig,
    pub cluster: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// Logs open or being created on the node, over all shards (checked against `logs_max`).
    pub log_count: std::sync::atomic::AtomicUsize,
    /// The embedded controller, when the node runs one.
    pub control: Option<Arc<crate::controller::node::NodeController>>,
    /// What the background scrub found, for `status` (kept until the node stops).
    pub damaged: std::sync::Mutex<Vec<protocol::Damaged>>,
}

/// Messages between shards.
pub(crate) enum ShardMsg {
    /// A request for a log this shard owns, with the stream to answer on.
    Stream {
        req: Request,
        send: quinn::SendStream,
        /// The request side, for streams that carry more than one request (replication).
        recv: Option<quinn::RecvStream>,
    },
    /// Describe the logs this shard owns (and, on a leader, their replication).
    ListLogs(oneshot::Sender<(Vec<LogInfo>, Vec<LogReplication>)>),
    /// Close the endpoint and the logs, then answer.
    Shutdown(oneshot::Sender<Result<(), Error>>),
}

/// A log and the node-side state that goes with it.
pub(crate) struct LogEntry {
    pub log: Log,
    /// The epoch this node appends in. A leader starts a new epoch every time it opens the log,
    /// so records it lost in a crash (written, never durable) can never be confused with
    /// different records at the same offsets later.
    pub epoch: Epoch,
    pub producers: RefCell<ProducerTable>,
    pub role: EntryRole,
    /// Offset of the latest application snapshot stored here.
    pub snapshot: std::cell::Cell<Option<u64>>,
    /// Notified whenever the committed horizon may have moved (readers and tails wait on it).
    pub changed: Rc<Notify>,
    /// As a follower: the leader it follows (`None`: none for now; reads only).
    pub following: Option<std::net::SocketAddr>,
    /// Set (and notified) when the entry is taken out of service to change its role: its
    /// replication sessions end.
    pub retired: std::cell::Cell<bool>,
    pub retiring: Rc<Notify>,
    /// This copy is recovering (its `RECOVERING` marker exists; see [`follower::copy::RECOVERING_FILE`]).
    pub recovering: std::cell::Cell<bool>,
}

/// The role a log is installed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoleChoice {
    Standalone,
    /// Lead in a new epoch of its own (fixed roles: last epoch + 1).
    LeadNewEpoch,
    /// Lead in this epoch, given by the controller.
    Lead(Epoch),
    /// Follow this leader, or none for now.
    Follow(Option<std::net::SocketAddr>),
}

/// What the node does for one log.
pub(crate) enum EntryRole {
    Standalone,
    Leader(Rc<crate::leader::Replication>),
    /// Following: the leader's commit offset as the last frame brought it.
    Follower(Rc<std::cell::Cell<u64>>),
}

impl LogEntry {
    pub fn leading(&self) -> Option<Rc<crate::leader::Replication>> {
        match &self.role {
            EntryRole::Leader(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// What readers see: the flushed horizon on a standalone node, the commit offset on a
    /// leader, and on a follower the leader's commit offset as far as it is durable here.
    pub fn committed(&self) -> Offset {
        match &self.role {
            EntryRole::Standalone => self.log.flush_offset(),
            EntryRole::Leader(r) => r.commit().min(self.log.flush_offset()),
            EntryRole::Follower(c) => Offset(protocol::replication::readable(
                c.get(),
                self.log.flush_offset().0,
            )),
        }
    }
}

/// The shard-local state, shared by the tasks of one thread.
pub(crate) struct Shard {
    pub id: usize,
    pub common: Arc<Common>,
    pub logs: RefCell<BTreeMap<String, Rc<LogEntry>>>,
    /// Names being created right now (their directory may exist before the log is open).
    pub creating: RefCell<std::collections::BTreeSet<String>>,
    pub closing: std::cell::Cell<bool>,
    /// Logs whose local storage failed and that are being reopened (`replog_logs_failed`).
    pub failed_logs: RefCell<std::collections::BTreeSet<String>>,
}

/// How far back from the end of a log the producer table is rebuilt at open: the last
/// `PRODUCER_SCAN_SEGMENTS` segments. An idempotent retry of an append older than that is
/// stored again (its original receipt is no longer known).
pub(crate) const PRODUCER_SCAN_SEGMENTS: usize = 2;

/// Whether this node's copy of `log` is recovering (see [`follower::copy::RECOVERING_FILE`]).
pub(crate) fn recovering(data_dir: &std::path::Path, log: &str) -> bool {
    follower::copy::is_recovering(&data_dir.join("logs").join(log))
}

/// The retention pin that keeps every record after a log's latest application snapshot.
pub(crate) const SNAPSHOT_PIN: &str = "snapshot";

impl Shard {
    pub fn logs_dir(&self) -> PathBuf {
        self.common.config.node.data_dir.join("logs")
    }

    pub fn snapshots_dir(&self, log: &str) -> PathBuf {
        crate::snapshots::dir(&self.common.config.node.data_dir, log)
    }

    pub fn get(&self, name: &str) -> Option<Rc<LogEntry>> {
        self.logs.borrow().get(name).cloned()
    }

    /// Open an existing log (at start) or create one, and rebuild its producer table.
    pub async fn open_log(self: &Rc<Self>, name: &str) -> Result<Rc<LogEntry>, Error> {
        let log = Log::open(self.logs_dir().join(name), self.common.config.log_config()).await?;
        self.install(name, log)
    }

    /// The role `log` should have here: what the controller has on record, or, for a log it
    /// does not know (or without a controller), the configured role. `current` is the entry
    /// the log is in service as, if it is.
    pub fn choose_role(&self, name: &str, log: &Log, current: Option<&LogEntry>) -> RoleChoice {
        if let Some(control) = &self.common.control {
            if let Some(r) = control.log_record(name) {
                let last = log.last_epoch().map_or(0, |e| e.0);
                let leading_in = current.filter(|e| e.leading().is_some()).map(|e| e.epoch.0);
                let recovering = match current {
                    Some(e) => e.recovering.get(),
                    None => recovering(&self.common.config.node.data_dir, name),
                };
                return match node_core::log::choose_role(
                    &self.common.node_id,
                    &r,
                    last,
                    leading_in,
                    recovering,
                ) {
                    node_core::log::Role::Lead(e) => RoleChoice::Lead(Epoch(e)),
                    node_core::log::Role::Follow(None) => RoleChoice::Follow(None),
                    node_core::log::Role::Follow(Some(l)) => {
                        RoleChoice::Follow(control.member_addr(&l))
                    }
                };
            }
        }
        match self.common.role {
            Role::Standalone => RoleChoice::Standalone,
            Role::Leader => RoleChoice::LeadNewEpoch,
            Role::Follower(a) => RoleChoice::Follow(Some(a)),
        }
    }

    /// Whether `role` is what `entry` already is.
    pub fn is_in_role(entry: &LogEntry, role: RoleChoice) -> bool {
        match (role, &entry.role) {
            (RoleChoice::Standalone, EntryRole::Standalone) => true,
            (RoleChoice::LeadNewEpoch, EntryRole::Leader(_)) => true,
            (RoleChoice::Lead(e), EntryRole::Leader(_)) => entry.epoch == e,
            (RoleChoice::Follow(a), EntryRole::Follower(_)) => entry.following == a,
            _ => false,
        }
    }

    /// The followers of `name` when this node leads it: the controller's replicas, or the
    /// configured followers.
    pub fn followers_of(&self, name: &str) -> Vec<String> {
        match self
            .common
            .control
            .as_ref()
            .and_then(|c| c.log_record(name))
        {
            Some(r) => r
                .replicas
                .into_iter()
                .filter(|id| *id != self.common.node_id)
                .collect(),
            None => self.common.config.replication.followers.clone(),
        }
    }

    /// The logs in service now, by name (a copy: the caller may await while going through it).
    pub fn entries(&self) -> Vec<(String, Rc<LogEntry>)> {
        self.logs
            .borrow()
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect()
    }

    /// Note that log `name`'s local storage failed (`true`) or works again (`false`).
    pub fn note_failed(&self, name: &str, failed: bool) {
        let changed = if failed {
            self.failed_logs.borrow_mut().insert(name.to_string())
        } else {
            self.failed_logs.borrow_mut().remove(name)
        };
        if changed {
            let gauge = &self.common.metrics.c.logs_failed;
            if failed {
                gauge.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                gauge.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Where writes to `name` should go, for a `not_leader` answer (empty if unknown).
    pub fn leader_hint(&self, name: Option<&str>) -> String {
        if let (Some(control), Some(name)) = (&self.common.control, name) {
            if let Some(r) = control.log_record(name) {
                // A node that answers `not_leader` while the record names it has lost the
                // controller (or is handing the log over): the record is stale, and naming
                // itself would send the client straight back. It names nobody; the client
                // asks the other nodes.
                return r
                    .leader
                    .filter(|l| *l != self.common.node_id)
                    .and_then(|l| control.member_addr(&l))
                    .map_or(String::new(), |a| a.to_string());
            }
        }
        match self.common.role {
            Role::Follower(a) => a.to_string(),
            _ => String::new(),
        }
    }

    /// Take `log` into service under `name`, in the role it should have here.
    pub fn install(self: &Rc<Self>, name: &str, log: Log) -> Result<Rc<LogEntry>, Error> {
        let role = self.choose_role(name, &log, None);
        self.install_as(name, log, role)
    }

    /// Take `log` into service under `name` as `role`.
    pub fn install_as(
        self: &Rc<Self>,
        name: &str,
        log: Log,
        choice: RoleChoice,
    ) -> Result<Rc<LogEntry>, Error> {
        let last = log.last_epoch().map_or(0, |e| e.0);
        let changed = Rc::new(Notify::new());
        let lead = match choice {
            RoleChoice::LeadNewEpoch => Some(Epoch(last + 1)),
            RoleChoice::Lead(e) => Some(e),
            _ => None,
        };
        let (epoch, role) = match (choice, lead) {
            (RoleChoice::Standalone, _) => (Epoch(last.max(1)), EntryRole::Standalone),
            (_, Some(epoch)) => {
                log.begin_epoch(epoch)?;
                let repl = crate::leader::Replication::new(
                    &self.common.node_id,
                    self,
                    name,
                    &log,
                    changed.clone(),
                );
                (epoch, EntryRole::Leader(Rc::new(repl)))
            }
            (_, None) => (
                Epoch(last),
                EntryRole::Follower(Rc::new(std::cell::Cell::new(0))),
            ),
        };
        let following = match choice {
            RoleChoice::Follow(a) => a,
            _ => None,
        };
        let mut producers = ProducerTable::new(self.common.config.limits.producers_per_log_max);
        rebuild_producers(&log, &mut producers)?;
        let snapshot = crate::snapshots::latest(&self.snapshots_dir(name))?;
        if let Some(o) = snapshot {
            log.pin(SNAPSHOT_PIN, Offset(o));
        }
        let entry = Rc::new(LogEntry {
            log,
            epoch,
            producers: RefCell::new(producers),
            role,
            snapshot: std::cell::Cell::new(snapshot),
            changed,
            following,
            retired: Default::default(),
            retiring: Default::default(),
            recovering: std::cell::Cell::new(recovering(&self.common.config.node.data_dir, name)),
        });
        self.logs
            .borrow_mut()
            .insert(name.to_string(), entry.clone());
        if entry.leading().is_some() {
            tokio_uring::spawn(crate::leader::drive(
                self.clone(),
                name.to_string(),
                entry.clone(),
            ));
        } else {
            tokio_uring::spawn(watch_flush(self.clone(), entry.clone()));
        }
        Ok(entry)
    }

    pub fn describe(&self) -> (Vec<LogInfo>, Vec<LogReplication>) {
        let logs = self.logs.borrow();
        let info = logs
            .iter()
            .map(|(name, e)| LogInfo {
                name: name.clone(),
                start: e.log.start_offset().0,
                end: e.log.next_offset().0,
                committed: e.committed().0,
                flushed: e.log.flush_offset().0,
                epoch: match e.role {
                    EntryRole::Follower(_) => e.log.last_epoch().map_or(0, |x| x.0),
                    _ => e.epoch.0,
                },
                disk_bytes: e.log.disk_bytes(),
                snapshot: e.snapshot.get(),
            })
            .collect();
        let repl = logs
            .iter()
            .filter_map(|(name, e)| Some(e.leading()?.status(name, &e.log)))
            .collect();
        (info, repl)
    }
}

/// Wake a log's readers whenever its flushed horizon moves (standalone and follower logs; a
/// leader's [`crate::leader::drive`] does this and more).
async fn watch_flush(shard: Rc<Shard>, entry: Rc<LogEntry>) {
    let log = &entry.log;
    loop {
        let flushed = log.flush_offset();
        let r = if log.next_offset() > flushed {
            log.wait_flushed(flushed.plus(1)).await
        } else {
            log.wait_appended(flushed).await
        };
        if r.is_err() || shard.closing.get() {
            return;
        }
        entry.changed.notify_waiters();
    }
}

/// Replay the producer metadata of the last segments into `table`.
fn rebuild_producers(log: &Log, table: &mut ProducerTable) -> Result<(), Error> {
    let bases = log.segment_bases();
    let mut pos = bases
        .len()
        .checked_sub(PRODUCER_SCAN_SEGMENTS)
        .map_or(log.start_offset(), |i| bases[i]);
    let end = log.end_offset();
    while pos < end {
        let read = log.read(pos, end, 4 << 20)?;
        if read.batches.is_empty() {
            break;
        }
        for b in &read.batches {
            let view = b.view();
            if let Some(p) = view.producer() {
                let h = view.header();
                table.record(
                    p.producer_id.get(),
                    p.first_sequence,
                    h.record_count(),
                    StoredAppend {
                        first: h.base_offset().0,
                        next: h.next_offset().0,
                        epoch: h.epoch().0,
                    },
                );
            }
        }
        pos = read.next_offset;
    }
    Ok(())
}

/// Names of the logs under `dir` that shard `id` of `shards` owns.
fn owned_logs(dir: &std::path::Path, id: usize, shards: usize) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(crate::io(format!("read {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(crate::io(format!("read {}", dir.display())))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if entry.path().is_dir()
            && log_core::validate_log_name(&name).is_ok()
            && crate::shard_of(&name, shards) == id
        {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The shard thread's body.
pub(crate) fn run(
    id: usize,
    common: Arc<Common>,
    socket: std::net::UdpSocket,
    (endpoint_config, server_config): (quinn::EndpointConfig, quinn::ServerConfig),
    mut rx: mpsc::Receiver<ShardMsg>,
    ready: std::sync::mpsc::Sender<Result<(), Error>>,
) {
    tokio_uring::start(async move {
        let shard = Rc::new(Shard {
            id,
            common: common.clone(),
            logs: RefCell::new(BTreeMap::new()),
            creating: RefCell::new(Default::default()),
            failed_logs: RefCell::new(Default::default()),
            closing: std::cell::Cell::new(false),
        });
        let opened: Result<(), Error> = async {
            for name in owned_logs(&shard.logs_dir(), id, common.shards.len())? {
                shard.open_log(&name).await?;
                common
                    .log_count
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        }
        .await;
        let endpoint = match opened.and_then(|()| {
            quinn::Endpoint::new(
                endpoint_config,
                Some(server_config),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(crate::io("QUIC endpoint"))
        }) {
            Ok(ep) => ep,
            Err(e) => {
                let _ = ready.send(Err(e));
                close_logs(&shard).await.ok();
                return;
            }
        };
        let _ = ready.send(Ok(()));
        if common.config.log.scrub_bytes_per_sec > 0 {
            tokio_uring::spawn(crate::scrub::run(shard.clone()));
        }
        if let Some(policy) = common.config.retention() {
            tokio_uring::spawn(retention(shard.clone(), policy));
        }
        if common.control.is_some() {
            tokio_uring::spawn(crate::follow::steer(shard.clone()));
        } else if let Role::Follower(leader) = common.role {
            tokio_uring::spawn(crate::follow::run(shard.clone(), leader));
        }

        let accept = {
            let shard = shard.clone();
            let endpoint = endpoint.clone();
            tokio_uring::spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    tokio_uring::spawn(crate::conn::handle_incoming(shard.clone(), incoming));
                }
            })
        };

        let done = loop {
            match rx.recv().await {
                Some(ShardMsg::Stream { req, send, recv }) => {
                    tokio_uring::spawn(crate::service::serve(shard.clone(), req, send, recv));
                }
                Some(ShardMsg::ListLogs(reply)) => {
                    let _ = reply.send(shard.describe());
                }
                Some(ShardMsg::Shutdown(reply)) => break Some(reply),
                None => break None,
            }
        };
        shard.closing.set(true);
        endpoint.close(protocol::close_code::NORMAL.into(), b"shutting down");
        accept.abort();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
        let result = close_logs(&shard).await;
        if let Some(reply) = done {
            let _ = reply.send(result);
        }
    });
}

/// Apply the retention policy to every log of the shard, every `log.retention_check_ms`.
async fn retention(shard: Rc<Shard>, policy: log_core::RetentionPolicy) {
    let every = std::time::Duration::from_millis(shard.common.config.log.retention_check_ms);
    while !shard.closing.get() {
        tokio::time::sleep(every).await;
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let logs = shard.entries();
        for (name, e) in logs {
            let cap = shard.common.config.replication.retention_pin_bytes_max;
            if let Some(repl) = e.leading() {
                repl.release_far_pins(&name, &e.log, cap);
            }
            if let Some(o) = e.snapshot.get() {
                if e.log.bytes_from(Offset(o)).unwrap_or(0) > cap {
                    e.log.unpin(SNAPSHOT_PIN);
                }
            }
            let before = e.log.start_offset();
            match e.log.apply_retention(&policy, now_us) {
                Ok(start) if start > before => {
                    tracing::info!(log = %name, start = start.0, "retention moved the log start");
                }
                Ok(_) => {}
                Err(err) => tracing::error!(log = %name, error = %err, "retention failed"),
            }
        }
    }
}

async fn close_logs(shard: &Shard) -> Result<(), Error> {
    let logs = std::mem::take(&mut *shard.logs.borrow_mut());
    let mut first = Ok(());
    for (name, entry) in logs {
        // Closing writes and flushes what is queued, and refuses further appends from request
        // tasks that may still hold the log (they answer shutting_down).
        if let Err(e) = entry.log.clone().close().await {
            tracing::error!(log = %name, error = %e, "closing log failed");
            if first.is_ok() {
                first = Err(e.into());
            }
        }
    }
    first
}
