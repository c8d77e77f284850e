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

use follower::session::{FollowerStage, Outcome, SessionConfig, StageObserver};
use log_core::{Log, Offset};
use protocol::{Request, Response};

use crate::metrics::Stage;
use crate::shard::{EntryRole, Shard};
use crate::Error;

/// How often the follower asks the leader for its list of logs (new logs and new snapshots
/// start replicating within this).
const LIST_INTERVAL: Duration = Duration::from_millis(250);
/// Longest wait between attempts to reach the leader.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Longest wait between failed replication sessions of one log.
const SESSION_BACKOFF_MAX: Duration = Duration::from_secs(8);

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
    });
    let running: Rc<RefCell<BTreeSet<String>>> = Default::default();
    let fetching: Rc<RefCell<BTreeSet<String>>> = Default::default();
    let mut backoff = Duration::from_millis(50);
    let mut warned = false;
    while !shard.closing.get() {
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
            match list_logs(&conn, &scfg.limits).await {
                Ok(logs) => {
                    for info in logs {
                        let name = info.name.clone();
                        if crate::shard_of(&name, shard.common.shards.len()) != shard.id {
                            continue;
                        }
                        let local = shard.get(&name);
                        let newer = info.snapshot.is_some_and(|o| {
                            local
                                .as_ref()
                                .is_some_and(|e| e.snapshot.get().is_none_or(|l| l < o))
                        });
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
                            name,
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
            if shard.closing.get() {
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

async fn list_logs(
    conn: &quinn::Connection,
    limits: &protocol::Limits,
) -> Result<Vec<protocol::LogInfo>, String> {
    let answer = follower::session::exchange(conn, &Request::ListLogs, limits)
        .await
        .map_err(|e| e.to_string())?;
    match answer {
        Response::Logs(logs) => Ok(logs
            .into_iter()
            .filter(|l| log_core::validate_log_name(&l.name).is_ok())
            .collect()),
        other => Err(format!("unexpected answer {other:?}")),
    }
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
    let req = Request::GetSnapshot { log: name.clone() };
    let result = match follower::session::exchange(&conn, &req, &scfg.limits)
        .await
        .map_err(|e| e.to_string())
    {
        Ok(Response::Snapshot(s)) if s.log == name => {
            if crc32c::crc32c(&s.data) != s.crc32c {
                Err("the snapshot's crc32c does not match its data".to_string())
            } else if let Some(e) = shard.get(&name) {
                crate::service::store_snapshot(&shard, &e, &name, s.offset, s.data)
                    .await
                    .map_err(|f| f.1)
            } else {
                Ok(())
            }
        }
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(log = %name, error = %e, "copying the leader's snapshot failed; will retry");
    }
    fetching.borrow_mut().remove(&name);
}

/// Replicate one log for as long as the connection lasts.
async fn follow_log(
    shard: Rc<Shard>,
    conn: quinn::Connection,
    name: String,
    scfg: Rc<SessionConfig>,
    running: Rc<RefCell<BTreeSet<String>>>,
) {
    // Consecutive failed sessions back off from 500 ms to SESSION_BACKOFF_MAX.
    let mut backoff = Duration::from_millis(500);
    while !shard.closing.get() && conn.close_reason().is_none() {
        let entry = match shard.get(&name) {
            Some(e) => e,
            None => match create_local(&shard, &name).await {
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
        let began = std::time::Instant::now();
        let result =
            follower::session::run(&conn, &name, &entry.log, &scfg, commit, &entry.changed).await;
        if began.elapsed() > SESSION_BACKOFF_MAX {
            // A session that ran for a while was not a fast failure loop.
            backoff = Duration::from_millis(500);
        }
        match result {
            Ok(Outcome::Ended) => break,
            Ok(Outcome::Bootstrap { start }) => {
                if let Err(e) = bootstrap(&shard, &name, start).await {
                    tracing::error!(log = %name, error = %e, "bootstrap failed");
                    tokio::time::sleep(BACKOFF_MAX).await;
                }
            }
            Err(e) => {
                if conn.close_reason().is_some() || shard.closing.get() {
                    break;
                }
                shard
                    .common
                    .metrics
                    .c
                    .replication_refusals
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(log = %name, error = %e, retry_in = ?backoff, "replication session failed; resuming from the local end");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(SESSION_BACKOFF_MAX);
            }
        }
    }
    running.borrow_mut().remove(&name);
}

/// Create the local replica of a log the leader has.
async fn create_local(shard: &Rc<Shard>, name: &str) -> Result<Rc<crate::shard::LogEntry>, Error> {
    let count = &shard.common.log_count;
    let max = shard.common.config.limits.logs_max;
    if count.fetch_add(1, Ordering::Relaxed) >= max {
        count.fetch_sub(1, Ordering::Relaxed);
        return Err(Error::Config(format!(
            "the node holds logs_max = {max} logs; log {name:?} is not replicated here"
        )));
    }
    match shard.open_log(name).await {
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
async fn bootstrap(shard: &Rc<Shard>, name: &str, start: Option<u64>) -> Result<(), Error> {
    let start = Offset(start.unwrap_or(0));
    let old = shard.logs.borrow_mut().remove(name);
    let dir = shard.logs_dir().join(name);
    if let Some(old) = old {
        let (from, to) = (old.log.start_offset(), old.log.next_offset());
        tracing::warn!(
            log = name,
            local_start = from.0,
            local_end = to.0,
            leader_start = start.0,
            "bootstrapping: the leader no longer stores what this replica needs next; replacing the local log"
        );
        old.log.clone().close().await?;
    }
    let aside = shard.logs_dir().join(format!(".{name}.replaced"));
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(crate::files::io_err("remove", &aside))?;
    }
    if dir.exists() {
        std::fs::rename(&dir, &aside).map_err(crate::files::io_err("rename", &dir))?;
    }
    let log = Log::open_at(&dir, shard.common.config.log_config(), start).await?;
    shard.install(name, log)?;
    std::fs::remove_dir_all(&aside).ok();
    shard
        .common
        .metrics
        .c
        .bootstraps
        .fetch_add(1, Ordering::Relaxed);
    Ok(())
}
