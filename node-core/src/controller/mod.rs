//! The embedded controller: cluster metadata replicated among the nodes by Raft (raft-rs),
//! and the failover decisions taken on its leader.
//!
//! - [`core`]: one node's controller as a state machine (Raft host, reports, leases).
//! - [`meta`]: the replicated state, its commands, and the election rule.
//! - [`failover`]: failure detection and elections on the Raft leader, from the nodes' reports.

pub mod core;
pub mod failover;
pub mod meta;
