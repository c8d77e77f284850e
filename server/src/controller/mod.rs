//! The embedded controller, hosted by the node: cluster metadata replicated among the nodes by
//! Raft (raft-rs). Its policy (the metadata, the election rule, failover) is
//! `node_core::controller`'s; this module runs it.
//!
//! - [`storage`]: the Raft log, hard state and snapshot on disk.
//! - [`driver`]: the Raft loop, proposals, and the published metadata.
//! - [`transport`]: controller frames between nodes over QUIC.
//! - [`node`]: the controller inside a node, and the reports the node sends it.

pub use node_core::controller::{failover, meta};

pub mod driver;
pub mod node;
pub mod raft_log;
pub mod storage;
pub mod transport;
