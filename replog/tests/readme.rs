//! README.md's quick start, run as written: the commands are read out of README itself, so the
//! two cannot drift apart. `replog dev` runs on its default ports (QUIC 7001-7003, metrics
//! 9101-9103), in a temporary working directory; no other test of this binary uses them.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The shell blocks of README.md, in order.
fn readme_blocks() -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(b), _) => b.push(line.to_string()),
            (None, _) => {}
        }
    }
    blocks
}

/// The commands of a block: comment lines and trailing comments dropped.
fn commands(block: &[String]) -> Vec<String> {
    block
        .iter()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| match l.find("  #") {
            Some(i) => l[..i].trim_end().to_string(),
            None => l.trim_end().to_string(),
        })
        .collect()
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn the_quick_start_runs_as_written() {
    let blocks = readme_blocks();
    // The first block starts the cluster; the second is the quick start against it.
    let run = commands(&blocks[0]);
    assert_eq!(run.len(), 1, "{run:?}");
    // The binary's package: `cargo run` must build the `replog` binary.
    assert!(
        run[0].starts_with("cargo run --release -p replog "),
        "{run:?}"
    );
    let dev_args: Vec<&str> = run[0]
        .split_once(" -- ")
        .expect("cargo run ... -- dev")
        .1
        .split_whitespace()
        .collect();
    assert_eq!(dev_args, ["dev"]);
    let quick = commands(&blocks[1]);
    assert!(quick[0].starts_with("replog create "), "{quick:?}");

    let env = Env::new();
    let cwd = env.path("work");
    std::fs::create_dir_all(&cwd).unwrap();
    let bin_dir = std::path::Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut dev = Command::new(BIN)
        .args(&dev_args)
        .current_dir(&cwd)
        .env("REPLOG_DEV_CA_DIR", env.ca_dir())
        .env("REPLOG_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the dev process this test started.
            unsafe {
                libc::kill(self.0 as libc::pid_t, libc::SIGINT);
            }
        }
    }
    let stop = Stop(dev.id());
    // dev prints one line per node once each serves.
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        let line = lines.next().unwrap().unwrap();
        assert!(line.contains("node-"), "{line}");
    }
    // The rest of what it prints is read as a terminal would.
    std::thread::spawn(move || lines.for_each(drop));
    assert!(cwd.join("replog-dev/node-1").is_dir());

    let shell = |cmd: &str| {
        let mut c = Command::new("bash");
        c.args(["-c", cmd])
            .current_dir(&cwd)
            .env("PATH", &path)
            .env("REPLOG_DEV_CA_DIR", env.ca_dir())
            .env_remove("REPLOG_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    for cmd in &quick {
        let mut words = cmd.split_whitespace().skip_while(|w| *w != "replog");
        let verb = words.nth(1).expect("a replog command");
        if verb == "tail" {
            // Follows the log until interrupted: read what it prints, then stop it.
            let mut child = shell(cmd).spawn().unwrap();
            let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
            let got: Vec<String> = (0..2).map(|_| out.next().unwrap().unwrap()).collect();
            assert_eq!(got, ["hello", "world"], "{cmd}");
            child.kill().unwrap();
            child.wait().unwrap();
            continue;
        }
        let out = shell(cmd).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "{cmd}: {}\n{stdout}\n{stderr}",
            out.status
        );
        match verb {
            "create" => assert_eq!(stdout, "created log demo\n"),
            "append" => {
                let receipts = json_lines(&out.stdout);
                assert_eq!(receipts.len(), 2, "{stdout}");
                for (i, r) in receipts.iter().enumerate() {
                    assert_eq!(r["offset"], i as u64, "{r}");
                    assert_eq!(r["level"], "sync", "{r}");
                    assert_eq!(r["holders"][0], "node-1", "{r}");
                    assert!(r["replicas"].as_u64() >= Some(2), "{r}");
                }
            }
            "read" => {
                let values: Vec<Value> = json_lines(&out.stdout)
                    .iter()
                    .map(|r| r["value"].clone())
                    .collect();
                assert_eq!(values, ["hello", "world"], "{stdout}");
            }
            "status" => {
                for n in ["node-1", "node-2", "node-3"] {
                    assert!(stdout.contains(n), "{stdout}");
                }
                assert!(!stdout.contains("address unknown"), "{stdout}");
            }
            "verify" => assert!(!stdout.is_empty()),
            other => panic!("README's quick start has a command this test does not know: {other}"),
        }
    }
    // README: "Ctrl-C stops them all".
    drop(stop);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while dev.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "replog dev did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
