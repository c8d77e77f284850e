//! The primary and the replica against a real `replog node`: tokens, the change-set size limit,
//! refused transactions, start-up catch-up, malformed records.

mod support;

use bytes::Bytes;
use client::{Acks, AppendOptions, ReadOptions};
use replicated_sqlite::{
    Change, ChangeSet, Error, Primary, PrimaryOptions, Replica, Value, CHANGESET_BYTES_MAX,
};
use support::{dump, rt, Env};

fn options() -> PrimaryOptions {
    PrimaryOptions {
        acks: Acks::Leader,
        create: true,
        ..PrimaryOptions::default()
    }
}

async fn log_end(client: &client::Client, log: &str) -> u64 {
    client
        .list_logs()
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.name == log)
        .unwrap()
        .end
}

#[test]
fn tokens_limits_and_refusals() {
    let env = Env::new();
    let node = env.standalone();
    let db = env.path("primary.db");
    rt().block_on(async {
        let client = env.client(&[&node]).await;
        let mut primary = Primary::open(&db, client.clone(), "app", options())
            .await
            .unwrap();
        assert_eq!(primary.applied_next(), 0);
        let t0 = primary
            .execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
            .await
            .unwrap();
        assert_eq!(t0, Some(0));
        let t1 = primary
            .execute("INSERT INTO t VALUES (1, x'01'); INSERT INTO t VALUES (2, x'02')")
            .await
            .unwrap();
        assert_eq!(t1, Some(1), "one record per transaction");
        // Nothing changed: committed locally, nothing appended, no token.
        assert_eq!(
            primary
                .execute("SELECT * FROM t; DELETE FROM t WHERE id > 100")
                .await
                .unwrap(),
            None
        );
        assert_eq!(log_end(&client, "app").await, 2);

        // Over the change-set limit: rolled back, nothing appended.
        let err = primary
            .execute(&format!(
                "INSERT INTO t VALUES (3, x'03'); INSERT INTO t VALUES (4, zeroblob({CHANGESET_BYTES_MAX}))"
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TooLarge { max, .. } if max == CHANGESET_BYTES_MAX), "{err}");
        assert!(err.to_string().contains("CHANGESET_BYTES_MAX"), "{err}");
        // Just under it: stored.
        let blob = CHANGESET_BYTES_MAX - 200;
        let t2 = primary
            .execute(&format!("INSERT INTO t VALUES (5, zeroblob({blob}))"))
            .await
            .unwrap();
        assert_eq!(t2, Some(2));

        // A table without a primary key, a statement that cannot be replicated, a failing
        // statement: rolled back, nothing appended, and the primary goes on.
        let err = primary
            .execute("INSERT INTO t VALUES (6, NULL); CREATE TABLE nokey(a, b)")
            .await
            .unwrap_err();
        assert!(matches!(&err, Error::Refused(m) if m.contains("no PRIMARY KEY")), "{err}");
        let err = primary
            .execute("INSERT INTO t VALUES (6, NULL); COMMIT")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Refused(_)), "{err}");
        let err = primary
            .execute("INSERT INTO t VALUES (6, NULL); INSERT INTO t VALUES (1, NULL)")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Sql(_)), "{err}");
        assert_eq!(log_end(&client, "app").await, 3);
        assert_eq!(primary.applied_next(), 3);
        let d = dump(&db);
        assert_eq!(d.applied_next, 3);
        let ids: Vec<&Value> = d.table("t").iter().map(|r| &r[0]).collect();
        assert_eq!(ids, [&Value::Integer(1), &Value::Integer(2), &Value::Integer(5)]);
        assert_eq!(primary.execute("DELETE FROM t WHERE id = 5").await.unwrap(), Some(3));

        // A replica reaches the same state.
        let mut replica = Replica::open(env.path("replica.db"), client.clone(), "app")
            .await
            .unwrap();
        assert_eq!(replica.source(), replicated_sqlite::Source::Empty);
        while replica.applied_next() < 4 {
            replica
                .step(std::time::Duration::from_secs(1))
                .await
                .unwrap();
        }
        assert_eq!(dump(&env.path("replica.db")), dump(&db));
    });
}

#[test]
fn start_up_catches_up_with_change_sets_the_database_lacks() {
    let env = Env::new();
    let node = env.standalone();
    let db = env.path("primary.db");
    rt().block_on(async {
        let client = env.client(&[&node]).await;
        let mut primary = Primary::open(&db, client.clone(), "app", options())
            .await
            .unwrap();
        primary
            .execute("CREATE TABLE kv(k TEXT PRIMARY KEY NOT NULL, v)")
            .await
            .unwrap();
        drop(primary);
        // As if the primary had crashed after its append landed and before its local commit:
        // the log holds a change set the database does not.
        let cs = ChangeSet {
            changes: vec![Change::Insert {
                table: "kv".into(),
                row: vec![Value::Text(b"a".to_vec()), Value::Real(-0.0)],
            }],
        };
        let append = AppendOptions {
            expected_offset: Some(1),
            ..AppendOptions::default()
        };
        client
            .append("app", vec![Bytes::from(cs.encode())], append)
            .await
            .unwrap();
        assert_eq!(dump(&db).applied_next, 1);
        let mut primary = Primary::open(&db, client.clone(), "app", options_no_create())
            .await
            .unwrap();
        assert_eq!(primary.applied_next(), 2, "caught up at start");
        let d = dump(&db);
        assert_eq!(
            d.table("kv"),
            [vec![Value::Text(b"a".to_vec()), Value::Real(-0.0)]]
        );
        assert_eq!(
            primary
                .execute("UPDATE kv SET v = 1 WHERE k = 'a'")
                .await
                .unwrap(),
            Some(2)
        );

        // The database belongs to its log.
        let err = Primary::open(&db, client.clone(), "other", options())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("replicated through log \"app\""),
            "{err}"
        );
    });
}

fn options_no_create() -> PrimaryOptions {
    PrimaryOptions {
        create: false,
        ..options()
    }
}

#[test]
fn a_malformed_record_stops_the_replica_and_nothing_of_it_is_applied() {
    let env = Env::new();
    let node = env.standalone();
    let db = env.path("primary.db");
    rt().block_on(async {
        let client = env.client(&[&node]).await;
        let mut primary = Primary::open(&db, client.clone(), "app", options())
            .await
            .unwrap();
        primary
            .execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
            .await
            .unwrap();
        // A writer that is not a primary of this version appends a change set of version 9.
        let mut bogus = ChangeSet {
            changes: vec![Change::Insert {
                table: "t".into(),
                row: vec![Value::Integer(1)],
            }],
        }
        .encode();
        bogus[4] = 9;
        client
            .append("app", vec![Bytes::from(bogus)], AppendOptions::default())
            .await
            .unwrap();
        let mut replica = Replica::open(env.path("replica.db"), client.clone(), "app")
            .await
            .unwrap();
        let err = loop {
            match replica.step(std::time::Duration::from_secs(1)).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::Format { offset: 1, .. }), "{err}");
        assert!(
            err.to_string().contains("unsupported change set version 9"),
            "{err}"
        );
        assert_eq!(replica.applied_next(), 1);
        let d = dump(&env.path("replica.db"));
        assert_eq!(d.applied_next, 1);
        assert!(d.table("t").is_empty());
        // The primary sees another writer's record at its offset: fenced.
        let err = primary
            .execute("INSERT INTO t VALUES (2)")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Fenced { offset: 1 }), "{err}");
        let read = client.read("app", 0, ReadOptions::default()).await.unwrap();
        assert_eq!(read.records.len(), 2);
    });
}
