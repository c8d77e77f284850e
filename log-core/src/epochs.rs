//! The epoch history of a log: for each leader epoch, the offset of its first record. Used to find
//! where two replicas' logs diverge (the KIP-101 rule: truncate at the divergence point obtained
//! from the leader, never at a local high watermark).
//!
//! File `epochs`, replaced atomically (temp, fsync, rename, fsync directory) whenever it changes:
//! ```text
//! 0  magic "RPLE" u32 | 4 version u32 | 8 count u32 | 12 crc32c u32 (over bytes 0..12 + entries)
//! 16 count x (epoch u64, start_offset u64)
//! ```

use std::path::{Path, PathBuf};

use crate::error::{CorruptionKind, Error, Result};
use crate::fsutil;
use crate::types::{Epoch, Offset};

const EPOCHS_MAGIC: u32 = u32::from_le_bytes(*b"RPLE");
const EPOCHS_VERSION: u32 = 1;
pub(crate) const EPOCHS_FILE: &str = "epochs";

/// One row of the epoch history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochEntry {
    pub epoch: Epoch,
    /// Offset of the first record appended in `epoch` (or the log end when the epoch began).
    pub start_offset: Offset,
}

#[derive(Debug)]
pub(crate) struct EpochHistory {
    path: PathBuf,
    entries: Vec<EpochEntry>,
}

impl EpochHistory {
    /// Load the history file. `Ok(None)` if it does not exist; a damaged file is an error the
    /// caller answers by rebuilding from the batches.
    pub(crate) fn load(dir: &Path) -> Result<Option<EpochHistory>> {
        let path = dir.join(EPOCHS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path)(e)),
        };
        let damaged = |what| Error::Corruption {
            segment: path.clone(),
            position: 0,
            kind: CorruptionKind::DamagedFile(what),
        };
        if bytes.len() < 16 || bytes[0..4] != EPOCHS_MAGIC.to_le_bytes() {
            return Err(damaged("epoch history header"));
        }
        let version = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        if version != EPOCHS_VERSION {
            return Err(Error::UnknownVersion {
                path,
                found: version,
                supported: EPOCHS_VERSION,
            });
        }
        let count = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        if bytes.len() != 16 + count * 16 {
            return Err(damaged("epoch history length"));
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..12]), &bytes[16..]);
        if crc.to_le_bytes() != bytes[12..16] {
            return Err(damaged("epoch history checksum"));
        }
        let entries: Vec<EpochEntry> = bytes[16..]
            .chunks_exact(16)
            .map(|c| EpochEntry {
                epoch: Epoch(u64::from_le_bytes(c[..8].try_into().unwrap())),
                start_offset: Offset(u64::from_le_bytes(c[8..].try_into().unwrap())),
            })
            .collect();
        let ordered = entries
            .windows(2)
            .all(|w| w[0].epoch < w[1].epoch && w[0].start_offset <= w[1].start_offset);
        if !ordered {
            return Err(damaged("epoch history order"));
        }
        Ok(Some(EpochHistory { path, entries }))
    }

    pub(crate) fn empty(dir: &Path) -> EpochHistory {
        EpochHistory {
            path: dir.join(EPOCHS_FILE),
            entries: Vec::new(),
        }
    }

    pub(crate) fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    pub(crate) fn last_epoch(&self) -> Option<Epoch> {
        self.entries.last().map(|e| e.epoch)
    }

    /// Note that a batch of `epoch` starts at `offset`. Returns true if this added an entry.
    /// The caller has checked that `epoch` is not older than `last_epoch`.
    pub(crate) fn observe(&mut self, epoch: Epoch, offset: Offset) -> bool {
        match self.entries.last() {
            Some(last) if last.epoch >= epoch => {
                debug_assert_eq!(last.epoch, epoch);
                false
            }
            _ => {
                debug_assert!(self.entries.last().is_none_or(|l| l.start_offset <= offset));
                self.entries.push(EpochEntry {
                    epoch,
                    start_offset: offset,
                });
                true
            }
        }
    }

    /// Forget epochs whose first record is at or after `end` (truncation to `end`).
    pub(crate) fn truncate(&mut self, end: Offset) -> bool {
        let keep = self.entries.partition_point(|e| e.start_offset < end);
        let changed = keep != self.entries.len();
        self.entries.truncate(keep);
        changed
    }

    /// Forget epochs that begin beyond `end` (the file got ahead of the data in a crash).
    pub(crate) fn drop_beyond(&mut self, end: Offset) -> bool {
        let keep = self.entries.partition_point(|e| e.start_offset <= end);
        let changed = keep != self.entries.len();
        self.entries.truncate(keep);
        changed
    }

    /// The end offset of `epoch` in this log: the start of the next newer epoch, or `log_end`
    /// if `epoch` is the newest. `None` if `epoch` is older than everything recorded.
    /// For an epoch this log never saw, the answer is the start of the next newer one.
    pub(crate) fn end_offset_for(&self, epoch: Epoch, log_end: Offset) -> Option<(Epoch, Offset)> {
        let first = self.entries.first()?;
        if epoch < first.epoch {
            return None;
        }
        let i = self.entries.partition_point(|e| e.epoch <= epoch);
        let found = self.entries[i - 1].epoch;
        let end = self.entries.get(i).map_or(log_end, |e| e.start_offset);
        Some((found, end))
    }

    /// Write the history durably.
    pub(crate) fn persist(&self) -> Result<()> {
        let mut out = Vec::with_capacity(16 + 16 * self.entries.len());
        out.extend_from_slice(&EPOCHS_MAGIC.to_le_bytes());
        out.extend_from_slice(&EPOCHS_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for e in &self.entries {
            out.extend_from_slice(&e.epoch.0.to_le_bytes());
            out.extend_from_slice(&e.start_offset.0.to_le_bytes());
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..12]), &out[16..]);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        fsutil::write_atomic(&self.path, &out, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_load_truncate_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = EpochHistory::empty(dir.path());
        assert!(h.observe(Epoch(1), Offset(0)));
        assert!(!h.observe(Epoch(1), Offset(5)));
        assert!(h.observe(Epoch(3), Offset(10)));
        assert!(h.observe(Epoch(4), Offset(20)));
        h.persist().unwrap();
        let loaded = EpochHistory::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.entries(), h.entries());
        assert_eq!(
            h.end_offset_for(Epoch(1), Offset(30)),
            Some((Epoch(1), Offset(10)))
        );
        assert_eq!(
            h.end_offset_for(Epoch(2), Offset(30)),
            Some((Epoch(1), Offset(10)))
        );
        assert_eq!(
            h.end_offset_for(Epoch(4), Offset(30)),
            Some((Epoch(4), Offset(30)))
        );
        assert_eq!(h.end_offset_for(Epoch(0), Offset(30)), None);
        assert!(h.truncate(Offset(20)));
        assert_eq!(h.last_epoch(), Some(Epoch(3)));
        assert!(!h.drop_beyond(Offset(10)));
        assert!(h.drop_beyond(Offset(9)));
        assert_eq!(h.last_epoch(), Some(Epoch(1)));
    }

    #[test]
    fn damage_and_unknown_version_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = EpochHistory::empty(dir.path());
        h.observe(Epoch(2), Offset(0));
        h.persist().unwrap();
        let path = dir.path().join(EPOCHS_FILE);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[20] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            EpochHistory::load(dir.path()),
            Err(Error::Corruption { .. })
        ));
        let mut newer = good.clone();
        newer[4] = 2;
        std::fs::write(&path, &newer).unwrap();
        assert!(matches!(
            EpochHistory::load(dir.path()),
            Err(Error::UnknownVersion { found: 2, .. })
        ));
    }
}
