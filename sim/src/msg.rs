//! What travels on the simulated network: the same exchanges as the wire protocol
//! (docs/protocol.md), as values. Controller frames are the real bytes `ControllerCore`
//! produces.

use std::rc::Rc;

use protocol::{Acks, ErrorCode};

use crate::disk::Batch;

/// A client's request.
#[derive(Clone, Debug)]
pub enum Req {
    Append {
        log: String,
        records: Rc<[u64]>,
        acks: Acks,
        /// Idempotent producer id and the sequence number of the first record.
        producer: Option<(u64, u64)>,
        /// Conditional append: the offset the log must be at.
        expected: Option<u64>,
    },
    Read {
        log: String,
        from: u64,
        min_offset: u64,
    },
    /// Store an application snapshot: `state` after every record below `offset` (the
    /// application's state is a fold of the record ids, [`crate::checker::fold`]).
    PutSnapshot {
        log: String,
        offset: u64,
        state: u64,
    },
    /// The latest application snapshot the node holds.
    GetSnapshot { log: String },
}

impl Req {
    pub fn log(&self) -> &str {
        match self {
            Req::Append { log, .. }
            | Req::Read { log, .. }
            | Req::PutSnapshot { log, .. }
            | Req::GetSnapshot { log } => log,
        }
    }
}

/// A node's answer to a client.
#[derive(Clone, Debug)]
pub enum Rep {
    Receipt {
        first: u64,
        next: u64,
        epoch: u64,
        /// The level reached (below the one asked for when degraded).
        level: Acks,
        degraded: bool,
        duplicate: bool,
        /// The replicas holding the records durably (node indexes).
        holders: Vec<usize>,
    },
    /// `ids[i]` is the record at `from + i`; `commit` the node's readable horizon.
    Records {
        from: u64,
        ids: Vec<u64>,
        commit: u64,
    },
    /// The snapshot is stored durably.
    Stored,
    Snapshot {
        offset: u64,
        state: u64,
    },
    Error {
        code: ErrorCode,
        /// A leader to try (node index), with `not_leader`.
        leader: Option<usize>,
    },
}

/// A message between endpoints.
#[derive(Clone, Debug)]
pub enum Msg {
    /// A controller frame (the bytes `ControllerCore` queued).
    Control(Rc<[u8]>),
    Request {
        id: u64,
        req: Req,
    },
    Reply {
        id: u64,
        rep: Rep,
    },
    /// Follower to leader: where does `epoch` end in your log (KIP-101)?
    EpochEnd {
        log: String,
        session: u64,
        epoch: u64,
    },
    EpochEndIs {
        log: String,
        session: u64,
        epoch: u64,
        end: u64,
    },
    /// Follower to leader: stream log `log` from `from`; it holds `durable` durably.
    Replicate {
        log: String,
        session: u64,
        from: u64,
        durable: u64,
    },
    /// Leader to follower: batches from `first` (possibly none: the commit offset alone).
    Replicated {
        log: String,
        session: u64,
        epoch: u64,
        commit: u64,
        first: u64,
        batches: Vec<Batch>,
    },
    Ack {
        log: String,
        session: u64,
        durable: u64,
    },
    /// The leader will not serve this stream.
    Refused {
        log: String,
        session: u64,
    },
    /// The leader no longer stores what the stream was asked from: its log starts at `start`.
    OutOfRange {
        log: String,
        session: u64,
        start: u64,
    },
    /// The scrub: send me your copy of `log`'s batch `from..until` written in `epoch` (mine is
    /// damaged).
    RepairRead {
        log: String,
        from: u64,
        until: u64,
        epoch: u64,
    },
    /// A sound, durable copy of the batch asked for.
    RepairBatch {
        log: String,
        batch: Batch,
    },
    /// Follower to leader, now and then: your latest application snapshot of `log`?
    SnapshotAsk {
        log: String,
    },
    /// The leader's latest application snapshot (offset, state), if it has one.
    SnapshotIs {
        log: String,
        snapshot: Option<(u64, u64)>,
    },
}

impl Msg {
    /// Whether it travels ordered on a connection (everything but controller frames).
    pub fn ordered(&self) -> bool {
        !matches!(self, Msg::Control(_))
    }
}
