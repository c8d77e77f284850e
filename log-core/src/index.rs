//! The sparse offset index of one segment, and its file `<base-offset>.idx`.
//!
//! In memory: one entry (offset relative to the segment base, byte position) per
//! `index_interval_bytes` of data. On disk only for sealed segments, written when the segment is
//! sealed. The file is derived data: it is written without fsync, carries a crc32c, and is
//! rebuilt by scanning the segment whenever it is missing, damaged or disagrees with the segment.

use std::path::Path;

use crate::fsutil;
use crate::types::Offset;

const INDEX_MAGIC: u32 = u32::from_le_bytes(*b"RPLI");
const INDEX_VERSION: u32 = 1;
const INDEX_HEADER_LEN: usize = 48;
const ENTRY_LEN: usize = 8;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SparseIndex {
    /// (offset - base, position), both strictly increasing.
    entries: Vec<(u32, u32)>,
}

impl SparseIndex {
    /// Record that a batch starting at `rel_offset` lives at `position`, if the last entry is at
    /// least `interval` bytes behind.
    pub(crate) fn maybe_add(&mut self, rel_offset: u32, position: u32, interval: u32) {
        match self.entries.last() {
            Some(&(last_rel, last_pos)) => {
                debug_assert!(rel_offset > last_rel && position > last_pos);
                if position - last_pos >= interval {
                    self.entries.push((rel_offset, position));
                }
            }
            None => self.entries.push((rel_offset, position)),
        }
    }

    /// A byte position at or before the batch holding `rel_offset`: scanning forward from it
    /// finds that batch.
    pub(crate) fn lookup(&self, rel_offset: u32) -> u32 {
        match self.entries.partition_point(|&(rel, _)| rel <= rel_offset) {
            0 => 0,
            i => self.entries[i - 1].1,
        }
    }

    /// Drop entries at or after `position`.
    pub(crate) fn truncate(&mut self, position: u32) {
        let keep = self.entries.partition_point(|&(_, pos)| pos < position);
        self.entries.truncate(keep);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// What a sealed segment's index file records about the segment besides the entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SealedMeta {
    pub base: Offset,
    pub next_offset: Offset,
    pub data_len: u64,
    pub max_timestamp_us: u64,
    pub index: SparseIndex,
}

pub(crate) fn encode(meta: &SealedMeta) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_LEN + meta.index.entries.len() * ENTRY_LEN);
    out.extend_from_slice(&INDEX_MAGIC.to_le_bytes());
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&meta.base.0.to_le_bytes());
    out.extend_from_slice(&meta.next_offset.0.to_le_bytes());
    out.extend_from_slice(&meta.data_len.to_le_bytes());
    out.extend_from_slice(&meta.max_timestamp_us.to_le_bytes());
    out.extend_from_slice(&(meta.index.entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for &(rel, pos) in &meta.index.entries {
        out.extend_from_slice(&rel.to_le_bytes());
        out.extend_from_slice(&pos.to_le_bytes());
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..44]), &out[INDEX_HEADER_LEN..]);
    out[44..48].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Why an index file was not used (it is then rebuilt from the segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IndexProblem {
    Missing,
    Damaged,
}

/// Parse and check an index file against the segment it describes.
pub(crate) fn decode(
    bytes: &[u8],
    base: Offset,
    segment_len: u64,
) -> Result<SealedMeta, IndexProblem> {
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
    if bytes.len() < INDEX_HEADER_LEN || u32_at(0) != INDEX_MAGIC || u32_at(4) != INDEX_VERSION {
        return Err(IndexProblem::Damaged);
    }
    let count = u32_at(40) as usize;
    if bytes.len() != INDEX_HEADER_LEN + count * ENTRY_LEN {
        return Err(IndexProblem::Damaged);
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..44]), &bytes[INDEX_HEADER_LEN..]);
    if crc != u32_at(44) {
        return Err(IndexProblem::Damaged);
    }
    let meta = SealedMeta {
        base: Offset(u64_at(8)),
        next_offset: Offset(u64_at(16)),
        data_len: u64_at(24),
        max_timestamp_us: u64_at(32),
        index: SparseIndex {
            entries: (0..count)
                .map(|i| {
                    let at = INDEX_HEADER_LEN + i * ENTRY_LEN;
                    (u32_at(at), u32_at(at + 4))
                })
                .collect(),
        },
    };
    let ordered = meta
        .index
        .entries
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
    let in_bounds = meta
        .index
        .entries
        .last()
        .is_none_or(|&(_, pos)| u64::from(pos) < meta.data_len);
    if meta.base != base
        || meta.next_offset <= base
        || meta.data_len > segment_len
        || meta.data_len == 0
        || !ordered
        || !in_bounds
    {
        return Err(IndexProblem::Damaged);
    }
    Ok(meta)
}

pub(crate) fn load(
    path: &Path,
    base: Offset,
    segment_len: u64,
) -> Result<SealedMeta, IndexProblem> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes, base, segment_len),
        Err(_) => Err(IndexProblem::Missing),
    }
}

/// Write the index file of a sealed segment (derived data: atomically, without fsync).
pub(crate) fn store(path: &Path, meta: &SealedMeta) -> crate::Result<()> {
    fsutil::write_atomic(path, &encode(meta), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> SealedMeta {
        let mut index = SparseIndex::default();
        index.maybe_add(0, 0, 100);
        index.maybe_add(3, 60, 100);
        index.maybe_add(5, 120, 100);
        index.maybe_add(9, 250, 100);
        SealedMeta {
            base: Offset(10),
            next_offset: Offset(30),
            data_len: 300,
            max_timestamp_us: 5,
            index,
        }
    }

    #[test]
    fn sparse_entries_and_lookup() {
        let m = meta();
        assert_eq!(m.index.len(), 3);
        assert_eq!(m.index.lookup(0), 0);
        assert_eq!(m.index.lookup(4), 0);
        assert_eq!(m.index.lookup(5), 120);
        assert_eq!(m.index.lookup(100), 250);
        let mut t = m.index.clone();
        t.truncate(120);
        assert_eq!(t.lookup(100), 0);
    }

    #[test]
    fn round_trip_and_every_damage_is_detected() {
        let m = meta();
        let bytes = encode(&m);
        assert_eq!(decode(&bytes, Offset(10), 1000), Ok(m.clone()));
        assert_eq!(decode(&bytes, Offset(11), 1000), Err(IndexProblem::Damaged));
        assert_eq!(decode(&bytes, Offset(10), 299), Err(IndexProblem::Damaged));
        assert_eq!(
            decode(&bytes[..bytes.len() - 1], Offset(10), 1000),
            Err(IndexProblem::Damaged)
        );
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert_eq!(
                decode(&b, Offset(10), 1000),
                Err(IndexProblem::Damaged),
                "byte {i}"
            );
        }
    }
}
