//! The leader's replication streams to followers: each follower's stream is served from where
//! it asks (`node_core::log::Outbound` decides what goes out next), its acknowledgements fed
//! to the log's [`Replication`], and a follower's question about where an epoch ends is
//! answered from the log's epoch history.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log_core::{Epoch, Log, Offset};
use node_core::catchup::Pacer;
use node_core::log::{Outbound, Outgoing, StreamRefusal};
use protocol::{ErrorCode, ReplicateRequest, Request};

use crate::common::Common;
use crate::replication::{pin_name, Replication};
use crate::shard::{LogEntry, Shard};

/// Frames sent to a follower and not yet acknowledged: (end offset, when sent), oldest first.
/// Each frame in flight: its end offset, when it went out, and whether it was live (not
/// catch-up).
type InFlight = RefCell<VecDeque<(u64, Instant, bool)>>;
/// Most frames per follower stream whose send time is kept for the acknowledgement latency
/// histogram (older ones are forgotten, not measured).
const IN_FLIGHT_TIMED_MAX: usize = 4096;
/// How long a new commit offset waits for records to travel with before it is sent alone.
const COMMIT_LINGER: Duration = Duration::from_millis(1);

/// Serve a follower's replication stream: send it everything from `req.from` as it is written,
/// with the commit offset, and take its acknowledgements.
pub(crate) async fn serve(
    shard: Rc<Shard>,
    entry: Rc<LogEntry>,
    req: ReplicateRequest,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), (ErrorCode, String, u64)> {
    let Some(repl) = entry.leading() else {
        return Err((
            ErrorCode::NotLeader,
            "this node does not lead the log".into(),
            0,
        ));
    };
    if !shard.common.followers_of(&req.log).contains(&req.follower) {
        return Err((
            ErrorCode::Unauthenticated,
            format!(
                "node {:?} is not a follower of this leader (replication.followers, or the controller's replicas of the log)",
                req.follower
            ),
            0,
        ));
    }
    let log = &entry.log;
    let (start, end) = (log.start_offset().0, log.next_offset().0);
    let out = match Outbound::open(req.from, start, end) {
        Ok(out) => Rc::new(RefCell::new(out)),
        Err(StreamRefusal::Bootstrap { start }) => {
            return Err((
                ErrorCode::OffsetOutOfRange,
                format!(
                    "offset {} is no longer stored (the log starts at {start}): bootstrap",
                    req.from
                ),
                start,
            ))
        }
        Err(StreamRefusal::Ahead { end }) => {
            return Err((
                ErrorCode::OffsetOutOfRange,
                format!(
                    "the follower is at {} beyond the leader's end {end}: it must truncate at the epoch divergence point first",
                    req.from
                ),
                start,
            ))
        }
    };
    let name = req.log.clone();
    let follower = req.follower.clone();
    let generation = {
        let mut peers = repl.peers.borrow_mut();
        let p = peers.entry(follower.clone()).or_default();
        p.generation += 1;
        p.addr = req.addr.clone();
        p.catchup_done = 0;
        p.catchup_total = 0;
        p.generation
    };
    // This stream is the follower's latest, and this node still leads the log.
    let current = |repl: &Replication| {
        !repl.deposed.get()
            && repl
                .peers
                .borrow()
                .get(&follower)
                .is_some_and(|p| p.generation == generation)
    };
    log.pin(&pin_name(&follower), Offset(req.from));
    let durable = out.borrow().counted(req.durable);
    let events = repl
        .state
        .borrow_mut()
        .connected(&follower, durable, repl.now_ms());
    repl.events(&name, &shard.common, events);
    tracing::info!(log = %name, follower = %follower, from = req.from, "follower connected");

    // When each frame went out (its end offset), to time the follower's acknowledgements.
    let in_flight: Rc<InFlight> = Default::default();
    let acks = {
        let (shard, repl, follower, out, name) = (
            shard.clone(),
            repl.clone(),
            follower.clone(),
            out.clone(),
            name.clone(),
        );
        let in_flight = in_flight.clone();
        let entry = entry.clone();
        async move {
            let mut recv = recv;
            let limits = shard.common.config.protocol_limits();
            let mut reader = frames::FrameReader::requests();
            loop {
                match crate::wire::read_frame(&mut reader, &mut recv, &limits).await {
                    Ok(Request::Ack { durable }) => {
                        if !current(&repl) {
                            return;
                        }
                        // A follower cannot acknowledge what this stream did not send.
                        let durable = out.borrow().counted(durable);
                        let mut newest = None;
                        {
                            let mut q = in_flight.borrow_mut();
                            while q.front().is_some_and(|&(end, _, _)| end <= durable) {
                                newest = q.pop_front();
                            }
                        }
                        if let Some((_, at, live)) = newest {
                            let c = &shard.common;
                            let latency = at.elapsed();
                            c.metrics.record_follower_ack(shard.id, latency);
                            if live {
                                let us = latency.as_micros() as u64;
                                let mut tail =
                                    c.live_tail.lock().unwrap_or_else(|p| p.into_inner());
                                tail.record(c.now_ms(), us);
                            }
                        }
                        entry.log.pin(&pin_name(&follower), Offset(durable));
                        let events =
                            repl.state
                                .borrow_mut()
                                .acked(&follower, durable, repl.now_ms());
                        repl.events(&name, &shard.common, events);
                        // An acknowledgement that moved no commit may still complete an
                        // acks=quorum append.
                        repl.changed.notify_waiters();
                    }
                    Ok(other) => {
                        tracing::warn!(log = %name, follower = %follower, ?other, "unexpected message on a replication stream");
                        return;
                    }
                    Err(_) => return,
                }
            }
        }
    };
    let sending = send_loop(
        &shard,
        &entry,
        &repl,
        &follower,
        send,
        (&out, &in_flight),
        &current,
    );
    tokio::select! {
        () = acks => {}
        () = sending => {}
    }
    if current(&repl) {
        let events = repl
            .state
            .borrow_mut()
            .disconnected(&follower, repl.now_ms());
        repl.events(&name, &shard.common, events);
        tracing::info!(log = %name, follower = %follower, "follower disconnected");
    }
    let _ = send.reset(protocol::close_code::NORMAL.into());
    Ok(())
}

/// A catch-up under way on this stream: its pacer, and its place among the node's catch-ups
/// (which keep the live tail's base from moving) until it is dropped.
struct Catchup<'a>(Pacer, &'a Common);

impl<'a> Catchup<'a> {
    fn start(c: &'a Common) -> Catchup<'a> {
        let r = &c.config.replication;
        c.live_tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .catchup_started();
        Catchup(
            Pacer::new(
                c.now_ms(),
                r.catchup_bytes_per_sec_max,
                r.catchup_live_latency_factor,
            ),
            c,
        )
    }
}

impl Drop for Catchup<'_> {
    fn drop(&mut self) {
        self.1
            .live_tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .catchup_ended();
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_loop(
    shard: &Shard,
    entry: &LogEntry,
    repl: &Replication,
    follower: &str,
    send: &mut quinn::SendStream,
    (out, in_flight): (&RefCell<Outbound>, &InFlight),
    current: &dyn Fn(&Replication) -> bool,
) {
    let log = &entry.log;
    let cfg = &shard.common.config.replication;
    let epoch: Epoch = entry.epoch;
    let mut bulk = false;
    // The catch-up's rate while in bulk mode.
    let mut pacer: Option<Catchup> = None;
    loop {
        if !current(repl) || shard.closing.get() {
            return;
        }
        let changed = repl.changed.notified();
        // The followers get what this node has written, and what its writer is writing: the
        // leader's write and the followers' run side by side. (Only what the leader itself
        // holds durably can be committed, so nothing not yet durable here is ever served.)
        let written = log.end_offset();
        let taken = log.taken_offset();
        let commit = repl.commit().0;
        let next = out.borrow().next(taken.0, commit);
        if let Outgoing::Records { from } = next {
            let pos = Offset(from);
            // A follower far behind is served at bulk priority (the live tail of every other
            // log on the same connection goes first) and at a bounded rate.
            let behind = log.bytes_from(pos).unwrap_or(0);
            let now_bulk = behind > cfg.catchup_bytes_min;
            if now_bulk != bulk {
                bulk = now_bulk;
                pacer = bulk.then(|| Catchup::start(&shard.common));
                let _ = send.set_priority(if bulk { -1 } else { 0 });
                let mut peers = repl.peers.borrow_mut();
                if let Some(p) = peers.get_mut(follower) {
                    (p.catchup_done, p.catchup_total) = (0, if bulk { behind } else { 0 });
                }
            }
            let max = cfg.frame_bytes_max as usize;
            let (mut chunks, next_offset, len) = if pos < written {
                // Written: straight from the segments' mappings.
                let read = match log.read(pos, written, max) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(follower, error = %e, "reading for a follower failed");
                        return;
                    }
                };
                let len: usize = read.batches.iter().map(|b| b.len()).sum();
                let mut chunks: Vec<Bytes> = Vec::with_capacity(read.batches.len() + 1);
                chunks.push(Bytes::new());
                chunks.extend(read.batches.into_iter().map(|b| b.into_bytes()));
                (chunks, read.next_offset, len)
            } else if let Some((bytes, next)) = log.read_unwritten(pos, max) {
                // Being written: from the writer's buffer.
                let len = bytes.len();
                (vec![Bytes::new(), bytes], next, len)
            } else {
                // Not at a batch start of the write under way (cannot happen: streams move
                // by whole batches); wait for it to be written and read it from there.
                if log.wait_written(pos.plus(1)).await.is_err() {
                    return;
                }
                continue;
            };
            chunks[0] = Bytes::copy_from_slice(&protocol::encode_replicated_prefix(
                epoch.0,
                commit,
                next_offset.0,
                len,
            ));
            if !crate::wire::write_all(&shard.common, send, &mut chunks).await {
                return;
            }
            if bulk {
                if let Some(p) = repl.peers.borrow_mut().get_mut(follower) {
                    p.catchup_done += len as u64;
                }
            }
            out.borrow_mut().sent(next_offset.0, commit);
            {
                let mut q = in_flight.borrow_mut();
                if q.len() == IN_FLIGHT_TIMED_MAX {
                    q.pop_front();
                }
                q.push_back((next_offset.0, Instant::now(), !bulk));
            }
            let m = &shard.common.metrics.c;
            m.replicated_bytes.fetch_add(len as u64, Ordering::Relaxed);
            if let Some(Catchup(p, _)) = pacer.as_mut() {
                let c = &shard.common;
                let now = c.now_ms();
                let reading = c
                    .live_tail
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .reading(now);
                p.adjust(now, reading);
                let wait = p.sent(now, len as u64);
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
            continue;
        }
        if bulk {
            // Caught up with what is written: live again.
            bulk = false;
            pacer = None;
            let _ = send.set_priority(0);
            if let Some(p) = repl.peers.borrow_mut().get_mut(follower) {
                (p.catchup_done, p.catchup_total) = (0, 0);
            }
        }
        let pos = Offset(out.borrow().sent_until());
        if next == Outgoing::Commit {
            // Nothing new to send, but the commit offset moved: followers serve reads up to it.
            // New records usually follow at once and carry the commit offset with them, so a
            // frame for the commit offset alone waits a moment for them.
            match tokio::time::timeout(COMMIT_LINGER, log.wait_taken_past(pos)).await {
                Ok(Ok(())) => continue,
                // Closed (the log changed role) or failed: this stream is over.
                Ok(Err(_)) => return,
                Err(_elapsed) => {}
            }
            let commit = repl.commit().0;
            let prefix = protocol::encode_replicated_prefix(epoch.0, commit, pos.0, 0);
            if !crate::wire::write_all(&shard.common, send, &mut [Bytes::copy_from_slice(&prefix)])
                .await
            {
                return;
            }
            out.borrow_mut().sent(pos.0, commit);
            continue;
        }
        let more = log.wait_taken_past(pos);
        tokio::select! {
            r = more => {
                if r.is_err() {
                    return;
                }
            }
            _ = changed => {}
            _ = send.stopped() => return,
        }
    }
}

/// Where `epoch` ends in this log (KIP-101): the largest epoch of the history that is at most
/// `epoch`, and the offset where it ends. When the history begins after `epoch`: its first
/// epoch and the offset it begins at (what the asker holds from there predates this history).
/// (0, 0) when the history is empty.
pub(crate) fn epoch_end(log: &Log, epoch: u64) -> (u64, u64) {
    match log.end_offset_for_epoch(Epoch(epoch)) {
        Some((e, end)) => (e.0, end.0),
        None => log
            .epoch_history()
            .first()
            .map_or((0, 0), |f| (f.epoch.0, f.start_offset.0)),
    }
}
