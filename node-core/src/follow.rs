//! A follower's replication session for one log, without I/O: the phases a session goes
//! through (ask the leader where the local last epoch ends, truncate a divergent suffix, stream
//! from the local end), what each answer of the leader leads to, which frames are taken, what
//! is acknowledged, and when a recovering copy has caught up.
//!
//! Events come in as method calls (the leader's answer, a frame, the local log written or
//! durable up to an offset, a truncation done); commands come out ([`Command`], [`Progress`]).
//! The real follower (`follower::session`) performs them over a QUIC stream and a `log_core`
//! log, the cluster simulator over its network and disk: both run this same machine.
//!
//! A session runs:
//!
//! 1. [`Session::begin`]: with records in the local log, [`Command::AskEpochEnd`] for the
//!    epoch of the last one (KIP-101); with none, [`Command::Replicate`] at once.
//! 2. [`Session::epoch_end`] with the leader's answer: [`Command::Truncate`] of a divergent
//!    suffix (then [`Session::truncated`]), [`Command::Bootstrap`] when the divergence lies
//!    before the local start, or [`Command::Replicate`].
//! 3. Streaming: each frame is checked by [`Session::frame`] before any of it is written
//!    (`protocol::replication::Follower::accept`); [`Session::flushed`] says what to
//!    acknowledge as the local fdatasync moves, and both say when a recovering copy has
//!    recovered. [`Session::out_of_range`] turns the leader's "no longer stored" into a
//!    bootstrap.

use protocol::replication::{
    after_epoch_end, EmptyLeaderHistory, Follower, FrameHead, LocalLog, Refusal, Step,
};

use crate::log::recovered;

/// The local copy of the log, as a session sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Local {
    /// Its first offset.
    pub start: u64,
    /// Where it ends (what is written, durable or not).
    pub end: u64,
    /// Where its durable part ends.
    pub durable: u64,
    /// The epoch of its last record, if it holds any.
    pub last_epoch: Option<u64>,
}

/// What the driver does next for a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Ask the leader where `epoch` ends in its log; answer with [`Session::epoch_end`].
    AskEpochEnd { epoch: u64 },
    /// Remove everything at or after `to` from the local log (a divergent suffix; the node may
    /// keep it in quarantine first), then call [`Session::truncated`].
    Truncate { to: u64 },
    /// Ask the leader for its stream from `from` (the local end); `last_epoch` and `durable`
    /// describe the local log to it.
    Replicate {
        from: u64,
        last_epoch: u64,
        durable: u64,
    },
    /// The session is over: the local log must be replaced by an empty one that starts at
    /// the leader's start (`Some`), or, when the divergence point lies before the local start,
    /// at a start the next session learns (`None`).
    Bootstrap { start: Option<u64> },
}

/// What a frame or the local fdatasync calls for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Acknowledge this durable offset to the leader.
    pub ack: Option<u64>,
    /// The recovering copy now holds durably everything the leader has committed: it is no
    /// longer recovering (the node removes its marker). Said once per session.
    pub recovered: bool,
}

/// Where a session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the leader's answer about where `epoch` ends.
    AskingEpochEnd { epoch: u64 },
    /// Waiting for the local log to be truncated at `to`.
    Truncating { to: u64 },
    /// Taking frames of the stream asked for from `from`.
    Streaming { from: u64 },
    /// Over (the local copy is to be replaced).
    Over,
}

/// One follower session for one log.
#[derive(Clone, Debug)]
pub struct Session {
    phase: Phase,
    /// The replication state of the stream (set up as it is asked for).
    state: Follower,
    /// The leader's commit offset as last learnt, from this or an earlier session.
    commit: u64,
    /// A frame of this session was taken: `state` knows the leader's commit offset.
    framed: bool,
    /// The copy is recovering (until [`Progress::recovered`]).
    recovering: bool,
}

impl Session {
    /// Begin a session over `local`, knowing the leader's commit offset `commit` from earlier
    /// sessions (0: none); `recovering`: the copy is recovering. Returns the first command,
    /// [`Command::AskEpochEnd`] or [`Command::Replicate`].
    pub fn begin(local: Local, commit: u64, recovering: bool) -> (Session, Command) {
        let mut s = Session::new(local, commit, recovering);
        let first = match local.last_epoch {
            Some(epoch) => {
                s.phase = Phase::AskingEpochEnd { epoch };
                Command::AskEpochEnd { epoch }
            }
            None => s.stream(local),
        };
        (s, first)
    }

    /// A session over `local` whose log is known to continue the leader's up to its end (the
    /// epoch question was settled by the caller): it streams from the local end at once.
    pub fn resume(local: Local, commit: u64, recovering: bool) -> (Session, Command) {
        let mut s = Session::new(local, commit, recovering);
        let first = s.stream(local);
        (s, first)
    }

    fn new(local: Local, commit: u64, recovering: bool) -> Session {
        Session {
            phase: Phase::Over,
            state: Follower::new(local.end, local.durable, local.last_epoch.unwrap_or(0)),
            commit,
            framed: false,
            recovering,
        }
    }

    /// The leader answered that the asked epoch ends at `end` in its history (whose closest
    /// epoch is `epoch`; (0, 0): its history is empty). `local`: the local log now. An empty
    /// history never truncates what the local log holds: that is an error, and the session
    /// is over (the next one asks again).
    pub fn epoch_end(
        &mut self,
        local: Local,
        epoch: u64,
        end: u64,
    ) -> Result<Command, EmptyLeaderHistory> {
        assert!(
            matches!(self.phase, Phase::AskingEpochEnd { .. }),
            "an epoch end answer outside its phase: {:?}",
            self.phase
        );
        let at = LocalLog {
            start: local.start,
            end: local.end,
            last_epoch: local.last_epoch,
            commit: self.commit,
        };
        let step = after_epoch_end(at, epoch, end).inspect_err(|_| self.phase = Phase::Over)?;
        Ok(match step {
            Step::Truncate { to } => {
                self.phase = Phase::Truncating { to };
                Command::Truncate { to }
            }
            Step::Bootstrap => {
                self.phase = Phase::Over;
                Command::Bootstrap { start: None }
            }
            Step::Fetch { .. } | Step::AskEpochEnd { .. } => self.stream(local),
        })
    }

    /// The local log was truncated as [`Command::Truncate`] asked; `local`: the log now.
    pub fn truncated(&mut self, local: Local) -> Command {
        let Phase::Truncating { to } = self.phase else {
            panic!("a truncation outside its phase: {:?}", self.phase);
        };
        assert!(
            local.end <= to,
            "the log ends at {} after truncation at {to}",
            local.end
        );
        self.stream(local)
    }

    /// Stream from the local end.
    fn stream(&mut self, local: Local) -> Command {
        self.state = Follower::new(local.end, local.durable, local.last_epoch.unwrap_or(0));
        self.phase = Phase::Streaming { from: local.end };
        Command::Replicate {
            from: local.end,
            last_epoch: local.last_epoch.unwrap_or(0),
            durable: local.durable,
        }
    }

    /// A `Replicated` frame whose batches carry `batch_epochs`: taken (the driver then writes
    /// its batches) or refused, with nothing of it written (see `Follower::accept`).
    pub fn frame(
        &mut self,
        head: FrameHead,
        batch_epochs: impl IntoIterator<Item = u64>,
    ) -> Result<Progress, Refusal> {
        assert!(
            matches!(self.phase, Phase::Streaming { .. }),
            "a frame outside its phase: {:?}",
            self.phase
        );
        self.state.accept(head, batch_epochs)?;
        self.framed = true;
        self.commit = self.commit.max(self.state.leader_commit());
        Ok(Progress {
            ack: None,
            recovered: self.recovery(),
        })
    }

    /// The local log has written (not necessarily durably) up to `end`. Returns the offset to
    /// acknowledge, when there is one: never, since only durable records are acknowledged
    /// (the planted `AckBeforeFollowerFsync` does otherwise).
    pub fn written(&mut self, end: u64) -> Option<u64> {
        self.state.written(end)
    }

    /// The local log is durable up to `durable`.
    pub fn flushed(&mut self, durable: u64) -> Progress {
        let ack = match self.phase {
            Phase::Streaming { .. } => self.state.flushed(durable),
            _ => None,
        };
        Progress {
            ack,
            recovered: self.recovery(),
        }
    }

    /// Whether the copy recovers now: it is recovering, a frame of this session told it the
    /// leader's commit offset, and it holds that durably.
    fn recovery(&mut self) -> bool {
        let now = self.recovering
            && self.framed
            && recovered(self.state.durable(), Some(self.state.leader_commit()));
        if now {
            self.recovering = false;
        }
        now
    }

    /// The leader refused the stream because it no longer stores what comes next: its log
    /// starts at `start`. A bootstrap if the stream was asked for below `start` (`None`: the
    /// refusal is for some other reason, and the session simply fails).
    pub fn out_of_range(&mut self, start: u64) -> Option<Command> {
        match self.phase {
            Phase::Streaming { from } if from < start => {
                self.phase = Phase::Over;
                Some(Command::Bootstrap { start: Some(start) })
            }
            _ => None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The highest leader epoch this session has seen (at first, the local last epoch).
    pub fn epoch(&self) -> u64 {
        self.state.epoch()
    }

    /// The leader's commit offset as last learnt, in this session or an earlier one.
    pub fn commit(&self) -> u64 {
        self.commit
    }

    /// What the copy may serve to readers: committed by the leader (as this session learnt)
    /// and durable here.
    pub fn readable(&self) -> u64 {
        self.state.readable()
    }

    /// The copy is still recovering.
    pub fn recovering(&self) -> bool {
        self.recovering
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(end: u64, durable: u64, last_epoch: Option<u64>) -> Local {
        Local {
            start: 0,
            end,
            durable,
            last_epoch,
        }
    }

    #[test]
    fn an_empty_copy_asks_for_the_stream_at_once() {
        let (s, cmd) = Session::begin(local(0, 0, None), 0, false);
        assert_eq!(
            cmd,
            Command::Replicate {
                from: 0,
                last_epoch: 0,
                durable: 0
            }
        );
        assert_eq!(s.phase(), Phase::Streaming { from: 0 });
    }

    #[test]
    fn a_divergent_suffix_is_truncated_at_the_leaders_epoch_end_then_streamed_from_there() {
        let (mut s, cmd) = Session::begin(local(10, 10, Some(2)), 4, false);
        assert_eq!(cmd, Command::AskEpochEnd { epoch: 2 });
        let cmd = s.epoch_end(local(10, 10, Some(2)), 2, 7).unwrap();
        assert_eq!(cmd, Command::Truncate { to: 7 });
        let cmd = s.truncated(local(7, 7, Some(2)));
        assert_eq!(
            cmd,
            Command::Replicate {
                from: 7,
                last_epoch: 2,
                durable: 7
            }
        );
        // Frames must continue the truncated log.
        assert_eq!(
            s.frame(FrameHead::new(3, 9, 10, 12), [3]),
            Err(Refusal::Gap {
                expected: 7,
                got: 10
            })
        );
        assert!(s.frame(FrameHead::new(3, 9, 7, 12), [3]).is_ok());
        assert_eq!(s.flushed(12).ack, Some(12));
        assert_eq!(s.flushed(12).ack, None, "acknowledged once");
        assert_eq!(s.readable(), 9);
    }

    #[test]
    fn an_empty_leader_history_ends_the_session_without_truncating() {
        let (mut s, _) = Session::begin(local(10, 10, Some(2)), 0, false);
        let e = s.epoch_end(local(10, 10, Some(2)), 0, 0).unwrap_err();
        assert_eq!(e.asked, 2);
        assert_eq!(s.phase(), Phase::Over);
    }

    #[test]
    fn a_divergence_before_the_local_start_bootstraps() {
        let mut at = local(10, 10, Some(2));
        at.start = 8;
        let (mut s, _) = Session::begin(at, 0, false);
        assert_eq!(
            s.epoch_end(at, 1, 5).unwrap(),
            Command::Bootstrap { start: None }
        );
    }

    #[test]
    fn the_leaders_start_beyond_the_asked_offset_bootstraps_and_nothing_else_does() {
        let (mut s, _) = Session::begin(local(5, 5, None), 0, false);
        assert_eq!(
            s.out_of_range(20),
            Some(Command::Bootstrap { start: Some(20) })
        );
        let (mut s, _) = Session::begin(local(5, 5, None), 0, false);
        assert_eq!(s.out_of_range(3), None);
    }

    #[test]
    fn nothing_is_acknowledged_before_it_is_durable() {
        let (mut s, _) = Session::begin(local(0, 0, None), 0, false);
        s.frame(FrameHead::new(1, 0, 0, 5), [1]).unwrap();
        assert_eq!(s.written(5), None);
        assert_eq!(s.flushed(3).ack, Some(3));
        assert_eq!(s.flushed(5).ack, Some(5));
    }

    #[test]
    fn a_recovering_copy_recovers_once_it_holds_a_commit_offset_this_session_learnt() {
        // A commit offset from an earlier session does not count: the leader may have
        // committed more since.
        let (mut s, _) = Session::begin(local(0, 0, None), 50, true);
        assert!(!s.flushed(0).recovered, "no frame of this session yet");
        let p = s.frame(FrameHead::new(1, 8, 0, 10), [1]).unwrap();
        assert!(!p.recovered, "the commit offset 8 is not durable here yet");
        assert!(!s.flushed(7).recovered);
        assert!(s.flushed(8).recovered);
        assert!(!s.recovering());
        assert!(!s.flushed(10).recovered, "said once");
        // A frame that only moves the commit offset within what is durable recovers at once.
        let (mut s, _) = Session::begin(local(10, 10, None), 0, true);
        assert!(
            s.frame(FrameHead::new(1, 10, 10, 10), [])
                .unwrap()
                .recovered
        );
    }

    #[test]
    #[should_panic(expected = "a frame outside its phase")]
    fn a_frame_before_the_stream_is_asked_for_is_a_bug_in_the_driver() {
        let (mut s, _) = Session::begin(local(10, 10, Some(2)), 0, false);
        let _ = s.frame(FrameHead::new(2, 0, 10, 11), [2]);
    }
}
