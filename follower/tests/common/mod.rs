//! What the follower's tests share.

use log_core::LogConfig;

/// Small segments and batches, so that a few records span several segments.
pub fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 * 1024,
        segment_initial_bytes: 4096,
        batch_bytes_max: 4096,
        ..LogConfig::default()
    }
}
