//! Records a replica truncates (its divergent suffix, KIP-101) are moved here first, never
//! silently deleted: `<dir>/<log>/<ms>-<from>-<to>.batches` holds the stored batches byte for
//! byte (each still checkable by its crc32c), and `<same>.report` says what they were:
//!
//! ```text
//! replog-quarantine 1
//! log <name>
//! from <first offset> to <end offset>
//! records <n> bytes <n>
//! epochs <e1>,<e2>,...
//! at_ms <ms since the Unix epoch>
//! ```
//!
//! Both are written to a temporary name, fsync'd and renamed, then the directory is fsync'd,
//! before the truncation runs.

use std::path::{Path, PathBuf};

use log_core::{Log, Offset};

/// The first line of a report file.
pub const REPORT_HEADER: &str = "replog-quarantine 1";

/// What a quarantine holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub log: String,
    /// The records from `from` (included) to `to` (excluded).
    pub from: u64,
    pub to: u64,
    pub records: u64,
    pub bytes: u64,
    /// The epochs the records were written in.
    pub epochs: Vec<u64>,
    pub at_ms: u64,
    /// The batches file.
    pub file: PathBuf,
}

/// Write `bytes` to `path` durably (`durable::write_atomic`: a temporary file, fsync, rename,
/// fsync of the directory).
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), SaveError> {
    let tmp = path.with_extension("tmp");
    durable::write_atomic(path, bytes, durable::Atomic::durable(&tmp, 0o644))?;
    Ok(())
}

/// Why a divergent suffix could not be saved (and so is not truncated).
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("read {log} at {at}: {source}")]
    Read {
        log: String,
        at: u64,
        source: log_core::Error,
    },
    #[error(transparent)]
    Write(#[from] durable::Error),
}

/// Copy the records of `log` (named `name`) from `from` to its end into a quarantine under
/// `dir`, and say what they were. `None` when there is nothing after `from`.
pub fn save(log: &Log, name: &str, from: u64, dir: &Path) -> Result<Option<Report>, SaveError> {
    let end = log.end_offset().0.max(log.next_offset().0);
    if end <= from {
        return Ok(None);
    }
    let mut data = Vec::new();
    let (mut records, mut epochs) = (0u64, Vec::new());
    let mut batches = log.batches(Offset(from), Offset(end));
    while let Some(b) = batches.next() {
        let b = b.map_err(|source| SaveError::Read {
            log: name.to_string(),
            at: batches.position().0,
            source,
        })?;
        let h = b.view().header();
        // The batch holding `from` may start before it: keep only what is truncated.
        if h.next_offset().0 <= from {
            continue;
        }
        records += h.next_offset().0 - h.base_offset().0.max(from);
        if epochs.last() != Some(&h.epoch().0) {
            epochs.push(h.epoch().0);
        }
        data.extend_from_slice(&b);
    }
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let dir = dir.join(name);
    durable::private_dir(&dir)?;
    let stem = format!("{at_ms}-{from}-{end}");
    let file = dir.join(format!("{stem}.batches"));
    write_durable(&file, &data)?;
    let report = Report {
        log: name.to_string(),
        from,
        to: end,
        records,
        bytes: data.len() as u64,
        epochs,
        at_ms,
        file,
    };
    write_durable(
        &dir.join(format!("{stem}.report")),
        render(&report).as_bytes(),
    )?;
    Ok(Some(report))
}

fn render(r: &Report) -> String {
    let epochs: Vec<String> = r.epochs.iter().map(u64::to_string).collect();
    format!(
        "{REPORT_HEADER}\nlog {}\nfrom {} to {}\nrecords {} bytes {}\nepochs {}\nat_ms {}\n",
        r.log,
        r.from,
        r.to,
        r.records,
        r.bytes,
        epochs.join(","),
        r.at_ms
    )
}

fn parse(text: &str, file: PathBuf) -> Option<Report> {
    let mut lines = text.lines();
    if lines.next()? != REPORT_HEADER {
        return None;
    }
    let log = lines.next()?.strip_prefix("log ")?.to_string();
    let (from, to) = lines.next()?.strip_prefix("from ")?.split_once(" to ")?;
    let (records, bytes) = lines
        .next()?
        .strip_prefix("records ")?
        .split_once(" bytes ")?;
    let epochs = lines.next()?.strip_prefix("epochs ")?;
    let at_ms = lines.next()?.strip_prefix("at_ms ")?;
    Some(Report {
        log,
        from: from.parse().ok()?,
        to: to.parse().ok()?,
        records: records.parse().ok()?,
        bytes: bytes.parse().ok()?,
        epochs: epochs
            .split(',')
            .filter(|e| !e.is_empty())
            .map(|e| e.parse().ok())
            .collect::<Option<_>>()?,
        at_ms: at_ms.parse().ok()?,
        file,
    })
}

/// Every quarantine report under `dir`, oldest first (unreadable ones are skipped).
pub fn list(dir: &Path) -> Vec<Report> {
    let mut out = Vec::new();
    let Ok(logs) = std::fs::read_dir(dir) else {
        return out;
    };
    for log in logs.flatten() {
        let Ok(files) = std::fs::read_dir(log.path()) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            if path.extension().is_some_and(|e| e == "report") {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    out.extend(parse(&text, path.with_extension("batches")));
                }
            }
        }
    }
    out.sort_by_key(|r| (r.at_ms, r.log.clone(), r.from));
    out
}
