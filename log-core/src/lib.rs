//! replog's storage engine: named, append-only, segmented logs with io_uring group-commit writes,
//! zero-copy mmap reads and crc32c-checked recovery.
//!
//! The crate knows nothing of networking or replication policy. A [`Log`] lives on one
//! tokio-uring thread (it is `!Send` by design: thread-per-core, share-nothing); a [`Store`] holds
//! the logs of one shard. See `docs/log-format.md` for the byte layouts and the recovery decision
//! table, and docs/code-map.md for the invariants.
//!
//! Calling contract, in short:
//! - [`Log::try_append`] / [`Log::append`] assign offsets synchronously, in call order, and queue
//!   the batch; [`Log::wait_written`] and [`Log::wait_flushed`] await the two horizons
//!   [`Log::end_offset`] (in the page cache, readable) and [`Log::flush_offset`] (fdatasync'd).
//! - Offsets are positions between records: a record at offset `o` is durable iff
//!   `o < flush_offset()`.
//! - [`Log::read`] returns whole batches as slices of the segment mappings.
//! - [`Log::try_append_producer`] stores a [`ProducerMeta`] (producer id, first sequence) with a
//!   batch; [`BatchView::producer`] returns it, so a producer table can be rebuilt from the log.
//! - Any write or fdatasync error fails the log for good ([`Error::Failed`]); reopen it to
//!   re-validate from disk.
//!
//! ```
//! use log_core::{Epoch, Log, LogConfig, Offset};
//!
//! let dir = tempfile::tempdir().unwrap();
//! tokio_uring::start(async {
//!     let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
//!     let appended = log.try_append(Epoch(1), &[b"hello".as_slice(), b"world"]).unwrap();
//!     log.wait_flushed(appended.next).await.unwrap(); // both records are durable now
//!     let read = log.read(Offset(1), log.end_offset(), 1 << 20).unwrap();
//!     let values: Vec<&[u8]> = read.batches[0].view().records().map(|r| r.value).collect();
//!     assert_eq!(values, [b"hello".as_slice(), b"world"]);
//!     log.close().await.unwrap();
//! });
//! ```

mod config;
mod epochs;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod fsutil;
mod index;
mod log;
mod recovery;
mod segment;
mod store;
pub mod submit;

pub use format::batch;
pub use format::{BatchHeader, BatchView, Epoch, Offset, ProducerMeta, Record, BATCH_HEADER_LEN};
/// The value types, under the path the rest of this crate uses.
mod types {
    pub use format::{Epoch, Offset};
}
pub use config::{LogConfig, RetentionPolicy, SEGMENT_LOOKAHEAD};
pub use epochs::EpochEntry;
pub use error::{CorruptionKind, Error, Result};
pub use log::{
    Appended, BatchRef, Batches, Damage, Log, ReadBatches, Scrubbed, WriteTimes, SCAN_BYTES,
    WRITE_TIMES_KEPT,
};
pub use recovery::RecoveryReport;
pub use store::{validate_log_name, Store, LOG_NAME_BYTES_MAX};
