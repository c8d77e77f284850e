//! The messages. Field order here is the order on the wire (see `docs/protocol.md`).

use bytes::Bytes;

use crate::ErrorCode;

/// Durability level of an append: what must hold before its receipt is sent.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Acks {
    /// Written to the leader's page cache (readable, not yet durable).
    None = 0,
    /// fdatasync'd on the leader.
    Leader = 1,
    /// Durable on the leader and on every follower of the sync set.
    Sync = 2,
    /// Durable on a majority of replicas.
    Quorum = 3,
}

impl Acks {
    pub fn from_u8(v: u8) -> Option<Acks> {
        Some(match v {
            0 => Acks::None,
            1 => Acks::Leader,
            2 => Acks::Sync,
            3 => Acks::Quorum,
            _ => return None,
        })
    }

    /// The lowercase name used by the CLI and in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Acks::None => "none",
            Acks::Leader => "leader",
            Acks::Sync => "sync",
            Acks::Quorum => "quorum",
        }
    }

    pub fn from_name(s: &str) -> Option<Acks> {
        Some(match s {
            "none" => Acks::None,
            "leader" => Acks::Leader,
            "sync" => Acks::Sync,
            "quorum" => Acks::Quorum,
            _ => return None,
        })
    }
}

/// Append records to a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendRequest {
    pub log: String,
    pub acks: Acks,
    /// Conditional append: fail with [`ErrorCode::OffsetConflict`] unless the log's next offset
    /// equals this.
    pub expected_offset: Option<u64>,
    /// Idempotent append: `(producer_id, first_sequence)`; producer id 0 is not allowed.
    pub producer: Option<(u64, u64)>,
    /// How long the node may wait for the level to be reached, in milliseconds (0 = node default).
    pub timeout_ms: u32,
    pub records: Vec<Bytes>,
}

/// Read whole batches starting at the batch that contains `from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    pub log: String,
    pub from: u64,
    /// Upper bound on the batch bytes in the answer (at least one batch is returned if any is
    /// readable, even if it is larger).
    pub bytes_max: u32,
    /// If nothing is readable at `from`, wait up to this long for new records (0 = answer at once).
    pub wait_ms: u32,
    /// Read-your-writes: the node must have committed up to this offset before answering.
    pub min_offset: u64,
}

/// Subscribe to a log from `from`: the node sends [`Response::Batches`] frames as records commit,
/// until the client closes the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailRequest {
    pub log: String,
    pub from: u64,
    /// Upper bound on batch bytes per frame.
    pub bytes_max: u32,
}

/// Peer request: start replicating a log to a follower on this stream. The leader answers with
/// [`Response::Replicated`] frames as records are written; the follower writes
/// [`Request::Ack`] frames on its side of the same stream as it makes them durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicateRequest {
    pub log: String,
    /// The follower's node id (checked against its certificate).
    pub follower: String,
    /// The address clients reach the follower at (shown in the leader's status and used by
    /// `replog verify`); may be empty.
    pub addr: String,
    /// First offset the follower wants.
    pub from: u64,
    /// Epoch of the follower's last batch (0 if its log is empty).
    pub last_epoch: u64,
    /// First offset the follower does not hold durably.
    pub durable: u64,
}

/// Batches for a follower, in the storage format, with the leader's epoch and commit offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicatedResponse {
    /// The leader's epoch: a follower refuses anything below the highest epoch it has seen.
    pub epoch: u64,
    /// The commit offset: followers serve reads up to here.
    pub commit: u64,
    /// Where the next frame continues.
    pub next_offset: u64,
    pub batches: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Present a bearer token. Must be the first exchange on a connection when the node requires
    /// tokens.
    Auth {
        token: Bytes,
    },
    /// Create an empty log. A leader answers once the log is writable at the durability its
    /// configuration promises (its sync set full and on record), unless `no_wait`.
    CreateLog {
        name: String,
        no_wait: bool,
    },
    /// Planned leadership transfer of a log to node `to` (empty: the node picks a member of the
    /// sync set), through the cluster's controller. Answered `Ok` once the controller has the
    /// transfer; it completes when the target has caught up (watch `Status`).
    Transfer {
        log: String,
        to: String,
    },
    ListLogs,
    Status,
    Append(AppendRequest),
    Read(ReadRequest),
    Tail(TailRequest),
    /// Store an application snapshot of a log at an offset (leader only).
    PutSnapshot(Snapshot),
    /// The latest application snapshot of a log: answered by [`Response::Snapshot`], or
    /// [`ErrorCode::SnapshotNotFound`].
    GetSnapshot {
        log: String,
    },
    /// Peer: replicate a log (see [`ReplicateRequest`]).
    Replicate(ReplicateRequest),
    /// Peer: a follower holds everything below `durable` durably (on a replication stream).
    Ack {
        durable: u64,
    },
    /// Peer: where does `epoch` end in the leader's log? Answered by [`Response::EpochEnd`].
    EpochEnd {
        log: String,
        epoch: u64,
    },
    /// Peer: the crc32c of the batches holding records `from..until` (both batch boundaries),
    /// as stored, end to end. Answered by [`Response::Checksum`]; a replica's scrub compares a
    /// sealed segment with its leader's copy so.
    Checksum {
        log: String,
        from: u64,
        until: u64,
    },
}

impl Request {
    /// Whether only peers (other nodes, on the peer ALPN) may send this.
    pub fn is_peer(&self) -> bool {
        matches!(
            self,
            Request::Replicate(_)
                | Request::Ack { .. }
                | Request::EpochEnd { .. }
                | Request::Checksum { .. }
        )
    }
}

/// An application snapshot: opaque state (a database file, say) that reflects the log's records
/// below `offset`. A reader can start from it and read the log from `offset` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub log: String,
    pub offset: u64,
    /// crc32c (Castagnoli) of `data`, checked by every node that stores it and every client
    /// that receives it.
    pub crc32c: u32,
    pub data: Bytes,
}

/// [`Receipt::flags`] bit: the append was a retry of one already stored; the receipt is the
/// original one.
pub const RECEIPT_DUPLICATE: u8 = 0x01;
/// [`Receipt::flags`] bit: the level asked for was not reached; the append is stored at `level`.
pub const RECEIPT_DEGRADED: u8 = 0x02;

/// The answer to a successful append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Offset of the first record appended.
    pub first: u64,
    /// Offset after the last record appended.
    pub next: u64,
    pub epoch: u64,
    /// The durability level reached when the receipt was sent.
    pub level: Acks,
    pub flags: u8,
    /// Number of replicas, the leader included, known to hold the records durably.
    pub replicas: u16,
    /// Their node ids (as many as `replicas`; empty from a node that does not name them).
    pub holders: Vec<String>,
}

/// One log as listed by [`Request::ListLogs`] and [`Request::Status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogInfo {
    pub name: String,
    /// First offset still stored.
    pub start: u64,
    /// Next offset to be assigned (written, maybe not yet durable).
    pub end: u64,
    /// Committed horizon: what readers see by default (on a follower, the leader's commit
    /// offset as far as this follower holds it durably).
    pub committed: u64,
    /// Durable horizon on this node (fdatasync'd).
    pub flushed: u64,
    pub epoch: u64,
    pub disk_bytes: u64,
    /// Offset of the latest application snapshot this node holds, if any.
    pub snapshot: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusResponse {
    pub node_id: String,
    pub version: String,
    /// `standalone`, `leader` or `follower`.
    pub role: String,
    pub shards: u16,
    pub uptime_ms: u64,
    pub connections: u32,
    pub logs: Vec<LogInfo>,
    /// On a follower: the leader's address; empty otherwise.
    pub leader: String,
    /// On a leader: the replication state of each log.
    pub replication: Vec<LogReplication>,
    /// On a node that runs the embedded controller: its view of the cluster's metadata.
    pub controller: Option<ControllerStatus>,
    /// Records this node truncated from its logs (divergent suffixes) and kept in quarantine.
    pub quarantined: Vec<Quarantined>,
    /// Damage the background scrub found in this node's sealed segments since it started.
    pub damaged: Vec<Damaged>,
}

/// A damaged range of a sealed segment, found by the background scrub: never served, and
/// repaired from a healthy replica where one is reachable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Damaged {
    pub log: String,
    /// The records it holds: `from` (included) to `until` (excluded).
    pub from: u64,
    pub until: u64,
    /// The segment file, and the byte where the damage starts.
    pub file: String,
    pub position: u64,
    /// What was wrong.
    pub detail: String,
    /// When it was found, in ms since the Unix epoch.
    pub at_ms: u64,
    /// When it was repaired (0: not yet).
    pub repaired_ms: u64,
}

/// A divergent suffix a replica truncated, kept in a quarantine file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quarantined {
    pub log: String,
    /// The records from `from` (included) to `to` (excluded).
    pub from: u64,
    pub to: u64,
    pub records: u64,
    pub bytes: u64,
    /// The epochs they were written in.
    pub epochs: Vec<u64>,
    /// When, in ms since the Unix epoch.
    pub at_ms: u64,
    /// The file holding their batches, on the node.
    pub file: String,
}

/// The embedded controller's view, as one node has applied it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerStatus {
    /// Chosen when the cluster formed; empty until then.
    pub cluster_id: String,
    /// The node leading the controller (its Raft leader); empty while there is none.
    pub leader: String,
    /// The Raft term and the last applied Raft index on this node.
    pub term: u64,
    pub applied: u64,
    /// Every member, as `id=address`.
    pub members: Vec<String>,
    pub logs: Vec<ControlledLog>,
    /// The members this node has heard from recently (itself included).
    pub reachable: Vec<String>,
    /// Why the controller cannot act (no leader, no majority reachable); empty when it can.
    pub problem: String,
}

/// One log in the controller's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlledLog {
    pub log: String,
    /// Its leader; empty while it has none.
    pub leader: String,
    pub epoch: u64,
    /// The followers that hold every append acknowledged at `sync`.
    pub sync_set: Vec<String>,
    /// Why it has no leader (empty when it has one).
    pub no_leader: String,
    /// The target of a planned transfer in progress (empty: none).
    pub transfer_to: String,
    /// Elections that may have lost acknowledged appends (`unclean_failover`).
    pub unclean_elections: u32,
}

/// The leader's view of one log's replication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogReplication {
    pub log: String,
    /// Durable on the leader and every sync-set member: what readers see.
    pub commit: u64,
    /// The configured sync set size.
    pub sync_replicas: u16,
    /// Empty sync-set places (the durability debt while degraded).
    pub sync_shortfall: u16,
    pub followers: Vec<FollowerStatus>,
}

/// One follower of a log, as its leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowerStatus {
    pub id: String,
    /// Where clients reach it (as it announced), or empty.
    pub addr: String,
    /// First offset it does not hold durably.
    pub durable: u64,
    pub connected: bool,
    pub in_sync_set: bool,
    /// Behind the leader's end: records, bytes (approximate, by segment position) and
    /// milliseconds since it last had everything.
    pub lag_records: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    /// Catching up from far behind (bootstrap or bulk catch-up): bytes sent so far and the
    /// bytes there were to send when it started; both 0 when live.
    pub catchup_done_bytes: u64,
    pub catchup_total_bytes: u64,
}

/// Whole batches in the storage format (`docs/log-format.md`), back to back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchesResponse {
    /// Where the next read should start.
    pub next_offset: u64,
    /// The committed horizon when the answer was built.
    pub committed: u64,
    pub batches: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorResponse {
    pub code: ErrorCode,
    /// Code-specific number: the log's next offset for [`ErrorCode::OffsetConflict`], the
    /// expected sequence for [`ErrorCode::SequenceGap`] and [`ErrorCode::StaleSequence`], the
    /// log's start for [`ErrorCode::OffsetOutOfRange`], 0 otherwise.
    pub detail: u64,
    pub message: String,
    /// For [`ErrorCode::NotLeader`]: the address of the leader, if known; otherwise empty.
    pub leader: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Ok,
    Error(ErrorResponse),
    Receipt(Receipt),
    Logs(Vec<LogInfo>),
    Status(Box<StatusResponse>),
    Batches(BatchesResponse),
    /// The latest application snapshot of a log.
    Snapshot(Snapshot),
    /// Peer: records for a follower.
    Replicated(ReplicatedResponse),
    /// Peer: the answer to [`Request::EpochEnd`]: the largest epoch of the leader's history that
    /// is at most the one asked about, and the offset where it ends (KIP-101).
    EpochEnd {
        epoch: u64,
        end: u64,
    },
    /// Peer: the answer to [`Request::Checksum`]: the crc32c of the range's batch bytes and
    /// how many bytes that is.
    Checksum {
        crc: u32,
        bytes: u64,
    },
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error(ErrorResponse {
            code,
            message: message.into(),
            leader: String::new(),
            detail: 0,
        })
    }
}
