//! `replog verify`: compare the stored bytes of a log on every replica.
//!
//! The leader names its followers and where clients reach them (`status`). Every replica is
//! read over the same window, from the highest start offset to the lowest committed offset of
//! them all (batches are stored verbatim, so their boundaries are the same everywhere), and
//! the crc32c of the batch bytes is computed per range of `range_records` offsets (a batch
//! counts in the range its first offset falls in). Any range whose checksum differs from the
//! leader's is reported; the exit status is 1 if there is one, or if a replica could not be read.
//!
//! `replog catchup` waits for the followers of a log to catch up, with a progress bar each.

use std::collections::BTreeMap;

use client::{Client, ReadOptions};
use serde_json::json;

use crate::{connect, failure, out, ConnArgs, Failure};

/// One replica's checksums: range index -> (crc32c, batches).
type Sums = BTreeMap<u64, (u32, u64)>;

struct Replica {
    id: String,
    addr: String,
    client: Option<Client>,
    start: u64,
    committed: u64,
    sums: Sums,
    error: Option<String>,
}

async fn open(conn: &ConnArgs, id: String, addr: String, log: &str) -> Replica {
    let mut r = Replica {
        id,
        addr: addr.clone(),
        client: None,
        start: 0,
        committed: 0,
        sums: Sums::new(),
        error: None,
    };
    let args = ConnArgs {
        servers: vec![addr],
        ..conn.clone()
    };
    let result = async {
        let c = connect(&args).await?;
        let info = c
            .list_logs()
            .await?
            .into_iter()
            .find(|l| l.name == log)
            .ok_or_else(|| failure(format!("no log named {log:?} on this replica")))?;
        Ok::<_, Failure>((c, info))
    }
    .await;
    match result {
        Ok((c, info)) => {
            r.client = Some(c);
            r.start = info.start;
            r.committed = info.committed;
        }
        Err(f) => r.error = Some(f.message),
    }
    r
}

async fn checksum(c: &Client, log: &str, lo: u64, hi: u64, range: u64) -> Result<Sums, Failure> {
    let mut sums = Sums::new();
    let mut pos = lo;
    let opts = ReadOptions {
        bytes_max: 4 << 20,
        min_offset: Some(0),
        ..ReadOptions::default()
    };
    while pos < hi {
        let read = c.read_batches(log, pos, opts.clone()).await?;
        if read.batches.is_empty() {
            return Err(failure(format!(
                "the replica returned nothing at offset {pos} (committed {})",
                read.committed
            )));
        }
        for b in &read.batches {
            let view = protocol::format::batch::decode(b)
                .map_err(|e| failure(format!("batch at {pos}: {e}")))?;
            let h = view.header();
            let (base, next) = (h.base_offset().0, h.next_offset().0);
            if base < lo || next > hi {
                continue;
            }
            let e = sums.entry(base / range).or_insert((0, 0));
            e.0 = crc32c::crc32c_append(e.0, b);
            e.1 += 1;
        }
        pos = read.next_offset;
    }
    Ok(sums)
}

pub(crate) async fn run(conn: &ConnArgs, log: &str, range: u64) -> Result<(), Failure> {
    let first = connect(conn).await?.status().await?;
    let leader_addr = if first.role == "follower" && !first.leader.is_empty() {
        first.leader.clone()
    } else {
        conn.servers[0].clone()
    };
    let status = leader_status(conn).await?;
    let mut replicas = vec![open(conn, status.node_id.clone(), leader_addr, log).await];
    if let Some(r) = status.replication.iter().find(|r| r.log == log) {
        for f in &r.followers {
            if f.addr.is_empty() {
                replicas.push(Replica {
                    id: f.id.clone(),
                    addr: String::new(),
                    client: None,
                    start: 0,
                    committed: 0,
                    sums: Sums::new(),
                    error: Some(
                        "its address is unknown (it has not connected since the leader started)"
                            .into(),
                    ),
                });
            } else {
                replicas.push(open(conn, f.id.clone(), f.addr.clone(), log).await);
            }
        }
    }
    let readable = || replicas.iter().filter(|r| r.error.is_none());
    let lo = readable().map(|r| r.start).max().unwrap_or(0);
    let hi = readable().map(|r| r.committed).min().unwrap_or(0);
    for r in replicas.iter_mut() {
        if let Some(c) = r.client.take() {
            match checksum(&c, log, lo, hi.max(lo), range).await {
                Ok(s) => r.sums = s,
                Err(f) => r.error = Some(f.message),
            }
        }
    }
    let reference = replicas[0].sums.clone();
    let mut identical = replicas.iter().all(|r| r.error.is_none());
    let mut reports = Vec::new();
    for r in &replicas {
        let mut differing: Vec<(u64, u64)> = Vec::new();
        if r.error.is_none() {
            let keys: std::collections::BTreeSet<u64> =
                reference.keys().chain(r.sums.keys()).copied().collect();
            for k in keys {
                if reference.get(&k) != r.sums.get(&k) {
                    differing.push(((k * range).max(lo), ((k + 1) * range).min(hi)));
                }
            }
        }
        identical &= differing.is_empty();
        reports.push((r, differing));
    }
    if conn.json {
        let list: Vec<_> = reports
            .iter()
            .map(|(r, d)| {
                let d: Vec<_> = d.iter().map(|(a, b)| json!({"from": a, "to": b})).collect();
                json!({
                    "id": r.id, "addr": r.addr, "start": r.start, "committed": r.committed,
                    "ranges": r.sums.len(), "batches": r.sums.values().map(|v| v.1).sum::<u64>(),
                    "differing": d, "error": r.error,
                })
            })
            .collect();
        out(json!({
            "log": log, "from": lo, "to": hi.max(lo), "range_records": range,
            "identical": identical, "replicas": list,
        })
        .to_string())?;
    } else {
        out(format!(
            "log {log}: offsets {lo}..{} in ranges of {range} records",
            hi.max(lo)
        ))?;
        for (r, d) in &reports {
            let state = match (&r.error, d.is_empty()) {
                (Some(e), _) => format!("NOT VERIFIED: {e}"),
                (None, true) => format!("identical ({} ranges)", r.sums.len()),
                (None, false) => format!(
                    "DIFFERS in {}",
                    d.iter()
                        .map(|(a, b)| format!("{a}..{b}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            out(format!("  {} {}\t{state}", r.id, r.addr))?;
        }
    }
    if identical {
        Ok(())
    } else {
        Err(failure("the replicas are not verified identical"))
    }
}

/// The leader's status (asking `conn`'s node, or the leader it follows).
async fn leader_status(conn: &ConnArgs) -> Result<protocol::StatusResponse, Failure> {
    let status = connect(conn).await?.status().await?;
    if status.role != "follower" || status.leader.is_empty() {
        return Ok(status);
    }
    let args = ConnArgs {
        servers: vec![status.leader.clone()],
        ..conn.clone()
    };
    Ok(connect(&args).await?.status().await?)
}

pub(crate) async fn catchup(
    conn: &ConnArgs,
    log: &str,
    timeout: std::time::Duration,
) -> Result<(), Failure> {
    use std::io::Write;
    let deadline = std::time::Instant::now() + timeout;
    let tty = !conn.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        let status = leader_status(conn).await?;
        let r = status
            .replication
            .iter()
            .find(|r| r.log == log)
            .ok_or_else(|| failure(format!("the leader has no replicated log {log:?}")))?;
        let end = status
            .logs
            .iter()
            .find(|l| l.name == log)
            .map_or(0, |l| l.end);
        let done = r
            .followers
            .iter()
            .all(|f| f.connected && f.lag_records == 0);
        let lines: Vec<String> = r
            .followers
            .iter()
            .map(|f| {
                let (d, t) = if f.catchup_total_bytes > 0 {
                    (f.catchup_done_bytes, f.catchup_total_bytes)
                } else {
                    (f.durable, end.max(1))
                };
                let bar = if f.catchup_total_bytes > 0 {
                    crate::progress_bar(d, t)
                } else {
                    format!("{} of {end} records", f.durable)
                };
                format!(
                    "{:<12} {} {bar}",
                    f.id,
                    if f.connected {
                        "connected   "
                    } else {
                        "disconnected"
                    }
                )
            })
            .collect();
        if conn.json {
            out(crate::replication_json(r).to_string())?;
        } else if tty {
            let mut err = std::io::stderr().lock();
            for l in &lines {
                let _ = writeln!(err, "\x1b[2K{l}");
            }
            if !done {
                let _ = write!(err, "\x1b[{}A", lines.len());
            }
        } else if done {
            for l in &lines {
                eprintln!("{l}");
            }
        }
        if done {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(failure("followers did not catch up in time"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
