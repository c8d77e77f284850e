//! Controller frames between nodes over QUIC: the node's peer TLS configuration (mutual TLS,
//! ALPN `replog-peer/1`), one connection per member made on demand, one unidirectional stream
//! per frame (`crate::controller::encode_frame`). Best effort: a frame for a member that cannot
//! be reached is dropped, and Raft sends again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::driver::Transport;
use super::meta::NodeId;
use super::ControlError;

/// How long connecting to a member may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed connection attempt, frames for that member are dropped for this long.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);
/// Frames queued per member before new ones are dropped.
pub const PEER_QUEUE_FRAMES: usize = 1024;

/// The QUIC transport: a thread with its own runtime and client endpoint.
pub struct QuicTransport {
    tx: mpsc::UnboundedSender<(NodeId, Bytes)>,
}

impl QuicTransport {
    /// Start sending as `me` to the members at `addrs`, from an endpoint bound to `bind`.
    pub fn start(
        me: NodeId,
        addrs: HashMap<NodeId, SocketAddr>,
        client: quinn::ClientConfig,
        bind: SocketAddr,
    ) -> Result<QuicTransport, ControlError> {
        let fail = |what| move |source| ControlError::Transport { what, source };
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("controller-net".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(fail("runtime")(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut endpoint = match quinn::Endpoint::client(bind) {
                        Ok(ep) => ep,
                        Err(e) => {
                            let _ = ready_tx.send(Err(fail("endpoint")(e)));
                            return;
                        }
                    };
                    endpoint.set_default_client_config(client);
                    let _ = ready_tx.send(Ok(()));
                    route(me, addrs, endpoint, rx).await;
                });
            })
            .map_err(fail("thread"))?;
        ready.recv().map_err(|_| {
            fail("thread")(std::io::Error::other("ended before the transport started"))
        })??;
        Ok(QuicTransport { tx })
    }
}

impl Transport for QuicTransport {
    fn send(&self, to: &NodeId, frame: Bytes) {
        let _ = self.tx.send((to.clone(), frame));
    }
}

/// Hand each frame to its member's sender task, until the transport is dropped.
async fn route(
    me: NodeId,
    addrs: HashMap<NodeId, SocketAddr>,
    endpoint: quinn::Endpoint,
    mut rx: mpsc::UnboundedReceiver<(NodeId, Bytes)>,
) {
    let mut peers: HashMap<NodeId, mpsc::Sender<Bytes>> = HashMap::new();
    while let Some((to, frame)) = rx.recv().await {
        let Some(&addr) = addrs.get(&to) else {
            continue;
        };
        let peer = peers.entry(to.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_FRAMES);
            tokio::spawn(send_to(me.clone(), to, addr, endpoint.clone(), rx));
            tx
        });
        // A full queue means the member is unreachable or slow: drop, Raft resends.
        let _ = peer.try_send(frame);
    }
    endpoint.close(0u32.into(), b"controller stopped");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

async fn send_to(
    me: NodeId,
    to: NodeId,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    mut rx: mpsc::Receiver<Bytes>,
) {
    let name = crate::tls::peer_name(&to);
    let mut conn: Option<quinn::Connection> = None;
    let mut retry_at = Instant::now();
    while let Some(frame) = rx.recv().await {
        if conn.as_ref().is_none_or(|c| c.close_reason().is_some()) {
            conn = None;
            if Instant::now() < retry_at {
                continue;
            }
            let connecting = match endpoint.connect(addr, &name) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(peer = %to, error = %e, "controller: cannot connect");
                    retry_at = Instant::now() + RECONNECT_BACKOFF;
                    continue;
                }
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(c)) => {
                    tracing::debug!(peer = %to, "controller: connected");
                    conn = Some(c)
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %to, error = %e, "controller: connection failed");
                    retry_at = Instant::now() + RECONNECT_BACKOFF;
                    continue;
                }
                Err(_) => {
                    tracing::debug!(peer = %to, "controller: connecting timed out");
                    retry_at = Instant::now() + RECONNECT_BACKOFF;
                    continue;
                }
            }
        }
        let c = conn.clone().expect("connected above");
        let bytes = crate::controller::encode_frame(&me, &frame);
        tokio::spawn(async move {
            if let Ok(mut s) = c.open_uni().await {
                if s.write_all(&bytes).await.is_ok() {
                    let _ = s.finish();
                }
            }
        });
    }
}
