//! One segment file `<base-offset>.log` (20-digit, zero-padded) and its read-only mapping.
//!
//! A segment file is zero-filled to its full size before it takes its first write, so the data is
//! a prefix of valid batches followed by zeros. Sizes differ from segment to segment (from
//! `segment_initial_bytes` to `segment_bytes_max`, following the write rate), but a file does not
//! change size while it is in use: only recovery extends one (before mapping it), and nothing
//! shrinks one. The mapping covers the whole file; readers only
//! look at `[0, data_len)`, which only grows while the segment is active and never changes once
//! it is sealed.

use std::cell::Cell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};

use crate::batch::{self, BATCH_HEADER_LEN};
use crate::error::{CorruptionKind, Error, Result};
use crate::index::SparseIndex;
use crate::types::Offset;

pub(crate) const SEGMENT_EXT: &str = "log";
pub(crate) const INDEX_EXT: &str = "idx";

/// File name of the segment starting at `base`.
pub(crate) fn segment_name(base: Offset) -> String {
    format!("{:020}.{SEGMENT_EXT}", base.0)
}

pub(crate) fn index_name(base: Offset) -> String {
    format!("{:020}.{INDEX_EXT}", base.0)
}

/// Parse `<digits>.log` or `<digits>.idx`. `None` if the name has neither extension; an error if
/// it has one but the stem is not a canonical 20-digit offset.
pub(crate) fn parse_name(path: &Path) -> Result<Option<(Offset, &'static str)>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Err(Error::BadFileName { path: path.into() });
    };
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, SEGMENT_EXT)) => (stem, SEGMENT_EXT),
        Some((stem, INDEX_EXT)) => (stem, INDEX_EXT),
        _ => return Ok(None),
    };
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::BadFileName { path: path.into() });
    }
    let base = stem
        .parse::<u64>()
        .map_err(|_| Error::BadFileName { path: path.into() })?;
    Ok(Some((Offset(base), ext)))
}

/// Map a whole segment file read-only.
pub(crate) fn map_file(file: &File, path: &Path) -> Result<Arc<Mmap>> {
    // SAFETY: the mapping is read-only and replog never shrinks a segment file (R13): data is
    // truncated logically and files are unlinked, so mapped pages always stay backed.
    let map = unsafe { MmapOptions::new().map(file) }.map_err(Error::io("mmap", path))?;
    Ok(Arc::new(map))
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub base: Offset,
    pub path: PathBuf,
    pub map: Arc<Mmap>,
    /// File size: the most data this segment can hold.
    pub capacity: u64,
    /// Bytes of valid batches at the start of the file.
    pub data_len: u64,
    /// Offset after the last record in this segment.
    pub next_offset: Offset,
    pub max_timestamp_us: u64,
    pub index: SparseIndex,
    /// Batches in `[0, verified_len)` have passed their crc32c since this process opened the
    /// segment; reads verify the rest before serving it.
    pub verified_len: Cell<u64>,
}

impl Segment {
    fn corruption(&self, position: u64, kind: CorruptionKind) -> Error {
        Error::Corruption {
            segment: self.path.clone(),
            position,
            kind,
        }
    }

    /// The header at `pos`, bounds-checked against the data.
    pub(crate) fn header_at(&self, pos: u64) -> Result<&batch::BatchHeader> {
        let data = &self.map[pos as usize..self.data_len as usize];
        let h = batch::header(data)
            .map_err(|e| self.corruption(pos, CorruptionKind::BadBatchInSealed(e)))?;
        batch::check_header(h, data.len())
            .map_err(|e| self.corruption(pos, CorruptionKind::BadBatchInSealed(e)))?;
        Ok(h)
    }

    /// Position of the first batch whose records reach past `offset` (the batch holding it),
    /// or `data_len` if `offset` is at or past the segment's end.
    pub(crate) fn position_for(&self, offset: Offset) -> Result<u64> {
        if offset >= self.next_offset {
            return Ok(self.data_len);
        }
        let rel = offset.0.saturating_sub(self.base.0);
        let mut pos = u64::from(self.index.lookup(u32::try_from(rel).unwrap_or(u32::MAX)));
        while pos < self.data_len {
            let h = self.header_at(pos)?;
            if h.next_offset() > offset {
                return Ok(pos);
            }
            pos += h.batch_len() as u64;
        }
        Ok(self.data_len)
    }

    /// Position where a batch starts exactly at `offset` (or `data_len` for the segment end).
    pub(crate) fn boundary(&self, offset: Offset) -> Result<Option<u64>> {
        if offset == self.next_offset {
            return Ok(Some(self.data_len));
        }
        let pos = self.position_for(offset)?;
        if pos < self.data_len && self.header_at(pos)?.base_offset() == offset {
            Ok(Some(pos))
        } else {
            Ok(None)
        }
    }

    /// Verify every batch up to `end` (a batch boundary) that this process has not verified yet.
    pub(crate) fn verify_until(&self, end: u64) -> Result<()> {
        let mut pos = self.verified_len.get();
        while pos < end {
            let data = &self.map[pos as usize..self.data_len as usize];
            let view = batch::decode(data).map_err(|e| {
                self.corruption(
                    pos,
                    match e {
                        batch::BatchError::ChecksumMismatch { .. } => {
                            CorruptionKind::ChecksumOnRead
                        }
                        e => CorruptionKind::BadBatchInSealed(e),
                    },
                )
            })?;
            pos += view.len() as u64;
            self.verified_len.set(pos);
        }
        Ok(())
    }

    /// Bytes this segment occupies on disk.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.capacity
    }

    pub(crate) fn index_path(&self) -> PathBuf {
        self.path.with_extension(INDEX_EXT)
    }

    /// True if `[0, data_len)` starts with the header the segment's base promises.
    pub(crate) fn starts_at_base(&self) -> bool {
        self.data_len == 0
            || (self.data_len >= BATCH_HEADER_LEN as u64
                && batch::header(&self.map[..]).is_ok_and(|h| h.base_offset() == self.base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_garbage_is_rejected() {
        let p = PathBuf::from(segment_name(Offset(42)));
        assert_eq!(p.to_str().unwrap(), "00000000000000000042.log");
        assert_eq!(parse_name(&p).unwrap(), Some((Offset(42), SEGMENT_EXT)));
        assert_eq!(
            parse_name(Path::new(&index_name(Offset(7)))).unwrap(),
            Some((Offset(7), INDEX_EXT))
        );
        assert_eq!(parse_name(Path::new("notes.txt")).unwrap(), None);
        for bad in [
            "abc.log",
            "12.log",
            "0000000000000000004x.idx",
            "99999999999999999999.log",
        ] {
            assert!(
                matches!(parse_name(Path::new(bad)), Err(Error::BadFileName { .. })),
                "{bad}"
            );
        }
    }
}
