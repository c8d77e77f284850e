//! The error type of every operation of this crate.

use client::ErrorCode;

use crate::changeset::FormatError;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed: a statement of the transaction, or the local database itself. The
    /// transaction was rolled back.
    #[error("sqlite: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The transaction did something that cannot be replicated (transaction control, ALTER
    /// TABLE, a table without a primary key, ...). It was rolled back.
    #[error("refused: {0}")]
    Refused(String),
    /// The transaction's change set is larger than
    /// [`CHANGESET_BYTES_MAX`](crate::CHANGESET_BYTES_MAX). It was rolled back.
    #[error(
        "transaction rolled back: its change set is over {max} bytes (CHANGESET_BYTES_MAX; \
         {bytes} bytes counted when the limit was crossed): split it into smaller transactions"
    )]
    TooLarge {
        /// The encoded size reached when the limit was crossed (a lower bound of the total).
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Another primary has appended to the log at `offset`, where this one expected to write:
    /// this primary is stale. The transaction was rolled back and the primary refuses every
    /// further write.
    #[error(
        "fenced: another primary has written at offset {offset}; this primary accepts no more \
         writes (its database is not changed; start a primary on an up-to-date database)"
    )]
    Fenced {
        /// The offset this primary expected to write at.
        offset: u64,
    },
    /// The append of the transaction's change set failed with an unknown outcome, and the log
    /// could not yet be read to tell whether it landed. The transaction was rolled back
    /// locally; it counts as committed if and only if the log holds its change set at
    /// `offset`. The primary finds out, and applies it if it is there, before its next
    /// transaction.
    #[error(
        "outcome unknown: the append at offset {offset} failed ({source}); the transaction is \
         committed if and only if the log holds it there, which the primary checks before its \
         next transaction"
    )]
    UnknownOutcome {
        /// Where the change set was appended.
        offset: u64,
        /// The append's failure.
        source: client::Error,
    },
    /// The change set of an earlier transaction whose outcome was unknown reached the log late,
    /// at `offset`, and has now been applied; this transaction was rolled back and may be run
    /// again.
    #[error(
        "transaction rolled back: an earlier transaction whose outcome was unknown has landed \
         at offset {offset} and was applied; run this transaction again"
    )]
    Retry {
        /// Where the earlier change set landed.
        offset: u64,
    },
    /// A replog request failed.
    #[error("replog: {0}")]
    Replog(#[from] client::Error),
    /// A record of the log is not a change set this build can apply. Nothing of it was
    /// applied.
    #[error("record at offset {offset}: {source}")]
    Format {
        /// The record's offset.
        offset: u64,
        /// What is wrong with it.
        source: FormatError,
    },
    /// Applying a change set found the database different from the primary's (a row to
    /// update or delete missing, a row to insert present, a table with other columns). Nothing
    /// of the change set was applied; the replica stops.
    #[error("diverged at offset {offset}: {what}")]
    Diverged {
        /// The offset of the change set.
        offset: u64,
        /// What did not match.
        what: String,
    },
    /// A read with a token on a replica that had not applied the token's transaction within
    /// the wait.
    #[error(
        "replica behind token: it has applied the log up to offset {applied_next} (exclusive), \
         the token needs offset {token} applied"
    )]
    Behind {
        /// The replica's applied horizon when the wait ended.
        applied_next: u64,
        /// The token asked for.
        token: u64,
    },
    /// The database and the log do not belong together: another log's database, a database
    /// ahead of the log, a database without replication state, a bad snapshot.
    #[error("{0}")]
    State(String),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the same transaction may be run again and may then succeed: replog refused the
    /// append for a while without storing it (no sync set yet, right after a create or a
    /// failover; no leader; a node busy or shutting down), or its outcome was unknown and the
    /// primary has since found out, or will before running anything else.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::UnknownOutcome { .. } => true,
            Error::Replog(e) => {
                e.is_unknown_outcome()
                    || matches!(e, client::Error::Connect(_))
                    || matches!(
                        e.code(),
                        Some(
                            ErrorCode::NotEnoughReplicas
                                | ErrorCode::NotLeader
                                | ErrorCode::Unavailable
                                | ErrorCode::Busy
                                | ErrorCode::ShuttingDown
                        )
                    )
            }
            _ => false,
        }
    }

    /// A short stable name for the kind of failure, for JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Sql(_) => "sql",
            Error::Refused(_) => "refused",
            Error::TooLarge { .. } => "too_large",
            Error::Fenced { .. } => "fenced",
            Error::UnknownOutcome { .. } => "unknown_outcome",
            Error::Retry { .. } => "retry",
            Error::Replog(_) => "replog",
            Error::Format { .. } => "format",
            Error::Diverged { .. } => "diverged",
            Error::Behind { .. } => "behind",
            Error::State(_) => "state",
            Error::Io { .. } => "io",
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
