//! `replog node`: run a node from its configuration file and flags.
//!
//! On start the node prints one JSON line (`{"event":"listening", ...}`) so that scripts started
//! with port 0 learn its address; it shuts down cleanly on SIGINT or SIGTERM.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::{Node, NodeConfig};

/// The flags of `replog node`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// UDP address to serve QUIC on.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Node id (default: generated on first start and kept in the data directory).
    #[arg(long)]
    node_id: Option<String>,
    /// Shards (threads); 0 = one per core.
    #[arg(long)]
    shards: Option<usize>,
    /// TCP address for the Prometheus endpoint (GET /metrics).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain (production mode; with --tls-key).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA that signed the nodes' certificates (checked at start).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Accept this bearer token (repeatable). Any token makes authentication mandatory.
    #[arg(long = "token")]
    tokens: Vec<String>,
    /// Accept the tokens in this file, one per line.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Follow this leader (its QUIC address) for every log.
    #[arg(long, conflicts_with = "followers")]
    leader: Option<std::net::SocketAddr>,
    /// Lead every log, replicating to these follower node ids (repeat or separate with commas).
    #[arg(long = "follower", value_delimiter = ',')]
    followers: Vec<String>,
    /// Size of the sync set (0 = asynchronous, 1 = semi-synchronous).
    #[arg(long)]
    sync_replicas: Option<usize>,
    /// reject or degrade: what acks=sync appends get when the sync set is short.
    #[arg(long)]
    insufficient_replicas: Option<String>,
    /// A sync follower further behind than this many records leaves the sync set.
    #[arg(long)]
    sync_lag_records_max: Option<u64>,
    /// A sync follower not caught up to the leader's end for this long leaves the sync set (ms).
    #[arg(long)]
    sync_lag_ms_max: Option<u64>,
    /// On a follower: the address clients reach it at (default: --listen).
    #[arg(long)]
    advertise: Option<std::net::SocketAddr>,
    /// A member of the cluster's embedded controller, `id=host:port` (repeat, or separate with
    /// commas; the same list in the same order on every node, this node included).
    #[arg(long = "member", value_delimiter = ',')]
    members: Vec<String>,
    /// A leader not heard from for this long is declared failed (ms).
    #[arg(long)]
    leader_timeout_ms: Option<u64>,
    /// Elect the most up-to-date reachable replica when none holds every acknowledged append.
    #[arg(long)]
    unclean_failover: bool,
}

/// Run a node until SIGINT or SIGTERM: the configuration file, overridden by the flags.
pub fn run(a: NodeArgs) -> Result<(), String> {
    let mut cfg = match &a.config {
        Some(path) => NodeConfig::load(path).map_err(|e| e.to_string())?,
        None => NodeConfig::default(),
    };
    if let Some(d) = a.data_dir {
        cfg.node.data_dir = d;
    }
    if let Some(l) = a.listen {
        cfg.node.listen = l;
    }
    if let Some(id) = a.node_id {
        cfg.node.id = id;
    }
    if let Some(s) = a.shards {
        cfg.node.shards = s;
    }
    if a.metrics_listen.is_some() {
        cfg.node.metrics_listen = a.metrics_listen;
    }
    if a.tls_cert.is_some() {
        cfg.tls.cert = a.tls_cert;
    }
    if a.tls_key.is_some() {
        cfg.tls.key = a.tls_key;
    }
    if a.tls_ca.is_some() {
        cfg.tls.ca = a.tls_ca;
    }
    if a.client_ca.is_some() {
        cfg.tls.client_ca = a.client_ca;
    }
    cfg.auth.tokens.extend(a.tokens);
    if a.token_file.is_some() {
        cfg.auth.token_file = a.token_file;
    }
    let r = &mut cfg.replication;
    if a.leader.is_some() {
        r.leader = a.leader;
    }
    if !a.followers.is_empty() {
        r.followers = a.followers;
    }
    if let Some(k) = a.sync_replicas {
        r.sync_replicas = k;
    }
    if let Some(i) = a.insufficient_replicas {
        r.insufficient_replicas = i;
    }
    if let Some(v) = a.sync_lag_records_max {
        r.sync_lag_records_max = v;
    }
    if let Some(v) = a.sync_lag_ms_max {
        r.sync_lag_ms_max = v;
    }
    if a.advertise.is_some() {
        r.advertise = a.advertise;
    }
    let c = &mut cfg.controller;
    if !a.members.is_empty() {
        c.members = a.members;
    }
    if let Some(t) = a.leader_timeout_ms {
        c.leader_timeout_ms = t;
    }
    c.unclean_failover |= a.unclean_failover;
    let (node, controller) = if cfg.controller.members.is_empty() {
        (Node::start(cfg.clone()), None)
    } else {
        let (make, slot) = crate::controller::node::factory(&cfg);
        let node = Node::start_with(cfg.clone(), Some(make));
        let started = slot.lock().unwrap().take();
        (node, started)
    };
    let node = node.map_err(|e| e.to_string())?;
    if let Some(nc) = controller {
        crate::controller::node::run_reports(node.handle(), nc, cfg.clone());
    }
    // One machine-readable line, so scripts started with port 0 learn the address.
    println!(
        "{}",
        json!({
            "event": "listening",
            "node_id": node.id(),
            "role": node.role(),
            "addr": node.local_addr().to_string(),
            "metrics": node.metrics_addr().map(|a| a.to_string()),
            "pid": std::process::id(),
        })
    );
    let _ = std::io::stdout().flush();
    wait_for_signal();
    tracing::info!("shutting down");
    node.shutdown().map_err(|e| e.to_string())
}

/// Block until SIGINT or SIGTERM.
fn wait_for_signal() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("signal runtime");
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
}
