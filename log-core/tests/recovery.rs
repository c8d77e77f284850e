//! The recovery decision table of docs/log-format.md, one test per row: damage real segment,
//! index and metadata files of a closed log, reopen, and check the typed error or the repair.
//! No test may lose a byte of valid data that precedes the damage.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{payload, read_all, segment_files, small_config};
use log_core::{CorruptionKind, Epoch, Error, Log, Offset};

/// Every batch holds one record of this many bytes, so batches are 48 + 4 + 300 = 352 bytes, and
/// a batch's offset times BATCH is its position in the log's data. Segment sizes follow the write
/// rate, so where a segment starts is read from the file names: the first segment (4 KiB) holds
/// 11 batches.
const VALUE: usize = 300;
const BATCH: u64 = 352;

/// Base offset of the `i`th segment.
fn base(dir: &Path, i: usize) -> u64 {
    segment_files(dir)[i].0
}

/// A closed log of `n` single-record batches in `dir`.
fn build(dir: &Path, n: u64) {
    tokio_uring::start(async {
        let log = Log::open(dir, small_config()).await.unwrap();
        for i in 0..n {
            log.append(Epoch(1), &[payload(9, i, VALUE)]).await.unwrap();
        }
        log.wait_flushed(Offset(n)).await.unwrap();
        log.close().await.unwrap();
    });
}

/// Open and close the log, returning what the open said.
fn open(dir: &Path) -> log_core::Result<()> {
    reopen_and(dir, |_| ())
}

/// Reopen and run `f` on the log, then close it.
fn reopen_and<T>(dir: &Path, f: impl FnOnce(&Log) -> T) -> log_core::Result<T> {
    tokio_uring::start(async {
        let log = Log::open(dir, small_config()).await?;
        let out = f(&log);
        log.close().await.unwrap();
        Ok(out)
    })
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn write_at(path: &Path, pos: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, pos).unwrap();
    f.sync_all().unwrap();
}

fn flip(path: &Path, pos: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, pos).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, pos).unwrap();
    f.sync_all().unwrap();
}

fn expect_valid(dir: &Path, n: u64) {
    let got = reopen_and(dir, |log| read_all(log, Offset(0))).unwrap();
    assert_eq!(got.len() as u64, n);
    for (o, v) in got {
        assert_eq!(v, payload(9, o, VALUE), "offset {o}");
    }
}

fn corruption(r: log_core::Result<impl std::fmt::Debug>) -> (PathBuf, u64, CorruptionKind) {
    match r {
        Err(Error::Corruption {
            segment,
            position,
            kind,
        }) => (segment, position, kind),
        other => panic!("expected corruption, got {other:?}"),
    }
}

// Row 1: active segment, zero header after the last batch, zeros to the end: the clean end.
#[test]
fn row01_clean_end_of_data() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 10);
    let report = reopen_and(d.path(), |l| l.recovery_report()).unwrap();
    assert!(report.torn_tail.is_none());
    expect_valid(d.path(), 10);
}

// Row 2: active segment, the last batch cut mid-way (a torn write): cut off and reported.
#[test]
fn row02_torn_last_batch_is_cut() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 10);
    let seg = &segments(d.path())[0];
    // Zero the second half of batch 9.
    write_at(seg, 9 * BATCH + 200, &[0u8; 152]);
    let report = reopen_and(d.path(), |l| l.recovery_report()).unwrap();
    let torn = report.torn_tail.expect("torn tail reported");
    assert_eq!(torn.position, 9 * BATCH);
    expect_valid(d.path(), 9);
    // The garbage was zeroed: the next open is clean.
    assert!(reopen_and(d.path(), |l| l.recovery_report())
        .unwrap()
        .torn_tail
        .is_none());
}

// Row 3: a bit flip in the last batch cannot be told from a torn write: cut and reported, so
// the replica knows to re-fetch that range.
#[test]
fn row03_flip_in_last_batch_is_a_reported_torn_tail() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 10);
    flip(&segments(d.path())[0], 9 * BATCH + 100);
    let report = reopen_and(d.path(), |l| l.recovery_report()).unwrap();
    assert!(report.torn_tail.unwrap().reason.contains("checksum"));
    expect_valid(d.path(), 9);
}

// Row 4: a bad batch followed by a valid one is corruption, never a truncation.
#[test]
fn row04_bad_batch_before_valid_data_is_corruption() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 10);
    let seg = segments(d.path())[0].clone();
    let before = fs::read(&seg).unwrap();
    flip(&seg, 4 * BATCH + 60); // payload of batch 4
    let (path, pos, kind) = corruption(open(d.path()));
    assert_eq!((path, pos), (seg.clone(), 4 * BATCH));
    assert!(matches!(kind, CorruptionKind::BadBatchBeforeValid(_, q) if q == 5 * BATCH));
    // Nothing was changed on disk by the failed open, beyond the flipped byte.
    let after = fs::read(&seg).unwrap();
    assert_eq!(before.iter().zip(&after).filter(|(a, b)| a != b).count(), 1);
    // Header damage is the same row.
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 10);
    flip(&segments(d.path())[0], 2 * BATCH + 17);
    let (_, pos, _) = corruption(open(d.path()));
    assert_eq!(pos, 2 * BATCH);
}

// Row 5: zeros (a hole) followed by a valid batch is corruption.
#[test]
fn row05_hole_before_valid_data_is_corruption() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 10);
    write_at(&segments(d.path())[0], 3 * BATCH, &[0u8; BATCH as usize]);
    let (_, pos, kind) = corruption(open(d.path()));
    assert_eq!(pos, 3 * BATCH);
    assert!(matches!(kind, CorruptionKind::HoleBeforeValid(q) if q == 4 * BATCH));
}

// Row 6: the active segment file cut short mid-batch: torn tail, file zero-extended again.
#[test]
fn row06_active_file_cut_short() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 10);
    let seg = segments(d.path())[0].clone();
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        4096,
        "segment_initial_bytes"
    );
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(7 * BATCH + 30)
        .unwrap();
    let report = reopen_and(d.path(), |l| l.recovery_report()).unwrap();
    assert_eq!(report.torn_tail.unwrap().position, 7 * BATCH);
    // Extended back to segment_initial_bytes, not to segment_bytes_max.
    assert_eq!(report.active_extended, Some((7 * BATCH + 30, 4096)));
    assert_eq!(fs::metadata(&seg).unwrap().len(), 4096);
    expect_valid(d.path(), 7);
}

// Row 6, the size rule: an active segment at least segment_initial_bytes long keeps its size,
// rounded up to a whole 4 KiB; it is never extended to segment_bytes_max, and a file longer than
// segment_bytes_max (the setting was lowered) is not shrunk.
#[test]
fn row06_active_file_keeps_its_size() {
    for (len, expect) in [(10_000u64, 12_288u64), (8192, 8192), (20_480, 20_480)] {
        let d = tempfile::tempdir().unwrap();
        build(d.path(), 10);
        let seg = segments(d.path())[0].clone();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len)
            .unwrap();
        let report = reopen_and(d.path(), |l| {
            assert_eq!(l.disk_bytes(), expect);
            l.recovery_report()
        })
        .unwrap();
        assert!(report.torn_tail.is_none());
        let extended = (len != expect).then_some((len, expect));
        assert_eq!(report.active_extended, extended, "{len}");
        assert_eq!(fs::metadata(&seg).unwrap().len(), expect);
        expect_valid(d.path(), 10);
    }
}

// Row 7: a checksum-valid batch at the wrong offset is corruption.
#[test]
fn row07_batch_at_wrong_offset_is_corruption() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 3);
    let wrong = log_core::batch::encode(Offset(99), Epoch(1), 0, &[payload(9, 3, VALUE)]);
    write_at(&segments(d.path())[0], 3 * BATCH, &wrong);
    let (_, pos, kind) = corruption(open(d.path()));
    assert_eq!(pos, 3 * BATCH);
    assert_eq!(
        kind,
        CorruptionKind::OffsetMismatch {
            expected: 3,
            found: 99
        }
    );
}

// Row 8: sealed segment with a valid index: opened without a scan; a flipped byte is caught by
// the checksum when the batch is first read, as a typed error, and never served.
#[test]
fn row08_sealed_damage_is_caught_on_read() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 100);
    let seg = segments(d.path())[0].clone();
    flip(&seg, 5 * BATCH + 100);
    let r = reopen_and(d.path(), |log| {
        let ok = log
            .read(Offset(0), Offset(5), usize::MAX)
            .map(|r| r.batches.len());
        let bad = log.read(Offset(5), Offset(6), usize::MAX);
        let second = base(d.path(), 1);
        let later = log
            .read(Offset(second), Offset(second + 1), usize::MAX)
            .map(|r| r.batches.len());
        (ok, bad.map(|r| r.batches.len()), later)
    })
    .unwrap();
    assert_eq!(r.0.unwrap(), 5);
    let (path, pos, kind) = corruption(r.1);
    assert_eq!(
        (path, pos, kind),
        (seg, 5 * BATCH, CorruptionKind::ChecksumOnRead)
    );
    assert_eq!(r.2.unwrap(), 1, "other segments still serve");
}

// Row 9: sealed segment whose index is missing: rebuilt by a checksum-verifying scan.
#[test]
fn row09_missing_index_is_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 100);
    let idx = segments(d.path())[0].with_extension("idx");
    let original = fs::read(&idx).unwrap();
    fs::remove_file(&idx).unwrap();
    let report = reopen_and(d.path(), |l| l.recovery_report()).unwrap();
    assert_eq!(report.indexes_rebuilt, vec![idx.clone()]);
    assert_eq!(
        fs::read(&idx).unwrap(),
        original,
        "the rebuilt index equals the original"
    );
    expect_valid(d.path(), 100);
}

// Row 10: sealed segment whose index is damaged or truncated: rebuilt.
#[test]
fn row10_damaged_or_truncated_index_is_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 100);
    let idx = segments(d.path())[1].with_extension("idx");
    let original = fs::read(&idx).unwrap();
    flip(&idx, 30);
    assert_eq!(
        reopen_and(d.path(), |l| l.recovery_report())
            .unwrap()
            .indexes_rebuilt,
        vec![idx.clone()]
    );
    OpenOptions::new()
        .write(true)
        .open(&idx)
        .unwrap()
        .set_len(50)
        .unwrap();
    assert_eq!(
        reopen_and(d.path(), |l| l.recovery_report())
            .unwrap()
            .indexes_rebuilt,
        vec![idx.clone()]
    );
    assert_eq!(fs::read(&idx).unwrap(), original);
    expect_valid(d.path(), 100);
}

// Row 11: sealed segment without an index and with garbage after its data: corruption (a sealed
// segment was synced before its successor existed, so it has no torn tail).
#[test]
fn row11_garbage_in_sealed_segment_is_corruption() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 100);
    let seg = segments(d.path())[0].clone();
    let data_len = base(d.path(), 1) * BATCH;
    fs::remove_file(seg.with_extension("idx")).unwrap();
    write_at(&seg, data_len + 10, b"garbage");
    let (path, pos, kind) = corruption(open(d.path()));
    assert_eq!((path, pos), (seg, data_len));
    assert!(matches!(kind, CorruptionKind::BadBatchInSealed(_)));
}

// Row 12: an empty sealed segment is corruption.
#[test]
fn row12_empty_sealed_segment_is_corruption() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 100);
    let seg = segments(d.path())[0].clone();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(0)
        .unwrap();
    let (_, _, kind) = corruption(open(d.path()));
    assert_eq!(kind, CorruptionKind::EmptySealedSegment);
}

// Row 13: a missing segment in the middle leaves a gap: corruption.
#[test]
fn row13_gap_between_segments_is_corruption() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 150);
    let segs = segments(d.path());
    assert!(segs.len() >= 3);
    let (missing, found) = (base(d.path(), 1), base(d.path(), 2));
    fs::remove_file(&segs[1]).unwrap();
    let (path, _, kind) = corruption(open(d.path()));
    assert_eq!(path, segs[2]);
    assert_eq!(
        kind,
        CorruptionKind::SegmentGap {
            expected: missing,
            found
        }
    );
}

// Row 14: a zero-length active segment (a crash right after it was created) is extended to
// segment_initial_bytes and used.
#[test]
fn row14_empty_active_segment_is_extended() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 100);
    let segs = segments(d.path());
    let last = segs.last().unwrap();
    // Make the last segment empty by truncating the log to its base first.
    let base: u64 = last.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    tokio_uring::start(async {
        let log = Log::open(d.path(), small_config()).await.unwrap();
        log.truncate_after(Offset(base)).await.unwrap();
        log.close().await.unwrap();
    });
    OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(0)
        .unwrap();
    let report = reopen_and(d.path(), |l| l.recovery_report()).unwrap();
    assert_eq!(report.active_extended, Some((0, 4096)));
    assert_eq!(fs::metadata(last).unwrap().len(), 4096);
    expect_valid(d.path(), base);
}

// Row 15: a file that claims to be a segment or index but whose name does not parse: a typed
// error, and nothing is deleted.
#[test]
fn row15_unparseable_segment_name_is_refused() {
    for bad in ["abc.log", "12.log", "000000000000000000x1.idx"] {
        let d = tempfile::tempdir().unwrap();
        build(d.path(), 5);
        fs::write(d.path().join(bad), b"x").unwrap();
        assert!(
            matches!(open(d.path()), Err(Error::BadFileName { .. })),
            "{bad}"
        );
        assert!(d.path().join(bad).exists());
        fs::remove_file(d.path().join(bad)).unwrap();
        expect_valid(d.path(), 5);
    }
}

// Row 16: unknown files are reported and left alone; temp files and orphan indexes are removed.
#[test]
fn row16_unknown_temp_and_orphan_files() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 5);
    fs::write(d.path().join("notes.txt"), b"keep me").unwrap();
    fs::write(d.path().join("epochs.tmp"), b"half written").unwrap();
    fs::write(d.path().join(format!("{:020}.idx", 12345)), b"orphan").unwrap();
    let report = reopen_and(d.path(), |l| l.recovery_report()).unwrap();
    assert_eq!(report.ignored_files, vec![d.path().join("notes.txt")]);
    let orphan = d.path().join(format!("{:020}.idx", 12345));
    assert!(report
        .temp_files_removed
        .contains(&d.path().join("epochs.tmp")));
    assert!(report.temp_files_removed.contains(&orphan));
    assert!(!orphan.exists());
    assert!(d.path().join("notes.txt").exists());
    assert!(!d.path().join("epochs.tmp").exists());
    expect_valid(d.path(), 5);
}

// Row 17: an interrupted truncation (its intent file survives) is redone on open.
#[test]
fn row17_interrupted_truncation_is_redone() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 120);
    // Write the intent the way truncate_after does, then "crash" before acting on it.
    let mut intent = Vec::new();
    intent.extend_from_slice(b"RPLT");
    intent.extend_from_slice(&1u32.to_le_bytes());
    intent.extend_from_slice(&30u64.to_le_bytes());
    let crc = crc32c::crc32c(&intent);
    intent.extend_from_slice(&crc.to_le_bytes());
    fs::write(d.path().join("truncate.intent"), &intent).unwrap();
    // The segments up to the one holding offset 30 stay; every later one goes.
    let kept: Vec<(u64, u64)> = segment_files(d.path())
        .into_iter()
        .filter(|(b, _)| *b <= 30)
        .collect();
    assert!(segments(d.path()).len() > kept.len());
    let report = reopen_and(d.path(), |l| l.recovery_report()).unwrap();
    assert_eq!(report.truncation_redone, Some(Offset(30)));
    assert!(!d.path().join("truncate.intent").exists());
    assert_eq!(segment_files(d.path()), kept);
    expect_valid(d.path(), 30);
}

// Row 18: metadata from an unknown format version is refused with a typed error.
#[test]
fn row18_unknown_manifest_version_is_refused() {
    let d = tempfile::tempdir().unwrap();
    build(d.path(), 5);
    let path = d.path().join("manifest");
    let mut m = fs::read(&path).unwrap();
    m[4] = 7;
    let crc = crc32c::crc32c(&m[..8]);
    m[8..12].copy_from_slice(&crc.to_le_bytes());
    fs::write(&path, &m).unwrap();
    assert!(matches!(
        open(d.path()),
        Err(Error::UnknownVersion { found: 7, .. })
    ));
}

// Row 19: a directory that cannot be written is a typed I/O error naming the file.
#[test]
fn row19_unwritable_directory_is_a_typed_error() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("ro");
    fs::create_dir(&target).unwrap();
    let is_root = unsafe { libc::geteuid() } == 0;
    let mounted = is_root
        && std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(&target)
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        // Not root: permissions are enough.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o500)).unwrap();
    }
    let r = open(&target.join("log"));
    if mounted {
        let _ = std::process::Command::new("umount").arg(&target).status();
    }
    match r {
        Err(Error::Io { path, .. }) => assert!(path.starts_with(&target)),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}
