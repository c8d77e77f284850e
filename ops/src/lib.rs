//! The `ops` library: replog's control plane, shared by the `replog` binary and its tests.

pub mod controller;
