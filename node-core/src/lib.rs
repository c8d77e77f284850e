//! The node's decisions, without I/O: the embedded controller (a Raft host over a storage
//! trait, the replicated metadata, the election rule, failure detection, leases) and each log's
//! leader and follower rules, with the follower's replication session as a state machine
//! ([`follow::Session`]), the rules of application snapshots ([`snapshot`]) and the pacing of a follower's catch-up
//! ([`catchup`]). Time comes in as an argument; nothing here reads a clock, a file
//! or a socket (`clippy.toml` keeps it so), so the real node (`server`) and the cluster
//! simulator (`sim`) drive the same code.

pub mod catchup;
pub mod controller;
pub mod follow;
pub mod log;
pub mod snapshot;

pub use protocol::planted;
