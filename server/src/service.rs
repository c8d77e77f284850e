//! Requests served by the shard that owns the log: create, append, read, tail.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log_core::batch::ProducerMeta;
use log_core::{Log, Offset};
use node_core::snapshot::SnapshotRefusal;
use protocol::idempotence::{Admission, StoredAppend};
use protocol::{
    Acks, AppendRequest, ErrorCode, ReadRequest, Receipt, Request, Response, TailRequest,
    RECEIPT_DEGRADED, RECEIPT_DUPLICATE,
};

use crate::config::Role;
use crate::shard::{LogEntry, Shard};
use crate::wire::{reply, send_error, write_all};

/// The wire code for a storage error.
fn code_of(e: &log_core::Error) -> ErrorCode {
    use log_core::Error as E;
    match e {
        E::BatchTooLarge { .. } | E::TooManyRecords { .. } => ErrorCode::LimitExceeded,
        E::EmptyBatch | E::InvalidBatch(_) => ErrorCode::Malformed,
        E::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        E::StaleEpoch { .. } => ErrorCode::StaleEpoch,
        E::Closed => ErrorCode::ShuttingDown,
        E::InvalidName { .. } => ErrorCode::InvalidName,
        E::AlreadyExists { .. } => ErrorCode::LogExists,
        E::Backpressure { .. } => ErrorCode::Busy,
        E::Truncated { .. } | E::Truncating => ErrorCode::Timeout,
        _ => ErrorCode::StorageFailed,
    }
}

/// An error to answer with: a code, a message and the code's `detail` number.
pub(crate) struct Fail(pub ErrorCode, pub String, pub u64);

impl From<log_core::Error> for Fail {
    fn from(e: log_core::Error) -> Self {
        Fail(code_of(&e), e.to_string(), 0)
    }
}

fn fail(code: ErrorCode, msg: impl Into<String>) -> Fail {
    Fail(code, msg.into(), 0)
}

pub(crate) async fn serve(
    shard: Rc<Shard>,
    req: Request,
    mut send: quinn::SendStream,
    recv: Option<quinn::RecvStream>,
    accepted: Instant,
) {
    let log_name = match &req {
        Request::CreateLog { name, .. } => Some(name.clone()),
        Request::Append(a) => Some(a.log.clone()),
        Request::Read(r) => Some(r.log.clone()),
        Request::Tail(t) => Some(t.log.clone()),
        Request::PutSnapshot(p) => Some(p.log.clone()),
        Request::Transfer { log, .. } => Some(log.clone()),
        _ => None,
    };
    let result = match req {
        Request::CreateLog { name, no_wait } => match not_leader(&shard, &name) {
            Some(f) => Err(f),
            None => create(&shard, &name, no_wait).await.map(|()| Response::Ok),
        },
        Request::Transfer { log, to } => transfer(&shard, &log, &to).map(|()| Response::Ok),
        Request::Append(a) => match append(&shard, a, &mut send, accepted).await {
            Ok((receipt, reached)) => {
                reply(&shard.common, &mut send, &Response::Receipt(receipt)).await;
                if let Some(reached) = reached {
                    let sent = reached.elapsed();
                    let m = &shard.common.metrics;
                    m.record_stage(shard.id, crate::metrics::Stage::Sent, sent);
                }
                return;
            }
            Err(f) => Err(f),
        },
        Request::Read(r) => match read(&shard, &r, &mut send).await {
            Ok(()) => return,
            Err(f) => Err(f),
        },
        Request::Tail(t) => match tail(&shard, &t, &mut send).await {
            Ok(()) => return,
            Err(f) => Err(f),
        },
        Request::Auth { .. } | Request::ListLogs | Request::Status => {
            unreachable!("served by the accepting shard")
        }
        Request::PutSnapshot(p) => match not_leader(&shard, &p.log) {
            Some(f) => Err(f),
            None => put_snapshot(&shard, p).await.map(|()| Response::Ok),
        },
        Request::GetSnapshot { log } => {
            // A snapshot transfer goes after the live streams of the same connection.
            let _ = send.set_priority(-1);
            get_snapshot(&shard, &log).await.map(Response::Snapshot)
        }
        Request::Replicate(r) => match (entry(&shard, &r.log), recv) {
            (Ok(e), Some(recv)) => {
                match crate::leader::serve(shard.clone(), e, r, &mut send, recv).await {
                    Ok(()) => return,
                    Err((code, msg, detail)) => Err(Fail(code, msg, detail)),
                }
            }
            (Err(f), _) => Err(f),
            (Ok(_), None) => Err(fail(
                ErrorCode::Internal,
                "replication stream without its receive side",
            )),
        },
        Request::EpochEnd { log, epoch } => entry(&shard, &log).map(|e| {
            let (epoch, end) = crate::leader::epoch_end(&e.log, epoch);
            Response::EpochEnd { epoch, end }
        }),
        Request::Checksum { log, from, until } => {
            entry(&shard, &log).and_then(|e| checksum(&e.log, from, until))
        }
        Request::Ack { .. } => Err(fail(
            ErrorCode::UnknownMessage,
            "ack is sent only on a replication stream",
        )),
    };
    match result {
        Ok(resp) => reply(&shard.common, &mut send, &resp).await,
        Err(Fail(code, msg, detail)) => {
            send_error(
                &shard.common,
                &mut send,
                code,
                &msg,
                detail,
                log_name.as_deref(),
            )
            .await
        }
    }
}

/// The crc32c of the stored batches holding records `from..until`, end to end: `from` and
/// `until` must be batch boundaries (the same on every replica, which store the same batches).
fn checksum(log: &Log, from: u64, until: u64) -> Result<Response, Fail> {
    let (start, end) = (log.start_offset().0, log.end_offset().0);
    if from > until || from < start || until > end {
        return Err(Fail(
            ErrorCode::OffsetOutOfRange,
            format!("records {from}..{until} are not all stored here ({start}..{end})"),
            start,
        ));
    }
    let (mut crc, mut bytes, mut at) = (0u32, 0u64, from);
    while at < until {
        let read = log
            .read(Offset(at), Offset(until), 4 << 20)
            .map_err(|e| fail(code_of(&e), e.to_string()))?;
        let Some(first) = read.batches.first() else {
            break;
        };
        if at == from && first.view().header().base_offset().0 != from {
            return Err(fail(
                ErrorCode::OffsetOutOfRange,
                format!("offset {from} is not a batch boundary here"),
            ));
        }
        for b in &read.batches {
            crc = crc32c::crc32c_append(crc, b);
            bytes += b.len() as u64;
        }
        at = read.next_offset.0;
    }
    if at != until {
        return Err(fail(
            ErrorCode::OffsetOutOfRange,
            format!("offset {until} is not a batch boundary here (the batches end at {at})"),
        ));
    }
    Ok(Response::Checksum { crc, bytes })
}

/// On a follower: the redirect to the leader that every write gets.
/// Why this node does not take writes to `log`, if it does not. With a controller, a node
/// takes them for the logs it leads while its lease holds (see
/// [`crate::controller::node::NodeController::lease_ok`]) and no planned transfer is under way.
fn not_leader(shard: &Shard, log: &str) -> Option<Fail> {
    use node_core::log::NotLeader;
    if let (Some(control), Some(e)) = (&shard.common.control, shard.get(log)) {
        let leading_in = e.leading().map(|_| e.epoch.0);
        let lease_ok = control.lease_ok();
        // A log not on record yet (a configured leader registers its new logs): its role
        // decides.
        let record = control.log_record(log);
        let verdict =
            node_core::log::may_write(&shard.common.node_id, leading_in, record.as_ref(), lease_ok);
        return verdict.err().map(|n| {
            let msg = match n {
                NotLeader::Transferring { to } => {
                    format!("the leadership of log {log:?} is moving to {to}; retry in a moment")
                }
                NotLeader::NoLease => "this node has lost contact with the controller: it takes no writes until it is back".into(),
                NotLeader::NotLeading => {
                    format!("this node does not lead log {log:?}; write to its leader")
                }
            };
            Fail(ErrorCode::NotLeader, msg, 0)
        });
    }
    match shard.common.role {
        Role::Follower(leader) => Some(Fail(
            ErrorCode::NotLeader,
            format!("this node follows {leader}; write there"),
            0,
        )),
        _ => None,
    }
}

/// Hand a planned leadership transfer of `log` to the controller, from any node.
fn transfer(shard: &Shard, log: &str, to: &str) -> Result<(), Fail> {
    let Some(control) = &shard.common.control else {
        return Err(fail(
            ErrorCode::UnknownMessage,
            "this node runs no controller ([controller] members): leadership is fixed by configuration",
        ));
    };
    let Some(r) = control.log_record(log) else {
        return Err(fail(
            ErrorCode::LogNotFound,
            format!("the controller does not know log {log:?}"),
        ));
    };
    let Some(leader) = r.leader else {
        return Err(fail(
            ErrorCode::NotLeader,
            format!("log {log:?} has no leader to transfer from"),
        ));
    };
    let to = if to.is_empty() {
        // A member of the sync set holds everything already; any other replica is waited for
        // until it has caught up.
        let other = r.replicas.iter().find(|n| **n != leader);
        match r.sync_set.first().or(other) {
            Some(t) => t.clone(),
            None => {
                return Err(fail(
                    ErrorCode::NotEnoughReplicas,
                    format!("log {log:?} has no other replica to transfer to"),
                ))
            }
        }
    } else {
        to.to_string()
    };
    if to == leader || !r.replicas.contains(&to) {
        return Err(fail(
            ErrorCode::Malformed,
            format!("{to:?} is not another replica of log {log:?} (it leads, or does not hold it)"),
        ));
    }
    control.transfer(log, r.epoch, &to);
    Ok(())
}

fn entry(shard: &Shard, name: &str) -> Result<Rc<LogEntry>, Fail> {
    shard.get(name).ok_or_else(|| {
        if shard.creating.borrow().contains(name) {
            fail(
                ErrorCode::Busy,
                format!("log {name:?} is being created or is changing role (its leadership moved); retry"),
            )
        } else {
            fail(ErrorCode::LogNotFound, format!("no log named {name:?}"))
        }
    })
}

async fn create(shard: &Rc<Shard>, name: &str, no_wait: bool) -> Result<(), Fail> {
    log_core::validate_log_name(name)?;
    let dir = shard.logs_dir().join(name);
    if shard.get(name).is_some() || shard.creating.borrow().contains(name) || dir.exists() {
        return Err(fail(
            ErrorCode::LogExists,
            format!("log {name:?} already exists"),
        ));
    }
    let count = &shard.common.log_count;
    let max = shard.common.config.limits.logs_max;
    if count.fetch_add(1, Ordering::Relaxed) >= max {
        count.fetch_sub(1, Ordering::Relaxed);
        return Err(fail(
            ErrorCode::LimitExceeded,
            format!("the node holds logs_max = {max} logs"),
        ));
    }
    // Opening awaits (the first segment is prepared); the name stays reserved meanwhile, so a
    // concurrent create gets `log_exists` and other requests `log_not_found`, never a half log.
    shard.creating.borrow_mut().insert(name.to_string());
    let opened = shard.open_log(name).await;
    shard.creating.borrow_mut().remove(name);
    if let Err(e) = opened {
        count.fetch_sub(1, Ordering::Relaxed);
        // Nothing was stored: remove what the failed open left, so a retry can succeed.
        if let Err(rm) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(log = name, error = %rm, "could not remove a log that failed to open");
        }
        return Err(fail(ErrorCode::StorageFailed, e.to_string()));
    }
    tracing::info!(log = name, "log created");
    // The log is writable at the durability its configuration promises only once its sync
    // set is full and on record with the controller: followers learn of a new log within a
    // second, and the controller records them soon after. Answer then, so that an acks=sync
    // append right after the create finds it full instead of not_enough_replicas.
    let Some(repl) = shard.get(name).and_then(|e| e.leading()) else {
        return Ok(());
    };
    if no_wait {
        return Ok(());
    }
    let wait = Duration::from_millis(shard.common.config.replication.create_wait_ms);
    if repl.wait_writable(Instant::now() + wait).await {
        return Ok(());
    }
    let (missing, need, reject) = {
        let st = repl.state.borrow();
        let c = st.config();
        let reject = c.insufficient == protocol::replication::Insufficient::Reject;
        (st.sync_missing().join("; "), c.sync_replicas, reject)
    };
    if !reject {
        tracing::warn!(log = name, missing, "created without a full sync set: acks=sync appends are acknowledged degraded until it fills");
        return Ok(());
    }
    tracing::warn!(
        log = name,
        missing,
        "created, but not writable at acks=sync in time"
    );
    Err(fail(
        ErrorCode::NotEnoughReplicas,
        format!(
            "log {name:?} was created, but is not writable at acks=sync after create_wait_ms = {} ms: its sync set needs {need} follower(s) ({missing})",
            wait.as_millis()
        ),
    ))
}

async fn put_snapshot(shard: &Shard, p: protocol::Snapshot) -> Result<(), Fail> {
    let e = entry(shard, &p.log)?;
    if crc32c::crc32c(&p.data) != p.crc32c {
        return Err(fail(
            ErrorCode::Malformed,
            "the snapshot's crc32c does not match its data",
        ));
    }
    let (start, end) = (e.log.start_offset().0, e.log.next_offset().0);
    let admitted = e
        .snapshot
        .get()
        .admit(p.offset, start, end, e.committed().0);
    if let Err(refusal) = admitted {
        let (code, detail) = match refusal {
            // Below the start, the records a reader needs after the snapshot are gone.
            SnapshotRefusal::OutOfRange { start, .. } => (ErrorCode::OffsetOutOfRange, start),
            SnapshotRefusal::NotCommitted { committed, .. } => (ErrorCode::Behind, committed),
            SnapshotRefusal::Backward { latest } => (ErrorCode::OffsetConflict, latest),
        };
        return Err(Fail(code, refusal.to_string(), detail));
    }
    store_snapshot(shard, &e, &p.log, p.offset, p.data).await
}

/// Store a snapshot durably (off the shard thread), then make it the log's latest and keep the
/// records after it from retention.
pub(crate) async fn store_snapshot(
    shard: &Shard,
    e: &LogEntry,
    log: &str,
    offset: u64,
    data: Bytes,
) -> Result<(), Fail> {
    let dir = shard.snapshots_dir(log);
    let bytes = data.len();
    tokio::task::spawn_blocking(move || crate::snapshots::write(&dir, offset, &data))
        .await
        .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| fail(ErrorCode::StorageFailed, e.to_string()))?;
    let mut snapshots = e.snapshot.get();
    if snapshots.stored(offset) {
        e.snapshot.set(snapshots);
        e.log.pin(crate::shard::SNAPSHOT_PIN, Offset(offset));
    }
    tracing::info!(log, offset, bytes, "snapshot stored");
    Ok(())
}

async fn get_snapshot(shard: &Shard, log: &str) -> Result<protocol::Snapshot, Fail> {
    let e = entry(shard, log)?;
    let Some(offset) = e.snapshot.get().latest() else {
        return Err(fail(
            ErrorCode::SnapshotNotFound,
            format!("log {log:?} has no snapshot here"),
        ));
    };
    let dir = shard.snapshots_dir(log);
    let (data, crc32c) = tokio::task::spawn_blocking(move || crate::snapshots::load(&dir, offset))
        .await
        .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| fail(ErrorCode::StorageFailed, e.to_string()))?;
    Ok(protocol::Snapshot {
        log: log.to_string(),
        offset,
        crc32c,
        data,
    })
}

/// Wait for `fut` until `deadline`; `None` if the deadline passed first.
async fn until<T>(deadline: Instant, fut: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout_at(deadline.into(), fut).await.ok()
}

async fn wait_level(log: &Log, level: Acks, next: Offset, deadline: Instant) -> Result<(), Fail> {
    let waited = match level {
        Acks::None => until(deadline, log.wait_written(next)).await,
        _ => until(deadline, log.wait_flushed(next)).await,
    };
    match waited {
        Some(r) => Ok(r?),
        None => Err(fail(
            ErrorCode::Timeout,
            format!(
                "level {} not reached in time; the append may be stored",
                level.name()
            ),
        )),
    }
}

/// Whether the client has given up on this stream (stopped reading it, or lost the
/// connection). A request it abandoned must not be stored afterwards: the client may already
/// have resent or renumbered it.
fn abandoned(send: &mut quinn::SendStream) -> bool {
    use futures_util::FutureExt;
    send.stopped().now_or_never().is_some()
}

/// Store an append and wait for its level. Returns its receipt and, unless it was a duplicate,
/// when the level was reached (the start of the `sent` stage).
async fn append(
    shard: &Shard,
    a: AppendRequest,
    send: &mut quinn::SendStream,
    accepted: Instant,
) -> Result<(Receipt, Option<Instant>), Fail> {
    let started = Instant::now();
    if let Some(f) = not_leader(shard, &a.log) {
        return Err(f);
    }
    let e = entry(shard, &a.log)?;
    let repl = e.leading();
    match &repl {
        None if matches!(a.acks, Acks::Sync | Acks::Quorum) => {
            return Err(fail(
                ErrorCode::NotEnoughReplicas,
                format!(
                    "acks={} needs followers; this node runs standalone (no replicas), so only none and leader are available",
                    a.acks.name()
                ),
            ))
        }
        Some(r) => match r.admit(a.acks, Duration::from_millis(shard.common.config.replication.create_wait_ms)) {
            Ok(()) => {}
            Err(node_core::log::LevelRefusal::Forming { missing }) => {
                return Err(fail(
                    ErrorCode::Unavailable,
                    format!(
                        "this node took the lead of log {:?} {} ms ago and its sync set is still forming ({}); nothing was stored; retry in a moment",
                        a.log,
                        r.leading_for().as_millis(),
                        missing.join("; ")
                    ),
                ));
            }
            Err(node_core::log::LevelRefusal::NotEnoughReplicas { have, need }) => {
                return Err(fail(
                    ErrorCode::NotEnoughReplicas,
                    format!(
                        "acks={} needs {need} replicas in step with the leader, {have} are (insufficient_replicas = reject); nothing was stored",
                        a.acks.name()
                    ),
                ));
            }
        },
        None => {}
    }
    let timeout = match a.timeout_ms {
        0 => shard.common.config.append_timeout(),
        ms => Duration::from_millis(ms as u64),
    };
    let deadline = started + timeout;
    let count = a.records.len() as u32;
    let bytes: u64 = a.records.iter().map(|r| r.len() as u64).sum();
    // The checks and the append happen without an await in between, so no other append on
    // this shard can slip in: conditional and idempotent appends are atomic.
    let (appended, duplicate) = loop {
        // The producer's decision first: a retry of a stored conditional append is a
        // duplicate, not a conflict.
        let end = e.log.next_offset().0;
        match e
            .producers
            .borrow_mut()
            .admit(a.producer, count, a.expected_offset, end)
        {
            Admission::Append => {}
            Admission::Duplicate(s) => break (s, true),
            refused => return Err(refusal(&a, refused)),
        }
        // The decoder refuses producer id 0, so `NonZeroU64::new` always succeeds here.
        let producer = a.producer.and_then(|(pid, first_sequence)| {
            Some(ProducerMeta {
                producer_id: std::num::NonZeroU64::new(pid)?,
                first_sequence,
            })
        });
        // The request may have waited (forwarding queue, a full write queue): store it only if
        // the client still waits for the answer.
        if abandoned(send) {
            return Err(fail(ErrorCode::Timeout, "the client abandoned the request"));
        }
        match e.log.try_append_producer(e.epoch, producer, &a.records) {
            Ok(done) => {
                if let Some(r) = &repl {
                    r.appended(done.next);
                }
                let stored = StoredAppend {
                    first: done.first.0,
                    next: done.next.0,
                    epoch: e.epoch.0,
                };
                if let Some((pid, seq)) = a.producer {
                    e.producers.borrow_mut().record(pid, seq, count, stored);
                }
                break (stored, false);
            }
            Err(log_core::Error::Backpressure { .. }) => {
                if until(deadline, e.log.wait_room()).await.is_none() {
                    return Err(fail(ErrorCode::Busy, "the log's write queue stayed full"));
                }
            }
            Err(err) => return Err(err.into()),
        }
    };
    let queued = Instant::now();
    // When the leader's own fdatasync covered the append (for the flush latency histogram and
    // the leader_flush stage), when acks=sync/quorum was reached (the commit stage), and when
    // the append's level was reached (the start of the sent stage).
    let flushed_at;
    let mut committed_at = None;
    let reached;
    let next = Offset(appended.next);
    let (level, holders, degraded) = match (&repl, a.acks) {
        (Some(r), Acks::Sync | Acks::Quorum) => {
            // The leader's own flush counts too: wait for it first (it is usually the shorter).
            wait_level(&e.log, Acks::Leader, next, deadline).await?;
            flushed_at = Some(Instant::now());
            r.observe(&a.log, &shard.common, &e.log);
            let waited = r.wait(&a.log, &shard.common, a.acks, next, deadline).await;
            reached = Instant::now();
            match waited {
                Ok((holders, true)) => (Acks::Leader, holders, true),
                Ok((holders, false)) => {
                    committed_at = Some(reached);
                    (a.acks, holders, false)
                }
                Err(crate::replication::WaitFail::Deadline) => {
                    return Err(fail(
                        ErrorCode::Timeout,
                        format!(
                            "acks={} not reached in time; the append is stored on the leader and may be replicated",
                            a.acks.name()
                        ),
                    ))
                }
                Err(crate::replication::WaitFail::Deposed) => {
                    return Err(fail(
                        ErrorCode::Timeout,
                        format!(
                            "acks={}: this node stopped leading the log while the append waited; it is stored here, and a new leader may or may not have it",
                            a.acks.name()
                        ),
                    ))
                }
                Err(crate::replication::WaitFail::Lease) => {
                    return Err(fail(
                        ErrorCode::Timeout,
                        format!(
                            "acks={}: this node lost contact with the controller while the append waited; it is stored here, and another node may lead the log by now, with or without it",
                            a.acks.name()
                        ),
                    ))
                }
                Err(crate::replication::WaitFail::Replicas { have, need }) => {
                    return Err(fail(
                        ErrorCode::Timeout,
                        format!(
                            "acks={}: replicas left while waiting ({have} of {need}); the append is stored on the leader, its replication is unknown",
                            a.acks.name()
                        ),
                    ))
                }
            }
        }
        _ => {
            wait_level(&e.log, a.acks, next, deadline).await?;
            reached = Instant::now();
            flushed_at = (a.acks != Acks::None).then_some(reached);
            let holders = match (&repl, a.acks) {
                (_, Acks::None) => Vec::new(),
                (Some(r), _) => {
                    r.observe(&a.log, &shard.common, &e.log);
                    r.holders(next)
                }
                (None, _) => vec![shard.common.node_id.clone()],
            };
            (a.acks, holders, false)
        }
    };
    // The node must still be able to say so: a leader that lost contact with the controller
    // may have been replaced meanwhile; it must still lead the log in this epoch (another
    // leader's log need not hold the append); and while a planned transfer is under way the
    // target, which may take over at any moment from what it holds, must hold the append.
    let control = shard.common.control.as_ref();
    let record = control.and_then(|c| c.log_record(&a.log));
    let lease_ok = control.is_none_or(|c| c.lease_ok());
    if let Err(u) = node_core::log::confirm(
        &shard.common.node_id,
        e.epoch.0,
        record.as_ref(),
        lease_ok,
        a.acks,
        &holders,
    ) {
        use node_core::log::Unconfirmed;
        let msg = match u {
            Unconfirmed::NoLease => "this node lost contact with the controller while the append waited; it is stored here, and a new leader may or may not have it".to_string(),
            Unconfirmed::Deposed => "this node stopped leading the log while the append waited; it is stored here, and the new leader may or may not have it".to_string(),
            Unconfirmed::TargetLacks { to } => format!("the leadership is moving to {to}, which does not hold this append yet; it is stored here, and the new leader may or may not have it"),
        };
        return Err(fail(ErrorCode::Timeout, msg));
    }
    let m = &shard.common.metrics;
    if duplicate {
        m.c.append_duplicates.fetch_add(1, Ordering::Relaxed);
    } else {
        m.c.appends.fetch_add(1, Ordering::Relaxed);
        m.c.append_records
            .fetch_add(count as u64, Ordering::Relaxed);
        m.c.append_bytes.fetch_add(bytes, Ordering::Relaxed);
        // The write that carried the append, as the log timed it: queued -> submitted ->
        // written, then on to the leader's flush seen.
        let write = flushed_at.and_then(|flushed| {
            let w = e.log.write_times(next)?;
            Some([
                w.submitted.saturating_duration_since(queued),
                w.written.saturating_duration_since(w.submitted),
                flushed.saturating_duration_since(w.written),
            ])
        });
        m.record_append(
            shard.id,
            crate::metrics::AppendTimes {
                total: started.elapsed(),
                request: started.saturating_duration_since(accepted),
                receive: queued.saturating_duration_since(started),
                write,
                flush: flushed_at.map(|f| f.saturating_duration_since(queued)),
                replicated: committed_at
                    .zip(flushed_at)
                    .map(|(c, f)| c.saturating_duration_since(f)),
                commit: committed_at.map(|c| c.saturating_duration_since(queued)),
            },
        );
    }
    let mut flags = if duplicate { RECEIPT_DUPLICATE } else { 0 };
    if degraded {
        flags |= RECEIPT_DEGRADED;
    }
    let receipt = Receipt {
        first: appended.first,
        next: appended.next,
        epoch: appended.epoch,
        level,
        flags,
        replicas: holders.len() as u16,
        holders,
    };
    // A duplicate's stages are not recorded: the original append's were.
    Ok((receipt, (!duplicate).then_some(reached)))
}

/// The answer to an append that [`Admission`] refused.
fn refusal(a: &AppendRequest, refused: Admission) -> Fail {
    let (pid, seq) = a.producer.unwrap_or_default();
    match refused {
        Admission::SequenceGap { expected } => Fail(
            ErrorCode::SequenceGap,
            format!("producer {pid:#x}: sequence {seq} skips ahead of {expected}"),
            expected,
        ),
        Admission::Stale { expected } => Fail(
            ErrorCode::StaleSequence,
            format!(
                "producer {pid:#x}: sequence {seq} is older than remembered (next is {expected})"
            ),
            expected,
        ),
        Admission::OffsetConflict { actual } => Fail(
            ErrorCode::OffsetConflict,
            format!(
                "expected next offset {}, the log is at {actual}",
                a.expected_offset.unwrap_or_default()
            ),
            actual,
        ),
        Admission::Append | Admission::Duplicate(_) => unreachable!("not a refusal"),
    }
}

/// Wait for a log to be created here (a follower creates the leader's new logs within
/// `follow::LIST_INTERVAL`), until `deadline`.
async fn log_appearing(shard: &Shard, name: &str, deadline: Instant) -> Option<Rc<LogEntry>> {
    loop {
        if let Some(e) = shard.get(name) {
            return Some(e);
        }
        if Instant::now() >= deadline {
            return None;
        }
        let nap = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        tokio::time::sleep(nap).await;
    }
}

/// Wait until the committed horizon reaches `target`, or `deadline`. Returns whether it did.
async fn wait_committed(e: &LogEntry, target: Offset, deadline: Instant) -> bool {
    loop {
        let changed = e.changed.notified();
        if e.committed() >= target {
            return true;
        }
        if until(deadline, changed).await.is_none() {
            return false;
        }
    }
}

fn check_from(log: &Log, from: u64) -> Result<(), Fail> {
    let (start, end) = (log.start_offset().0, log.next_offset().0);
    if from < start || from > end {
        return Err(Fail(
            ErrorCode::OffsetOutOfRange,
            format!("offset {from} is outside the log's range {start}..{end}"),
            start,
        ));
    }
    Ok(())
}

/// Write one Batches frame: the prefix, then the batch bytes straight from the mappings.
async fn send_batches(
    shard: &Shard,
    e: &LogEntry,
    send: &mut quinn::SendStream,
    from: Offset,
    bytes_max: u32,
) -> Result<Option<Offset>, Fail> {
    let log = &e.log;
    let committed = e.committed();
    let cap = bytes_max.clamp(1, shard.common.config.limits.read_bytes_max) as usize;
    let read = log.read(from, committed, cap)?;
    let len: usize = read.batches.iter().map(|b| b.len()).sum();
    let mut chunks: Vec<Bytes> = Vec::with_capacity(read.batches.len() + 1);
    chunks.push(Bytes::copy_from_slice(&protocol::encode_batches_prefix(
        read.next_offset.0,
        committed.0,
        len,
    )));
    let any = !read.batches.is_empty();
    chunks.extend(read.batches.into_iter().map(|b| b.into_bytes()));
    if !write_all(&shard.common, send, &mut chunks).await {
        return Ok(None);
    }
    let m = &shard.common.metrics.c;
    m.reads.fetch_add(1, Ordering::Relaxed);
    m.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
    Ok(Some(if any { read.next_offset } else { from }))
}

async fn read(shard: &Shard, r: &ReadRequest, send: &mut quinn::SendStream) -> Result<(), Fail> {
    let wait =
        Duration::from_millis(r.wait_ms.min(shard.common.config.limits.read_wait_max_ms) as u64);
    let deadline = Instant::now() + wait;
    let e = match entry(shard, &r.log) {
        Ok(e) => e,
        // A follower may not have created a new log yet: for a read that names an offset it
        // must reach, that is being behind, not a missing log.
        Err(_)
            if r.min_offset > 0
                && (shard.common.control.is_some()
                    || matches!(shard.common.role, Role::Follower(_))) =>
        {
            match log_appearing(shard, &r.log, deadline).await {
                Some(e) => e,
                None => {
                    return Err(Fail(
                        ErrorCode::Behind,
                        format!(
                            "this follower does not hold log {:?} yet, below min_offset {}",
                            r.log, r.min_offset
                        ),
                        0,
                    ))
                }
            }
        }
        Err(f) => return Err(f),
    };
    let waited = async {
        if r.min_offset > 0 && !wait_committed(&e, Offset(r.min_offset), deadline).await {
            return Ok(false);
        }
        check_from(&e.log, r.from)?;
        if e.committed().0 <= r.from && !wait.is_zero() {
            wait_committed(&e, Offset(r.from + 1), deadline).await;
        }
        Ok::<bool, Fail>(true)
    };
    // A long poll ends early if the client goes away, so it never holds the log for nothing.
    let reached = tokio::select! {
        r = waited => r?,
        _ = send.stopped() => return Ok(()),
    };
    if !reached {
        let committed = e.committed().0;
        return Err(Fail(
            ErrorCode::Behind,
            format!(
                "this node has committed up to {committed}, below min_offset {}",
                r.min_offset
            ),
            committed,
        ));
    }
    if send_batches(shard, &e, send, Offset(r.from), r.bytes_max)
        .await?
        .is_some()
    {
        let _ = send.finish();
    }
    Ok(())
}

async fn tail(shard: &Shard, t: &TailRequest, send: &mut quinn::SendStream) -> Result<(), Fail> {
    let e = entry(shard, &t.log)?;
    check_from(&e.log, t.from)?;
    let mut pos = Offset(t.from);
    loop {
        if e.committed() <= pos {
            // Wait for new records, or for the client to go away.
            tokio::select! {
                _ = wait_committed(&e, pos.plus(1), Instant::now() + Duration::from_secs(3600)) => {}
                _ = send.stopped() => return Ok(()),
            }
            continue;
        }
        match send_batches(shard, &e, send, pos, t.bytes_max).await? {
            Some(next) => pos = next,
            None => return Ok(()),
        }
    }
}
