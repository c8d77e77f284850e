//! The background scrub: every replica re-reads its sealed segments and checks every batch's
//! crc32c and framing (`Log::scrub`), at most `log.scrub_bytes_per_sec` per shard, one full pass
//! every `log.scrub_interval_ms`; a follower also compares each sound segment's checksum with
//! its leader's copy of the same records (`Checksum`), which finds batches that are intact but
//! not the leader's. A damaged range is reported (an error line, the
//! `replog_scrub_damaged_total` counter, `status`), is no longer served (log-core refuses it),
//! and is repaired with the same batches read from a healthy replica: a follower asks its
//! leader, a leader its followers. Replicas hold the same batches byte for byte, so a repair
//! writes back exactly what the segment held before the damage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log_core::{Damage, Offset, Scrubbed};
use protocol::{ReadRequest, Request, Response};

use crate::shard::{LogEntry, Shard};

/// The pause before the first pass, so a node that just started serves first.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(1);
/// How long one exchange with another replica (connecting, a checksum, fetching a damaged
/// range) may take.
pub const REPAIR_TIMEOUT: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Peer connections of one pass, made when first needed.
#[derive(Default)]
struct Peers {
    endpoint: Option<quinn::Endpoint>,
    conns: HashMap<SocketAddr, quinn::Connection>,
}

impl Peers {
    /// A connection to the replica at `addr` (node `id`, if known, for TLS).
    async fn get(
        &mut self,
        shard: &Shard,
        id: Option<&str>,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, String> {
        if let Some(c) = self.conns.get(&addr).filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        if self.endpoint.is_none() {
            let local: SocketAddr = if addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            self.endpoint = Some(quinn::Endpoint::client(local).map_err(|e| e.to_string())?);
        }
        let endpoint = self.endpoint.as_ref().expect("made above");
        let server_name = match id {
            Some(id) => crate::tls::peer_name(id),
            None => shard
                .common
                .config
                .replication
                .leader_name
                .clone()
                .unwrap_or_else(|| addr.ip().to_string()),
        };
        let connecting = endpoint
            .connect_with(shard.common.peer_client.clone(), addr, &server_name)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(REPAIR_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("no connection within {REPAIR_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        self.conns.insert(addr, conn.clone());
        Ok(conn)
    }

    fn close(self) {
        for c in self.conns.values() {
            c.close(0u32.into(), b"scrub pass done");
        }
        if let Some(e) = self.endpoint {
            e.close(0u32.into(), b"");
        }
    }
}

/// Scrub the shard's logs until it closes.
pub(crate) async fn run(shard: Rc<Shard>) {
    let cfg = &shard.common.config.log;
    let rate = cfg.scrub_bytes_per_sec.max(1);
    let interval = Duration::from_millis(cfg.scrub_interval_ms);
    tokio::time::sleep(FIRST_PASS_AFTER).await;
    while !shard.closing.get() {
        let began = Instant::now();
        let mut peers = Peers::default();
        let logs = shard.entries();
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
                let damaged = if found.damaged.is_empty() {
                    compare_with_leader(&shard, &mut peers, &name, &entry, &found).await
                } else {
                    found.damaged.clone()
                };
                for d in &damaged {
                    report_and_repair(&shard, &mut peers, &name, &entry, base, &file, d).await;
                }
                // The rate limit: this segment's share of a second.
                tokio::time::sleep(Duration::from_secs_f64(found.bytes as f64 / rate as f64)).await;
            }
        }
        peers.close();
        let next = began + interval;
        while !shard.closing.get() && Instant::now() < next {
            tokio::time::sleep((next - Instant::now()).min(Duration::from_secs(1))).await;
        }
    }
}

/// On a follower: the batches of a sound sealed segment that differ from the leader's copy
/// (each one a damaged range), found by comparing checksums and, where they differ, the
/// batches themselves. Nothing when this node is not a follower, the leader cannot be asked,
/// or the copies agree.
async fn compare_with_leader(
    shard: &Shard,
    peers: &mut Peers,
    name: &str,
    entry: &LogEntry,
    found: &Scrubbed,
) -> Vec<Damage> {
    let Some((id, leader)) = sources(shard, name, entry).into_iter().next() else {
        return Vec::new();
    };
    if entry.following.is_none() || found.from == found.until {
        return Vec::new();
    }
    let compared = async {
        let conn = peers.get(shard, id.as_deref(), leader).await?;
        let limits = shard.common.config.protocol_limits();
        let req = Request::Checksum {
            log: name.to_string(),
            from: found.from.0,
            until: found.until.0,
        };
        let theirs = timed(follower::session::exchange(&conn, &req, &limits)).await?;
        match theirs {
            Response::Checksum { crc, bytes } if crc == found.crc && bytes == found.bytes => {
                return Ok(Vec::new())
            }
            Response::Checksum { .. } => {}
            // The leader no longer has the range (retention): nothing to compare with.
            Response::Error(e) if e.code == protocol::ErrorCode::OffsetOutOfRange => {
                return Ok(Vec::new())
            }
            Response::Error(e) => return Err(format!("{}: {}", e.code.name(), e.message)),
            other => return Err(format!("unexpected answer {other:?}")),
        }
        // They differ: find the batches that do.
        let whole = Damage {
            from: found.from,
            until: found.until,
            position: 0,
            len: found.bytes,
            detail: String::new(),
        };
        let theirs = fetch(&conn, shard, name, &whole).await?;
        let ours = entry
            .log
            .read(found.from, found.until, usize::MAX)
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let (mut pos, mut position) = (0usize, 0u64);
        for b in &ours.batches {
            let h = *b.view().header();
            let len = b.len();
            let same_frame = theirs
                .get(pos..pos + len)
                .and_then(|t| log_core::batch::header(t).ok())
                .is_some_and(|t| {
                    t.base_offset() == h.base_offset() && t.batch_len() == h.batch_len()
                });
            if !same_frame {
                return Err(format!(
                    "its batches from offset {} on are laid out differently from the leader's",
                    h.base_offset().0
                ));
            }
            if theirs[pos..pos + len] != b[..] {
                out.push(Damage {
                    from: h.base_offset(),
                    until: h.next_offset(),
                    position,
                    len: len as u64,
                    detail: "an intact batch that differs from the leader's".into(),
                });
            }
            pos += len;
            position += len as u64;
        }
        Ok::<_, String>(out)
    }
    .await;
    match compared {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(log = name, from = found.from.0, until = found.until.0, error = %e, "the scrub could not compare a segment with the leader's copy");
            Vec::new()
        }
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, follower::session::SessionError>>,
) -> Result<T, String> {
    tokio::time::timeout(REPAIR_TIMEOUT, f)
        .await
        .map_err(|_| format!("no answer within {REPAIR_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())
}

/// Report a damaged range and repair it from another replica, if one can be reached.
async fn report_and_repair(
    shard: &Rc<Shard>,
    peers: &mut Peers,
    name: &str,
    entry: &Rc<LogEntry>,
    base: Offset,
    file: &str,
    d: &Damage,
) {
    tracing::error!(log = name, file, from = d.from.0, until = d.until.0, position = d.position, detail = %d.detail, "the scrub found a damaged range in a sealed segment; it is not served until repaired");
    let c = &shard.common;
    c.metrics.c.scrub_damaged.fetch_add(1, Ordering::Relaxed);
    let report = protocol::Damaged {
        log: name.to_string(),
        from: d.from.0,
        until: d.until.0,
        file: file.to_string(),
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
        let fetched = async {
            let conn = peers.get(shard, id.as_deref(), addr).await?;
            fetch(&conn, shard, name, d).await
        }
        .await;
        let repaired = match fetched {
            Ok(bytes) => entry
                .log
                .repair(base, d, bytes)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match repaired {
            Ok(()) => {
                tracing::warn!(log = name, from = d.from.0, until = d.until.0, %addr, "repaired the damaged range from another replica");
                c.metrics.c.scrub_repaired.fetch_add(1, Ordering::Relaxed);
                let mut list = c.damaged.lock().unwrap_or_else(|p| p.into_inner());
                for x in list
                    .iter_mut()
                    .filter(|x| x.log == report.log && x.from == report.from && x.repaired_ms == 0)
                {
                    x.repaired_ms = now_ms();
                }
                return;
            }
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

/// Read exactly the batches of the range `d` from another replica.
async fn fetch(
    conn: &quinn::Connection,
    shard: &Shard,
    name: &str,
    d: &Damage,
) -> Result<Vec<u8>, String> {
    let limits = shard.common.config.protocol_limits();
    let mut out = Vec::with_capacity(d.len as usize);
    let mut from = d.from.0;
    while from < d.until.0 {
        let req = Request::Read(ReadRequest {
            log: name.to_string(),
            from,
            bytes_max: u32::try_from(d.len.saturating_sub(out.len() as u64)).unwrap_or(u32::MAX),
            wait_ms: 0,
            min_offset: d.until.0,
        });
        let batches = match timed(follower::session::exchange(conn, &req, &limits)).await? {
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
    Ok(out)
}
