//! The embedded controller, hosted by the node: cluster metadata replicated among the nodes by
//! Raft (raft-rs). Its policy (the metadata, the election rule, failover) is
//! `node_core::controller`'s; this module runs it.
//!
//! - [`storage`]: the Raft log, hard state and snapshot on disk.
//! - [`driver`]: the Raft loop, proposals, and the published metadata.
//! - [`transport`]: controller frames between nodes over QUIC.
//! - [`node`]: the controller inside a node, and the reports the node sends it.
//!
//! This module itself is the node's side of it: how the node starts it ([`ControlFactory`]),
//! and the controller frames it carries between nodes. The shards reach the controller through
//! [`node::NodeController`].
//!
//! Controller frames travel between nodes on the peer transport: one unidirectional QUIC stream
//! per frame on a mutually authenticated peer connection (ALPN `replog-peer/1`), holding
//! `[u8 length][sender node id][frame]`. The node checks that the connection's certificate
//! names the sender (`<id>.node.replog`) before it hands the frame over.

pub use node_core::controller::{failover, meta};

pub mod driver;
pub mod node;
pub mod raft_log;
pub mod storage;
pub mod transport;

/// The largest controller frame accepted from a peer (a Raft message with entries, or a
/// metadata snapshot).
pub const CONTROL_FRAME_BYTES_MAX: usize = 16 << 20;

pub use node_core::log::LogRecord;

/// What the node gives the controller it starts: who it is, and how to reach its peers.
pub struct ControlContext {
    /// This node's id.
    pub node_id: String,
    /// The QUIC client configuration towards peers (the node's certificate, the cluster CA,
    /// ALPN `replog-peer/1`); a peer's certificate must be valid for
    /// [`crate::tls::peer_name`] of its id.
    pub peer_client: quinn::ClientConfig,
    /// The node's QUIC address.
    pub local_addr: std::net::SocketAddr,
}

/// Starts the controller once the node knows its id and TLS configuration.
pub type ControlFactory = Box<
    dyn FnOnce(ControlContext) -> Result<std::sync::Arc<node::NodeController>, ControlError> + Send,
>;

/// Why the embedded controller did not start, or refuses the data dir.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `controller.members` is not a valid member list.
    #[error("controller members: {0}")]
    Members(#[source] Box<crate::Error>),
    /// The controller's peer transport did not start.
    #[error("controller transport: {what}: {source}")]
    Transport {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] driver::StartFail),
    /// The data dir names a cluster, but the controller state that would remember its votes
    /// is gone.
    #[error("this data dir belongs to cluster {recorded} ({}) but its controller state ({}) is missing: it was wiped or restored from an old copy; give the node a new, empty data dir", file.display(), state.display())]
    StateMissing {
        recorded: String,
        file: std::path::PathBuf,
        state: std::path::PathBuf,
    },
    /// The data dir belongs to another cluster than its controller state.
    #[error("this data dir belongs to cluster {recorded} ({}), but its controller state is of cluster {found}", file.display())]
    OtherCluster {
        recorded: String,
        found: String,
        file: std::path::PathBuf,
    },
    /// The data dir's cluster id file cannot be read.
    #[error("read {}: {source}", path.display())]
    ReadClusterId {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The cluster id cannot be recorded in the data dir.
    #[error("record the cluster id: {0}")]
    RecordClusterId(#[source] storage::StorageError),
}

/// Split a controller frame stream's bytes into (sender id, frame).
pub(crate) fn parse_frame(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (&n, rest) = bytes.split_first()?;
    if n == 0 || rest.len() < n as usize {
        return None;
    }
    let (id, frame) = rest.split_at(n as usize);
    Some((std::str::from_utf8(id).ok()?, frame))
}

/// The bytes of a controller frame stream from node `from`.
pub fn encode_frame(from: &str, frame: &[u8]) -> Vec<u8> {
    let id = from.as_bytes();
    assert!(
        !id.is_empty() && id.len() <= u8::MAX as usize,
        "node ids are DNS labels"
    );
    let mut out = Vec::with_capacity(1 + id.len() + frame.len());
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(frame);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_malformed_ones_are_refused() {
        let b = encode_frame("node-2", b"raft bytes");
        assert_eq!(parse_frame(&b), Some(("node-2", &b"raft bytes"[..])));
        assert_eq!(parse_frame(&encode_frame("n", b"")), Some(("n", &b""[..])));
        assert_eq!(parse_frame(&[]), None);
        assert_eq!(parse_frame(&[0, 1, 2]), None);
        assert_eq!(parse_frame(&[5, b'a', b'b']), None);
        assert_eq!(parse_frame(&[2, 0xff, 0xfe, 1]), None);
    }
}
