//! Bugs planted on purpose, to prove that the cluster simulator's checker finds what it claims
//! to find. Each is a known way replication systems have lost data or availability; with the
//! `planted-bugs` feature, a test switches one on for its thread ([`plant`]) and runs the
//! simulator until the checker reports it. Without the feature (every release build),
//! [`active`] is a constant `false` and the planted branches compile away.

/// A planted bug: the decision it breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bug {
    /// A follower acknowledges records once written, before its fdatasync covers them.
    AckBeforeFollowerFsync,
    /// A follower's lag is judged by when it was last heard, not by when it was last caught
    /// up: an idle log loses its sync set.
    LagByLastHeard,
    /// Failover elects a replica outside the recorded sync set.
    ElectOutsideSyncSet,
    /// The leader counts its own written (not durable) end towards the commit offset and
    /// receipts.
    CommitFromWrittenEnd,
    /// A leader acknowledges an append after its epoch has ended (it skips the controller's
    /// record).
    StaleEpochAccepted,
    /// A follower truncates to its local commit offset (a high watermark) instead of the
    /// epoch divergence point.
    TruncateBelowCommit,
    /// A leader's lease lasts the whole `leader_timeout`, with no margin for clock drift.
    LeaseWithoutMargin,
    /// The leader forgets idempotent producers: a retried append is stored twice.
    IdempotentTwice,
    /// Retention passes a node's latest application snapshot: the records a reader needs
    /// after it are gone.
    SnapshotUnpinned,
}

impl Bug {
    /// Every planted bug.
    pub const ALL: [Bug; 9] = [
        Bug::AckBeforeFollowerFsync,
        Bug::LagByLastHeard,
        Bug::ElectOutsideSyncSet,
        Bug::CommitFromWrittenEnd,
        Bug::StaleEpochAccepted,
        Bug::TruncateBelowCommit,
        Bug::LeaseWithoutMargin,
        Bug::IdempotentTwice,
        Bug::SnapshotUnpinned,
    ];
}

#[cfg(feature = "planted-bugs")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Bug>> = const { std::cell::Cell::new(None) };
}

/// Whether `bug` is planted on this thread.
#[inline]
pub fn active(bug: Bug) -> bool {
    #[cfg(feature = "planted-bugs")]
    {
        ACTIVE.with(|a| a.get() == Some(bug))
    }
    #[cfg(not(feature = "planted-bugs"))]
    {
        let _ = bug;
        false
    }
}

/// Plant `bug` on this thread (`None`: none).
#[cfg(feature = "planted-bugs")]
pub fn plant(bug: Option<Bug>) {
    ACTIVE.with(|a| a.set(bug));
}
