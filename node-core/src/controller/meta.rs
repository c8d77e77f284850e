//! The controller's replicated state: the cluster's members and, per log, its replicas, leader,
//! epoch, sync set and epoch history. Every change is a [`Command`] committed through Raft and
//! applied in the same order on every node by [`ClusterMeta::apply`], which is deterministic and
//! refuses (without changing anything) a command made stale by an earlier one.
//!
//! The election rule ([`choose_leader`]) is a pure function of the log's metadata and what the
//! controller has heard from the replicas, so it is tested without any network.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id (a DNS label, as in `--node-id`).
pub type NodeId = String;

/// The format version of [`ClusterMeta`] snapshots and [`Command`] encodings.
pub const META_VERSION: u32 = 1;

/// Longest list of unclean elections kept per log (older ones are dropped, oldest first).
pub const UNCLEAN_HISTORY_MAX: usize = 64;

/// A member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its Raft id (1-based position in the configured member list).
    pub raft_id: u64,
    /// The address clients and peers reach it at.
    pub addr: String,
}

/// Why the controller let a replica lead that may lack acknowledged appends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UncleanElection {
    /// The epoch that began with it.
    pub epoch: u64,
    pub leader: NodeId,
    /// The new leader's end offset: acknowledged appends at or above it may be lost.
    pub end: u64,
    /// The highest commit offset the controller had heard of for the log.
    pub known_commit: u64,
    /// Wall-clock time of the election, ms since the Unix epoch (from the proposer).
    pub at_ms: u64,
}

/// A planned leadership transfer in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub to: NodeId,
    /// When it began, ms since the Unix epoch (from the proposer).
    pub since_ms: u64,
}

/// One log's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMeta {
    /// The nodes holding the log.
    pub replicas: Vec<NodeId>,
    /// Its leader in `epoch`; `None` while no replica may lead (see `no_leader`).
    pub leader: Option<NodeId>,
    /// While there is no leader: the last one, which held every acknowledged append.
    pub last_leader: Option<NodeId>,
    /// What guarantees acknowledged appends survive the leader's loss.
    pub policy: Policy,
    /// The current epoch. Every leadership change starts a new one.
    pub epoch: u64,
    /// The followers that hold every append acknowledged at `sync` (the leader changes it
    /// through the controller before it relies on the change).
    pub sync_set: Vec<NodeId>,
    /// Epoch history as the controller started the epochs: (epoch, its first offset).
    pub epochs: Vec<(u64, u64)>,
    /// Why there is no leader, when there is none.
    pub no_leader: Option<String>,
    /// A planned transfer in progress: the leader stops taking appends until it completes.
    pub transfer: Option<Transfer>,
    /// Elections that may have lost acknowledged appends (`unclean_failover`).
    pub unclean: Vec<UncleanElection>,
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// Chosen when the cluster is first formed; every node's data dir records it.
    pub cluster_id: String,
    pub members: BTreeMap<NodeId, Member>,
    pub logs: BTreeMap<String, LogMeta>,
}

/// A change to the metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Form the cluster (the first command; refused once a cluster id is set).
    Init {
        cluster_id: String,
        members: BTreeMap<NodeId, Member>,
    },
    /// Register a log, led by `leader` in `epoch` (the leader's current epoch for it; at least
    /// 1) from offset `start`.
    CreateLog {
        name: String,
        replicas: Vec<NodeId>,
        leader: NodeId,
        policy: Policy,
        epoch: u64,
        start: u64,
    },
    /// The leader of `epoch` changes the log's sync set.
    SetSyncSet {
        log: String,
        epoch: u64,
        sync_set: Vec<NodeId>,
    },
    /// Start epoch `epoch + 1` with `leader`, whose log ends at `start` (the new epoch's first
    /// offset). Refused unless the log is still in `epoch`.
    Elect {
        log: String,
        epoch: u64,
        leader: NodeId,
        start: u64,
        /// The new sync set (the old one without the new leader).
        sync_set: Vec<NodeId>,
        /// Set when the leader was chosen without the guarantee (`unclean_failover`).
        unclean: Option<UncleanElection>,
    },
    /// The leader of `epoch` is gone and no replica may take over: start epoch `epoch + 1`
    /// without a leader (the old one is fenced) and record why.
    Depose {
        log: String,
        epoch: u64,
        reason: String,
    },
    /// Record a new reason why the leaderless `epoch` still has no leader.
    NoLeader {
        log: String,
        epoch: u64,
        reason: String,
    },
    /// Begin a planned transfer of the leadership of `epoch` to `to`.
    BeginTransfer {
        log: String,
        epoch: u64,
        to: NodeId,
        since_ms: u64,
    },
    /// Abandon the planned transfer of `epoch` (the leader resumes).
    CancelTransfer { log: String, epoch: u64 },
    /// `node` lost its copy of the log (its data was wiped or lost, and it created the log
    /// afresh): it no longer holds every acknowledged append, so it leaves the sync set (and
    /// is no longer the last leader of a leaderless log; as the leader, it is deposed). It
    /// replicates again only once this is on record.
    Withdraw { log: String, node: NodeId },
    /// The leader of `epoch`, having stopped taking writes for the planned transfer to `to`
    /// and seen `to` hold its whole log (ending at `start`) durably, hands over: `to` leads
    /// epoch `epoch + 1`. Refused unless that transfer is still under way in `epoch` (a
    /// cancelled transfer lets the leader take writes again, which `to` may not have).
    CompleteTransfer {
        log: String,
        epoch: u64,
        to: NodeId,
        start: u64,
        sync_set: Vec<NodeId>,
    },
}

/// Why a command was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the cluster is already formed (id {0})")]
    AlreadyFormed(String),
    #[error("the cluster is not formed yet")]
    NotFormed,
    #[error("log {0} is not known to the controller")]
    UnknownLog(String),
    #[error("log {0} exists")]
    LogExists(String),
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(String),
    #[error("node {node} is not a replica of log {log}")]
    NotAReplica { log: String, node: NodeId },
    #[error("stale epoch {given} for log {log} (current {current})")]
    StaleEpoch {
        log: String,
        given: u64,
        current: u64,
    },
    #[error("log {log} has no leader in epoch {epoch}")]
    NoLeader { log: String, epoch: u64 },
    #[error("the sync set of log {log} may only hold its followers")]
    BadSyncSet { log: String },
    #[error("log {log} has no transfer to {to} under way in epoch {epoch}")]
    NoTransfer { log: String, epoch: u64, to: NodeId },
    #[error("the election for log {log} was decided on metadata that has changed since")]
    StaleDecision { log: String },
}

impl ClusterMeta {
    /// Apply `cmd`: the same result on every node for the same sequence of commands.
    pub fn apply(&mut self, cmd: &Command) -> Result<(), Refusal> {
        if let Command::Init {
            cluster_id,
            members,
        } = cmd
        {
            if !self.cluster_id.is_empty() {
                return Err(Refusal::AlreadyFormed(self.cluster_id.clone()));
            }
            self.cluster_id = cluster_id.clone();
            self.members = members.clone();
            return Ok(());
        }
        if self.cluster_id.is_empty() {
            return Err(Refusal::NotFormed);
        }
        match cmd {
            Command::Init { .. } => unreachable!("handled above"),
            Command::CreateLog {
                name,
                replicas,
                leader,
                policy,
                epoch,
                start,
            } => {
                if self.logs.contains_key(name) {
                    return Err(Refusal::LogExists(name.clone()));
                }
                for r in replicas {
                    self.member(r)?;
                }
                if !replicas.contains(leader) {
                    return Err(Refusal::NotAReplica {
                        log: name.clone(),
                        node: leader.clone(),
                    });
                }
                self.logs.insert(
                    name.clone(),
                    LogMeta {
                        replicas: replicas.clone(),
                        leader: Some(leader.clone()),
                        last_leader: None,
                        policy: *policy,
                        epoch: (*epoch).max(1),
                        sync_set: Vec::new(),
                        epochs: vec![((*epoch).max(1), *start)],
                        no_leader: None,
                        transfer: None,
                        unclean: Vec::new(),
                    },
                );
                Ok(())
            }
            Command::Withdraw { log, node } => {
                let l = self
                    .logs
                    .get_mut(log)
                    .ok_or_else(|| Refusal::UnknownLog(log.clone()))?;
                if !l.replicas.contains(node) {
                    return Err(Refusal::NotAReplica {
                        log: log.clone(),
                        node: node.clone(),
                    });
                }
                l.sync_set.retain(|n| n != node);
                if l.last_leader.as_ref() == Some(node) {
                    l.last_leader = None;
                }
                if l.leader.as_ref() == Some(node) {
                    // A leader without its records: fenced by a new epoch, and failover
                    // elects a member of the sync set.
                    l.epoch += 1;
                    l.leader = None;
                    l.no_leader = Some(format!("leader {node} lost its copy of the log"));
                    l.transfer = None;
                }
                Ok(())
            }
            Command::SetSyncSet {
                log,
                epoch,
                sync_set,
            } => {
                let l = self.current(log, *epoch)?;
                let Some(leader) = &l.leader else {
                    return Err(Refusal::NoLeader {
                        log: log.clone(),
                        epoch: *epoch,
                    });
                };
                if sync_set
                    .iter()
                    .any(|n| n == leader || !l.replicas.contains(n))
                {
                    return Err(Refusal::BadSyncSet { log: log.clone() });
                }
                let l = self.logs.get_mut(log).expect("checked");
                l.sync_set = sync_set.clone();
                Ok(())
            }
            Command::Elect {
                log,
                epoch,
                leader,
                start,
                sync_set,
                unclean,
            } => self.elect(
                log,
                *epoch,
                leader,
                *start,
                sync_set,
                unclean.as_ref(),
                true,
            ),
            Command::Depose { log, epoch, reason } => {
                let l = self.current(log, *epoch)?;
                if l.leader.is_none() {
                    return Err(Refusal::NoLeader {
                        log: log.clone(),
                        epoch: *epoch,
                    });
                }
                let l = self.logs.get_mut(log).expect("checked");
                l.epoch = epoch + 1;
                l.last_leader = l.leader.take();
                l.no_leader = Some(reason.clone());
                l.transfer = None;
                Ok(())
            }
            Command::NoLeader { log, epoch, reason } => {
                let l = self.current(log, *epoch)?;
                if l.leader.is_some() {
                    return Err(Refusal::StaleEpoch {
                        log: log.clone(),
                        given: *epoch,
                        current: l.epoch,
                    });
                }
                self.logs.get_mut(log).expect("checked").no_leader = Some(reason.clone());
                Ok(())
            }
            Command::BeginTransfer {
                log,
                epoch,
                to,
                since_ms,
            } => {
                let l = self.current(log, *epoch)?;
                if l.leader.is_none() {
                    return Err(Refusal::NoLeader {
                        log: log.clone(),
                        epoch: *epoch,
                    });
                }
                if !l.replicas.contains(to) || l.leader.as_ref() == Some(to) {
                    return Err(Refusal::NotAReplica {
                        log: log.clone(),
                        node: to.clone(),
                    });
                }
                self.logs.get_mut(log).expect("checked").transfer = Some(Transfer {
                    to: to.clone(),
                    since_ms: *since_ms,
                });
                Ok(())
            }
            Command::CancelTransfer { log, epoch } => {
                self.current(log, *epoch)?;
                self.logs.get_mut(log).expect("checked").transfer = None;
                Ok(())
            }
            Command::CompleteTransfer {
                log,
                epoch,
                to,
                start,
                sync_set,
            } => {
                let l = self.current(log, *epoch)?;
                if l.transfer.as_ref().map(|t| &t.to) != Some(to) {
                    return Err(Refusal::NoTransfer {
                        log: log.clone(),
                        epoch: *epoch,
                        to: to.clone(),
                    });
                }
                // The target need not be in the sync set: the leader saw it hold everything.
                self.elect(log, *epoch, to, *start, sync_set, None, false)
            }
        }
    }

    /// Start epoch `epoch + 1` with `leader` (see `Command::Elect`); `check`: verify that a
    /// clean election is still right by the current metadata (a planned transfer's target is
    /// checked by its own rule instead).
    #[allow(clippy::too_many_arguments)]
    fn elect(
        &mut self,
        log: &String,
        epoch: u64,
        leader: &NodeId,
        start: u64,
        sync_set: &[NodeId],
        unclean: Option<&UncleanElection>,
        check: bool,
    ) -> Result<(), Refusal> {
        let l = self.current(log, epoch)?;
        if !l.replicas.contains(leader) {
            return Err(Refusal::NotAReplica {
                log: log.clone(),
                node: leader.clone(),
            });
        }
        if sync_set
            .iter()
            .any(|n| n == leader || !l.replicas.contains(n))
        {
            return Err(Refusal::BadSyncSet { log: log.clone() });
        }
        // A clean election under `sync_set` was decided from the metadata of its
        // moment: the leader must still hold every acknowledged append (the leader
        // renewing its epoch, a member of the sync set, or the last leader), and the
        // new sync set must be the current one without it. A sync-set change applied
        // since (in the same epoch) makes the decision stale.
        let planted = crate::planted::active(crate::planted::Bug::ElectOutsideSyncSet);
        if unclean.is_none() && l.policy == Policy::SyncSet && check && !planted {
            let eligible = l.leader.as_ref() == Some(leader)
                || l.sync_set.contains(leader)
                || l.last_leader.as_ref() == Some(leader);
            let rest: Vec<&NodeId> = l.sync_set.iter().filter(|n| *n != leader).collect();
            if !eligible || rest != sync_set.iter().collect::<Vec<_>>() {
                return Err(Refusal::StaleDecision { log: log.clone() });
            }
        }
        let l = self.logs.get_mut(log).expect("checked");
        l.epoch = epoch + 1;
        l.leader = Some(leader.clone());
        l.last_leader = None;
        l.sync_set = sync_set.to_vec();
        l.epochs.push((l.epoch, start));
        l.no_leader = None;
        l.transfer = None;
        if let Some(u) = unclean {
            l.unclean.push(u.clone());
            if l.unclean.len() > UNCLEAN_HISTORY_MAX {
                l.unclean.remove(0);
            }
        }
        Ok(())
    }

    fn member(&self, id: &str) -> Result<&Member, Refusal> {
        self.members
            .get(id)
            .ok_or_else(|| Refusal::UnknownNode(id.to_string()))
    }

    /// The log, if `epoch` is its current epoch.
    fn current(&self, log: &str, epoch: u64) -> Result<&LogMeta, Refusal> {
        let l = self
            .logs
            .get(log)
            .ok_or_else(|| Refusal::UnknownLog(log.to_string()))?;
        if l.epoch != epoch {
            return Err(Refusal::StaleEpoch {
                log: log.to_string(),
                given: epoch,
                current: l.epoch,
            });
        }
        Ok(l)
    }
}

/// What guarantees the acknowledged appends of a log survive a leader's loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Every acknowledged append is on the leader and every member of the sync set.
    SyncSet,
    /// Every acknowledged append is on a majority of the replicas.
    Majority,
}

/// What the controller last heard from a replica about one log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub node: NodeId,
    /// The epoch of its last record (0: empty).
    pub last_epoch: u64,
    /// Its end offset (next offset to write).
    pub end: u64,
}

/// The controller's decision for a log whose leader is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Let `node` lead; `unclean` when it is not guaranteed to hold every acknowledged append.
    Elect {
        node: NodeId,
        start: u64,
        unclean: bool,
    },
    /// No replica may lead: why.
    None(NoCandidate),
}

/// Why no replica may lead a log (the text is recorded in the metadata as the reason).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{why}{}{}", behind_text(.behind, *.committed), match .unclean {
    true => "; no replica is reachable at all",
    false => "; unclean_failover is off",
})]
pub struct NoCandidate {
    /// Why no replica is guaranteed to hold every acknowledged append.
    pub why: Unguaranteed,
    /// Replicas reachable but behind the commit offset (wiped or restored copies).
    pub behind: Vec<NodeId>,
    /// The highest commit offset a replica reported.
    pub committed: u64,
    /// Whether unclean failover was allowed (and no replica at all was reachable).
    pub unclean: bool,
}

fn behind_text(behind: &[NodeId], committed: u64) -> String {
    match behind.is_empty() {
        true => String::new(),
        false => format!(
            " ({} reachable but behind the commit offset {committed}: wiped or restored)",
            behind.join(", ")
        ),
    }
}

/// Why no reachable replica is guaranteed to hold every acknowledged append.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unguaranteed {
    #[error("the sync set is empty: only the failed leader held every acknowledged append")]
    SyncSetEmpty,
    #[error("none of the replicas holding every acknowledged append ({}) is reachable", .0.join(", "))]
    HoldersUnreachable(Vec<NodeId>),
    #[error("{reachable} of {replicas} replicas reachable; {need} are needed to be sure one holds every append acknowledged by a majority")]
    TooFewReachable {
        reachable: usize,
        replicas: usize,
        need: usize,
    },
}

/// The best of `states` by (last epoch, end offset), ties broken by node id for determinism.
fn most_up_to_date<'a>(states: impl Iterator<Item = &'a ReplicaState>) -> Option<&'a ReplicaState> {
    states.max_by(|a, b| {
        (a.last_epoch, a.end)
            .cmp(&(b.last_epoch, b.end))
            .then_with(|| b.node.cmp(&a.node))
    })
}

/// Choose a leader for `log` from `reachable`: the replicas heard from recently, with their
/// (epoch, offset). Its current leader, if it has one, is being replaced (it failed, or a
/// transfer is under way) and is not a candidate.
///
/// - `SyncSet`: every acknowledged append is on the members of the sync set (and on the
///   leader, or on the last leader while there is none, who may be chosen once back); the most
///   up-to-date reachable one leads.
/// - `Majority`: an acknowledged append is on a majority of the replicas, so at least
///   `replicas - majority + 1` of them must be reachable for one of them to be sure to hold it;
///   the most up-to-date of them leads.
///
/// When the guarantee cannot be met, `unclean` allows the most up-to-date reachable replica
/// anyway (and the caller records the possible loss); otherwise there is no leader.
pub fn choose_leader(
    log: &LogMeta,
    reachable: &[ReplicaState],
    policy: Policy,
    unclean: bool,
) -> Choice {
    choose_leader_above(log, reachable, policy, unclean, 0)
}

/// [`choose_leader`], where `committed` is the highest commit offset any replica reported for
/// the log: a replica whose log ends below it lacks committed records (its data dir was wiped
/// or restored from an old copy) and holds no guarantee whatever the metadata says, so only an
/// unclean election may choose it (R7).
pub fn choose_leader_above(
    log: &LogMeta,
    reachable: &[ReplicaState],
    policy: Policy,
    unclean: bool,
    committed: u64,
) -> Choice {
    let all: Vec<&ReplicaState> = reachable
        .iter()
        .filter(|s| log.leader.as_ref() != Some(&s.node) && log.replicas.contains(&s.node))
        .collect();
    let behind: Vec<NodeId> = all
        .iter()
        .filter(|s| s.end < committed)
        .map(|s| s.node.clone())
        .collect();
    // (Planted: the rule looks at neither the sync set nor the commit offset.)
    let planted = crate::planted::active(crate::planted::Bug::ElectOutsideSyncSet);
    let candidates: Vec<&ReplicaState> = all
        .iter()
        .copied()
        .filter(|s| s.end >= committed || planted)
        .collect();
    let guaranteed = match policy {
        Policy::SyncSet => {
            let holders: Vec<&NodeId> = log.sync_set.iter().chain(&log.last_leader).collect();
            let outside = planted && candidates.iter().any(|s| !holders.contains(&&s.node));
            let eligible = candidates
                .iter()
                .copied()
                .filter(|s| holders.contains(&&s.node) != outside);
            // (Planted: the least up-to-date replica outside the sync set.)
            let chosen = match outside {
                true => eligible.min_by_key(|s| (s.last_epoch, s.end)),
                false => most_up_to_date(eligible),
            };
            match chosen {
                Some(s) => Ok(s),
                None if holders.is_empty() => Err(Unguaranteed::SyncSetEmpty),
                None => Err(Unguaranteed::HoldersUnreachable(
                    holders.into_iter().cloned().collect(),
                )),
            }
        }
        Policy::Majority => {
            let n = log.replicas.len();
            let need = n - (n / 2 + 1) + 1;
            if candidates.len() >= need {
                Ok(most_up_to_date(candidates.iter().copied()).expect("need >= 1"))
            } else {
                Err(Unguaranteed::TooFewReachable {
                    reachable: candidates.len(),
                    replicas: n,
                    need,
                })
            }
        }
    };
    let none = |why, unclean| {
        Choice::None(NoCandidate {
            why,
            behind: behind.clone(),
            committed,
            unclean,
        })
    };
    match guaranteed {
        Ok(s) => Choice::Elect {
            node: s.node.clone(),
            start: s.end,
            unclean: false,
        },
        Err(why) if unclean => match most_up_to_date(all.iter().copied()) {
            Some(s) => Choice::Elect {
                node: s.node.clone(),
                start: s.end,
                unclean: true,
            },
            None => none(why, true),
        },
        Err(why) => none(why, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formed() -> ClusterMeta {
        let mut m = ClusterMeta::default();
        let members = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.to_string(),
                    Member {
                        raft_id: i as u64 + 1,
                        addr: format!("127.0.0.1:700{i}"),
                    },
                )
            })
            .collect();
        m.apply(&Command::Init {
            cluster_id: "c1".into(),
            members,
        })
        .unwrap();
        m.apply(&Command::CreateLog {
            name: "l".into(),
            replicas: vec!["a".into(), "b".into(), "c".into()],
            leader: "a".into(),
            policy: Policy::SyncSet,
            epoch: 1,
            start: 0,
        })
        .unwrap();
        m
    }

    fn st(node: &str, last_epoch: u64, end: u64) -> ReplicaState {
        ReplicaState {
            node: node.into(),
            last_epoch,
            end,
        }
    }

    #[test]
    fn commands_apply_in_order_and_stale_ones_change_nothing() {
        let mut m = formed();
        assert_eq!(
            m.apply(&Command::Init {
                cluster_id: "c2".into(),
                members: BTreeMap::new()
            }),
            Err(Refusal::AlreadyFormed("c1".into()))
        );
        m.apply(&Command::SetSyncSet {
            log: "l".into(),
            epoch: 1,
            sync_set: vec!["b".into()],
        })
        .unwrap();
        // The leader cannot be in its own sync set; strangers cannot either.
        for bad in [vec!["a".to_string()], vec!["z".to_string()]] {
            assert_eq!(
                m.apply(&Command::SetSyncSet {
                    log: "l".into(),
                    epoch: 1,
                    sync_set: bad
                }),
                Err(Refusal::BadSyncSet { log: "l".into() })
            );
        }
        m.apply(&Command::Elect {
            log: "l".into(),
            epoch: 1,
            leader: "b".into(),
            start: 10,
            sync_set: vec![],
            unclean: None,
        })
        .unwrap();
        let before = m.clone();
        // Anything from epoch 1 is now stale: a deposed leader's sync-set change, a second
        // election racing the first.
        for cmd in [
            Command::SetSyncSet {
                log: "l".into(),
                epoch: 1,
                sync_set: vec![],
            },
            Command::Elect {
                log: "l".into(),
                epoch: 1,
                leader: "c".into(),
                start: 9,
                sync_set: vec![],
                unclean: None,
            },
        ] {
            assert!(matches!(m.apply(&cmd), Err(Refusal::StaleEpoch { .. })));
        }
        assert_eq!(m, before);
        let l = &m.logs["l"];
        assert_eq!((l.epoch, l.leader.as_deref()), (2, Some("b")));
        assert_eq!(l.epochs, vec![(1, 0), (2, 10)]);
    }

    #[test]
    fn a_replica_that_lost_its_copy_leaves_the_sync_set_and_is_no_last_leader() {
        let mut m = formed();
        m.apply(&Command::SetSyncSet {
            log: "l".into(),
            epoch: 1,
            sync_set: vec!["b".into(), "c".into()],
        })
        .unwrap();
        m.apply(&Command::Withdraw {
            log: "l".into(),
            node: "b".into(),
        })
        .unwrap();
        assert_eq!(m.logs["l"].sync_set, vec!["c".to_string()]);
        m.apply(&Command::Depose {
            log: "l".into(),
            epoch: 1,
            reason: "gone".into(),
        })
        .unwrap();
        assert_eq!(m.logs["l"].last_leader.as_deref(), Some("a"));
        m.apply(&Command::Withdraw {
            log: "l".into(),
            node: "a".into(),
        })
        .unwrap();
        assert_eq!(m.logs["l"].last_leader, None);
        assert!(matches!(
            m.apply(&Command::Withdraw {
                log: "l".into(),
                node: "z".into()
            }),
            Err(Refusal::NotAReplica { .. })
        ));
    }

    #[test]
    fn an_election_decided_before_a_sync_set_change_is_refused() {
        let mut m = formed();
        let set = |m: &mut ClusterMeta, to: &[&str]| {
            m.apply(&Command::SetSyncSet {
                log: "l".into(),
                epoch: 1,
                sync_set: to.iter().map(|s| s.to_string()).collect(),
            })
            .unwrap()
        };
        set(&mut m, &["b"]);
        // Decided while b was the member; c replaced it before the election applied.
        let stale = Command::Elect {
            log: "l".into(),
            epoch: 1,
            leader: "b".into(),
            start: 10,
            sync_set: vec![],
            unclean: None,
        };
        set(&mut m, &["c"]);
        let before = m.clone();
        assert_eq!(
            m.apply(&stale),
            Err(Refusal::StaleDecision { log: "l".into() })
        );
        assert_eq!(m, before);
        // Decided on the current metadata: applies.
        m.apply(&Command::Elect {
            log: "l".into(),
            epoch: 1,
            leader: "c".into(),
            start: 10,
            sync_set: vec![],
            unclean: None,
        })
        .unwrap();
        assert_eq!(m.logs["l"].leader.as_deref(), Some("c"));
    }

    #[test]
    fn a_deposed_log_has_no_leader_until_elected() {
        let mut m = formed();
        m.apply(&Command::SetSyncSet {
            log: "l".into(),
            epoch: 1,
            sync_set: vec!["c".into()],
        })
        .unwrap();
        m.apply(&Command::Depose {
            log: "l".into(),
            epoch: 1,
            reason: "why".into(),
        })
        .unwrap();
        let l = &m.logs["l"];
        assert_eq!((l.epoch, l.leader.as_deref()), (2, None));
        assert_eq!(l.no_leader.as_deref(), Some("why"));
        m.apply(&Command::Elect {
            log: "l".into(),
            epoch: 2,
            leader: "c".into(),
            start: 4,
            sync_set: vec![],
            unclean: None,
        })
        .unwrap();
        let l = &m.logs["l"];
        assert_eq!(
            (l.epoch, l.leader.as_deref(), l.no_leader.as_deref()),
            (3, Some("c"), None)
        );
    }

    #[test]
    fn a_transfer_completes_only_while_it_is_under_way() {
        let mut m = formed();
        let complete = Command::CompleteTransfer {
            log: "l".into(),
            epoch: 1,
            to: "c".into(),
            start: 7,
            sync_set: vec!["a".into()],
        };
        // No transfer begun: refused.
        assert!(matches!(
            m.apply(&complete),
            Err(Refusal::NoTransfer { .. })
        ));
        let begin = Command::BeginTransfer {
            log: "l".into(),
            epoch: 1,
            to: "c".into(),
            since_ms: 5,
        };
        m.apply(&begin).unwrap();
        // Cancelled (the leader took writes again): refused, nothing changes.
        m.apply(&Command::CancelTransfer {
            log: "l".into(),
            epoch: 1,
        })
        .unwrap();
        let before = m.clone();
        assert!(m.apply(&complete).is_err());
        assert_eq!(m, before);
        // Under way: the target leads the next epoch, from the given offset.
        m.apply(&begin).unwrap();
        m.apply(&complete).unwrap();
        let l = &m.logs["l"];
        assert_eq!(
            (l.epoch, l.leader.as_deref(), l.transfer.is_none()),
            (2, Some("c"), true)
        );
        assert_eq!(l.sync_set, vec!["a".to_string()]);
        assert_eq!(l.epochs.last(), Some(&(2, 7)));
        // Applied once: a repeat is stale.
        assert!(m.apply(&complete).is_err());
    }

    #[test]
    fn the_metadata_round_trips_through_json() {
        let m = formed();
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<ClusterMeta>(&text).unwrap(), m);
        let cmd = Command::CancelTransfer {
            log: "l".into(),
            epoch: 1,
        };
        let text = serde_json::to_string(&cmd).unwrap();
        assert!(text.contains("\"op\":\"cancel_transfer\""), "{text}");
        assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), cmd);
    }

    #[test]
    fn sync_set_policy_elects_only_members_of_the_sync_set() {
        let mut l = formed().logs["l"].clone();
        l.sync_set = vec!["b".into()];
        // c is further ahead but not in the sync set: it may hold appends that were never
        // acknowledged, and may lack acknowledged ones. b is guaranteed.
        let reach = [st("b", 1, 10), st("c", 1, 12)];
        assert_eq!(
            choose_leader(&l, &reach, Policy::SyncSet, false),
            Choice::Elect {
                node: "b".into(),
                start: 10,
                unclean: false
            }
        );
        // b unreachable: nobody, unless unclean.
        let reach = [st("c", 1, 12)];
        let Choice::None(why) = choose_leader(&l, &reach, Policy::SyncSet, false) else {
            panic!()
        };
        assert_eq!(why.why, Unguaranteed::HoldersUnreachable(vec!["b".into()]));
        assert!(
            why.to_string().contains(
                "none of the replicas holding every acknowledged append (b) is reachable; unclean_failover is off"
            ),
            "{why}"
        );
        assert_eq!(
            choose_leader(&l, &reach, Policy::SyncSet, true),
            Choice::Elect {
                node: "c".into(),
                start: 12,
                unclean: true
            }
        );
        // An empty sync set: only the old leader had everything.
        l.sync_set.clear();
        let Choice::None(why) = choose_leader(&l, &reach, Policy::SyncSet, false) else {
            panic!()
        };
        assert_eq!(why.why, Unguaranteed::SyncSetEmpty);
        assert!(why.to_string().contains("sync set is empty"), "{why}");
    }

    #[test]
    fn a_replica_behind_the_commit_offset_holds_no_guarantee() {
        let mut l = formed().logs["l"].clone();
        l.sync_set = vec!["b".into()];
        // b is in the sync set but its log ends below what was committed: wiped or restored.
        let reach = [st("b", 0, 0), st("c", 1, 12)];
        let Choice::None(why) = choose_leader_above(&l, &reach, Policy::SyncSet, false, 10) else {
            panic!()
        };
        assert_eq!((why.behind.clone(), why.committed), (vec!["b".into()], 10));
        assert!(
            why.to_string()
                .contains("b reachable but behind the commit offset 10"),
            "{why}"
        );
        // Without the commit offset it would have been elected.
        assert!(matches!(
            choose_leader(&l, &reach, Policy::SyncSet, false),
            Choice::Elect { ref node, .. } if node == "b"
        ));
        // Unclean: the most up-to-date reachable replica, recorded as unclean.
        assert_eq!(
            choose_leader_above(&l, &reach, Policy::SyncSet, true, 10),
            Choice::Elect {
                node: "c".into(),
                start: 12,
                unclean: true
            }
        );
        // Majority: a replica behind does not count towards the replicas needed.
        let Choice::None(_) = choose_leader_above(&l, &reach, Policy::Majority, false, 10) else {
            panic!()
        };
        let reach = [st("b", 1, 10), st("c", 1, 12)];
        assert!(matches!(
            choose_leader_above(&l, &reach, Policy::Majority, false, 10),
            Choice::Elect { ref node, .. } if node == "c"
        ));
    }

    #[test]
    fn the_most_up_to_date_by_epoch_then_offset_wins() {
        let mut l = formed().logs["l"].clone();
        l.sync_set = vec!["b".into(), "c".into()];
        // A later epoch beats a longer log of an older epoch.
        let reach = [st("b", 3, 5), st("c", 2, 50)];
        assert!(matches!(
            choose_leader(&l, &reach, Policy::SyncSet, false),
            Choice::Elect { node, .. } if node == "b"
        ));
        // The leader being replaced is never chosen, even if it is heard from.
        let reach = [st("a", 9, 99), st("c", 2, 50)];
        assert!(matches!(
            choose_leader(&l, &reach, Policy::SyncSet, false),
            Choice::Elect { node, .. } if node == "c"
        ));
        // Ties go to the smaller node id, the same on every node.
        let reach = [st("c", 2, 50), st("b", 2, 50)];
        assert!(matches!(
            choose_leader(&l, &reach, Policy::SyncSet, false),
            Choice::Elect { node, .. } if node == "b"
        ));
    }

    #[test]
    fn a_deposed_log_waits_for_its_last_leader_or_a_sync_set_member() {
        let mut m = formed();
        m.apply(&Command::SetSyncSet {
            log: "l".into(),
            epoch: 1,
            sync_set: vec!["b".into()],
        })
        .unwrap();
        m.apply(&Command::Depose {
            log: "l".into(),
            epoch: 1,
            reason: "a and b are gone".into(),
        })
        .unwrap();
        let l = m.logs["l"].clone();
        assert_eq!(l.last_leader.as_deref(), Some("a"));
        // c alone is not enough.
        assert!(matches!(
            choose_leader(&l, &[st("c", 1, 30)], Policy::SyncSet, false),
            Choice::None(_)
        ));
        // The old leader is back: it held every acknowledged append, so it may lead again.
        assert_eq!(
            choose_leader(
                &l,
                &[st("a", 1, 20), st("c", 1, 30)],
                Policy::SyncSet,
                false
            ),
            Choice::Elect {
                node: "a".into(),
                start: 20,
                unclean: false
            }
        );
    }

    #[test]
    fn majority_policy_needs_enough_reachable_followers() {
        let l = formed().logs["l"].clone();
        // Three replicas: an append acknowledged by a and one follower may be on either
        // follower, so both must be heard from.
        let reach = [st("b", 1, 7)];
        let Choice::None(why) = choose_leader(&l, &reach, Policy::Majority, false) else {
            panic!()
        };
        assert_eq!(
            why.why,
            Unguaranteed::TooFewReachable {
                reachable: 1,
                replicas: 3,
                need: 2
            }
        );
        assert!(
            why.to_string()
                .contains("1 of 3 replicas reachable; 2 are needed"),
            "{why}"
        );
        let reach = [st("b", 1, 7), st("c", 1, 9)];
        assert_eq!(
            choose_leader(&l, &reach, Policy::Majority, false),
            Choice::Elect {
                node: "c".into(),
                start: 9,
                unclean: false
            }
        );
    }
}
