//! The idempotent producer: batching, pipelining and safe retries of appends.
//!
//! A producer has a random non-zero 64-bit id and numbers its records 0, 1, 2, ...; each append
//! carries `(id, sequence of its first record)`, so the node recognises a resent append and
//! answers it with the original receipt instead of storing it twice.
//!
//! Records are queued by [`Producer::send`] and turned into appends by a background task. The
//! task keeps at most `max_in_flight` appends unresolved (never more than the node remembers per
//! producer, [`protocol::idempotence::REMEMBERED_BATCHES`], so that every resend is recognised),
//! and sends them in sequence order. Appends travel on independent streams, so a later one can
//! reach the node first and be refused with `sequence_gap`; it is then held back and resent once
//! the earlier ones are resolved. When an append fails for good, the task switches to a fresh
//! producer id before sending anything else, so that the failed sequences leave no gap.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use protocol::idempotence::REMEMBERED_BATCHES;
use protocol::{Acks, AppendRequest, ErrorCode, Receipt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::client::{Client, Safety};
use crate::{Error, Result};

/// How many times one append is resent after `sequence_gap` answers before it fails.
const GAP_RESENDS_MAX: u32 = 8;
/// Most commands taken from the channel in one go before appends are formed.
const DRAIN_MAX: usize = 4096;

/// Options of [`Client::producer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerOptions {
    /// Durability level of every append. Default [`Acks::Leader`].
    pub acks: Acks,
    /// How long a record may wait in the queue for more records to share its append, when
    /// the append could be sent at once. Default 0: records are sent as soon as an append may
    /// be sent; records queued while appends are in flight are still batched together.
    pub linger: Duration,
    /// Most records in one append. Default 1024.
    pub batch_records_max: usize,
    /// Most record bytes (each record counting its length plus 4) in one append; a single
    /// larger record is sent alone. Default 1 MiB.
    pub batch_bytes_max: usize,
    /// Most appends sent and not yet resolved. Default 8, and never more than
    /// [`REMEMBERED_BATCHES`].
    pub max_in_flight: usize,
    /// How long the node may wait for `acks` to be reached (`None`: the node's default).
    pub timeout: Option<Duration>,
}

impl Default for ProducerOptions {
    fn default() -> ProducerOptions {
        ProducerOptions {
            acks: Acks::Leader,
            linger: Duration::ZERO,
            batch_records_max: 1024,
            batch_bytes_max: 1 << 20,
            max_in_flight: 8,
            timeout: None,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Sends one idempotent append and returns its receipt; connection-level failures are retried
/// inside (resending the same request).
pub(crate) trait Appender: Send + Sync + 'static {
    fn append(&self, req: AppendRequest) -> BoxFuture<Result<Receipt>>;
}

struct ClientAppender {
    client: Client,
    timeout: Option<Duration>,
}

impl Appender for ClientAppender {
    fn append(&self, req: AppendRequest) -> BoxFuture<Result<Receipt>> {
        let client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            client
                .append_request(req, timeout, Safety::Repeatable)
                .await
        })
    }
}

enum Command {
    Send(Bytes, oneshot::Sender<Result<Receipt>>),
    Flush(oneshot::Sender<()>),
}

/// An idempotent producer for one log, from [`Client::producer`].
///
/// [`Producer::send`] queues a record and returns a future of its receipt; the producer's
/// background task batches queued records into appends (many concurrent sends become few
/// appends), keeps up to `max_in_flight` of them in flight, and resends an append whose answer
/// was lost (same records, same producer id and sequence), so a record is stored at most once
/// per send.
///
/// Records queued and not yet resolved are held in memory: bound them by awaiting receipts.
/// Dropping the producer stops its task once the records already sent are resolved (each within
/// the client's retry and timeout bounds); their receipt futures still complete.
pub struct Producer {
    log: String,
    tx: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

fn stopped() -> Error {
    Error::ConnectionLost("the producer's background task has stopped".into())
}

/// A random non-zero producer id: from the operating system's generator, or, should that fail,
/// from a randomly keyed hash of the time, the process id and a counter.
fn random_id() -> u64 {
    if let Ok(id) = getrandom::u64() {
        if id != 0 {
            return id;
        }
    }
    use std::hash::{BuildHasher, Hash, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::time::SystemTime::now().hash(&mut h);
    std::process::id().hash(&mut h);
    COUNTER
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .hash(&mut h);
    h.finish().max(1)
}

impl Producer {
    /// Start a producer whose task runs on the current tokio runtime.
    ///
    /// Panics when called outside a tokio runtime.
    pub(crate) fn start(client: Client, log: String, options: ProducerOptions) -> Producer {
        let records_max = client.inner.config.limits.records_max as usize;
        let appender = ClientAppender {
            client,
            timeout: options.timeout,
        };
        let (producer, task) = Producer::with_appender(appender, log, options, records_max);
        tokio::spawn(task);
        producer
    }

    /// A producer and the task future that serves it.
    pub(crate) fn with_appender<A: Appender>(
        appender: A,
        log: String,
        options: ProducerOptions,
        records_max: usize,
    ) -> (Producer, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            appender: Arc::new(appender),
            log: log.clone(),
            acks: options.acks,
            timeout_ms: options.timeout.map(crate::client::millis).unwrap_or(0),
            linger: options.linger,
            batch_records_max: options.batch_records_max.clamp(1, records_max.max(1)),
            batch_bytes_max: options.batch_bytes_max.max(1),
            max_in_flight: options.max_in_flight.clamp(1, REMEMBERED_BATCHES),
            rx,
            input_open: true,
            queue: VecDeque::new(),
            queued_bytes: 0,
            next_index: 0,
            window: VecDeque::new(),
            running: FuturesUnordered::new(),
            id: random_id(),
            next_seq: 0,
            confirmed: false,
            next_slot: 0,
            blocked: false,
            failed: false,
            stored: 0,
            flushes: Vec::new(),
        };
        (Producer { log, tx }, task.run())
    }

    /// The log this producer appends to.
    pub fn log(&self) -> &str {
        &self.log
    }

    /// Queue `value` for appending and return a future of its receipt: `first` is the record's
    /// offset and `next` is `first + 1`; `flags` has [`protocol::RECEIPT_DUPLICATE`] set when the
    /// append was stored by an earlier attempt whose answer was lost.
    ///
    /// The record is queued when `send` is called, not when the future is first polled, so
    /// records are appended in the order of the `send` calls. Dropping the future does not
    /// withdraw the record.
    ///
    /// An error whose [`Error::is_unknown_outcome`] is true means the record may be stored.
    pub fn send(&self, value: Bytes) -> impl Future<Output = Result<Receipt>> + Send + 'static {
        let (reply, receipt) = oneshot::channel();
        let queued = self.tx.send(Command::Send(value, reply)).is_ok();
        async move {
            if !queued {
                return Err(stopped());
            }
            receipt.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    /// Wait until every record sent before this call is resolved (stored or failed; each
    /// `send` future holds the outcome). Sends queued records at once, without lingering.
    pub async fn flush(&self) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Command::Flush(done)).map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())
    }
}

struct Pending {
    value: Bytes,
    reply: oneshot::Sender<Result<Receipt>>,
    index: u64,
    queued_at: Instant,
}

struct Batch {
    /// Position in send order.
    slot: u64,
    id: u64,
    first_seq: u64,
    records: Vec<Bytes>,
    replies: Vec<oneshot::Sender<Result<Receipt>>>,
    /// Index of the first record in the order of `send` calls.
    first_index: u64,
    gap_resends: u32,
    /// [`Task::stored`] when the append was last held back.
    held_at: u64,
    running: bool,
}

impl Batch {
    fn held(&self) -> bool {
        !self.running
    }
}

struct Task<A> {
    appender: Arc<A>,
    log: String,
    acks: Acks,
    timeout_ms: u32,
    linger: Duration,
    batch_records_max: usize,
    batch_bytes_max: usize,
    max_in_flight: usize,
    rx: mpsc::UnboundedReceiver<Command>,
    /// False once every `Producer` handle is gone.
    input_open: bool,
    queue: VecDeque<Pending>,
    /// Bytes of the queued records, each counting its length plus 4.
    queued_bytes: usize,
    next_index: u64,
    /// Unresolved appends, in send order: running, or held back after `sequence_gap`.
    window: VecDeque<Batch>,
    running: FuturesUnordered<BoxFuture<(u64, Result<Receipt>)>>,
    id: u64,
    next_seq: u64,
    /// Whether the node has acknowledged an append under `id`. Until it has, one append runs at
    /// a time: the node accepts any sequence from a producer it does not know, so a later
    /// append overtaking the first one would be stored first.
    confirmed: bool,
    next_slot: u64,
    /// Nothing is launched until every running append is resolved.
    blocked: bool,
    /// An append failed since the last resolution: switch to a new producer id.
    failed: bool,
    /// Appends stored so far (to tell whether a held-back append may now fit).
    stored: u64,
    /// Flushes waiting for every record below an index to resolve.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
}

impl<A: Appender> Task<A> {
    async fn run(mut self) {
        loop {
            self.dispatch();
            self.complete_flushes();
            if !self.input_open && self.queue.is_empty() && self.window.is_empty() {
                break;
            }
            let linger_until = self.linger_deadline();
            tokio::select! {
                cmd = self.rx.recv(), if self.input_open => match cmd {
                    Some(cmd) => {
                        self.accept(cmd);
                        // Take the records already queued (boundedly, so a busy sender cannot
                        // hold the task here), so they share appends.
                        for _ in 0..DRAIN_MAX {
                            match self.rx.try_recv() {
                                Ok(cmd) => self.accept(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    None => self.input_open = false,
                },
                Some((slot, result)) = self.running.next(), if !self.running.is_empty() => {
                    self.complete(slot, result);
                }
                _ = tokio::time::sleep_until(linger_until.unwrap_or_else(Instant::now)),
                    if linger_until.is_some() => {}
                else => {
                    // Nothing to wait for although work remains: cannot happen, as unresolved
                    // appends are always running once the input is closed. Stop rather than spin;
                    // the pending sends then fail with "stopped".
                    tracing::warn!(log = %self.log, "producer has nothing to wait for; stopping");
                    break;
                }
            }
        }
        tracing::debug!(log = %self.log, "producer stopped");
    }

    fn accept(&mut self, cmd: Command) {
        match cmd {
            Command::Send(value, reply) => {
                self.queued_bytes += 4 + value.len();
                self.queue.push_back(Pending {
                    value,
                    reply,
                    index: self.next_index,
                    queued_at: Instant::now(),
                });
                self.next_index += 1;
            }
            Command::Flush(done) => self.flushes.push((self.next_index, done)),
        }
    }

    /// How many appends may run at once now.
    fn running_max(&self) -> usize {
        if self.confirmed {
            self.max_in_flight
        } else {
            1
        }
    }

    /// Whether a new append could be formed from the queue now (lingering aside).
    fn can_send(&self) -> bool {
        !self.blocked
            && !self.queue.is_empty()
            && self.window.len() < self.max_in_flight
            && self.running.len() < self.running_max()
            && !self.window.iter().any(Batch::held)
    }

    /// Whether the queued records should go now rather than linger.
    fn ready(&self, now: Instant) -> bool {
        self.linger.is_zero()
            || !self.input_open
            || !self.flushes.is_empty()
            || self.queue.len() >= self.batch_records_max
            || self.queued_bytes >= self.batch_bytes_max
            || self
                .queue
                .front()
                .is_some_and(|p| now.duration_since(p.queued_at) >= self.linger)
    }

    /// When the oldest queued record stops lingering, if an append could be sent but is not.
    fn linger_deadline(&self) -> Option<Instant> {
        if !self.can_send() {
            return None;
        }
        self.queue.front().map(|p| p.queued_at + self.linger)
    }

    fn dispatch(&mut self) {
        if self.blocked {
            return;
        }
        // Held-back appends first, in order.
        for i in 0..self.window.len() {
            if self.running.len() >= self.running_max() {
                return;
            }
            if self.window[i].held() {
                self.launch(i);
            }
        }
        let now = Instant::now();
        while self.can_send() && self.ready(now) {
            let mut records = Vec::new();
            let mut replies = Vec::new();
            let mut bytes = 0usize;
            let first_index = self.queue.front().map_or(self.next_index, |p| p.index);
            while let Some(p) = self.queue.front() {
                let size = 4 + p.value.len();
                if records.len() == self.batch_records_max
                    || (!records.is_empty() && bytes + size > self.batch_bytes_max)
                {
                    break;
                }
                let p = self.queue.pop_front().expect("front exists");
                self.queued_bytes -= size;
                bytes += size;
                records.push(p.value);
                replies.push(p.reply);
            }
            let (id, first_seq) = self.take_sequences(records.len() as u64);
            self.window.push_back(Batch {
                slot: self.next_slot,
                id,
                first_seq,
                records,
                replies,
                first_index,
                gap_resends: 0,
                held_at: 0,
                running: false,
            });
            self.next_slot += 1;
            let last = self.window.len() - 1;
            self.launch(last);
        }
    }

    /// Sequence numbers for `count` records under the current producer id.
    fn take_sequences(&mut self, count: u64) -> (u64, u64) {
        if self.next_seq.checked_add(count).is_none() {
            self.rotate();
        }
        let first = self.next_seq;
        self.next_seq += count;
        (self.id, first)
    }

    /// Switch to a fresh producer id, numbering from 0.
    fn rotate(&mut self) {
        let id = random_id();
        tracing::debug!(log = %self.log, old = self.id, new = id, "new producer id");
        self.id = id;
        self.next_seq = 0;
        self.confirmed = false;
    }

    fn launch(&mut self, i: usize) {
        let batch = &mut self.window[i];
        batch.running = true;
        let req = AppendRequest {
            log: self.log.clone(),
            acks: self.acks,
            expected_offset: None,
            producer: Some((batch.id, batch.first_seq)),
            timeout_ms: self.timeout_ms,
            records: batch.records.clone(),
        };
        let slot = batch.slot;
        let append = self.appender.append(req);
        self.running
            .push(Box::pin(async move { (slot, append.await) }));
    }

    fn complete(&mut self, slot: u64, result: Result<Receipt>) {
        let Some(i) = self.window.iter().position(|b| b.slot == slot) else {
            return;
        };
        match result {
            Ok(r) => {
                let batch = self.window.remove(i).expect("index found");
                self.stored += 1;
                if batch.id == self.id {
                    self.confirmed = true;
                }
                for (k, reply) in batch.replies.into_iter().enumerate() {
                    let first = r.first + k as u64;
                    let _ = reply.send(Ok(Receipt {
                        first,
                        next: first + 1,
                        ..r.clone()
                    }));
                }
            }
            Err(e)
                if e.code() == Some(ErrorCode::SequenceGap)
                    && self.window[i].gap_resends < GAP_RESENDS_MAX =>
            {
                // An earlier append has not been stored (yet): hold this one back.
                let batch = &mut self.window[i];
                batch.running = false;
                batch.gap_resends += 1;
                batch.held_at = self.stored;
                self.blocked = true;
            }
            Err(e) => {
                let batch = self.window.remove(i).expect("index found");
                tracing::debug!(log = %self.log, error = %e, records = batch.records.len(), "append failed");
                for reply in batch.replies {
                    let _ = reply.send(Err(e.clone()));
                }
                self.failed = true;
                self.blocked = true;
            }
        }
        self.resolve();
    }

    /// Once nothing is running after a gap or a failure: switch producer id if an append
    /// failed, or if an append was held back and nothing was stored since (what it waits for
    /// will not come), renumbering the held-back appends; then let [`Task::dispatch`] resend
    /// them. Renumbering a held-back append is safe: its `sequence_gap` answer was definite.
    fn resolve(&mut self) {
        if !self.blocked || !self.running.is_empty() {
            return;
        }
        let stuck = self
            .window
            .iter()
            .any(|b| b.held() && b.held_at == self.stored);
        if self.failed || stuck {
            self.rotate();
            for i in 0..self.window.len() {
                let count = self.window[i].records.len() as u64;
                let (id, first_seq) = self.take_sequences(count);
                self.window[i].id = id;
                self.window[i].first_seq = first_seq;
            }
        }
        self.blocked = false;
        self.failed = false;
    }

    fn complete_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        let unresolved = self
            .window
            .iter()
            .map(|b| b.first_index)
            .chain(self.queue.front().map(|p| p.index))
            .min()
            .unwrap_or(self.next_index);
        let mut i = 0;
        while i < self.flushes.len() {
            if self.flushes[i].0 <= unresolved {
                let (_, done) = self.flushes.swap_remove(i);
                let _ = done.send(());
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::idempotence::{Decision, ProducerTable, StoredAppend};
    use protocol::RECEIPT_DUPLICATE;
    use std::sync::Mutex;

    #[derive(Clone, Debug)]
    enum Behavior {
        Normal,
        /// Reach the node only after this delay.
        Delay(Duration),
        /// Fail without reaching the node.
        FailBefore(Error),
        /// Store (or not, as the node decides), then lose the answer.
        LoseAnswer(Error),
        /// First truncate the log at this offset (as after a leader change).
        TruncateFrom(u64),
    }

    #[derive(Default)]
    struct NodeState {
        table: Option<ProducerTable>,
        stored: Vec<Bytes>,
        calls: Vec<(u64, u64, usize)>,
        in_flight: usize,
        max_in_flight: usize,
    }

    /// A node with a real producer table, and a hook that decides what happens to each call.
    struct MockNode {
        state: Mutex<NodeState>,
        hook: Box<dyn Fn(usize) -> Behavior + Send + Sync>,
    }

    #[derive(Clone)]
    struct Mock(Arc<MockNode>);

    impl Mock {
        fn new(hook: impl Fn(usize) -> Behavior + Send + Sync + 'static) -> Mock {
            Mock(Arc::new(MockNode {
                state: Mutex::new(NodeState {
                    table: Some(ProducerTable::new(64)),
                    ..NodeState::default()
                }),
                hook: Box::new(hook),
            }))
        }

        fn stored(&self) -> Vec<Bytes> {
            self.0.state.lock().unwrap().stored.clone()
        }

        fn calls(&self) -> Vec<(u64, u64, usize)> {
            self.0.state.lock().unwrap().calls.clone()
        }

        fn apply(&self, req: &AppendRequest) -> Result<Receipt> {
            let mut s = self.0.state.lock().unwrap();
            let (id, seq) = req.producer.expect("idempotent");
            let count = req.records.len() as u32;
            let decision = s.table.as_mut().unwrap().check(id, seq, count);
            let receipt = |first: u64, next: u64, flags: u8| Receipt {
                first,
                next,
                epoch: 1,
                level: Acks::Leader,
                flags,
                replicas: 1,
                holders: vec!["n1".into()],
            };
            match decision {
                Decision::Append => {
                    let first = s.stored.len() as u64;
                    s.stored.extend(req.records.iter().cloned());
                    let next = s.stored.len() as u64;
                    s.table.as_mut().unwrap().record(
                        id,
                        seq,
                        count,
                        StoredAppend {
                            first,
                            next,
                            epoch: 1,
                        },
                    );
                    Ok(receipt(first, next, 0))
                }
                Decision::Duplicate(st) => Ok(receipt(st.first, st.next, RECEIPT_DUPLICATE)),
                Decision::SequenceGap { expected } => Err(server(ErrorCode::SequenceGap, expected)),
                Decision::Stale { .. } => Err(server(ErrorCode::StaleSequence, 0)),
            }
        }
    }

    fn server(code: ErrorCode, detail: u64) -> Error {
        Error::Server {
            code,
            message: String::new(),
            leader: String::new(),
            detail,
        }
    }

    impl Appender for Mock {
        fn append(&self, req: AppendRequest) -> BoxFuture<Result<Receipt>> {
            let mock = self.clone();
            Box::pin(async move {
                let behavior = {
                    let mut s = mock.0.state.lock().unwrap();
                    let (id, seq) = req.producer.unwrap();
                    s.calls.push((id, seq, req.records.len()));
                    s.in_flight += 1;
                    s.max_in_flight = s.max_in_flight.max(s.in_flight);
                    (mock.0.hook)(s.calls.len() - 1)
                };
                let result = match behavior {
                    Behavior::Normal => mock.apply(&req),
                    Behavior::Delay(d) => {
                        tokio::time::sleep(d).await;
                        mock.apply(&req)
                    }
                    Behavior::FailBefore(e) => Err(e),
                    Behavior::LoseAnswer(e) => {
                        let _ = mock.apply(&req);
                        Err(e)
                    }
                    Behavior::TruncateFrom(offset) => {
                        {
                            let mut s = mock.0.state.lock().unwrap();
                            s.stored.truncate(offset as usize);
                            s.table.as_mut().unwrap().forget_from(offset);
                        }
                        mock.apply(&req)
                    }
                };
                mock.0.state.lock().unwrap().in_flight -= 1;
                result
            })
        }
    }

    fn start(mock: &Mock, options: ProducerOptions) -> (Producer, tokio::task::JoinHandle<()>) {
        let (p, task) = Producer::with_appender(mock.clone(), "log".into(), options, 65_536);
        (p, tokio::spawn(task))
    }

    fn value(i: usize) -> Bytes {
        Bytes::from(format!("record-{i}"))
    }

    fn values(n: usize) -> Vec<Bytes> {
        (0..n).map(value).collect()
    }

    async fn send_all(p: &Producer, n: usize) -> Vec<Result<Receipt>> {
        let futures: Vec<_> = (0..n).map(|i| p.send(value(i))).collect();
        let mut out = Vec::new();
        for f in futures {
            out.push(f.await);
        }
        out
    }

    #[tokio::test]
    async fn many_sends_become_few_appends() {
        let mock = Mock::new(|_| Behavior::Normal);
        let (p, _task) = start(&mock, ProducerOptions::default());
        let receipts = send_all(&p, 100).await;
        for (i, r) in receipts.into_iter().enumerate() {
            let r = r.unwrap();
            assert_eq!((r.first, r.next), (i as u64, i as u64 + 1));
        }
        assert_eq!(mock.calls().len(), 1, "{:?}", mock.calls());
        assert_eq!(mock.stored(), values(100));
    }

    #[tokio::test]
    async fn appends_respect_batch_limits_and_the_in_flight_bound() {
        let mock = Mock::new(|_| Behavior::Delay(Duration::from_millis(2)));
        let options = ProducerOptions {
            batch_records_max: 10,
            max_in_flight: 3,
            ..ProducerOptions::default()
        };
        let (p, _task) = start(&mock, options);
        let receipts = send_all(&p, 100).await;
        assert!(receipts.iter().all(|r| r.is_ok()));
        let calls = mock.calls();
        assert_eq!(calls.len(), 10);
        let id = calls[0].0;
        for (k, (cid, seq, n)) in calls.iter().enumerate() {
            assert_eq!((*cid, *seq, *n), (id, 10 * k as u64, 10));
        }
        assert!(mock.0.state.lock().unwrap().max_in_flight <= 3);
        assert_eq!(mock.stored(), values(100));

        // Byte limit: three 40-byte records per append at most.
        let mock = Mock::new(|_| Behavior::Normal);
        let options = ProducerOptions {
            batch_bytes_max: 130,
            ..ProducerOptions::default()
        };
        let (p, _task) = start(&mock, options);
        let sends: Vec<_> = (0..7).map(|_| p.send(Bytes::from(vec![7u8; 36]))).collect();
        for s in sends {
            s.await.unwrap();
        }
        let counts: Vec<usize> = mock.calls().iter().map(|c| c.2).collect();
        assert_eq!(counts, [3, 3, 1]);
    }

    #[tokio::test]
    async fn max_in_flight_is_capped_by_what_the_node_remembers() {
        let mock = Mock::new(|_| Behavior::Delay(Duration::from_millis(5)));
        let options = ProducerOptions {
            batch_records_max: 1,
            max_in_flight: 100,
            ..ProducerOptions::default()
        };
        let (p, _task) = start(&mock, options);
        let receipts = send_all(&p, 40).await;
        assert!(receipts.iter().all(|r| r.is_ok()));
        let max = mock.0.state.lock().unwrap().max_in_flight;
        assert!(max <= REMEMBERED_BATCHES && max > 1, "{max}");
    }

    #[tokio::test]
    async fn an_append_overtaken_by_a_later_one_is_resent() {
        // The second append reaches the node late: the ones after it are refused with
        // sequence_gap, held back, and resent once it is stored.
        let mock = Mock::new(|call| {
            if call == 1 {
                Behavior::Delay(Duration::from_millis(30))
            } else {
                Behavior::Normal
            }
        });
        let options = ProducerOptions {
            batch_records_max: 1,
            ..ProducerOptions::default()
        };
        let (p, _task) = start(&mock, options);
        assert_eq!(p.send(value(0)).await.unwrap().first, 0);
        let receipts: Vec<_> = (1..6).map(|i| p.send(value(i))).collect();
        for (i, r) in receipts.into_iter().enumerate() {
            assert_eq!(r.await.unwrap().first, i as u64 + 1);
        }
        assert_eq!(mock.stored(), values(6), "stored once each, in send order");
        assert!(mock.calls().len() > 6, "some appends were resent");
        let ids: std::collections::HashSet<u64> = mock.calls().iter().map(|c| c.0).collect();
        assert_eq!(ids.len(), 1, "no failure, so no new producer id");
    }

    #[tokio::test]
    async fn a_new_producer_id_has_one_append_in_flight_until_confirmed() {
        // Were the first two appends of a new id in flight together, the second could be stored
        // first (the node accepts any sequence from a producer it does not know).
        let mock = Mock::new(|call| {
            if call == 0 {
                Behavior::Delay(Duration::from_millis(20))
            } else {
                Behavior::Normal
            }
        });
        let options = ProducerOptions {
            batch_records_max: 1,
            ..ProducerOptions::default()
        };
        let (p, _task) = start(&mock, options);
        let receipts = send_all(&p, 4).await;
        for (i, r) in receipts.into_iter().enumerate() {
            assert_eq!(r.unwrap().first, i as u64);
        }
        assert_eq!(mock.stored(), values(4));
        assert_eq!(mock.calls().len(), 4, "nothing was refused");
    }

    #[tokio::test]
    async fn a_failed_append_switches_to_a_new_producer_id() {
        let mock = Mock::new(|call| {
            if call == 1 {
                Behavior::FailBefore(server(ErrorCode::NotEnoughReplicas, 0))
            } else {
                Behavior::Normal
            }
        });
        let options = ProducerOptions {
            batch_records_max: 1,
            ..ProducerOptions::default()
        };
        let (p, _task) = start(&mock, options);
        // The node learns this producer.
        p.send(value(0)).await.unwrap();
        // Record 1 fails; 2 and 3, sent behind it, meet a gap and go out again under a new id.
        let receipts: Vec<_> = (1..4).map(|i| p.send(value(i))).collect();
        let mut results = Vec::new();
        for r in receipts {
            results.push(r.await);
        }
        assert_eq!(
            results[0].as_ref().unwrap_err().code(),
            Some(ErrorCode::NotEnoughReplicas)
        );
        assert!(!results[0].as_ref().unwrap_err().is_unknown_outcome());
        assert_eq!(results[1].as_ref().unwrap().first, 1);
        assert_eq!(results[2].as_ref().unwrap().first, 2);
        // Later records use the new id too, without a gap.
        assert_eq!(p.send(value(4)).await.unwrap().first, 3);
        assert_eq!(mock.stored(), [value(0), value(2), value(3), value(4)]);
        let calls = mock.calls();
        let (first_id, last_id) = (calls[0].0, calls.last().unwrap().0);
        assert_ne!(first_id, last_id);
        assert_eq!(
            calls.last().unwrap().1,
            2,
            "sequences restart under the new id"
        );
    }

    #[tokio::test]
    async fn a_gap_nothing_will_fill_is_resolved_with_a_new_producer_id() {
        // The node lost the producer's last append (truncated): the next one meets a gap that
        // no append in flight will fill.
        let mock = Mock::new(|call| {
            if call == 2 {
                Behavior::TruncateFrom(1)
            } else {
                Behavior::Normal
            }
        });
        let (p, _task) = start(&mock, ProducerOptions::default());
        p.send(value(0)).await.unwrap();
        p.send(value(1)).await.unwrap();
        let r = p.send(value(2)).await.unwrap();
        assert_eq!(r.first, 1);
        assert_eq!(mock.stored(), [value(0), value(2)]);
        let calls = mock.calls();
        assert_eq!(calls.len(), 4, "{calls:?}");
        assert_ne!(calls[3].0, calls[2].0);
        assert_eq!(calls[3].1, 0);
    }

    #[tokio::test]
    async fn an_unknown_outcome_is_reported_and_later_records_still_go_through() {
        let mock = Mock::new(|call| {
            if call == 0 {
                Behavior::LoseAnswer(Error::ConnectionLost("gone".into()))
            } else {
                Behavior::Normal
            }
        });
        let (p, _task) = start(&mock, ProducerOptions::default());
        let err = p.send(value(0)).await.unwrap_err();
        assert!(err.is_unknown_outcome());
        assert_eq!(p.send(value(1)).await.unwrap().first, 1);
        assert_eq!(mock.stored(), values(2));
    }

    #[tokio::test]
    async fn linger_gathers_records_and_flush_cuts_it_short() {
        let mock = Mock::new(|_| Behavior::Normal);
        let options = ProducerOptions {
            linger: Duration::from_millis(50),
            ..ProducerOptions::default()
        };
        let (p, _task) = start(&mock, options);
        let a = p.send(value(0));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let b = p.send(value(1));
        assert_eq!(a.await.unwrap().first, 0);
        assert_eq!(b.await.unwrap().first, 1);
        assert_eq!(mock.calls().len(), 1);

        let options = ProducerOptions {
            linger: Duration::from_secs(3600),
            ..ProducerOptions::default()
        };
        let mock = Mock::new(|_| Behavior::Normal);
        let (p, _task) = start(&mock, options);
        let receipts: Vec<_> = (0..3).map(|i| p.send(value(i))).collect();
        tokio::time::timeout(Duration::from_secs(5), p.flush())
            .await
            .expect("flush does not linger")
            .unwrap();
        assert_eq!(mock.stored(), values(3));
        for r in receipts {
            r.await.unwrap();
        }
    }

    #[tokio::test]
    async fn flush_waits_for_every_earlier_record() {
        let mock = Mock::new(|_| Behavior::Delay(Duration::from_millis(10)));
        let options = ProducerOptions {
            batch_records_max: 2,
            ..ProducerOptions::default()
        };
        let (p, _task) = start(&mock, options);
        let _receipts: Vec<_> = (0..9).map(|i| p.send(value(i))).collect();
        p.flush().await.unwrap();
        assert_eq!(mock.stored(), values(9));
        // Nothing pending: flush returns at once.
        p.flush().await.unwrap();
    }

    #[tokio::test]
    async fn dropping_the_producer_stops_its_task_after_the_records_sent() {
        let mock = Mock::new(|_| Behavior::Delay(Duration::from_millis(10)));
        let (p, task) = start(&mock, ProducerOptions::default());
        let receipt = p.send(value(0));
        drop(p);
        assert_eq!(receipt.await.unwrap().first, 0);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task stops")
            .unwrap();
        assert_eq!(
            Arc::strong_count(&mock.0),
            1,
            "the task released everything"
        );

        // An idle producer's task stops at once.
        let mock = Mock::new(|_| Behavior::Normal);
        let (p, task) = start(&mock, ProducerOptions::default());
        drop(p);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task stops")
            .unwrap();
    }

    #[test]
    fn producer_ids_are_random_and_non_zero() {
        let a = random_id();
        let b = random_id();
        assert!(a != 0 && b != 0);
        assert_ne!(a, b);
    }

    #[test]
    fn producer_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Producer>();
    }
}
