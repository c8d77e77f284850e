//! The follower role on a node: each shard keeps one peer connection to the leader, learns the
//! leader's logs, and runs a replication session (`follower::session`) for every log it owns.
//! A log the leader has and this node does not is created here; one whose needed records the
//! leader no longer stores is replaced by a log that starts at the leader's start (bootstrap).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use follower::session::{CopyState, FollowerStage, Outcome, SessionConfig, StageObserver};
use log_core::{Log, Offset};
use node_core::controller::meta::Command;

use crate::metrics::Stage;
use crate::shard::{EntryRole, RoleChoice, Shard};
use crate::Error;

/// How often the follower asks the leader for its list of logs (new logs and new snapshots
/// start replicating within this).
const LIST_INTERVAL: Duration = Duration::from_millis(250);
/// Longest wait between attempts to reach the leader.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Longest wait between failed replication sessions of one log.
const SESSION_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// How often, with a controller, each log is checked against the controller's record.
const STEER_INTERVAL: Duration = Duration::from_millis(100);

/// With a controller: every [`STEER_INTERVAL`], put each log of this shard in the role the
/// controller has on record for it (closing and reopening it when that changes), ask for a
/// new epoch where this node is the recorded leader of a log whose epoch is not newer than its
/// own (after a restart), and keep one follow loop ([`run`]) per leader this shard's logs
/// follow, which also creates the logs the controller has for this node and it lacks.
pub(crate) async fn steer(shard: Rc<Shard>) {
    let Some(control) = shard.common.control.clone() else {
        return;
    };
    let me = shard.common.node_id.clone();
    let loops: Rc<RefCell<BTreeSet<SocketAddr>>> = Default::default();
    let mut steering = node_core::log::Steering::default();
    let started = std::time::Instant::now();
    while !shard.closing.get() {
        tokio::time::sleep(STEER_INTERVAL).await;
        shard
            .common
            .metrics
            .c
            .controller_no_space
            .store(control.no_space() as u64, Ordering::Relaxed);
        let local = shard.entries();
        let mut leaders = BTreeSet::new();
        // Entries to take out of service, by name and identity: none is held across the
        // change (the old log's directory lock goes with its last handle).
        let mut changes: Vec<(String, usize)> = Vec::new();
        for (name, entry) in local {
            let choice = match control.log_record(&name) {
                Some(r) => {
                    let copy = shard.copy_of(&name, &entry.log, Some(&entry));
                    let now = started.elapsed().as_millis() as u64;
                    let steer = steering.steer(&name, &me, &r, copy, now);
                    for cmd in steer.propose {
                        if let Command::Withdraw { .. } = cmd {
                            tracing::warn!(log = %name, "this node's copy of the log is recovering (it was created afresh): withdrawing from its sync set and leadership until it has caught up");
                        }
                        control.propose(cmd);
                    }
                    shard.choice_of(steer.role)
                }
                None => shard.choose_role(&name, &entry.log, Some(&entry)),
            };
            if let RoleChoice::Follow(Some(a)) = choice {
                leaders.insert(a);
            }
            if !Shard::is_in_role(&entry, choice) {
                changes.push((name, Rc::as_ptr(&entry) as usize));
            }
        }
        for (name, id) in changes {
            // In a task of its own: the old role's tasks may take a while to let go of the log.
            if shard.creating.borrow().contains(&name) {
                continue;
            }
            let shard = shard.clone();
            tokio_uring::spawn(async move {
                if let Err(e) = reassign(&shard, &name, id).await {
                    tracing::error!(log = %name, error = %e, "changing the log's role failed");
                }
            });
        }
        for (name, r) in control.logs() {
            if crate::shard_of(&name, shard.common.shards.len()) == shard.id
                && shard.get(&name).is_none()
            {
                leaders.extend(replicated_from(&shard, &control, &r));
                // A log this node is recorded to lead, and lacks (its data was lost): created
                // afresh, recovering, so that it gives the leadership up.
                if r.leader.as_deref() == Some(me.as_str())
                    && !shard.creating.borrow().contains(&name)
                {
                    let (shard, name) = (shard.clone(), name.clone());
                    tokio_uring::spawn(async move {
                        if let Err(e) = create_local(&shard, &name, true).await {
                            tracing::error!(log = %name, error = %e, "cannot create the local replica");
                        }
                    });
                }
            }
        }
        for a in leaders {
            if loops.borrow_mut().insert(a) {
                let (shard, loops) = (shard.clone(), loops.clone());
                tokio_uring::spawn(async move {
                    run(shard, a).await;
                    loops.borrow_mut().remove(&a);
                });
            }
        }
    }
}

/// Close the log's entry `old` (by identity, if it is still the one in service) and take the
/// log into service again in the role it should have now. Every task of the old role ends with the close: a deposed leader's waiting appends
/// answer that their outcome is unknown, a follower's session to its old leader stops.
async fn reassign(shard: &Rc<Shard>, name: &str, old: usize) -> Result<(), Error> {
    let removed = {
        let mut logs = shard.logs.borrow_mut();
        match logs.get(name) {
            Some(e) if Rc::as_ptr(e) as usize == old => logs.remove(name),
            _ => None,
        }
    };
    let Some(old) = removed else {
        return Ok(());
    };
    shard.creating.borrow_mut().insert(name.to_string());
    tracing::debug!(log = name, "changing the log's role");
    let result = async {
        if let Some(r) = old.leading() {
            r.depose();
        }
        old.retired.set(true);
        old.retiring.notify_waiters();
        old.changed.notify_waiters();
        old.log.clone().close().await?;
        tracing::debug!(log = name, "closed in its old role");
        drop(old);
        // Tasks of the old role let go of the log as they notice the close; the directory
        // lock goes with the last of them.
        let dir = shard.logs_dir().join(name);
        let mut wait = Duration::from_millis(10);
        let waiting = std::time::Instant::now();
        let mut warned = false;
        let log = loop {
            if !warned && waiting.elapsed() > Duration::from_secs(2) {
                tracing::warn!(log = name, "the log's old role still holds it after 2 s");
                warned = true;
            }
            match Log::open(&dir, shard.common.config.log_config()).await {
                Ok(log) => break log,
                Err(log_core::Error::Locked { .. })
                    if !shard.closing.get() && shard.get(name).is_none() =>
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let entry = shard.install(name, log)?;
        tracing::info!(
            log = name,
            leading = entry.leading().is_some(),
            following = ?entry.following,
            epoch = entry.epoch.0,
            reopened_after = ?waiting.elapsed(),
            "the log changed role"
        );
        Ok(())
    }
    .await;
    shard.creating.borrow_mut().remove(name);
    result
}

/// Whether, with a controller, this shard has a log that follows (or should be created from)
/// `leader`. Without a controller every log follows the configured leader.
fn wants(shard: &Shard, leader: SocketAddr) -> bool {
    let Some(control) = &shard.common.control else {
        return true;
    };
    if shard
        .logs
        .borrow()
        .values()
        .any(|e| e.following == Some(leader))
    {
        return true;
    }
    control.logs().into_iter().any(|(name, r)| {
        crate::shard_of(&name, shard.common.shards.len()) == shard.id
            && replicated_from(shard, control, &r) == Some(leader)
    })
}

/// The leader this node replicates a log with record `r` from: its recorded leader's address,
/// when this node is another replica of it.
fn replicated_from(
    shard: &Shard,
    control: &crate::controller::node::NodeController,
    r: &crate::controller::LogRecord,
) -> Option<SocketAddr> {
    let me = &shard.common.node_id;
    if !r.replicas.contains(me) {
        return None;
    }
    r.leader
        .as_ref()
        .filter(|l| *l != me)
        .and_then(|l| control.member_addr(l))
}

/// Whether `name` is to be replicated from `leader` here (always without a controller).
fn follows(shard: &Shard, name: &str, leader: SocketAddr) -> bool {
    let Some(control) = &shard.common.control else {
        return true;
    };
    control
        .log_record(name)
        .is_some_and(|r| replicated_from(shard, control, &r) == Some(leader))
}

pub(crate) async fn run(shard: Rc<Shard>, leader: SocketAddr) {
    let cfg = &shard.common.config;
    // Outgoing connections use a socket of their own: the node's port is shared by every
    // shard (SO_REUSEPORT), so answers to a connection made from it could reach another
    // shard's socket, which does not know the connection.
    let local: SocketAddr = if leader.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = match quinn::Endpoint::client(local) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot open a socket towards the leader; not following");
            return;
        }
    };
    let server_name = cfg
        .replication
        .leader_name
        .clone()
        .unwrap_or_else(|| leader.ip().to_string());
    let scfg = Rc::new(SessionConfig {
        node_id: shard.common.node_id.clone(),
        addr: shard.common.advertise.to_string(),
        limits: cfg.protocol_limits(),
        stages: Some(stage_metrics(&shard)),
        quarantine_dir: Some(cfg.node.data_dir.join(crate::layout::QUARANTINE_DIR)),
        on_quarantine: Some({
            let metrics = shard.common.metrics.clone();
            Rc::new(move |r: &follower::quarantine::Report| {
                metrics
                    .c
                    .quarantined_records
                    .fetch_add(r.records, Ordering::Relaxed);
                metrics
                    .c
                    .quarantined_bytes
                    .fetch_add(r.bytes, Ordering::Relaxed);
            })
        }),
    });
    let running: Rc<RefCell<BTreeSet<String>>> = Default::default();
    let fetching: Rc<RefCell<BTreeSet<String>>> = Default::default();
    let mut backoff = Duration::from_millis(50);
    let mut warned = false;
    while !shard.closing.get() && wants(&shard, leader) {
        let attempt =
            match endpoint.connect_with(shard.common.peer_client.clone(), leader, &server_name) {
                Ok(c) => c.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
        let conn = match attempt {
            Ok(c) => {
                tracing::info!(%leader, shard = shard.id, "connected to the leader");
                backoff = Duration::from_millis(50);
                warned = false;
                c
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(%leader, error = %e, "cannot reach the leader; retrying");
                    warned = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        loop {
            match follower::session::list_logs(&conn, &scfg.limits).await {
                Ok(logs) => {
                    for info in logs {
                        let name = info.name.clone();
                        if crate::shard_of(&name, shard.common.shards.len()) != shard.id
                            || !follows(&shard, &name, leader)
                        {
                            continue;
                        }
                        let local = shard.get(&name);
                        let newer = local
                            .as_ref()
                            .is_some_and(|e| e.snapshot.get().wants(info.snapshot));
                        if newer && fetching.borrow_mut().insert(name.clone()) {
                            tokio_uring::spawn(fetch_snapshot(
                                shard.clone(),
                                conn.clone(),
                                name.clone(),
                                scfg.clone(),
                                fetching.clone(),
                            ));
                        }
                        if !running.borrow_mut().insert(name.clone()) {
                            continue;
                        }
                        tokio_uring::spawn(follow_log(
                            shard.clone(),
                            conn.clone(),
                            leader,
                            name,
                            info.committed > 0,
                            scfg.clone(),
                            running.clone(),
                        ));
                    }
                }
                Err(e) => {
                    tracing::warn!(%leader, error = %e, "listing the leader's logs failed");
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(LIST_INTERVAL) => {}
                _ = conn.closed() => break,
            }
            if shard.closing.get() || !wants(&shard, leader) {
                break;
            }
        }
        conn.close(protocol::close_code::NORMAL.into(), b"reconnecting");
    }
    endpoint.close(protocol::close_code::NORMAL.into(), b"shutting down");
}

/// Record the replication sessions' stage latencies in this shard's histograms
/// (`replog_stage_latency_seconds`, stages `follower_receive` and `follower_flush`).
fn stage_metrics(shard: &Shard) -> StageObserver {
    let (metrics, id) = (shard.common.metrics.clone(), shard.id);
    Rc::new(move |stage, latency| {
        let stage = match stage {
            FollowerStage::Receive => Stage::FollowerReceive,
            FollowerStage::Flush => Stage::FollowerFlush,
        };
        metrics.record_stage(id, stage, latency);
    })
}

/// Copy the leader's latest application snapshot of a log, checked against its crc32c before
/// it is stored.
async fn fetch_snapshot(
    shard: Rc<Shard>,
    conn: quinn::Connection,
    name: String,
    scfg: Rc<SessionConfig>,
    fetching: Rc<RefCell<BTreeSet<String>>>,
) {
    let result = match follower::session::fetch_snapshot(&conn, &name, &scfg.limits).await {
        Ok(s) => match shard.get(&name) {
            Some(e) => crate::service::store_snapshot(&shard, &e, &name, s.offset, s.data)
                .await
                .map_err(|f| f.1),
            None => Ok(()),
        },
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = result {
        tracing::warn!(log = %name, error = %e, "copying the leader's snapshot failed; will retry");
    }
    fetching.borrow_mut().remove(&name);
}

/// Replicate one log for as long as the connection lasts.
/// `committed`: the leader's log had committed records when it was listed (a replica created
/// here now is recovering).
async fn follow_log(
    shard: Rc<Shard>,
    conn: quinn::Connection,
    leader: SocketAddr,
    name: String,
    committed: bool,
    scfg: Rc<SessionConfig>,
    running: Rc<RefCell<BTreeSet<String>>>,
) {
    // Consecutive failed sessions back off from 500 ms to SESSION_BACKOFF_MAX.
    let mut backoff = Duration::from_millis(500);
    while !shard.closing.get() && conn.close_reason().is_none() {
        let entry = match shard.get(&name) {
            Some(e) => e,
            // Changing role: it comes back in its new role, with a session of its own.
            None if shard.creating.borrow().contains(&name) => break,
            None => match create_local(&shard, &name, committed).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(log = %name, error = %e, "cannot create the local replica");
                    tokio::time::sleep(BACKOFF_MAX).await;
                    continue;
                }
            },
        };
        let EntryRole::Follower(commit) = &entry.role else {
            break;
        };
        if shard.common.control.is_some() && entry.following != Some(leader) {
            break;
        }
        if entry.log.failure().is_none() {
            shard.note_failed(&name, false);
        }
        // A recovering copy that must withdraw replicates nothing until that is on record.
        let recovering = entry.recovering.get();
        if let Some(control) = &shard.common.control {
            let record = control.log_record(&name);
            if record.is_some_and(|r| {
                node_core::log::must_withdraw(&shard.common.node_id, &r, recovering)
            }) {
                drop(entry);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let began = std::time::Instant::now();
        let retiring = entry.retiring.notified();
        if entry.retired.get() {
            break;
        }
        tracing::debug!(log = %name, %leader, "replication session starting");
        let result = tokio::select! {
            r = follower::session::run(&conn, &name, &entry.log, &scfg, CopyState { commit, recovering: &entry.recovering, changed: &entry.changed }) => r,
            _ = retiring => break,
        };
        tracing::debug!(log = %name, %leader, ?result, "replication session ended");
        if began.elapsed() > SESSION_BACKOFF_MAX {
            // A session that ran for a while was not a fast failure loop.
            backoff = Duration::from_millis(500);
        }
        match result {
            Ok(Outcome::Ended) => break,
            Ok(Outcome::Bootstrap { start }) => {
                let done = bootstrap(&shard, &name, start, &entry).await;
                drop(entry);
                if let Err(e) = done {
                    tracing::error!(log = %name, error = %e, "bootstrap failed");
                    tokio::time::sleep(BACKOFF_MAX).await;
                }
            }
            Err(e) => {
                if conn.close_reason().is_some() || shard.closing.get() {
                    break;
                }
                if let Some(failure) = entry.log.failure() {
                    // The local log failed on a write (a full disk, an I/O error): it takes
                    // nothing more until reopened, which re-validates it from disk (what was
                    // not durable is fetched again; nothing undurable was acknowledged).
                    // Reopened after a pause, again and again until it opens and takes
                    // writes, so the replica resumes by itself once space is freed.
                    tracing::error!(log = %name, error = %failure, retry_in = ?backoff, "the local replica failed on disk; reopening it");
                    shard.note_failed(&name, true);
                    let id = Rc::as_ptr(&entry) as usize;
                    drop(entry);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(SESSION_BACKOFF_MAX);
                    if let Err(e) = reassign(&shard, &name, id).await {
                        tracing::error!(log = %name, error = %e, "reopening the local replica failed; trying again");
                    }
                    continue;
                }
                shard
                    .common
                    .metrics
                    .c
                    .replication_refusals
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(log = %name, error = %e, retry_in = ?backoff, "replication session failed; resuming from the local end");
                // The log is let go while waiting: a change of role (the usual reason the
                // leader ended the session) reopens it at once.
                drop(entry);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(SESSION_BACKOFF_MAX);
            }
        }
    }
    running.borrow_mut().remove(&name);
    tracing::debug!(log = %name, %leader, "following the log from this leader ended");
}

/// Create the local replica of a log the leader has; `recovering`: the log has records this
/// node should have held (its copy was lost), so the new copy is marked recovering.
async fn create_local(
    shard: &Rc<Shard>,
    name: &str,
    recovering: bool,
) -> Result<Rc<crate::shard::LogEntry>, Error> {
    let count = &shard.common.log_count;
    let max = shard.common.config.limits.logs_max;
    if count.fetch_add(1, Ordering::Relaxed) >= max {
        count.fetch_sub(1, Ordering::Relaxed);
        return Err(Error::Config(format!(
            "the node holds logs_max = {max} logs; log {name:?} is not replicated here"
        )));
    }
    // The name is reserved while the log opens, so neither another follow loop nor a change of
    // role opens it at the same time.
    shard.creating.borrow_mut().insert(name.to_string());
    let opened = match recovering && shard.common.control.is_some() {
        // The marker is durable before the log opens (and before anything is replicated).
        true => match follower::copy::mark_recovering(&shard.logs_dir().join(name)) {
            Ok(()) => {
                tracing::warn!(log = name, "created a fresh copy of a log this node should have held: recovering until it has caught up");
                shard.open_log(name).await
            }
            Err(e) => Err(e.into()),
        },
        false => shard.open_log(name).await,
    };
    shard.creating.borrow_mut().remove(name);
    match opened {
        Ok(e) => {
            tracing::info!(log = name, "created the local replica");
            Ok(e)
        }
        Err(e) => {
            count.fetch_sub(1, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// Replace the local log by an empty one starting at `start` (the leader's first stored
/// offset): the local records are all before it (the leader deleted what follows them), or
/// diverge from the leader before the local start. Batches then come from the leader's sealed
/// segments, each checked on arrival, at bulk priority.
///
/// Only the entry the session ran on is replaced: if the log has meanwhile left service or changed
/// role (a reassignment holds it), nothing is done.
async fn bootstrap(
    shard: &Rc<Shard>,
    name: &str,
    start: Option<u64>,
    entry: &Rc<crate::shard::LogEntry>,
) -> Result<(), Error> {
    let start = Offset(start.unwrap_or(0));
    let old = {
        let mut logs = shard.logs.borrow_mut();
        match logs.get(name) {
            Some(e) if Rc::ptr_eq(e, entry) && !shard.creating.borrow().contains(name) => {
                logs.remove(name).expect("the entry is in service")
            }
            _ => return Ok(()),
        }
    };
    shard.creating.borrow_mut().insert(name.to_string());
    let result = replace_local(shard, name, start, old).await;
    shard.creating.borrow_mut().remove(name);
    result
}

/// [`bootstrap`], once the entry `old` is out of service.
async fn replace_local(
    shard: &Rc<Shard>,
    name: &str,
    start: Offset,
    old: Rc<crate::shard::LogEntry>,
) -> Result<(), Error> {
    let (from, to) = (old.log.start_offset(), old.log.next_offset());
    tracing::warn!(
        log = name,
        local_start = from.0,
        local_end = to.0,
        leader_start = start.0,
        "bootstrapping: the leader no longer stores what this replica needs next; replacing the local log"
    );
    old.log.clone().close().await?;
    drop(old);
    let log = follower::copy::replace(
        &shard.logs_dir(),
        name,
        start,
        shard.common.config.log_config(),
    )
    .await?;
    shard.install(name, log)?;
    shard
        .common
        .metrics
        .c
        .bootstraps
        .fetch_add(1, Ordering::Relaxed);
    Ok(())
}
