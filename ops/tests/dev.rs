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
    let nodes: Vec<serde_json::Value> = (0..3)
        .map(|_| serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap())
        .collect();
    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| n["pid"].as_u64().unwrap() as u32)
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["node"], format!("node-{}", i + 1));
        let addr = n["addr"].as_str().unwrap();
        let status = env.cli_json(&["status", "--server", addr, "--json"], "");
        assert_eq!(status[0]["node_id"], format!("node-{}", i + 1));
        assert!(env
            .path("cluster")
            .join(format!("node-{}", i + 1))
            .join("node-id")
            .exists());
    }
    // Each node is its own process: killing one leaves the others serving.
    // SAFETY: kill(2) on a node process started by the dev command under test.
    unsafe {
        libc::kill(pids[0] as libc::pid_t, libc::SIGKILL);
    }
    let addr = nodes[1]["addr"].as_str().unwrap();
    env.cli_ok(&["create", "--server", addr, "--log", "still-up"], "");
    // SIGTERM to dev stops every node it started.
    // SAFETY: kill(2) on the dev process this test started.
    unsafe {
        libc::kill(dev.id() as libc::pid_t, libc::SIGTERM);
    }
    assert!(dev.wait().unwrap().success());
    for pid in &pids[1..] {
        assert!(!alive(*pid), "node {pid} outlived replog dev");
    }
}
