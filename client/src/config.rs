//! Client configuration, server addresses and the TLS setup.

use std::ffi::OsString;
use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use protocol::Limits;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// Environment variable naming the development CA directory (see [`Trust::DevCa`]).
pub const DEV_CA_DIR_ENV: &str = "REPLOG_DEV_CA_DIR";

/// Port used when a server address does not name one (the node's default listen port).
pub const DEFAULT_PORT: u16 = 7000;

/// How often an idle connection sends a keep-alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A connection that has heard nothing from its node for this long is dead (the node failed):
/// the next request connects again, to the next server that answers. Three missed keep-alives;
/// the same as the controller's default `leader_timeout`, so a client notices a dead leader at
/// about the time the cluster has replaced it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// The server used by [`ClientConfig::default`]: a node on this machine with default settings.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7000";

/// Which certificate authority the client trusts to sign node certificates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Trust {
    /// The local development CA that nodes in development mode issue their certificates from:
    /// `$REPLOG_DEV_CA_DIR/ca.pem`, or `$HOME/.replog/dev-ca/ca.pem` when the variable is unset.
    #[default]
    DevCa,
    /// PEM CA certificate(s) from this file.
    CaFile(PathBuf),
}

/// Everything [`Client::connect`](crate::Client::connect) needs.
///
/// Build one with [`ClientConfig::new`] and the `with_*` methods, or set the public fields
/// directly.
#[derive(Clone)]
pub struct ClientConfig {
    /// Node addresses, `host:port`, `[ipv6]:port`, or a host alone (port [`DEFAULT_PORT`]).
    /// They are dialled in order until one answers.
    pub servers: Vec<String>,
    /// The CA that signs node certificates.
    pub trust: Trust,
    /// Bearer token presented on every new connection, for nodes that require one.
    pub token: Option<String>,
    /// PEM certificate chain and PEM private key files, for nodes that require client
    /// certificates.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name the node certificate is verified against. By default, the host part of the
    /// address dialled (a DNS name or an IP address).
    pub server_name: Option<String>,
    /// How long establishing a connection (QUIC and TLS handshakes, and authentication) may take.
    pub connect_timeout: Duration,
    /// How long one attempt of a request may wait for its answer. Reads add their `wait` and
    /// appends their `timeout` on top of this when those are longer.
    pub request_timeout: Duration,
    /// How many times a request that is safe to repeat is retried after a connection-level
    /// failure (so up to `retries + 1` attempts).
    pub retries: u32,
    /// Limits enforced on every frame received.
    pub limits: Limits,
}

impl ClientConfig {
    /// A configuration for these servers, with every other setting at its default.
    pub fn new<I, S>(servers: I) -> ClientConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }

    /// Trust this CA instead of the development CA.
    pub fn with_trust(mut self, trust: Trust) -> ClientConfig {
        self.trust = trust;
        self
    }

    /// Present this bearer token on every new connection.
    pub fn with_token(mut self, token: impl Into<String>) -> ClientConfig {
        self.token = Some(token.into());
        self
    }

    /// Present this client certificate (PEM chain and PEM private key files).
    pub fn with_client_cert(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> ClientConfig {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Verify node certificates against this name instead of the host dialled.
    pub fn with_server_name(mut self, name: impl Into<String>) -> ClientConfig {
        self.server_name = Some(name.into());
        self
    }

    /// Set [`ClientConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> ClientConfig {
        self.connect_timeout = timeout;
        self
    }

    /// Set [`ClientConfig::request_timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> ClientConfig {
        self.request_timeout = timeout;
        self
    }

    /// Set [`ClientConfig::retries`].
    pub fn with_retries(mut self, retries: u32) -> ClientConfig {
        self.retries = retries;
        self
    }

    /// Set [`ClientConfig::limits`].
    pub fn with_limits(mut self, limits: Limits) -> ClientConfig {
        self.limits = limits;
        self
    }

    /// The limits a client uses by default: the protocol defaults, except a frame body of up to
    /// 64 MiB + 24 bytes, so that a read answer holding the largest possible batch fits.
    pub fn default_limits() -> Limits {
        Limits {
            frame_bytes_max: (64 << 20) + 24,
            ..Limits::default()
        }
    }
}

impl Default for ClientConfig {
    /// One server, [`DEFAULT_SERVER`]; the development CA; no token or client certificate;
    /// 5 s connect timeout, 30 s request timeout, 3 retries; [`ClientConfig::default_limits`].
    fn default() -> ClientConfig {
        ClientConfig {
            servers: vec![DEFAULT_SERVER.to_string()],
            trust: Trust::DevCa,
            token: None,
            client_cert: None,
            server_name: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            retries: 3,
            limits: ClientConfig::default_limits(),
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("servers", &self.servers)
            .field("trust", &self.trust)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("client_cert", &self.client_cert)
            .field("server_name", &self.server_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("retries", &self.retries)
            .field("limits", &self.limits)
            .finish()
    }
}

/// A server address split into the host (DNS name or IP address, without brackets) and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerAddr {
    pub host: String,
    pub port: u16,
}

impl ServerAddr {
    /// Parse `host:port`, `[ipv6]:port`, `[ipv6]`, a bare IPv6 address, or a host alone.
    pub fn parse(s: &str) -> Result<ServerAddr> {
        let s = s.trim();
        let bad = |why: &str| Error::Config(format!("server address {s:?}: {why}"));
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| bad("missing ']' after an IPv6 address"))?;
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(bad("not an IPv6 address between brackets"));
            }
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("expected ':port' after ']'"))?,
                ),
            };
            (host, port)
        } else {
            match s.matches(':').count() {
                0 => (s, None),
                1 => {
                    let (h, p) = s.split_once(':').expect("one colon");
                    (h, Some(p))
                }
                _ => {
                    if s.parse::<Ipv6Addr>().is_err() {
                        return Err(bad(
                            "too many ':' (write an IPv6 address with a port as [addr]:port)",
                        ));
                    }
                    (s, None)
                }
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(bad("invalid host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad("invalid port")),
                Ok(p) => p,
            },
        };
        Ok(ServerAddr {
            host: host.to_string(),
            port,
        })
    }

    /// The name the node's certificate is verified against: `server_name` when configured,
    /// otherwise the host dialled.
    pub fn tls_name<'a>(&'a self, server_name: Option<&'a str>) -> &'a str {
        server_name.unwrap_or(&self.host)
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where the development CA certificate is: `$REPLOG_DEV_CA_DIR/ca.pem`, else
/// `$HOME/.replog/dev-ca/ca.pem`.
pub(crate) fn dev_ca_cert_path() -> Result<PathBuf> {
    dev_ca_cert_path_from(std::env::var_os(DEV_CA_DIR_ENV), std::env::var_os("HOME"))
}

fn dev_ca_cert_path_from(dir: Option<OsString>, home: Option<OsString>) -> Result<PathBuf> {
    if let Some(dir) = dir.filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("ca.pem"));
    }
    match home.filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home)
            .join(".replog")
            .join("dev-ca")
            .join("ca.pem")),
        None => Err(Error::Config(format!(
            "the development CA is looked up in ${DEV_CA_DIR_ENV} or $HOME/.replog/dev-ca, and \
             neither variable is set; set one, or trust a CA file (Trust::CaFile)"
        ))),
    }
}

fn read_file(path: &Path, what: &str, hint: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Config(format!("{what} {} does not exist{hint}", path.display()))
        } else {
            Error::Config(format!("cannot read {what} {}: {e}", path.display()))
        }
    })
}

const DEV_CA_HINT: &str = "; a node started in development mode creates it, or set \
    REPLOG_DEV_CA_DIR to the directory that holds ca.pem, or trust another CA with \
    Trust::CaFile";

/// The root store for `trust`.
pub(crate) fn load_roots(trust: &Trust) -> Result<rustls::RootCertStore> {
    match trust {
        Trust::DevCa => load_roots_from(
            &dev_ca_cert_path()?,
            "development CA certificate",
            DEV_CA_HINT,
        ),
        Trust::CaFile(p) => load_roots_from(p, "CA file", ""),
    }
}

fn load_roots_from(path: &Path, what: &str, hint: &str) -> Result<rustls::RootCertStore> {
    let pem = read_file(path, what, hint)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{what} {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("{what} {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "{what} {}: no PEM certificate in the file",
            path.display()
        )));
    }
    Ok(roots)
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_identity(cert: &Path, key: &Path) -> Result<Identity> {
    let pem = read_file(cert, "client certificate", "")?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("client certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Config(format!(
            "client certificate {}: no PEM certificate in the file",
            cert.display()
        )));
    }
    let pem = read_file(key, "client key", "")?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| Error::Config(format!("client key {}: {e}", key.display())))?;
    Ok((chain, key))
}

/// The quinn client configuration: TLS 1.3 with the ring provider, ALPN `replog/1`, no 0-RTT,
/// the configured trust and optional client certificate.
pub(crate) fn quic_config(config: &ClientConfig) -> Result<quinn::ClientConfig> {
    let roots = load_roots(&config.trust)?;
    let identity = match &config.client_cert {
        Some((cert, key)) => Some(load_identity(cert, key)?),
        None => None,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::Tls(format!("client certificate and key: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![protocol::ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // The node never opens streams; keep-alives stop an idle connection (a quiet tail) from
    // hitting the idle timeout, which also bounds how long a dead node (a leader that failed)
    // goes unnoticed before requests move to another server.
    transport
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((4u32 << 20).into())
        .receive_window((16u32 << 20).into())
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("the idle timeout is in range"),
        ));
    quic.transport_config(Arc::new(transport));
    Ok(quic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &str, port: u16) -> ServerAddr {
        ServerAddr {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(
            ServerAddr::parse("127.0.0.1:7000").unwrap(),
            addr("127.0.0.1", 7000)
        );
        assert_eq!(
            ServerAddr::parse(" node-1.example.com:7001 ").unwrap(),
            addr("node-1.example.com", 7001)
        );
        assert_eq!(
            ServerAddr::parse("localhost").unwrap(),
            addr("localhost", DEFAULT_PORT)
        );
        assert_eq!(ServerAddr::parse("[::1]:7002").unwrap(), addr("::1", 7002));
        assert_eq!(
            ServerAddr::parse("[fe80::1]").unwrap(),
            addr("fe80::1", DEFAULT_PORT)
        );
        assert_eq!(ServerAddr::parse("::1").unwrap(), addr("::1", DEFAULT_PORT));
        for bad in [
            "",
            ":7000",
            "host:",
            "host:0",
            "host:70000",
            "host:x",
            "[::1",
            "[::1]7000",
            "[nothost]:1",
            "a:b:c",
            "[]:7000",
            "ho st:1",
        ] {
            let err = ServerAddr::parse(bad).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn server_name_is_the_host_unless_overridden() {
        let a = ServerAddr::parse("10.1.2.3:7000").unwrap();
        assert_eq!(a.tls_name(None), "10.1.2.3");
        assert_eq!(a.tls_name(Some("node1.internal")), "node1.internal");
        let a = ServerAddr::parse("[::1]:7000").unwrap();
        assert_eq!(a.tls_name(None), "::1");
        assert_eq!(a.to_string(), "[::1]:7000");
        let a = ServerAddr::parse("db.example.com:9").unwrap();
        assert_eq!(a.tls_name(None), "db.example.com");
        assert_eq!(a.to_string(), "db.example.com:9");
    }

    #[test]
    fn missing_ca_file_is_a_config_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.pem");
        let err = load_roots(&Trust::CaFile(path.clone())).unwrap_err();
        match &err {
            Error::Config(m) => {
                assert!(m.contains(&path.display().to_string()), "{m}");
                assert!(m.contains("does not exist"), "{m}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn dev_ca_location() {
        assert_eq!(
            dev_ca_cert_path_from(Some("/x/ca-dir".into()), Some("/home/u".into())).unwrap(),
            Path::new("/x/ca-dir/ca.pem")
        );
        assert_eq!(
            dev_ca_cert_path_from(None, Some("/home/u".into())).unwrap(),
            Path::new("/home/u/.replog/dev-ca/ca.pem")
        );
        assert_eq!(
            dev_ca_cert_path_from(Some("".into()), Some("/home/u".into())).unwrap(),
            Path::new("/home/u/.replog/dev-ca/ca.pem")
        );
        let err = dev_ca_cert_path_from(None, None).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains(DEV_CA_DIR_ENV)),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let err = load_roots_from(&path, "development CA certificate", DEV_CA_HINT).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains(&path.display().to_string())
                && m.contains("REPLOG_DEV_CA_DIR")),
            "{err}"
        );
    }

    #[test]
    fn ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = load_roots(&Trust::CaFile(path.clone())).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains(&path.display().to_string())),
            "{err}"
        );
        let path = dir.path().join("garbage.pem");
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_roots(&Trust::CaFile(path.clone())).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains(&path.display().to_string())),
            "{err}"
        );
    }

    #[test]
    fn missing_client_key_is_a_config_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("client.pem");
        let err = load_identity(&cert, &dir.path().join("client.key")).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains(&cert.display().to_string())),
            "{err}"
        );
    }

    #[test]
    fn valid_trust_and_client_identity_build_a_quic_config() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        assert_eq!(
            load_roots(&Trust::CaFile(ca_path.clone())).unwrap().len(),
            1
        );

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("c.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let config = ClientConfig::new(["127.0.0.1:7000"])
            .with_trust(Trust::CaFile(ca_path))
            .with_client_cert(&cert_path, &key_path);
        assert!(quic_config(&config).is_ok());

        // A key file without a key.
        let config = config.with_client_cert(&cert_path, &cert_path);
        let err = quic_config(&config).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("client key")),
            "{err}"
        );
    }

    #[test]
    fn debug_redacts_the_token() {
        let c = ClientConfig::new(["a:1"]).with_token("s3cret");
        let s = format!("{c:?}");
        assert!(!s.contains("s3cret"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn defaults() {
        let c = ClientConfig::new(["a:1", "b:2"]);
        assert_eq!(c.servers, ["a:1", "b:2"]);
        assert_eq!(c.trust, Trust::DevCa);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.retries, 3);
        assert_eq!(c.limits.frame_bytes_max, (64 << 20) + 24);
        assert_eq!(c.limits.records_max, Limits::default().records_max);
    }
}
