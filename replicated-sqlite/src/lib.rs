//! SQLite replicated through replog: leader/follower replication for a database that does not
//! replicate itself, by shipping its logical, row-based change log.
//!
//! - The [`Primary`] runs write transactions. TEMP triggers capture every row change into a
//!   [`ChangeSet`] (schema statements by their text, rows by their values, rows to update or
//!   delete by their primary key); the change set is appended to the log as one record, with
//!   `expected_offset` = the database's applied offset, and only then is the SQLite
//!   transaction committed, together with the new applied offset. The record's offset is the
//!   transaction's read-your-writes token. A primary that finds another one's record at its
//!   offset is fenced and stops.
//! - A [`Replica`] starts from the latest snapshot stored in replog (or from nothing) and
//!   applies the log in order, each change set in one SQLite transaction together with its
//!   applied offset, so it survives being killed at any moment.
//! - [`put_snapshot`] stores a consistent copy (`VACUUM INTO`) at the offset it reflects;
//!   [`query_at`] reads a replica once it has applied a token.
//! - Promotion: start a primary on a replica's database; it catches up to the log's end first.
//!
//! The database keeps its replication state in `_replog_state(log, applied_next)`. Objects
//! whose names start with `_replog_` are reserved.
//!
//! ```no_run
//! use replicated_sqlite::{Primary, PrimaryOptions, Replica};
//!
//! # async fn example() -> replicated_sqlite::Result<()> {
//! let client = client::Client::connect(client::ClientConfig::new(["127.0.0.1:7001"])).await?;
//! let options = PrimaryOptions { create: true, ..PrimaryOptions::default() };
//! let mut primary = Primary::open("primary.db", client.clone(), "app", options).await?;
//! primary.execute("CREATE TABLE kv(k TEXT PRIMARY KEY, v)").await?;
//! let token = primary.execute("INSERT INTO kv VALUES ('a', 1)").await?.unwrap();
//!
//! let mut replica = Replica::open("replica.db", client, "app").await?;
//! while replica.applied_next() <= token {
//!     replica.step(std::time::Duration::from_secs(1)).await?;
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod capture;
pub mod changeset;
mod database;
mod error;
mod primary;
mod query;
mod replica;
mod snapshot;

pub use crate::changeset::{
    Change, ChangeSet, FormatError, Value, CHANGESET_BYTES_MAX, FORMAT_VERSION,
};
pub use crate::database::{State, RESERVED_PREFIX, STATE_TABLE};
pub use crate::error::{Error, Result};
pub use crate::primary::{Primary, PrimaryOptions};
pub use crate::query::{query_at, read_at_token, QueryResult};
pub use crate::replica::{Progress, Replica, Source, READ_BYTES_MAX};
pub use crate::snapshot::{put_snapshot, take_snapshot, Snapshot, SNAPSHOT_BYTES_MAX};
