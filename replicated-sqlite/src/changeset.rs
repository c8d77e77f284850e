//! The change set: everything one committed transaction of the primary changed, as one log
//! record. A logical, row-based format (like a row-based binlog): schema statements by their
//! text, rows by their values, rows to update or delete by their primary key.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! change set := "RSQL" | version u8 (= 1) | count u32 | change * count
//! change     := 0 text                  DDL: CREATE/DROP TABLE, INDEX or VIEW
//!             | 1 text values           Insert: table, the full row
//!             | 2 text values values    Update: table, old primary key, the full new row
//!             | 3 text values           Delete: table, old primary key
//! text       := len u32 | UTF-8 bytes
//! values     := count u16 | value * count
//! value      := 0                       NULL
//!             | 1 i64                   INTEGER
//!             | 2 u64                   REAL, the bits of the f64
//!             | 3 len u32 | bytes       TEXT, the bytes SQLite stores (not checked as UTF-8)
//!             | 4 len u32 | bytes       BLOB
//! ```
//!
//! Rows hold the table's columns in `pragma table_info` order (generated columns excluded);
//! keys hold the primary-key columns in key order. [`ChangeSet::decode`] checks everything and
//! refuses an unknown version, a truncated or over-long record, an unknown tag, an empty change
//! set, an empty key or row, a DDL entry that does not create or drop a table, index or view:
//! nothing of a malformed change set is ever applied.

use rusqlite::types::{ToSqlOutput, ValueRef};

/// The version of the format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// The first four bytes of every change set.
pub const MAGIC: [u8; 4] = *b"RSQL";

/// The largest change set (encoded) the primary appends: a transaction that changes more is
/// rolled back with [`crate::Error::TooLarge`].
///
/// It keeps a change set inside one replication frame (`replication.frame_bytes_max`, 1 MiB by
/// default) with room for the batch header, and far below the node's `frame_bytes_max`
/// (8 MiB) and `batch_bytes_max` (4 MiB) and the client's frame limit
/// (`ClientConfig::default_limits`, 64 MiB).
pub const CHANGESET_BYTES_MAX: usize = 960 * 1024;

/// Bytes in front of the first change: magic, version, count.
const HEADER_LEN: usize = 4 + 1 + 4;

const TAG_DDL: u8 = 0;
const TAG_INSERT: u8 = 1;
const TAG_UPDATE: u8 = 2;
const TAG_DELETE: u8 = 3;

const VALUE_NULL: u8 = 0;
const VALUE_INTEGER: u8 = 1;
const VALUE_REAL: u8 = 2;
const VALUE_TEXT: u8 = 3;
const VALUE_BLOB: u8 = 4;

/// One SQLite value, exactly as stored: reals compare and round-trip by their bits, text by
/// its bytes.
#[derive(Clone, Debug)]
pub enum Value {
    /// NULL.
    Null,
    /// INTEGER.
    Integer(i64),
    /// REAL.
    Real(f64),
    /// TEXT, as the bytes SQLite holds (normally UTF-8).
    Text(Vec<u8>),
    /// BLOB.
    Blob(Vec<u8>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Integer(a), Value::Integer(b)) => a == b,
            (Value::Real(a), Value::Real(b)) => a.to_bits() == b.to_bits(),
            (Value::Text(a), Value::Text(b)) | (Value::Blob(a), Value::Blob(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl From<ValueRef<'_>> for Value {
    fn from(v: ValueRef<'_>) -> Value {
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(r) => Value::Real(r),
            ValueRef::Text(t) => Value::Text(t.to_vec()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(t) => ValueRef::Text(t),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl Value {
    /// The value as JSON: NULL as `null`, numbers as numbers (a non-finite real as `null`),
    /// text as a string (invalid UTF-8 replaced), a blob as `{"blob": "<hex>"}`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Integer(i) => (*i).into(),
            Value::Real(r) => serde_json::Number::from_f64(*r)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
            Value::Blob(b) => {
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                serde_json::json!({ "blob": hex })
            }
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Value::Null => 1,
            Value::Integer(_) | Value::Real(_) => 9,
            Value::Text(b) | Value::Blob(b) => 5 + b.len(),
        }
    }
}

/// One entry of a change set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A schema statement the primary executed (the `sql` of a new `sqlite_master` entry), or
    /// the DROP of a table, index or view.
    Ddl {
        /// The statement: one `CREATE ...` or `DROP ...`.
        sql: String,
    },
    /// A new row.
    Insert {
        /// The table (in the `main` database).
        table: String,
        /// Every column, in `pragma table_info` order.
        row: Vec<Value>,
    },
    /// A changed row.
    Update {
        /// The table.
        table: String,
        /// The row's primary key before the change, in key order.
        key: Vec<Value>,
        /// Every column after the change, in `pragma table_info` order.
        row: Vec<Value>,
    },
    /// A deleted row.
    Delete {
        /// The table.
        table: String,
        /// The row's primary key, in key order.
        key: Vec<Value>,
    },
}

fn values_len(values: &[Value]) -> usize {
    2 + values.iter().map(Value::encoded_len).sum::<usize>()
}

impl Change {
    /// The number of bytes this change takes in an encoded change set.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Change::Ddl { sql } => 4 + sql.len(),
            Change::Insert { table, row } => 4 + table.len() + values_len(row),
            Change::Update { table, key, row } => {
                4 + table.len() + values_len(key) + values_len(row)
            }
            Change::Delete { table, key } => 4 + table.len() + values_len(key),
        }
    }
}

/// Why bytes are not a change set this build can apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The record does not start with [`MAGIC`].
    #[error("not a change set: the record does not start with \"RSQL\"")]
    BadMagic,
    /// A version this build does not know.
    #[error("unsupported change set version {0} (this build reads version {FORMAT_VERSION})")]
    UnknownVersion(u8),
    /// Anything else: truncated, trailing bytes, unknown tag, empty key...
    #[error("malformed change set: {0}")]
    Malformed(String),
}

/// What one committed transaction changed, in the order it changed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// The changes, in execution order.
    pub changes: Vec<Change>,
}

impl ChangeSet {
    /// The encoded size, without encoding.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.changes.iter().map(Change::encoded_len).sum::<usize>()
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Encode in the current format version.
    ///
    /// # Panics
    ///
    /// If a text, blob or name is 4 GiB or longer, or a row has 65536 values or more (SQLite's
    /// limits are far below both).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        put_u32(&mut out, self.changes.len());
        for c in &self.changes {
            match c {
                Change::Ddl { sql } => {
                    out.push(TAG_DDL);
                    put_bytes(&mut out, sql.as_bytes());
                }
                Change::Insert { table, row } => {
                    out.push(TAG_INSERT);
                    put_bytes(&mut out, table.as_bytes());
                    put_values(&mut out, row);
                }
                Change::Update { table, key, row } => {
                    out.push(TAG_UPDATE);
                    put_bytes(&mut out, table.as_bytes());
                    put_values(&mut out, key);
                    put_values(&mut out, row);
                }
                Change::Delete { table, key } => {
                    out.push(TAG_DELETE);
                    put_bytes(&mut out, table.as_bytes());
                    put_values(&mut out, key);
                }
            }
        }
        debug_assert_eq!(out.len(), self.encoded_len());
        out
    }

    /// Decode and validate a change set. Never panics, and allocates no more than the input's
    /// size accounts for.
    pub fn decode(bytes: &[u8]) -> Result<ChangeSet, FormatError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let mut r = Reader {
            bytes,
            pos: MAGIC.len(),
        };
        let version = r.u8("version")?;
        if version != FORMAT_VERSION {
            return Err(FormatError::UnknownVersion(version));
        }
        let count = r.u32("change count")? as usize;
        if count == 0 {
            return Err(malformed("a change set holds at least one change"));
        }
        // Every change takes at least 5 bytes (a tag and a length).
        if count > r.remaining() / 5 {
            return Err(malformed(format!(
                "{count} changes cannot fit in {} bytes",
                r.remaining()
            )));
        }
        let mut changes = Vec::with_capacity(count);
        for i in 0..count {
            let tag = r.u8("change tag")?;
            let change = match tag {
                TAG_DDL => {
                    let sql = r.text("DDL statement")?;
                    check_ddl(&sql).map_err(|e| malformed(format!("change {i}: {e}")))?;
                    Change::Ddl { sql }
                }
                TAG_INSERT => Change::Insert {
                    table: r.table()?,
                    row: r.row()?,
                },
                TAG_UPDATE => Change::Update {
                    table: r.table()?,
                    key: r.key()?,
                    row: r.row()?,
                },
                TAG_DELETE => Change::Delete {
                    table: r.table()?,
                    key: r.key()?,
                },
                t => return Err(malformed(format!("change {i}: unknown tag {t}"))),
            };
            changes.push(change);
        }
        if r.remaining() != 0 {
            return Err(malformed(format!(
                "{} bytes after the last change",
                r.remaining()
            )));
        }
        Ok(ChangeSet { changes })
    }
}

/// Check that a DDL entry creates or drops a table, an index or a view, by its first words
/// (the statement itself is checked again when it is prepared: one statement only). Triggers,
/// virtual tables and temp objects never come from a primary.
pub(crate) fn check_ddl(sql: &str) -> Result<(), String> {
    let words: Vec<String> = sql
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .take(3)
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let first = sql.trim_start().chars().next().unwrap_or(' ');
    let ok = first.is_ascii_alphabetic()
        && matches!(
            words.as_slice(),
            ["CREATE", "TABLE", ..]
                | ["CREATE", "INDEX", ..]
                | ["CREATE", "UNIQUE", "INDEX"]
                | ["CREATE", "VIEW", ..]
                | ["DROP", "TABLE" | "INDEX" | "VIEW", ..]
        );
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a DDL entry must be a CREATE or DROP of a table, index or view, not {sql:.60?}"
        ))
    }
}

fn malformed(what: impl Into<String>) -> FormatError {
    FormatError::Malformed(what.into())
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("length under 4 GiB");
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

fn put_values(out: &mut Vec<u8>, values: &[Value]) {
    let n = u16::try_from(values.len()).expect("fewer than 65536 values");
    out.extend_from_slice(&n.to_le_bytes());
    for v in values {
        match v {
            Value::Null => out.push(VALUE_NULL),
            Value::Integer(i) => {
                out.push(VALUE_INTEGER);
                out.extend_from_slice(&i.to_le_bytes());
            }
            Value::Real(r) => {
                out.push(VALUE_REAL);
                out.extend_from_slice(&r.to_bits().to_le_bytes());
            }
            Value::Text(t) => {
                out.push(VALUE_TEXT);
                put_bytes(out, t);
            }
            Value::Blob(b) => {
                out.push(VALUE_BLOB);
                put_bytes(out, b);
            }
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(malformed(format!(
                "truncated: {what} needs {n} bytes at byte {}, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }

    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], FormatError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    fn text(&mut self, what: &str) -> Result<String, FormatError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
    }

    fn table(&mut self) -> Result<String, FormatError> {
        let t = self.text("table name")?;
        if t.is_empty() {
            return Err(malformed("empty table name"));
        }
        Ok(t)
    }

    fn values(&mut self, what: &str) -> Result<Vec<Value>, FormatError> {
        let n = self.u16(what)? as usize;
        if n == 0 {
            return Err(malformed(format!("empty {what}")));
        }
        if n > self.remaining() {
            return Err(malformed(format!(
                "{what} of {n} values cannot fit in {} bytes",
                self.remaining()
            )));
        }
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let v = match self.u8("value tag")? {
                VALUE_NULL => Value::Null,
                VALUE_INTEGER => Value::Integer(self.u64("integer")? as i64),
                VALUE_REAL => Value::Real(f64::from_bits(self.u64("real")?)),
                VALUE_TEXT => Value::Text(self.bytes("text")?.to_vec()),
                VALUE_BLOB => Value::Blob(self.bytes("blob")?.to_vec()),
                t => return Err(malformed(format!("unknown value tag {t}"))),
            };
            values.push(v);
        }
        Ok(values)
    }

    fn key(&mut self) -> Result<Vec<Value>, FormatError> {
        self.values("primary key")
    }

    fn row(&mut self) -> Result<Vec<Value>, FormatError> {
        self.values("row")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_value() -> Vec<Value> {
        vec![
            Value::Null,
            Value::Integer(0),
            Value::Integer(i64::MIN),
            Value::Integer(i64::MAX),
            Value::Integer(-1),
            Value::Real(0.0),
            Value::Real(-0.0),
            Value::Real(f64::MIN_POSITIVE / 2.0), // subnormal
            Value::Real(0.1 + 0.2),
            Value::Real(f64::MAX),
            Value::Real(f64::INFINITY),
            Value::Real(f64::NEG_INFINITY),
            Value::Text(Vec::new()),
            Value::Text("héllo, wörld ✓".as_bytes().to_vec()),
            Value::Text(vec![0xff, 0xfe, 0]), // not UTF-8: kept as bytes
            Value::Blob(Vec::new()),
            Value::Blob((0..=255).collect()),
        ]
    }

    fn sample() -> ChangeSet {
        ChangeSet {
            changes: vec![
                Change::Ddl {
                    sql: "CREATE TABLE t(id INTEGER PRIMARY KEY, v ANY)".into(),
                },
                Change::Insert {
                    table: "t".into(),
                    row: every_value(),
                },
                Change::Update {
                    table: "odd \"name\"".into(),
                    key: vec![Value::Text(b"k".to_vec()), Value::Integer(7)],
                    row: every_value(),
                },
                Change::Delete {
                    table: "t".into(),
                    key: vec![Value::Real(-0.0)],
                },
                Change::Ddl {
                    sql: "DROP INDEX \"i\"".into(),
                },
            ],
        }
    }

    #[test]
    fn round_trip_of_every_value_type_is_exact() {
        let cs = sample();
        let bytes = cs.encode();
        assert_eq!(bytes.len(), cs.encoded_len());
        assert_eq!(&bytes[..4], b"RSQL");
        assert_eq!(bytes[4], FORMAT_VERSION);
        let back = ChangeSet::decode(&bytes).unwrap();
        assert_eq!(back, cs);
        // Exactness: reals by their bits (-0.0 is not 0.0 here), text by its bytes.
        let Change::Insert { row, .. } = &back.changes[1] else {
            panic!()
        };
        assert_ne!(Value::Real(0.0), Value::Real(-0.0));
        for (a, b) in row.iter().zip(every_value()) {
            if let (Value::Real(x), Value::Real(y)) = (a, &b) {
                assert_eq!(x.to_bits(), y.to_bits());
            }
            assert_eq!(*a, b);
        }
        // NaN survives by its bits too.
        let nan = f64::from_bits(0x7ff8_0000_0000_1234);
        let cs = ChangeSet {
            changes: vec![Change::Insert {
                table: "t".into(),
                row: vec![Value::Real(nan)],
            }],
        };
        assert_eq!(ChangeSet::decode(&cs.encode()).unwrap(), cs);
    }

    #[test]
    fn unknown_version_and_bad_magic_are_refused() {
        let mut bytes = sample().encode();
        bytes[4] = 2;
        assert_eq!(
            ChangeSet::decode(&bytes),
            Err(FormatError::UnknownVersion(2))
        );
        let err = ChangeSet::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("unsupported change set version 2"), "{err}");
        bytes[4] = 0;
        assert_eq!(
            ChangeSet::decode(&bytes),
            Err(FormatError::UnknownVersion(0))
        );
        assert_eq!(ChangeSet::decode(b""), Err(FormatError::BadMagic));
        assert_eq!(ChangeSet::decode(b"RSQ"), Err(FormatError::BadMagic));
        assert_eq!(
            ChangeSet::decode(b"{\"json\": true}"),
            Err(FormatError::BadMagic)
        );
    }

    #[test]
    fn malformed_input_is_refused_never_panics() {
        let good = sample().encode();
        // Every truncation fails.
        for n in 0..good.len() {
            assert!(
                ChangeSet::decode(&good[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        // Trailing bytes.
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            ChangeSet::decode(&long),
            Err(FormatError::Malformed(m)) if m.contains("after the last change")
        ));
        // Every single-byte corruption either fails or decodes to something (never panics).
        for i in 4..good.len() {
            for x in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] = x;
                let _ = ChangeSet::decode(&b);
            }
        }
        // An empty change set.
        let mut empty = MAGIC.to_vec();
        empty.push(FORMAT_VERSION);
        empty.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            ChangeSet::decode(&empty),
            Err(FormatError::Malformed(_))
        ));
        // A count far beyond the bytes present is refused before allocating.
        let mut huge = MAGIC.to_vec();
        huge.push(FORMAT_VERSION);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ChangeSet::decode(&huge),
            Err(FormatError::Malformed(_))
        ));
        // Unknown tags, an empty key, a DDL entry that is not CREATE/DROP.
        let one = |change: &[u8]| {
            let mut b = MAGIC.to_vec();
            b.push(FORMAT_VERSION);
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(change);
            ChangeSet::decode(&b)
        };
        let err = one(&[9, 0, 0, 0, 0, 0, 0]).unwrap_err().to_string();
        assert!(err.contains("unknown tag 9"), "{err}");
        let err = one(&[TAG_DELETE, 1, 0, 0, 0, b't', 0, 0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty primary key"), "{err}");
        let err = one(&[TAG_INSERT, 1, 0, 0, 0, b't', 1, 0, 9])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown value tag 9"), "{err}");
        let sql = b"UPDATE t SET v = 1";
        let mut ddl = vec![TAG_DDL];
        ddl.extend_from_slice(&(sql.len() as u32).to_le_bytes());
        ddl.extend_from_slice(sql);
        let err = one(&ddl).unwrap_err().to_string();
        assert!(err.contains("CREATE or DROP of a table"), "{err}");
        let err = one(&[TAG_DDL, 2, 0, 0, 0, 0xff, 0xfe])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn ddl_check_reads_the_first_words() {
        assert!(check_ddl("  create table x(a)").is_ok());
        assert!(check_ddl("DROP TABLE x").is_ok());
        assert!(check_ddl("DROP INDEX \"i\"").is_ok());
        assert!(check_ddl("CREATE\nINDEX i ON x(a)").is_ok());
        assert!(check_ddl("CREATE UNIQUE INDEX i ON x(a)").is_ok());
        assert!(check_ddl("CREATE VIEW v AS SELECT 1").is_ok());
        assert!(check_ddl("DELETE FROM x").is_err());
        assert!(check_ddl("CREATED TABLE x(a)").is_err());
        assert!(check_ddl("CREATE TRIGGER t AFTER INSERT ON x BEGIN SELECT 1; END").is_err());
        assert!(check_ddl("CREATE VIRTUAL TABLE v USING fts5(a)").is_err());
        assert!(check_ddl("CREATE TEMP TABLE x(a)").is_err());
        assert!(check_ddl("-- CREATE TABLE x(a)").is_err());
        assert!(check_ddl("").is_err());
    }

    #[test]
    fn json_of_values() {
        assert_eq!(Value::Null.to_json(), serde_json::Value::Null);
        assert_eq!(Value::Integer(-3).to_json(), serde_json::json!(-3));
        assert_eq!(Value::Real(1.5).to_json(), serde_json::json!(1.5));
        assert_eq!(
            Value::Real(f64::INFINITY).to_json(),
            serde_json::Value::Null
        );
        assert_eq!(Value::Text(b"a".to_vec()).to_json(), serde_json::json!("a"));
        assert_eq!(
            Value::Blob(vec![0, 0xab]).to_json(),
            serde_json::json!({"blob": "00ab"})
        );
    }
}
