//! `replog dev`: node processes on loopback, supervised until SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn dev_starts_three_nodes_and_stops_them_all() {
    let env = Env::new();
    let mut dev = Command::new(BIN)
        .args([
            "dev",
            "--base-port",
            "0",
            "--metrics-base-port",
            "0",
            "--json",
            "--dir",
        ])
        .arg(env.path("cluster"))
        .env("REPLOG_DEV_CA_DIR", env.ca_dir())
        .env("REPLOG_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    // If the test fails, its dev process (and so its nodes) must not outlive it.
    struct Stop(Option<u32>);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                // SAFETY: kill(2) on the dev process this test started and has not reaped.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
    }
    let mut stop = Stop(Some(dev.id()));
    let nodes: Vec<serde_json::Value> = (0..3)
        .map(|_| serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap())
        .collect();
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
    // SAFETY: kill(2) on the dev process this test started.
    unsafe {
        libc::kill(dev.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = dev.wait().unwrap();
    stop.0 = None;
    assert!(status.success());
    for pid in &pids[..2] {
        assert!(!alive(*pid), "node {pid} outlived replog dev");
    }
}
