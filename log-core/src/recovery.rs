//! Opening a log directory: classify its files, redo an interrupted truncation, check sealed
//! segments, scan the active segment and cut a torn tail. The decision table is in
//! `docs/log-format.md`; `tests/recovery.rs` has a test per row.
//!
//! Checksum-verifying reads here use `pread`, never the mapping: an I/O error on a mapped page
//! would be a SIGBUS instead of an error value (R13).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::batch::{self, BatchError, BATCH_HEADER_LEN, BATCH_MAGIC};
use crate::config::{LogConfig, SEGMENT_BYTES_UNIT};
use crate::epochs::{EpochHistory, EPOCHS_FILE};
use crate::error::{CorruptionKind, Error, Result};
use crate::fsutil;
use crate::index::{self, SealedMeta, SparseIndex};
use crate::segment::{self, Segment, INDEX_EXT, SEGMENT_EXT};
use crate::types::{Epoch, Offset};

pub(crate) const PREPARED_FILE: &str = "next.segment.tmp";
pub(crate) const TRUNCATE_INTENT_FILE: &str = "truncate.intent";
pub(crate) const MANIFEST_FILE: &str = "manifest";
pub(crate) const LOCK_FILE: &str = "LOCK";

/// What opening a log found and repaired. Nothing here lost acknowledged data, except possibly
/// `torn_tail`: a batch that failed validation at the very end of the log. Such a batch was never
/// flushed if the failure is a torn write, but a bit flip in the last flushed batch looks the
/// same, so a replica that reports a torn tail must re-fetch that range before it may lead.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub torn_tail: Option<TornTail>,
    pub indexes_rebuilt: Vec<PathBuf>,
    pub epochs_rebuilt: bool,
    pub truncation_redone: Option<crate::Offset>,
    /// The active segment's file was shorter than `segment_initial_bytes` or not a whole number
    /// of 4 KiB, and was zero-extended: (old length, new length). Otherwise it keeps its size.
    pub active_extended: Option<(u64, u64)>,
    pub temp_files_removed: Vec<PathBuf>,
    /// Files with names replog does not use; left in place, never deleted.
    pub ignored_files: Vec<PathBuf>,
}

/// A torn tail that recovery cut off.
#[derive(Clone, Debug)]
pub struct TornTail {
    pub segment: PathBuf,
    pub position: u64,
    /// Non-zero bytes from `position` to the last non-zero byte, now zeroed.
    pub bytes: u64,
    pub reason: String,
}

/// Result of scanning one segment's bytes.
#[derive(Debug)]
pub(crate) struct Scan {
    pub data_len: u64,
    pub next_offset: Offset,
    pub max_timestamp_us: u64,
    pub index: SparseIndex,
    /// The first offset of each epoch seen in this segment, in order.
    pub epochs: Vec<(Epoch, Offset)>,
    pub torn: Option<(u64, u64, String)>,
}

/// Scan `buf` (a whole segment read with pread) from its start. Implements the decision table:
/// valid batches are kept; at the first invalid position, a valid batch later in the segment
/// makes it corruption, a sealed segment makes any non-zero garbage corruption, and otherwise the
/// rest is a torn tail (or, if all zero, the clean end of data).
pub(crate) fn scan(
    buf: &[u8],
    base: Offset,
    mut last_epoch: Option<Epoch>,
    interval: u32,
    path: &Path,
    sealed: bool,
) -> Result<Scan> {
    let corruption = |position: u64, kind| Error::Corruption {
        segment: path.into(),
        position,
        kind,
    };
    let mut out = Scan {
        data_len: 0,
        next_offset: base,
        max_timestamp_us: 0,
        index: SparseIndex::default(),
        epochs: Vec::new(),
        torn: None,
    };
    let mut pos = 0usize;
    while pos < buf.len() {
        let rest = &buf[pos..];
        let problem = match batch::header(rest) {
            Ok(h) if h.is_zero() => None,
            Err(_) if rest.iter().all(|b| *b == 0) => None,
            _ => match batch::decode(rest) {
                Ok(view) => {
                    let h = view.header();
                    if h.base_offset() != out.next_offset {
                        return Err(corruption(
                            pos as u64,
                            CorruptionKind::OffsetMismatch {
                                expected: out.next_offset.0,
                                found: h.base_offset().0,
                            },
                        ));
                    }
                    if let Some(prev) = last_epoch {
                        if h.epoch() < prev {
                            return Err(corruption(
                                pos as u64,
                                CorruptionKind::EpochRegression {
                                    previous: prev.0,
                                    found: h.epoch().0,
                                },
                            ));
                        }
                    }
                    if last_epoch != Some(h.epoch()) {
                        out.epochs.push((h.epoch(), h.base_offset()));
                        last_epoch = Some(h.epoch());
                    }
                    out.index
                        .maybe_add((h.base_offset().0 - base.0) as u32, pos as u32, interval);
                    out.max_timestamp_us = out.max_timestamp_us.max(h.timestamp_us.get());
                    out.next_offset = h.next_offset();
                    pos += view.len();
                    out.data_len = pos as u64;
                    continue;
                }
                Err(e) => Some(e),
            },
        };
        // `pos` is the end of valid data: either a zero header (problem None) or a bad batch.
        if let Some(q) = find_valid_after(buf, pos + 1, out.next_offset) {
            let kind = match problem {
                Some(e) => CorruptionKind::BadBatchBeforeValid(e, q as u64),
                None => CorruptionKind::HoleBeforeValid(q as u64),
            };
            return Err(corruption(pos as u64, kind));
        }
        let garbage_end = rest
            .iter()
            .rposition(|b| *b != 0)
            .map_or(pos, |i| pos + i + 1);
        if garbage_end > pos {
            let e = problem.unwrap_or(BatchError::BadMagic(0));
            if sealed {
                // A sealed segment was fdatasync'd before the next one was created: it cannot
                // have a torn tail, so garbage in it is damage.
                return Err(corruption(pos as u64, CorruptionKind::BadBatchInSealed(e)));
            }
            out.torn = Some((pos as u64, garbage_end as u64, e.to_string()));
        }
        break;
    }
    Ok(out)
}

/// The first position at or after `from` holding a fully valid batch that could belong after
/// offset `min_base` (its base offset is not older). Candidates are found by the magic bytes.
fn find_valid_after(buf: &[u8], from: usize, min_base: Offset) -> Option<usize> {
    let magic = BATCH_MAGIC.to_le_bytes();
    let mut at = from;
    while at < buf.len() {
        let q = at + memchr::memmem::find(&buf[at..], &magic)?;
        if let Ok(view) = batch::decode(&buf[q..]) {
            if view.header().base_offset() >= min_base {
                return Some(q);
            }
        }
        at = q + 1;
    }
    None
}

/// Read a whole file with pread.
pub(crate) fn read_file(file: &File, path: &Path) -> Result<Vec<u8>> {
    let len = file.metadata().map_err(Error::io("stat", path))?.len() as usize;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)
        .map_err(Error::io("read", path))?;
    Ok(buf)
}

/// The segments of a directory, in offset order, after classification.
pub(crate) struct Listing {
    pub segments: Vec<(Offset, PathBuf)>,
    pub indexes: Vec<(Offset, PathBuf)>,
}

fn list(dir: &Path, report: &mut RecoveryReport) -> Result<Listing> {
    let mut segments = Vec::new();
    let mut indexes = Vec::new();
    for entry in fs::read_dir(dir).map_err(Error::io("read directory", dir))? {
        let entry = entry.map_err(Error::io("read directory", dir))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match segment::parse_name(&path)? {
            Some((base, SEGMENT_EXT)) => segments.push((base, path)),
            Some((base, _)) => indexes.push((base, path)),
            None if name.ends_with(".tmp") => {
                // Unfinished atomic writes and a half-prepared segment: never referenced by
                // anything durable, so removing them loses nothing.
                fs::remove_file(&path).map_err(Error::io("remove", &path))?;
                report.temp_files_removed.push(path);
            }
            None if [EPOCHS_FILE, TRUNCATE_INTENT_FILE, MANIFEST_FILE, LOCK_FILE]
                .contains(&name.as_ref()) => {}
            None => {
                tracing::warn!(path = %path.display(), "ignoring unknown file in log directory");
                report.ignored_files.push(path);
            }
        }
    }
    segments.sort();
    indexes.sort();
    Ok(Listing { segments, indexes })
}

/// The size the active segment is used at, given its file length `len`: the same, rounded up
/// to a whole number of 4 KiB and to at least `segment_initial_bytes`. A segment file is never
/// shrunk, and is never extended to `segment_bytes_max` either: how big the following segments
/// get is decided by the write rate once writes resume.
pub(crate) fn active_size(len: u64, config: &LogConfig) -> u64 {
    len.next_multiple_of(SEGMENT_BYTES_UNIT)
        .max(config.segment_initial_bytes)
}

/// What `recover` hands to `Log::open`.
pub(crate) struct Recovered {
    pub sealed: Vec<Segment>,
    pub active: Option<(Segment, File)>,
    pub epochs: EpochHistory,
    pub report: RecoveryReport,
}

/// Recover the directory's segments (see the module doc). The directory is locked by the caller.
pub(crate) fn recover(dir: &Path, config: &LogConfig) -> Result<Recovered> {
    let mut report = RecoveryReport::default();
    let mut listing = list(dir, &mut report)?;
    if let Some(end) = read_truncate_intent(dir)? {
        apply_truncation(dir, &listing.segments, end)?;
        remove_truncate_intent(dir)?;
        report.truncation_redone = Some(end);
        listing = list(dir, &mut report)?;
    }
    // An index without its segment is left over from a deletion that was interrupted.
    for (base, path) in &listing.indexes {
        if !listing.segments.iter().any(|(b, _)| b == base) {
            fs::remove_file(path).map_err(Error::io("remove", path))?;
            report.temp_files_removed.push(path.clone());
        }
    }
    report.segments = listing.segments.len();
    let mut sealed = Vec::new();
    let mut expected: Option<Offset> = None;
    let mut last_epoch: Option<Epoch> = None;
    let mut rebuilt_epochs: Vec<(Epoch, Offset)> = Vec::new();
    let count = listing.segments.len();
    let mut active = None;
    for (i, (base, path)) in listing.segments.iter().enumerate() {
        if let Some(exp) = expected {
            if *base != exp {
                return Err(Error::Corruption {
                    segment: path.clone(),
                    position: 0,
                    kind: CorruptionKind::SegmentGap {
                        expected: exp.0,
                        found: base.0,
                    },
                });
            }
        }
        let is_active = i + 1 == count;
        let file = OpenOptions::new()
            .read(true)
            .write(is_active)
            .open(path)
            .map_err(Error::io("open segment", path))?;
        let mut len = file.metadata().map_err(Error::io("stat", path))?.len();
        if is_active {
            let buf = read_file(&file, path)?;
            let scan = scan(
                &buf,
                *base,
                last_epoch,
                config.index_interval_bytes,
                path,
                false,
            )?;
            if let Some((position, garbage_end, reason)) = scan.torn.clone() {
                tracing::warn!(segment = %path.display(), position, "cutting torn tail");
                fsutil::zero_range(&file, path, position, garbage_end)?;
                report.torn_tail = Some(TornTail {
                    segment: path.clone(),
                    position,
                    bytes: garbage_end - position,
                    reason,
                });
            }
            let size = active_size(len, config);
            if size > len {
                fsutil::zero_range(&file, path, len, size)?;
                file.sync_all().map_err(Error::io("fsync", path))?;
                report.active_extended = Some((len, size));
                len = size;
            }
            rebuilt_epochs.extend(&scan.epochs);
            let map = segment::map_file(&file, path)?;
            let seg = Segment {
                base: *base,
                path: path.clone(),
                map,
                capacity: len,
                data_len: scan.data_len,
                next_offset: scan.next_offset,
                max_timestamp_us: scan.max_timestamp_us,
                index: scan.index,
                verified_len: std::cell::Cell::new(scan.data_len),
            };
            // A stale index of the active segment (it was sealed once, then truncated back into
            // being active) would be wrong: the active segment's index lives in memory.
            let idx = seg.index_path();
            if idx.exists() {
                fs::remove_file(&idx).map_err(Error::io("remove", &idx))?;
            }
            active = Some((seg, file));
        } else {
            if len == 0 {
                return Err(Error::Corruption {
                    segment: path.clone(),
                    position: 0,
                    kind: CorruptionKind::EmptySealedSegment,
                });
            }
            let idx_path = path.with_extension(INDEX_EXT);
            let (meta, verified) = match index::load(&idx_path, *base, len) {
                Ok(meta) => (meta, 0),
                Err(problem) => {
                    let buf = read_file(&file, path)?;
                    let scan = scan(
                        &buf,
                        *base,
                        last_epoch,
                        config.index_interval_bytes,
                        path,
                        true,
                    )?;
                    if scan.data_len == 0 {
                        return Err(Error::Corruption {
                            segment: path.clone(),
                            position: 0,
                            kind: CorruptionKind::EmptySealedSegment,
                        });
                    }
                    let meta = SealedMeta {
                        base: *base,
                        next_offset: scan.next_offset,
                        data_len: scan.data_len,
                        max_timestamp_us: scan.max_timestamp_us,
                        index: scan.index,
                    };
                    index::store(&idx_path, &meta)?;
                    tracing::info!(index = %idx_path.display(), ?problem, "rebuilt index");
                    report.indexes_rebuilt.push(idx_path);
                    let verified = meta.data_len;
                    (meta, verified)
                }
            };
            let map = segment::map_file(&file, path)?;
            let seg = Segment {
                base: *base,
                path: path.clone(),
                map,
                capacity: len,
                data_len: meta.data_len,
                next_offset: meta.next_offset,
                max_timestamp_us: meta.max_timestamp_us,
                index: meta.index,
                verified_len: std::cell::Cell::new(verified),
            };
            if !seg.starts_at_base() {
                return Err(Error::Corruption {
                    segment: path.clone(),
                    position: 0,
                    kind: CorruptionKind::OffsetMismatch {
                        expected: base.0,
                        found: batch::header(&seg.map[..]).map_or(0, |h| h.base_offset().0),
                    },
                });
            }
            sealed.push(seg);
        }
        let seg_next = match &active {
            Some((s, _)) if is_active => s.next_offset,
            _ => sealed.last().unwrap().next_offset,
        };
        expected = Some(seg_next);
        if let Some(&(e, _)) = rebuilt_epochs.last() {
            last_epoch = Some(e);
        }
    }
    let log_end = expected.unwrap_or_default();
    let epochs = match EpochHistory::load(dir) {
        Ok(Some(h)) => Some(h),
        Ok(None) => None,
        Err(Error::Corruption { .. }) => None,
        Err(e) => return Err(e),
    };
    let mut epochs = match epochs {
        Some(h) => h,
        None => {
            // Missing or damaged: rebuild from every batch header.
            let mut h = EpochHistory::empty(dir);
            for seg in sealed.iter().chain(active.as_ref().map(|(s, _)| s)) {
                let file = File::open(&seg.path).map_err(Error::io("open", &seg.path))?;
                let mut pos = 0;
                while pos < seg.data_len {
                    let mut head = [0u8; BATCH_HEADER_LEN];
                    file.read_exact_at(&mut head, pos)
                        .map_err(Error::io("read", &seg.path))?;
                    let hd = batch::header(&head).expect("48 bytes");
                    h.observe(hd.epoch(), hd.base_offset());
                    pos += hd.batch_len() as u64;
                }
            }
            report.epochs_rebuilt = count > 0;
            h
        }
    };
    let mut changed = report.epochs_rebuilt;
    for &(epoch, start) in &rebuilt_epochs {
        if epochs.last_epoch().is_none_or(|last| epoch > last) {
            changed |= epochs.observe(epoch, start);
        }
    }
    changed |= epochs.drop_beyond(log_end);
    if changed {
        epochs.persist()?;
    }
    Ok(Recovered {
        sealed,
        active,
        epochs,
        report,
    })
}

/// Durably record that the log is being truncated to `end`, so that a crash halfway through is
/// redone at the next open instead of leaving stale batches behind the new end.
pub(crate) fn write_truncate_intent(dir: &Path, end: Offset) -> Result<()> {
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(b"RPLT");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&end.0.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    fsutil::write_atomic(&dir.join(TRUNCATE_INTENT_FILE), &out, true)
}

pub(crate) fn remove_truncate_intent(dir: &Path) -> Result<()> {
    let path = dir.join(TRUNCATE_INTENT_FILE);
    fs::remove_file(&path).map_err(Error::io("remove", &path))?;
    fsutil::sync_dir(dir)
}

fn read_truncate_intent(dir: &Path) -> Result<Option<Offset>> {
    let path = dir.join(TRUNCATE_INTENT_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path)(e)),
    };
    // The intent is written atomically, so a bad one was damaged after it was written.
    if bytes.len() != 20
        || &bytes[..4] != b"RPLT"
        || crc32c::crc32c(&bytes[..16]).to_le_bytes() != bytes[16..20]
    {
        return Err(Error::Corruption {
            segment: path,
            position: 0,
            kind: CorruptionKind::DamagedFile("truncation intent"),
        });
    }
    let version = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    if version != 1 {
        return Err(Error::UnknownVersion {
            path,
            found: version,
            supported: 1,
        });
    }
    Ok(Some(Offset(u64::from_le_bytes(
        bytes[8..16].try_into().unwrap(),
    ))))
}

/// Make the files say the log ends at `end`: delete later segments newest first (so a crash
/// leaves a prefix, never a gap), drop the index of the segment that becomes active, and zero
/// its bytes from the batch boundary at `end`. Idempotent; returns that boundary's position.
pub(crate) fn apply_truncation(
    dir: &Path,
    segments: &[(Offset, PathBuf)],
    end: Offset,
) -> Result<u64> {
    let Some(t) = segments.iter().rposition(|(b, _)| *b <= end) else {
        return Err(Error::OffsetOutOfRange {
            offset: end,
            start: segments.first().map_or(Offset(0), |s| s.0),
            end,
        });
    };
    for (base, path) in segments[t + 1..].iter().rev() {
        let idx = dir.join(segment::index_name(*base));
        if idx.exists() {
            fs::remove_file(&idx).map_err(Error::io("remove", &idx))?;
        }
        fs::remove_file(path).map_err(Error::io("remove", path))?;
        fsutil::sync_dir(dir)?;
    }
    let (base, path) = &segments[t];
    let idx = dir.join(segment::index_name(*base));
    if idx.exists() {
        fs::remove_file(&idx).map_err(Error::io("remove", &idx))?;
        fsutil::sync_dir(dir)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(Error::io("open segment", path))?;
    let buf = read_file(&file, path)?;
    // Walk valid batches up to `end`. A partial earlier zeroing can only have cleared bytes at or
    // after the boundary, so the walk always reaches it.
    let mut pos = 0usize;
    let mut next = *base;
    while next < end {
        match batch::decode(&buf[pos..]) {
            Ok(v) if v.header().base_offset() == next => {
                next = v.header().next_offset();
                pos += v.len();
            }
            _ => break,
        }
    }
    if next != end {
        return Err(Error::Corruption {
            segment: path.clone(),
            position: pos as u64,
            kind: CorruptionKind::DamagedFile("truncation point is not a batch boundary"),
        });
    }
    let garbage_end = buf.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    if garbage_end > pos {
        fsutil::zero_range(&file, path, pos as u64, garbage_end as u64)?;
    }
    Ok(pos as u64)
}
