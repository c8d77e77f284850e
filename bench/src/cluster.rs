//! Local clusters of `replog node` processes that the tool starts and stops itself, and the
//! nodes' per-stage latency histograms scraped from their metrics endpoints.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long a node may take to print its address after it was started.
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to exit after SIGTERM before it is killed.
pub const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the `replog` binary is: `explicit` (`--replog`), else `$REPLOG_BIN`, else beside this
/// program (`target/<profile>/replog` for `cargo run -p bench`), else built with `cargo build
/// -p replog` in this program's profile when run by cargo, else `replog` on `$PATH`.
pub fn find_replog(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("REPLOG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Integration tests run from target/<profile>/deps.
    let candidates = [dir.join("replog"), dir.join("../replog")];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = exe
            .ancestors()
            .any(|a| a.file_name() == Some("release".as_ref()));
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "replog"]);
        if release {
            cmd.arg("--release");
        }
        eprintln!("replog-bench: building the replog binary ({cmd:?})");
        let status = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build of replog failed: {status}"));
        }
        if let Some(p) = candidates.iter().find(|p| p.is_file()) {
            return Ok(p.clone());
        }
    }
    Ok(PathBuf::from("replog"))
}

/// What a spawned cluster looks like.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Nodes: 1 is a standalone node; more is `node-1` leading and the rest following.
    pub nodes: usize,
    /// Followers in the sync set (`replication.sync_replicas`).
    pub sync_replicas: usize,
    /// Extra TOML given to every node (for example a `[replication]` setting).
    pub config_toml: String,
    /// The `replog` binary.
    pub replog: PathBuf,
    /// Run the embedded controller (`--member` on every node, fixed loopback ports), with this
    /// `controller.leader_timeout_ms`.
    pub controller: Option<u64>,
}

/// A `replog node` child process.
pub struct Node {
    pub id: String,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    child: Child,
    args: Vec<String>,
    replog: PathBuf,
    ca_dir: PathBuf,
}

impl Node {
    /// Run `replog node ARGS` (development CA in `ca_dir`) and wait for its address line.
    pub fn start(
        replog: &Path,
        ca_dir: &Path,
        id: &str,
        args: Vec<String>,
    ) -> Result<Node, String> {
        let mut child = Command::new(replog)
            .arg("node")
            .args(&args)
            .env(client::DEV_CA_DIR_ENV, ca_dir)
            // The nodes' own log level: REPLOG_BENCH_NODE_LOG (default: errors only).
            .env(
                "REPLOG_LOG",
                std::env::var("REPLOG_BENCH_NODE_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", replog.display()))?;
        // The first line on a thread, so a node that never prints cannot hang the tool; the
        // thread then drains stdout until the node exits.
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(stdout);
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        let mut node = Node {
            id: id.to_string(),
            addr: ([0, 0, 0, 0], 0).into(),
            metrics: ([0, 0, 0, 0], 0).into(),
            child,
            args,
            replog: replog.to_path_buf(),
            ca_dir: ca_dir.to_path_buf(),
        };
        let line = rx
            .recv_timeout(NODE_START_TIMEOUT)
            .map_err(|_| format!("{id} did not print its address in time"))?;
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(|_| format!("{id} did not start: {line:?}"))?;
        let addr = |k: &str| -> Result<SocketAddr, String> {
            v[k].as_str()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| format!("{id}: no {k} address in {line:?}"))
        };
        node.addr = addr("addr")?;
        node.metrics = addr("metrics")?;
        Ok(node)
    }

    /// Start the node again with the same arguments and data (after [`Node::stop`]). It listens
    /// on the same address.
    pub fn restart(&mut self) -> Result<(), String> {
        let mut args = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = self.addr.to_string();
        }
        let mut fresh = Node::start(&self.replog, &self.ca_dir, &self.id, args)?;
        std::mem::swap(self, &mut fresh);
        // `fresh` is now the old, exited process.
        Ok(())
    }

    /// SIGKILL, and wait for the exit.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for the exit (SIGKILL after [`NODE_STOP_TIMEOUT`]).
    pub fn stop(&mut self) -> Result<(), String> {
        if let Ok(Some(_)) = self.child.try_wait() {
            return Ok(());
        }
        self.signal(libc::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < NODE_STOP_TIMEOUT {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("{} exited with {status}", self.id))
                };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        Err(format!(
            "{} did not stop within {NODE_STOP_TIMEOUT:?}",
            self.id
        ))
    }

    /// Send `sig` to the node process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The node's Prometheus text.
    pub fn scrape(&self) -> Result<String, String> {
        scrape(self.metrics)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Nodes started by this tool, with their data under one directory.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

/// Attempts at starting a cluster whose members' ports are fixed up front (with a
/// controller): a port found free can be taken by another process before its node binds it.
pub const SPAWN_ATTEMPTS_MAX: usize = 3;

impl Cluster {
    /// Start `spec.nodes` nodes with data in `dir`: the leader first, then its followers. With a
    /// controller, a node that fails to start (its port taken meanwhile) makes the whole
    /// cluster start again on other ports, with empty data, up to [`SPAWN_ATTEMPTS_MAX`] times.
    pub fn spawn(spec: &ClusterSpec, dir: &Path) -> Result<Cluster, String> {
        let attempts = if spec.controller.is_some() {
            SPAWN_ATTEMPTS_MAX
        } else {
            1
        };
        let mut last = String::new();
        for attempt in 1..=attempts {
            match Self::spawn_once(spec, dir) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    // The nodes of this attempt were stopped when dropped; their data goes.
                    for i in 1..=spec.nodes.max(1) {
                        let _ = std::fs::remove_dir_all(dir.join(format!("node-{i}")));
                    }
                    if attempt < attempts {
                        eprintln!("replog-bench: starting the cluster again: {e}");
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn spawn_once(spec: &ClusterSpec, dir: &Path) -> Result<Cluster, String> {
        let ca_dir = dir.join("dev-ca");
        let config = dir.join("node.toml");
        std::fs::write(&config, &spec.config_toml).map_err(|e| e.to_string())?;
        let ids: Vec<String> = (1..=spec.nodes.max(1))
            .map(|i| format!("node-{i}"))
            .collect();
        // With a controller every member's address is fixed up front: ports free a moment ago.
        let listen: Vec<String> = match spec.controller {
            Some(_) => {
                let sockets: Vec<std::net::UdpSocket> = ids
                    .iter()
                    .map(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("a free port: {e}"))?;
                sockets
                    .iter()
                    .map(|s| s.local_addr().map(|a| a.to_string()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?
            }
            None => ids.iter().map(|_| "127.0.0.1:0".to_string()).collect(),
        };
        let members: Vec<String> = ids
            .iter()
            .zip(&listen)
            .map(|(id, a)| format!("{id}={a}"))
            .collect();
        let base = |i: usize| -> Vec<String> {
            let id = &ids[i];
            let data = dir.join(id);
            let mut args: Vec<String> = vec![
                "--data-dir".into(),
                data.display().to_string(),
                "--listen".into(),
                listen[i].clone(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
                "--node-id".into(),
                id.into(),
                "--config".into(),
                config.display().to_string(),
            ];
            if let Some(t) = spec.controller {
                args.extend([
                    "--member".into(),
                    members.join(","),
                    "--leader-timeout-ms".into(),
                    t.to_string(),
                ]);
            }
            args
        };
        let mut leader_args = base(0);
        if ids.len() > 1 {
            leader_args.extend([
                "--follower".into(),
                ids[1..].join(","),
                "--sync-replicas".into(),
                spec.sync_replicas.to_string(),
            ]);
        }
        let leader = Node::start(&spec.replog, &ca_dir, &ids[0], leader_args)?;
        let mut nodes = vec![leader];
        for (i, id) in ids.iter().enumerate().skip(1) {
            let mut args = base(i);
            args.extend(["--leader".into(), nodes[0].addr.to_string()]);
            nodes.push(Node::start(&spec.replog, &ca_dir, id, args)?);
        }
        Ok(Cluster { nodes })
    }

    pub fn leader(&self) -> &Node {
        &self.nodes[0]
    }

    /// Stop every node; the first failure is returned after all were stopped.
    pub fn stop(mut self) -> Result<(), String> {
        let mut first = Ok(());
        for n in self.nodes.iter_mut().rev() {
            if let Err(e) = n.stop() {
                first = first.and(Err(e));
            }
        }
        first
    }
}

/// `GET /metrics` from a node's metrics endpoint.
pub fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("metrics {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: replog-bench\r\n\r\n")
        .map_err(|e| format!("metrics {addr}: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("metrics {addr}: {e}"))?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_string())
        }
        _ => Err(format!("metrics {addr}: not a 200 answer")),
    }
}

/// The stage histogram family the nodes export.
pub const STAGE_METRIC: &str = "replog_stage_latency_seconds";

/// One stage's cumulative buckets as scraped: (upper bound in seconds, samples at or below),
/// plus sum and count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    pub bounds: Vec<(f64, u64)>,
    pub sum_s: f64,
    pub count: u64,
}

/// Parse every stage of [`STAGE_METRIC`] out of a Prometheus text exposition.
pub fn parse_stages(text: &str) -> BTreeMap<String, Buckets> {
    let mut out: BTreeMap<String, Buckets> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(STAGE_METRIC) else {
            continue;
        };
        let Some((kind, rest)) = rest.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let (Some(stage), Ok(value)) = (label("stage"), value.trim().parse::<f64>()) else {
            continue;
        };
        let b = out.entry(stage).or_default();
        match kind {
            "_bucket" => {
                let le = label("le").and_then(|le| {
                    if le == "+Inf" {
                        Some(f64::INFINITY)
                    } else {
                        le.parse().ok()
                    }
                });
                if let Some(le) = le {
                    b.bounds.push((le, value as u64));
                }
            }
            "_sum" => b.sum_s = value,
            "_count" => b.count = value as u64,
            _ => {}
        }
    }
    for b in out.values_mut() {
        b.bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

impl Buckets {
    /// What was recorded between `before` and `self` (two scrapes of the same node).
    pub fn since(&self, before: &Buckets) -> Buckets {
        let prior = |le: f64| {
            before
                .bounds
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0, |(_, n)| *n)
        };
        Buckets {
            bounds: self
                .bounds
                .iter()
                .map(|(le, n)| (*le, n.saturating_sub(prior(*le))))
                .collect(),
            sum_s: (self.sum_s - before.sum_s).max(0.0),
            count: self.count.saturating_sub(before.count),
        }
    }

    /// The latency (µs) at quantile `q`, interpolated linearly inside the bucket that holds it
    /// (so only as precise as the buckets). `None` when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q * self.count as f64;
        let (mut lower, mut below) = (0.0f64, 0u64);
        for &(le, n) in &self.bounds {
            if n as f64 >= rank && n > below {
                if le.is_infinite() {
                    return Some(lower * 1e6);
                }
                let frac = (rank - below as f64) / (n - below) as f64;
                return Some((lower + (le - lower) * frac.clamp(0.0, 1.0)) * 1e6);
            }
            if n > below {
                below = n;
            }
            lower = le;
        }
        Some(lower * 1e6)
    }
}

/// One stage on one node over a run.
#[derive(Clone, Debug, Serialize)]
pub struct StageSummary {
    pub node: String,
    pub stage: String,
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Per node and stage, what was recorded between the `before` and `after` scrapes.
pub fn stage_summaries(
    before: &[(String, String)],
    after: &[(String, String)],
) -> Vec<StageSummary> {
    let mut out = Vec::new();
    for (node, text) in after {
        let prior = before
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, t)| parse_stages(t))
            .unwrap_or_default();
        for (stage, b) in parse_stages(text) {
            let d = b.since(prior.get(&stage).unwrap_or(&Buckets::default()));
            if d.count == 0 {
                continue;
            }
            out.push(StageSummary {
                node: node.clone(),
                stage,
                count: d.count,
                mean_us: d.sum_s / d.count as f64 * 1e6,
                p50_us: d.quantile_us(0.5).unwrap_or(0.0),
                p99_us: d.quantile_us(0.99).unwrap_or(0.0),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in `replog` that notes each start in `log` and exits at once, as a node whose
    /// port was taken does.
    fn failing_replog(dir: &Path, log: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("replog");
        let script = format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", log.display());
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_cluster_with_fixed_ports_is_started_again_a_bounded_number_of_times() {
        let dir = tempfile::tempdir().unwrap();
        let starts = dir.path().join("starts");
        let spec = |controller| ClusterSpec {
            nodes: 3,
            sync_replicas: 1,
            config_toml: String::new(),
            replog: failing_replog(dir.path(), &starts),
            controller,
        };
        let Err(err) = Cluster::spawn(&spec(Some(1000)), dir.path()) else {
            panic!("no node starts, yet the cluster did");
        };
        assert!(err.contains("node-1 did not start"), "{err}");
        let lines = std::fs::read_to_string(&starts).unwrap();
        assert_eq!(lines.lines().count(), SPAWN_ATTEMPTS_MAX, "{lines}");
        // The attempts fixed other ports for their members (the kernel's free ports could
        // repeat one set, never all three).
        let members: std::collections::BTreeSet<&str> = lines
            .lines()
            .map(|l| {
                l.split("--member ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
            })
            .collect();
        assert!(members.len() > 1, "{lines}");
        // Without a controller the ports are the kernel's own choice: one attempt.
        std::fs::remove_file(&starts).unwrap();
        assert!(Cluster::spawn(&spec(None), dir.path()).is_err());
        assert_eq!(std::fs::read_to_string(&starts).unwrap().lines().count(), 1);
    }

    const SCRAPE: &str = "\
# HELP replog_stage_latency_seconds Per-stage latency.
# TYPE replog_stage_latency_seconds histogram
replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"0.0001\"} 50
replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"0.0002\"} 90
replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"+Inf\"} 100
replog_stage_latency_seconds_sum{stage=\"receive\"} 0.015
replog_stage_latency_seconds_count{stage=\"receive\"} 100
replog_stage_latency_seconds_bucket{stage=\"commit\",le=\"0.0001\"} 0
replog_stage_latency_seconds_bucket{stage=\"commit\",le=\"+Inf\"} 0
replog_stage_latency_seconds_sum{stage=\"commit\"} 0
replog_stage_latency_seconds_count{stage=\"commit\"} 0
replog_append_latency_seconds_count 7
";

    #[test]
    fn stages_parse_and_interpolate_within_buckets() {
        let s = parse_stages(SCRAPE);
        assert_eq!(s.len(), 2);
        let r = &s["receive"];
        assert_eq!(r.count, 100);
        assert_eq!(r.bounds.len(), 3);
        // The 50th sample is the last of the first bucket; the 70th lies half-way through
        // the second.
        assert!((r.quantile_us(0.5).unwrap() - 100.0).abs() < 1e-6);
        assert!((r.quantile_us(0.7).unwrap() - 150.0).abs() < 1e-6);
        // Beyond the last finite bound, the bound is all that is known.
        assert!((r.quantile_us(0.99).unwrap() - 200.0).abs() < 1e-6);
        assert_eq!(s["commit"].quantile_us(0.5), None);
    }

    #[test]
    fn summaries_cover_only_what_happened_between_scrapes() {
        let later = SCRAPE
            .replace("\"0.0001\"} 50", "\"0.0001\"} 60")
            .replace("\"0.0002\"} 90", "\"0.0002\"} 190")
            .replace("\"+Inf\"} 100", "\"+Inf\"} 200")
            .replace("{stage=\"receive\"} 0.015", "{stage=\"receive\"} 0.030")
            .replace("{stage=\"receive\"} 100", "{stage=\"receive\"} 200");
        let before = vec![("n1".to_string(), SCRAPE.to_string())];
        let after = vec![("n1".to_string(), later)];
        let s = stage_summaries(&before, &after);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].stage, "receive");
        assert_eq!(s[0].count, 100);
        assert!((s[0].mean_us - 150.0).abs() < 1e-6);
        // 10 of the 100 new samples are in the first bucket, 90 in the second.
        assert!(s[0].p50_us > 100.0 && s[0].p50_us < 200.0, "{s:?}");
    }
}
