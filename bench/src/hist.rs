//! Latency histograms: recording, merging, percentiles, and HdrHistogram's percentile
//! distribution text (`.hgrm`), written and parsed.
//!
//! Every latency is recorded in nanoseconds into an [`Hist`] with three significant digits, so a
//! reported percentile is within 0.1% of the true value.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency histogram in nanoseconds.
pub type Hist = Histogram<u64>;

/// The largest latency a histogram holds: one hour. Larger values are clamped to it.
pub const LATENCY_NS_MAX: u64 = 3_600_000_000_000;

/// Percentile ticks per half distance in `.hgrm` output (HdrHistogram's default).
pub const HGRM_TICKS_PER_HALF_DISTANCE: u32 = 5;

/// An empty latency histogram.
pub fn new() -> Hist {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds")
}

/// Record `ns` (clamped into the histogram's range).
pub fn record(h: &mut Hist, ns: u64) {
    h.saturating_record(ns.clamp(1, LATENCY_NS_MAX));
}

/// Merge `from` into `into`. Both come from [`new`], so their ranges match.
pub fn merge(into: &mut Hist, from: &Hist) {
    into.add(from)
        .expect("histograms from hist::new share their bounds");
}

/// The figures a report shows for one histogram, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Summary {
    /// Summarise `h` (all zero when it is empty).
    pub fn of(h: &Hist) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        let q = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Summary {
            count: h.len(),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            p9999_us: q(0.9999),
            max_us: h.max() as f64 / 1e3,
            mean_us: h.mean() / 1e3,
        }
    }
}

/// One line of a percentile distribution: the latency in milliseconds, the fraction of
/// samples at or below it (0..=1), and how many samples that is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub value_ms: f64,
    pub percentile: f64,
    pub total_count: u64,
}

/// The percentile distribution of `h` as HdrHistogram's tools print it
/// (`outputPercentileDistribution` with values in milliseconds): the format that existing
/// `.hgrm` plotters read.
pub fn to_hgrm(h: &Hist) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        for v in h.iter_quantiles(HGRM_TICKS_PER_HALF_DISTANCE) {
            let p = v.quantile_iterated_to();
            let value = h.highest_equivalent(v.value_iterated_to()) as f64 / 1e6;
            let inverse = if p < 1.0 {
                format!("{:>14.2}", 1.0 / (1.0 - p))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:>12.3} {:>2.12} {:>10} {}",
                value,
                p,
                h.count_between(0, v.value_iterated_to()),
                inverse
            );
        }
    }
    let mean = h.mean() / 1e6;
    let stdev = h.stdev() / 1e6;
    let max = h.max() as f64 / 1e6;
    let _ = writeln!(
        out,
        "#[Mean    = {mean:>12.3}, StdDeviation   = {stdev:>12.3}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {max:>12.3}, Total count    = {:>12}]",
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        h.distinct_values()
    );
    out
}

/// Parse a percentile distribution written by [`to_hgrm`] or by HdrHistogram's own tools.
/// Header, blank and `#` lines are skipped; every other line must hold a value, a percentile
/// in 0..=1 and a total count, with non-decreasing percentiles.
pub fn parse_hgrm(text: &str) -> Result<Vec<Point>, String> {
    let mut points: Vec<Point> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("Value") {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 {
            return Err(format!("line {}: expected value, percentile, count", n + 1));
        }
        let num = |i: usize| -> Result<f64, String> {
            fields[i]
                .parse::<f64>()
                .map_err(|_| format!("line {}: {:?} is not a number", n + 1, fields[i]))
        };
        let (value_ms, percentile) = (num(0)?, num(1)?);
        let total_count = fields[2]
            .parse::<u64>()
            .map_err(|_| format!("line {}: {:?} is not a count", n + 1, fields[2]))?;
        if !(0.0..=1.0).contains(&percentile) || !value_ms.is_finite() || value_ms < 0.0 {
            return Err(format!("line {}: percentile or value out of range", n + 1));
        }
        if points.last().is_some_and(|p| p.percentile > percentile) {
            return Err(format!("line {}: percentiles go backwards", n + 1));
        }
        points.push(Point {
            value_ms,
            percentile,
            total_count,
        });
    }
    if points.is_empty() {
        return Err("no percentile lines".into());
    }
    Ok(points)
}

/// The latency (ms) at `percentile` (0..=1) of a parsed distribution: the first point at or
/// above it.
pub fn value_at(points: &[Point], percentile: f64) -> Option<f64> {
    points
        .iter()
        .find(|p| p.percentile >= percentile)
        .or(points.last())
        .map(|p| p.value_ms)
}

/// The plot points of `h`: (percentile, latency in ms).
pub fn points(h: &Hist) -> Vec<Point> {
    parse_hgrm(&to_hgrm(h)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(values_us: impl IntoIterator<Item = u64>) -> Hist {
        let mut h = new();
        for v in values_us {
            record(&mut h, v * 1000);
        }
        h
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let h = filled(1..=10_000);
        let s = Summary::of(&h);
        assert_eq!(s.count, 10_000);
        let near = |a: f64, b: f64| (a - b).abs() <= b * 0.002;
        assert!(near(s.p50_us, 5000.0), "{s:?}");
        assert!(near(s.p99_us, 9900.0), "{s:?}");
        assert!(near(s.p999_us, 9990.0), "{s:?}");
        assert!(near(s.max_us, 10_000.0), "{s:?}");
        assert!(near(s.mean_us, 5000.5), "{s:?}");
    }

    #[test]
    fn merging_adds_counts_and_keeps_extremes() {
        let mut a = filled([100; 90]);
        let b = filled([10_000; 10]);
        merge(&mut a, &b);
        let s = Summary::of(&a);
        assert_eq!(s.count, 100);
        assert!((s.p50_us - 100.0).abs() < 0.5, "{s:?}");
        assert!((s.p99_us - 10_000.0).abs() < 10.0, "{s:?}");
        assert!((s.max_us - 10_000.0).abs() < 10.0, "{s:?}");
    }

    #[test]
    fn empty_histograms_summarise_to_zero_and_out_of_range_values_clamp() {
        assert_eq!(Summary::of(&new()), Summary::default());
        let mut h = new();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= LATENCY_NS_MAX / 2);
    }

    #[test]
    fn hgrm_round_trips_through_the_parser() {
        let h = filled((1..=1000).map(|i| i * 7));
        let text = to_hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("#[Max     ="), "{text}");
        let points = parse_hgrm(&text).unwrap();
        assert!(points.len() > 20);
        assert_eq!(points.last().unwrap().percentile, 1.0);
        assert_eq!(points.last().unwrap().total_count, 1000);
        let p50 = value_at(&points, 0.5).unwrap();
        assert!((p50 - 3.5).abs() < 0.01, "p50 {p50} ms");
        let max = value_at(&points, 1.0).unwrap();
        assert!((max - 7.0).abs() < 0.01, "max {max} ms");
        // Counts are cumulative and never go down.
        assert!(points
            .windows(2)
            .all(|w| w[0].total_count <= w[1].total_count));
    }

    #[test]
    fn parser_refuses_what_is_not_a_distribution() {
        assert!(parse_hgrm("").is_err());
        assert!(parse_hgrm("1.0 0.5").is_err());
        assert!(parse_hgrm("1.0 abc 3").is_err());
        assert!(parse_hgrm("1.0 1.5 3").is_err());
        assert!(parse_hgrm("1.0 0.9 3\n2.0 0.5 4").is_err());
        assert!(parse_hgrm("# only a comment\n").is_err());
    }
}
