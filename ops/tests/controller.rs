//! The embedded controller across real `replog node` processes: the members form a cluster
//! over QUIC, agree on the metadata, elect a new controller leader when the old one is killed,
//! keep the metadata across a restart of every node, and change nothing without a majority.

mod common;

use common::{eventually, Env, NodeProc};

const IDS: [&str; 3] = ["n1", "n2", "n3"];

struct Cluster {
    env: Env,
    nodes: Vec<NodeProc>,
}

fn start() -> Cluster {
    let env = Env::new();
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
    c.env.cli_ok(
        &[
            "append",
            "--server",
            &c.nodes[0].server(),
            "--log",
            "orders",
            "--acks",
            "sync",
        ],
        "one\ntwo\n",
    );
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
    let back = c.nodes[i].respawn();
    c.nodes[i] = back;

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
    let b = c.nodes[1].respawn();
    c.nodes[1] = b;
    let b = c.nodes[2].respawn();
    c.nodes[2] = b;
    eventually(60, "a controller leader again", || {
        controller(&c.env, &c.nodes[0])?["leader"]
            .as_str()
            .map(|_| ())
    });
}
