//! Snapshots: a consistent copy of a replicated database (`VACUUM INTO`) stored in replog at
//! the offset it has applied, from which new replicas start.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use client::{Client, ErrorCode};
use rusqlite::Connection;

use crate::database;
use crate::{Error, Result};

/// The largest snapshot stored: the node's default `limits.snapshot_bytes_max` (64 MiB).
pub const SNAPSHOT_BYTES_MAX: usize = 64 << 20;

/// A snapshot taken by [`take_snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The applied offset of the copy: it reflects every change set below it.
    pub offset: u64,
    /// The database file.
    pub data: Vec<u8>,
}

/// Copy the database at `db` (a primary's or a replica's, of `log`) with `VACUUM INTO` into a
/// temporary file beside it, and read the copy's applied offset from the copy itself: the
/// copy is made in one read transaction, so data and offset agree. The database may be in use
/// meanwhile. Refuses a copy larger than [`SNAPSHOT_BYTES_MAX`].
pub fn take_snapshot(db: &Path, log: &str) -> Result<Snapshot> {
    let source = database::open_read_only(db)?;
    let state = database::read_state(&source)?;
    database::check_log(&state, log, db)?;
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".replog-sqlite-snapshot")
        .tempdir_in(&dir)
        .map_err(Error::io(format!(
            "temporary directory in {}",
            dir.display()
        )))?;
    let out = tmp.path().join("snapshot.db");
    let out_str = out
        .to_str()
        .ok_or_else(|| Error::State(format!("path {} is not UTF-8", out.display())))?;
    source.execute("VACUUM main INTO ?1", [out_str])?;
    drop(source);
    let offset = {
        let copy = Connection::open(&out)?;
        // Self-contained: no WAL beside the copy.
        copy.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(()))?;
        let state = database::read_state(&copy)?;
        database::check_log(&state, log, db)?;
        state.applied_next
    };
    let len = std::fs::metadata(&out)
        .map_err(Error::io("reading the snapshot copy"))?
        .len();
    if len > SNAPSHOT_BYTES_MAX as u64 {
        return Err(Error::State(format!(
            "a snapshot of {} is {len} bytes, over SNAPSHOT_BYTES_MAX ({SNAPSHOT_BYTES_MAX} \
             bytes, the node's default snapshot_bytes_max)",
            db.display()
        )));
    }
    let data = std::fs::read(&out).map_err(Error::io("reading the snapshot copy"))?;
    Ok(Snapshot { offset, data })
}

/// Take a snapshot of `db` and store it in replog for `log`. Returns its offset and size.
///
/// Snapshots only move forward: if replog already holds a newer one, this fails (the newer one
/// stays).
pub async fn put_snapshot(client: &Client, log: &str, db: &Path) -> Result<(u64, usize)> {
    let snapshot = take_snapshot(db, log)?;
    let len = snapshot.data.len();
    client
        .put_snapshot(log, snapshot.offset, Bytes::from(snapshot.data))
        .await
        .map_err(|e| match e.code() {
            Some(ErrorCode::OffsetConflict) => Error::State(format!(
                "replog holds a snapshot of log {log:?} newer than offset {} ({e})",
                snapshot.offset
            )),
            _ => e.into(),
        })?;
    Ok((snapshot.offset, len))
}
