//! Helpers shared by the integration tests.
#![allow(dead_code)]

use log_core::{Epoch, Log, LogConfig, Offset};

/// Small segments so that tests cross segment boundaries often: a new log's first segment is
/// 4 KiB, later ones follow the write rate up to 16 KiB.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 * 1024,
        segment_initial_bytes: 4096,
        segment_lookahead: log_core::SEGMENT_LOOKAHEAD,
        index_interval_bytes: 512,
        batch_bytes_max: 4096,
        batch_records_max: 64,
        pending_bytes_max: 1 << 20,
    }
}

/// Deterministic payload for record `offset` of run `seed`.
pub fn payload(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ offset.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every record from `from` to the end, as (offset, value).
pub fn read_all(log: &Log, from: Offset) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let r = log.read(at, Offset(u64::MAX), 64 * 1024).unwrap();
        if r.batches.is_empty() {
            return out;
        }
        for b in &r.batches {
            for rec in b.view().records() {
                if rec.offset >= from {
                    out.push((rec.offset.0, rec.value.to_vec()));
                }
            }
        }
        at = r.next_offset;
    }
}

/// Append `n` single-record batches of `len` bytes with payload(seed, offset) and flush them.
pub async fn append_n(log: &Log, seed: u64, n: usize, len: usize) -> Offset {
    let mut last = log.next_offset();
    for _ in 0..n {
        let at = log.next_offset().0;
        last = log
            .append(Epoch(1), &[payload(seed, at, len)])
            .await
            .unwrap()
            .next;
    }
    log.wait_flushed(last).await.unwrap();
    last
}

/// The `.log` files of a log directory, in offset order, as (base offset, file length).
pub fn segment_files(dir: &std::path::Path) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| {
            let base = p.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            (base, std::fs::metadata(&p).unwrap().len())
        })
        .collect();
    v.sort();
    v
}
