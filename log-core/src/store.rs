//! A store: the named logs of one shard, one directory per log under a data directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::LogConfig;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::log::Log;
use crate::recovery::MANIFEST_FILE;

pub use format::LOG_NAME_BYTES_MAX;

/// Log names are directory names: 1 to `LOG_NAME_BYTES_MAX` bytes of `[A-Za-z0-9._-]`, not
/// starting with a dot ([`format::check_log_name`]).
pub fn validate_log_name(name: &str) -> Result<()> {
    format::check_log_name(name).map_err(|reason| Error::InvalidName {
        name: name.into(),
        reason,
    })
}

/// The logs under one data directory. Like [`Log`], a store lives on one thread.
pub struct Store {
    dir: PathBuf,
    config: LogConfig,
    logs: BTreeMap<String, Log>,
}

impl Store {
    /// Open every log under `dir` (directories holding a log manifest), creating `dir` (0700) if
    /// needed. Other entries are left alone.
    pub async fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        fsutil::create_private_dir(&dir)?;
        let mut logs = BTreeMap::new();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(Error::io("read directory", &dir))? {
            let entry = entry.map_err(Error::io("read directory", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().join(MANIFEST_FILE).exists() && validate_log_name(&name).is_ok() {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            let log = Log::open(dir.join(&name), config.clone()).await?;
            logs.insert(name, log);
        }
        Ok(Store { dir, config, logs })
    }

    /// Create a new, empty log.
    pub async fn create_log(&mut self, name: &str) -> Result<Log> {
        validate_log_name(name)?;
        if self.logs.contains_key(name) || self.dir.join(name).exists() {
            return Err(Error::AlreadyExists { name: name.into() });
        }
        let log = Log::open(self.dir.join(name), self.config.clone()).await?;
        self.logs.insert(name.to_owned(), log.clone());
        Ok(log)
    }

    pub fn get(&self, name: &str) -> Option<&Log> {
        self.logs.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.logs.keys().map(String::as_str)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Close every log, writing and flushing what is queued. Returns the first error.
    pub async fn close(self) -> Result<()> {
        let mut first = Ok(());
        for (_, log) in self.logs {
            let r = log.close().await;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
