//! Node metrics and the Prometheus text endpoint.
//!
//! Counters are atomics shared by every shard. Latency histograms are HdrHistograms, one per
//! shard behind an uncontended mutex (only the scrape takes it from another thread); a scrape
//! merges them and renders Prometheus histogram buckets from the merged counts.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bounds (seconds) of the exported latency buckets.
const BUCKETS_S: &[f64] = &[
    0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Largest request the endpoint reads before answering.
const HTTP_REQUEST_BYTES_MAX: usize = 8192;

#[derive(Default)]
pub struct Counters {
    pub appends: AtomicU64,
    pub append_records: AtomicU64,
    pub append_bytes: AtomicU64,
    pub append_duplicates: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_open: AtomicU64,
    pub auth_failures: AtomicU64,
    pub slow_readers_cut: AtomicU64,
    pub forwarded: AtomicU64,
    pub sync_set_changes: AtomicU64,
    pub appends_degraded: AtomicU64,
    pub replicated_bytes: AtomicU64,
    pub replication_refusals: AtomicU64,
    pub bootstraps: AtomicU64,
}

pub struct ShardHistograms {
    /// Request decoded to receipt ready, microseconds.
    pub append: Histogram<u64>,
    /// Append queued to fdatasync covering it, microseconds.
    pub flush: Histogram<u64>,
    /// Leader: a replication frame sent to a follower to the follower's acknowledgement that
    /// it holds it durably, microseconds.
    pub follower_ack: Histogram<u64>,
}

pub struct Metrics {
    pub c: Counters,
    shards: Vec<Mutex<ShardHistograms>>,
    error_codes: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// The latest replication state of each log this node leads, by log name.
    replication: Mutex<std::collections::BTreeMap<String, protocol::LogReplication>>,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl Metrics {
    pub fn new(shards: usize) -> Arc<Metrics> {
        Arc::new(Metrics {
            c: Counters::default(),
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(ShardHistograms {
                        append: new_hist(),
                        flush: new_hist(),
                        follower_ack: new_hist(),
                    })
                })
                .collect(),
            error_codes: Mutex::new(Default::default()),
            replication: Mutex::new(Default::default()),
        })
    }

    pub fn record_append(&self, shard: usize, total: Duration, flush: Option<Duration>) {
        let mut h = self.shards[shard].lock().unwrap();
        h.append.saturating_record(total.as_micros() as u64);
        if let Some(f) = flush {
            h.flush.saturating_record(f.as_micros() as u64);
        }
    }

    pub fn record_follower_ack(&self, shard: usize, latency: Duration) {
        let mut h = self.shards[shard].lock().unwrap();
        h.follower_ack.saturating_record(latency.as_micros() as u64);
    }

    /// Publish a log's replication state (lag, sync set, commit) for the next scrape.
    pub fn set_replication(&self, log: &str, state: protocol::LogReplication) {
        self.replication
            .lock()
            .unwrap()
            .insert(log.to_string(), state);
    }

    pub fn record_error(&self, code: protocol::ErrorCode) {
        self.c.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .error_codes
            .lock()
            .unwrap()
            .entry(code.name())
            .or_default() += 1;
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = &self.c;
        let counters: [(&str, &str, &AtomicU64); 17] = [
            (
                "replog_appends_total",
                "Append requests stored.",
                &c.appends,
            ),
            (
                "replog_append_records_total",
                "Records stored by appends.",
                &c.append_records,
            ),
            (
                "replog_append_bytes_total",
                "Record bytes stored by appends.",
                &c.append_bytes,
            ),
            (
                "replog_append_duplicates_total",
                "Idempotent retries answered with the original receipt.",
                &c.append_duplicates,
            ),
            (
                "replog_reads_total",
                "Read and tail frames served.",
                &c.reads,
            ),
            (
                "replog_read_bytes_total",
                "Batch bytes served to readers.",
                &c.read_bytes,
            ),
            (
                "replog_connections_accepted_total",
                "Client connections accepted.",
                &c.connections_accepted,
            ),
            (
                "replog_connections_refused_total",
                "Connections closed at once because connections_max was reached.",
                &c.connections_refused,
            ),
            (
                "replog_auth_failures_total",
                "Connections closed for a missing or wrong token.",
                &c.auth_failures,
            ),
            (
                "replog_slow_readers_cut_total",
                "Streams reset because the reader took no data for write_stall_timeout_ms.",
                &c.slow_readers_cut,
            ),
            (
                "replog_forwarded_total",
                "Requests forwarded to the shard that owns the log.",
                &c.forwarded,
            ),
            (
                "replog_errors_total",
                "Error answers sent, all codes.",
                &c.errors,
            ),
            (
                "replog_sync_set_changes_total",
                "Followers that joined or left a sync set.",
                &c.sync_set_changes,
            ),
            (
                "replog_appends_degraded_total",
                "acks=sync appends acknowledged degraded (sync set short, insufficient_replicas = degrade).",
                &c.appends_degraded,
            ),
            (
                "replog_replicated_bytes_total",
                "Batch bytes sent to followers.",
                &c.replicated_bytes,
            ),
            (
                "replog_replication_refusals_total",
                "Replication sessions a follower ended because of a refused frame or a failed step.",
                &c.replication_refusals,
            ),
            (
                "replog_bootstraps_total",
                "Local replicas replaced by a bootstrap from the leader's first stored offset.",
                &c.bootstraps,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP replog_connections_open Client connections open now.\n# TYPE replog_connections_open gauge\nreplog_connections_open {}",
            c.connections_open.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP replog_error_answers_total Error answers sent, by code.\n# TYPE replog_error_answers_total counter"
        );
        for (code, n) in self.error_codes.lock().unwrap().iter() {
            let _ = writeln!(out, "replog_error_answers_total{{code=\"{code}\"}} {n}");
        }
        self.render_replication(&mut out);
        let (mut append, mut flush, mut ack) = (new_hist(), new_hist(), new_hist());
        for s in &self.shards {
            let s = s.lock().unwrap();
            append.add(&s.append).expect("same bounds");
            flush.add(&s.flush).expect("same bounds");
            ack.add(&s.follower_ack).expect("same bounds");
        }
        render_histogram(
            &mut out,
            "replog_append_latency_seconds",
            "Append latency on the node, from request decoded to receipt ready.",
            &append,
        );
        render_histogram(
            &mut out,
            "replog_flush_latency_seconds",
            "From an append queued to the fdatasync that covers it.",
            &flush,
        );
        render_histogram(
            &mut out,
            "replog_follower_ack_latency_seconds",
            "Leader: from a replication frame sent to the follower's acknowledgement that it is durable there.",
            &ack,
        );
        out
    }
}

impl Metrics {
    fn render_replication(&self, out: &mut String) {
        let repl = self.replication.lock().unwrap();
        type Field = fn(&protocol::FollowerStatus) -> f64;
        let per_follower: [(&str, &str, Field); 5] = [
            (
                "replog_follower_lag_records",
                "Records the follower is behind the leader's end.",
                |f| f.lag_records as f64,
            ),
            (
                "replog_follower_lag_bytes",
                "Bytes the follower is behind the leader's end (by segment position).",
                |f| f.lag_bytes as f64,
            ),
            (
                "replog_follower_lag_seconds",
                "Time since the follower last had everything the leader has.",
                |f| f.lag_ms as f64 / 1e3,
            ),
            (
                "replog_follower_in_sync_set",
                "1 if the follower is in the sync set.",
                |f| f64::from(u8::from(f.in_sync_set)),
            ),
            (
                "replog_follower_connected",
                "1 if the follower's replication stream is open.",
                |f| f64::from(u8::from(f.connected)),
            ),
        ];
        for (name, help, get) in per_follower {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (log, l) in repl.iter() {
                for f in &l.followers {
                    let _ = writeln!(
                        out,
                        "{name}{{log=\"{log}\",follower=\"{}\"}} {}",
                        f.id,
                        get(f)
                    );
                }
            }
        }
        let _ = writeln!(out, "# HELP replog_sync_shortfall Empty sync-set places: the durability debt while degraded.\n# TYPE replog_sync_shortfall gauge");
        for (log, l) in repl.iter() {
            let _ = writeln!(
                out,
                "replog_sync_shortfall{{log=\"{log}\"}} {}",
                l.sync_shortfall
            );
        }
        let _ = writeln!(out, "# HELP replog_commit_offset The log's commit offset on its leader.\n# TYPE replog_commit_offset gauge");
        for (log, l) in repl.iter() {
            let _ = writeln!(out, "replog_commit_offset{{log=\"{log}\"}} {}", l.commit);
        }
    }
}

fn render_histogram(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for le in BUCKETS_S {
        let us = (le * 1e6) as u64;
        let n = h.count_between(0, us);
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.len());
    let sum: f64 = h
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum();
    let _ = writeln!(out, "{name}_sum {}", sum / 1e6);
    let _ = writeln!(out, "{name}_count {}", h.len());
}

/// Serve `GET /metrics` on `listener` until the runtime stops. Anything else gets a 404.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; HTTP_REQUEST_BYTES_MAX];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        return true;
                    }
                }
                false
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = buf[..n].split(|&b| b == b'\r').next().unwrap_or_default();
            let (status, body) =
                if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET /metrics?") {
                    ("200 OK", metrics.render())
                } else {
                    ("404 Not Found", "not found: try GET /metrics\n".to_string())
                };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Bind the metrics endpoint on a thread of its own, so a scrape never runs on a shard.
pub fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, crate::Error> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| crate::Error::Io(format!("bind metrics endpoint {addr}: {e}")))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| crate::Error::Io(e.to_string()))?;
    let local = std_listener
        .local_addr()
        .map_err(|e| crate::Error::Io(e.to_string()))?;
    std::thread::Builder::new()
        .name("replog-metrics".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("metrics runtime");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).expect("metrics listener");
                serve(listener, metrics).await
            });
        })
        .map_err(|e| crate::Error::Io(format!("spawn metrics thread: {e}")))?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::new(2);
        m.c.appends.fetch_add(3, Ordering::Relaxed);
        m.record_append(
            0,
            Duration::from_micros(150),
            Some(Duration::from_micros(120)),
        );
        m.record_append(1, Duration::from_millis(3), None);
        m.record_error(protocol::ErrorCode::OffsetConflict);
        let text = m.render();
        assert!(text.contains("replog_appends_total 3"), "{text}");
        assert!(
            text.contains("replog_append_latency_seconds_bucket{le=\"0.0002\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("replog_append_latency_seconds_bucket{le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("replog_append_latency_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("replog_flush_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("replog_error_answers_total{code=\"offset_conflict\"} 1"),
            "{text}"
        );
    }
}
