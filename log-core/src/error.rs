//! Operating errors as typed values. Broken invariants are panics, not variants here.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::batch::BatchError;
use crate::types::{Epoch, Offset};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system call failed; `op` names the call, `path` the file.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Stored bytes that fail validation somewhere they cannot be a torn tail. Never repaired by
    /// truncation: the range must be re-fetched from another replica.
    #[error("corruption in {} at byte {position}: {kind}", segment.display())]
    Corruption {
        segment: PathBuf,
        position: u64,
        kind: CorruptionKind,
    },

    /// A write or fdatasync failed earlier; the log accepts nothing more until it is reopened
    /// (and re-validated from disk). The fdatasync is never retried: after a failed fdatasync the
    /// kernel may have dropped the dirty pages, and a retry could report lost data as durable.
    #[error("log {} failed and accepts no appends until reopened: {cause}", dir.display())]
    Failed { dir: PathBuf, cause: Arc<Error> },

    /// A file in a log directory whose name claims to be a segment or index but does not parse.
    #[error("unexpected file name in log directory: {}", path.display())]
    BadFileName { path: PathBuf },

    /// A manifest, index or epoch file written by an unknown format version.
    #[error("{} has format version {found}, this build reads up to {supported}", path.display())]
    UnknownVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// Another `Log` (in this or another process) holds the directory's lock.
    #[error("log directory {} is locked by another process", path.display())]
    Locked { path: PathBuf },

    /// An append carried an epoch older than the newest epoch in the log.
    #[error("stale epoch {epoch}: the log is already at epoch {current}")]
    StaleEpoch { epoch: Epoch, current: Epoch },

    /// A pre-encoded batch did not start where the log ends.
    #[error("batch starts at offset {found} but the log's next offset is {expected}")]
    UnexpectedOffset { expected: Offset, found: Offset },

    /// A pre-encoded batch failed to decode.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),

    /// Bytes offered to repair a damaged range do not hold exactly its batches; nothing was
    /// written.
    #[error("refused repair: {0}")]
    BadRepair(String),

    /// A batch is larger than `batch_bytes_max` (or than a segment can hold).
    #[error("batch of {len} bytes exceeds batch_bytes_max {max}")]
    BatchTooLarge { len: usize, max: usize },

    /// An append with no records.
    #[error("a batch needs at least one record")]
    EmptyBatch,

    /// More records in one batch than `batch_records_max`.
    #[error("{count} records exceed batch_records_max {max}")]
    TooManyRecords { count: usize, max: usize },

    /// Truncation must land on a batch boundary: batches are stored verbatim and never split.
    #[error("offset {offset} is not a batch boundary")]
    NotBatchBoundary { offset: Offset },

    /// An offset outside `[start_offset, next_offset]`.
    #[error("offset {offset} is outside the log [{start}, {end}]")]
    OffsetOutOfRange {
        offset: Offset,
        start: Offset,
        end: Offset,
    },

    /// More than `pending_bytes_max` bytes are queued for writing; retry after awaiting
    /// [`crate::Log::append`]'s room or a written offset.
    #[error("{pending} bytes already queued for writing (pending_bytes_max {max})")]
    Backpressure { pending: usize, max: usize },

    /// The awaited offset was removed by `truncate_after` before it became durable.
    #[error("offset {offset} was truncated away before it was flushed")]
    Truncated { offset: Offset },

    /// A truncation is in progress; appends are refused until it ends.
    #[error("log is being truncated")]
    Truncating,

    /// The log was closed.
    #[error("log is closed")]
    Closed,

    /// A log name that is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid log name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// `create_log` for a name that exists.
    #[error("log {name:?} already exists")]
    AlreadyExists { name: String },

    /// A configuration value out of its allowed range.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
}

/// What exactly failed validation, for [`Error::Corruption`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptionKind {
    #[error("invalid batch ({0}) followed by a valid batch at byte {1}")]
    BadBatchBeforeValid(BatchError, u64),
    #[error("zero bytes followed by a valid batch at byte {0}")]
    HoleBeforeValid(u64),
    #[error("invalid batch in a sealed segment: {0}")]
    BadBatchInSealed(BatchError),
    #[error("sealed segment ends before its recorded length {0}")]
    SealedTooShort(u64),
    #[error("batch at offset {found} where offset {expected} was expected")]
    OffsetMismatch { expected: u64, found: u64 },
    #[error("epoch {found} after epoch {previous}: epochs went backwards")]
    EpochRegression { previous: u64, found: u64 },
    #[error("segments leave a gap: expected offset {expected}, next segment starts at {found}")]
    SegmentGap { expected: u64, found: u64 },
    #[error("sealed segment file is empty")]
    EmptySealedSegment,
    #[error("batch failed its checksum when read")]
    ChecksumOnRead,
    #[error("damaged file: {0}")]
    DamagedFile(&'static str),
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
