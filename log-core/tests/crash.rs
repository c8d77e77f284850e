//! Crash test with real processes: a child process appends from several tasks and prints each
//! range once it is flushed; the parent kills it with SIGKILL at a random moment, reopens the
//! log, and checks that every printed record is present with the same bytes. The child is this
//! same test binary, re-run with `CRASH_CHILD_DIR` set.
//!
//! Rounds: `CRASH_ROUNDS` (default 50). A failure prints the round's seed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::payload;
use log_core::{Epoch, Log, LogConfig, Offset};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 256 * 1024,
        segment_initial_bytes: 16 * 1024,
        segment_lookahead: log_core::SEGMENT_LOOKAHEAD,
        index_interval_bytes: 4096,
        batch_bytes_max: 16 * 1024,
        batch_records_max: 64,
        pending_bytes_max: 1 << 20,
    }
}

/// The bytes every run stores at `offset`: the same whichever process or round writes it, so a
/// re-append after a cut tail must reproduce them exactly.
fn value(offset: u64) -> Vec<u8> {
    payload(77, offset, 1 + (offset % 700) as usize)
}

#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("CRASH_CHILD_DIR") else {
        return; // Only does something when run as the child.
    };
    tokio_uring::start(async move {
        let log = Log::open(&dir, config()).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let log = log.clone();
            tasks.push(tokio_uring::spawn(async move {
                let mut i = 0u64;
                loop {
                    // Offsets are assigned at append, so the values are computed from them: one
                    // record per batch, or a few, depending on the task.
                    let count = 1 + (t + i) % 4;
                    let first = log.next_offset().0;
                    let records: Vec<Vec<u8>> = (first..first + count).map(value).collect();
                    let a = log.append(Epoch(1), &records).await.unwrap();
                    assert_eq!(a.first.0, first);
                    log.wait_flushed(a.next).await.unwrap();
                    println!("flushed {} {}", a.first.0, a.next.0);
                    i += 1;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn sigkill_never_loses_a_flushed_record() {
    if std::env::var("CRASH_CHILD_DIR").is_ok() {
        return;
    }
    let rounds: u64 = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut total_flushed = 0u64;
    for round in 0..rounds {
        let seed = 0xC0FFEE ^ round;
        let delay_ms = 20 + (seed.wrapping_mul(2654435761) % 280);
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("CRASH_CHILD_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut ranges = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.split_whitespace();
                if parts.next() != Some("flushed") {
                    continue;
                }
                let (Some(a), Some(b)) = (parts.next(), parts.next()) else {
                    continue;
                };
                if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                    ranges.push((a, b));
                }
            }
            ranges
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let ranges = reader.join().unwrap();
        total_flushed += ranges.iter().map(|(a, b)| b - a).sum::<u64>();
        let max_printed = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        tokio_uring::start(async {
            let log = Log::open(dir.path(), config())
                .await
                .unwrap_or_else(|e| panic!("round {round} seed {seed:#x}: reopen failed: {e}"));
            let end = log.end_offset().0;
            assert!(
                end >= max_printed,
                "round {round} seed {seed:#x}: log ends at {end} but {max_printed} was reported flushed"
            );
            // Every stored record, printed or not, has exactly the bytes that were appended.
            let all = common::read_all(&log, Offset(0));
            assert_eq!(all.len() as u64, end, "round {round}: dense offsets");
            for (o, v) in &all {
                assert_eq!(v, &value(*o), "round {round} seed {seed:#x}: offset {o}");
            }
            log.close().await.unwrap();
        });
    }
    eprintln!("{rounds} SIGKILL rounds, {total_flushed} records reported flushed, none lost");
    assert!(total_flushed > 0, "the child never flushed anything");
}
