//! Node configuration: a TOML file, with command-line flags laid over it by the caller.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// Everything a node needs to start. Every field has a default except `data_dir`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub tls: TlsSection,
    pub auth: AuthSection,
    pub limits: LimitsSection,
    pub log: LogSection,
    pub replication: ReplicationSection,
    pub controller: ControllerSection,
}

/// The embedded controller: the cluster's members (the same list, in the same order, on every
/// node) and its failure detection. No members: no controller.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerSection {
    /// Every node of the cluster as `id=host:port` (its QUIC address), this node included.
    /// Raft ids follow the order, so it must never change for a cluster.
    pub members: Vec<String>,
    /// A leader not heard from for this long is declared failed (ms). Shorter fails over
    /// sooner, but a leader that is only slow (a long pause, a loaded disk) is replaced
    /// needlessly; longer means a longer outage when a leader really dies.
    pub leader_timeout_ms: u64,
    /// Elect the most up-to-date reachable replica when none is guaranteed to hold every
    /// acknowledged append (acknowledged appends may be lost; each such election is recorded).
    pub unclean_failover: bool,
    /// One controller (Raft) tick (ms); an election takes 10 to 20 ticks.
    pub tick_ms: u64,
}

/// Bounds of `controller.tick_ms`.
pub const CONTROLLER_TICK_MS_MIN: u64 = 10;
pub const CONTROLLER_TICK_MS_MAX: u64 = 1000;
/// Bounds of `controller.leader_timeout_ms`.
pub const LEADER_TIMEOUT_MS_MIN: u64 = 100;
pub const LEADER_TIMEOUT_MS_MAX: u64 = 600_000;
/// Most members of a cluster.
pub const CLUSTER_MEMBERS_MAX: usize = 64;

impl Default for ControllerSection {
    fn default() -> Self {
        ControllerSection {
            members: Vec::new(),
            leader_timeout_ms: 3000,
            unclean_failover: false,
            tick_ms: 100,
        }
    }
}

impl ControllerSection {
    /// The members as (id, address), in order; checked by [`NodeConfig::validate`].
    pub fn member_list(&self) -> Result<Vec<(String, SocketAddr)>, Error> {
        self.members
            .iter()
            .map(|m| {
                let (id, addr) = m.split_once('=').ok_or_else(|| {
                    Error::Config(format!("controller.members: {m:?} is not id=host:port"))
                })?;
                let addr = addr.parse().map_err(|_| {
                    Error::Config(format!("controller.members: {addr:?} is not host:port"))
                })?;
                if !valid_node_id(id) {
                    return Err(Error::Config(format!(
                        "controller.members: node id {id:?}: use 1 to 63 lowercase letters, digits and '-'"
                    )));
                }
                Ok((id.to_string(), addr))
            })
            .collect()
    }
}

/// The node's place in replication. Until the controller decides leadership, it is fixed here:
/// a node with `leader` set follows that node for every log; a node with `followers` leads
/// every log it holds and accepts those followers; a node with neither runs standalone.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationSection {
    /// On a follower: the leader's QUIC address.
    pub leader: Option<SocketAddr>,
    /// On a follower: the name the leader's certificate must be valid for (default: the
    /// leader's IP address).
    pub leader_name: Option<String>,
    /// On a follower: the address clients reach this node at, announced to the leader (default:
    /// the listen address).
    pub advertise: Option<SocketAddr>,
    /// On a leader: the node ids of its followers. Only these may replicate, and a quorum is
    /// a majority of them plus the leader.
    pub followers: Vec<String>,
    /// Size of the sync set: 0 = asynchronous, 1 = semi-synchronous, all = synchronous.
    pub sync_replicas: usize,
    /// A sync follower further behind the leader's end than this many records leaves the set.
    pub sync_lag_records_max: u64,
    /// A sync follower that has not been caught up to the leader's end for this long leaves
    /// the set (ms). An idle log is a caught-up log.
    pub sync_lag_ms_max: u64,
    /// How long `CreateLog` waits, on a leader, for the new log to be writable at the
    /// durability its configuration promises: `sync_replicas` followers in the sync set the
    /// controller has on record (ms). Past it, a create with `insufficient_replicas = reject`
    /// answers `not_enough_replicas`, naming the followers missing (the log exists). The
    /// same window applies to a node that takes the lead of a log (a failover, a restart):
    /// until its sync set is full and on record, `acks=sync` appends are answered
    /// `unavailable` (retry) instead of `not_enough_replicas`, for at most this long.
    pub create_wait_ms: u64,
    /// `reject` (fail acks=sync appends when the sync set is short) or `degrade` (acknowledge
    /// them marked degraded).
    pub insufficient_replicas: String,
    /// A follower further behind than this many bytes is served at bulk priority, below the
    /// live tail of every other stream on the connection.
    pub catchup_bytes_min: u64,
    /// Most bytes of batches in one replication frame (a single larger batch goes alone).
    pub frame_bytes_max: u32,
    /// Bulk catch-up (a follower more than `catchup_bytes_min` behind) is sent at no more than
    /// this many bytes a second per follower and log (0 = no cap).
    pub catchup_bytes_per_sec_max: u64,
    /// Bulk catch-up is paced by the live tail: its rate halves while the followers'
    /// acknowledgements of live frames take more than this many times their lowest of the
    /// last minute, and grows otherwise, up to `catchup_bytes_per_sec_max`
    /// (`node_core::catchup`). 0 turns the pacing off: catch-up then runs at the cap.
    pub catchup_live_latency_factor: f64,
    /// Retention keeps what a registered follower still needs (connected or not), unless that
    /// is more than this many bytes: then the follower will bootstrap when it returns.
    pub retention_pin_bytes_max: u64,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        let d = protocol::replication::ReplicationConfig::default();
        ReplicationSection {
            leader: None,
            leader_name: None,
            advertise: None,
            followers: Vec::new(),
            sync_replicas: d.sync_replicas,
            sync_lag_records_max: d.sync_lag_records_max,
            sync_lag_ms_max: d.sync_lag_ms_max,
            create_wait_ms: 10_000,
            insufficient_replicas: "reject".into(),
            catchup_bytes_min: 4 << 20,
            frame_bytes_max: 1 << 20,
            catchup_bytes_per_sec_max: 0,
            catchup_live_latency_factor: 2.0,
            retention_pin_bytes_max: 16 << 30,
        }
    }
}

/// What a node is for its logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Standalone,
    Leader,
    Follower(SocketAddr),
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Leader => "leader",
            Role::Follower(_) => "follower",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Node id; when empty, one is generated on first start and kept in `<data_dir>/node-id`.
    pub id: String,
    pub data_dir: PathBuf,
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// Shards (one thread each, each with its own io_uring and its own QUIC socket on the same
    /// port); 0 = one per available core.
    pub shards: usize,
    /// TCP address of the Prometheus text endpoint (`GET /metrics`); none when unset.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain. With `key`; when both are unset the node runs in dev mode and
    /// issues itself a certificate from the local development CA.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s) that signed the nodes' certificates: what clients trust. Loaded and
    /// checked at start.
    pub ca: Option<PathBuf>,
    /// When set, clients must present a certificate signed by one of these PEM CAs.
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Bearer tokens accepted from clients; when empty (and no `token_file`), no token is needed.
    pub tokens: Vec<String>,
    /// A file with one accepted token per line (blank lines and `#` comments ignored).
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest request frame body accepted (bytes).
    pub frame_bytes_max: u32,
    /// Most records in one append.
    pub records_max: u32,
    /// Most client connections at once, over all shards.
    pub connections_max: u32,
    /// Most concurrent streams (requests) per connection.
    pub streams_per_connection_max: u32,
    /// Bytes a connection may have in flight towards the node, and from the node to a client
    /// that does not read (QUIC flow-control windows).
    pub connection_window_bytes: u32,
    /// Largest answer to one read, and largest frame on a tail stream (bytes).
    pub read_bytes_max: u32,
    /// How long an append may wait for its level when the request does not say (ms).
    pub append_timeout_ms: u32,
    /// Longest wait a read may ask for (ms).
    pub read_wait_max_ms: u32,
    /// How long a stream may take to deliver its request frame (ms).
    pub request_timeout_ms: u32,
    /// A stream whose client has accepted none of an answer (a tail frame, read batches, any
    /// response) for this long is reset with the slow-reader code (ms).
    pub write_stall_timeout_ms: u32,
    /// Connections idle for this long are closed (ms).
    pub idle_timeout_ms: u32,
    /// Requests queued from one shard to another before the sender waits.
    pub shard_queue_depth: usize,
    /// Idempotent producers remembered per log.
    pub producers_per_log_max: usize,
    /// Most logs on the node. An idle log costs one segment of `log.segment_initial_bytes` on
    /// disk; a busy one up to two of `log.segment_bytes_max`.
    pub logs_max: usize,
    /// Largest application snapshot accepted (bytes); one is held in memory while it is
    /// stored or served.
    pub snapshot_bytes_max: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub segment_bytes_max: u64,
    /// Size of a new log's first segment; later segments follow the log's write rate up to
    /// `segment_bytes_max` (a larger value is taken as `segment_bytes_max`).
    pub segment_initial_bytes: u64,
    pub batch_bytes_max: usize,
    pub pending_bytes_max: usize,
    /// Retention by size: oldest sealed segments are deleted while a log holds more than this
    /// (0 = keep everything). Never past what a connected follower still needs.
    pub retention_bytes_max: u64,
    /// Retention by age: sealed segments whose newest record is older than this are deleted
    /// (ms; 0 = keep everything).
    pub retention_ms: u64,
    /// How often retention is applied (ms).
    pub retention_check_ms: u64,
    /// The background scrub's read rate: every sealed segment is re-read and every batch's
    /// crc32c checked, at most this many bytes per second per shard (0 = no scrub).
    pub scrub_bytes_per_sec: u64,
    /// A full scrub pass over every sealed segment starts this often (ms), or when the last
    /// one ends, whichever is later.
    pub scrub_interval_ms: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: String::new(),
            data_dir: PathBuf::new(),
            listen: "127.0.0.1:7000".parse().unwrap(),
            shards: 0,
            metrics_listen: None,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            frame_bytes_max: protocol::Limits::default().frame_bytes_max,
            records_max: protocol::Limits::default().records_max,
            connections_max: 1024,
            streams_per_connection_max: 64,
            connection_window_bytes: 16 << 20,
            read_bytes_max: 4 << 20,
            append_timeout_ms: 10_000,
            read_wait_max_ms: 60_000,
            request_timeout_ms: 30_000,
            write_stall_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            shard_queue_depth: 1024,
            producers_per_log_max: 10_000,
            logs_max: 1024,
            snapshot_bytes_max: 64 << 20,
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        let d = log_core::LogConfig::default();
        LogSection {
            segment_bytes_max: d.segment_bytes_max,
            segment_initial_bytes: d.segment_initial_bytes,
            batch_bytes_max: d.batch_bytes_max,
            pending_bytes_max: d.pending_bytes_max,
            retention_bytes_max: 0,
            retention_ms: 0,
            retention_check_ms: 10_000,
            scrub_bytes_per_sec: 4 << 20,
            scrub_interval_ms: 3_600_000,
        }
    }
}

impl NodeConfig {
    /// Parse a TOML file. Unknown keys are errors, so a typo does not silently keep a default.
    pub fn load(path: &Path) -> Result<NodeConfig, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        NodeConfig::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<NodeConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Check values that would otherwise fail later and less clearly.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.node.data_dir.as_os_str().is_empty() {
            return bad("node.data_dir (--data-dir) is required");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert and tls.key must be given together");
        }
        let l = &self.limits;
        if l.frame_bytes_max < 1024 {
            return bad("limits.frame_bytes_max must be at least 1024");
        }
        if l.records_max == 0 || l.connections_max == 0 || l.streams_per_connection_max == 0 {
            return bad("limits.records_max, connections_max and streams_per_connection_max must be positive");
        }
        if l.read_bytes_max < 4096 {
            return bad("limits.read_bytes_max must be at least 4096");
        }
        if l.shard_queue_depth == 0 || l.producers_per_log_max == 0 || l.logs_max == 0 {
            return bad(
                "limits.shard_queue_depth, producers_per_log_max and logs_max must be positive",
            );
        }
        let timeouts = [
            ("append_timeout_ms", l.append_timeout_ms),
            ("request_timeout_ms", l.request_timeout_ms),
            ("write_stall_timeout_ms", l.write_stall_timeout_ms),
            ("idle_timeout_ms", l.idle_timeout_ms),
        ];
        if self.log.retention_check_ms == 0 {
            return bad("log.retention_check_ms must be positive");
        }
        if self.log.scrub_interval_ms == 0 {
            return bad("log.scrub_interval_ms must be positive");
        }
        if let Some((name, _)) = timeouts.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Config(format!("limits.{name} must be positive")));
        }
        if l.connection_window_bytes < 65_536 {
            return bad("limits.connection_window_bytes must be at least 65536");
        }
        self.log_config()
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        let r = &self.replication;
        if r.leader.is_some() && !r.followers.is_empty() {
            return bad("replication.leader (a follower) and replication.followers (a leader) exclude each other");
        }
        if let Some(id) = r
            .followers
            .iter()
            .chain(std::iter::once(&self.node.id).filter(|id| !id.is_empty()))
            .find(|id| !valid_node_id(id))
        {
            return Err(Error::Config(format!(
                "node id {id:?}: use 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'"
            )));
        }
        if r.followers.contains(&self.node.id) {
            return bad("replication.followers names this node itself");
        }
        if r.sync_replicas > r.followers.len() && !r.followers.is_empty() {
            return Err(Error::Config(format!(
                "replication.sync_replicas = {} exceeds the {} configured followers",
                r.sync_replicas,
                r.followers.len()
            )));
        }
        let factor = r.catchup_live_latency_factor;
        if !(factor == 0.0 || (1.0..=100.0).contains(&factor)) {
            return Err(Error::Config(format!(
                "replication.catchup_live_latency_factor = {factor}: use 0 (no pacing) or 1 to 100"
            )));
        }
        self.replication_config()?;
        let c = &self.controller;
        if !c.members.is_empty() {
            let list = c.member_list()?;
            if list.len() > CLUSTER_MEMBERS_MAX {
                return Err(Error::Config(format!(
                    "controller.members: {} members, at most {CLUSTER_MEMBERS_MAX}",
                    list.len()
                )));
            }
            let mut ids: Vec<&str> = list.iter().map(|(id, _)| id.as_str()).collect();
            ids.sort();
            if ids.windows(2).any(|w| w[0] == w[1]) {
                return bad("controller.members names a node twice");
            }
            if self.node.id.is_empty() || !ids.contains(&self.node.id.as_str()) {
                return bad(
                    "controller.members must name this node, and node.id (--node-id) must be set",
                );
            }
            if !(CONTROLLER_TICK_MS_MIN..=CONTROLLER_TICK_MS_MAX).contains(&c.tick_ms) {
                return Err(Error::Config(format!(
                    "controller.tick_ms must be between {CONTROLLER_TICK_MS_MIN} and {CONTROLLER_TICK_MS_MAX}"
                )));
            }
            if !(LEADER_TIMEOUT_MS_MIN..=LEADER_TIMEOUT_MS_MAX).contains(&c.leader_timeout_ms) {
                return Err(Error::Config(format!(
                    "controller.leader_timeout_ms must be between {LEADER_TIMEOUT_MS_MIN} and {LEADER_TIMEOUT_MS_MAX}"
                )));
            }
        }
        if r.frame_bytes_max < 64 << 10 || r.frame_bytes_max > self.limits.frame_bytes_max {
            return bad(
                "replication.frame_bytes_max must be between 65536 and limits.frame_bytes_max",
            );
        }
        if (r.leader.is_some() || !r.followers.is_empty())
            && self.tls.cert.is_some()
            && self.tls.ca.is_none()
        {
            return bad("replication with tls.cert needs tls.ca: the CA that signed every node's certificate");
        }
        Ok(())
    }

    /// This node's role, from the replication section.
    pub fn role(&self) -> Role {
        match (
            self.replication.leader,
            self.replication.followers.is_empty(),
        ) {
            (Some(a), _) => Role::Follower(a),
            (None, false) => Role::Leader,
            (None, true) => Role::Standalone,
        }
    }

    /// Concurrent streams a node lets another node of the cluster open on one connection: a
    /// follower keeps one per log it replicates, so `logs_max`, plus an eighth (QUIC grants
    /// freed streams back in batches) and `streams_per_connection_max` for its requests.
    pub fn peer_streams_max(&self) -> u32 {
        let l = &self.limits;
        let logs = l.logs_max as u64;
        (logs + logs / 8 + u64::from(l.streams_per_connection_max)).min(u32::MAX as u64) as u32
    }

    /// The replication policy of the logs this node leads.
    pub fn replication_config(&self) -> Result<protocol::replication::ReplicationConfig, Error> {
        use protocol::replication::Insufficient;
        let r = &self.replication;
        let insufficient = match r.insufficient_replicas.as_str() {
            "reject" => Insufficient::Reject,
            "degrade" => Insufficient::Degrade,
            other => {
                return Err(Error::Config(format!(
                    "replication.insufficient_replicas is {other:?}; use \"reject\" or \"degrade\""
                )))
            }
        };
        Ok(protocol::replication::ReplicationConfig {
            // A standalone node has no followers: acks=sync has nothing to wait for.
            sync_replicas: r.sync_replicas.min(r.followers.len()),
            sync_lag_records_max: r.sync_lag_records_max,
            sync_lag_ms_max: r.sync_lag_ms_max,
            insufficient,
        })
    }

    pub fn shard_count(&self) -> usize {
        match self.node.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    pub fn protocol_limits(&self) -> protocol::Limits {
        protocol::Limits {
            frame_bytes_max: self.limits.frame_bytes_max,
            records_max: self.limits.records_max,
            snapshot_bytes_max: self.limits.snapshot_bytes_max,
            ..protocol::Limits::default()
        }
    }

    pub fn log_config(&self) -> log_core::LogConfig {
        log_core::LogConfig {
            segment_bytes_max: self.log.segment_bytes_max,
            segment_initial_bytes: self
                .log
                .segment_initial_bytes
                .min(self.log.segment_bytes_max),
            batch_bytes_max: self.log.batch_bytes_max,
            pending_bytes_max: self.log.pending_bytes_max,
            batch_records_max: self.limits.records_max as usize,
            ..log_core::LogConfig::default()
        }
    }

    /// The retention policy, if any is configured.
    pub fn retention(&self) -> Option<log_core::RetentionPolicy> {
        let l = &self.log;
        (l.retention_bytes_max > 0 || l.retention_ms > 0).then(|| log_core::RetentionPolicy {
            bytes_max: (l.retention_bytes_max > 0).then_some(l.retention_bytes_max),
            age_max: (l.retention_ms > 0).then(|| Duration::from_millis(l.retention_ms)),
        })
    }

    pub fn append_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.append_timeout_ms as u64)
    }
}

/// Node ids are DNS labels: a node's certificate names it as `<id>.node.replog`.
pub fn valid_node_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_and_rejects_unknown_keys() {
        let c = NodeConfig::parse(
            "[node]\ndata_dir = \"/tmp/x\"\nlisten = \"127.0.0.1:7100\"\nshards = 2\n\
             [limits]\nconnections_max = 3\n[auth]\ntokens = [\"t\"]\n",
        )
        .unwrap();
        assert_eq!(c.node.listen.port(), 7100);
        assert_eq!(c.limits.connections_max, 3);
        assert_eq!(c.limits.streams_per_connection_max, 64);
        assert_eq!(c.auth.tokens, ["t"]);
        c.validate().unwrap();
        let err = NodeConfig::parse("[node]\ndata_dri = \"/tmp/x\"\n").unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    /// The example in README.md parses, and the limits it shows are the defaults.
    #[test]
    fn readme_example_is_valid_and_shows_the_defaults() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("a toml block in README.md") + 8;
        let len = readme[start..].find("```").unwrap();
        let c = NodeConfig::parse(&readme[start..start + len]).unwrap();
        assert_eq!(c.limits, LimitsSection::default());
        assert_eq!(c.log, LogSection::default());
        assert_eq!(c.controller, ControllerSection::default());
        let mut r = c.replication.clone();
        assert_eq!(r.followers, ["node-2", "node-3"]);
        r.followers.clear();
        assert_eq!(r, ReplicationSection::default());
        assert_eq!(
            c.node.metrics_listen,
            Some("127.0.0.1:9100".parse().unwrap())
        );
    }

    #[test]
    fn replication_settings_are_checked() {
        let base = || {
            let mut c = NodeConfig::default();
            c.node.data_dir = "/tmp/x".into();
            c.node.id = "lead".into();
            c
        };
        let err = |c: NodeConfig| c.validate().unwrap_err().to_string();
        let mut c = base();
        c.replication.followers = vec!["f1".into()];
        c.validate().unwrap();
        assert_eq!(c.role(), Role::Leader);
        c.replication.leader = Some("127.0.0.1:1".parse().unwrap());
        assert!(err(c).contains("exclude each other"));
        let mut c = base();
        c.replication.followers = vec!["Bad_Id".into()];
        assert!(err(c).contains("Bad_Id"));
        let mut c = base();
        c.replication.followers = vec!["lead".into()];
        assert!(err(c).contains("itself"));
        let mut c = base();
        c.replication.followers = vec!["f1".into()];
        c.replication.sync_replicas = 2;
        assert!(err(c).contains("exceeds the 1 configured followers"));
        let mut c = base();
        c.replication.insufficient_replicas = "maybe".into();
        assert!(err(c).contains("insufficient_replicas"));
        let mut c = base();
        c.replication.frame_bytes_max = 1000;
        assert!(err(c).contains("replication.frame_bytes_max"));
        let mut c = base();
        c.replication.leader = Some("127.0.0.1:1".parse().unwrap());
        c.tls.cert = Some("/c".into());
        c.tls.key = Some("/k".into());
        assert!(err(c).contains("tls.ca"));
        let mut c = base();
        c.log.retention_check_ms = 0;
        assert!(err(c).contains("retention_check_ms"));
        let mut c = base();
        c.log.scrub_interval_ms = 0;
        assert!(err(c).contains("scrub_interval_ms"));
        // The catch-up pacing factor: 0 (off), or 1 to 100 times the live tail's base.
        for ok in [0.0, 1.0, 2.0, 100.0] {
            let mut c = base();
            c.replication.catchup_live_latency_factor = ok;
            c.validate().unwrap();
        }
        for bad in [0.5, 100.5, -1.0, f64::NAN] {
            let mut c = base();
            c.replication.catchup_live_latency_factor = bad;
            assert!(err(c).contains("catchup_live_latency_factor"), "{bad}");
        }
        // A standalone node has no followers: the sync set is empty whatever sync_replicas says.
        assert_eq!(base().replication_config().unwrap().sync_replicas, 0);
        assert!(valid_node_id("node-1") && valid_node_id("a"));
        assert!(!valid_node_id("-a") && !valid_node_id("a-") && !valid_node_id(&"a".repeat(64)));
    }

    #[test]
    fn controller_settings_are_checked_at_their_limits() {
        let base = || {
            let mut c = NodeConfig::default();
            c.node.data_dir = "/tmp/x".into();
            c.node.id = "a".into();
            c.controller.members = vec![
                "a=127.0.0.1:7001".into(),
                "b=127.0.0.1:7002".into(),
                "c=127.0.0.1:7003".into(),
            ];
            c
        };
        let err = |c: NodeConfig| c.validate().unwrap_err().to_string();
        base().validate().unwrap();
        assert_eq!(base().controller.member_list().unwrap()[1].0, "b");
        for (tick, ok) in [
            (CONTROLLER_TICK_MS_MIN - 1, false),
            (CONTROLLER_TICK_MS_MIN, true),
            (CONTROLLER_TICK_MS_MAX, true),
            (CONTROLLER_TICK_MS_MAX + 1, false),
        ] {
            let mut c = base();
            c.controller.tick_ms = tick;
            assert_eq!(c.validate().is_ok(), ok, "tick_ms {tick}");
        }
        for (t, ok) in [
            (LEADER_TIMEOUT_MS_MIN - 1, false),
            (LEADER_TIMEOUT_MS_MIN, true),
            (LEADER_TIMEOUT_MS_MAX, true),
            (LEADER_TIMEOUT_MS_MAX + 1, false),
        ] {
            let mut c = base();
            c.controller.leader_timeout_ms = t;
            assert_eq!(c.validate().is_ok(), ok, "leader_timeout_ms {t}");
        }
        let mut c = base();
        c.controller.members.push("a=127.0.0.1:7009".into());
        assert!(err(c).contains("twice"));
        let mut c = base();
        c.node.id = "z".into();
        assert!(err(c).contains("must name this node"));
        let mut c = base();
        c.controller.members[2] = "c:127.0.0.1:7003".into();
        assert!(err(c).contains("is not id=host:port"));
        let mut c = base();
        c.controller.members[2] = "C=127.0.0.1:7003".into();
        assert!(err(c).contains("node id \"C\""));
        let mut c = base();
        c.controller.members = (0..=CLUSTER_MEMBERS_MAX)
            .map(|i| format!("n{i}=127.0.0.1:{}", 7000 + i))
            .collect();
        c.node.id = "n0".into();
        assert!(err(c.clone()).contains("at most 64"));
        c.controller.members.pop();
        c.validate().unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = NodeConfig::default();
        assert!(c.validate().unwrap_err().to_string().contains("data_dir"));
        c.node.data_dir = "/tmp/x".into();
        c.tls.cert = Some("/c.pem".into());
        assert!(c.validate().unwrap_err().to_string().contains("tls.key"));
        c.tls.cert = None;
        c.limits.append_timeout_ms = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("append_timeout_ms"));
        c.limits.append_timeout_ms = 1;
        c.limits.connection_window_bytes = 10;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("connection_window_bytes"));
    }
}
