//! Replication, black-box: a leader and followers as real `replog node` processes on loopback.

mod common;

use common::*;
use serde_json::Value;

const LOG: &str = "orders";

/// A leader `lead` of followers `f1, f2`, with extra leader flags.
fn leader(env: &Env, extra: &[&str]) -> NodeProc {
    let mut args = vec!["--node-id", "lead", "--follower", "f1,f2"];
    args.extend_from_slice(extra);
    env.node("lead", &args)
}

fn follower(env: &Env, id: &str, leader: &NodeProc) -> NodeProc {
    env.node(id, &["--node-id", id, "--leader", &leader.server()])
}

fn status(env: &Env, node: &NodeProc) -> Value {
    env.cli_json(&["status", "--server", &node.server(), "--json"], "")
        .remove(0)
}

/// The log as `node` lists it (`replog list`: the node's own offsets, asking nobody else).
fn log_info(env: &Env, node: &NodeProc) -> Value {
    env.cli_json(&["list", "--server", &node.server(), "--json"], "")
        .into_iter()
        .find(|l| l["name"] == LOG)
        .unwrap_or(Value::Null)
}

fn followers(env: &Env, leader: &NodeProc) -> Vec<Value> {
    let s = status(env, leader);
    s["replication"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["log"] == LOG)
        .map(|r| r["followers"].as_array().unwrap().clone())
        .unwrap_or_default()
}

fn sync_set(env: &Env, leader: &NodeProc) -> Vec<String> {
    followers(env, leader)
        .iter()
        .filter(|f| f["in_sync_set"] == true)
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect()
}

/// Append `lines` with `acks`; the receipts, one per record.
fn append(env: &Env, node: &NodeProc, acks: &str, lines: &[String]) -> Vec<Value> {
    let input = lines.join("\n") + "\n";
    env.cli_json(
        &[
            "append",
            "--server",
            &node.server(),
            "--log",
            LOG,
            "--acks",
            acks,
            "--json",
            "--batch",
            "8",
        ],
        &input,
    )
}

/// Wait until every connected follower holds the leader's whole log durably.
fn wait_caught_up(env: &Env, leader: &NodeProc, ids: &[&str]) {
    eventually(60, "followers to catch up", || {
        let end = log_info(env, leader)["end"].as_u64()?;
        let fs = followers(env, leader);
        ids.iter()
            .all(|id| {
                fs.iter()
                    .any(|f| f["id"] == *id && f["connected"] == true && f["durable"] == end)
            })
            .then_some(())
    });
}

/// A leader of `f1` alone, asynchronous, with 64 KiB segments, retention by size checked every
/// 100 ms, and more settings (whole TOML sections) from `extra`.
fn small_leader(env: &Env, retention_bytes_max: u64, extra: &str) -> NodeProc {
    let cfg = env.path("leader.toml");
    std::fs::write(
        &cfg,
        format!(
            "[log]\nsegment_bytes_max = 65536\nbatch_bytes_max = 16384\n\
             retention_bytes_max = {retention_bytes_max}\nretention_check_ms = 100\n{extra}"
        ),
    )
    .unwrap();
    env.node(
        "lead",
        &[
            "--node-id",
            "lead",
            "--follower",
            "f1",
            "--sync-replicas",
            "0",
            "--config",
            cfg.to_str().unwrap(),
        ],
    )
}

/// Record `i` of the retention tests: 113 bytes.
fn record_line(i: usize) -> String {
    format!("record {i:05} {}", "x".repeat(100))
}

/// Append records `range` (one [`record_line`] each) to `node`, 100 per append.
fn append_lines(env: &Env, node: &NodeProc, range: std::ops::Range<usize>) {
    let input: String = range.map(|i| record_line(i) + "\n").collect();
    env.cli_ok(
        &[
            "append",
            "--server",
            &node.server(),
            "--log",
            LOG,
            "--batch",
            "100",
        ],
        &input,
    );
}

/// `replog verify --json`; its report whatever the exit status.
fn verify(env: &Env, node: &NodeProc, extra: &[&str]) -> Value {
    let server = node.server();
    let mut args = vec!["verify", "--server", &server, "--log", LOG, "--json"];
    args.extend_from_slice(extra);
    let out = env.cli(&args, "");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(out.status.success(), v["identical"] == true, "{v}");
    v
}

fn values(env: &Env, node: &NodeProc, min_offset: u64) -> Vec<String> {
    env.cli_ok(
        &[
            "read",
            "--server",
            &node.server(),
            "--log",
            LOG,
            "--min-offset",
            &min_offset.to_string(),
            "--wait-ms",
            "30000",
        ],
        "",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

#[test]
fn sync_appends_survive_follower_kills_and_replicas_stay_identical() {
    let env = Env::new();
    let lead = leader(&env, &["--sync-replicas", "1", "--sync-lag-ms-max", "1000"]);
    let mut f1 = follower(&env, "f1", &lead);
    let f2 = follower(&env, "f2", &lead);
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    wait_caught_up(&env, &lead, &["f1", "f2"]);

    let mut expected = Vec::new();
    for round in 0..4 {
        let lines: Vec<String> = (0..40)
            .map(|i| format!("round {round} record {i}"))
            .collect();
        let receipts = append(&env, &lead, "sync", &lines);
        assert_eq!(receipts.len(), lines.len());
        for r in &receipts {
            assert_eq!(r["level"], "sync", "{r}");
            assert_eq!(r["degraded"], false, "{r}");
            let holders = holders(r);
            assert!(holders.contains(&"lead"), "{r}");
            assert!(
                holders.contains(&"f1") || holders.contains(&"f2"),
                "a sync append is durable on a follower: {r}"
            );
            assert!(r["replicas"].as_u64().unwrap() >= 2, "{r}");
        }
        expected.extend(lines);
        // Kill a follower (in or out of the sync set) and start it again at once.
        f1 = f1.crash_and_restart();
    }
    // The leader too: it comes back in a new epoch, and the followers resume after the
    // KIP-101 check.
    let lead = lead.crash_and_restart();
    wait_caught_up(&env, &lead, &["f1", "f2"]);
    let lines: Vec<String> = (0..10)
        .map(|i| format!("after the leader's restart {i}"))
        .collect();
    for r in append(&env, &lead, "sync", &lines) {
        assert_eq!(r["level"], "sync", "{r}");
        assert_eq!(
            r["epoch"], 2,
            "a restarted leader appends in a new epoch: {r}"
        );
    }
    expected.extend(lines);
    wait_caught_up(&env, &lead, &["f1", "f2"]);
    let end = expected.len() as u64;
    for node in [&lead, &f1, &f2] {
        assert_eq!(values(&env, node, end), expected, "node {}", node.server());
    }
    let v = verify(&env, &f2, &["--range-records", "16"]);
    assert_eq!(v["identical"], true, "{v}");
    let replicas = v["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3, "{v}");
    for r in replicas {
        assert!(r["error"].is_null(), "{v}");
        assert_eq!(r["batches"], replicas[0]["batches"], "{v}");
        assert!(r["ranges"].as_u64().unwrap() >= 11, "{v}");
    }
    assert_eq!(v["to"], end, "{v}");
}

#[test]
fn a_stopped_sync_follower_is_replaced_and_then_reject_refuses() {
    let env = Env::new();
    let lead = leader(
        &env,
        &[
            "--sync-replicas",
            "1",
            "--sync-lag-ms-max",
            "500",
            "--insufficient-replicas",
            "reject",
        ],
    );
    let f1 = follower(&env, "f1", &lead);
    let f2 = follower(&env, "f2", &lead);
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    wait_caught_up(&env, &lead, &["f1", "f2"]);
    append(&env, &lead, "sync", &["before".into()]);
    let first = eventually(30, "a sync set", || sync_set(&env, &lead).pop());
    let (stopped, other) = if first == "f1" {
        (&f1, "f2")
    } else {
        (&f2, "f1")
    };
    stopped.signal(libc::SIGSTOP);

    // The stopped follower falls behind and leaves; the caught-up one takes its place.
    let r = append(&env, &lead, "sync", &["while one is stopped".into()]).remove(0);
    assert_eq!(r["level"], "sync", "{r}");
    assert!(
        r["holders"].as_array().unwrap().iter().any(|h| h == other),
        "{r}"
    );
    assert_eq!(sync_set(&env, &lead), vec![other.to_string()]);

    // With both stopped, nothing can take the place: reject refuses before storing.
    let other_proc = if other == "f1" { &f1 } else { &f2 };
    other_proc.signal(libc::SIGSTOP);
    let end_before = log_info(&env, &lead)["end"].as_u64().unwrap();
    eventually(30, "the sync set to empty", || {
        // An append in flight when the last member leaves has an unknown outcome (exit 3).
        let out = env.cli(
            &[
                "append",
                "--server",
                &lead.server(),
                "--log",
                LOG,
                "--acks",
                "sync",
            ],
            "x\n",
        );
        sync_set(&env, &lead).is_empty().then_some(out)
    });
    let end_mid = log_info(&env, &lead)["end"].as_u64().unwrap();
    let out = env.cli(
        &[
            "append",
            "--server",
            &lead.server(),
            "--log",
            LOG,
            "--acks",
            "sync",
        ],
        "refused\n",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not_enough_replicas"), "{err}");
    assert_eq!(
        log_info(&env, &lead)["end"].as_u64().unwrap(),
        end_mid,
        "a refused append is not stored"
    );
    assert!(end_mid >= end_before);
    // acks=leader still works.
    let r = append(&env, &lead, "leader", &["leader only".into()]).remove(0);
    assert_eq!(r["level"], "leader");
    f1.signal(libc::SIGCONT);
    f2.signal(libc::SIGCONT);
    wait_caught_up(&env, &lead, &["f1", "f2"]);
}

#[test]
fn degrade_acknowledges_marked_and_raises_the_gauge() {
    let env = Env::new();
    // Followers are configured but never started: the sync set stays empty.
    let lead = leader(
        &env,
        &[
            "--sync-replicas",
            "1",
            "--insufficient-replicas",
            "degrade",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    let r = append(&env, &lead, "sync", &["degraded".into()]).remove(0);
    assert_eq!(r["degraded"], true, "{r}");
    assert_eq!(r["level"], "leader", "the level reached is named: {r}");
    assert_eq!(r["holders"], serde_json::json!(["lead"]), "{r}");
    let metrics = eventually(10, "the replication gauges", || {
        let m = scrape(lead.metrics.as_deref().unwrap());
        m.contains("replog_sync_shortfall{log=\"orders\"} 1")
            .then_some(m)
    });
    assert!(
        metrics.contains("replog_appends_degraded_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("replog_follower_connected{log=\"orders\",follower=\"f1\"} 0"),
        "{metrics}"
    );
}

#[test]
fn quorum_needs_a_majority() {
    let env = Env::new();
    let lead = leader(&env, &["--sync-replicas", "0"]);
    let f1 = follower(&env, "f1", &lead);
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    wait_caught_up(&env, &lead, &["f1"]);
    // Leader + f1 of 3 replicas is a majority.
    let r = append(&env, &lead, "quorum", &["q".into()]).remove(0);
    assert_eq!(r["level"], "quorum", "{r}");
    assert!(r["replicas"].as_u64().unwrap() >= 2, "{r}");
    drop(f1);
    eventually(30, "f1 to be seen gone", || {
        followers(&env, &lead)
            .iter()
            .all(|f| f["connected"] == false)
            .then_some(())
    });
    let out = env.cli(
        &[
            "append",
            "--server",
            &lead.server(),
            "--log",
            LOG,
            "--acks",
            "quorum",
        ],
        "q2\n",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_enough_replicas"));
}

#[test]
fn followers_redirect_writes_and_serve_reads_up_to_the_commit_offset() {
    let env = Env::new();
    // f1 stays in the sync set while stopped (a long lag bound), so the commit offset cannot
    // pass what f1 holds; f2, asynchronous, receives and stores more.
    let lead = leader(
        &env,
        &[
            "--sync-replicas",
            "1",
            "--sync-lag-ms-max",
            "600000",
            "--sync-lag-records-max",
            "1000000",
        ],
    );
    let f1 = follower(&env, "f1", &lead);
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    eventually(30, "f1 connected", || {
        followers(&env, &lead)
            .iter()
            .any(|f| f["id"] == "f1" && f["connected"] == true)
            .then_some(())
    });
    let committed: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    append(&env, &lead, "sync", &committed);
    assert_eq!(sync_set(&env, &lead), vec!["f1".to_string()]);
    let f2 = follower(&env, "f2", &lead);
    wait_caught_up(&env, &lead, &["f1", "f2"]);

    f1.signal(libc::SIGSTOP);
    let pending: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
    append(&env, &lead, "leader", &pending);
    // f2 stores the new records durably, but they are not committed: f1 has not acked.
    eventually(30, "f2 to store the uncommitted records", || {
        let l = log_info(&env, &f2);
        (l["flushed"].as_u64()? == 10).then_some(())
    });
    // (Within the 10 s a stopped follower's connection takes to time out: after that f1 would
    // leave the sync set and f2 take its place.)
    let l = log_info(&env, &f2);
    assert_eq!(l["committed"], 5, "{l}");
    assert_eq!(log_info(&env, &lead)["committed"], 5);
    assert_eq!(
        values(&env, &f2, 0),
        committed,
        "never beyond the commit offset"
    );
    assert_eq!(values(&env, &lead, 0), committed);
    // The leader's status shows each replica's own end, flushed and committed offsets.
    let view = followers(&env, &lead)
        .into_iter()
        .find(|f| f["id"] == "f2")
        .unwrap()["replica"]
        .clone();
    assert_eq!(view["end"], 10, "{view}");
    assert_eq!(view["flushed"], 10, "{view}");
    assert_eq!(view["committed"], 5, "{view}");

    // Writes on a follower are redirected: the CLI follows to the leader.
    let r = append(&env, &f2, "leader", &["via follower".into()]).remove(0);
    assert_eq!(r["offset"], 10);

    f1.signal(libc::SIGCONT);
    wait_caught_up(&env, &lead, &["f1", "f2"]);
    let all: Vec<String> = committed
        .iter()
        .chain(&pending)
        .cloned()
        .chain(["via follower".to_string()])
        .collect();
    assert_eq!(values(&env, &f2, 11), all);
}

#[test]
fn read_your_writes_on_a_lagging_follower_waits_or_moves_on() {
    let env = Env::new();
    let lead = leader(&env, &["--sync-replicas", "0"]);
    let f1 = follower(&env, "f1", &lead);
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    wait_caught_up(&env, &lead, &["f1"]);

    // A token the follower has not reached: a typed error naming where it is.
    let out = env.cli(
        &[
            "read",
            "--server",
            &f1.server(),
            "--log",
            LOG,
            "--min-offset",
            "1000",
            "--wait-ms",
            "200",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("behind"), "{err}");

    // The follower lags (stopped) while the leader takes an append.
    f1.signal(libc::SIGSTOP);
    let r = append(&env, &lead, "leader", &["mine".into()]).remove(0);
    let token = r["offset"].as_u64().unwrap() + 1;
    f1.signal(libc::SIGCONT);
    // Asked first, the follower serves the record if it has it by now, or answers behind and
    // the read moves on to the leader: either way the record is there.
    let both = format!("{},{}", f1.server(), lead.server());
    let out = env.cli_ok(
        &[
            "read",
            "--server",
            &both,
            "--log",
            LOG,
            "--min-offset",
            &token.to_string(),
        ],
        "",
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["mine"]);
    // The follower alone waits until it has the record, and then serves it.
    assert_eq!(values(&env, &f1, token), vec!["mine".to_string()]);
}

#[test]
fn an_empty_follower_bootstraps_after_the_leader_purged_early_segments() {
    let env = Env::new();
    let lead = small_leader(&env, 200000, "[replication]\ncatchup_bytes_min = 32768\ncatchup_bytes_per_sec_max = 50000\nframe_bytes_max = 65536\n");
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    let lines: Vec<String> = (0..4000).map(record_line).collect();
    append_lines(&env, &lead, 0..4000);
    let start = eventually(30, "retention to purge early segments", || {
        let s = log_info(&env, &lead)["start"].as_u64()?;
        (s > 0).then_some(s)
    });

    let began = std::time::Instant::now();
    let f1 = follower(&env, "f1", &lead);
    // Far behind, it is served in bulk, at catchup_bytes_per_sec_max, with its progress shown.
    let progress = eventually(60, "catch-up progress in the leader's status", || {
        let f = followers(&env, &lead)
            .into_iter()
            .find(|f| f["id"] == "f1")?;
        (f["catchup_total_bytes"].as_u64()? > 0).then_some(f)
    });
    assert!(
        progress["catchup_done_bytes"].as_u64().unwrap()
            <= progress["catchup_total_bytes"].as_u64().unwrap(),
        "{progress}"
    );
    // `replog catchup` waits until the follower has caught up.
    let out = env.cli(
        &[
            "catchup",
            "--server",
            &lead.server(),
            "--log",
            LOG,
            "--timeout-s",
            "120",
        ],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("f1"),
        "{out:?}"
    );
    wait_caught_up(&env, &lead, &["f1"]);
    let took = began.elapsed();
    let l = log_info(&env, &f1);
    // f1 started at the leader's start when it bootstrapped; all but the last
    // catchup_bytes_min went in bulk, at no more than 50,000 bytes a second.
    let behind = 4000 - l["start"].as_u64().unwrap();
    let bulk = (behind * 113).saturating_sub(32768);
    assert!(
        took.as_secs_f64() >= bulk as f64 / 50_000.0 * 0.9,
        "{behind} records caught up in {took:?}"
    );
    assert!(l["start"].as_u64().unwrap() >= start, "{l}");
    assert_eq!(l["end"], 4000, "{l}");
    let expected: Vec<String> = lines[l["start"].as_u64().unwrap() as usize..].to_vec();
    let got = env.cli_ok(
        &[
            "read",
            "--server",
            &f1.server(),
            "--log",
            LOG,
            "--from",
            &l["start"].to_string(),
            "--min-offset",
            "4000",
            "--wait-ms",
            "30000",
        ],
        "",
    );
    assert_eq!(
        got.lines().map(str::to_string).collect::<Vec<_>>(),
        expected
    );
    let v = verify(&env, &lead, &[]);
    assert_eq!(v["identical"], true, "{v}");
    // It keeps following live appends.
    append(&env, &lead, "leader", &["after bootstrap".into()]);
    let got = env.cli_ok(
        &[
            "read",
            "--server",
            &f1.server(),
            "--log",
            LOG,
            "--from",
            "4000",
            "--min-offset",
            "4001",
            "--wait-ms",
            "30000",
        ],
        "",
    );
    assert_eq!(got, "after bootstrap\n");
}

#[test]
fn peers_need_a_cluster_certificate_naming_them() {
    let env = Env::new();
    let lead = leader(&env, &[]);
    let f1 = follower(&env, "f1", &lead);
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    wait_caught_up(&env, &lead, &["f1"]);
    let rt = rt();
    rt.block_on(async {
        // No certificate at all: the peer connection is closed.
        let conn = raw_connect_alpn(lead.addr, &env.ca_pem(), None, protocol::PEER_ALPN)
            .await
            .unwrap();
        let r = exchange_raw(&conn, &encode(&protocol::Request::ListLogs)).await;
        assert!(r.is_err(), "{r:?}");

        // A certificate from another CA: the handshake fails.
        let other = env.path("other-ca");
        let (cert, key) = foreign_identity(&other, "f1");
        let r = raw_connect_alpn(lead.addr, &env.ca_pem(), Some((&cert, &key)), protocol::PEER_ALPN)
            .await;
        let refused = match r {
            Err(_) => true,
            Ok(c) => exchange_raw(&c, &encode(&protocol::Request::ListLogs)).await.is_err(),
        };
        assert!(refused, "a certificate from an unknown CA is refused");

        // A cluster certificate of node f1 cannot replicate as f2.
        let tls = f1.data_dir.join("tls");
        let conn = raw_connect_alpn(
            lead.addr,
            &env.ca_pem(),
            Some((&tls.join("node.pem"), &tls.join("node.key"))),
            protocol::PEER_ALPN,
        )
        .await
        .unwrap();
        let resp = exchange(
            &conn,
            &protocol::Request::Replicate(protocol::ReplicateRequest {
                log: LOG.into(),
                follower: "f2".into(),
                addr: String::new(),
                from: 0,
                last_epoch: 0,
                durable: 0,
            }),
        )
        .await;
        match resp {
            protocol::Response::Error(e) => {
                assert_eq!(e.code, protocol::ErrorCode::Unauthenticated, "{e:?}")
            }
            other => panic!("{other:?}"),
        }
        // Peer requests on the client ALPN are refused.
        let conn = env.connect(&lead).await;
        let resp = exchange(
            &conn,
            &protocol::Request::EpochEnd {
                log: LOG.into(),
                epoch: 1,
            },
        )
        .await;
        assert!(
            matches!(&resp, protocol::Response::Error(e) if e.code == protocol::ErrorCode::UnknownMessage),
            "{resp:?}"
        );
    });
    // Nothing of that disturbed replication.
    append(&env, &lead, "sync", &["still fine".into()]);
    assert_eq!(values(&env, &f1, 1), vec!["still fine".to_string()]);
}

/// A CA of its own in `dir` and a node certificate from it naming `<id>.node.replog`.
fn foreign_identity(dir: &std::path::Path, id: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec![format!("{id}.node.replog"), "127.0.0.1".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (c, k) = (dir.join("node.pem"), dir.join("node.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn snapshots_replicate_stay_whole_and_hold_retention_back() {
    let env = Env::new();
    let lead = small_leader(&env, 100000, "[limits]\nsnapshot_bytes_max = 1048576\n");
    let f1 = follower(&env, "f1", &lead);
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    append_lines(&env, &lead, 0..1000);
    // Retention deletes the first segment (the rest fits retention_bytes_max).
    let first_start = eventually(30, "retention to purge the first segment", || {
        let s = log_info(&env, &lead)["start"].as_u64()?;
        (s > 0).then_some(s)
    });
    assert!(first_start < 800, "start {first_start}");

    // Stored through a follower: redirected to the leader.
    let state: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let file = env.path("state.db");
    std::fs::write(&file, &state).unwrap();
    let f = file.to_str().unwrap();
    env.cli_ok(
        &[
            "snapshot",
            "put",
            "--server",
            &f1.server(),
            "--log",
            LOG,
            "--offset",
            "800",
            "--file",
            f,
        ],
        "",
    );
    // Copied to the follower, whole.
    let got = env.path("got.db");
    eventually(30, "the follower's copy of the snapshot", || {
        let out = env.cli(
            &[
                "snapshot",
                "get",
                "--server",
                &f1.server(),
                "--log",
                LOG,
                "--json",
                "--file",
                got.to_str().unwrap(),
            ],
            "",
        );
        out.status.success().then_some(())
    });
    let meta = env
        .cli_json(
            &[
                "snapshot",
                "get",
                "--server",
                &f1.server(),
                "--log",
                LOG,
                "--json",
            ],
            "",
        )
        .remove(0);
    assert_eq!(meta["offset"], 800, "{meta}");
    assert_eq!(std::fs::read(&got).unwrap(), state);

    // Snapshots move forward only, never past the log's end, and within snapshot_bytes_max.
    for (offset, size, code) in [
        ("700", 10, "offset_conflict"),
        ("10", 10, "offset_out_of_range"),
        ("999999", 10, "offset_out_of_range"),
        ("900", (1 << 20) + 1, "limit_exceeded"),
    ] {
        std::fs::write(&file, vec![7u8; size]).unwrap();
        let out = env.cli(
            &[
                "snapshot",
                "put",
                "--server",
                &lead.server(),
                "--log",
                LOG,
                "--offset",
                offset,
                "--file",
                f,
            ],
            "",
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(code), "{offset}: {err}");
    }

    // Retention would now delete far past the snapshot, but keeps everything after its offset.
    append_lines(&env, &lead, 1000..4000);
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let l = log_info(&env, &lead);
    let start = l["start"].as_u64().unwrap();
    assert!(start > 0 && start <= 800, "start {start}");
    assert!(
        (4000 - start) * 113 > 100_000,
        "retention was held back: {l}"
    );
    // The snapshot survives a restart of the leader.
    let lead = lead.restart();
    let meta = env
        .cli_json(
            &[
                "snapshot",
                "get",
                "--server",
                &lead.server(),
                "--log",
                LOG,
                "--json",
                "--file",
                got.to_str().unwrap(),
            ],
            "",
        )
        .remove(0);
    assert_eq!(meta["offset"], 800);
    assert_eq!(std::fs::read(&got).unwrap(), state);
}

#[test]
fn retention_waits_for_a_registered_follower_up_to_its_cap() {
    let env = Env::new();
    let lead = small_leader(
        &env,
        100000,
        "[replication]\nretention_pin_bytes_max = 400000\n",
    );
    let mut f1 = follower(&env, "f1", &lead);
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    append_lines(&env, &lead, 0..500);
    wait_caught_up(&env, &lead, &["f1"]);
    // Gone (a stopped process would still get what the leader has queued on its stream).
    f1.kill();
    // About 230 KB more: beyond retention_bytes_max, within the follower's cap: kept for it.
    append_lines(&env, &lead, 500..2500);
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let start = log_info(&env, &lead)["start"].as_u64().unwrap();
    assert!(
        start <= 500,
        "retention keeps what f1 still needs: start {start}"
    );
    // Past the cap, retention lets the follower go.
    append_lines(&env, &lead, 2500..6000);
    let start = eventually(30, "retention to pass the follower", || {
        let s = log_info(&env, &lead)["start"].as_u64()?;
        (s > 500).then_some(s)
    });
    // Back, it bootstraps from the leader's start and converges.
    let f1 = f1.respawn();
    wait_caught_up(&env, &lead, &["f1"]);
    let l = log_info(&env, &f1);
    assert!(l["start"].as_u64().unwrap() >= start, "{l} {start}");
    assert_eq!(l["end"], 6000, "{l}");
    assert_eq!(verify(&env, &lead, &[])["identical"], true);
}

/// A leader and a follower `f1` (with a metrics endpoint) that scrub every 200 ms at up to
/// 100 MiB/s, 64 KiB segments, and 2000 records stored on both: the follower's oldest sealed
/// segment file and its bytes.
fn scrubbed_pair(env: &Env) -> (NodeProc, NodeProc, std::path::PathBuf, Vec<u8>) {
    let scrub = "scrub_bytes_per_sec = 104857600\nscrub_interval_ms = 200\n";
    let lead = small_leader(env, 0, scrub);
    let cfg = env.write_config(
        "f1.toml",
        &format!("[log]\nsegment_bytes_max = 65536\nbatch_bytes_max = 16384\n{scrub}"),
    );
    let f1 = env.node(
        "f1",
        &[
            "--node-id",
            "f1",
            "--leader",
            &lead.server(),
            "--config",
            &cfg,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    env.cli_ok(&["create", "--server", &lead.server(), "--log", LOG], "");
    append_lines(env, &lead, 0..2000);
    wait_caught_up(env, &lead, &["f1"]);

    // The oldest segment on f1 is sealed (the log spans several 64 KiB segments).
    let dir = f1.data_dir.join("logs").join(LOG);
    let mut segments: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "{segments:?}");
    let victim = segments[0].clone();
    let original = std::fs::read(&victim).unwrap();
    (lead, f1, victim, original)
}

/// Bytes flipped inside a sealed segment on a follower are found by the background scrub with
/// no client reading them, reported (status, metrics), and repaired from the leader: the file
/// holds its original bytes again.
#[test]
fn the_scrub_finds_damage_at_rest_on_a_follower_and_repairs_it_from_the_leader() {
    let env = Env::new();
    let (_lead, f1, victim, original) = scrubbed_pair(&env);
    let victim = &victim;
    let at = 30_000usize;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(victim)
            .unwrap();
        let flipped: Vec<u8> = original[at..at + 16].iter().map(|b| !b).collect();
        f.write_all_at(&flipped, at as u64).unwrap();
    }

    let found = eventually(60, "the scrub's report of the repaired damage", || {
        let s = status(&env, &f1);
        let d = s["damaged"].as_array()?.first()?.clone();
        d["repaired_ms"].as_u64().map(|_| d)
    });
    assert_eq!(found["log"], LOG);
    let (from, until) = (
        found["from"].as_u64().unwrap(),
        found["until"].as_u64().unwrap(),
    );
    assert!(from < until, "{found}");
    assert!(found["position"].as_u64().unwrap() <= at as u64, "{found}");
    assert_eq!(found["file"].as_str().unwrap(), victim.to_str().unwrap());
    let metrics = f1.metrics.clone().unwrap();
    assert_eq!(metric(&metrics, "replog_scrub_damaged_total"), 1.0);
    assert_eq!(metric(&metrics, "replog_scrub_repaired_total"), 1.0);
    assert!(metric(&metrics, "replog_scrub_bytes_total") > 0.0);
    // The file holds its original bytes again, and the follower serves the range.
    assert_eq!(std::fs::read(victim).unwrap(), original);
    let read = env.cli_json(
        &[
            "read",
            "--server",
            &f1.server(),
            "--log",
            LOG,
            "--from",
            &from.to_string(),
            "--count",
            &(until - from).to_string(),
            "--json",
        ],
        "",
    );
    for (i, r) in read.iter().enumerate() {
        assert_eq!(r["value"], record_line(from as usize + i).as_str());
    }
    // Found once: later passes find nothing more.
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(metric(&metrics, "replog_scrub_damaged_total"), 1.0);
}

/// A batch on a follower that passes its own checks but is not the leader's (rewritten with a
/// new crc32c) is found by comparing the segment's checksum with the leader's copy, and
/// repaired from it.
#[test]
fn the_scrub_finds_a_batch_that_differs_from_the_leaders_and_repairs_it() {
    let env = Env::new();
    let (_lead, f1, victim, original) = scrubbed_pair(&env);
    // The batch holding byte 30000: one record byte changed, its crc32c made right again.
    let (mut pos, at) = (0usize, 30_000usize);
    let len = loop {
        let payload = u32::from_le_bytes(original[pos + 40..pos + 44].try_into().unwrap());
        let len = 48 + payload as usize;
        if pos + len > at {
            break len;
        }
        pos += len;
    };
    let mut batch = original[pos..pos + len].to_vec();
    let x = batch.len() - 10;
    assert_eq!(batch[x], b'x');
    batch[x] = b'y';
    let crc = crc32c::crc32c(&batch[8..]);
    batch[4..8].copy_from_slice(&crc.to_le_bytes());
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap();
        f.write_all_at(&batch, pos as u64).unwrap();
    }
    let found = eventually(60, "the scrub's report of the repaired difference", || {
        let s = status(&env, &f1);
        let d = s["damaged"].as_array()?.first()?.clone();
        d["repaired_ms"].as_u64().map(|_| d)
    });
    assert_eq!(found["position"].as_u64(), Some(pos as u64), "{found}");
    assert!(
        found["detail"]
            .as_str()
            .unwrap()
            .contains("differs from the leader's"),
        "{found}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), original);
}
