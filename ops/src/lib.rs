//! The operator commands of `replog` (every one but `replog node`, which the server crate
//! provides): `replog dev`, and the commands that talk to nodes through the client library.
//!
//! Every command that prints data takes `--json` and then prints one JSON object per line.
//! Errors go to stderr, and the exit status is non-zero: 1 for a failed operation, 2 for bad
//! usage, 3 when the outcome of an append is unknown (it may or may not be stored).

mod dev;
mod verify;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use client::{
    AppendOptions, Client, ClientConfig, ProducerOptions, ReadOptions, ReadRecord, Trust,
};
use protocol::{Acks, ErrorCode, LogInfo};
use serde_json::json;

/// The operator commands.
#[derive(Subcommand)]
pub enum Command {
    /// Run a local development cluster of node processes on loopback until Ctrl-C.
    Dev(dev::DevArgs),
    /// Create a log.
    Create {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        log: String,
        /// Succeed if the log already exists.
        #[arg(long)]
        if_not_exists: bool,
        /// Return as soon as the log exists on the leader, without waiting until it is
        /// writable at acks=sync (its sync set full and on record).
        #[arg(long)]
        no_wait: bool,
    },
    /// List the logs of a node.
    List {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Append one record per line of standard input.
    Append(AppendArgs),
    /// Read records from an offset.
    Read {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        log: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Stop after this many records (default: everything committed now).
        #[arg(long)]
        count: Option<u64>,
        /// Read-your-writes: the node must have committed up to this offset (for example a
        /// receipt's next offset) before it answers; a replica that has not waits up to
        /// --wait-ms, then the next --server is tried.
        #[arg(long)]
        min_offset: Option<u64>,
        /// How long a node may wait for --min-offset (ms).
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
    },
    /// Print records as they are committed, until interrupted.
    Tail {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        log: String,
        /// Start here (default: the log's current end, so only new records are printed).
        #[arg(long)]
        from: Option<u64>,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Show a node's identity, its logs and (on a leader) each follower's progress and lag.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Store or fetch an application snapshot (state at a log offset).
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Planned switchover: move a log's leadership to another replica once it has caught up
    /// (writes pause meanwhile), and wait until it has moved.
    Failover {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        log: String,
        /// The node to lead (default: a member of the sync set, else another replica).
        #[arg(long)]
        to: Option<String>,
        /// Give up waiting after this many seconds (exit 1).
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
    /// Wait until every follower of a log has caught up, showing a progress bar for each.
    Catchup {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        log: String,
        /// Give up after this many seconds (exit 1).
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
    },
    /// Compare crc32c of the stored batches over offset ranges on every replica of a log.
    Verify {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        log: String,
        /// Records per compared range.
        #[arg(long, default_value_t = 10_000)]
        range_records: u64,
    },
}

#[derive(Subcommand)]
pub enum SnapshotAction {
    /// Store the bytes of --file (or standard input) as the snapshot of the log at --offset.
    Put {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        log: String,
        /// The snapshot reflects every record below this offset.
        #[arg(long)]
        offset: u64,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Fetch the latest snapshot of the log: its bytes go to --file (or standard output), and
    /// its offset to standard error (or, with --json, standard output).
    Get {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long)]
        log: String,
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
pub struct ConnArgs {
    /// Node address(es), host:port; repeat or separate with commas.
    #[arg(long = "server", required = true, value_delimiter = ',')]
    servers: Vec<String>,
    /// PEM CA to verify the node with (default: the local development CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Bearer token.
    #[arg(long, env = "REPLOG_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Client certificate and key (PEM), for nodes that require one.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// TLS name to verify instead of the host part of --server.
    #[arg(long)]
    server_name: Option<String>,
    /// Print JSON, one object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct AppendArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[arg(long)]
    log: String,
    /// Durability level: none, leader, sync or quorum.
    #[arg(long, default_value = "leader", value_parser = parse_acks)]
    acks: Acks,
    /// Conditional append: all lines go in one append that fails unless the log's next offset
    /// is this.
    #[arg(long)]
    expected_offset: Option<u64>,
    /// Most records per append request.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
}

fn parse_acks(s: &str) -> Result<Acks, String> {
    Acks::from_name(s)
        .ok_or_else(|| format!("unknown acks level {s:?}: use none, leader, sync or quorum"))
}

/// A failure with the exit status it maps to.
struct Failure {
    status: u8,
    message: String,
}

impl From<client::Error> for Failure {
    fn from(e: client::Error) -> Self {
        Failure {
            status: if e.is_unknown_outcome() { 3 } else { 1 },
            message: e.to_string(),
        }
    }
}

fn failure(message: impl Into<String>) -> Failure {
    Failure {
        status: 1,
        message: message.into(),
    }
}

/// Run one operator command; the exit status says how it went (1: failed, 3: unknown outcome).
pub fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Dev(args) => dev::run(args).map_err(failure),
        other => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(run_client(other))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("replog: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}

async fn connect(c: &ConnArgs) -> Result<Client, Failure> {
    let mut cfg = ClientConfig::new(c.servers.clone());
    if let Some(ca) = &c.ca {
        cfg.trust = Trust::CaFile(ca.clone());
    }
    cfg.token = c.token.clone();
    if let (Some(cert), Some(key)) = (&c.cert, &c.key) {
        cfg.client_cert = Some((cert.clone(), key.clone()));
    }
    cfg.server_name = c.server_name.clone();
    Ok(Client::connect(cfg).await?)
}

fn out(line: String) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").map_err(|e| failure(format!("stdout: {e}")))
}

fn log_json(l: &LogInfo) -> serde_json::Value {
    json!({
        "name": l.name, "start": l.start, "end": l.end, "committed": l.committed,
        "flushed": l.flushed, "epoch": l.epoch, "disk_bytes": l.disk_bytes,
    })
}

fn replication_json(r: &protocol::LogReplication) -> serde_json::Value {
    let followers: Vec<_> = r
        .followers
        .iter()
        .map(|f| {
            json!({
                "id": f.id, "addr": f.addr, "durable": f.durable, "connected": f.connected,
                "in_sync_set": f.in_sync_set, "lag_records": f.lag_records,
                "lag_bytes": f.lag_bytes, "lag_ms": f.lag_ms,
                "catchup_done_bytes": f.catchup_done_bytes,
                "catchup_total_bytes": f.catchup_total_bytes,
            })
        })
        .collect();
    let sync_set: Vec<&str> = r
        .followers
        .iter()
        .filter(|f| f.in_sync_set)
        .map(|f| f.id.as_str())
        .collect();
    json!({
        "log": r.log, "commit": r.commit, "sync_replicas": r.sync_replicas,
        "sync_shortfall": r.sync_shortfall, "sync_set": sync_set, "followers": followers,
    })
}

fn record_json(r: &ReadRecord) -> serde_json::Value {
    json!({
        "offset": r.offset,
        "epoch": r.epoch,
        "timestamp_us": r.timestamp_us,
        "value": String::from_utf8_lossy(&r.value),
    })
}

fn print_record(json: bool, r: &ReadRecord) -> Result<(), Failure> {
    if json {
        out(record_json(r).to_string())
    } else {
        out(String::from_utf8_lossy(&r.value).into_owned())
    }
}

async fn run_client(cmd: Command) -> Result<(), Failure> {
    match cmd {
        Command::Create {
            conn,
            log,
            if_not_exists,
            no_wait,
        } => {
            let client = connect(&conn).await?;
            let created = if no_wait {
                client.create_log_no_wait(&log).await
            } else {
                client.create_log(&log).await
            };
            let created = match created {
                Ok(()) => true,
                Err(e) if if_not_exists && e.code() == Some(ErrorCode::LogExists) => false,
                Err(e) => return Err(e.into()),
            };
            if conn.json {
                out(json!({"log": log, "created": created}).to_string())?;
            } else if created {
                out(format!("created log {log}"))?;
            } else {
                out(format!("log {log} already exists"))?;
            }
            Ok(())
        }
        Command::List { conn } => {
            let client = connect(&conn).await?;
            for l in client.list_logs().await? {
                if conn.json {
                    out(log_json(&l).to_string())?;
                } else {
                    out(format!(
                        "{}\tstart={}\tend={}\tcommitted={}",
                        l.name, l.start, l.end, l.committed
                    ))?;
                }
            }
            Ok(())
        }
        Command::Status { conn } => {
            let client = connect(&conn).await?;
            let s = client.status().await?;
            let replicas = follower_logs(&conn, &s).await;
            let replica = |addr: &str, log: &str| -> serde_json::Value {
                match replicas.get(addr) {
                    Some(Ok(logs)) => logs.iter().find(|l| l.name == log).map_or(
                        json!({"error": "no such log there yet"}),
                        |l| json!({"end": l.end, "flushed": l.flushed, "committed": l.committed}),
                    ),
                    Some(Err(e)) => json!({ "error": e }),
                    None => json!({"error": "address unknown"}),
                }
            };
            if conn.json {
                let logs: Vec<_> = s
                    .logs
                    .iter()
                    .map(|l| {
                        let mut v = log_json(l);
                        let (role, acting) = log_role(&s, &l.name);
                        v["role"] = json!(role);
                        v["acting"] = json!(acting);
                        v
                    })
                    .collect();
                let replication: Vec<_> = s
                    .replication
                    .iter()
                    .map(|r| {
                        let mut v = replication_json(r);
                        for (f, j) in r.followers.iter().zip(
                            v["followers"]
                                .as_array_mut()
                                .expect("followers array")
                                .iter_mut(),
                        ) {
                            j["replica"] = replica(&f.addr, &r.log);
                        }
                        v
                    })
                    .collect();
                out(json!({
                    "node_id": s.node_id, "version": s.version, "role": s.role, "shards": s.shards,
                    "uptime_ms": s.uptime_ms, "connections": s.connections,
                    "address": conn.servers[0], "leader": s.leader, "logs": logs,
                    "replication": replication,
                    "controller": s.controller.as_ref().map(controller_json),
                    "quarantined": s.quarantined.iter().map(|q| json!({
                        "log": q.log, "from": q.from, "to": q.to, "records": q.records,
                        "bytes": q.bytes, "epochs": q.epochs, "at_ms": q.at_ms, "file": q.file,
                    })).collect::<Vec<_>>(),
                    "damaged": s.damaged.iter().map(|d| json!({
                        "log": d.log, "from": d.from, "until": d.until, "file": d.file,
                        "position": d.position, "detail": d.detail, "at_ms": d.at_ms,
                        "repaired_ms": (d.repaired_ms > 0).then_some(d.repaired_ms),
                    })).collect::<Vec<_>>(),
                })
                .to_string())?;
            } else {
                out(format!(
                    "node {} ({}), version {}, {} shards, up {:.1} s, {} connections",
                    s.node_id,
                    s.role,
                    s.version,
                    s.shards,
                    s.uptime_ms as f64 / 1000.0,
                    s.connections
                ))?;
                if !s.leader.is_empty() {
                    out(format!("  follows {}", s.leader))?;
                }
                if let Some(c) = &s.controller {
                    for line in controller_lines(c) {
                        out(line)?;
                    }
                }
                for d in &s.damaged {
                    out(format!(
                        "  damaged: {} offsets {}..{} in {} at byte {} ({}), found at {} ms; {}",
                        d.log,
                        d.from,
                        d.until,
                        d.file,
                        d.position,
                        d.detail,
                        d.at_ms,
                        if d.repaired_ms > 0 {
                            format!("repaired at {} ms", d.repaired_ms)
                        } else {
                            "not repaired yet (not served)".to_string()
                        }
                    ))?;
                }
                for q in &s.quarantined {
                    out(format!(
                        "  quarantined: {} offsets {}..{} ({} records, {} bytes, epochs {:?}) at {} ms, in {}",
                        q.log, q.from, q.to, q.records, q.bytes, q.epochs, q.at_ms, q.file
                    ))?;
                }
                for l in &s.logs {
                    let (role, acting) = log_role(&s, &l.name);
                    out(format!(
                        "  {}\tstart={}\tend={}\tflushed={}\tcommitted={}\tepoch={}\tbytes={}\trole={role}{}",
                        l.name, l.start, l.end, l.flushed, l.committed, l.epoch, l.disk_bytes,
                        if (acting == "leader") == (role == "leader") {
                            String::new()
                        } else {
                            format!("\t(still acting as {acting}: not yet changed to the controller's record)")
                        }
                    ))?;
                    if let Some(r) = s.replication.iter().find(|r| r.log == l.name) {
                        out(format!(
                            "    commit={} sync_replicas={} shortfall={}",
                            r.commit, r.sync_replicas, r.sync_shortfall
                        ))?;
                        for f in &r.followers {
                            let mut line = format!(
                                "    follower {} {}\t{}{}\tdurable={}\tlag={} records, {} bytes, {:.1} s",
                                f.id,
                                if f.addr.is_empty() { "-" } else { &f.addr },
                                if f.connected { "connected" } else { "disconnected" },
                                if f.in_sync_set { ", in sync set" } else { "" },
                                f.durable,
                                f.lag_records,
                                f.lag_bytes,
                                f.lag_ms as f64 / 1e3
                            );
                            if f.catchup_total_bytes > 0 {
                                line += &format!(
                                    "\tcatching up {}",
                                    progress_bar(f.catchup_done_bytes, f.catchup_total_bytes)
                                );
                            }
                            out(line)?;
                            let r = replica(&f.addr, &r.log);
                            out(match r["error"].as_str() {
                                Some(e) => format!("      its own view: {e}"),
                                None => format!(
                                    "      its own view: end={} flushed={} committed={}",
                                    r["end"], r["flushed"], r["committed"]
                                ),
                            })?;
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Verify {
            conn,
            log,
            range_records,
        } => verify::run(&conn, &log, range_records.max(1)).await,
        Command::Snapshot { action } => snapshot(action).await,
        Command::Catchup {
            conn,
            log,
            timeout_s,
        } => verify::catchup(&conn, &log, Duration::from_secs(timeout_s)).await,
        Command::Failover {
            conn,
            log,
            to,
            timeout_s,
        } => failover(&conn, &log, to.as_deref(), Duration::from_secs(timeout_s)).await,
        Command::Append(a) => append(a).await,
        Command::Read {
            conn,
            log,
            from,
            count,
            min_offset,
            wait_ms,
        } => {
            let client = connect(&conn).await?;
            let mut pos = from;
            let mut printed = 0u64;
            let opts = ReadOptions {
                min_offset,
                wait: Duration::from_millis(wait_ms),
                ..ReadOptions::default()
            };
            loop {
                let r = client.read(&log, pos, opts.clone()).await?;
                for rec in &r.records {
                    if count.is_some_and(|c| printed >= c) {
                        return Ok(());
                    }
                    print_record(conn.json, rec)?;
                    printed += 1;
                }
                if count.is_some_and(|c| printed >= c)
                    || r.next_offset >= r.committed
                    || r.next_offset == pos
                {
                    return Ok(());
                }
                pos = r.next_offset;
            }
        }
        Command::Tail {
            conn,
            log,
            from,
            count,
        } => {
            let client = connect(&conn).await?;
            let from = match from {
                Some(f) => f,
                None => client
                    .list_logs()
                    .await?
                    .into_iter()
                    .find(|l| l.name == log)
                    .map(|l| l.committed)
                    .ok_or_else(|| failure(format!("no log named {log:?}")))?,
            };
            let mut tail = client.tail(&log, from).await?;
            let mut printed = 0u64;
            while count.is_none_or(|c| printed < c) {
                match tail.next().await? {
                    Some(rec) => {
                        print_record(conn.json, &rec)?;
                        printed += 1;
                    }
                    None => break,
                }
            }
            Ok(())
        }
        Command::Dev(_) => unreachable!("handled in run"),
    }
}

async fn snapshot(action: SnapshotAction) -> Result<(), Failure> {
    match action {
        SnapshotAction::Put {
            conn,
            log,
            offset,
            file,
        } => {
            let data = match &file {
                Some(f) => {
                    std::fs::read(f).map_err(|e| failure(format!("{}: {e}", f.display())))?
                }
                None => {
                    let mut v = Vec::new();
                    std::io::stdin()
                        .lock()
                        .read_to_end(&mut v)
                        .map_err(|e| failure(format!("stdin: {e}")))?;
                    v
                }
            };
            let len = data.len();
            connect(&conn)
                .await?
                .put_snapshot(&log, offset, Bytes::from(data))
                .await?;
            if conn.json {
                out(json!({"log": log, "offset": offset, "bytes": len}).to_string())
            } else {
                out(format!(
                    "stored a snapshot of {log} at offset {offset} ({len} bytes)"
                ))
            }
        }
        SnapshotAction::Get { conn, log, file } => {
            let s = connect(&conn)
                .await?
                .latest_snapshot(&log)
                .await?
                .ok_or_else(|| failure(format!("log {log:?} has no snapshot on this node")))?;
            match &file {
                Some(f) => std::fs::write(f, &s.data)
                    .map_err(|e| failure(format!("{}: {e}", f.display())))?,
                None if !conn.json => std::io::stdout()
                    .lock()
                    .write_all(&s.data)
                    .map_err(|e| failure(format!("stdout: {e}")))?,
                None => {}
            }
            if conn.json {
                out(json!({
                    "log": log, "offset": s.offset, "bytes": s.data.len(), "crc32c": s.crc32c,
                })
                .to_string())
            } else {
                eprintln!(
                    "snapshot of {log} at offset {} ({} bytes)",
                    s.offset,
                    s.data.len()
                );
                Ok(())
            }
        }
    }
}

/// On a leader: each follower's own view of its logs (asked at the address it announced), so
/// that status shows every replica's end, flushed and committed offsets. A follower that does
/// not answer within 2 s is reported, not waited for.
async fn follower_logs(
    conn: &ConnArgs,
    s: &protocol::StatusResponse,
) -> std::collections::HashMap<String, Result<Vec<LogInfo>, String>> {
    let mut out = std::collections::HashMap::new();
    let addrs: std::collections::BTreeSet<&str> = s
        .replication
        .iter()
        .flat_map(|r| r.followers.iter())
        .map(|f| f.addr.as_str())
        .filter(|a| !a.is_empty())
        .collect();
    // Asked all at once: a stopped follower costs the 2 s once, not once per follower.
    let asks: Vec<_> = addrs
        .into_iter()
        .map(|addr| {
            let args = ConnArgs {
                servers: vec![addr.to_string()],
                ..conn.clone()
            };
            let ask = async move {
                let c = connect(&args).await.map_err(|f| f.message)?;
                c.list_logs().await.map_err(|e| e.to_string())
            };
            let addr = addr.to_string();
            tokio::spawn(async move {
                let answer = match tokio::time::timeout(Duration::from_secs(2), ask).await {
                    Ok(r) => r,
                    Err(_) => Err("no answer within 2 s".to_string()),
                };
                (addr, answer)
            })
        })
        .collect();
    for a in asks {
        if let Ok((addr, answer)) = a.await {
            out.insert(addr, answer);
        }
    }
    out
}

/// `[#####     ] 52% (1.2 MiB of 2.3 MiB)`.
pub(crate) fn progress_bar(done: u64, total: u64) -> String {
    let total = total.max(1);
    let frac = (done.min(total) as f64) / total as f64;
    let filled = (frac * 20.0).round() as usize;
    format!(
        "[{}{}] {:>3.0}% ({:.1} of {:.1} MiB)",
        "#".repeat(filled),
        " ".repeat(20 - filled),
        frac * 100.0,
        done as f64 / (1 << 20) as f64,
        total as f64 / (1 << 20) as f64
    )
}

fn receipt_json(offset: u64, r: &protocol::Receipt) -> serde_json::Value {
    json!({
        "offset": offset,
        "epoch": r.epoch,
        "level": r.level.name(),
    "replicas": r.replicas,
        "holders": r.holders,
        "duplicate": r.flags & protocol::RECEIPT_DUPLICATE != 0,
        "degraded": r.flags & protocol::RECEIPT_DEGRADED != 0,
    })
}

/// Records in flight (sent to the producer, receipt not yet printed) while `append` streams
/// standard input: past it, reading waits for receipts.
const APPEND_IN_FLIGHT_MAX: usize = 64 * 1024;

/// The records of standard input, one per line (the bytes between newlines, taken as they are,
/// not necessarily UTF-8), as they arrive: a thread reads them and hands each line on at once.
fn stdin_lines() -> tokio::sync::mpsc::Receiver<std::io::Result<Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut line = Vec::new();
            match std::io::BufRead::read_until(&mut stdin, b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    if tx.blocking_send(Ok(Bytes::from(line))).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

async fn append(a: AppendArgs) -> Result<(), Failure> {
    let client = connect(&a.conn).await?;
    let mut lines = stdin_lines();
    let print = |offset: u64, r: &protocol::Receipt| {
        if a.conn.json {
            out(receipt_json(offset, r).to_string())
        } else {
            out(offset.to_string())
        }
    };
    let stdin_failed = |e: std::io::Error| failure(format!("stdin: {e}"));
    if a.expected_offset.is_some() {
        // A conditional append is one request: it needs the whole input first.
        let mut records = Vec::new();
        while let Some(line) = lines.recv().await {
            records.push(line.map_err(stdin_failed)?);
        }
        if records.is_empty() {
            return Ok(());
        }
        let opts = AppendOptions {
            acks: a.acks,
            expected_offset: a.expected_offset,
            ..AppendOptions::default()
        };
        let r = client
            .append(&a.log, records, opts)
            .await
            .map_err(|e| Failure {
                message: append_outcome(&e),
                ..Failure::from(e)
            })?;
        for off in r.first..r.next {
            print(off, &r)?;
        }
        return Ok(());
    }
    // One producer for the whole stream: each line is sent as it arrives (lines that arrive
    // while appends are in flight share the next append, up to --batch), and each receipt is
    // printed as it comes, in input order.
    let producer = client.producer(
        &a.log,
        ProducerOptions {
            acks: a.acks,
            batch_records_max: a.batch.max(1),
            linger: Duration::ZERO,
            ..ProducerOptions::default()
        },
    );
    // Every record gets its own outcome: a failure does not stop the report on the others,
    // which the producer still sends (and which are then stored or not, each as reported).
    // `send` queues the record at once; its future only waits for the receipt.
    let mut waiting = std::collections::VecDeque::new();
    let (mut done, mut failed, mut status) = (0usize, 0usize, 0u8);
    let mut input_error = None;
    let mut ended = false;
    loop {
        tokio::select! {
            biased;
            r = async { waiting.front_mut().expect("guarded").await }, if !waiting.is_empty() => {
                waiting.pop_front();
                let r: client::Result<protocol::Receipt> = r;
                match r {
                    Ok(r) => print(r.first, &r)?,
                    Err(e) => {
                        eprintln!("replog: record {} (line {}): {}", done, done + 1, append_outcome(&e));
                        failed += 1;
                        status = status.max(Failure::from(e).status);
                    }
                }
                done += 1;
            }
            line = lines.recv(), if !ended && waiting.len() < APPEND_IN_FLIGHT_MAX => match line {
                Some(Ok(record)) => waiting.push_back(Box::pin(producer.send(record))),
                Some(Err(e)) => {
                    input_error = Some(e);
                    ended = true;
                }
                None => ended = true,
            },
            else => break,
        }
    }
    if let Some(e) = input_error {
        return Err(stdin_failed(e));
    }
    if failed > 0 {
        return Err(Failure {
            status,
            message: format!("{failed} of {done} records were not acknowledged"),
        });
    }
    Ok(())
}

/// The role of this node for `log`: the one the controller records for it (with a controller;
/// else the configured one), and the one it is acting in (the same, except for the moment it
/// takes to change, or while it cannot hear from the controller).
fn log_role(s: &protocol::StatusResponse, log: &str) -> (&'static str, &'static str) {
    let acting = if s.replication.iter().any(|r| r.log == log) {
        "leader"
    } else if s.leader.is_empty() && s.controller.is_none() {
        "standalone"
    } else {
        "follower"
    };
    let recorded = s
        .controller
        .as_ref()
        .and_then(|c| c.logs.iter().find(|l| l.log == log))
        .map(|l| {
            if l.leader == s.node_id {
                "leader"
            } else if l.leader.is_empty() {
                "none"
            } else {
                "follower"
            }
        });
    (recorded.unwrap_or(acting), acting)
}

/// What a failed append's error says about the records: whether they are stored is known
/// (a definite refusal: not stored) or not (no acknowledgement: maybe stored).
fn append_outcome(e: &client::Error) -> String {
    match e {
        client::Error::Unacknowledged(_) => e.to_string(),
        e if e.is_unknown_outcome() => {
            format!("not acknowledged; it may or may not be stored: {e}")
        }
        e => format!("not stored: {e}"),
    }
}

/// The controller part of `status --json`.
fn controller_json(c: &protocol::ControllerStatus) -> serde_json::Value {
    let logs: Vec<_> = c
        .logs
        .iter()
        .map(|l| {
            json!({
                "log": l.log, "leader": (!l.leader.is_empty()).then_some(&l.leader),
                "epoch": l.epoch, "sync_set": l.sync_set,
                "no_leader": (!l.no_leader.is_empty()).then_some(&l.no_leader),
                "transfer_to": (!l.transfer_to.is_empty()).then_some(&l.transfer_to),
                "unclean_elections": l.unclean_elections,
            })
        })
        .collect();
    json!({
        "cluster_id": c.cluster_id, "leader": (!c.leader.is_empty()).then_some(&c.leader),
        "term": c.term, "applied": c.applied, "members": c.members, "logs": logs,
        "reachable": c.reachable, "problem": (!c.problem.is_empty()).then_some(&c.problem),
    })
}

/// The controller part of `status`, as text.
fn controller_lines(c: &protocol::ControllerStatus) -> Vec<String> {
    let mut lines = vec![format!(
        "  controller: cluster {}, led by {} (term {}), applied {}; members {}",
        if c.cluster_id.is_empty() {
            "(not formed)"
        } else {
            &c.cluster_id
        },
        if c.leader.is_empty() {
            "nobody"
        } else {
            &c.leader
        },
        c.term,
        c.applied,
        c.members.join(" ")
    )];
    if !c.problem.is_empty() {
        lines.push(format!("  controller problem: {}", c.problem));
    }
    for l in &c.logs {
        let mut line = format!(
            "    {}\tepoch={}\tleader={}\tsync_set=[{}]",
            l.log,
            l.epoch,
            if l.leader.is_empty() {
                "none"
            } else {
                &l.leader
            },
            l.sync_set.join(",")
        );
        if !l.transfer_to.is_empty() {
            line += &format!("\ttransferring to {}", l.transfer_to);
        }
        if l.unclean_elections > 0 {
            line += &format!("\tunclean elections: {}", l.unclean_elections);
        }
        lines.push(line);
        if !l.no_leader.is_empty() {
            lines.push(format!("      no leader: {}", l.no_leader));
        }
    }
    lines
}

/// The controller's (leader, epoch, transfer target) of `log`, as the node `client` talks to
/// has applied it.
async fn controlled(client: &Client, log: &str) -> Result<Option<(String, u64, String)>, Failure> {
    let s = client.status().await?;
    Ok(s.controller.and_then(|c| {
        c.logs
            .into_iter()
            .find(|l| l.log == log)
            .map(|l| (l.leader, l.epoch, l.transfer_to))
    }))
}

/// `replog failover`: ask for the transfer, then wait until the controller names a new leader.
async fn failover(
    conn: &ConnArgs,
    log: &str,
    to: Option<&str>,
    timeout: Duration,
) -> Result<(), Failure> {
    let client = connect(conn).await?;
    let Some((from, epoch, _)) = controlled(&client, log).await? else {
        return Err(failure(format!(
            "the node knows no controller record of log {log:?} (does it run the controller?)"
        )));
    };
    let asked = std::time::Instant::now();
    client.transfer_leadership(log, to).await?;
    let mut seen = false;
    loop {
        if let Some((leader, e, target)) = controlled(&client, log).await? {
            seen |= !target.is_empty();
            if seen && target.is_empty() && e == epoch {
                return Err(failure(format!(
                    "the transfer was abandoned (the target did not catch up in time): {from} still leads log {log:?}"
                )));
            }
            if e > epoch && !leader.is_empty() {
                let pause_ms = asked.elapsed().as_secs_f64() * 1e3;
                if leader == from {
                    return Err(failure(format!(
                        "the transfer was abandoned: {from} still leads log {log:?} (epoch {e})"
                    )));
                }
                if conn.json {
                    out(json!({"log": log, "from": from, "to": leader, "epoch": e,
                        "pause_ms": pause_ms})
                    .to_string())?;
                } else {
                    out(format!(
                        "log {log}: {from} -> {leader} (epoch {e}) after {pause_ms:.0} ms"
                    ))?;
                }
                return Ok(());
            }
        }
        if asked.elapsed() > timeout {
            return Err(failure(format!(
                "log {log:?} has not moved within {timeout:?}; see replog status"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
