//! The controller's Raft entries, stored by log-core: one [`Log`] where an entry's index is its
//! record's offset, its term the batch's epoch, and the record its protobuf encoding (one
//! batch per entry, so that a conflicting suffix can be cut at any entry). The log
//! brings its own checksums, torn-tail recovery, crash-safe truncation and epoch history; this
//! module only maps Raft's calls onto it.
//!
//! A log-core log lives on a tokio-uring thread, and the controller's driver is a plain
//! thread, so the log gets a thread of its own: [`RaftLog`] sends it each call and waits for
//! the answer (every call is durable when it returns, as raft requires).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use log_core::{Epoch, Log, LogConfig, Offset};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// Largest encoded Raft entry the controller stores. Its commands are small (names, node ids,
/// offsets); a bigger entry is refused before anything is written.
pub const ENTRY_BYTES_MAX: usize = 1 << 20;

/// The log's settings: small segments (the controller's log is compacted every few thousand
/// entries), batches that always hold an entry of [`ENTRY_BYTES_MAX`].
fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4 << 20,
        segment_initial_bytes: 64 << 10,
        batch_bytes_max: 4 << 20,
        ..LogConfig::default()
    }
}

/// What the log held when it was opened: records `(offset, epoch, bytes)` from `start` on.
pub struct Loaded {
    pub start: u64,
    pub records: Vec<(u64, u64, Vec<u8>)>,
}

type Reply = SyncSender<Result<(), log_core::Error>>;

enum Call {
    /// Remove everything from `first` on, then store `entries` ((term, encoded entry), in
    /// index order from `first`) and wait for their fdatasync.
    Append {
        first: u64,
        entries: Vec<(u64, Vec<u8>)>,
        reply: Reply,
    },
    /// Delete whole segments below `before` (what a snapshot covers).
    Purge { before: u64, reply: Reply },
    /// Replace the log by an empty one whose next offset is `start`.
    Reset { start: u64, reply: Reply },
}

/// The controller's Raft log on its own thread.
pub struct RaftLog {
    calls: Option<UnboundedSender<Call>>,
    thread: Option<JoinHandle<()>>,
}

impl RaftLog {
    /// Open the log in `dir` (a new one starts at offset `start`) and read it whole.
    pub fn open(dir: &Path, start: u64) -> Result<(RaftLog, Loaded), log_core::Error> {
        let (calls, mut rx) = unbounded_channel::<Call>();
        let (ready_tx, ready) = sync_channel(1);
        let dir = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("controller-log".into())
            .spawn(move || {
                log_core::submit::start(async move {
                    let mut log = match open_and_read(&dir, start).await {
                        Ok((log, loaded)) => {
                            let _ = ready_tx.send(Ok(loaded));
                            Some(log)
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    while let Some(call) = rx.recv().await {
                        let (result, reply) = match call {
                            Call::Append {
                                first,
                                entries,
                                reply,
                            } => (append(&mut log, &dir, first, entries).await, reply),
                            Call::Purge { before, reply } => (
                                usable(&mut log, &dir, before)
                                    .await
                                    .and_then(|l| l.purge_before(Offset(before)).map(|_| ())),
                                reply,
                            ),
                            Call::Reset { start, reply } => {
                                (reset(&mut log, &dir, start).await, reply)
                            }
                        };
                        let _ = reply.send(result);
                    }
                    if let Some(log) = log {
                        let _ = log.close().await;
                    }
                })
            })
            .map_err(|e| log_core::Error::Io {
                op: "spawn the controller log thread",
                path: PathBuf::new(),
                source: e,
            })?;
        let mut log = RaftLog {
            calls: Some(calls),
            thread: Some(thread),
        };
        match ready.recv() {
            Ok(Ok(loaded)) => Ok((log, loaded)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                log.stop();
                Err(log_core::Error::Closed)
            }
        }
    }

    /// Store `entries` ((term, encoded entry)) at `first` on, replacing what the log holds
    /// there; durable on return.
    pub fn append(&self, first: u64, entries: Vec<(u64, Vec<u8>)>) -> Result<(), log_core::Error> {
        self.call(|reply| Call::Append {
            first,
            entries,
            reply,
        })
    }

    /// Delete whole segments whose entries are all below `before`.
    pub fn purge_before(&self, before: u64) -> Result<(), log_core::Error> {
        self.call(|reply| Call::Purge { before, reply })
    }

    /// Replace the log by an empty one whose next offset is `start`.
    pub fn reset(&self, start: u64) -> Result<(), log_core::Error> {
        self.call(|reply| Call::Reset { start, reply })
    }

    fn call(&self, make: impl FnOnce(Reply) -> Call) -> Result<(), log_core::Error> {
        let (reply, answer) = sync_channel(1);
        let calls = self.calls.as_ref().ok_or(log_core::Error::Closed)?;
        calls
            .send(make(reply))
            .map_err(|_| log_core::Error::Closed)?;
        answer.recv().map_err(|_| log_core::Error::Closed)?
    }

    fn stop(&mut self) {
        self.calls = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RaftLog {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn open_and_read(dir: &Path, start: u64) -> Result<(Log, Loaded), log_core::Error> {
    let log = Log::open_at(dir, config(), Offset(start)).await?;
    let mut loaded = Loaded {
        start: log.start_offset().0,
        records: Vec::new(),
    };
    for b in log.batches(log.start_offset(), log.next_offset()) {
        let b = b?;
        let view = b.view();
        let epoch = view.header().epoch().0;
        for r in view.records() {
            loaded.records.push((r.offset.0, epoch, r.value.to_vec()));
        }
    }
    Ok((log, loaded))
}

/// The log, reopened first if an earlier write failed it (only a write that ran out of space
/// is made again: the storage stops on any other failure). `start`: where the log starts if
/// there is none any more (a reset that ran out of space before it opened the new one).
async fn usable<'a>(
    log: &'a mut Option<Log>,
    dir: &Path,
    start: u64,
) -> Result<&'a Log, log_core::Error> {
    if log.as_ref().is_some_and(|l| l.failure().is_some()) {
        if let Some(failed) = log.take() {
            let _ = failed.close().await;
        }
    }
    if log.is_none() {
        *log = Some(open_and_read(dir, start).await?.0);
    }
    Ok(log.as_ref().expect("opened"))
}

async fn append(
    log: &mut Option<Log>,
    dir: &Path,
    first: u64,
    entries: Vec<(u64, Vec<u8>)>,
) -> Result<(), log_core::Error> {
    let log = usable(log, dir, first).await?;
    if log.next_offset().0 > first {
        log.truncate_after(Offset(first)).await?;
    }
    if log.next_offset().0 != first {
        return Err(log_core::Error::OffsetOutOfRange {
            offset: Offset(first),
            start: log.start_offset(),
            end: log.next_offset(),
        });
    }
    // One batch per entry: Raft cuts a conflicting suffix at any entry, and log-core truncates
    // at batch boundaries. The batches share one fdatasync.
    let mut next = Offset(first);
    for (term, bytes) in &entries {
        next = log.append(Epoch(*term), &[bytes]).await?.next;
    }
    log.wait_flushed(next).await
}

async fn reset(log: &mut Option<Log>, dir: &Path, start: u64) -> Result<(), log_core::Error> {
    if let Some(old) = log.take() {
        let _ = old.close().await;
    }
    // Renamed away first, so that a crash never leaves part of the old log.
    let old = dir.with_extension("old");
    remove_dir(&old)?;
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| log_core::Error::Io {
            op: "rename",
            path: dir.to_path_buf(),
            source: e,
        })?;
        if let Some(parent) = dir.parent() {
            durable::sync_dir(parent).map_err(|e| log_core::Error::Io {
                op: e.op,
                path: e.path,
                source: e.source,
            })?;
        }
        remove_dir(&old)?;
    }
    *log = Some(open_and_read(dir, start).await?.0);
    Ok(())
}

/// Remove `dir` and everything in it, if it exists.
pub fn remove_dir(dir: &Path) -> Result<(), log_core::Error> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(log_core::Error::Io {
            op: "remove",
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}
