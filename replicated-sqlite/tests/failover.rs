//! Promotion and fencing: a replica promoted to primary writes at the log's end; the old
//! primary's next append is refused and nothing of it is stored; reads with tokens on a
//! lagging replica never return data older than the token.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use client::{Acks, ReadOptions};
use replicated_sqlite::{ChangeSet, Error, Primary, PrimaryOptions, Value};
use support::{dump, eventually, rt, servers, Env, SQLITE_BIN};

/// A `replog-sqlite primary` process fed line by line.
struct PrimaryProc {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl PrimaryProc {
    fn start(env: &Env, db: &std::path::Path, node: &support::Node) -> PrimaryProc {
        let mut child = Command::new(SQLITE_BIN)
            .arg("primary")
            .arg("--db")
            .arg(db)
            .args(["--server", &node.server(), "--log", "app"])
            .args(["--acks", "leader", "--create", "--keep-going"])
            .env("REPLOG_DEV_CA_DIR", env.ca_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        PrimaryProc {
            child,
            stdin,
            stdout,
        }
    }

    /// Send one transaction, read its answer line.
    fn tx(&mut self, sql: &str) -> serde_json::Value {
        writeln!(self.stdin, "{sql}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
    }
}

impl Drop for PrimaryProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_promoted_replica_fences_the_old_primary() {
    let env = Env::new();
    let node = env.standalone();
    let old_db = env.path("old-primary.db");
    let replica_db = env.path("replica.db");
    let rt = rt();
    let client = rt.block_on(env.client(&[&node]));

    // The old primary, a process taking transactions on its standard input.
    let mut old = PrimaryProc::start(&env, &old_db, &node);
    assert_eq!(
        old.tx("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")["token"],
        0
    );
    assert_eq!(old.tx("INSERT INTO t VALUES (1, 'old')")["token"], 1);
    // A transaction that changes nothing has no token; with --keep-going an error line does
    // not end it.
    assert_eq!(
        old.tx("UPDATE t SET v = 'x' WHERE k = 99")["token"],
        serde_json::Value::Null
    );
    let err = old.tx("INSERT INTO t VALUES (1, 'dup')");
    assert_eq!(err["kind"], "sql", "{err}");

    // A replica follows; then it is stopped and promoted: a primary on its database.
    let mut replica = env.replica(&replica_db, &[&node], "app");
    replica.wait_next(2);
    replica.kill();
    let mut promoted = rt
        .block_on(Primary::open(
            &replica_db,
            client.clone(),
            "app",
            PrimaryOptions {
                acks: Acks::Leader,
                ..PrimaryOptions::default()
            },
        ))
        .unwrap();
    assert_eq!(promoted.applied_next(), 2);
    let token = rt
        .block_on(promoted.execute("INSERT INTO t VALUES (2, 'promoted')"))
        .unwrap();
    assert_eq!(token, Some(2));

    // The old primary's next write is refused: fenced, and it stops.
    let line = old.tx("INSERT INTO t VALUES (3, 'stale')");
    assert_eq!(line["kind"], "fenced", "{line}");
    let message = line["error"].as_str().unwrap();
    assert!(
        message.contains("fenced: another primary has written at offset 2"),
        "{message}"
    );
    let status = old.child.wait().unwrap();
    assert_eq!(status.code(), Some(5), "exit status of a fenced primary");
    let mut stderr = String::new();
    std::io::Read::read_to_string(old.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("fenced"), "{stderr}");

    // Nothing of it reached the log, or its database.
    let records = rt
        .block_on(client.read("app", 0, ReadOptions::default()))
        .unwrap()
        .records;
    assert_eq!(records.len(), 3);
    for r in &records {
        let cs = ChangeSet::decode(&r.value).unwrap();
        assert!(
            !format!("{cs:?}").contains("stale"),
            "offset {}: {cs:?}",
            r.offset
        );
    }
    let d = dump(&old_db);
    assert_eq!(d.applied_next, 2);
    assert_eq!(
        d.table("t"),
        [vec![Value::Integer(1), Value::Text(b"old".to_vec())]]
    );

    // The old database restarted as a primary (`exec`) catches up first, then writes at the
    // end; now the promoted primary is the stale one.
    let out = env.sqlite_json(&[
        "exec",
        "--db",
        old_db.to_str().unwrap(),
        "--server",
        &servers(&[&node]),
        "--log",
        "app",
        "--acks",
        "leader",
        "INSERT INTO t VALUES (4, 'restarted')",
    ]);
    assert_eq!(out, [serde_json::json!({"token": 3})]);
    let err = rt
        .block_on(promoted.execute("INSERT INTO t VALUES (5, 'late')"))
        .unwrap_err();
    assert!(matches!(err, Error::Fenced { offset: 3 }), "{err}");
    assert_eq!(promoted.fenced(), Some(3));
    // Fenced for good, without asking replog again.
    drop(node);
    let err = rt
        .block_on(promoted.execute("INSERT INTO t VALUES (6, 'later')"))
        .unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    let rows: Vec<Value> = dump(&old_db)
        .table("t")
        .iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(
        rows,
        [1, 2, 4].map(Value::Integer),
        "the old database caught up with the promoted primary's write"
    );
}

/// The state of a process from /proc (`T` when stopped).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

#[test]
fn a_read_with_a_token_never_returns_older_data() {
    let env = Env::new();
    let node = env.standalone();
    let primary_db = env.path("primary.db");
    let replica_db = env.path("replica.db");
    let rt = rt();
    let client = rt.block_on(env.client(&[&node]));
    let mut primary = rt
        .block_on(Primary::open(
            &primary_db,
            client,
            "app",
            PrimaryOptions {
                acks: Acks::Leader,
                create: true,
                ..PrimaryOptions::default()
            },
        ))
        .unwrap();
    let mut replica = env.replica(&replica_db, &[&node], "app");
    let query = |token: u64, wait_ms: u64| {
        env.sqlite(&[
            "query",
            "--db",
            replica_db.to_str().unwrap(),
            "--token",
            &token.to_string(),
            "--wait-ms",
            &wait_ms.to_string(),
            "SELECT k, v FROM kv ORDER BY k",
        ])
    };
    rt.block_on(primary.execute("CREATE TABLE kv(k TEXT PRIMARY KEY NOT NULL, v)"))
        .unwrap();
    let t1 = rt
        .block_on(primary.execute("INSERT INTO kv VALUES ('a', 'v1')"))
        .unwrap()
        .unwrap();
    // The replica may not have it yet: the read waits for it.
    let out = query(t1, 60_000);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        support::json_lines(&out.stdout),
        [serde_json::json!({"k": "a", "v": "v1"})]
    );

    // The replica lags (stopped); the primary writes.
    replica.signal(libc::SIGSTOP);
    eventually(60, "the replica to stop", || {
        (proc_state(replica.child.id()) == Some('T')).then_some(())
    });
    let t2 = rt
        .block_on(primary.execute("UPDATE kv SET v = 'v2' WHERE k = 'a'"))
        .unwrap()
        .unwrap();
    assert!(t2 > t1);
    // With the new token: "behind", and no rows, never the old value.
    let out = query(t2, 300);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("replica behind token"), "{stderr}");
    // The library says the same.
    let err = replicated_sqlite::query_at(
        &replica_db,
        Some(t2),
        Duration::from_millis(100),
        "SELECT v FROM kv",
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Behind { applied_next, token } if applied_next == t1 + 1 && token == t2),
        "{err}"
    );
    // Without a token (or with the old one) the replica answers with what it has.
    let out = query(t1, 0);
    assert_eq!(
        support::json_lines(&out.stdout),
        [serde_json::json!({"k": "a", "v": "v1"})]
    );

    // Resumed, it catches up, and the read with the new token returns the new data.
    replica.signal(libc::SIGCONT);
    let out = query(t2, 60_000);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        support::json_lines(&out.stdout),
        [serde_json::json!({"k": "a", "v": "v2"})]
    );
    replica.kill();
}

#[test]
fn an_append_whose_outcome_was_unknown_is_resolved_from_the_log() {
    let env = Env::new();
    let leader = env.node(
        "n1",
        &[
            "--node-id",
            "n1",
            "--follower",
            "n2,n3",
            "--sync-replicas",
            "1",
            "--sync-lag-ms-max",
            "2000",
        ],
    );
    let followers = [
        env.node("n2", &["--node-id", "n2", "--leader", &leader.server()]),
        env.node("n3", &["--node-id", "n3", "--leader", &leader.server()]),
    ];
    let db = env.path("primary.db");
    let rt = rt();
    rt.block_on(async {
        let client = env.client(&[&leader]).await;
        client.create_log("app").await.unwrap();
        support::wait_sync_set(&client, "app").await;
        let options = PrimaryOptions {
            append_timeout: Some(Duration::from_millis(300)),
            create: true,
            ..PrimaryOptions::default()
        };
        let mut primary = Primary::open(&db, client.clone(), "app", options)
            .await
            .unwrap();
        assert_eq!(
            primary
                .execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
                .await
                .unwrap(),
            Some(0)
        );
        // Stop the follower of the sync set: an acks=sync append is stored on the leader and
        // times out waiting for it (an unknown outcome), until the other follower takes its
        // place in the sync set.
        let status = client.status().await.unwrap();
        let member = status.replication[0]
            .followers
            .iter()
            .find(|f| f.in_sync_set)
            .unwrap()
            .id
            .clone();
        let stopped = &followers[if member == "n2" { 0 } else { 1 }];
        // SAFETY: kill(2) on a child this test started.
        unsafe { libc::kill(stopped.child.id() as libc::pid_t, libc::SIGSTOP) };
        // The primary finds its own change set in the log and counts the transaction as
        // committed.
        let token = primary
            .execute("INSERT INTO t VALUES (1, 'unknown outcome')")
            .await
            .unwrap();
        assert_eq!(token, Some(1));
        assert_eq!(primary.applied_next(), 2);
        let d = dump(&db);
        assert_eq!(d.applied_next, 2);
        assert_eq!(
            d.table("t"),
            [vec![
                Value::Integer(1),
                Value::Text(b"unknown outcome".to_vec())
            ]]
        );
        // Exactly one copy in the log, and the primary goes on.
        let read = client.read("app", 0, ReadOptions::default()).await.unwrap();
        assert_eq!(read.records.len(), 2);
        assert_eq!(primary.execute("DELETE FROM t").await.unwrap(), Some(2));
        unsafe { libc::kill(stopped.child.id() as libc::pid_t, libc::SIGCONT) };
    });
}
