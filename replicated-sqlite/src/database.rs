//! The local database: opening it, the replication state kept inside it, and applying change
//! sets in order, each in one SQLite transaction together with the applied offset.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::changeset::{check_ddl, Change, ChangeSet};
use crate::{Error, Result};

/// Names of every table, trigger and column this crate adds start with this; user objects may
/// not.
pub const RESERVED_PREFIX: &str = "_replog_";

/// The table holding the replication state: one row, `(log, applied_next)`.
pub const STATE_TABLE: &str = "_replog_state";

/// The replication state of a database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// The log the database is replicated through.
    pub log: String,
    /// The offset of the next change set to apply: every record below it is applied, none at
    /// or above it.
    pub applied_next: u64,
}

/// What a database file holds, as far as replication goes.
#[derive(Debug)]
pub(crate) enum Found {
    /// Replication state: a primary's or a replica's database.
    State(State),
    /// No schema at all: a new database.
    Empty,
    /// Tables but no replication state.
    Foreign,
}

/// Whether `name` is one of SQLite's or ours: never captured, never compared.
pub(crate) fn is_internal(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("sqlite_") || lower.starts_with(RESERVED_PREFIX)
}

/// `name` as an SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `s` as an SQL string literal.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Open (and with `create`, create) a database for reading and writing, in WAL mode, so that
/// readers (`query`, `snapshot`) run beside the writer.
///
/// `synchronous = NORMAL`: a commit is durable at the next checkpoint rather than at once.
/// That is safe here because the log, not the local file, is what is durable: a commit lost in
/// a power failure takes its applied offset with it, and the change sets are applied again from
/// the log.
pub(crate) fn open(path: &Path, create: bool) -> Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    } else if !path.exists() {
        return Err(Error::State(format!(
            "database {} does not exist",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::State(format!(
            "database {}: cannot switch to WAL mode (journal mode is {mode})",
            path.display()
        )));
    }
    // Foreign keys off (SQLite's default, whatever the build's): applying a change set must
    // change exactly the rows the primary changed, and run no foreign-key action of its own.
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF;")?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// Open a database read-only (it must exist).
pub(crate) fn open_read_only(path: &Path) -> Result<Connection> {
    if !path.exists() {
        return Err(Error::State(format!(
            "database {} does not exist",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(conn)
}

/// The replication state, the absence of any schema, or neither.
pub(crate) fn inspect(conn: &Connection) -> Result<Found> {
    let has_state: bool = conn.query_row(
        "SELECT count(*) FROM main.sqlite_master WHERE type = 'table' AND name = ?1",
        [STATE_TABLE],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if has_state {
        return Ok(Found::State(read_state(conn)?));
    }
    let entries: i64 =
        conn.query_row("SELECT count(*) FROM main.sqlite_master", [], |r| r.get(0))?;
    Ok(if entries == 0 {
        Found::Empty
    } else {
        Found::Foreign
    })
}

/// The replication state (the database must have it).
pub(crate) fn read_state(conn: &Connection) -> Result<State> {
    let state = conn
        .query_row(
            &format!("SELECT log, applied_next FROM main.{STATE_TABLE} WHERE id = 0"),
            [],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )
        .optional()?;
    match state {
        Some((log, next)) if next >= 0 => Ok(State {
            log,
            applied_next: next as u64,
        }),
        Some((_, next)) => Err(Error::State(format!(
            "{STATE_TABLE} holds a negative offset {next}"
        ))),
        None => Err(Error::State(format!("{STATE_TABLE} has no row"))),
    }
}

/// Create the replication state of a new database, in one transaction.
pub(crate) fn init_state(conn: &Connection, log: &str, applied_next: u64) -> Result<()> {
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         CREATE TABLE main.{STATE_TABLE}(
             id INTEGER PRIMARY KEY CHECK (id = 0),
             log TEXT NOT NULL,
             applied_next INTEGER NOT NULL CHECK (applied_next >= 0));
         INSERT INTO main.{STATE_TABLE}(id, log, applied_next) VALUES (0, {}, {});
         COMMIT;",
        literal(log),
        applied_next
    ))?;
    Ok(())
}

/// Check that a database's state belongs to `log`.
pub(crate) fn check_log(state: &State, log: &str, path: &Path) -> Result<()> {
    if state.log != log {
        return Err(Error::State(format!(
            "database {} is replicated through log {:?}, not {log:?}",
            path.display(),
            state.log
        )));
    }
    Ok(())
}

/// The columns of a table and its primary key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableInfo {
    /// Column names in `pragma table_info` order (generated columns excluded).
    pub columns: Vec<String>,
    /// Indexes into `columns` of the primary-key columns, in key order; empty without a
    /// declared primary key.
    pub key: Vec<usize>,
}

/// The columns and primary key of `main.<table>`; `None` if there is no such table.
pub(crate) fn table_info(conn: &Connection, table: &str) -> Result<Option<TableInfo>> {
    let mut stmt =
        conn.prepare_cached("SELECT name, pk FROM pragma_table_info(?1, 'main') ORDER BY cid")?;
    let mut columns = Vec::new();
    let mut pk = Vec::new();
    let mut rows = stmt.query([table])?;
    while let Some(r) = rows.next()? {
        let name: String = r.get(0)?;
        let pos: i64 = r.get(1)?;
        if pos > 0 {
            pk.push((pos, columns.len()));
        }
        columns.push(name);
    }
    if columns.is_empty() {
        return Ok(None);
    }
    pk.sort();
    Ok(Some(TableInfo {
        columns,
        key: pk.into_iter().map(|(_, i)| i).collect(),
    }))
}

/// Applies change sets to a database, caching each table's columns and statements.
#[derive(Default)]
pub(crate) struct Applier {
    tables: HashMap<String, TableInfo>,
}

impl Applier {
    /// Decode the record at `offset` and apply it in one transaction together with the new
    /// applied offset (`offset + 1`). The database's applied offset must be `offset`. On any
    /// failure nothing is applied.
    pub fn apply_record(&mut self, conn: &Connection, offset: u64, bytes: &[u8]) -> Result<()> {
        let cs = ChangeSet::decode(bytes).map_err(|source| Error::Format { offset, source })?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = self.apply_in_transaction(conn, offset, &cs);
        let result = result.and_then(|()| Ok(conn.execute_batch("COMMIT")?));
        if result.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
            // A DDL entry may have been rolled back: forget what was learned.
            self.tables.clear();
        }
        result
    }

    /// Apply a change set inside the caller's transaction and set the applied offset to
    /// `offset + 1`. The database's applied offset must be `offset`.
    pub fn apply_in_transaction(
        &mut self,
        conn: &Connection,
        offset: u64,
        cs: &ChangeSet,
    ) -> Result<()> {
        let state = read_state(conn)?;
        if state.applied_next != offset {
            return Err(Error::State(format!(
                "change set at offset {offset} arrived, but the database has applied up to \
                 {} (exclusive)",
                state.applied_next
            )));
        }
        for (i, change) in cs.changes.iter().enumerate() {
            self.apply_change(conn, offset, change)
                .map_err(|e| match e {
                    Error::Diverged { offset, what } => Error::Diverged {
                        offset,
                        what: format!("change {i}: {what}"),
                    },
                    e => e,
                })?;
        }
        set_applied_next(conn, offset + 1)
    }

    fn info(&mut self, conn: &Connection, offset: u64, table: &str) -> Result<&TableInfo> {
        if !self.tables.contains_key(table) {
            if is_internal(table) {
                return Err(diverged(
                    offset,
                    format!("a change to internal table {table:?}"),
                ));
            }
            let info = table_info(conn, table)?
                .ok_or_else(|| diverged(offset, format!("no table {table:?}")))?;
            self.tables.insert(table.to_string(), info);
        }
        Ok(&self.tables[table])
    }

    fn apply_change(&mut self, conn: &Connection, offset: u64, change: &Change) -> Result<()> {
        match change {
            Change::Ddl { sql } => {
                check_ddl(sql).map_err(|e| diverged(offset, e))?;
                // SQLITE_ERROR here means the schema differs ("table t already exists", "no
                // such index"); anything else (I/O, busy) is reported as it is.
                let schema_error = |e: rusqlite::Error| match &e {
                    rusqlite::Error::SqlInputError { .. } => {
                        diverged(offset, format!("{sql:?}: {e}"))
                    }
                    rusqlite::Error::SqliteFailure(f, _)
                        if f.code == rusqlite::ErrorCode::Unknown =>
                    {
                        diverged(offset, format!("{sql:?}: {e}"))
                    }
                    _ => e.into(),
                };
                // One statement only: `prepare` refuses anything after it.
                let mut stmt = conn.prepare(sql).map_err(schema_error)?;
                stmt.raw_execute().map_err(schema_error)?;
                self.tables.clear();
            }
            Change::Insert { table, row } => {
                let info = self.info(conn, offset, table)?;
                check_row(offset, table, info, row)?;
                let cols: Vec<String> = info.columns.iter().map(|c| ident(c)).collect();
                let params: Vec<String> = (1..=row.len()).map(|i| format!("?{i}")).collect();
                let sql = format!(
                    "INSERT INTO main.{}({}) VALUES ({})",
                    ident(table),
                    cols.join(", "),
                    params.join(", ")
                );
                let n = conn
                    .prepare_cached(&sql)?
                    .execute(rusqlite::params_from_iter(row.iter()))
                    .map_err(|e| match e.sqlite_error_code() {
                        Some(rusqlite::ErrorCode::ConstraintViolation) => {
                            diverged(offset, format!("insert into {table:?}: {e}"))
                        }
                        _ => e.into(),
                    })?;
                if n != 1 {
                    return Err(diverged(
                        offset,
                        format!("insert into {table:?} stored {n} rows"),
                    ));
                }
            }
            Change::Update { table, key, row } => {
                let info = self.info(conn, offset, table)?;
                check_row(offset, table, info, row)?;
                check_key(offset, table, info, key)?;
                let sets: Vec<String> = info
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{} = ?{}", ident(c), i + 1))
                    .collect();
                let sql = format!(
                    "UPDATE main.{} SET {} WHERE {}",
                    ident(table),
                    sets.join(", "),
                    key_clause(info, row.len() + 1)
                );
                let n = conn
                    .prepare_cached(&sql)?
                    .execute(rusqlite::params_from_iter(row.iter().chain(key.iter())))
                    .map_err(|e| match e.sqlite_error_code() {
                        Some(rusqlite::ErrorCode::ConstraintViolation) => {
                            diverged(offset, format!("update of {table:?}: {e}"))
                        }
                        _ => e.into(),
                    })?;
                if n != 1 {
                    return Err(diverged(
                        offset,
                        format!("update of {table:?} key {key:?} matched {n} rows, not 1"),
                    ));
                }
            }
            Change::Delete { table, key } => {
                let info = self.info(conn, offset, table)?;
                check_key(offset, table, info, key)?;
                let sql = format!(
                    "DELETE FROM main.{} WHERE {}",
                    ident(table),
                    key_clause(info, 1)
                );
                let n = conn
                    .prepare_cached(&sql)?
                    .execute(rusqlite::params_from_iter(key.iter()))?;
                if n != 1 {
                    return Err(diverged(
                        offset,
                        format!("delete from {table:?} key {key:?} matched {n} rows, not 1"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn diverged(offset: u64, what: impl Into<String>) -> Error {
    Error::Diverged {
        offset,
        what: what.into(),
    }
}

fn check_row(offset: u64, table: &str, info: &TableInfo, row: &[crate::Value]) -> Result<()> {
    if row.len() != info.columns.len() {
        return Err(diverged(
            offset,
            format!(
                "a row of {} values for table {table:?}, which has {} columns",
                row.len(),
                info.columns.len()
            ),
        ));
    }
    Ok(())
}

fn check_key(offset: u64, table: &str, info: &TableInfo, key: &[crate::Value]) -> Result<()> {
    if info.key.is_empty() || key.len() != info.key.len() {
        return Err(diverged(
            offset,
            format!(
                "a key of {} values for table {table:?}, whose primary key has {}",
                key.len(),
                info.key.len()
            ),
        ));
    }
    Ok(())
}

/// `"k1" = ?n AND "k2" = ?n+1 ...` for the primary key, parameters from `first`.
fn key_clause(info: &TableInfo, first: usize) -> String {
    info.key
        .iter()
        .enumerate()
        .map(|(i, &c)| format!("{} = ?{}", ident(&info.columns[c]), first + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Set the applied offset (inside the caller's transaction).
pub(crate) fn set_applied_next(conn: &Connection, next: u64) -> Result<()> {
    let next = i64::try_from(next).map_err(|_| Error::State("offset out of range".into()))?;
    let n = conn
        .prepare_cached(&format!(
            "UPDATE main.{STATE_TABLE} SET applied_next = ?1 WHERE id = 0"
        ))?
        .execute([next])?;
    if n != 1 {
        return Err(Error::State(format!("{STATE_TABLE} has no row")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        init_state(&conn, "l", 0).unwrap();
        conn.execute_batch("CREATE TABLE t(a INTEGER, b TEXT, c ANY, PRIMARY KEY (b, a))")
            .unwrap();
        conn
    }

    fn rows(conn: &Connection) -> Vec<(i64, String, Value)> {
        let mut stmt = conn.prepare("SELECT a, b, c FROM t ORDER BY a").unwrap();
        stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, Value::from(r.get_ref(2)?)))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    #[test]
    fn applies_in_order_with_the_offset_and_refuses_divergence() {
        let conn = db();
        let info = table_info(&conn, "t").unwrap().unwrap();
        assert_eq!(info.columns, ["a", "b", "c"]);
        assert_eq!(info.key, [1, 0], "key order, not column order");
        let mut a = Applier::default();
        let row = |a: i64, c: Value| vec![Value::Integer(a), Value::Text(b"x".to_vec()), c];
        let key = |a: i64| vec![Value::Text(b"x".to_vec()), Value::Integer(a)];
        let cs = ChangeSet {
            changes: vec![
                Change::Insert {
                    table: "t".into(),
                    row: row(1, Value::Real(-0.0)),
                },
                Change::Insert {
                    table: "t".into(),
                    row: row(2, Value::Blob(vec![1, 2])),
                },
                Change::Update {
                    table: "t".into(),
                    key: key(1),
                    row: row(3, Value::Null),
                },
                Change::Delete {
                    table: "t".into(),
                    key: key(2),
                },
            ],
        };
        a.apply_record(&conn, 0, &cs.encode()).unwrap();
        assert_eq!(read_state(&conn).unwrap().applied_next, 1);
        assert_eq!(rows(&conn), [(3, "x".to_string(), Value::Null)]);

        // Out of order: refused, nothing applied.
        let err = a.apply_record(&conn, 5, &cs.encode()).unwrap_err();
        assert!(matches!(err, Error::State(_)), "{err}");
        // The same change set again at the right offset diverges (row 1 is gone): nothing of
        // it stays applied.
        let err = a.apply_record(&conn, 1, &cs.encode()).unwrap_err();
        assert!(matches!(err, Error::Diverged { offset: 1, .. }), "{err}");
        assert!(err.to_string().contains("change 2"), "{err}");
        assert_eq!(rows(&conn), [(3, "x".to_string(), Value::Null)]);
        assert_eq!(read_state(&conn).unwrap().applied_next, 1);
        // An insert of a row that exists diverges.
        let dup = ChangeSet {
            changes: vec![Change::Insert {
                table: "t".into(),
                row: row(3, Value::Integer(1)),
            }],
        };
        let err = a.apply_record(&conn, 1, &dup.encode()).unwrap_err();
        assert!(matches!(err, Error::Diverged { .. }), "{err}");
        // A malformed record is refused before anything is done.
        let err = a.apply_record(&conn, 1, b"RSQL\x07").unwrap_err();
        assert!(matches!(err, Error::Format { offset: 1, .. }), "{err}");
        // DDL, then rows of the new table, in one change set.
        let ddl = ChangeSet {
            changes: vec![
                Change::Ddl {
                    sql: "CREATE TABLE u(k INTEGER PRIMARY KEY, v)".into(),
                },
                Change::Insert {
                    table: "u".into(),
                    row: vec![Value::Integer(1), Value::Text(vec![0xff])],
                },
            ],
        };
        a.apply_record(&conn, 1, &ddl.encode()).unwrap();
        // The same table again: the schema diverged.
        let err = a.apply_record(&conn, 2, &ddl.encode()).unwrap_err();
        assert!(
            matches!(&err, Error::Diverged { what, .. } if what.contains("already exists")),
            "{err}"
        );
        let v: Vec<u8> = conn
            .query_row("SELECT CAST(v AS BLOB) FROM u", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, [0xff]);
        assert_eq!(read_state(&conn).unwrap().applied_next, 2);
    }
}
