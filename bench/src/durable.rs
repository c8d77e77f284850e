//! `replog-bench durable`: the ways to make one small write durable with io_uring, side by side
//! in one run, one at a time (queue depth 1) into pre-written files as log-core's segments are:
//!
//! - `write+fdatasync`: a buffered write, then an fdatasync once it completed (log-core's path
//!   today: two operations, each awaited);
//! - `write+fdatasync linked`: the same two operations submitted together, the fdatasync linked
//!   to the write (`IOSQE_IO_LINK`): one submission, one wait;
//! - `write RWF_DSYNC`: one buffered write that returns once durable (`pwritev2`'s
//!   `RWF_DSYNC`);
//! - `O_DSYNC write`: one write to a file opened with `O_DSYNC`;
//! - `O_DIRECT|O_DSYNC write`: one aligned write that bypasses the page cache and returns once
//!   durable;
//!
//! each also with `IOSQE_ASYNC` (forced to an io-wq worker thread), and with the number of
//! requests io_uring handed to io-wq worker threads per write, counted by the kernel's
//! `io_uring:io_uring_queue_async_work` tracepoint when tracefs can be used (root). Then the
//! same kinds of write through tokio-uring and glommio ([`crate::runtimes`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};
use serde::Serialize;

use crate::hist::{self, Summary};

/// How a write is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    WriteThenFdatasync,
    WriteFdatasyncLinked,
    RwfDsync,
    ODsync,
    ODirectODsync,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::WriteThenFdatasync,
        Mode::WriteFdatasyncLinked,
        Mode::RwfDsync,
        Mode::ODsync,
        Mode::ODirectODsync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::WriteThenFdatasync => "write+fdatasync",
            Mode::WriteFdatasyncLinked => "write+fdatasync linked",
            Mode::RwfDsync => "write RWF_DSYNC",
            Mode::ODsync => "O_DSYNC write",
            Mode::ODirectODsync => "O_DIRECT|O_DSYNC write",
        }
    }

    fn open_flags(self) -> i32 {
        match self {
            Mode::ODsync => libc::O_DSYNC,
            Mode::ODirectODsync => libc::O_DIRECT | libc::O_DSYNC,
            _ => 0,
        }
    }
}

/// One mode's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What submits the requests: the io_uring crate directly (`io_uring`), or a runtime.
    pub runtime: String,
    pub mode: String,
    /// Every request forced to an io-wq worker (`IOSQE_ASYNC`).
    pub forced_async: bool,
    pub latency: Summary,
    pub writes_per_sec: f64,
    /// Requests io_uring queued to io-wq worker threads per write (None: not counted).
    pub io_wq_per_write: Option<f64>,
}

/// A 4096-aligned buffer (O_DIRECT needs aligned memory, offset and length).
pub(crate) struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the memory stays where it is for the buffer's life (it is never reallocated), and
// all of it is initialised in `new`.
unsafe impl tokio_uring::buf::IoBuf for Aligned {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr
    }
    fn bytes_init(&self) -> usize {
        self.layout.size()
    }
    fn bytes_total(&self) -> usize {
        self.layout.size()
    }
}

impl Aligned {
    pub(crate) fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("a valid layout");
        // SAFETY: the layout has a non-zero size (len >= 1 is checked by the caller).
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null(), "out of memory");
        // SAFETY: ptr points to len writable bytes.
        unsafe { std::ptr::write_bytes(ptr, 0xA5, len) };
        Aligned { ptr, layout }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The kernel's count of requests queued to io-wq, from tracefs, while it is switched on.
pub struct Punts {
    root: PathBuf,
    was_on: String,
    /// tracefs was mounted here (and is unmounted at the end).
    mounted: bool,
}

impl Punts {
    const EVENT: &'static str = "events/io_uring/io_uring_queue_async_work";

    /// Switch the tracepoint on (mounting tracefs if needed); None if that cannot be done.
    fn start() -> Option<Punts> {
        let root = PathBuf::from("/sys/kernel/tracing");
        let mut mounted = false;
        if !root.join(Self::EVENT).exists() {
            mounted = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
                .output()
                .is_ok_and(|o| o.status.success());
        }
        // Unmounted again when dropped, also when the tracepoint cannot be used.
        let mut punts = Punts {
            root: root.clone(),
            was_on: String::new(),
            mounted,
        };
        let enable = root.join(Self::EVENT).join("enable");
        let was_on = std::fs::read_to_string(&enable).ok()?;
        std::fs::write(root.join("trace"), "").ok()?;
        std::fs::write(&enable, "1").ok()?;
        punts.was_on = was_on;
        Some(punts)
    }

    /// Clear what was counted.
    pub(crate) fn clear(&self) {
        let _ = std::fs::write(self.root.join("trace"), "");
    }

    /// Events of this process counted since the last clear.
    pub(crate) fn count(&self) -> u64 {
        let pid = std::process::id().to_string();
        std::fs::read_to_string(self.root.join("trace"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains("io_uring_queue_async_work"))
            .filter(|l| {
                // "  comm-PID  [cpu] ...": the task's pid follows the last '-' before '['.
                l.split('[')
                    .next()
                    .is_some_and(|t| t.trim().rsplit('-').next().is_some_and(|p| p.trim() == pid))
            })
            .count() as u64
    }
}

impl Drop for Punts {
    fn drop(&mut self) {
        let enable = self.root.join(Self::EVENT).join("enable");
        if !self.was_on.is_empty() {
            let _ = std::fs::write(enable, self.was_on.trim());
            let _ = std::fs::write(self.root.join("trace"), "");
        }
        if self.mounted {
            let _ = std::process::Command::new("umount")
                .arg(&self.root)
                .output();
        }
    }
}

/// A file of `len` bytes, zero-filled and synced ([`crate::floor`]'s), opened again with
/// `flags` added.
pub(crate) fn prewritten(path: &Path, len: usize, flags: i32) -> Result<File, String> {
    drop(crate::floor::prewritten(path, len)?);
    File::options()
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| format!("open {} with flags {flags:#x}: {e}", path.display()))
}

/// Where the file written for the mode `name` goes in `dir`.
pub(crate) fn file_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(
        "durable-{}",
        name.replace([' ', '|', '+', '.'], "-")
    ))
}

/// Submit `entries` and wait for all their completions; an error names the failed one.
fn run(ring: &mut IoUring, entries: &[squeue::Entry]) -> Result<(), String> {
    for e in entries {
        // SAFETY: every buffer an entry points to outlives this call (the caller's).
        unsafe { ring.submission().push(e) }.map_err(|_| "the submission queue is full")?;
    }
    ring.submit_and_wait(entries.len())
        .map_err(|e| format!("io_uring_enter: {e}"))?;
    let mut done = 0;
    for cqe in ring.completion() {
        done += 1;
        if cqe.result() < 0 {
            let err = std::io::Error::from_raw_os_error(-cqe.result());
            return Err(format!("request {}: {err}", cqe.user_data()));
        }
    }
    if done != entries.len() {
        return Err(format!("{done} completions for {} requests", entries.len()));
    }
    Ok(())
}

/// Measure `mode`: `samples` writes of `block` bytes (after `warmup` unmeasured ones) at
/// consecutive positions of a new pre-written file in `dir`.
fn measure(
    dir: &Path,
    mode: Mode,
    forced_async: bool,
    block: usize,
    warmup: usize,
    samples: usize,
    punts: Option<&Punts>,
) -> Result<Row, String> {
    let path = file_path(dir, mode.name());
    let n = warmup + samples;
    let file = prewritten(&path, n * block, mode.open_flags());
    let result = file.and_then(|file| {
        let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
        let buf = Aligned::new(block);
        let fd = types::Fd(file.as_raw_fd());
        let flags = if forced_async {
            squeue::Flags::ASYNC
        } else {
            squeue::Flags::empty()
        };
        let mut h = hist::new();
        let mut punted = 0;
        let mut started = Instant::now();
        for i in 0..n {
            if i == warmup {
                if let Some(p) = punts {
                    p.clear();
                }
                started = Instant::now();
            }
            let write = |rw_flags: types::RwFlags| {
                opcode::Write::new(fd, buf.ptr, block as u32)
                    .offset((i * block) as u64)
                    .rw_flags(rw_flags)
                    .build()
                    .flags(flags)
                    .user_data(1)
            };
            let fdatasync = opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(flags)
                .user_data(2);
            let t = Instant::now();
            match mode {
                Mode::WriteThenFdatasync => {
                    run(&mut ring, &[write(0)])?;
                    run(&mut ring, &[fdatasync])?;
                }
                Mode::WriteFdatasyncLinked => {
                    let w = write(0).flags(squeue::Flags::IO_LINK);
                    run(&mut ring, &[w, fdatasync])?;
                }
                Mode::RwfDsync => run(&mut ring, &[write(libc::RWF_DSYNC)])?,
                Mode::ODsync | Mode::ODirectODsync => run(&mut ring, &[write(0)])?,
            }
            if i >= warmup {
                hist::record(&mut h, t.elapsed().as_nanos() as u64);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        if let Some(p) = punts {
            punted = p.count();
        }
        Ok(Row {
            runtime: "io_uring".to_string(),
            mode: mode.name().to_string(),
            forced_async,
            latency: Summary::of(&h),
            writes_per_sec: samples as f64 / secs,
            io_wq_per_write: punts.map(|_| punted as f64 / samples as f64),
        })
    });
    let _ = std::fs::remove_file(&path);
    result
}

/// Every mode, without and with `IOSQE_ASYNC`.
pub fn measure_all(
    dir: &Path,
    block: usize,
    warmup: usize,
    samples: usize,
) -> Result<Vec<Row>, String> {
    if block == 0 || block % 4096 != 0 {
        return Err(format!(
            "usage: the block ({block}) must be a multiple of 4096"
        ));
    }
    // One run at a time: another run's start and end clear and switch off the tracepoint.
    let punts = Punts::start();
    let mut rows = Vec::new();
    for forced in [false, true] {
        for mode in Mode::ALL {
            rows.push(measure(
                dir,
                mode,
                forced,
                block,
                warmup,
                samples,
                punts.as_ref(),
            )?);
        }
    }
    // The same kinds of write through the runtimes a node could run on.
    for way in crate::runtimes::Way::ALL {
        rows.push(crate::runtimes::measure(
            dir,
            way,
            block,
            warmup,
            samples,
            punts.as_ref(),
        )?);
    }
    Ok(rows)
}

/// The table.
pub fn table(rows: &[Row], block: usize) -> String {
    let mut s = format!(
        "{block}-byte writes made durable one at a time, pre-written files\n{:<16} {:<24} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "runtime", "mode", "async", "p50 us", "p99 us", "p99.9 us", "writes/s", "io-wq/w"
    );
    for r in rows {
        let punts = r
            .io_wq_per_write
            .map_or("-".to_string(), |p| format!("{p:.2}"));
        s += &format!(
            "{:<16} {:<24} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>9}\n",
            r.runtime,
            r.mode,
            if r.forced_async { "forced" } else { "-" },
            r.latency.p50_us,
            r.latency.p99_us,
            r.latency.p999_us,
            r.writes_per_sec,
            punts
        );
    }
    s
}
