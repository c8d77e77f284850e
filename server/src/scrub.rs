//! The background scrub: every replica re-reads its sealed segments and checks every batch's
//! crc32c and framing (`Log::scrub`), at most `log.scrub_bytes_per_sec` per shard, one full pass
//! every `log.scrub_interval_ms`. A damaged range is reported (an error line, the
//! `replog_scrub_damaged_total` counter, `status`), is no longer served (log-core refuses it),
//! and is repaired with the same batches read from a healthy replica: a follower asks its
//! leader, a leader its followers. Replicas hold the same batches byte for byte, so a repair
//! writes back exactly what the segment held before the damage.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log_core::{Damage, Offset};
use protocol::{ReadRequest, Request, Response};

use crate::shard::{LogEntry, Shard};

/// The pause before the first pass, so a node that just started serves first.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(1);
/// How long fetching a damaged range from another replica may take.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Scrub the shard's logs until it closes.
pub(crate) async fn run(shard: Rc<Shard>) {
    let cfg = &shard.common.config.log;
    let rate = cfg.scrub_bytes_per_sec.max(1);
    let interval = Duration::from_millis(cfg.scrub_interval_ms);
    tokio::time::sleep(FIRST_PASS_AFTER).await;
    while !shard.closing.get() {
        let began = Instant::now();
        let logs: Vec<(String, Rc<LogEntry>)> = shard
            .logs
            .borrow()
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        for (name, entry) in logs {
            for base in entry.log.sealed_bases() {
                if shard.closing.get() || entry.retired.get() {
                    break;
                }
                let Some(found) = entry.log.scrub(base) else {
                    continue;
                };
                shard
                    .common
                    .metrics
                    .c
                    .scrub_bytes
                    .fetch_add(found.bytes, Ordering::Relaxed);
                let file = found.path.display().to_string();
                for d in &found.damaged {
                    damaged(&shard, &name, &entry, base, &file, d).await;
                }
                // The rate limit: this segment's share of a second.
                tokio::time::sleep(Duration::from_secs_f64(found.bytes as f64 / rate as f64)).await;
            }
        }
        let next = began + interval;
        while !shard.closing.get() && Instant::now() < next {
            tokio::time::sleep((next - Instant::now()).min(Duration::from_secs(1))).await;
        }
    }
}

/// Report a damaged range and repair it from another replica, if one can be reached.
async fn damaged(
    shard: &Rc<Shard>,
    name: &str,
    entry: &Rc<LogEntry>,
    base: Offset,
    file: &str,
    d: &Damage,
) {
    let file = file.to_string();
    tracing::error!(log = name, file = %file, from = d.from.0, until = d.until.0, position = d.position, detail = %d.detail, "the scrub found a damaged range in a sealed segment; it is not served until repaired");
    let c = &shard.common;
    c.metrics.c.scrub_damaged.fetch_add(1, Ordering::Relaxed);
    let report = protocol::Damaged {
        log: name.to_string(),
        from: d.from.0,
        until: d.until.0,
        file,
        position: d.position,
        detail: d.detail.clone(),
        at_ms: now_ms(),
        repaired_ms: 0,
    };
    {
        let mut list = c.damaged.lock().unwrap_or_else(|p| p.into_inner());
        // The same damage found again by a later pass is one finding.
        if !list
            .iter()
            .any(|x| x.log == report.log && x.from == report.from && x.repaired_ms == 0)
        {
            list.push(report.clone());
        }
    }
    let mut last_error = "no other replica to repair from".to_string();
    for (id, addr) in sources(shard, name, entry) {
        match fetch(shard, id.as_deref(), addr, name, d).await {
            Ok(bytes) => match entry.log.repair(base, d, bytes).await {
                Ok(()) => {
                    tracing::warn!(log = name, from = d.from.0, until = d.until.0, %addr, "repaired the damaged range from another replica");
                    c.metrics.c.scrub_repaired.fetch_add(1, Ordering::Relaxed);
                    let mut list = c.damaged.lock().unwrap_or_else(|p| p.into_inner());
                    for x in list.iter_mut().filter(|x| {
                        x.log == report.log && x.from == report.from && x.repaired_ms == 0
                    }) {
                        x.repaired_ms = now_ms();
                    }
                    return;
                }
                Err(e) => last_error = format!("{addr}: {e}"),
            },
            Err(e) => last_error = format!("{addr}: {e}"),
        }
    }
    tracing::error!(log = name, from = d.from.0, until = d.until.0, error = %last_error, "the damaged range is not repaired yet; the next pass tries again");
}

/// The replicas to repair `name` from: a follower's leader, a leader's followers (with their
/// node ids where known, for TLS).
fn sources(shard: &Shard, name: &str, entry: &LogEntry) -> Vec<(Option<String>, SocketAddr)> {
    if let Some(leader) = entry.following {
        let id = shard
            .common
            .control
            .as_ref()
            .and_then(|c| c.log_record(name))
            .and_then(|r| r.leader);
        return vec![(id, leader)];
    }
    match entry.leading() {
        Some(repl) => repl
            .follower_addrs()
            .into_iter()
            .map(|(id, a)| (Some(id), a))
            .collect(),
        None => Vec::new(),
    }
}

/// Read exactly the batches of the damaged range from the replica at `addr`.
async fn fetch(
    shard: &Shard,
    id: Option<&str>,
    addr: SocketAddr,
    name: &str,
    d: &Damage,
) -> Result<Vec<u8>, String> {
    let cfg = &shard.common.config;
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(local).map_err(|e| e.to_string())?;
    let server_name = match id {
        Some(id) => crate::tls::peer_name(id),
        None => cfg
            .replication
            .leader_name
            .clone()
            .unwrap_or_else(|| addr.ip().to_string()),
    };
    let result = tokio::time::timeout(REPAIR_TIMEOUT, async {
        let conn = endpoint
            .connect_with(shard.common.peer_client.clone(), addr, &server_name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let limits = cfg.protocol_limits();
        let mut out = Vec::with_capacity(d.len as usize);
        let mut from = d.from.0;
        while from < d.until.0 {
            let req = Request::Read(ReadRequest {
                log: name.to_string(),
                from,
                bytes_max: u32::try_from(d.len - out.len() as u64).unwrap_or(u32::MAX),
                wait_ms: 0,
                min_offset: d.until.0,
            });
            let answer = follower::session::exchange(&conn, &req, &limits)
                .await
                .map_err(|e| e.to_string())?;
            let batches = match answer {
                Response::Batches(b) => b.batches,
                Response::Error(e) => return Err(format!("{}: {}", e.code.name(), e.message)),
                other => return Err(format!("unexpected answer {other:?}")),
            };
            let mut pos = 0;
            while pos < batches.len() && from < d.until.0 {
                let h = log_core::batch::header(&batches[pos..]).map_err(|e| e.to_string())?;
                if h.base_offset().0 != from {
                    return Err(format!(
                        "the replica's batch starts at offset {} where {from} was expected",
                        h.base_offset().0
                    ));
                }
                let len = h.batch_len();
                let bytes = batches
                    .get(pos..pos + len)
                    .ok_or("a batch cut short in the answer")?;
                out.extend_from_slice(bytes);
                from = h.next_offset().0;
                pos += len;
            }
            if pos == 0 {
                return Err("the replica answered no batch".into());
            }
        }
        conn.close(0u32.into(), b"repaired");
        Ok(out)
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {REPAIR_TIMEOUT:?}")));
    endpoint.close(0u32.into(), b"");
    result
}
