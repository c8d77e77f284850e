//! A deterministic simulator of whole replog clusters.
//!
//! It runs 3 to 7 nodes of the node core (`node_core`'s controller and log rules,
//! `protocol`'s replication and idempotence decisions), plus clients, on one thread from one
//! seed: simulated time with a clock per node that drifts within a bound, a network that
//! delays, reorders, loses, duplicates and partitions (both ways, one way, or a leader cut off
//! from the controller's majority while clients still reach it), disks whose fdatasync takes
//! time and whose crash loses what was not synced, bit rot (which a scrub repairs from another
//! replica), controller disks that fill up, crashes and
//! restarts (some with the logs wiped), planned switchovers and long idle periods. A checker
//! ([`checker`]) watches the history and the final logs.
//!
//! The same seed gives the same run, event for event: [`run`] returns a [`Report`], or a
//! [`Failure`] that prints its seed and the trace of the events that led to it.
//! `cargo run -p sim -- --seed S` replays one; docs/replication.md ("The simulator") says more.

pub mod checker;
pub mod client;
pub mod disk;
pub mod msg;
pub mod net;
pub mod node;
mod sim;
pub mod world;

pub use sim::{run, Failure, Report};

/// Run one simulation with `bug` planted (`protocol::planted`), on this thread only.
#[cfg(feature = "planted-bugs")]
pub fn run_planted(
    seed: u64,
    cfg: &Config,
    bug: protocol::planted::Bug,
) -> Result<Report, Failure> {
    protocol::planted::plant(Some(bug));
    let r = run(seed, cfg);
    protocol::planted::plant(None);
    r
}

/// A run's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Nodes (3 to 7), every one a member of the controller.
    pub nodes: usize,
    /// Logs, each on `replicas` of the nodes.
    pub logs: usize,
    pub replicas: usize,
    pub clients: usize,
    /// Simulated time before the faults heal and the run is checked (ms).
    pub duration_ms: u64,
    /// Inject faults (else only the workload runs).
    pub faults: bool,
    /// The mean time between faults (ms).
    pub fault_every_ms: u64,
    /// The mean time between two batches damaged at rest (bit rot; ms, with `faults`): each
    /// strikes one durable batch of one replica, one that another replica holds soundly.
    /// 0: no bit rot.
    pub bit_rot_every_ms: u64,
    /// The mean time between two retention passes (ms, with `faults`): each removes, from
    /// every replica of one log, the batches all of them hold durably below the commit
    /// offset, so a replica wiped since must bootstrap from the leader's new start. 0: none.
    pub retention_every_ms: u64,
    /// Nodes scrub their logs and repair damaged batches from other replicas (off only to
    /// show that the checker counts a damaged batch as lost).
    pub scrub: bool,
    /// Each node's clock runs at a rate within `1 +- drift`.
    pub drift: f64,
    pub tick_ms: u64,
    pub leader_timeout_ms: u64,
    pub sync_replicas: usize,
    pub sync_lag_ms_max: u64,
    pub create_wait_ms: u64,
    pub append_timeout_ms: u64,
    /// fdatasync latency bounds (us).
    pub fsync_us: (u64, u64),
    /// The chance that a client goes idle for 20 to 90 s after a request.
    pub idle_chance: f64,
    /// The longest pause of a client between requests (us).
    pub think_us_max: u64,
    /// Each client's application over a log stores a snapshot every this many records it has
    /// read.
    pub snapshot_every_records: u64,
    /// Lines of trace kept for a failure.
    pub trace_lines: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            nodes: 3,
            logs: 2,
            replicas: 3,
            clients: 3,
            duration_ms: 600_000,
            faults: true,
            fault_every_ms: 8_000,
            bit_rot_every_ms: 30_000,
            retention_every_ms: 60_000,
            scrub: true,
            drift: 0.1,
            tick_ms: 100,
            leader_timeout_ms: 3_000,
            sync_replicas: 1,
            sync_lag_ms_max: 5_000,
            create_wait_ms: 10_000,
            append_timeout_ms: 5_000,
            fsync_us: (300, 4_000),
            idle_chance: 0.002,
            think_us_max: 300_000,
            snapshot_every_records: 200,
            trace_lines: 4000,
        }
    }
}
