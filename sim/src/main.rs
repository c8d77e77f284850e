//! `sim`: run the cluster simulator.
//!
//! ```text
//! cargo run --release -p sim -- --seed 42                 # one run (replays seed 42 exactly)
//! cargo run --release -p sim -- --seeds 100 --hours 6     # a soak: seeds 1..=100, 6 h each
//! ```

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sim",
    about = "Simulate whole replog clusters from a seed, with faults, and check what they promise"
)]
struct Args {
    /// The seed of the (first) run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many runs, with seeds `seed`, `seed + 1`, ...
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Simulated hours per run.
    #[arg(long, default_value_t = 1.0)]
    hours: f64,
    /// Nodes per cluster (3 to 7); by default it varies with the seed.
    #[arg(long)]
    nodes: Option<usize>,
    /// Logs per cluster.
    #[arg(long, default_value_t = 2)]
    logs: usize,
    /// No faults: only the workload.
    #[arg(long)]
    no_faults: bool,
    /// `leader_timeout_ms` of every node.
    #[arg(long, default_value_t = 3000)]
    leader_timeout_ms: u64,
    /// Each node's clock runs at a rate within 1 +- this.
    #[arg(long, default_value_t = 0.1)]
    drift: f64,
    /// The mean time between two batches damaged at rest (bit rot), in ms; 0: none.
    #[arg(long, default_value_t = 30_000)]
    bit_rot_every_ms: u64,
    /// The mean time between two retention passes, in ms; 0: none.
    #[arg(long, default_value_t = 60_000)]
    retention_every_ms: u64,
    /// Each client's application over a log stores a snapshot every this many records read.
    #[arg(long, default_value_t = 200)]
    snapshot_every: u64,
    /// Plant a bug (by its name in `protocol::planted::Bug`, e.g. LeaseWithoutMargin) to see
    /// the checker find it; needs the `planted-bugs` feature.
    #[arg(long)]
    plant: Option<String>,
}

#[cfg(feature = "planted-bugs")]
fn run(seed: u64, cfg: &sim::Config, plant: Option<&str>) -> Result<sim::Report, sim::Failure> {
    use protocol::planted::Bug;
    match plant {
        None => sim::run(seed, cfg),
        Some(name) => {
            let bug = Bug::ALL
                .into_iter()
                .find(|b| format!("{b:?}") == name)
                .unwrap_or_else(|| panic!("no planted bug {name:?}; one of {:?}", Bug::ALL));
            sim::run_planted(seed, cfg, bug)
        }
    }
}

#[cfg(not(feature = "planted-bugs"))]
fn run(seed: u64, cfg: &sim::Config, plant: Option<&str>) -> Result<sim::Report, sim::Failure> {
    assert!(plant.is_none(), "--plant needs the planted-bugs feature");
    sim::run(seed, cfg)
}

fn main() -> ExitCode {
    let a = Args::parse();
    let mut failed = 0;
    let began = Instant::now();
    for seed in a.seed..a.seed + a.seeds {
        let cfg = sim::Config {
            nodes: a.nodes.unwrap_or(3 + (seed % 5) as usize),
            logs: a.logs,
            duration_ms: (a.hours * 3.6e6) as u64,
            faults: !a.no_faults,
            leader_timeout_ms: a.leader_timeout_ms,
            drift: a.drift,
            bit_rot_every_ms: a.bit_rot_every_ms,
            retention_every_ms: a.retention_every_ms,
            snapshot_every_records: a.snapshot_every,
            ..sim::Config::default()
        };
        let t = Instant::now();
        match run(seed, &cfg, a.plant.as_deref()) {
            Ok(r) => println!("ok  {r} in {:.1} s", t.elapsed().as_secs_f64()),
            Err(f) => {
                failed += 1;
                eprintln!("{f}");
            }
        }
    }
    println!(
        "{} runs, {failed} failed, {:.1} s",
        a.seeds,
        began.elapsed().as_secs_f64()
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
