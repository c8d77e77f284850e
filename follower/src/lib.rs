//! The follower role: what a node does with the records a leader replicates to it.
//!
//! [`Replica::apply`] takes one `Replicated` frame and either stores all of its batches
//! verbatim in the local log or refuses it with nothing written: every batch must decode with a
//! valid crc32c, the batches must continue the local log without a gap, and the frame must not
//! come from a leader epoch older than one already seen (R2), nor carry batches of a later
//! epoch than its own. The decisions are `protocol::replication::Follower`'s; this crate binds
//! them to a `log_core::Log`. [`session`] is the network side: one replication stream
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
use protocol::replication::{Follower, Refusal};
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

/// A local log kept as a replica of a leader's.
pub struct Replica {
    log: Log,
    /// Shared with the session's acknowledgement loop, which asks it what to acknowledge.
    state: Rc<RefCell<Follower>>,
}

impl Replica {
    /// Replicate into `log`, resuming from where it ends.
    pub fn new(log: Log) -> Replica {
        let epoch = log.last_epoch().map_or(0, |e| e.0);
        let state = Follower::new(log.next_offset().0, log.flush_offset().0, epoch);
        Replica {
            log,
            state: Rc::new(RefCell::new(state)),
        }
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The log back (to close it: a log closes when its last handle goes).
    pub fn into_log(self) -> Log {
        self.log
    }

    /// The replication state (highest leader epoch seen, readable horizon), as of now.
    pub fn state(&self) -> Follower {
        *self.state.borrow()
    }

    /// The replication state, shared: what to acknowledge is its decision
    /// (`Follower::flushed`).
    pub fn shared_state(&self) -> Rc<RefCell<Follower>> {
        self.state.clone()
    }

    /// Validate a whole frame, then append its batches verbatim (waiting for room if the write
    /// queue is full). Returns the offset the log will end at once they are written.
    pub async fn apply(&mut self, frame: &ReplicatedResponse) -> Result<u64, ApplyError> {
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
        self.state
            .borrow_mut()
            .accept(frame.epoch, frame.commit, first, expected, epochs)
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
        Ok(expected)
    }

    /// Wait until everything applied is durable; returns the offset to acknowledge to the
    /// leader if it moved since the last acknowledgement.
    pub async fn sync(&mut self) -> Result<Option<u64>, ApplyError> {
        let end = self.log.next_offset();
        self.log.wait_flushed(end).await?;
        Ok(self.state.borrow_mut().flushed(self.log.flush_offset().0))
    }

    /// What this replica may serve to readers.
    pub fn readable(&self) -> Offset {
        Offset(self.state.borrow().readable())
    }
}
