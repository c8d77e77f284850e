//! The embedded controller: cluster metadata replicated among the nodes by Raft (raft-rs).
//!
//! - [`meta`]: the replicated state, its commands, and the election rule.
//! - [`failover`]: failure detection and elections on the Raft leader, from the nodes' reports.
//! - [`storage`]: the Raft log, hard state and snapshot on disk.
//! - [`driver`]: the Raft loop, proposals, and the published metadata.
//! - [`transport`]: controller frames between nodes over QUIC.
//! - [`node`]: the controller inside a `replog node`.

pub mod driver;
pub mod failover;
pub mod meta;
pub mod node;
pub mod storage;
pub mod transport;
