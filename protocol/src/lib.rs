//! replog's wire protocol, sans-IO.
//!
//! This crate holds every message a client or another node can send or receive, a codec that
//! enforces hard limits before allocating, and the pure decisions the node makes about a request
//! (idempotent-producer sequence checks). It has no sockets, files, clock or runtime: callers
//! read bytes from a QUIC stream, hand them here, and act on what comes back.
//!
//! The byte-level specification, written so that a client can be built in another language from
//! it alone, is `docs/protocol.md`. In short:
//! - ALPN [`ALPN`]; one QUIC bidirectional stream per exchange; frames are an 8-byte header
//!   ([`FrameHeader`]) followed by a body of at most [`Limits::frame_bytes_max`] bytes.
//! - A client sends [`Request`]s; a node answers each with one [`Response`] (a tail stream
//!   answers with a sequence of [`Response::Batches`]).
//! - Every failure the node reports is a [`Response::Error`] with an [`ErrorCode`].
//!
//! [`replication`] holds the replication decisions as state machines: the leader's view of its
//! followers (sync set, commit offset, the level an append has reached) and a follower's next
//! step (fetch, truncate at the divergence point, bootstrap).

mod codec;
mod error;
pub mod idempotence;
mod message;
pub mod planted;
pub mod replication;

/// The value types and the batch format the messages carry.
pub use format;

pub use codec::{
    decode_request, decode_response, encode_batches_prefix, encode_replicated_prefix,
    encode_request, encode_response, FrameHeader, Limits, BATCHES_PREFIX_LEN, FRAME_HEADER_LEN,
    KNOWN_VERSION, REPLICATED_PREFIX_LEN,
};
pub use error::{ErrorCode, ProtocolError};
pub use message::{
    Acks, AppendRequest, BatchesResponse, ControlledLog, ControllerStatus, Damaged, ErrorResponse,
    FollowerStatus, LogInfo, LogReplication, Quarantined, ReadRequest, Receipt, ReplicateRequest,
    ReplicatedResponse, Request, Response, Snapshot, StatusResponse, TailRequest, RECEIPT_DEGRADED,
    RECEIPT_DUPLICATE,
};

/// QUIC application error codes a node uses when it closes a connection or resets a stream
/// (these are transport-level codes, not [`ErrorCode`]s).
pub mod close_code {
    /// The node is shutting down, or the connection ended normally.
    pub const NORMAL: u32 = 0;
    /// A client or a follower stops a stream (and may close the connection) whose answer it
    /// cannot decode: the node does not speak the protocol correctly. Nodes do not send it;
    /// they answer a malformed request with an `Error` frame.
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// `connections_max` was reached; the reason string is `busy`.
    pub const BUSY: u32 = 2;
    /// The first stream did not carry a valid token.
    pub const UNAUTHENTICATED: u32 = 5;
    /// A tail stream whose reader stopped taking data for longer than the node's stall timeout.
    pub const SLOW_READER: u32 = 6;
    /// A unidirectional stream on a client connection (they carry controller frames between
    /// nodes only): the node stops it.
    pub const UNEXPECTED_STREAM: u32 = 7;
}

/// The ALPN protocol id a client must offer during the TLS handshake.
pub const ALPN: &[u8] = b"replog/1";
/// The ALPN protocol id of connections between nodes (replication).
pub const PEER_ALPN: &[u8] = b"replog-peer/1";
