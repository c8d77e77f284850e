//! What the simulated nodes and clients share: the clock, the event queue, the seeded random
//! source, the network, the disks, the checker and the trace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use rand_chacha::ChaCha8Rng;

use crate::checker::Checker;
use crate::disk::Disk;
use crate::msg::Msg;
use crate::net::Net;
use crate::Config;

/// Something that happens at a moment of simulated time.
#[derive(Debug)]
pub enum Event {
    Deliver {
        from: usize,
        to: usize,
        generation: u64,
        ordered: bool,
        msg: Msg,
    },
    /// A node's periodic tick (controller tick, steering, reports, lag checks).
    Tick { node: usize, incarnation: u64 },
    /// An fdatasync of `log` issued when `written` (its copy, its end) was written has
    /// completed.
    Fsync {
        node: usize,
        incarnation: u64,
        log: String,
        written: (u64, u64),
    },
    /// An application snapshot of `log` at `offset` is written and durable (for the client
    /// request `reply`, or copied from the leader).
    SnapshotWritten {
        node: usize,
        incarnation: u64,
        log: String,
        offset: u64,
        state: u64,
        reply: Option<(usize, u64)>,
    },
    /// Endpoint `at` notices that its connection to `peer` died at `since` (us): what it
    /// began over that connection before then ends (a connection made since is another).
    ConnDown { at: usize, peer: usize, since: u64 },
    /// What endpoint `at` sent into a dead connection to `peer` got no answer (see
    /// `Net::take_failed`).
    SendFailed { at: usize, peer: usize },
    /// A retention pass over one log.
    Retention,
    /// A crashed node starts again.
    Restart { node: usize },
    /// A client's next step.
    Client { client: usize },
    /// A client's request `id` has had no answer in time.
    ClientDeadline { client: usize, id: u64 },
    /// Time for the next fault.
    Fault,
    /// Time for the next batch damaged at rest.
    Rot,
    /// Fault `id` ends.
    Heal { id: u64 },
}

/// The last lines of the run's story, printed with a failure.
#[derive(Debug)]
pub struct Trace {
    lines: VecDeque<String>,
    cap: usize,
}

impl Trace {
    pub fn new(cap: usize) -> Trace {
        Trace {
            lines: VecDeque::new(),
            cap,
        }
    }

    pub fn push(&mut self, line: String) {
        if self.lines.len() == self.cap {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    pub fn lines(&self) -> impl Iterator<Item = &String> {
        self.lines.iter()
    }
}

/// The shared state of a run.
pub struct World {
    /// Simulated time (us).
    pub now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    pub rng: ChaCha8Rng,
    pub net: Net,
    pub disks: Vec<Disk>,
    pub checker: Checker,
    pub trace: Trace,
    pub cfg: Config,
}

impl World {
    pub fn new(cfg: Config, rng: ChaCha8Rng) -> World {
        World {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            rng,
            net: Net::default(),
            disks: (0..cfg.nodes).map(|_| Disk::default()).collect(),
            checker: Checker::new(&cfg),
            trace: Trace::new(cfg.trace_lines),
            cfg,
        }
    }

    /// Schedule `ev` at `at` (us); events at the same moment run in the order scheduled.
    pub fn at(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at.max(self.now), self.seq)));
        self.events.insert(self.seq, ev);
    }

    pub fn after(&mut self, delay_us: u64, ev: Event) {
        self.at(self.now + delay_us, ev);
    }

    /// The next event, advancing the clock to it.
    pub fn next_event(&mut self) -> Option<Event> {
        let Reverse((at, seq)) = self.queue.pop()?;
        self.now = at;
        self.events.remove(&seq)
    }

    /// When the next event is due.
    pub fn peek_time(&self) -> Option<u64> {
        self.queue.peek().map(|Reverse((at, _))| *at)
    }

    /// Send `msg` from endpoint `from` to endpoint `to`.
    pub fn send(&mut self, from: usize, to: usize, msg: Msg) {
        let ordered = msg.ordered();
        if ordered && (self.net.is_blocked(from, to) || self.net.is_blocked(to, from)) {
            // No connection can live across a cut, in either direction: the sender learns it
            // after the idle timeout.
            self.send_failed(from, to);
            return;
        }
        let flights = self.net.send(&mut self.rng, self.now, from, to, ordered);
        for f in flights {
            let msg = msg.clone();
            self.at(
                f.at,
                Event::Deliver {
                    from,
                    to,
                    generation: f.generation,
                    ordered: f.ordered,
                    msg,
                },
            );
        }
    }

    /// `from` sent into a dead connection to `to`: it learns so after the idle timeout.
    pub fn send_failed(&mut self, from: usize, to: usize) {
        if self.net.send_failed(from, to, self.now) {
            let detect = self.net.detect_us;
            self.after(detect, Event::SendFailed { at: from, peer: to });
        }
    }

    /// Add a line to the trace, stamped with the time.
    pub fn note(&mut self, line: impl std::fmt::Display) {
        let t = self.now as f64 / 1e6;
        self.trace.push(format!("{t:>12.6}s  {line}"));
    }
}
