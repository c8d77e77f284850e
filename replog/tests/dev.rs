//! `replog dev`: node processes on loopback, supervised until SIGTERM.

mod common;

use common::*;

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn dev_starts_three_nodes_and_stops_them_all() {
    let env = Env::new();
    // If the test fails, its dev process (and so its nodes) must not outlive it.
    let dev = Dev::start(&env, "0", &[]);
    let nodes = dev.nodes.clone();
    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| n["pid"].as_u64().unwrap() as u32)
        .collect();
    let roles: Vec<&str> = nodes.iter().map(|n| n["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["leader", "follower", "follower"]);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["node"], format!("node-{}", i + 1));
        let addr = n["addr"].as_str().unwrap();
        let status = env.cli_json(&["status", "--server", addr, "--json"], "");
        assert_eq!(status[0]["node_id"], format!("node-{}", i + 1));
        assert_eq!(status[0]["role"], roles[i]);
        let data = std::path::PathBuf::from(n["data_dir"].as_str().unwrap());
        assert_eq!(data, env.path("cluster").join(format!("node-{}", i + 1)));
        assert!(data.join("node-id").exists());
    }
    let addr = |i: usize| nodes[i]["addr"].as_str().unwrap().to_string();
    // A semi-synchronous write on the leader is readable on every follower.
    env.cli_ok(&["create", "--server", &addr(0), "--log", "demo"], "");
    let r = env.cli_json(
        &[
            "append",
            "--server",
            &addr(0),
            "--log",
            "demo",
            "--acks",
            "sync",
            "--json",
        ],
        "hello\n",
    );
    assert_eq!(r[0]["level"], "sync", "{r:?}");
    for i in 1..3 {
        let got = env.cli_ok(
            &[
                "read",
                "--server",
                &addr(i),
                "--log",
                "demo",
                "--min-offset",
                "1",
                "--wait-ms",
                "30000",
            ],
            "",
        );
        assert_eq!(got, "hello\n");
    }
    // Each node is its own process: killing one follower leaves the others serving, and the
    // other follower takes the sync place.
    // SAFETY: kill(2) on a node process started by the dev command under test.
    unsafe {
        libc::kill(pids[2] as libc::pid_t, libc::SIGKILL);
    }
    let r = env.cli_json(
        &[
            "append",
            "--server",
            &addr(1),
            "--log",
            "demo",
            "--acks",
            "sync",
            "--json",
        ],
        "again\n",
    );
    assert_eq!(r[0]["offset"], 1, "{r:?}");
    // SIGTERM to dev stops every node it started.
    assert!(dev.stop().success());
    for pid in &pids[..2] {
        assert!(!alive(*pid), "node {pid} outlived replog dev");
    }
}

#[test]
fn killing_the_leader_in_dev_shows_a_failover_in_status() {
    let env = Env::new();
    let dev = Dev::start_controlled(&env, &[]);
    let nodes = dev.nodes.clone();
    let addr = |i: usize| nodes[i]["addr"].as_str().unwrap().to_string();
    let log_view = |i: usize| -> Option<(String, u64)> {
        let v = env.cli_json(&["status", "--server", &addr(i), "--json"], "");
        let l = v.first()?["controller"]["logs"]
            .as_array()?
            .iter()
            .find(|l| l["log"] == "demo")?
            .clone();
        Some((l["leader"].as_str()?.to_string(), l["epoch"].as_u64()?))
    };
    env.cli_ok(&["create", "--server", &addr(0), "--log", "demo"], "");
    let (first, epoch) = eventually(60, "the log in the controller's metadata", || log_view(1));
    assert_eq!(first, "node-1");
    let all = format!("{},{},{}", addr(0), addr(1), addr(2));
    eventually(60, "an acks=sync append", || {
        let out = env.cli(
            &[
                "append", "--server", &all, "--log", "demo", "--acks", "sync",
            ],
            "before\n",
        );
        out.status.success().then_some(())
    });
    // node-1's process dies: status on the others shows another node leading in a new epoch.
    // SAFETY: kill(2) on a node process started by the dev command under test.
    unsafe {
        libc::kill(
            nodes[0]["pid"].as_u64().unwrap() as libc::pid_t,
            libc::SIGKILL,
        );
    }
    let (leader, after) = eventually(60, "a failover in status", || {
        log_view(1).filter(|(l, _)| l != "node-1")
    });
    assert!(after > epoch && leader != "node-1", "{leader} {after}");
    let text = env.cli_ok(&["status", "--server", &addr(2)], "");
    assert!(
        text.contains(&format!("demo\tepoch={after}\tleader={leader}")),
        "{text}"
    );
    // Writes go on through the new leader.
    eventually(60, "an append after the failover", || {
        let out = env.cli(
            &[
                "append", "--server", &all, "--log", "demo", "--acks", "sync",
            ],
            "after\n",
        );
        out.status.success().then_some(())
    });
    assert!(dev.stop().success());
}

/// `replog dev` whose output nobody reads (its reader went away) keeps supervising its nodes,
/// and its nodes never outlive it, even when it is killed outright.
#[test]
fn dev_survives_a_closed_stdout_and_its_nodes_die_with_it() {
    let env = Env::new();
    let base = free_base_port();
    let mut dev = std::process::Command::new(BIN)
        .args([
            "dev",
            "--base-port",
            &base.to_string(),
            "--metrics-base-port",
            "0",
            "--dir",
        ])
        .arg(env.path("cluster"))
        .env("REPLOG_DEV_CA_DIR", env.ca_dir())
        .env("REPLOG_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody will read what it prints.
    drop(dev.stdout.take());
    let server = format!("127.0.0.1:{base}");
    let serving = |server: &str| {
        env.cli(&["status", "--server", server], "")
            .status
            .success()
    };
    eventually(60, "the nodes to serve", || serving(&server).then_some(()));
    // It has printed (into a closed pipe) by now, and still supervises.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(dev.try_wait().unwrap().is_none(), "replog dev ended");
    dev.kill().unwrap();
    dev.wait().unwrap();
    for port in base..base + 3 {
        let server = format!("127.0.0.1:{port}");
        eventually(60, "the nodes to end with replog dev", || {
            (!serving(&server)).then_some(())
        });
    }
}
