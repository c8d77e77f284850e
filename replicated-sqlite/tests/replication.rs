//! Replication end to end: a primary against a real replog cluster, `replog-sqlite replica`
//! processes following it, one bootstrapped from a snapshot, one killed mid-backlog.

mod support;

use client::Acks;
use replicated_sqlite::{Primary, PrimaryOptions};
use support::{dump, eventually, rt, servers, wait_log, wait_sync_set, Env, Rng};

/// One random write transaction over the tables that exist.
fn random_transaction(rng: &mut Rng, with_d: bool) -> String {
    let mut statements = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let table = rng.below(if with_d { 4 } else { 3 });
        let id = rng.below(60);
        let op = rng.below(10);
        let s = match table {
            // a: rowid table with an INTEGER PRIMARY KEY.
            0 => match op {
                0..=3 => format!(
                    "INSERT OR REPLACE INTO a(id, i, r, s, b) VALUES ({id}, {}, {}, {}, {})",
                    rng.integer(),
                    rng.real(),
                    rng.text(),
                    rng.blob()
                ),
                // Without an id: SQLite picks it (captured as the value it picked).
                4 => format!(
                    "INSERT INTO a(i, r, s, b) VALUES ({}, {}, {}, {})",
                    rng.literal(),
                    rng.literal(),
                    rng.literal(),
                    rng.literal()
                ),
                5..=7 => format!(
                    "UPDATE a SET r = {}, s = {}, i = i + 1 WHERE id BETWEEN {id} AND {}",
                    rng.literal(),
                    rng.literal(),
                    id + rng.below(5)
                ),
                // A primary-key change (may collide: then the transaction fails).
                8 => format!("UPDATE a SET id = id + 1000 WHERE id = {id}"),
                _ => format!("DELETE FROM a WHERE id = {id}"),
            },
            // b: WITHOUT ROWID, text key.
            1 => match op {
                0..=4 => format!(
                    "INSERT INTO b(k, n, v) VALUES ('k{id}', {}, {}) \
                     ON CONFLICT(k) DO UPDATE SET n = excluded.n, v = excluded.v",
                    rng.integer(),
                    rng.literal()
                ),
                5..=7 => format!("UPDATE b SET v = {} WHERE k = 'k{id}'", rng.literal()),
                _ => format!("DELETE FROM b WHERE k = 'k{id}'"),
            },
            // c: composite key.
            2 => match op {
                0..=4 => format!(
                    "INSERT OR IGNORE INTO c(x, y, r, b) VALUES ({}, 'y{}', {}, {})",
                    id % 7,
                    id % 5,
                    rng.real(),
                    rng.blob()
                ),
                5..=7 => format!(
                    "UPDATE c SET r = {}, b = {} WHERE x = {}",
                    rng.literal(),
                    rng.literal(),
                    id % 7
                ),
                _ => format!("DELETE FROM c WHERE x = {} AND y = 'y{}'", id % 7, id % 5),
            },
            // d: created mid-run.
            _ => match op {
                0..=5 => format!(
                    "INSERT OR REPLACE INTO d(id, payload, note) VALUES ({id}, {}, {})",
                    rng.blob(),
                    rng.text()
                ),
                _ => format!("DELETE FROM d WHERE id < {id} AND id > {}", id / 2),
            },
        };
        statements.push(s);
    }
    statements.join(";\n")
}

const SCHEMA: &str = "
    CREATE TABLE a(id INTEGER PRIMARY KEY, i INTEGER, r REAL, s TEXT, b BLOB);
    CREATE INDEX a_s ON a(s);
    CREATE TABLE b(k TEXT PRIMARY KEY, n INTEGER, v ANY) WITHOUT ROWID;
    CREATE TABLE c(x INTEGER NOT NULL, y TEXT NOT NULL, r REAL, b BLOB, PRIMARY KEY (x, y));
";

#[test]
fn random_transactions_reach_every_replica_exactly() {
    let env = Env::new();
    let [leader, f1, f2] = env.cluster();
    let primary_db = env.path("primary.db");
    let replica1_db = env.path("replica1.db");
    let replica2_db = env.path("replica2.db");
    let rt = rt();
    let client = rt.block_on(async {
        let client = env.client(&[&leader, &f1, &f2]).await;
        client.create_log("app").await.unwrap();
        wait_sync_set(&client, "app").await;
        for f in [&f1, &f2] {
            wait_log(&env.client(&[f]).await, "app", None).await;
        }
        client
    });
    // The first replica follows from the start, reading from a follower.
    let mut replica1 = env.replica(&replica1_db, &[&f1], "app");
    assert_eq!(replica1.start_line()["source"], "empty");

    let seed = 0x5eed_0001;
    let mut rng = Rng::new(seed);
    let transactions = 300;
    let mut primary = rt
        .block_on(Primary::open(
            &primary_db,
            client.clone(),
            "app",
            PrimaryOptions {
                create: true,
                ..PrimaryOptions::default()
            },
        ))
        .unwrap();
    let mut expected_token = rt.block_on(primary.execute(SCHEMA)).unwrap().unwrap() + 1;
    let mut replica2 = None;
    let mut failed = 0;
    for n in 0..transactions {
        if n == transactions / 2 {
            // A table created mid-run, with rows in the same transaction.
            let sql = "CREATE TABLE d(id INTEGER PRIMARY KEY, payload BLOB, note TEXT);
                       INSERT INTO d VALUES (1, x'00', 'first'), (2, NULL, NULL)";
            assert_eq!(
                rt.block_on(primary.execute(sql)).unwrap(),
                Some(expected_token)
            );
            expected_token += 1;
        }
        if n == transactions / 3 {
            // A snapshot of the first replica's database, taken while it applies; a second
            // replica starts from it on an empty database, reading from the other follower.
            replica1.wait_next(expected_token / 2);
            let out = env.sqlite_json(&[
                "snapshot",
                "--db",
                replica1_db.to_str().unwrap(),
                "--server",
                &servers(&[&leader]),
                "--log",
                "app",
            ]);
            let offset = out[0]["offset"].as_u64().unwrap();
            assert!(offset > 0, "{out:?}");
            rt.block_on(async { wait_log(&env.client(&[&f2]).await, "app", Some(offset)).await });
            let mut r2 = env.replica(&replica2_db, &[&f2], "app");
            let start = r2.start_line();
            assert_eq!(start["source"], "snapshot", "{start}");
            assert_eq!(start["next"].as_u64(), Some(offset), "{start}");
            replica2 = Some(r2);
        }
        let sql = random_transaction(&mut rng, n > transactions / 2);
        match rt.block_on(primary.execute(&sql)) {
            Ok(Some(token)) => {
                // One record per committed transaction, in commit order.
                assert_eq!(token, expected_token, "seed {seed:#x}, transaction {n}");
                expected_token += 1;
            }
            Ok(None) => {}
            // A constraint violation rolls the transaction back, nothing is appended.
            Err(replicated_sqlite::Error::Sql(_)) => failed += 1,
            Err(e) => panic!("seed {seed:#x}, transaction {n}: {e}\n{sql}"),
        }
    }
    assert!(failed < transactions / 2, "{failed} transactions failed");
    let end = primary.applied_next();
    assert_eq!(end, expected_token);
    let mut replica2 = replica2.expect("started mid-run");
    replica1.wait_next(end);
    replica2.wait_next(end);
    let want = dump(&primary_db);
    assert_eq!(want.applied_next, end);
    assert!(want.rows() > 50, "the run left {} rows", want.rows());
    assert!(!want.table("d").is_empty());
    for (name, db) in [("replica1", &replica1_db), ("replica2", &replica2_db)] {
        let got = dump(db);
        assert_eq!(got.schema, want.schema, "{name}: schema");
        for ((t, w), (_, g)) in want.tables.iter().zip(&got.tables) {
            assert_eq!(g, w, "{name}: table {t} (seed {seed:#x})");
        }
        assert_eq!(got, want, "{name}");
    }
    // The replicas' files hold no trigger: capture lives in the primary's connection only.
    for db in [&primary_db, &replica1_db, &replica2_db] {
        let conn = rusqlite::Connection::open(db).unwrap();
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0);
    }
    replica1.kill();
    replica2.kill();
}

#[test]
fn a_replica_killed_while_applying_a_backlog_converges() {
    let env = Env::new();
    let node = env.standalone();
    let primary_db = env.path("primary.db");
    let replica_db = env.path("replica.db");
    let rt = rt();
    let client = rt.block_on(env.client(&[&node]));
    let options = PrimaryOptions {
        acks: Acks::Leader,
        create: true,
        ..PrimaryOptions::default()
    };
    let mut primary = rt
        .block_on(Primary::open(&primary_db, client, "app", options))
        .unwrap();
    rt.block_on(primary.execute(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER, payload BLOB);
         CREATE TABLE u(k TEXT PRIMARY KEY NOT NULL, v REAL)",
    ))
    .unwrap();
    // The backlog: thousands of transactions, all in the log before the replica starts.
    let mut rng = Rng::new(0x5eed_0002);
    let transactions = 2000;
    for n in 0..transactions {
        let sql = format!(
            "INSERT INTO t(n, payload) VALUES ({n}, randomblob(200)), ({n}, randomblob(300));
             UPDATE t SET n = n + 1 WHERE id = {};
             DELETE FROM t WHERE id = {};
             INSERT OR REPLACE INTO u VALUES ('k{}', {})",
            1 + rng.below(2 * n + 1),
            1 + rng.below(2 * n + 1),
            rng.below(100),
            rng.real()
        );
        rt.block_on(primary.execute(&sql)).unwrap();
    }
    let end = primary.applied_next();
    assert_eq!(end, transactions + 1);

    // Kill the replica with SIGKILL as soon as it reports progress partway, three times.
    let mut kills = Vec::new();
    let mut last = 0;
    for _ in 0..3 {
        let mut replica = env.replica(&replica_db, &[&node], "app");
        let partway = eventually(120, "a progress line partway through the backlog", || {
            if replica.next() >= end {
                return Some(false);
            }
            let lines = replica.lines();
            let mut progress = lines
                .iter()
                .filter(|l| l["event"] == "applied")
                .filter_map(|l| l["next"].as_u64());
            progress.any(|n| last < n && n < end).then_some(true)
        });
        replica.kill();
        let applied = dump(&replica_db).applied_next;
        assert!(applied >= last && applied <= end, "{applied} after {last}");
        last = applied;
        if !partway {
            // It finished before a progress line came: nothing left to interrupt.
            break;
        }
        kills.push(applied);
    }
    eprintln!("replica killed at applied offsets {kills:?} of {end}");
    assert!(
        kills.iter().any(|&k| k < end),
        "the replica was never killed partway: {kills:?}"
    );
    // Restarted, it resumes where its database says and converges.
    let mut replica = env.replica(&replica_db, &[&node], "app");
    let start = replica.start_line();
    assert_eq!(start["source"], "existing", "{start}");
    assert_eq!(start["next"].as_u64(), Some(last), "{start}");
    replica.wait_next(end);
    let want = dump(&primary_db);
    let got = dump(&replica_db);
    assert_eq!(got.applied_next, end);
    assert_eq!(got, want, "no duplicate or missing rows");
    replica.kill();
}
