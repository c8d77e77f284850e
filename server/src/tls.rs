//! TLS for the QUIC endpoint: production PEM files, or dev mode with a local development CA.
//!
//! Dev mode (no `tls.cert`/`tls.key`): the node issues itself a certificate from the CA kept in
//! [`dev_ca_dir`] (`ca.pem`, `ca.key`, created on first use under a lock, 0700/0600), and writes
//! it to `<data_dir>/tls/node.pem`. Clients trust `ca.pem` from the same place, so any number of
//! dev nodes and CLIs on one machine agree without flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::NodeConfig;
use crate::files::{self, io_err, private_dir, write_atomic};
use crate::Error;

/// Environment variable naming the development CA directory.
pub const DEV_CA_DIR_ENV: &str = "REPLOG_DEV_CA_DIR";
const CA_CN: &str = "replog development CA";

/// The development CA directory: `$REPLOG_DEV_CA_DIR`, else `$HOME/.replog/dev-ca`.
pub fn dev_ca_dir() -> Result<PathBuf, Error> {
    if let Some(d) = std::env::var_os(DEV_CA_DIR_ENV) {
        return Ok(PathBuf::from(d));
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".replog").join("dev-ca")),
        None => Err(Error::Config(format!(
            "dev mode needs a CA directory: set {DEV_CA_DIR_ENV} or HOME, or give tls.cert and tls.key"
        ))),
    }
}

fn tls_err(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Tls(format!("{what}: {e}"))
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    p
}

/// The development CA: its PEM certificate and an issuer for node certificates. Created on first
/// use; concurrent first uses by several nodes are serialised by a lock file.
pub fn dev_ca(dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), Error> {
    private_dir(dir)?;
    let _lock = files::lock(&dir.join("lock"), true)?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() && key_path.exists() {
        let cert = std::fs::read_to_string(&cert_path).map_err(io_err("read", &cert_path))?;
        let key = std::fs::read_to_string(&key_path).map_err(io_err("read", &key_path))?;
        let key = KeyPair::from_pem(&key).map_err(tls_err("development CA key"))?;
        // The issuer identity is derived from fixed parameters and the key, so it matches the
        // stored certificate.
        return Ok((cert, Issuer::new(ca_params(), key)));
    }
    let key = KeyPair::generate().map_err(tls_err("generate CA key"))?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(tls_err("self-sign CA"))?;
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), "created the development CA");
    Ok((cert.pem(), Issuer::new(ca_params(), key)))
}

/// Names a dev certificate is valid for: loopback names, the listen IP (any loopback address
/// included) and the host name.
fn dev_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let ip = listen.ip().to_string();
    if !listen.ip().is_unspecified() && !names.contains(&ip) {
        names.push(ip);
    }
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && h != "localhost" {
            names.push(h.to_string());
        }
    }
    names
}

/// Issue this node's certificate from the development CA (at every start: cheap, and it follows
/// the CA if the CA was recreated). Also written to `<data_dir>/tls/` for inspection.
fn dev_node_identity(
    cfg: &NodeConfig,
    node_id: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let (_, issuer) = dev_ca(&dev_ca_dir()?)?;
    let key = KeyPair::generate().map_err(tls_err("generate node key"))?;
    let mut names = dev_names(cfg.node.listen);
    names.push(peer_name(node_id));
    let mut params = CertificateParams::new(names).map_err(tls_err("node names"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("replog node {node_id}"));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(tls_err("issue node certificate"))?;
    let dir = cfg.node.data_dir.join("tls");
    private_dir(&dir)?;
    write_atomic(&dir.join("node.pem"), cert.pem().as_bytes(), 0o644)?;
    write_atomic(&dir.join("node.key"), key.serialize_pem().as_bytes(), 0o600)?;
    let key =
        PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| Error::Tls(e.to_string()))?;
    Ok((vec![cert.der().clone()], key))
}

fn load_pem_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Tls(format!("certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Tls(format!(
            "certificate {}: no certificate in file",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::Tls(format!("key {}: {e}", key.display())))?;
    Ok((chain, key))
}

/// Load PEM CA certificates into a root store.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Tls(format!("CA file {}: {e}", path.display())))?;
    for c in certs {
        roots
            .add(c)
            .map_err(|e| Error::Tls(format!("CA file {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls(format!(
            "CA file {}: no certificate in file",
            path.display()
        )));
    }
    Ok(roots)
}

/// The DNS name a node's certificate must carry (as a subject alternative name) to act as node
/// `id` towards other nodes: `<id>.node.replog`.
pub fn peer_name(id: &str) -> String {
    format!("{id}.node.replog")
}

/// Everything TLS a node needs: its server configuration (clients and peers), the client
/// configuration it uses to reach a leader, and the verifier that decides whether a peer is a
/// node of this cluster.
pub struct NodeTls {
    pub server: quinn::ServerConfig,
    pub peer_client: quinn::ClientConfig,
    pub cluster: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

/// The CA(s) that signed every node's certificate: `tls.ca`, or the development CA.
fn cluster_roots(cfg: &NodeConfig) -> Result<rustls::RootCertStore, Error> {
    if let Some(ca) = &cfg.tls.ca {
        return load_roots(ca);
    }
    if cfg.tls.cert.is_some() {
        // Production certificates without tls.ca: there is no cluster to verify peers against
        // (the configuration check refuses replication in this case).
        return Ok(rustls::RootCertStore::empty());
    }
    let (pem, _) = dev_ca(&dev_ca_dir()?)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| Error::Tls(format!("development CA: {e}")))?;
        roots
            .add(c)
            .map_err(|e| Error::Tls(format!("development CA: {e}")))?;
    }
    Ok(roots)
}

/// The TLS configurations of a node: TLS 1.3 only, ALPN `replog/1` (clients) and
/// `replog-peer/1` (nodes), 0-RTT off, and explicit stream and window limits. Client
/// certificates are verified against `tls.client_ca` and the cluster CA; they are required when
/// `tls.client_ca` is set. A peer is further checked by [`verify_peer`].
pub fn node_tls(cfg: &NodeConfig, node_id: &str) -> Result<NodeTls, Error> {
    let (chain, key) = match (&cfg.tls.cert, &cfg.tls.key) {
        (Some(c), Some(k)) => load_pem_identity(c, k)?,
        _ => dev_node_identity(cfg, node_id)?,
    };
    let cluster = cluster_roots(cfg)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut accepted = cluster.clone();
    if let Some(ca) = &cfg.tls.client_ca {
        for anchor in load_roots(ca)?.roots {
            accepted.roots.push(anchor);
        }
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = if accepted.is_empty() {
        builder.with_no_client_auth()
    } else {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(accepted),
            provider.clone(),
        );
        let verifier = if cfg.tls.client_ca.is_some() {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        let verifier = verifier
            .build()
            .map_err(|e| Error::Tls(format!("client certificate verifier: {e}")))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut crypto = builder
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| Error::Tls(format!("certificate and key: {e}")))?;
    crypto.alpn_protocols = vec![protocol::ALPN.to_vec(), protocol::PEER_ALPN.to_vec()];
    crypto.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(cfg)));

    let cluster_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> =
        if cluster.is_empty() {
            Arc::new(NoPeers)
        } else {
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(cluster.clone()),
                provider.clone(),
            )
            .build()
            .map_err(|e| Error::Tls(format!("cluster CA: {e}")))?
        };

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(cluster)
        .with_client_auth_cert(chain, key)
        .map_err(|e| Error::Tls(format!("certificate and key: {e}")))?;
    client.alpn_protocols = vec![protocol::PEER_ALPN.to_vec()];
    client.enable_early_data = false;
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut peer_client = quinn::ClientConfig::new(Arc::new(client));
    peer_client.transport_config(Arc::new(peer_transport_config(cfg)));
    Ok(NodeTls {
        server,
        peer_client,
        cluster: cluster_verifier,
    })
}

/// A verifier for a node without a cluster CA: refuses every peer.
#[derive(Debug)]
struct NoPeers;

impl rustls::server::danger::ClientCertVerifier for NoPeers {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Err(rustls::Error::General(
            "this node has no cluster CA (tls.ca)".into(),
        ))
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no peers".into()))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no peers".into()))
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        Vec::new()
    }
}

/// Check that a peer connection's client certificate was issued by the cluster CA; returns
/// its chain (leaf first).
pub fn verify_cluster_cert(
    cluster: &dyn rustls::server::danger::ClientCertVerifier,
    conn: &quinn::Connection,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("the peer presented no certificate")?;
    let (leaf, intermediates) = certs.split_first().ok_or("empty certificate chain")?;
    cluster
        .verify_client_cert(leaf, intermediates, rustls_pki_types::UnixTime::now())
        .map_err(|e| format!("certificate not issued by the cluster CA: {e}"))?;
    Ok(*certs)
}

/// Check that a peer connection's client certificate was issued by the cluster CA and names
/// node `id` (`<id>.node.replog`). The TLS handshake already proved the peer holds the key.
pub fn verify_peer(
    cluster: &dyn rustls::server::danger::ClientCertVerifier,
    conn: &quinn::Connection,
    id: &str,
) -> Result<(), String> {
    let certs = verify_cluster_cert(cluster, conn)?;
    let leaf = &certs[0];
    let parsed = rustls::server::ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(peer_name(id))
        .map_err(|_| format!("node id {id:?} is not a valid name"))?;
    rustls::client::verify_server_name(&parsed, &name).map_err(|_| {
        format!(
            "the certificate does not name node {id:?} ({})",
            peer_name(id)
        )
    })
}

/// Peer connections detect a dead peer quickly: keep-alives every second and a 10 s idle
/// timeout (the smaller of the two sides' applies).
fn peer_transport_config(cfg: &NodeConfig) -> quinn::TransportConfig {
    let mut t = transport_config(cfg);
    t.max_idle_timeout(Some(
        PEER_IDLE_TIMEOUT
            .min(Duration::from_millis(cfg.limits.idle_timeout_ms as u64))
            .try_into()
            .expect("idle timeout in range"),
    ))
    .keep_alive_interval(Some(PEER_KEEP_ALIVE))
    .max_concurrent_bidi_streams(0u32.into());
    t
}

/// Controller frames a peer may have in flight at once (unidirectional streams per peer
/// connection; a client connection's are refused).
pub const CONTROL_STREAMS_MAX: u32 = 64;
/// Idle timeout of connections to a leader.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive interval of connections to a leader.
pub const PEER_KEEP_ALIVE: Duration = Duration::from_secs(1);

fn transport_config(cfg: &NodeConfig) -> quinn::TransportConfig {
    let l = &cfg.limits;
    let window = l.connection_window_bytes;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(l.streams_per_connection_max.into())
        .max_concurrent_uni_streams(CONTROL_STREAMS_MAX.into())
        .receive_window(window.into())
        .stream_receive_window(window.min(l.frame_bytes_max.saturating_add(64)).into())
        .send_window(window as u64)
        .max_idle_timeout(Some(
            Duration::from_millis(l.idle_timeout_ms as u64)
                .try_into()
                .expect("idle timeout in range"),
        ))
        .keep_alive_interval(None);
    t
}
