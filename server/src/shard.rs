//! One shard: a thread with a tokio-uring runtime, its QUIC socket, and the logs it owns.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use log_core::{Epoch, Log, Offset};
use protocol::idempotence::{ProducerTable, StoredAppend};
use protocol::{LogInfo, LogReplication};
use tokio::sync::Notify;

use crate::common::Common;
use crate::config::Role;
use crate::Error;

/// A log and the node-side state that goes with it.
pub(crate) struct LogEntry {
    pub log: Log,
    /// The epoch this node appends in. A leader starts a new epoch every time it opens the log,
    /// so records it lost in a crash (written, never durable) can never be confused with
    /// different records at the same offsets later.
    pub epoch: Epoch,
    pub producers: RefCell<ProducerTable>,
    pub role: EntryRole,
    /// The latest application snapshot stored here (the node core's rules).
    pub snapshot: std::cell::Cell<node_core::snapshot::Snapshots>,
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
    Leader(Rc<crate::replication::Replication>),
    /// Following: the leader's commit offset as the last frame brought it.
    Follower(Rc<std::cell::Cell<u64>>),
}

impl LogEntry {
    pub fn leading(&self) -> Option<Rc<crate::replication::Replication>> {
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
    pub closing: Rc<std::cell::Cell<bool>>,
    /// Logs whose local storage failed and that are being reopened (`replog_logs_failed`).
    pub failed_logs: RefCell<std::collections::BTreeSet<String>>,
}

/// How far back from the end of a log the producer table is rebuilt at open: the last
/// `PRODUCER_SCAN_SEGMENTS` segments. An idempotent retry of an append older than that is
/// stored again (its original receipt is no longer known).
pub(crate) const PRODUCER_SCAN_SEGMENTS: usize = 2;

/// The retention pin that keeps every record after a log's latest application snapshot.
pub(crate) const SNAPSHOT_PIN: &str = "snapshot";

impl Shard {
    pub fn logs_dir(&self) -> PathBuf {
        crate::layout::logs_dir(&self.common.config.node.data_dir)
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
                let copy = self.copy_of(name, log, current);
                return self.choice_of(node_core::log::choose_role(
                    &self.common.node_id,
                    &r,
                    copy.last_epoch,
                    copy.leading_in,
                    copy.recovering,
                ));
            }
        }
        match self.common.role {
            Role::Standalone => RoleChoice::Standalone,
            Role::Leader => RoleChoice::LeadNewEpoch,
            Role::Follower(a) => RoleChoice::Follow(Some(a)),
        }
    }

    /// The local copy of `log` as the node's rules see it; `current` is the entry the log is in
    /// service as, if it is.
    pub fn copy_of(
        &self,
        name: &str,
        log: &Log,
        current: Option<&LogEntry>,
    ) -> node_core::log::LocalCopy {
        node_core::log::LocalCopy {
            last_epoch: log.last_epoch().map_or(0, |e| e.0),
            end: log.next_offset().0,
            leading_in: current.filter(|e| e.leading().is_some()).map(|e| e.epoch.0),
            recovering: match current {
                Some(e) => e.recovering.get(),
                None => crate::layout::recovering(&self.common.config.node.data_dir, name),
            },
        }
    }

    /// The role choice for a role the controller's record gives (the leader to follow by its
    /// address).
    pub fn choice_of(&self, role: node_core::log::Role) -> RoleChoice {
        match role {
            node_core::log::Role::Lead(e) => RoleChoice::Lead(Epoch(e)),
            node_core::log::Role::Follow(None) => RoleChoice::Follow(None),
            node_core::log::Role::Follow(Some(l)) => {
                RoleChoice::Follow(self.common.control.as_ref().and_then(|c| c.member_addr(&l)))
            }
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
                let repl = crate::replication::Replication::new(
                    &self.common.node_id,
                    &self.common,
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
        // A follower's copy is read only once durable: each write is made durable as it
        // completes, in one operation. A leader writes first and fdatasyncs after, so that its
        // followers get the records while its own fdatasync runs.
        log.set_durable_writes(matches!(role, EntryRole::Follower(_)));
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
            snapshot: std::cell::Cell::new(node_core::snapshot::Snapshots::new(snapshot)),
            changed,
            following,
            retired: Default::default(),
            retiring: Default::default(),
            recovering: std::cell::Cell::new(crate::layout::recovering(
                &self.common.config.node.data_dir,
                name,
            )),
        });
        self.logs
            .borrow_mut()
            .insert(name.to_string(), entry.clone());
        if let Some(repl) = entry.leading() {
            tokio_uring::spawn(crate::replication::drive(
                self.common.clone(),
                self.closing.clone(),
                name.to_string(),
                repl,
                entry.log.clone(),
                entry.changed.clone(),
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
                snapshot: e.snapshot.get().latest(),
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
/// leader's [`crate::replication::drive`] does this and more).
async fn watch_flush(shard: Rc<Shard>, entry: Rc<LogEntry>) {
    let log = &entry.log;
    loop {
        let r = log.wait_flushed_past(log.flush_offset()).await;
        if r.is_err() || shard.closing.get() {
            return;
        }
        entry.changed.notify_waiters();
    }
}

/// Replay the producer metadata of the last segments into `table`.
fn rebuild_producers(log: &Log, table: &mut ProducerTable) -> Result<(), Error> {
    let bases = log.segment_bases();
    let from = bases
        .len()
        .checked_sub(PRODUCER_SCAN_SEGMENTS)
        .map_or(log.start_offset(), |i| bases[i]);
    for b in log.batches(from, log.end_offset()) {
        let b = b?;
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
    Ok(())
}
