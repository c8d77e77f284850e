//! `replog-bench`: latency benchmarking of replog on Linux servers, always against the
//! machine's own floor measured in the same run.
//!
//! - [`floor`]: io_uring write+fdatasync latency and sequential bandwidth, QUIC round trip and
//!   bulk throughput on loopback.
//! - [`durable`]: the ways to make a small write durable with io_uring, side by side, with
//!   the requests io_uring hands to its worker threads.
//! - [`pace`]: open-loop load at a target rate with latencies measured from each operation's
//!   intended send time (no coordinated omission), or a closed loop.
//! - [`workload`]: appends, append-to-visible-on-follower, a lagging follower's catch-up.
//! - [`cluster`]: local `replog node` clusters the tool starts and stops, and the nodes'
//!   per-stage latency histograms from their metrics endpoints.
//! - [`peers`]: PostgreSQL with a synchronous standby and NATS JetStream R3, started and
//!   measured beside replog (`replog-bench peers`).
//! - [`hist`] and [`report`]: HdrHistograms, tables, JSON, `.hgrm` and SVG plots.

pub mod cluster;
pub mod durable;
pub mod floor;
pub mod hist;
pub mod pace;
pub mod peers;
pub mod progress;
pub mod report;
pub mod runtimes;
pub mod workload;
