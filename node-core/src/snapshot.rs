//! A log's application snapshots on one node, without I/O: which snapshot a leader takes,
//! which one becomes the latest once stored, which of a leader's a follower copies, and what
//! retention must keep.
//!
//! An application snapshot at offset N is the application's state after every record below N:
//! a new reader starts from it and reads the log from N on. So a snapshot must lie within what
//! the log stores (below its start the records after the snapshot may be gone) and at or below
//! the commit offset (a record above it may still be truncated by a failover, and a snapshot
//! reflecting it would describe a history the log no longer has). Snapshots only move forward;
//! a node keeps its latest, and retention keeps every record from its offset on.
//!
//! The real node (`server`) and the cluster simulator (`sim`) both call these.

use protocol::planted::{self, Bug};
use thiserror::Error;

/// Why a leader refuses a snapshot.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum SnapshotRefusal {
    /// Outside the records the log stores: below its start or beyond its end.
    #[error("snapshot offset {offset} is outside the log's range {start}..{end}")]
    OutOfRange { offset: u64, start: u64, end: u64 },
    /// Beyond the commit offset: records it reflects may still be lost in a failover (the
    /// application read them from somewhere other than the log's committed records). A
    /// retry once the commit offset has reached it succeeds.
    #[error("snapshot offset {offset} is beyond the commit offset {committed}: a snapshot may reflect committed records only")]
    NotCommitted { offset: u64, committed: u64 },
    /// Older than the latest one held: snapshots only move forward.
    #[error("a snapshot at offset {latest} exists; snapshots only move forward")]
    Backward { latest: u64 },
}

/// The application snapshots of one log on one node: the offset of the latest stored here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshots {
    latest: Option<u64>,
}

impl Snapshots {
    /// The state of a log whose latest stored snapshot is at `latest` (as found on disk).
    pub fn new(latest: Option<u64>) -> Snapshots {
        Snapshots { latest }
    }

    /// The offset of the latest snapshot stored here.
    pub fn latest(&self) -> Option<u64> {
        self.latest
    }

    /// Whether the leader takes a snapshot at `offset` of a log that stores `start..end` and
    /// has committed up to `committed` (its readable horizon).
    pub fn admit(
        &self,
        offset: u64,
        start: u64,
        end: u64,
        committed: u64,
    ) -> Result<(), SnapshotRefusal> {
        debug_assert!(start <= end, "a log's start {start} is past its end {end}");
        if offset < start || offset > end {
            return Err(SnapshotRefusal::OutOfRange { offset, start, end });
        }
        if offset > committed {
            return Err(SnapshotRefusal::NotCommitted { offset, committed });
        }
        match self.latest {
            Some(latest) if offset < latest => Err(SnapshotRefusal::Backward { latest }),
            _ => Ok(()),
        }
    }

    /// A snapshot at `offset` is stored durably here. Returns whether it is the latest now
    /// (then retention keeps every record from `offset` on: [`Snapshots::pin`]); one that
    /// another, newer, overtook while it was being written is not.
    pub fn stored(&mut self, offset: u64) -> bool {
        if self.latest.is_some_and(|l| l > offset) {
            return false;
        }
        self.latest = Some(offset);
        true
    }

    /// Whether a follower copies the leader's latest snapshot, at `leader`: it is newer than
    /// the follower's own.
    pub fn wants(&self, leader: Option<u64>) -> bool {
        match (leader, self.latest) {
            (Some(theirs), Some(mine)) => theirs > mine,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The offset retention keeps every record from (the latest snapshot's), if any: with the
    /// snapshot, those records bring a reader to the present.
    pub fn pin(&self) -> Option<u64> {
        if planted::active(Bug::SnapshotUnpinned) {
            return None;
        }
        self.latest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_lies_within_the_stored_and_committed_records_and_moves_forward() {
        let none = Snapshots::default();
        // The log stores 100..500 and has committed up to 400.
        assert_eq!(none.admit(100, 100, 500, 400), Ok(()));
        assert_eq!(none.admit(400, 100, 500, 400), Ok(()));
        assert_eq!(
            none.admit(99, 100, 500, 400),
            Err(SnapshotRefusal::OutOfRange {
                offset: 99,
                start: 100,
                end: 500
            })
        );
        assert_eq!(
            none.admit(501, 100, 500, 400),
            Err(SnapshotRefusal::OutOfRange {
                offset: 501,
                start: 100,
                end: 500
            })
        );
        assert_eq!(
            none.admit(401, 100, 500, 400),
            Err(SnapshotRefusal::NotCommitted {
                offset: 401,
                committed: 400
            })
        );
        let mut s = Snapshots::new(Some(300));
        assert_eq!(
            s.admit(299, 100, 500, 400),
            Err(SnapshotRefusal::Backward { latest: 300 })
        );
        // The same offset again replaces it (an application retrying its put).
        assert_eq!(s.admit(300, 100, 500, 400), Ok(()));
        assert!(s.stored(350));
        assert_eq!((s.latest(), s.pin()), (Some(350), Some(350)));
        // A slower write of an older one does not overtake it.
        assert!(!s.stored(320));
        assert_eq!(s.latest(), Some(350));
    }

    #[test]
    fn a_follower_copies_only_a_newer_snapshot() {
        let none = Snapshots::default();
        assert!(none.wants(Some(0)));
        assert!(!none.wants(None));
        let s = Snapshots::new(Some(300));
        assert!(!s.wants(Some(300)));
        assert!(!s.wants(Some(200)));
        assert!(s.wants(Some(301)));
        assert_eq!(Snapshots::default().pin(), None);
    }
}
