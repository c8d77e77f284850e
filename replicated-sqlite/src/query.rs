//! Reads with read-your-writes tokens: wait until the database has applied the token's
//! transaction, then read in the same SQLite read transaction that checked it.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::changeset::Value;
use crate::database;
use crate::{Error, Result};

/// The answer to [`query_at`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryResult {
    /// The column names.
    pub columns: Vec<String>,
    /// The rows, each with one value per column.
    pub rows: Vec<Vec<Value>>,
    /// The database's applied offset in the read transaction the rows come from.
    pub applied_next: u64,
}

/// Run `read` inside one read transaction of `conn` in which the database has applied the
/// transaction of `token` (its applied offset is above it), polling until then for at most
/// `wait`. Without a token, run it at once. WAL lets this read while a replica writes. A
/// database without its replication state yet (a replica creating it) is waited for too.
///
/// Fails with [`Error::Behind`] when the token is not reached in time: never with data older
/// than the token.
pub fn read_at_token<T>(
    conn: &Connection,
    token: Option<u64>,
    wait: Duration,
    read: impl FnOnce(&Connection, u64) -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(5);
    loop {
        conn.execute_batch("BEGIN")?;
        // The first read starts the transaction's snapshot: everything below reads the same.
        let applied_next = match database::read_state(conn) {
            Ok(s) => s.applied_next,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                // A replica that is still creating its database: wait for it too.
                if Instant::now() >= deadline {
                    return Err(e);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
                continue;
            }
        };
        if token.is_none_or(|t| applied_next > t) {
            let result = read(conn, applied_next);
            let _ = conn.execute_batch("COMMIT");
            return result;
        }
        conn.execute_batch("COMMIT")?;
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Behind {
                applied_next,
                token: token.unwrap_or(0),
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Open the database at `db` read-only and run the query `sql` once it has applied the
/// transaction of `token` (see [`read_at_token`]).
///
/// A database file that does not exist yet (a replica starting) is waited for as well, within
/// the same `wait`.
pub fn query_at(db: &Path, token: Option<u64>, wait: Duration, sql: &str) -> Result<QueryResult> {
    let started = Instant::now();
    let conn = loop {
        match database::open_read_only(db) {
            Ok(c) => break c,
            Err(e) if started.elapsed() >= wait => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let wait = wait.saturating_sub(started.elapsed());
    read_at_token(&conn, token, wait, |conn, applied_next| {
        let mut stmt = conn.prepare(sql)?;
        let columns: Vec<String> = stmt.column_names().map(str::to_string).collect();
        let n = columns.len();
        let mut rows = Vec::new();
        let mut query = stmt.query([])?;
        while let Some(r) = query.next()? {
            let row = (0..n)
                .map(|i| r.get_ref(i).map(Value::from))
                .collect::<rusqlite::Result<Vec<Value>>>()?;
            rows.push(row);
        }
        Ok(QueryResult {
            columns,
            rows,
            applied_next,
        })
    })
}
