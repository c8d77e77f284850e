//! What every shard of a node shares (read-only, or atomics), and the messages between
//! shards.

use std::sync::Arc;
use std::time::Instant;

use protocol::{LogInfo, LogReplication, Request};
use tokio::sync::{mpsc, oneshot};

use crate::config::{NodeConfig, Role};
use crate::metrics::Metrics;
use crate::Error;

/// What every shard shares (read-only, or atomics).
pub(crate) struct Common {
    pub config: NodeConfig,
    pub node_id: String,
    pub shards: Vec<mpsc::Sender<ShardMsg>>,
    pub metrics: Arc<Metrics>,
    pub tokens: Vec<Vec<u8>>,
    pub started: Instant,
    /// This node's role for every log it holds.
    pub role: Role,
    /// Where clients reach this node (announced to the leader by a follower).
    pub advertise: std::net::SocketAddr,
    /// TLS towards peers: the client configuration to reach a leader, and the verifier of
    /// peer certificates.
    pub peer_client: quinn::ClientConfig,
    pub cluster: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// Logs open or being created on the node, over all shards (checked against `logs_max`).
    pub log_count: std::sync::atomic::AtomicUsize,
    /// The embedded controller, when the node runs one.
    pub control: Option<Arc<crate::controller::node::NodeController>>,
    /// What the background scrub found, for `status` (kept until the node stops).
    pub damaged: std::sync::Mutex<Vec<protocol::Damaged>>,
    /// How fast followers acknowledge the live frames of every log this node leads, for
    /// pacing catch-ups (milliseconds from [`Common::started`]).
    pub live_tail: std::sync::Mutex<node_core::catchup::LiveTail>,
}

/// Messages between shards.
pub(crate) enum ShardMsg {
    /// A request for a log this shard owns, with the stream to answer on.
    Stream {
        req: Request,
        send: quinn::SendStream,
        /// The request side, for streams that carry more than one request (replication).
        recv: Option<quinn::RecvStream>,
        /// When the stream was accepted (the start of the `request` stage).
        accepted: std::time::Instant,
    },
    /// Describe the logs this shard owns (and, on a leader, their replication).
    ListLogs(oneshot::Sender<(Vec<LogInfo>, Vec<LogReplication>)>),
    /// Close the endpoint and the logs, then answer.
    Shutdown(oneshot::Sender<Result<(), Error>>),
}

impl Common {
    /// Milliseconds since the node started (the clock of [`Common::live_tail`]).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The followers of `name` when this node leads it: the controller's replicas, or the
    /// configured followers.
    pub fn followers_of(&self, name: &str) -> Vec<String> {
        match self.control.as_ref().and_then(|c| c.log_record(name)) {
            Some(r) => r
                .replicas
                .into_iter()
                .filter(|id| *id != self.node_id)
                .collect(),
            None => self.config.replication.followers.clone(),
        }
    }

    /// Where writes to `name` should go, for a `not_leader` answer (empty if unknown).
    pub fn leader_hint(&self, name: Option<&str>) -> String {
        if let (Some(control), Some(name)) = (&self.control, name) {
            if let Some(r) = control.log_record(name) {
                // A node that answers `not_leader` while the record names it has lost the
                // controller (or is handing the log over): the record is stale, and naming
                // itself would send the client straight back. It names nobody; the client
                // asks the other nodes.
                return r
                    .leader
                    .filter(|l| *l != self.node_id)
                    .and_then(|l| control.member_addr(&l))
                    .map_or(String::new(), |a| a.to_string());
            }
        }
        match self.role {
            Role::Follower(a) => a.to_string(),
            _ => String::new(),
        }
    }
}
