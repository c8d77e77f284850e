//! The controller inside a `replog node`: started by the node through
//! [`crate::controller::ControlFactory`] once it knows its id and TLS configuration, fed the
//! node's log states every two ticks, and answering for the controller part of `status`.
//!
//! The node steers each log by the records this controller serves
//! ([`NodeController::log_record`]), leads only while [`NodeController::lease_ok`], and asks
//! for what the node's rules decide ([`NodeController::propose`]: a new epoch after a restart,
//! a withdrawal, a sync set, a transfer's completion); the controller's leader fails logs over
//! when their leaders go silent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{ControlContext, ControlError, ControlFactory, LogRecord};
use crate::NodeConfig;
use bytes::Bytes;

use super::driver::{Controller, ControllerConfig};
use super::failover::{FailoverConfig, LogReport, NodeReport};
use super::meta::{Command, Member, Policy};
use super::transport::QuicTransport;

/// The node's controller: the running [`Controller`], as the node sees it.
pub struct NodeController {
    pub controller: Controller,
    addrs: HashMap<String, std::net::SocketAddr>,
    leader_timeout: Duration,
}

impl NodeController {
    /// A frame from the controller of node `from` (its certificate has been checked).
    pub fn deliver(&self, from: &str, frame: Bytes) {
        self.controller.deliver(from, frame);
    }

    /// What the controller has on record for `log` (`None`: not registered).
    pub fn log_record(&self, log: &str) -> Option<LogRecord> {
        let s = self.controller.state();
        let s = s.borrow();
        s.meta.logs.get(log).map(LogRecord::of)
    }

    /// Every log the controller knows.
    pub fn logs(&self) -> Vec<(String, LogRecord)> {
        let s = self.controller.state();
        let s = s.borrow();
        s.meta
            .logs
            .iter()
            .map(|(n, l)| (n.clone(), LogRecord::of(l)))
            .collect()
    }

    /// Where member `id` is reached.
    pub fn member_addr(&self, id: &str) -> Option<std::net::SocketAddr> {
        self.addrs.get(id).copied()
    }

    /// Whether this node has heard from the controller's leader (or led it with its members'
    /// answers) recently enough to keep leading logs: within half of `leader_timeout`, well
    /// before the controller would replace it.
    pub fn lease_ok(&self) -> bool {
        node_core::controller::core::lease_holds(
            self.controller.contact_ms(),
            super::driver::now_ms(),
            self.leader_timeout,
            self.controller.state().borrow().no_space.is_some(),
        )
    }

    /// Whether the controller's storage is out of space now (it neither votes nor proposes
    /// until a write succeeds again), for the `replog_controller_no_space` gauge.
    pub fn no_space(&self) -> bool {
        self.controller.state().borrow().no_space.is_some()
    }

    /// Ask the controller to move the leadership of `log` (in `epoch`) to `to` once `to` has
    /// caught up; the leader takes no writes meanwhile.
    pub fn transfer(&self, log: &str, epoch: u64, to: &str) {
        let since_ms = super::driver::now_ms();
        self.controller.submit(Command::BeginTransfer {
            log: log.to_string(),
            epoch,
            to: to.to_string(),
            since_ms,
        });
    }

    /// Propose `cmd` to the controller, as the node's rules decide it (`node_core::log`: a
    /// renewed epoch, a withdrawal, a sync set, a transfer's completion). There is no answer:
    /// [`NodeController::log_record`] shows the outcome (a command naming an epoch that is no
    /// longer current changes nothing).
    pub fn propose(&self, cmd: Command) {
        self.controller.submit(cmd);
    }

    /// The controller's view, for `status`.
    pub fn status(&self) -> protocol::ControllerStatus {
        let s = self.controller.state().borrow().clone();
        let reachable = self.controller.reachable(self.leader_timeout);
        protocol::ControllerStatus {
            cluster_id: s.meta.cluster_id.clone(),
            leader: s.leader.clone().unwrap_or_default(),
            term: s.term,
            applied: s.applied,
            members: s
                .meta
                .members
                .iter()
                .map(|(id, m)| format!("{id}={}", m.addr))
                .collect(),
            logs: s
                .meta
                .logs
                .iter()
                .map(|(name, l)| protocol::ControlledLog {
                    log: name.clone(),
                    leader: l.leader.clone().unwrap_or_default(),
                    epoch: l.epoch,
                    sync_set: l.sync_set.clone(),
                    no_leader: l.no_leader.clone().unwrap_or_default(),
                    transfer_to: l.transfer.as_ref().map_or(String::new(), |t| t.to.clone()),
                    unclean_elections: l.unclean.len() as u32,
                })
                .collect(),
            reachable: reachable.clone(),
            problem: problem(
                &s,
                &reachable,
                self.leader_timeout,
                self.controller.since_contact(),
            ),
        }
    }
}

/// Why the controller cannot act, as `status` shows it; empty when it has a leader.
fn problem(
    s: &super::driver::State,
    reachable: &[String],
    leader_timeout: Duration,
    since_contact: Option<Duration>,
) -> String {
    if let Some(e) = &s.failed {
        return format!("this node's controller stopped: {e}");
    }
    if let Some((e, since)) = &s.no_space {
        return format!(
            "this node's controller storage is out of space ({e}) for {:.1} s: it neither votes \
             nor proposes and takes no writes; it tries again every few seconds and resumes by \
             itself once space is freed",
            since.as_secs_f64()
        );
    }
    if let Some(leader) = &s.leader {
        if since_contact.is_some_and(|d| d < leader_timeout / 2) {
            return String::new();
        }
        let me = s.meta.members.len() > 1 && reachable.len() < s.meta.members.len() / 2 + 1;
        return format!(
            "this node has had no round trip with the controller's leader ({leader}) {} (lease: \
             half of leader_timeout {leader_timeout:?}){}: it takes no writes, and its view of \
             the controller's records may be out of date",
            match since_contact {
                Some(d) => format!("for {:.1} s", d.as_secs_f64()),
                None => "since it started".to_string(),
            },
            if me {
                format!(
                    "; it hears {} of {} members",
                    reachable.len(),
                    s.meta.members.len()
                )
            } else {
                String::new()
            }
        );
    }
    let n = s.meta.members.len().max(1);
    let majority = n / 2 + 1;
    let unreachable: Vec<&str> = s
        .meta
        .members
        .keys()
        .filter(|m| !reachable.contains(m))
        .map(String::as_str)
        .collect();
    let why = if reachable.len() < majority {
        format!(
            "{} of {n} members reachable within leader_timeout ({leader_timeout:?}), {majority} \
             needed; unreachable: {}",
            reachable.len(),
            unreachable.join(", ")
        )
    } else {
        "an election is under way".to_string()
    };
    format!(
        "no controller leader ({why}): no failover, leadership or sync-set change can happen, \
         and leaders stop acknowledging appends once their lease lapses"
    )
}

/// The file in the data dir, beside `node-id`, that ties it to its cluster (R7): written once
/// the controller knows the cluster's id, checked at every start.
pub const CLUSTER_ID_FILE: &str = "cluster-id";

/// The cluster id recorded in `data_dir`, if any.
fn recorded_cluster_id(data_dir: &std::path::Path) -> Result<Option<String>, ControlError> {
    let path = data_dir.join(CLUSTER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ControlError::ReadClusterId { path, source }),
    }
}

/// Refuse a data dir that belongs to another cluster, or whose controller state is gone while
/// it says it belonged to one (wiped or restored: it would vote without remembering what it
/// voted for). `meta_id` is the cluster id in the controller state found at start (empty: none).
pub fn check_cluster_id(data_dir: &std::path::Path, meta_id: &str) -> Result<(), ControlError> {
    let file = data_dir.join(CLUSTER_ID_FILE);
    match recorded_cluster_id(data_dir)? {
        Some(recorded) if meta_id.is_empty() => Err(ControlError::StateMissing {
            recorded,
            file,
            state: data_dir.join("controller"),
        }),
        Some(recorded) if recorded != meta_id => Err(ControlError::OtherCluster {
            recorded,
            found: meta_id.to_string(),
            file,
        }),
        Some(_) => Ok(()),
        None if meta_id.is_empty() => Ok(()),
        None => record_cluster_id(data_dir, meta_id),
    }
}

/// Write the cluster id into the data dir (atomically, durably).
fn record_cluster_id(data_dir: &std::path::Path, id: &str) -> Result<(), ControlError> {
    super::storage::write_atomic(data_dir, CLUSTER_ID_FILE, format!("{id}\n").as_bytes())
        .map_err(ControlError::RecordClusterId)
}

/// The members of `cfg` as the controller numbers them (Raft id = position + 1).
pub fn members(cfg: &NodeConfig) -> Result<BTreeMap<String, Member>, ControlError> {
    Ok(cfg
        .controller
        .member_list()
        .map_err(|e| ControlError::Members(Box::new(e)))?
        .into_iter()
        .enumerate()
        .map(|(i, (id, addr))| {
            (
                id,
                Member {
                    raft_id: i as u64 + 1,
                    addr: addr.to_string(),
                },
            )
        })
        .collect())
}

/// The factory the node calls, and the slot where the started controller is left for the
/// caller (to feed it the node's log states).
pub fn factory(cfg: &NodeConfig) -> (ControlFactory, Arc<Mutex<Option<Arc<NodeController>>>>) {
    let slot: Arc<Mutex<Option<Arc<NodeController>>>> = Arc::default();
    let keep = slot.clone();
    let cfg = cfg.clone();
    let make: ControlFactory = Box::new(move |ctx: ControlContext| {
        let members = members(&cfg)?;
        let addrs: HashMap<String, std::net::SocketAddr> = members
            .iter()
            .filter_map(|(id, m)| Some((id.clone(), m.addr.parse().ok()?)))
            .collect();
        let bind = std::net::SocketAddr::new(ctx.local_addr.ip(), 0);
        let transport =
            QuicTransport::start(ctx.node_id.clone(), addrs.clone(), ctx.peer_client, bind)?;
        let leader_timeout = Duration::from_millis(cfg.controller.leader_timeout_ms);
        let controller = Controller::start(
            ControllerConfig {
                node_id: ctx.node_id,
                members,
                dir: cfg.node.data_dir.join("controller"),
                tick: Duration::from_millis(cfg.controller.tick_ms),
                failover: Some(FailoverConfig {
                    leader_timeout,
                    unclean: cfg.controller.unclean_failover,
                }),
            },
            Arc::new(transport),
        )?;
        let found = controller.state().borrow().meta.cluster_id.clone();
        if let Err(e) = check_cluster_id(&cfg.node.data_dir, &found) {
            controller.stop();
            return Err(e);
        }
        let nc = Arc::new(NodeController {
            controller,
            addrs,
            leader_timeout,
        });
        *keep.lock().unwrap() = Some(nc.clone());
        Ok(nc)
    });
    (make, slot)
}

/// Every two ticks, until the node stops: report the node's logs to the controller leader,
/// and, on the configured leader, register the logs the metadata does not know yet.
pub fn run_reports(node: crate::NodeHandle, nc: Arc<NodeController>, cfg: NodeConfig) {
    let every = Duration::from_millis(cfg.controller.tick_ms * 2);
    let leading = cfg.role() == crate::config::Role::Leader;
    let policy = if cfg.replication.sync_replicas > 0 {
        Policy::SyncSet
    } else {
        Policy::Majority
    };
    let me = nc.controller.node_id().to_string();
    let data_dir = cfg.node.data_dir.clone();
    let replicas: Vec<String> = cfg
        .controller
        .member_list()
        .map(|l| l.into_iter().map(|(id, _)| id).collect())
        .unwrap_or_default();
    std::thread::Builder::new()
        .name("controller-reports".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let mut id_recorded = false;
                loop {
                    tokio::time::sleep(every).await;
                    let asked = std::time::Instant::now();
                    let Some(logs) = node.logs().await else {
                        return; // the node has stopped
                    };
                    // (The first listing waits for the shards to start.)
                    if id_recorded && asked.elapsed() > every * 5 {
                        tracing::warn!(took = ?asked.elapsed(), "controller: listing the logs for a report was slow");
                    }
                    nc.controller.report(NodeReport {
                        node: me.clone(),
                        logs: logs
                            .iter()
                            .map(|l| LogReport {
                                recovering: crate::layout::recovering(&data_dir, &l.name),
                                log: l.name.clone(),
                                epoch: l.epoch,
                                last_epoch: l.epoch,
                                end: l.end,
                                commit: l.committed,
                            })
                            .collect(),
                        // Filled in by the controller as it sends the report.
                        heard_ms: BTreeMap::new(),
                        sent_ms: 0,
                        storage: None,
                    });
                    let state = nc.controller.state().borrow().clone();
                    if !id_recorded && !state.meta.cluster_id.is_empty() {
                        match check_cluster_id(&data_dir, &state.meta.cluster_id) {
                            Ok(()) => id_recorded = true,
                            Err(e) => tracing::error!(error = %e, "controller: the cluster id"),
                        }
                    }
                    if !leading || state.meta.cluster_id.is_empty() {
                        continue;
                    }
                    for l in logs.iter().filter(|l| !state.meta.logs.contains_key(&l.name)) {
                        let cmd = Command::CreateLog {
                            name: l.name.clone(),
                            replicas: replicas.clone(),
                            leader: me.clone(),
                            policy,
                            epoch: l.epoch,
                            start: l.start,
                        };
                        if let Err(e) = nc.controller.propose(cmd, every * 5).await {
                            tracing::debug!(log = %l.name, error = %e, "controller: log not registered yet");
                        }
                    }
                }
            });
        })
        .expect("spawn the controller report thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_problem_line_says_why_this_node_cannot_act() {
        let t = Duration::from_secs(2);
        let mut s = super::super::driver::State {
            leader: Some("n2".into()),
            ..Default::default()
        };
        // A leader heard in a round trip within the lease: no problem.
        assert_eq!(problem(&s, &[], t, Some(Duration::from_millis(200))), "");
        // A lapsed lease, and none since the start, are both said.
        let p = problem(&s, &[], t, Some(Duration::from_secs(5)));
        assert!(
            p.contains("no round trip with the controller's leader (n2) for 5.0 s"),
            "{p}"
        );
        let p = problem(&s, &[], t, None);
        assert!(p.contains("since it started"), "{p}");
        // Out of space comes first.
        s.no_space = Some((
            "write: No space left on device".into(),
            Duration::from_secs(3),
        ));
        let p = problem(&s, &[], t, Some(Duration::from_millis(200)));
        assert!(p.contains("out of space") && p.contains("for 3.0 s"), "{p}");
    }

    #[test]
    fn the_cluster_id_ties_a_data_dir_to_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        // A new node before the cluster forms: nothing recorded, nothing to check.
        check_cluster_id(dir.path(), "").unwrap();
        assert!(!dir.path().join(CLUSTER_ID_FILE).exists());
        // Once the metadata has an id it is recorded, and the same id passes.
        check_cluster_id(dir.path(), "c0ffee").unwrap();
        let recorded = std::fs::read_to_string(dir.path().join(CLUSTER_ID_FILE)).unwrap();
        assert_eq!(recorded.trim(), "c0ffee");
        check_cluster_id(dir.path(), "c0ffee").unwrap();
        // Another cluster's controller state: refused.
        let e = check_cluster_id(dir.path(), "beef").unwrap_err();
        assert!(
            matches!(&e, ControlError::OtherCluster { recorded, found, .. } if recorded == "c0ffee" && found == "beef"),
            "{e}"
        );
        // The controller state is gone: refused.
        let e = check_cluster_id(dir.path(), "").unwrap_err();
        assert!(
            matches!(&e, ControlError::StateMissing { recorded, .. } if recorded == "c0ffee"),
            "{e}"
        );
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
