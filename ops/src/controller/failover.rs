//! Failure detection and elections, decided by the controller's Raft leader from the reports
//! every node sends it: a log whose leader has not been heard from for `leader_timeout` gets a
//! new leader by [`choose_leader_above`], or none (and the old one is deposed, so it is fenced by
//! the new epoch); a planned transfer completes once its target has caught up.
//!
//! [`decide`] is a pure function of the metadata, what was heard and when, so the whole policy
//! is tested without a network or a clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::meta::{
    choose_leader_above, Choice, ClusterMeta, Command, LogMeta, NodeId, ReplicaState,
    UncleanElection,
};

/// How long a planned transfer may wait for its target to catch up before it is abandoned.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node tells the controller about one log it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogReport {
    pub log: String,
    /// The epoch the node is operating the log in (as leader or follower).
    pub epoch: u64,
    /// The epoch of its last record (0: empty).
    pub last_epoch: u64,
    /// Its end offset.
    pub end: u64,
    /// Its commit offset (as leader: the log's; as follower: as far as it knows).
    pub commit: u64,
}

/// A node's periodic report to the controller leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: NodeId,
    pub logs: Vec<LogReport>,
}

/// A report and when it arrived.
#[derive(Clone, Debug)]
pub struct Heard {
    pub at: Instant,
    pub report: NodeReport,
}

/// The failover settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailoverConfig {
    /// A leader not heard from for this long is declared failed.
    pub leader_timeout: Duration,
    /// Elect the most up-to-date reachable replica when none is guaranteed to hold every
    /// acknowledged append.
    pub unclean: bool,
}

fn log_report<'a>(heard: &'a Heard, log: &str) -> Option<&'a LogReport> {
    heard.report.logs.iter().find(|l| l.log == log)
}

/// The commands the controller leader should propose now. `listening_since` is when this node
/// started receiving reports (every member receives every member's reports): until
/// `leader_timeout` has passed since, it has not heard from everyone, and decides nothing. `now_ms` is the wall clock recorded in commands.
pub fn decide(
    meta: &ClusterMeta,
    heard: &BTreeMap<NodeId, Heard>,
    now: Instant,
    listening_since: Instant,
    cfg: &FailoverConfig,
    now_ms: u64,
) -> Vec<Command> {
    decide_with(
        meta,
        heard,
        now,
        listening_since,
        cfg,
        now_ms,
        &BTreeMap::new(),
    )
}

/// [`decide`], where `began` says when each log's current epoch began (as this controller saw
/// it): a leader just elected is given `leader_timeout` to start reporting as one before it
/// can be declared failed.
pub fn decide_with(
    meta: &ClusterMeta,
    heard: &BTreeMap<NodeId, Heard>,
    now: Instant,
    listening_since: Instant,
    cfg: &FailoverConfig,
    now_ms: u64,
    began: &BTreeMap<String, Instant>,
) -> Vec<Command> {
    if now.saturating_duration_since(listening_since) < cfg.leader_timeout {
        return Vec::new();
    }
    let alive = |n: &str| {
        heard
            .get(n)
            .is_some_and(|h| now.saturating_duration_since(h.at) < cfg.leader_timeout)
    };
    let mut out = Vec::new();
    for (name, log) in &meta.logs {
        let reachable: Vec<ReplicaState> = log
            .replicas
            .iter()
            .filter(|n| alive(n))
            .filter_map(|n| {
                let r = log_report(&heard[n.as_str()], name)?;
                Some(ReplicaState {
                    node: n.clone(),
                    last_epoch: r.last_epoch,
                    end: r.end,
                })
            })
            .collect();
        // The highest commit offset reported for the log, by any replica ever heard.
        let committed = heard
            .values()
            .filter_map(|h| log_report(h, name))
            .map(|r| r.commit)
            .max()
            .unwrap_or(0);
        match &log.leader {
            Some(leader)
                if alive(leader)
                    || began.get(name).is_some_and(|t| {
                        now.saturating_duration_since(*t) < cfg.leader_timeout
                    }) =>
            {
                if let Some(cmd) = transfer_step(name, log, now_ms) {
                    out.push(cmd);
                }
            }
            Some(leader) => {
                let known_commit = heard
                    .get(leader.as_str())
                    .and_then(|h| log_report(h, name))
                    .map_or(0, |r| r.commit);
                out.push(
                    match choose_leader_above(log, &reachable, log.policy, cfg.unclean, committed) {
                        Choice::Elect {
                            node,
                            start,
                            unclean,
                        } => elect(name, log, node, start, unclean, known_commit, now_ms),
                        Choice::None(why) => Command::Depose {
                            log: name.clone(),
                            epoch: log.epoch,
                            reason: format!(
                                "leader {leader} {} (leader_timeout {:?}); {why}",
                                match heard.get(leader.as_str()) {
                                    Some(h) => format!(
                                        "last heard from {:?} ago",
                                        now.saturating_duration_since(h.at)
                                    ),
                                    None => "never heard from by this controller".into(),
                                },
                                cfg.leader_timeout
                            ),
                        },
                    },
                );
            }
            None => {
                match choose_leader_above(log, &reachable, log.policy, cfg.unclean, committed) {
                    Choice::Elect {
                        node,
                        start,
                        unclean,
                    } => out.push(elect(name, log, node, start, unclean, 0, now_ms)),
                    Choice::None(why) => {
                        if log.no_leader.as_deref() != Some(why.as_str()) {
                            out.push(Command::NoLeader {
                                log: name.clone(),
                                epoch: log.epoch,
                                reason: why,
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

fn elect(
    name: &str,
    log: &LogMeta,
    node: NodeId,
    start: u64,
    unclean: bool,
    known_commit: u64,
    now_ms: u64,
) -> Command {
    Command::Elect {
        log: name.to_string(),
        epoch: log.epoch,
        sync_set: log
            .sync_set
            .iter()
            .filter(|n| **n != node)
            .cloned()
            .collect(),
        unclean: unclean.then(|| UncleanElection {
            epoch: log.epoch + 1,
            leader: node.clone(),
            end: start,
            known_commit,
            at_ms: now_ms,
        }),
        leader: node,
        start,
    }
}

/// A planned transfer is completed by the leader itself (`CompleteTransfer`: only it knows when
/// it has stopped taking writes and the target holds all of them); one that has not completed
/// in [`TRANSFER_TIMEOUT`] is abandoned here, and the leader takes writes again.
fn transfer_step(name: &str, log: &LogMeta, now_ms: u64) -> Option<Command> {
    let t = log.transfer.as_ref()?;
    (now_ms.saturating_sub(t.since_ms) > TRANSFER_TIMEOUT.as_millis() as u64).then(|| {
        Command::CancelTransfer {
            log: name.to_string(),
            epoch: log.epoch,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::meta::{Member, Policy, Transfer};

    const T: Duration = Duration::from_secs(2);

    fn meta(sync_set: &[&str]) -> ClusterMeta {
        let mut m = ClusterMeta::default();
        m.apply(&Command::Init {
            cluster_id: "c".into(),
            members: ["a", "b", "c"]
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        n.to_string(),
                        Member {
                            raft_id: i as u64 + 1,
                            addr: String::new(),
                        },
                    )
                })
                .collect(),
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
        m.apply(&Command::SetSyncSet {
            log: "l".into(),
            epoch: 1,
            sync_set: sync_set.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap();
        m
    }

    fn heard(at: Instant, node: &str, epoch: u64, end: u64, commit: u64) -> (NodeId, Heard) {
        (
            node.to_string(),
            Heard {
                at,
                report: NodeReport {
                    node: node.into(),
                    logs: vec![LogReport {
                        log: "l".into(),
                        epoch,
                        last_epoch: epoch,
                        end,
                        commit,
                    }],
                },
            },
        )
    }

    fn cfg(unclean: bool) -> FailoverConfig {
        FailoverConfig {
            leader_timeout: T,
            unclean,
        }
    }

    #[test]
    fn nothing_happens_while_the_leader_is_heard_or_the_controller_is_new() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let m = meta(&["b"]);
        let h: BTreeMap<_, _> = [heard(now, "a", 1, 10, 10), heard(now, "b", 1, 10, 10)].into();
        assert!(decide(&m, &h, now, t0, &cfg(false), 0).is_empty());
        // The leader is silent, but this controller leader is new: wait.
        let h: BTreeMap<_, _> = [heard(now, "b", 1, 10, 10)].into();
        assert!(decide(&m, &h, now, now - T / 2, &cfg(false), 0).is_empty());
    }

    #[test]
    fn a_silent_leader_is_replaced_by_a_sync_set_member() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let m = meta(&["b"]);
        let h: BTreeMap<_, _> = [
            heard(now - T * 2, "a", 1, 12, 10),
            heard(now, "b", 1, 10, 10),
            heard(now, "c", 1, 11, 10),
        ]
        .into();
        let cmds = decide(&m, &h, now, t0, &cfg(false), 0);
        assert_eq!(
            cmds,
            vec![Command::Elect {
                log: "l".into(),
                epoch: 1,
                leader: "b".into(),
                start: 10,
                sync_set: vec![],
                unclean: None
            }]
        );
    }

    #[test]
    fn without_a_guaranteed_replica_the_leader_is_deposed_or_unclean_elected() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let m = meta(&["b"]);
        let h: BTreeMap<_, _> =
            [heard(now - T * 2, "a", 1, 12, 9), heard(now, "c", 1, 11, 9)].into();
        let cmds = decide(&m, &h, now, t0, &cfg(false), 0);
        let [Command::Depose {
            epoch: 1, reason, ..
        }] = &cmds[..]
        else {
            panic!("{cmds:?}")
        };
        assert!(
            reason.contains("leader a last heard from 4s ago"),
            "{reason}"
        );
        assert!(reason.contains("unclean_failover is off"), "{reason}");
        // With unclean failover, c leads and the possible loss is recorded.
        let cmds = decide(&m, &h, now, t0, &cfg(true), 77);
        let [Command::Elect {
            leader,
            unclean: Some(u),
            ..
        }] = &cmds[..]
        else {
            panic!("{cmds:?}")
        };
        assert_eq!(leader, "c");
        assert_eq!((u.end, u.known_commit, u.at_ms, u.epoch), (11, 9, 77, 2));
    }

    #[test]
    fn a_leader_just_elected_has_leader_timeout_to_start_reporting() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let m = meta(&["b"]);
        let h: BTreeMap<_, _> = [heard(now, "b", 1, 10, 10)].into();
        let began: BTreeMap<String, Instant> = [("l".to_string(), now - T / 2)].into();
        assert!(decide_with(&m, &h, now, t0, &cfg(false), 0, &began).is_empty());
        let began: BTreeMap<String, Instant> = [("l".to_string(), now - T * 2)].into();
        assert_eq!(
            decide_with(&m, &h, now, t0, &cfg(false), 0, &began).len(),
            1
        );
    }

    #[test]
    fn a_leaderless_log_gets_a_leader_when_a_holder_returns_and_says_why_until_then() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let mut m = meta(&["b"]);
        m.apply(&Command::Depose {
            log: "l".into(),
            epoch: 1,
            reason: "old".into(),
        })
        .unwrap();
        let h: BTreeMap<_, _> = [heard(now, "c", 1, 11, 9)].into();
        let cmds = decide(&m, &h, now, t0, &cfg(false), 0);
        let [Command::NoLeader {
            epoch: 2, reason, ..
        }] = &cmds[..]
        else {
            panic!("{cmds:?}")
        };
        // Once recorded, the same reason is not proposed again.
        m.apply(&cmds[0]).unwrap();
        assert!(
            decide(&m, &h, now, t0, &cfg(false), 0).is_empty(),
            "{reason}"
        );
        // The old leader returns: it may lead again.
        let h: BTreeMap<_, _> = [heard(now, "c", 1, 11, 9), heard(now, "a", 1, 12, 9)].into();
        let cmds = decide(&m, &h, now, t0, &cfg(false), 0);
        assert!(
            matches!(&cmds[..], [Command::Elect { leader, epoch: 2, .. }] if leader == "a"),
            "{cmds:?}"
        );
    }

    #[test]
    fn a_transfer_is_left_to_the_leader_and_expires_if_it_does_not_complete() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let mut m = meta(&["b"]);
        m.logs.get_mut("l").unwrap().transfer = Some(Transfer {
            to: "c".into(),
            since_ms: 1000,
        });
        let behind: BTreeMap<_, _> =
            [heard(now, "a", 1, 12, 10), heard(now, "c", 1, 11, 10)].into();
        assert!(decide(&m, &behind, now, t0, &cfg(false), 2000).is_empty());
        // Even with equal ends reported, the controller does not elect the target: the reports
        // may be older than the leader's last appends.
        let caught_up: BTreeMap<_, _> =
            [heard(now, "a", 1, 12, 12), heard(now, "c", 1, 12, 12)].into();
        assert!(decide(&m, &caught_up, now, t0, &cfg(false), 2000).is_empty());
        let late = 1000 + TRANSFER_TIMEOUT.as_millis() as u64 + 1;
        assert_eq!(
            decide(&m, &behind, now, t0, &cfg(false), late),
            vec![Command::CancelTransfer {
                log: "l".into(),
                epoch: 1
            }]
        );
    }
}
