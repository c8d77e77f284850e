//! Short runs of `replog-bench` against clusters of real `replog node` processes it starts
//! itself: every command completes, its JSON parses and holds what it claims, and the files it
//! writes (.hgrm, SVG) parse.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_replog-bench");

/// Run replog-bench with `args` in `dir`; its JSON report.
fn bench(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(args)
        .args(["--json", "--quiet"])
        .current_dir(dir)
        .output()
        .expect("run replog-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "replog-bench {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn run<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no run {name} in {report}"))
}

fn stage_count(run: &serde_json::Value, node: &str, stage: &str) -> u64 {
    run["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["node"] == node && s["stage"] == stage)
        .map_or(0, |s| s["count"].as_u64().unwrap())
}

/// The count and the total (µs: mean x count) of a stage on a node.
fn stage_total(run: &serde_json::Value, node: &str, stage: &str) -> (u64, f64) {
    run["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["node"] == node && s["stage"] == stage)
        .map_or((0, 0.0), |s| {
            let n = s["count"].as_u64().unwrap();
            (n, s["mean_us"].as_f64().unwrap() * n as f64)
        })
}

/// Stages that split another add up to it: each sample is recorded in whole microseconds
/// (each part truncated on its own, so the parts may fall short by up to one µs apiece) and
/// the histograms keep three significant digits.
fn assert_splits(run: &serde_json::Value, whole: &str, parts: &[&str]) {
    let (n, total) = stage_total(run, "node-1", whole);
    assert!(n >= 100, "{whole}: {run}");
    let mut sum = 0.0;
    for p in parts {
        let (m, t) = stage_total(run, "node-1", p);
        assert_eq!(
            m, n,
            "{p} is recorded for every append that has {whole}: {run}"
        );
        sum += t;
    }
    let slack = parts.len() as f64 * n as f64 + total * 0.005;
    assert!(
        (total - sum).abs() <= slack,
        "{parts:?} add up to {sum} µs, {whole} to {total} µs: {run}"
    );
}

#[test]
fn floor_reports_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &["floor", "--samples", "30", "--bulk-mib", "4", "--dir", "."],
    );
    let f = &r["floor"];
    for k in ["write_sync_4k", "write_sync_64k", "quic_rtt_1k"] {
        assert_eq!(f[k]["count"], 30, "{k}: {f}");
        assert!(f[k]["p50_us"].as_f64().unwrap() > 0.0, "{k}: {f}");
    }
    assert!(f["seq_write_mb_s"].as_f64().unwrap() > 0.0);
    assert!(f["quic_bulk_mb_s"].as_f64().unwrap() > 0.0);
    // The floor cleaned up after itself.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn append_on_a_spawned_cluster_reports_latency_ratios_stages_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let r = bench(
        dir.path(),
        &[
            "append",
            "--spawn",
            "3",
            "--acks",
            "leader,sync",
            "--rate",
            "100",
            "--warmup",
            "500ms",
            "--duration",
            "1s",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    for (name, acks) in [
        ("append-n3-leader-1k-r100", "leader"),
        ("append-n3-sync-1k-r100", "sync"),
    ] {
        let run = run(&r, name);
        assert_eq!(run["params"]["acks"], acks);
        // 100 operations per second for one second, every one answered.
        assert_eq!(run["latency"]["count"], 100, "{run}");
        assert!(run["errors"].as_object().unwrap().is_empty(), "{run}");
        let p50 = run["latency"]["p50_us"].as_f64().unwrap();
        let floor = run["floor_p50_us"].as_f64().unwrap();
        assert!(p50 > 0.0 && floor > 0.0);
        assert!((run["ratio_p50"].as_f64().unwrap() - p50 / floor).abs() < 1e-6);
        // The nodes' own stages cover the appends (warm-up included).
        assert!(stage_count(run, "node-1", "receive") >= 100, "{run}");
        assert!(stage_count(run, "node-1", "leader_flush") >= 100, "{run}");
        assert!(stage_count(run, "node-2", "follower_receive") > 0, "{run}");
        assert!(stage_count(run, "node-2", "follower_flush") > 0, "{run}");
        let hgrm = std::fs::read_to_string(out.join(format!("{name}.hgrm"))).unwrap();
        let points = bench::hist::parse_hgrm(&hgrm).unwrap();
        assert_eq!(points.last().unwrap().total_count, 100);
    }
    // The latency budget: the leader's stages in order, adding up to the stages that span
    // them, and to the append's time in the node.
    let sync = run(&r, "append-n3-sync-1k-r100");
    let leader = run(&r, "append-n3-leader-1k-r100");
    assert_splits(sync, "leader_flush", &["submitted", "written", "durable"]);
    assert_splits(leader, "leader_flush", &["submitted", "written", "durable"]);
    assert_splits(sync, "commit", &["leader_flush", "replicated"]);
    for (run, path) in [
        (
            sync,
            &[
                "request",
                "receive",
                "submitted",
                "written",
                "durable",
                "replicated",
                "sent",
            ][..],
        ),
        (
            leader,
            &[
                "request",
                "receive",
                "submitted",
                "written",
                "durable",
                "sent",
            ][..],
        ),
    ] {
        let b = &run["budget"];
        assert_eq!(b["node"], "node-1", "{run}");
        let stages: Vec<&str> = b["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        assert_eq!(stages, path, "{run}");
        let sum: f64 = b["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["mean_us"].as_f64().unwrap())
            .sum();
        assert!((b["node_us"].as_f64().unwrap() - sum).abs() < 1e-6, "{b}");
        let transport = b["transport_us"].as_f64().unwrap();
        assert!(transport > 0.0, "{b}");
        assert!((b["total_us"].as_f64().unwrap() - (sum + transport)).abs() < 1e-6);
        assert_eq!(b["client_mean_us"], run["latency"]["mean_us"], "{b}");
        assert!(b["ratio"].as_f64().unwrap() > 0.0, "{b}");
    }
    assert!(stage_count(run(&r, "append-n3-sync-1k-r100"), "node-1", "commit") >= 100);
    assert_eq!(
        stage_count(run(&r, "append-n3-leader-1k-r100"), "node-1", "commit"),
        0
    );
    let svg = std::fs::read_to_string(out.join("latency.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(saved["runs"].as_array().unwrap().len(), 2);
    // The spawned nodes' data went away with them.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("out")]);
}

#[test]
fn e2e_sees_every_record_on_the_follower() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "e2e",
            "--spawn",
            "2",
            "--acks",
            "sync",
            "--rate",
            "100",
            "--warmup",
            "500ms",
            "--duration",
            "1s",
            "--no-floor",
        ],
    );
    let vis = run(&r, "e2e-n2-sync-1k-r100");
    assert_eq!(vis["latency"]["count"], 100, "{vis}");
    assert!(vis["errors"].as_object().unwrap().is_empty(), "{vis}");
    let app = run(&r, "e2e-n2-sync-1k-r100-append");
    assert_eq!(app["latency"]["count"], 100, "{app}");
    assert!(vis["latency"]["p50_us"].as_f64().unwrap() > 0.0);
    // Without a floor there is nothing to divide by.
    assert!(vis["ratio_p50"].is_null());
}

#[test]
fn catchup_measures_a_lagging_follower() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "catchup",
            "--spawn",
            "3",
            "--behind-mib",
            "8",
            "--live-rate",
            "50",
            "--live-before",
            "1s",
            "--no-floor",
        ],
    );
    let before = run(&r, "catchup-live-before");
    assert_eq!(before["latency"]["count"], 50, "{before}");
    let during = run(&r, "catchup-live-during");
    let extra = &during["extra"];
    assert_eq!(extra["behind_bytes"], 8 << 20);
    assert!(extra["catchup_seconds"].as_f64().unwrap() > 0.0, "{extra}");
    assert!(extra["catchup_mb_s"].as_f64().unwrap() > 0.0, "{extra}");
    assert!(during["errors"].as_object().unwrap().is_empty(), "{during}");
}

#[test]
fn failover_measures_a_kill_and_a_switchover() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "failover",
            "--spawn",
            "3",
            "--cycles",
            "1",
            "--switchovers",
            "1",
        ],
    );
    for name in ["failover-kill", "switchover"] {
        let run = run(&r, name);
        assert_eq!(run["latency"]["count"], 1, "{run}");
        assert!(run["latency"]["p50_us"].as_f64().unwrap() > 0.0, "{run}");
    }
}

#[test]
fn usage_errors_exit_2_and_plot_compares_files() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(BIN)
        .args(["append", "--rate", "10"])
        .current_dir(dir.path())
        .output()
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(2), "neither --server nor --spawn");
    let status = Command::new(BIN)
        .args(["append", "--spawn", "1", "--acks", "most", "--no-floor"])
        .current_dir(dir.path())
        .output()
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(2), "an unknown acks level");

    let mut a = bench::hist::new();
    let mut b = bench::hist::new();
    for i in 1..=100u64 {
        bench::hist::record(&mut a, i * 1000);
        bench::hist::record(&mut b, i * 3000);
    }
    std::fs::write(dir.path().join("a.hgrm"), bench::hist::to_hgrm(&a)).unwrap();
    std::fs::write(dir.path().join("b.hgrm"), bench::hist::to_hgrm(&b)).unwrap();
    let out = Command::new(BIN)
        .args(["plot", "a.hgrm", "b.hgrm", "--out", "cmp.svg"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let svg = std::fs::read_to_string(dir.path().join("cmp.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(svg.contains(">a</text>") && svg.contains(">b</text>"));
    std::fs::write(dir.path().join("bad.hgrm"), "not a distribution").unwrap();
    let out = Command::new(BIN)
        .args(["plot", "bad.hgrm", "--out", "x.svg"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn peers_measures_every_system_installed_and_stops_what_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "peers",
        "--concurrency",
        "1,2",
        "--warmup",
        "300ms",
        "--duration",
        "1s",
        "--dir",
        ".",
        "--json",
        "--quiet",
    ];
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir.path())
        .output()
        .expect("run replog-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "replog-bench peers failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of = |system: &str| -> Vec<&serde_json::Value> {
        rows.iter().filter(|r| r["system"] == system).collect()
    };
    let installed = [
        ("replog", true),
        ("postgres", bench::peers::find_postgres(None).is_some()),
        ("nats", bench::peers::find_nats(None).is_some()),
    ];
    for (system, installed) in installed {
        let found = of(system);
        if !installed {
            assert_eq!(found.len(), 1, "{stdout}");
            let why = found[0]["skipped"].as_str().unwrap();
            assert!(why.contains("not installed"), "{stdout}");
            continue;
        }
        let conc: Vec<u64> = found
            .iter()
            .map(|r| r["concurrency"].as_u64().unwrap())
            .collect();
        assert_eq!(conc, [1, 2], "{system}: {stdout}");
        for r in found {
            for k in [
                "p50_us",
                "p99_us",
                "p999_us",
                "ops_per_sec",
                "floor_p50_us",
                "server_cpu_us_per_op",
            ] {
                assert!(r[k].as_f64().unwrap() > 0.0, "{system} {k}: {r}");
            }
            assert!(!r["durability"].as_str().unwrap().is_empty());
            // Each peer row carries replog's ratios to it; replog's own rows none.
            assert_eq!(r["replog_p50_ratio"].is_f64(), system != "replog", "{r}");
            // The nodes count their allocations (this workspace's tests build replog with
            // every feature, count-allocations among them); the peers do not.
            let allocations = r["server_allocations_per_op"].as_f64();
            assert_eq!(
                allocations.is_some_and(|n| n > 0.0),
                system == "replog",
                "{r}"
            );
        }
    }
    // Everything it started is gone: no process runs from its directory, which is empty.
    let path = std::fs::canonicalize(dir.path()).unwrap();
    let left = Command::new("pgrep")
        .args(["-f", &path.to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&left.stdout)
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn durable_measures_every_mode_and_counts_io_wq_hand_offs() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["durable", "--samples", "20", "--warmup", "2", "--json"])
        .args(["--dir", "."])
        .current_dir(dir.path())
        .output()
        .expect("run replog-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let modes = [
        "write+fdatasync",
        "write+fdatasync linked",
        "write RWF_DSYNC",
        "O_DSYNC write",
        "O_DIRECT|O_DSYNC write",
    ];
    // Every mode through io_uring directly, without and with IOSQE_ASYNC, then the same kinds
    // of write through tokio-uring and glommio.
    let runtimes = [
        ("tokio-uring 0.5", "write+fdatasync"),
        ("tokio-uring 0.5", "O_DIRECT|O_DSYNC write"),
        ("glommio 0.9", "buffered write+fdatasync"),
        ("glommio 0.9", "DMA write+fdatasync"),
        ("glommio 0.9", "DMA O_DSYNC write"),
    ];
    assert_eq!(rows.len(), 2 * modes.len() + runtimes.len(), "{stdout}");
    for (i, r) in rows.iter().enumerate() {
        if i < 2 * modes.len() {
            assert_eq!(r["runtime"], "io_uring", "{r}");
            assert_eq!(r["mode"], modes[i % modes.len()], "{r}");
            assert_eq!(r["forced_async"], i >= modes.len(), "{r}");
        } else {
            let (runtime, mode) = runtimes[i - 2 * modes.len()];
            assert_eq!(
                (r["runtime"].as_str(), r["mode"].as_str()),
                (Some(runtime), Some(mode))
            );
        }
        assert_eq!(r["latency"]["count"], 20, "{r}");
        assert!(r["writes_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    }
    // Forced to io-wq, the write and the fdatasync are each handed to a worker thread (when
    // the kernel's tracepoint can be read here).
    if let Some(n) = rows[modes.len()]["io_wq_per_write"].as_f64() {
        assert_eq!(n, 2.0, "{stdout}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn durable_refuses_a_block_o_direct_cannot_write() {
    let out = Command::new(BIN)
        .args(["durable", "--block", "1000", "--samples", "1"])
        .output()
        .expect("run replog-bench");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 4096"));
}

#[test]
fn append_spreads_over_logs_on_nodes_with_the_shards_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "append",
            "--spawn",
            "1",
            "--shards",
            "2",
            "--logs",
            "4",
            "--log",
            "spread",
            "--acks",
            "leader",
            "--rate",
            "100",
            "--warmup",
            "300ms",
            "--duration",
            "1s",
            "--no-floor",
        ],
    );
    let run = run(&r, "append-n1-leader-1k-r100-l4");
    assert_eq!(run["latency"]["count"], 100, "{run}");
    assert!(run["errors"].as_object().unwrap().is_empty(), "{run}");
    assert_eq!(run["params"]["logs"], 4, "{run}");
    let measures = run["measures"].as_str().unwrap();
    for i in 0..4 {
        assert!(measures.contains(&format!("spread-{i}")), "{measures}");
    }
    // A node needs at least one shard.
    let usage = Command::new(BIN)
        .args([
            "append",
            "--spawn",
            "1",
            "--shards",
            "0",
            "--no-floor",
            "--quiet",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
}
