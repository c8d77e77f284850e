//! `replog`: run a node (`replog node`, from the server crate), run a local cluster
//! (`replog dev`), or talk to nodes (the other commands, from the ops crate).
//!
//! Every command that prints data takes `--json` and then prints one JSON object per line.
//! Errors go to stderr, and the exit status is non-zero: 1 for a failed operation, 2 for bad
//! usage, 3 when the outcome of an append is unknown (it may or may not be stored).

use std::process::ExitCode;

/// With `count-allocations`, every allocation is counted (`replog_allocations_total`).
#[cfg(feature = "count-allocations")]
#[global_allocator]
static ALLOCATOR: server::alloc::Counting = server::alloc::Counting;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "replog",
    version,
    about = "replog: a replication log over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Node(Box<server::cli::NodeArgs>),
    #[command(flatten)]
    Ops(Box<ops::Command>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REPLOG_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Node(args) => match server::cli::run(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("replog: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Ops(command) => ops::run(*command),
    }
}
