//! The client: connection management, retries, redirects, and the request methods.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use protocol::{
    Acks, AppendRequest, BatchesResponse, ErrorCode, ErrorResponse, LogInfo, ProtocolError,
    ReadRequest, Receipt, Request, Response, StatusResponse,
};
use quinn::VarInt;

use crate::config::{quic_config, ClientConfig, ServerAddr};
use crate::conn::{self, DialParams, Endpoints, CODE_NORMAL};
use crate::producer::{Producer, ProducerOptions};
use crate::records::{extract_records, split_batches, ReadRecord};
use crate::tail::Tail;
use crate::{Error, Result};

/// Redirects followed by one call, at most.
pub(crate) const REDIRECTS_MAX: u32 = 3;

/// Options of [`Client::append`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendOptions {
    /// Durability level the receipt waits for. Default [`Acks::Leader`].
    pub acks: Acks,
    /// Conditional append: store only if the log's next offset equals this; otherwise the node
    /// answers [`ErrorCode::OffsetConflict`] with the actual next offset in `detail`.
    pub expected_offset: Option<u64>,
    /// How long the node may wait for `acks` to be reached (`None`: the node's default).
    pub timeout: Option<Duration>,
}

impl Default for AppendOptions {
    fn default() -> AppendOptions {
        AppendOptions {
            acks: Acks::Leader,
            expected_offset: None,
            timeout: None,
        }
    }
}

/// Options of [`Client::read`] and [`Client::read_batches`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadOptions {
    /// Upper bound on the batch bytes of the answer (a first batch larger than this is still
    /// returned whole). Default 1 MiB.
    pub bytes_max: u32,
    /// How long the node may wait for its committed horizon to reach `min_offset`, and, if
    /// nothing is readable at `from`, for records to commit. Default 0: answer at once.
    pub wait: Duration,
    /// The committed horizon the node must have reached before answering. `None` (the default)
    /// sends the highest offset this client has seen for the log, which gives read-your-writes
    /// and monotonic reads across nodes; `Some(0)` asks for no guarantee.
    ///
    /// A replica that has not reached it within `wait` answers [`ErrorCode::Behind`] (its
    /// committed offset in [`Error::Server`]'s `detail`) instead of data. The read then goes to
    /// the other configured servers, each once, with the same `min_offset`; it fails with the
    /// last `behind` answer when none of them has reached it either. Data is only ever returned
    /// by a node that has reached `min_offset`.
    pub min_offset: Option<u64>,
}

impl Default for ReadOptions {
    fn default() -> ReadOptions {
        ReadOptions {
            bytes_max: 1 << 20,
            wait: Duration::ZERO,
            min_offset: None,
        }
    }
}

/// The answer to [`Client::read`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// The records at or above the offset asked for, in offset order; empty when nothing was
    /// readable.
    pub records: Vec<ReadRecord>,
    /// Where the next read should start.
    pub next_offset: u64,
    /// The log's committed horizon when the answer was built.
    pub committed: u64,
}

/// The answer to [`Client::read_batches`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchesRead {
    /// The batches from the one holding the offset asked for, in offset order, each whole and
    /// byte for byte as the node stores it (header included; the first batch may hold records
    /// below the offset asked for). Every batch has passed its crc check. Empty when nothing was
    /// readable.
    pub batches: Vec<Bytes>,
    /// Where the next read should start: the end of the last batch.
    pub next_offset: u64,
    /// The log's committed horizon when the answer was built.
    pub committed: u64,
}

/// Whether a request may be sent again after it may have reached the node.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Safety {
    /// Reads, listing, status, create, idempotent appends.
    Repeatable,
    /// Plain appends: once sent, never again.
    Once,
}

/// An answer, whether an earlier attempt of the same call may have reached the node, and which
/// node answered.
pub(crate) struct Answer {
    pub resp: Response,
    pub resent: bool,
    /// Index in the configured servers of the node that answered, or `None` for a node reached
    /// by a redirect that is not one of them.
    pub server: Option<usize>,
}

/// Which node the next attempt goes to.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// The current connection, or the configured servers in order when there is none.
    Current,
    /// The leader named by a redirect.
    Leader(String),
    /// The configured server after the one of connection `gen` (a redirect without a leader).
    NextAfter(u64),
    /// The configured server of this index, and no other: a call aimed at it is neither
    /// redirected nor moved to another server, and is given up at once if the server cannot be
    /// reached.
    Server(usize),
}

#[derive(Clone)]
pub(crate) struct Live {
    pub conn: quinn::Connection,
    pub gen: u64,
    /// Index in the configured servers, or `None` for a leader reached by a redirect.
    server: Option<usize>,
    addr: ServerAddr,
}

struct ConnState {
    live: Option<Live>,
    /// The configured server dialled first.
    preferred: usize,
    next_gen: u64,
}

pub(crate) struct Inner {
    pub config: ClientConfig,
    servers: Vec<ServerAddr>,
    quic: quinn::ClientConfig,
    endpoints: Mutex<Endpoints>,
    conn: tokio::sync::Mutex<ConnState>,
    /// Per log, the highest committed offset this client has seen.
    seen: Mutex<HashMap<String, u64>>,
}

/// A replog client: a QUIC connection to a node, shared by every clone.
///
/// Cheap to clone (an `Arc`); `Send` and `Sync`; usable from any tokio runtime. The connection is
/// established by [`Client::connect`] and re-established lazily when it has closed. Requests that
/// are safe to repeat are retried on connection-level failures (see [`ClientConfig::retries`]),
/// and `not_leader` answers are followed to the leader.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.inner.config.servers)
            .finish_non_exhaustive()
    }
}

pub(crate) fn backoff(attempt: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << attempt.min(6));
    Duration::from_millis(ms.min(2000))
}

/// The pause before asking again for a leader, for a sync set that is forming, or for a node
/// that could not be reached: short, since a failover completes within about a second of being
/// decided, and the request is waiting.
pub(crate) fn leader_backoff(attempt: u32) -> Duration {
    let ms = 10u64.saturating_mul(1 << attempt.min(6));
    Duration::from_millis(ms).min(LEADER_BACKOFF_MAX)
}

/// The longest pause between two attempts to find a leader.
pub(crate) const LEADER_BACKOFF_MAX: Duration = Duration::from_millis(100);

fn unexpected(what: &'static str) -> Error {
    Error::Protocol(ProtocolError::Malformed(what))
}

/// The batches of an answer to a Read sent with `min_offset`, or the error it stands for.
fn read_answer(resp: Response, min_offset: u64) -> Result<BatchesResponse> {
    match resp {
        Response::Batches(b) if b.committed < min_offset => Err(unexpected(
            "a read answer from a node below the read's min_offset",
        )),
        Response::Batches(b) => Ok(b),
        Response::Error(e) => Err(e.into()),
        _ => Err(unexpected("unexpected answer to Read")),
    }
}

fn check_name(config: &ClientConfig, what: &str, name: &str) -> Result<()> {
    let max = config.limits.name_bytes_max as usize;
    if name.len() > max {
        return Err(Error::Config(format!(
            "{what} {name:.40?}... is {} bytes, over the limit of {max}",
            name.len()
        )));
    }
    Ok(())
}

/// The error `e` ends a call; `resent` when an earlier attempt may have taken effect.
fn fail(e: Error, resent: bool) -> Error {
    if resent {
        e.after_resend()
    } else {
        e
    }
}

/// Milliseconds for the wire, saturating, and never 0 for a non-zero duration (0 means "none").
pub(crate) fn millis(d: Duration) -> u32 {
    if d.is_zero() {
        0
    } else {
        u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
    }
}

impl Client {
    /// Check the configuration, load the TLS trust, and connect to the first configured server
    /// that answers (authenticating with the token if one is configured).
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        if config.servers.is_empty() {
            return Err(Error::Config("no server address configured".into()));
        }
        let servers = config
            .servers
            .iter()
            .map(|s| ServerAddr::parse(s))
            .collect::<Result<Vec<_>>>()?;
        if let Some(token) = &config.token {
            if token.len() > config.limits.token_bytes_max as usize {
                return Err(Error::Config(format!(
                    "the token is {} bytes, over the limit of {}",
                    token.len(),
                    config.limits.token_bytes_max
                )));
            }
        }
        if config.limits.frame_bytes_max < protocol::BATCHES_PREFIX_LEN as u32 {
            return Err(Error::Config("limits.frame_bytes_max is too small".into()));
        }
        let quic = quic_config(&config)?;
        let client = Client {
            inner: Arc::new(Inner {
                config,
                servers,
                quic,
                endpoints: Mutex::new(Endpoints::default()),
                conn: tokio::sync::Mutex::new(ConnState {
                    live: None,
                    preferred: 0,
                    next_gen: 1,
                }),
                seen: Mutex::new(HashMap::new()),
            }),
        };
        client.acquire(&Target::Current).await?;
        Ok(client)
    }

    /// One request that is safe to repeat, with the configured request timeout.
    async fn repeatable(&self, req: &Request) -> Result<Answer> {
        let frame = conn::encode(req);
        self.call(
            &frame,
            Safety::Repeatable,
            self.inner.config.request_timeout,
            Target::Current,
        )
        .await
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Create an empty log. On a leader the answer waits (up to the node's
    /// `replication.create_wait_ms`) until the log is writable at the durability its
    /// configuration promises: with `sync_replicas = k` and `insufficient_replicas = reject`,
    /// until k followers are in its sync set, on record with the controller. Past that wait the
    /// node answers `not_enough_replicas`, naming the followers missing; the log exists then. A
    /// `log_exists` answer to a retry of this call (after the first attempt may have created
    /// the log) counts as success.
    pub async fn create_log(&self, name: &str) -> Result<()> {
        self.create(name, false).await
    }

    /// Create an empty log and answer as soon as it exists on the leader, without waiting for
    /// its sync set (an `acks=sync` append right after may get `not_enough_replicas`).
    pub async fn create_log_no_wait(&self, name: &str) -> Result<()> {
        self.create(name, true).await
    }

    async fn create(&self, name: &str, no_wait: bool) -> Result<()> {
        check_name(&self.inner.config, "log name", name)?;
        let answer = self
            .repeatable(&Request::CreateLog {
                name: name.into(),
                no_wait,
            })
            .await?;
        match answer.resp {
            Response::Ok => Ok(()),
            Response::Error(e) if e.code == ErrorCode::LogExists && answer.resent => Ok(()),
            Response::Error(e) => Err(e.into()),
            _ => Err(unexpected("unexpected answer to CreateLog")),
        }
    }

    /// Ask for a planned transfer of the leadership of `log` to node `to` (`None`: the node
    /// picks a member of the sync set), through the cluster's controller. Returns once the
    /// controller has it; the transfer completes when the target has caught up, and the
    /// leader takes no writes meanwhile (`Client::status` shows the new leader).
    pub async fn transfer_leadership(&self, log: &str, to: Option<&str>) -> Result<()> {
        check_name(&self.inner.config, "log name", log)?;
        let req = Request::Transfer {
            log: log.into(),
            to: to.unwrap_or_default().into(),
        };
        let answer = self.repeatable(&req).await?;
        match answer.resp {
            Response::Ok => Ok(()),
            Response::Error(e) => Err(e.into()),
            _ => Err(unexpected("unexpected answer to Transfer")),
        }
    }

    /// Store an application snapshot of `log`: state that reflects every record below
    /// `offset` (a copy of a database, say). A reader can start from it with
    /// [`Client::latest_snapshot`] and read the log from `offset` on; the node keeps every
    /// record after the latest snapshot's offset from retention (up to its cap). Snapshots
    /// only move forward: one at an offset below the latest fails with `offset_conflict`. The
    /// offset must lie within the log's records (`offset_out_of_range` otherwise, its detail
    /// the log's start) and at or below its commit offset (`behind` otherwise, its detail the
    /// commit offset: a record above it may still be lost in a failover; retry once it has
    /// committed). Written on the leader (followed by redirect) and copied to every follower.
    pub async fn put_snapshot(&self, log: &str, offset: u64, data: Bytes) -> Result<()> {
        check_name(&self.inner.config, "log name", log)?;
        let limit = self.inner.config.limits.snapshot_bytes_max;
        if data.len() as u64 > limit as u64 {
            return Err(Error::Config(format!(
                "a snapshot of {} bytes exceeds snapshot_bytes_max {limit}",
                data.len()
            )));
        }
        let req = Request::PutSnapshot(protocol::Snapshot {
            log: log.into(),
            offset,
            crc32c: crc32c::crc32c(&data),
            data,
        });
        match self.repeatable(&req).await?.resp {
            Response::Ok => Ok(()),
            Response::Error(e) => Err(e.into()),
            _ => Err(unexpected("unexpected answer to PutSnapshot")),
        }
    }

    /// The latest application snapshot of `log` on the node asked, checked against its
    /// crc32c; `None` if it has none.
    pub async fn latest_snapshot(&self, log: &str) -> Result<Option<protocol::Snapshot>> {
        check_name(&self.inner.config, "log name", log)?;
        let req = Request::GetSnapshot { log: log.into() };
        match self.repeatable(&req).await?.resp {
            Response::Snapshot(s) => {
                if s.log != log || crc32c::crc32c(&s.data) != s.crc32c {
                    return Err(Error::Corrupt(format!(
                        "snapshot of {log:?} at offset {}: crc32c mismatch",
                        s.offset
                    )));
                }
                Ok(Some(s))
            }
            Response::Error(e) if e.code == ErrorCode::SnapshotNotFound => Ok(None),
            Response::Error(e) => Err(e.into()),
            _ => Err(unexpected("unexpected answer to GetSnapshot")),
        }
    }

    /// The logs on the node.
    pub async fn list_logs(&self) -> Result<Vec<LogInfo>> {
        match self.repeatable(&Request::ListLogs).await?.resp {
            Response::Logs(logs) => Ok(logs),
            Response::Error(e) => Err(e.into()),
            _ => Err(unexpected("unexpected answer to ListLogs")),
        }
    }

    /// The node's identity, role and logs.
    pub async fn status(&self) -> Result<StatusResponse> {
        match self.repeatable(&Request::Status).await?.resp {
            Response::Status(s) => Ok(*s),
            Response::Error(e) => Err(e.into()),
            _ => Err(unexpected("unexpected answer to Status")),
        }
    }

    /// Append `records` to `log` as one batch: all of them are stored, at consecutive offsets,
    /// or none.
    ///
    /// A plain append is never sent twice: if it fails after it may have reached the node, the
    /// error's [`Error::is_unknown_outcome`] is true and the records may or may not be stored.
    /// Use a [`Producer`] for appends that are retried safely.
    pub async fn append(
        &self,
        log: &str,
        records: Vec<Bytes>,
        options: AppendOptions,
    ) -> Result<Receipt> {
        let req = AppendRequest {
            log: log.into(),
            acks: options.acks,
            expected_offset: options.expected_offset,
            producer: None,
            timeout_ms: options.timeout.map(millis).unwrap_or(0),
            records,
        };
        self.append_request(req, options.timeout, Safety::Once)
            .await
    }

    /// Send an append (plain, conditional or idempotent) and check its receipt.
    pub(crate) async fn append_request(
        &self,
        req: AppendRequest,
        timeout: Option<Duration>,
        safety: Safety,
    ) -> Result<Receipt> {
        let config = &self.inner.config;
        check_name(config, "log name", &req.log)?;
        if req.records.is_empty() {
            return Err(Error::Config("an append needs at least one record".into()));
        }
        if req.records.len() > config.limits.records_max as usize {
            return Err(Error::Config(format!(
                "an append of {} records is over the limit of {}",
                req.records.len(),
                config.limits.records_max
            )));
        }
        let body: u64 =
            req.records.iter().map(|r| 4 + r.len() as u64).sum::<u64>() + 38 + req.log.len() as u64;
        if body > u64::from(u32::MAX) {
            return Err(Error::Config(format!(
                "an append of {body} bytes does not fit in one frame"
            )));
        }
        let count = req.records.len() as u64;
        let log = req.log.clone();
        let frame = conn::encode(&Request::Append(req));
        // The node may take up to the append's timeout to answer.
        let wait = match timeout {
            Some(t) => config
                .request_timeout
                .max(t.saturating_add(Duration::from_secs(2))),
            None => config.request_timeout,
        };
        let answer = self.call(&frame, safety, wait, Target::Current).await?;
        match answer.resp {
            Response::Receipt(r) => {
                if r.next - r.first != count {
                    return Err(unexpected(
                        "the receipt does not cover the records appended",
                    ));
                }
                self.note_seen(&log, r.next);
                Ok(r)
            }
            // After a resend, a definite refusal of the last attempt says nothing about an
            // earlier one that may have been stored (a producer's resent append that was stored
            // is recognised and answered with its receipt instead; `sequence_gap` means the
            // node holds nothing of it).
            Response::Error(e) if answer.resent && e.code != ErrorCode::SequenceGap => {
                Err(Error::from(e).after_resend())
            }
            Response::Error(e) => Err(e.into()),
            _ => Err(unexpected("unexpected answer to Append")),
        }
    }

    /// Read committed records of `log` from offset `from`.
    ///
    /// Every batch of the answer is crc-checked; a damaged one fails the read with
    /// [`Error::Corrupt`]. Records below `from` in the first batch are skipped.
    ///
    /// The node must first have committed up to [`ReadOptions::min_offset`] (by default the
    /// highest offset this client has seen for the log, so the read sees this client's own
    /// appends and never goes back). A replica that has not answers [`ErrorCode::Behind`]; when
    /// several servers are configured, the same read is then sent to each of the others once,
    /// in configured order after the one that answered, and the first that serves it wins.
    /// Servers that cannot be reached or answer another error are skipped. If none serves it,
    /// the read fails with the last `behind` answer ([`Error::code`] is
    /// `Some(ErrorCode::Behind)`, `detail` is that replica's committed offset): a definite error.
    /// Each node asked may take up to [`ReadOptions::wait`].
    pub async fn read(&self, log: &str, from: u64, options: ReadOptions) -> Result<ReadResult> {
        let (records, next_offset, committed) =
            self.read_with(log, from, &options, extract_records).await?;
        Ok(ReadResult {
            records,
            next_offset,
            committed,
        })
    }

    /// Read the stored batches of `log` from the one holding offset `from`, whole and byte for
    /// byte as the node stores them, for checks that compare replicas.
    ///
    /// Every batch is crc-checked and the batches must be contiguous, as for [`Client::read`]; a
    /// damaged answer fails with [`Error::Corrupt`]. [`ReadOptions::min_offset`] and
    /// `behind` answers are handled as by [`Client::read`]: with several configured servers,
    /// the answer may come from any of them.
    pub async fn read_batches(
        &self,
        log: &str,
        from: u64,
        options: ReadOptions,
    ) -> Result<BatchesRead> {
        let (batches, next_offset, committed) =
            self.read_with(log, from, &options, split_batches).await?;
        Ok(BatchesRead {
            batches,
            next_offset,
            committed,
        })
    }

    /// Send a Read, going to the other configured servers on `behind` answers (see
    /// [`Client::read`]), and turn the answer's batches into `T` with `decode`. Returns the
    /// decoded batches, the next offset and the committed horizon.
    async fn read_with<T>(
        &self,
        log: &str,
        from: u64,
        options: &ReadOptions,
        decode: fn(&str, &Bytes, u64, u64) -> Result<T>,
    ) -> Result<(T, u64, u64)> {
        check_name(&self.inner.config, "log name", log)?;
        let min_offset = options.min_offset.unwrap_or_else(|| self.seen_offset(log));
        let frame = conn::encode(&Request::Read(ReadRequest {
            log: log.into(),
            from,
            bytes_max: options.bytes_max,
            wait_ms: millis(options.wait),
            min_offset,
        }));
        let wait = self
            .inner
            .config
            .request_timeout
            .saturating_add(options.wait);
        let first = self
            .call(&frame, Safety::Repeatable, wait, Target::Current)
            .await?;
        let mut result = read_answer(first.resp, min_offset);
        if result.as_ref().err().and_then(Error::code) == Some(ErrorCode::Behind) {
            let n = self.inner.servers.len();
            let others: Vec<usize> = match first.server {
                Some(i) => (1..n).map(|k| (i + k) % n).collect(),
                None => (0..n).collect(),
            };
            for index in others {
                let attempt = self
                    .call(&frame, Safety::Repeatable, wait, Target::Server(index))
                    .await
                    .and_then(|a| read_answer(a.resp, min_offset));
                match attempt {
                    Ok(b) => {
                        result = Ok(b);
                        break;
                    }
                    Err(e) if e.code() == Some(ErrorCode::Behind) => result = Err(e),
                    Err(e) => {
                        let server = &self.inner.servers[index];
                        tracing::debug!(%server, error = %e, "read skipped this server");
                    }
                }
            }
        }
        let b = result?;
        let decoded = decode(log, &b.batches, from, b.next_offset)?;
        self.note_seen(log, b.next_offset.min(b.committed));
        Ok((decoded, b.next_offset, b.committed))
    }

    /// Follow `log` from offset `from`: records are delivered by [`Tail::next`] as they commit.
    ///
    /// The subscription is opened before this returns; errors about the log itself (such as
    /// `log_not_found`) arrive from the first [`Tail::next`].
    pub async fn tail(&self, log: &str, from: u64) -> Result<Tail> {
        check_name(&self.inner.config, "log name", log)?;
        Tail::open(self.clone(), log.to_string(), from).await
    }

    /// A producer that batches and pipelines idempotent appends to `log` (see [`Producer`]).
    ///
    /// The producer's background task is spawned on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn producer(&self, log: &str, options: ProducerOptions) -> Producer {
        Producer::start(self.clone(), log.to_string(), options)
    }

    /// Close the connection (requests in flight fail) and wait briefly for the node to be told.
    /// The client stays usable: the next request reconnects.
    pub async fn close(&self) {
        let live = self.inner.conn.lock().await.live.take();
        if let Some(live) = live {
            live.conn.close(VarInt::from_u32(CODE_NORMAL), b"");
        }
        let endpoints: Vec<quinn::Endpoint> = self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .all()
            .cloned()
            .collect();
        for e in endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
        }
    }

    /// The highest committed offset seen for `log` (0 if none).
    pub(crate) fn seen_offset(&self, log: &str) -> u64 {
        let seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(log).copied().unwrap_or(0)
    }

    /// Remember that `log` has been seen committed up to `offset`.
    pub(crate) fn note_seen(&self, log: &str, offset: u64) {
        if offset == 0 {
            return;
        }
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(log) {
            Some(o) => *o = (*o).max(offset),
            None => {
                seen.insert(log.to_string(), offset);
            }
        }
    }

    fn dial_params(&self) -> DialParams<'_> {
        let c = &self.inner.config;
        DialParams {
            quic: &self.inner.quic,
            server_name: c.server_name.as_deref(),
            token: c.token.as_deref(),
            limits: &c.limits,
            connect_timeout: c.connect_timeout,
        }
    }

    /// Dial the configured servers in order, starting at `start`, until one answers.
    async fn dial_configured(&self, state: &mut ConnState, start: usize) -> Result<Live> {
        let n = self.inner.servers.len();
        let params = self.dial_params();
        let mut last = None;
        for i in 0..n {
            let index = (start + i) % n;
            let addr = &self.inner.servers[index];
            match conn::dial(addr, &self.inner.endpoints, &params).await {
                Ok(conn) => {
                    let live = Live {
                        conn,
                        gen: state.next_gen,
                        server: Some(index),
                        addr: addr.clone(),
                    };
                    state.next_gen += 1;
                    state.preferred = index;
                    state.live = Some(live.clone());
                    return Ok(live);
                }
                Err(e) => {
                    tracing::debug!(server = %addr, error = %e, "connect failed");
                    // Authentication and configuration problems are not specific to one node.
                    if matches!(e, Error::Server { .. } | Error::Config(_)) {
                        return Err(e);
                    }
                    last = Some(conn::prefer(last, e));
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Connect("no server configured".into())))
    }

    /// A usable connection to the node at `addr`: the current one if it goes there, else a new
    /// one, which becomes the current connection.
    async fn acquire_addr(&self, state: &mut ConnState, addr: ServerAddr) -> Result<Live> {
        let alive = |l: &Live| l.conn.close_reason().is_none();
        if let Some(l) = state.live.as_ref().filter(|l| alive(l) && l.addr == addr) {
            return Ok(l.clone());
        }
        let conn = conn::dial(&addr, &self.inner.endpoints, &self.dial_params()).await?;
        let server = self.inner.servers.iter().position(|s| *s == addr);
        let live = Live {
            conn,
            gen: state.next_gen,
            server,
            addr,
        };
        state.next_gen += 1;
        if let Some(i) = server {
            state.preferred = i;
        }
        state.live = Some(live.clone());
        Ok(live)
    }

    /// A usable connection to `target`, dialling if needed.
    pub(crate) async fn acquire(&self, target: &Target) -> Result<Live> {
        let mut state = self.inner.conn.lock().await;
        let alive = |l: &Live| l.conn.close_reason().is_none();
        match target {
            Target::Current => {
                if let Some(l) = state.live.as_ref().filter(|l| alive(l)) {
                    return Ok(l.clone());
                }
                // The connection in use was lost: its node may be down (a dead address costs
                // the whole connect timeout), so the others are tried first.
                let n = self.inner.servers.len();
                let start = match state.live.as_ref().and_then(|l| l.server) {
                    Some(i) => (i + 1) % n,
                    None => state.preferred,
                };
                self.dial_configured(&mut state, start).await
            }
            Target::Leader(addr) => {
                let addr = ServerAddr::parse(addr).map_err(|_| {
                    Error::Protocol(ProtocolError::Malformed(
                        "not_leader names an invalid leader address",
                    ))
                })?;
                self.acquire_addr(&mut state, addr).await
            }
            Target::Server(index) => {
                let addr = self.inner.servers[*index].clone();
                self.acquire_addr(&mut state, addr).await
            }
            Target::NextAfter(gen) => {
                let current = state.live.clone();
                match current {
                    Some(l) if l.gen == *gen => {
                        let n = self.inner.servers.len();
                        let next = l.server.map(|i| (i + 1) % n).unwrap_or(state.preferred);
                        if n == 1 && alive(&l) {
                            // There is no other node to ask.
                            return Ok(l);
                        }
                        state.live = None;
                        self.dial_configured(&mut state, next).await
                    }
                    // Another call already moved on.
                    Some(l) if alive(&l) => Ok(l),
                    _ => {
                        let start = state.preferred;
                        self.dial_configured(&mut state, start).await
                    }
                }
            }
        }
    }

    /// Send one request frame to `start` and return the answer, following redirects and
    /// retrying as `safety` allows, until `timeout` has passed since the call began (the
    /// request's deadline). `not_leader` and `unavailable` answers are handled here; every
    /// other answer, error frames included, is returned.
    ///
    /// The rule, until the deadline: a `not_leader` that names another node is followed (at
    /// most [`REDIRECTS_MAX`] times in a row); one that names nobody, or the node itself, sends
    /// the request to the next configured server after a backoff, round and round, so a
    /// client finds a new leader wherever it is; `unavailable` (a new leader's sync set still
    /// forming) is resent to the same node after a backoff; a node that cannot be reached
    /// before the request is sent is skipped for the next. Only a request that may have been
    /// stored is not sent again unless `safety` allows it. At the deadline the last failure is
    /// returned, as an unknown outcome if an earlier attempt may have taken effect.
    ///
    /// With [`Target::Server`], every attempt goes to that server: `not_leader` answers are
    /// returned, and a failure to connect is not retried.
    pub(crate) async fn call(
        &self,
        frame: &Bytes,
        safety: Safety,
        timeout: Duration,
        start: Target,
    ) -> Result<Answer> {
        let config = &self.inner.config;
        let deadline = tokio::time::Instant::now() + timeout;
        let pinned = matches!(start, Target::Server(_));
        // Where attempts after the first go, unless an answer says otherwise.
        let home = if pinned {
            start.clone()
        } else {
            Target::Current
        };
        // Named redirects followed in a row; waits for a leader or a sync set (backoff step);
        // attempts that failed after being sent.
        let (mut redirects, mut waits, mut failures) = (0u32, 0u32, 0u32);
        let mut resent = false;
        let mut target = start;
        // The last answer that sent the request elsewhere or back (`not_leader`,
        // `unavailable`): what the call ends with if the deadline comes while it looks on.
        let mut last_answer: Option<Error> = None;
        // Sleep `d`, unless the deadline comes first; returns whether there is time left.
        let pause = |d: Duration| async move {
            let until = (tokio::time::Instant::now() + d).min(deadline);
            tokio::time::sleep_until(until).await;
            tokio::time::Instant::now() < deadline
        };
        loop {
            let live = match self.acquire(&target).await {
                Ok(l) => l,
                Err(e) => {
                    if e.is_transient() && !pinned {
                        waits += 1;
                        if pause(leader_backoff(waits)).await {
                            target = Target::Current;
                            continue;
                        }
                    }
                    return Err(fail(last_answer.unwrap_or(e), resent));
                }
            };
            target = home.clone();
            let mut sent = false;
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let result = tokio::time::timeout(
                remaining,
                conn::exchange(&live.conn, frame, &config.limits, &mut sent),
            )
            .await
            .unwrap_or(Err(Error::Timeout));
            match result {
                Ok(Response::Error(e)) if e.code == ErrorCode::NotLeader && !pinned => {
                    // Definite: nothing was done; ask the leader, or look for one.
                    let elsewhere = ServerAddr::parse(&e.leader)
                        .is_ok_and(|a| a != live.addr && redirects < REDIRECTS_MAX);
                    if elsewhere {
                        redirects += 1;
                        tracing::debug!(leader = %e.leader, "redirected");
                        target = Target::Leader(e.leader);
                        continue;
                    }
                    // No other leader known (an election may be under way): pause, then ask
                    // the next server.
                    redirects = 0;
                    waits += 1;
                    last_answer = Some(e.into());
                    if !pause(leader_backoff(waits)).await {
                        return Err(fail(last_answer.expect("just set"), resent));
                    }
                    target = Target::NextAfter(live.gen);
                }
                Ok(Response::Error(e)) if e.code == ErrorCode::Unavailable => {
                    waits += 1;
                    tracing::debug!(message = %e.message, "unavailable; retrying");
                    last_answer = Some(e.into());
                    if !pause(leader_backoff(waits)).await {
                        return Err(fail(last_answer.expect("just set"), resent));
                    }
                }
                Ok(Response::Error(e)) if self.retry_error(&e, safety, failures) => {
                    failures += 1;
                    resent = true;
                    tracing::debug!(code = e.code.name(), "retrying after an error answer");
                    if e.code == ErrorCode::ShuttingDown && !pinned {
                        target = Target::NextAfter(live.gen);
                    }
                    if !pause(backoff(failures)).await {
                        return Err(fail(e.into(), resent));
                    }
                }
                Ok(resp) => {
                    return Ok(Answer {
                        resp,
                        resent,
                        server: live.server,
                    })
                }
                Err(e) => {
                    let e = if sent { e } else { e.not_sent() };
                    // Not sent: any request may go again, until the deadline. Sent: only one
                    // safe to repeat, at most `retries` times.
                    let may_repeat = if sent {
                        safety == Safety::Repeatable && failures < config.retries
                    } else {
                        !pinned || failures < config.retries
                    };
                    if e.is_transient() && may_repeat {
                        let wait = if sent {
                            failures += 1;
                            resent = true;
                            backoff(failures)
                        } else {
                            waits += 1;
                            leader_backoff(waits)
                        };
                        tracing::debug!(error = %e, "retrying after a connection failure");
                        if pause(wait).await {
                            continue;
                        }
                    }
                    // Cut short by the deadline before it was sent: the answers met so far say
                    // more than the timeout.
                    let e = match last_answer {
                        Some(a) if !sent => a,
                        _ => e,
                    };
                    return Err(fail(e, resent));
                }
            }
        }
    }

    /// Whether an error answer is worth another attempt: the node is busy or shutting down (both
    /// definite, so any request may be resent), or the outcome is unknown and the request is
    /// safe to repeat.
    fn retry_error(&self, e: &ErrorResponse, safety: Safety, failures: u32) -> bool {
        if failures >= self.inner.config.retries {
            return false;
        }
        match e.code {
            ErrorCode::Busy | ErrorCode::ShuttingDown => true,
            code => !code.is_definite() && safety == Safety::Repeatable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_milliseconds() {
        assert_eq!(millis(Duration::ZERO), 0);
        assert_eq!(millis(Duration::from_micros(10)), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::from_secs(u64::MAX)), u32::MAX);
    }

    #[test]
    fn leader_backoff_starts_short_and_is_capped() {
        assert_eq!(leader_backoff(1), Duration::from_millis(20));
        assert!(leader_backoff(3) > leader_backoff(2));
        assert_eq!(leader_backoff(30), LEADER_BACKOFF_MAX);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert!(backoff(2) > backoff(1));
        assert_eq!(backoff(30), Duration::from_secs(2));
    }

    #[test]
    fn options_defaults() {
        let a = AppendOptions::default();
        assert_eq!(a.acks, Acks::Leader);
        assert_eq!((a.expected_offset, a.timeout), (None, None));
        let r = ReadOptions::default();
        assert_eq!(r.bytes_max, 1 << 20);
        assert_eq!(r.wait, Duration::ZERO);
        assert_eq!(r.min_offset, None);
    }

    #[test]
    fn client_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Client>();
        fn send<T: Send>(_: &T) {}
        fn is_send<T: Send + 'static>() {}
        is_send::<Tail>();
        let producer = |p: &Producer| {
            let f = p.send(Bytes::new());
            send(&f);
        };
        let _ = producer;
        let calls = |c: &Client, t: &mut Tail| {
            send(&c.read("l", 0, ReadOptions::default()));
            send(&c.read_batches("l", 0, ReadOptions::default()));
            send(&c.append("l", Vec::new(), AppendOptions::default()));
            send(&c.tail("l", 0));
            send(&c.create_log("l"));
            send(&t.next());
        };
        let _ = calls;
    }

    #[tokio::test]
    async fn connect_checks_the_configuration_first() {
        let err = Client::connect(ClientConfig::new(Vec::<String>::new()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        let err = Client::connect(ClientConfig::new(["host:notaport"]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("missing-ca.pem");
        let err = Client::connect(
            ClientConfig::new(["127.0.0.1:1"]).with_trust(crate::Trust::CaFile(ca.clone())),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains(&ca.display().to_string())),
            "{err}"
        );
    }
}
