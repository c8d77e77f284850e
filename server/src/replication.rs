//! The leader's replication state of one log ([`Replication`]): `protocol::replication::Leader`
//! and the rules around it (`node_core::log::LeaderRules`), fed with the log's appends and
//! fdatasync progress, the followers' acknowledgements and the passing of time ([`drive`]);
//! appends wait on it for their level. One per log this node leads, on the shard that owns
//! the log; the streams to followers are [`crate::leader`]'s.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log_core::{Log, Offset};
use node_core::log::{LeaderAction, LeaderRules, LevelRefusal};
use protocol::replication::{Event, Leader, Progress};
use protocol::{Acks, FollowerStatus, LogReplication};
use tokio::sync::Notify;

use crate::common::Common;

/// How often the leader re-checks lag bounds by time (and refreshes exported lag figures).
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// The pin a follower holds on the leader's log, so retention keeps what it still needs.
pub(crate) fn pin_name(follower: &str) -> String {
    format!("follower:{follower}")
}

/// A follower's stream, as the leader tracks it beyond the replication state.
#[derive(Default)]
pub(crate) struct Peer {
    pub addr: String,
    /// Bumped by every new stream from this follower: an older stream that ends does not mark
    /// the follower disconnected, and stops sending.
    pub generation: u64,
    /// Bulk catch-up progress (bytes sent, bytes there were to send); zero when live.
    pub catchup_done: u64,
    pub catchup_total: u64,
}

/// The leader's replication state of one log.
pub(crate) struct Replication {
    pub state: RefCell<Leader>,
    /// Woken whenever acknowledgements, fdatasync or membership moved anything.
    pub changed: Rc<Notify>,
    pub peers: RefCell<BTreeMap<String, Peer>>,
    origin: Instant,
    /// Set while acks=sync appends are acknowledged degraded (to warn once per episode).
    degraded: Cell<bool>,
    /// The rules around the replication state (`node_core::log`), on the clock of `origin`.
    rules: RefCell<LeaderRules>,
    /// Set when this node stops leading the log: appends still waiting give up.
    pub deposed: Cell<bool>,
}

impl Replication {
    pub fn new(
        node_id: &str,
        common: &Common,
        name: &str,
        log: &Log,
        changed: Rc<Notify>,
    ) -> Replication {
        let cfg = &common.config;
        let followers = common.followers_of(name);
        let mut policy = cfg.replication_config().expect("validated at start");
        policy.sync_replicas = cfg.replication.sync_replicas.min(followers.len());
        let flushed = log.flush_offset().0;
        let mut state = Leader::new(node_id, policy, log.next_offset().0, flushed, 0);
        for f in &followers {
            state.register(f, 0);
        }
        if common.control.is_some() {
            state.expect_controller();
        }
        state.flushed(flushed, 0);
        Replication {
            state: RefCell::new(state),
            changed,
            peers: RefCell::new(BTreeMap::new()),
            origin: Instant::now(),
            degraded: Default::default(),
            rules: RefCell::new(LeaderRules::new(0)),
            deposed: Default::default(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The followers that have connected, with the address each announced.
    pub fn follower_addrs(&self) -> Vec<(String, std::net::SocketAddr)> {
        self.peers
            .borrow()
            .iter()
            .filter_map(|(id, p)| Some((id.clone(), p.addr.parse().ok()?)))
            .collect()
    }

    /// How long this node has led the log in this epoch.
    pub fn leading_for(&self) -> Duration {
        self.origin.elapsed()
    }

    pub fn commit(&self) -> Offset {
        Offset(self.state.borrow().commit_offset())
    }

    /// Act on what the state machine said: log membership changes, and wake waiters.
    pub fn events(&self, log: &str, common: &Common, events: Vec<Event>) {
        let mut woke = false;
        for e in events {
            match e {
                Event::Joined(id) => {
                    tracing::info!(log, follower = %id, "follower joined the sync set");
                    common
                        .metrics
                        .c
                        .sync_set_changes
                        .fetch_add(1, Ordering::Relaxed);
                }
                Event::Left(id, reason) => {
                    tracing::warn!(log, follower = %id, ?reason, "follower left the sync set");
                    common
                        .metrics
                        .c
                        .sync_set_changes
                        .fetch_add(1, Ordering::Relaxed);
                }
                Event::Committed(_) => {}
            }
            woke = true;
        }
        if woke {
            self.changed.notify_waiters();
        }
    }

    /// The leader appended: its log now ends at `end`.
    pub fn appended(&self, end: Offset) {
        let now = self.now_ms();
        self.state.borrow_mut().appended(end.0, now);
    }

    /// Bring the state machine up to the log's own end and fdatasync. The driver does it on
    /// every flush and tick; an append does it too before deciding, since it may be woken by
    /// the same flush before the driver, and its receipt must name the leader as a holder.
    pub fn observe(&self, log_name: &str, common: &Common, log: &Log) {
        let now = self.now_ms();
        let events = {
            let mut st = self.state.borrow_mut();
            st.appended(log.next_offset().0, now);
            st.flushed(log.flush_offset().0, now)
        };
        self.events(log_name, common, events);
    }

    /// Whether `acks` can be reached at all now (see `LeaderRules::admit`): an append that
    /// cannot is refused before it is stored, so `not_enough_replicas` always means "not
    /// stored". `window` is `replication.create_wait_ms`.
    pub fn admit(&self, acks: Acks, window: Duration) -> Result<(), LevelRefusal> {
        let now = self.now_ms();
        self.rules
            .borrow_mut()
            .admit(&self.state.borrow(), acks, now, window.as_millis() as u64)
    }

    /// Wait until the append ending at `next` reaches `acks`, or `deadline`.
    pub async fn wait(
        &self,
        log_name: &str,
        common: &Common,
        acks: Acks,
        next: Offset,
        deadline: Instant,
    ) -> Result<(Vec<String>, bool), WaitFail> {
        loop {
            let changed = self.changed.notified();
            if self.deposed.get() {
                return Err(WaitFail::Deposed);
            }
            let progress = self.state.borrow().progress(acks, next.0);
            match progress {
                Progress::Done { replicas, degraded } => {
                    if degraded {
                        common
                            .metrics
                            .c
                            .appends_degraded
                            .fetch_add(1, Ordering::Relaxed);
                        if !self.degraded.replace(true) {
                            tracing::warn!(
                                log = log_name,
                                shortfall = self.state.borrow().sync_shortfall(),
                                "acks=sync appends are acknowledged degraded: the sync set is short"
                            );
                        }
                    } else if acks == Acks::Sync {
                        self.degraded.set(false);
                    }
                    return Ok((replicas, degraded));
                }
                Progress::NotEnoughReplicas { have, need } => {
                    return Err(WaitFail::Replicas { have, need })
                }
                Progress::Pending => {}
            }
            if Instant::now() >= deadline {
                return Err(WaitFail::Deadline);
            }
            // Losing the lease wakes nobody: it is looked at when a tick passes with no
            // progress (an append that makes progress completes or meets its deadline).
            let idle = tokio::time::timeout_at(deadline.min(Instant::now() + TICK).into(), changed)
                .await
                .is_err();
            if idle && !matches!(acks, Acks::None | Acks::Leader) {
                if let Some(c) = &common.control {
                    if !c.lease_ok() {
                        return Err(WaitFail::Lease);
                    }
                }
            }
        }
    }

    /// Drop the retention pin of every follower that would hold more than `cap` bytes.
    pub fn release_far_pins(&self, log_name: &str, log: &Log, cap: u64) {
        for (id, f) in self.state.borrow().followers() {
            let held = log.bytes_from(Offset(f.durable)).unwrap_or(0);
            if held > cap && self.peers.borrow().contains_key(id) {
                log.unpin(&pin_name(id));
                tracing::warn!(log = log_name, follower = %id, held, cap, "retention no longer waits for this follower; it will bootstrap");
            }
        }
    }

    /// Wait until an `acks=sync` append finds a full sync set (on record with the controller,
    /// if there is one), or `deadline`. Returns whether it does. The controller's record
    /// arrives with the driver's tick, which need not wake anyone: look again every tick.
    pub async fn wait_writable(&self, deadline: Instant) -> bool {
        loop {
            let changed = self.changed.notified();
            if self.state.borrow().sync_ready() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let _ =
                tokio::time::timeout_at(deadline.min(Instant::now() + TICK).into(), changed).await;
        }
    }

    /// This node no longer leads the log: appends waiting for replicas give up.
    pub fn depose(&self) {
        self.deposed.set(true);
        self.changed.notify_waiters();
    }

    /// The replicas (leader included) holding everything below `next` durably.
    pub fn holders(&self, next: Offset) -> Vec<String> {
        match self.state.borrow().progress(Acks::None, next.0) {
            Progress::Done { replicas, .. } => replicas,
            _ => Vec::new(),
        }
    }

    pub fn status(&self, log_name: &str, log: &Log) -> LogReplication {
        let now = self.now_ms();
        let st = self.state.borrow();
        let peers = self.peers.borrow();
        let end = log.end_offset().0.max(log.next_offset().0);
        LogReplication {
            log: log_name.to_string(),
            commit: st.commit_offset(),
            sync_replicas: st.config().sync_replicas as u16,
            sync_shortfall: st.sync_shortfall() as u16,
            followers: st
                .followers()
                .iter()
                .map(|(id, f)| {
                    let peer = peers.get(id);
                    let lag_records = end.saturating_sub(f.durable);
                    FollowerStatus {
                        id: id.clone(),
                        addr: peer.map(|p| p.addr.clone()).unwrap_or_default(),
                        durable: f.durable,
                        connected: f.connected,
                        in_sync_set: f.in_sync_set,
                        lag_records,
                        lag_bytes: if lag_records == 0 {
                            0
                        } else {
                            log.bytes_from(Offset(f.durable)).unwrap_or(0)
                        },
                        lag_ms: if lag_records == 0 {
                            0
                        } else {
                            now.saturating_sub(f.caught_up_ms.unwrap_or(0))
                        },
                        catchup_done_bytes: peer.map_or(0, |p| p.catchup_done),
                        catchup_total_bytes: peer.map_or(0, |p| p.catchup_total),
                    }
                })
                .collect(),
        }
    }
}

/// Why an append did not reach its level.
pub(crate) enum WaitFail {
    Deadline,
    Replicas {
        have: usize,
        need: usize,
    },
    /// This node stopped leading the log while the append waited.
    Deposed,
    /// This node lost contact with the controller while the append waited: another node may
    /// be leading the log by now.
    Lease,
}

/// Keep the state machine fed with the log's fdatasync progress and the passing of time, until
/// the log closes.
pub(crate) async fn drive(
    common: Arc<Common>,
    closing: Rc<Cell<bool>>,
    name: String,
    repl: Rc<Replication>,
    log: Log,
    changed: Rc<Notify>,
) {
    let log = &log;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let progressed = log.wait_flushed_past(log.flush_offset());
        let ticked = tokio::select! {
            r = progressed => {
                if r.is_err() {
                    return;
                }
                false
            }
            _ = ticker.tick() => true,
        };
        if closing.get() {
            return;
        }
        repl.observe(&name, &common, log);
        let now = repl.now_ms();
        // Committed horizon may have moved with the flush: wake readers and tails.
        changed.notify_waiters();
        if ticked {
            // The exported figures (lag, sync set) are refreshed with the tick, not per flush.
            common
                .metrics
                .set_replication(&name, repl.status(&name, log));
            if let Some(control) = &common.control {
                if let Some(record) = control.log_record(&name) {
                    on_record(&common, &repl, &name, &record, log, control, now);
                }
            }
        }
    }
}

/// Act on the controller's record of the log (see `LeaderRules::on_record`): confirm the sync
/// set, propose a changed one, complete a planned transfer once its target holds everything.
fn on_record(
    common: &Common,
    repl: &Replication,
    name: &str,
    record: &crate::controller::LogRecord,
    log: &Log,
    control: &crate::controller::node::NodeController,
    now_ms: u64,
) {
    let (events, actions) = repl.rules.borrow_mut().on_record(
        &common.node_id,
        &mut repl.state.borrow_mut(),
        record,
        log.next_offset().0,
        log.flush_offset().0,
        now_ms,
    );
    repl.events(name, common, events);
    for action in actions {
        if let LeaderAction::CompleteTransfer { to, end, .. } = &action {
            tracing::info!(log = name, to, end, "handing the leadership over");
        }
        control.propose(action.command(name));
    }
}
