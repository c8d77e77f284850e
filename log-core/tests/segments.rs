//! Segment sizes: a new log costs one `segment_initial_bytes` segment and nothing more; later
//! segments are sized by the write rate up to `segment_bytes_max`; a batch larger than the
//! segment prepared for it still goes in; many small segments read, retain and recover like a
//! few big ones.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::{append_n, payload, read_all, segment_files};
use log_core::{Epoch, Log, LogConfig, Offset, RetentionPolicy, Store};

const KIB: u64 = 1024;

/// 4 KiB first segments, up to `max`; batches up to `batch` bytes.
fn config(max: u64, batch: usize, lookahead: Duration) -> LogConfig {
    LogConfig {
        segment_bytes_max: max,
        segment_initial_bytes: 4 * KIB,
        segment_lookahead: lookahead,
        index_interval_bytes: 1024,
        batch_bytes_max: batch,
        batch_records_max: 64,
        pending_bytes_max: 1 << 20,
    }
}

/// (apparent bytes, allocated bytes, names) of every file under `dir`, recursively.
fn usage(dir: &Path) -> (u64, u64, Vec<String>) {
    let (mut len, mut alloc, mut names) = (0, 0, Vec::new());
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            let (l, a, n) = usage(&e.path());
            len += l;
            alloc += a;
            names.extend(n);
        } else {
            len += m.len();
            alloc += m.blocks() * 512;
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    (len, alloc, names)
}

/// Let background work (a segment preparation, if one were started) run.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[test]
fn an_empty_log_costs_one_initial_segment() {
    let dir = tempfile::tempdir().unwrap();
    let initial = LogConfig::default().segment_initial_bytes;
    assert_eq!(initial, 1 << 20);
    tokio_uring::start(async {
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        settle().await;
        let (len, _, names) = usage(dir.path());
        assert_eq!(segment_files(dir.path()), vec![(0, initial)]);
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
        // The segment, a 12-byte manifest and an empty lock file.
        assert!(len <= initial + 4 * KIB, "{len} bytes: {names:?}");
        assert_eq!(log.disk_bytes(), initial);
        // Writes below half the segment prepare nothing either.
        append_n(&log, 1, 100, 1000).await;
        settle().await;
        assert!(log.disk_bytes() == initial && segment_files(dir.path()).len() == 1);
        assert!(!usage(dir.path()).2.iter().any(|n| n.ends_with(".tmp")));
        log.close().await.unwrap();

        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        assert_eq!(log.recovery_report().active_extended, None);
        assert_eq!(log.disk_bytes(), initial);
        assert_eq!(read_all(&log, Offset(0)).len(), 100);
        log.close().await.unwrap();
    });
}

/// 1,000 open, empty logs in one data directory take about 1,000 initial segments of disk
/// (with the defaults, 1 GiB rather than 128 GiB).
#[test]
fn a_thousand_empty_logs_fit_in_a_small_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        KIB * KIB,
        64 * KIB as usize,
        LogConfig::default().segment_lookahead,
    );
    let initial = cfg.segment_initial_bytes;
    tokio_uring::start(async {
        let mut store = Store::open(dir.path(), cfg).await.unwrap();
        for i in 0..1000 {
            store.create_log(&format!("log-{i:04}")).await.unwrap();
        }
        settle().await;
        let (len, alloc, names) = usage(dir.path());
        assert_eq!(names.iter().filter(|n| n.ends_with(".log")).count(), 1000);
        assert!(!names.iter().any(|n| n.ends_with(".tmp")));
        // Per log: the segment, a 12-byte manifest, an empty lock file; allocated, a block for
        // the manifest too.
        assert!(len <= 1000 * (initial + 64), "{len} bytes");
        assert!(
            alloc <= 1000 * (initial + 8 * KIB),
            "{alloc} bytes allocated"
        );
        let disk: u64 = store
            .names()
            .map(|n| store.get(n).unwrap().disk_bytes())
            .sum();
        assert_eq!(disk, 1000 * initial);
        store.close().await.unwrap();
    });
}

/// A log written fast gets bigger segments, roll after roll, up to segment_bytes_max; every record reads back across the segments of different sizes.
#[test]
fn segments_grow_with_the_write_rate() {
    let dir = tempfile::tempdir().unwrap();
    let max = 256 * KIB;
    let cfg = config(
        max,
        16 * KIB as usize,
        LogConfig::default().segment_lookahead,
    );
    tokio_uring::start(async {
        let log = Log::open(dir.path(), cfg.clone()).await.unwrap();
        // About 1 MiB as fast as the log takes it: well over 12 KiB a second, the rate at which
        // ten seconds of writes fill a 128 KiB segment.
        let end = append_n(&log, 3, 1000, 1000).await;
        let files = segment_files(dir.path());
        assert_eq!(
            files[0],
            (0, 4 * KIB),
            "the first segment is the initial size"
        );
        for (base, len) in &files {
            assert!(
                len.is_power_of_two() && (4 * KIB..=max).contains(len),
                "segment {base}: {len}"
            );
        }
        // 4, 32, 256, 256.. KiB: each size from the rate the one before was filled at, measured
        // over at least a second.
        assert!(files.windows(2).all(|w| w[0].1 <= w[1].1), "{files:?}");
        assert!(files[1].1 > files[0].1, "{files:?}");
        let reached = files.iter().position(|f| f.1 == max);
        assert!(
            reached.is_some_and(|i| i <= 3),
            "segment_bytes_max reached after a few rolls: {files:?}"
        );
        assert_eq!(
            log.disk_bytes(),
            files.iter().map(|f| f.1).sum::<u64>(),
            "{files:?}"
        );
        let got = read_all(&log, Offset(0));
        assert_eq!(got.len() as u64, end.0);
        for (o, v) in &got {
            assert_eq!(v, &payload(3, *o, 1000));
        }
        log.close().await.unwrap();
        let log = Log::open(dir.path(), cfg).await.unwrap();
        assert_eq!(
            segment_files(dir.path()),
            files,
            "reopening changes no size"
        );
        assert_eq!(read_all(&log, Offset(0)).len() as u64, end.0);
        log.close().await.unwrap();
    });
}

/// A log written slowly keeps small segments: its rate times the lookahead stays under the
/// initial size. (Sleeps make the rate an upper bound: at most one 352-byte batch per 20 ms.)
#[test]
fn a_slow_log_keeps_small_segments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(256 * KIB, 4 * KIB as usize, Duration::from_millis(100));
    tokio_uring::start(async {
        let log = Log::open(dir.path(), cfg).await.unwrap();
        for i in 0..40u64 {
            let a = log.append(Epoch(1), &[payload(4, i, 300)]).await.unwrap();
            log.wait_flushed(a.next).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let files = segment_files(dir.path());
        assert!(files.len() >= 3, "{files:?}");
        assert!(files.iter().all(|f| f.1 == 4 * KIB), "{files:?}");
        assert_eq!(read_all(&log, Offset(0)).len(), 40);
        log.close().await.unwrap();
    });
}

/// A batch larger than the segment it would go into gets a segment of sufficient size: in a new
/// log (the empty first segment is replaced), at a roll whose prepared segment is too small
/// (it is filled again at a size that fits), and in a segment left empty by a truncation.
#[test]
fn a_batch_larger_than_the_prepared_segment_is_written() {
    let dir = tempfile::tempdir().unwrap();
    // No lookahead: every prepared segment has the initial size, unless a batch needs more.
    let cfg = config(KIB * KIB, 256 * KIB as usize, Duration::ZERO);
    let big = |n: usize| vec![n as u8; n];
    tokio_uring::start(async {
        let log = Log::open(dir.path(), cfg.clone()).await.unwrap();
        // Into the empty 4 KiB first segment: replaced by a 128 KiB one, still at offset 0.
        let a = log.append(Epoch(1), &[big(100_000)]).await.unwrap();
        log.wait_flushed(a.next).await.unwrap();
        assert_eq!(segment_files(dir.path()), vec![(0, 128 * KIB)]);
        // The segment is past half full, so a 4 KiB segment is being prepared in the
        // background. A batch that needs 128 KiB: the roll fills one of that size instead.
        settle().await;
        let b = log.append(Epoch(1), &[big(120_000)]).await.unwrap();
        log.wait_flushed(b.next).await.unwrap();
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(files[1], (1, 128 * KIB));
        // Small batches after it: the roll uses the prepared 4 KiB segment.
        let c = append_n(&log, 5, 300, 1000).await;
        let files = segment_files(dir.path());
        assert!(files[2..].iter().all(|f| f.1 == 4 * KIB), "{files:?}");
        let check = |log: &Log| {
            let got = read_all(log, Offset(0));
            assert_eq!(got.len() as u64, c.0);
            assert_eq!(got[0].1, big(100_000));
            assert_eq!(got[b.first.0 as usize].1, big(120_000));
            for (o, v) in &got[b.next.0 as usize..] {
                assert_eq!(v, &payload(5, *o, 1000));
            }
        };
        check(&log);
        log.close().await.unwrap();
        let log = Log::open(dir.path(), cfg.clone()).await.unwrap();
        check(&log);
        // Truncated to nothing: the first segment is active and empty again, and too small.
        log.truncate_after(Offset(0)).await.unwrap();
        let d = log.append(Epoch(2), &[big(200_000)]).await.unwrap();
        log.wait_flushed(d.next).await.unwrap();
        assert_eq!(segment_files(dir.path()), vec![(0, 256 * KIB)]);
        log.close().await.unwrap();
        let log = Log::open(dir.path(), cfg).await.unwrap();
        assert_eq!(read_all(&log, Offset(0)), vec![(0, big(200_000))]);
        log.close().await.unwrap();
    });
    assert!(!usage(dir.path()).2.iter().any(|n| n.ends_with(".tmp")));
}

/// Hundreds of 4 KiB segments: reads, bytes_from, retention by size and reopening all work
/// across them.
#[test]
fn many_small_segments_read_retain_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(64 * KIB, 4 * KIB as usize, Duration::ZERO);
    let len = |o: u64| 1 + (o * 37 % 1200) as usize;
    tokio_uring::start(async {
        let log = Log::open(dir.path(), cfg.clone()).await.unwrap();
        let mut next = Offset(0);
        for o in 0..2000u64 {
            // Some batches of several records, most of one.
            let n = if o % 10 == 0 { 3 } else { 1 };
            if next.0 > o {
                continue;
            }
            let records: Vec<Vec<u8>> = (o..o + n).map(|o| payload(6, o, len(o))).collect();
            next = log.append(Epoch(1), &records).await.unwrap().next;
        }
        log.wait_flushed(next).await.unwrap();
        let segments = log.segment_count();
        assert!(segments > 200, "{segments} segments");
        assert!(segment_files(dir.path()).iter().all(|f| f.1 == 4 * KIB));
        let check = |log: &Log, from: u64| {
            let got = read_all(log, Offset(from));
            assert_eq!(got.len() as u64, next.0 - from);
            for (o, v) in &got {
                assert_eq!(v, &payload(6, *o, len(*o)), "offset {o}");
            }
        };
        check(&log, 0);
        check(&log, 1234);
        // One read spanning many segments returns every batch in between.
        let r = log.read(Offset(100), next, usize::MAX).unwrap();
        assert_eq!(r.next_offset, next);
        assert_eq!(r.bytes() as u64, log.bytes_from(Offset(100)).unwrap());
        log.close().await.unwrap();

        let log = Log::open(dir.path(), cfg.clone()).await.unwrap();
        assert_eq!(log.segment_count(), segments);
        assert!(log.recovery_report().indexes_rebuilt.is_empty());
        check(&log, 0);
        // Retention by size counts the small files as they are.
        let start = log
            .apply_retention(
                &RetentionPolicy {
                    bytes_max: Some(64 * KIB),
                    age_max: None,
                },
                0,
            )
            .unwrap();
        assert_eq!(log.disk_bytes(), 64 * KIB);
        assert_eq!(segment_files(dir.path()).len(), 16);
        assert_eq!(log.start_offset(), start);
        check(&log, start.0);
        log.close().await.unwrap();
        let log = Log::open(dir.path(), cfg).await.unwrap();
        assert_eq!(log.start_offset(), start);
        check(&log, start.0);
        log.close().await.unwrap();
    });
}

/// Reopening a log whose active segment is small keeps its data and its size, and appends go on
/// into the same file before rolling.
#[test]
fn reopened_small_active_segment_keeps_data_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        64 * KIB,
        4 * KIB as usize,
        LogConfig::default().segment_lookahead,
    );
    tokio_uring::start(async {
        let log = Log::open(dir.path(), cfg.clone()).await.unwrap();
        let first = append_n(&log, 8, 5, 300).await;
        log.close().await.unwrap();
        for round in 0..3u64 {
            let log = Log::open(dir.path(), cfg.clone()).await.unwrap();
            let report = log.recovery_report();
            assert!(report.active_extended.is_none() && report.torn_tail.is_none());
            assert_eq!(segment_files(dir.path()), vec![(0, 4 * KIB)]);
            assert_eq!(log.end_offset(), Offset(first.0 + round));
            let record = payload(8, first.0 + round, 300);
            let a = log.append(Epoch(1), &[record]).await.unwrap();
            log.wait_flushed(a.next).await.unwrap();
            assert_eq!(log.segment_count(), 1, "still the same segment");
            log.close().await.unwrap();
        }
        let log = Log::open(dir.path(), cfg).await.unwrap();
        let end = append_n(&log, 8, 20, 300).await;
        assert!(log.segment_count() > 1);
        assert_eq!(segment_files(dir.path())[0], (0, 4 * KIB));
        let got = read_all(&log, Offset(0));
        assert_eq!(got.len() as u64, end.0);
        for (o, v) in got {
            assert_eq!(v, payload(8, o, 300));
        }
        log.close().await.unwrap();
    });
}
