//! Where a node keeps things under its data dir (besides the files of [`crate::snapshots`],
//! [`crate::tls`] and the controller's).

use std::path::{Path, PathBuf};

/// The directory of every log's copy, one subdirectory per log.
pub(crate) fn logs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("logs")
}

/// Where a node keeps the divergent suffixes it truncated.
pub(crate) const QUARANTINE_DIR: &str = "quarantine";

/// Whether this node's copy of `log` is recovering (see [`follower::copy::RECOVERING_FILE`]).
pub(crate) fn recovering(data_dir: &Path, log: &str) -> bool {
    follower::copy::is_recovering(&logs_dir(data_dir).join(log))
}
