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

/// Names a dev certificate is valid for: loopback names, the listen IP and the host name.
fn dev_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        names.push(listen.ip().to_string());
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
    let mut params =
        CertificateParams::new(dev_names(cfg.node.listen)).map_err(tls_err("node names"))?;
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

/// The quinn server configuration: TLS 1.3 only, ALPN `replog/1`, 0-RTT off, optional client
/// certificates, and explicit stream and window limits.
pub fn server_config(cfg: &NodeConfig, node_id: &str) -> Result<quinn::ServerConfig, Error> {
    if let Some(ca) = &cfg.tls.ca {
        load_roots(ca)?;
    }
    let (chain, key) = match (&cfg.tls.cert, &cfg.tls.key) {
        (Some(c), Some(k)) => load_pem_identity(c, k)?,
        _ => dev_node_identity(cfg, node_id)?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match &cfg.tls.client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(load_roots(ca)?),
                provider,
            )
            .build()
            .map_err(|e| Error::Tls(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut crypto = builder
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(format!("certificate and key: {e}")))?;
    crypto.alpn_protocols = vec![protocol::ALPN.to_vec()];
    crypto.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(cfg)));
    Ok(server)
}

fn transport_config(cfg: &NodeConfig) -> quinn::TransportConfig {
    let l = &cfg.limits;
    let window = l.connection_window_bytes;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(l.streams_per_connection_max.into())
        .max_concurrent_uni_streams(0u32.into())
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
