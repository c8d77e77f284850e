//! Black-box test support: real `replog node` processes on loopback, the CLI, and a raw quinn
//! client that speaks (or mangles) the wire protocol.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use protocol::{FrameHeader, Limits, Request, Response};

pub mod net;

pub const BIN: &str = env!("CARGO_BIN_EXE_replog");

/// A scratch area: a development CA directory shared by the nodes and CLIs of one test.
pub struct Env {
    pub tmp: tempfile::TempDir,
    /// The loopback address this environment's nodes listen on: one of 127.0.0.0/8 chosen at
    /// random, so that a node restarted on its old port never meets another test's node there.
    pub ip: std::net::Ipv4Addr,
}

impl Env {
    pub fn new() -> Env {
        use std::hash::{BuildHasher, Hasher};
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let [a, b, c, ..] = r.to_le_bytes();
        Env {
            tmp: tempfile::tempdir().unwrap(),
            ip: std::net::Ipv4Addr::new(127, a.max(1), b, c.clamp(2, 254)),
        }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.tmp.path().join("dev-ca")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Start a node with data in `<tmp>/<name>` and extra flags.
    pub fn node(&self, name: &str, extra: &[&str]) -> NodeProc {
        NodeProc::start(self, &self.path(name), extra)
    }

    /// Run the CLI to completion, with `stdin` as its input.
    pub fn cli(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .args(args)
            .env("REPLOG_DEV_CA_DIR", self.ca_dir())
            .env_remove("REPLOG_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Run the CLI and return its stdout, failing the test if it failed.
    pub fn cli_ok(&self, args: &[&str], stdin: &str) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "replog {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Parse one JSON object per line.
    pub fn cli_json(&self, args: &[&str], stdin: &str) -> Vec<serde_json::Value> {
        self.cli_ok(args, stdin)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.ca_dir().join("ca.pem")
    }

    /// A raw QUIC connection to `node`, trusting this environment's CA, without a client
    /// certificate.
    pub async fn connect(&self, node: &NodeProc) -> quinn::Connection {
        raw_connect(node.addr, &self.ca_pem(), None).await.unwrap()
    }
}

impl Env {
    /// A client library configuration for `server`, trusting this environment's CA.
    pub fn client_config(&self, server: String) -> client::ClientConfig {
        client::ClientConfig::new([server]).with_trust(client::Trust::CaFile(self.ca_pem()))
    }

    /// Write a node configuration file `name` in the environment; its path.
    pub fn write_config(&self, name: &str, text: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// `n` UDP addresses on this environment's loopback address that were free a moment ago.
    pub fn free_addrs(&self, n: usize) -> Vec<SocketAddr> {
        let sockets: Vec<std::net::UdpSocket> = (0..n)
            .map(|_| std::net::UdpSocket::bind((self.ip, 0)).unwrap())
            .collect();
        sockets.iter().map(|s| s.local_addr().unwrap()).collect()
    }
}

/// A `replog node` child process.
pub struct NodeProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<String>,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    ca_dir: PathBuf,
    /// The network namespace it runs in (`None`: this process's).
    netns: Option<String>,
}

impl NodeProc {
    pub fn start(env: &Env, data_dir: &Path, extra: &[&str]) -> NodeProc {
        let args = extra.iter().map(|s| s.to_string()).collect();
        let listen = format!("{}:0", env.ip);
        Self::spawn(env.ca_dir(), data_dir.to_path_buf(), &listen, args, None)
    }

    /// Start a node inside network namespace `netns`, listening on `listen`.
    pub fn start_in(
        env: &Env,
        netns: &str,
        data_dir: &Path,
        listen: SocketAddr,
        extra: &[&str],
    ) -> NodeProc {
        Self::start_on(env, Some(netns), data_dir, listen, extra)
    }

    fn start_on(
        env: &Env,
        netns: Option<&str>,
        data_dir: &Path,
        listen: SocketAddr,
        extra: &[&str],
    ) -> NodeProc {
        let args = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(
            env.ca_dir(),
            data_dir.to_path_buf(),
            &listen.to_string(),
            args,
            netns.map(str::to_string),
        )
    }

    /// Start a node listening on `listen` (a fixed address, for members of a controller).
    pub fn start_at(env: &Env, data_dir: &Path, listen: SocketAddr, extra: &[&str]) -> NodeProc {
        Self::start_on(env, None, data_dir, listen, extra)
    }

    fn spawn(
        ca_dir: PathBuf,
        data_dir: PathBuf,
        listen: &str,
        args: Vec<String>,
        netns: Option<String>,
    ) -> NodeProc {
        // `ip netns exec` enters the namespace and execs the node: the child's pid is the
        // node's.
        let mut command = match &netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = command
            .arg("node")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", listen, "--shards", "2"])
            .args(&args)
            .env("REPLOG_DEV_CA_DIR", &ca_dir)
            // NODE_LOG=quinn_proto=debug (say) shows the node's log while debugging a test.
            .env(
                "REPLOG_LOG",
                std::env::var("NODE_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|_| panic!("node did not start: {line:?}"));
        assert_eq!(v["event"], "listening");
        NodeProc {
            child,
            addr: v["addr"].as_str().unwrap().parse().unwrap(),
            metrics: v["metrics"].as_str().map(str::to_string),
            data_dir,
            args,
            ca_dir,
            netns,
        }
    }

    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Graceful stop (SIGTERM), then start again on the same data directory and address.
    pub fn restart(mut self) -> NodeProc {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "node exited with {status}");
        self.respawn()
    }

    /// SIGKILL, then start again on the same data directory and address.
    pub fn crash_and_restart(mut self) -> NodeProc {
        self.signal(libc::SIGKILL);
        self.child.wait().unwrap();
        self.respawn()
    }

    /// SIGKILL, and wait for it; [`NodeProc::respawn`] starts it again.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.child.wait().unwrap();
    }

    /// Start again on the same data directory, address and flags (after it stopped).
    pub fn respawn(&self) -> NodeProc {
        let listen = self.addr.to_string();
        Self::spawn(
            self.ca_dir.clone(),
            self.data_dir.clone(),
            &listen,
            self.args.clone(),
            self.netns.clone(),
        )
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Anonymous resident memory of the node, in KiB (heap, not page cache).
    pub fn rss_anon_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A raw QUIC connection to a node, trusting `ca` (PEM), with an optional client identity.
pub async fn raw_connect(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<quinn::Connection, String> {
    raw_connect_alpn(addr, ca, identity, protocol::ALPN).await
}

/// [`raw_connect`] offering another ALPN protocol (the peer one, say).
pub async fn raw_connect_alpn(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[u8],
) -> Result<quinn::Connection, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut crypto = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(addr, "127.0.0.1")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// `CreateLog` for `name`, waiting for the log's sync set.
pub fn create_req(name: impl Into<String>) -> Request {
    Request::CreateLog {
        name: name.into(),
        no_wait: false,
    }
}

pub fn encode(req: &Request) -> Bytes {
    let mut out = BytesMut::new();
    protocol::encode_request(req, &mut out);
    out.freeze()
}

/// Send raw bytes on a new stream, finish it, and decode every frame of the answer.
pub async fn exchange_raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<Response>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let data = recv
        .read_to_end(128 << 20)
        .await
        .map_err(|e| e.to_string())?;
    decode_all(&data)
}

pub fn decode_all(mut data: &[u8]) -> Result<Vec<Response>, String> {
    let limits = Limits {
        frame_bytes_max: 128 << 20,
        ..Limits::default()
    };
    let mut out = Vec::new();
    while !data.is_empty() {
        let h = FrameHeader::parse(data[..8].try_into().unwrap(), &limits)
            .map_err(|e| e.to_string())?;
        let end = 8 + h.body_len as usize;
        let body = Bytes::copy_from_slice(&data[8..end]);
        out.push(protocol::decode_response(&h, body, &limits).map_err(|e| e.to_string())?);
        data = &data[end..];
    }
    Ok(out)
}

/// One request, one response.
pub async fn exchange(conn: &quinn::Connection, req: &Request) -> Response {
    let mut r = exchange_raw(conn, &encode(req)).await.unwrap();
    assert_eq!(r.len(), 1, "{r:?}");
    r.pop().unwrap()
}

/// Values of the records in a Batches payload, from offset `from` on.
pub fn batch_values(batches: &[u8], from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = batches;
    while !rest.is_empty() {
        let view = log_core::batch::decode(rest).unwrap();
        let base = view.header().base_offset().0;
        for (i, r) in view.records().enumerate() {
            if base + i as u64 >= from {
                out.push((base + i as u64, r.value.to_vec()));
            }
        }
        rest = &rest[view.len()..];
    }
    out
}

/// Poll `f` every 100 ms until it returns `Some`, for at most `secs` seconds (a generous bound:
/// tests wait for convergence, they do not time it).
pub fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A `replog dev --json` process and the nodes it started (their JSON lines), stopped with
/// SIGTERM when dropped: a failing test leaves no node behind.
pub struct Dev {
    pub child: Child,
    pub nodes: Vec<serde_json::Value>,
    stopped: bool,
}

impl Dev {
    /// `replog dev --json` with three nodes' data under the environment, QUIC ports from
    /// `base_port` (`"0"`: any free ones, and then no controller), metrics on any free ports,
    /// and `extra` flags.
    pub fn start(env: &Env, base_port: &str, extra: &[&str]) -> Dev {
        let mut child = Command::new(BIN)
            .args([
                "dev",
                "--base-port",
                base_port,
                "--metrics-base-port",
                "0",
                "--json",
                "--dir",
            ])
            .arg(env.path("cluster"))
            .args(extra)
            .env("REPLOG_DEV_CA_DIR", env.ca_dir())
            .env("REPLOG_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut dev = Dev {
            child,
            nodes: Vec::new(),
            stopped: false,
        };
        for _ in 0..3 {
            let line = lines.next().unwrap().unwrap();
            dev.nodes.push(serde_json::from_str(&line).unwrap());
        }
        // Whatever else it prints is read (and dropped), as a terminal would.
        std::thread::spawn(move || lines.for_each(drop));
        dev
    }

    /// With the embedded controller: on three consecutive free ports.
    pub fn start_controlled(env: &Env, extra: &[&str]) -> Dev {
        Dev::start(env, &free_base_port().to_string(), extra)
    }

    pub fn addr(&self, i: usize) -> String {
        self.nodes[i]["addr"].as_str().unwrap().to_string()
    }

    pub fn metrics(&self, i: usize) -> String {
        self.nodes[i]["metrics"].as_str().unwrap().to_string()
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i]["pid"].as_u64().unwrap() as u32
    }

    /// Every node's address, for `--server`.
    pub fn all(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.addr(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGTERM to `replog dev`, and its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.stopped = true;
        // SAFETY: kill(2) on the dev process this test started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if !self.stopped {
            // SAFETY: kill(2) on the dev process this test started and has not reaped.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = self.child.wait();
        }
    }
}

/// A base port with three consecutive UDP ports free on 127.0.0.1 a moment ago (the controller
/// needs fixed member addresses, so `replog dev` runs it only on fixed ports).
pub fn free_base_port() -> u16 {
    let start = 20000 + (std::process::id() % 20000) as u16;
    (0..2000)
        .map(|i| start.wrapping_add(i * 3))
        .filter(|p| (1024..65000).contains(p))
        .find(|p| {
            (0..3).all(|i| std::net::UdpSocket::bind(("127.0.0.1", p + i)).is_ok())
                && (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok())
        })
        .expect("three free consecutive ports")
}

/// The value of a Prometheus counter or gauge (summed over its label sets) on `metrics`.
pub fn metric(metrics: &str, name: &str) -> f64 {
    let body = scrape(metrics);
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// GET /metrics from `addr`.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The `holders` of a receipt printed by `replog append --json`.
pub fn holders(receipt: &serde_json::Value) -> Vec<&str> {
    receipt["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect()
}
