//! The node's few metadata files: atomic private writes, private directories, locks, secrets.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::Error;

pub(crate) fn io_err<'a>(op: &'a str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::Io(format!("{op} {}: {e}", path.display()))
}

/// Write `data` to `path` atomically with the given mode: temp file, fsync, rename, fsync of
/// the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    // The mode given at open applies only to a new file: a leftover temp file keeps its own.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", &tmp))?;
    f.write_all(data).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    if let Some(parent) = path.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", parent))?;
    }
    Ok(())
}

/// Create `dir` and its missing parents with mode 0700.
pub(crate) fn private_dir(dir: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create directory", dir))
}

/// Take an exclusive flock on `path` (created 0600), held until the file is dropped. With
/// `wait` false, `Ok(None)` means another process holds it.
pub(crate) fn lock(path: &Path, wait: bool) -> Result<Option<File>, Error> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_err("open", path))?;
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if !wait && e.kind() == std::io::ErrorKind::WouldBlock {
        return Ok(None);
    }
    Err(io_err("lock", path)(e))
}

/// `n` bytes from the kernel's random source.
pub(crate) fn random_bytes(n: usize) -> Result<Vec<u8>, Error> {
    let mut b = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(io_err("read", Path::new("/dev/urandom")))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_set_the_mode_even_over_a_leftover_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ca.key");
        std::fs::write(dir.path().join("ca.key.tmp"), b"stale").unwrap();
        std::fs::set_permissions(
            dir.path().join("ca.key.tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        write_atomic(&key, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Distinct files never share a temp name.
        write_atomic(&dir.path().join("ca.pem"), b"cert", 0o644).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
    }
}
