//! Node metrics and the Prometheus text endpoint.
//!
//! Counters are atomics shared by every shard. Latency histograms are HdrHistograms, one per
//! shard behind an uncontended mutex (only the scrape takes it from another thread); a scrape
//! merges them and renders Prometheus histogram buckets from the merged counts.
//!
//! `replog_stage_latency_seconds{stage=...}` splits an append's time into [`Stage`]s, with the
//! finer [`STAGE_BUCKETS_S`] so that a tool scraping before and after a run can estimate
//! percentiles per stage from the bucket deltas.

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

/// Upper bounds (seconds) of the `replog_stage_latency_seconds` buckets: six per decade
/// (1, 1.5, 2, 3, 5, 7) from 10 µs to 10 s, fine enough to estimate percentiles from the
/// difference of two scrapes.
pub const STAGE_BUCKETS_S: &[f64] = &[
    0.000_01, 0.000_015, 0.000_02, 0.000_03, 0.000_05, 0.000_07, // 10 µs
    0.000_1, 0.000_15, 0.000_2, 0.000_3, 0.000_5, 0.000_7, // 100 µs
    0.001, 0.001_5, 0.002, 0.003, 0.005, 0.007, // 1 ms
    0.01, 0.015, 0.02, 0.03, 0.05, 0.07, // 10 ms
    0.1, 0.15, 0.2, 0.3, 0.5, 0.7, // 100 ms
    1.0, 1.5, 2.0, 3.0, 5.0, 7.0, // 1 s
    10.0,
];

/// The stages of an append's path that `replog_stage_latency_seconds` times, each the value of
/// its `stage` label.
///
/// On a leader (or standalone node) the stages of one append follow each other and add up to
/// its time in the node, from its stream accepted to its receipt handed to QUIC: `request`,
/// `receive`, `submitted`, `written`, `durable`, then for acks=sync/quorum `replicated`, then
/// `sent` (docs/replication.md §8, "the latency budget"). `leader_flush` (= submitted + written +
/// durable) and `commit` (= leader_flush + replicated) are kept as they were: both start when
/// the append is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Leader or standalone: from the request's stream accepted (on the shard whose connection
    /// it came on) to the append starting on the shard that owns the log: reading and decoding
    /// the request, and the hop to the owning shard when there is one.
    Request,
    /// Leader or standalone: from the shard that owns the log starting to serve the (decoded)
    /// append request to the append queued into the log. It includes the admission checks and
    /// waiting for room in a full write queue (the same start as
    /// `replog_append_latency_seconds`).
    Receive,
    /// Leader or standalone: from the append queued to the write carrying it handed to the
    /// kernel (the log's writer task taking the queue; disk operations are submitted at once).
    Submitted,
    /// Leader or standalone: from that write submitted to its completion (the records are in
    /// the page cache, readable).
    Written,
    /// Leader or standalone: from the write's completion to the append seeing the leader's
    /// fdatasync that covers it.
    Durable,
    /// Leader or standalone: from the append queued to the node's own fdatasync covering it
    /// (the same value as `replog_flush_latency_seconds`; appends with acks=none have none).
    LeaderFlush,
    /// Leader, acks=sync/quorum appends only: from the leader's own flush seen to the requested
    /// commit level reached (the followers' acknowledgements that they hold it durably).
    Replicated,
    /// Leader, acks=sync/quorum appends only: from the append queued to the requested commit
    /// level reached (not recorded for appends acknowledged degraded).
    Commit,
    /// Leader or standalone: from the append's level reached to its receipt written into the
    /// stream (confirming the leadership, encoding, handing the frame to QUIC).
    Sent,
    /// Follower: from a replication frame with records read whole off the stream to the frame
    /// stored (queued into the local log).
    FollowerReceive,
    /// Follower: from a frame stored to the follower's fdatasync covering its last record.
    FollowerFlush,
}

impl Stage {
    /// Every stage, in the order they are rendered.
    pub const ALL: [Stage; 11] = [
        Stage::Request,
        Stage::Receive,
        Stage::Submitted,
        Stage::Written,
        Stage::Durable,
        Stage::LeaderFlush,
        Stage::Replicated,
        Stage::Commit,
        Stage::Sent,
        Stage::FollowerReceive,
        Stage::FollowerFlush,
    ];

    /// The `stage` label value.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Request => "request",
            Stage::Receive => "receive",
            Stage::Submitted => "submitted",
            Stage::Written => "written",
            Stage::Durable => "durable",
            Stage::LeaderFlush => "leader_flush",
            Stage::Replicated => "replicated",
            Stage::Sent => "sent",
            Stage::FollowerReceive => "follower_receive",
            Stage::FollowerFlush => "follower_flush",
            Stage::Commit => "commit",
        }
    }
}

/// What one successful (not duplicate) append measured, for [`Metrics::record_append`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AppendTimes {
    /// Request decoded to receipt ready.
    pub total: Duration,
    /// [`Stage::Request`].
    pub request: Duration,
    /// [`Stage::Submitted`], [`Stage::Written`] and [`Stage::Durable`], when the leader waited
    /// for its flush and the log still knew the write's timings.
    pub write: Option<[Duration; 3]>,
    /// [`Stage::Replicated`]; `None` unless acks=sync/quorum reached without degrading.
    pub replicated: Option<Duration>,
    /// [`Stage::Receive`].
    pub receive: Duration,
    /// [`Stage::LeaderFlush`], also `replog_flush_latency_seconds`; `None` for acks=none.
    pub flush: Option<Duration>,
    /// [`Stage::Commit`]; `None` unless acks=sync/quorum reached without degrading.
    pub commit: Option<Duration>,
}

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
    pub quarantined_records: AtomicU64,
    pub quarantined_bytes: AtomicU64,
    pub scrub_bytes: AtomicU64,
    pub scrub_damaged: AtomicU64,
    pub scrub_repaired: AtomicU64,
    /// Gauge: 1 while the controller's storage is out of space.
    pub controller_no_space: AtomicU64,
    /// Gauge: logs whose storage failed and that wait to be reopened.
    pub logs_failed: AtomicU64,
}

pub struct ShardHistograms {
    /// Request decoded to receipt ready, microseconds.
    pub append: Histogram<u64>,
    /// Append queued to fdatasync covering it, microseconds.
    pub flush: Histogram<u64>,
    /// Leader: a replication frame sent to a follower to the follower's acknowledgement that
    /// it holds it durably, microseconds.
    pub follower_ack: Histogram<u64>,
    /// Per [`Stage`] (indexed by its position in [`Stage::ALL`]), microseconds.
    pub stages: [Histogram<u64>; Stage::ALL.len()],
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

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
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
                        stages: std::array::from_fn(|_| new_hist()),
                    })
                })
                .collect(),
            error_codes: Mutex::new(Default::default()),
            replication: Mutex::new(Default::default()),
        })
    }

    /// Record a stored append: its total latency, its flush latency (into both
    /// `replog_flush_latency_seconds` and the `leader_flush` stage) and its other stages.
    pub fn record_append(&self, shard: usize, t: AppendTimes) {
        let mut h = self.shards[shard].lock().unwrap();
        h.append.saturating_record(micros(t.total));
        h.stages[Stage::Request as usize].saturating_record(micros(t.request));
        h.stages[Stage::Receive as usize].saturating_record(micros(t.receive));
        if let Some(w) = t.write {
            for (stage, d) in [Stage::Submitted, Stage::Written, Stage::Durable]
                .into_iter()
                .zip(w)
            {
                h.stages[stage as usize].saturating_record(micros(d));
            }
        }
        if let Some(r) = t.replicated {
            h.stages[Stage::Replicated as usize].saturating_record(micros(r));
        }
        if let Some(f) = t.flush {
            h.flush.saturating_record(micros(f));
            h.stages[Stage::LeaderFlush as usize].saturating_record(micros(f));
        }
        if let Some(c) = t.commit {
            h.stages[Stage::Commit as usize].saturating_record(micros(c));
        }
    }

    /// Record one stage latency (the follower's stages come this way).
    pub fn record_stage(&self, shard: usize, stage: Stage, latency: Duration) {
        self.shards[shard].lock().unwrap().stages[stage as usize]
            .saturating_record(micros(latency));
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
        let counters: [(&str, &str, &AtomicU64); 22] = [
            (
                "replog_scrub_bytes_total",
                "Bytes of sealed segments the background scrub re-read and checked.",
                &c.scrub_bytes,
            ),
            (
                "replog_scrub_damaged_total",
                "Damaged ranges (batches failing their checks) the scrub found in sealed segments.",
                &c.scrub_damaged,
            ),
            (
                "replog_scrub_repaired_total",
                "Damaged ranges the scrub repaired from a healthy replica.",
                &c.scrub_repaired,
            ),
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
            (
                "replog_quarantined_records_total",
                "Records of a divergent suffix moved to quarantine before they were truncated.",
                &c.quarantined_records,
            ),
            (
                "replog_quarantined_bytes_total",
                "Bytes of batches moved to quarantine before they were truncated.",
                &c.quarantined_bytes,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        if let Some(n) = crate::alloc::allocations() {
            let _ = writeln!(
                out,
                "# HELP replog_allocations_total Memory allocations made by this process (a build with count-allocations).\n# TYPE replog_allocations_total counter\nreplog_allocations_total {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP replog_connections_open Client connections open now.\n# TYPE replog_connections_open gauge\nreplog_connections_open {}",
            c.connections_open.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP replog_controller_no_space 1 while this node's controller storage is out of space (it neither votes nor proposes, and takes no writes, until a write succeeds).\n# TYPE replog_controller_no_space gauge\nreplog_controller_no_space {}",
            c.controller_no_space.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP replog_logs_failed Logs whose storage failed here (a full disk, an I/O error) and that are being reopened.\n# TYPE replog_logs_failed gauge\nreplog_logs_failed {}",
            c.logs_failed.load(Ordering::Relaxed)
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
        let mut stages: [Histogram<u64>; Stage::ALL.len()] = std::array::from_fn(|_| new_hist());
        for s in &self.shards {
            let s = s.lock().unwrap();
            append.add(&s.append).expect("same bounds");
            flush.add(&s.flush).expect("same bounds");
            ack.add(&s.follower_ack).expect("same bounds");
            for (all, one) in stages.iter_mut().zip(&s.stages) {
                all.add(one).expect("same bounds");
            }
        }
        render_histogram(
            &mut out,
            "replog_append_latency_seconds",
            "Append latency on the node, from request decoded to receipt ready.",
            BUCKETS_S,
            &[("", &append)],
        );
        render_histogram(
            &mut out,
            "replog_flush_latency_seconds",
            "From an append queued to the fdatasync that covers it.",
            BUCKETS_S,
            &[("", &flush)],
        );
        render_histogram(
            &mut out,
            "replog_follower_ack_latency_seconds",
            "Leader: from a replication frame sent to the follower's acknowledgement that it is durable there.",
            BUCKETS_S,
            &[("", &ack)],
        );
        let labels: [String; Stage::ALL.len()] =
            Stage::ALL.map(|s| format!("stage=\"{}\"", s.name()));
        let series: Vec<(&str, &Histogram<u64>)> =
            labels.iter().map(String::as_str).zip(&stages).collect();
        render_histogram(
            &mut out,
            "replog_stage_latency_seconds",
            "Time an append spends in each stage. In order on a leader, adding up to its time in the node: request (stream accepted to served on the owning shard), receive (to queued in the log), submitted (to its write handed to the kernel), written (to the write completed), durable (to the leader's fdatasync seen), replicated (to acks=sync/quorum reached), sent (to the receipt written into the stream). Also leader_flush (queued to the leader's fdatasync), commit (queued to acks=sync/quorum reached), follower_receive (replication frame read to stored), follower_flush (frame stored to the follower's fdatasync).",
            STAGE_BUCKETS_S,
            &series,
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

/// Render one histogram family (microsecond HdrHistograms) with `buckets` (upper bounds in
/// seconds): one `# HELP`/`# TYPE` header, then per series its cumulative buckets, sum and
/// count. A series is its labels (`key="value",...`, or empty) and its histogram; its labels
/// go before `le`.
fn render_histogram(
    out: &mut String,
    name: &str,
    help: &str,
    buckets: &[f64],
    series: &[(&str, &Histogram<u64>)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for &(labels, h) in series {
        let (sep, braced) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        for le in buckets {
            let us = (le * 1e6).round() as u64;
            let n = h.count_between(0, us);
            let _ = writeln!(out, "{name}_bucket{{{sep}le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{sep}le=\"+Inf\"}} {}", h.len());
        // Summed in whole microseconds: exact, and `0` (not the `-0` of an empty f64 sum).
        let sum_us: u64 = h
            .iter_recorded()
            .map(|v| v.value_iterated_to().saturating_mul(v.count_at_value()))
            .fold(0, u64::saturating_add);
        let _ = writeln!(out, "{name}_sum{braced} {}", sum_us as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braced} {}", h.len());
    }
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
        .map_err(crate::io(format!("bind metrics endpoint {addr}")))?;
    std_listener
        .set_nonblocking(true)
        .map_err(crate::io("metrics endpoint: set non-blocking"))?;
    let local = std_listener
        .local_addr()
        .map_err(crate::io("metrics endpoint: local address"))?;
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
        .map_err(crate::io("spawn metrics thread"))?;
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
            AppendTimes {
                total: Duration::from_micros(150),
                receive: Duration::from_micros(20),
                flush: Some(Duration::from_micros(120)),
                commit: None,
                ..Default::default()
            },
        );
        m.record_append(
            1,
            AppendTimes {
                total: Duration::from_millis(3),
                receive: Duration::from_micros(20),
                flush: None,
                commit: None,
                ..Default::default()
            },
        );
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

    /// The lines of `text` that belong to the series of `stage`.
    fn stage_lines<'a>(text: &'a str, stage: &str) -> Vec<&'a str> {
        let bucket = format!("replog_stage_latency_seconds_bucket{{stage=\"{stage}\",le=");
        let other = format!("{{stage=\"{stage}\"}} ");
        text.lines()
            .filter(|l| {
                l.starts_with(&bucket)
                    || (l.starts_with("replog_stage_latency_seconds_") && l.contains(&other))
            })
            .collect()
    }

    #[test]
    fn stage_buckets_cover_10us_to_10s_at_six_per_decade() {
        assert_eq!(STAGE_BUCKETS_S.first(), Some(&0.000_01));
        assert_eq!(STAGE_BUCKETS_S.last(), Some(&10.0));
        assert!(STAGE_BUCKETS_S.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(STAGE_BUCKETS_S.len(), 6 * 6 + 1);
    }

    #[test]
    fn renders_every_stage_with_exact_buckets() {
        let m = Metrics::new(2);
        // Shard 0 and 1 both record: the scrape merges them.
        m.record_append(
            0,
            AppendTimes {
                total: Duration::from_millis(2),
                receive: Duration::from_micros(12),
                flush: Some(Duration::from_micros(700)),
                commit: Some(Duration::from_micros(1_500)),
                ..Default::default()
            },
        );
        m.record_append(
            1,
            AppendTimes {
                total: Duration::from_millis(1),
                receive: Duration::from_micros(150),
                flush: None,
                commit: None,
                ..Default::default()
            },
        );
        m.record_stage(1, Stage::Receive, Duration::from_micros(1_500));
        m.record_stage(0, Stage::FollowerReceive, Duration::from_micros(40));
        let text = m.render();

        assert_eq!(
            text.matches("# TYPE replog_stage_latency_seconds histogram")
                .count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches("# HELP replog_stage_latency_seconds ").count(),
            1,
            "{text}"
        );
        for stage in Stage::ALL {
            let lines = stage_lines(&text, stage.name());
            // Every bound, +Inf, _sum and _count, even for a stage nothing recorded.
            assert_eq!(
                lines.len(),
                STAGE_BUCKETS_S.len() + 3,
                "{}: {lines:#?}",
                stage.name()
            );
        }

        // receive: 12 µs, 150 µs, 1500 µs (all exact in the HdrHistogram).
        let receive = stage_lines(&text, "receive");
        let mut expected: Vec<String> = STAGE_BUCKETS_S
            .iter()
            .map(|&le| {
                let n = [12u64, 150, 1_500]
                    .iter()
                    .filter(|&&v| v as f64 <= le * 1e6 + 1e-6)
                    .count();
                format!("replog_stage_latency_seconds_bucket{{stage=\"receive\",le=\"{le}\"}} {n}")
            })
            .collect();
        expected
            .push("replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"+Inf\"} 3".into());
        expected.push("replog_stage_latency_seconds_sum{stage=\"receive\"} 0.001662".into());
        expected.push("replog_stage_latency_seconds_count{stage=\"receive\"} 3".into());
        assert_eq!(receive, expected);
        for line in [
            "replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"0.00001\"} 0",
            "replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"0.000015\"} 1",
            "replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"0.0001\"} 1",
            "replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"0.00015\"} 2",
            "replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"0.001\"} 2",
            "replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"0.0015\"} 3",
            "replog_stage_latency_seconds_bucket{stage=\"receive\",le=\"10\"} 3",
            // leader_flush is the flush latency, recorded in both families.
            "replog_stage_latency_seconds_bucket{stage=\"leader_flush\",le=\"0.0005\"} 0",
            "replog_stage_latency_seconds_bucket{stage=\"leader_flush\",le=\"0.0007\"} 1",
            "replog_stage_latency_seconds_sum{stage=\"leader_flush\"} 0.0007",
            "replog_stage_latency_seconds_count{stage=\"leader_flush\"} 1",
            "replog_flush_latency_seconds_count 1",
            "replog_stage_latency_seconds_count{stage=\"commit\"} 1",
            "replog_stage_latency_seconds_sum{stage=\"commit\"} 0.0015",
            "replog_stage_latency_seconds_bucket{stage=\"follower_receive\",le=\"0.00003\"} 0",
            "replog_stage_latency_seconds_bucket{stage=\"follower_receive\",le=\"0.00005\"} 1",
            "replog_stage_latency_seconds_count{stage=\"follower_receive\"} 1",
            // Nothing recorded: still rendered, all zero.
            "replog_stage_latency_seconds_bucket{stage=\"follower_flush\",le=\"0.00001\"} 0",
            "replog_stage_latency_seconds_bucket{stage=\"follower_flush\",le=\"+Inf\"} 0",
            "replog_stage_latency_seconds_sum{stage=\"follower_flush\"} 0",
            "replog_stage_latency_seconds_count{stage=\"follower_flush\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // The stages come in Stage::ALL order, each as one contiguous block.
        let order: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("replog_stage_latency_seconds_count{stage=\""))
            .map(|l| l.split('"').next().unwrap())
            .collect();
        assert_eq!(order, Stage::ALL.map(Stage::name));
    }

    #[test]
    fn unlabelled_histograms_keep_their_format() {
        let m = Metrics::new(1);
        m.record_follower_ack(0, Duration::from_micros(250));
        let text = m.render();
        for line in [
            "# TYPE replog_follower_ack_latency_seconds histogram",
            "replog_follower_ack_latency_seconds_bucket{le=\"0.0002\"} 0",
            "replog_follower_ack_latency_seconds_bucket{le=\"0.0003\"} 1",
            "replog_follower_ack_latency_seconds_bucket{le=\"+Inf\"} 1",
            "replog_follower_ack_latency_seconds_sum 0.00025",
            "replog_follower_ack_latency_seconds_count 1",
            // Nothing recorded: a plain zero sum.
            "replog_flush_latency_seconds_sum 0",
            "replog_flush_latency_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
