//! Test support: real `replog node` processes on loopback, `replog-sqlite` processes, and
//! dumps of databases for comparison.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use client::{Client, ClientConfig, Trust};
use replicated_sqlite::Value;
use rusqlite::{Connection, OpenFlags};

/// The `replog-sqlite` binary of this package.
pub const SQLITE_BIN: &str = env!("CARGO_BIN_EXE_replog-sqlite");

/// The `replog` binary (package `ops`) in this test's target directory, built first if it is
/// missing (`cargo test --workspace` builds it anyway).
pub fn replog_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Tests run from <target dir>/<profile>/deps/.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let bin = profile_dir.join("replog");
        if !bin.exists() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "replog", "--target-dir"])
                .arg(profile_dir.parent().unwrap());
            match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") => {}
                Some("release") => {
                    cmd.arg("--release");
                }
                Some(other) => {
                    cmd.args(["--profile", other]);
                }
                None => {}
            }
            let status = cmd.status().expect("run cargo to build replog");
            assert!(status.success(), "building replog failed");
            assert!(bin.exists(), "{} missing after the build", bin.display());
        }
        bin
    })
    .clone()
}

/// A scratch area: a temporary directory with the development CA shared by the nodes and
/// clients of one test, and a random loopback address for its nodes.
pub struct Env {
    pub tmp: tempfile::TempDir,
    /// One of 127.0.0.0/8 chosen at random, so that nodes of concurrent tests never meet.
    pub ip: std::net::Ipv4Addr,
}

impl Default for Env {
    fn default() -> Env {
        Env::new()
    }
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

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.path("dev-ca")
    }

    /// A client configuration for `nodes`, trusting this environment's CA.
    pub fn client_config(&self, nodes: &[&Node]) -> ClientConfig {
        ClientConfig::new(nodes.iter().map(|n| n.server()))
            .with_trust(Trust::CaFile(self.ca_dir().join("ca.pem")))
    }

    pub async fn client(&self, nodes: &[&Node]) -> Client {
        Client::connect(self.client_config(nodes)).await.unwrap()
    }

    /// Start a node with data in `<tmp>/<name>` and extra flags.
    pub fn node(&self, name: &str, extra: &[&str]) -> Node {
        Node::start(self, name, extra)
    }

    /// A standalone node.
    pub fn standalone(&self) -> Node {
        self.node("node", &[])
    }

    /// A leader `n1` with followers `n2`, `n3` (a sync set of one).
    pub fn cluster(&self) -> [Node; 3] {
        let leader = self.node(
            "n1",
            &[
                "--node-id",
                "n1",
                "--follower",
                "n2,n3",
                "--sync-replicas",
                "1",
            ],
        );
        let addr = leader.server();
        let f1 = self.node("n2", &["--node-id", "n2", "--leader", &addr]);
        let f2 = self.node("n3", &["--node-id", "n3", "--leader", &addr]);
        [leader, f1, f2]
    }

    /// Run `replog-sqlite` to completion.
    pub fn sqlite(&self, args: &[&str]) -> Output {
        Command::new(SQLITE_BIN)
            .args(args)
            .env("REPLOG_DEV_CA_DIR", self.ca_dir())
            .env_remove("REPLOG_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Run `replog-sqlite`, fail the test if it fails, and parse its JSON lines.
    pub fn sqlite_json(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let out = self.sqlite(args);
        assert!(
            out.status.success(),
            "replog-sqlite {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        json_lines(&out.stdout)
    }

    /// Start `replog-sqlite replica` for `db`.
    pub fn replica(&self, db: &Path, nodes: &[&Node], log: &str) -> ReplicaProc {
        ReplicaProc::start(self, db, nodes, log)
    }
}

pub fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Comma-separated server addresses.
pub fn servers(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| n.server())
        .collect::<Vec<_>>()
        .join(",")
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A `replog node` child process; killed when dropped.
pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Node {
    fn start(env: &Env, name: &str, extra: &[&str]) -> Node {
        let mut child = Command::new(replog_bin())
            .arg("node")
            .arg("--data-dir")
            .arg(env.path(name))
            .args(["--listen", &format!("{}:0", env.ip), "--shards", "1"])
            .args(extra)
            .env("REPLOG_DEV_CA_DIR", env.ca_dir())
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
            .unwrap_or_else(|_| panic!("node {name} did not start: {line:?}"));
        assert_eq!(v["event"], "listening", "{v}");
        Node {
            child,
            addr: v["addr"].as_str().unwrap().parse().unwrap(),
        }
    }

    pub fn server(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            signal(self.child.id(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A `replog-sqlite replica` child process; its progress lines are collected as they come.
/// Killed when dropped.
pub struct ReplicaProc {
    pub child: Child,
    /// The last `next` it printed.
    next: Arc<AtomicU64>,
    /// Every JSON line it printed.
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl ReplicaProc {
    fn start(env: &Env, db: &Path, nodes: &[&Node], log: &str) -> ReplicaProc {
        let mut child = Command::new(SQLITE_BIN)
            .arg("replica")
            .arg("--db")
            .arg(db)
            .args(["--server", &servers(nodes), "--log", log])
            .env("REPLOG_DEV_CA_DIR", env.ca_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let next = Arc::new(AtomicU64::new(0));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let (n, l) = (next.clone(), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad JSON line from the replica {line:?}: {e}"));
                if let Some(x) = v["next"].as_u64() {
                    n.store(x, Ordering::SeqCst);
                }
                l.lock().unwrap().push(v);
            }
        });
        ReplicaProc { child, next, lines }
    }

    /// The last applied offset it reported.
    pub fn next(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Its first line (`{"event":"start",...}`), once printed.
    pub fn start_line(&mut self) -> serde_json::Value {
        eventually(60, "the replica's start line", || {
            if let Some(line) = self.lines().first() {
                return Some(line.clone());
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the replica exited with {status} before starting");
            }
            None
        })
    }

    /// Wait until it reports having applied everything below `next`.
    pub fn wait_next(&mut self, next: u64) {
        eventually(120, &format!("the replica to reach offset {next}"), || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the replica exited with {status}: {:?}", self.lines());
            }
            (self.next() >= next).then_some(())
        });
    }

    pub fn signal(&self, sig: i32) {
        signal(self.child.id(), sig);
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for ReplicaProc {
    fn drop(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            // It may be stopped: a stopped process still dies of SIGKILL.
            self.kill();
        }
    }
}

/// Poll `f` every 10 ms until it returns `Some`, for at most `secs` seconds: a generous bound,
/// tests wait for convergence, they do not time it.
pub fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Wait until the leader has a follower in the sync set of `log` (so `acks=sync` appends
/// succeed).
pub async fn wait_sync_set(client: &Client, log: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client.status().await.unwrap();
        let ready = status
            .replication
            .iter()
            .any(|r| r.log == log && r.followers.iter().any(|f| f.in_sync_set));
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "no follower joined the sync set");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the node `client` is connected to lists `log`, with a snapshot at `snapshot` or
/// later if one is asked for (followers copy logs and snapshots from the leader).
pub async fn wait_log(client: &Client, log: &str, snapshot: Option<u64>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = client.list_logs().await.unwrap();
        let ready = logs.iter().any(|l| {
            l.name == log && snapshot.is_none_or(|s| l.snapshot.is_some_and(|have| have >= s))
        });
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "log {log} (snapshot {snapshot:?}) not there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything that must be equal between a primary and its replicas: the schema and every
/// user table's rows ordered by primary key, read in one read transaction; and the applied
/// offset.
#[derive(Debug, PartialEq, Eq)]
pub struct Dump {
    pub schema: Vec<(String, String, String, Option<String>)>,
    pub tables: Vec<(String, Vec<Vec<Value>>)>,
    pub applied_next: u64,
}

impl Dump {
    pub fn rows(&self) -> usize {
        self.tables.iter().map(|(_, r)| r.len()).sum()
    }

    pub fn table(&self, name: &str) -> &[Vec<Value>] {
        &self
            .tables
            .iter()
            .find(|(t, _)| t == name)
            .unwrap_or_else(|| panic!("no table {name}"))
            .1
    }
}

pub fn dump(db: &Path) -> Dump {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    let applied_next: i64 = conn
        .query_row("SELECT applied_next FROM _replog_state", [], |r| r.get(0))
        .unwrap();
    let internal = |name: &str| {
        let n = name.to_ascii_lowercase();
        n.starts_with("sqlite_") || n.starts_with("_replog_")
    };
    let schema: Vec<(String, String, String, Option<String>)> = conn
        .prepare("SELECT type, name, tbl_name, sql FROM main.sqlite_master ORDER BY type, name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .filter(|(_, name, _, _): &(String, String, String, Option<String>)| !internal(name))
        .collect();
    let mut tables = Vec::new();
    for (kind, name, _, _) in &schema {
        if kind != "table" {
            continue;
        }
        let mut key: Vec<(i64, String)> = conn
            .prepare("SELECT pk, name FROM pragma_table_info(?1) WHERE pk > 0")
            .unwrap()
            .query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        key.sort();
        let order: Vec<String> = key
            .iter()
            .map(|(_, c)| format!("\"{}\"", c.replace('"', "\"\"")))
            .collect();
        let sql = format!(
            "SELECT * FROM \"{}\" ORDER BY {}",
            name.replace('"', "\"\""),
            order.join(", ")
        );
        let mut stmt = conn.prepare(&sql).unwrap();
        let n = stmt.column_count();
        let rows: Vec<Vec<Value>> = stmt
            .query_map([], |r| {
                (0..n).map(|i| Ok(Value::from(r.get_ref(i)?))).collect()
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        tables.push((name.clone(), rows));
    }
    conn.execute_batch("COMMIT").unwrap();
    Dump {
        schema,
        tables,
        applied_next: applied_next as u64,
    }
}

/// A tiny deterministic PRNG (xorshift64*), so that failures reproduce from the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// An SQL literal of a random type: NULL, INTEGER (small or extreme), REAL (any finite
    /// value, and the infinities), TEXT (with quotes and non-ASCII), BLOB.
    pub fn literal(&mut self) -> String {
        match self.below(9) {
            0 => "NULL".into(),
            1 => self.integer(),
            2 | 3 => self.real(),
            4 | 5 => self.text(),
            _ => self.blob(),
        }
    }

    pub fn integer(&mut self) -> String {
        match self.below(4) {
            0 => i64::MIN.to_string(),
            1 => i64::MAX.to_string(),
            2 => (self.below(2000) as i64 - 1000).to_string(),
            _ => (self.next_u64() as i64).to_string(),
        }
    }

    pub fn real(&mut self) -> String {
        match self.below(10) {
            0 => "9e999".into(),
            1 => "-9e999".into(),
            2 => "-0.0".into(),
            3 => format!("{:?}", f64::from_bits(self.below(1 << 52))), // subnormal
            _ => loop {
                let f = f64::from_bits(self.next_u64());
                if f.is_finite() {
                    break format!("{f:?}");
                }
            },
        }
    }

    pub fn text(&mut self) -> String {
        const PIECES: &[&str] = &[
            "a",
            "Z",
            "'",
            "\"",
            " ",
            "é",
            "✓",
            "\u{1F600}",
            "\\",
            ";",
            "\n",
        ];
        let n = self.below(20);
        let s: String = (0..n)
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect();
        format!("'{}'", s.replace('\'', "''"))
    }

    pub fn blob(&mut self) -> String {
        let n = self.below(64);
        let hex: String = (0..n).map(|_| format!("{:02x}", self.below(256))).collect();
        format!("X'{hex}'")
    }
}
