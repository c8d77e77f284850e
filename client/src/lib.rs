//! The replog client library: admin requests, appends, reads, tails and an idempotent producer,
//! over QUIC.
//!
//! A [`Client`] holds one QUIC connection (TLS 1.3, ALPN `replog/1`) to one of the configured
//! nodes and runs every request on its own stream, as `docs/protocol.md` specifies. It
//! reconnects lazily, follows `not_leader` redirects, and retries requests that are safe to
//! repeat after connection-level failures. Reads are monotonic and see the client's own
//! appends: the client sends the highest offset it has seen for a log as the read's
//! `min_offset`. A replica that has not committed that far answers `behind`, and the read goes
//! on to the other configured servers ([`Client::read`]).
//!
//! Appends come in two kinds:
//! - [`Client::append`] sends one batch once. If the answer is lost, the outcome is unknown
//!   ([`Error::is_unknown_outcome`]) and the append is not retried.
//! - A [`Producer`] numbers its records under a random producer id, batches and pipelines them,
//!   and resends an append whose answer was lost; the node recognises the resend and returns
//!   the original receipt, so records are not stored twice.
//!
//! By default, node certificates are verified against the development CA that nodes in
//! development mode create (see [`Trust::DevCa`]).
//!
//! ```no_run
//! use bytes::Bytes;
//! use client::{Client, ClientConfig, ProducerOptions, ReadOptions};
//!
//! # async fn example() -> client::Result<()> {
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7000"])).await?;
//! match client.create_log("events").await {
//!     Ok(()) => {}
//!     Err(e) if e.code() == Some(client::ErrorCode::LogExists) => {}
//!     Err(e) => return Err(e),
//! }
//!
//! let producer = client.producer("events", ProducerOptions::default());
//! let receipt = producer.send(Bytes::from_static(b"hello")).await?;
//! println!("stored at offset {}", receipt.first);
//!
//! let read = client.read("events", 0, ReadOptions::default()).await?;
//! for record in read.records {
//!     println!("{}: {:?}", record.offset, record.value);
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod client;
mod config;
mod conn;
mod error;
mod producer;
mod records;
mod tail;

pub use crate::client::{AppendOptions, BatchesRead, Client, ReadOptions, ReadResult};
pub use crate::config::{ClientConfig, Trust, DEFAULT_PORT, DEFAULT_SERVER, DEV_CA_DIR_ENV};
pub use crate::error::{Error, Result};
pub use crate::producer::{Producer, ProducerOptions};
pub use crate::records::ReadRecord;
pub use crate::tail::Tail;
pub use protocol::{
    Acks, ErrorCode, Limits, LogInfo, ProtocolError, Receipt, StatusResponse, RECEIPT_DEGRADED,
    RECEIPT_DUPLICATE,
};
