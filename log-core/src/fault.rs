//! Deterministic I/O fault injection for tests (cargo feature `fault-injection`, never in a
//! release build). The real operation runs first; then the injected error is returned as if the
//! kernel had reported it, which is exactly the fsyncgate situation: the caller must not trust
//! that anything was made durable.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

struct Fault {
    dir: PathBuf,
    op: &'static str,
    /// Operations to let pass before failing.
    skip: u32,
}

static FAULTS: Mutex<Vec<Fault>> = Mutex::new(Vec::new());

/// Make the `op` ("write" or "fdatasync") of the log in `dir` fail with EIO after `skip`
/// successful ones. Fires once.
pub fn inject(dir: &Path, op: &'static str, skip: u32) {
    FAULTS.lock().unwrap().push(Fault {
        dir: dir.to_path_buf(),
        op,
        skip,
    });
}

pub(crate) fn check(dir: &Path, op: &'static str) -> io::Result<()> {
    let mut faults = FAULTS.lock().unwrap();
    let Some(i) = faults.iter().position(|f| f.dir == dir && f.op == op) else {
        return Ok(());
    };
    if faults[i].skip > 0 {
        faults[i].skip -= 1;
        return Ok(());
    }
    faults.remove(i);
    Err(io::Error::from_raw_os_error(libc::EIO))
}
