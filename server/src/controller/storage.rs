//! The controller's durable Raft storage: [`DiskStorage`], a [`raft::Storage`] that keeps
//! everything in an inner [`MemStorage`] and persists every change under one directory before
//! it becomes visible in memory.
//!
//! # Files
//!
//! - `raft-log/`: the entries after the snapshot, in a log-core log ([`super::raft_log`]):
//!   entry index = offset, term = epoch, one record per entry (its protobuf encoding). log-core
//!   checksums every batch, cuts a torn tail at open, refuses damage anywhere else, and
//!   truncates crash-safely; appends are fdatasync'ed before [`DiskStorage::append`] returns.
//!   A compaction deletes the whole segments the snapshot covers; a snapshot from the leader
//!   replaces the log by an empty one (the old one is renamed away, then removed).
//! - `hardstate` and `snapshot`: the header `RLRAFT01` (`RLRAFT` and a two-digit format
//!   version), then one record `[u32 LE body length][u32 LE crc32c of the body][body]`, the
//!   body being the protobuf-encoded [`HardState`] or [`Snapshot`] (its metadata and the state
//!   machine's data); each replaced atomically (`durable::write_atomic`). A new directory gets
//!   a snapshot at index 0 that only carries the initial voters.
//!
//! # Recovery
//!
//! The snapshot file is the commit point of a compaction and of a snapshot install: if the
//! process stops after it was replaced but before the log was purged or replaced, the next
//! open finishes the job (it keeps the entries after the snapshot if the log holds the
//! snapshot's entry with the snapshot's term, and replaces the log by an empty one
//! otherwise). A log that lacks entries between the snapshot and its first entry, an entry
//! whose index or term disagrees with its offset or epoch, a bad `hardstate` or `snapshot`,
//! or an unknown format version is refused rather than acknowledged Raft state dropped.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};

use node_core::controller::core::{raft_memory, raise_to_snapshot, stored_snapshot};

use super::raft_log::{RaftLog, ENTRY_BYTES_MAX};

/// The first six bytes of every file.
const MAGIC: &[u8; 6] = b"RLRAFT";
/// The format version this build writes and reads, after [`MAGIC`].
const VERSION: &[u8; 2] = b"01";
/// Length of the file header: [`MAGIC`] then [`VERSION`].
const HEADER_LEN: usize = MAGIC.len() + VERSION.len();
/// Length of a record's header: body length and crc32c.
const RECORD_HEADER_LEN: usize = 8;

const LOG_DIR: &str = "raft-log";
/// The log of an earlier format version, refused with a clear error.
const OLD_LOG_FILE: &str = "raft.log";
const HARDSTATE_FILE: &str = "hardstate";
const SNAPSHOT_FILE: &str = "snapshot";
/// Suffix of the temporary file an atomic replacement writes first.
const TMP_SUFFIX: &str = ".tmp";

/// An error of [`DiskStorage`]. Every variant names the file or directory concerned.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file-system call failed; `op` names the call, `path` the file.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Stored bytes that fail validation where they cannot be a torn append. Never repaired.
    #[error("corrupt raft state in {} at byte {offset}: {detail}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },

    /// A file written by another format version (or not by this storage at all).
    #[error(
        "{} has raft storage format version {found:?}, this build reads version {supported:?}",
        path.display()
    )]
    UnknownVersion {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },

    /// The stored cluster membership is not the one the node was started with.
    #[error(
        "raft state in {} belongs to a cluster with voters {stored:?}, but this node was started \
         with voters {configured:?}; refusing to join a cluster with a different membership",
        dir.display()
    )]
    VotersMismatch {
        dir: PathBuf,
        stored: Vec<u64>,
        configured: Vec<u64>,
    },

    /// A raft-rs message failed to encode.
    #[error("encode {what} for {}: {source}", path.display())]
    Encode {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: protobuf::ProtobufError,
    },

    /// A call that does not fit the stored state (entries with a gap, an out-of-date
    /// snapshot, ...). Nothing was written.
    #[error("invalid request to the raft storage in {}: {detail}", dir.display())]
    Invalid { dir: PathBuf, detail: String },

    /// A raft log written by an earlier build (one file beside the others), which this build
    /// does not read.
    #[error(
        "{} is a controller log of an earlier build, which this build does not read; move the \
         controller directory away to rejoin the cluster with an empty one",
        path.display()
    )]
    OldLog { path: PathBuf },

    /// The entries' log (log-core) failed.
    #[error("raft log in {}: {source}", dir.display())]
    Log {
        dir: PathBuf,
        #[source]
        source: log_core::Error,
    },

    /// A write or sync failed earlier; the storage accepts no more writes until it is reopened
    /// (and re-validated from disk). A failed fsync is never retried: the kernel may have
    /// dropped the dirty pages, and a retry could report lost data as durable.
    #[error("raft storage in {} failed and accepts no writes until reopened: {cause}", dir.display())]
    Failed {
        dir: PathBuf,
        #[source]
        cause: std::sync::Arc<StorageError>,
    },
}

impl StorageError {
    /// Whether this is a write (not a sync) that failed for lack of space (`ENOSPC`, or a
    /// quota's `EDQUOT`): an operating condition, not damage. The bytes it left past the end
    /// of the data are overwritten by the next attempt (or cut as a torn tail at the next
    /// open), and nothing reported durable was touched, so the write may be retried once space
    /// returns. A failed sync is never retried (the kernel may have dropped the pages).
    pub fn is_no_space(&self) -> bool {
        match self {
            StorageError::Io { op, source, .. } => no_space(op, source),
            StorageError::Log { source, .. } => log_no_space(source),
            _ => false,
        }
    }
}

fn no_space(op: &str, e: &io::Error) -> bool {
    !op.contains("sync")
        && (e.kind() == io::ErrorKind::StorageFull
            || e.kind() == io::ErrorKind::QuotaExceeded
            || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
}

/// [`StorageError::is_no_space`] for log-core's errors: a write that failed for lack of space,
/// possibly as the cause of the log's failure.
fn log_no_space(e: &log_core::Error) -> bool {
    match e {
        log_core::Error::Io { op, source, .. } => no_space(op, source),
        log_core::Error::Failed { cause, .. } => log_no_space(cause),
        _ => false,
    }
}

/// Durable [`raft::Storage`] for the controller: a [`MemStorage`] that serves raft's reads, and
/// files under one directory that every change is written to (and synced) first. See the
/// [module documentation](self) for the file formats.
///
/// The application drives it from raft's `Ready`s: [`apply_snapshot`](Self::apply_snapshot),
/// [`append`](Self::append), [`set_hardstate`](Self::set_hardstate) and
/// [`set_commit`](Self::set_commit) (reached through `RawNode::mut_store`), and
/// [`compact`](Self::compact) once the state machine has taken a snapshot of its own.
///
/// After an I/O error in a write, the storage refuses all further writes
/// ([`StorageError::Failed`]); reopen it to go on.
pub struct DiskStorage {
    dir: PathBuf,
    mem: MemStorage,
    /// The latest snapshot, with its data, as stored in `snapshot`.
    snapshot: Snapshot,
    /// The hard state as stored in `hardstate` (and in `mem`).
    hard_state: HardState,
    /// The entries after the snapshot.
    log: RaftLog,
    /// The last entry's index (the snapshot's when there is none after it).
    last: u64,
    /// Why an earlier write failed. While set, every write is refused.
    failed: Option<std::sync::Arc<StorageError>>,
}

impl DiskStorage {
    /// Opens the Raft storage in `dir`, creating it for a cluster of `voters` (no learners) if
    /// it does not exist yet.
    ///
    /// An existing storage is loaded and validated (see the [module documentation](self)); it
    /// must belong to a cluster with exactly `voters` (in any order), else
    /// [`StorageError::VotersMismatch`]: a node started with another membership must not join
    /// silently.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<DiskStorage, StorageError> {
        let mut configured = voters.to_vec();
        configured.sort_unstable();
        configured.dedup();
        if configured.is_empty() || configured.contains(&0) {
            return Err(StorageError::Invalid {
                dir: dir.to_path_buf(),
                detail: format!("voters {voters:?} must be non-empty and non-zero"),
            });
        }

        if !dir.exists() {
            create_dir_durable(dir)?;
        }
        let old = dir.join(OLD_LOG_FILE);
        if old.exists() {
            return Err(StorageError::OldLog { path: old });
        }
        for name in [HARDSTATE_FILE, SNAPSHOT_FILE] {
            let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
            match fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &tmp)(e)),
            }
        }
        if needs_init(dir)? {
            initialize(dir, &configured)?;
        }
        Self::load(dir, &configured)
    }

    /// Loads an initialized storage.
    fn load(dir: &Path, configured: &[u64]) -> Result<DiskStorage, StorageError> {
        let snapshot: Snapshot = read_message_file(&dir.join(SNAPSHOT_FILE), "snapshot")?;
        let mut stored = snapshot.get_metadata().get_conf_state().voters.clone();
        stored.sort_unstable();
        if stored != configured {
            return Err(StorageError::VotersMismatch {
                dir: dir.to_path_buf(),
                stored,
                configured: configured.to_vec(),
            });
        }
        let stored_hard_state: HardState =
            read_message_file(&dir.join(HARDSTATE_FILE), "hard state")?;

        let log_dir = dir.join(LOG_DIR);
        let log_error = |source| StorageError::Log {
            dir: log_dir.clone(),
            source,
        };
        let (snap_index, snap_term) = (snapshot.get_metadata().index, snapshot.get_metadata().term);
        let (log, loaded) = RaftLog::open(&log_dir, snap_index + 1).map_err(log_error)?;
        // What a replacement for a snapshot that was cut short left behind.
        super::raft_log::remove_dir(&log_dir.with_extension("old")).map_err(log_error)?;
        let corrupt = |detail: String| StorageError::Corrupt {
            path: log_dir.clone(),
            offset: 0,
            detail,
        };
        let mut all = Vec::with_capacity(loaded.records.len());
        for (offset, epoch, bytes) in &loaded.records {
            let e: Entry = decode(&log_dir, *offset as usize, bytes, "raft log entry")?;
            if (e.index, e.term) != (*offset, *epoch) {
                return Err(corrupt(format!(
                    "the record at offset {offset} (epoch {epoch}) holds entry {} of term {}",
                    e.index, e.term
                )));
            }
            all.push(e);
        }
        let end = loaded.start + all.len() as u64;
        let entries = if loaded.start == snap_index + 1 {
            all
        } else if loaded.start > snap_index + 1 {
            if all.is_empty() {
                log.reset(snap_index + 1).map_err(log_error)?;
                Vec::new()
            } else {
                return Err(corrupt(format!(
                    "the log starts at entry {}, but the snapshot ends at entry {snap_index}: \
                     entries are missing",
                    loaded.start
                )));
            }
        } else {
            // The snapshot was replaced, and the log not purged or replaced after it.
            let at = (snap_index - loaded.start) as usize;
            match all.get(at) {
                Some(e) if e.term == snap_term => {
                    all.drain(..=at);
                    all
                }
                _ => {
                    tracing::warn!(
                        path = %log_dir.display(),
                        snapshot_index = snap_index,
                        snapshot_term = snap_term,
                        log_end = end,
                        "raft log does not hold the snapshot's entry; replacing it by an empty \
                         one for the snapshot"
                    );
                    log.reset(snap_index + 1).map_err(log_error)?;
                    Vec::new()
                }
            }
        };

        let mut hard_state = stored_hard_state.clone();
        raise_to_snapshot(&mut hard_state, snap_index, snap_term);
        let last = snap_index + entries.len() as u64;
        if hard_state.commit > last {
            return Err(StorageError::Corrupt {
                path: dir.join(HARDSTATE_FILE),
                offset: 0,
                detail: format!(
                    "the hard state commits entry {}, but the log ends at entry {last}",
                    hard_state.commit
                ),
            });
        }
        if hard_state != stored_hard_state {
            write_message_file(dir, HARDSTATE_FILE, &hard_state, "hard state")?;
        }
        let mem =
            raft_memory(&snapshot, &entries, &hard_state).map_err(|e| StorageError::Corrupt {
                path: log_dir.clone(),
                offset: 0,
                detail: format!("raft rejected the stored state: {e}"),
            })?;
        Ok(DiskStorage {
            dir: dir.to_path_buf(),
            mem,
            snapshot,
            hard_state,
            log,
            last,
            failed: None,
        })
    }

    /// The directory this storage lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Persists `entries` (consecutive, from raft's `Ready::entries`) and then appends them to
    /// memory. Entries from an index at or below the last stored one replace the stored suffix
    /// from that index on (it is cut off the file first). Durable (fdatasync'ed) on return, as
    /// raft requires before the ready's persisted messages are sent.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        self.check_failed()?;
        let (first_index, last_index) = (self.first_index_(), self.last_index_());
        if first < first_index || first > last_index + 1 {
            return Err(self.invalid(format!(
                "entries from index {first} do not fit the log [{first_index}, {last_index}]"
            )));
        }
        if let Some((i, e)) = (0u64..).zip(entries).find(|(i, e)| e.index != first + i) {
            return Err(self.invalid(format!(
                "entry {} follows entry {} in one append",
                e.index,
                first + i - 1
            )));
        }

        let mut encoded = Vec::with_capacity(entries.len());
        for e in entries {
            let bytes = encode(e, &self.dir.join(LOG_DIR), "raft log entry")?;
            if bytes.len() > ENTRY_BYTES_MAX {
                return Err(self.invalid(format!(
                    "entry {} is {} bytes encoded, over ENTRY_BYTES_MAX ({ENTRY_BYTES_MAX})",
                    e.index,
                    bytes.len()
                )));
            }
            encoded.push((e.term, bytes));
        }
        self.guarded(|s| s.log.append(first, encoded).map_err(|e| s.log_error(e)))?;
        self.last = entries.last().map_or(self.last, |e| e.index);
        self.mem
            .wl()
            .append(entries)
            .map_err(|e| self.invalid(e.to_string()))
    }

    /// Persists the hard state (atomically) and then saves it in memory. Does nothing if it is
    /// unchanged.
    pub fn set_hardstate(&mut self, hs: HardState) -> Result<(), StorageError> {
        if hs == self.hard_state {
            return Ok(());
        }
        self.guarded(|s| write_message_file(&s.dir, HARDSTATE_FILE, &hs, "hard state"))?;
        self.mem.wl().set_hardstate(hs.clone());
        self.hard_state = hs;
        Ok(())
    }

    /// Persists a new commit index (from raft's `LightReady::commit_index`), keeping the rest of
    /// the hard state. Does nothing if it is unchanged.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hardstate(hs)
    }

    /// Installs a snapshot received from the leader (raft's `Ready::snapshot`): persists it
    /// (atomically), empties the log (every stored entry is superseded), and then applies it to
    /// memory. The hard state's term and commit are raised to the snapshot's if lower.
    ///
    /// The snapshot's index must not be below the first index of the log.
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), StorageError> {
        self.check_failed()?;
        let (index, term) = (snap.get_metadata().index, snap.get_metadata().term);
        let first_index = self.first_index_();
        if index == 0 || index < first_index {
            return Err(self.invalid(format!(
                "snapshot at index {index} is out of date: the log starts at index {first_index}"
            )));
        }
        let mut hs = self.hard_state.clone();
        raise_to_snapshot(&mut hs, index, term);
        let mem = raft_memory(&snap, &[], &hs).map_err(|e| self.invalid(e.to_string()))?;

        self.guarded(|s| {
            write_message_file(&s.dir, SNAPSHOT_FILE, &snap, "snapshot")?;
            s.log.reset(index + 1).map_err(|e| s.log_error(e))?;
            if hs != s.hard_state {
                write_message_file(&s.dir, HARDSTATE_FILE, &hs, "hard state")?;
            }
            Ok(())
        })?;
        self.mem = mem;
        self.snapshot = snap;
        self.hard_state = hs;
        self.last = index;
        Ok(())
    }

    /// Records the state machine's own snapshot: `data` is its state after applying entry
    /// `applied` (opaque bytes, handed back by [`snapshot_data`](Self::snapshot_data) and sent to
    /// followers that lag behind the log), `conf_state` the membership at that point.
    ///
    /// Persists the snapshot (index `applied`, the term of entry `applied`), rewrites `raft.log`
    /// to hold only the entries after `applied`, and compacts memory the same way: afterwards
    /// `first_index()` is `applied + 1`. Does nothing if `applied` is not past the current
    /// snapshot; `applied` must not be past the last entry.
    ///
    /// `conf_state` is what the next [`open`](Self::open) compares its `voters` with: after a
    /// membership change, the node must be started with the new voters.
    pub fn compact(
        &mut self,
        applied: u64,
        data: Vec<u8>,
        conf_state: ConfState,
    ) -> Result<(), StorageError> {
        self.check_failed()?;
        let last_index = self.last_index_();
        if applied <= self.snapshot_index() {
            return Ok(());
        }
        if applied > last_index {
            return Err(self.invalid(format!(
                "cannot compact to entry {applied}: the log ends at entry {last_index}"
            )));
        }
        let term = self
            .mem
            .term(applied)
            .map_err(|e| self.invalid(e.to_string()))?;
        let kept = if applied < last_index {
            self.mem
                .entries(
                    applied + 1,
                    last_index + 1,
                    None,
                    GetEntriesContext::empty(false),
                )
                .map_err(|e| self.invalid(e.to_string()))?
        } else {
            Vec::new()
        };
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(conf_state);
        // The state machine applied `applied`, so it is committed even if the stored hard
        // state does not say so yet.
        let mut hs = self.hard_state.clone();
        raise_to_snapshot(&mut hs, applied, term);
        let mem = raft_memory(&snap, &kept, &hs).map_err(|e| self.invalid(e.to_string()))?;

        self.guarded(|s| {
            write_message_file(&s.dir, SNAPSHOT_FILE, &snap, "snapshot")?;
            s.log
                .purge_before(applied + 1)
                .map_err(|e| s.log_error(e))?;
            if hs != s.hard_state {
                write_message_file(&s.dir, HARDSTATE_FILE, &hs, "hard state")?;
            }
            Ok(())
        })?;
        self.mem = mem;
        self.snapshot = snap;
        self.hard_state = hs;
        Ok(())
    }

    /// The latest snapshot's index and state-machine data, to restore the state machine from at
    /// start; `None` before the first snapshot (the state machine starts empty, and every entry
    /// from index 1 is in the log).
    pub fn snapshot_data(&self) -> Option<(u64, Vec<u8>)> {
        let index = self.snapshot_index();
        (index > 0).then(|| (index, self.snapshot.data.to_vec()))
    }

    /// How many entries the log holds after the latest snapshot, to decide when to
    /// [`compact`](Self::compact).
    pub fn entries_since_snapshot(&self) -> u64 {
        self.last_index_() - self.snapshot_index()
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first_index_(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last_index_(&self) -> u64 {
        self.last
    }

    fn log_error(&self, source: log_core::Error) -> StorageError {
        StorageError::Log {
            dir: self.dir.join(LOG_DIR),
            source,
        }
    }

    fn check_failed(&self) -> Result<(), StorageError> {
        match &self.failed {
            Some(cause) => Err(StorageError::Failed {
                dir: self.dir.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Runs a write; if it fails, the storage refuses every later write, unless it failed
    /// for lack of space before anything was synced ([`StorageError::is_no_space`]): then
    /// nothing the storage reported durable changed, and the same write may be made again.
    fn guarded(
        &mut self,
        write: impl FnOnce(&mut Self) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        self.check_failed()?;
        match write(self) {
            Err(e) if !e.is_no_space() => {
                // The first failure is what every later write is refused with.
                let cause = std::sync::Arc::new(e);
                self.failed = Some(cause.clone());
                Err(StorageError::Failed {
                    dir: self.dir.clone(),
                    cause,
                })
            }
            result => result,
        }
    }

    fn invalid(&self, detail: String) -> StorageError {
        StorageError::Invalid {
            dir: self.dir.clone(),
            detail,
        }
    }
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    /// The latest stored snapshot, with its state-machine data (see
    /// [`node_core::controller::core::stored_snapshot`]).
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        stored_snapshot(&self.snapshot, request_index)
    }
}

/// Whether `dir` holds no initialized storage yet: no `snapshot` file (it is written last on
/// initialization), and nothing but what an interrupted initialization leaves in the others.
fn needs_init(dir: &Path) -> Result<bool, StorageError> {
    let exists = |name: &str| dir.join(name).exists();
    if exists(SNAPSHOT_FILE) {
        if !exists(HARDSTATE_FILE) {
            return Err(StorageError::Corrupt {
                path: dir.join(HARDSTATE_FILE),
                offset: 0,
                detail: "the file is missing".into(),
            });
        }
        // A log replaced for a snapshot is renamed away before its successor is created: only
        // then may it be missing.
        let replaced = dir.join(LOG_DIR).with_extension("old").exists();
        if !exists(LOG_DIR) && !replaced {
            return Err(StorageError::Corrupt {
                path: dir.join(LOG_DIR),
                offset: 0,
                detail: "the log is missing".into(),
            });
        }
        return Ok(false);
    }
    if exists(HARDSTATE_FILE) {
        let hs: HardState = read_message_file(&dir.join(HARDSTATE_FILE), "hard state")?;
        if hs != HardState::default() {
            return Err(StorageError::Corrupt {
                path: dir.join(SNAPSHOT_FILE),
                offset: 0,
                detail: format!("the file is missing, but {HARDSTATE_FILE} holds a hard state"),
            });
        }
    }
    Ok(true)
}

/// Writes the files of a new storage for `voters`: the empty log, the empty hard state, and
/// last the snapshot at index 0 that carries the membership.
fn initialize(dir: &Path, voters: &[u64]) -> Result<(), StorageError> {
    let log_dir = dir.join(LOG_DIR);
    let (log, loaded) = RaftLog::open(&log_dir, 1).map_err(|source| StorageError::Log {
        dir: log_dir.clone(),
        source,
    })?;
    drop(log);
    if !loaded.records.is_empty() {
        return Err(StorageError::Corrupt {
            path: dir.join(SNAPSHOT_FILE),
            offset: 0,
            detail: format!("the file is missing, but {LOG_DIR} holds entries"),
        });
    }
    write_message_file(dir, HARDSTATE_FILE, &HardState::default(), "hard state")?;
    let mut snapshot = Snapshot::default();
    snapshot.mut_metadata().mut_conf_state().voters = voters.to_vec();
    write_message_file(dir, SNAPSHOT_FILE, &snapshot, "snapshot")
}

/// Reads a file holding the header and exactly one record, and decodes the record.
fn read_message_file<M: protobuf::Message>(
    path: &Path,
    what: &'static str,
) -> Result<M, StorageError> {
    let buf = fs::read(path).map_err(io_error("read", path))?;
    check_header(path, &buf)?;
    let corrupt = |detail: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset: HEADER_LEN as u64,
        detail,
    };
    let body = parse_record(&buf, HEADER_LEN).map_err(|problem| corrupt(problem.into()))?;
    let end = HEADER_LEN + RECORD_HEADER_LEN + body.len();
    if end != buf.len() {
        return Err(corrupt(format!(
            "{} unexpected bytes after the {what} record",
            buf.len() - end
        )));
    }
    decode(path, HEADER_LEN, body, what)
}

/// Replaces file `name` in `dir` atomically by the header and one record holding `message`.
fn write_message_file(
    dir: &Path,
    name: &str,
    message: &impl protobuf::Message,
    what: &'static str,
) -> Result<(), StorageError> {
    let mut buf = Vec::from(*MAGIC);
    buf.extend_from_slice(VERSION);
    push_record(&mut buf, message, &dir.join(name), what)?;
    write_atomic(dir, name, &buf)
}

/// Checks the file header: [`MAGIC`] and [`VERSION`].
fn check_header(path: &Path, buf: &[u8]) -> Result<(), StorageError> {
    if buf.len() < HEADER_LEN || &buf[..MAGIC.len()] != MAGIC {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            detail: "no RLRAFT header: not a raft storage file".into(),
        });
    }
    let version = &buf[MAGIC.len()..HEADER_LEN];
    if version != VERSION {
        return Err(StorageError::UnknownVersion {
            path: path.to_path_buf(),
            found: String::from_utf8_lossy(version).into_owned(),
            supported: "01",
        });
    }
    Ok(())
}

/// The body of the record at `pos`, if a complete record with a matching checksum is there.
fn parse_record(buf: &[u8], pos: usize) -> Result<&[u8], &'static str> {
    let rest = &buf[pos..];
    if rest.len() < RECORD_HEADER_LEN {
        return Err("record header cut short");
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let body = rest[RECORD_HEADER_LEN..]
        .get(..len)
        .ok_or("record body cut short")?;
    if crc32c::crc32c(body) != crc {
        return Err("checksum mismatch");
    }
    Ok(body)
}

/// The protobuf encoding of `message`.
fn encode(
    message: &impl protobuf::Message,
    path: &Path,
    what: &'static str,
) -> Result<Vec<u8>, StorageError> {
    message
        .write_to_bytes()
        .map_err(|source| StorageError::Encode {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// Appends a record holding `message` to `buf`.
fn push_record(
    buf: &mut Vec<u8>,
    message: &impl protobuf::Message,
    path: &Path,
    what: &'static str,
) -> Result<(), StorageError> {
    let body = encode(message, path, what)?;
    let len = u32::try_from(body.len()).map_err(|_| StorageError::Invalid {
        dir: path.to_path_buf(),
        detail: format!("a {what} of {} bytes does not fit a record", body.len()),
    })?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    buf.extend_from_slice(&body);
    Ok(())
}

fn decode<M: protobuf::Message>(
    path: &Path,
    pos: usize,
    body: &[u8],
    what: &'static str,
) -> Result<M, StorageError> {
    M::parse_from_bytes(body).map_err(|e| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset: pos as u64,
        detail: format!("{what} with a valid checksum does not decode: {e}"),
    })
}

impl From<durable::Error> for StorageError {
    fn from(e: durable::Error) -> StorageError {
        StorageError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    }
}

/// Replaces `dir/name` by `contents` through `name.tmp` (`durable::write_atomic`: write, fsync,
/// rename, fsync of `dir`).
pub(crate) fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<(), StorageError> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let how = durable::Atomic::durable(&tmp, 0o600);
    Ok(durable::write_atomic(&dir.join(name), contents, how)?)
}

/// Creates `dir` and any missing parents, durably (mode 0700).
fn create_dir_durable(dir: &Path) -> Result<(), StorageError> {
    Ok(durable::private_dir(dir)?)
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use raft::eraftpb::Message;
    use raft::{Config, RawNode, StateRole};

    use super::*;

    const VOTERS: [u64; 3] = [1, 2, 3];

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    /// Entries `indexes` at `term`, with data naming their index and term.
    fn entries(indexes: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        indexes
            .map(|i| entry(i, term, format!("entry {i} term {term}").as_bytes()))
            .collect()
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    fn conf_state(voters: &[u64]) -> ConfState {
        ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        }
    }

    fn all_entries(s: &DiskStorage) -> Vec<Entry> {
        let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
        if last < first {
            return Vec::new();
        }
        s.entries(first, last + 1, None, GetEntriesContext::empty(false))
            .unwrap()
    }

    fn flip_byte(path: &Path, offset: u64) {
        let mut buf = fs::read(path).unwrap();
        buf[offset as usize] ^= 0x5a;
        fs::write(path, buf).unwrap();
    }

    #[test]
    fn new_storage_has_the_voters_and_an_empty_log() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data/controller");
        let s = DiskStorage::open(&dir, &[3, 1, 2]).unwrap();
        let state = s.initial_state().unwrap();
        assert!(state.initialized());
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(state.hard_state, HardState::default());
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        assert_eq!(s.term(0).unwrap(), 0);
        assert_eq!(s.snapshot_data(), None);
        assert_eq!(s.entries_since_snapshot(), 0);
        drop(s);
        let s = DiskStorage::open(&dir, &VOTERS).unwrap();
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn entries_and_hard_state_survive_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=3, 1)).unwrap();
        s.append(&entries(4..=5, 2)).unwrap();
        s.set_hardstate(hard_state(2, 1, 3)).unwrap();
        s.set_commit(4).unwrap();
        drop(s);

        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        let mut expected = entries(1..=3, 1);
        expected.extend(entries(4..=5, 2));
        assert_eq!(all_entries(&s), expected);
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(2, 1, 4));
        assert_eq!(s.term(5).unwrap(), 2);
        assert_eq!(s.entries_since_snapshot(), 5);
    }

    #[test]
    fn conflicting_suffix_is_replaced_durably() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=5, 1)).unwrap();
        s.append(&entries(3..=4, 2)).unwrap();
        let mut expected = entries(1..=2, 1);
        expected.extend(entries(3..=4, 2));
        assert_eq!(all_entries(&s), expected);
        drop(s);

        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!(all_entries(&s), expected);
        // Appending after the replacement lands after it.
        s.append(&entries(5..=5, 2)).unwrap();
        drop(s);
        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        expected.extend(entries(5..=5, 2));
        assert_eq!(all_entries(&s), expected);
    }

    #[test]
    fn appends_that_do_not_fit_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=2, 1)).unwrap();
        let gap = s.append(&entries(4..=4, 1)).unwrap_err();
        assert!(matches!(gap, StorageError::Invalid { .. }), "{gap}");
        let mut holes = entries(3..=3, 1);
        holes.extend(entries(5..=5, 1));
        assert!(matches!(
            s.append(&holes),
            Err(StorageError::Invalid { .. })
        ));
        // Refusals write nothing and do not fail the storage.
        s.append(&entries(3..=3, 1)).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn after_a_failed_write_every_write_is_refused_with_its_cause_until_reopened() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=2, 1)).unwrap();
        log_core::fault::inject(&tmp.path().join(LOG_DIR), "fdatasync", 0);
        let first = s.append(&entries(3..=3, 1)).unwrap_err();
        let StorageError::Failed { cause, .. } = &first else {
            panic!("{first}");
        };
        assert!(matches!(**cause, StorageError::Log { .. }), "{cause}");
        assert!(!first.is_no_space(), "a failed sync is never retried");
        // Every later write is refused with the first failure as its cause.
        let later = s.set_hardstate(hard_state(1, 1, 2)).unwrap_err();
        match &later {
            StorageError::Failed { cause: c, .. } => assert!(std::sync::Arc::ptr_eq(c, cause)),
            other => panic!("{other}"),
        }
        drop(s);
        // Reopened, it holds what was durable before the failure and takes writes again.
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!(all_entries(&s)[..2], entries(1..=2, 1)[..]);
        let last = s.last_index().unwrap();
        s.append(&entries(last + 1..=last + 1, 1)).unwrap();
    }

    /// The log's only segment file (offset 1 on).
    fn segment(dir: &Path) -> PathBuf {
        dir.join(LOG_DIR).join(format!("{:020}.log", 1))
    }

    #[test]
    fn a_torn_last_append_is_cut_off() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=2, 1)).unwrap();
        s.append(&entries(3..=3, 1)).unwrap();
        drop(s);
        // The last batch's bytes damaged (as a write cut short leaves them): it was never
        // acknowledged, and recovery drops it.
        let seg = segment(tmp.path());
        let data = fs::read(&seg).unwrap();
        let last = data.iter().rposition(|b| *b != 0).unwrap();
        flip_byte(&seg, last as u64);
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!(all_entries(&s), entries(1..=2, 1));
        s.append(&entries(3..=4, 2)).unwrap();
        drop(s);
        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        let mut expected = entries(1..=2, 1);
        expected.extend(entries(3..=4, 2));
        assert_eq!(all_entries(&s), expected);
    }

    #[test]
    fn damage_before_intact_appends_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        for i in 1..=5 {
            s.append(&entries(i..=i, 1)).unwrap();
        }
        drop(s);
        let seg = segment(tmp.path());
        let data = fs::read(&seg).unwrap();
        // A byte of the first entry's data.
        let at = data
            .windows(b"entry 1 term 1".len())
            .position(|w| w == b"entry 1 term 1")
            .unwrap();
        flip_byte(&seg, at as u64);
        let err = DiskStorage::open(tmp.path(), &VOTERS).err().unwrap();
        assert!(
            matches!(
                &err,
                StorageError::Log {
                    source: log_core::Error::Corruption { .. },
                    ..
                }
            ),
            "{err}"
        );
        // Nothing was cut off.
        assert_eq!(fs::read(&seg).unwrap().len(), data.len());
    }

    #[test]
    fn an_entry_over_entry_bytes_max_is_refused_and_nothing_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=1, 1)).unwrap();
        let fits = entry(2, 1, &vec![7; ENTRY_BYTES_MAX - 64]);
        s.append(std::slice::from_ref(&fits)).unwrap();
        let big = entry(3, 1, &vec![7; ENTRY_BYTES_MAX]);
        let err = s.append(&[big]).unwrap_err();
        assert!(
            matches!(&err, StorageError::Invalid { detail, .. } if detail.contains("ENTRY_BYTES_MAX")),
            "{err}"
        );
        // Refused, not failed: the storage goes on.
        s.append(&entries(3..=3, 1)).unwrap();
        drop(s);
        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(all_entries(&s)[1], fits);
    }

    #[test]
    fn a_log_of_an_earlier_build_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        drop(DiskStorage::open(tmp.path(), &VOTERS).unwrap());
        fs::write(tmp.path().join(OLD_LOG_FILE), b"RLRAFT01").unwrap();
        let err = DiskStorage::open(tmp.path(), &VOTERS).err().unwrap();
        assert!(matches!(&err, StorageError::OldLog { .. }), "{err}");
    }

    #[test]
    fn corrupt_hard_state_or_snapshot_is_refused() {
        for name in [HARDSTATE_FILE, SNAPSHOT_FILE] {
            let tmp = tempfile::tempdir().unwrap();
            let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
            s.append(&entries(1..=3, 1)).unwrap();
            s.set_hardstate(hard_state(1, 1, 2)).unwrap();
            drop(s);
            let path = tmp.path().join(name);
            let len = fs::metadata(&path).unwrap().len();
            flip_byte(&path, len - 1);
            let err = DiskStorage::open(tmp.path(), &VOTERS).err().unwrap();
            assert!(
                matches!(&err, StorageError::Corrupt { path: p, .. } if *p == path),
                "{err}"
            );
            assert!(err.to_string().contains("checksum mismatch"), "{err}");
        }
    }

    #[test]
    fn unknown_format_version_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        drop(DiskStorage::open(tmp.path(), &VOTERS).unwrap());
        let path = tmp.path().join(HARDSTATE_FILE);
        let mut buf = fs::read(&path).unwrap();
        buf[6..8].copy_from_slice(b"02");
        fs::write(&path, buf).unwrap();
        let err = DiskStorage::open(tmp.path(), &VOTERS).err().unwrap();
        assert!(
            matches!(&err, StorageError::UnknownVersion { found, .. } if found == "02"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=1, 1)).unwrap();
        drop(s);
        fs::rename(
            tmp.path().join(SNAPSHOT_FILE),
            tmp.path().join("snapshot.saved"),
        )
        .unwrap();
        assert!(matches!(
            DiskStorage::open(tmp.path(), &VOTERS),
            Err(StorageError::Corrupt { .. })
        ));
        // The log missing, without a replacement under way.
        fs::rename(
            tmp.path().join("snapshot.saved"),
            tmp.path().join(SNAPSHOT_FILE),
        )
        .unwrap();
        fs::remove_dir_all(tmp.path().join(LOG_DIR)).unwrap();
        let err = DiskStorage::open(tmp.path(), &VOTERS).err().unwrap();
        assert!(
            matches!(&err, StorageError::Corrupt { detail, .. } if detail.contains("missing")),
            "{err}"
        );
    }

    #[test]
    fn compaction_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=4, 1)).unwrap();
        s.append(&entries(5..=10, 2)).unwrap();
        s.set_hardstate(hard_state(2, 1, 8)).unwrap();
        s.compact(6, b"state at 6".to_vec(), conf_state(&VOTERS))
            .unwrap();

        let check = |s: &DiskStorage| {
            assert_eq!(s.first_index().unwrap(), 7);
            assert_eq!(s.last_index().unwrap(), 10);
            assert_eq!(s.term(6).unwrap(), 2);
            assert_eq!(
                s.term(5),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            );
            assert_eq!(all_entries(s), entries(7..=10, 2));
            assert_eq!(s.snapshot_data(), Some((6, b"state at 6".to_vec())));
            assert_eq!(s.entries_since_snapshot(), 4);
            let snap = Storage::snapshot(s, 0, 2).unwrap();
            assert_eq!(snap.get_metadata().index, 6);
            assert_eq!(snap.get_metadata().term, 2);
            assert_eq!(snap.get_metadata().get_conf_state().voters, VOTERS);
            assert_eq!(&snap.data[..], b"state at 6");
            let state = s.initial_state().unwrap();
            assert_eq!(state.hard_state, hard_state(2, 1, 8));
            assert_eq!(state.conf_state.voters, VOTERS);
        };
        check(&s);
        // Compacting to or below the snapshot changes nothing.
        s.compact(5, b"older".to_vec(), conf_state(&VOTERS))
            .unwrap();
        check(&s);
        drop(s);

        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        check(&s);
        // The log goes on after the snapshot, and compacts up to its end.
        s.append(&entries(11..=11, 3)).unwrap();
        s.compact(11, b"state at 11".to_vec(), conf_state(&VOTERS))
            .unwrap();
        assert!(matches!(
            s.compact(12, Vec::new(), conf_state(&VOTERS)),
            Err(StorageError::Invalid { .. })
        ));
        drop(s);
        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (12, 11)
        );
        assert_eq!(s.term(11).unwrap(), 3);
        assert_eq!(s.snapshot_data(), Some((11, b"state at 11".to_vec())));
        // Compacting past the stored commit index commits the snapshot.
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(3, 0, 11));
    }

    #[test]
    fn interrupted_compaction_is_finished_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=5, 1)).unwrap();
        s.set_hardstate(hard_state(1, 1, 5)).unwrap();
        drop(s);
        // The snapshot file is replaced, but the process stops before rewriting the log.
        let mut snap = Snapshot::default();
        snap.set_data(b"state at 3".to_vec().into());
        snap.mut_metadata().index = 3;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().set_conf_state(conf_state(&VOTERS));
        write_message_file(tmp.path(), SNAPSHOT_FILE, &snap, "snapshot").unwrap();

        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!(all_entries(&s), entries(4..=5, 1));
        assert_eq!(s.snapshot_data(), Some((3, b"state at 3".to_vec())));
        drop(s);
        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!(all_entries(&s), entries(4..=5, 1));
    }

    #[test]
    fn interrupted_snapshot_install_is_finished_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=5, 1)).unwrap();
        s.set_hardstate(hard_state(1, 1, 3)).unwrap();
        drop(s);
        // A leader's snapshot that disagrees with the log at its index is stored, but the process
        // stops before emptying the log.
        let mut snap = Snapshot::default();
        snap.set_data(b"leader state".to_vec().into());
        snap.mut_metadata().index = 4;
        snap.mut_metadata().term = 2;
        snap.mut_metadata().set_conf_state(conf_state(&VOTERS));
        write_message_file(tmp.path(), SNAPSHOT_FILE, &snap, "snapshot").unwrap();

        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (5, 4));
        assert_eq!(s.term(4).unwrap(), 2);
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(2, 0, 4));
        drop(s);
        // Stopped again, after the log was renamed away and before its successor was made.
        let log = tmp.path().join(LOG_DIR);
        fs::rename(&log, log.with_extension("old")).unwrap();
        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (5, 4));
        assert!(!log.with_extension("old").exists());
        drop(s);
        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (5, 4));
        assert_eq!(s.snapshot_data(), Some((4, b"leader state".to_vec())));
    }

    #[test]
    fn snapshot_from_the_leader_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        s.append(&entries(1..=3, 1)).unwrap();
        s.set_hardstate(hard_state(1, 2, 2)).unwrap();

        let mut snap = Snapshot::default();
        snap.set_data(b"leader state".to_vec().into());
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().set_conf_state(conf_state(&VOTERS));
        s.apply_snapshot(snap.clone()).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (11, 10)
        );
        assert_eq!(s.term(10).unwrap(), 3);
        // Raised to the snapshot's term (no vote in it) and commit.
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(3, 0, 10));
        s.append(&entries(11..=12, 3)).unwrap();
        s.set_hardstate(hard_state(3, 0, 11)).unwrap();
        // An older snapshot is refused.
        snap.mut_metadata().index = 9;
        assert!(matches!(
            s.apply_snapshot(snap),
            Err(StorageError::Invalid { .. })
        ));
        drop(s);

        let s = DiskStorage::open(tmp.path(), &VOTERS).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (11, 12)
        );
        assert_eq!(all_entries(&s), entries(11..=12, 3));
        assert_eq!(s.snapshot_data(), Some((10, b"leader state".to_vec())));
        assert_eq!(s.initial_state().unwrap().hard_state, hard_state(3, 0, 11));
        assert_eq!(
            &Storage::snapshot(&s, 0, 1).unwrap().data[..],
            b"leader state"
        );
    }

    #[test]
    fn other_voters_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        drop(DiskStorage::open(tmp.path(), &VOTERS).unwrap());
        let err = DiskStorage::open(tmp.path(), &[1, 2]).err().unwrap();
        assert!(
            matches!(&err, StorageError::VotersMismatch { stored, configured, .. }
                if *stored == VOTERS && *configured == [1, 2]),
            "{err}"
        );
        assert!(matches!(
            DiskStorage::open(tmp.path(), &[1, 2, 3, 4]),
            Err(StorageError::VotersMismatch { .. })
        ));
        assert!(matches!(
            DiskStorage::open(tmp.path(), &[]),
            Err(StorageError::Invalid { .. })
        ));
        DiskStorage::open(tmp.path(), &[3, 2, 1]).unwrap();
    }

    /// Handles one `Ready` the way the controller will: persist, then send; returns the
    /// messages to deliver and appends the data of committed entries to `applied`.
    fn handle_ready(node: &mut RawNode<DiskStorage>, applied: &mut Vec<Vec<u8>>) -> Vec<Message> {
        if !node.has_ready() {
            return Vec::new();
        }
        let mut ready = node.ready();
        let mut out = ready.take_messages();
        if !ready.snapshot().is_empty() {
            node.mut_store()
                .apply_snapshot(ready.snapshot().clone())
                .unwrap();
        }
        let apply = |applied: &mut Vec<Vec<u8>>, committed: Vec<Entry>| {
            applied.extend(
                committed
                    .into_iter()
                    .filter(|e| !e.data.is_empty())
                    .map(|e| e.data.to_vec()),
            );
        };
        apply(applied, ready.take_committed_entries());
        node.mut_store().append(ready.entries()).unwrap();
        if let Some(hs) = ready.hs() {
            node.mut_store().set_hardstate(hs.clone()).unwrap();
        }
        out.extend(ready.take_persisted_messages());
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            node.mut_store().set_commit(commit).unwrap();
        }
        out.extend(light.take_messages());
        apply(applied, light.take_committed_entries());
        node.advance_apply();
        out
    }

    #[test]
    fn three_raw_nodes_commit_a_proposal_that_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let dirs: Vec<PathBuf> = VOTERS
            .iter()
            .map(|id| tmp.path().join(format!("node-{id}/controller")))
            .collect();
        let config = |id: u64| Config {
            id,
            election_tick: 10,
            heartbeat_tick: 3,
            ..Default::default()
        };
        let mut nodes: Vec<RawNode<DiskStorage>> = VOTERS
            .iter()
            .zip(&dirs)
            .map(|(&id, dir)| {
                let store = DiskStorage::open(dir, &VOTERS).unwrap();
                RawNode::new(&config(id), store, &logger).unwrap()
            })
            .collect();

        nodes[0].campaign().unwrap();
        let mut applied = vec![Vec::new(); nodes.len()];
        let mut in_flight = VecDeque::new();
        let mut proposed = false;
        for _ in 0..1000 {
            for (node, applied) in nodes.iter_mut().zip(&mut applied) {
                in_flight.extend(handle_ready(node, applied));
            }
            if !proposed && nodes[0].raft.state == StateRole::Leader {
                nodes[0].propose(Vec::new(), b"hello".to_vec()).unwrap();
                proposed = true;
            }
            while let Some(msg) = in_flight.pop_front() {
                nodes[(msg.to - 1) as usize].step(msg).unwrap();
            }
            if applied.iter().all(|a| a.contains(&b"hello".to_vec())) {
                break;
            }
        }
        assert!(proposed, "no leader was elected");
        for (id, applied) in VOTERS.iter().zip(&applied) {
            assert_eq!(applied, &[b"hello".to_vec()], "node {id}");
        }
        drop(nodes);

        for (&id, dir) in VOTERS.iter().zip(&dirs) {
            let store = DiskStorage::open(dir, &VOTERS).unwrap();
            let hs = store.initial_state().unwrap().hard_state;
            let stored = all_entries(&store);
            let hello = stored
                .iter()
                .find(|e| &e.data[..] == b"hello")
                .unwrap_or_else(|| panic!("node {id} lost the committed entry"));
            assert!(hs.commit >= hello.index, "node {id}: {hs:?}");
            // Raft accepts the reopened storage.
            let node = RawNode::new(&config(id), store, &logger).unwrap();
            assert_eq!(node.raft.raft_log.committed, hs.commit);
        }
    }
}
