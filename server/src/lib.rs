//! The replog node: a QUIC endpoint (quinn, TLS 1.3) over per-core shards that own logs.
//!
//! Thread-per-core: each shard is one thread running a tokio-uring runtime (a tokio
//! current-thread runtime with an io_uring driver). Each shard has its own UDP socket bound to
//! the node's port with `SO_REUSEPORT`, so the kernel spreads connections over shards and a
//! connection's packets, TLS and streams are handled on one core. Logs are owned by shards by a
//! hash of their name ([`shard_of`]); a request for a log owned by another shard is forwarded,
//! with its QUIC stream, over a bounded channel to the owner, which serves it from its own
//! [`log_core::Log`]. Nothing on the request path is shared between shards but that channel
//! and the metric counters.
//!
//! The wire protocol is the `protocol` crate and `docs/protocol.md`.

pub mod alloc;
pub mod cli;
mod common;
pub mod config;
mod conn;
pub mod controller;
mod files;
mod follow;
mod layout;
mod leader;
pub mod metrics;
mod replication;
mod runtime;
mod scrub;
mod service;
mod shard;
mod snapshots;
pub mod tls;
mod wire;

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use config::NodeConfig;
use tokio::sync::{mpsc, oneshot};

/// Why a node could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("controller: {0}")]
    Controller(#[source] controller::ControlError),
    /// An operating-system call failed; `what` names the call and what it was on.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Durable(#[from] durable::Error),
    #[error("data directory {} is in use by another node (lock {})", dir.display(), lock.display())]
    DataDirInUse {
        dir: std::path::PathBuf,
        lock: std::path::PathBuf,
    },
    #[error("{} is not 32 bytes; remove it to regenerate", .0.display())]
    BadResetKey(std::path::PathBuf),
    #[error("snapshot {} is damaged: {why}", path.display())]
    DamagedSnapshot {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("a shard thread died while starting")]
    ShardDied,
    #[error("storage: {0}")]
    Storage(#[from] log_core::Error),
}

/// The [`Error::Io`] of a failed call; `what` names it and what it was on.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The shard that owns log `name` among `shards`: FNV-1a of the name, modulo the shard count.
/// Stable across restarts and versions (changing it would move logs between shards, which is
/// harmless: each shard opens the logs it owns at start).
pub fn shard_of(name: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

/// Asks a running node about its logs (from outside its shard threads).
#[derive(Clone)]
pub struct NodeHandle {
    shards: Vec<mpsc::Sender<common::ShardMsg>>,
}

impl NodeHandle {
    /// Every log the node holds; `None` once the node has stopped.
    pub async fn logs(&self) -> Option<Vec<protocol::LogInfo>> {
        let mut all = Vec::new();
        for s in &self.shards {
            let (tx, rx) = oneshot::channel();
            s.send(common::ShardMsg::ListLogs(tx)).await.ok()?;
            all.extend(rx.await.ok()?.0);
        }
        Some(all)
    }
}

/// A running node. Dropping it without [`Node::shutdown`] leaves its threads running.
pub struct Node {
    id: String,
    role: config::Role,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shards: Vec<mpsc::Sender<common::ShardMsg>>,
    threads: Vec<JoinHandle<()>>,
    _lock: File,
}

/// Take the node lock on the data directory, so two nodes never share one.
fn lock_data_dir(dir: &Path) -> Result<File, Error> {
    let path = dir.join("node.lock");
    files::lock(&path, false)?.ok_or_else(|| Error::DataDirInUse {
        dir: dir.to_path_buf(),
        lock: path.clone(),
    })
}

/// The node id: configured, or generated on first start and kept in `<data_dir>/node-id`.
fn node_id(cfg: &NodeConfig) -> Result<String, Error> {
    let path = cfg.node.data_dir.join("node-id");
    let stored = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(files::io_err("read", &path)(e)),
    };
    match (stored, cfg.node.id.as_str()) {
        (Some(s), "") => Ok(s),
        (Some(s), want) if s == want => Ok(s),
        (Some(s), want) => Err(Error::Config(format!(
            "data directory belongs to node {s:?}, not {want:?} (see {})",
            path.display()
        ))),
        (None, want) => {
            let id = if want.is_empty() {
                let b = files::random_bytes(4)?;
                format!("node-{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
            } else {
                want.to_string()
            };
            files::write_atomic(&path, format!("{id}\n").as_bytes(), 0o600)?;
            Ok(id)
        }
    }
}

/// The QUIC endpoint configuration shared by every shard, with keys derived from a secret kept
/// in `<data_dir>/reset-key` (0600) so that they survive restarts: the connection-id validation
/// key and the stateless-reset key. A client still sending on a connection of the previous
/// process then gets a valid stateless reset from the new one and reconnects at once, instead
/// of waiting for its idle timeout.
fn endpoint_config(dir: &Path) -> Result<quinn::EndpointConfig, Error> {
    let path = dir.join("reset-key");
    let secret = match std::fs::read(&path) {
        Ok(b) if b.len() == 32 => b,
        Ok(_) => return Err(Error::BadResetKey(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let b = files::random_bytes(32)?;
            files::write_atomic(&path, &b, 0o600)?;
            b
        }
        Err(e) => return Err(files::io_err("read", &path)(e)),
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let tag = ring::hmac::sign(&reset, b"replog connection id key");
    let cid_key = u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("32-byte tag"));
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

fn bind_reuseport(addr: SocketAddr) -> Result<std::net::UdpSocket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(io("socket"))?;
    s.set_reuse_port(true).map_err(io("SO_REUSEPORT"))?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    s.bind(&addr.into()).map_err(io(format!("bind {addr}")))?;
    Ok(s.into())
}

impl Node {
    /// Start a node: open its logs, bind its QUIC endpoint (and metrics endpoint, if
    /// configured), and serve until [`Node::shutdown`].
    pub fn start(cfg: NodeConfig) -> Result<Node, Error> {
        Node::start_with(cfg, None)
    }

    /// [`Node::start`] with the embedded controller `control` makes, once the node knows its
    /// id and TLS configuration: it receives the controller frames peers send and answers for
    /// the controller part of `status`.
    pub fn start_with(
        cfg: NodeConfig,
        control: Option<controller::ControlFactory>,
    ) -> Result<Node, Error> {
        cfg.validate()?;
        let dir = &cfg.node.data_dir;
        files::private_dir(&layout::logs_dir(dir))?;
        let lock = lock_data_dir(dir)?;
        let id = node_id(&cfg)?;
        let node_tls = tls::node_tls(&cfg, &id)?;
        let server_config = node_tls.server.clone();
        let endpoint_config = endpoint_config(dir)?;
        let shards = cfg.shard_count();
        let metrics = metrics::Metrics::new(shards);
        let metrics_addr = match cfg.node.metrics_listen {
            Some(a) => Some(metrics::start(a, metrics.clone())?),
            None => None,
        };

        let first = bind_reuseport(cfg.node.listen)?;
        let local_addr = first.local_addr().map_err(io("local address"))?;
        let mut sockets = vec![first];
        for _ in 1..shards {
            sockets.push(bind_reuseport(local_addr)?);
        }

        let control = match control {
            Some(make) => Some(
                make(controller::ControlContext {
                    node_id: id.clone(),
                    peer_client: node_tls.peer_client.clone(),
                    local_addr,
                })
                .map_err(Error::Controller)?,
            ),
            None => None,
        };
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| mpsc::channel(cfg.limits.shard_queue_depth))
            .unzip();
        let common = Arc::new(common::Common {
            config: cfg.clone(),
            node_id: id.clone(),
            shards: senders.clone(),
            metrics,
            tokens: conn::load_tokens(&cfg)?,
            started: std::time::Instant::now(),
            role: cfg.role(),
            advertise: cfg.replication.advertise.unwrap_or(local_addr),
            peer_client: node_tls.peer_client,
            cluster: node_tls.cluster,
            log_count: Default::default(),
            control,
            damaged: Default::default(),
            live_tail: Default::default(),
        });
        let mut threads = Vec::new();
        let mut ready = Vec::new();
        for (i, (socket, rx)) in sockets.into_iter().zip(receivers).enumerate() {
            let (tx_ready, rx_ready) = std::sync::mpsc::channel();
            let common = common.clone();
            let configs = (endpoint_config.clone(), server_config.clone());
            let t = std::thread::Builder::new()
                .name(format!("replog-shard-{i}"))
                .spawn(move || runtime::run(i, common, socket, configs, rx, tx_ready))
                .map_err(io("spawn shard thread"))?;
            threads.push(t);
            ready.push(rx_ready);
        }
        let node = Node {
            id,
            role: cfg.role(),
            local_addr,
            metrics_addr,
            shards: senders,
            threads,
            _lock: lock,
        };
        for r in ready {
            match r.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = node.shutdown();
                    return Err(e);
                }
                Err(_) => {
                    let _ = node.shutdown();
                    return Err(Error::ShardDied);
                }
            }
        }
        tracing::info!(node = %node.id, addr = %local_addr, shards, "node listening");
        Ok(node)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A handle to ask the running node about its logs from another thread.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            shards: self.shards.clone(),
        }
    }

    /// `standalone`, `leader` or `follower`.
    pub fn role(&self) -> &'static str {
        self.role.name()
    }

    /// The QUIC endpoint's address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics endpoint's address, if one was configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stop: close every connection, write and flush what is queued, close the logs, and join
    /// the shard threads. Returns the first error a log reported while closing.
    pub fn shutdown(self) -> Result<(), Error> {
        let mut waits = Vec::new();
        for s in &self.shards {
            let (tx, rx) = oneshot::channel();
            if s.blocking_send(common::ShardMsg::Shutdown(tx)).is_ok() {
                waits.push(rx);
            }
        }
        let mut first = Ok(());
        for w in waits {
            if let Ok(Err(e)) = w.blocking_recv() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_is_stable_and_spread() {
        assert_eq!(shard_of("orders", 1), 0);
        assert_eq!(shard_of("orders", 4), shard_of("orders", 4));
        let mut seen = [0usize; 4];
        for i in 0..400 {
            seen[shard_of(&format!("log-{i}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
