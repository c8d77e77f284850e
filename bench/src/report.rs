//! Reports: a readable table, JSON for machines, `.hgrm` percentile distributions for
//! existing plotters, and an SVG latency-by-percentile plot.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::cluster::StageSummary;
use crate::floor::Floor;
use crate::hist::{self, Hist, Point, Summary};

/// One measured series: a histogram with what it means.
#[derive(Serialize)]
pub struct Run {
    /// A short name, also the `.hgrm` file's stem: `append-n3-sync-1k-r500`.
    pub name: String,
    /// What the latency is measured between.
    pub measures: String,
    /// Parameters of the run (acks, record size, rate or concurrency, ...).
    pub params: serde_json::Value,
    pub latency: Summary,
    /// Operations that failed, by error.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Operations per second and MB/s of payload, over the measured part.
    pub throughput_ops_s: f64,
    pub throughput_mb_s: f64,
    /// Open loop: operations sent more than 1 ms after their intended time.
    pub late: u64,
    /// The floor this run is compared with, and the ratios to it (when there is one).
    pub floor_p50_us: Option<f64>,
    pub floor_p99_us: Option<f64>,
    pub ratio_p50: Option<f64>,
    pub ratio_p99: Option<f64>,
    /// Extra figures (catch-up speed, ...).
    pub extra: serde_json::Value,
    /// Per-stage latency inside the nodes during this run (from their metrics).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageSummary>,
    /// Where an append's time went: the leader's stages in order plus the transport, against
    /// what the client measured (appends only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    #[serde(skip)]
    pub hist: Hist,
}

impl Run {
    /// A run of `hist` (no errors, floor or extras yet).
    pub fn new(name: String, measures: String, params: serde_json::Value, hist: Hist) -> Run {
        Run {
            name,
            measures,
            params,
            latency: Summary::of(&hist),
            errors: Default::default(),
            throughput_ops_s: 0.0,
            throughput_mb_s: 0.0,
            late: 0,
            floor_p50_us: None,
            floor_p99_us: None,
            ratio_p50: None,
            ratio_p99: None,
            extra: serde_json::Value::Null,
            stages: Vec::new(),
            budget: None,
            hist,
        }
    }

    /// Add up the run's latency budget from its stages: the node that served the requests
    /// (the one with the most `request` stages) and its [`PATH_STAGES`] means, plus
    /// `transport_us` (the QUIC round trip measured beside the run), against the client's mean.
    pub fn add_budget(&mut self, transport_us: Option<f64>) {
        let Some(node) = self
            .stages
            .iter()
            .filter(|s| s.stage == "request")
            .max_by_key(|s| s.count)
            .map(|s| s.node.clone())
        else {
            return;
        };
        let stages: Vec<BudgetStage> = PATH_STAGES
            .iter()
            .filter_map(|&stage| {
                let s = self
                    .stages
                    .iter()
                    .find(|s| s.node == node && s.stage == stage)?;
                Some(BudgetStage {
                    stage: stage.to_string(),
                    mean_us: s.mean_us,
                })
            })
            .collect();
        let node_us: f64 = stages.iter().map(|s| s.mean_us).sum();
        let total_us = node_us + transport_us.unwrap_or(0.0);
        let client_mean_us = self.latency.mean_us;
        self.budget = Some(Budget {
            node,
            stages,
            node_us,
            transport_us,
            total_us,
            client_mean_us,
            ratio: (client_mean_us > 0.0).then(|| total_us / client_mean_us),
        });
    }

    /// Set the floor and compute the ratios.
    pub fn against(&mut self, p50_us: f64, p99_us: f64) {
        self.floor_p50_us = Some(p50_us);
        self.floor_p99_us = Some(p99_us);
        self.ratio_p50 = (p50_us > 0.0).then(|| self.latency.p50_us / p50_us);
        self.ratio_p99 = (p99_us > 0.0).then(|| self.latency.p99_us / p99_us);
    }
}

/// The stages of an append on the node that serves it, in order (the server's
/// `metrics::Stage` documents them): their sum is the append's time inside that node.
pub const PATH_STAGES: [&str; 7] = [
    "request",
    "receive",
    "submitted",
    "written",
    "durable",
    "replicated",
    "sent",
];

/// One stage of a [`Budget`].
#[derive(Clone, Debug, Serialize)]
pub struct BudgetStage {
    pub stage: String,
    pub mean_us: f64,
}

/// An append's latency budget: the serving node's stages (means over the run) plus the
/// transport, against the mean the client measured.
#[derive(Clone, Debug, Serialize)]
pub struct Budget {
    /// The node whose stages these are.
    pub node: String,
    pub stages: Vec<BudgetStage>,
    /// The sum of the stages: the append's mean time inside the node.
    pub node_us: f64,
    /// The mean QUIC round trip (1 KiB request and answer, back to back) measured beside the
    /// run, standing for the time outside the node; absent without a floor.
    pub transport_us: Option<f64>,
    /// `node_us + transport_us`.
    pub total_us: f64,
    /// The mean latency the client measured.
    pub client_mean_us: f64,
    /// `total_us / client_mean_us`: 1.0 when the budget accounts for all of it.
    pub ratio: Option<f64>,
}

/// Everything one invocation measured.
#[derive(Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub floor: Option<Floor>,
    pub runs: Vec<Run>,
    pub notes: Vec<String>,
}

/// Where the figures were measured.
#[derive(Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub memory_gib: f64,
}

impl Machine {
    pub fn here() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            kernel,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: (memory_kib / (1 << 20) as f64 * 10.0).round() / 10.0,
        }
    }
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}{unit}"))
}

impl Report {
    /// The readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "replog-bench {}\nmachine: Linux {}, {} CPUs, {} GiB",
            self.command, m.kernel, m.cpus, m.memory_gib
        );
        if let Some(f) = &self.floor {
            let _ = writeln!(out, "\nfloor (same run; {}, {}):", f.dir, f.filesystem);
            let _ = writeln!(out, "  {:<34}{}", "", LAT_HEADER);
            let row = |label: &str, s: &Summary| format!("  {label:<34}{}", lat_cols(s));
            let _ = writeln!(
                out,
                "{}",
                row("io_uring 4 KiB write+fdatasync", &f.write_sync_4k)
            );
            let _ = writeln!(
                out,
                "{}",
                row("io_uring 64 KiB write+fdatasync", &f.write_sync_64k)
            );
            let _ = writeln!(
                out,
                "{}",
                row("QUIC round trip, 1 KiB, loopback", &f.quic_rtt_1k)
            );
            let _ = writeln!(
                out,
                "  sequential write+fdatasync (1 MiB): {:.0} MB/s; QUIC bulk, one stream: {:.0} MB/s",
                f.seq_write_mb_s, f.quic_bulk_mb_s
            );
        }
        if !self.runs.is_empty() {
            let _ = writeln!(out, "\nlatency in µs:");
            let _ = writeln!(
                out,
                "  {:<34}{}  {:>10} {:>7} {:>9} {:>7} {:>7}",
                "run", LAT_HEADER, "ops/s", "errors", "floor p50", "x p50", "x p99"
            );
            for r in &self.runs {
                let errors: u64 = r.errors.values().sum();
                let _ = writeln!(
                    out,
                    "  {:<34}{}  {:>10.0} {:>7} {:>9} {:>7} {:>7}",
                    r.name,
                    lat_cols(&r.latency),
                    r.throughput_ops_s,
                    errors,
                    opt(r.floor_p50_us, ""),
                    opt(r.ratio_p50, "x"),
                    opt(r.ratio_p99, "x"),
                );
            }
            for r in &self.runs {
                let _ = writeln!(out, "  {}: {}", r.name, r.measures);
                for (e, n) in &r.errors {
                    let _ = writeln!(out, "    {n} failed: {e}");
                }
                if r.late > 0 {
                    let _ = writeln!(
                        out,
                        "    {} operations left more than 1 ms after their intended time (their wait is in the latency)",
                        r.late
                    );
                }
                if !r.extra.is_null() {
                    let _ = writeln!(out, "    {}", r.extra);
                }
            }
        }
        for r in self.runs.iter().filter(|r| !r.stages.is_empty()) {
            let _ = writeln!(
                out,
                "\n{}: stages inside the nodes (from their metrics; p50/p99 at bucket resolution), µs:",
                r.name
            );
            let _ = writeln!(
                out,
                "  {:<10}{:<18}{:>10}{:>10}{:>10}{:>10}",
                "node", "stage", "count", "mean", "p50", "p99"
            );
            for s in &r.stages {
                let _ = writeln!(
                    out,
                    "  {:<10}{:<18}{:>10}{:>10.1}{:>10.1}{:>10.1}",
                    s.node, s.stage, s.count, s.mean_us, s.p50_us, s.p99_us
                );
            }
        }
        for r in &self.runs {
            let Some(b) = &r.budget else { continue };
            let _ = writeln!(
                out,
                "\n{}: latency budget (means, µs; stages on {}, in order):",
                r.name, b.node
            );
            for s in &b.stages {
                let _ = writeln!(out, "  {:<28}{:>10.1}", s.stage, s.mean_us);
            }
            let _ = writeln!(out, "  {:<28}{:>10.1}", "= inside the node", b.node_us);
            if let Some(t) = b.transport_us {
                let _ = writeln!(out, "  {:<28}{:>10.1}", "+ QUIC round trip", t);
            }
            let _ = writeln!(out, "  {:<28}{:>10.1}", "= budget", b.total_us);
            let _ = writeln!(
                out,
                "  {:<28}{:>10.1}{}",
                "client mean",
                b.client_mean_us,
                b.ratio
                    .map(|x| format!("   (budget / client = {x:.2})"))
                    .unwrap_or_default()
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    /// The report as one JSON object.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serialises")
    }

    /// Write `report.json`, `report.txt`, one `<run>.hgrm` per run and `latency.svg` (every run
    /// of this report in one plot) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<Vec<String>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut written = Vec::new();
        let mut put = |name: &str, text: &str| -> Result<(), String> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            written.push(path.display().to_string());
            Ok(())
        };
        put("report.json", &self.json())?;
        put("report.txt", &self.table())?;
        let mut curves = Vec::new();
        for r in &self.runs {
            if r.hist.is_empty() {
                continue;
            }
            put(&format!("{}.hgrm", r.name), &hist::to_hgrm(&r.hist))?;
            curves.push((r.name.clone(), hist::points(&r.hist)));
        }
        if !curves.is_empty() {
            put("latency.svg", &svg(&self.command, &curves))?;
        }
        Ok(written)
    }
}

const LAT_HEADER: &str = "     p50      p90      p99    p99.9   p99.99      max";

fn lat_cols(s: &Summary) -> String {
    [
        s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.p9999_us, s.max_us,
    ]
    .iter()
    .map(|v| format!(" {v:>8.1}"))
    .collect()
}

/// Plot width and height in pixels, and the margins around the plot area.
const W: f64 = 900.0;
const H: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// The percentile axis ends at 99.999% (1/(1-p) = 10^5).
const X_DECADES: f64 = 5.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A latency-by-percentile plot in SVG, the way HdrHistogram's plotter draws it: the x axis is
/// log10(1/(1-percentile)) (0%, 90%, 99%, 99.9%, ...), the y axis latency in ms from 0.
pub fn svg(title: &str, curves: &[(String, Vec<Point>)]) -> String {
    let ymax = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.value_ms))
        .fold(0.0f64, f64::max);
    let ymax = nice_ceiling(ymax.max(1e-3));
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |p: f64| {
        let d = if p >= 1.0 {
            X_DECADES
        } else {
            (1.0 / (1.0 - p)).log10().min(X_DECADES)
        };
        LEFT + d / X_DECADES * pw
    };
    let y = |v: f64| TOP + ph - v / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="25" font-size="15" text-anchor="middle">Latency by percentile: {}</text>"#,
        LEFT + pw / 2.0,
        esc(title)
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let xi = LEFT + i as f64 / X_DECADES * pw;
        let _ = writeln!(
            s,
            r##"<line x1="{xi:.1}" y1="{TOP}" x2="{xi:.1}" y2="{:.1}" stroke="#ddd"/><text x="{xi:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let yi = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yi:.1}" x2="{:.1}" y2="{yi:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            yi + 4.0,
            fmt_ms(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        LEFT + pw / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{}" text-anchor="middle" transform="rotate(-90 20 {})">latency (ms)</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // Past the palette, the same colours come back dashed.
        let dash = if (i / COLORS.len()) % 2 == 1 {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let path: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.percentile), y(p.value_ms)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, values_us: &[u64]) -> Run {
        let mut h = hist::new();
        for v in values_us {
            hist::record(&mut h, v * 1000);
        }
        let mut r = Run::new(
            name.into(),
            "test".into(),
            serde_json::json!({"acks": "leader"}),
            h,
        );
        r.errors = [("busy".to_string(), 2)].into();
        r.throughput_ops_s = 1000.0;
        r.throughput_mb_s = 1.0;
        r
    }

    fn report() -> Report {
        let mut a = run("a", &[100, 200, 300, 400]);
        a.against(100.0, 200.0);
        Report {
            command: "append --spawn 1".into(),
            machine: Machine::here(),
            floor: None,
            runs: vec![a, run("b", &[1000, 2000])],
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn json_parses_and_carries_the_ratios() {
        let r = report();
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["command"], "append --spawn 1");
        let a = &v["runs"][0];
        assert_eq!(a["name"], "a");
        assert_eq!(a["latency"]["count"], 4);
        assert_eq!(a["errors"]["busy"], 2);
        let ratio = a["ratio_p50"].as_f64().unwrap();
        assert!((ratio - a["latency"]["p50_us"].as_f64().unwrap() / 100.0).abs() < 1e-9);
        assert!(v["runs"][1]["ratio_p50"].is_null());
        assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
    }

    #[test]
    fn save_writes_parseable_files_and_a_plot_of_every_run() {
        let dir = tempfile::tempdir().unwrap();
        let r = report();
        let files = r.save(dir.path()).unwrap();
        assert_eq!(files.len(), 5, "{files:?}");
        let a = std::fs::read_to_string(dir.path().join("a.hgrm")).unwrap();
        let points = hist::parse_hgrm(&a).unwrap();
        assert_eq!(points.last().unwrap().total_count, 4);
        let svg = std::fs::read_to_string(dir.path().join("latency.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">a</text>") && svg.contains(">b</text>"));
        let table = std::fs::read_to_string(dir.path().join("report.txt")).unwrap();
        assert!(table.contains("2 failed: busy"), "{table}");
        assert!(table.contains("note: a note"));
    }

    #[test]
    fn axis_ceilings_are_round() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(51.0), 100.0);
    }
}
