//! Per-log limits and retention settings. Every limit has a `_max` name and a test crossing it.

use std::time::Duration;

use crate::error::{Error, Result};

/// Settings of one log. `Default` gives the production values.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Largest segment file. Every segment file is zero-filled to its whole size before it
    /// takes a write, and sealed when the next batch would not fit. Sizes run from
    /// `segment_initial_bytes` up to this, following the log's write rate.
    pub segment_bytes_max: u64,
    /// Size of a new log's first segment, and the smallest segment prepared later: what an idle
    /// log costs on disk. A multiple of 4 KiB, at least 4 KiB and at most `segment_bytes_max`.
    pub segment_initial_bytes: u64,
    /// How far ahead of the writer the next segment is sized: once the active segment is half
    /// full, the next one is prepared with room for this long of writes at the rate the active
    /// segment was filled at, measured over at least a second (rounded up to a power of two,
    /// within `segment_initial_bytes..=segment_bytes_max`).
    pub segment_lookahead: Duration,
    /// One sparse index entry per this many bytes of segment data.
    pub index_interval_bytes: u32,
    /// Largest encoded batch (header included) an append may produce.
    pub batch_bytes_max: usize,
    /// Most records in one batch.
    pub batch_records_max: usize,
    /// Bytes queued for writing beyond which `try_append` answers `Backpressure`.
    pub pending_bytes_max: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 64 << 20,
            segment_initial_bytes: 1 << 20,
            segment_lookahead: SEGMENT_LOOKAHEAD,
            index_interval_bytes: 4096,
            batch_bytes_max: 4 << 20,
            batch_records_max: 65_536,
            pending_bytes_max: 64 << 20,
        }
    }
}

/// Smallest `segment_bytes_max` accepted: one header plus one small record must fit.
pub const SEGMENT_BYTES_MIN: u64 = 4096;
/// Largest `segment_bytes_max`: positions inside a segment are u32.
pub const SEGMENT_BYTES_LIMIT: u64 = u32::MAX as u64;
/// Segment sizes are whole multiples of this (a page on the platforms replog runs on).
pub const SEGMENT_BYTES_UNIT: u64 = 4096;
/// Default `segment_lookahead`: the next segment holds about ten seconds of writes.
pub const SEGMENT_LOOKAHEAD: Duration = Duration::from_secs(10);

impl LogConfig {
    /// Check that the values are usable together.
    pub fn validate(&self) -> Result<()> {
        if self.segment_bytes_max < SEGMENT_BYTES_MIN
            || self.segment_bytes_max > SEGMENT_BYTES_LIMIT
        {
            return Err(Error::Config("segment_bytes_max must be in 4 KiB..4 GiB"));
        }
        if self.segment_initial_bytes < SEGMENT_BYTES_UNIT
            || self.segment_initial_bytes % SEGMENT_BYTES_UNIT != 0
            || self.segment_initial_bytes > self.segment_bytes_max
        {
            return Err(Error::Config(
                "segment_initial_bytes must be a multiple of 4 KiB in 4 KiB..=segment_bytes_max",
            ));
        }
        if self.batch_bytes_max as u64 > self.segment_bytes_max {
            return Err(Error::Config(
                "batch_bytes_max must not exceed segment_bytes_max",
            ));
        }
        if self.batch_bytes_max
            > crate::batch::BATCH_PAYLOAD_BYTES_MAX + crate::batch::BATCH_HEADER_LEN
        {
            return Err(Error::Config(
                "batch_bytes_max exceeds the format's 64 MiB limit",
            ));
        }
        if self.batch_bytes_max <= crate::batch::BATCH_HEADER_LEN {
            return Err(Error::Config(
                "batch_bytes_max must exceed the batch header",
            ));
        }
        if self.index_interval_bytes == 0 {
            return Err(Error::Config("index_interval_bytes must be positive"));
        }
        if self.batch_records_max == 0 || self.pending_bytes_max < self.batch_bytes_max {
            return Err(Error::Config(
                "batch_records_max must be positive and pending_bytes_max >= batch_bytes_max",
            ));
        }
        Ok(())
    }
}

/// What retention may delete. Only whole sealed segments are deleted, never the active one, and
/// never past the lowest pinned offset.
#[derive(Clone, Debug, Default)]
pub struct RetentionPolicy {
    /// Keep at most this many bytes of segments (the active segment always stays).
    pub bytes_max: Option<u64>,
    /// Delete sealed segments whose newest batch is older than this.
    pub age_max: Option<Duration>,
}
