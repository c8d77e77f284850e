//! `replog-bench`: the machine's floor, append latency, append-to-visible-on-follower latency
//! and catch-up speed, each as HdrHistograms compared with the floor measured in the same run.
//!
//! Output: a table on stdout (or one JSON object with `--json`), progress on stderr, and with
//! `--out DIR` the files `report.json`, `report.txt`, `<run>.hgrm` and `latency.svg`.
//! Exit status: 0 ok, 1 the run failed, 2 usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bench::cluster::{find_replog, ClusterSpec};
use bench::floor::{self, Floor, FloorPlan};
use bench::report::{Machine, Report, Run};
use bench::workload::{self, AppendPlan, CatchupPlan, E2ePlan, FailoverPlan, Target};
use bench::{hist, pace, report};
use clap::{Args, Parser, Subcommand};
use client::{Acks, Trust};

#[derive(Parser)]
#[command(
    name = "replog-bench",
    version,
    about = "Latency benchmarks of replog and of the machine's floor"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure the machine's floor: io_uring write+fdatasync (4 KiB, 64 KiB), sequential
    /// fdatasync'd write bandwidth, QUIC round trip (1 KiB) and bulk throughput on loopback.
    Floor(FloorArgs),
    /// The ways to make one small write durable with io_uring (write + fdatasync, linked,
    /// RWF_DSYNC, O_DSYNC, O_DIRECT|O_DSYNC), with and without io-wq, side by side, then
    /// through the tokio-uring and glommio runtimes.
    Durable(DurableArgs),
    /// Append latency and throughput, open loop at a rate or closed loop.
    Append(AppendArgs),
    /// Append-to-visible-on-follower latency: records appended at a rate, read through a tail
    /// on a follower.
    E2e(E2eArgs),
    /// How fast a follower that is behind catches up, and the live load's latency meanwhile.
    Catchup(CatchupArgs),
    /// Leader failover on a cluster with the embedded controller: time from a leader's SIGKILL
    /// to the first append its successor acknowledges, and the write pause of planned
    /// switchovers.
    Failover(FailoverArgs),
    /// replog beside PostgreSQL (synchronous standby) and NATS JetStream (R3), in one run with
    /// the same record size, concurrency and duration, against the floor (bench/peers/).
    Peers(PeersArgs),
    /// Plot `.hgrm` files (from earlier runs or other tools) into one SVG to compare them.
    Plot(PlotArgs),
}

#[derive(Args)]
struct FailoverArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Leader kills.
    #[arg(long, default_value_t = 20)]
    cycles: usize,
    /// Planned switchovers.
    #[arg(long, default_value_t = 20)]
    switchovers: usize,
    /// Longest any one step may take.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    output: Output,
}

#[derive(Args, Clone)]
struct Output {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write report.json, report.txt, one .hgrm per run and latency.svg here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct FloorArgs {
    /// Directory on the disk to measure (the nodes' data disk).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Samples per latency figure.
    #[arg(long, default_value_t = 3000)]
    samples: usize,
    /// MiB written and sent for the bandwidth figures.
    #[arg(long, default_value_t = 512)]
    bulk_mib: u64,
    #[command(flatten)]
    output: Output,
}

#[derive(Args, Clone)]
struct ClusterArgs {
    /// An existing cluster: client address of its leader (repeat for more nodes).
    #[arg(long, conflicts_with = "spawn")]
    server: Vec<String>,
    /// CA file of an existing cluster's node certificates (default: the development CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Metrics endpoints (host:port) of an existing cluster's nodes, for the stage summary.
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<std::net::SocketAddr>,
    /// Start N local nodes (1: standalone; more: node-1 leads, the others follow), stopped
    /// at the end.
    #[arg(long)]
    spawn: Option<usize>,
    /// Followers in the sync set of a spawned cluster.
    #[arg(long, default_value_t = 1)]
    sync_replicas: usize,
    /// Where spawned nodes keep their data and where the floor is measured (a temporary
    /// directory is made inside).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// The replog binary for spawned nodes (default: beside this program, else built, else
    /// on PATH).
    #[arg(long)]
    replog: Option<PathBuf>,
    /// Skip measuring the floor beside the run (no ratios then).
    #[arg(long)]
    no_floor: bool,
    /// Spawned clusters run the embedded controller with this leader_timeout (ms).
    #[arg(long)]
    controller: Option<u64>,
    /// Shard threads of each spawned node (`node.shards`; default: the node's own default).
    #[arg(long)]
    shards: Option<usize>,
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Log to append to (created if missing; default: a new name per run).
    #[arg(long)]
    log: Option<String>,
    /// Spread the appends over this many logs (`LOG-0`, `LOG-1`, ...), round robin: a node
    /// spreads logs over its shards by name.
    #[arg(long, default_value_t = 1)]
    logs: usize,
    /// Record sizes in bytes, comma-separated: one run per size.
    #[arg(long, value_delimiter = ',', default_value = "1024")]
    record_bytes: Vec<usize>,
    /// Durability levels, comma-separated (none, leader, sync, quorum): one run per level.
    #[arg(long, value_delimiter = ',', default_value = "leader")]
    acks: Vec<String>,
    /// Open-loop target rates in operations per second, comma-separated; 0 runs a closed loop
    /// of --concurrency workers (saturation). One run per rate.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    rate: Vec<f64>,
    /// Workers of a closed loop.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// QUIC connections the operations are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Unmeasured time at the start of each run (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Measured time of each run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Open loop: most operations outstanding at once.
    #[arg(long, default_value_t = pace::IN_FLIGHT_MAX)]
    in_flight_max: usize,
}

#[derive(Args)]
struct AppendArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct E2eArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// The follower to read from (default with --spawn: node-2).
    #[arg(long)]
    read_server: Option<String>,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct CatchupArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// MiB the follower is behind when it comes back.
    #[arg(long, default_value_t = 1024)]
    behind_mib: u64,
    /// Record size of the backlog.
    #[arg(long, default_value_t = 65536)]
    fill_record_bytes: usize,
    /// The live load's rate (1 KiB records at acks=sync to another log).
    #[arg(long, default_value_t = 200.0)]
    live_rate: f64,
    /// How long the live load is measured alone first.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    live_before: Duration,
    /// The leader's `replication.catchup_bytes_per_sec_max` (0: unlimited; default: the
    /// node's default).
    #[arg(long)]
    catchup_rate: Option<u64>,
    /// The leader's `replication.catchup_live_latency_factor` (0: no pacing by the live
    /// tail; default: the node's default).
    #[arg(long)]
    catchup_live_factor: Option<f64>,
    /// Longest the catch-up may take.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct DurableArgs {
    /// Directory on the disk to measure (the nodes' data disk).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Bytes per write (a multiple of 4096, as O_DIRECT needs).
    #[arg(long, default_value_t = 4096)]
    block: usize,
    /// Measured writes per mode.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Unmeasured writes before them.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// One JSON object per mode (JSON Lines) instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PeersArgs {
    /// Operations in flight (clients, workers), comma-separated: one run per system each.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Bytes of each record (a replog record, a PostgreSQL row, a NATS message).
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Unmeasured time before each run.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Measured time of each run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// The systems to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "replog,postgres,nats")]
    systems: Vec<String>,
    /// Where every system keeps its data and where the floor is measured (temporary
    /// directories are made inside).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// The replog binary (default: beside this program, else built, else on PATH).
    #[arg(long)]
    replog: Option<PathBuf>,
    /// PostgreSQL's server programs (default: the newest /usr/lib/postgresql/*/bin).
    #[arg(long)]
    pg_bin: Option<PathBuf>,
    /// The nats-server program (default: on PATH).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// One JSON object per row (JSON Lines) instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct PlotArgs {
    /// .hgrm files; each becomes a curve named after its file.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The SVG file to write.
    #[arg(long, short)]
    out: PathBuf,
    /// The plot's title.
    #[arg(long, default_value = "comparison")]
    title: String,
}

/// `10s`, `500ms`, `2m`, or a plain number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_acks(s: &str) -> Result<Acks, String> {
    match s {
        "none" => Ok(Acks::None),
        "leader" => Ok(Acks::Leader),
        "sync" => Ok(Acks::Sync),
        "quorum" => Ok(Acks::Quorum),
        _ => Err(format!("acks {s:?}: none, leader, sync or quorum")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let result = match cli.command {
        Cmd::Floor(a) => floor_cmd(a, command),
        Cmd::Append(a) => append_cmd(a, command),
        Cmd::E2e(a) => e2e_cmd(a, command),
        Cmd::Catchup(a) => catchup_cmd(a, command),
        Cmd::Failover(a) => failover_cmd(a, command),
        Cmd::Peers(a) => peers_cmd(a),
        Cmd::Durable(a) => durable_cmd(a),
        Cmd::Plot(a) => plot_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replog-bench: {e}");
            ExitCode::from(if e.starts_with("usage:") { 2 } else { 1 })
        }
    }
}

fn emit(report: &Report, output: &Output) -> Result<(), String> {
    if output.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    if let Some(dir) = &output.out {
        let files = report.save(dir)?;
        eprintln!("replog-bench: wrote {}", files.join(", "));
    }
    Ok(())
}

fn measure_floor(dir: &Path, plan: FloorPlan, quiet: bool) -> Result<Floor, String> {
    if !quiet {
        eprintln!("replog-bench: measuring the floor in {}", dir.display());
    }
    let tmp = tempfile::Builder::new()
        .prefix("replog-bench-floor-")
        .tempdir_in(dir)
        .map_err(|e| format!("a temporary directory under {}: {e}", dir.display()))?;
    floor::measure(tmp.path(), plan)
}

fn floor_cmd(a: FloorArgs, command: String) -> Result<(), String> {
    let plan = FloorPlan {
        samples: a.samples.max(1),
        warmup: (a.samples / 10).max(1),
        bulk_bytes: a.bulk_mib.max(1) << 20,
    };
    let floor = measure_floor(&a.dir, plan, a.output.quiet)?;
    let report = Report {
        command,
        machine: Machine::here(),
        floor: Some(floor),
        runs: Vec::new(),
        notes: Vec::new(),
    };
    emit(&report, &a.output)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// The target cluster and the floor (unless skipped), measured before the nodes start.
fn setup(
    c: &ClusterArgs,
    config_toml: String,
    quiet: bool,
) -> Result<(Target, Option<Floor>), String> {
    let spawn = match (c.spawn, c.server.is_empty()) {
        (Some(0), _) => return Err("usage: --spawn needs at least 1 node".into()),
        (Some(n), true) => Some(n),
        (None, false) => None,
        _ => return Err("usage: give --server ADDR or --spawn N".into()),
    };
    let floor = if c.no_floor {
        None
    } else {
        Some(measure_floor(&c.dir, FloorPlan::quick(), quiet)?)
    };
    let config_toml = match c.shards {
        Some(0) => return Err("usage: --shards needs at least 1".into()),
        Some(s) => format!("[node]\nshards = {s}\n{config_toml}"),
        None => config_toml,
    };
    let target = match spawn {
        Some(n) => {
            let spec = ClusterSpec {
                nodes: n,
                sync_replicas: c.sync_replicas,
                config_toml,
                replog: find_replog(c.replog.as_deref())?,
                controller: c.controller,
            };
            if !quiet {
                eprintln!(
                    "replog-bench: starting {n} node(s) with {}",
                    spec.replog.display()
                );
            }
            Target::spawn(&spec, &c.dir)?
        }
        None => Target::Existing {
            servers: c.server.clone(),
            metrics: c.metrics.clone(),
            trust: c.ca.clone().map_or(Trust::DevCa, Trust::CaFile),
        },
    };
    Ok((target, floor))
}

/// One plan per (record size, acks, rate) combination.
fn plans(l: &LoadArgs, kind: &str) -> Result<Vec<AppendPlan>, String> {
    let mut out = Vec::new();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for &bytes in &l.record_bytes {
        if !(8..=client::ClientConfig::default_limits().frame_bytes_max as usize).contains(&bytes) {
            return Err(format!(
                "usage: --record-bytes {bytes}: from 8 to the frame limit"
            ));
        }
        for acks in &l.acks {
            let acks = parse_acks(acks).map_err(|e| format!("usage: {e}"))?;
            for &rate in &l.rate {
                if !(rate >= 0.0 && rate.is_finite()) {
                    return Err(format!("usage: --rate {rate}"));
                }
                let i = out.len();
                out.push(AppendPlan {
                    log: l
                        .log
                        .clone()
                        .unwrap_or_else(|| format!("bench-{kind}-{stamp}-{i}")),
                    logs: l.logs.max(1),
                    record_bytes: bytes,
                    acks,
                    rate,
                    concurrency: l.concurrency.max(1),
                    connections: l.connections.max(1),
                    warmup: l.warmup,
                    duration: l.duration,
                    in_flight_max: l.in_flight_max.max(1),
                });
            }
        }
    }
    Ok(out)
}

fn finish(
    command: String,
    target: Target,
    floor: Option<Floor>,
    runs: Vec<Run>,
    notes: Vec<String>,
    output: &Output,
) -> Result<(), String> {
    let mut notes = notes;
    // The measurements stand even if a node did not stop cleanly; the report says so.
    if let Err(e) = target.finish() {
        eprintln!("replog-bench: warning: stopping the cluster: {e}");
        notes.push(format!("stopping the spawned cluster: {e}"));
    }
    let report = Report {
        command,
        machine: Machine::here(),
        floor,
        runs,
        notes,
    };
    emit(&report, output)
}

fn append_cmd(a: AppendArgs, command: String) -> Result<(), String> {
    let plans = plans(&a.load, "append")?;
    let (target, floor) = setup(&a.cluster, String::new(), a.output.quiet)?;
    let rt = runtime()?;
    let mut runs = Vec::new();
    let mut paced = std::collections::BTreeMap::new();
    for p in &plans {
        let mut run = rt.block_on(workload::append(&target, p, a.output.quiet))?;
        if let Some(f) = &floor {
            let d = f.append(p.acks.name(), p.record_bytes);
            run.against(d.p50_us, d.p99_us);
            // The time outside the node: the back-to-back round trip. (The round trip at an
            // open loop's pace varies too much from one measurement to the next to stand in.)
            run.add_budget(Some(f.quic_rtt_1k.mean_us));
            if p.rate > 0.0 {
                let rtt = match paced.get(&p.rate.to_bits()) {
                    Some(rtt) => rtt,
                    None => {
                        let samples = (p.rate * 3.0).clamp(100.0, 3000.0) as u64;
                        let rtt = floor::paced_rtt(p.rate, samples)?;
                        paced.entry(p.rate.to_bits()).or_insert(rtt)
                    }
                };
                let d = f.append_with(p.acks.name(), p.record_bytes, rtt);
                run.extra = serde_json::json!({
                    "paced_rtt_p50_us": rtt.p50_us,
                    "paced_rtt_p99_us": rtt.p99_us,
                    "paced_floor_p50_us": d.p50_us,
                    "paced_floor_p99_us": d.p99_us,
                    "ratio_p50_paced": run.latency.p50_us / d.p50_us,
                    "ratio_p99_paced": run.latency.p99_us / d.p99_us,
                });
            }
        }
        if run.budget.is_none() {
            run.add_budget(None);
        }
        runs.push(run);
    }
    let notes = floor_notes(&floor);
    finish(command, target, floor, runs, notes, &a.output)
}

fn durable_cmd(a: DurableArgs) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix("replog-bench-durable-")
        .tempdir_in(&a.dir)
        .map_err(|e| format!("a temporary directory under {}: {e}", a.dir.display()))?;
    let rows = bench::durable::measure_all(tmp.path(), a.block, a.warmup, a.samples.max(1))?;
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r).map_err(|e| e.to_string())?);
        }
    } else {
        print!("{}", bench::durable::table(&rows, a.block));
    }
    Ok(())
}

/// The nodes' allocation counter (a `replog` built with `count-allocations`).
const ALLOCATIONS: &str = "replog_allocations_total";

fn peers_cmd(a: PeersArgs) -> Result<(), String> {
    use bench::peers::{self, PeerPlan, Row, SyncFloor};
    let known = ["replog", "postgres", "nats"];
    if let Some(s) = a.systems.iter().find(|s| !known.contains(&s.as_str())) {
        return Err(format!("usage: unknown system {s:?}; one of {known:?}"));
    }
    if a.concurrency.is_empty() || a.concurrency.contains(&0) {
        return Err("usage: --concurrency needs numbers of at least 1".into());
    }
    let wants = |s: &str| a.systems.iter().any(|x| x == s);
    let say = |what: &str| {
        if !a.quiet {
            eprintln!("replog-bench: {what}");
        }
    };
    let floor = measure_floor(&a.dir, FloorPlan::quick(), a.quiet)?;
    let d = floor.append("sync", a.record_bytes);
    let sync_floor = SyncFloor {
        p50_us: d.p50_us,
        p99_us: d.p99_us,
    };
    let plan = PeerPlan {
        dir: a.dir.clone(),
        record_bytes: a.record_bytes,
        warmup: a.warmup,
        duration: a.duration,
    };
    let rt = runtime()?;
    let mut rows: Vec<Row> = Vec::new();
    let mut skipped = std::collections::BTreeMap::new();
    let mut failed = Vec::new();
    if wants("replog") {
        let spec = ClusterSpec {
            nodes: 3,
            sync_replicas: 1,
            config_toml: String::new(),
            replog: find_replog(a.replog.as_deref())?,
            controller: None,
        };
        say(&format!(
            "starting 3 replog nodes with {}",
            spec.replog.display()
        ));
        let target = Target::spawn(&spec, &a.dir)?;
        for &c in &a.concurrency {
            let p = AppendPlan {
                log: "peers".to_string(),
                logs: 1,
                record_bytes: a.record_bytes,
                acks: Acks::Sync,
                rate: 0.0,
                concurrency: c,
                connections: c.min(4),
                warmup: Duration::ZERO,
                duration: a.warmup,
                in_flight_max: pace::IN_FLIGHT_MAX,
            };
            // The warm-up as a run of its own, so that the nodes' CPU is taken over the
            // measured run alone.
            rt.block_on(workload::append(&target, &p, true))?;
            let p = AppendPlan {
                duration: a.duration,
                ..p
            };
            let allocs_before = target.counter_sum(ALLOCATIONS);
            let cpu_before = peers::tree_cpu_secs(&target.pids());
            let run = rt.block_on(workload::append(&target, &p, a.quiet))?;
            let cpu = peers::tree_cpu_secs(&target.pids()) - cpu_before;
            let allocs = target.counter_sum(ALLOCATIONS);
            let errors: u64 = run.errors.values().sum();
            let ops = run.throughput_ops_s;
            let done = (run.latency.count + errors).max(1);
            let cpu_per_op = cpu * 1e6 / done as f64;
            let d = peers::REPLOG_DURABILITY;
            let mut row = Row::new("replog", d, c, &run.latency, ops, errors, cpu_per_op);
            row.server_allocations_per_op = allocs_before
                .zip(allocs)
                .map(|(b, a)| (a - b) / done as f64);
            rows.push(row);
        }
        target.finish()?;
    }
    if wants("postgres") {
        match peers::find_postgres(a.pg_bin.as_deref()) {
            None => {
                let why = "not installed (apt-get install postgresql)".to_string();
                skipped.insert("postgres".to_string(), why);
            }
            Some(bin) => {
                say(&format!("starting PostgreSQL from {}", bin.display()));
                match peers::postgres(&bin, &plan, &a.concurrency) {
                    Ok(r) => rows.extend(r),
                    Err(e) => {
                        skipped.insert("postgres".to_string(), format!("failed: {e}"));
                        failed.push("postgres");
                    }
                }
            }
        }
    }
    if wants("nats") {
        match peers::find_nats(a.nats_server.as_deref()) {
            None => {
                let why = "not installed (apt-get install nats-server)".to_string();
                skipped.insert("nats".to_string(), why);
            }
            Some(bin) => {
                say(&format!(
                    "starting 3 NATS JetStream nodes with {}",
                    bin.display()
                ));
                match peers::nats(&bin, &plan, &a.concurrency, &rt) {
                    Ok(r) => rows.extend(r),
                    Err(e) => {
                        skipped.insert("nats".to_string(), format!("failed: {e}"));
                        failed.push("nats");
                    }
                }
            }
        }
    }
    if a.json {
        print!("{}", peers::json_lines(&rows, Some(sync_floor), &skipped));
    } else {
        print!("{}", peers::table(&rows, Some(sync_floor), &skipped));
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(format!("{} failed (see above)", failed.join(", "))),
    }
}

fn floor_notes(floor: &Option<Floor>) -> Vec<String> {
    match floor {
        Some(_) => vec![
            "floors: acks=none = QUIC round trip; leader = round trip + write+fdatasync; sync/quorum = 2 round trips + write+fdatasync (4 KiB figure up to 4 KiB records, 64 KiB above)".into(),
            "open-loop runs also give the floor with the round trip measured at the run's own pace (paced_*: idle wake-ups included) and the ratios to it".into(),
        ],
        None => vec!["no floor measured (--no-floor): no ratios".into()],
    }
}

fn e2e_cmd(a: E2eArgs, command: String) -> Result<(), String> {
    let plans = plans(&a.load, "e2e")?;
    let (target, floor) = setup(&a.cluster, String::new(), a.output.quiet)?;
    let read_server = match (&a.read_server, target.servers().get(1)) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s.clone(),
        (None, None) => {
            let _ = target.finish();
            return Err(
                "usage: e2e reads from a follower: --spawn 2 or more, or --read-server".into(),
            );
        }
    };
    let rt = runtime()?;
    let mut runs = Vec::new();
    for p in plans {
        let plan = E2ePlan {
            append: p,
            read_server: read_server.clone(),
        };
        let (mut vis, mut app) = rt.block_on(workload::e2e(&target, &plan, a.output.quiet))?;
        if let Some(f) = &floor {
            // Visible on a follower once committed: the semi-synchronous floor plus the way
            // back out to the reader.
            let d = f.append("sync", plan.append.record_bytes);
            vis.against(d.p50_us, d.p99_us);
            let d = f.append(plan.append.acks.name(), plan.append.record_bytes);
            app.against(d.p50_us, d.p99_us);
        }
        runs.push(vis);
        runs.push(app);
    }
    let mut notes = floor_notes(&floor);
    notes.push(
        "e2e floor: 2 round trips + write+fdatasync (what commit on a follower needs)".into(),
    );
    finish(command, target, floor, runs, notes, &a.output)
}

fn catchup_cmd(a: CatchupArgs, command: String) -> Result<(), String> {
    if a.cluster.spawn != Some(3) {
        return Err("usage: catchup runs on a cluster it starts: --spawn 3".into());
    }
    let mut toml = String::from("[replication]\n");
    if let Some(r) = a.catchup_rate {
        toml += &format!("catchup_bytes_per_sec_max = {r}\n");
    }
    if let Some(f) = a.catchup_live_factor {
        toml += &format!("catchup_live_latency_factor = {f:?}\n");
    }
    let (mut target, floor) = setup(&a.cluster, toml, a.output.quiet)?;
    let plan = CatchupPlan {
        log: format!(
            "bench-catchup-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ),
        behind_bytes: a.behind_mib.max(1) << 20,
        fill_record_bytes: a.fill_record_bytes.max(8),
        live_rate: a.live_rate,
        live_before: a.live_before,
        timeout: a.timeout,
    };
    let rt = runtime()?;
    let result = rt.block_on(workload::catchup(&mut target, &plan, a.output.quiet));
    let (before, mut during, extra) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = target.finish();
            return Err(e);
        }
    };
    let mut notes = Vec::new();
    if let Some(f) = &floor {
        let floor_mb_s = f.catchup_mb_s();
        let mb_s = extra["catchup_mb_s"].as_f64().unwrap_or(0.0);
        let mut extra = extra.clone();
        extra["floor_mb_s"] = floor_mb_s.into();
        extra["ratio_to_floor"] = (mb_s / floor_mb_s).into();
        during.extra = extra;
        notes.push("catch-up floor: min(QUIC bulk, sequential write+fdatasync); target 0.8x, live p99 at most 2x".into());
    }
    notes.push(match a.catchup_rate {
        Some(0) => "catch-up rate: no cap".into(),
        Some(r) => format!("catch-up rate cap: {r} bytes/s"),
        None => {
            "catch-up rate cap: the node's default (replication.catchup_bytes_per_sec_max)".into()
        }
    });
    notes.push(match a.catchup_live_factor {
        Some(0.0) => "catch-up pacing by the live tail: off".into(),
        Some(f) => {
            format!("catch-up paced to keep the live acknowledgements within {f}x their base")
        }
        None => {
            "catch-up pacing: the node's default (replication.catchup_live_latency_factor)".into()
        }
    });
    finish(
        command,
        target,
        floor,
        vec![before, during],
        notes,
        &a.output,
    )
}

fn failover_cmd(mut a: FailoverArgs, command: String) -> Result<(), String> {
    if a.cluster.spawn.is_none_or(|n| n < 3) {
        return Err("usage: failover runs on a cluster it starts: --spawn 3 (or more)".into());
    }
    let timeout_ms = *a.cluster.controller.get_or_insert(3000);
    a.cluster.no_floor = true;
    let (mut target, _) = setup(&a.cluster, String::new(), a.output.quiet)?;
    let plan = FailoverPlan {
        log: "bench-failover".into(),
        cycles: a.cycles,
        switchovers: a.switchovers,
        timeout: a.timeout,
    };
    let rt = runtime()?;
    let (kills, pauses) = match rt.block_on(workload::failover(&mut target, &plan, a.output.quiet))
    {
        Ok(v) => v,
        Err(e) => {
            let _ = target.finish();
            return Err(e);
        }
    };
    let notes = vec![format!(
        "controller.leader_timeout_ms = {timeout_ms}: a leader is declared failed after that long without a report"
    )];
    finish(command, target, None, vec![kills, pauses], notes, &a.output)
}

fn plot_cmd(a: PlotArgs) -> Result<(), String> {
    let mut curves = Vec::new();
    for f in &a.files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let points = hist::parse_hgrm(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        let name = f.file_stem().map_or_else(
            || f.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        curves.push((name, points));
    }
    std::fs::write(&a.out, report::svg(&a.title, &curves))
        .map_err(|e| format!("{}: {e}", a.out.display()))?;
    eprintln!("replog-bench: wrote {}", a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
