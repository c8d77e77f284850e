//! The follower role: what a node does with the records a leader replicates to it.
//!
//! [`Replica::apply`] takes one `Replicated` frame and either stores all of its batches
//! verbatim in the local log or refuses it with nothing written: every batch must decode with a
//! valid crc32c, the batches must continue the local log without a gap, and the frame must not
//! come from a leader epoch older than one already seen (R2), nor carry batches of a later
//! epoch than its own. The decisions are the follower session's (`node_core::follow::Session`,
//! which the cluster simulator runs too); this crate binds them to a `log_core::Log`. [`session`] is the network side: one replication stream
//! per log over a peer QUIC connection, with KIP-101 truncation, acknowledgements, the
//! bootstrap signal and per-stage latency reports ([`session::FollowerStage`]), and the other
//! exchanges a follower has with its leader (listing its logs, copying a snapshot);
//! [`copy`] holds the local copy's files (the recovering marker, the replacement by an empty
//! log at bootstrap) and [`quarantine`] the divergent suffixes a session truncates. The node
//! (the `server` crate) decides which logs to follow from whom, keeps the connections and the
//! shards' logs, and turns the stage reports into metrics.

pub mod copy;
pub mod quarantine;
pub mod session;

use std::cell::RefCell;
use std::rc::Rc;

use log_core::batch::{self, BatchError};
use log_core::{Log, Offset};
use node_core::follow::{Local, Phase, Session};
use protocol::replication::{FrameHead, Refusal};
use protocol::ReplicatedResponse;

/// Why a frame was not stored. In every case nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused: {0:?}")]
    Refused(Refusal),
    #[error("corrupt batch at byte {position} of the frame: {source}")]
    Corrupt {
        position: usize,
        #[source]
        source: BatchError,
    },
    #[error("the frame's next offset {claimed} does not match its batches, which end at {actual}")]
    BadNextOffset { claimed: u64, actual: u64 },
    #[error("storage: {0}")]
    Storage(#[from] log_core::Error),
}

/// A local log kept as a replica of a leader's, streaming in a session
/// (`node_core::follow::Session`).
pub struct Replica {
    log: Log,
    /// Shared with the session's acknowledgement loop, which asks it what to acknowledge.
    session: Rc<RefCell<Session>>,
}

/// A frame stored by [`Replica::apply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The offset the log will end at once the frame's batches are written.
    pub end: u64,
    /// A recovering copy has now caught up (see `node_core::follow::Progress::recovered`).
    pub recovered: bool,
}

/// The local log as a follower session sees it.
pub fn local(log: &Log) -> Local {
    Local {
        start: log.start_offset().0,
        end: log.next_offset().0,
        durable: log.flush_offset().0,
        last_epoch: log.last_epoch().map(|e| e.0),
    }
}

impl Replica {
    /// Replicate into `log`, resuming from where it ends (its records are known to agree
    /// with the leader's: see `Session::resume`).
    pub fn new(log: Log) -> Replica {
        let (session, _) = Session::resume(local(&log), 0, false);
        Replica {
            log,
            session: Rc::new(RefCell::new(session)),
        }
    }

    /// Replicate into `log` in `session`, which streams (its first steps are done).
    pub fn streaming(log: Log, session: Rc<RefCell<Session>>) -> Replica {
        assert!(
            matches!(session.borrow().phase(), Phase::Streaming { .. }),
            "a replica streams"
        );
        Replica { log, session }
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The log back (to close it: a log closes when its last handle goes).
    pub fn into_log(self) -> Log {
        self.log
    }

    /// The session (highest leader epoch seen, readable horizon), as of now.
    pub fn state(&self) -> Session {
        self.session.borrow().clone()
    }

    /// Validate a whole frame, then append its batches verbatim (waiting for room if the write
    /// queue is full). Returns the offset the log will end at once they are written.
    pub async fn apply(&mut self, frame: &ReplicatedResponse) -> Result<Applied, ApplyError> {
        let first = self.log.next_offset().0;
        let mut spans = Vec::new();
        let mut epochs = Vec::new();
        let mut pos = 0usize;
        let mut expected = first;
        while pos < frame.batches.len() {
            let view =
                batch::decode(&frame.batches[pos..]).map_err(|source| ApplyError::Corrupt {
                    position: pos,
                    source,
                })?;
            let h = view.header();
            if h.base_offset().0 != expected {
                return Err(ApplyError::Refused(Refusal::Gap {
                    expected,
                    got: h.base_offset().0,
                }));
            }
            epochs.push(h.epoch().0);
            expected = h.next_offset().0;
            spans.push(pos..pos + view.len());
            pos += view.len();
        }
        if frame.next_offset != expected {
            return Err(ApplyError::BadNextOffset {
                claimed: frame.next_offset,
                actual: expected,
            });
        }
        let progress = self
            .session
            .borrow_mut()
            .frame(
                FrameHead {
                    epoch: frame.epoch,
                    commit: frame.commit,
                    first,
                    next: expected,
                },
                epochs,
            )
            .map_err(ApplyError::Refused)?;
        for span in spans {
            let bytes = &frame.batches[span];
            loop {
                match self.log.try_append_batch(bytes) {
                    Ok(_) => break,
                    Err(log_core::Error::Backpressure { .. }) => self.log.wait_room().await,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(Applied {
            end: expected,
            recovered: progress.recovered,
        })
    }

    /// Wait until everything applied is durable; returns the offset to acknowledge to the
    /// leader if it moved since the last acknowledgement.
    pub async fn sync(&mut self) -> Result<Option<u64>, ApplyError> {
        let end = self.log.next_offset();
        self.log.wait_flushed(end).await?;
        Ok(self
            .session
            .borrow_mut()
            .flushed(self.log.flush_offset().0)
            .ack)
    }

    /// What this replica may serve to readers.
    pub fn readable(&self) -> Offset {
        Offset(self.session.borrow().readable())
    }
}
