//! One replication session for one log over a peer connection to the leader: find where the
//! local log agrees with the leader's (KIP-101), truncate a divergent suffix, ask for
//! everything after the local end, store each frame through [`Replica::apply`], and
//! acknowledge the durable offset as the local fdatasync moves. A session can report how long
//! frames spend in each [`FollowerStage`] through [`SessionConfig::stages`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use log_core::{Log, Offset};
use protocol::replication::{after_epoch_end, EmptyLeaderHistory, Follower, LocalLog, Step};
use protocol::{ErrorCode, Limits, ProtocolError, ReplicateRequest, Request, Response};
use tokio::sync::Notify;

use crate::{ApplyError, Replica};

/// Who is asking, how big a frame may be, and who hears the stage latencies.
pub struct SessionConfig {
    /// The follower's node id (its certificate must name it).
    pub node_id: String,
    /// The address clients reach this follower at.
    pub addr: String,
    pub limits: Limits,
    /// Called with each stage latency the session measures (see [`FollowerStage`]); `None`
    /// measures nothing.
    pub stages: Option<StageObserver>,
    /// Where a divergent suffix is moved before it is truncated (see [`crate::quarantine`]);
    /// `None`: it is only truncated.
    pub quarantine_dir: Option<std::path::PathBuf>,
    /// Told about every quarantine made.
    pub on_quarantine: Option<QuarantineObserver>,
}

/// Hears about each divergent suffix a session moved to quarantine.
pub type QuarantineObserver = Rc<dyn Fn(&crate::quarantine::Report)>;

/// The stages a replicated frame goes through on a follower, as reported to a
/// [`StageObserver`]. Only frames that carry records are timed (a frame that only moves the
/// commit offset stores nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowerStage {
    /// From a `Replicated` frame read whole off the stream (and decoded) to the frame stored:
    /// [`Replica::apply`] returned, its batches are queued into the local log (this includes
    /// waiting for room in a full write queue).
    Receive,
    /// From a frame stored to the local fdatasync covering its last record: the
    /// acknowledgement loop sees the log's flush offset reach the frame's end. One report per
    /// frame; at most [`FLUSH_TIMED_MAX`] frames per session wait to be timed, older ones are
    /// dropped unmeasured.
    Flush,
}

/// Hears each [`FollowerStage`] latency of a session. It is called on the session's own task
/// (never from another thread), once per timed frame and stage, so it should be cheap.
pub type StageObserver = Rc<dyn Fn(FollowerStage, Duration)>;

/// Most stored frames per session whose store time is kept for [`FollowerStage::Flush`]; when
/// more wait for the fdatasync, the oldest is dropped (not measured).
pub const FLUSH_TIMED_MAX: usize = 4096;

/// Frames stored and not yet covered by the local fdatasync: (end offset, when stored), oldest
/// first. Shared by a session's receive and acknowledgement loops, which run in one task.
type StoredFrames = RefCell<VecDeque<(u64, Instant)>>;

/// How a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The leader no longer stores what this follower needs next: the local log must be
    /// replaced by one that starts at the leader's start (`Some`), or, when the divergence
    /// point lies before the local start, by an empty one (`None`; the next session learns
    /// the leader's start).
    Bootstrap { start: Option<u64> },
    /// The leader ended the stream (it is shutting down, or a newer stream replaced this one).
    Ended,
}

/// Why a session failed. Nothing a leader sent that failed validation was written.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the leader allowed no new stream on the connection within {0:?} (its stream limit for peers is reached)")]
    NoStream(Duration),
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("the leader ended the stream without an answer")]
    NoAnswer,
    #[error("the leader answered {code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("bad frame from the leader: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("unexpected answer from the leader: {0:?}")]
    Unexpected(Box<Response>),
    #[error("replicated frame refused: {0}")]
    Apply(#[from] ApplyError),
    #[error("storage: {0}")]
    Storage(#[from] log_core::Error),
    /// The leader's epoch history is empty while this follower holds records after its
    /// epoch `asked`: truncating them to match could lose acknowledged records.
    #[error(transparent)]
    EmptyLeaderHistory(#[from] EmptyLeaderHistory),
    #[error("the leader's snapshot of {log} at offset {offset} does not match its crc32c")]
    SnapshotChecksum { log: String, offset: u64 },
    #[error("cannot quarantine the divergent suffix, so it is not truncated: {0}")]
    Quarantine(#[from] crate::quarantine::SaveError),
}

impl From<frames::ReadFail> for SessionError {
    fn from(e: frames::ReadFail) -> Self {
        match e {
            frames::ReadFail::Stream(e) => SessionError::Read(e),
            frames::ReadFail::Protocol(e) => SessionError::Protocol(e),
        }
    }
}

async fn write_frame(send: &mut quinn::SendStream, req: &Request) -> Result<(), SessionError> {
    Ok(frames::write(send, &frames::encode_request(req)).await?)
}

fn refused(resp: Response) -> SessionError {
    match resp {
        Response::Error(e) => SessionError::Refused {
            code: e.code,
            message: e.message,
        },
        other => SessionError::Unexpected(Box::new(other)),
    }
}

/// How long a follower waits for the leader to let it open one more stream on their
/// connection. A leader allows a stream per log it replicates plus room for requests
/// (`logs_max` + `logs_max` / 8 + `streams_per_connection_max`); a wait this long means that
/// room is gone, and the connection is given up (and made again) rather than waited on forever.
pub const OPEN_STREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A new stream on the peer connection, within [`OPEN_STREAM_TIMEOUT`].
async fn open_stream(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream), SessionError> {
    match tokio::time::timeout(OPEN_STREAM_TIMEOUT, conn.open_bi()).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            let e = SessionError::NoStream(OPEN_STREAM_TIMEOUT);
            conn.close(0u32.into(), e.to_string().as_bytes());
            Err(e)
        }
    }
}

/// One request and its one answer, on a new stream of the peer connection.
pub async fn exchange(
    conn: &quinn::Connection,
    req: &Request,
    limits: &Limits,
) -> Result<Response, SessionError> {
    let (mut send, mut recv) = open_stream(conn).await?;
    write_frame(&mut send, req).await?;
    let _ = send.finish();
    frames::FrameReader::responses()
        .response(&mut recv, limits)
        .await?
        .ok_or(SessionError::NoAnswer)
}

/// The leader's logs (those whose names are not valid here are left out).
pub async fn list_logs(
    conn: &quinn::Connection,
    limits: &Limits,
) -> Result<Vec<protocol::LogInfo>, SessionError> {
    match exchange(conn, &Request::ListLogs, limits).await? {
        Response::Logs(logs) => Ok(logs
            .into_iter()
            .filter(|l| log_core::validate_log_name(&l.name).is_ok())
            .collect()),
        other => Err(refused(other)),
    }
}

/// The leader's latest application snapshot of `log`, checked against its crc32c.
pub async fn fetch_snapshot(
    conn: &quinn::Connection,
    log: &str,
    limits: &Limits,
) -> Result<protocol::Snapshot, SessionError> {
    let req = Request::GetSnapshot {
        log: log.to_string(),
    };
    match exchange(conn, &req, limits).await? {
        Response::Snapshot(s) if s.log == log => match crc32c::crc32c(&s.data) == s.crc32c {
            true => Ok(s),
            false => Err(SessionError::SnapshotChecksum {
                log: log.to_string(),
                offset: s.offset,
            }),
        },
        other => Err(refused(other)),
    }
}

/// Ask the leader where `epoch` ends in its log.
async fn ask_epoch_end(
    conn: &quinn::Connection,
    log: &str,
    epoch: u64,
    limits: &Limits,
) -> Result<(u64, u64), SessionError> {
    let req = Request::EpochEnd {
        log: log.to_string(),
        epoch,
    };
    match exchange(conn, &req, limits).await? {
        Response::EpochEnd { epoch, end } => Ok((epoch, end)),
        other => Err(refused(other)),
    }
}

/// Report [`FollowerStage::Flush`] for every stored frame that the local durable offset
/// `flushed` now covers.
fn time_flushed(stored: &StoredFrames, flushed: u64, observe: &StageObserver) {
    let now = Instant::now();
    loop {
        let at = {
            let mut q = stored.borrow_mut();
            match q.front() {
                Some(&(end, at)) if end <= flushed => {
                    q.pop_front();
                    at
                }
                _ => return,
            }
        };
        observe(FollowerStage::Flush, now.saturating_duration_since(at));
    }
}

/// Acknowledge the local durable offset to the leader each time the local fdatasync moves it
/// (and time the stored frames it covers, if `timed`). Returns only with an error (the stream
/// or the log failed).
async fn acknowledge(
    log: &Log,
    state: &RefCell<Follower>,
    send: &mut quinn::SendStream,
    changed: &Notify,
    timed: Option<(&StoredFrames, &StageObserver)>,
) -> Result<Outcome, SessionError> {
    loop {
        let flushed = log.flush_offset();
        if let Some((stored, observe)) = timed {
            time_flushed(stored, flushed.0, observe);
        }
        // What to acknowledge is the replication state's decision: what is durable here.
        let ack = {
            let mut st = state.borrow_mut();
            let written = st.written(log.end_offset().0);
            st.flushed(flushed.0).or(written)
        };
        if let Some(durable) = ack {
            write_frame(send, &Request::Ack { durable }).await?;
            changed.notify_waiters();
        }
        if log.next_offset() > flushed {
            log.wait_flushed(flushed.plus(1)).await?;
        } else {
            log.wait_appended(flushed).await?;
        }
    }
}

/// Run one session for `log` (named `name` on the leader). `commit` receives the leader's
/// commit offset as frames bring it, and `changed` is notified whenever it or the local
/// durable offset moves. Returns when the stream or connection ends.
pub async fn run(
    conn: &quinn::Connection,
    name: &str,
    log: &Log,
    cfg: &SessionConfig,
    commit: &Cell<u64>,
    changed: &Notify,
) -> Result<Outcome, SessionError> {
    // 1. Agree with the leader on where the logs diverge, if they may (KIP-101).
    if let Some(e) = log.last_epoch() {
        let (leader_epoch, end) = ask_epoch_end(conn, name, e.0, &cfg.limits).await?;
        let local = LocalLog {
            start: log.start_offset().0,
            end: log.next_offset().0,
            last_epoch: Some(e.0),
            commit: commit.get(),
        };
        match after_epoch_end(local, leader_epoch, end)? {
            Step::Truncate { to } => {
                tracing::warn!(
                    log = name,
                    from = to,
                    to = local.end,
                    "truncating a divergent suffix"
                );
                if let Some(dir) = &cfg.quarantine_dir {
                    match crate::quarantine::save(log, name, to, dir) {
                        Ok(Some(r)) => {
                            tracing::warn!(log = name, from = r.from, to = r.to, records = r.records, epochs = ?r.epochs, file = %r.file.display(), "the divergent suffix is in quarantine");
                            if let Some(f) = &cfg.on_quarantine {
                                f(&r);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                log.truncate_after(Offset(to)).await?;
            }
            Step::Bootstrap => return Ok(Outcome::Bootstrap { start: None }),
            Step::Fetch { .. } | Step::AskEpochEnd { .. } => {}
        }
    }

    // 2. Ask for everything after the local end.
    let mut replica = Replica::new(log.clone());
    let from = log.next_offset().0;
    let (mut send, mut recv) = open_stream(conn).await?;
    write_frame(
        &mut send,
        &Request::Replicate(ReplicateRequest {
            log: name.to_string(),
            follower: cfg.node_id.clone(),
            addr: cfg.addr.clone(),
            from,
            last_epoch: log.last_epoch().map_or(0, |e| e.0),
            durable: log.flush_offset().0,
        }),
    )
    .await?;

    // 3. Store frames as they come; acknowledge as the local fdatasync moves.
    let stored = StoredFrames::default();
    let state = replica.shared_state();
    let receive = async {
        let mut reader = frames::FrameReader::responses();
        loop {
            match reader.response(&mut recv, &cfg.limits).await? {
                Some(Response::Replicated(frame)) => {
                    let read = Instant::now();
                    let end = replica.apply(&frame).await?;
                    // Frames that only move the commit offset store nothing to time.
                    match &cfg.stages {
                        Some(observe) if !frame.batches.is_empty() => {
                            let now = Instant::now();
                            observe(FollowerStage::Receive, now.saturating_duration_since(read));
                            let mut q = stored.borrow_mut();
                            if q.len() >= FLUSH_TIMED_MAX {
                                q.pop_front();
                            }
                            q.push_back((end, now));
                        }
                        _ => {}
                    }
                    if frame.commit > commit.get() {
                        commit.set(frame.commit);
                        changed.notify_waiters();
                    }
                }
                Some(Response::Error(e))
                    if e.code == ErrorCode::OffsetOutOfRange && from < e.detail =>
                {
                    return Ok(Outcome::Bootstrap {
                        start: Some(e.detail),
                    });
                }
                Some(other) => return Err(refused(other)),
                None => return Ok(Outcome::Ended),
            }
        }
    };
    let acks = acknowledge(
        log,
        &state,
        &mut send,
        changed,
        cfg.stages.as_ref().map(|o| (&stored, o)),
    );
    tokio::select! {
        r = receive => r,
        r = acks => r,
    }
}
