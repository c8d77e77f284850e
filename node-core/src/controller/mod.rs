//! The embedded controller's policy: cluster metadata replicated among the nodes by Raft
//! (raft-rs, hosted by the server), and the failover decisions taken on its leader.
//!
//! - [`meta`]: the replicated state, its commands, and the election rule.
//! - [`failover`]: failure detection and elections on the Raft leader, from the nodes' reports.

pub mod failover;
pub mod meta;
