//! The leader role: replication streams to followers, the sync set, the commit offset, and
//! appends that wait for replicas.
//!
//! Decisions are `protocol::replication::Leader`'s; this module feeds it events (appends, the
//! log's fdatasync progress, acknowledgements, connections, time) and acts on what it says.
//! One [`Replication`] per log lives on the shard that owns the log.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log_core::{Epoch, Log, Offset};
use node_core::log::{LeaderAction, LeaderRules, LevelRefusal, Outbound, Outgoing, StreamRefusal};
use protocol::replication::{Event, Leader, Progress};
use protocol::{Acks, ErrorCode, FollowerStatus, LogReplication, ReplicateRequest, Request};
use tokio::sync::Notify;

use crate::shard::{LogEntry, Shard};

/// How often the leader re-checks lag bounds by time (and refreshes exported lag figures).
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// Frames sent to a follower and not yet acknowledged: (end offset, when sent), oldest first.
type InFlight = RefCell<VecDeque<(u64, Instant)>>;

/// Most frames per follower stream whose send time is kept for the acknowledgement latency
/// histogram (older ones are forgotten, not measured).
const IN_FLIGHT_TIMED_MAX: usize = 4096;
/// How long a new commit offset waits for records to travel with before it is sent alone.
const COMMIT_LINGER: Duration = Duration::from_millis(1);

/// The pin a follower holds on the leader's log, so retention keeps what it still needs.
fn pin_name(follower: &str) -> String {
    format!("follower:{follower}")
}

/// A follower's stream, as the leader tracks it beyond the replication state.
#[derive(Default)]
struct Peer {
    addr: String,
    /// Bumped by every new stream from this follower: an older stream that ends does not mark
    /// the follower disconnected, and stops sending.
    generation: u64,
    /// Bulk catch-up progress (bytes sent, bytes there were to send); zero when live.
    catchup_done: u64,
    catchup_total: u64,
}

/// The leader's replication state of one log.
pub(crate) struct Replication {
    pub state: RefCell<Leader>,
    /// Woken whenever acknowledgements, fdatasync or membership moved anything.
    pub changed: Rc<Notify>,
    peers: RefCell<BTreeMap<String, Peer>>,
    origin: Instant,
    /// Set while acks=sync appends are acknowledged degraded (to warn once per episode).
    degraded: std::cell::Cell<bool>,
    /// The rules around the replication state (`node_core::log`), on the clock of `origin`.
    rules: RefCell<LeaderRules>,
    /// Set when this node stops leading the log: appends still waiting give up.
    deposed: std::cell::Cell<bool>,
}

impl Replication {
    pub fn new(
        node_id: &str,
        shard: &Shard,
        name: &str,
        log: &Log,
        changed: Rc<Notify>,
    ) -> Replication {
        let cfg = &shard.common.config;
        let followers = shard.followers_of(name);
        let mut policy = cfg.replication_config().expect("validated at start");
        policy.sync_replicas = cfg.replication.sync_replicas.min(followers.len());
        let flushed = log.flush_offset().0;
        let mut state = Leader::new(node_id, policy, log.next_offset().0, flushed, 0);
        for f in &followers {
            state.register(f, 0);
        }
        if shard.common.control.is_some() {
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

    fn now_ms(&self) -> u64 {
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
    fn events(&self, log: &str, shard: &Shard, events: Vec<Event>) {
        let mut woke = false;
        for e in events {
            match e {
                Event::Joined(id) => {
                    tracing::info!(log, follower = %id, "follower joined the sync set");
                    shard
                        .common
                        .metrics
                        .c
                        .sync_set_changes
                        .fetch_add(1, Ordering::Relaxed);
                }
                Event::Left(id, reason) => {
                    tracing::warn!(log, follower = %id, ?reason, "follower left the sync set");
                    shard
                        .common
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
    pub fn observe(&self, log_name: &str, shard: &Shard, log: &Log) {
        let now = self.now_ms();
        let events = {
            let mut st = self.state.borrow_mut();
            st.appended(log.next_offset().0, now);
            st.flushed(log.flush_offset().0, now)
        };
        self.events(log_name, shard, events);
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
        shard: &Shard,
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
                        shard
                            .common
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
                if let Some(c) = &shard.common.control {
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
pub(crate) async fn drive(shard: Rc<Shard>, name: String, entry: Rc<LogEntry>) {
    let Some(repl) = entry.leading() else { return };
    let log = &entry.log;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let flushed = log.flush_offset();
        let next = log.next_offset();
        let progressed = async {
            if next > flushed {
                log.wait_flushed(flushed.plus(1)).await
            } else {
                log.wait_appended(flushed).await
            }
        };
        let ticked = tokio::select! {
            r = progressed => {
                if r.is_err() {
                    return;
                }
                false
            }
            _ = ticker.tick() => true,
        };
        if shard.closing.get() {
            return;
        }
        repl.observe(&name, &shard, log);
        let now = repl.now_ms();
        // Committed horizon may have moved with the flush: wake readers and tails.
        entry.changed.notify_waiters();
        if ticked {
            // The exported figures (lag, sync set) are refreshed with the tick, not per flush.
            shard
                .common
                .metrics
                .set_replication(&name, repl.status(&name, log));
            if let Some(control) = &shard.common.control {
                if let Some(record) = control.log_record(&name) {
                    on_record(&shard, &repl, &name, &record, log, control, now);
                }
            }
        }
    }
}

/// Act on the controller's record of the log (see `LeaderRules::on_record`): confirm the sync
/// set, propose a changed one, complete a planned transfer once its target holds everything.
fn on_record(
    shard: &Rc<Shard>,
    repl: &Replication,
    name: &str,
    record: &crate::control::LogRecord,
    log: &Log,
    control: &crate::controller::node::NodeController,
    now_ms: u64,
) {
    let (events, actions) = repl.rules.borrow_mut().on_record(
        &shard.common.node_id,
        &mut repl.state.borrow_mut(),
        record,
        log.next_offset().0,
        log.flush_offset().0,
        now_ms,
    );
    repl.events(name, shard, events);
    for action in actions {
        match action {
            LeaderAction::ProposeSyncSet { epoch, sync_set } => {
                control.propose_sync_set(name, epoch, sync_set)
            }
            LeaderAction::CompleteTransfer {
                epoch,
                to,
                end,
                sync_set,
            } => {
                tracing::info!(log = name, to, end, "handing the leadership over");
                control.complete_transfer(name, epoch, &to, end, sync_set);
            }
        }
    }
}

/// Serve a follower's replication stream: send it everything from `req.from` as it is written,
/// with the commit offset, and take its acknowledgements.
pub(crate) async fn serve(
    shard: Rc<Shard>,
    entry: Rc<LogEntry>,
    req: ReplicateRequest,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), (ErrorCode, String, u64)> {
    let Some(repl) = entry.leading() else {
        return Err((
            ErrorCode::NotLeader,
            "this node does not lead the log".into(),
            0,
        ));
    };
    if !shard.followers_of(&req.log).contains(&req.follower) {
        return Err((
            ErrorCode::Unauthenticated,
            format!(
                "node {:?} is not a follower of this leader (replication.followers, or the controller's replicas of the log)",
                req.follower
            ),
            0,
        ));
    }
    let log = &entry.log;
    let (start, end) = (log.start_offset().0, log.next_offset().0);
    let out = match Outbound::open(req.from, start, end) {
        Ok(out) => Rc::new(RefCell::new(out)),
        Err(StreamRefusal::Bootstrap { start }) => {
            return Err((
                ErrorCode::OffsetOutOfRange,
                format!(
                    "offset {} is no longer stored (the log starts at {start}): bootstrap",
                    req.from
                ),
                start,
            ))
        }
        Err(StreamRefusal::Ahead { end }) => {
            return Err((
                ErrorCode::OffsetOutOfRange,
                format!(
                    "the follower is at {} beyond the leader's end {end}: it must truncate at the epoch divergence point first",
                    req.from
                ),
                start,
            ))
        }
    };
    let name = req.log.clone();
    let follower = req.follower.clone();
    let generation = {
        let mut peers = repl.peers.borrow_mut();
        let p = peers.entry(follower.clone()).or_default();
        p.generation += 1;
        p.addr = req.addr.clone();
        p.catchup_done = 0;
        p.catchup_total = 0;
        p.generation
    };
    // This stream is the follower's latest, and this node still leads the log.
    let current = |repl: &Replication| {
        !repl.deposed.get()
            && repl
                .peers
                .borrow()
                .get(&follower)
                .is_some_and(|p| p.generation == generation)
    };
    log.pin(&pin_name(&follower), Offset(req.from));
    let durable = out.borrow().counted(req.durable);
    let events = repl
        .state
        .borrow_mut()
        .connected(&follower, durable, repl.now_ms());
    repl.events(&name, &shard, events);
    tracing::info!(log = %name, follower = %follower, from = req.from, "follower connected");

    // When each frame went out (its end offset), to time the follower's acknowledgements.
    let in_flight: Rc<InFlight> = Default::default();
    let acks = {
        let (shard, repl, follower, out, name) = (
            shard.clone(),
            repl.clone(),
            follower.clone(),
            out.clone(),
            name.clone(),
        );
        let in_flight = in_flight.clone();
        let entry = entry.clone();
        async move {
            let mut recv = recv;
            let limits = shard.common.config.protocol_limits();
            let mut reader = frames::FrameReader::requests();
            loop {
                match crate::conn::read_frame(&mut reader, &mut recv, &limits).await {
                    Ok(Request::Ack { durable }) => {
                        if !current(&repl) {
                            return;
                        }
                        // A follower cannot acknowledge what this stream did not send.
                        let durable = out.borrow().counted(durable);
                        let mut newest = None;
                        {
                            let mut q = in_flight.borrow_mut();
                            while q.front().is_some_and(|&(end, _)| end <= durable) {
                                newest = q.pop_front();
                            }
                        }
                        if let Some((_, at)) = newest {
                            shard
                                .common
                                .metrics
                                .record_follower_ack(shard.id, at.elapsed());
                        }
                        entry.log.pin(&pin_name(&follower), Offset(durable));
                        let events =
                            repl.state
                                .borrow_mut()
                                .acked(&follower, durable, repl.now_ms());
                        repl.events(&name, &shard, events);
                        // An acknowledgement that moved no commit may still complete an
                        // acks=quorum append.
                        repl.changed.notify_waiters();
                    }
                    Ok(other) => {
                        tracing::warn!(log = %name, follower = %follower, ?other, "unexpected message on a replication stream");
                        return;
                    }
                    Err(_) => return,
                }
            }
        }
    };
    let sending = send_loop(
        &shard,
        &entry,
        &repl,
        &follower,
        send,
        (&out, &in_flight),
        &current,
    );
    tokio::select! {
        () = acks => {}
        () = sending => {}
    }
    if current(&repl) {
        let events = repl
            .state
            .borrow_mut()
            .disconnected(&follower, repl.now_ms());
        repl.events(&name, &shard, events);
        tracing::info!(log = %name, follower = %follower, "follower disconnected");
    }
    let _ = send.reset(protocol::close_code::NORMAL.into());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn send_loop(
    shard: &Shard,
    entry: &LogEntry,
    repl: &Replication,
    follower: &str,
    send: &mut quinn::SendStream,
    (out, in_flight): (&RefCell<Outbound>, &InFlight),
    current: &dyn Fn(&Replication) -> bool,
) {
    let log = &entry.log;
    let cfg = &shard.common.config.replication;
    let epoch: Epoch = entry.epoch;
    let mut bulk = false;
    // Bulk bytes sent since bulk mode began, and when it began (for the rate limit).
    let mut bulk_sent = 0u64;
    let mut bulk_since = Instant::now();
    loop {
        if !current(repl) || shard.closing.get() {
            return;
        }
        let changed = repl.changed.notified();
        let written = log.end_offset();
        let commit = repl.commit().0;
        let next = out.borrow().next(written.0, commit);
        if let Outgoing::Records { from } = next {
            let pos = Offset(from);
            // A follower far behind is served at bulk priority (the live tail of every other
            // log on the same connection goes first) and at a bounded rate.
            let behind = log.bytes_from(pos).unwrap_or(0);
            let now_bulk = behind > cfg.catchup_bytes_min;
            if now_bulk != bulk {
                bulk = now_bulk;
                (bulk_sent, bulk_since) = (0, Instant::now());
                let _ = send.set_priority(if bulk { -1 } else { 0 });
                let mut peers = repl.peers.borrow_mut();
                if let Some(p) = peers.get_mut(follower) {
                    (p.catchup_done, p.catchup_total) = (0, if bulk { behind } else { 0 });
                }
            }
            let read = match log.read(pos, written, cfg.frame_bytes_max as usize) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(follower, error = %e, "reading for a follower failed");
                    return;
                }
            };
            let len: usize = read.batches.iter().map(|b| b.len()).sum();
            let mut chunks: Vec<Bytes> = Vec::with_capacity(read.batches.len() + 1);
            chunks.push(Bytes::copy_from_slice(&protocol::encode_replicated_prefix(
                epoch.0,
                commit,
                read.next_offset.0,
                len,
            )));
            chunks.extend(read.batches.into_iter().map(|b| b.into_bytes()));
            if !crate::service::write_all(shard, send, &mut chunks).await {
                return;
            }
            if bulk {
                if let Some(p) = repl.peers.borrow_mut().get_mut(follower) {
                    p.catchup_done += len as u64;
                }
            }
            out.borrow_mut().sent(read.next_offset.0, commit);
            {
                let mut q = in_flight.borrow_mut();
                if q.len() == IN_FLIGHT_TIMED_MAX {
                    q.pop_front();
                }
                q.push_back((read.next_offset.0, Instant::now()));
            }
            let m = &shard.common.metrics.c;
            m.replicated_bytes.fetch_add(len as u64, Ordering::Relaxed);
            if bulk {
                bulk_sent += len as u64;
                let rate = cfg.catchup_bytes_per_sec_max;
                let due = if rate == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs_f64(bulk_sent as f64 / rate as f64)
                };
                if let Some(ahead) = due.checked_sub(bulk_since.elapsed()) {
                    tokio::time::sleep(ahead).await;
                }
            }
            continue;
        }
        if bulk {
            // Caught up with what is written: live again.
            bulk = false;
            let _ = send.set_priority(0);
            if let Some(p) = repl.peers.borrow_mut().get_mut(follower) {
                (p.catchup_done, p.catchup_total) = (0, 0);
            }
        }
        let pos = Offset(out.borrow().sent_until());
        if next == Outgoing::Commit {
            // Nothing new to send, but the commit offset moved: followers serve reads up to it.
            // New records usually follow at once and carry the commit offset with them, so a
            // frame for the commit offset alone waits a moment for them.
            let more = async {
                if log.next_offset() > pos {
                    log.wait_written(pos.plus(1)).await
                } else {
                    log.wait_appended(pos).await
                }
            };
            match tokio::time::timeout(COMMIT_LINGER, more).await {
                Ok(Ok(())) => continue,
                // Closed (the log changed role) or failed: this stream is over.
                Ok(Err(_)) => return,
                Err(_elapsed) => {}
            }
            let commit = repl.commit().0;
            let prefix = protocol::encode_replicated_prefix(epoch.0, commit, pos.0, 0);
            if !crate::service::write_all(shard, send, &mut [Bytes::copy_from_slice(&prefix)]).await
            {
                return;
            }
            out.borrow_mut().sent(pos.0, commit);
            continue;
        }
        let next = log.next_offset();
        let more = async {
            if next > pos {
                log.wait_written(pos.plus(1)).await
            } else {
                log.wait_appended(pos).await
            }
        };
        tokio::select! {
            r = more => {
                if r.is_err() {
                    return;
                }
            }
            _ = changed => {}
            _ = send.stopped() => return,
        }
    }
}

/// Where `epoch` ends in this log (KIP-101): the largest epoch of the history that is at most
/// `epoch`, and the offset where it ends. When the history begins after `epoch`: its first
/// epoch and the offset it begins at (what the asker holds from there predates this history).
/// (0, 0) when the history is empty.
pub(crate) fn epoch_end(log: &Log, epoch: u64) -> (u64, u64) {
    match log.end_offset_for_epoch(Epoch(epoch)) {
        Some((e, end)) => (e.0, end.0),
        None => log
            .epoch_history()
            .first()
            .map_or((0, 0), |f| (f.epoch.0, f.start_offset.0)),
    }
}
