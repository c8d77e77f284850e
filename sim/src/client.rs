//! Simulated clients: the workload. Each has one request in flight at a time and follows the
//! client library's rules: it follows `not_leader` redirects, asks other nodes when none is
//! named, waits through `unavailable`, and resends an idempotent producer's append, unchanged,
//! until it has a definite answer.
//!
//! Each client is also an application over each log: it starts from the latest application
//! snapshot of some replica (or from offset 0 when there is none), reads the log on from the
//! snapshot's offset on that replica, folds the records into its state, and every
//! `Config::snapshot_every_records` records read stores its state as a snapshot at the offset it has
//! reached. When its replica no longer (or not yet) holds its offset, or now and then as if
//! its process restarted, it starts again.

use std::collections::BTreeMap;
use std::rc::Rc;

use protocol::{Acks, ErrorCode};
use rand::Rng;

use crate::checker::{fold, STATE_ZERO};
use crate::msg::{Msg, Rep, Req};
use crate::world::{Event, World};

/// A request in flight, with what its attempts so far may have done.
struct Pending {
    id: u64,
    req: Req,
    /// An attempt may have stored it (an unknown outcome).
    maybe_stored: bool,
    /// When the client stops trying (us).
    give_up: u64,
    /// What the request is for.
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An append or a read of any replica.
    Plain,
    /// A read of this client's tail of the log on one replica.
    Tail,
    /// A step of this client's application over the log.
    App,
}

/// The chance that an application restarts (and starts again from a snapshot) at a step.
const APP_RESTART_CHANCE: f64 = 0.02;

/// A client's application over a log: its state after the records below `next`, read from
/// `replica`, with `unsaved` records applied since its last snapshot.
#[derive(Clone, Copy, Debug)]
struct App {
    replica: usize,
    next: u64,
    state: u64,
    unsaved: u64,
}

/// A client's tail of a log: it reads on from where its last read ended, on one replica.
#[derive(Clone, Copy, Debug)]
struct Tail {
    replica: usize,
    next: u64,
}

/// One client.
pub struct Client {
    pub endpoint: usize,
    idx: usize,
    next_id: u64,
    next_record: u64,
    pending: Option<Pending>,
    hints: BTreeMap<String, usize>,
    /// This client's idempotent producer, and its next sequence number per log.
    producer: u64,
    sequences: BTreeMap<String, u64>,
    /// The highest offset this client has seen per log (read-your-writes).
    seen: BTreeMap<String, u64>,
    /// Its tail of each log.
    tails: BTreeMap<String, Tail>,
    /// Its application over each log (none until it has found where to start).
    apps: BTreeMap<String, App>,
    pub stopped: bool,
    /// Appends and reads answered, for the report.
    pub done: u64,
}

impl Client {
    pub fn new(idx: usize, endpoint: usize) -> Client {
        Client {
            endpoint,
            idx,
            next_id: 0,
            next_record: 0,
            pending: None,
            hints: BTreeMap::new(),
            producer: 0x5eed_0000 + idx as u64 + 1,
            sequences: BTreeMap::new(),
            seen: BTreeMap::new(),
            tails: BTreeMap::new(),
            apps: BTreeMap::new(),
            stopped: false,
            done: 0,
        }
    }

    pub fn idle(&self) -> bool {
        self.pending.is_none()
    }

    fn node(&self, w: &mut World, log: &str) -> usize {
        match self.hints.get(log) {
            Some(n) => *n,
            None => w.rng.gen_range(0..w.cfg.nodes),
        }
    }

    fn send(&mut self, w: &mut World, to: usize) {
        let p = self.pending.as_mut().expect("a request to send");
        self.next_id += 1;
        p.id = self.next_id;
        w.send(
            self.endpoint,
            to,
            Msg::Request {
                id: p.id,
                req: p.req.clone(),
            },
        );
        let timeout = (w.cfg.append_timeout_ms + 2000) * 1000;
        w.after(
            timeout,
            Event::ClientDeadline {
                client: self.idx,
                id: p.id,
            },
        );
    }

    fn wake_in(&self, w: &mut World, us: u64) {
        w.after(us, Event::Client { client: self.idx });
    }

    /// The next step: a new request, unless one is in flight or the client has stopped.
    pub fn wake(&mut self, w: &mut World) {
        if self.pending.is_some() {
            // A retry's pause is over.
            let log = self
                .pending
                .as_ref()
                .expect("pending")
                .req
                .log()
                .to_string();
            let to = self.node(w, &log);
            return self.send(w, to);
        }
        if self.stopped {
            return;
        }
        let log = format!("l{}", w.rng.gen_range(0..w.cfg.logs));
        let seen = self.seen.get(&log).copied().unwrap_or(0);
        let (req, kind) = if w.rng.gen_bool(0.75) {
            let n = w.rng.gen_range(1..=3u64);
            let records: Rc<[u64]> = (0..n)
                .map(|_| {
                    self.next_record += 1;
                    ((self.idx as u64 + 1) << 40) | self.next_record
                })
                .collect();
            let acks = match w.rng.gen_range(0..100) {
                0..=54 => Acks::Sync,
                55..=69 => Acks::Quorum,
                70..=89 => Acks::Leader,
                _ => Acks::None,
            };
            let idempotent = w.rng.gen_bool(0.5);
            let producer = idempotent.then(|| {
                let seq = *self.sequences.entry(log.clone()).or_insert(0);
                (self.producer, seq)
            });
            let expected = (!idempotent && w.rng.gen_bool(0.1)).then_some(seen);
            let append = Req::Append {
                log: log.clone(),
                records,
                acks,
                producer,
                expected,
            };
            (append, Kind::Plain)
        } else if w.rng.gen_bool(1.0 / 3.0) {
            if w.rng.gen_bool(APP_RESTART_CHANCE) {
                // The application restarts: it starts again from a snapshot.
                self.apps.remove(&log);
            }
            (self.app_step(&log, w.cfg.snapshot_every_records), Kind::App)
        } else if w.rng.gen_bool(0.5) {
            // The tail: on from where it ended, at the end of the log.
            let nodes = w.cfg.nodes;
            let t = *self.tails.entry(log.clone()).or_insert_with(|| Tail {
                replica: w.rng.gen_range(0..nodes),
                next: seen,
            });
            let read = Req::Read {
                log: log.clone(),
                from: t.next,
                min_offset: 0,
            };
            (read, Kind::Tail)
        } else {
            let read = Req::Read {
                log: log.clone(),
                from: w.rng.gen_range(0..=seen),
                min_offset: if w.rng.gen_bool(0.5) { seen } else { 0 },
            };
            (read, Kind::Plain)
        };
        if let Req::Append { records, .. } = &req {
            w.checker.sent(records);
        }
        let give_up = w.now + 4 * (w.cfg.append_timeout_ms + 2000) * 1000;
        self.pending = Some(Pending {
            id: 0,
            req,
            maybe_stored: false,
            give_up,
            kind,
        });
        let to = match self.pending.as_ref().map(|p| &p.req) {
            // A tail and an application stay on their replica; other reads go to any, and so
            // does an application looking for a snapshot to start from.
            Some(Req::Read { .. }) if kind == Kind::Tail => self.tails[&log].replica,
            Some(Req::Read { .. }) if kind == Kind::App => self.apps[&log].replica,
            Some(Req::Read { .. } | Req::GetSnapshot { .. }) => w.rng.gen_range(0..w.cfg.nodes),
            _ => self.node(w, &log),
        };
        self.send(w, to);
    }

    /// The application's next request over `log`: find where to start, store a snapshot, or
    /// read on.
    fn app_step(&self, log: &str, snapshot_every: u64) -> Req {
        let log = log.to_string();
        match self.apps.get(&log) {
            None => Req::GetSnapshot { log },
            Some(a) if a.unsaved >= snapshot_every => Req::PutSnapshot {
                log,
                offset: a.next,
                state: a.state,
            },
            Some(a) => Req::Read {
                log,
                from: a.next,
                min_offset: 0,
            },
        }
    }

    /// Done with the request in flight: think, then go on (now and then after a long idle).
    fn finish(&mut self, w: &mut World) {
        self.pending = None;
        self.done += 1;
        let pause = if w.rng.gen_bool(w.cfg.idle_chance) {
            w.rng.gen_range(20_000_000..90_000_000)
        } else {
            w.rng.gen_range(2_000..w.cfg.think_us_max)
        };
        self.wake_in(w, pause);
    }

    /// Try again after a pause, unless it is time to give up. `unknown`: the last attempt
    /// may have been stored.
    fn retry(&mut self, w: &mut World, unknown: bool) {
        let p = self.pending.as_mut().expect("pending");
        p.maybe_stored |= unknown;
        p.id = 0;
        let (append, idempotent) = match &p.req {
            Req::Append { producer, .. } => (true, producer.is_some()),
            _ => (false, false),
        };
        // A plain append whose outcome is unknown is not resent (it could be stored twice):
        // the client library reports the unknown outcome.
        if unknown && append && !idempotent {
            return self.finish(w);
        }
        // An idempotent producer resends until it knows (the node turns a resend of a stored
        // append into its receipt); anything else gives up at its deadline.
        if w.now >= p.give_up && !(idempotent && p.maybe_stored) {
            return self.finish(w);
        }
        let pause = w.rng.gen_range(20_000..100_000);
        self.wake_in(w, pause);
    }

    /// A node's answer.
    pub fn reply(&mut self, w: &mut World, from: usize, id: u64, rep: Rep) {
        let Some(p) = self.pending.as_mut().filter(|p| p.id == id) else {
            return;
        };
        let log = p.req.log().to_string();
        match rep {
            Rep::Stored => {
                if let Some(a) = self.apps.get_mut(&log) {
                    a.unsaved = 0;
                }
                self.finish(w);
            }
            Rep::Snapshot { offset, state } => {
                let app = App {
                    replica: from,
                    next: offset,
                    state,
                    unsaved: 0,
                };
                self.apps.insert(log, app);
                w.checker.stats.readers_from_snapshot += 1;
                self.finish(w);
            }
            Rep::Error {
                code: ErrorCode::SnapshotNotFound,
                ..
            } => {
                // No snapshot there: start from the beginning of the log (if it no longer
                // starts there, the read says so, and the application starts again).
                let app = App {
                    replica: from,
                    next: 0,
                    state: STATE_ZERO,
                    unsaved: 0,
                };
                self.apps.insert(log, app);
                self.finish(w);
            }
            Rep::Error {
                code: ErrorCode::OffsetOutOfRange,
                ..
            } if p.kind == Kind::App => {
                match p.req {
                    // The replica no longer or not yet holds the application's offset: it
                    // starts again from a snapshot.
                    Req::Read { .. } => {
                        self.apps.remove(&log);
                    }
                    // The leader's log starts past the offset (a newer snapshot has let
                    // retention go on): the state is not worth a snapshot.
                    _ => {
                        if let Some(a) = self.apps.get_mut(&log) {
                            a.unsaved = 0;
                        }
                    }
                }
                self.finish(w);
            }
            Rep::Error {
                code: code @ (ErrorCode::OffsetConflict | ErrorCode::Behind),
                ..
            } if matches!(p.req, Req::PutSnapshot { .. }) => {
                // A newer snapshot is stored (another application's): this one is not needed;
                // or the leader has not committed the offset yet: the next step tries again.
                if let (Some(a), ErrorCode::OffsetConflict) = (self.apps.get_mut(&log), code) {
                    a.unsaved = 0;
                }
                self.finish(w);
            }
            Rep::Receipt {
                first,
                next,
                epoch,
                level,
                degraded,
                ..
            } => {
                let Req::Append {
                    records,
                    acks,
                    producer,
                    ..
                } = &p.req
                else {
                    return;
                };
                w.checker
                    .acked(&log, first, next, epoch, records, *acks, level, degraded);
                if let Some((_, seq)) = producer {
                    self.sequences
                        .insert(log.clone(), seq + records.len() as u64);
                }
                self.hints.insert(log.clone(), from);
                let seen = self.seen.entry(log).or_default();
                *seen = (*seen).max(next);
                self.finish(w);
            }
            Rep::Records { from: at, ids, .. } => {
                let end = at + ids.len() as u64;
                if p.kind == Kind::App {
                    if let Some(a) = self.apps.get_mut(&log).filter(|a| a.next == at) {
                        a.state = fold(a.state, &ids);
                        a.next = end;
                        a.unsaved += ids.len() as u64;
                    }
                }
                if p.kind == Kind::Tail {
                    if let Some(t) = self.tails.get_mut(&log).filter(|t| t.next == at) {
                        t.next = end;
                        w.checker.stats.tail_reads += !ids.is_empty() as u64;
                    }
                }
                let seen = self.seen.entry(log).or_default();
                *seen = (*seen).max(end);
                self.finish(w);
            }
            Rep::Error {
                code: ErrorCode::OffsetOutOfRange,
                ..
            } if p.kind == Kind::Tail => {
                // The replica no longer holds the tail's offset (retention, a bootstrap), or
                // not yet (a wiped copy): the tail starts again from what the client has seen,
                // on another replica.
                let seen = self.seen.get(&log).copied().unwrap_or(0);
                let replica = w.rng.gen_range(0..w.cfg.nodes);
                self.tails.insert(
                    log,
                    Tail {
                        replica,
                        next: seen,
                    },
                );
                self.finish(w);
            }
            Rep::Error {
                code: ErrorCode::NotLeader,
                leader,
            } => {
                match leader {
                    Some(l) => self.hints.insert(log, l),
                    None => self.hints.remove(&log),
                };
                self.retry(w, false);
            }
            Rep::Error {
                code: ErrorCode::Timeout,
                ..
            } => {
                self.hints.remove(&log);
                self.retry(w, true);
            }
            Rep::Error {
                code: ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::LogNotFound,
                ..
            } => self.retry(w, false),
            Rep::Error { code, .. } => {
                // A definite answer: nothing of this attempt was stored.
                if let (false, Req::Append { records, .. }) = (p.maybe_stored, &p.req) {
                    w.checker.refused(records, code);
                }
                if let Req::Append {
                    producer: Some(_), ..
                } = &p.req
                {
                    if p.maybe_stored {
                        // An earlier attempt may be stored: resend until known.
                        return self.retry(w, false);
                    }
                }
                self.finish(w);
            }
        }
    }

    /// No answer in time: the outcome is unknown.
    pub fn deadline(&mut self, w: &mut World, id: u64) {
        if self.pending.as_ref().is_some_and(|p| p.id == id) {
            if let Some(Req::Append { log, .. }) = self.pending.as_ref().map(|p| &p.req) {
                let log = log.clone();
                self.hints.remove(&log);
            }
            self.retry(w, true);
        }
    }
}
