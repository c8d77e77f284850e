//! Tails: a subscription to a log that delivers records as they commit.

use std::collections::VecDeque;

use protocol::{ErrorCode, ProtocolError, Request, Response, TailRequest};
use quinn::{RecvStream, VarInt};

use crate::client::{Client, Target, REDIRECTS_MAX};
use crate::conn::{self, FrameReader, CODE_NORMAL};
use crate::records::{extract_records, ReadRecord};
use crate::{Error, Result};

/// Upper bound on the batch bytes of each frame of a tail.
const TAIL_BYTES_MAX: u32 = 1 << 20;

/// A subscription to a log, from [`Client::tail`].
///
/// [`Tail::next`] returns the log's records one by one, in offset order, waiting for new ones
/// to commit. The records of each frame the node sends are buffered in the tail. If the
/// connection is lost or the node stops leading the log, the tail resubscribes at
/// [`Tail::position`] (within the client's retry and redirect bounds), so no record is skipped
/// or repeated. Dropping the tail closes its stream.
pub struct Tail {
    client: Client,
    log: String,
    /// Offset of the next record to deliver (after the buffered ones).
    position: u64,
    buffer: VecDeque<ReadRecord>,
    stream: Option<RecvStream>,
    reader: FrameReader,
    /// Generation of the connection the stream is on.
    gen: u64,
    target: Target,
    failures: u32,
    redirects: u32,
    ended: bool,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("log", &self.log)
            .field("position", &self.position)
            .field("buffered", &self.buffer.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Tail {
    pub(crate) async fn open(client: Client, log: String, from: u64) -> Result<Tail> {
        let mut tail = Tail {
            client,
            log,
            position: from,
            buffer: VecDeque::new(),
            stream: None,
            reader: FrameReader::default(),
            gen: 0,
            target: Target::Current,
            failures: 0,
            redirects: 0,
            ended: false,
        };
        tail.subscribe().await?;
        Ok(tail)
    }

    /// The log this tail follows.
    pub fn log(&self) -> &str {
        &self.log
    }

    /// Offset of the next record [`Tail::next`] will return: where a new tail would have to
    /// start to continue this one.
    pub fn position(&self) -> u64 {
        self.buffer.front().map_or(self.position, |r| r.offset)
    }

    /// The next record, waiting for one to commit if needed.
    ///
    /// Returns `Ok(None)` once the node has ended the subscription without an error. An error
    /// answered by the node (such as `log_not_found`) ends the tail: it is returned once and
    /// later calls return `Ok(None)`. Connection failures beyond the client's retries are
    /// returned too; a later call then resubscribes at [`Tail::position`].
    ///
    /// Cancel-safe: if the future is dropped before it completes, no record is lost.
    pub async fn next(&mut self) -> Result<Option<ReadRecord>> {
        loop {
            if let Some(r) = self.buffer.pop_front() {
                return Ok(Some(r));
            }
            if self.ended {
                return Ok(None);
            }
            if self.stream.is_none() {
                self.subscribe().await?;
            }
            let limits = &self.client.inner.config.limits;
            let Some(recv) = self.stream.as_mut() else {
                continue;
            };
            let result = self.reader.read(recv, limits).await;
            match result {
                Ok(Some(Response::Batches(b))) => {
                    let records = match extract_records(
                        &self.log,
                        &b.batches,
                        self.position,
                        b.next_offset,
                    ) {
                        Ok(r) => r,
                        Err(e) => {
                            self.close_stream();
                            return Err(e);
                        }
                    };
                    self.failures = 0;
                    self.redirects = 0;
                    self.position = b.next_offset;
                    self.client
                        .note_seen(&self.log, b.next_offset.min(b.committed));
                    self.buffer.extend(records);
                }
                Ok(Some(Response::Error(e))) => {
                    self.close_stream();
                    let retries = self.client.inner.config.retries;
                    if e.code == ErrorCode::NotLeader && self.redirects < REDIRECTS_MAX {
                        self.redirects += 1;
                        if e.leader.is_empty() {
                            tokio::time::sleep(crate::client::backoff(self.redirects)).await;
                            self.target = Target::NextAfter(self.gen);
                        } else {
                            self.target = Target::Leader(e.leader);
                        }
                    } else if matches!(e.code, ErrorCode::ShuttingDown | ErrorCode::Busy)
                        && self.failures < retries
                    {
                        self.failures += 1;
                        if e.code == ErrorCode::ShuttingDown {
                            self.target = Target::NextAfter(self.gen);
                        }
                        tokio::time::sleep(crate::client::backoff(self.failures)).await;
                    } else {
                        self.ended = true;
                        return Err(e.into());
                    }
                }
                Ok(Some(_)) => {
                    self.close_stream();
                    return Err(ProtocolError::Malformed("unexpected answer to Tail").into());
                }
                Ok(None) => {
                    self.stream = None;
                    self.ended = true;
                    return Ok(None);
                }
                Err(e) => {
                    self.close_stream();
                    if e.is_transient() && self.failures < self.client.inner.config.retries {
                        self.failures += 1;
                        tracing::debug!(log = %self.log, error = %e, "tail lost its stream; resubscribing");
                        tokio::time::sleep(crate::client::backoff(self.failures)).await;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    fn close_stream(&mut self) {
        if let Some(mut recv) = self.stream.take() {
            let _ = recv.stop(VarInt::from_u32(CODE_NORMAL));
        }
        self.reader = FrameReader::default();
    }

    /// Open a stream and send the Tail request at the current position, retrying
    /// connection-level failures.
    async fn subscribe(&mut self) -> Result<()> {
        let config = &self.client.inner.config;
        let frame = conn::encode(&Request::Tail(TailRequest {
            log: self.log.clone(),
            from: self.position,
            bytes_max: TAIL_BYTES_MAX,
        }));
        loop {
            let attempt = async {
                let live = self.client.acquire(&self.target).await?;
                let mut sent = false;
                let open = tokio::time::timeout(
                    config.request_timeout,
                    conn::open_and_send(&live.conn, &frame, &mut sent),
                )
                .await
                .unwrap_or(Err(Error::Timeout));
                open.map(|(_send, recv)| (recv, live.gen))
            };
            match attempt.await {
                Ok((recv, gen)) => {
                    self.stream = Some(recv);
                    self.reader = FrameReader::default();
                    self.gen = gen;
                    self.target = Target::Current;
                    return Ok(());
                }
                Err(e) if e.is_transient() && self.failures < config.retries => {
                    self.failures += 1;
                    self.target = Target::Current;
                    tokio::time::sleep(crate::client::backoff(self.failures)).await;
                }
                Err(e) => {
                    self.target = Target::Current;
                    return Err(e);
                }
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.close_stream();
    }
}
