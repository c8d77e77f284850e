//! Small, synchronous file-system helpers for the rare metadata operations (open, roll,
//! truncate, epoch changes). The append and flush hot path never calls these: it goes through
//! io_uring in `log.rs`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// fsync a directory so that creations, renames and unlinks inside it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(Error::io("open directory", dir))?;
    f.sync_all().map_err(Error::io("fsync directory", dir))
}

/// Replace `path` atomically: write `path.tmp`, fsync it, rename over `path`, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io("create", &tmp))?;
    f.write_all(bytes).map_err(Error::io("write", &tmp))?;
    if durable {
        f.sync_all().map_err(Error::io("fsync", &tmp))?;
    }
    drop(f);
    fs::rename(&tmp, path).map_err(Error::io("rename", path))?;
    if durable {
        sync_dir(path.parent().expect("file in a directory"))?;
    }
    Ok(())
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

/// Tries at taking a directory lock before reporting it held (2 ms apart).
const LOCK_ATTEMPTS_MAX: u32 = 100;

/// Take an exclusive advisory lock on `dir/LOCK`, held as long as the returned file is open.
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(Error::io("create lock file", &path))?;
    // A child forked by any thread of this process shares the lock's open file description
    // until it execs (the descriptor is close-on-exec), so a lock held only by such a child is
    // retried briefly before it counts as held by someone else.
    for attempt in 0.. {
        // SAFETY: flock on a valid, owned descriptor.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::Io {
                op: "flock",
                path,
                source: err,
            });
        }
        if attempt == LOCK_ATTEMPTS_MAX {
            return Err(Error::Locked { path: dir.into() });
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Ok(f)
}

/// Create a directory with mode 0700 (and its parents), then fsync its parent.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io("create directory", dir))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

use std::os::unix::fs::DirBuilderExt;
