//! The node's side of the embedded controller: the interface the controller (`crate::controller`)
//! is given to the node through, so the shards depend on no controller code.
//!
//! Controller frames travel between nodes on the peer transport: one unidirectional QUIC stream
//! per frame on a mutually authenticated peer connection (ALPN `replog-peer/1`), holding
//! `[u8 length][sender node id][frame]`. The node checks that the connection's certificate
//! names the sender (`<id>.node.replog`) before it hands the frame over.

use bytes::Bytes;

/// The largest controller frame accepted from a peer (a Raft message with entries, or a
/// metadata snapshot).
pub const CONTROL_FRAME_BYTES_MAX: usize = 16 << 20;

/// Controller frames a peer may have in flight at once (unidirectional streams per connection;
/// a client connection's are refused).
pub const CONTROL_STREAMS_MAX: u32 = 64;

/// What the node needs from the controller.
pub trait ControlPlane: Send + Sync + 'static {
    /// A frame from the controller of node `from` (its certificate has been checked).
    fn deliver(&self, from: &str, frame: Bytes);
    /// The controller's view, for `status`.
    fn status(&self) -> protocol::ControllerStatus;
    /// What the controller has on record for `log` (`None`: not registered).
    fn log_record(&self, log: &str) -> Option<LogRecord>;
    /// Ask the controller to record `sync_set` as the sync set of `log` in `epoch`. There is no
    /// answer: [`ControlPlane::log_record`] shows the outcome.
    fn propose_sync_set(&self, log: &str, epoch: u64, sync_set: Vec<String>);
    /// Every log the controller knows.
    fn logs(&self) -> Vec<(String, LogRecord)>;
    /// Where member `id` is reached.
    fn member_addr(&self, id: &str) -> Option<std::net::SocketAddr>;
    /// Whether this node has heard from the controller's leader (or led it with its members'
    /// answers) recently enough to keep leading logs: within half of `leader_timeout`, well
    /// before the controller would replace it.
    fn lease_ok(&self) -> bool;
    /// Ask the controller to start a new epoch of `log` with this node, its recorded leader,
    /// still leading from `end` (after a restart: records it lost unflushed must never share
    /// an epoch with different records at the same offsets on a follower).
    fn renew_epoch(&self, log: &str, epoch: u64, end: u64);
    /// Ask the controller to move the leadership of `log` (in `epoch`) to `to` once `to` has
    /// caught up; the leader takes no writes meanwhile.
    fn transfer(&self, log: &str, epoch: u64, to: &str);
    /// As the leader of `log` in `epoch`, with the planned transfer to `to` under way: it takes
    /// no writes and `to` holds its whole log (ending at `end`) durably, so `to` may lead the
    /// next epoch with `sync_set`. Refused by the controller if the transfer was cancelled.
    fn complete_transfer(&self, log: &str, epoch: u64, to: &str, end: u64, sync_set: Vec<String>);
    /// This node lost its copy of `log` and is catching up (`node_core::log::must_withdraw`):
    /// ask the controller to take it out of the sync set (and its leadership). There is no
    /// answer: [`ControlPlane::log_record`] shows the outcome.
    fn withdraw(&self, log: &str);
    /// Whether the controller's storage is out of space now (it neither votes nor proposes
    /// until a write succeeds again), for the `replog_controller_no_space` gauge.
    fn no_space(&self) -> bool {
        false
    }
}

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
pub type ControlFactory =
    Box<dyn FnOnce(ControlContext) -> Result<std::sync::Arc<dyn ControlPlane>, String> + Send>;

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
