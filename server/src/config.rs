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
    /// Most logs on the node. Each log costs two prepared segments of disk.
    pub logs_max: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub segment_bytes_max: u64,
    pub batch_bytes_max: usize,
    pub pending_bytes_max: usize,
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
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        let d = log_core::LogConfig::default();
        LogSection {
            segment_bytes_max: d.segment_bytes_max,
            batch_bytes_max: d.batch_bytes_max,
            pending_bytes_max: d.pending_bytes_max,
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
        if let Some((name, _)) = timeouts.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Config(format!("limits.{name} must be positive")));
        }
        if l.connection_window_bytes < 65_536 {
            return bad("limits.connection_window_bytes must be at least 65536");
        }
        self.log_config()
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(())
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
            ..protocol::Limits::default()
        }
    }

    pub fn log_config(&self) -> log_core::LogConfig {
        log_core::LogConfig {
            segment_bytes_max: self.log.segment_bytes_max,
            batch_bytes_max: self.log.batch_bytes_max,
            pending_bytes_max: self.log.pending_bytes_max,
            batch_records_max: self.limits.records_max as usize,
            ..log_core::LogConfig::default()
        }
    }

    pub fn append_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.append_timeout_ms as u64)
    }
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
        assert_eq!(
            c.node.metrics_listen,
            Some("127.0.0.1:9100".parse().unwrap())
        );
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
