//! Error codes on the wire, and the codec's own errors.

use thiserror::Error;

/// Every error a node can answer with. The numbers are part of the protocol: never reuse one.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame or message could not be decoded (bad field, bad UTF-8, trailing bytes...).
    Malformed = 1,
    /// The frame header's version is not one this node speaks.
    UnsupportedVersion = 2,
    /// The frame's message kind is unknown, or is not a request.
    UnknownMessage = 3,
    /// A length is beyond a limit (frame, records per append, name, token).
    LimitExceeded = 4,
    /// The node requires a token and none (or a wrong one) was presented.
    Unauthenticated = 5,
    LogNotFound = 6,
    LogExists = 7,
    InvalidName = 8,
    /// Conditional append: the log's next offset is not the expected one (`detail` = actual).
    OffsetConflict = 9,
    /// The durability level asked for needs more replicas than are available.
    NotEnoughReplicas = 10,
    /// This node does not lead the log; `leader` names the one that does, if known.
    NotLeader = 11,
    /// The offset is below the log's start or beyond its end.
    OffsetOutOfRange = 12,
    /// An idempotent append skipped sequence numbers (`detail` = the expected next sequence).
    SequenceGap = 13,
    /// An idempotent append repeats a sequence older than the node remembers.
    StaleSequence = 14,
    /// The node is overloaded (too many connections, streams or pending bytes); retry later.
    Busy = 15,
    /// The level was not reached in time; the append may or may not be stored (unknown outcome).
    Timeout = 16,
    /// The log failed on disk on this node; its state is unknown until the node restarts.
    StorageFailed = 17,
    /// A stale epoch was presented.
    StaleEpoch = 18,
    /// The node is shutting down.
    ShuttingDown = 19,
    /// A bug or an unexpected condition in the node.
    Internal = 20,
    /// A replica has not reached the read's `min_offset` within the wait; `detail` = the
    /// offset it has committed. Another replica (or the leader) may answer.
    Behind = 21,
    /// The log has no application snapshot (on this node).
    SnapshotNotFound = 22,
    /// The log cannot take the request at this moment but will shortly, with nothing done:
    /// a leader elected moments ago whose sync set is not on the controller's record yet
    /// answers `acks=sync` appends so. Retry with backoff until the request's deadline.
    Unavailable = 23,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => Malformed,
            2 => UnsupportedVersion,
            3 => UnknownMessage,
            4 => LimitExceeded,
            5 => Unauthenticated,
            6 => LogNotFound,
            7 => LogExists,
            8 => InvalidName,
            9 => OffsetConflict,
            10 => NotEnoughReplicas,
            11 => NotLeader,
            12 => OffsetOutOfRange,
            13 => SequenceGap,
            14 => StaleSequence,
            15 => Busy,
            16 => Timeout,
            17 => StorageFailed,
            18 => StaleEpoch,
            19 => ShuttingDown,
            20 => Internal,
            21 => Behind,
            22 => SnapshotNotFound,
            23 => Unavailable,
            _ => return None,
        })
    }

    /// The name used in docs, logs and JSON output.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Malformed => "malformed",
            UnsupportedVersion => "unsupported_version",
            UnknownMessage => "unknown_message",
            LimitExceeded => "limit_exceeded",
            Unauthenticated => "unauthenticated",
            LogNotFound => "log_not_found",
            LogExists => "log_exists",
            InvalidName => "invalid_name",
            OffsetConflict => "offset_conflict",
            NotEnoughReplicas => "not_enough_replicas",
            NotLeader => "not_leader",
            OffsetOutOfRange => "offset_out_of_range",
            SequenceGap => "sequence_gap",
            StaleSequence => "stale_sequence",
            Busy => "busy",
            Timeout => "timeout",
            StorageFailed => "storage_failed",
            StaleEpoch => "stale_epoch",
            ShuttingDown => "shutting_down",
            Internal => "internal",
            Behind => "behind",
            SnapshotNotFound => "snapshot_not_found",
            Unavailable => "unavailable",
        }
    }

    /// Whether the operation that got this error certainly had no effect. `Timeout`,
    /// `StorageFailed` and `Internal` are unknown outcomes: the records may be stored.
    pub fn is_definite(self) -> bool {
        !matches!(
            self,
            ErrorCode::Timeout | ErrorCode::StorageFailed | ErrorCode::Internal
        )
    }
}

/// Why bytes could not be decoded. Each maps to the [`ErrorCode`] a node answers with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("frame body of {len} bytes exceeds frame_bytes_max {max}")]
    FrameTooLarge { len: u64, max: u32 },
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("reserved header field is {0}, must be 0")]
    ReservedNotZero(u16),
    #[error("message ends early: {0}")]
    Truncated(&'static str),
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("unknown error code {0}")]
    UnknownErrorCode(u16),
}

impl ProtocolError {
    /// The code a node answers with when a request fails to decode this way.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } | ProtocolError::TooLong { .. } => {
                ErrorCode::LimitExceeded
            }
            ProtocolError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            ProtocolError::UnknownKind(_) => ErrorCode::UnknownMessage,
            _ => ErrorCode::Malformed,
        }
    }
}
