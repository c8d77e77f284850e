//! Durable metadata files: the few synchronous file-system operations of replog, outside the
//! io_uring append path (node identity, keys, certificates, manifests, indexes, epoch history,
//! the controller's Raft files, quarantine reports, snapshots).
//!
//! - [`write_atomic`]: write a temporary file, fsync it, rename it over the target, fsync the
//!   directory, so a crash leaves the old contents or the new, never a mix (R6).
//! - [`sync_dir`]: make creations, renames and unlinks in a directory durable.
//! - [`private_dir`]: create a directory (mode 0700) and its parents durably.
//! - [`lock`]: an exclusive advisory lock held while the returned file is open.
//!
//! Every error names the operation and the path ([`Error`]); the caller decides what a failure
//! means (a failed fsync is never retried by anything here).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A file-system call that failed: which, on what, and why.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct Error {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The temporary file beside `path` that [`write_atomic`] writes first: `<name>.tmp`.
pub fn tmp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// How [`write_atomic`] writes.
#[derive(Clone, Copy, Debug)]
pub struct Atomic<'a> {
    /// The temporary file (in the same directory as the target).
    pub tmp: &'a Path,
    /// The file's mode (set on a leftover temporary file too).
    pub mode: u32,
    /// fsync the file before the rename and the directory after it. Off only for files that
    /// are rebuilt when lost (a segment's index).
    pub sync: bool,
}

impl<'a> Atomic<'a> {
    /// A durable replacement through `tmp`, with `mode`.
    pub fn durable(tmp: &'a Path, mode: u32) -> Atomic<'a> {
        Atomic {
            tmp,
            mode,
            sync: true,
        }
    }
}

/// Replace `path` with `bytes` atomically: write `how.tmp`, fsync it, rename it over `path`,
/// fsync the directory (without `how.sync`, no fsyncs).
pub fn write_atomic(path: &Path, bytes: &[u8], how: Atomic<'_>) -> Result<()> {
    let tmp = how.tmp;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(how.mode)
        .open(tmp)
        .map_err(err("create", tmp))?;
    // The mode given at open applies only to a new file: a leftover temp file keeps its own.
    f.set_permissions(std::fs::Permissions::from_mode(how.mode))
        .map_err(err("chmod", tmp))?;
    f.write_all(bytes).map_err(err("write", tmp))?;
    if how.sync {
        f.sync_all().map_err(err("fsync", tmp))?;
    }
    drop(f);
    std::fs::rename(tmp, path).map_err(err("rename", tmp))?;
    if how.sync {
        sync_parent(path)?;
    }
    Ok(())
}

/// fsync directory `dir`, so that creations, renames and unlinks inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(err("open directory", dir))?;
    f.sync_all().map_err(err("fsync directory", dir))
}

/// fsync the directory holding `path` (the current directory for a bare name).
pub fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Create `dir` and its missing parents with mode 0700, and fsync the parent of `dir` and of
/// each directory created, so they survive a crash (also when an earlier attempt created `dir`
/// and crashed before its parent was synced).
pub fn private_dir(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .skip(1)
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err("create directory", dir))?;
    sync_parent(dir)?;
    for created in missing {
        sync_parent(created)?;
    }
    Ok(())
}

/// How [`lock`] waits for a lock another holder has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Until it is free.
    Block,
    /// Up to this many more tries, 2 ms apart (a child forked by any thread of this process
    /// shares the lock's open file description until it execs, so a lock held only by such a
    /// child is worth a few tries).
    Tries(u32),
}

/// Take an exclusive advisory lock (flock) on `path` (created with mode 0600), held as long as
/// the returned file is open. `Ok(None)`: another holder has it (after `wait`).
pub fn lock(path: &Path, wait: Wait) -> Result<Option<File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(err("create lock file", path))?;
    let (op, tries) = match wait {
        Wait::Block => (libc::LOCK_EX, 0),
        Wait::Tries(n) => (libc::LOCK_EX | libc::LOCK_NB, n),
    };
    for attempt in 0..=tries {
        // SAFETY: flock on a descriptor this function owns; released when the file is closed.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(Some(f));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(err("flock", path)(e));
        }
        if attempt < tries {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_set_the_mode_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let tmp = tmp_beside(&path);
        assert_eq!(tmp, dir.path().join("key.tmp"));
        // A leftover temporary file with another mode.
        std::fs::write(&tmp, b"old").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"secret", Atomic::durable(&tmp, 0o600)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert!(!tmp.exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write_atomic(&path, b"new", Atomic::durable(&tmp, 0o600)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn errors_name_the_operation_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("f");
        let e = write_atomic(&path, b"x", Atomic::durable(&tmp_beside(&path), 0o600)).unwrap_err();
        assert_eq!(e.op, "create");
        assert!(e.to_string().contains("missing/f.tmp"), "{e}");
    }

    #[test]
    fn private_dirs_are_created_with_their_parents_and_mode_0700() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a").join("b");
        private_dir(&deep).unwrap();
        let mode = std::fs::metadata(&deep).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        private_dir(&deep).unwrap();
    }

    #[test]
    fn a_held_lock_is_reported_held_and_is_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("LOCK");
        let held = lock(&path, Wait::Tries(0)).unwrap().unwrap();
        // flock locks belong to the open file description: a second open is another holder.
        assert!(lock(&path, Wait::Tries(2)).unwrap().is_none());
        drop(held);
        assert!(lock(&path, Wait::Block).unwrap().is_some());
    }
}
