//! `replog-sqlite`: SQLite replicated through replog (primary, replica, snapshots, reads with
//! read-your-writes tokens).
//!
//! Exit status: 0 ok, 1 failed, 2 usage, 3 unknown outcome (a transaction may or may not be
//! committed), 4 replica behind token, 5 fenced (another primary has written).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use client::{Acks, Client, ClientConfig, Trust};
use replicated_sqlite::{Error, Primary, PrimaryOptions, Replica};
use serde_json::json;

const EXIT_FAILED: u8 = 1;
const EXIT_UNKNOWN: u8 = 3;
const EXIT_BEHIND: u8 = 4;
const EXIT_FENCED: u8 = 5;

#[derive(Parser)]
#[command(
    name = "replog-sqlite",
    version,
    about = "SQLite replicated through replog: a primary appends each transaction's row changes \
             to a log, replicas apply them in order"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Act as the primary: run the write transactions read from standard input, one per line
    /// (a line may hold several statements separated by ';'), and print {"token":N} for each.
    Primary(WriteArgs),
    /// Run one write transaction as the primary and print {"token":N}.
    Exec(ExecArgs),
    /// Maintain a replica: bootstrap the database (from the latest snapshot) if it is new, then
    /// follow the log, printing {"event":"applied","next":N} progress lines.
    Replica(ReplicaArgs),
    /// Store a snapshot of a database (a primary's or a replica's) in replog, at the offset it
    /// has applied.
    Snapshot(ReplicaArgs),
    /// Run a query on a database once it has applied the transaction of a token; print one
    /// JSON object per row.
    Query(QueryArgs),
}

#[derive(Args)]
struct ConnArgs {
    /// replog node address(es), host:port; repeat or separate with commas.
    #[arg(long = "server", required = true, value_delimiter = ',')]
    servers: Vec<String>,
    /// PEM CA to verify the nodes with (default: the local development CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Bearer token, for nodes that require one.
    #[arg(long, env = "REPLOG_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The log the database is replicated through.
    #[arg(long)]
    log: String,
}

#[derive(Args)]
struct WriteArgs {
    /// The primary's SQLite database file.
    #[arg(long)]
    db: PathBuf,
    #[command(flatten)]
    conn: ConnArgs,
    /// Durability of each append before the transaction commits: none, leader, sync or quorum.
    #[arg(long, default_value = "sync", value_parser = parse_acks)]
    acks: Acks,
    /// Create the log and the database file if they do not exist.
    #[arg(long)]
    create: bool,
    /// How long a transaction is retried while replog refuses it for a while without storing
    /// it (no sync set yet after a create or a failover, no leader, busy) or its outcome is
    /// unknown (ms).
    #[arg(long, default_value_t = 30_000)]
    retry_ms: u64,
    /// `primary`: go on with the next transaction after one fails (by default the first
    /// failure stops the primary, as `sqlite3 -bail` does, so that no later transaction runs
    /// against a database missing it).
    #[arg(long)]
    keep_going: bool,
}

#[derive(Args)]
struct ExecArgs {
    #[command(flatten)]
    write: WriteArgs,
    /// The transaction: one or more statements separated by ';'.
    sql: String,
}

#[derive(Args)]
struct ReplicaArgs {
    /// The SQLite database file.
    #[arg(long)]
    db: PathBuf,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args)]
struct QueryArgs {
    /// The SQLite database file (opened read-only).
    #[arg(long)]
    db: PathBuf,
    /// A token from the primary: read only once the database has applied its transaction.
    #[arg(long)]
    token: Option<u64>,
    /// How long to wait for the token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    wait_ms: u64,
    /// The query.
    sql: String,
}

fn parse_acks(s: &str) -> Result<Acks, String> {
    Acks::from_name(s)
        .ok_or_else(|| format!("unknown acks level {s:?}: use none, leader, sync or quorum"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Query(a) => query(a),
        command => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime");
            match command {
                Command::Primary(a) => primary(&runtime, a),
                Command::Exec(a) => exec(&runtime, a),
                Command::Replica(a) => runtime.block_on(replica(a)),
                Command::Snapshot(a) => runtime.block_on(snapshot(a)),
                Command::Query(_) => unreachable!("handled above"),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replog-sqlite: {e}");
            ExitCode::from(status(&e))
        }
    }
}

fn status(e: &Error) -> u8 {
    match e {
        Error::Fenced { .. } => EXIT_FENCED,
        Error::UnknownOutcome { .. } => EXIT_UNKNOWN,
        Error::Behind { .. } => EXIT_BEHIND,
        _ => EXIT_FAILED,
    }
}

async fn connect(c: &ConnArgs) -> Result<Client, Error> {
    let mut config = ClientConfig::new(c.servers.clone());
    if let Some(ca) = &c.ca {
        config = config.with_trust(Trust::CaFile(ca.clone()));
    }
    config.token = c.token.clone();
    Ok(Client::connect(config).await?)
}

async fn open_primary(a: &WriteArgs) -> Result<Primary, Error> {
    let client = connect(&a.conn).await?;
    let options = PrimaryOptions {
        acks: a.acks,
        create: a.create,
        ..PrimaryOptions::default()
    };
    Primary::open(&a.db, client, &a.conn.log, options).await
}

fn print(line: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn primary(runtime: &tokio::runtime::Runtime, a: WriteArgs) -> Result<(), Error> {
    let mut primary = runtime.block_on(open_primary(&a))?;
    let mut failed = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| Error::Io {
            context: "reading standard input".into(),
            source: e,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        match runtime.block_on(execute(&mut primary, &line, &a)) {
            Ok(token) => print(json!({ "token": token })),
            Err(e) => {
                print(json!({ "error": e.to_string(), "kind": e.kind() }));
                if matches!(e, Error::Fenced { .. }) || !a.keep_going {
                    return Err(e);
                }
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Run one transaction, again and again while replog refuses it for a while (or its outcome
/// is unknown), until `--retry-ms` has passed.
async fn execute(primary: &mut Primary, sql: &str, a: &WriteArgs) -> Result<Option<u64>, Error> {
    let deadline = std::time::Instant::now() + Duration::from_millis(a.retry_ms);
    let mut pause = Duration::from_millis(50);
    let mut unknown = false;
    loop {
        match primary.execute(sql).await {
            // An earlier attempt of this very transaction, whose outcome was unknown, landed:
            // it is committed, and applied.
            Err(Error::Retry { offset }) if unknown => return Ok(Some(offset)),
            Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                unknown |= matches!(e, Error::UnknownOutcome { .. });
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

fn exec(runtime: &tokio::runtime::Runtime, a: ExecArgs) -> Result<(), Error> {
    let token = runtime.block_on(async {
        let mut primary = open_primary(&a.write).await?;
        execute(&mut primary, &a.sql, &a.write).await
    })?;
    print(json!({ "token": token }));
    Ok(())
}

async fn replica(a: ReplicaArgs) -> Result<(), Error> {
    let client = connect(&a.conn).await?;
    let mut replica = Replica::open(&a.db, client, &a.conn.log).await?;
    print(json!({
        "event": "start",
        "source": replica.source().name(),
        "next": replica.applied_next(),
    }));
    // One line per read that applied something: at most READ_BYTES_MAX of change sets.
    replica
        .run(|p| {
            if p.applied > 0 {
                print(json!({
                    "event": "applied",
                    "next": p.applied_next,
                    "committed": p.committed,
                }));
            }
        })
        .await
}

async fn snapshot(a: ReplicaArgs) -> Result<(), Error> {
    let client = connect(&a.conn).await?;
    let (offset, bytes) = replicated_sqlite::put_snapshot(&client, &a.conn.log, &a.db).await?;
    print(json!({ "offset": offset, "bytes": bytes }));
    Ok(())
}

fn query(a: QueryArgs) -> Result<(), Error> {
    let result =
        replicated_sqlite::query_at(&a.db, a.token, Duration::from_millis(a.wait_ms), &a.sql)?;
    for row in &result.rows {
        let object: serde_json::Map<String, serde_json::Value> = result
            .columns
            .iter()
            .zip(row)
            .map(|(c, v)| (c.clone(), v.to_json()))
            .collect();
        print(serde_json::Value::Object(object));
    }
    Ok(())
}
