//! The workloads: appends, append-to-visible-on-follower, and a lagging follower's catch-up.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{Acks, AppendOptions, Client, ClientConfig, ErrorCode, ProducerOptions, Trust};
use serde_json::json;

use crate::cluster::{self, Cluster, ClusterSpec};
use crate::hist;
use crate::pace::{self, Mode, Outcome};
use crate::progress::Progress;
use crate::report::Run;

/// Longest a single request of the tool's own set-up (create, status) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster a workload runs against.
pub enum Target {
    /// Nodes this tool started (and stops), with their data in a temporary directory.
    Spawned {
        cluster: Cluster,
        ca: PathBuf,
        dir: tempfile::TempDir,
    },
    /// An existing cluster: client addresses (the leader first) and, optionally, the metrics
    /// endpoints to summarise stages from.
    Existing {
        servers: Vec<String>,
        metrics: Vec<std::net::SocketAddr>,
        trust: Trust,
    },
}

impl Target {
    /// Start `spec` with its data in a new temporary directory under `parent`.
    pub fn spawn(spec: &ClusterSpec, parent: &std::path::Path) -> Result<Target, String> {
        let dir = tempfile::Builder::new()
            .prefix("replog-bench-")
            .tempdir_in(parent)
            .map_err(|e| format!("a temporary directory under {}: {e}", parent.display()))?;
        let cluster = Cluster::spawn(spec, dir.path())?;
        Ok(Target::Spawned {
            cluster,
            ca: dir.path().join("dev-ca").join("ca.pem"),
            dir,
        })
    }

    /// The leader's (or the first server's) client address, then the others.
    pub fn servers(&self) -> Vec<String> {
        match self {
            Target::Spawned { cluster, .. } => {
                cluster.nodes.iter().map(|n| n.addr.to_string()).collect()
            }
            Target::Existing { servers, .. } => servers.clone(),
        }
    }

    /// A client configuration for `servers`, trusting this target's CA.
    pub fn config(&self, servers: Vec<String>) -> ClientConfig {
        let trust = match self {
            Target::Spawned { ca, .. } => Trust::CaFile(ca.clone()),
            Target::Existing { trust, .. } => trust.clone(),
        };
        ClientConfig::new(servers)
            .with_trust(trust)
            .with_connect_timeout(Duration::from_secs(10))
            .with_request_timeout(Duration::from_secs(30))
    }

    /// Scrape every known metrics endpoint: (node name, text). Unreachable ones are skipped.
    pub fn scrape(&self) -> Vec<(String, String)> {
        let endpoints: Vec<(String, std::net::SocketAddr)> = match self {
            Target::Spawned { cluster, .. } => cluster
                .nodes
                .iter()
                .map(|n| (n.id.clone(), n.metrics))
                .collect(),
            Target::Existing { metrics, .. } => {
                metrics.iter().map(|a| (a.to_string(), *a)).collect()
            }
        };
        endpoints
            .into_iter()
            .filter_map(|(name, addr)| cluster::scrape(addr).ok().map(|t| (name, t)))
            .collect()
    }

    /// Stop a spawned cluster (nothing for an existing one).
    pub fn finish(self) -> Result<(), String> {
        match self {
            Target::Spawned { cluster, dir, .. } => {
                let r = cluster.stop();
                drop(dir);
                r
            }
            Target::Existing { .. } => Ok(()),
        }
    }

    /// The sum over the nodes of the counter `name` in their metrics, if every node exports
    /// it (as `replog_allocations_total` is only by a build with `count-allocations`).
    pub fn counter_sum(&self, name: &str) -> Option<f64> {
        let scraped = self.scrape();
        if scraped.is_empty() {
            return None;
        }
        scraped
            .iter()
            .map(|(_, text)| {
                text.lines().find_map(|l| {
                    l.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
            })
            .sum()
    }

    /// The process ids of the nodes this tool started (none for an existing cluster).
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Target::Spawned { cluster, .. } => cluster.nodes.iter().map(|n| n.pid()).collect(),
            Target::Existing { .. } => Vec::new(),
        }
    }

    /// A short label for run names: `n3` for three spawned nodes, `ext` otherwise.
    pub fn label(&self) -> String {
        match self {
            Target::Spawned { cluster, .. } => format!("n{}", cluster.nodes.len()),
            Target::Existing { .. } => "ext".into(),
        }
    }
}

/// How one failed operation is counted: by error code, or by its kind.
pub fn error_kind(e: &client::Error) -> String {
    if let Some(code) = e.code() {
        return code.name().to_string();
    }
    if e.is_unknown_outcome() {
        return "unknown outcome".into();
    }
    let mut s = e.to_string();
    s.truncate(80);
    s
}

/// Create `log`; an existing one is fine.
pub async fn create_log(client: &Client, log: &str) -> Result<(), String> {
    match tokio::time::timeout(SETUP_TIMEOUT, client.create_log(log)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.code() == Some(ErrorCode::LogExists) => Ok(()),
        Ok(Err(e)) => Err(format!("create {log}: {e}")),
        Err(_) => Err(format!("create {log}: no answer in {SETUP_TIMEOUT:?}")),
    }
}

/// What `append` measures.
#[derive(Clone, Debug)]
pub struct AppendPlan {
    pub log: String,
    /// Logs the appends are spread over, round robin: `log` alone when 1, else `log-0`,
    /// `log-1`, ... (spread over a node's shards by their names).
    pub logs: usize,
    pub record_bytes: usize,
    pub acks: Acks,
    /// Operations per second (open loop), or 0 for a closed loop of `concurrency` workers.
    pub rate: f64,
    pub concurrency: usize,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub in_flight_max: usize,
}

impl AppendPlan {
    fn mode(&self) -> Mode {
        if self.rate > 0.0 {
            Mode::Open {
                rate: self.rate,
                in_flight_max: self.in_flight_max,
            }
        } else {
            Mode::Closed {
                concurrency: self.concurrency,
            }
        }
    }

    fn params(&self) -> serde_json::Value {
        json!({
            "log": self.log, "logs": self.logs, "record_bytes": self.record_bytes, "acks": self.acks.name(),
            "rate": self.rate, "concurrency": if self.rate > 0.0 { None } else { Some(self.concurrency) },
            "connections": self.connections, "warmup_s": self.warmup.as_secs_f64(),
            "duration_s": self.duration.as_secs_f64(),
        })
    }

    /// `1k`, `16k`, `100b`.
    fn size_label(&self) -> String {
        if self.record_bytes >= 1024 && self.record_bytes % 1024 == 0 {
            format!("{}k", self.record_bytes / 1024)
        } else {
            format!("{}b", self.record_bytes)
        }
    }

    fn load_label(&self) -> String {
        let load = if self.rate > 0.0 {
            format!("r{}", self.rate)
        } else {
            format!("c{}", self.concurrency)
        };
        match self.logs {
            0 | 1 => load,
            n => format!("{load}-l{n}"),
        }
    }

    /// The names of the logs appended to.
    pub fn log_names(&self) -> Vec<String> {
        match self.logs {
            0 | 1 => vec![self.log.clone()],
            n => (0..n).map(|i| format!("{}-{i}", self.log)).collect(),
        }
    }
}

/// The record appended: `bytes` bytes, the first 8 free for an index.
fn payload(bytes: usize) -> Vec<u8> {
    vec![0x42u8; bytes.max(8)]
}

fn run_of(
    name: String,
    measures: String,
    params: serde_json::Value,
    out: &Outcome,
    bytes: usize,
) -> Run {
    let mut run = Run::new(name, measures, params, out.latency.clone());
    run.throughput_ops_s = out.throughput();
    run.throughput_mb_s = out.throughput() * bytes as f64 / 1e6;
    run.errors = out.errors.clone();
    run.late = out.late;
    run
}

async fn clients(target: &Target, servers: Vec<String>, n: usize) -> Result<Vec<Client>, String> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let c = tokio::time::timeout(
            SETUP_TIMEOUT,
            Client::connect(target.config(servers.clone())),
        )
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        out.push(c);
    }
    Ok(out)
}

async fn close(clients: Vec<Client>) {
    for c in clients {
        c.close().await;
    }
}

/// Append `value` as one record; a failure becomes its kind.
async fn append_one(client: Client, log: String, value: Bytes, acks: Acks) -> Result<(), String> {
    let options = AppendOptions {
        acks,
        ..AppendOptions::default()
    };
    client
        .append(&log, vec![value], options)
        .await
        .map(|_| ())
        .map_err(|e| error_kind(&e))
}

/// Append one record per operation to `plan.log` and measure each receipt.
pub async fn append(target: &Target, plan: &AppendPlan, quiet: bool) -> Result<Run, String> {
    let name = format!(
        "append-{}-{}-{}-{}",
        target.label(),
        plan.acks.name(),
        plan.size_label(),
        plan.load_label()
    );
    append_as(target, plan, name, None, quiet).await
}

/// [`append`] under the run name `name`, ending early once `stop` is set.
async fn append_as(
    target: &Target,
    plan: &AppendPlan,
    name: String,
    stop: Option<Arc<AtomicBool>>,
    quiet: bool,
) -> Result<Run, String> {
    let clients = clients(target, target.servers(), plan.connections).await?;
    let logs = Arc::new(plan.log_names());
    for log in logs.iter() {
        create_log(&clients[0], log).await?;
    }
    let progress = Progress::start(&name, plan.warmup + plan.duration, !quiet);
    let before = target.scrape();
    let record = Bytes::from(payload(plan.record_bytes));
    let acks = plan.acks;
    let shared = Arc::new(clients);
    let cs = shared.clone();
    let names = logs.clone();
    let out = pace::run(
        plan.mode(),
        plan.warmup,
        plan.duration,
        move |i, _| {
            let client = cs[i as usize % cs.len()].clone();
            let log = names[i as usize % names.len()].clone();
            append_one(client, log, record.clone(), acks)
        },
        stop,
        &progress,
    )
    .await;
    progress.finish();
    let after = target.scrape();
    let mut run = run_of(
        name,
        format!(
            "append of one {}-byte record at acks={} to {}: from its intended send time to its receipt",
            plan.record_bytes,
            plan.acks.name(),
            logs.join(", ")
        ),
        plan.params(),
        &out,
        plan.record_bytes,
    );
    run.stages = cluster::stage_summaries(&before, &after);
    if let Ok(clients) = Arc::try_unwrap(shared) {
        close(clients).await;
    }
    Ok(run)
}

/// What `e2e` measures.
#[derive(Clone, Debug)]
pub struct E2ePlan {
    pub append: AppendPlan,
    /// The replica read from (a follower).
    pub read_server: String,
}

/// Append at a fixed rate to the leader while tailing the log on a follower; each record's
/// latency runs from its intended send time to the moment the tail on the follower returns it.
/// Returns the visibility run and the append run.
pub async fn e2e(target: &Target, plan: &E2ePlan, quiet: bool) -> Result<(Run, Run), String> {
    let a = &plan.append;
    if a.rate <= 0.0 {
        return Err("e2e needs an open-loop --rate".into());
    }
    let writers = clients(target, target.servers(), a.connections).await?;
    create_log(&writers[0], &a.log).await?;
    let reader = clients(target, vec![plan.read_server.clone()], 1)
        .await?
        .remove(0);
    let start_offset = writers[0]
        .list_logs()
        .await
        .map_err(|e| format!("list: {e}"))?
        .into_iter()
        .find(|l| l.name == a.log)
        .map_or(0, |l| l.end);
    let name = format!(
        "e2e-{}-{}-{}-{}",
        target.label(),
        a.acks.name(),
        a.size_label(),
        a.load_label()
    );
    let progress = Progress::start(&name, a.warmup + a.duration, !quiet);
    let before = target.scrape();

    // Intended send times by record index, as ns since `base`; u64::MAX while unsent.
    let base = Instant::now();
    let total = pace::count_in(a.warmup, a.rate) + pace::count_in(a.duration, a.rate);
    let warm = pace::count_in(a.warmup, a.rate);
    let due: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(u64::MAX)).collect());
    let visible = Arc::new(Mutex::new(hist::new()));
    let writing_done = Arc::new(AtomicBool::new(false));

    let tail = {
        let (due, visible, done) = (due.clone(), visible.clone(), writing_done.clone());
        let log = a.log.clone();
        let reader = reader.clone();
        tokio::spawn(async move {
            let mut tail = reader
                .tail(&log, start_offset)
                .await
                .map_err(|e| format!("tail: {e}"))?;
            let mut seen = 0u64;
            let mut last_progress = Instant::now();
            while seen < total {
                let next = tokio::time::timeout(Duration::from_millis(500), tail.next()).await;
                let now = Instant::now();
                match next {
                    Ok(Ok(Some(r))) => {
                        last_progress = now;
                        let Some(i) = r
                            .value
                            .get(..8)
                            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                        else {
                            continue;
                        };
                        let Some(d) = due.get(i as usize).map(|d| d.load(Relaxed)) else {
                            continue;
                        };
                        seen += 1;
                        if i >= warm && d != u64::MAX {
                            let at = base + Duration::from_nanos(d);
                            hist::record(
                                &mut visible.lock().unwrap(),
                                now.duration_since(at).as_nanos() as u64,
                            );
                        }
                    }
                    Ok(Ok(None)) => return Err("the tail ended".to_string()),
                    Ok(Err(e)) => return Err(format!("tail: {e}")),
                    Err(_) => {}
                }
                // Failed appends never become visible: stop once writing is over and the tail
                // has been quiet for a while.
                if done.load(Relaxed) && now.duration_since(last_progress) > Duration::from_secs(5)
                {
                    break;
                }
            }
            Ok::<u64, String>(seen)
        })
    };

    let record = payload(a.record_bytes);
    let (log, acks) = (a.log.clone(), a.acks);
    let shared = Arc::new(writers);
    let ws = shared.clone();
    let due_w = due.clone();
    let out = pace::run(
        a.mode(),
        a.warmup,
        a.duration,
        move |i, intended| {
            let client = ws[i as usize % ws.len()].clone();
            let log = log.clone();
            let mut value = record.clone();
            value[..8].copy_from_slice(&i.to_le_bytes());
            if let Some(d) = due_w.get(i as usize) {
                d.store(
                    intended.saturating_duration_since(base).as_nanos() as u64,
                    Relaxed,
                );
            }
            append_one(client, log, Bytes::from(value), acks)
        },
        None,
        &progress,
    )
    .await;
    writing_done.store(true, Relaxed);
    let seen = tail.await.map_err(|e| format!("the tail task: {e}"))??;
    progress.finish();
    let after = target.scrape();
    let visible = Arc::try_unwrap(visible)
        .expect("the tail is done")
        .into_inner()
        .unwrap();
    let mut vis_out = Outcome {
        latency: visible.clone(),
        service: visible,
        issued: out.issued,
        errors: Default::default(),
        late: out.late,
        elapsed: out.elapsed,
    };
    if seen < total {
        vis_out
            .errors
            .insert("never seen on the follower".into(), total - seen);
    }
    let mut vis = run_of(
        name.clone(),
        format!(
            "a {}-byte record from its intended send time (acks={}) to its arrival through a tail on {}",
            a.record_bytes,
            a.acks.name(),
            plan.read_server
        ),
        a.params(),
        &vis_out,
        a.record_bytes,
    );
    vis.stages = cluster::stage_summaries(&before, &after);
    let appended = run_of(
        format!("{name}-append"),
        "the same appends: intended send time to receipt".into(),
        a.params(),
        &out,
        a.record_bytes,
    );
    reader.close().await;
    if let Ok(w) = Arc::try_unwrap(shared) {
        close(w).await;
    }
    Ok((vis, appended))
}

/// What `catchup` measures.
#[derive(Clone, Debug)]
pub struct CatchupPlan {
    pub log: String,
    /// How far behind the follower is when it comes back.
    pub behind_bytes: u64,
    /// Record size of the backlog.
    pub fill_record_bytes: usize,
    /// The live load (1 KiB records at acks=sync) before and during the catch-up.
    pub live_rate: f64,
    pub live_before: Duration,
    /// Longest the catch-up may take.
    pub timeout: Duration,
}

/// The leader's view of follower `id` on `log`: (durable offset, lag in bytes).
async fn follower_state(
    client: &Client,
    log: &str,
    id: &str,
) -> Result<Option<(u64, u64)>, String> {
    let status = tokio::time::timeout(SETUP_TIMEOUT, client.status())
        .await
        .map_err(|_| "status timed out".to_string())?
        .map_err(|e| format!("status: {e}"))?;
    Ok(status
        .replication
        .iter()
        .find(|r| r.log == log)
        .and_then(|r| r.followers.iter().find(|f| f.id == id))
        .map(|f| (f.durable, f.lag_bytes)))
}

async fn log_end(client: &Client, log: &str) -> Result<u64, String> {
    Ok(client
        .list_logs()
        .await
        .map_err(|e| format!("list: {e}"))?
        .into_iter()
        .find(|l| l.name == log)
        .map_or(0, |l| l.end))
}

/// Wait until follower `id` holds `log` durably up to `offset`.
async fn wait_durable(
    client: &Client,
    log: &str,
    id: &str,
    offset: u64,
    limit: Duration,
    progress: Option<&Progress>,
) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        if let Some((durable, lag)) = follower_state(client, log, id).await? {
            if durable >= offset {
                return Ok(t.elapsed());
            }
            if let Some(p) = progress {
                p.note(format!(
                    "{id} at {durable} of {offset}, {:.1} MB behind",
                    lag as f64 / 1e6
                ));
            }
        }
        if t.elapsed() > limit {
            return Err(format!(
                "{id} did not reach offset {offset} of {log} within {limit:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn live_plan(plan: &CatchupPlan, duration: Duration) -> AppendPlan {
    AppendPlan {
        logs: 1,
        log: format!("{}-live", plan.log),
        record_bytes: 1024,
        acks: Acks::Sync,
        rate: plan.live_rate,
        concurrency: 1,
        connections: 1,
        warmup: Duration::ZERO,
        duration,
        in_flight_max: pace::IN_FLIGHT_MAX,
    }
}

/// On a spawned cluster of three (`node-3` is the lagging follower): stop node-3, append
/// `behind_bytes` to the leader, measure the live load (`acks=sync`, served by node-2), restart
/// node-3 and measure how fast it catches up and the live load's latency meanwhile.
pub async fn catchup(
    target: &mut Target,
    plan: &CatchupPlan,
    quiet: bool,
) -> Result<(Run, Run, serde_json::Value), String> {
    let Target::Spawned { cluster, .. } = target else {
        return Err("catchup needs a cluster it starts itself (--spawn 3)".into());
    };
    if cluster.nodes.len() < 3 {
        return Err(
            "catchup needs --spawn 3: a lagging follower and one that serves the live load".into(),
        );
    }
    let leader_addr = cluster.leader().addr.to_string();
    let c = clients(target, vec![leader_addr], 1).await?.remove(0);
    create_log(&c, &plan.log).await?;
    let live_log = live_plan(plan, Duration::ZERO).log;
    create_log(&c, &live_log).await?;
    // Both followers hold the (empty) log before node-3 stops.
    c.append(
        &plan.log,
        vec![Bytes::from_static(b"start")],
        AppendOptions {
            acks: Acks::Sync,
            ..AppendOptions::default()
        },
    )
    .await
    .map_err(|e| format!("first append: {e}"))?;
    for id in ["node-2", "node-3"] {
        wait_durable(&c, &plan.log, id, 1, SETUP_TIMEOUT, None).await?;
    }
    let Target::Spawned { cluster, .. } = target else {
        unreachable!()
    };
    cluster.nodes[2].stop()?;
    // The live log's sync set must be node-2 before the live load is measured: one acks=sync
    // append through, retried while the leader replaces node-3.
    let warm = Instant::now();
    while let Err(e) = c
        .append(
            &live_log,
            vec![Bytes::from_static(b"warm")],
            AppendOptions {
                acks: Acks::Sync,
                ..AppendOptions::default()
            },
        )
        .await
    {
        if warm.elapsed() > SETUP_TIMEOUT {
            return Err(format!(
                "the live log never reached acks=sync without node-3: {e}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The backlog, through a pipelined producer.
    let fill = Progress::start("catchup: writing the backlog", Duration::ZERO, !quiet);
    let producer = c.producer(
        &plan.log,
        ProducerOptions {
            acks: Acks::Leader,
            ..ProducerOptions::default()
        },
    );
    let record = Bytes::from(payload(plan.fill_record_bytes));
    let mut pending = std::collections::VecDeque::new();
    let mut written = 0u64;
    while written < plan.behind_bytes {
        pending.push_back(producer.send(record.clone()));
        written += record.len() as u64;
        if pending.len() >= 64 {
            pending
                .pop_front()
                .expect("non-empty")
                .await
                .map_err(|e| format!("backlog append: {e}"))?;
            fill.note(format!("{} MB", written / 1_000_000));
        }
    }
    for p in pending {
        p.await.map_err(|e| format!("backlog append: {e}"))?;
    }
    fill.finish();
    let target_offset = log_end(&c, &plan.log).await?;
    // node-2 follows the backlog too: the live load alone is measured once it has it all.
    wait_durable(&c, &plan.log, "node-2", target_offset, plan.timeout, None).await?;

    // The live load alone.
    let live_name = |when: &str| format!("catchup-live-{when}");
    let before = append_as(
        target,
        &live_plan(plan, plan.live_before),
        live_name("before"),
        None,
        quiet,
    )
    .await?;

    // Node-3 comes back; the live load runs until it has caught up.
    let Target::Spawned { cluster, .. } = target else {
        unreachable!()
    };
    cluster.nodes[2].restart()?;
    let stop = Arc::new(AtomicBool::new(false));
    let live_during = {
        let plan = live_plan(plan, plan.timeout);
        let stop = stop.clone();
        let target = &*target;
        async move { append_as(target, &plan, live_name("during"), Some(stop), true).await }
    };
    let progress = Progress::start("catchup: node-3 catching up", plan.timeout, !quiet);
    let watch = async {
        let r = wait_durable(
            &c,
            &plan.log,
            "node-3",
            target_offset,
            plan.timeout,
            Some(&progress),
        )
        .await;
        stop.store(true, Relaxed);
        r
    };
    let (during, took) = tokio::join!(live_during, watch);
    progress.finish();
    let (mut during, took) = (during?, took?);
    let secs = took.as_secs_f64();
    let mb_s = plan.behind_bytes as f64 / secs / 1e6;
    let extra = json!({
        "behind_bytes": plan.behind_bytes,
        "fill_record_bytes": plan.fill_record_bytes,
        "catchup_seconds": secs,
        "catchup_mb_s": mb_s,
        "live_p99_ratio": during.latency.p99_us / before.latency.p99_us.max(1e-9),
    });
    during.extra = extra.clone();
    c.close().await;
    Ok((before, during, extra))
}

/// What `failover` measures.
#[derive(Clone, Debug)]
pub struct FailoverPlan {
    pub log: String,
    /// Leader kills (SIGKILL), each followed by a restart of the killed node.
    pub cycles: usize,
    /// Planned switchovers.
    pub switchovers: usize,
    /// Longest any one step may take.
    pub timeout: Duration,
}

/// The controller's leader of `log`, as `client`'s node has applied it.
async fn recorded_leader(client: &Client, log: &str) -> Option<(String, u64)> {
    let s = tokio::time::timeout(SETUP_TIMEOUT, client.status())
        .await
        .ok()?
        .ok()?;
    let l = s.controller?.logs.into_iter().find(|l| l.log == log)?;
    (!l.leader.is_empty()).then_some((l.leader, l.epoch))
}

/// Append one record at acks=sync until one succeeds (in a new epoch, if `after` is given);
/// how long that took.
async fn first_ack(
    client: &Client,
    log: &str,
    after: Option<u64>,
    limit: Duration,
) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        let options = AppendOptions {
            acks: Acks::Sync,
            ..AppendOptions::default()
        };
        if let Ok(r) = client
            .append(log, vec![Bytes::from_static(b"probe")], options)
            .await
        {
            if after.is_none_or(|e| r.epoch > e) {
                return Ok(t.elapsed());
            }
        }
        if t.elapsed() > limit {
            return Err(format!("no acknowledged append on {log} within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// On a spawned cluster with the controller: kill the leader of a log `cycles` times (restarting
/// it each time, once it is back and caught up), measuring from the kill to the first append
/// acknowledged at sync by the new leader; then `switchovers` planned transfers, measuring from
/// the request to the first acknowledged append in the new epoch (the write pause).
pub async fn failover(
    target: &mut Target,
    plan: &FailoverPlan,
    quiet: bool,
) -> Result<(Run, Run), String> {
    let Target::Spawned { cluster, .. } = &*target else {
        return Err("failover needs a cluster it starts itself (--spawn 3 --controller MS)".into());
    };
    let ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    let config = target
        .config(target.servers())
        .with_connect_timeout(Duration::from_secs(1))
        .with_request_timeout(Duration::from_secs(5));
    let c = Client::connect(config)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    create_log(&c, &plan.log).await?;
    first_ack(&c, &plan.log, None, plan.timeout).await?;
    let progress = Progress::start("failover", Duration::ZERO, !quiet);
    let mut kills = hist::new();
    for i in 0..plan.cycles {
        let (leader, epoch) = recorded_leader(&c, &plan.log)
            .await
            .ok_or("no recorded leader")?;
        let idx = ids
            .iter()
            .position(|id| *id == leader)
            .ok_or("unknown leader")?;
        let Target::Spawned { cluster, .. } = &mut *target else {
            unreachable!()
        };
        cluster.nodes[idx].kill();
        let t = Instant::now();
        first_ack(&c, &plan.log, Some(epoch), plan.timeout).await?;
        hist::record(&mut kills, t.elapsed().as_nanos() as u64);
        cluster.nodes[idx].restart()?;
        let addr = cluster.nodes[idx].addr.to_string();
        // Back, and caught up with the log's end, before the next cycle.
        let back = Client::connect(target.config(vec![addr]))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let t = Instant::now();
        loop {
            let end = log_end(&c, &plan.log).await.unwrap_or(0);
            if log_end(&back, &plan.log).await.unwrap_or(0) >= end && end > 0 {
                break;
            }
            if t.elapsed() > plan.timeout {
                return Err(format!("{leader} did not catch up after its restart"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        back.close().await;
        progress.note(format!("{} of {} kills", i + 1, plan.cycles));
    }
    let mut pauses = hist::new();
    for i in 0..plan.switchovers {
        let (_, epoch) = recorded_leader(&c, &plan.log)
            .await
            .ok_or("no recorded leader")?;
        let t = Instant::now();
        c.transfer_leadership(&plan.log, None)
            .await
            .map_err(|e| format!("transfer: {e}"))?;
        first_ack(&c, &plan.log, Some(epoch), plan.timeout).await?;
        hist::record(&mut pauses, t.elapsed().as_nanos() as u64);
        progress.note(format!("{} of {} switchovers", i + 1, plan.switchovers));
    }
    progress.finish();
    c.close().await;
    let params = json!({"log": plan.log, "cycles": plan.cycles, "switchovers": plan.switchovers});
    let run = |name: &str, measures: &str, h: hist::Hist| {
        Run::new(name.into(), measures.into(), params.clone(), h)
    };
    Ok((
        run(
            "failover-kill",
            "SIGKILL of the log's leader to the first append acknowledged at sync by its successor",
            kills,
        ),
        run(
            "switchover",
            "planned transfer requested to the first append acknowledged at sync in the new epoch",
            pauses,
        ),
    ))
}
