//! The progress line on standard error while a run is going: elapsed and planned time,
//! operations completed and failed. On a terminal it is rewritten in place once a second;
//! otherwise a line is printed every five seconds.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Inner {
    label: String,
    planned: Duration,
    started: Instant,
    ok: AtomicU64,
    failed: AtomicU64,
    extra: std::sync::Mutex<String>,
    done: AtomicBool,
}

/// A progress line; clones share it. Dropping the last [`Progress::start`] handle is not
/// needed: call [`Progress::finish`].
#[derive(Clone)]
pub struct Progress {
    inner: Option<Arc<Inner>>,
}

impl Progress {
    /// A progress line that prints nothing.
    pub fn quiet() -> Progress {
        Progress { inner: None }
    }

    /// Start printing `label` progress for a run planned to take `planned`.
    pub fn start(label: &str, planned: Duration, enabled: bool) -> Progress {
        if !enabled {
            return Progress::quiet();
        }
        let inner = Arc::new(Inner {
            label: label.to_string(),
            planned,
            started: Instant::now(),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            extra: Default::default(),
            done: AtomicBool::new(false),
        });
        let printer = inner.clone();
        std::thread::spawn(move || {
            let tty = std::io::stderr().is_terminal();
            let every = if tty { 1 } else { 5 };
            let mut tick = 0u64;
            while !printer.done.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                tick += 1;
                if tick % (every * 5) != 0 || printer.done.load(Relaxed) {
                    continue;
                }
                let line = printer.line();
                let mut err = std::io::stderr().lock();
                if tty {
                    let _ = write!(err, "\r\x1b[2K{line}");
                } else {
                    let _ = writeln!(err, "{line}");
                }
                let _ = err.flush();
            }
        });
        Progress { inner: Some(inner) }
    }

    /// Operations completed so far in the measured part: `ok` succeeded, `failed` did not.
    pub fn completed(&self, ok: u64, failed: u64) {
        if let Some(i) = &self.inner {
            i.ok.store(ok, Relaxed);
            i.failed.store(failed, Relaxed);
        }
    }

    /// Free text appended to the line (for example a catch-up's bytes done).
    pub fn note(&self, text: String) {
        if let Some(i) = &self.inner {
            *i.extra.lock().unwrap() = text;
        }
    }

    /// Stop printing and end the line.
    pub fn finish(&self) {
        if let Some(i) = &self.inner {
            if !i.done.swap(true, Relaxed) {
                let mut err = std::io::stderr().lock();
                if err.is_terminal() {
                    let _ = writeln!(err, "\r\x1b[2K{}", i.line());
                } else {
                    let _ = writeln!(err, "{}", i.line());
                }
            }
        }
    }
}

impl Inner {
    fn line(&self) -> String {
        let extra = self.extra.lock().unwrap().clone();
        format!(
            "{}: {:.0}/{:.0} s, {} ok, {} failed{}{}",
            self.label,
            self.started.elapsed().as_secs_f64(),
            self.planned.as_secs_f64(),
            self.ok.load(Relaxed),
            self.failed.load(Relaxed),
            if extra.is_empty() { "" } else { ", " },
            extra
        )
    }
}
