//! Black-box tests of a log on real files: append, flush, read, roll, truncate, retention,
//! limits, locking and fatal I/O errors.

mod common;

use std::num::NonZeroU64;
use std::time::Duration;

use common::{append_n, payload, read_all, segment_files, small_config};
use log_core::batch::BatchError;
use log_core::{Epoch, Error, Log, LogConfig, Offset, ProducerMeta, RetentionPolicy, Store};

#[test]
fn append_flush_read_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(log.next_offset(), Offset(0));
        let a = log
            .try_append(Epoch(1), &[b"one".as_slice(), b"two"])
            .unwrap();
        assert_eq!((a.first, a.next), (Offset(0), Offset(2)));
        let b = log.try_append(Epoch(1), &[b"three"]).unwrap();
        assert_eq!(b.first, Offset(2));
        log.wait_written(b.next).await.unwrap();
        assert_eq!(log.end_offset(), Offset(3));
        log.wait_flushed(b.next).await.unwrap();
        assert_eq!(log.flush_offset(), Offset(3));
        let got = read_all(&log, Offset(1));
        assert_eq!(got, vec![(1, b"two".to_vec()), (2, b"three".to_vec())]);
        log.close().await.unwrap();

        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(log.end_offset(), Offset(3));
        assert_eq!(log.flush_offset(), Offset(3));
        assert_eq!(read_all(&log, Offset(0)).len(), 3);
        assert!(log.recovery_report().torn_tail.is_none());
        log.close().await.unwrap();
    });
}

#[test]
fn each_write_keeps_when_it_was_submitted_and_completed() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let before = std::time::Instant::now();
        // One write per append: each waits for the one before it.
        let mut ends = Vec::new();
        for i in 0..(log_core::WRITE_TIMES_KEPT + 6) {
            let a = log
                .try_append(Epoch(1), &[format!("r{i}").as_bytes(), b"x"])
                .unwrap();
            log.wait_written(a.next).await.unwrap();
            ends.push(a.next);
        }
        let last = *ends.last().unwrap();
        let w = log.write_times(last).expect("the latest write is kept");
        assert_eq!(w.end, last);
        assert!(before <= w.submitted && w.submitted <= w.written);
        // A record in the middle of the latest write's range belongs to it as well.
        assert_eq!(log.write_times(Offset(last.0 - 1)).unwrap().end, last);
        // The oldest writes are forgotten, never answered with a later write's times.
        assert_eq!(log.write_times(ends[0]), None);
        let kept = ends[ends.len() - log_core::WRITE_TIMES_KEPT + 1];
        assert_eq!(log.write_times(kept).unwrap().end, kept);
        // After a truncation the offsets are written again, and timed again.
        let cut = ends[ends.len() - 3];
        log.truncate_after(cut).await.unwrap();
        let a = log.try_append(Epoch(2), &[b"again".as_slice()]).unwrap();
        log.wait_written(a.next).await.unwrap();
        let again = log.write_times(a.next).unwrap();
        assert_eq!(again.end, a.next);
        assert!(again.submitted >= w.written);
        log.close().await.unwrap();
    });
}

/// The stored bytes of the batches from `from` to `until`.
fn stored(log: &Log, from: Offset, until: Offset) -> Vec<u8> {
    let read = log.read(from, until, 1 << 30).unwrap();
    assert_eq!(read.next_offset, until);
    read.batches.iter().flat_map(|b| b.to_vec()).collect()
}

#[test]
fn the_write_under_way_is_readable_from_memory_as_it_will_be_stored() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(log.taken_offset(), Offset(0));
        assert!(log.read_unwritten(Offset(0), 1 << 20).is_none());
        let mut seen_in_memory = 0;
        for round in 0..200u64 {
            // Three batches queued at once: the writer takes them together.
            let a = log
                .try_append(Epoch(1), &[format!("a{round}").as_bytes(), b"x"])
                .unwrap();
            let b = log
                .try_append(Epoch(1), &[format!("b{round}").as_bytes()])
                .unwrap();
            let c = log
                .try_append(Epoch(1), &[b"c".as_slice(), b"cc", b"ccc"])
                .unwrap();
            log.wait_taken_past(a.first).await.unwrap();
            assert!(log.taken_offset() >= c.next);
            let early = log.read_unwritten(a.first, 1 << 20);
            // Not a batch start, and a batch start with room for one batch only.
            let mid = log.read_unwritten(Offset(a.first.0 + 1), 1 << 20);
            let one = log.read_unwritten(b.first, 1);
            log.wait_written(c.next).await.unwrap();
            let Some((bytes, next)) = early else {
                // The write had completed by then: nothing is left in memory.
                assert!(log.end_offset() >= c.next);
                continue;
            };
            seen_in_memory += 1;
            assert_eq!(next, c.next);
            assert_eq!(
                bytes.to_vec(),
                stored(&log, a.first, c.next),
                "round {round}"
            );
            assert!(mid.is_none());
            let (one, after) = one.expect("the write is still under way");
            assert_eq!(after, c.first);
            assert_eq!(one.to_vec(), stored(&log, b.first, c.first));
        }
        assert!(
            seen_in_memory > 0,
            "the writer's batches were never seen in memory"
        );
        // Once written, the segments have it and memory does not.
        let end = log.end_offset();
        assert_eq!(log.taken_offset(), end);
        assert!(log.read_unwritten(Offset(end.0 - 1), 1 << 20).is_none());
        // Waiting past the end waits for the next append; closing ends the wait.
        let waiting = log.clone();
        let wait = tokio_uring::spawn(async move { waiting.wait_taken_past(end).await });
        let d = log.try_append(Epoch(1), &[b"d".as_slice()]).unwrap();
        wait.await.unwrap().unwrap();
        log.wait_written(d.next).await.unwrap();
        let waiting = log.clone();
        let wait = tokio_uring::spawn(async move { waiting.wait_taken_past(d.next).await });
        tokio::task::yield_now().await;
        log.close().await.unwrap();
        assert!(matches!(wait.await.unwrap(), Err(Error::Closed)));
    });
}

#[test]
fn rolls_segments_and_reads_across_them() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let end = append_n(&log, 7, 300, 200).await;
        assert!(log.segment_count() >= 4, "{} segments", log.segment_count());
        let got = read_all(&log, Offset(0));
        assert_eq!(got.len(), 300);
        for (o, v) in &got {
            assert_eq!(v, &payload(7, *o, 200));
        }
        // A bounded read returns whole batches only, at least one.
        let r = log.read(Offset(10), end, 1).unwrap();
        assert_eq!(r.batches.len(), 1);
        assert_eq!(r.next_offset, Offset(11));
        // `until` caps what is returned.
        let r = log.read(Offset(0), Offset(5), usize::MAX).unwrap();
        assert_eq!(r.next_offset, Offset(5));
        let segments = log.segment_count();
        // disk_bytes counts the segment files, whatever their sizes.
        let files = segment_files(dir.path());
        assert_eq!(files.len(), segments);
        assert_eq!(log.disk_bytes(), files.iter().map(|f| f.1).sum::<u64>());
        log.close().await.unwrap();

        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(log.segment_count(), segments);
        assert_eq!(read_all(&log, Offset(123))[0].1, payload(7, 123, 200));
        log.close().await.unwrap();
    });
    // Sealed segments have index files. The first segment has segment_initial_bytes, later
    // ones a size between that and segment_bytes_max, in whole 4 KiB. A closed log leaves no
    // prepared segment behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(".idx")));
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    let files = segment_files(dir.path());
    assert_eq!(files[0], (0, 4096));
    for (base, len) in files {
        assert!(
            (4096..=16 * 1024).contains(&len) && len % 4096 == 0,
            "segment {base}: {len} bytes"
        );
    }
}

#[test]
fn group_commit_covers_concurrent_appenders() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let log = log.clone();
            tasks.push(tokio_uring::spawn(async move {
                for i in 0..20u64 {
                    let a = log.append(Epoch(1), &[payload(t, i, 100)]).await.unwrap();
                    log.wait_flushed(a.next).await.unwrap();
                    assert!(log.flush_offset() >= a.next);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(log.flush_offset(), Offset(640));
        assert_eq!(read_all(&log, Offset(0)).len(), 640);
        log.close().await.unwrap();
    });
}

#[test]
fn verbatim_batches_from_another_log() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let leader = Log::open(a.path(), small_config()).await.unwrap();
        append_n(&leader, 3, 50, 100).await;
        let follower = Log::open(b.path(), small_config()).await.unwrap();
        let r = leader
            .read(Offset(0), Offset(u64::MAX), usize::MAX)
            .unwrap();
        for batch in &r.batches {
            follower.try_append_batch(batch).unwrap();
        }
        follower.wait_flushed(Offset(50)).await.unwrap();
        let fr = follower
            .read(Offset(0), Offset(u64::MAX), usize::MAX)
            .unwrap();
        let lb: Vec<u8> = r.batches.iter().flat_map(|b| b.to_vec()).collect();
        let fb: Vec<u8> = fr.batches.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(lb, fb, "byte-identical copies");
        // Out-of-order and damaged batches are refused and change nothing.
        let first = r.batches[0].to_vec();
        assert!(matches!(
            follower.try_append_batch(&first),
            Err(Error::UnexpectedOffset {
                expected: Offset(50),
                found: Offset(0)
            })
        ));
        let mut bad = log_core::batch::encode(Offset(50), Epoch(1), 0, &[b"x"]);
        bad[50] ^= 1;
        assert!(matches!(
            follower.try_append_batch(&bad),
            Err(Error::InvalidBatch(_))
        ));
        let stale = log_core::batch::encode(Offset(50), Epoch(0), 0, &[b"x"]);
        assert!(matches!(
            follower.try_append_batch(&stale),
            Err(Error::StaleEpoch { .. })
        ));
        assert_eq!(follower.next_offset(), Offset(50));
        leader.close().await.unwrap();
        follower.close().await.unwrap();
    });
}

fn producer(id: u64, first_sequence: u64) -> ProducerMeta {
    ProducerMeta {
        producer_id: NonZeroU64::new(id).unwrap(),
        first_sequence,
    }
}

/// Every batch from offset 0 on, as (base offset, producer metadata, record values).
type BatchSummary = (u64, Option<ProducerMeta>, Vec<Vec<u8>>);

fn batches(log: &Log) -> Vec<BatchSummary> {
    let r = log.read(Offset(0), Offset(u64::MAX), usize::MAX).unwrap();
    r.batches
        .iter()
        .map(|b| {
            let v = b.view();
            let values = v.records().map(|r| r.value.to_vec()).collect();
            (v.header().base_offset().0, v.producer(), values)
        })
        .collect()
}

#[test]
fn producer_metadata_survives_reopen_and_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let mut expected: Vec<BatchSummary> = Vec::new();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        // Batches with and without producer metadata, enough of them to roll segments.
        for i in 0..80u64 {
            let at = log.next_offset().0;
            let records = vec![payload(5, at, 200), payload(5, at + 1, 200)];
            let meta = (i % 3 != 2).then(|| producer(1 + i % 4, 10 * i));
            let a = if i % 2 == 0 {
                log.try_append_producer(Epoch(1), meta, &records).unwrap()
            } else {
                log.try_append_producer_at(Epoch(1), 1_000 + i, meta, &records)
                    .unwrap()
            };
            assert_eq!((a.first, a.next), (Offset(at), Offset(at + 2)));
            expected.push((at, meta, records));
            log.wait_written(a.next).await.unwrap();
        }
        let a = log.try_append(Epoch(1), &[b"plain"]).unwrap();
        expected.push((a.first.0, None, vec![b"plain".to_vec()]));
        log.wait_flushed(a.next).await.unwrap();
        assert!(log.segment_count() > 2, "{} segments", log.segment_count());
        assert_eq!(batches(&log), expected);

        // Refused before anything is queued: sequences that do not fit, and a batch whose
        // producer prefix takes it over batch_bytes_max.
        assert!(matches!(
            log.try_append_producer(Epoch(1), Some(producer(1, u64::MAX)), &[b"a", b"b"]),
            Err(Error::InvalidBatch(BatchError::SequenceOverflow))
        ));
        let fits_without_prefix = vec![0u8; 4096 - 48 - 4];
        assert!(matches!(
            log.try_append_producer(Epoch(1), Some(producer(1, 0)), &[&fits_without_prefix]),
            Err(Error::BatchTooLarge { len: 4112, .. })
        ));
        assert_eq!(log.next_offset(), a.next);

        // Followers store flagged batches verbatim.
        let follower = Log::open(follower_dir.path(), small_config())
            .await
            .unwrap();
        let r = log.read(Offset(0), Offset(u64::MAX), usize::MAX).unwrap();
        for b in &r.batches {
            follower.try_append_batch(b).unwrap();
        }
        follower.wait_flushed(a.next).await.unwrap();
        assert_eq!(batches(&follower), expected);
        follower.close().await.unwrap();
        log.close().await.unwrap();

        // Reopen: sealed segments through their indexes, the active one by the recovery scan.
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(log.next_offset(), a.next);
        assert_eq!(batches(&log), expected);
        // A read from the middle walks headers from an index entry.
        let r = log.read(Offset(61), Offset(u64::MAX), 1).unwrap();
        let v = r.batches[0].view();
        assert_eq!(v.header().base_offset(), Offset(60));
        assert_eq!(v.producer(), Some(producer(3, 300)));
        log.close().await.unwrap();
    });

    // Without indexes and epoch history, every segment is scanned and the history rebuilt from
    // the batch headers.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "idx") || path.ends_with("epochs") {
            std::fs::remove_file(path).unwrap();
        }
    }
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let report = log.recovery_report();
        assert!(report.epochs_rebuilt);
        assert!(!report.indexes_rebuilt.is_empty());
        assert!(report.torn_tail.is_none());
        assert_eq!(batches(&log), expected);
        assert_eq!(log.epoch_history().len(), 1);
        log.close().await.unwrap();
    });
}

#[test]
fn truncate_in_active_and_sealed_segments() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        append_n(&log, 1, 200, 300).await;
        let segments = log.segment_count();
        assert!(segments > 3);
        // Within the active segment.
        log.truncate_after(Offset(195)).await.unwrap();
        assert_eq!(
            (log.end_offset(), log.next_offset()),
            (Offset(195), Offset(195))
        );
        // Far back, into a sealed segment: later segments go.
        log.truncate_after(Offset(40)).await.unwrap();
        assert!(log.segment_count() < segments);
        assert_eq!(read_all(&log, Offset(0)).len(), 40);
        // Appends continue from the new end with new bytes.
        log.append(Epoch(2), &[b"after".as_slice()]).await.unwrap();
        log.wait_flushed(Offset(41)).await.unwrap();
        log.close().await.unwrap();

        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let all = read_all(&log, Offset(0));
        assert_eq!(all.len(), 41);
        assert_eq!(all[39].1, payload(1, 39, 300));
        assert_eq!(all[40].1, b"after");
        assert_eq!(log.epoch_history().last().unwrap().start_offset, Offset(40));
        log.close().await.unwrap();
    });
}

#[test]
fn truncate_refuses_non_boundaries_and_fails_waiters_beyond() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        log.try_append(Epoch(1), &[b"a".as_slice(), b"b", b"c"])
            .unwrap();
        log.wait_flushed(Offset(3)).await.unwrap();
        assert!(matches!(
            log.truncate_after(Offset(1)).await,
            Err(Error::NotBatchBoundary { offset: Offset(1) })
        ));
        assert!(matches!(
            log.truncate_after(Offset(9)).await,
            Err(Error::OffsetOutOfRange { .. })
        ));
        assert_eq!(log.end_offset(), Offset(3));
        let a = log.try_append(Epoch(1), &[b"d"]).unwrap();
        let waiter = {
            let log = log.clone();
            tokio_uring::spawn(async move { log.wait_flushed(Offset(5)).await })
        };
        log.try_append(Epoch(1), &[b"e"]).unwrap();
        tokio::task::yield_now().await;
        log.truncate_after(a.first).await.unwrap();
        assert!(matches!(
            waiter.await.unwrap(),
            Err(Error::Truncated { .. }) | Ok(())
        ));
        assert_eq!(read_all(&log, Offset(0)).len(), 3);
        log.close().await.unwrap();
    });
}

#[test]
fn retention_by_offset_size_age_and_pins() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        // Old batches, then new ones.
        for i in 0..100u64 {
            log.try_append_at(Epoch(1), 1_000, &[payload(0, i, 300)])
                .unwrap();
        }
        for i in 100..200u64 {
            log.try_append_at(Epoch(1), 9_000_000, &[payload(0, i, 300)])
                .unwrap();
        }
        log.wait_flushed(Offset(200)).await.unwrap();
        let segments = log.segment_count();
        // A pin stops purging.
        log.pin("follower-2", Offset(60));
        let start = log.purge_before(Offset(150)).unwrap();
        assert!(start <= Offset(60) && start > Offset(0), "start {start}");
        assert_eq!(read_all(&log, start)[0].0, start.0);
        log.unpin("follower-2");
        // Age: only segments whose newest batch is old, so the log starts at the segment holding
        // offset 100, the first new batch (segment sizes follow the write rate).
        let holding_100 = log
            .segment_bases()
            .into_iter()
            .filter(|b| *b <= Offset(100))
            .max()
            .unwrap();
        let start = log
            .apply_retention(
                &RetentionPolicy {
                    bytes_max: None,
                    age_max: Some(Duration::from_secs(5)),
                },
                9_000_000,
            )
            .unwrap();
        assert_eq!(start, holding_100);
        assert!(
            start > Offset(11),
            "start {start}: beyond the first, 4 KiB, segment"
        );
        // Size: keeps at most bytes_max, never the active segment.
        let start = log
            .apply_retention(
                &RetentionPolicy {
                    bytes_max: Some(1),
                    age_max: None,
                },
                0,
            )
            .unwrap();
        assert_eq!(log.segment_count(), 1);
        assert!(log.segment_count() < segments);
        assert!(matches!(
            log.read(Offset(0), Offset(200), 100),
            Err(Error::OffsetOutOfRange { .. })
        ));
        assert_eq!(read_all(&log, start).last().unwrap().0, 199);
        log.close().await.unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(log.start_offset(), start);
        log.close().await.unwrap();
    });
}

#[test]
fn bytes_from_counts_what_a_reader_has_left() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let mut sizes = Vec::new();
        for i in 0..150u64 {
            let a = log.try_append(Epoch(1), &[payload(0, i, 300)]).unwrap();
            assert_eq!(a.first, Offset(i));
        }
        log.wait_flushed(Offset(150)).await.unwrap();
        assert!(log.segment_count() > 2, "the test needs several segments");
        let read = log.read(Offset(0), Offset(150), usize::MAX).unwrap();
        for b in &read.batches {
            sizes.push(b.len() as u64);
        }
        let total: u64 = sizes.iter().sum();
        assert_eq!(log.bytes_from(Offset(0)).unwrap(), total);
        for from in [1u64, 17, 33, 90, 149] {
            let rest: u64 = sizes[from as usize..].iter().sum();
            assert_eq!(log.bytes_from(Offset(from)).unwrap(), rest, "from {from}");
        }
        assert_eq!(log.bytes_from(Offset(150)).unwrap(), 0);
        assert_eq!(log.bytes_from(Offset(1000)).unwrap(), 0);
        log.close().await.unwrap();
    });
}

#[test]
fn every_limit_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let cfg = LogConfig {
            pending_bytes_max: 8192,
            ..small_config()
        };
        let log = Log::open(dir.path(), cfg).await.unwrap();
        let empty: [&[u8]; 0] = [];
        assert!(matches!(
            log.try_append(Epoch(1), &empty),
            Err(Error::EmptyBatch)
        ));
        let many = vec![b"x".as_slice(); 65];
        assert!(matches!(
            log.try_append(Epoch(1), &many),
            Err(Error::TooManyRecords { count: 65, max: 64 })
        ));
        log.try_append(Epoch(1), &vec![b"x".as_slice(); 64])
            .unwrap();
        let big = vec![0u8; 4096 - 48 - 4 + 1];
        assert!(matches!(
            log.try_append(Epoch(1), &[&big]),
            Err(Error::BatchTooLarge { .. })
        ));
        log.try_append(Epoch(1), &[&big[1..]]).unwrap();
        // The write queue is bounded: fill it without yielding to the writer.
        let mut refused = false;
        for _ in 0..10 {
            if let Err(Error::Backpressure { max: 8192, .. }) =
                log.try_append(Epoch(1), &[&big[1..]])
            {
                refused = true;
                break;
            }
        }
        assert!(refused, "pending_bytes_max was never enforced");
        // `append` waits for room instead.
        log.append(Epoch(1), &[&big[1..]]).await.unwrap();
        assert!(matches!(
            log.try_append(Epoch(0), &[b"old"]),
            Err(Error::StaleEpoch { .. })
        ));
        log.close().await.unwrap();
    });
    for (cfg, what) in [
        (
            LogConfig {
                segment_bytes_max: 100,
                ..LogConfig::default()
            },
            "tiny segment",
        ),
        (
            LogConfig {
                batch_bytes_max: 1 << 30,
                ..LogConfig::default()
            },
            "batch larger than segment",
        ),
        (
            LogConfig {
                index_interval_bytes: 0,
                ..LogConfig::default()
            },
            "zero index interval",
        ),
        (
            LogConfig {
                segment_initial_bytes: 0,
                ..LogConfig::default()
            },
            "zero initial segment",
        ),
        (
            LogConfig {
                segment_initial_bytes: 4095,
                ..LogConfig::default()
            },
            "initial segment under 4 KiB",
        ),
        (
            LogConfig {
                segment_initial_bytes: 4096 + 512,
                ..LogConfig::default()
            },
            "initial segment not a multiple of 4 KiB",
        ),
        (
            LogConfig {
                segment_initial_bytes: (64 << 20) + 4096,
                ..LogConfig::default()
            },
            "initial segment larger than segment_bytes_max",
        ),
        (
            LogConfig {
                segment_bytes_max: 16 * 1024,
                batch_bytes_max: 4096,
                ..LogConfig::default()
            },
            "default initial segment (1 MiB) larger than a small segment_bytes_max",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let r = tokio_uring::start(Log::open(d.path(), cfg));
        assert!(matches!(r, Err(Error::Config(_))), "{what}");
    }
    // Just inside the limits: 4 KiB, and segment_bytes_max itself.
    for initial in [4096, 64 << 10] {
        let cfg = LogConfig {
            segment_bytes_max: 64 << 10,
            segment_initial_bytes: initial,
            batch_bytes_max: 4096,
            ..LogConfig::default()
        };
        cfg.validate().unwrap();
        let d = tempfile::tempdir().unwrap();
        tokio_uring::start(async {
            let log = Log::open(d.path(), cfg).await.unwrap();
            assert_eq!(log.disk_bytes(), initial);
            log.close().await.unwrap();
        });
    }
}

#[test]
fn epoch_history_and_divergence_lookup() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        log.try_append(Epoch(1), &[b"a".as_slice(), b"b"]).unwrap();
        log.try_append(Epoch(3), &[b"c"]).unwrap();
        log.wait_flushed(Offset(3)).await.unwrap();
        log.begin_epoch(Epoch(5)).unwrap();
        assert_eq!(
            log.end_offset_for_epoch(Epoch(1)),
            Some((Epoch(1), Offset(2)))
        );
        assert_eq!(
            log.end_offset_for_epoch(Epoch(2)),
            Some((Epoch(1), Offset(2)))
        );
        assert_eq!(
            log.end_offset_for_epoch(Epoch(3)),
            Some((Epoch(3), Offset(3)))
        );
        assert_eq!(
            log.end_offset_for_epoch(Epoch(9)),
            Some((Epoch(5), Offset(3)))
        );
        log.close().await.unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let h: Vec<(u64, u64)> = log
            .epoch_history()
            .iter()
            .map(|e| (e.epoch.0, e.start_offset.0))
            .collect();
        assert_eq!(h, vec![(1, 0), (3, 2), (5, 3)]);
        log.close().await.unwrap();
    });
    // A lost epoch file is rebuilt from the batch headers.
    std::fs::remove_file(dir.path().join("epochs")).unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert!(log.recovery_report().epochs_rebuilt);
        let h: Vec<(u64, u64)> = log
            .epoch_history()
            .iter()
            .map(|e| (e.epoch.0, e.start_offset.0))
            .collect();
        assert_eq!(h, vec![(1, 0), (3, 2)]);
        log.close().await.unwrap();
    });
}

#[test]
fn a_locked_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert!(matches!(
            Log::open(dir.path(), small_config()).await,
            Err(Error::Locked { .. })
        ));
        log.close().await.unwrap();
        Log::open(dir.path(), small_config())
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
    });
}

#[test]
fn store_creates_lists_and_reopens_named_logs() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let mut store = Store::open(dir.path(), small_config()).await.unwrap();
        let orders = store.create_log("orders").await.unwrap();
        store.create_log("audit.v1").await.unwrap();
        assert!(matches!(
            store.create_log("orders").await,
            Err(Error::AlreadyExists { .. })
        ));
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(201)] {
            assert!(
                matches!(store.create_log(bad).await, Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
        orders.try_append(Epoch(1), &[b"o1"]).unwrap();
        orders.wait_flushed(Offset(1)).await.unwrap();
        drop(orders);
        store.close().await.unwrap();
        std::fs::create_dir(dir.path().join("not-a-log")).unwrap();
        let store = Store::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(
            store.names().collect::<Vec<_>>(),
            vec!["audit.v1", "orders"]
        );
        assert_eq!(store.get("orders").unwrap().end_offset(), Offset(1));
        store.close().await.unwrap();
    });
}

#[test]
fn waiters_for_appends_and_room_wake_up() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let cfg = LogConfig {
            pending_bytes_max: 4096,
            ..small_config()
        };
        let log = Log::open(dir.path(), cfg).await.unwrap();
        // A reader parked at the end wakes when a record is appended.
        let reader = {
            let log = log.clone();
            tokio_uring::spawn(async move { log.wait_appended(Offset(0)).await })
        };
        tokio::task::yield_now().await;
        assert!(!reader.is_finished());
        log.try_append(Epoch(1), &[b"x"]).unwrap();
        reader.await.unwrap().unwrap();
        // Already past: returns at once.
        log.wait_appended(Offset(0)).await.unwrap();

        // Fill the queue until it refuses, then wait for room and append again.
        let big = vec![7u8; 3000];
        let refused = loop {
            match log.try_append(Epoch(1), &[&big]) {
                Ok(_) => continue,
                Err(Error::Backpressure { .. }) => break true,
                Err(e) => panic!("{e}"),
            }
        };
        assert!(refused);
        log.wait_room().await;
        let a = log.try_append(Epoch(1), &[&big]).unwrap();
        log.wait_flushed(a.next).await.unwrap();

        // Segment bases: oldest first, the active one last.
        let bases = log.segment_bases();
        assert_eq!(bases[0], Offset(0));
        assert_eq!(bases.len(), log.segment_count());
        assert!(bases.windows(2).all(|w| w[0] < w[1]));
        log.close().await.unwrap();
    });
}

#[test]
fn close_closes_for_every_handle() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let other = log.clone();
        let a = other
            .try_append(Epoch(1), &[b"queued before close"])
            .unwrap();
        // Another handle is still alive: close drains, flushes and returns anyway.
        log.close().await.unwrap();
        assert!(other.flush_offset() >= a.next);
        assert!(matches!(
            other.try_append(Epoch(1), &[b"late"]),
            Err(Error::Closed)
        ));
        drop(other);
        let reopened = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(reopened.end_offset(), a.next);
        reopened.close().await.unwrap();
    });
}

#[test]
fn a_scan_yields_every_batch_in_order_over_many_reads() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        // More than SCAN_BYTES, so the scan reads more than once.
        let rec = vec![7u8; 1000];
        let batches = 2 * log_core::SCAN_BYTES / 4000 + 10;
        for _ in 0..batches {
            loop {
                match log.try_append(Epoch(1), &[&rec, &rec, &rec, &rec]) {
                    Ok(_) => break,
                    Err(Error::Backpressure { .. }) => log.wait_room().await,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let end = log.next_offset();
        log.wait_flushed(end).await.unwrap();
        // From inside a batch: that batch comes first, then every one after it.
        let mut scan = log.batches(Offset(6), end);
        let mut next = 4;
        let mut seen = 0;
        for b in scan.by_ref() {
            let b = b.unwrap();
            let h = b.view().header();
            assert_eq!(h.base_offset(), Offset(next));
            next = h.next_offset().0;
            seen += 1;
        }
        assert_eq!((seen, Offset(next)), (batches - 1, end));
        assert_eq!(scan.position(), end);
        // `until` bounds it; nothing lies beyond the end.
        assert_eq!(log.batches(Offset(0), Offset(8)).count(), 2);
        assert_eq!(log.batches(end, Offset(u64::MAX)).count(), 0);
        log.close().await.unwrap();
    });
}

#[test]
fn durable_writes_need_no_fdatasync_and_cover_what_was_written_before() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        // Written first, then fdatasync'd: one fdatasync per append awaited alone.
        let a = log.append(Epoch(1), &[payload(1, 0, 100)]).await.unwrap();
        log.wait_flushed(a.next).await.unwrap();
        let syncs = log.fdatasyncs();
        assert!(syncs >= 1, "{syncs}");
        // Durable writes: each append is durable once written, across segment rolls, with no
        // fdatasync at all.
        log.set_durable_writes(true);
        assert!(log.durable_writes());
        let mut end = a.next;
        for i in 1..100 {
            let b = log.append(Epoch(1), &[payload(1, i, 100)]).await.unwrap();
            log.wait_written(b.next).await.unwrap();
            assert_eq!(log.flush_offset(), b.next, "append {i}");
            end = b.next;
        }
        assert!(log.segment_count() >= 2, "{}", log.segment_count());
        assert_eq!(log.fdatasyncs(), syncs);
        // Back to write-then-fdatasync: a write not yet durable ...
        log.set_durable_writes(false);
        let c = log.append(Epoch(1), &[payload(1, 100, 100)]).await.unwrap();
        log.wait_written(c.next).await.unwrap();
        // ... is not made durable by a later durable write (RWF_DSYNC covers its own range):
        // the flush horizon reaches the end through an fdatasync.
        log.set_durable_writes(true);
        let d = log.append(Epoch(1), &[payload(1, 101, 100)]).await.unwrap();
        log.wait_flushed(d.next).await.unwrap();
        assert!(log.fdatasyncs() > syncs);
        assert!(end < d.next);
        log.close().await.unwrap();

        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let got = read_all(&log, Offset(0));
        assert_eq!(got.len(), 102);
        for (o, v) in &got {
            assert_eq!(v, &payload(1, *o, 100));
        }
        log.close().await.unwrap();
    });
}
