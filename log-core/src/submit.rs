//! Submitting a log's disk operations to the kernel the moment they are queued.
//!
//! tokio-uring pushes an operation onto its ring's submission queue when the operation is first
//! polled, but hands the queue to the kernel (`io_uring_enter`) only when its thread is about to
//! park. Everything else that is ready on the thread runs first: on a leader, the replication
//! frames to the followers and the QUIC packets that wake other processes go out before the
//! write that the append waits for has even started.
//!
//! [`start`] runs a future on a tokio-uring runtime whose ring this thread knows, and
//! [`Now`] wraps a disk operation so that it is submitted as soon as it is queued: one
//! `io_uring_enter(to_submit)` on the same ring, from the same thread. The kernel takes
//! whatever the submission queue holds, and tokio-uring's own submit at park then finds fewer
//! (or no) entries left; completions are delivered through tokio-uring as before.
//!
//! tokio-uring 0.5 exposes neither its ring's file descriptor nor a submit call, so [`start`]
//! finds the descriptor as the one io_uring instance (`anon_inode:[io_uring]` in
//! `/proc/self/fd`) that appeared while the runtime was built, with runtime creation
//! serialised across the process. If it cannot tell (no `/proc`, or not exactly one new
//! ring), the thread keeps tokio-uring's behaviour: operations go out when it parks.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

thread_local! {
    /// This thread's tokio-uring ring, when [`start`] found it.
    static RING: Cell<Option<RawFd>> = const { Cell::new(None) };
    /// Whether [`Now`] submits at once on this thread (it always does where the ring is
    /// known, unless a benchmark turned it off with [`set_enabled`]).
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Serialises runtime creation, so that the ring that appears belongs to this thread.
static CREATING: Mutex<()> = Mutex::new(());

/// The io_uring instances open in this process.
fn rings() -> Option<BTreeSet<RawFd>> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir("/proc/self/fd").ok()? {
        let entry = entry.ok()?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // closed while listing
        };
        if target.as_os_str() == "anon_inode:[io_uring]" {
            if let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.insert(fd);
            }
        }
    }
    Some(out)
}

/// Run `fut` on a new tokio-uring runtime on this thread (as `tokio_uring::start`), with its
/// disk operations submitted as soon as they are queued (see the module doc).
pub fn start<F: Future>(fut: F) -> F::Output {
    let (rt, ring) = {
        let _one_at_a_time = CREATING.lock().unwrap_or_else(|p| p.into_inner());
        let before = rings();
        let rt = tokio_uring::Runtime::new(&tokio_uring::builder())
            .expect("creating the tokio-uring runtime");
        let ring = match (before, rings()) {
            (Some(before), Some(after)) => {
                let mut new = after.difference(&before);
                match (new.next(), new.next()) {
                    (Some(&fd), None) => Some(fd),
                    _ => None,
                }
            }
            _ => None,
        };
        (rt, ring)
    };
    if ring.is_none() {
        tracing::debug!("this thread's io_uring ring is unknown: operations go out when it parks");
    }
    let previous = RING.replace(ring);
    let out = rt.block_on(fut);
    drop(rt);
    RING.set(previous);
    out
}

/// Turn submitting at once on or off on this thread (for measuring what it is worth).
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// Hand everything queued on this thread's ring to the kernel now (after tokio-uring's
/// `UnsubmittedOneshot::submit`, which queues its operation right away).
pub(crate) fn queued() {
    let Some(fd) = RING.get() else { return };
    if !ENABLED.get() {
        return;
    }
    // to_submit is an upper bound: the kernel submits what the queue holds, at most that many.
    // The queue of a tokio-uring ring has 256 entries.
    // SAFETY: io_uring_enter on this thread's own ring, without a signal mask argument.
    unsafe {
        libc::syscall(
            libc::SYS_io_uring_enter,
            fd,
            u32::MAX as libc::c_uint,
            0 as libc::c_uint,
            0 as libc::c_uint,
            std::ptr::null::<libc::c_void>(),
            0usize,
        );
    }
    // An error (EBUSY with the completion queue full, EINTR) leaves the entries queued:
    // tokio-uring submits them when the thread parks, as it would have anyway.
}

/// A disk operation submitted to the kernel as soon as its first poll has queued it.
pub(crate) struct Now<F> {
    inner: F,
    submitted: bool,
}

impl<F> Now<F> {
    pub(crate) fn new(inner: F) -> Self {
        Now {
            inner,
            submitted: false,
        }
    }
}

impl<F: Future + Unpin> Future for Now<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let out = Pin::new(&mut self.inner).poll(cx);
        if out.is_pending() && !self.submitted {
            self.submitted = true;
            queued();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_finds_this_threads_ring() {
        let together = std::sync::Arc::new(std::sync::Barrier::new(3));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let together = together.clone();
                std::thread::spawn(move || {
                    start(async move {
                        let fd = RING.get().expect("the ring is found");
                        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
                        assert_eq!(link.as_os_str(), "anon_inode:[io_uring]");
                        // All three rings are open at once, so their descriptors differ.
                        together.wait();
                        fd
                    })
                })
            })
            .collect();
        let fds: BTreeSet<RawFd> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(fds.len(), 3, "each thread has a ring of its own");
    }

    /// Poll a write once and then never let the thread park: it reaches the file only if it
    /// was submitted when it was queued.
    fn write_without_parking(dir: &std::path::Path, name: &str, wait: std::time::Duration) -> bool {
        let path = dir.join(name);
        start(async move {
            let file = tokio_uring::fs::File::create(&path).await.unwrap();
            let done = {
                let write = std::pin::pin!(file.write_all_at(b"queued".to_vec(), 0));
                let mut op = Now::new(write);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut done = Pin::new(&mut op).poll(&mut cx).is_ready();
                let until = std::time::Instant::now() + wait;
                while !done && std::time::Instant::now() < until {
                    done = std::fs::read(&path)
                        .map(|b| b == b"queued")
                        .unwrap_or(false);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                // Let the runtime finish the operation before the file closes.
                let _ = op.await;
                done
            };
            file.close().await.unwrap();
            done
        })
    }

    #[test]
    fn a_queued_write_reaches_the_kernel_before_the_thread_parks() {
        let dir = tempfile::tempdir().unwrap();
        let long = std::time::Duration::from_secs(20);
        assert!(
            write_without_parking(dir.path(), "now", long),
            "the write was submitted while the thread kept running"
        );
        // Without it, nothing reaches the kernel until the thread parks (here: never, while
        // the loop runs), which is what tokio-uring does on its own.
        set_enabled(false);
        let short = std::time::Duration::from_millis(200);
        let reached = write_without_parking(dir.path(), "at-park", short);
        set_enabled(true);
        assert!(
            !reached,
            "without submitting at once the write waits for the park"
        );
    }
}
