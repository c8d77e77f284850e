//! `replog-bench peers`: replog beside PostgreSQL with a synchronous standby and a 3-node NATS
//! JetStream cluster, in one run, with the same record size, concurrency and duration, against
//! the machine's floor measured in the same run (`bench/peers/README.md`).
//!
//! Nothing is installed here: a peer whose programs are missing is reported as skipped. Every
//! process started is stopped by its process id at the end, on failure too (a guard kills what
//! is left), and every wait is bounded.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::hist::{self, Hist, Summary};

/// The primary's settings (appended to its `postgresql.conf`).
const POSTGRESQL_CONF: &str = include_str!("../peers/postgresql.conf");
/// One NATS node's configuration, with `{name}`, `{port}`, `{cluster_port}`, `{store_dir}` and
/// `{routes}` to fill in.
const NATS_CONF: &str = include_str!("../peers/nats.conf");
/// Longest a peer may take to start, or to become ready (its standby in sync, its stream
/// created), and to stop.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one measured or warm-up run may overrun its planned time.
const RUN_GRACE: Duration = Duration::from_secs(60);
/// The NATS subject and stream the publishers write to.
const NATS_STREAM: &str = "replog-bench";
/// Publishes of one NATS worker that may fail in a row before the run is given up.
const NATS_FAILURES_MAX: u64 = 1000;

/// Attempts at starting the NATS cluster: its ports are found free and then bound by the
/// servers, and another process can take one in between (the server then exits).
pub const NATS_START_ATTEMPTS_MAX: usize = 3;

/// What one row measures, and how.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// `replog`, `postgres` or `nats`.
    pub system: String,
    /// Where the data was, durably or not, when the acknowledgement came.
    pub durability: String,
    /// Operations in flight (clients or workers), each one record.
    pub concurrency: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub ops_per_sec: f64,
    /// Operations that failed during the measured time.
    pub errors: u64,
    /// CPU time the system's server processes used per operation (all their threads and
    /// child processes; not the load generator's), in microseconds.
    pub server_cpu_us_per_op: f64,
    /// Memory allocations the servers made per operation, where they count them (replog
    /// built with `count-allocations`).
    pub server_allocations_per_op: Option<f64>,
}

impl Row {
    pub fn new(
        system: &str,
        durability: &str,
        concurrency: usize,
        latency: &Summary,
        ops: f64,
        errors: u64,
        cpu_us_per_op: f64,
    ) -> Row {
        Row {
            system: system.to_string(),
            durability: durability.to_string(),
            concurrency,
            p50_us: latency.p50_us,
            p99_us: latency.p99_us,
            p999_us: latency.p999_us,
            ops_per_sec: ops,
            errors,
            server_cpu_us_per_op: cpu_us_per_op,
            server_allocations_per_op: None,
        }
    }
}

/// Durability of each system's acknowledgement, as the rows state it.
pub const REPLOG_DURABILITY: &str =
    "acks=sync: fdatasync'd on the leader and on the sync follower (3 replicas, k=1)";
pub const POSTGRES_DURABILITY: &str =
    "synchronous_commit=on: WAL fdatasync'd on the primary and flushed on the synchronous standby";
pub const NATS_DURABILITY: &str =
    "R3: in memory on 2 of 3 nodes, written to the page cache, fdatasync'd every 2 minutes";

/// What the peers' runs share.
#[derive(Clone, Debug)]
pub struct PeerPlan {
    /// A directory on the disk to measure (a temporary directory is made inside).
    pub dir: PathBuf,
    pub record_bytes: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// A child process stopped at the end: by `stop`, or killed by its process id when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc, String> {
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {name} ({cmd:?}): {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`READY_TIMEOUT`].
    fn stop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on a child of this process that has not been reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("replog-bench: {} did not stop; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU seconds used so far by the processes `roots` and everything below them: each one's
/// user and system time and that of its children it has reaped (a PostgreSQL backend that
/// ended counts in its postmaster's), from `/proc`.
pub fn tree_cpu_secs(roots: &[u32]) -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // (pid, ppid, utime + stime + cutime + cstime in ticks) of every process.
    let procs: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let num = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
            let ppid = num(1)? as u32;
            Some((pid, ppid, num(11)? + num(12)? + num(13)? + num(14)?))
        })
        .collect();
    let mut inside: std::collections::BTreeSet<u32> = roots.iter().copied().collect();
    loop {
        let before = inside.len();
        for (pid, ppid, _) in &procs {
            if inside.contains(ppid) {
                inside.insert(*pid);
            }
        }
        if inside.len() == before {
            break;
        }
    }
    procs
        .iter()
        .filter(|(pid, _, _)| inside.contains(pid))
        .map(|(_, _, t)| t)
        .sum::<f64>()
        / hz
}

/// A free TCP port on 127.0.0.1 (bound and released: the peer binds it next).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("a free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("a free port: {e}"))
}

/// Run `cmd` to its end within `limit`; its output goes to `log`. An error names what failed
/// and the end of `log`.
fn run_to_end(what: &str, cmd: &mut Command, log: &Path, limit: Duration) -> Result<(), String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut p = Proc::spawn(what, cmd.stdout(out).stderr(err).stdin(Stdio::null()))?;
    let deadline = Instant::now() + limit;
    loop {
        match p.child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(format!("{what} failed ({status}): {}", tail(log)));
            }
            Ok(None) if Instant::now() > deadline => {
                return Err(format!("{what} took longer than {limit:?}: {}", tail(log)));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

/// The last lines of a log file, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

/// Wait until `ready` answers true, at most [`READY_TIMEOUT`].
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{what}: not ready within {READY_TIMEOUT:?}"))
}

// ---- PostgreSQL ----

/// Where PostgreSQL's server programs are: `explicit`, else the newest
/// `/usr/lib/postgresql/<version>/bin` with `initdb`, `pg_ctl`, `pg_basebackup`, `postgres`
/// and `pgbench`. `None`: not installed.
pub fn find_postgres(explicit: Option<&Path>) -> Option<PathBuf> {
    let has_all = |d: &Path| {
        ["initdb", "pg_basebackup", "postgres", "pgbench", "psql"]
            .iter()
            .all(|p| d.join(p).is_file())
    };
    if let Some(d) = explicit {
        return has_all(d).then(|| d.to_path_buf());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_all(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

/// The user PostgreSQL's server runs as (it refuses to run as root): `postgres`, as Debian's
/// package creates it. (uid, gid).
fn postgres_user() -> Result<(u32, u32), String> {
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns a pointer into static storage or NULL; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err("no `postgres` user (Debian's postgresql package creates it)".into());
    }
    // SAFETY: non-null, as checked.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok((uid, gid))
}

/// A command run as the `postgres` user when this process is root.
fn as_postgres(program: PathBuf, user: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd.env("LC_ALL", "C");
    cmd
}

/// Give `path` (and what is inside) to `user`.
fn chown_tree(path: &Path, user: Option<(u32, u32)>) -> Result<(), String> {
    let Some((uid, gid)) = user else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            chown_tree(&e.path(), user)?;
        }
    }
    Ok(())
}

/// A running primary with its synchronous standby.
struct Postgres {
    bin: PathBuf,
    user: Option<(u32, u32)>,
    dir: PathBuf,
    port: u16,
    procs: Vec<Proc>,
}

impl Postgres {
    fn psql(&self, sql: &str) -> Result<String, String> {
        let out = as_postgres(self.bin.join("psql"), self.user)
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .args(["-p", &self.port.to_string(), "-AXqt", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Initialise a primary, copy it into a standby with pg_basebackup, start both, and wait
    /// until the standby is synchronous.
    fn start(bin: &Path, dir: &Path) -> Result<Postgres, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let user = if root { Some(postgres_user()?) } else { None };
        let (primary, standby, sockets) = (
            dir.join("primary"),
            dir.join("standby"),
            dir.join("sockets"),
        );
        std::fs::create_dir_all(&sockets).map_err(|e| e.to_string())?;
        chown_tree(dir, user)?;
        let mut pg = Postgres {
            bin: bin.to_path_buf(),
            user,
            dir: dir.to_path_buf(),
            port: free_port()?,
            procs: Vec::new(),
        };
        run_to_end(
            "initdb",
            as_postgres(bin.join("initdb"), user)
                .args(["-D", &primary.to_string_lossy()])
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
            &dir.join("initdb.log"),
            READY_TIMEOUT,
        )?;
        let conf = primary.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|e| format!("{}: {e}", conf.display()))?;
        writeln!(f, "\n{POSTGRESQL_CONF}").map_err(|e| e.to_string())?;
        pg.launch("primary", &primary, pg.port, &sockets)?;
        let port = pg.port.to_string();
        run_to_end(
            "pg_basebackup",
            as_postgres(bin.join("pg_basebackup"), user)
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                .args(["-D", &standby.to_string_lossy(), "-R", "-X", "stream"]),
            &dir.join("basebackup.log"),
            READY_TIMEOUT,
        )?;
        let standby_port = free_port()?;
        pg.launch("standby", &standby, standby_port, &sockets)?;
        wait_for("the PostgreSQL standby in sync", || {
            pg.psql("select sync_state from pg_stat_replication")
                .is_ok_and(|s| s == "sync")
        })?;
        Ok(pg)
    }

    /// Start `postgres -D data -p port` and wait until it answers.
    fn launch(&mut self, name: &str, data: &Path, port: u16, sockets: &Path) -> Result<(), String> {
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let p = Proc::spawn(
            &format!("postgres ({name})"),
            as_postgres(self.bin.join("postgres"), self.user)
                .args(["-D", &data.to_string_lossy(), "-p", &port.to_string()])
                .args(["-k", &sockets.to_string_lossy()])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err),
        )?;
        self.procs.push(p);
        let ready = self.bin.join("pg_isready");
        wait_for(&format!("postgres ({name}), {}", log.display()), || {
            Command::new(&ready)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// `pgbench` with `clients` clients for `duration`, each transaction one insert of a row
    /// of `bytes`; the latency of each transaction from pgbench's per-transaction log.
    fn bench(
        &self,
        clients: usize,
        bytes: usize,
        duration: Duration,
        logged: bool,
    ) -> Result<(Hist, u64, Duration, f64), String> {
        let run = self.dir.join(format!("run-c{clients}-{}", logged as u8));
        std::fs::create_dir_all(&run).map_err(|e| e.to_string())?;
        let script = run.join("insert.sql");
        let value = "x".repeat(bytes);
        std::fs::write(
            &script,
            format!("INSERT INTO bench (v) VALUES ('{value}');\n"),
        )
        .map_err(|e| e.to_string())?;
        chown_tree(&run, self.user)?;
        let secs = duration.as_secs().max(1);
        let mut cmd = as_postgres(self.bin.join("pgbench"), self.user);
        cmd.current_dir(&run)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-n", "-M", "prepared", "-f", &script.to_string_lossy()])
            .args([
                "-c",
                &clients.to_string(),
                "-j",
                &clients.min(2).to_string(),
            ])
            .args(["-T", &secs.to_string()]);
        if logged {
            cmd.args(["-l", "--log-prefix", &run.join("tx").to_string_lossy()]);
        }
        cmd.arg("postgres");
        let roots: Vec<u32> = self.procs.iter().map(|p| p.child.id()).collect();
        let cpu_before = tree_cpu_secs(&roots);
        let started = Instant::now();
        run_to_end(
            "pgbench",
            &mut cmd,
            &run.join("pgbench.log"),
            Duration::from_secs(secs) + RUN_GRACE,
        )?;
        let elapsed = started.elapsed();
        let cpu = tree_cpu_secs(&roots) - cpu_before;
        let mut h = hist::new();
        let mut count = 0;
        if logged {
            for e in std::fs::read_dir(&run)
                .map_err(|e| e.to_string())?
                .flatten()
            {
                let name = e.file_name().to_string_lossy().to_string();
                if !name.starts_with("tx.") {
                    continue;
                }
                let f = std::fs::File::open(e.path()).map_err(|e| e.to_string())?;
                for line in std::io::BufReader::new(f).lines() {
                    let line = line.map_err(|e| e.to_string())?;
                    // client_id transaction_no time_us script_no time_epoch time_us_part
                    let us = line
                        .split_whitespace()
                        .nth(2)
                        .and_then(|t| t.parse::<u64>().ok())
                        .ok_or_else(|| format!("pgbench log line {line:?}"))?;
                    hist::record(&mut h, us * 1000);
                    count += 1;
                }
            }
        }
        Ok((h, count, elapsed, cpu))
    }

    fn stop(mut self) {
        // The standby first, then the primary (SIGTERM: a smart shutdown).
        while let Some(mut p) = self.procs.pop() {
            p.stop();
        }
    }
}

/// PostgreSQL rows, one per concurrency.
pub fn postgres(bin: &Path, plan: &PeerPlan, concurrency: &[usize]) -> Result<Vec<Row>, String> {
    let tmp = tempfile::Builder::new()
        .prefix("replog-bench-postgres-")
        .tempdir_in(&plan.dir)
        .map_err(|e| format!("a temporary directory under {}: {e}", plan.dir.display()))?;
    let pg = Postgres::start(bin, tmp.path())?;
    pg.psql("CREATE TABLE bench (id bigserial PRIMARY KEY, v text NOT NULL)")?;
    let mut rows = Vec::new();
    for &c in concurrency {
        pg.bench(c, plan.record_bytes, plan.warmup, false)?;
        let (h, count, elapsed, cpu) = pg.bench(c, plan.record_bytes, plan.duration, true)?;
        let ops = count as f64 / elapsed.as_secs_f64().max(plan.duration.as_secs_f64());
        let cpu_per_op = cpu * 1e6 / count.max(1) as f64;
        let latency = Summary::of(&h);
        let d = POSTGRES_DURABILITY;
        rows.push(Row::new("postgres", d, c, &latency, ops, 0, cpu_per_op));
    }
    pg.stop();
    Ok(rows)
}

// ---- NATS JetStream ----

/// `nats-server`: `explicit`, else on PATH. `None`: not installed.
pub fn find_nats(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.is_file().then(|| p.to_path_buf());
    }
    // Debian installs it in /usr/sbin, which a user's PATH may lack.
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// Three `nats-server` nodes with JetStream, clustered on loopback. Returns the processes
/// and the client URLs.
fn start_nats(bin: &Path, dir: &Path) -> Result<(Vec<Proc>, Vec<String>), String> {
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_, String>>()?;
    let mut procs = Vec::new();
    let mut urls = Vec::new();
    for (i, (port, cluster_port)) in ports.iter().enumerate() {
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, c))| format!("\"nats-route://127.0.0.1:{c}\""))
            .collect();
        let store = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
        let conf = NATS_CONF
            .replace("{name}", &format!("n{i}"))
            .replace("{port}", &port.to_string())
            .replace("{cluster_port}", &cluster_port.to_string())
            .replace("{store_dir}", &store.to_string_lossy())
            .replace("{routes}", &routes.join(", "));
        let path = dir.join(format!("n{i}.conf"));
        std::fs::write(&path, conf).map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.join(format!("n{i}.log"))).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        procs.push(Proc::spawn(
            &format!("nats-server n{i}"),
            Command::new(bin)
                .args(["-c", &path.to_string_lossy()])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err),
        )?);
        urls.push(format!("nats://127.0.0.1:{port}"));
    }
    Ok((procs, urls))
}

/// Why the NATS cluster could not be used.
enum NatsFail {
    /// A server exited (its port was taken, for one): start the cluster again.
    Exited(String),
    Other(String),
}

/// The first server of `procs` that has exited, with the end of its log (`n{i}.log` in `dir`).
fn nats_exited(procs: &mut [Proc], dir: &Path) -> Option<String> {
    procs.iter_mut().enumerate().find_map(|(i, p)| {
        let status = p.child.try_wait().ok()??;
        let log = std::fs::read_to_string(dir.join(format!("n{i}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        Some(format!(
            "{} exited ({status}): {}",
            p.name,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    })
}

/// Create the R3 file-backed stream, retrying while the cluster elects its JetStream leader;
/// stops early when a server has exited.
async fn nats_stream(
    url: &str,
    procs: &mut [Proc],
    dir: &Path,
) -> Result<async_nats::jetstream::Context, NatsFail> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        if let Some(e) = nats_exited(procs, dir) {
            return Err(NatsFail::Exited(e));
        }
        if let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url)).await
        {
            let js = async_nats::jetstream::new(client);
            let config = async_nats::jetstream::stream::Config {
                name: NATS_STREAM.to_string(),
                subjects: vec![NATS_STREAM.to_string()],
                num_replicas: 3,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            };
            match js.get_or_create_stream(config).await {
                Ok(_) => return Ok(js),
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(NatsFail::Other(format!(
        "the NATS JetStream stream: not created within {READY_TIMEOUT:?} ({last})"
    )))
}

/// One closed-loop run of `workers` publishers, each waiting for its acknowledgement.
async fn nats_run(
    js: &async_nats::jetstream::Context,
    workers: usize,
    payload: bytes::Bytes,
    duration: Duration,
) -> Result<(Hist, u64, u64, Duration), String> {
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (js, payload) = (js.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = hist::new();
            let (mut count, mut errors, mut in_a_row) = (0u64, 0u64, 0u64);
            while Instant::now() < end {
                let t = Instant::now();
                let acked = async {
                    js.publish(NATS_STREAM, payload.clone())
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())
                };
                match tokio::time::timeout(Duration::from_secs(10), acked).await {
                    Ok(Ok(_)) => {
                        hist::record(&mut h, t.elapsed().as_nanos() as u64);
                        count += 1;
                        in_a_row = 0;
                    }
                    _ => {
                        errors += 1;
                        in_a_row += 1;
                        if in_a_row >= NATS_FAILURES_MAX {
                            break;
                        }
                    }
                }
            }
            (h, count, errors)
        }));
    }
    let mut all = hist::new();
    let (mut count, mut errors) = (0, 0);
    for t in tasks {
        let (h, c, e) = t.await.map_err(|e| e.to_string())?;
        hist::merge(&mut all, &h);
        count += c;
        errors += e;
    }
    Ok((all, count, errors, started.elapsed()))
}

/// NATS JetStream rows, one per concurrency.
pub fn nats(
    bin: &Path,
    plan: &PeerPlan,
    concurrency: &[usize],
    rt: &tokio::runtime::Runtime,
) -> Result<Vec<Row>, String> {
    let tmp = tempfile::Builder::new()
        .prefix("replog-bench-nats-")
        .tempdir_in(&plan.dir)
        .map_err(|e| format!("a temporary directory under {}: {e}", plan.dir.display()))?;
    // Each attempt in a directory of its own, on ports found free anew.
    let mut attempt = 0;
    let (mut procs, js) = loop {
        attempt += 1;
        let dir = tmp.path().join(format!("attempt-{attempt}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (mut procs, urls) = start_nats(bin, &dir)?;
        match rt.block_on(nats_stream(&urls[0], &mut procs, &dir)) {
            Ok(js) => break (procs, js),
            Err(fail) => {
                while let Some(mut p) = procs.pop() {
                    p.stop();
                }
                match fail {
                    NatsFail::Exited(e) if attempt < NATS_START_ATTEMPTS_MAX => {
                        eprintln!("replog-bench: starting NATS again: {e}");
                    }
                    NatsFail::Exited(e) | NatsFail::Other(e) => return Err(e),
                }
            }
        }
    };
    let pids: Vec<u32> = procs.iter().map(|p| p.child.id()).collect();
    let payload = bytes::Bytes::from(vec![0x42u8; plan.record_bytes]);
    let result = rt.block_on(async {
        let mut rows = Vec::new();
        for &c in concurrency {
            nats_run(&js, c, payload.clone(), plan.warmup).await?;
            let cpu_before = tree_cpu_secs(&pids);
            let (h, count, errors, elapsed) =
                nats_run(&js, c, payload.clone(), plan.duration).await?;
            let cpu = tree_cpu_secs(&pids) - cpu_before;
            if count == 0 {
                return Err(format!(
                    "NATS: no publish was acknowledged ({errors} failed)"
                ));
            }
            let ops = count as f64 / elapsed.as_secs_f64();
            let cpu_per_op = cpu * 1e6 / count as f64;
            let latency = Summary::of(&h);
            let d = NATS_DURABILITY;
            rows.push(Row::new("nats", d, c, &latency, ops, errors, cpu_per_op));
        }
        Ok(rows)
    });
    while let Some(mut p) = procs.pop() {
        p.stop();
    }
    result
}

/// The floor of an acks=sync append measured in the same run, per percentile (us).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SyncFloor {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One JSON object per row (JSON Lines): the row, the floor, replog's ratios to the row at the
/// same concurrency; then one object per peer skipped, with why.
pub fn json_lines(
    rows: &[Row],
    floor: Option<SyncFloor>,
    skipped: &BTreeMap<String, String>,
) -> String {
    let mut out = String::new();
    for r in rows {
        let mut v = serde_json::to_value(r).expect("a row serializes");
        let (lat, ops) = replog_ratios(rows, r).unzip();
        v["floor_p50_us"] = serde_json::json!(floor.map(|f| f.p50_us));
        v["floor_p99_us"] = serde_json::json!(floor.map(|f| f.p99_us));
        v["p50_vs_floor"] = serde_json::json!(floor.map(|f| r.p50_us / f.p50_us));
        v["replog_p50_ratio"] = serde_json::json!(lat);
        v["replog_ops_ratio"] = serde_json::json!(ops);
        out += &format!("{v}\n");
    }
    for (system, why) in skipped {
        out += &format!(
            "{}\n",
            serde_json::json!({ "system": system, "skipped": why })
        );
    }
    out
}

/// replog's p50 latency and throughput over `r`'s, at the same concurrency (none for
/// replog's own rows).
fn replog_ratios(rows: &[Row], r: &Row) -> Option<(f64, f64)> {
    let mine = rows
        .iter()
        .find(|m| m.system == "replog" && m.concurrency == r.concurrency)?;
    (r.system != "replog").then(|| (mine.p50_us / r.p50_us, mine.ops_per_sec / r.ops_per_sec))
}

/// The table: one line per row, with its p50 over the floor's and replog's ratio to it at the
/// same concurrency (latency: replog / peer, lower is better; throughput: replog / peer,
/// higher is better).
pub fn table(rows: &[Row], floor: Option<SyncFloor>, skipped: &BTreeMap<String, String>) -> String {
    let mut s = String::new();
    if let Some(f) = floor {
        s += &format!(
            "machine floor of an acks=sync append (2 QUIC round trips + write+fdatasync): p50 {:.1} us, p99 {:.1} us\n",
            f.p50_us, f.p99_us
        );
    }
    s += &format!(
        "{:<9} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10} {:>10}  {}\n",
        "system",
        "conc",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "ops/s",
        "cpu us/op",
        "p50/flr",
        "replog/p50",
        "replog/ops",
        "durability"
    );
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
    for r in rows {
        let (lat, ops) = replog_ratios(rows, r).unzip();
        s += &format!(
            "{:<9} {:>4} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>9.1} {:>8} {:>10} {:>10}  {}\n",
            r.system,
            r.concurrency,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.ops_per_sec,
            r.server_cpu_us_per_op,
            fmt(floor.map(|f| r.p50_us / f.p50_us)),
            fmt(lat),
            fmt(ops),
            r.durability
        );
        if r.errors > 0 {
            s += &format!("          ({} operations failed)\n", r.errors);
        }
        if let Some(n) = r.server_allocations_per_op {
            s += &format!("          ({n:.1} allocations per operation in the servers)\n");
        }
    }
    for (system, why) in skipped {
        s += &format!("{system}: skipped: {why}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nats_cluster_whose_server_exits_is_started_again_a_bounded_number_of_times() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A stand-in nats-server that notes each start and exits, as one whose port was taken.
        let starts = dir.path().join("starts");
        let bin = dir.path().join("nats-server");
        let script = format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", starts.display());
        std::fs::write(&bin, script).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plan = PeerPlan {
            dir: dir.path().to_path_buf(),
            record_bytes: 1024,
            warmup: Duration::from_millis(10),
            duration: Duration::from_millis(10),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let Err(err) = nats(&bin, &plan, &[1], &rt) else {
            panic!("no server stays up, yet NATS ran");
        };
        assert!(err.contains("exited"), "{err}");
        // Each attempt in a directory of its own; a server that exited had noted its start.
        let lines = std::fs::read_to_string(&starts).unwrap();
        let attempts: std::collections::BTreeSet<&str> = lines
            .lines()
            .filter_map(|l| l.split('/').find(|part| part.starts_with("attempt-")))
            .collect();
        let expected: std::collections::BTreeSet<String> = (1..=NATS_START_ATTEMPTS_MAX)
            .map(|i| format!("attempt-{i}"))
            .collect();
        let expected: std::collections::BTreeSet<&str> =
            expected.iter().map(String::as_str).collect();
        assert_eq!(attempts, expected, "{lines}");
    }
}
