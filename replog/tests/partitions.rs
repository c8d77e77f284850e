//! Failover under partial failures, on real `replog node` processes in network namespaces
//! (common/net.rs): a log's leader cut off from its followers in one direction, the other, or
//! both (while clients still reach it) is replaced within `leader_timeout` plus a bound; a
//! client library load across the cut meets no definite failure and loses no acknowledged
//! append; the old leader names nobody as leader while it cannot hear the controller, and its
//! status tells the truth before and after the partition heals.
//!
//! Needs root (network namespaces), as CI runs.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::net::Net;
use common::{eventually, Env, NodeProc};

const IDS: [&str; 3] = ["n1", "n2", "n3"];
/// The clusters' `leader_timeout_ms`.
const LEADER_TIMEOUT: Duration = Duration::from_millis(2000);
/// How long after `leader_timeout` writes may take to resume on a new leader: detection (the
/// reports that carry the silence, every two ticks), the election, the new leader reopening the
/// log, its follower reconnecting and the sync set going on record (docs/operating.md,
/// section 2). Generous, for a loaded two-core machine: the figure measured is about 1.5 s.
const RESUME_BOUND: Duration = Duration::from_secs(5);

/// One cluster at a time: each test measures a failover against the clock.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Cluster {
    // Dropped in this order: the nodes, then their namespaces, then the files.
    nodes: Vec<NodeProc>,
    net: Net,
    env: Env,
}

impl Cluster {
    /// Three nodes, one per namespace, each a controller member; n1 the configured leader with
    /// one sync replica.
    fn start() -> Cluster {
        let net = Net::new(3);
        let env = Env::new();
        let addrs: Vec<SocketAddr> = (0..3)
            .map(|i| SocketAddr::new(net.ip(i).into(), 7000))
            .collect();
        let members = IDS
            .iter()
            .zip(&addrs)
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",");
        let timeout = LEADER_TIMEOUT.as_millis().to_string();
        let leader = addrs[0].to_string();
        let nodes = (0..3)
            .map(|i| {
                let mut args = vec![
                    "--node-id",
                    IDS[i],
                    "--member",
                    &members,
                    "--leader-timeout-ms",
                    &timeout,
                    "--sync-replicas",
                    "1",
                ];
                if i == 0 {
                    args.extend(["--follower", "n2,n3"]);
                } else {
                    args.extend(["--leader", &leader]);
                }
                NodeProc::start_in(&env, &net.ns(i), &env.path(IDS[i]), addrs[i], &args)
            })
            .collect();
        Cluster { nodes, net, env }
    }

    fn servers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.server())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn status(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.env.cli(
            &["status", "--server", &self.nodes[i].server(), "--json"],
            "",
        );
        if !out.status.success() {
            eprintln!(
                "status of node {i} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The controller's record of `orders` as node `i` has it: (leader, epoch).
    fn record(&self, i: usize) -> Option<(String, u64)> {
        let v = self.status(i)?;
        let l = v["controller"]["logs"]
            .as_array()?
            .iter()
            .find(|l| l["log"] == "orders")?
            .clone();
        Some((l["leader"].as_str()?.to_string(), l["epoch"].as_u64()?))
    }

    /// Node `i`'s own line for `orders` in its status: (role on record, role acted in).
    fn role(&self, i: usize) -> Option<(String, String)> {
        let v = self.status(i)?;
        let l = v["logs"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == "orders")?
            .clone();
        Some((
            l["role"].as_str()?.to_string(),
            l["acting"].as_str()?.to_string(),
        ))
    }
}

/// What the load saw: each acknowledged append (offset, value), and each failure (definite or
/// not, with its message).
#[derive(Default)]
struct Seen {
    acked: Vec<(u64, String, u64, Instant)>,
    definite: Vec<String>,
    unknown: Vec<String>,
}

/// Plain `acks=sync` appends of one record each, one after another, through the client
/// library with every node configured, until `stop`.
fn load(
    env: &Env,
    servers: &str,
    stop: Arc<AtomicBool>,
) -> (std::thread::JoinHandle<()>, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let config = client::ClientConfig::new(servers.split(','))
        .with_trust(client::Trust::CaFile(env.ca_pem()));
    let s = seen.clone();
    let h = std::thread::spawn(move || {
        let rt = common::rt();
        rt.block_on(async move {
            let c = client::Client::connect(config).await.unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let value = format!("v-{i}");
                i += 1;
                let opts = client::AppendOptions {
                    acks: protocol::Acks::Sync,
                    ..Default::default()
                };
                match c
                    .append("orders", vec![Bytes::from(value.clone())], opts)
                    .await
                {
                    Ok(r) => {
                        s.lock()
                            .unwrap()
                            .acked
                            .push((r.first, value, r.epoch, Instant::now()))
                    }
                    Err(e) if e.is_unknown_outcome() => {
                        s.lock().unwrap().unknown.push(e.to_string())
                    }
                    Err(e) => {
                        s.lock().unwrap().definite.push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    });
    (h, seen)
}

enum Cut {
    /// Followers cannot reach the leader; the leader still reaches them.
    FollowersToLeader,
    /// The leader cannot reach its followers; they still reach it.
    LeaderToFollowers,
    /// Both ways: the leader is cut off from the controller's majority, clients still reach it.
    Both,
}

fn partition_and_heal(cut: Cut) {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: network namespaces need root");
        return;
    }
    let _serial = serial();
    let c = Cluster::start();
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
    let stop = Arc::new(AtomicBool::new(false));
    let (h, seen) = load(&c.env, &c.servers(), stop.clone());
    eventually(60, "acknowledged appends before the cut", || {
        (seen.lock().unwrap().acked.len() >= 20).then_some(())
    });
    let (old, epoch) = c.record(0).unwrap();
    assert_eq!(old, "n1");

    let cut_at = Instant::now();
    match cut {
        Cut::FollowersToLeader => {
            c.net.cut(1, 0);
            c.net.cut(2, 0);
        }
        Cut::LeaderToFollowers => {
            c.net.cut(0, 1);
            c.net.cut(0, 2);
        }
        Cut::Both => c.net.isolate(0),
    }
    // Writes resume on a new leader, in a new epoch.
    let resumed = eventually(60, "an acknowledged append in a new epoch", || {
        seen.lock()
            .unwrap()
            .acked
            .iter()
            .find(|(_, _, e, _)| *e > epoch)
            .map(|(_, _, _, at)| at.duration_since(cut_at))
    });
    let (new, new_epoch) = eventually(30, "the new leader on record", || {
        c.record(1).filter(|(l, e)| *l != "n1" && *e > epoch)
    });
    assert!(
        resumed < LEADER_TIMEOUT + RESUME_BOUND,
        "writes resumed {resumed:?} after the cut, over leader_timeout {LEADER_TIMEOUT:?} + {RESUME_BOUND:?}"
    );
    // The old leader, cut off, takes no writes and names nobody: a client that asks it alone
    // is not sent back to it.
    let status = c.status(0).unwrap();
    let problem = status["controller"]["problem"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        problem.contains("no round trip with the controller")
            || problem.contains("no controller leader"),
        "the cut-off node says it cannot reach the controller: {status}"
    );
    let out = c.env.cli(
        &[
            "append",
            "--server",
            &c.nodes[0].server(),
            "--log",
            "orders",
            "--acks",
            "sync",
            "--batch",
            "1",
        ],
        "lonely\n",
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        assert!(
            !err.contains(&format!("(leader: {})", c.nodes[0].server())),
            "the cut-off node names itself as the leader: {err}"
        );
        assert!(
            !err.contains("nothing was stored") || out.status.code() == Some(1),
            "{err}"
        );
        if out.status.code() == Some(3) {
            assert!(
                err.contains("not acknowledged; it may or may not be stored"),
                "{err}"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(2));

    c.net.heal();
    // After healing, every node tells the truth: the old leader is a follower on record and
    // in fact, and hears the controller again.
    let healed = Instant::now();
    let last = std::cell::RefCell::new(None);
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually(60, "the old leader following on record and in fact", || {
            let (role, acting) = c.role(0)?;
            let status = c.status(0)?;
            let problem = status["controller"]["problem"]
                .as_str()
                .unwrap_or("")
                .to_string();
            *last.borrow_mut() = Some(status);
            (role == "follower" && acting == "follower" && problem.is_empty()).then_some(())
        })
    }));
    assert!(
        waited.is_ok(),
        "n1's status after healing: {:?}",
        last.borrow()
    );
    eprintln!(
        "the old leader was a follower {:?} after healing",
        healed.elapsed()
    );
    assert_eq!(c.record(0).unwrap(), (new.clone(), new_epoch));
    let leader_index = IDS.iter().position(|id| *id == new).unwrap();
    assert_eq!(
        c.role(leader_index).unwrap(),
        ("leader".into(), "leader".into())
    );
    // More writes after healing.
    let before = seen.lock().unwrap().acked.len();
    eventually(60, "appends after healing", || {
        (seen.lock().unwrap().acked.len() > before + 10).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();

    let seen = seen.lock().unwrap();
    assert!(
        seen.definite.is_empty(),
        "definite failures while a leader was available: {:?}",
        seen.definite
    );
    for m in &seen.unknown {
        assert!(!m.contains("nothing was stored"), "{m}");
    }
    // Every acknowledged append is in the log, once, at its offset.
    let read = c.env.cli_json(
        &[
            "read",
            "--server",
            &c.nodes[leader_index].server(),
            "--log",
            "orders",
            "--from",
            "0",
            "--json",
        ],
        "",
    );
    let stored: std::collections::BTreeMap<u64, String> = read
        .iter()
        .map(|r| {
            (
                r["offset"].as_u64().unwrap(),
                r["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (offset, value, _, _) in &seen.acked {
        assert_eq!(
            stored.get(offset),
            Some(value),
            "acknowledged append at {offset} lost"
        );
    }
    eprintln!(
        "writes resumed {resumed:?} after the cut on {new} (epoch {new_epoch}); {} acknowledged, {} unknown",
        seen.acked.len(),
        seen.unknown.len()
    );
}

#[test]
fn followers_cut_off_from_their_leader_one_way_make_it_fail_over() {
    partition_and_heal(Cut::FollowersToLeader);
}

#[test]
fn a_leader_cut_off_from_its_followers_one_way_fails_over() {
    partition_and_heal(Cut::LeaderToFollowers);
}

#[test]
fn a_leader_cut_off_both_ways_while_clients_reach_it_fails_over() {
    partition_and_heal(Cut::Both);
}
