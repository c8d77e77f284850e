//! One simulated node: the node core's controller (`ControllerCore`) and each log's leader or
//! follower rules (`node_core::log`, `protocol::replication`, `protocol::idempotence`), driven
//! over the simulated network and disk as the server drives them over QUIC and io_uring.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use node_core::controller::core::{ControllerCore, CoreConfig};
use node_core::controller::failover::{FailoverConfig, LogReport, NodeReport};
use node_core::controller::meta::{Command, Member, NodeId};
use node_core::follow::{Command as SessionCommand, Local, Phase, Session};
use node_core::log::{
    confirm, may_write, must_withdraw, LeaderAction, LeaderRules, LevelRefusal, LocalCopy,
    LogRecord, Outbound, Outgoing, Role, Steer, Steering, StreamRefusal,
};
use node_core::snapshot::{SnapshotRefusal, Snapshots};
use protocol::idempotence::{Admission, ProducerTable, StoredAppend};
use protocol::replication::{FrameHead, Insufficient, Leader, Progress, ReplicationConfig};
use protocol::{Acks, ErrorCode};
use rand::Rng;

use crate::disk::{Batch, SimRaftStore};
use crate::msg::{Msg, Rep, Req};
use crate::world::{Event, World};

/// Producers remembered per log, as the server's default.
const PRODUCERS_MAX: usize = 1000;
/// The longest answer to a read, in records.
const READ_RECORDS_MAX: u64 = 64;
/// The scrub looks for damaged batches every this many ticks.
const SCRUB_EVERY_TICKS: u64 = 20;
/// A follower asks its leader for its latest application snapshot every this many ticks (the
/// server's follower lists its leader's logs every 250 ms).
const SNAPSHOT_ASK_EVERY_TICKS: u64 = 3;

/// A node's id for the controller.
pub fn node_id(idx: usize) -> NodeId {
    format!("n{idx}")
}

/// A node's index from its id.
pub fn node_idx(id: &str) -> usize {
    id[1..].parse().expect("node ids are n<index>")
}

/// A node's clock: it runs at `rate` (within the configured drift of 1) from `offset_ms`.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub offset_ms: u64,
    pub rate: f64,
}

impl Clock {
    pub fn ms(&self, now_us: u64) -> u64 {
        self.offset_ms + (now_us as f64 * self.rate / 1000.0) as u64
    }

    /// Simulated time (us) for `ms` of this clock to pass.
    pub fn us_for(&self, ms: u64) -> u64 {
        (ms as f64 * 1000.0 / self.rate) as u64
    }
}

/// An append waiting for its level.
#[derive(Debug)]
struct Waiting {
    client: usize,
    id: u64,
    acks: Acks,
    records: Rc<[u64]>,
    stored: StoredAppend,
    duplicate: bool,
    deadline_ms: u64,
    /// When it was taken (us).
    since: u64,
}

/// A follower's replication stream, as its leader serves it.
#[derive(Debug)]
struct Stream {
    session: u64,
    /// When it began (us).
    since: u64,
    /// What goes out next (the node core's).
    out: Outbound,
}

struct Leading {
    epoch: u64,
    repl: Leader,
    rules: LeaderRules,
    producers: ProducerTable,
    waiting: Vec<Waiting>,
    streams: BTreeMap<usize, Stream>,
}

struct Following {
    leader: Option<usize>,
    /// The current (or last) session's id: the leader's answers and frames carry it.
    id: u64,
    /// The current session (the node core's), or none: the next begins at `retry_ms`.
    session: Option<Session>,
    retry_ms: u64,
    /// The highest leader epoch the last session saw (for the controller's reports).
    epoch: u64,
    /// The copy is recovering and must withdraw first: no session until it is on record.
    withdrawing: bool,
    /// When the current session began (us).
    since: u64,
}

impl Following {
    /// The session `id`, if it is the current one and in `phase`.
    fn current(&mut self, id: u64, phase: fn(Phase) -> bool) -> Option<&mut Session> {
        self.session
            .as_mut()
            .filter(|s| self.id == id && phase(s.phase()))
    }

    /// End the current session; the next begins at `retry_ms`.
    fn end(&mut self, retry_ms: u64) {
        if let Some(s) = self.session.take() {
            self.epoch = s.epoch();
        }
        self.retry_ms = retry_ms;
    }
}

/// The local copy, as a follower session sees it.
fn local(log: &crate::disk::SimLog) -> Local {
    Local {
        start: log.start(),
        end: log.end(),
        durable: log.durable_end(),
        last_epoch: log.last_epoch(),
    }
}

enum RoleState {
    Leading(Box<Leading>),
    Following(Following),
}

struct LogState {
    role: RoleState,
    /// The leader's commit offset as frames brought it (kept across sessions).
    leader_commit: u64,
    fsync_in_flight: bool,
    /// The latest application snapshot stored here (the node core's rules).
    snapshots: Snapshots,
}

/// One node.
pub struct Node {
    pub idx: usize,
    pub incarnation: u64,
    pub clock: Clock,
    id: NodeId,
    pub ctl: ControllerCore<SimRaftStore>,
    logs: BTreeMap<String, LogState>,
    /// Roles and requests to the controller by its record (renewals, withdrawals).
    steering: Steering,
    next_session: u64,
    ticks: u64,
}

impl Node {
    /// Start node `idx` from what its disk holds.
    pub fn start(w: &mut World, idx: usize, incarnation: u64, clock: Clock) -> Node {
        let cfg = &w.cfg;
        let members: BTreeMap<NodeId, Member> = (0..cfg.nodes)
            .map(|i| {
                (
                    node_id(i),
                    Member {
                        raft_id: i as u64 + 1,
                        addr: format!("sim:{i}"),
                    },
                )
            })
            .collect();
        let voters: Vec<u64> = (1..=cfg.nodes as u64).collect();
        let store = SimRaftStore::open(w.disks[idx].raft.clone(), &voters);
        // A fixed election timeout per node start (raft-rs draws from [min, max)): the run
        // stays a function of its seed.
        let election = w.rng.gen_range(10..20);
        let core = ControllerCore::new(
            CoreConfig {
                node_id: node_id(idx),
                members,
                failover: Some(FailoverConfig {
                    leader_timeout: Duration::from_millis(cfg.leader_timeout_ms),
                    unclean: false,
                }),
                election_ticks: (election, election + 1),
                cluster_id: format!("{:016x}", w.rng.gen::<u64>()),
            },
            store,
            clock.ms(w.now),
        )
        .expect("the controller starts");
        let tick_us = clock.us_for(cfg.tick_ms);
        let phase = w.rng.gen_range(0..tick_us);
        w.after(
            phase,
            Event::Tick {
                node: idx,
                incarnation,
            },
        );
        Node {
            idx,
            incarnation,
            clock,
            id: node_id(idx),
            ctl: core,
            logs: BTreeMap::new(),
            steering: Steering::default(),
            next_session: 0,
            ticks: 0,
        }
    }

    fn now_ms(&self, w: &World) -> u64 {
        self.clock.ms(w.now)
    }

    fn lease_ok(&self, w: &World) -> bool {
        self.ctl.lease_ok(
            self.now_ms(w),
            Duration::from_millis(w.cfg.leader_timeout_ms),
        )
    }

    fn record(&self, log: &str) -> Option<LogRecord> {
        self.ctl.meta().logs.get(log).map(LogRecord::of)
    }

    /// Whether this node leads `log` now, and in which epoch.
    pub fn leading(&self, log: &str) -> Option<u64> {
        match &self.logs.get(log)?.role {
            RoleState::Leading(l) => Some(l.epoch),
            RoleState::Following(_) => None,
        }
    }

    /// Queue the controller's frames and note what it applied.
    fn flush_controller(&mut self, w: &mut World) {
        let now = self.now_ms(w);
        let _ = self.ctl.process(now);
        for (to, frame) in self.ctl.take_outbox() {
            w.send(self.idx, node_idx(&to), Msg::Control(frame.into()));
        }
        self.ctl.take_outcomes();
        if self.ctl.take_changed() {
            for news in w.checker.saw_meta(w.now, self.ctl.meta()) {
                w.note(news);
            }
        }
    }

    /// The periodic tick.
    pub fn tick(&mut self, w: &mut World) {
        let now = self.now_ms(w);
        self.ticks += 1;
        self.ctl.tick(now);
        if self.ticks % 2 == 0 {
            let report = self.report(w);
            self.ctl.report(now, report);
        }
        self.steer(w);
        let names: Vec<String> = self.logs.keys().cloned().collect();
        for name in names {
            self.leader_tick(w, &name);
            self.follower_tick(w, &name);
        }
        if w.cfg.scrub && self.ticks % SCRUB_EVERY_TICKS == 0 {
            self.scrub(w);
        }
        self.flush_controller(w);
        let next = self.clock.us_for(w.cfg.tick_ms);
        w.after(
            next,
            Event::Tick {
                node: self.idx,
                incarnation: self.incarnation,
            },
        );
    }

    /// The scrub: every damaged batch of this node's logs is asked for from another replica
    /// (each in turn, one per pass), and replaced by its sound copy when that comes.
    fn scrub(&mut self, w: &mut World) {
        let pass = (self.ticks / SCRUB_EVERY_TICKS) as usize;
        let names: Vec<String> = self.logs.keys().cloned().collect();
        for name in names {
            let Some(damaged) = w.disks[self.idx].logs.get(&name).map(|l| l.rotten()) else {
                continue;
            };
            let peers: Vec<usize> = self
                .record(&name)
                .map(|r| {
                    r.replicas
                        .iter()
                        .filter(|n| **n != self.id)
                        .map(|n| node_idx(n))
                        .collect()
                })
                .unwrap_or_default();
            if damaged.is_empty() || peers.is_empty() {
                continue;
            }
            let peer = peers[pass % peers.len()];
            for (from, until, epoch) in damaged {
                w.send(
                    self.idx,
                    peer,
                    Msg::RepairRead {
                        log: name.clone(),
                        from,
                        until,
                        epoch,
                    },
                );
            }
        }
    }

    fn report(&self, w: &World) -> NodeReport {
        let disk = &w.disks[self.idx];
        NodeReport {
            node: self.id.clone(),
            logs: self
                .logs
                .iter()
                .map(|(name, st)| {
                    let log = &disk.logs[name];
                    let (epoch, commit) = match &st.role {
                        RoleState::Leading(l) => (l.epoch, l.repl.commit_offset()),
                        RoleState::Following(f) => (
                            f.session.as_ref().map_or(f.epoch, Session::epoch),
                            st.leader_commit,
                        ),
                    };
                    LogReport {
                        log: name.clone(),
                        epoch,
                        last_epoch: log.last_epoch().unwrap_or(0),
                        end: log.end(),
                        commit,
                        recovering: log.recovering,
                    }
                })
                .collect(),
            heard_ms: BTreeMap::new(),
            sent_ms: 0,
            storage: None,
        }
    }

    /// Put each log in the role the controller has on record for it here (creating the logs
    /// the record has for this node), and ask for new epochs where this node may not lead in
    /// the recorded one.
    fn steer(&mut self, w: &mut World) {
        let now = self.now_ms(w);
        let records: Vec<(String, LogRecord)> = self
            .ctl
            .meta()
            .logs
            .iter()
            .filter(|(_, l)| l.replicas.contains(&self.id))
            .map(|(n, l)| (n.clone(), LogRecord::of(l)))
            .collect();
        for (name, record) in records {
            // A copy created here, where the node should have held the log, is recovering.
            let log = w.disks[self.idx]
                .logs
                .entry(name.clone())
                .or_insert_with(crate::disk::SimLog::afresh);
            let copy = LocalCopy {
                last_epoch: log.last_epoch().unwrap_or(0),
                end: log.end(),
                leading_in: self.leading(&name),
                recovering: log.recovering,
            };
            let Steer {
                role,
                withdrawing,
                propose,
            } = self.steering.steer(&name, &self.id, &record, copy, now);
            for cmd in propose {
                if let Command::Withdraw { .. } = cmd {
                    w.note(format_args!(
                        "{} withdraws from {name}: its copy is recovering",
                        self.id
                    ));
                }
                let _ = self.ctl.propose(cmd);
            }
            if let Some(f) = following_state(&mut self.logs, &name) {
                f.withdrawing = withdrawing;
            }
            let in_role = match (&role, self.logs.get(&name).map(|s| &s.role)) {
                (Role::Lead(e), Some(RoleState::Leading(l))) => l.epoch == *e,
                (Role::Follow(to), Some(RoleState::Following(f))) => {
                    f.leader == to.as_deref().map(node_idx)
                }
                _ => false,
            };
            if !in_role {
                self.install(w, &name, &record, role);
            }
        }
    }

    /// Take `log` out of its old role (a deposed leader's waiting appends answer that their
    /// outcome is unknown) and into `role`.
    fn install(&mut self, w: &mut World, name: &str, record: &LogRecord, role: Role) {
        let now = self.now_ms(w);
        let old = self.logs.remove(name);
        let (leader_commit, fsync_in_flight, snapshots) = match &old {
            Some(s) => (s.leader_commit, s.fsync_in_flight, s.snapshots),
            None => {
                let latest = w.disks[self.idx].snapshots.get(name).map(|s| s.0);
                (0, false, Snapshots::new(latest))
            }
        };
        if let Some(LogState {
            role: RoleState::Leading(l),
            ..
        }) = old
        {
            for wt in l.waiting {
                self.reply(w, wt.client, wt.id, error(ErrorCode::Timeout));
            }
            // The old role's replication streams end with it (the server resets them).
            for (f, stream) in l.streams {
                let msg = Msg::Refused {
                    log: name.to_string(),
                    session: stream.session,
                };
                w.send(self.idx, f, msg);
            }
        }
        if let Role::Follow(leader) = &role {
            w.note(format_args!("{} follows {leader:?} for {name}", self.id));
        }
        if let Role::Lead(epoch) = role {
            // Durably, before any batch of it: after a restart, this node asks for a new one.
            w.disks[self.idx]
                .logs
                .get_mut(name)
                .expect("steered logs exist")
                .begin_epoch(epoch);
        }
        let log = &w.disks[self.idx].logs[name];
        let role_state = match role {
            Role::Lead(epoch) => {
                let cfg = &w.cfg;
                let policy = ReplicationConfig {
                    sync_replicas: cfg.sync_replicas.min(record.replicas.len() - 1),
                    sync_lag_records_max: 10_000,
                    sync_lag_ms_max: cfg.sync_lag_ms_max,
                    insufficient: Insufficient::Reject,
                };
                let (end, flushed) = (log.end(), log.durable_end());
                let mut repl = Leader::new(self.id.clone(), policy, end, flushed, 0);
                for f in record.replicas.iter().filter(|r| **r != self.id) {
                    repl.register(f, now);
                }
                repl.expect_controller();
                repl.flushed(flushed, now);
                // The producer table, rebuilt from the log.
                let mut producers = ProducerTable::new(PRODUCERS_MAX);
                for b in log.batches() {
                    if let Some((pid, seq)) = b.producer {
                        producers.record(
                            pid,
                            seq,
                            b.records.len() as u32,
                            StoredAppend {
                                first: b.base,
                                next: b.next(),
                                epoch: b.epoch,
                            },
                        );
                    }
                }
                w.note(format_args!(
                    "{} leads {name} in epoch {epoch} from {end}",
                    self.id
                ));
                let (now_us, idx) = (w.now, self.idx);
                w.checker.leads(now_us, idx, name, epoch, end);
                RoleState::Leading(Box::new(Leading {
                    epoch,
                    repl,
                    rules: LeaderRules::new(now),
                    producers,
                    waiting: Vec::new(),
                    streams: BTreeMap::new(),
                }))
            }
            Role::Follow(leader) => RoleState::Following(Following {
                leader: leader.as_deref().map(node_idx),
                id: 0,
                session: None,
                retry_ms: 0,
                epoch: log.last_epoch().unwrap_or(0),
                withdrawing: must_withdraw(&self.id, record, log.recovering),
                since: 0,
            }),
        };
        self.logs.insert(
            name.to_string(),
            LogState {
                role: role_state,
                leader_commit,
                fsync_in_flight,
                snapshots,
            },
        );
    }

    /// `not_leader`, naming the leader on record if it is another node.
    fn not_leader(&self, record: Option<&LogRecord>) -> Rep {
        let leader = record
            .and_then(|r| r.leader.as_deref())
            .filter(|l| *l != self.id)
            .map(node_idx);
        Rep::Error {
            code: ErrorCode::NotLeader,
            leader,
        }
    }

    fn reply(&self, w: &mut World, client: usize, id: u64, rep: Rep) {
        w.send(self.idx, client, Msg::Reply { id, rep });
    }

    /// Lag bounds, the controller's record, waiting appends' deadlines and lease.
    fn leader_tick(&mut self, w: &mut World, name: &str) {
        let now = self.now_ms(w);
        let record = self.record(name);
        let (end, flushed) = {
            let l = &w.disks[self.idx].logs[name];
            (l.end(), l.durable_end())
        };
        let me = self.id.clone();
        let Some(l) = leading_state(&mut self.logs, name) else {
            return;
        };
        l.repl.tick(now);
        let mut actions = Vec::new();
        if let Some(r) = &record {
            let (_, a) = l.rules.on_record(&me, &mut l.repl, r, end, flushed, now);
            actions = a;
        }
        for a in actions {
            if let LeaderAction::CompleteTransfer { to, end, .. } = &a {
                w.note(format_args!("{me} hands {name} over to {to} at {end}"));
            }
            let _ = self.ctl.propose(a.command(name));
        }
        self.settle(w, name);
        self.pump(w, name);
    }

    /// Start a replication session where this node follows a leader and has none.
    fn follower_tick(&mut self, w: &mut World, name: &str) {
        let now = self.now_ms(w);
        let Some(st) = self.logs.get_mut(name) else {
            return;
        };
        let RoleState::Following(f) = &mut st.role else {
            return;
        };
        if let (Some(leader), 0) = (f.leader, self.ticks % SNAPSHOT_ASK_EVERY_TICKS) {
            let log = name.to_string();
            w.send(self.idx, leader, Msg::SnapshotAsk { log });
        }
        let (Some(leader), None) = (f.leader, &f.session) else {
            return;
        };
        if now < f.retry_ms || f.withdrawing {
            return;
        }
        f.since = w.now;
        self.next_session += 1;
        f.id = (self.idx as u64) << 48 | self.next_session;
        let log = &w.disks[self.idx].logs[name];
        let (session, first) = Session::begin(local(log), st.leader_commit, log.recovering);
        f.session = Some(session);
        let msg = match first {
            SessionCommand::AskEpochEnd { epoch } => Msg::EpochEnd {
                log: name.to_string(),
                session: f.id,
                epoch,
            },
            SessionCommand::Replicate { from, durable, .. } => Msg::Replicate {
                log: name.to_string(),
                session: f.id,
                from,
                durable,
            },
            other => unreachable!("a session begins by asking: {other:?}"),
        };
        w.send(self.idx, leader, msg);
    }

    /// End the follower session of `name` (it starts again after a pause).
    fn end_session(&mut self, w: &World, name: &str) {
        let retry_ms = self.now_ms(w) + 200;
        if let Some(f) = following_state(&mut self.logs, name) {
            f.end(retry_ms);
        }
    }

    /// A message from endpoint `from`.
    pub fn receive(&mut self, w: &mut World, from: usize, msg: Msg) {
        match msg {
            Msg::Control(frame) => {
                let now = self.now_ms(w);
                self.ctl.receive(now, &node_id(from), &frame);
                self.flush_controller(w);
            }
            Msg::Request { id, req } => match req {
                Req::Append {
                    log,
                    records,
                    acks,
                    producer,
                    expected,
                } => self.append(w, from, id, &log, records, acks, producer, expected),
                Req::Read {
                    log,
                    from: at,
                    min_offset,
                } => self.read(w, from, id, &log, at, min_offset),
                Req::PutSnapshot { log, offset, state } => {
                    self.put_snapshot(w, from, id, &log, offset, state)
                }
                Req::GetSnapshot { log } => {
                    let rep = match (self.logs.get(&log), w.disks[self.idx].snapshots.get(&log)) {
                        (None, _) => error(ErrorCode::LogNotFound),
                        (Some(_), None) => error(ErrorCode::SnapshotNotFound),
                        (Some(_), Some(&(offset, state))) => {
                            w.checker.snapshot(self.idx, &log, offset, state, "served");
                            let start = w.disks[self.idx].logs.get(&log).map_or(0, |l| l.start());
                            w.checker
                                .reaches(self.idx, &log, start, Some(offset), "served");
                            Rep::Snapshot { offset, state }
                        }
                    };
                    self.reply(w, from, id, rep);
                }
            },
            Msg::Reply { .. } => {}
            Msg::EpochEnd {
                log,
                session,
                epoch,
            } => {
                let Some(l) = w.disks[self.idx].logs.get(&log) else {
                    return w.send(self.idx, from, Msg::Refused { log, session });
                };
                let (epoch, end) = l.epoch_end(epoch);
                w.send(
                    self.idx,
                    from,
                    Msg::EpochEndIs {
                        log,
                        session,
                        epoch,
                        end,
                    },
                );
            }
            Msg::EpochEndIs {
                log,
                session,
                epoch,
                end,
            } => self.epoch_end_is(w, &log, session, epoch, end),
            Msg::Replicate {
                log,
                session,
                from: at,
                durable,
            } => self.replicate(w, from, &log, session, at, durable),
            Msg::Replicated {
                log,
                session,
                epoch,
                commit,
                first,
                batches,
            } => self.replicated(w, &log, session, epoch, commit, first, batches),
            Msg::Ack {
                log,
                session,
                durable,
            } => {
                let now = self.now_ms(w);
                if let Some(l) = leading_state(&mut self.logs, &log) {
                    if let Some(s) = l.streams.get(&from).filter(|s| s.session == session) {
                        let durable = s.out.counted(durable);
                        l.repl.acked(&node_id(from), durable, now);
                        self.settle(w, &log);
                        self.pump(w, &log);
                    }
                }
            }
            Msg::RepairRead {
                log,
                from: at,
                until,
                epoch,
            } => {
                let Some(l) = w.disks[self.idx].logs.get(&log) else {
                    return;
                };
                if let [b] = &l.read(at, until)[..] {
                    if b.base == at && b.next() == until && b.epoch == epoch && l.sound(b) {
                        let batch = b.clone();
                        w.send(self.idx, from, Msg::RepairBatch { log, batch });
                    }
                }
            }
            Msg::RepairBatch { log, batch } => {
                let repaired = w.disks[self.idx]
                    .logs
                    .get_mut(&log)
                    .is_some_and(|l| l.repair(&batch));
                if repaired {
                    w.checker.stats.repaired += 1;
                    w.note(format_args!(
                        "{} repaired {log} {}..{} with n{from}'s copy",
                        self.id,
                        batch.base,
                        batch.next()
                    ));
                    self.pump(w, &log);
                }
            }
            Msg::OutOfRange {
                log,
                session,
                start,
            } => self.out_of_range(w, &log, session, start),
            Msg::SnapshotAsk { log } => {
                if self.logs.contains_key(&log) {
                    let snapshot = w.disks[self.idx].snapshots.get(&log).copied();
                    w.send(self.idx, from, Msg::SnapshotIs { log, snapshot });
                }
            }
            Msg::SnapshotIs { log, snapshot } => {
                let Some(st) = self.logs.get(&log) else {
                    return;
                };
                let RoleState::Following(f) = &st.role else {
                    return;
                };
                if let (Some((offset, state)), true) = (snapshot, f.leader == Some(from)) {
                    if st.snapshots.wants(Some(offset)) {
                        self.write_snapshot(w, &log, offset, state, None);
                    }
                }
            }
            Msg::Refused { log, session } => {
                let current = matches!(self.logs.get(&log), Some(LogState { role: RoleState::Following(f), .. }) if f.id == session && f.session.is_some());
                if current {
                    self.end_session(w, &log);
                }
            }
        }
    }

    /// The connection to `peer` died at `since`: streams and sessions begun over it end.
    pub fn conn_down(&mut self, w: &mut World, peer: usize, since: u64) {
        let now = self.now_ms(w);
        let names: Vec<String> = self.logs.keys().cloned().collect();
        for name in names {
            let st = self.logs.get_mut(&name).expect("listed");
            match &mut st.role {
                RoleState::Leading(l) => {
                    if l.streams.get(&peer).is_some_and(|s| s.since <= since) {
                        l.streams.remove(&peer);
                        l.repl.disconnected(&node_id(peer), now);
                        self.settle(w, &name);
                    }
                }
                RoleState::Following(f) => {
                    if f.leader == Some(peer) && f.since <= since && f.session.is_some() {
                        f.end(now + 200);
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        w: &mut World,
        client: usize,
        id: u64,
        name: &str,
        records: Rc<[u64]>,
        acks: Acks,
        producer: Option<(u64, u64)>,
        expected: Option<u64>,
    ) {
        let now = self.now_ms(w);
        let lease_ok = self.lease_ok(w);
        let record = self.record(name);
        let not_leader = self.not_leader(record.as_ref());
        let leading_in = self.leading(name);
        if may_write(&self.id, leading_in, record.as_ref(), lease_ok).is_err() {
            return self.reply(w, client, id, not_leader);
        }
        let window = w.cfg.create_wait_ms;
        let deadline_ms = now + w.cfg.append_timeout_ms;
        let Some(l) = leading_state(&mut self.logs, name) else {
            unreachable!("may_write said this node leads the log");
        };
        match l.rules.admit(&l.repl, acks, now, window) {
            Ok(()) => {}
            Err(LevelRefusal::Forming { .. }) => {
                return self.reply(w, client, id, error(ErrorCode::Unavailable))
            }
            Err(LevelRefusal::NotEnoughReplicas { .. }) => {
                return self.reply(w, client, id, error(ErrorCode::NotEnoughReplicas))
            }
        }
        let count = records.len() as u32;
        let log = w.disks[self.idx]
            .logs
            .get_mut(name)
            .expect("a led log exists");
        let (stored, duplicate) = match l.producers.admit(producer, count, expected, log.end()) {
            Admission::Append => {
                let first = log.end();
                let batch = Batch {
                    base: first,
                    epoch: l.epoch,
                    producer,
                    records: records.clone(),
                };
                let next = batch.next();
                log.append(batch);
                l.repl.appended(next, now);
                let stored = StoredAppend {
                    first,
                    next,
                    epoch: l.epoch,
                };
                if let Some((pid, seq)) = producer {
                    l.producers.record(pid, seq, count, stored);
                }
                (stored, false)
            }
            Admission::Duplicate(stored) => (stored, true),
            Admission::SequenceGap { .. } => {
                return self.reply(w, client, id, error(ErrorCode::SequenceGap))
            }
            Admission::Stale { .. } => {
                return self.reply(w, client, id, error(ErrorCode::StaleSequence))
            }
            Admission::OffsetConflict { .. } => {
                return self.reply(w, client, id, error(ErrorCode::OffsetConflict))
            }
        };
        l.waiting.push(Waiting {
            client,
            id,
            acks,
            records,
            stored,
            duplicate,
            deadline_ms,
            since: w.now,
        });
        if duplicate {
            // Nothing new to write or send: the original's receipt once it reaches the level.
            return self.settle(w, name);
        }
        self.sync(w, name);
        self.settle(w, name);
        self.pump(w, name);
    }

    /// Issue an fdatasync of `name` unless one is in flight (group commit: what is written
    /// meanwhile goes in the next).
    fn sync(&mut self, w: &mut World, name: &str) {
        let Some(st) = self.logs.get_mut(name) else {
            return;
        };
        let log = &w.disks[self.idx].logs[name];
        if st.fsync_in_flight || log.durable_end() >= log.end() {
            return;
        }
        st.fsync_in_flight = true;
        let written = log.written();
        let (lo, hi) = w.cfg.fsync_us;
        let mut latency = w.rng.gen_range(lo..=hi);
        if w.rng.gen_bool(0.01) {
            latency *= 20;
        }
        w.after(
            latency,
            Event::Fsync {
                node: self.idx,
                incarnation: self.incarnation,
                log: name.to_string(),
                written,
            },
        );
    }

    /// An fdatasync completed.
    pub fn fsync_done(&mut self, w: &mut World, name: &str, written: (u64, u64)) {
        let now = self.now_ms(w);
        let Some(st) = self.logs.get_mut(name) else {
            return;
        };
        st.fsync_in_flight = false;
        let log = w.disks[self.idx]
            .logs
            .get_mut(name)
            .expect("an open log exists");
        log.synced(written);
        let durable = log.durable_end();
        match &mut st.role {
            RoleState::Leading(l) => {
                l.repl.flushed(durable, now);
            }
            RoleState::Following(f) => {
                if let Some(s) = f.session.as_mut() {
                    let p = s.flushed(durable);
                    if p.recovered {
                        log.recovering = false;
                    }
                    if let (Some(ack), Some(leader)) = (p.ack, f.leader) {
                        w.send(
                            self.idx,
                            leader,
                            Msg::Ack {
                                log: name.to_string(),
                                session: f.id,
                                durable: ack,
                            },
                        );
                    }
                }
            }
        }
        self.sync(w, name);
        self.settle(w, name);
        self.pump(w, name);
    }

    /// Answer the waiting appends of `name` that reached their level, or cannot.
    fn settle(&mut self, w: &mut World, name: &str) {
        let now = self.now_ms(w);
        let lease_ok = self.lease_ok(w);
        let record = self.record(name);
        let me = self.id.clone();
        let Some(l) = leading_state(&mut self.logs, name) else {
            return;
        };
        w.checker.saw_commit(
            w.now,
            (self.idx, self.incarnation, l.epoch),
            name,
            l.repl.commit_offset(),
        );
        let waiting = std::mem::take(&mut l.waiting);
        let mut answers = Vec::new();
        for wt in waiting {
            let next = wt.stored.next;
            match l.repl.progress(wt.acks, next) {
                Progress::Done { replicas, degraded } => {
                    match confirm(&me, l.epoch, record.as_ref(), lease_ok, wt.acks, &replicas) {
                        Ok(()) => {
                            let holders: Vec<usize> =
                                replicas.iter().map(|r| node_idx(r)).collect();
                            let level = if degraded { Acks::Leader } else { wt.acks };
                            let rep = Rep::Receipt {
                                first: wt.stored.first,
                                next,
                                epoch: wt.stored.epoch,
                                level,
                                degraded,
                                duplicate: wt.duplicate,
                                holders,
                            };
                            answers.push((wt, rep));
                        }
                        Err(_) => answers.push((wt, error(ErrorCode::Timeout))),
                    }
                }
                Progress::NotEnoughReplicas { .. } => answers.push((wt, error(ErrorCode::Timeout))),
                Progress::Pending => {
                    let lease_lost = !lease_ok && !matches!(wt.acks, Acks::None | Acks::Leader);
                    if now >= wt.deadline_ms || lease_lost {
                        answers.push((wt, error(ErrorCode::Timeout)));
                    } else {
                        l.waiting.push(wt);
                    }
                }
            }
        }
        for (wt, rep) in answers {
            if let Rep::Receipt { .. } = rep {
                w.checker.receipt(
                    (w.now, wt.since),
                    self.idx,
                    name,
                    &rep,
                    wt.acks,
                    &wt.records,
                    &w.disks,
                );
            }
            self.reply(w, wt.client, wt.id, rep);
        }
    }

    /// Send each follower stream of `name` what it has not had: new batches, or the commit
    /// offset alone when that moved.
    fn pump(&mut self, w: &mut World, name: &str) {
        let now = self.now_ms(w);
        let Some(l) = leading_state(&mut self.logs, name) else {
            return;
        };
        let log = &w.disks[self.idx].logs[name];
        let (end, commit) = (log.end(), l.repl.commit_offset());
        let mut out = Vec::new();
        // Streams that reach a damaged batch end (the read fails its checksum), until the
        // scrub has repaired it.
        let damaged: Vec<usize> = l
            .streams
            .iter()
            .filter(|(_, s)| {
                let sent = s.out.sent_until();
                sent < end && log.rotten_in(sent, end).is_some()
            })
            .map(|(f, _)| *f)
            .collect();
        for f in damaged {
            let s = l.streams.remove(&f).expect("listed");
            l.repl.disconnected(&node_id(f), now);
            out.push((
                f,
                Msg::Refused {
                    log: name.to_string(),
                    session: s.session,
                },
            ));
        }
        for (f, s) in l.streams.iter_mut() {
            let (first, batches) = match s.out.next(end, commit) {
                Outgoing::Records { from } => (from, log.read_as_stored(from, end)),
                Outgoing::Commit => (s.out.sent_until(), Vec::new()),
                Outgoing::Nothing => continue,
            };
            s.out
                .sent(batches.last().map_or(first, Batch::next), commit);
            let msg = Msg::Replicated {
                log: name.to_string(),
                session: s.session,
                epoch: l.epoch,
                commit,
                first,
                batches,
            };
            out.push((*f, msg));
        }
        for (to, msg) in out {
            w.send(self.idx, to, msg);
        }
    }

    /// A follower asks for a stream.
    fn replicate(
        &mut self,
        w: &mut World,
        follower: usize,
        name: &str,
        session: u64,
        from: u64,
        durable: u64,
    ) {
        let now = self.now_ms(w);
        let refused = Msg::Refused {
            log: name.to_string(),
            session,
        };
        let record = self.record(name);
        let Some(l) = leading_state(&mut self.logs, name) else {
            return w.send(self.idx, follower, refused);
        };
        let fid = node_id(follower);
        if !record.is_some_and(|r| r.replicas.contains(&fid)) {
            return w.send(self.idx, follower, refused);
        }
        let log = &w.disks[self.idx].logs[name];
        let out = match Outbound::open(from, log.start(), log.end()) {
            Ok(out) => out,
            Err(StreamRefusal::Bootstrap { start }) => {
                let msg = Msg::OutOfRange {
                    log: name.to_string(),
                    session,
                    start,
                };
                return w.send(self.idx, follower, msg);
            }
            Err(StreamRefusal::Ahead { .. }) => return w.send(self.idx, follower, refused),
        };
        l.repl.connected(&fid, out.counted(durable), now);
        l.streams.insert(
            follower,
            Stream {
                session,
                since: w.now,
                out,
            },
        );
        self.settle(w, name);
        self.pump(w, name);
    }

    /// The leader's answer about where the follower's last epoch ends.
    fn epoch_end_is(&mut self, w: &mut World, name: &str, session: u64, epoch: u64, end: u64) {
        let (me, now) = (self.id.clone(), self.now_ms(w));
        let Some(st) = self.logs.get_mut(name) else {
            return;
        };
        let commit = st.leader_commit;
        let RoleState::Following(f) = &mut st.role else {
            return;
        };
        let leader = f.leader.expect("a session has a leader");
        let asking = |p| matches!(p, Phase::AskingEpochEnd { .. });
        let Some(s) = f.current(session, asking) else {
            return;
        };
        let here = local(&w.disks[self.idx].logs[name]);
        let next = s.epoch_end(here, epoch, end);
        w.note(format_args!(
            "{me} follows n{leader} for {name}: its epoch {:?} ends at {end} there (epoch {epoch}); here {commit}..{}: {next:?}",
            here.last_epoch, here.end
        ));
        let next = match next {
            Ok(SessionCommand::Truncate { to }) => {
                let log = w.disks[self.idx].logs.get_mut(name).expect("followed log");
                let removed = log.truncate(to);
                let truncated = s.truncated(local(log));
                let (now_us, idx) = (w.now, self.idx);
                w.checker.truncated(now_us, idx, name, &removed);
                w.note(format_args!(
                    "{me} truncates {name} to {to} ({} batches)",
                    removed.len()
                ));
                truncated
            }
            Ok(next) => next,
            // The leader's history is empty: the follower refuses to truncate everything, and
            // asks again later.
            Err(_) => return f.end(now + 1000),
        };
        let (from, durable) = match next {
            SessionCommand::Replicate { from, durable, .. } => (from, durable),
            SessionCommand::Bootstrap { start } => return self.bootstrap(w, name, start),
            other => unreachable!("after the epoch question: {other:?}"),
        };
        let msg = Msg::Replicate {
            log: name.to_string(),
            session,
            from,
            durable,
        };
        w.send(self.idx, leader, msg);
    }

    /// The leader no longer stores what the session asked for: its log starts at `start`.
    fn out_of_range(&mut self, w: &mut World, name: &str, session: u64, start: u64) {
        let now = self.now_ms(w);
        let Some(f) = following_state(&mut self.logs, name) else {
            return;
        };
        let streaming = |p| matches!(p, Phase::Streaming { .. });
        let Some(s) = f.current(session, streaming) else {
            return;
        };
        match s.out_of_range(start) {
            Some(SessionCommand::Bootstrap { start }) => self.bootstrap(w, name, start),
            _ => f.end(now + 200),
        }
    }

    /// Bootstrap: replace the local copy of `name` by an empty one that starts at `start` (at
    /// 0 when unknown: the next session learns the leader's start), and begin again.
    fn bootstrap(&mut self, w: &mut World, name: &str, start: Option<u64>) {
        let now = self.now_ms(w);
        let start = start.unwrap_or(0);
        let log = w.disks[self.idx]
            .logs
            .get_mut(name)
            .expect("a followed log exists");
        let (from, to) = (log.start(), log.end());
        log.replace(start);
        w.checker.stats.bootstraps += 1;
        w.note(format_args!(
            "{} bootstraps {name}: its copy {from}..{to} is replaced by an empty one at {start}",
            self.id
        ));
        if let Some(f) = following_state(&mut self.logs, name) {
            f.end(now);
        }
    }

    /// A frame of the leader's stream.
    #[allow(clippy::too_many_arguments)]
    fn replicated(
        &mut self,
        w: &mut World,
        name: &str,
        session: u64,
        epoch: u64,
        commit: u64,
        first: u64,
        batches: Vec<Batch>,
    ) {
        let (idx, now) = (self.idx, self.now_ms(w));
        let Some(st) = self.logs.get_mut(name) else {
            return;
        };
        let RoleState::Following(f) = &mut st.role else {
            return;
        };
        let streaming = |p| matches!(p, Phase::Streaming { .. });
        let Some(s) = f.current(session, streaming) else {
            return;
        };
        let next = batches.last().map_or(first, Batch::next);
        let epochs = batches.iter().map(|b| b.epoch);
        let head = FrameHead {
            epoch,
            commit,
            first,
            next,
        };
        let Ok(progress) = s.frame(head, epochs) else {
            return f.end(now + 200);
        };
        let log = w.disks[idx].logs.get_mut(name).expect("followed log");
        for b in batches {
            log.append(b);
        }
        if progress.recovered {
            log.recovering = false;
        }
        let written = s.written(log.end());
        let durable = log.durable_end();
        st.leader_commit = st.leader_commit.max(s.commit());
        if let (Some(ack), Some(leader)) = (written, f.leader) {
            w.send(
                idx,
                leader,
                Msg::Ack {
                    log: name.to_string(),
                    session,
                    durable: ack,
                },
            );
        }
        let readable = protocol::replication::readable(st.leader_commit, durable);
        w.checker
            .saw_readable(w.now, idx, self.incarnation, name, readable);
        self.sync(w, name);
    }

    /// A read: what this replica may serve, from `from`.
    fn read(
        &mut self,
        w: &mut World,
        client: usize,
        id: u64,
        name: &str,
        from: u64,
        min_offset: u64,
    ) {
        let (Some(st), Some(log)) = (self.logs.get(name), w.disks[self.idx].logs.get(name)) else {
            return self.reply(w, client, id, error(ErrorCode::LogNotFound));
        };
        let committed = match &st.role {
            RoleState::Leading(l) => l.repl.commit_offset().min(log.durable_end()),
            RoleState::Following(_) => {
                protocol::replication::readable(st.leader_commit, log.durable_end())
            }
        };
        if committed < min_offset {
            return self.reply(w, client, id, error(ErrorCode::Behind));
        }
        if from > log.end() || from < log.start() {
            return self.reply(w, client, id, error(ErrorCode::OffsetOutOfRange));
        }
        let until = committed.min(from + READ_RECORDS_MAX);
        if until > from && log.rotten_in(from, until).is_some() {
            // The range fails its checksum here: nothing of it is served.
            return self.reply(w, client, id, error(ErrorCode::StorageFailed));
        }
        let ids = if until > from {
            log.ids_as_stored(from, until).unwrap_or_default()
        } else {
            Vec::new()
        };
        let rep = Rep::Records {
            from,
            ids,
            commit: committed,
        };
        w.checker.read(w.now, self.idx, name, &rep);
        self.reply(w, client, id, rep);
    }

    /// A client stores an application snapshot (the leader takes it by the node core's rules,
    /// against what its log stores and has committed).
    fn put_snapshot(
        &mut self,
        w: &mut World,
        client: usize,
        id: u64,
        name: &str,
        offset: u64,
        state: u64,
    ) {
        let (Some(st), Some(log)) = (self.logs.get(name), w.disks[self.idx].logs.get(name)) else {
            return self.reply(w, client, id, error(ErrorCode::LogNotFound));
        };
        let RoleState::Leading(l) = &st.role else {
            let rep = self.not_leader(self.record(name).as_ref());
            return self.reply(w, client, id, rep);
        };
        let committed = l.repl.commit_offset().min(log.durable_end());
        let admitted = st
            .snapshots
            .admit(offset, log.start(), log.end(), committed);
        if let Err(refusal) = admitted {
            let code = match refusal {
                SnapshotRefusal::OutOfRange { .. } => ErrorCode::OffsetOutOfRange,
                SnapshotRefusal::NotCommitted { .. } => ErrorCode::Behind,
                SnapshotRefusal::Backward { .. } => ErrorCode::OffsetConflict,
            };
            return self.reply(w, client, id, error(code));
        }
        self.write_snapshot(w, name, offset, state, Some((client, id)));
    }

    /// Write a snapshot whole and make it durable (it is in place once that is done).
    fn write_snapshot(
        &mut self,
        w: &mut World,
        name: &str,
        offset: u64,
        state: u64,
        reply: Option<(usize, u64)>,
    ) {
        let (lo, hi) = w.cfg.fsync_us;
        let latency = w.rng.gen_range(lo..=hi) * 2;
        let (node, incarnation, log) = (self.idx, self.incarnation, name.to_string());
        w.after(
            latency,
            Event::SnapshotWritten {
                node,
                incarnation,
                log,
                offset,
                state,
                reply,
            },
        );
    }

    /// A snapshot is written and durable: the latest of its log here, unless a newer one was
    /// stored meanwhile.
    pub fn snapshot_written(
        &mut self,
        w: &mut World,
        name: &str,
        offset: u64,
        state: u64,
        reply: Option<(usize, u64)>,
    ) {
        let Some(st) = self.logs.get_mut(name) else {
            if let Some((client, id)) = reply {
                self.reply(w, client, id, error(ErrorCode::LogNotFound));
            }
            return;
        };
        let latest = st.snapshots.stored(offset);
        if latest {
            w.disks[self.idx]
                .snapshots
                .insert(name.to_string(), (offset, state));
            let how = if reply.is_some() { "put" } else { "copied" };
            w.checker.snapshot(self.idx, name, offset, state, how);
            w.note(format_args!(
                "{} stored a snapshot of {name} at {offset} ({how})",
                self.id
            ));
        }
        if let Some((client, id)) = reply {
            self.reply(w, client, id, Rep::Stored);
        }
    }

    /// Ask the controller for a planned transfer of `name` (this node must lead it).
    pub fn begin_transfer(&mut self, w: &mut World, name: &str) -> bool {
        let Some(r) = self.record(name) else {
            return false;
        };
        if r.leader.as_deref() != Some(&self.id) || r.transfer_to.is_some() {
            return false;
        }
        let Some(to) = r.sync_set.first().cloned() else {
            return false;
        };
        w.note(format_args!(
            "{} begins a transfer of {name} to {to}",
            self.id
        ));
        let since_ms = self.now_ms(w);
        let _ = self.ctl.propose(Command::BeginTransfer {
            log: name.to_string(),
            epoch: r.epoch,
            to,
            since_ms,
        });
        self.flush_controller(w);
        true
    }

    /// Propose `cmd` to the controller through this node.
    pub fn propose(&mut self, w: &mut World, cmd: Command) {
        let _ = self.ctl.propose(cmd);
        self.flush_controller(w);
    }
}

/// The leading state of `name` in `logs`, if this node leads it.
fn leading_state<'a>(
    logs: &'a mut BTreeMap<String, LogState>,
    name: &str,
) -> Option<&'a mut Leading> {
    match &mut logs.get_mut(name)?.role {
        RoleState::Leading(l) => Some(l),
        RoleState::Following(_) => None,
    }
}

/// The following state of `name` in `logs`, if this node follows it.
fn following_state<'a>(
    logs: &'a mut BTreeMap<String, LogState>,
    name: &str,
) -> Option<&'a mut Following> {
    match &mut logs.get_mut(name)?.role {
        RoleState::Following(f) => Some(f),
        RoleState::Leading(_) => None,
    }
}

fn error(code: ErrorCode) -> Rep {
    Rep::Error { code, leader: None }
}
