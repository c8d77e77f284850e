//! replog's value types and formats: what storage, the wire protocol and the client share.
//!
//! - [`batch`]: the batch format, which is both the on-disk format and the replication and
//!   read wire format (followers store the leader's bytes verbatim; clients check them).
//! - [`Offset`], [`Epoch`]: newtypes that keep positions and terms apart from counts.
//! - [`check_log_name`], [`LOG_NAME_BYTES_MAX`]: what a log name may be.
//!
//! Pure: no files, sockets, clock, threads or runtime, so the sans-IO `protocol` crate and
//! the client can use it without pulling in the storage engine.

pub mod batch;
mod name;
mod types;

pub use batch::{BatchHeader, BatchView, ProducerMeta, Record, BATCH_HEADER_LEN};
pub use name::{check_log_name, LOG_NAME_BYTES_MAX};
pub use types::{Epoch, Offset};
