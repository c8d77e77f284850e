//! The replica: bootstraps a database from the latest snapshot in replog (or from nothing),
//! then follows the log and applies each change set in one SQLite transaction together with
//! the applied offset.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use client::{Client, ErrorCode, ReadOptions};
use rusqlite::Connection;

use crate::database::{self, Applier, Found};
use crate::{Error, Result};

/// The change-set bytes one [`Replica::step`] reads at most (a larger change set still comes
/// whole): small enough that progress is seen often while a backlog is applied.
pub const READ_BYTES_MAX: u32 = 256 << 10;

/// Where a replica's database came from when it opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// An existing database, resumed at its applied offset.
    Existing,
    /// The latest snapshot stored in replog.
    Snapshot,
    /// Nothing: no snapshot exists, so the replica starts empty at offset 0.
    Empty,
}

impl Source {
    /// The name used in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Source::Existing => "existing",
            Source::Snapshot => "snapshot",
            Source::Empty => "empty",
        }
    }
}

/// What one [`Replica::step`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Change sets applied by this step.
    pub applied: u64,
    /// The replica's applied offset after it.
    pub applied_next: u64,
    /// The log's committed horizon as the node that answered last saw it.
    pub committed: u64,
}

/// A replica of a primary's database, fed by the log.
///
/// Every change set is applied in one SQLite transaction together with the new applied offset
/// (`_replog_state.applied_next`), so the process can be killed at any moment: on restart it
/// resumes where the database says, never applying a change set twice or skipping one. A
/// change set that does not match the database (a row to update missing, a row to insert
/// present) stops the replica with [`Error::Diverged`]; nothing is skipped.
pub struct Replica {
    conn: Connection,
    applier: Applier,
    client: Client,
    log: String,
    path: PathBuf,
    applied_next: u64,
    committed: u64,
    source: Source,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("path", &self.path)
            .field("log", &self.log)
            .field("applied_next", &self.applied_next)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// Open the replica database at `path` for `log`.
    ///
    /// A missing database file, or one without any schema, is bootstrapped: from the latest
    /// snapshot of `log` stored in replog (a whole database file with its applied offset), or,
    /// when there is none, as an empty database at offset 0. The snapshot is written beside
    /// the database, checked (`quick_check`, its log and offset), and renamed into place, so a
    /// crash during bootstrap leaves no half-made database. An existing database resumes from
    /// its applied offset.
    pub async fn open(path: impl AsRef<Path>, client: Client, log: &str) -> Result<Replica> {
        let path = path.as_ref().to_path_buf();
        let found = if path.exists() {
            let conn = database::open(&path, false)?;
            database::inspect(&conn)?
        } else {
            Found::Empty
        };
        let source = match found {
            Found::State(s) => {
                database::check_log(&s, log, &path)?;
                Source::Existing
            }
            Found::Foreign => {
                return Err(Error::State(format!(
                    "database {} has tables but no replication state ({}): a replica starts \
                     from a new database",
                    path.display(),
                    database::STATE_TABLE
                )))
            }
            Found::Empty => match latest_snapshot(&client, log).await? {
                Some((offset, data)) => {
                    install_snapshot(&path, log, offset, &data)?;
                    Source::Snapshot
                }
                None => {
                    let conn = database::open(&path, true)?;
                    database::init_state(&conn, log, 0)?;
                    Source::Empty
                }
            },
        };
        let conn = database::open(&path, false)?;
        let state = database::read_state(&conn)?;
        database::check_log(&state, log, &path)?;
        Ok(Replica {
            conn,
            applier: Applier::default(),
            client,
            log: log.to_string(),
            path,
            applied_next: state.applied_next,
            committed: 0,
            source,
        })
    }

    /// Where the database came from when it was opened.
    pub fn source(&self) -> Source {
        self.source
    }

    /// The offset of the next change set to apply.
    pub fn applied_next(&self) -> u64 {
        self.applied_next
    }

    /// The path of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the log from the applied offset, waiting up to `wait` for records to commit, and
    /// apply what arrived, each change set in its own transaction.
    pub async fn step(&mut self, wait: Duration) -> Result<Progress> {
        let options = ReadOptions {
            bytes_max: READ_BYTES_MAX,
            wait,
            min_offset: None,
        };
        let read = self
            .client
            .read(&self.log, self.applied_next, options)
            .await
            .map_err(|e| match e.code() {
                Some(ErrorCode::OffsetOutOfRange) => Error::State(format!(
                    "log {:?} no longer holds offset {}, which this replica needs next: \
                     remove {} and start again from a snapshot ({e})",
                    self.log,
                    self.applied_next,
                    self.path.display()
                )),
                _ => e.into(),
            })?;
        let mut applied = 0;
        for record in read.records {
            if record.offset < self.applied_next {
                continue;
            }
            if record.offset != self.applied_next {
                return Err(Error::State(format!(
                    "the log skipped from offset {} to {}",
                    self.applied_next, record.offset
                )));
            }
            self.applier
                .apply_record(&self.conn, record.offset, &record.value)?;
            self.applied_next = record.offset + 1;
            applied += 1;
        }
        self.committed = self.committed.max(read.committed);
        Ok(Progress {
            applied,
            applied_next: self.applied_next,
            committed: self.committed.max(self.applied_next),
        })
    }

    /// Follow the log forever: [`Replica::step`] in a loop, calling `progress` after each.
    /// Failures to reach replog are retried (after a pause); any other error ends the loop.
    pub async fn run(&mut self, mut progress: impl FnMut(&Progress)) -> Result<()> {
        let mut failures = 0u32;
        loop {
            match self.step(Duration::from_secs(1)).await {
                Ok(p) => {
                    failures = 0;
                    progress(&p);
                }
                Err(Error::Replog(e)) if retryable(&e) => {
                    failures = failures.saturating_add(1);
                    let pause = Duration::from_millis(100 << failures.min(5));
                    eprintln!("replog-sqlite replica: {e}; retrying in {pause:?}");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How long a replica waits for a node to know the log (a follower learns of a new log from
/// its leader within moments).
const LOG_WAIT: Duration = Duration::from_secs(30);

/// The latest snapshot of `log` on the node `client` reaches, waiting up to [`LOG_WAIT`] for
/// the node to know the log.
/// Returns its offset and data.
async fn latest_snapshot(client: &Client, log: &str) -> Result<Option<(u64, bytes::Bytes)>> {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        match client.latest_snapshot(log).await {
            Ok(s) => return Ok(s.map(|s| (s.offset, s.data))),
            Err(e) if e.code() == Some(ErrorCode::LogNotFound) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Failures of the transport, or a node that has not caught up (or not yet learned of the
/// log, as a follower does shortly after the log is created): worth another read.
fn retryable(e: &client::Error) -> bool {
    match e.code() {
        None => !matches!(e, client::Error::Config(_) | client::Error::Corrupt(_)),
        Some(code) => matches!(
            code,
            ErrorCode::Behind
                | ErrorCode::LogNotFound
                | ErrorCode::Busy
                | ErrorCode::ShuttingDown
                | ErrorCode::Timeout
                | ErrorCode::NotLeader
        ),
    }
}

/// Write a snapshot beside `path`, check it, and rename it into place.
fn install_snapshot(path: &Path, log: &str, offset: u64, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".replog-sqlite-bootstrap")
        .tempfile_in(&dir)
        .map_err(Error::io(format!("temporary file in {}", dir.display())))?;
    {
        use std::io::Write;
        let f = tmp.as_file_mut();
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .map_err(Error::io("writing the snapshot"))?;
    }
    {
        let conn = Connection::open_with_flags(
            tmp.path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(Error::State(format!(
                "the snapshot of log {log:?} at offset {offset} fails quick_check: {check}"
            )));
        }
        let state = match database::inspect(&conn)? {
            Found::State(s) => s,
            _ => {
                return Err(Error::State(format!(
                    "the snapshot of log {log:?} at offset {offset} has no replication state"
                )))
            }
        };
        if state.log != log || state.applied_next != offset {
            return Err(Error::State(format!(
                "the snapshot stored for log {log:?} at offset {offset} holds log {:?} at \
                 offset {}",
                state.log, state.applied_next
            )));
        }
    }
    // The database being replaced has no schema; its WAL must not be applied to the snapshot.
    for suffix in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(format!("removing {}", Path::new(&p).display()))(
                    e,
                ))
            }
        }
    }
    tmp.persist(path)
        .map_err(|e| Error::io(format!("renaming the snapshot to {}", path.display()))(e.error))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(format!("syncing directory {}", dir.display())))?;
    Ok(())
}
