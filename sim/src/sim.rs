//! The run: the event loop, the faults, and the end (heal, liveness, final checks).

use std::collections::BTreeMap;
use std::fmt;

use node_core::controller::meta::{Command, Policy};
use node_core::log::LogRecord;
use node_core::snapshot::Snapshots;
use protocol::Acks;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checker::Stats;
use crate::client::Client;
use crate::disk::{Batch, SimLog};
use crate::msg::{Msg, Rep, Req};
use crate::node::{node_id, node_idx, Clock, Node};
use crate::world::{Event, World};
use crate::Config;

/// How long after healing every log must have a leader (ms).
const SETTLE_MS: u64 = 30_000;

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub simulated_ms: u64,
    pub events: u64,
    pub faults: u64,
    pub crashes: u64,
    pub stats: Stats,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {:.1} simulated hours, {} events, {} faults ({} crashes), {} new epochs ({} leader changes), {} appends ({} receipts, {} at sync/quorum), {} reads ({} of tails), {} truncations, {} batches rotted ({} repaired), {} retention passes, {} bootstraps, snapshots: {} put, {} copied, {} served ({} readers started from one)",
            self.seed,
            self.simulated_ms as f64 / 3.6e6,
            self.events,
            self.faults,
            self.crashes,
            self.stats.new_epochs,
            self.stats.leader_changes,
            self.stats.appends_sent,
            self.stats.receipts,
            self.stats.acked_sync,
            self.stats.reads,
            self.stats.tail_reads,
            self.stats.truncations,
            self.stats.rotted,
            self.stats.repaired,
            self.stats.purges,
            self.stats.bootstraps,
            self.stats.snapshots_put,
            self.stats.snapshots_copied,
            self.stats.snapshots_served,
            self.stats.readers_from_snapshot
        )
    }
}

/// A broken promise, with the seed that replays it and the events that led to it.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub at_ms: u64,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} failed at {:.3} s of simulated time (replay: cargo run -p sim -- --seed {}):",
            self.seed,
            self.at_ms as f64 / 1000.0,
            self.seed
        )?;
        for v in &self.violations {
            writeln!(f, "  - {v}")?;
        }
        writeln!(f, "the last {} events of the trace:", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Fault {
    Partition,
    Full { node: usize },
    Lossy,
}

struct Sim {
    w: World,
    seed: u64,
    nodes: Vec<Option<Node>>,
    incarnations: Vec<u64>,
    clocks: Vec<Clock>,
    clients: Vec<Client>,
    faults: BTreeMap<u64, Fault>,
    next_fault: u64,
    /// Bit rot draws from its own stream, so that a run without it is the run it always was.
    rot_rng: ChaCha8Rng,
    /// Retention too.
    retention_rng: ChaCha8Rng,
    events: u64,
    injected: u64,
    crashes: u64,
    logs_created: bool,
    /// Set at the end of the run: no more faults.
    ending: bool,
}

/// The records below the commit offset that retention keeps: a few minutes of the workload,
/// longer than a client resends an idempotent append (a node recognises a resend by the
/// original in its log, so retention must keep it for that long; docs/protocol.md, 5.2).
const RETAINED_RECORDS: u64 = 2_000;

/// Run one simulation.
pub fn run(seed: u64, cfg: &Config) -> Result<Report, Failure> {
    assert!((3..=7).contains(&cfg.nodes), "3 to 7 nodes");
    assert!(cfg.replicas <= cfg.nodes && cfg.replicas >= 2);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let clocks: Vec<Clock> = (0..cfg.nodes)
        .map(|_| Clock {
            offset_ms: 1_700_000_000_000 + rng.gen_range(0..10_000),
            rate: 1.0 + rng.gen_range(-cfg.drift..=cfg.drift),
        })
        .collect();
    let mut w = World::new(cfg.clone(), rng);
    let clients = (0..cfg.clients)
        .map(|i| Client::new(i, cfg.nodes + i))
        .collect();
    let mut sim = Sim {
        seed,
        nodes: Vec::new(),
        incarnations: vec![0; cfg.nodes],
        clocks,
        clients,
        faults: BTreeMap::new(),
        next_fault: 0,
        rot_rng: ChaCha8Rng::seed_from_u64(seed ^ 0xb17_2077_u64.rotate_left(32)),
        retention_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x7e7e_7110_u64.rotate_left(16)),
        events: 0,
        injected: 0,
        crashes: 0,
        logs_created: false,
        ending: false,
        w: {
            w.note(format_args!(
                "seed {seed}: {} nodes, {} logs on {} replicas, {} clients",
                cfg.nodes, cfg.logs, cfg.replicas, cfg.clients
            ));
            w
        },
    };
    for i in 0..cfg.nodes {
        let n = Node::start(&mut sim.w, i, 0, sim.clocks[i]);
        sim.nodes.push(Some(n));
    }
    for c in 0..cfg.clients {
        let at = 2_000_000 + sim.w.rng.gen_range(0..1_000_000);
        sim.w.at(at, Event::Client { client: c });
    }
    if cfg.faults {
        let first = sim.fault_gap();
        sim.w.after(first, Event::Fault);
        if cfg.bit_rot_every_ms > 0 {
            let first = sim.rot_gap();
            sim.w.after(first, Event::Rot);
        }
        if cfg.retention_every_ms > 0 {
            let first = sim.retention_gap();
            sim.w.after(first, Event::Retention);
        }
    }
    sim.run_until(cfg.duration_ms * 1000)?;
    sim.end()
}

impl Sim {
    fn fail(&self) -> Failure {
        Failure {
            seed: self.seed,
            at_ms: self.w.now / 1000,
            violations: self.w.checker.violations.clone(),
            trace: self.w.trace.lines().cloned().collect(),
        }
    }

    fn check(&self) -> Result<(), Failure> {
        match self.w.checker.violations.is_empty() {
            true => Ok(()),
            false => Err(self.fail()),
        }
    }

    fn fault_gap(&mut self) -> u64 {
        // Exponential gaps around the mean.
        let u: f64 = self.w.rng.gen_range(0.0001..1.0);
        (-u.ln() * self.w.cfg.fault_every_ms as f64 * 1000.0) as u64
    }

    /// Run events until `until` (us).
    fn run_until(&mut self, until: u64) -> Result<(), Failure> {
        while self.w.peek_time().is_some_and(|t| t <= until) {
            let Some(ev) = self.w.next_event() else { break };
            self.events += 1;
            self.dispatch(ev);
            self.check()?;
            if !self.logs_created && self.events % 64 == 0 {
                self.create_logs();
            }
        }
        self.w.now = self.w.now.max(until);
        Ok(())
    }

    /// Once the cluster has formed, register the logs (their first leader proposes them, as
    /// a configured leader does).
    fn create_logs(&mut self) {
        let cfg = self.w.cfg.clone();
        let formed = self
            .nodes
            .iter()
            .flatten()
            .find(|n| !n.ctl.meta().cluster_id.is_empty());
        let Some(meta) = formed.map(|n| n.ctl.meta().clone()) else {
            return;
        };
        if meta.logs.len() == cfg.logs {
            self.logs_created = true;
            return;
        }
        for i in 0..cfg.logs {
            let name = format!("l{i}");
            if meta.logs.contains_key(&name) {
                continue;
            }
            let replicas: Vec<String> = (0..cfg.replicas)
                .map(|k| node_id((i + k) % cfg.nodes))
                .collect();
            let leader = replicas[0].clone();
            // Its first leader creates it (a client's `create`), then registers it.
            self.w.disks[node_idx(&leader)]
                .logs
                .entry(name.clone())
                .or_default();
            let cmd = Command::CreateLog {
                name,
                replicas,
                leader: leader.clone(),
                policy: Policy::SyncSet,
                epoch: 1,
                start: 0,
            };
            if let Some(n) = self.nodes[node_idx(&leader)].as_mut() {
                n.propose(&mut self.w, cmd);
            }
        }
    }

    fn dispatch(&mut self, ev: Event) {
        let nodes = self.w.cfg.nodes;
        match ev {
            Event::Deliver {
                from,
                to,
                generation,
                ordered,
                msg,
            } => {
                if !self.w.net.delivers(from, to, generation, ordered) {
                    return;
                }
                if to < nodes {
                    match self.nodes[to].as_mut() {
                        Some(n) => n.receive(&mut self.w, from, msg),
                        // Nobody there: a connection attempt times out.
                        None if ordered => self.w.send_failed(from, to),
                        None => {}
                    }
                } else if let (Msg::Reply { id, rep }, Some(c)) =
                    (msg, self.clients.get_mut(to - nodes))
                {
                    c.reply(&mut self.w, from, id, rep);
                }
            }
            Event::Tick { node, incarnation } => {
                if let Some(n) = self.nodes[node]
                    .as_mut()
                    .filter(|n| n.incarnation == incarnation)
                {
                    n.tick(&mut self.w);
                }
            }
            Event::Fsync {
                node,
                incarnation,
                log,
                written,
            } => {
                if let Some(n) = self.nodes[node]
                    .as_mut()
                    .filter(|n| n.incarnation == incarnation)
                {
                    n.fsync_done(&mut self.w, &log, written);
                }
            }
            Event::SnapshotWritten {
                node,
                incarnation,
                log,
                offset,
                state,
                reply,
            } => {
                if let Some(n) = self.nodes[node]
                    .as_mut()
                    .filter(|n| n.incarnation == incarnation)
                {
                    n.snapshot_written(&mut self.w, &log, offset, state, reply);
                }
            }
            Event::SendFailed { at, peer } => {
                let since = self.w.net.take_failed(at, peer).unwrap_or(0);
                if at < nodes {
                    if let Some(n) = self.nodes[at].as_mut() {
                        n.conn_down(&mut self.w, peer, since);
                    }
                }
            }
            Event::ConnDown { at, peer, since } => {
                if at < nodes {
                    if let Some(n) = self.nodes[at].as_mut() {
                        n.conn_down(&mut self.w, peer, since);
                    }
                }
            }
            Event::Restart { node } => self.restart(node),
            Event::Client { client } => self.clients[client].wake(&mut self.w),
            Event::ClientDeadline { client, id } => self.clients[client].deadline(&mut self.w, id),
            Event::Fault if self.ending => {}
            Event::Fault => {
                self.inject();
                let gap = self.fault_gap();
                self.w.after(gap, Event::Fault);
            }
            Event::Heal { id } => self.heal(id),
            Event::Retention if self.ending => {}
            Event::Retention => {
                self.retention();
                let gap = self.retention_gap();
                self.w.after(gap, Event::Retention);
            }
            Event::Rot if self.ending => {}
            Event::Rot => {
                self.rot();
                let gap = self.rot_gap();
                self.w.after(gap, Event::Rot);
            }
        }
    }

    fn retention_gap(&mut self) -> u64 {
        let u: f64 = self.retention_rng.gen_range(0.0001..1.0);
        (-u.ln() * self.w.cfg.retention_every_ms as f64 * 1000.0) as u64
    }

    /// Retention: every replica of one log removes the batches below the highest batch
    /// boundary that all of them hold durably and alike, [`RETAINED_RECORDS`] below the commit
    /// offset (as a node's retention removes whole old segments its followers no longer need),
    /// and not past any replica's latest application snapshot (each keeps the records after
    /// it). A replica wiped since then finds the leader's log starting there, and bootstraps.
    fn retention(&mut self) {
        let log = format!("l{}", self.retention_rng.gen_range(0..self.w.cfg.logs));
        let holders: Vec<usize> = (0..self.w.cfg.nodes)
            .filter(|n| self.w.disks[*n].logs.contains_key(&log))
            .collect();
        // Each replica keeps every record from its latest application snapshot on.
        let cap = holders
            .iter()
            .filter_map(|n| {
                let latest = self.w.disks[*n].snapshots.get(&log).map(|s| s.0);
                Snapshots::new(latest).pin()
            })
            .fold(
                self.w.checker.commit(&log).saturating_sub(RETAINED_RECORDS),
                u64::min,
            );
        let Some(first) = holders.first() else {
            return;
        };
        // The end of the batches every replica holds durably and alike (a replica may still
        // hold a divergent suffix that a deposed leader wrote), at or below the commit offset.
        let logs: Vec<&SimLog> = holders
            .iter()
            .map(|n| &self.w.disks[*n].logs[&log])
            .collect();
        let floor = logs[0]
            .durable_batches()
            .iter()
            .take_while(|b| b.next() <= cap && logs.iter().all(|l| l.holds(b)))
            .last()
            .map_or(self.w.disks[*first].logs[&log].start(), Batch::next);
        if holders
            .iter()
            .all(|n| self.w.disks[*n].logs[&log].start() >= floor)
        {
            return;
        }
        let removed: Vec<(usize, Vec<Batch>)> = holders
            .iter()
            .map(|n| {
                let l = self.w.disks[*n].logs.get_mut(&log).expect("a holder");
                (*n, l.purge(floor))
            })
            .collect();
        self.w.checker.purged(&log, floor, &removed);
        for n in holders {
            let latest = self.w.disks[n].snapshots.get(&log).map(|s| s.0);
            let start = self.w.disks[n].logs[&log].start();
            self.w
                .checker
                .reaches(n, &log, start, latest, "after retention");
        }
        self.w.note(format_args!(
            "RETENTION {log}: every replica starts at {floor} now"
        ));
    }

    fn rot_gap(&mut self) -> u64 {
        let u: f64 = self.rot_rng.gen_range(0.0001..1.0);
        (-u.ln() * self.w.cfg.bit_rot_every_ms as f64 * 1000.0) as u64
    }

    /// Bit rot: one durable batch of one replica is damaged at rest, one that another replica
    /// holds soundly and durably (copies fail independently; one that fails everywhere is
    /// lost, and no system promises otherwise).
    fn rot(&mut self) {
        let node = self.rot_rng.gen_range(0..self.w.cfg.nodes);
        let log = format!("l{}", self.rot_rng.gen_range(0..self.w.cfg.logs));
        let Some(batches) = self.w.disks[node]
            .logs
            .get(&log)
            .map(|l| l.batches().to_vec())
        else {
            return;
        };
        if batches.is_empty() {
            return;
        }
        let b = &batches[self.rot_rng.gen_range(0..batches.len())];
        let elsewhere = (0..self.w.cfg.nodes).filter(|n| *n != node).any(|n| {
            self.w.disks[n]
                .logs
                .get(&log)
                .is_some_and(|other| other.sound(b))
        });
        let damaged_elsewhere = (0..self.w.cfg.nodes).any(|n| {
            self.w.disks[n]
                .logs
                .get(&log)
                .is_some_and(|other| other.rotten_in(b.base, b.next()).is_some())
        });
        if !elsewhere || damaged_elsewhere {
            return;
        }
        let (base, next) = (b.base, b.next());
        if self.w.disks[node]
            .logs
            .get_mut(&log)
            .is_some_and(|l| l.rot(base))
        {
            self.w.checker.stats.rotted += 1;
            self.w
                .note(format_args!("BIT ROT n{node} {log} {base}..{next}"));
        }
    }

    /// Tell both ends of every connection of `node` that it died (after the idle timeout).
    fn connections_die(&mut self, node: usize) {
        let endpoints = self.w.cfg.nodes + self.w.cfg.clients;
        let detect = self.w.net.detect_us;
        for other in (0..endpoints).filter(|e| *e != node) {
            self.w.net.break_connection(node, other);
            self.w.after(
                detect,
                Event::ConnDown {
                    at: other,
                    peer: node,
                    since: self.w.now,
                },
            );
            self.w.after(
                detect,
                Event::ConnDown {
                    at: node,
                    peer: other,
                    since: self.w.now,
                },
            );
        }
    }

    fn crash(&mut self, node: usize, wipe: bool) {
        if self.nodes[node].take().is_none() {
            return;
        }
        self.crashes += 1;
        let rng = &mut self.w.rng;
        let mut lost = 0;
        for log in self.w.disks[node].logs.values_mut() {
            let unsynced = log.batches().len()
                - log
                    .batches()
                    .iter()
                    .filter(|b| b.next() <= log.durable_end())
                    .count();
            let survivors = rng.gen_range(0..=unsynced);
            lost += unsynced - survivors;
            log.crash(survivors);
        }
        if wipe {
            self.w.disks[node].logs.clear();
            self.w.disks[node].snapshots.clear();
            self.w.checker.wiped(node, self.w.now);
        }
        self.w.note(format_args!(
            "CRASH n{node}{} ({lost} unsynced batches lost)",
            if wipe { ", its logs wiped" } else { "" }
        ));
        self.connections_die(node);
    }

    fn restart(&mut self, node: usize) {
        if self.nodes[node].is_some() {
            return;
        }
        self.incarnations[node] += 1;
        self.w.note(format_args!("restart n{node}"));
        let n = Node::start(
            &mut self.w,
            node,
            self.incarnations[node],
            self.clocks[node],
        );
        self.nodes[node] = Some(n);
    }

    /// The node leading a random log by the record, if it is up.
    fn some_leader(&mut self) -> Option<usize> {
        let log = format!("l{}", self.w.rng.gen_range(0..self.w.cfg.logs));
        let meta = self
            .nodes
            .iter()
            .flatten()
            .map(|n| n.ctl.meta())
            .max_by_key(|m| m.logs.len())?;
        let leader = meta.logs.get(&log)?.leader.as_deref().map(node_idx)?;
        self.nodes[leader].is_some().then_some(leader)
    }

    /// Whether wiping `node`'s logs leaves every log it holds with another replica the
    /// controller may elect (the leader, or a member of the sync set). Wiping the only one is
    /// data loss that only an operator's unclean failover gets past (docs/operating.md), so
    /// the simulator does not do it.
    fn may_wipe(&self, node: usize) -> bool {
        let id = node_id(node);
        self.records().values().all(|r| {
            if !r.replicas.contains(&id) {
                return true;
            }
            let leader_ok = r.leader.as_ref().is_some_and(|l| *l != id);
            let member_ok = r.sync_set.iter().any(|m| *m != id);
            leader_ok && member_ok
        })
    }

    fn partition_active(&self) -> bool {
        self.faults.values().any(|f| matches!(f, Fault::Partition))
    }

    /// Inject a fault (at most two at once).
    fn inject(&mut self) {
        if self.faults.len() >= 2 {
            return;
        }
        let n = self.w.cfg.nodes;
        let endpoints = n + self.w.cfg.clients;
        self.next_fault += 1;
        let id = self.next_fault;
        let roll = self.w.rng.gen_range(0..100);
        let heal_in = |w: &mut World, lo: u64, hi: u64| w.rng.gen_range(lo..hi) * 1000;
        let fault = match roll {
            0..=29 => {
                let node = match self.some_leader() {
                    Some(l) if self.w.rng.gen_bool(0.6) => l,
                    _ => self.w.rng.gen_range(0..n),
                };
                if self.nodes[node].is_none() {
                    return;
                }
                let wipe = self.w.rng.gen_bool(0.1) && self.may_wipe(node);
                self.crash(node, wipe);
                let back = heal_in(&mut self.w, 500, 10_000);
                self.w.after(back, Event::Restart { node });
                return self.injected += 1;
            }
            30..=59 if !self.partition_active() => {
                let target = match self.some_leader() {
                    Some(l) if self.w.rng.gen_bool(0.6) => l,
                    _ => self.w.rng.gen_range(0..n),
                };
                let mut cut = Vec::new();
                let kind = self.w.rng.gen_range(0..4);
                match kind {
                    // Cut off from every other node, clients included.
                    0 => {
                        for e in (0..endpoints).filter(|e| *e != target) {
                            cut.push((target, e));
                            cut.push((e, target));
                        }
                    }
                    // One way: it hears nobody, or nobody hears it.
                    1 | 2 => {
                        for e in (0..n).filter(|e| *e != target) {
                            cut.push(if kind == 1 { (e, target) } else { (target, e) });
                        }
                    }
                    // Cut off from the other nodes (the controller's majority), while clients
                    // still reach it.
                    _ => {
                        for e in (0..n).filter(|e| *e != target) {
                            cut.push((target, e));
                            cut.push((e, target));
                        }
                    }
                }
                let how = ["isolated", "deaf", "mute", "cut off from the nodes"][kind];
                self.w.note(format_args!("PARTITION n{target} {how}"));
                let detect = self.w.net.detect_us;
                for (a, b) in cut {
                    if self.w.net.block(a, b) {
                        self.w.after(
                            detect,
                            Event::ConnDown {
                                at: a,
                                peer: b,
                                since: self.w.now,
                            },
                        );
                        self.w.after(
                            detect,
                            Event::ConnDown {
                                at: b,
                                peer: a,
                                since: self.w.now,
                            },
                        );
                    }
                }
                let heal = heal_in(&mut self.w, 1_000, 15_000);
                self.w.after(heal, Event::Heal { id });
                Fault::Partition
            }
            60..=74 => {
                let Some(leader) = self.some_leader() else {
                    return;
                };
                let log = format!("l{}", self.w.rng.gen_range(0..self.w.cfg.logs));
                if let Some(node) = self.nodes[leader].as_mut() {
                    node.begin_transfer(&mut self.w, &log);
                }
                return self.injected += 1;
            }
            75..=82 => {
                let node = self.w.rng.gen_range(0..n);
                self.w
                    .note(format_args!("DISK FULL n{node} (controller storage)"));
                self.w.disks[node].raft.borrow_mut().full = true;
                let heal = heal_in(&mut self.w, 2_000, 20_000);
                self.w.after(heal, Event::Heal { id });
                Fault::Full { node }
            }
            83..=87 => {
                // An fdatasync fails: the node stops (and restarts), as a failed fsync
                // cannot be retried safely.
                let node = self.w.rng.gen_range(0..n);
                if self.nodes[node].is_none() {
                    return;
                }
                self.w.note(format_args!("FSYNC FAILED n{node}"));
                self.crash(node, false);
                let back = heal_in(&mut self.w, 500, 5_000);
                self.w.after(back, Event::Restart { node });
                return self.injected += 1;
            }
            88..=99 if !self.faults.values().any(|f| matches!(f, Fault::Lossy)) => {
                self.w
                    .note("LOSSY network: controller frames lost and duplicated");
                self.w.net.loss = 0.2;
                self.w.net.duplicate = 0.1;
                let heal = heal_in(&mut self.w, 1_000, 10_000);
                self.w.after(heal, Event::Heal { id });
                Fault::Lossy
            }
            _ => return,
        };
        self.injected += 1;
        self.faults.insert(id, fault);
    }

    fn heal(&mut self, id: u64) {
        let Some(f) = self.faults.remove(&id) else {
            return;
        };
        self.w.note(format_args!("heal {f:?}"));
        match f {
            Fault::Partition => self.w.net.unblock_all(),
            Fault::Full { node } => self.w.disks[node].raft.borrow_mut().full = false,
            Fault::Lossy => {
                self.w.net.loss = 0.0;
                self.w.net.duplicate = 0.0;
            }
        }
    }

    /// The controller's record of every log, by the node that has applied the most.
    fn records(&self) -> BTreeMap<String, LogRecord> {
        self.nodes
            .iter()
            .flatten()
            .max_by_key(|n| n.ctl.applied())
            .map(|n| {
                n.ctl
                    .meta()
                    .logs
                    .iter()
                    .map(|(k, l)| (k.clone(), LogRecord::of(l)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Heal everything, then check liveness and the final logs.
    fn end(mut self) -> Result<Report, Failure> {
        self.w.note("END: every fault heals; clients stop");
        self.ending = true;
        for c in &mut self.clients {
            c.stopped = true;
        }
        let ids: Vec<u64> = self.faults.keys().copied().collect();
        for id in ids {
            self.heal(id);
        }
        self.w.net.unblock_all();
        for node in 0..self.w.cfg.nodes {
            self.restart(node);
        }
        let settle = self.w.now + SETTLE_MS * 1000;
        self.run_until(settle)?;
        // Every log has a leader, leading in the recorded epoch.
        let records = self.records();
        let mut leaders = BTreeMap::new();
        for i in 0..self.w.cfg.logs {
            let name = format!("l{i}");
            let leader = records.get(&name).and_then(|r| {
                let l = node_idx(r.leader.as_deref()?);
                let n = self.nodes[l].as_ref()?;
                (n.leading(&name) == Some(r.epoch)).then_some(l)
            });
            match leader {
                Some(l) => {
                    leaders.insert(name, l);
                }
                None => {
                    self.w.checker.violations.push(format!(
                        "{name} has no leader {} s after every fault healed (record: {:?})",
                        SETTLE_MS / 1000,
                        records.get(&name)
                    ));
                    return Err(self.fail());
                }
            }
        }
        // An acks=sync append succeeds at the first attempt, after a long idle period.
        let probe = self.w.cfg.nodes + self.w.cfg.clients;
        for (name, leader) in &leaders {
            let id = 0x9000_0000_0000_0000 | self.w.rng.gen::<u32>() as u64;
            let records: std::rc::Rc<[u64]> = vec![id].into();
            self.w.send(
                probe,
                *leader,
                Msg::Request {
                    id,
                    req: Req::Append {
                        log: name.clone(),
                        records,
                        acks: Acks::Sync,
                        producer: None,
                        expected: None,
                    },
                },
            );
            let answer = self.await_reply(probe, id)?;
            match answer {
                Some(Rep::Receipt {
                    degraded: false,
                    first,
                    next,
                    epoch,
                    level,
                    ..
                }) => {
                    self.w
                        .checker
                        .acked(name, first, next, epoch, &[id], Acks::Sync, level, false);
                }
                other => {
                    self.w.checker.violations.push(format!(
                        "an acks=sync append to {name} on its leader n{leader} after every fault healed and a long idle period did not succeed at the first attempt: {other:?}"
                    ));
                    return Err(self.fail());
                }
            }
        }
        // Replication converges.
        let converge = self.w.now + 10_000_000;
        self.run_until(converge)?;
        let mut finals = BTreeMap::new();
        for (name, leader) in &leaders {
            let record = &records[name];
            // A batch still damaged holds nothing readable: it counts as missing.
            let batches = |n: usize| -> Vec<Batch> {
                self.w.disks[n]
                    .logs
                    .get(name)
                    .map(|l| {
                        let rotten: Vec<u64> = l.rotten().iter().map(|r| r.0).collect();
                        l.batches()
                            .iter()
                            .filter(|b| !rotten.contains(&b.base))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let others = record
                .replicas
                .iter()
                .map(|r| node_idx(r))
                .filter(|r| r != leader)
                .map(|r| (r, batches(r)))
                .collect();
            finals.insert(name.clone(), (batches(*leader), others));
        }
        // Each replica's log start and latest application snapshot, the leader's first.
        let mut snapshots = BTreeMap::new();
        for (name, leader) in &leaders {
            let replicas = std::iter::once(*leader).chain(
                records[name]
                    .replicas
                    .iter()
                    .map(|r| node_idx(r))
                    .filter(|r| r != leader),
            );
            let held = replicas
                .map(|n| {
                    let disk = &self.w.disks[n];
                    let start = disk.logs.get(name).map_or(0, |l| l.start());
                    (n, start, disk.snapshots.get(name).copied())
                })
                .collect();
            snapshots.insert(name.clone(), held);
        }
        self.w.checker.finish(&finals, &snapshots);
        self.check()?;
        Ok(Report {
            seed: self.seed,
            simulated_ms: self.w.now / 1000,
            events: self.events,
            faults: self.injected,
            crashes: self.crashes,
            stats: self.w.checker.stats.clone(),
        })
    }

    /// Run until endpoint `probe` (outside the clients) gets the reply to `id`, or 20 s pass.
    fn await_reply(&mut self, probe: usize, id: u64) -> Result<Option<Rep>, Failure> {
        let until = self.w.now + 20_000_000;
        while let Some(t) = self.w.peek_time() {
            if t > until {
                break;
            }
            let ev = self.w.next_event().expect("peeked");
            self.events += 1;
            if let Event::Deliver {
                to,
                msg: Msg::Reply { id: got, ref rep },
                ..
            } = ev
            {
                if to == probe && got == id {
                    return Ok(Some(rep.clone()));
                }
            }
            self.dispatch(ev);
            self.check()?;
        }
        Ok(None)
    }
}
