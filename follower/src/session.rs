//! One replication session for one log over a peer connection to the leader, as the node
//! core's session (`node_core::follow::Session`) directs it: find where the local log agrees
//! with the leader's (KIP-101), truncate a divergent suffix, ask for everything after the
//! local end, store each frame through [`Replica::apply`], acknowledge the durable offset as
//! the local fdatasync moves, and clear the recovering marker once a recovering copy has
//! caught up. A session can report how long
//! frames spend in each [`FollowerStage`] through [`SessionConfig::stages`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use log_core::{Log, Offset};
use node_core::follow::{Command, Session};
use protocol::replication::EmptyLeaderHistory;
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

/// The local copy of `log` (named `name`) has caught up: it is no longer recovering. Its
/// marker is removed durably; if that fails the copy stays recovering (the next session tries
/// again).
fn caught_up(log: &Log, name: &str, recovering: &Cell<bool>) {
    match crate::copy::clear_recovering(log.dir()) {
        Ok(()) => {
            recovering.set(false);
            tracing::info!(
                log = name,
                "the local copy has caught up; no longer recovering"
            )
        }
        Err(e) => tracing::error!(log = name, error = %e, "cannot remove the recovering marker"),
    }
}

/// Acknowledge the local durable offset to the leader each time the local fdatasync moves it
/// (and time the stored frames it covers, if `timed`). Returns only with an error (the stream
/// or the log failed).
async fn acknowledge(
    (log, name): (&Log, &str),
    session: &RefCell<Session>,
    send: &mut quinn::SendStream,
    (changed, recovering): (&Notify, &Cell<bool>),
    timed: Option<(&StoredFrames, &StageObserver)>,
) -> Result<Outcome, SessionError> {
    loop {
        let flushed = log.flush_offset();
        if let Some((stored, observe)) = timed {
            time_flushed(stored, flushed.0, observe);
        }
        // What to acknowledge is the session's decision: what is durable here.
        let (ack, recovered) = {
            let mut s = session.borrow_mut();
            let written = s.written(log.end_offset().0);
            let p = s.flushed(flushed.0);
            (p.ack.or(written), p.recovered)
        };
        if recovered {
            caught_up(log, name, recovering);
        }
        if let Some(durable) = ack {
            write_frame(send, &Request::Ack { durable }).await?;
            changed.notify_waiters();
        }
        log.wait_flushed_past(flushed).await?;
    }
}

/// Where a session of a follower's copy stands: the leader's commit offset as frames brought
/// it (kept across sessions), whether the copy is recovering (cleared, with its marker, once it
/// has caught up), and a notification whenever the commit offset or the local durable offset
/// moves.
pub struct CopyState<'a> {
    pub commit: &'a Cell<u64>,
    pub recovering: &'a Cell<bool>,
    pub changed: &'a Notify,
}

/// Run one session for `log` (named `name` on the leader), as `node_core::follow::Session`
/// directs: agree with the leader on where the logs diverge (KIP-101), truncate a divergent
/// suffix, then store the leader's frames and acknowledge what is durable. Returns when the
/// stream or connection ends, or the copy must be replaced (bootstrap).
pub async fn run(
    conn: &quinn::Connection,
    name: &str,
    log: &Log,
    cfg: &SessionConfig,
    copy: CopyState<'_>,
) -> Result<Outcome, SessionError> {
    let (session, mut next) =
        Session::begin(crate::local(log), copy.commit.get(), copy.recovering.get());
    let session = Rc::new(RefCell::new(session));
    // 1. Agree with the leader on where the logs diverge, if they may.
    let (from, last_epoch, durable) = loop {
        next = match next {
            Command::AskEpochEnd { epoch } => {
                let (leader_epoch, end) = ask_epoch_end(conn, name, epoch, &cfg.limits).await?;
                session
                    .borrow_mut()
                    .epoch_end(crate::local(log), leader_epoch, end)?
            }
            Command::Truncate { to } => {
                let end = log.next_offset().0;
                tracing::warn!(
                    log = name,
                    from = to,
                    to = end,
                    "truncating a divergent suffix"
                );
                if let Some(dir) = &cfg.quarantine_dir {
                    if let Some(r) = crate::quarantine::save(log, name, to, dir)? {
                        tracing::warn!(log = name, from = r.from, to = r.to, records = r.records, epochs = ?r.epochs, file = %r.file.display(), "the divergent suffix is in quarantine");
                        if let Some(f) = &cfg.on_quarantine {
                            f(&r);
                        }
                    }
                }
                log.truncate_after(Offset(to)).await?;
                session.borrow_mut().truncated(crate::local(log))
            }
            Command::Bootstrap { start } => return Ok(Outcome::Bootstrap { start }),
            Command::Replicate {
                from,
                last_epoch,
                durable,
            } => break (from, last_epoch, durable),
        };
    };

    // 2. Ask for everything after the local end.
    let mut replica = Replica::streaming(log.clone(), session.clone());
    let (mut send, mut recv) = open_stream(conn).await?;
    write_frame(
        &mut send,
        &Request::Replicate(ReplicateRequest {
            log: name.to_string(),
            follower: cfg.node_id.clone(),
            addr: cfg.addr.clone(),
            from,
            last_epoch,
            durable,
        }),
    )
    .await?;

    // 3. Store frames as they come; acknowledge as the local fdatasync moves.
    let stored = StoredFrames::default();
    let receive = async {
        let mut reader = frames::FrameReader::responses();
        loop {
            match reader.response(&mut recv, &cfg.limits).await? {
                Some(Response::Replicated(frame)) => {
                    let read = Instant::now();
                    let applied = replica.apply(&frame).await?;
                    if applied.recovered {
                        caught_up(log, name, copy.recovering);
                    }
                    // Frames that only move the commit offset store nothing to time.
                    match &cfg.stages {
                        Some(observe) if !frame.batches.is_empty() => {
                            let now = Instant::now();
                            observe(FollowerStage::Receive, now.saturating_duration_since(read));
                            let mut q = stored.borrow_mut();
                            if q.len() >= FLUSH_TIMED_MAX {
                                q.pop_front();
                            }
                            q.push_back((applied.end, now));
                        }
                        _ => {}
                    }
                    let commit = session.borrow().commit();
                    if commit > copy.commit.get() {
                        copy.commit.set(commit);
                        copy.changed.notify_waiters();
                    }
                }
                Some(Response::Error(e)) if e.code == ErrorCode::OffsetOutOfRange => {
                    match session.borrow_mut().out_of_range(e.detail) {
                        Some(Command::Bootstrap { start }) => {
                            return Ok(Outcome::Bootstrap { start })
                        }
                        _ => return Err(refused(Response::Error(e))),
                    }
                }
                Some(other) => return Err(refused(other)),
                None => return Ok(Outcome::Ended),
            }
        }
    };
    let acks = acknowledge(
        (log, name),
        &session,
        &mut send,
        (copy.changed, copy.recovering),
        cfg.stages.as_ref().map(|o| (&stored, o)),
    );
    tokio::select! {
        r = receive => r,
        r = acks => r,
    }
}
