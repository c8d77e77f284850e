//! The node's few metadata files: atomic private writes, private directories, locks, secrets.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::Error;

pub(crate) fn io_err<'a>(op: &'a str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    move |source| crate::io(format!("{op} {}", path.display()))(source)
}

/// Write `data` to `path` atomically with the given mode (`durable::write_atomic`: temp file,
/// fsync, rename, fsync of the directory).
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = durable::tmp_beside(path);
    Ok(durable::write_atomic(
        path,
        data,
        durable::Atomic::durable(&tmp, mode),
    )?)
}

/// Create `dir` and its missing parents with mode 0700, durably.
pub(crate) fn private_dir(dir: &Path) -> Result<(), Error> {
    Ok(durable::private_dir(dir)?)
}

/// Take an exclusive flock on `path` (created 0600), held until the file is dropped. With
/// `wait` false, `Ok(None)` means another process holds it.
pub(crate) fn lock(path: &Path, wait: bool) -> Result<Option<File>, Error> {
    let how = if wait {
        durable::Wait::Block
    } else {
        durable::Wait::Tries(0)
    };
    Ok(durable::lock(path, how)?)
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
    use std::os::unix::fs::PermissionsExt;

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
