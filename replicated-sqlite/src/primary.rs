//! The primary: runs write transactions on its database and appends each one's change set to
//! the log, conditionally at the offset it expects, before committing locally.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use client::{Acks, AppendOptions, Client, ClientConfig, ErrorCode, ReadOptions};
use rusqlite::Connection;

use crate::capture::Capture;
use crate::database::{self, Applier, Found, State};
use crate::{Error, Result, CHANGESET_BYTES_MAX};

/// Options of [`Primary::open`].
#[derive(Clone, Debug)]
pub struct PrimaryOptions {
    /// The durability level every append waits for. Default [`Acks::Sync`]: the change set is
    /// durable on the leader and on every follower of the sync set before the transaction
    /// commits.
    pub acks: Acks,
    /// Create the log if it does not exist, and the database file if it does not exist.
    /// Default false.
    pub create: bool,
    /// How long catching up with the log may wait for records to commit (at start-up and when
    /// checking an append whose outcome was unknown). Default 60 s.
    pub catch_up_timeout: Duration,
    /// How long the node may wait for `acks` (`None`: the node's default).
    pub append_timeout: Option<Duration>,
}

impl Default for PrimaryOptions {
    fn default() -> PrimaryOptions {
        PrimaryOptions {
            acks: Acks::Sync,
            create: false,
            catch_up_timeout: Duration::from_secs(60),
            append_timeout: None,
        }
    }
}

/// The primary of a replicated database: the only writer.
///
/// Each [`Primary::execute`] is one write transaction: `BEGIN IMMEDIATE`, the statements, the
/// change set collected by capture triggers, an append of the change set to the log with
/// `expected_offset` = the database's applied offset, then the new applied offset and `COMMIT`
/// in the same SQLite transaction. So the log holds every committed transaction, in commit
/// order, and the database never holds one the log does not.
///
/// The conditional append fences stale primaries: if another primary has written at the
/// expected offset, the append fails with `offset_conflict`, the transaction is rolled back,
/// and this primary refuses every later write ([`Error::Fenced`]).
///
/// An append with an unknown outcome (the answer was lost) is rolled back locally, then the
/// log is read at the expected offset: if it holds this very change set, it is applied and the
/// transaction counts as committed (`execute` returns its token); if it holds another, the
/// primary is fenced; if the log ends there, the transaction did not commit. If the log cannot
/// be read, `execute` returns [`Error::UnknownOutcome`] and the same check runs before the next
/// transaction. A change set that lands later still (a request delayed in the network) is
/// found by the next append's conflict, applied, and that transaction is rolled back with
/// [`Error::Retry`]: every append carries `expected_offset`, so at most one change set is ever
/// stored per offset. If the local `COMMIT` fails after the append succeeded, the transaction
/// is in the log: `execute` returns the local error and the change set is applied from the log
/// before the next transaction.
pub struct Primary {
    conn: Connection,
    capture: Capture,
    applier: Applier,
    client: Client,
    /// A client of the leader, when `client` reaches a follower (for the log's end).
    leader: Option<(String, Client)>,
    log: String,
    path: PathBuf,
    options: PrimaryOptions,
    applied_next: u64,
    fenced: Option<u64>,
    /// The change set of a transaction whose append had an unknown outcome, at offset
    /// `applied_next`, and not found in the log so far.
    unresolved: Option<Bytes>,
    /// Whether the log must be checked for `unresolved` before the next transaction.
    check_unresolved: bool,
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field("path", &self.path)
            .field("log", &self.log)
            .field("applied_next", &self.applied_next)
            .field("fenced", &self.fenced)
            .finish_non_exhaustive()
    }
}

impl Primary {
    /// Open the database at `path` as the primary of `log`, and catch up: apply every change
    /// set in the log from the database's applied offset to the log's end (a crash after an
    /// append and before the local commit, or a replica being promoted).
    ///
    /// The database must be new (no schema) or have been replicated through `log` (a former
    /// primary's or a replica's). Every user table must have a primary key.
    pub async fn open(
        path: impl AsRef<Path>,
        client: Client,
        log: &str,
        options: PrimaryOptions,
    ) -> Result<Primary> {
        let path = path.as_ref().to_path_buf();
        if options.create {
            match client.create_log(log).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(ErrorCode::LogExists) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut conn = database::open(&path, options.create)?;
        let state = match database::inspect(&conn)? {
            Found::State(s) => {
                database::check_log(&s, log, &path)?;
                s
            }
            Found::Empty => {
                database::init_state(&conn, log, 0)?;
                State {
                    log: log.to_string(),
                    applied_next: 0,
                }
            }
            Found::Foreign => {
                return Err(Error::State(format!(
                    "database {} has tables but no replication state ({}): a primary starts \
                     from a new database or from a replica's",
                    path.display(),
                    database::STATE_TABLE
                )))
            }
        };
        let capture = Capture::install(&mut conn)?;
        let mut primary = Primary {
            conn,
            capture,
            applier: Applier::default(),
            client,
            leader: None,
            log: log.to_string(),
            path,
            options,
            applied_next: state.applied_next,
            fenced: None,
            unresolved: None,
            check_unresolved: false,
        };
        primary.catch_up().await?;
        Ok(primary)
    }

    /// The log's offset of the next change set: every record below it is applied here.
    pub fn applied_next(&self) -> u64 {
        self.applied_next
    }

    /// The log this primary writes.
    pub fn log(&self) -> &str {
        &self.log
    }

    /// `Some(offset)` once another primary has been found writing at `offset`: this primary
    /// then refuses every write.
    pub fn fenced(&self) -> Option<u64> {
        self.fenced
    }

    /// Run `sql` (one or more statements separated by `;`) as one write transaction.
    ///
    /// Returns the read-your-writes token, the log offset of the transaction's change set
    /// (a replica has applied the transaction once its applied offset is above it), or `None`
    /// when the transaction changed nothing (it is committed locally and nothing is
    /// appended). On any error the transaction is rolled back (except as
    /// [`Error::UnknownOutcome`] describes).
    pub async fn execute(&mut self, sql: &str) -> Result<Option<u64>> {
        if let Some(offset) = self.fenced {
            return Err(Error::Fenced { offset });
        }
        if self.check_unresolved {
            self.resolve().await?;
            if let Some(offset) = self.fenced {
                return Err(Error::Fenced { offset });
            }
        }
        let Some(change_set) = self.run_local(sql)? else {
            return Ok(None);
        };
        let offset = self.applied_next;
        let options = AppendOptions {
            acks: self.options.acks,
            expected_offset: Some(offset),
            timeout: self.options.append_timeout,
        };
        let result = self
            .client
            .append(&self.log, vec![change_set.clone()], options)
            .await;
        match result {
            Ok(receipt) if receipt.first == offset => {
                let commit = database::set_applied_next(&self.conn, offset + 1)
                    .and_then(|()| Ok(self.conn.execute_batch("COMMIT")?));
                if let Err(e) = commit {
                    // The log has the change set; the database does not: apply it from the
                    // log before the next transaction.
                    self.rollback();
                    self.unresolved = Some(change_set);
                    self.check_unresolved = true;
                    return Err(e);
                }
                self.applied_next = offset + 1;
                self.unresolved = None;
                Ok(Some(offset))
            }
            Ok(receipt) => {
                self.rollback();
                Err(Error::State(format!(
                    "the conditional append at offset {offset} was stored at offset {}",
                    receipt.first
                )))
            }
            Err(e) if e.code() == Some(ErrorCode::OffsetConflict) => {
                self.rollback();
                if let client::Error::Server { detail: end, .. } = &e {
                    if *end < offset {
                        // Not another writer: the log lost records this database has (a
                        // leader that crashed with appends acknowledged below acks=sync).
                        return Err(Error::State(format!(
                            "log {:?} ends at offset {end}, before offset {offset} that database \
                             {} has applied: the log lost acknowledged change sets",
                            self.log,
                            self.path.display()
                        )));
                    }
                }
                if self.unresolved.is_some() {
                    // Perhaps our own earlier change set, landed late.
                    if let Some(landed) = self.resolve().await? {
                        return Err(Error::Retry { offset: landed });
                    }
                }
                self.fenced = Some(offset);
                Err(Error::Fenced { offset })
            }
            Err(e) if e.is_unknown_outcome() => {
                self.rollback();
                self.unresolved = Some(change_set);
                self.check_unresolved = true;
                match self.resolve().await {
                    Ok(Some(landed)) => Ok(Some(landed)),
                    Ok(None) => Err(Error::Replog(e)),
                    Err(fenced @ Error::Fenced { .. }) => Err(fenced),
                    Err(_) => Err(Error::UnknownOutcome { offset, source: e }),
                }
            }
            Err(e) => {
                self.rollback();
                Err(e.into())
            }
        }
    }

    /// Begin, run `sql` with capture, and collect the change set. Returns it with the
    /// transaction still open, or `None` after committing a transaction that changed nothing.
    fn run_local(&mut self, sql: &str) -> Result<Option<Bytes>> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let collected = self
            .capture
            .clear(&self.conn)
            .and_then(|()| self.capture.run(&self.conn, sql))
            .and_then(|()| self.capture.collect(&self.conn, CHANGESET_BYTES_MAX));
        match collected {
            Ok(cs) if cs.is_empty() => {
                if let Err(e) = self.conn.execute_batch("COMMIT") {
                    self.rollback();
                    return Err(e.into());
                }
                Ok(None)
            }
            Ok(cs) => Ok(Some(Bytes::from(cs.encode()))),
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        // Triggers created by the transaction are gone with it.
        let _ = self.capture.refresh(&self.conn);
    }

    /// Apply every change set from the applied offset to the log's end.
    async fn catch_up(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.options.catch_up_timeout;
        let mut applied = false;
        let result = loop {
            let end = match self.log_end().await {
                Ok(end) => end,
                Err(e) => break Err(e),
            };
            if self.applied_next > end {
                break Err(Error::State(format!(
                    "database {} has applied log {:?} up to offset {} but the log ends at \
                     {end}: they do not belong together",
                    self.path.display(),
                    self.log,
                    self.applied_next
                )));
            }
            if self.applied_next == end {
                break Ok(());
            }
            match self.read_from(self.applied_next).await {
                Ok(records) => {
                    for (offset, value) in records {
                        self.apply_from_log(offset, &value)?;
                        applied = true;
                    }
                }
                Err(e) if is_behind(&e) && Instant::now() < deadline => {}
                Err(e) => break Err(e),
            }
        };
        if applied {
            self.capture.refresh(&self.conn)?;
        }
        result
    }

    /// Find out whether the unresolved change set is in the log at the applied offset; apply
    /// it if it is. `Ok(Some(offset))`: it was there and is applied now. `Ok(None)`: the log
    /// ends before it. Another change set there fences this primary.
    async fn resolve(&mut self) -> Result<Option<u64>> {
        let offset = self.applied_next;
        let Some(mine) = self.unresolved.clone() else {
            self.check_unresolved = false;
            return Ok(None);
        };
        let end = self.log_end().await?;
        if end <= offset {
            self.check_unresolved = false;
            return Ok(None);
        }
        let deadline = Instant::now() + self.options.catch_up_timeout;
        let record = loop {
            match self.read_from(offset).await {
                Ok(records) => {
                    if let Some((_, v)) = records.into_iter().find(|(o, _)| *o == offset) {
                        break v;
                    }
                }
                Err(e) if is_behind(&e) && Instant::now() < deadline => {}
                Err(e) => return Err(e),
            }
        };
        if record != mine {
            self.fenced = Some(offset);
            return Err(Error::Fenced { offset });
        }
        self.apply_from_log(offset, &record)?;
        self.capture.refresh(&self.conn)?;
        self.unresolved = None;
        self.check_unresolved = false;
        if end > offset + 1 {
            // Ours landed, and another primary has written after it.
            self.fenced = Some(offset + 1);
        }
        Ok(Some(offset))
    }

    fn apply_from_log(&mut self, offset: u64, value: &[u8]) -> Result<()> {
        if offset != self.applied_next {
            return Err(Error::State(format!(
                "read offset {offset} while expecting {}",
                self.applied_next
            )));
        }
        self.applier.apply_record(&self.conn, offset, value)?;
        self.applied_next = offset + 1;
        Ok(())
    }

    /// Committed records from `from` on, waiting (a little) for at least one.
    async fn read_from(&mut self, from: u64) -> Result<Vec<(u64, Bytes)>> {
        let options = ReadOptions {
            bytes_max: 4 << 20,
            wait: Duration::from_secs(1),
            min_offset: Some(from + 1),
        };
        let read = self
            .client
            .read(&self.log, from, options)
            .await
            .map_err(|e| match e.code() {
                Some(ErrorCode::OffsetOutOfRange) => Error::State(format!(
                    "log {:?} no longer holds offset {from}, which database {} needs next: \
                     start a replica from a snapshot, then promote it ({e})",
                    self.log,
                    self.path.display()
                )),
                _ => e.into(),
            })?;
        Ok(read
            .records
            .into_iter()
            .filter(|r| r.offset >= from)
            .map(|r| (r.offset, r.value))
            .collect())
    }

    /// The log's end (next offset) on its leader.
    async fn log_end(&mut self) -> Result<u64> {
        let mut status = self.client.status().await?;
        if status.role == "follower" && !status.leader.is_empty() {
            let reuse = matches!(&self.leader, Some((addr, _)) if *addr == status.leader);
            if !reuse {
                let config = ClientConfig {
                    servers: vec![status.leader.clone()],
                    ..self.client.config().clone()
                };
                let leader = Client::connect(config).await?;
                self.leader = Some((status.leader.clone(), leader));
            }
            let (_, leader) = self.leader.as_ref().expect("set above");
            status = leader.status().await?;
        }
        status
            .logs
            .iter()
            .find(|l| l.name == self.log)
            .map(|l| l.end)
            .ok_or_else(|| {
                Error::State(format!(
                    "log {:?} does not exist on node {} (create it, or pass create)",
                    self.log, status.node_id
                ))
            })
    }
}

fn is_behind(e: &Error) -> bool {
    matches!(e, Error::Replog(c) if c.code() == Some(ErrorCode::Behind))
}
