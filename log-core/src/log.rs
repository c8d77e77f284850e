//! A single log: offset assignment, the io_uring writer and syncer tasks (group commit), segment
//! rolling with background preparation, mmap reads, truncation and retention.
//!
//! Segment sizes follow the write rate. A new log starts with one `segment_initial_bytes`
//! segment and nothing prepared. Once the active segment is half full, the next one is
//! zero-filled in the background, sized to hold `segment_lookahead` of writes at the rate the
//! active segment filled at (a power of two within `segment_initial_bytes..=segment_bytes_max`).
//! A batch that does not fit the prepared segment gets one of sufficient size, prepared while the
//! writer waits. So an idle log costs one small segment, and a busy one reaches
//! `segment_bytes_max` segments as soon as its rate calls for them.
//!
//! Two tasks run on the log's tokio-uring thread. The **writer** takes everything queued since its
//! last write and writes it with one io_uring write per segment (resubmitting short writes); that
//! advances `end_offset`. The **syncer** fdatasyncs the active segment whenever `end_offset` is
//! ahead of `flush_offset`, and advances `flush_offset` to the `end_offset` it saw *before* the
//! fdatasync was submitted (R12: an fdatasync covers only writes whose completions arrived).
//! Appends that arrive while an fdatasync is in flight are written meanwhile and covered by the
//! next one: that is the group commit.
//!
//! With durable writes on ([`Log::set_durable_writes`], as a follower's copy has them), each
//! write is one io_uring operation that completes once its data is durable (`RWF_DSYNC`): it
//! advances `flush_offset` with `end_offset` when everything written before it was durable
//! already, and the syncer has nothing left to do. That saves the second operation, and its
//! hand-off to an io_uring worker thread, where nothing is gained by writing before the
//! fdatasync (a leader writes first, so that its followers can be sent the records while its
//! own fdatasync runs).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::ops::Deref;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use memmap2::Mmap;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_uring::buf::BoundedBuf;

use crate::batch::{self, BatchView, ProducerMeta};
use crate::config::{LogConfig, RetentionPolicy};
use crate::epochs::{EpochEntry, EpochHistory};
use crate::error::{CorruptionKind, Error, Result};
use crate::fsutil;
use crate::index::{self, SealedMeta, SparseIndex};
use crate::recovery::{self, RecoveryReport, MANIFEST_FILE, PREPARED_FILE};
use crate::segment::{self, Segment};
use crate::types::{Epoch, Offset};

/// Offsets assigned to one append: records `first..next`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub first: Offset,
    pub next: Offset,
}

/// How many of its latest writes' timings a log keeps for [`Log::write_times`].
pub const WRITE_TIMES_KEPT: usize = 64;

/// When one write of queued batches was submitted to the kernel and when it completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteTimes {
    /// The end offset the write reached: it wrote the records below it (from the previous
    /// write's end).
    pub end: Offset,
    /// The write was handed to the kernel (tokio-uring, submitted at once: see
    /// [`crate::submit`]).
    pub submitted: Instant,
    /// The write completed: its records were in the page cache (durable too, with durable
    /// writes on).
    pub written: Instant,
}

/// A handle to an open log. Cloning gives another handle to the same log; the log closes (after
/// writing and flushing everything queued) when the last handle is dropped or [`Log::close`] is
/// awaited. `!Send`: a log belongs to the thread that opened it.
#[derive(Clone)]
pub struct Log {
    inner: Rc<Inner>,
    _handle: Rc<Handle>,
}

/// Marks the log closed when the last user handle goes away; the tasks then drain and exit.
struct Handle(Rc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.st.borrow_mut().closed = true;
        self.0.writer_wake.notify_one();
        self.0.syncer_wake.notify_one();
        self.0.taken.notify_waiters();
    }
}

/// See [`Log::taken_offset`].
fn taken_offset(st: &State) -> Offset {
    let inflight = st.inflight.as_ref().and_then(|f| f.batches.last());
    inflight.map_or(st.written, |b| b.next.max(st.written))
}

struct Inner {
    dir: PathBuf,
    config: LogConfig,
    st: RefCell<State>,
    writer_wake: Notify,
    syncer_wake: Notify,
    /// Woken when the writer takes the queue, so `append` can retry after `Backpressure`.
    room: Notify,
    /// Woken when a batch is queued (and on failure), for [`Log::wait_appended`].
    appended: Notify,
    /// Woken when the writer takes queued batches to write (and on failure, truncation and
    /// close), for [`Log::wait_taken_past`].
    taken: Notify,
    /// Each write is durable when it completes ([`Log::set_durable_writes`]).
    durable_writes: Cell<bool>,
    /// fdatasyncs the syncer has completed ([`Log::fdatasyncs`]).
    fdatasyncs: Cell<u64>,
    /// The latest writes' timings, oldest first ([`Log::write_times`]).
    write_times: RefCell<std::collections::VecDeque<WriteTimes>>,
    _lock: std::fs::File,
}

struct State {
    sealed: BTreeMap<Offset, Segment>,
    active: Segment,
    active_file: Rc<tokio_uring::fs::File>,
    /// Encoded batches queued for the writer, and their metadata.
    pending: Vec<u8>,
    pending_batches: Vec<PendingBatch>,
    /// The buffers of the last write, cleared, for the next batches.
    spare: Vec<u8>,
    spare_batches: Vec<PendingBatch>,
    /// What the writer is writing now: readable from memory before it is written
    /// ([`Log::read_unwritten`]).
    inflight: Option<Inflight>,
    next_offset: Offset,
    written: Offset,
    flushed: Offset,
    /// Bumped by every truncation, so an fdatasync that started before it cannot advance
    /// `flushed` past the new end when it completes.
    generation: u64,
    failure: Option<Arc<Error>>,
    closed: bool,
    truncating: bool,
    written_waiters: Waiters,
    flushed_waiters: Waiters,
    epochs: EpochHistory,
    pins: BTreeMap<String, Offset>,
    preparing: Option<JoinHandle<Result<Prepared>>>,
    /// When the active segment was installed or opened, and its `data_len` then: the write rate
    /// that sizes the next segment is measured from here.
    active_since: Instant,
    active_since_len: u64,
    tasks: Vec<JoinHandle<()>>,
    recovery: RecoveryReport,
}

/// A damaged range of a sealed segment, found by [`Log::scrub`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The records it held: `from..until`.
    pub from: Offset,
    pub until: Offset,
    /// Where it is in the segment file, and how long.
    pub position: u64,
    pub len: u64,
    /// What is wrong with it.
    pub detail: String,
}

/// What [`Log::scrub`] found in one sealed segment.
#[derive(Clone, Debug, Default)]
pub struct Scrubbed {
    /// The segment file.
    pub path: PathBuf,
    /// The records it holds: `from..until`.
    pub from: Offset,
    pub until: Offset,
    /// Bytes checked.
    pub bytes: u64,
    /// The crc32c of all its batches end to end, to compare with another replica's copy.
    pub crc: u32,
    pub damaged: Vec<Damage>,
}

/// Batches the writer took and is writing, shared with readers of the unwritten tail.
struct Inflight {
    bytes: Bytes,
    batches: Rc<Vec<PendingBatch>>,
}

#[derive(Clone, Copy, Debug)]
struct PendingBatch {
    len: usize,
    next: Offset,
    base: Offset,
    timestamp_us: u64,
}

/// A zero-filled, synced segment file waiting to become the active segment.
struct Prepared {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
}

#[derive(Debug)]
enum Wake {
    Reached,
    Failed(Arc<Error>),
    Truncated,
}

/// Tasks waiting for a horizon to reach an offset, in offset order. Appends wait in the order
/// they were queued, so a new waiter almost always goes at the back and a horizon moving
/// wakes from the front: no allocation but each waiter's channel once the queue has grown.
#[derive(Default)]
struct Waiters(std::collections::VecDeque<(Offset, oneshot::Sender<Wake>)>);

impl Waiters {
    fn add(&mut self, offset: Offset) -> oneshot::Receiver<Wake> {
        let (tx, rx) = oneshot::channel();
        let at = self.0.partition_point(|(o, _)| *o <= offset);
        self.0.insert(at, (offset, tx));
        rx
    }
    /// Wake every waiter for an offset at or below `horizon`.
    fn reach(&mut self, horizon: Offset) {
        while self.0.front().is_some_and(|(o, _)| *o <= horizon) {
            if let Some((_, tx)) = self.0.pop_front() {
                let _ = tx.send(Wake::Reached);
            }
        }
    }
    fn fail_all(&mut self, err: &Arc<Error>) {
        for (_, tx) in self.0.drain(..) {
            let _ = tx.send(Wake::Failed(err.clone()));
        }
    }
    fn truncate(&mut self, end: Offset) {
        while self.0.back().is_some_and(|(o, _)| *o > end) {
            if let Some((_, tx)) = self.0.pop_back() {
                let _ = tx.send(Wake::Truncated);
            }
        }
    }
}

/// A whole batch read from a segment mapping: no copy. Derefs to the batch's bytes.
#[derive(Clone)]
pub struct BatchRef {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl Deref for BatchRef {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for BatchRef {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for BatchRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchRef")
            .field("base_offset", &self.view().header().base_offset())
            .field("len", &self.len)
            .finish()
    }
}

impl BatchRef {
    /// The decoded batch. It was verified before it was returned, so this cannot fail.
    pub fn view(&self) -> BatchView<'_> {
        batch::decode(self).expect("a BatchRef holds a verified batch")
    }
    /// The bytes as a `bytes::Bytes` that keeps the mapping alive: hand it to the network
    /// layer without copying.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

/// The result of [`Log::read`]: whole batches in offset order.
#[derive(Debug, Default)]
pub struct ReadBatches {
    pub batches: Vec<BatchRef>,
    /// The offset after the last returned batch (`from` if none).
    pub next_offset: Offset,
}

/// The most bytes [`Log::batches`] reads at once.
pub const SCAN_BYTES: usize = 4 << 20;

/// The batches of a stretch of a log, in order ([`Log::batches`]).
pub struct Batches<'a> {
    log: &'a Log,
    pos: Offset,
    until: Offset,
    read: std::vec::IntoIter<BatchRef>,
    done: bool,
}

impl Batches<'_> {
    /// Where the next read starts (after a failed read: where it began).
    pub fn position(&self) -> Offset {
        self.pos
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<BatchRef>;

    fn next(&mut self) -> Option<Result<BatchRef>> {
        loop {
            if let Some(b) = self.read.next() {
                return Some(Ok(b));
            }
            if self.done || self.pos >= self.until {
                return None;
            }
            match self.log.read(self.pos, self.until, SCAN_BYTES) {
                Ok(r) if r.batches.is_empty() => self.done = true,
                Ok(r) => {
                    self.pos = r.next_offset;
                    self.read = r.batches.into_iter();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl ReadBatches {
    pub fn bytes(&self) -> usize {
        self.batches.iter().map(|b| b.len()).sum()
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The shortest time over which a write rate is measured to size the next segment: a log that
/// wrote its first few KiB within a millisecond of opening is not taken for one writing GB/s.
/// A log that really is fast still reaches `segment_bytes_max` after a roll or two, each
/// segment being sized by the fuller one before it.
const RATE_WINDOW_MIN: Duration = Duration::from_secs(1);

const MANIFEST_MAGIC: &[u8; 4] = b"RPLM";
const MANIFEST_VERSION: u32 = 1;

fn check_or_write_manifest(dir: &Path, fresh: bool) -> Result<()> {
    let path = dir.join(MANIFEST_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            if bytes.len() != 12
                || &bytes[..4] != MANIFEST_MAGIC
                || crc32c::crc32c(&bytes[..8]).to_le_bytes() != bytes[8..12]
            {
                return Err(Error::Corruption {
                    segment: path,
                    position: 0,
                    kind: CorruptionKind::DamagedFile("manifest"),
                });
            }
            let version = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
            if version != MANIFEST_VERSION {
                return Err(Error::UnknownVersion {
                    path,
                    found: version,
                    supported: MANIFEST_VERSION,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Written for a new log, and rewritten for a directory whose manifest was lost: the
            // segments say everything else.
            if !fresh {
                tracing::warn!(dir = %dir.display(), "manifest missing; rewriting it");
            }
            let mut out = Vec::with_capacity(12);
            out.extend_from_slice(MANIFEST_MAGIC);
            out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
            out.extend_from_slice(&crc32c::crc32c(&out).to_le_bytes());
            fsutil::write_atomic(&path, &out, true)
        }
        Err(e) => Err(Error::io("read", &path)(e)),
    }
}

/// Create and zero-fill a segment file of `len` bytes, then sync it. Runs as a background task,
/// or awaited by the writer when nothing suitable was prepared in time.
async fn prepare_segment(dir: PathBuf, len: u64) -> Result<Prepared> {
    const CHUNK: usize = 1 << 20;
    let path = dir.join(PREPARED_FILE);
    let std_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(Error::io("create segment", &path))?;
    let dup = std_file
        .try_clone()
        .map_err(Error::io("dup segment", &path))?;
    let file = tokio_uring::fs::File::from_std(dup);
    let mut zeros = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let n = CHUNK.min((len - pos) as usize);
        let (res, slice) = file.write_all_at(zeros.slice(..n), pos).await;
        zeros = slice.into_inner();
        res.map_err(Error::io("zero-fill segment", &path))?;
        pos += n as u64;
        // Write back one chunk at a time: a whole segment of dirty zeros flushed at once
        // would queue the disk in front of the appenders' fdatasync for tens of ms.
        file.sync_data()
            .await
            .map_err(Error::io("fdatasync segment", &path))?;
    }
    file.sync_all()
        .await
        .map_err(Error::io("fsync segment", &path))?;
    file.close().await.map_err(Error::io("close", &path))?;
    Ok(Prepared {
        path,
        file: std_file,
        len,
    })
}

/// Rename a prepared file into place as the segment starting at `base` (R6: rename, then fsync
/// the directory) and map it. An existing, empty segment at `base` is replaced atomically.
fn install_segment(
    dir: &Path,
    prepared: Prepared,
    base: Offset,
) -> Result<(Segment, tokio_uring::fs::File)> {
    let path = dir.join(segment::segment_name(base));
    std::fs::rename(&prepared.path, &path).map_err(Error::io("rename", &path))?;
    fsutil::sync_dir(dir)?;
    let map = segment::map_file(&prepared.file, &path)?;
    let seg = Segment {
        base,
        path,
        map,
        capacity: prepared.len,
        data_len: 0,
        next_offset: base,
        max_timestamp_us: 0,
        index: SparseIndex::default(),
        verified_len: Cell::new(0),
    };
    Ok((seg, tokio_uring::fs::File::from_std(prepared.file)))
}

impl Log {
    /// Open the log in `dir`, creating it (starting at offset 0) if the directory holds no
    /// segments. Runs recovery (see `docs/log-format.md`) and starts the writer and syncer tasks.
    /// Must be called inside a tokio-uring runtime; the log lives on this thread.
    pub async fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log> {
        Log::open_at(dir, config, Offset(0)).await
    }

    /// Like [`Log::open`], but a new log's first offset is `start` (a replica that bootstraps
    /// from another's snapshot starts where the snapshot ends). Ignored for an existing log.
    pub async fn open_at(dir: impl AsRef<Path>, config: LogConfig, start: Offset) -> Result<Log> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fsutil::create_private_dir(&dir)?;
        let lock = fsutil::lock_dir(&dir)?;
        let rec = recovery::recover(&dir, &config)?;
        check_or_write_manifest(&dir, rec.report.segments == 0)?;
        let (active, active_file) = match rec.active {
            Some((seg, file)) => (seg, tokio_uring::fs::File::from_std(file)),
            None => {
                let prepared = prepare_segment(dir.clone(), config.segment_initial_bytes).await?;
                install_segment(&dir, prepared, start)?
            }
        };
        let end = active.next_offset;
        let active_since_len = active.data_len;
        let sealed: BTreeMap<Offset, Segment> =
            rec.sealed.into_iter().map(|s| (s.base, s)).collect();
        let inner = Rc::new(Inner {
            dir: dir.clone(),
            config,
            st: RefCell::new(State {
                sealed,
                active,
                active_file: Rc::new(active_file),
                pending: Vec::new(),
                pending_batches: Vec::new(),
                spare: Vec::new(),
                spare_batches: Vec::new(),
                inflight: None,
                next_offset: end,
                written: end,
                flushed: end,
                generation: 0,
                failure: None,
                closed: false,
                truncating: false,
                written_waiters: Waiters::default(),
                flushed_waiters: Waiters::default(),
                epochs: rec.epochs,
                pins: BTreeMap::new(),
                preparing: None,
                active_since: Instant::now(),
                active_since_len,
                tasks: Vec::new(),
                recovery: rec.report,
            }),
            writer_wake: Notify::new(),
            syncer_wake: Notify::new(),
            room: Notify::new(),
            appended: Notify::new(),
            taken: Notify::new(),
            durable_writes: Cell::new(false),
            fdatasyncs: Cell::new(0),
            write_times: RefCell::new(std::collections::VecDeque::with_capacity(WRITE_TIMES_KEPT)),
            _lock: lock,
        });
        // Nothing is prepared yet: the next segment is, once this one is half full.
        let writer = tokio_uring::spawn(writer_task(inner.clone()));
        let syncer = tokio_uring::spawn(syncer_task(inner.clone()));
        inner.st.borrow_mut().tasks = vec![writer, syncer];
        Ok(Log {
            _handle: Rc::new(Handle(inner.clone())),
            inner,
        })
    }

    /// Write and flush everything queued, stop the tasks and release the directory. Other
    /// handles to the log get [`Error::Closed`] from then on (their queued appends are still
    /// written and flushed first).
    pub async fn close(self) -> Result<()> {
        let tasks = std::mem::take(&mut self.inner.st.borrow_mut().tasks);
        let inner = self.inner.clone();
        inner.st.borrow_mut().closed = true;
        inner.writer_wake.notify_one();
        inner.syncer_wake.notify_one();
        // Waiters for appends that will never come end with `Closed`.
        inner.appended.notify_waiters();
        inner.taken.notify_waiters();
        drop(self);
        for t in tasks {
            t.await.expect("log task panicked");
        }
        // Only now: a write during the final drain may have started another preparation.
        let preparing = inner.st.borrow_mut().preparing.take();
        if let Some(p) = preparing {
            let _ = p.await;
            // A closed log keeps no disk beyond its segments; the next open would remove the
            // file anyway.
            let _ = std::fs::remove_file(inner.dir.join(PREPARED_FILE));
        }
        let st = inner.st.borrow();
        match &st.failure {
            Some(e) => Err(inner.failed(e)),
            None => Ok(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    /// The first offset still stored (retention moves it forward).
    pub fn start_offset(&self) -> Offset {
        let st = self.inner.st.borrow();
        st.sealed.values().next().map_or(st.active.base, |s| s.base)
    }

    /// The offset the next append gets. Ahead of [`Log::end_offset`] while appends are queued.
    pub fn next_offset(&self) -> Offset {
        self.inner.st.borrow().next_offset
    }

    /// Written horizon: every record below it is in the page cache and readable.
    pub fn end_offset(&self) -> Offset {
        self.inner.st.borrow().written
    }

    /// Make each write durable as it completes (`RWF_DSYNC`: one io_uring operation instead of
    /// a write and an fdatasync), or go back to writing first and fdatasyncing after (the
    /// default). Worth it where the records are not read before they are durable, as on a
    /// follower; a leader sends its followers what it has written while its fdatasync runs.
    /// Takes effect from the next write.
    pub fn set_durable_writes(&self, on: bool) {
        self.inner.durable_writes.set(on);
    }

    /// How many fdatasyncs of its segments the syncer has completed since the log was opened.
    pub fn fdatasyncs(&self) -> u64 {
        self.inner.fdatasyncs.get()
    }

    /// The timings of the write that wrote the record just below `next` (the one ending an
    /// append), while it is among the latest [`WRITE_TIMES_KEPT`] writes.
    pub fn write_times(&self, next: Offset) -> Option<WriteTimes> {
        let times = self.inner.write_times.borrow();
        let i = times.partition_point(|w| w.end < next);
        let w = times.get(i)?;
        // The write before it ended at or below the record, so this write carried it.
        (i > 0 || w.end == next || times.len() < WRITE_TIMES_KEPT).then_some(*w)
    }

    /// Whether each write is durable as it completes ([`Log::set_durable_writes`]).
    pub fn durable_writes(&self) -> bool {
        self.inner.durable_writes.get()
    }

    /// Durable horizon: every record below it has been fdatasync'd (or written durably).
    pub fn flush_offset(&self) -> Offset {
        self.inner.st.borrow().flushed
    }

    /// Why the log failed ([`Error::Failed`]), if a write or fdatasync failed: it takes nothing
    /// more, and only reopening it (recovery re-validates what is on disk) brings it back.
    pub fn failure(&self) -> Option<Error> {
        let st = self.inner.st.borrow();
        st.failure.as_ref().map(|e| self.inner.failed(e))
    }

    /// The newest epoch in the log, if any batch or `begin_epoch` recorded one.
    pub fn last_epoch(&self) -> Option<Epoch> {
        self.inner.st.borrow().epochs.last_epoch()
    }

    /// The epoch history: each epoch with the offset of its first record.
    pub fn epoch_history(&self) -> Vec<EpochEntry> {
        self.inner.st.borrow().epochs.entries().to_vec()
    }

    /// For divergence detection (KIP-101): the largest epoch `<= epoch` in this log and the
    /// offset where it ends here. `None` if this log has nothing that old.
    pub fn end_offset_for_epoch(&self, epoch: Epoch) -> Option<(Epoch, Offset)> {
        let st = self.inner.st.borrow();
        st.epochs.end_offset_for(epoch, st.next_offset)
    }

    /// Record that `epoch` begins at the current next offset, durably, before any batch of it.
    pub fn begin_epoch(&self, epoch: Epoch) -> Result<()> {
        let mut st = self.inner.st.borrow_mut();
        self.inner.check_accepting(&st)?;
        self.inner.observe_epoch(&mut st, epoch)
    }

    /// What recovery found when the log was opened.
    pub fn recovery_report(&self) -> RecoveryReport {
        self.inner.st.borrow().recovery.clone()
    }

    /// Number of segments (sealed and active).
    pub fn segment_count(&self) -> usize {
        self.inner.st.borrow().sealed.len() + 1
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        let st = self.inner.st.borrow();
        st.sealed.values().map(Segment::disk_bytes).sum::<u64>() + st.active.disk_bytes()
    }

    /// Bytes queued but not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.inner.st.borrow().pending.len()
    }

    /// Assign offsets to `records` and queue them as one batch in `epoch`, timestamped now.
    /// Returns at once; await [`Log::wait_written`] or [`Log::wait_flushed`] with
    /// `Appended::next` for the horizon you need.
    pub fn try_append<R: AsRef<[u8]>>(&self, epoch: Epoch, records: &[R]) -> Result<Appended> {
        self.try_append_at(epoch, now_us(), records)
    }

    /// [`Log::try_append`] with an explicit timestamp (microseconds since the Unix epoch).
    pub fn try_append_at<R: AsRef<[u8]>>(
        &self,
        epoch: Epoch,
        timestamp_us: u64,
        records: &[R],
    ) -> Result<Appended> {
        self.try_append_producer_at(epoch, timestamp_us, None, records)
    }

    /// [`Log::try_append`] for a batch that carries producer metadata (if `producer` is `Some`):
    /// the producer id and the sequence number of the first record, stored in the batch and
    /// returned by [`BatchView::producer`] when it is read back.
    pub fn try_append_producer<R: AsRef<[u8]>>(
        &self,
        epoch: Epoch,
        producer: Option<ProducerMeta>,
        records: &[R],
    ) -> Result<Appended> {
        self.try_append_producer_at(epoch, now_us(), producer, records)
    }

    /// [`Log::try_append_producer`] with an explicit timestamp (microseconds since the Unix
    /// epoch). The records' sequence numbers must fit in a u64
    /// ([`batch::BatchError::SequenceOverflow`] otherwise).
    pub fn try_append_producer_at<R: AsRef<[u8]>>(
        &self,
        epoch: Epoch,
        timestamp_us: u64,
        producer: Option<ProducerMeta>,
        records: &[R],
    ) -> Result<Appended> {
        let cfg = &self.inner.config;
        if records.is_empty() {
            return Err(Error::EmptyBatch);
        }
        if records.len() > cfg.batch_records_max {
            return Err(Error::TooManyRecords {
                count: records.len(),
                max: cfg.batch_records_max,
            });
        }
        if let Some(p) = producer {
            if p.first_sequence
                .checked_add(records.len() as u64 - 1)
                .is_none()
            {
                return Err(Error::InvalidBatch(batch::BatchError::SequenceOverflow));
            }
        }
        let len = batch::encoded_len_with(producer, records);
        if len > cfg.batch_bytes_max {
            return Err(Error::BatchTooLarge {
                len,
                max: cfg.batch_bytes_max,
            });
        }
        let mut st = self.inner.st.borrow_mut();
        self.inner.check_room(&st, len)?;
        let base = st.next_offset;
        if base.0.checked_add(records.len() as u64).is_none() {
            return Err(Error::InvalidBatch(batch::BatchError::OffsetOverflow));
        }
        self.inner.observe_epoch(&mut st, epoch)?;
        batch::encode_into_with(
            &mut st.pending,
            base,
            epoch,
            timestamp_us,
            producer,
            records,
        );
        Ok(self
            .inner
            .queued(&mut st, base, records.len() as u64, len, timestamp_us))
    }

    /// Queue a batch that is already encoded (a follower storing the leader's bytes verbatim).
    /// The batch is fully validated, and must start at [`Log::next_offset`]. Producer metadata,
    /// if the batch carries any, is kept as it is.
    pub fn try_append_batch(&self, bytes: &[u8]) -> Result<Appended> {
        let view = batch::decode(bytes)?;
        if view.len() != bytes.len() {
            return Err(Error::InvalidBatch(batch::BatchError::LengthOutOfBounds {
                len: bytes.len() as u64,
                available: view.len() as u64,
                max: view.len() as u64,
            }));
        }
        let cfg = &self.inner.config;
        if view.len() > cfg.batch_bytes_max {
            return Err(Error::BatchTooLarge {
                len: view.len(),
                max: cfg.batch_bytes_max,
            });
        }
        let h = view.header();
        let mut st = self.inner.st.borrow_mut();
        self.inner.check_room(&st, view.len())?;
        if h.base_offset() != st.next_offset {
            return Err(Error::UnexpectedOffset {
                expected: st.next_offset,
                found: h.base_offset(),
            });
        }
        self.inner.observe_epoch(&mut st, h.epoch())?;
        st.pending.extend_from_slice(bytes);
        let count = u64::from(h.record_count());
        Ok(self.inner.queued(
            &mut st,
            h.base_offset(),
            count,
            view.len(),
            h.timestamp_us.get(),
        ))
    }

    /// [`Log::try_append`], waiting for room while the write queue is over `pending_bytes_max`.
    pub async fn append<R: AsRef<[u8]>>(&self, epoch: Epoch, records: &[R]) -> Result<Appended> {
        loop {
            match self.try_append(epoch, records) {
                Err(Error::Backpressure { .. }) => self.inner.room.notified().await,
                other => return other,
            }
        }
    }

    /// Wait until the write queue has room again after [`Error::Backpressure`] (or the log
    /// failed). A caller that must re-check conditions before appending (a conditional append,
    /// say) uses this rather than [`Log::append`].
    /// Call it right after the refused append, with no await in between, so that the wake-up
    /// cannot be missed.
    pub async fn wait_room(&self) {
        let room = self.inner.room.notified();
        if self.inner.st.borrow().failure.is_some() {
            return;
        }
        room.await
    }

    /// Wait until the flush offset may have moved past `flushed`: for the fdatasync covering
    /// the record at `flushed` if it is queued, else for the next append (then look again).
    /// For tasks that follow the durable horizon.
    pub async fn wait_flushed_past(&self, flushed: Offset) -> Result<()> {
        if self.next_offset() > flushed {
            self.wait_flushed(flushed.plus(1)).await
        } else {
            self.wait_appended(flushed).await
        }
    }

    /// Wait until the written horizon may have moved past `written`: for the write of the
    /// record at `written` if it is queued, else for the next append (then look again). For
    /// tasks that follow what is written.
    pub async fn wait_written_past(&self, written: Offset) -> Result<()> {
        if self.next_offset() > written {
            self.wait_written(written.plus(1)).await
        } else {
            self.wait_appended(written).await
        }
    }

    /// The end of what the writer has taken: every record below it is written, or in the write
    /// under way and readable from memory with [`Log::read_unwritten`].
    pub fn taken_offset(&self) -> Offset {
        taken_offset(&self.inner.st.borrow())
    }

    /// Whole batches from `from` of the write under way (taken by the writer, not yet in the
    /// page cache), as they will be stored: their bytes, at most `bytes_max` of them (but at
    /// least one batch), and the offset after them. `None` when `from` does not start a batch
    /// of that write: below [`Log::end_offset`] read the segments with [`Log::read`].
    ///
    /// A leader sends these to its followers while its own write runs. They are not durable
    /// here yet and may still be lost with this node; a reader must never be served them.
    pub fn read_unwritten(&self, from: Offset, bytes_max: usize) -> Option<(Bytes, Offset)> {
        let st = self.inner.st.borrow();
        let f = st.inflight.as_ref()?;
        let (mut pos, mut start, mut end, mut next) = (0usize, None, 0usize, from);
        for b in f.batches.iter() {
            match start {
                None if b.base == from => start = Some(pos),
                None if b.base > from => return None,
                _ => {}
            }
            if let Some(s) = start {
                if end > s && pos + b.len - s > bytes_max {
                    break;
                }
                end = pos + b.len;
                next = b.next;
            }
            pos += b.len;
        }
        let s = start?;
        Some((Bytes::slice(&f.bytes, s..end), next))
    }

    /// Wait until [`Log::taken_offset`] passes `offset`: a record at `offset` is written or
    /// being written. Fails once the log is closed or failed.
    pub async fn wait_taken_past(&self, offset: Offset) -> Result<()> {
        self.wait_until(&self.inner.taken, |st| taken_offset(st) > offset)
            .await
    }

    /// Wait until `next_offset() > offset`: a record at `offset` has been appended (not
    /// necessarily written). For readers waiting at the end of the log. Fails with
    /// [`Error::Closed`] once the log is closed and nothing more will be appended.
    pub async fn wait_appended(&self, offset: Offset) -> Result<()> {
        self.wait_until(&self.inner.appended, |st| st.next_offset > offset)
            .await
    }

    /// Wait until `reached` holds, looking again each time `wake` is notified; fails once the
    /// log has failed, or is closed without `reached` holding.
    async fn wait_until(&self, wake: &Notify, reached: impl Fn(&State) -> bool) -> Result<()> {
        loop {
            let woken = wake.notified();
            {
                let st = self.inner.st.borrow();
                if let Some(e) = &st.failure {
                    return Err(self.inner.failed(e));
                }
                if reached(&st) {
                    return Ok(());
                }
                if st.closed {
                    return Err(Error::Closed);
                }
            }
            woken.await;
        }
    }

    /// Base offsets of the sealed segments, oldest first.
    pub fn sealed_bases(&self) -> Vec<Offset> {
        self.inner.st.borrow().sealed.keys().copied().collect()
    }

    /// Re-read sealed segment `base` and check every batch's crc32c and framing, whether or not
    /// a read verified it before (bytes can go bad at rest). The damaged batches found are no
    /// longer served: a read that reaches one fails with [`Error::Corruption`] until
    /// [`Log::repair`] restores it. `None` if there is no such sealed segment (any more).
    pub fn scrub(&self, base: Offset) -> Option<Scrubbed> {
        let st = self.inner.st.borrow();
        let seg = st.sealed.get(&base)?;
        let mut damaged = Vec::new();
        let (mut pos, mut expected) = (0u64, seg.base);
        while pos < seg.data_len {
            let data = &seg.map[pos as usize..seg.data_len as usize];
            let header = batch::header(data)
                .ok()
                .filter(|h| {
                    batch::check_header(h, data.len()).is_ok() && h.base_offset() == expected
                })
                .map(|h| (h.batch_len() as u64, h.next_offset()));
            match (header, batch::decode(data)) {
                (Some((len, next)), Ok(_)) => {
                    pos += len;
                    expected = next;
                }
                // A sound frame whose bytes fail their checksum: that batch alone.
                (Some((len, next)), Err(e)) => {
                    damaged.push(Damage {
                        from: expected,
                        until: next,
                        position: pos,
                        len,
                        detail: e.to_string(),
                    });
                    pos += len;
                    expected = next;
                }
                // The framing itself is damaged: nothing after it can be trusted either.
                (None, e) => {
                    damaged.push(Damage {
                        from: expected,
                        until: seg.next_offset,
                        position: pos,
                        len: seg.data_len - pos,
                        detail: e.err().map_or("bad batch header".into(), |e| e.to_string()),
                    });
                    break;
                }
            }
        }
        if let Some(first) = damaged.first() {
            seg.verified_len
                .set(seg.verified_len.get().min(first.position));
        }
        Some(Scrubbed {
            path: seg.path.clone(),
            from: seg.base,
            until: seg.next_offset,
            bytes: seg.data_len,
            crc: crc32c::crc32c(&seg.map[..seg.data_len as usize]),
            damaged,
        })
    }

    /// Put back the bytes of a damaged range of sealed segment `base` (found by
    /// [`Log::scrub`]) from a healthy replica: `bytes` must be whole, valid batches holding
    /// exactly the records `damage.from..damage.until` in exactly `damage.len` bytes (replicas
    /// store the same batches byte for byte). They are written over the damaged ones and
    /// fdatasync'd; reads check them again before serving them. Nothing else changes: a
    /// sealed segment's contents are the same as before the damage.
    pub async fn repair(&self, base: Offset, damage: &Damage, bytes: Vec<u8>) -> Result<()> {
        let path = {
            let st = self.inner.st.borrow();
            self.inner.check_accepting(&st)?;
            let seg = st.sealed.get(&base).ok_or(Error::OffsetOutOfRange {
                offset: base,
                start: st.sealed.keys().next().copied().unwrap_or(st.active.base),
                end: st.next_offset,
            })?;
            if damage.position + damage.len > seg.data_len || bytes.len() as u64 != damage.len {
                return Err(Error::BadRepair(format!(
                    "a repair of {} bytes at byte {} does not fit the damaged {} bytes of {}",
                    bytes.len(),
                    damage.position,
                    damage.len,
                    seg.path.display()
                )));
            }
            let (mut pos, mut expected) = (0usize, damage.from);
            while pos < bytes.len() {
                let view = batch::decode(&bytes[pos..])
                    .map_err(|e| Error::BadRepair(format!("repair bytes: {e}")))?;
                let h = view.header();
                if h.base_offset() != expected {
                    return Err(Error::BadRepair(format!(
                        "repair bytes hold offset {} where {} was expected",
                        h.base_offset().0,
                        expected.0
                    )));
                }
                expected = h.next_offset();
                pos += view.len();
            }
            if expected != damage.until {
                return Err(Error::BadRepair(format!(
                    "repair bytes end at offset {} where {} was expected",
                    expected.0, damage.until.0
                )));
            }
            seg.path.clone()
        };
        let file = tokio_uring::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .await
            .map_err(Error::io("open for repair", &path))?;
        let (res, _) = file.write_all_at(bytes, damage.position).await;
        res.map_err(Error::io("write repair", &path))?;
        file.sync_data()
            .await
            .map_err(Error::io("fdatasync repair", &path))?;
        let _ = file.close().await;
        Ok(())
    }

    /// Base offsets of the segments, oldest first (the last is the active segment).
    pub fn segment_bases(&self) -> Vec<Offset> {
        let st = self.inner.st.borrow();
        st.sealed.keys().copied().chain([st.active.base]).collect()
    }

    /// Wait until `end_offset() >= offset`.
    pub async fn wait_written(&self, offset: Offset) -> Result<()> {
        let rx = {
            let mut st = self.inner.st.borrow_mut();
            if st.written >= offset {
                return Ok(());
            }
            self.inner.check_waitable(&st, offset)?;
            st.written_waiters.add(offset)
        };
        self.inner.wake_result(rx.await, offset)
    }

    /// Wait until `flush_offset() >= offset`: every record below `offset` is durable.
    pub async fn wait_flushed(&self, offset: Offset) -> Result<()> {
        let rx = {
            let mut st = self.inner.st.borrow_mut();
            if st.flushed >= offset {
                return Ok(());
            }
            self.inner.check_waitable(&st, offset)?;
            st.flushed_waiters.add(offset)
        };
        self.inner.wake_result(rx.await, offset)
    }

    /// Every whole batch holding records from `from` to `until` (capped at `end_offset()`), in
    /// order, read [`SCAN_BYTES`] at a time: for going through a stretch of the log (rebuilding
    /// state from it, copying it aside). The first batch may start before `from`. A read that
    /// fails ends the scan with its error.
    pub fn batches(&self, from: Offset, until: Offset) -> Batches<'_> {
        Batches {
            log: self,
            pos: from,
            until,
            read: Vec::new().into_iter(),
            done: false,
        }
    }

    /// Whole batches holding records from `from` on, none reaching past `until` (capped at
    /// `end_offset()`), at most `bytes_max` bytes in total but always at least one batch if any
    /// is available. The first batch may start before `from`. Slices of the mappings: no copy.
    pub fn read(&self, from: Offset, until: Offset, bytes_max: usize) -> Result<ReadBatches> {
        let st = self.inner.st.borrow();
        let start = st.sealed.values().next().map_or(st.active.base, |s| s.base);
        if from < start || from > st.next_offset {
            return Err(Error::OffsetOutOfRange {
                offset: from,
                start,
                end: st.next_offset,
            });
        }
        let until = until.min(st.written);
        let mut out = ReadBatches {
            batches: Vec::new(),
            next_offset: from,
        };
        let mut total = 0usize;
        let mut seg = if from >= st.active.base {
            Some(&st.active)
        } else {
            st.sealed.range(..=from).next_back().map(|(_, s)| s)
        };
        while let Some(s) = seg {
            if out.next_offset >= until {
                break;
            }
            let mut pos = s.position_for(out.next_offset)?;
            // The active segment's data_len may lag `written` by nothing: both advance together.
            while pos < s.data_len {
                let h = s.header_at(pos)?;
                let len = h.batch_len();
                if h.next_offset() > until || (!out.batches.is_empty() && total + len > bytes_max) {
                    return Ok(out);
                }
                s.verify_until(pos + len as u64)?;
                out.batches.push(BatchRef {
                    map: s.map.clone(),
                    start: pos as usize,
                    len,
                });
                total += len;
                out.next_offset = h.next_offset();
                pos += len as u64;
            }
            seg = if s.base == st.active.base {
                None
            } else {
                st.sealed
                    .range(s.base.plus(1)..)
                    .next()
                    .map(|(_, s)| s)
                    .or(Some(&st.active))
            };
        }
        Ok(out)
    }

    /// Bytes of batches from the one holding `from` to the written end: what a reader at
    /// `from` has left to read. 0 when `from` is at or past the end; everything stored when
    /// `from` is below the start.
    pub fn bytes_from(&self, from: Offset) -> Result<u64> {
        let st = self.inner.st.borrow();
        let mut total = 0u64;
        // From the segment holding `from` on: the cost does not grow with the log's history.
        let first = st
            .sealed
            .range(..=from)
            .next_back()
            .map_or(from, |(&b, _)| b);
        for s in st
            .sealed
            .range(first..)
            .map(|(_, s)| s)
            .chain(std::iter::once(&st.active))
        {
            if s.next_offset <= from {
                continue;
            }
            let pos = if from > s.base {
                s.position_for(from)?
            } else {
                0
            };
            total += s.data_len.saturating_sub(pos);
        }
        Ok(total)
    }

    /// Remove every record at or after `end`, so that `end_offset() == end` (a batch boundary).
    /// Waits for queued appends to be written first and refuses new ones meanwhile. Crash-safe:
    /// a durable intent is written first and redone by the next open if the process dies.
    /// Awaiters of offsets beyond `end` get [`Error::Truncated`].
    pub async fn truncate_after(&self, end: Offset) -> Result<()> {
        let target = {
            let mut st = self.inner.st.borrow_mut();
            self.inner.check_accepting(&st)?;
            let start = st.sealed.values().next().map_or(st.active.base, |s| s.base);
            if end < start || end > st.next_offset {
                return Err(Error::OffsetOutOfRange {
                    offset: end,
                    start,
                    end: st.next_offset,
                });
            }
            st.truncating = true;
            st.next_offset
        };
        let quiesced = self.wait_written(target).await;
        let result = quiesced.and_then(|()| self.inner.truncate_quiesced(end));
        self.inner.st.borrow_mut().truncating = false;
        result
    }

    /// Keep every record at or after `offset` from being deleted by retention.
    pub fn pin(&self, name: &str, offset: Offset) {
        self.inner
            .st
            .borrow_mut()
            .pins
            .insert(name.to_owned(), offset);
    }

    pub fn unpin(&self, name: &str) {
        self.inner.st.borrow_mut().pins.remove(name);
    }

    /// Delete whole sealed segments whose records are all below `offset`, never past a pinned
    /// offset and never the active segment. Returns the new start offset.
    pub fn purge_before(&self, offset: Offset) -> Result<Offset> {
        let mut st = self.inner.st.borrow_mut();
        let limit = st.pins.values().copied().fold(offset, Offset::min);
        while let Some(entry) = st.sealed.first_entry() {
            if entry.get().next_offset > limit {
                break;
            }
            let seg = entry.remove();
            // Oldest first, each unlink made durable before the next: a crash leaves a suffix of
            // the segments, never a gap.
            let idx = seg.index_path();
            std::fs::remove_file(&seg.path).map_err(Error::io("remove", &seg.path))?;
            if idx.exists() {
                std::fs::remove_file(&idx).map_err(Error::io("remove", &idx))?;
            }
            fsutil::sync_dir(&self.inner.dir)?;
            tracing::info!(segment = %seg.path.display(), "retention deleted segment");
        }
        Ok(st.sealed.values().next().map_or(st.active.base, |s| s.base))
    }

    /// Apply a retention policy at time `now_us`: by size, oldest segments go first until the
    /// log fits `bytes_max`; by age, sealed segments whose newest batch is older than `age_max`.
    /// Both stop at pins and the active segment (see [`Log::purge_before`]).
    pub fn apply_retention(&self, policy: &RetentionPolicy, now_us: u64) -> Result<Offset> {
        let limit = {
            let st = self.inner.st.borrow();
            let mut limit = Offset(0);
            if let Some(max) = policy.bytes_max {
                let mut total: u64 = st.sealed.values().map(Segment::disk_bytes).sum::<u64>()
                    + st.active.disk_bytes();
                for s in st.sealed.values() {
                    if total <= max {
                        break;
                    }
                    total -= s.disk_bytes();
                    limit = limit.max(s.next_offset);
                }
            }
            if let Some(age) = policy.age_max {
                let cutoff = now_us.saturating_sub(age.as_micros() as u64);
                for s in st.sealed.values() {
                    if s.max_timestamp_us >= cutoff {
                        break;
                    }
                    limit = limit.max(s.next_offset);
                }
            }
            limit
        };
        self.purge_before(limit)
    }
}

impl Inner {
    fn failed(&self, cause: &Arc<Error>) -> Error {
        Error::Failed {
            dir: self.dir.clone(),
            cause: cause.clone(),
        }
    }

    fn check_accepting(&self, st: &State) -> Result<()> {
        if let Some(e) = &st.failure {
            return Err(self.failed(e));
        }
        if st.closed {
            return Err(Error::Closed);
        }
        if st.truncating {
            return Err(Error::Truncating);
        }
        Ok(())
    }

    fn check_room(&self, st: &State, len: usize) -> Result<()> {
        self.check_accepting(st)?;
        if !st.pending.is_empty() && st.pending.len() + len > self.config.pending_bytes_max {
            return Err(Error::Backpressure {
                pending: st.pending.len(),
                max: self.config.pending_bytes_max,
            });
        }
        Ok(())
    }

    fn check_waitable(&self, st: &State, offset: Offset) -> Result<()> {
        if let Some(e) = &st.failure {
            return Err(self.failed(e));
        }
        if offset > st.next_offset {
            return Err(Error::OffsetOutOfRange {
                offset,
                start: st.sealed.values().next().map_or(st.active.base, |s| s.base),
                end: st.next_offset,
            });
        }
        Ok(())
    }

    fn wake_result(
        &self,
        wake: Result<Wake, oneshot::error::RecvError>,
        offset: Offset,
    ) -> Result<()> {
        match wake {
            Ok(Wake::Reached) => Ok(()),
            Ok(Wake::Failed(e)) => Err(self.failed(&e)),
            Ok(Wake::Truncated) => Err(Error::Truncated { offset }),
            Err(_) => Err(Error::Closed),
        }
    }

    /// Epochs never go backwards; a new one is recorded durably before its first batch is queued.
    fn observe_epoch(&self, st: &mut State, epoch: Epoch) -> Result<()> {
        match st.epochs.last_epoch() {
            Some(current) if epoch < current => Err(Error::StaleEpoch { epoch, current }),
            Some(current) if epoch == current => Ok(()),
            _ => {
                let at = st.next_offset;
                st.epochs.observe(epoch, at);
                if let Err(e) = st.epochs.persist() {
                    // A failed fsync of metadata is as fatal as one of data (R5).
                    let err = self.fail(st, e);
                    return Err(err);
                }
                Ok(())
            }
        }
    }

    fn queued(&self, st: &mut State, base: Offset, count: u64, len: usize, ts: u64) -> Appended {
        let next = base.plus(count);
        st.pending_batches.push(PendingBatch {
            len,
            next,
            base,
            timestamp_us: ts,
        });
        st.next_offset = next;
        self.writer_wake.notify_one();
        self.appended.notify_waiters();
        Appended { first: base, next }
    }

    /// Record a fatal I/O error: no more appends, every waiter fails. Never retried (R5).
    fn fail(&self, st: &mut State, err: Error) -> Error {
        tracing::error!(dir = %self.dir.display(), error = %err, "log failed");
        let err = Arc::new(err);
        if st.failure.is_none() {
            st.failure = Some(err.clone());
        }
        st.written_waiters.fail_all(&err);
        st.flushed_waiters.fail_all(&err);
        st.inflight = None;
        self.room.notify_waiters();
        self.appended.notify_waiters();
        self.taken.notify_waiters();
        self.failed(&err)
    }

    /// Size of the next segment: `segment_lookahead` of writes at the rate the active segment
    /// has been written at since it was installed (or opened), rounded up to a power of two,
    /// within `segment_initial_bytes..=segment_bytes_max`, and never less than `needed`.
    /// The rate is taken over at least `RATE_WINDOW_MIN`, so a burst of a few writes does not
    /// pass for a busy log.
    fn next_segment_len(&self, st: &State, needed: u64) -> u64 {
        let cfg = &self.config;
        let written = st.active.data_len.saturating_sub(st.active_since_len);
        let elapsed = st.active_since.elapsed().max(RATE_WINDOW_MIN).as_nanos();
        let want = u128::from(written) * cfg.segment_lookahead.as_nanos() / elapsed;
        let want = want.min(u128::from(cfg.segment_bytes_max)) as u64;
        want.max(needed)
            .next_power_of_two()
            .clamp(cfg.segment_initial_bytes, cfg.segment_bytes_max)
            .max(needed)
    }

    /// Start preparing the next segment in the background once the active one is half full.
    fn maybe_start_preparing(&self) {
        let mut st = self.st.borrow_mut();
        if st.preparing.is_some() || st.active.data_len * 2 < st.active.capacity {
            return;
        }
        let len = self.next_segment_len(&st, 0);
        st.preparing = Some(tokio_uring::spawn(prepare_segment(self.dir.clone(), len)));
    }

    /// A prepared segment that holds at least `needed` bytes: the one prepared in the background
    /// if it is big enough, else one zero-filled now.
    async fn take_prepared(&self, needed: u64) -> Result<Prepared> {
        let task = self.st.borrow_mut().preparing.take();
        if let Some(task) = task {
            let prepared = task.await.expect("segment preparation panicked")?;
            if prepared.len >= needed {
                return Ok(prepared);
            }
            // Too small for the batch that has to go first: filled again at a size that fits.
            drop(prepared);
        }
        let len = self.next_segment_len(&self.st.borrow(), needed);
        prepare_segment(self.dir.clone(), len).await
    }

    /// Make `seg` the active segment, measuring the write rate from now.
    fn set_active(&self, seg: Segment, file: tokio_uring::fs::File) -> Segment {
        let mut st = self.st.borrow_mut();
        st.active_since = Instant::now();
        st.active_since_len = seg.data_len;
        st.active_file = Rc::new(file);
        std::mem::replace(&mut st.active, seg)
    }

    /// The active segment is empty and too small for a batch of `needed` bytes (a new log's
    /// first segment, or one left empty by recovery or truncation): replace it with a prepared
    /// segment of sufficient size under the same name. An empty segment cannot be sealed.
    async fn replace_empty_active(&self, needed: u64) -> Result<()> {
        let prepared = self.take_prepared(needed).await?;
        let base = self.st.borrow().active.base;
        let (seg, file) = install_segment(&self.dir, prepared, base)?;
        self.set_active(seg, file);
        Ok(())
    }

    /// Seal the active segment and install a prepared one after it that holds at least `needed`
    /// bytes (the batch that did not fit). Called by the writer only.
    async fn roll(&self, needed: u64) -> Result<()> {
        let file = self.st.borrow().active_file.clone();
        // Everything in the old segment is durable before the new one takes a write, so the
        // syncer only ever needs to fdatasync the active segment.
        file.sync_data()
            .await
            .map_err(Error::io("fdatasync", &self.dir))?;
        fault_check(&self.dir, "fdatasync")?;
        {
            let mut st = self.st.borrow_mut();
            let st = &mut *st;
            st.flushed = st.flushed.max(st.written);
            let horizon = st.flushed;
            st.flushed_waiters.reach(horizon);
            let a = &st.active;
            index::store(
                &a.index_path(),
                &SealedMeta {
                    base: a.base,
                    next_offset: a.next_offset,
                    data_len: a.data_len,
                    max_timestamp_us: a.max_timestamp_us,
                    index: a.index.clone(),
                },
            )?;
        }
        let prepared = self.take_prepared(needed).await?;
        let base = self.st.borrow().written;
        let (seg, file) = install_segment(&self.dir, prepared, base)?;
        let old = self.set_active(seg, file);
        self.st.borrow_mut().sealed.insert(old.base, old);
        // The next segment is prepared once this one is half full (see `write_batches`).
        Ok(())
    }

    /// Truncation once the writer is idle. Synchronous file operations: truncation is rare.
    fn truncate_quiesced(&self, end: Offset) -> Result<()> {
        let mut st = self.st.borrow_mut();
        if end == st.written {
            return Ok(());
        }
        let in_active = end >= st.active.base;
        let target = if in_active {
            &st.active
        } else {
            st.sealed
                .range(..=end)
                .next_back()
                .map(|(_, s)| s)
                .expect("end >= start")
        };
        if target.boundary(end)?.is_none() {
            return Err(Error::NotBatchBoundary { offset: end });
        }
        let segments: Vec<(Offset, PathBuf)> = st
            .sealed
            .values()
            .chain(std::iter::once(&st.active))
            .map(|s| (s.base, s.path.clone()))
            .collect();
        let result = recovery::write_truncate_intent(&self.dir, end)
            .and_then(|()| recovery::apply_truncation(&self.dir, &segments, end))
            .and_then(|pos| recovery::remove_truncate_intent(&self.dir).map(|()| pos));
        let pos = match result {
            Ok(pos) => pos,
            // The files are somewhere between the old and the new end; the intent makes the
            // next open finish the job.
            Err(e) => return Err(self.fail(&mut st, e)),
        };
        let st = &mut *st;
        if !in_active {
            let base = st
                .sealed
                .range(..=end)
                .next_back()
                .map(|(b, _)| *b)
                .unwrap();
            let mut later = st.sealed.split_off(&base);
            let seg = later.remove(&base).unwrap();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&seg.path)
                .map_err(Error::io("open segment", &seg.path));
            let file = match file {
                Ok(f) => f,
                Err(e) => return Err(self.fail(st, e)),
            };
            st.active = seg;
            st.active_file = Rc::new(tokio_uring::fs::File::from_std(file));
        }
        let a = &mut st.active;
        a.data_len = pos;
        a.next_offset = end;
        a.index.truncate(pos as u32);
        a.verified_len.set(a.verified_len.get().min(pos));
        st.active_since = Instant::now();
        st.active_since_len = pos;
        st.next_offset = end;
        st.written = end;
        st.flushed = st.flushed.min(end);
        st.generation += 1;
        // Offsets from `end` on will be written again: the kept timings stay in order.
        self.write_times.borrow_mut().retain(|w| w.end <= end);
        self.taken.notify_waiters();
        st.written_waiters.truncate(end);
        st.flushed_waiters.truncate(end);
        if st.epochs.truncate(end) {
            if let Err(e) = st.epochs.persist() {
                return Err(self.fail(st, e));
            }
        }
        tracing::info!(dir = %self.dir.display(), end = end.0, "truncated log");
        Ok(())
    }
}

#[cfg(feature = "fault-injection")]
fn fault_check(dir: &Path, op: &'static str) -> Result<()> {
    crate::fault::check(dir, op).map_err(Error::io(op, dir))
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
fn fault_check(_dir: &Path, _op: &'static str) -> Result<()> {
    Ok(())
}

/// The writer task: see the module doc.
async fn writer_task(inner: Rc<Inner>) {
    loop {
        let work = {
            let mut st = inner.st.borrow_mut();
            if st.failure.is_some() || (st.closed && st.pending_batches.is_empty()) {
                None
            } else if st.pending_batches.is_empty() {
                Some(None)
            } else {
                let spare = std::mem::take(&mut st.spare);
                let buf = Bytes::from(std::mem::replace(&mut st.pending, spare));
                let spare_batches = std::mem::take(&mut st.spare_batches);
                let batches = Rc::new(std::mem::replace(&mut st.pending_batches, spare_batches));
                st.inflight = Some(Inflight {
                    bytes: buf.clone(),
                    batches: batches.clone(),
                });
                Some(Some((buf, batches)))
            }
        };
        let (buf, batches) = match work {
            None => {
                inner.syncer_wake.notify_one();
                return;
            }
            Some(None) => {
                inner.writer_wake.notified().await;
                continue;
            }
            Some(Some(work)) => work,
        };
        inner.room.notify_waiters();
        inner.taken.notify_waiters();
        let len = buf.len();
        match write_batches(&inner, buf, &batches).await {
            Ok(buf) => {
                let mut st = inner.st.borrow_mut();
                st.inflight = None;
                // The buffer comes back for the next batches unless a reader of the unwritten
                // tail still holds part of it (a replication frame QUIC has not sent yet).
                st.spare = match buf.try_into_mut() {
                    Ok(b) => {
                        let mut v = Vec::from(b);
                        v.clear();
                        v
                    }
                    Err(_) => Vec::with_capacity(len),
                };
                if let Ok(mut b) = Rc::try_unwrap(batches) {
                    b.clear();
                    st.spare_batches = b;
                }
            }
            Err(e) => {
                let mut st = inner.st.borrow_mut();
                inner.fail(&mut st, e);
                return;
            }
        }
    }
}

/// Write queued batches into the active segment, rolling when the next batch does not fit.
async fn write_batches(inner: &Rc<Inner>, buf: Bytes, batches: &[PendingBatch]) -> Result<Bytes> {
    let mut start = 0usize;
    let mut i = 0usize;
    while i < batches.len() {
        let (file, pos, room, empty) = {
            let st = inner.st.borrow();
            let a = &st.active;
            (
                st.active_file.clone(),
                a.data_len,
                a.capacity - a.data_len,
                a.data_len == 0,
            )
        };
        let mut end = start;
        let mut j = i;
        while j < batches.len() && (end - start + batches[j].len) as u64 <= room {
            end += batches[j].len;
            j += 1;
        }
        if j == i {
            // The segment that replaces or follows this one is sized to hold the batch.
            let needed = batches[i].len as u64;
            if empty {
                inner.replace_empty_active(needed).await?;
            } else {
                inner.roll(needed).await?;
            }
            continue;
        }
        // Durable writes: whether everything written before this one is durable already, so
        // that this one's completion makes the whole written prefix durable.
        let durable = inner.durable_writes.get();
        let (clean, generation) = {
            let st = inner.st.borrow();
            (st.flushed == st.written, st.generation)
        };
        let submitted = Instant::now();
        let res = if durable {
            write_all_dsync(&file, Bytes::slice(&buf, start..end), pos).await
        } else {
            let write = std::pin::pin!(file.write_all_at(Bytes::slice(&buf, start..end), pos));
            crate::submit::Now::new(write).await.0
        };
        if let Err(e) = res {
            // The path is looked up only on failure: the hot path does no allocation for it.
            let path = inner.st.borrow().active.path.clone();
            return Err(Error::io("write", path)(e));
        }
        fault_check(&inner.dir, "write")?;
        {
            let mut times = inner.write_times.borrow_mut();
            if times.len() == WRITE_TIMES_KEPT {
                times.pop_front();
            }
            times.push_back(WriteTimes {
                end: batches[j - 1].next,
                submitted,
                written: Instant::now(),
            });
        }
        {
            let mut st = inner.st.borrow_mut();
            let st = &mut *st;
            let interval = inner.config.index_interval_bytes;
            let a = &mut st.active;
            let mut p = pos;
            for b in &batches[i..j] {
                a.index
                    .maybe_add((b.base.0 - a.base.0) as u32, p as u32, interval);
                a.max_timestamp_us = a.max_timestamp_us.max(b.timestamp_us);
                p += b.len as u64;
            }
            a.data_len = p;
            a.next_offset = batches[j - 1].next;
            a.verified_len.set(p);
            st.written = batches[j - 1].next;
            let horizon = st.written;
            st.written_waiters.reach(horizon);
            if durable && clean && st.generation == generation {
                st.flushed = st.flushed.max(horizon);
                st.flushed_waiters.reach(st.flushed);
            }
        }
        inner.syncer_wake.notify_one();
        inner.maybe_start_preparing();
        start = end;
        i = j;
    }
    Ok(buf)
}

/// What a durable write keeps alive while the kernel has it: the bytes and the file.
struct DsyncWrite {
    _buf: Bytes,
    _file: Rc<tokio_uring::fs::File>,
}

/// A durable write's completion: the bytes written.
struct DsyncDone;

impl tokio_uring::OneshotOutputTransform for DsyncDone {
    type Output = io::Result<usize>;
    type StoredData = DsyncWrite;

    fn transform_oneshot_output(
        self,
        _data: DsyncWrite,
        cqe: io_uring::cqueue::Entry,
    ) -> Self::Output {
        match cqe.result() {
            n if n >= 0 => Ok(n as usize),
            e => Err(io::Error::from_raw_os_error(-e)),
        }
    }
}

/// Write `buf` at `pos` with writes that complete once their data is durable (`RWF_DSYNC`),
/// resubmitting short writes.
async fn write_all_dsync(
    file: &Rc<tokio_uring::fs::File>,
    buf: Bytes,
    mut pos: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (mut start, end) = (0, buf.len());
    while start < end {
        let chunk = &buf[start..end];
        let sqe = io_uring::opcode::Write::new(
            io_uring::types::Fd(file.as_raw_fd()),
            chunk.as_ptr(),
            chunk.len() as u32,
        )
        .offset(pos)
        .rw_flags(libc::RWF_DSYNC)
        .build();
        // A reference to the bytes moves into the operation: their memory stays where the
        // entry points until the completion.
        let data = DsyncWrite {
            _buf: buf.clone(),
            _file: file.clone(),
        };
        let write = tokio_uring::UnsubmittedOneshot::new(data, DsyncDone, sqe).submit();
        crate::submit::queued();
        match write.await {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                start += n;
                pos += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The syncer task: see the module doc.
async fn syncer_task(inner: Rc<Inner>) {
    loop {
        let work = {
            let st = inner.st.borrow();
            if st.failure.is_some() {
                return;
            }
            if st.written > st.flushed {
                Some((st.active_file.clone(), st.written, st.generation))
            } else if st.closed && st.pending_batches.is_empty() && st.next_offset == st.written {
                return;
            } else {
                None
            }
        };
        let Some((file, target, generation)) = work else {
            inner.syncer_wake.notified().await;
            continue;
        };
        let res = crate::submit::Now::new(std::pin::pin!(file.sync_data()))
            .await
            .map_err(Error::io("fdatasync", &inner.dir))
            .and_then(|()| fault_check(&inner.dir, "fdatasync"));
        if res.is_ok() {
            inner.fdatasyncs.set(inner.fdatasyncs.get() + 1);
        }
        let mut st = inner.st.borrow_mut();
        match res {
            Ok(()) if st.generation == generation => {
                st.flushed = st.flushed.max(target);
                let horizon = st.flushed;
                st.flushed_waiters.reach(horizon);
            }
            Ok(()) => {}
            Err(e) => {
                inner.fail(&mut st, e);
                return;
            }
        }
    }
}
