//! Pacing a follower's catch-up by the live tail's latency.
//!
//! A follower far behind is sent the backlog in bulk. Sent as fast as the leader can read, the
//! backlog takes the CPU, the network and the disks (on the follower, and on every replica that
//! shares them) away from the live tail of the other streams. A fixed byte rate protects the
//! tail only if it is set low, and then the catch-up crawls on a machine that could do more.
//!
//! Here the catch-up is paced the way background transfers (LEDBAT, RFC 6817) yield to
//! interactive traffic, by delay rather than loss:
//! - [`LiveTail`] follows how long the followers take to acknowledge the node's *live* frames
//!   (those of streams not catching up): a fast moving average (the tail now), and a slow one
//!   of the times no catch-up ran on the node (the base: what the tail costs when nothing
//!   competes). Before any such time, the base is the lowest fast average of the last
//!   [`BASE_WINDOW_S`] seconds.
//! - [`Pacer`] sets one catch-up stream's rate, every [`ADJUST_MS`]: it halves the rate while
//!   the tail is above `factor` times its base (less when it is only a little above);
//!   otherwise it adds [`RATE_STEP`] or an eighth, or grows by half when no live frame was
//!   acknowledged lately (nothing to protect); always between
//!   [`RATE_MIN`] and the configured cap.
//!
//! Both take the time as an argument: the node passes its clock, tests their own.

/// Seconds of per-second minimums the base latency is the lowest of.
pub const BASE_WINDOW_S: usize = 60;

/// Weight of a new sample in the fast moving average of live acknowledgement latency (1/32:
/// one slow acknowledgement among many does not cut the rate).
const FAST_SHIFT: u32 = 5;

/// Weight of a new sample in the base, the slow moving average while no catch-up runs (1/64).
const BASE_SHIFT: u32 = 6;

/// A live acknowledgement older than this no longer says anything about the tail: with none
/// newer, the tail is idle and the catch-up may use everything.
pub const LIVE_STALE_MS: u64 = 1_000;

/// How often a pacer reconsiders its rate.
pub const ADJUST_MS: u64 = 100;

/// The slowest a paced catch-up goes (bytes per second): it always makes progress.
pub const RATE_MIN: f64 = 1_048_576.0;

/// The rate a paced catch-up starts at (bytes per second), unless the cap is lower.
pub const RATE_START: f64 = 16.0 * 1_048_576.0;

/// The fastest a paced catch-up grows to without a cap (bytes per second): beyond what a
/// QUIC stream carries, so a free tail leaves it unpaced in effect, yet few halvings away from
/// a rate that matters when the tail needs room again.
pub const RATE_TOP: f64 = 4.0 * 1_073_741_824.0;

/// Growth per [`ADJUST_MS`] while no live frame is acknowledged (x1.5: from [`RATE_START`] to
/// 1 GB/s in about a second).
const GROWTH: f64 = 1.5;

/// Growth per [`ADJUST_MS`] while the live tail is within its bound (bytes per second), or an
/// eighth of the rate when that is more: probing gently where the tail starts to suffer.
pub const RATE_STEP: f64 = 4.0 * 1_048_576.0;

/// The live tail's acknowledgement latency, as the node's live streams see it.
#[derive(Clone, Debug, Default)]
pub struct LiveTail {
    /// Fast moving average, microseconds.
    fast_us: u64,
    /// Slow moving average of the samples taken while no catch-up ran; 0 before the first.
    quiet_us: u64,
    /// When the latest sample came, milliseconds.
    last_ms: Option<u64>,
    /// Catch-ups running on the node now.
    catchups: usize,
    /// The current second and the lowest fast average seen in it (0: none yet).
    second: u64,
    second_min_us: u64,
    /// The lowest fast average of each of the previous seconds, newest last.
    minimums: std::collections::VecDeque<u64>,
}

/// Move a moving average towards `x` by 1/2^shift (`x` itself for the first sample).
fn average(avg: u64, x: u64, shift: u32, first: bool) -> u64 {
    if first {
        return x;
    }
    let a = avg as i64;
    (a + ((x as i64 - a) >> shift)).max(0) as u64
}

impl LiveTail {
    pub fn new() -> LiveTail {
        LiveTail::default()
    }

    /// A catch-up started on the node: samples no longer move the base.
    pub fn catchup_started(&mut self) {
        self.catchups += 1;
    }

    /// A catch-up ended (caught up, or its stream closed).
    pub fn catchup_ended(&mut self) {
        self.catchups = self.catchups.saturating_sub(1);
    }

    /// A live frame was acknowledged `latency_us` after it was sent.
    pub fn record(&mut self, now_ms: u64, latency_us: u64) {
        self.fast_us = average(self.fast_us, latency_us, FAST_SHIFT, self.last_ms.is_none());
        self.last_ms = Some(now_ms);
        if self.catchups == 0 {
            self.quiet_us =
                average(self.quiet_us, latency_us, BASE_SHIFT, self.quiet_us == 0).max(1);
        }
        let second = now_ms / 1000;
        if second != self.second || self.second_min_us == 0 {
            if self.second_min_us > 0 {
                self.minimums.push_back(self.second_min_us);
                while self.minimums.len() > BASE_WINDOW_S {
                    self.minimums.pop_front();
                }
            }
            self.second = second;
            self.second_min_us = self.fast_us.max(1);
        } else {
            self.second_min_us = self.second_min_us.min(self.fast_us.max(1));
        }
    }

    /// The tail now and its base, microseconds, while the tail is live (a sample in the last
    /// [`LIVE_STALE_MS`]); `None` when it is idle.
    pub fn reading(&self, now_ms: u64) -> Option<(u64, u64)> {
        let last = self.last_ms?;
        if now_ms.saturating_sub(last) > LIVE_STALE_MS {
            return None;
        }
        if self.quiet_us > 0 {
            return Some((self.fast_us, self.quiet_us));
        }
        let base = self
            .minimums
            .iter()
            .copied()
            .chain(std::iter::once(self.second_min_us))
            .filter(|&m| m > 0)
            .min()?;
        Some((self.fast_us, base))
    }
}

/// One catch-up stream's rate.
#[derive(Clone, Debug)]
pub struct Pacer {
    /// Bytes per second now.
    rate: f64,
    /// The most it may reach (`catchup_bytes_per_sec_max`; infinite for none).
    cap: f64,
    /// How far above its base the live latency may go (`catchup_live_latency_factor`; 0: the
    /// rate stays at the cap).
    factor: f64,
    /// When the rate was last reconsidered.
    adjusted_ms: u64,
    /// When the next byte may go (milliseconds, fractional).
    due_ms: f64,
}

impl Pacer {
    /// A pacer for a stream that starts catching up at `now_ms`. `cap` is bytes per second
    /// (0: none); `factor` 0 keeps the rate at the cap.
    pub fn new(now_ms: u64, cap: u64, factor: f64) -> Pacer {
        let cap = if cap == 0 { f64::INFINITY } else { cap as f64 };
        let rate = if factor > 0.0 {
            RATE_START.min(cap)
        } else {
            cap
        };
        Pacer {
            rate,
            cap,
            factor,
            adjusted_ms: now_ms,
            due_ms: now_ms as f64,
        }
    }

    /// Bytes per second now (infinite: unpaced).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Reconsider the rate (at most every [`ADJUST_MS`]) given the live tail's `reading`.
    pub fn adjust(&mut self, now_ms: u64, reading: Option<(u64, u64)>) {
        if self.factor <= 0.0 || now_ms < self.adjusted_ms + ADJUST_MS {
            return;
        }
        self.adjusted_ms = now_ms;
        let top = self.cap.min(RATE_TOP);
        self.rate = match reading {
            Some((now, base)) if now as f64 > self.factor * base as f64 => {
                // In proportion to how far over the bound the tail is, at most by half: a
                // noisy tail just over its bound costs a little rate, a swamped one half.
                let cut = (self.factor * base as f64 / now as f64).max(0.5);
                (self.rate * cut).max(RATE_MIN.min(self.cap))
            }
            Some(_) => (self.rate + RATE_STEP.max(self.rate / 8.0)).min(top),
            None => (self.rate * GROWTH).min(top),
        };
    }

    /// `bytes` were just sent at `now_ms`: how long (milliseconds) to wait before the next
    /// frame so that the stream keeps to its rate. A stream that fell behind its schedule
    /// does not make up for it in a burst.
    pub fn sent(&mut self, now_ms: u64, bytes: u64) -> u64 {
        if !self.rate.is_finite() {
            return 0;
        }
        let now = now_ms as f64;
        self.due_ms = self.due_ms.max(now) + bytes as f64 * 1000.0 / self.rate;
        (self.due_ms - now).floor().max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_is_the_tail_while_no_catch_up_runs() {
        let mut t = LiveTail::new();
        assert_eq!(t.reading(0), None);
        for ms in (0..5_000).step_by(10) {
            t.record(ms, 200);
        }
        assert_eq!(t.reading(5_000), Some((200, 200)));
        // A catch-up slows the tail: the tail moves, the base does not.
        t.catchup_started();
        for ms in (5_000..8_000).step_by(10) {
            t.record(ms, 1_000);
        }
        let (now, base) = t.reading(8_000).unwrap();
        assert!(now > 900, "{now}");
        assert_eq!(base, 200);
        // Once no catch-up runs, the base follows the tail again, slowly.
        t.catchup_ended();
        t.record(8_010, 1_000);
        let (_, base) = t.reading(8_010).unwrap();
        assert!(base > 200 && base < 300, "{base}");
        // Idle: no reading.
        assert_eq!(t.reading(8_010 + LIVE_STALE_MS + 1), None);
    }

    #[test]
    fn without_a_quiet_time_the_base_is_the_lowest_of_the_last_minute() {
        let mut t = LiveTail::new();
        t.catchup_started();
        for ms in (0..3_000).step_by(10) {
            t.record(ms, 200);
        }
        for ms in (3_000..6_000).step_by(10) {
            t.record(ms, 1_000);
        }
        let (now, base) = t.reading(6_000).unwrap();
        assert!(now > 900, "{now}");
        assert_eq!(base, 200);
        // A minute later the old low has left the window.
        for ms in (6_000..70_000).step_by(10) {
            t.record(ms, 1_000);
        }
        let (_, base) = t.reading(70_000).unwrap();
        assert!(base > 900, "{base}");
    }

    #[test]
    fn the_rate_halves_while_the_tail_is_slow_and_grows_while_it_is_not() {
        let mut p = Pacer::new(0, 0, 1.5);
        assert_eq!(p.rate(), RATE_START);
        // Too early to change.
        p.adjust(ADJUST_MS - 1, Some((1_000, 100)));
        assert_eq!(p.rate(), RATE_START);
        p.adjust(ADJUST_MS, Some((1_000, 100)));
        assert_eq!(p.rate(), RATE_START / 2.0);
        for i in 2..20 {
            p.adjust(i * ADJUST_MS, Some((1_000, 100)));
        }
        assert_eq!(p.rate(), RATE_MIN, "never below the minimum");
        // Within 1.5x of the base it grows by a step; with an idle tail, by half.
        p.adjust(20 * ADJUST_MS, Some((150, 100)));
        assert_eq!(p.rate(), RATE_MIN + RATE_STEP);
        p.adjust(21 * ADJUST_MS, None);
        assert_eq!(p.rate(), (RATE_MIN + RATE_STEP) * 1.5);
        for i in 22..80 {
            p.adjust(i * ADJUST_MS, None);
        }
        assert_eq!(
            p.rate(),
            RATE_TOP,
            "no cap: as good as unpaced once the tail allows"
        );
        // and back to a rate that matters within a second when the tail slows.
        for i in 80..90 {
            p.adjust(i * ADJUST_MS, Some((1_000, 100)));
        }
        assert!(p.rate() < 8.0 * 1_048_576.0, "{}", p.rate());
    }

    #[test]
    fn the_cap_bounds_the_rate_and_factor_zero_keeps_it_there() {
        let mut p = Pacer::new(0, 8 << 20, 1.5);
        assert_eq!(
            p.rate(),
            (8 << 20) as f64,
            "starts at the cap when it is lower"
        );
        for i in 1..10 {
            p.adjust(i * ADJUST_MS, None);
        }
        assert_eq!(p.rate(), (8 << 20) as f64);
        let mut fixed = Pacer::new(0, 8 << 20, 0.0);
        for i in 1..10 {
            fixed.adjust(i * ADJUST_MS, Some((10_000, 100)));
        }
        assert_eq!(fixed.rate(), (8 << 20) as f64, "factor 0: a fixed rate");
        let unpaced = Pacer::new(0, 0, 0.0);
        assert!(unpaced.rate().is_infinite());
    }

    #[test]
    fn sending_waits_its_turn_without_bursting_after_a_pause() {
        let mut p = Pacer::new(0, 1_000_000, 0.0);
        // 1 MB/s: 100 KB takes 100 ms.
        assert_eq!(p.sent(0, 100_000), 100);
        assert_eq!(p.sent(0, 100_000), 200);
        // After a long pause the schedule restarts from now.
        assert_eq!(p.sent(10_000, 100_000), 100);
        let mut free = Pacer::new(0, 0, 0.0);
        assert_eq!(free.sent(0, u64::MAX), 0);
    }
}
