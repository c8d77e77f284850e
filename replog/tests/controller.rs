//! The embedded controller across real `replog node` processes: the members form a cluster
//! over QUIC, agree on the metadata, elect a new controller leader when the old one is killed,
//! keep the metadata across a restart of every node, and change nothing without a majority.

#[path = "common/checker.rs"]
mod checker;
mod common;

use common::{eventually, Env, NodeProc};

const IDS: [&str; 3] = ["n1", "n2", "n3"];

/// The tests of this file run one at a time: each starts three nodes and kills, pauses and
/// restarts them against timeouts, and five such clusters at once on two CPUs would measure
/// the machine's load rather than the failover.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Cluster {
    env: Env,
    nodes: Vec<NodeProc>,
}

fn start() -> Cluster {
    start_with(&[])
}

/// Three nodes, each with the controller's member list: n1 leads (configured), n2 and n3
/// follow; `extra` flags go to every node.
fn start_with(extra: &[&str]) -> Cluster {
    start_on(Env::new(), extra)
}

/// [`start_with`], in `env` (whose data dirs may be prepared first).
fn start_on(env: Env, extra: &[&str]) -> Cluster {
    let addrs = env.free_addrs(3);
    let members: Vec<String> = IDS
        .iter()
        .zip(&addrs)
        .map(|(id, a)| format!("{id}={a}"))
        .collect();
    let members = members.join(",");
    let nodes = IDS
        .iter()
        .zip(&addrs)
        .enumerate()
        .map(|(i, (id, addr))| {
            let mut args = vec!["--node-id", id, "--member", &members];
            args.extend(extra);
            let followers = "n2,n3".to_string();
            let leader = addrs[0].to_string();
            if i == 0 {
                args.extend(["--follower", &followers]);
            } else {
                args.extend(["--leader", &leader]);
            }
            NodeProc::start_at(&env, &env.path(id), *addr, &args)
        })
        .collect();
    Cluster { env, nodes }
}

/// The controller part of a node's `status --json`.
fn controller(env: &Env, node: &NodeProc) -> Option<serde_json::Value> {
    let out = env.cli(&["status", "--server", &node.server(), "--json"], "");
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["controller"].clone())
}

#[test]
fn the_controller_forms_fails_over_survives_restarts_and_needs_a_majority() {
    let _serial = serial();
    let mut c = start();
    // Formed: every node has the same cluster id and knows the same controller leader.
    let formed = eventually(60, "a formed cluster on every node", || {
        let views: Vec<serde_json::Value> = c
            .nodes
            .iter()
            .map(|n| controller(&c.env, n))
            .collect::<Option<_>>()?;
        let id = views[0]["cluster_id"].as_str()?.to_string();
        let leader = views[0]["leader"].as_str()?.to_string();
        (!id.is_empty()
            && views
                .iter()
                .all(|v| v["cluster_id"] == id.as_str() && v["leader"] == leader.as_str()))
        .then_some((id, leader))
    });
    let (cluster_id, first_leader) = formed;
    assert_eq!(
        controller(&c.env, &c.nodes[0]).unwrap()["members"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // A log created on the leader is registered with the controller, led by n1 in epoch 1.
    create_orders(&c);
    for n in &c.nodes {
        eventually(30, "the log in the controller's metadata", || {
            let v = controller(&c.env, n)?;
            let l = v["logs"]
                .as_array()?
                .iter()
                .find(|l| l["log"] == "orders")?
                .clone();
            (l["leader"] == "n1" && l["epoch"] == 1).then_some(())
        });
    }

    // The leader's sync set (one follower) goes on record with the controller, which is what
    // failover elects from.
    // (The first may be refused while the sync set is not on record yet.)
    eventually(30, "acks=sync appends", || {
        append_sync(&c.env, &c.nodes[0].server(), "orders", 0, "one\ntwo\n")
    });
    for n in &c.nodes {
        eventually(30, "the sync set on record", || {
            let v = controller(&c.env, n)?;
            let l = v["logs"]
                .as_array()?
                .iter()
                .find(|l| l["log"] == "orders")?
                .clone();
            let set = l["sync_set"].as_array()?.clone();
            (set.len() == 1 && (set[0] == "n2" || set[0] == "n3")).then_some(())
        });
    }

    // Kill the controller leader: the other two elect one of themselves.
    let i = IDS.iter().position(|id| *id == first_leader).unwrap();
    c.nodes[i].kill();
    let others: Vec<usize> = (0..3).filter(|j| *j != i).collect();
    let second = eventually(60, "a new controller leader", || {
        let v = controller(&c.env, &c.nodes[others[0]])?;
        let leader = v["leader"].as_str()?.to_string();
        (leader != first_leader
            && controller(&c.env, &c.nodes[others[1]])?["leader"] == leader.as_str())
        .then_some(leader)
    });
    assert_ne!(second, first_leader);
    c.respawn(i);

    // Every node restarts (SIGKILL): the metadata comes back from each data dir.
    for n in c.nodes.iter_mut() {
        n.kill();
    }
    let nodes: Vec<NodeProc> = c.nodes.iter().map(|n| n.respawn()).collect();
    c.nodes = nodes;
    for n in &c.nodes {
        eventually(60, "the metadata after a restart", || {
            let v = controller(&c.env, n)?;
            let has_log = v["logs"].as_array()?.iter().any(|l| l["log"] == "orders");
            (v["cluster_id"] == cluster_id.as_str() && has_log && v["leader"].is_string())
                .then_some(())
        });
    }

    // Two of three stopped: the one left has no controller leader (no majority), and keeps
    // its metadata.
    c.nodes[1].kill();
    c.nodes[2].kill();
    eventually(60, "no controller leader without a majority", || {
        let v = controller(&c.env, &c.nodes[0])?;
        (v["leader"].is_null() && v["cluster_id"] == cluster_id.as_str()).then_some(())
    });
    // They come back: service resumes.
    c.respawn(1);
    c.respawn(2);
    eventually(60, "a controller leader again", || {
        controller(&c.env, &c.nodes[0])?["leader"]
            .as_str()
            .map(|_| ())
    });
}

/// The controller's record of `log` on `node`: (leader, epoch).
fn record(env: &Env, node: &NodeProc, log: &str) -> Option<(Option<String>, u64)> {
    let v = controller(env, node)?;
    let l = v["logs"]
        .as_array()?
        .iter()
        .find(|l| l["log"] == log)?
        .clone();
    Some((
        l["leader"].as_str().map(str::to_string),
        l["epoch"].as_u64()?,
    ))
}

/// Append `lines` at acks=sync through any of `servers` as one conditional append at offset
/// `at`: the offsets, or `None` if it did not succeed. A retry after an unknown outcome cannot
/// store the lines twice: if an earlier attempt stored them, the conflict is recognised by
/// reading them back at `at`.
fn append_sync(env: &Env, servers: &str, log: &str, at: u64, lines: &str) -> Option<Vec<u64>> {
    let at_s = at.to_string();
    let out = env.cli(
        &[
            "append",
            "--server",
            servers,
            "--log",
            log,
            "--acks",
            "sync",
            "--expected-offset",
            &at_s,
            "--json",
        ],
        lines,
    );
    let offsets: Vec<u64> = (at..at + lines.lines().count() as u64).collect();
    if out.status.success() {
        return Some(offsets);
    }
    if !String::from_utf8_lossy(&out.stderr).contains("offset_conflict") {
        return None;
    }
    // Stored by an earlier attempt whose answer was lost?
    let first = servers.split(',').next()?;
    let read = env.cli(
        &[
            "read",
            "--server",
            first,
            "--log",
            log,
            "--from",
            &at_s,
            "--min-offset",
            "0",
            "--json",
        ],
        "",
    );
    let values: Vec<String> = String::from_utf8_lossy(&read.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["value"].as_str().map(str::to_string))
        .collect();
    let wanted: Vec<&str> = lines.lines().collect();
    (values.len() >= wanted.len() && values[..wanted.len()] == wanted[..]).then_some(offsets)
}

/// Every record of `log` on `node`, read without a read-your-writes floor.
fn records(env: &Env, node: &NodeProc, log: &str) -> Vec<(u64, String)> {
    let out = env.cli_json(
        &[
            "read",
            "--server",
            &node.server(),
            "--log",
            log,
            "--from",
            "0",
            "--min-offset",
            "0",
            "--json",
        ],
        "",
    );
    out.iter()
        .map(|v| {
            (
                v["offset"].as_u64().unwrap(),
                v["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_killed_leader_is_replaced_and_rejoins_as_a_follower() {
    let _serial = serial();
    let mut c = start_with(&["--leader-timeout-ms", "2000"]);
    let all = servers(&[&c.nodes[0], &c.nodes[1], &c.nodes[2]]);
    // Acknowledged at sync on n1 (the controller must know the log and n1's lease must hold).
    let acked = create_with_records(&c, 10);
    assert_eq!(acked, (0..10).collect::<Vec<u64>>());

    // n1 dies: a member of the sync set takes over in a new epoch, and writes go there.
    c.nodes[0].kill();
    let (leader, epoch) = eventually(60, "a new leader of the log", || {
        match record(&c.env, &c.nodes[1], "orders")? {
            (Some(l), e) if l != "n1" => Some((l, e)),
            _ => None,
        }
    });
    assert!(epoch >= 2, "epoch {epoch}");
    let after = eventually(60, "acks=sync appends on the new leader", || {
        append_sync(&c.env, &all, "orders", 10, "after-0\nafter-1\n")
    });
    assert_eq!(after, vec![10, 11]);

    // n1 returns: it follows the new leader and holds exactly the same records.
    c.respawn(0);
    let expected = before_then_after(10, 2);
    for n in &c.nodes {
        eventually(60, "every replica holds every acknowledged record", || {
            (records(&c.env, n, "orders") == expected).then_some(())
        });
    }
    assert_eq!(
        record(&c.env, &c.nodes[0], "orders").unwrap().0.as_deref(),
        Some(leader.as_str())
    );
    // n1 takes no writes for the log now: it answers not_leader naming the new leader, and
    // the client library follows it there.
    let via_n1 = eventually(30, "an append through n1", || {
        append_sync(&c.env, &c.nodes[0].server(), "orders", 12, "through-n1\n")
    });
    assert_eq!(via_n1, vec![12]);
    let on_n1 = records(&c.env, &c.nodes[0], "orders");
    assert!(
        on_n1.len() <= 13 && on_n1[..12] == expected[..],
        "{on_n1:?}"
    );
}

#[test]
fn a_leader_that_lost_its_copy_gives_the_log_up_to_a_member_of_the_sync_set() {
    let _serial = serial();
    // A long leader_timeout: the leader is back, without its copy, long before anything would
    // fail it over for silence.
    let mut c = start_with(&["--leader-timeout-ms", "20000"]);
    let all = servers(&[&c.nodes[0], &c.nodes[1], &c.nodes[2]]);
    let acked = create_with_records(&c, 10);
    assert_eq!(acked, (0..10).collect::<Vec<u64>>());

    // n1 loses its copy of the log (its directory is gone) and starts again.
    c.nodes[0].kill();
    let copy = c.env.path("n1").join("logs").join("orders");
    std::fs::remove_dir_all(&copy).unwrap();
    c.respawn(0);

    // It creates the log afresh, marked recovering, and withdraws: the controller deposes it
    // and elects the member of the sync set, which holds every acknowledged append.
    let (leader, _) = wait_for_new_leader(&c, 1, "n1");
    assert_ne!(leader, "n1");
    let after = eventually(60, "acks=sync appends on the new leader", || {
        append_sync(&c.env, &all, "orders", 10, "after-0\nafter-1\n")
    });
    assert_eq!(after, vec![10, 11]);

    // n1 catches up as a follower; then its copy is whole again and no longer recovering.
    let expected = before_then_after(10, 2);
    eventually(60, "n1 holds every acknowledged record again", || {
        (records(&c.env, &c.nodes[0], "orders") == expected).then_some(())
    });
    eventually(30, "n1's copy is no longer recovering", || {
        (!copy.join("RECOVERING").exists()).then_some(())
    });
}

impl Cluster {
    /// Start node `i` again on its data dir and address (after it was killed).
    fn respawn(&mut self, i: usize) {
        let back = self.nodes[i].respawn();
        self.nodes[i] = back;
    }
}

/// The records `before-0..before` at offsets 0.., then `after-0..after` right behind them.
fn before_then_after(before: u64, after: u64) -> Vec<(u64, String)> {
    (0..before)
        .map(|i| (i, format!("before-{i}")))
        .chain((0..after).map(|i| (before + i, format!("after-{i}"))))
        .collect()
}

/// Create log `orders` on n1 (the configured leader), which registers it with the controller.
fn create_orders(c: &Cluster) {
    c.env.cli_ok(
        &[
            "create",
            "--server",
            &c.nodes[0].server(),
            "--log",
            "orders",
        ],
        "",
    );
}

/// Create log `orders` on n1 and append `before-0..n` at acks=sync (retried while the sync set
/// is not on record yet): their offsets.
fn create_with_records(c: &Cluster, n: usize) -> Vec<u64> {
    create_orders(c);
    let first: String = (0..n).map(|i| format!("before-{i}\n")).collect();
    eventually(60, "acks=sync appends on n1", || {
        append_sync(&c.env, &c.nodes[0].server(), "orders", 0, &first)
    })
}

fn wait_for_new_leader(c: &Cluster, node: usize, old: &str) -> (String, u64) {
    eventually(90, "a new leader of the log", || {
        match record(&c.env, &c.nodes[node], "orders")? {
            (Some(l), e) if l != old => Some((l, e)),
            _ => None,
        }
    })
}

fn servers(nodes: &[&NodeProc]) -> String {
    nodes
        .iter()
        .map(|n| n.server())
        .collect::<Vec<_>>()
        .join(",")
}

/// Kill both followers, then store `lines` on n1 alone (acks=leader, within its lease): records
/// nobody else ever sees. Their offsets.
fn lonely_records(c: &mut Cluster, lines: &str) -> Vec<u64> {
    c.nodes[1].kill();
    c.nodes[2].kill();
    let stored = c.env.cli_json(
        &[
            "append",
            "--server",
            &c.nodes[0].server(),
            "--log",
            "orders",
            "--acks",
            "leader",
            "--json",
        ],
        lines,
    );
    stored
        .iter()
        .map(|r| r["offset"].as_u64().unwrap())
        .collect()
}

/// `node`'s status lists exactly one quarantine of `orders`: offsets `from..to`, whose batches
/// file holds every one of `values`.
fn assert_quarantined(c: &Cluster, node: usize, (from, to): (u64, u64), values: &[&str]) {
    let v = c.env.cli_json(
        &["status", "--server", &c.nodes[node].server(), "--json"],
        "",
    );
    let q = v[0]["quarantined"].as_array().unwrap();
    assert_eq!(q.len(), 1, "{v:?}");
    assert_eq!(q[0]["log"], "orders");
    assert_eq!(
        (
            q[0]["from"].as_u64(),
            q[0]["to"].as_u64(),
            q[0]["records"].as_u64()
        ),
        (Some(from), Some(to), Some(to - from))
    );
    let kept = std::fs::read(q[0]["file"].as_str().unwrap()).unwrap();
    let text = String::from_utf8_lossy(&kept);
    assert!(
        values.iter().all(|v| text.contains(v)),
        "the quarantined batches hold the truncated records"
    );
}

#[test]
fn a_frozen_leader_is_replaced_commits_nothing_and_steps_down() {
    let _serial = serial();
    // leader_timeout 6 s: the leader's lease (half of it) outlives its followers by enough
    // for one append.
    let mut c = start_with(&["--leader-timeout-ms", "6000"]);
    create_with_records(&c, 5);

    // The followers stop; the leader stores a record nobody else sees (acks=leader), and then
    // freezes, past leader_timeout, while the followers come back.
    assert_eq!(lonely_records(&mut c, "lonely\n"), vec![5]);
    c.nodes[0].signal(libc::SIGSTOP);
    c.respawn(1);
    c.respawn(2);

    // The followers replace it and take writes in a new epoch.
    let (leader, epoch) = wait_for_new_leader(&c, 1, "n1");
    assert!(epoch >= 2);
    let others = servers(&[&c.nodes[1], &c.nodes[2]]);
    let after = eventually(90, "acks=sync appends on the new leader", || {
        append_sync(&c.env, &others, "orders", 5, "after-0\nafter-1\nafter-2\n")
    });
    assert_eq!(after, vec![5, 6, 7]);

    // The old leader wakes up: its lease has lapsed, it learns the new epoch, steps down,
    // moves its divergent record into quarantine, and converges.
    c.nodes[0].signal(libc::SIGCONT);
    let expected = before_then_after(5, 3);
    for n in &c.nodes {
        eventually(
            90,
            "every replica holds exactly the acknowledged records",
            || (records(&c.env, n, "orders") == expected).then_some(()),
        );
    }
    assert_eq!(
        record(&c.env, &c.nodes[0], "orders").unwrap().0.as_deref(),
        Some(leader.as_str())
    );
    assert_quarantined(&c, 0, (5, 6), &["lonely"]);
    // It commits nothing on its own: a write sent to it lands on the new leader.
    let via_old = eventually(30, "an append through the old leader", || {
        append_sync(&c.env, &c.nodes[0].server(), "orders", 8, "through-n1\n")
    });
    assert_eq!(via_old, vec![8]);
}

#[test]
fn a_divergent_suffix_goes_to_quarantine_when_the_old_leader_rejoins() {
    let _serial = serial();
    // A long leader_timeout: the leader's lease (half of it) outlives its followers by enough
    // for one more append.
    let mut c = start_with(&["--leader-timeout-ms", "10000"]);
    create_with_records(&c, 5);
    // Both followers die; n1 stores three more records that nobody else ever sees (acks=leader:
    // durable on n1 alone), then dies too.
    assert_eq!(
        lonely_records(&mut c, "lonely-0\nlonely-1\nlonely-2\n"),
        vec![5, 6, 7]
    );
    c.nodes[0].kill();

    // The followers come back without n1 and elect one of themselves (the member of the sync
    // set on record), which takes writes.
    c.respawn(1);
    c.respawn(2);
    wait_for_new_leader(&c, 1, "n1");
    let others = servers(&[&c.nodes[1], &c.nodes[2]]);
    let after = eventually(90, "acks=sync appends on the new leader", || {
        append_sync(&c.env, &others, "orders", 5, "after-0\nafter-1\n")
    });
    assert_eq!(after, vec![5, 6]);

    // n1 returns: its three lonely records diverge from the new leader's log. It keeps them in
    // quarantine, truncates them, and converges.
    c.respawn(0);
    let expected = before_then_after(5, 2);
    eventually(90, "n1 holds exactly the new leader's records", || {
        (records(&c.env, &c.nodes[0], "orders") == expected).then_some(())
    });
    assert_quarantined(&c, 0, (5, 8), &["lonely-0", "lonely-1", "lonely-2"]);
}

#[test]
fn a_planned_switchover_under_load_loses_nothing() {
    let _serial = serial();
    let c = start_with(&["--leader-timeout-ms", "3000"]);
    let all = servers(&[&c.nodes[0], &c.nodes[1], &c.nodes[2]]);
    create_orders(&c);
    eventually(60, "acks=sync appends on n1", || {
        append_sync(&c.env, &c.nodes[0].server(), "orders", 0, "first\n")
    });
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (acked, moved) = std::thread::scope(|s| {
        // Continuous load: one conditional acks=sync append after another, each retried until
        // it is known to be stored (so the log is exactly the acknowledged records).
        let load = s.spawn(|| {
            let mut acked = vec![(0u64, "first".to_string())];
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let value = format!("load-{i}");
                let at = acked.len() as u64;
                eventually(60, "an append under load", || {
                    append_sync(&c.env, &all, "orders", at, &format!("{value}\n"))
                });
                acked.push((at, value));
                i += 1;
            }
            acked
        });
        std::thread::sleep(std::time::Duration::from_secs(1));
        let out = c.env.cli_json(
            &[
                "failover",
                "--server",
                &c.nodes[0].server(),
                "--log",
                "orders",
                "--to",
                "n3",
                "--json",
            ],
            "",
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (load.join().unwrap(), out)
    });
    assert_eq!(moved[0]["from"], "n1");
    assert_eq!(moved[0]["to"], "n3");
    assert!(moved[0]["pause_ms"].as_f64().unwrap() > 0.0);
    assert!(acked.len() > 2, "the load kept going: {acked:?}");
    for n in &c.nodes {
        eventually(
            60,
            "every replica holds exactly the acknowledged records",
            || (records(&c.env, n, "orders") == acked).then_some(()),
        );
    }
    // The history, checked against what every replica serves.
    let history: Vec<checker::Op> = acked
        .iter()
        .map(|(o, v)| checker::Op {
            value: v.clone(),
            outcome: checker::Outcome::Ok(*o),
        })
        .collect();
    let replicas: Vec<(String, Vec<(u64, String)>)> = c
        .nodes
        .iter()
        .zip(IDS)
        .map(|(n, id)| (id.to_string(), records(&c.env, n, "orders")))
        .collect();
    let violations = checker::check(&history, &replicas);
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(
        record(&c.env, &c.nodes[0], "orders").unwrap().0.as_deref(),
        Some("n3")
    );
}

/// What one load worker was told, and how many acknowledgements all of them have had so far.
struct Load {
    stop: std::sync::atomic::AtomicBool,
    acked: std::sync::atomic::AtomicU64,
    /// The highest offset acknowledged so far.
    high: std::sync::atomic::AtomicU64,
}

/// How far `node` holds `log` durably (its `flushed` offset), from its status.
fn flushed(env: &Env, node: &NodeProc, log: &str) -> Option<u64> {
    let out = env.cli(&["status", "--server", &node.server(), "--json"], "");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["logs"].as_array()?.iter().find(|l| l["name"] == log)?["flushed"].as_u64()
}

/// Plain (not conditional) acks=sync appends of unique values, one after another on each of
/// `workers` tasks through one client configured with every node, until `load.stop`. Every
/// outcome is recorded as the client library reported it: acknowledged at an offset, definitely
/// failed, or unknown.
fn sync_load(
    ca: std::path::PathBuf,
    servers: Vec<String>,
    workers: usize,
    load: std::sync::Arc<Load>,
    producer: bool,
) -> Vec<checker::Op> {
    use std::sync::atomic::Ordering::Relaxed;
    let config = client::ClientConfig::new(servers)
        .with_trust(client::Trust::CaFile(ca))
        .with_request_timeout(std::time::Duration::from_secs(10));
    common::rt().block_on(async move {
        let client = client::Client::connect(config).await.unwrap();
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let client = client.clone();
                let load = load.clone();
                tokio::spawn(async move {
                    let mut ops = Vec::new();
                    let mut i = 0u64;
                    let timeout = Some(std::time::Duration::from_secs(5));
                    let idempotent = producer.then(|| {
                        client.producer(
                            "orders",
                            client::ProducerOptions {
                                acks: client::Acks::Sync,
                                timeout,
                                ..Default::default()
                            },
                        )
                    });
                    while !load.stop.load(Relaxed) {
                        let value = format!("w{w}-{i}");
                        i += 1;
                        let options = client::AppendOptions {
                            acks: client::Acks::Sync,
                            expected_offset: None,
                            timeout,
                        };
                        let sent = bytes::Bytes::from(value.clone());
                        let answer = match &idempotent {
                            Some(p) => p.send(sent).await,
                            None => client.append("orders", vec![sent], options).await,
                        };
                        let outcome = match answer {
                            Ok(r) => {
                                assert_eq!(r.level, client::Acks::Sync, "{value}: {r:?}");
                                load.acked.fetch_add(1, Relaxed);
                                load.high.fetch_max(r.first, Relaxed);
                                checker::Outcome::Ok(r.first)
                            }
                            Err(e) if e.is_unknown_outcome() => checker::Outcome::Unknown,
                            Err(_) => checker::Outcome::Failed,
                        };
                        let failed = !matches!(outcome, checker::Outcome::Ok(_));
                        ops.push(checker::Op { value, outcome });
                        let pause = if failed { 100 } else { 5 };
                        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                    }
                    ops
                })
            })
            .collect();
        let mut history = Vec::new();
        for t in tasks {
            history.extend(t.await.unwrap());
        }
        client.close().await;
        history
    })
}

/// Kill the log's leader `kills` times under continuous acks=sync load (plain appends, or
/// through idempotent producers), restarting it each time once another node leads and
/// acknowledges; then judge every replica against the recorded history with the checker.
fn kill_leaders_under_load(kills: usize, producer: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut c = start_with(&["--leader-timeout-ms", "2000"]);
    create_with_records(&c, 1);
    let servers: Vec<String> = c.nodes.iter().map(|n| n.server()).collect();
    let load = std::sync::Arc::new(Load {
        stop: false.into(),
        acked: 0.into(),
        high: 0.into(),
    });
    let mut failovers = Vec::new();
    let history = std::thread::scope(|s| {
        let worker = {
            let load = load.clone();
            let ca = c.env.ca_pem();
            s.spawn(move || sync_load(ca, servers, 2, load, producer))
        };
        eventually(60, "acknowledged appends under load", || {
            (load.acked.load(Relaxed) >= 20).then_some(())
        });
        for cycle in 0..kills {
            // The log's leader, as the controller has it, is killed.
            let (leader, epoch) = eventually(90, "the log's leader", || {
                match record(&c.env, &c.nodes[(cycle + 1) % 3], "orders")? {
                    (Some(l), e) => Some((l, e)),
                    _ => None,
                }
            });
            let i = IDS.iter().position(|id| *id == leader).unwrap();
            let before = load.acked.load(Relaxed);
            c.nodes[i].kill();
            // Another member takes over in a later epoch, and the load is acknowledged there.
            let witness = (i + 1) % 3;
            let (next, next_epoch) = wait_for_new_leader(&c, witness, &leader);
            assert!(
                next_epoch > epoch,
                "cycle {cycle}: {next_epoch} after {epoch}"
            );
            eventually(90, "acknowledged appends after the failover", || {
                (load.acked.load(Relaxed) >= before + 10).then_some(())
            });
            failovers.push((leader.clone(), next, next_epoch));
            // The old leader returns as a follower and catches up before the next kill.
            c.respawn(i);
            let high = load.high.load(Relaxed);
            eventually(
                90,
                "the restarted node caught up with the new leader",
                || {
                    let (l, e) = record(&c.env, &c.nodes[i], "orders")?;
                    let flushed = flushed(&c.env, &c.nodes[i], "orders")?;
                    (l.as_deref() != Some(leader.as_str()) && e >= next_epoch && flushed > high)
                        .then_some(())
                },
            );
        }
        load.stop.store(true, Relaxed);
        worker.join().unwrap()
    });

    // Every replica converges on one log, which the checker judges against the history.
    let mut history = history;
    history.insert(
        0,
        checker::Op {
            value: "before-0".into(),
            outcome: checker::Outcome::Ok(0),
        },
    );
    let replicas = eventually(120, "every replica holding the same records", || {
        let all: Vec<Vec<(u64, String)>> = c
            .nodes
            .iter()
            .map(|n| records(&c.env, n, "orders"))
            .collect();
        (all.iter().all(|r| *r == all[0])).then_some(all)
    });
    let replicas: Vec<(String, Vec<(u64, String)>)> =
        IDS.iter().map(|id| id.to_string()).zip(replicas).collect();
    let violations = checker::check(&history, &replicas);
    let count = |f: fn(&checker::Outcome) -> bool| history.iter().filter(|o| f(&o.outcome)).count();
    let acked = count(|o| matches!(o, checker::Outcome::Ok(_)));
    let unknown = count(|o| *o == checker::Outcome::Unknown);
    let failed = count(|o| *o == checker::Outcome::Failed);
    println!(
        "{} failovers; {acked} appends acknowledged, {failed} failed, {unknown} unknown; \
         {} records on every replica",
        failovers.len(),
        replicas[0].1.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(failovers.len(), kills);
    assert!(acked >= kills * 10, "{acked}");
}

#[test]
fn twenty_leader_kills_under_sync_load_lose_no_acknowledged_append() {
    let _serial = serial();
    kill_leaders_under_load(20, false);
}

#[test]
fn idempotent_producers_store_nothing_twice_across_leader_kills() {
    let _serial = serial();
    kill_leaders_under_load(3, true);
}

#[test]
fn without_a_majority_nothing_fails_over_and_service_resumes_without_loss() {
    let _serial = serial();
    let mut c = start_with(&["--leader-timeout-ms", "2000"]);
    create_with_records(&c, 5);
    // The log's leader and one follower stop: n3 is alone, short of a controller majority.
    c.nodes[0].kill();
    c.nodes[1].kill();
    let problem = eventually(60, "status saying why nothing can fail over", || {
        let v = controller(&c.env, &c.nodes[2])?;
        let p = v["problem"].as_str()?.to_string();
        (v["leader"].is_null() && v["reachable"] == serde_json::json!(["n3"])).then_some(p)
    });
    assert!(
        problem.contains("1 of 3 members reachable") && problem.contains("unreachable: n1, n2"),
        "{problem}"
    );
    let text = c
        .env
        .cli_ok(&["status", "--server", &c.nodes[2].server()], "");
    assert!(
        text.contains("controller problem: no controller leader"),
        "{text}"
    );
    // Well past leader_timeout, the log still has its old leader and epoch: no failover.
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(
        record(&c.env, &c.nodes[2], "orders"),
        Some((Some("n1".to_string()), 1))
    );
    // n3 takes no write: it is not the leader and cannot become one.
    let out = c.env.cli(
        &[
            "append",
            "--server",
            &c.nodes[2].server(),
            "--log",
            "orders",
            "--acks",
            "sync",
        ],
        "refused\n",
    );
    assert!(!out.status.success());
    // (It holds the five records durably; it learns that they are committed from the next
    // leader.)
    assert_eq!(flushed(&c.env, &c.nodes[2], "orders"), Some(5));

    // Both return: the controller acts again and writes resume, with nothing lost.
    c.respawn(0);
    c.respawn(1);
    eventually(60, "a controller leader again", || {
        let v = controller(&c.env, &c.nodes[2])?;
        (v["leader"].is_string() && v["problem"].is_null()).then_some(())
    });
    let all = servers(&[&c.nodes[0], &c.nodes[1], &c.nodes[2]]);
    let after = eventually(90, "acks=sync appends again", || {
        append_sync(&c.env, &all, "orders", 5, "after-0\nafter-1\n")
    });
    assert_eq!(after, vec![5, 6]);
    let expected = before_then_after(5, 2);
    for n in &c.nodes {
        eventually(
            60,
            "every replica holds exactly the acknowledged records",
            || (records(&c.env, n, "orders") == expected).then_some(()),
        );
    }
}

#[test]
fn a_data_dir_whose_controller_state_is_gone_refuses_to_start() {
    let _serial = serial();
    let mut c = start();
    eventually(60, "a formed cluster", || {
        let v = controller(&c.env, &c.nodes[2])?;
        (v["cluster_id"].as_str()?.len() > 1).then_some(())
    });
    // The cluster id is recorded beside the node id.
    let id_file = c.nodes[2].data_dir.join("cluster-id");
    let id = eventually(30, "the cluster id in the data dir", || {
        std::fs::read_to_string(&id_file).ok()
    });
    assert_eq!(
        id.trim(),
        controller(&c.env, &c.nodes[0]).unwrap()["cluster_id"]
    );
    // n3 stops and loses its controller state (a partial wipe, or a restore of the log
    // directories alone): it must not come back and vote with no memory of its votes.
    c.nodes[2].kill();
    std::fs::remove_dir_all(c.nodes[2].data_dir.join("controller")).unwrap();
    let n = &c.nodes[2];
    let out = std::process::Command::new(common::BIN)
        .arg("node")
        .arg("--data-dir")
        .arg(&n.data_dir)
        .args(["--listen", &n.server(), "--shards", "2"])
        .args(&n.args)
        .env("REPLOG_DEV_CA_DIR", c.env.ca_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("belongs to cluster {}", id.trim()))
            && err.contains("controller state")
            && err.contains("missing"),
        "{err}"
    );
    // The other two carry on.
    eventually(60, "a controller leader on the others", || {
        controller(&c.env, &c.nodes[0])?["leader"]
            .as_str()
            .map(|_| ())
    });
}

/// A tmpfs of `size` mounted on `dir` (created), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fill the file system holding `dir` with one file until a write fails for lack of space.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 << 10];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // And the last pages, byte by byte at most a page.
    for _ in 0..4096 {
        if f.write(&[0xa5]).is_err() {
            break;
        }
    }
    path
}

/// A follower whose disk fills up: its controller stops voting and proposing and says so in
/// status and metrics, its replica of a log refuses what it cannot store, and both resume
/// without a restart once space is freed; nothing acknowledged is lost.
#[test]
fn a_full_disk_on_a_follower_stops_its_controller_and_replica_until_space_returns() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: mounting a tmpfs needs root");
        return;
    }
    let _serial = serial();
    let env = Env::new();
    // Room, once freed, for everything n3 then catches up on (a few MiB).
    let disk = Tmpfs::mount(&env.path("n3"), "128m");
    let c = start_on(env, &["--metrics-listen", "127.0.0.1:0"]);
    let n3 = &c.nodes[2];
    let pid = n3.child.id();
    create_with_records(&c, 5);
    let servers = servers(&c.nodes.iter().collect::<Vec<_>>());
    eventually(60, "n3 holding the records", || {
        (flushed(&c.env, n3, "orders")? >= 5).then_some(())
    });

    let filler = fill(&disk.0);
    // The controller writes (a log created, its sync set recorded), and the log grows past
    // what n3 can store.
    for i in 0..3 {
        c.env.cli_ok(
            &[
                "create",
                "--server",
                &c.nodes[0].server(),
                "--log",
                &format!("more-{i}"),
            ],
            "",
        );
    }
    let big = "x".repeat(60_000);
    let lines: String = (0..40).map(|_| format!("{big}\n")).collect();
    for _ in 0..2 {
        let _ = c.env.cli(
            &[
                "append", "--server", &servers, "--log", "orders", "--acks", "sync",
            ],
            &lines,
        );
    }
    let problem = eventually(90, "n3's controller out of space", || {
        let p = controller(&c.env, n3)?["problem"].as_str()?.to_string();
        p.contains("out of space").then_some(p)
    });
    assert!(problem.contains("neither votes nor proposes"), "{problem}");
    let metrics = n3.metrics.clone().unwrap();
    assert_eq!(common::metric(&metrics, "replog_controller_no_space"), 1.0);
    // Writes go on through the other two.
    let stored = c.env.cli_json(
        &[
            "append", "--server", &servers, "--log", "orders", "--acks", "sync", "--json",
        ],
        "while-full\n",
    );
    let acked = stored[0]["offset"].as_u64().unwrap();
    // n3 cannot store it: its replica refuses what does not fit, and says so.
    assert!(flushed(&c.env, n3, "orders").unwrap_or(0) <= acked);
    eventually(60, "n3's replica reported failed for lack of space", || {
        (common::metric(&metrics, "replog_logs_failed") >= 1.0).then_some(())
    });

    // Space returns: both resume by themselves, in the same process.
    std::fs::remove_file(&filler).unwrap();
    eventually(90, "n3's controller writing again", || {
        let v = controller(&c.env, n3)?;
        let fine = v["problem"].as_str().unwrap_or("").is_empty()
            && v["logs"].as_array()?.iter().any(|l| l["log"] == "more-2");
        fine.then_some(())
    });
    eventually(90, "the gauges back at 0", || {
        (common::metric(&metrics, "replog_controller_no_space") == 0.0
            && common::metric(&metrics, "replog_logs_failed") == 0.0)
            .then_some(())
    });
    eventually(120, "n3's replica caught up", || {
        (flushed(&c.env, n3, "orders")? > acked).then_some(())
    });
    assert_eq!(n3.child.id(), pid);
    let on_n3 = c.env.cli_json(
        &[
            "read",
            "--server",
            &n3.server(),
            "--log",
            "orders",
            "--from",
            &acked.to_string(),
            "--count",
            "1",
            "--json",
            "--min-offset",
            &(acked + 1).to_string(),
        ],
        "",
    );
    assert_eq!(on_n3[0]["value"], "while-full");
    drop(c);
    drop(disk);
}
