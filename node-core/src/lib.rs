//! The node's decisions, without I/O: what the embedded controller records and how it chooses
//! leaders. Time comes in as an argument; nothing here reads a clock, a file or a socket, so
//! the real node and tests drive the same code.

pub mod controller;
