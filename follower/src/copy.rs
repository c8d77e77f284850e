//! The local copy of a followed log, as files: the marker of a copy that is recovering, and the
//! replacement of a copy by an empty one that starts where the leader's log starts
//! (bootstrap).

use std::path::{Path, PathBuf};

use log_core::{Log, LogConfig, Offset};

/// The marker file in a log's directory that says this node's copy was created afresh where
/// the node should have held the log (its data was lost), so it lacks acknowledged records:
/// the copy is *recovering* (`node_core::log::must_withdraw`). Written durably before anything
/// is replicated into the copy, removed once it holds the leader's commit offset.
pub const RECOVERING_FILE: &str = "RECOVERING";

/// Whether the copy in `log_dir` is recovering (its marker exists).
pub fn is_recovering(log_dir: &Path) -> bool {
    log_dir.join(RECOVERING_FILE).exists()
}

/// Mark the copy in `log_dir` recovering, durably (the directory is created if need be).
pub fn mark_recovering(log_dir: &Path) -> Result<(), durable::Error> {
    durable::private_dir(log_dir)?;
    let marker = log_dir.join(RECOVERING_FILE);
    let tmp = durable::tmp_beside(&marker);
    // A durable atomic write fsyncs the directory too.
    durable::write_atomic(
        &marker,
        b"created afresh; catching up\n",
        durable::Atomic::durable(&tmp, 0o644),
    )
}

/// The copy in `log_dir` has caught up: remove its marker, durably.
pub fn clear_recovering(log_dir: &Path) -> Result<(), durable::Error> {
    let marker = log_dir.join(RECOVERING_FILE);
    std::fs::remove_file(&marker).map_err(|source| durable::Error {
        op: "remove",
        path: marker.clone(),
        source,
    })?;
    durable::sync_dir(log_dir)
}

/// Where [`replace`] moves the old copy of `name` while the new one is made.
fn aside(logs_dir: &Path, name: &str) -> PathBuf {
    logs_dir.join(format!(".{name}.replaced"))
}

/// Replace the (closed) copy of `name` under `logs_dir` by an empty log whose first offset is
/// `start`, and open it. The old copy is renamed aside first and removed once the new one is
/// open, so a crash leaves either the old copy or the new one in place, never a mix; a copy
/// left aside by an earlier crash is removed.
pub async fn replace(
    logs_dir: &Path,
    name: &str,
    start: Offset,
    config: LogConfig,
) -> Result<Log, log_core::Error> {
    let dir = logs_dir.join(name);
    let aside = aside(logs_dir, name);
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| log_core::Error::Io { op, path, source }
    };
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(io("remove", &aside))?;
    }
    if dir.exists() {
        std::fs::rename(&dir, &aside).map_err(io("rename", &dir))?;
    }
    let log = Log::open_at(&dir, config, start).await?;
    std::fs::remove_dir_all(&aside).ok();
    Ok(log)
}
