//! Semi-synchronous replication in ordinary use, black-box: clusters that sit idle, logs
//! written right after `create`, many logs, receipts at every level, a streaming `append`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use client::{AppendOptions, Client};
use common::*;
use protocol::{Acks, Request, Response};
use serde_json::Value;

/// Append `input` to `log` through `server` with `acks`; the receipts, one per record.
fn append_json(env: &Env, server: &str, log: &str, acks: &str, input: &str) -> Vec<Value> {
    env.cli_json(
        &[
            "append", "--server", server, "--log", log, "--acks", acks, "--json",
        ],
        input,
    )
}

/// Create every log of `names` through `client`, `at_once` at a time; each must succeed.
async fn create_logs(client: &Client, names: impl Iterator<Item = String>, at_once: usize) {
    let mut creates = tokio::task::JoinSet::new();
    for name in names {
        let client = client.clone();
        creates.spawn(async move { client.create_log(&name).await.map_err(|e| (name, e)) });
        if creates.len() >= at_once {
            creates.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(r) = creates.join_next().await {
        r.unwrap().unwrap();
    }
}

/// A log left idle for three times `sync_lag_ms_max` keeps its sync follower: the next
/// `acks=sync` append succeeds at its first attempt, and the sync set never changes.
#[test]
fn an_idle_log_keeps_its_sync_follower() {
    let env = Env::new();
    // A generous create_wait_ms: the controller may still be electing its leader.
    let config = env.write_config(
        "replog.toml",
        "[replication]\nsync_lag_ms_max = 2000\ncreate_wait_ms = 60000\n",
    );
    let dev = Dev::start_controlled(&env, &["--config", &config]);
    let leader = dev.addr(0);
    env.cli_ok(&["create", "--server", &leader, "--log", "idle"], "");
    let r = append_json(&env, &leader, "idle", "sync", "first\n");
    assert_eq!(
        (r[0]["offset"].as_u64(), r[0]["level"].as_str()),
        (Some(0), Some("sync"))
    );
    let changes = metric(&dev.metrics(0), "replog_sync_set_changes_total");
    for round in 1..=2u64 {
        std::thread::sleep(Duration::from_millis(3 * 2000 + 500));
        let out = env.cli(
            &[
                "append", "--server", &leader, "--log", "idle", "--acks", "sync", "--json",
            ],
            "after a pause\n",
        );
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["offset"], round, "{r}");
        assert_eq!(r["level"], "sync", "{r}");
        assert_eq!(r["duplicate"], false, "{r}");
        assert_eq!(r["holders"][0], "node-1", "{r}");
    }
    assert_eq!(
        metric(&dev.metrics(0), "replog_sync_set_changes_total"),
        changes,
        "the sync set changed while the log sat idle"
    );
}

/// Every receipt names the replicas that hold the records durably, the leader first, at
/// every level, on a replicated leader and on a standalone node.
#[test]
fn receipts_name_the_leader_first_at_every_level() {
    let env = Env::new();
    let dev = Dev::start(&env, "0", &[]);
    let leader = dev.addr(0);
    env.cli_ok(&["create", "--server", &leader, "--log", "r"], "");
    let input: String = (0..200).map(|i| format!("record {i}\n")).collect();
    for acks in ["none", "leader", "sync", "quorum"] {
        let receipts = append_json(&env, &leader, "r", acks, &input);
        assert_eq!(receipts.len(), 200);
        for r in &receipts {
            let holders = holders(r);
            assert_eq!(r["level"], acks, "{r}");
            assert_eq!(r["replicas"].as_u64(), Some(holders.len() as u64), "{r}");
            if acks == "none" {
                assert!(holders.is_empty(), "{r}");
                continue;
            }
            assert_eq!(holders.first(), Some(&"node-1"), "{r}");
            let mut unique = holders.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), holders.len(), "{r}");
            assert!(
                holders
                    .iter()
                    .all(|h| ["node-1", "node-2", "node-3"].contains(h)),
                "{r}"
            );
            if acks != "leader" {
                assert!(holders.len() >= 2, "{r}");
            }
        }
    }
    // Standalone: the node alone, at the levels it can reach.
    let node = env.node("alone", &["--node-id", "alone"]);
    let server = node.server();
    env.cli_ok(&["create", "--server", &server, "--log", "s"], "");
    let r = append_json(&env, &server, "s", "none", "a\n");
    assert_eq!(
        (r[0]["replicas"].as_u64(), r[0]["holders"].clone()),
        (Some(0), Value::Array(vec![]))
    );
    let r = append_json(&env, &server, "s", "leader", "b\n");
    assert_eq!(r[0]["replicas"], 1);
    assert_eq!(r[0]["holders"], serde_json::json!(["alone"]));
    for acks in ["sync", "quorum"] {
        let out = env.cli(
            &["append", "--server", &server, "--log", "s", "--acks", acks],
            "c\n",
        );
        assert_eq!(out.status.code(), Some(1), "{acks}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not_enough_replicas"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// More logs than one connection has streams for clients: each is created writable at
/// `sync`, and an `acks=sync` append to every one succeeds at its first attempt.
#[test]
fn more_logs_than_a_connection_has_streams_all_replicate() {
    const LOGS: usize = 100;
    let env = Env::new();
    // A generous create_wait_ms: a loaded machine may take a while to make 100 logs thrice.
    let config = env.write_config("replog.toml", "[replication]\ncreate_wait_ms = 60000\n");
    let dev = Dev::start(&env, "0", &["--config", &config]);
    let client_config = env.client_config(dev.addr(0));
    rt().block_on(async {
        let client = Client::connect(client_config).await.unwrap();
        create_logs(&client, (0..LOGS).map(|i| format!("tenant-{i}")), LOGS).await;
        let mut appends = tokio::task::JoinSet::new();
        for i in 0..LOGS {
            let client = client.clone();
            appends.spawn(async move {
                let opts = AppendOptions {
                    acks: Acks::Sync,
                    ..AppendOptions::default()
                };
                let log = format!("tenant-{i}");
                (
                    log.clone(),
                    client.append(&log, vec![log.clone().into()], opts).await,
                )
            });
        }
        while let Some(r) = appends.join_next().await {
            let (log, r) = r.unwrap();
            let receipt = r.unwrap_or_else(|e| panic!("{log}: {e}"));
            assert_eq!((receipt.first, receipt.level), (0, Acks::Sync), "{log}");
        }
    });
    // Every follower comes to hold every log (one sync replica: an acknowledged append waited
    // for one of them, the other may still be creating logs).
    for i in 1..3 {
        eventually(60, &format!("node-{} holding every log", i + 1), || {
            let logs = env.cli_json(&["list", "--server", &dev.addr(i), "--json"], "");
            (logs.len() == LOGS).then_some(())
        });
    }
}

/// `create` answers once the log is writable at `sync`; when its followers do not come within
/// `create_wait_ms` it says which are missing (and the log exists). `--no-wait` answers at once.
#[test]
fn create_waits_for_the_sync_set_and_names_the_missing_followers() {
    let env = Env::new();
    let config = env.write_config("replog.toml", "[replication]\ncreate_wait_ms = 300\n");
    let node = env.node(
        "lead",
        &["--node-id", "lead", "--follower", "f1", "--config", &config],
    );
    let server = node.server();
    let out = env.cli(&["create", "--server", &server, "--log", "waits"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not_enough_replicas"), "{stderr}");
    assert!(stderr.contains("f1: not connected"), "{stderr}");
    assert!(stderr.contains("create_wait_ms"), "{stderr}");
    // The log exists.
    let out = env.cli(&["create", "--server", &server, "--log", "waits"], "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("log_exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.cli_ok(
        &["create", "--server", &server, "--log", "quick", "--no-wait"],
        "",
    );
    // With the follower there, a create answers once it is in the sync set.
    let _f1 = env.node("f1", &["--node-id", "f1", "--leader", &server]);
    // (Each try is a new log: one whose wait ran out exists, and is not retried.)
    let mut tries = 0;
    let name = eventually(60, "a create that finds its sync set", || {
        tries += 1;
        let name = format!("later-{tries}");
        let out = env.cli(&["create", "--server", &server, "--log", &name], "");
        out.status.success().then_some(name)
    });
    let r = append_json(&env, &server, &name, "sync", "x\n");
    assert_eq!(r[0]["level"], "sync");
}

/// `replog append` sends each line as it arrives and prints its receipt before the input
/// ends, over one connection and one producer.
#[test]
fn append_streams_standard_input() {
    let env = Env::new();
    let node = env.node("n", &[]);
    env.cli_ok(&["create", "--server", &node.server(), "--log", "s"], "");
    let mut child = Command::new(BIN)
        .args(["append", "--server", &node.server(), "--log", "s", "--json"])
        .env("REPLOG_DEV_CA_DIR", env.ca_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let next = || -> Value {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a receipt before the input ended");
        serde_json::from_str(&line).unwrap()
    };
    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
        let r = next();
        assert_eq!(r["offset"], i as u64, "{r}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A burst that arrives at once, then the end of the input.
    stdin.write_all(b"four\nfive\nsix").unwrap();
    drop(stdin);
    for offset in 3..6 {
        assert_eq!(next()["offset"], offset);
    }
    assert!(child.wait().unwrap().success());
    let got = env.cli_ok(&["read", "--server", &node.server(), "--log", "s"], "");
    assert_eq!(got, "one\ntwo\nthree\nfour\nfive\nsix\n");
}

/// Two request frames on one stream: the node answers the first alone, and the second is
/// never carried out.
#[test]
fn a_second_request_on_a_stream_is_never_carried_out() {
    let env = Env::new();
    let node = env.node("n", &[]);
    rt().block_on(async {
        let conn = env.connect(&node).await;
        let mut bytes = encode(&create_req("first")).to_vec();
        bytes.extend_from_slice(&encode(&create_req("second")));
        let answers = exchange_raw(&conn, &bytes).await.unwrap();
        assert_eq!(answers, [Response::Ok]);
        match exchange(&conn, &Request::ListLogs).await {
            Response::Logs(logs) => {
                let names: Vec<&str> = logs.iter().map(|l| l.name.as_str()).collect();
                assert_eq!(names, ["first"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(exchange(&conn, &create_req("second")).await, Response::Ok);
    });
}

/// Space is prepared ahead of the writer in steps: a thousand empty logs on a node take a
/// thousand first segments of `segment_initial_bytes`, nothing more.
#[test]
fn a_thousand_empty_logs_fit_in_a_small_data_dir() {
    const LOGS: usize = 1000;
    const INITIAL: u64 = 64 * 1024;
    let env = Env::new();
    let config = env.write_config(
        "replog.toml",
        &format!("[log]\nsegment_initial_bytes = {INITIAL}\n"),
    );
    let node = env.node("n", &["--config", &config]);
    let client_config = env.client_config(node.server());
    rt().block_on(async {
        let client = Client::connect(client_config).await.unwrap();
        create_logs(&client, (0..LOGS).map(|i| format!("empty-{i}")), 32).await;
        // And each takes writes.
        let opts = AppendOptions::default();
        let r = client
            .append("empty-999", vec!["x".into()], opts)
            .await
            .unwrap();
        assert_eq!(r.first, 0);
    });
    fn disk_bytes(dir: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                if m.is_dir() {
                    disk_bytes(&e.path())
                } else {
                    m.blocks() * 512
                }
            })
            .sum()
    }
    let used = disk_bytes(&node.data_dir);
    let logs = env.cli_json(&["list", "--server", &node.server(), "--json"], "");
    assert_eq!(logs.len(), LOGS);
    // Each log: its first segment, plus a few small files (index, epochs, producers).
    let bound = LOGS as u64 * (INITIAL + 64 * 1024);
    assert!(
        used <= bound,
        "{used} bytes on disk for {LOGS} empty logs (bound {bound})"
    );
}
