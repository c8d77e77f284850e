//! Application snapshots on disk: `<data_dir>/snapshots/<log>/<offset, 20 digits>.snap`.
//!
//! A snapshot is opaque bytes tied to a log offset (the application's state reflecting every
//! record below it). The file holds a header and the data in chunks of [`CHUNK_BYTES`], each
//! followed by its crc32c; the header carries the crc32c of the whole data and its own crc.
//! A file is written to a temporary name, fsync'd, renamed into place and the directory
//! fsync'd: a snapshot is installed whole or not at all, and older snapshots of the log are
//! deleted only after the new one is durable. Every load verifies every chunk and the whole.
//!
//! ```text
//! header (36 bytes): magic "RLSNAP01" | offset u64 | data_len u64 | data_crc32c u32 |
//!                    chunk_bytes u32 | header_crc32c u32 (of the preceding 32 bytes)
//! chunks: data[i*chunk..(i+1)*chunk] | crc32c u32, ...
//! ```

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};

use crate::files::io_err;
use crate::Error;

const MAGIC: &[u8; 8] = b"RLSNAP01";
const HEADER_LEN: usize = 36;
/// Size of the checksummed chunks of a snapshot file.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The directory of a log's snapshots.
pub fn dir(data_dir: &Path, log: &str) -> PathBuf {
    data_dir.join("snapshots").join(log)
}

fn file_name(offset: u64) -> String {
    format!("{offset:020}.snap")
}

/// The offsets of the snapshots present, newest last (by file name; contents are checked on
/// load).
fn offsets(dir: &Path) -> Result<Vec<u64>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read", dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(io_err("read", dir))?;
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".snap")) else {
            continue;
        };
        if stem.len() == 20 {
            if let Ok(o) = stem.parse() {
                out.push(o);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The offset of the latest snapshot of the log, if any.
pub fn latest(dir: &Path) -> Result<Option<u64>, Error> {
    Ok(offsets(dir)?.last().copied())
}

/// Store a snapshot durably and atomically, then delete older ones.
pub fn write(dir: &Path, offset: u64, data: &[u8]) -> Result<(), Error> {
    crate::files::private_dir(dir)?;
    let crc = crc32c::crc32c(data);
    let mut out = Vec::with_capacity(HEADER_LEN + data.len() + 4 * (data.len() / CHUNK_BYTES + 1));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(CHUNK_BYTES as u32).to_le_bytes());
    let hcrc = crc32c::crc32c(&out);
    out.extend_from_slice(&hcrc.to_le_bytes());
    for chunk in data.chunks(CHUNK_BYTES) {
        out.extend_from_slice(chunk);
        out.extend_from_slice(&crc32c::crc32c(chunk).to_le_bytes());
    }
    let path = dir.join(file_name(offset));
    let tmp = dir.join(format!(".{}.tmp", file_name(offset)));
    durable::write_atomic(&path, &out, durable::Atomic::durable(&tmp, 0o644))?;
    for old in offsets(dir)?.into_iter().filter(|&o| o < offset) {
        let p = dir.join(file_name(old));
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(path = %p.display(), error = %e, "could not remove an older snapshot");
        }
    }
    Ok(())
}

/// Read and verify the snapshot at `offset`: (data, crc32c of the data).
pub fn load(dir: &Path, offset: u64) -> Result<(Bytes, u32), Error> {
    let path = dir.join(file_name(offset));
    let raw = std::fs::read(&path).map_err(io_err("read", &path))?;
    let bad = |why: &str| Error::DamagedSnapshot {
        path: path.clone(),
        why: why.to_string(),
    };
    if raw.len() < HEADER_LEN || &raw[..8] != MAGIC {
        return Err(bad("no snapshot header"));
    }
    let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().unwrap());
    if crc32c::crc32c(&raw[..32]) != u32_at(32) {
        return Err(bad("header checksum"));
    }
    let (stored_offset, len, crc, chunk) = (u64_at(8), u64_at(16), u32_at(24), u32_at(28));
    if stored_offset != offset || chunk == 0 {
        return Err(bad("header fields"));
    }
    let len = usize::try_from(len).map_err(|_| bad("length"))?;
    let chunks = len.div_ceil(chunk as usize);
    if raw.len() != HEADER_LEN + len + 4 * chunks {
        return Err(bad("length does not match the file"));
    }
    let mut data = BytesMut::with_capacity(len);
    let mut pos = HEADER_LEN;
    while data.len() < len {
        let n = (chunk as usize).min(len - data.len());
        let piece = &raw[pos..pos + n];
        if crc32c::crc32c(piece) != u32_at(pos + n) {
            return Err(bad(&format!("chunk at data byte {}", data.len())));
        }
        data.extend_from_slice(piece);
        pos += n + 4;
    }
    if crc32c::crc32c(&data) != crc {
        return Err(bad("whole-data checksum"));
    }
    Ok((data.freeze(), crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_replaces_older_and_detects_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("s");
        assert_eq!(latest(&d).unwrap(), None);
        let big: Vec<u8> = (0..(CHUNK_BYTES * 2 + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        write(&d, 5, b"small").unwrap();
        write(&d, 9, &big).unwrap();
        assert_eq!(latest(&d).unwrap(), Some(9));
        assert!(
            !d.join(file_name(5)).exists(),
            "older snapshots go once a newer is durable"
        );
        let (data, crc) = load(&d, 9).unwrap();
        assert_eq!(&data[..], &big[..]);
        assert_eq!(crc, crc32c::crc32c(&big));
        write(&d, 10, b"").unwrap();
        assert_eq!(&load(&d, 10).unwrap().0[..], b"");

        // A flipped bit in the second chunk.
        write(&d, 11, &big).unwrap();
        let p = d.join(file_name(11));
        let mut raw = std::fs::read(&p).unwrap();
        raw[HEADER_LEN + CHUNK_BYTES + 4 + 3] ^= 1;
        std::fs::write(&p, &raw).unwrap();
        let err = load(&d, 11).unwrap_err().to_string();
        assert!(err.contains("chunk at data byte 1048576"), "{err}");
        // A truncated file.
        std::fs::write(&p, &raw[..raw.len() - 1]).unwrap();
        assert!(load(&d, 11).unwrap_err().to_string().contains("length"));
    }
}
