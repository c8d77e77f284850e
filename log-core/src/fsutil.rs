//! Small, synchronous file-system helpers for the rare metadata operations (open, roll,
//! truncate, epoch changes). The append and flush hot path never calls these: it goes through
//! io_uring in `log.rs`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};

impl From<durable::Error> for Error {
    fn from(e: durable::Error) -> Error {
        Error::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    }
}

/// fsync a directory so that creations, renames and unlinks inside it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    Ok(durable::sync_dir(dir)?)
}

/// Replace `path` atomically through `<path stem>.tmp` (the name recovery knows): with
/// `durable`, the file and then its directory are fsync'd.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let how = durable::Atomic {
        tmp: &tmp,
        mode: 0o600,
        sync: durable,
    };
    Ok(durable::write_atomic(path, bytes, how)?)
}

/// Overwrite `[from, to)` of a file with zeros and fdatasync it.
pub(crate) fn zero_range(file: &File, path: &Path, from: u64, to: u64) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    let mut pos = from;
    while pos < to {
        let n = CHUNK.min((to - pos) as usize);
        file.write_all_at(&zeros[..n], pos)
            .map_err(Error::io("write zeros", path))?;
        pos += n as u64;
    }
    file.sync_data().map_err(Error::io("fdatasync", path))
}

/// Tries at taking a directory lock before reporting it held (2 ms apart): a child forked by
/// any thread of this process shares the lock until it execs.
const LOCK_ATTEMPTS_MAX: u32 = 100;

/// Take an exclusive advisory lock on `dir/LOCK`, held as long as the returned file is open.
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    durable::lock(&dir.join("LOCK"), durable::Wait::Tries(LOCK_ATTEMPTS_MAX))?
        .ok_or_else(|| Error::Locked { path: dir.into() })
}

/// Create a directory with mode 0700 (and its parents), durably.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    Ok(durable::private_dir(dir)?)
}
