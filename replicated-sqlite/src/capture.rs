//! Capture on the primary: TEMP triggers record every row change of a write transaction into
//! TEMP tables, schema changes are found by comparing `sqlite_master` after each statement,
//! and at the end the recorded changes become a [`ChangeSet`].
//!
//! Temp objects live only in the primary's connection: the database file, its snapshots and
//! its replicas never contain a trigger of ours.
//!
//! - `temp._replog_changes(id, op, tbl, ddl)`: one row per change, in execution order (`op`
//!   0 DDL, 1 insert, 2 update, 3 delete).
//! - `temp._replog_values(change, part, col, value)`: one row per captured value; `part` 0 is
//!   the old primary key (update, delete), 1 the new full row (insert, update). `value` has no
//!   declared type, so SQLite keeps each value exactly as it is: NULL, an i64, the f64, the
//!   text bytes or the blob.
//! - Per user table, three triggers `_replog_{i,u,d}_<table>`, `AFTER INSERT/UPDATE/DELETE ON
//!   main.<table>`, which copy `NEW.*` or the primary key of `OLD` into those tables.
//!
//! The connection runs with `recursive_triggers = ON`, so rows deleted by `REPLACE` conflict
//! resolution are captured as deletes too. An authorizer keeps out of the user's statements
//! whatever would make the captured change set differ from what the transaction did:
//! transaction control and savepoints, ATTACH, ALTER TABLE, triggers and virtual tables in the
//! database, writes to our tables, and PRAGMAs that set something.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{Batch, Connection};

use crate::changeset::{Change, ChangeSet, Value};
use crate::database::{ident, is_internal, literal, table_info, TableInfo, RESERVED_PREFIX};
use crate::{Error, Result};

const OP_DDL: i64 = 0;
const OP_INSERT: i64 = 1;
const OP_UPDATE: i64 = 2;
const OP_DELETE: i64 = 3;

const PART_KEY: i64 = 0;
const PART_ROW: i64 = 1;

/// PRAGMAs a write transaction may run with an argument: they only read.
const READING_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_info",
    "index_xinfo",
    "index_list",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
];

/// One entry of `main.sqlite_master`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SchemaEntry {
    kind: String,
    name: String,
    table: String,
    sql: Option<String>,
}

/// What the authorizer refused, and whether it is checking (only while user statements are
/// prepared and run).
#[derive(Default)]
struct Guard {
    active: AtomicBool,
    refused: Mutex<Option<String>>,
    /// Tables the statement being prepared drops: their capture triggers go with them.
    dropping: Mutex<HashSet<String>>,
}

impl Guard {
    fn check(&self, ctx: AuthContext<'_>) -> Authorization {
        if !self.active.load(Ordering::Relaxed) {
            return Authorization::Allow;
        }
        let why = match ctx.action {
            AuthAction::DropTable { table_name } if !reserved(table_name) => {
                lock(&self.dropping).insert(table_name.to_ascii_lowercase());
                None
            }
            AuthAction::DropTempTrigger {
                trigger_name,
                table_name,
            } if reserved(trigger_name) => {
                if lock(&self.dropping).contains(&table_name.to_ascii_lowercase()) {
                    None
                } else {
                    Some(format!(
                        "{trigger_name}: names starting with {RESERVED_PREFIX} are reserved for \
                         replication"
                    ))
                }
            }
            _ => refusal(ctx),
        };
        match why {
            None => Authorization::Allow,
            Some(why) => {
                lock(&self.refused).get_or_insert(why);
                Authorization::Deny
            }
        }
    }

    /// The refusal since the last call, if any; starts a new statement.
    fn take(&self) -> Option<String> {
        lock(&self.dropping).clear();
        lock(&self.refused).take()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn reserved(name: &str) -> bool {
    name.to_ascii_lowercase().starts_with(RESERVED_PREFIX)
}

/// Why the authorizer refuses an action of a user statement, if it does.
fn refusal(ctx: AuthContext<'_>) -> Option<String> {
    let ours = ctx.accessor.is_some_and(reserved);
    match ctx.action {
        AuthAction::Transaction { .. } => Some(
            "transaction control (BEGIN, COMMIT, ROLLBACK): each write runs as one transaction \
             of its own"
                .into(),
        ),
        AuthAction::Savepoint { .. } => {
            Some("savepoints are not supported in a replicated write".into())
        }
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => {
            Some("ATTACH and DETACH: only the main database is replicated".into())
        }
        AuthAction::AlterTable { table_name, .. } => Some(format!(
            "ALTER TABLE {table_name} is not replicated: create a new table and copy the rows"
        )),
        AuthAction::CreateTrigger { trigger_name, .. } => Some(format!(
            "CREATE TRIGGER {trigger_name}: a trigger in the database would run again on \
             replicas (a TEMP trigger is fine: its changes are captured as rows)"
        )),
        AuthAction::CreateVtable { table_name, .. } => Some(format!(
            "CREATE VIRTUAL TABLE {table_name}: virtual tables are not replicated"
        )),
        AuthAction::CreateTable { table_name }
        | AuthAction::CreateTempTable { table_name }
        | AuthAction::CreateView {
            view_name: table_name,
        }
        | AuthAction::CreateTempView {
            view_name: table_name,
        }
        | AuthAction::CreateIndex {
            index_name: table_name,
            ..
        }
        | AuthAction::CreateTempIndex {
            index_name: table_name,
            ..
        }
        | AuthAction::CreateTempTrigger {
            trigger_name: table_name,
            ..
        }
        | AuthAction::DropTable { table_name }
        | AuthAction::DropTempTable { table_name }
            if reserved(table_name) =>
        {
            Some(format!(
                "{table_name}: names starting with {RESERVED_PREFIX} are reserved for replication"
            ))
        }
        AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name }
            if reserved(table_name) && !ours =>
        {
            Some(format!(
                "{table_name} holds replication state and is written by replication only"
            ))
        }
        AuthAction::Pragma {
            pragma_name,
            pragma_value: Some(_),
        } if !READING_PRAGMAS.contains(&pragma_name.to_ascii_lowercase().as_str()) => Some(
            format!("PRAGMA {pragma_name} with a value: settings are not replicated"),
        ),
        _ => None,
    }
}

/// Sets the guard active while alive.
struct Active<'a>(&'a Guard);

impl<'a> Active<'a> {
    fn new(g: &'a Guard) -> Active<'a> {
        g.active.store(true, Ordering::Relaxed);
        Active(g)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.store(false, Ordering::Relaxed);
    }
}

/// The capture state of a primary's connection.
pub(crate) struct Capture {
    guard: Arc<Guard>,
    /// Tables with triggers, and the `sql` of the table they were made for.
    triggered: HashMap<String, String>,
    /// `main.sqlite_master` when last looked at.
    schema: Vec<SchemaEntry>,
    schema_version: i64,
    /// Columns and keys of the captured tables, for checks when collecting.
    tables: HashMap<String, TableInfo>,
}

impl Capture {
    /// Create the temp tables, the triggers of every user table, and the authorizer. Fails if
    /// a user table cannot be captured (no primary key, virtual) or the database has triggers.
    pub fn install(conn: &mut Connection) -> Result<Capture> {
        conn.execute_batch(
            "PRAGMA recursive_triggers = ON;
             PRAGMA temp_store = MEMORY;
             CREATE TEMP TABLE IF NOT EXISTS _replog_changes(
                 id INTEGER PRIMARY KEY, op INTEGER NOT NULL, tbl TEXT NOT NULL, ddl TEXT);
             CREATE TEMP TABLE IF NOT EXISTS _replog_values(
                 change INTEGER NOT NULL, part INTEGER NOT NULL, col INTEGER NOT NULL, value,
                 PRIMARY KEY (change, part, col)) WITHOUT ROWID;",
        )?;
        let guard = Arc::new(Guard::default());
        let g = guard.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| g.check(ctx)))?;
        let mut capture = Capture {
            guard,
            triggered: HashMap::new(),
            schema: Vec::new(),
            schema_version: -1,
            tables: HashMap::new(),
        };
        capture.refresh(conn)?;
        Ok(capture)
    }

    /// Forget the recorded changes (at the start of a transaction).
    pub fn clear(&self, conn: &Connection) -> Result<()> {
        conn.execute_batch("DELETE FROM temp._replog_changes; DELETE FROM temp._replog_values;")?;
        Ok(())
    }

    /// Bring triggers and the schema snapshot up to date with the database (after start-up,
    /// after change sets were applied, after a rollback).
    pub fn refresh(&mut self, conn: &Connection) -> Result<()> {
        self.schema = read_schema(conn)?;
        self.schema_version = schema_version(conn)?;
        self.sync_triggers(conn)
    }

    /// Run the statements of `sql`, one by one, inside the caller's open transaction,
    /// recording DDL entries for the schema changes each statement makes. On an error the
    /// caller must roll back (and then [`Capture::refresh`]).
    pub fn run(&mut self, conn: &Connection, sql: &str) -> Result<()> {
        let mut batch = Batch::new(conn, sql);
        loop {
            self.guard.take();
            let stmt = {
                let _active = Active::new(&self.guard);
                batch.next()
            };
            let mut stmt = match stmt {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => return Err(self.refused_or(e)),
            };
            let result = {
                let _active = Active::new(&self.guard);
                let mut rows = stmt.raw_query();
                loop {
                    match rows.next() {
                        Ok(Some(_)) => {}
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
            };
            drop(stmt);
            result.map_err(|e| self.refused_or(e))?;
            self.after_statement(conn)?;
        }
        Ok(())
    }

    fn refused_or(&self, e: rusqlite::Error) -> Error {
        match self.guard.take() {
            Some(why) => Error::Refused(why),
            None => Error::Sql(e),
        }
    }

    /// After a statement: if the schema changed, record the DDL and trigger new tables.
    fn after_statement(&mut self, conn: &Connection) -> Result<()> {
        let version = schema_version(conn)?;
        if version == self.schema_version {
            return Ok(());
        }
        let schema = read_schema(conn)?;
        let statements = diff(&self.schema, &schema)?;
        let mut insert = conn
            .prepare_cached("INSERT INTO temp._replog_changes(op, tbl, ddl) VALUES (?1, '', ?2)")?;
        for sql in statements {
            insert.execute(rusqlite::params![OP_DDL, sql])?;
        }
        self.schema = schema;
        self.schema_version = version;
        self.sync_triggers(conn)
    }

    /// Create the triggers of tables that lack them (or whose definition changed), drop those
    /// of tables that are gone.
    fn sync_triggers(&mut self, conn: &Connection) -> Result<()> {
        let main_triggers: Vec<String> = conn
            .prepare("SELECT name FROM main.sqlite_master WHERE type = 'trigger'")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if let Some(t) = main_triggers.first() {
            return Err(Error::Refused(format!(
                "the database has trigger {t:?}: a trigger in the database would run again on \
                 replicas"
            )));
        }
        let existing: HashSet<String> = conn
            .prepare("SELECT name FROM temp.sqlite_master WHERE type = 'trigger'")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let tables: Vec<(String, String)> = self
            .schema
            .iter()
            .filter(|e| e.kind == "table" && !is_internal(&e.name))
            .map(|e| (e.name.clone(), e.sql.clone().unwrap_or_default()))
            .collect();
        let mut wanted = HashSet::new();
        self.tables.clear();
        for (table, sql) in &tables {
            if sql
                .trim_start()
                .to_ascii_uppercase()
                .starts_with("CREATE VIRTUAL")
            {
                return Err(Error::Refused(format!(
                    "table {table:?} is a virtual table: virtual tables are not replicated"
                )));
            }
            let info = table_info(conn, table)?.ok_or_else(|| {
                Error::Refused(format!("table {table:?} has no columns SQLite can list"))
            })?;
            if info.key.is_empty() {
                return Err(Error::Refused(format!(
                    "table {table:?} has no PRIMARY KEY: replicas find rows by their primary \
                     key (rowids are not stable across VACUUM); declare one"
                )));
            }
            let names = trigger_names(table);
            let fresh = self.triggered.get(table) == Some(sql)
                && names.iter().all(|n| existing.contains(n));
            if !fresh {
                for n in &names {
                    conn.execute_batch(&format!("DROP TRIGGER IF EXISTS temp.{}", ident(n)))?;
                }
                conn.execute_batch(&triggers_sql(table, &info))?;
                self.triggered.insert(table.clone(), sql.clone());
            }
            wanted.extend(names);
            self.tables.insert(table.clone(), info);
        }
        for n in existing
            .iter()
            .filter(|n| reserved(n) && !wanted.contains(*n))
        {
            conn.execute_batch(&format!("DROP TRIGGER IF EXISTS temp.{}", ident(n)))?;
        }
        self.triggered
            .retain(|t, _| tables.iter().any(|(name, _)| name == t));
        Ok(())
    }

    /// The change set recorded since [`Capture::clear`], refused as soon as its encoding grows
    /// over `bytes_max`.
    pub fn collect(&self, conn: &Connection, bytes_max: usize) -> Result<ChangeSet> {
        let mut changes_stmt =
            conn.prepare_cached("SELECT id, op, tbl, ddl FROM temp._replog_changes ORDER BY id")?;
        let mut values_stmt = conn.prepare_cached(
            "SELECT change, part, value FROM temp._replog_values ORDER BY change, part, col",
        )?;
        let mut changes = changes_stmt.query([])?;
        let mut values = values_stmt.query([])?;
        let mut pending: Option<(i64, i64, Value)> = None;
        let next_value = |values: &mut rusqlite::Rows<'_>| -> rusqlite::Result<_> {
            Ok(match values.next()? {
                Some(r) => Some((r.get(0)?, r.get(1)?, Value::from(r.get_ref(2)?))),
                None => None,
            })
        };
        let mut cs = ChangeSet::default();
        let mut size = cs.encoded_len();
        while let Some(r) = changes.next()? {
            let id: i64 = r.get(0)?;
            let op: i64 = r.get(1)?;
            let table: String = r.get(2)?;
            let mut key = Vec::new();
            let mut row = Vec::new();
            loop {
                if pending.is_none() {
                    pending = next_value(&mut values)?;
                }
                match pending.take() {
                    Some((change, part, v)) if change == id => {
                        if part == PART_KEY {
                            key.push(v);
                        } else {
                            row.push(v);
                        }
                    }
                    other => {
                        pending = other;
                        break;
                    }
                }
            }
            let change = match op {
                OP_DDL => Change::Ddl { sql: r.get(3)? },
                OP_INSERT => Change::Insert { table, row },
                OP_UPDATE => Change::Update { table, key, row },
                OP_DELETE => Change::Delete { table, key },
                op => return Err(Error::State(format!("unknown captured operation {op}"))),
            };
            self.check(&change)?;
            size += change.encoded_len();
            if size > bytes_max {
                return Err(Error::TooLarge {
                    bytes: size,
                    max: bytes_max,
                });
            }
            cs.changes.push(change);
        }
        Ok(cs)
    }

    /// A key must identify one row: no NULL in it.
    fn check(&self, change: &Change) -> Result<()> {
        let (table, key): (&str, Vec<&Value>) = match change {
            Change::Ddl { .. } => return Ok(()),
            Change::Insert { table, row } | Change::Update { table, row, .. } => {
                let Some(info) = self.tables.get(table) else {
                    return Ok(());
                };
                (table, info.key.iter().filter_map(|&i| row.get(i)).collect())
            }
            Change::Delete { table, key } => (table, key.iter().collect()),
        };
        if key.iter().any(|v| **v == Value::Null) {
            return Err(Error::Refused(format!(
                "a row of table {table:?} has NULL in its primary key, which cannot identify \
                 it on replicas: declare the key columns NOT NULL"
            )));
        }
        Ok(())
    }
}

fn schema_version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA main.schema_version", [], |r| r.get(0))?)
}

fn read_schema(conn: &Connection) -> Result<Vec<SchemaEntry>> {
    let mut stmt = conn.prepare_cached(
        "SELECT type, name, tbl_name, sql FROM main.sqlite_master ORDER BY rowid",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(SchemaEntry {
            kind: r.get(0)?,
            name: r.get(1)?,
            table: r.get(2)?,
            sql: r.get(3)?,
        })
    })?;
    let mut out = Vec::new();
    for e in rows {
        let e = e?;
        if !is_internal(&e.name) && e.sql.is_some() {
            out.push(e);
        }
    }
    Ok(out)
}

/// The DDL statements that turn schema `old` into `new`, as one statement changed it: new
/// entries by their `sql`, dropped ones by a DROP. A change of an existing entry (ALTER) is
/// refused; so is one statement that both adds and drops (a rename).
fn diff(old: &[SchemaEntry], new: &[SchemaEntry]) -> Result<Vec<String>> {
    let key = |e: &SchemaEntry| (e.kind.clone(), e.name.to_ascii_lowercase());
    let old_map: HashMap<_, _> = old.iter().map(|e| (key(e), e)).collect();
    let new_map: HashMap<_, _> = new.iter().map(|e| (key(e), e)).collect();
    for e in new {
        if let Some(o) = old_map.get(&key(e)) {
            if *o != e {
                return Err(Error::Refused(format!(
                    "the definition of {} {:?} changed: only CREATE and DROP are replicated",
                    e.kind, e.name
                )));
            }
        }
    }
    let added: Vec<&SchemaEntry> = new
        .iter()
        .filter(|e| !old_map.contains_key(&key(e)))
        .collect();
    let removed: Vec<&SchemaEntry> = old
        .iter()
        .filter(|e| !new_map.contains_key(&key(e)))
        .collect();
    if !added.is_empty() && !removed.is_empty() {
        return Err(Error::Refused(format!(
            "a statement both created {:?} and dropped {:?}: only CREATE and DROP are replicated",
            added[0].name, removed[0].name
        )));
    }
    let mut out = Vec::new();
    for e in added {
        if e.kind == "trigger" {
            return Err(Error::Refused(format!(
                "trigger {:?}: triggers in the database are not replicated",
                e.name
            )));
        }
        out.extend(e.sql.clone());
    }
    let dropped_tables: HashSet<String> = removed
        .iter()
        .filter(|e| e.kind == "table")
        .map(|e| e.name.to_ascii_lowercase())
        .collect();
    for e in removed {
        let what = match e.kind.as_str() {
            "table" => "TABLE",
            "view" => "VIEW",
            // Dropped with their table.
            "index" if dropped_tables.contains(&e.table.to_ascii_lowercase()) => continue,
            "index" => "INDEX",
            _ => continue,
        };
        out.push(format!("DROP {what} {}", ident(&e.name)));
    }
    Ok(out)
}

/// The names of a table's three triggers.
fn trigger_names(table: &str) -> [String; 3] {
    ["i", "u", "d"].map(|op| format!("{RESERVED_PREFIX}{op}_{table}"))
}

/// The CREATE TEMP TRIGGER statements of a table.
fn triggers_sql(table: &str, info: &TableInfo) -> String {
    let [ins, upd, del] = trigger_names(table);
    let t = ident(table);
    let tl = literal(table);
    let values = |part: i64, of: &str, cols: &mut dyn Iterator<Item = &String>| -> String {
        cols.enumerate()
            .map(|(i, c)| format!("(last_insert_rowid(), {part}, {i}, {of}.{})", ident(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let new_row = values(PART_ROW, "NEW", &mut info.columns.iter());
    let old_key = values(
        PART_KEY,
        "OLD",
        &mut info.key.iter().map(|&i| &info.columns[i]),
    );
    let record = |op: i64, parts: &[&str]| -> String {
        let mut s = format!(
            "INSERT INTO temp._replog_changes(op, tbl) VALUES ({op}, {tl});\n\
             INSERT INTO temp._replog_values(change, part, col, value) VALUES "
        );
        s.push_str(&parts.join(", "));
        s.push(';');
        s
    };
    format!(
        "CREATE TEMP TRIGGER {} AFTER INSERT ON main.{t} BEGIN\n{}\nEND;\n\
         CREATE TEMP TRIGGER {} AFTER UPDATE ON main.{t} BEGIN\n{}\nEND;\n\
         CREATE TEMP TRIGGER {} AFTER DELETE ON main.{t} BEGIN\n{}\nEND;",
        ident(&ins),
        record(OP_INSERT, &[&new_row]),
        ident(&upd),
        record(OP_UPDATE, &[&old_key, &new_row]),
        ident(&del),
        record(OP_DELETE, &[&old_key]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::database::{init_state, Applier};

    /// A primary-like connection with capture installed, and a replica-like one.
    fn pair() -> (Connection, Capture, Connection) {
        let mut p = Connection::open_in_memory().unwrap();
        init_state(&p, "l", 0).unwrap();
        let cap = Capture::install(&mut p).unwrap();
        let r = Connection::open_in_memory().unwrap();
        init_state(&r, "l", 0).unwrap();
        (p, cap, r)
    }

    /// Run one write transaction and return its change set (committed) or the error (rolled
    /// back).
    fn tx(p: &Connection, cap: &mut Capture, sql: &str) -> Result<ChangeSet> {
        p.execute_batch("BEGIN IMMEDIATE").unwrap();
        cap.clear(p).unwrap();
        let r = cap
            .run(p, sql)
            .and_then(|()| cap.collect(p, crate::CHANGESET_BYTES_MAX));
        match r {
            Ok(cs) => {
                p.execute_batch("COMMIT").unwrap();
                Ok(cs)
            }
            Err(e) => {
                p.execute_batch("ROLLBACK").unwrap();
                cap.refresh(p).unwrap();
                Err(e)
            }
        }
    }

    fn dump(c: &Connection) -> Vec<(String, Vec<Vec<Value>>)> {
        let tables: Vec<(String, String)> = c
            .prepare(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE '\\_replog\\_%' ESCAPE '\\' ORDER BY name",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut out = Vec::new();
        for (t, sql) in tables {
            let mut stmt = c
                .prepare(&format!("SELECT * FROM {} ORDER BY 1, 2", ident(&t)))
                .unwrap();
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    (0..n).map(|i| Ok(Value::from(r.get_ref(i)?))).collect()
                })
                .unwrap()
                .map(Result::unwrap)
                .collect();
            out.push((format!("{t}: {sql}"), rows));
        }
        out
    }

    #[test]
    fn captured_change_sets_reproduce_the_primary_exactly() {
        let (p, mut cap, r) = pair();
        let mut applier = Applier::default();
        let mut offset = 0;
        let mut ship = |cs: ChangeSet| {
            let bytes = cs.encode();
            applier.apply_record(&r, offset, &bytes).unwrap();
            offset += 1;
        };
        let cs = tx(
            &p,
            &mut cap,
            "CREATE TABLE t(id INTEGER PRIMARY KEY, i INTEGER, f REAL, s TEXT, b BLOB, v ANY);
             CREATE INDEX t_s ON t(s);
             INSERT INTO t VALUES (1, -9223372036854775808, -0.0, 'héllo', x'00ff', NULL);
             INSERT INTO t(i, f, s, b, v) VALUES (9223372036854775807, 4.9e-324, '', x'', 1e308 * 10);
             INSERT INTO t VALUES (10, NULL, 0.1, CAST(x'fffe' AS TEXT), NULL, 3.0);",
        )
        .unwrap();
        assert!(matches!(&cs.changes[0], Change::Ddl { sql } if sql.starts_with("CREATE TABLE t")));
        assert!(matches!(&cs.changes[1], Change::Ddl { sql } if sql.starts_with("CREATE INDEX")));
        assert_eq!(cs.changes.len(), 5, "{cs:?}");
        ship(cs);
        let cs = tx(
            &p,
            &mut cap,
            "UPDATE t SET id = id + 100, s = s || '!' WHERE id < 5;
             DELETE FROM t WHERE id = 10;
             INSERT OR REPLACE INTO t(id, s) VALUES (101, 'replaced');
             CREATE TABLE k(a TEXT, b INTEGER, c, PRIMARY KEY (b, a)) WITHOUT ROWID;
             INSERT INTO k VALUES ('x', 1, 2.5), ('y', 1, x'01');
             UPDATE k SET c = c * 2 WHERE a = 'x';",
        )
        .unwrap();
        // The REPLACE deleted the conflicting row: captured as a delete before the insert.
        let kinds: Vec<&str> = cs
            .changes
            .iter()
            .map(|c| match c {
                Change::Ddl { .. } => "ddl",
                Change::Insert { .. } => "insert",
                Change::Update { .. } => "update",
                Change::Delete { .. } => "delete",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "update", "update", "delete", "delete", "insert", "ddl", "insert", "insert",
                "update"
            ]
        );
        ship(cs);
        // A transaction that changes nothing has an empty change set.
        let cs = tx(
            &p,
            &mut cap,
            "SELECT * FROM t; UPDATE t SET s = 'x' WHERE 0",
        )
        .unwrap();
        assert!(cs.is_empty());
        // DROP of an index, then of a table (its indexes go with it), then a new table of the
        // same name with other columns.
        let cs = tx(
            &p,
            &mut cap,
            "DROP INDEX t_s; CREATE INDEX t_i ON t(i); DROP TABLE t;
             CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, n); INSERT INTO t VALUES ('a', 1);",
        )
        .unwrap();
        let ddl: Vec<&str> = cs
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Ddl { sql } => Some(sql.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            ddl,
            [
                "DROP INDEX \"t_s\"",
                "CREATE INDEX t_i ON t(i)",
                "DROP TABLE \"t\"",
                "CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, n)"
            ]
        );
        ship(cs);
        assert_eq!(dump(&p), dump(&r));
        let n: i64 = r
            .query_row("SELECT count(*) FROM k", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
        // No trigger of ours reached either database file's schema.
        let n: i64 = p
            .query_row(
                "SELECT count(*) FROM main.sqlite_master WHERE type = 'trigger'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn a_table_without_a_primary_key_is_refused() {
        let (p, mut cap, _) = pair();
        let err = tx(
            &p,
            &mut cap,
            "CREATE TABLE nokey(a, b); INSERT INTO nokey VALUES (1, 2)",
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::Refused(m) if m.contains("no PRIMARY KEY")),
            "{err}"
        );
        assert!(err.to_string().contains("\"nokey\""), "{err}");
        // Rolled back: the table is not there, and capture goes on.
        let n: i64 = p
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'nokey'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(
            tx(&p, &mut cap, "CREATE TABLE ok(a PRIMARY KEY)")
                .unwrap()
                .changes
                .len(),
            1
        );
        // A database that already has such a table cannot become a primary.
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE legacy(x)").unwrap();
        let err = Capture::install(&mut c).err().unwrap();
        assert!(err.to_string().contains("no PRIMARY KEY"), "{err}");
        // NULL in a primary-key column (allowed by SQLite in rowid tables) is refused.
        let err = tx(
            &p,
            &mut cap,
            "CREATE TABLE nk(k TEXT PRIMARY KEY); INSERT INTO nk VALUES (NULL)",
        )
        .unwrap_err();
        assert!(err.to_string().contains("NULL in its primary key"), "{err}");
    }

    #[test]
    fn statements_that_cannot_be_replicated_are_refused() {
        let (p, mut cap, _) = pair();
        tx(&p, &mut cap, "CREATE TABLE t(a INTEGER PRIMARY KEY, b)").unwrap();
        for (sql, why) in [
            ("COMMIT", "transaction control"),
            (
                "INSERT INTO t VALUES (1, 1); ROLLBACK",
                "transaction control",
            ),
            ("SAVEPOINT s", "savepoints"),
            ("ALTER TABLE t ADD COLUMN c", "ALTER TABLE"),
            ("ALTER TABLE t RENAME TO u", "ALTER TABLE"),
            (
                "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END",
                "CREATE TRIGGER",
            ),
            ("CREATE VIRTUAL TABLE v USING fts5(x)", "not replicated"),
            ("ATTACH ':memory:' AS other", "ATTACH"),
            (
                "UPDATE _replog_state SET applied_next = 5",
                "replication state",
            ),
            (
                "INSERT INTO temp._replog_changes(op, tbl) VALUES (1, 't')",
                "replication",
            ),
            ("DROP TRIGGER temp._replog_i_t", "reserved"),
            ("CREATE TABLE _replog_x(a PRIMARY KEY)", "reserved"),
            ("PRAGMA user_version = 3", "PRAGMA user_version"),
        ] {
            let err = tx(&p, &mut cap, sql).unwrap_err();
            assert!(
                matches!(&err, Error::Refused(m) if m.contains(why)),
                "{sql}: {err}"
            );
        }
        // Reading PRAGMAs and TEMP objects are fine; TEMP writes are not replicated.
        let cs = tx(
            &p,
            &mut cap,
            "PRAGMA table_info(t); CREATE TEMP TABLE scratch(x); INSERT INTO scratch VALUES (1);
             INSERT INTO t SELECT x, 'from temp' FROM scratch;",
        )
        .unwrap();
        assert_eq!(cs.changes.len(), 1, "{cs:?}");
        // The capture triggers survived all of it.
        let cs = tx(&p, &mut cap, "DELETE FROM t").unwrap();
        assert_eq!(cs.changes.len(), 1);
    }

    #[test]
    fn the_size_limit_is_checked_while_collecting() {
        let (p, mut cap, _) = pair();
        tx(
            &p,
            &mut cap,
            "CREATE TABLE t(a INTEGER PRIMARY KEY, b BLOB)",
        )
        .unwrap();
        p.execute_batch("BEGIN IMMEDIATE").unwrap();
        cap.clear(&p).unwrap();
        cap.run(
            &p,
            "INSERT INTO t VALUES (1, zeroblob(1000)), (2, zeroblob(1000))",
        )
        .unwrap();
        let err = cap.collect(&p, 1500).unwrap_err();
        assert!(matches!(err, Error::TooLarge { max: 1500, .. }), "{err}");
        assert!(cap.collect(&p, 2100).is_ok());
        p.execute_batch("ROLLBACK").unwrap();
    }
}
