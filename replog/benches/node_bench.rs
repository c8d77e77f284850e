//! One replog node against the machine's floors, measured in one run on one disk: fdatasync
//! latency, a QUIC round trip on loopback, append latency through a real `replog node` process
//! (one and two shards), and throughput with many concurrent clients.

use std::collections::VecDeque;
use std::fmt::Display;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bench::cluster::Node;
use bench::floor::{round_trip, Echo};
use bytes::Bytes;
use client::{Acks, AppendOptions, Client, ClientConfig, ProducerOptions, DEV_CA_DIR_ENV};
use hdrhistogram::Histogram;

const REPLOG: &str = env!("CARGO_BIN_EXE_replog");
/// Payload of one record, and of one echo request.
const REC: usize = 1024;
/// The disk floor's write size.
const BLOCK: usize = 4096;
/// The echo server's answer, about the size of a replog receipt frame.
const ANSWER: usize = bench::floor::RTT_ANSWER_BYTES;
const CONCURRENCY: [usize; 2] = [16, 64];
/// Records a producer keeps sent and not yet acknowledged.
const IN_FLIGHT: usize = 1024;
/// The target: append p50 within this factor of p50(RTT) + p50(fdatasync).
const TARGET: f64 = 1.3;
/// Longest any single step may take before the bench fails instead of hanging.
const STEP: Duration = Duration::from_secs(30);

/// The report: a text table, and beside it one flat JSON object of "section.key": value fields.
#[derive(Default)]
struct Out {
    text: String,
    json: Vec<String>,
}

/// `put! { out, prefix, name = value, .. }`: numeric JSON fields `prefix.name`.
macro_rules! put {
    ($o:expr, $prefix:expr, $($k:ident = $v:expr),* $(,)?) => {
        $( $o.num(&format!("{}.{}", $prefix, stringify!($k)), $v as f64); )*
    };
}

/// A JSON string literal.
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Out {
    fn say(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
    }
    /// Three decimals are plenty; a non-finite number becomes null.
    fn num(&mut self, key: &str, v: f64) {
        let v = if v.is_finite() {
            ((v * 1e3).round() / 1e3).to_string()
        } else {
            "null".into()
        };
        self.json.push(format!("{}:{v}", q(key)));
    }
    fn str(&mut self, key: &str, v: &str) {
        self.json.push(format!("{}:{}", q(key), q(v)));
    }
    /// A latency row: p50, p90, p99, p99.9, max and mean in µs.
    fn lat(&mut self, key: &str, label: &str, h: &Histogram<u64>) {
        let p = pcts(h);
        let cols: String = p.iter().map(|v| format!(" {v:>8.1}")).collect();
        self.say(&format!("  {label:<24}{cols}"));
        put! { self, key, p50_us = p[0], p90_us = p[1], p99_us = p[2], p999_us = p[3],
        max_us = p[4], mean_us = p[5], samples = h.len() }
    }
}

const LAT_HEADER: &str =
    "                                p50      p90      p99    p99.9      max     mean";

struct Params {
    dir: Option<PathBuf>,
    quick: bool,
    /// Run the replication benchmark (a leader and two followers) instead of the single node.
    replication: bool,
    /// Bytes a follower is behind when the catch-up measurement starts.
    catchup_bytes: u64,
    /// Leader setting `replication.catchup_bytes_per_sec_max` (None: the node's default).
    catchup_rate: Option<u64>,
    json: bool,
    warmup: usize,
    samples: usize,
    load: Duration,
    concurrency: &'static [usize],
}

fn parse_args() -> Params {
    let (mut dir, mut quick, mut json, mut replication) = (None, false, false, false);
    let mut catchup_rate = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = Some(args.next().expect("--dir needs a path").into()),
            "--quick" => quick = true,
            "--json" => json = true,
            "--replication" => replication = true,
            "--catchup-rate" => {
                let v = args
                    .next()
                    .expect("--catchup-rate needs bytes per second (0: no limit)");
                catchup_rate = Some(v.parse().expect("--catchup-rate: a number"));
            }
            // `cargo bench` passes `--bench` (and any filter) to every bench binary.
            _ => {}
        }
    }
    Params {
        dir,
        quick,
        replication,
        catchup_bytes: if quick { 64 << 20 } else { 1 << 30 },
        catchup_rate,
        json,
        warmup: if quick { 20 } else { 100 },
        samples: if quick { 300 } else { 2000 },
        load: Duration::from_secs(if quick { 1 } else { 3 }),
        concurrency: if quick {
            &CONCURRENCY[..1]
        } else {
            &CONCURRENCY
        },
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).unwrap()
}

fn ns(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

/// p50, p90, p99, p99.9, max and mean, in microseconds.
fn pcts(h: &Histogram<u64>) -> [f64; 6] {
    let q = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    let max = h.max() as f64 / 1e3;
    [q(0.5), q(0.9), q(0.99), q(0.999), max, h.mean() / 1e3]
}

/// Await `fut`, failing the bench with a message naming `what` if it takes longer than `STEP`
/// or returns an error.
async fn step<T, E: Display>(what: &str, fut: impl Future<Output = Result<T, E>>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("node_bench: {what} failed: {e}"),
        Err(_) => panic!("node_bench: {what} did not finish within {STEP:?}"),
    }
}

/// Item 1: 4 KiB write_all_at + sync_data at queue depth 1, sequentially through a file that was
/// zero-filled and synced first (the state a log segment is in when it takes writes).
fn disk_floor(dir: &Path, warmup: usize, samples: usize) -> Histogram<u64> {
    let path = dir.join("floor-disk");
    let len = (warmup + samples) * BLOCK;
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create the disk floor's file");
    let zeros = vec![0u8; 1 << 20];
    for pos in (0..len).step_by(zeros.len()) {
        let n = (len - pos).min(zeros.len());
        file.write_all_at(&zeros[..n], pos as u64).unwrap();
    }
    file.sync_all().unwrap();
    let buf = vec![0xA5u8; BLOCK];
    let mut h = hist();
    for i in 0..warmup + samples {
        let t = Instant::now();
        file.write_all_at(&buf, (i * BLOCK) as u64).unwrap();
        file.sync_data().unwrap();
        if i >= warmup {
            h.saturating_record(ns(t));
        }
    }
    drop(file);
    std::fs::remove_file(&path).unwrap();
    h
}

/// The disk floor with `writers` threads doing it at once, each on its own file: what each
/// replica's fdatasync costs when the replicas of a cluster share this disk.
fn shared_disk_floor(dir: &Path, writers: usize, warmup: usize, samples: usize) -> Histogram<u64> {
    let hists: Vec<Histogram<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers)
            .map(|i| {
                let d = dir.join(format!("shared-{i}"));
                s.spawn(move || {
                    std::fs::create_dir_all(&d).unwrap();
                    let h = disk_floor(&d, warmup, samples);
                    std::fs::remove_dir(&d).unwrap();
                    h
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = hist();
    for h in hists {
        all.add(h).unwrap();
    }
    all
}

/// Item 2: QUIC round trips to the echo server, one at a time, on one connection.
async fn rtt_floor(echo: &Echo, warmup: usize, samples: usize) -> Histogram<u64> {
    let (ep, conn) = step("connecting to the echo server", echo.connect()).await;
    let req = vec![b'r'; REC];
    let mut h = hist();
    for i in 0..warmup + samples {
        let t = Instant::now();
        step("an echo round trip", round_trip(&conn, &req)).await;
        if i >= warmup {
            h.saturating_record(ns(t));
        }
    }
    conn.close(0u32.into(), b"");
    let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    h
}

/// A `replog node` child process.
struct NodeProc {
    node: Node,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl NodeProc {
    fn start(data_dir: &Path, ca_dir: &Path, shards: usize) -> NodeProc {
        Self::start_with(data_dir, ca_dir, shards, &[])
    }

    fn start_with(data_dir: &Path, ca_dir: &Path, shards: usize, extra: &[&str]) -> NodeProc {
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--shards".into(),
            shards.to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let name = data_dir
            .file_name()
            .map_or("node".into(), |n| n.to_string_lossy());
        let node = Node::start(REPLOG.as_ref(), ca_dir, &name, args)
            .unwrap_or_else(|e| panic!("node_bench: {e}"));
        NodeProc {
            addr: node.addr,
            metrics: node.metrics,
            node,
        }
    }

    fn signal(&self, sig: i32) {
        self.node.signal(sig);
    }

    /// SIGTERM, then wait for the exit (fail after the node's stop timeout).
    fn stop(mut self) -> Duration {
        let t = Instant::now();
        self.node
            .stop()
            .unwrap_or_else(|e| panic!("node_bench: {e}"));
        t.elapsed()
    }

    /// Counters and latency sums from the node's Prometheus endpoint.
    fn stats(&self) -> NodeStats {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(5))
            .expect("node_bench: connect to the metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text)
            .expect("node_bench: read the metrics endpoint");
        let m = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("node_bench: metric {name} missing"))
        };
        NodeStats {
            forwarded: m("replog_forwarded_total"),
            appends: m("replog_append_latency_seconds_count"),
            append_s: m("replog_append_latency_seconds_sum"),
            flushes: m("replog_flush_latency_seconds_count"),
            flush_s: m("replog_flush_latency_seconds_sum"),
            acks: m("replog_follower_ack_latency_seconds_count"),
            ack_s: m("replog_follower_ack_latency_seconds_sum"),
        }
    }

    /// CPU time the node process has used (all threads), in seconds.
    fn cpu_secs(&self) -> f64 {
        cpu_secs(&format!("/proc/{}/stat", self.node.pid()))
    }
}

/// utime + stime of a process from its `stat` file, in seconds (0 if unknown).
fn cpu_secs(stat: &str) -> f64 {
    let s = std::fs::read_to_string(stat).unwrap_or_default();
    let fields: Vec<&str> = s
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, f)| f.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / hz
}

#[derive(Clone, Copy)]
struct NodeStats {
    forwarded: f64,
    appends: f64,
    append_s: f64,
    flushes: f64,
    flush_s: f64,
    acks: f64,
    ack_s: f64,
}

impl NodeStats {
    /// Mean of the followers' acknowledgement latency since `before`, in µs.
    fn ack_mean_since(&self, before: &NodeStats) -> f64 {
        (self.ack_s - before.ack_s) / (self.acks - before.acks).max(1.0) * 1e6
    }

    /// The change since `before`: (forwarded, node-side append mean µs, fdatasync wait mean µs).
    fn since(&self, before: &NodeStats) -> (f64, f64, f64) {
        let mean = |s: f64, n: f64| s / n.max(1.0) * 1e6;
        (
            self.forwarded - before.forwarded,
            mean(
                self.append_s - before.append_s,
                self.appends - before.appends,
            ),
            mean(self.flush_s - before.flush_s, self.flushes - before.flushes),
        )
    }
}

fn config(node: &NodeProc) -> ClientConfig {
    ClientConfig::new([node.addr.to_string()])
        .with_connect_timeout(Duration::from_secs(10))
        .with_request_timeout(Duration::from_secs(20))
}

fn at(acks: Acks) -> AppendOptions {
    AppendOptions {
        acks,
        ..AppendOptions::default()
    }
}

fn record() -> Bytes {
    Bytes::from(vec![0x42u8; REC])
}

/// Create `log`, then wait while the new log prepares its next segment in the background (as
/// long again as the creation took, plus a margin), so that preparation does not share the disk
/// with the measurement that follows.
async fn create_log(client: &Client, log: &str) {
    let t = Instant::now();
    step(&format!("creating log {log}"), client.create_log(log)).await;
    tokio::time::sleep(t.elapsed() * 3 / 2 + Duration::from_millis(200)).await;
}

/// Item 4: `warmup + samples` sequential appends of one record; the latencies of the last
/// `samples`.
async fn append_latency(
    client: &Client,
    log: &str,
    warmup: usize,
    samples: usize,
) -> Histogram<u64> {
    append_latency_at(client, log, warmup, samples, Acks::Leader).await
}

async fn append_latency_at(
    client: &Client,
    log: &str,
    warmup: usize,
    samples: usize,
    acks: Acks,
) -> Histogram<u64> {
    let rec = record();
    let mut h = hist();
    for i in 0..warmup + samples {
        let t = Instant::now();
        step("an append", client.append(log, vec![rec.clone()], at(acks))).await;
        if i >= warmup {
            h.saturating_record(ns(t));
        }
    }
    h
}

/// What one throughput run measured.
struct Load {
    records: u64,
    secs: f64,
    lat: Histogram<u64>,
    node_cpu: f64,
    bench_cpu: f64,
}

/// CPU seconds used so far by the node and by this process, taken when a load starts.
struct CpuMark(f64, f64);

impl CpuMark {
    fn now(node: &NodeProc) -> CpuMark {
        CpuMark(node.cpu_secs(), cpu_secs("/proc/self/stat"))
    }

    /// The load's figures: one record per latency sample, CPU as a share of the elapsed time.
    fn load(self, node: &NodeProc, start: Instant, lat: Histogram<u64>) -> Load {
        let secs = start.elapsed().as_secs_f64();
        Load {
            records: lat.len(),
            secs,
            lat,
            node_cpu: (node.cpu_secs() - self.0) / secs,
            bench_cpu: (cpu_secs("/proc/self/stat") - self.1) / secs,
        }
    }
}

/// Wait for every task; a task that panicked fails the bench with its own message.
async fn join_all<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match tokio::time::timeout(STEP, h).await {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("node_bench: a task failed: {e}"),
            Err(_) => panic!("node_bench: a task did not finish within {STEP:?}"),
        }
    }
    out
}

/// Item 5: `tasks` tasks, task i on `clients[i % len]`, each appending one record at a time
/// until `dur` has passed.
async fn load(node: &NodeProc, clients: &[Client], tasks: usize, log: &str, dur: Duration) -> Load {
    load_at(node, clients, tasks, log, dur, Acks::Leader).await
}

async fn load_at(
    node: &NodeProc,
    clients: &[Client],
    tasks: usize,
    log: &str,
    dur: Duration,
    acks: Acks,
) -> Load {
    let cpu = CpuMark::now(node);
    let start = Instant::now();
    let deadline = start + dur;
    let handles = (0..tasks)
        .map(|i| {
            let (client, log) = (clients[i % clients.len()].clone(), log.to_string());
            tokio::spawn(async move {
                let (rec, mut h) = (record(), hist());
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let append = client.append(&log, vec![rec.clone()], at(acks));
                    step("an append under load", append).await;
                    h.saturating_record(ns(t));
                }
                h
            })
        })
        .collect();
    let mut lat = hist();
    for h in join_all(handles).await {
        lat.add(h).unwrap();
    }
    cpu.load(node, start, lat)
}

/// Item 5, producer: keep `IN_FLIGHT` records sent and unacknowledged, awaiting receipts in
/// order, until `dur` has passed; then drain.
async fn producer_load(node: &NodeProc, client: &Client, log: &str, dur: Duration) -> Load {
    producer_load_at(node, client, log, dur, Acks::Leader).await
}

async fn producer_load_at(
    node: &NodeProc,
    client: &Client,
    log: &str,
    dur: Duration,
    acks: Acks,
) -> Load {
    let cpu = CpuMark::now(node);
    let options = ProducerOptions {
        acks,
        ..ProducerOptions::default()
    };
    let producer = client.producer(log, options);
    let (rec, mut lat) = (record(), hist());
    let mut queue = VecDeque::with_capacity(IN_FLIGHT);
    let start = Instant::now();
    let deadline = start + dur;
    loop {
        if Instant::now() < deadline {
            while queue.len() < IN_FLIGHT {
                queue.push_back((Instant::now(), producer.send(rec.clone())));
            }
        }
        let Some((t, receipt)) = queue.pop_front() else {
            break;
        };
        step("a producer receipt", receipt).await;
        lat.saturating_record(ns(t));
    }
    cpu.load(node, start, lat)
}

async fn close_all(clients: Vec<Client>) {
    let handles = clients
        .into_iter()
        .map(|c| tokio::spawn(async move { c.close().await }))
        .collect();
    join_all(handles).await;
}

/// The filesystem holding `dir`: the longest mount point above it in /proc/self/mounts.
fn fs_type(dir: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let best = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && dir.starts_with(f[1])).then(|| (f[0], f[1], f[2]))
        })
        .max_by_key(|(_, mnt, _)| mnt.len());
    best.map_or("unknown".into(), |(dev, mnt, ty)| {
        format!("{ty} ({dev} on {mnt})")
    })
}

/// The workspace target dir, from this binary's path `<target>/release/deps/node_bench-*`.
fn default_parent() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.ancestors().nth(3).map(Path::to_path_buf))
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| ".".into())
}

fn verdict(ratio: f64) -> String {
    if ratio <= TARGET {
        "met".into()
    } else {
        format!("MISSED by {:.0}%", (ratio / TARGET - 1.0) * 100.0)
    }
}

/// Two log names, owned by shard 0 and shard 1 of a two-shard node.
fn names_per_shard() -> [String; 2] {
    let name = |shard| {
        (0..)
            .map(|i| format!("bench-{i}"))
            .find(|n| server::shard_of(n, 2) == shard)
            .unwrap()
    };
    [name(0), name(1)]
}

fn main() {
    let p = parse_args();
    let parent = p.dir.clone().unwrap_or_else(default_parent);
    let tmp = tempfile::Builder::new()
        .prefix("node_bench-")
        .tempdir_in(&parent)
        .expect("create a temporary directory under --dir");
    let dir = tmp.path().canonicalize().unwrap();
    let ca_dir = dir.join("dev-ca");
    // Before any thread starts: the in-process client finds the development CA through it.
    std::env::set_var(DEV_CA_DIR_ENV, &ca_dir);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let started = Instant::now();
    let mut o = Out::default();
    o.say(&format!(
        "node_bench{}",
        if p.quick { " --quick" } else { "" }
    ));
    let conditions = [
        ("dir", dir.display().to_string()),
        ("fs", fs_type(&dir)),
        ("kernel", kernel.trim().into()),
    ];
    for (k, v) in &conditions {
        o.say(&format!("  {k:<7} {v}"));
        o.str(&format!("conditions.{k}"), v);
    }
    o.say(&format!(
        "  {cpus} CPUs; {REC} B records; latencies in µs; MB = 1e6 B"
    ));
    put! { o, "conditions", cpus = cpus, quick = u8::from(p.quick), record_bytes = REC }
    let samples = format!("{} samples after {} warm-up", p.samples, p.warmup);
    if p.replication {
        replication(&p, &dir, &ca_dir, &mut o);
        drop(tmp);
        finish(&p, o, started);
        return;
    }

    eprintln!("node_bench: floor: 4 KiB write + fdatasync");
    let disk = disk_floor(&dir, p.warmup, p.samples);
    o.say(&format!(
        "\n1. Floor, disk: {BLOCK} B write_all_at + sync_data into a pre-written (zero-filled,"
    ));
    o.say(&format!(
        "   synced) file, sequential, QD1 ({samples})\n{LAT_HEADER}"
    ));
    o.lat("floor.disk", "fdatasync 4096", &disk);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let echo = Echo::start().expect("node_bench: the echo server");
    eprintln!("node_bench: floor: QUIC round trip");
    let rtt = rt.block_on(rtt_floor(&echo, p.warmup, p.samples));
    o.say("\n2. Floor, network: quinn round trip on loopback, TLS 1.3 (ring); echo server on its");
    o.say("   own thread and current-thread runtime, client on this thread's runtime; per trip a");
    o.say(&format!(
        "   new bidirectional stream, {REC} B request + finish, {ANSWER} B answer read to end"
    ));
    o.say(&format!("   ({samples})\n{LAT_HEADER}"));
    o.lat("floor.rtt", "round trip", &rtt);

    let (d, r) = (pcts(&disk), pcts(&rtt));
    let floor = [d[0] + r[0], d[2] + r[2], d[3] + r[3]];
    o.say("\n3. Floor for acks=leader = RTT + fdatasync (percentiles added)");
    o.say("                                p50      p99    p99.9");
    o.say(&format!(
        "  {:<24} {:>8.1} {:>8.1} {:>8.1}",
        "RTT + fdatasync", floor[0], floor[1], floor[2]
    ));
    put! { o, "floor.sum", p50_us = floor[0], p99_us = floor[1], p999_us = floor[2] }

    o.say(&format!(
        "\n4. replog append: one {REC} B record per append, acks=leader, one client (one QUIC"
    ));
    o.say("   connection), one request outstanding; a `replog node` child process, data dir in");
    o.say(&format!("   the bench dir ({samples})\n{LAT_HEADER}"));
    let report = |o: &mut Out, key: &str, label: &str, h: &Histogram<u64>, node: (f64, f64)| {
        o.lat(key, label, h);
        let l = pcts(h);
        let (r50, r99) = (l[0] / floor[0], l[2] / floor[2]);
        o.say(&format!(
            "    / floor: p50 {r50:.2}x (target <= {TARGET}x: {}), p99 {r99:.2}x",
            verdict(r50)
        ));
        o.say(&format!(
            "    node side, means: request decoded -> receipt {:.1}, of which queued -> flushed {:.1};",
            node.0, node.1
        ));
        o.say(&format!(
            "      client mean - node mean = {:.1} (the RTT floor's mean is {:.1})",
            l[5] - node.0,
            r[5]
        ));
        put! { o, key, ratio_p50 = r50, ratio_p99 = r99, target_p50 = TARGET,
        met = u8::from(r50 <= TARGET), node_append_mean_us = node.0,
        node_queued_to_flushed_mean_us = node.1, outside_node_mean_us = l[5] - node.0 }
    };

    // One shard: every request is served by the shard that accepted its connection.
    eprintln!("node_bench: replog node --shards 1: append latency");
    let node1 = NodeProc::start(&dir.join("node-1"), &ca_dir, 1);
    let client1 = rt.block_on(async {
        let c = step("connecting to the node", Client::connect(config(&node1))).await;
        create_log(&c, "bench").await;
        c
    });
    let before = node1.stats();
    let lat1 = rt.block_on(append_latency(&client1, "bench", p.warmup, p.samples));
    let (_, node_mean, flush_mean) = node1.stats().since(&before);
    // The floors drift over time: measure them again right away.
    let disk_again = disk_floor(&dir, p.warmup, p.samples);
    let rtt_again = rt.block_on(rtt_floor(&echo, p.warmup, p.samples));
    report(
        &mut o,
        "append.shards1",
        "--shards 1",
        &lat1,
        (node_mean, flush_mean),
    );

    // Two shards: the connection lands on one of them (SO_REUSEPORT hash); a log owned by the
    // other shard has each request forwarded there with its stream.
    eprintln!("node_bench: replog node --shards 2: append latency");
    let node2 = NodeProc::start(&dir.join("node-2"), &ca_dir, 2);
    let names = names_per_shard();
    let client2 = rt.block_on(async {
        let c = step("connecting to the node", Client::connect(config(&node2))).await;
        for name in &names {
            create_log(&c, name).await;
        }
        c
    });
    for (shard, name) in names.iter().enumerate() {
        let before = node2.stats();
        let h = rt.block_on(append_latency(&client2, name, p.warmup, p.samples));
        let (fwd, node_mean, flush_mean) = node2.stats().since(&before);
        let total = (p.warmup + p.samples) as f64;
        let how = if fwd == 0.0 {
            "local".to_string()
        } else if fwd >= total {
            "forwarded".to_string()
        } else {
            format!("{fwd:.0} of {total:.0} forwarded")
        };
        let key = format!("append.shards2_{how}").replace(' ', "_");
        put! { o, key, owner_shard = shard, forwarded = fwd }
        report(
            &mut o,
            &key,
            &format!("--shards 2, {how}"),
            &h,
            (node_mean, flush_mean),
        );
    }
    o.say("  With --shards 2 the connection is served by the shard the kernel hashed it to; the");
    o.say("  log owned by the other shard gets every request forwarded there, with its stream");
    o.say("  (\"forwarded\" row; the node's replog_forwarded_total counted it).");
    rt.block_on(close_all(vec![client2]));
    let stop2 = node2.stop();

    let (da, ra) = (pcts(&disk_again), pcts(&rtt_again));
    o.say(&format!(
        "  floors re-measured right after the --shards 1 run: fdatasync p50 {:.1} ({:.2}x of item 1),",
        da[0],
        da[0] / d[0]
    ));
    o.say(&format!(
        "  RTT p50 {:.1} ({:.2}x of item 2); --shards 1 p50 / their sum: {:.2}x",
        ra[0],
        ra[0] / r[0],
        pcts(&lat1)[0] / (da[0] + ra[0])
    ));
    put! { o, "floor.again", disk_p50_us = da[0], disk_p99_us = da[2], rtt_p50_us = ra[0],
    rtt_p99_us = ra[2], shards1_ratio_p50 = pcts(&lat1)[0] / (da[0] + ra[0]) }
    drop(echo);

    // Throughput on the one-shard node.
    let secs = p.load.as_secs_f64();
    o.say(
        "\n5. Throughput on the --shards 1 node: C tasks on this thread's runtime, each appending",
    );
    o.say(&format!(
        "   one {REC} B record at a time (acks=leader) for {secs:.0} s; over one shared Client (one"
    ));
    o.say("   connection, one stream per request) or over C Clients (C connections). cpu = share");
    o.say("   of one CPU used by the node process / by this process (the clients); node µs/rec =");
    o.say("   node CPU time per record");
    o.say(concat!(
        "     C  clients         rec/s     MB/s   p50 µs   p99 µs p99.9 µs node cpu",
        " bench cpu node µs/rec"
    ));
    let row = |o: &mut Out, c: usize, label: &str, key: &str, l: &Load| {
        let rec_s = l.records as f64 / l.secs;
        let mb_s = rec_s * REC as f64 / 1e6;
        let lat = pcts(&l.lat);
        let (nc, bc) = (l.node_cpu * 100.0, l.bench_cpu * 100.0);
        let per_rec = l.node_cpu * 1e6 / rec_s;
        o.say(&format!(
            "  {c:>4}  {label:<12} {rec_s:>8.0} {mb_s:>8.1} {:>8.0} {:>8.0} {:>8.0} {nc:>7.0}% {bc:>8.0}% {per_rec:>12.1}",
            lat[0], lat[2], lat[3]
        ));
        put! { o, key, records_s = rec_s, mb_s = mb_s, p50_us = lat[0], p99_us = lat[2],
        p999_us = lat[3], records = l.records, secs = l.secs, node_cpu = l.node_cpu,
        bench_cpu = l.bench_cpu, node_cpu_us_per_record = per_rec }
    };
    for &c in p.concurrency {
        eprintln!("node_bench: throughput, {c} tasks, one shared client");
        let l = rt.block_on(load(
            &node1,
            std::slice::from_ref(&client1),
            c,
            "bench",
            p.load,
        ));
        row(&mut o, c, "1 shared", &format!("load.shared_{c}"), &l);
        eprintln!("node_bench: throughput, {c} tasks, {c} clients");
        let l = rt.block_on(async {
            let mut clients = Vec::with_capacity(c);
            for _ in 0..c {
                clients.push(step("connecting a client", Client::connect(config(&node1))).await);
            }
            let l = load(&node1, &clients, c, "bench", p.load).await;
            close_all(clients).await;
            l
        });
        row(
            &mut o,
            c,
            &format!("{c} separate"),
            &format!("load.separate_{c}"),
            &l,
        );
    }
    eprintln!("node_bench: throughput, one producer");
    let l = rt.block_on(producer_load(&node1, &client1, "bench", p.load));
    o.say(&format!(
        "  one Producer (default options: up to 8 appends in flight), {IN_FLIGHT} records outstanding,"
    ));
    o.say("  receipts awaited in order; latency = send to receipt");
    row(&mut o, 1, "producer", "load.producer", &l);

    rt.block_on(close_all(vec![client1]));
    let stop1 = node1.stop();
    put! { o, "conditions", node_stop_secs_shards1 = stop1.as_secs_f64(),
    node_stop_secs_shards2 = stop2.as_secs_f64() }
    drop(rt);
    drop(tmp);
    finish(&p, o, started);
}

fn finish(p: &Params, mut o: Out, started: Instant) {
    let total = started.elapsed().as_secs_f64();
    o.num("conditions.total_secs", total);
    if p.json {
        println!("{{{}}}", o.json.join(","));
    } else {
        print!("{}", o.text);
        println!("\ntotal {total:.0} s");
    }
}

/// The leader's status, for one log: (end offset, per follower (id, durable, connected)).
async fn follower_progress(client: &Client, log: &str) -> (u64, Vec<(String, u64, bool)>) {
    let s = step("status", client.status()).await;
    let end = s.logs.iter().find(|l| l.name == log).map_or(0, |l| l.end);
    let f = s
        .replication
        .iter()
        .find(|r| r.log == log)
        .map(|r| {
            r.followers
                .iter()
                .map(|f| (f.id.clone(), f.durable, f.connected))
                .collect()
        })
        .unwrap_or_default();
    (end, f)
}

/// Wait until follower `id` holds all of `log` durably (polling the leader every 20 ms).
async fn caught_up(client: &Client, log: &str, id: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let (end, f) = follower_progress(client, log).await;
        if f.iter().any(|(i, d, c)| i == id && *c && *d >= end) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The replication benchmark: a leader and two followers (three `replog node` processes on
/// this machine, one shard each), semi-synchronous (sync set of one).
fn replication(p: &Params, dir: &Path, ca_dir: &Path, o: &mut Out) {
    let samples = format!("{} samples after {} warm-up", p.samples, p.warmup);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    eprintln!("node_bench: floors");
    let disk = disk_floor(dir, p.warmup, p.samples);
    let shared = shared_disk_floor(dir, 3, p.warmup, p.samples);
    let echo = Echo::start().expect("node_bench: the echo server");
    let rtt = rt.block_on(rtt_floor(&echo, p.warmup, p.samples));
    o.say(&format!(
        "\n1. Floors ({samples}): {BLOCK} B write + fdatasync into a pre-written file, QD1, alone and"
    ));
    o.say("   with 3 threads doing it at once on 3 files (the 3 replicas share this disk); quinn");
    o.say(&format!(
        "   round trip on loopback ({REC} B request, {ANSWER} B answer)\n{LAT_HEADER}"
    ));
    o.lat("floor.disk", "fdatasync 4096", &disk);
    o.lat("floor.disk_shared3", "fdatasync, 3 at once", &shared);
    o.lat("floor.rtt", "round trip", &rtt);
    let (d, r) = (pcts(&disk), pcts(&rtt));
    // The floor of an acks=sync append: the leader's fdatasync, a round trip, the follower's
    // fdatasync, taken one after the other (percentiles added).
    let floor = [2.0 * d[0] + r[0], 2.0 * d[2] + r[2], 2.0 * d[3] + r[3]];
    // A tighter one, if the leader flushes while the follower receives and flushes:
    // RTT(client) + max(fdatasync, RTT(leader-follower) + fdatasync).
    let tight = [2.0 * r[0] + d[0], 2.0 * r[2] + d[2], 2.0 * r[3] + d[3]];
    o.say("\n2. Floor for acks=sync = fdatasync + RTT + fdatasync (percentiles added); and the");
    o.say("   tighter RTT + max(fdatasync, RTT + fdatasync) = 2 RTT + fdatasync");
    o.say("                                p50      p99    p99.9");
    o.say(&format!(
        "  {:<24} {:>8.1} {:>8.1} {:>8.1}",
        "fsync + RTT + fsync", floor[0], floor[1], floor[2]
    ));
    o.say(&format!(
        "  {:<24} {:>8.1} {:>8.1} {:>8.1}",
        "2 RTT + fsync", tight[0], tight[1], tight[2]
    ));
    let sh = pcts(&shared);
    let shared_floor = [2.0 * sh[0] + r[0], 2.0 * sh[2] + r[2], 2.0 * sh[3] + r[3]];
    o.say(&format!(
        "  {:<24} {:>8.1} {:>8.1} {:>8.1}",
        "same, fsyncs 3 at once", shared_floor[0], shared_floor[1], shared_floor[2]
    ));
    put! { o, "floor.sync", p50_us = floor[0], p99_us = floor[1], p999_us = floor[2] }
    put! { o, "floor.tight", p50_us = tight[0], p99_us = tight[1], p999_us = tight[2] }
    put! { o, "floor.sync_shared", p50_us = shared_floor[0], p99_us = shared_floor[1],
    p999_us = shared_floor[2] }
    drop(echo);

    eprintln!("node_bench: a standalone node for comparison");
    let alone = NodeProc::start(&dir.join("alone"), ca_dir, 1);
    let base = rt.block_on(async {
        let c = step("connecting to the node", Client::connect(config(&alone))).await;
        create_log(&c, "live").await;
        let h = append_latency_at(&c, "live", p.warmup, p.samples, Acks::Leader).await;
        close_all(vec![c]).await;
        h
    });
    alone.stop();

    eprintln!("node_bench: starting a leader and two followers");
    let lead_cfg = dir.join("lead.toml");
    let rate = p.catchup_rate.map_or(String::new(), |r| {
        format!("[replication]\ncatchup_bytes_per_sec_max = {r}\n")
    });
    std::fs::write(&lead_cfg, rate).unwrap();
    let lead = NodeProc::start_with(
        &dir.join("lead"),
        ca_dir,
        1,
        &[
            "--node-id",
            "lead",
            "--follower",
            "f1,f2",
            "--sync-replicas",
            "1",
            "--config",
            lead_cfg.to_str().unwrap(),
        ],
    );
    let follower = |id: &str| {
        NodeProc::start_with(
            &dir.join(id),
            ca_dir,
            1,
            &["--node-id", id, "--leader", &lead.addr.to_string()],
        )
    };
    let f1 = follower("f1");
    let mut f2 = Some(follower("f2"));
    let client = rt.block_on(async {
        let c = step("connecting to the leader", Client::connect(config(&lead))).await;
        create_log(&c, "live").await;
        for id in ["f1", "f2"] {
            assert!(caught_up(&c, "live", id, STEP).await, "{id} did not join");
        }
        c
    });

    o.say("\n3. Append latency, 3 replicas (leader + 2 followers, one shard each, all on this machine):");
    o.say(&format!(
        "   one {REC} B record per append, one client, one request outstanding ({samples})\n{LAT_HEADER}"
    ));
    o.lat("repl.standalone", "standalone, acks=leader", &base);
    let mut lat_sync = None;
    let mut stages = None;
    for acks in [Acks::Leader, Acks::Sync, Acks::Quorum] {
        eprintln!("node_bench: append latency, acks={}", acks.name());
        let before = lead.stats();
        let h = rt.block_on(append_latency_at(
            &client, "live", p.warmup, p.samples, acks,
        ));
        let after = lead.stats();
        let key = format!("repl.acks_{}", acks.name());
        o.lat(&key, &format!("acks={}", acks.name()), &h);
        if acks == Acks::Sync {
            lat_sync = Some(h);
            let (_, node_mean, flush_mean) = after.since(&before);
            stages = Some((node_mean, flush_mean, after.ack_mean_since(&before)));
        }
    }
    let (node_mean, flush_mean, ack_mean) = stages.expect("acks=sync was measured");
    o.say(&format!(
        "  acks=sync, leader side, means: request decoded -> receipt {node_mean:.1}; queued ->"
    ));
    o.say(&format!(
        "    flushed on the leader {flush_mean:.1}; frame sent -> follower's durable ack {ack_mean:.1}"
    ));
    put! { o, "repl.acks_sync", node_mean_us = node_mean, leader_flush_mean_us = flush_mean,
    follower_ack_mean_us = ack_mean }
    let l = pcts(lat_sync.as_ref().unwrap());
    let (r50, r99, r999) = (l[0] / floor[0], l[2] / floor[1], l[3]);
    let ok = |v: bool| if v { "met" } else { "MISSED" };
    o.say(&format!(
        "  acks=sync / floor: p50 {r50:.2}x (target <= 1.3x: {}), p99 {r99:.2}x (target <= 1.5x: {}),",
        ok(r50 <= 1.3),
        ok(r99 <= 1.5)
    ));
    o.say(&format!(
        "  p99.9 {r999:.0} µs (target < 1500 µs: {}); against the tighter floor: p50 {:.2}x, p99 {:.2}x;",
        ok(r999 < 1500.0),
        l[0] / tight[0],
        l[2] / tight[1]
    ));
    o.say(&format!(
        "  against the floor with shared-disk fdatasyncs: p50 {:.2}x, p99 {:.2}x",
        l[0] / shared_floor[0],
        l[2] / shared_floor[1]
    ));
    let b = pcts(&base);
    o.say(&format!(
        "  standalone acks=leader / (RTT + fdatasync): p50 {:.2}x",
        b[0] / (r[0] + d[0])
    ));
    put! { o, "repl.acks_sync", ratio_p50 = r50, ratio_p99 = r99, ratio_tight_p50 = l[0] / tight[0],
    ratio_tight_p99 = l[2] / tight[1], ratio_shared_p50 = l[0] / shared_floor[0],
    ratio_shared_p99 = l[2] / shared_floor[1] }

    let secs = p.load.as_secs_f64();
    o.say(&format!(
        "\n4. Throughput, acks=sync: C tasks over one shared client, one {REC} B record per append,"
    ));
    o.say(&format!(
        "   {secs:.0} s; and one Producer ({IN_FLIGHT} records outstanding)"
    ));
    o.say("     C  clients         rec/s     MB/s   p50 µs   p99 µs p99.9 µs leader cpu");
    let row = |o: &mut Out, c: usize, label: &str, key: &str, l: &Load| {
        let rec_s = l.records as f64 / l.secs;
        let lat = pcts(&l.lat);
        o.say(&format!(
            "  {c:>4}  {label:<12} {rec_s:>8.0} {:>8.1} {:>8.0} {:>8.0} {:>8.0} {:>9.0}%",
            rec_s * REC as f64 / 1e6,
            lat[0],
            lat[2],
            lat[3],
            l.node_cpu * 100.0
        ));
        put! { o, key, records_s = rec_s, p50_us = lat[0], p99_us = lat[2], p999_us = lat[3],
        leader_cpu = l.node_cpu }
    };
    for &c in p.concurrency {
        eprintln!("node_bench: acks=sync throughput, {c} tasks");
        let l = rt.block_on(load_at(
            &lead,
            std::slice::from_ref(&client),
            c,
            "live",
            p.load,
            Acks::Sync,
        ));
        row(o, c, "1 shared", &format!("repl.load_{c}"), &l);
    }
    eprintln!("node_bench: acks=sync throughput, producer");
    let l = rt.block_on(producer_load_at(&lead, &client, "live", p.load, Acks::Sync));
    row(o, 1, "producer", "repl.load_producer", &l);

    // Catch-up: f2 is away while `catchup_bytes` go into another log, then comes back; the live
    // log's acks=sync latency (f1 in the sync set) is measured while f2 catches up.
    let total = p.catchup_bytes;
    eprintln!("node_bench: catch-up of {} MiB", total >> 20);
    let away = f2.take().unwrap();
    let f2_dir = dir.join("f2");
    away.signal(libc::SIGKILL);
    drop(away);
    let records = total / REC as u64;
    let write_secs = rt.block_on(async {
        create_log(&client, "bulk").await;
        let producer = client.producer(
            "bulk",
            ProducerOptions {
                acks: Acks::Leader,
                ..ProducerOptions::default()
            },
        );
        let t = Instant::now();
        let mut queue = VecDeque::with_capacity(IN_FLIGHT);
        for _ in 0..records {
            if queue.len() == IN_FLIGHT {
                step("a bulk receipt", queue.pop_front().unwrap()).await;
            }
            queue.push_back(producer.send(record()));
        }
        for r in queue {
            step("a bulk receipt", r).await;
        }
        assert!(caught_up(&client, "bulk", "f1", Duration::from_secs(600)).await);
        t.elapsed().as_secs_f64()
    });
    let bulk_bytes = rt.block_on(async {
        let s = step("status", client.status()).await;
        s.logs
            .iter()
            .find(|l| l.name == "bulk")
            .map_or(0, |l| l.disk_bytes)
    });
    let f2 = NodeProc::start_with(
        &f2_dir,
        ca_dir,
        1,
        &["--node-id", "f2", "--leader", &lead.addr.to_string()],
    );
    let t = Instant::now();
    let (live, catch_secs, failed) = rt.block_on(async {
        let mut live = hist();
        let mut failed: Vec<String> = Vec::new();
        let rec = record();
        let deadline = Instant::now() + Duration::from_secs(1200);
        loop {
            let a = Instant::now();
            // A live append may fail here (its sync follower can fall out of the sync set while
            // the disk is busy with the catch-up): those are counted, not fatal.
            let append = client.append("live", vec![rec.clone()], at(Acks::Sync));
            match tokio::time::timeout(STEP, append).await {
                Ok(Ok(_)) => live.saturating_record(ns(a)),
                Ok(Err(e)) => failed.push(e.to_string()),
                Err(_) => failed.push("no answer within the step limit".into()),
            }
            let (end, f) = follower_progress(&client, "bulk").await;
            if f.iter().any(|(i, d, c)| i == "f2" && *c && *d >= end) || Instant::now() > deadline {
                break;
            }
        }
        (live, t.elapsed().as_secs_f64(), failed)
    });
    let payload = records as f64 * REC as f64;
    o.say(&format!(
        "\n5. Catch-up: follower f2 killed, {:.0} MiB ({records} records of {REC} B) appended to another",
        payload / (1 << 20) as f64
    ));
    o.say(&format!(
        "   log (written in {write_secs:.1} s, acks=leader, f1 following live), then f2 restarted;"
    ));
    o.say(&format!(
        "   leader's catchup_bytes_per_sec_max: {}.",
        match p.catchup_rate {
            None => "the default".to_string(),
            Some(0) => "0 (no limit)".to_string(),
            Some(r) => r.to_string(),
        }
    ));
    o.say(&format!(
        "   Caught up in {catch_secs:.1} s: {:.0} MB/s of payload. Meanwhile acks=sync appends to the live",
        payload / catch_secs / 1e6
    ));
    o.say(&format!(
        "   log, one at a time (each followed by a status poll)\n{LAT_HEADER}"
    ));
    o.lat("repl.catchup_live", "live acks=sync", &live);
    if !failed.is_empty() {
        o.say(&format!(
            "  {} live appends failed meanwhile; the first: {}",
            failed.len(),
            failed[0]
        ));
    }
    put! { o, "repl.catchup_live", failed = failed.len() }
    put! { o, "repl.catchup", payload_bytes = payload, log_bytes = bulk_bytes, secs = catch_secs,
    mb_s = payload / catch_secs / 1e6, write_secs = write_secs }
    rt.block_on(close_all(vec![client]));
    for n in [f2, f1, lead] {
        n.stop();
    }
}
