//! Load generation: an open loop at a target rate, or a closed loop of concurrent workers.
//!
//! In the open loop, operation `i` is due at `start + i / rate`, and its latency is measured from
//! that intended time, not from when it was actually sent. When the system under test stalls
//! and the generator cannot send on time (every permit of `in_flight_max` taken), the requests
//! that should have gone out during the stall are charged the time they waited, so the stall
//! shows up in the percentiles instead of being hidden (coordinated omission). An operation
//! that the timer lets out early is measured from its actual send time, so no latency is ever
//! undercounted. The time from the actual send is kept too (`service`), which is what a
//! closed-loop tool would report.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hist::{self, Hist};
use crate::progress::Progress;

/// How operations are issued.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// `rate` operations per second, each at its scheduled time, at most `in_flight_max`
    /// outstanding.
    Open { rate: f64, in_flight_max: usize },
    /// `concurrency` workers, each issuing its next operation when the previous one is done.
    Closed { concurrency: usize },
}

/// The largest number of operations an open loop keeps outstanding by default.
pub const IN_FLIGHT_MAX: usize = 4096;

/// How much earlier than due the open loop asks the timer to wake it (tokio's timer has
/// millisecond ticks and rounds up).
pub const TIMER_SLACK: Duration = Duration::from_millis(1);

/// An operation sent this much after its intended time counts as late.
pub const LATE: Duration = Duration::from_millis(1);

/// What a load run measured after its warm-up.
#[derive(Debug)]
pub struct Outcome {
    /// Latency of the operations that succeeded: in the open loop from their intended send
    /// time, in the closed loop from their send time.
    pub latency: Hist,
    /// Latency of the same operations from their actual send time.
    pub service: Hist,
    /// Operations measured (after the warm-up), successful or not.
    pub issued: u64,
    /// Failed operations by error message.
    pub errors: BTreeMap<String, u64>,
    /// Operations sent more than [`LATE`] after their intended time (open loop only).
    pub late: u64,
    /// The measured part of the run: from the end of the warm-up to the last completion.
    pub elapsed: Duration,
}

impl Outcome {
    /// Failed operations.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Successful operations per second of the measured part.
    pub fn throughput(&self) -> f64 {
        self.latency.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The time operation `i` is due at in an open loop started at `start`.
pub fn intended(start: Instant, rate: f64, i: u64) -> Instant {
    start + Duration::from_secs_f64(i as f64 / rate)
}

/// Operations an open loop issues in `span` at `rate`.
pub fn count_in(span: Duration, rate: f64) -> u64 {
    (span.as_secs_f64() * rate).floor() as u64
}

struct Shared {
    latency: Hist,
    service: Hist,
    errors: BTreeMap<String, u64>,
    last_done: Instant,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            latency: hist::new(),
            service: hist::new(),
            errors: BTreeMap::new(),
            last_done: Instant::now(),
        }
    }
}

/// Run `op(i, due)` for `warmup + duration` under `mode` on the current tokio runtime (`due`:
/// the time operation `i` was meant to start, which is when it starts in the closed loop); the
/// first `warmup` is not measured, and the run ends early once `stop` is set. `op` answers
/// `Err(kind)` for a failed operation. The progress line is fed with each completion.
pub async fn run<F, Fut>(
    mode: Mode,
    warmup: Duration,
    duration: Duration,
    op: F,
    stop: Option<Arc<AtomicBool>>,
    progress: &Progress,
) -> Outcome
where
    F: Fn(u64, Instant) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    match mode {
        Mode::Open {
            rate,
            in_flight_max,
        } => open(rate, in_flight_max, warmup, duration, op, stop, progress).await,
        Mode::Closed { concurrency } => {
            closed(concurrency, warmup, duration, op, stop, progress).await
        }
    }
}

fn stopped(stop: &Option<Arc<AtomicBool>>) -> bool {
    stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
}

fn finish(shared: Arc<Mutex<Shared>>, issued: u64, late: u64, measured_from: Instant) -> Outcome {
    let s = match Arc::try_unwrap(shared) {
        Ok(m) => m.into_inner().unwrap(),
        Err(_) => unreachable!("every operation has completed"),
    };
    Outcome {
        latency: s.latency,
        service: s.service,
        issued,
        errors: s.errors,
        late,
        elapsed: s.last_done.saturating_duration_since(measured_from),
    }
}

async fn open<F, Fut>(
    rate: f64,
    in_flight_max: usize,
    warmup: Duration,
    duration: Duration,
    op: F,
    stop: Option<Arc<AtomicBool>>,
    progress: &Progress,
) -> Outcome
where
    F: Fn(u64, Instant) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    assert!(rate > 0.0 && rate.is_finite(), "the open loop needs a rate");
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight_max.max(1)));
    let shared = Arc::new(Mutex::new(Shared::new()));
    let op = Arc::new(op);
    let start = Instant::now() + Duration::from_millis(1);
    let warm = count_in(warmup, rate);
    let total = warm + count_in(duration, rate);
    let measured_from = intended(start, rate, warm);
    let mut tasks = tokio::task::JoinSet::new();
    let mut late = 0;
    let mut issued = 0;
    for i in 0..total {
        if stopped(&stop) {
            break;
        }
        issued = i + 1;
        let due = intended(start, rate, i);
        // The timer fires up to a tick late: wake a tick early, and measure an operation sent
        // early from its actual send time (see `complete`), so nothing is undercounted.
        tokio::time::sleep_until(due.checked_sub(TIMER_SLACK).unwrap_or(due).into()).await;
        let permit = permits.clone().acquire_owned().await.expect("never closed");
        let sent = Instant::now();
        if i >= warm && sent.saturating_duration_since(due) > LATE {
            late += 1;
        }
        let (op, shared, progress) = (op.clone(), shared.clone(), progress.clone());
        tasks.spawn(async move {
            let result = op(i, due.min(sent)).await;
            let done = Instant::now();
            drop(permit);
            if i >= warm {
                let mut s = shared.lock().unwrap();
                complete(&mut s, result, done - due.min(sent), done - sent, done);
                progress.completed(s.latency.len(), s.errors.values().sum());
            }
        });
        // Reap finished tasks as we go, so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    finish(shared, issued.saturating_sub(warm), late, measured_from)
}

fn complete(
    s: &mut Shared,
    result: Result<(), String>,
    from_due: Duration,
    from_sent: Duration,
    done: Instant,
) {
    match result {
        Ok(()) => {
            hist::record(&mut s.latency, from_due.as_nanos() as u64);
            hist::record(&mut s.service, from_sent.as_nanos() as u64);
        }
        Err(kind) => *s.errors.entry(kind).or_default() += 1,
    }
    if done > s.last_done {
        s.last_done = done;
    }
}

async fn closed<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    op: F,
    stop: Option<Arc<AtomicBool>>,
    progress: &Progress,
) -> Outcome
where
    F: Fn(u64, Instant) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let shared = Arc::new(Mutex::new(Shared::new()));
    let op = Arc::new(op);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let measured_from = start + warmup;
    let end = measured_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (op, shared, progress) = (op.clone(), shared.clone(), progress.clone());
        let (counter, issued, stop) = (counter.clone(), issued.clone(), stop.clone());
        tasks.spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            loop {
                let sent = Instant::now();
                if sent >= end || stopped(&stop) {
                    break;
                }
                let i = counter.fetch_add(1, Relaxed);
                let result = op(i, sent).await;
                let done = Instant::now();
                if sent >= measured_from {
                    issued.fetch_add(1, Relaxed);
                    let mut s = shared.lock().unwrap();
                    complete(&mut s, result, done - sent, done - sent, done);
                    progress.completed(s.latency.len(), s.errors.values().sum());
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    let issued = issued.load(std::sync::atomic::Ordering::Relaxed);
    finish(shared, issued, 0, measured_from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A service that answers at once, except that everything arriving in
    /// `[stall_at, stall_at + stall)` (from the first call) waits until the stall ends.
    fn stalling(
        stall_at: Duration,
        stall: Duration,
    ) -> impl Fn(u64, Instant) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
           + Send
           + Sync
           + 'static {
        let first = Arc::new(std::sync::OnceLock::<Instant>::new());
        move |_, _| {
            let first = *first.get_or_init(Instant::now);
            Box::pin(async move {
                let (from, to) = (first + stall_at, first + stall_at + stall);
                let now = Instant::now();
                if now >= from && now < to {
                    tokio::time::sleep_until(to.into()).await;
                }
                Ok(())
            })
        }
    }

    #[test]
    fn a_stall_shows_up_in_the_open_loop_percentiles() {
        // One operation outstanding at a time: during the 300 ms stall the generator cannot
        // send, which is exactly where a closed-loop tool stops counting.
        let mode = Mode::Open {
            rate: 1000.0,
            in_flight_max: 1,
        };
        let stall = Duration::from_millis(300);
        let out = rt().block_on(run(
            mode,
            Duration::ZERO,
            Duration::from_secs(1),
            stalling(Duration::from_millis(300), stall),
            None,
            &Progress::quiet(),
        ));
        assert_eq!(out.issued, 1000);
        assert_eq!(out.latency.len(), 1000);
        // About 300 operations were due during the stall; each is charged its wait, from
        // nearly 300 ms down to 0. At least a third of them waited over 100 ms.
        let slow = out.latency.count_between(100_000_000, hist::LATENCY_NS_MAX);
        assert!(
            slow >= 100,
            "only {slow} samples over 100 ms: {:?}",
            crate::hist::Summary::of(&out.latency)
        );
        assert!(out.latency.value_at_quantile(0.9) >= 100_000_000);
        // Measured from the actual send, the stall is one slow operation (plus hiccups).
        let slow_service = out.service.count_between(100_000_000, hist::LATENCY_NS_MAX);
        assert!(
            slow_service < slow,
            "service {slow_service} vs intended {slow}"
        );
        assert!(out.late > 0);
    }

    #[test]
    fn the_open_loop_issues_exactly_the_scheduled_operations() {
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = calls.clone();
        let started = Instant::now();
        let out = rt().block_on(run(
            Mode::Open {
                rate: 2000.0,
                in_flight_max: IN_FLIGHT_MAX,
            },
            Duration::from_millis(250),
            Duration::from_secs(1),
            move |_, _| {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async { Ok(()) }
            },
            None,
            &Progress::quiet(),
        ));
        // 500 warm-up operations and 2000 measured ones, no more and no fewer; the schedule
        // cannot finish before its last operation is due.
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 2500);
        assert_eq!(out.issued, 2000);
        assert_eq!(out.latency.len(), 2000);
        assert!(started.elapsed() >= Duration::from_millis(1249));
        // The schedule itself: due times are spaced by 1/rate.
        let t0 = Instant::now();
        assert_eq!(intended(t0, 2000.0, 2000) - t0, Duration::from_secs(1));
        assert_eq!(count_in(Duration::from_millis(1500), 2000.0), 3000);
    }

    #[test]
    fn errors_are_counted_by_kind_and_not_as_latency() {
        let out = rt().block_on(run(
            Mode::Closed { concurrency: 2 },
            Duration::ZERO,
            Duration::from_millis(200),
            |i, _| async move {
                if i % 2 == 0 {
                    Ok(())
                } else {
                    Err("busy".to_string())
                }
            },
            None,
            &Progress::quiet(),
        ));
        let errors = out.error_count();
        assert!(errors > 0);
        assert_eq!(out.errors.len(), 1);
        assert_eq!(out.latency.len() + errors, out.issued);
    }
}
