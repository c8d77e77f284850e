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
            ..sim::Config::default()
        };
        let t = Instant::now();
        match sim::run(seed, &cfg) {
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
