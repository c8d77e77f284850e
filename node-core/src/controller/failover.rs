//! Failure detection and elections, decided by the controller's Raft leader from the reports
//! every node sends every member: a log whose leader has not been heard from for
//! `leader_timeout`, or that has lacked two-way contact with a majority of the members for that
//! long ([`isolated`]: each report says how long ago its sender last heard from each member, so
//! a leader cut off in one direction is judged from the followers' view as well as its own),
//! gets a new leader by [`choose_leader_above`], or none (and the old one is deposed, so it is
//! fenced by the new epoch); a planned transfer completes once its target has caught up.
//!
//! [`decide`] is a pure function of the metadata, what was heard and when, so the whole policy
//! is tested without a network or a clock.

use std::collections::BTreeMap;
use std::time::Duration;

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
    /// It lost its copy and is catching up (see `node_core::log::must_withdraw`): it holds no
    /// guarantee and may not lead.
    #[serde(default)]
    pub recovering: bool,
}

/// A node's periodic report to the controller leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: NodeId,
    pub logs: Vec<LogReport>,
    /// For each other member: how long ago (ms) this node last received a controller frame
    /// from it (since its controller started, for one never heard). Empty: not known (a node
    /// of an older version).
    #[serde(default)]
    pub heard_ms: BTreeMap<NodeId, u64>,
    /// The sender's clock when it sent the report (ms since the Unix epoch), echoed by the
    /// controller's leader in its acknowledgement: the sender's lease.
    #[serde(default)]
    pub sent_ms: u64,
    /// Set while the sender's controller storage is out of space (the error): it neither
    /// votes nor proposes, takes no writes, and is not fit to lead.
    #[serde(default)]
    pub storage: Option<String>,
}

/// A report and when it arrived (ms, on the receiving node's clock).
#[derive(Clone, Debug)]
pub struct Heard {
    pub at_ms: u64,
    pub report: NodeReport,
}

/// The time from `earlier` to `now` (ms) as a duration; zero if the clock says otherwise.
fn since(now_ms: u64, earlier_ms: u64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(earlier_ms))
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

/// The commands the controller leader should propose now. `listening_since_ms` is when this
/// node started receiving reports (every member receives every member's reports): until
/// `leader_timeout` has passed since, it has not heard from everyone, and decides nothing.
/// Times are ms on this node's clock (`now_ms` is also what commands record).
pub fn decide(
    meta: &ClusterMeta,
    heard: &BTreeMap<NodeId, Heard>,
    now_ms: u64,
    listening_since_ms: u64,
    cfg: &FailoverConfig,
) -> Vec<Command> {
    decide_with(
        meta,
        heard,
        now_ms,
        listening_since_ms,
        cfg,
        &BTreeMap::new(),
    )
}

/// [`decide`], where `began` says when each log's current epoch began (as this controller saw
/// it): a leader just elected is given `leader_timeout` to start reporting as one before it
/// can be declared failed.
pub fn decide_with(
    meta: &ClusterMeta,
    heard: &BTreeMap<NodeId, Heard>,
    now_ms: u64,
    listening_since_ms: u64,
    cfg: &FailoverConfig,
    began: &BTreeMap<String, u64>,
) -> Vec<Command> {
    if since(now_ms, listening_since_ms) < cfg.leader_timeout {
        return Vec::new();
    }
    let reported = |n: &str| {
        heard.get(n).is_some_and(|h| {
            since(now_ms, h.at_ms) < cfg.leader_timeout && h.report.storage.is_none()
        })
    };
    let members: Vec<&NodeId> = meta.members.keys().collect();
    // A node is alive when its reports arrive and it exchanges messages both ways with enough
    // members to form a majority with them: a node cut off in one direction still reports,
    // but cannot replicate or be heard.
    let alive = |n: &str| reported(n) && !isolated(n, &members, heard, now_ms, cfg.leader_timeout);
    let mut out = Vec::new();
    for (name, log) in &meta.logs {
        let reachable: Vec<ReplicaState> = log
            .replicas
            .iter()
            .filter(|n| alive(n))
            .filter_map(|n| {
                let r = log_report(&heard[n.as_str()], name).filter(|r| !r.recovering)?;
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
                    || began
                        .get(name)
                        .is_some_and(|t| since(now_ms, *t) < cfg.leader_timeout) =>
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
                                    Some(h) if reported(leader) => format!(
                                        "is cut off from a majority of the members (last heard from {:?} ago)",
                                        since(now_ms, h.at_ms)
                                    ),
                                    Some(h) => format!(
                                        "last heard from {:?} ago",
                                        since(now_ms, h.at_ms)
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
                        let why = why.to_string();
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

/// How long ago `from` last heard from `of`, as of `now`, by its latest report; `None` when
/// its report says nothing of it.
fn heard_age(
    heard: &BTreeMap<NodeId, Heard>,
    from: &str,
    of: &str,
    now_ms: u64,
) -> Option<Duration> {
    let h = heard.get(from)?;
    let ms = *h.report.heard_ms.get(of)?;
    Some(Duration::from_millis(ms) + since(now_ms, h.at_ms))
}

/// Whether node `n` lacks two-way contact with a majority of `members` (itself included) for
/// longer than `timeout`, judged from every member's reports: `n`'s own (whom it hears) and
/// the others' (who hears it). A link counts as broken only where a current report says so:
/// a member whose reports do not arrive (or, from an older node, carry no figures) says
/// nothing either way. (A member that is down is heard by nobody: the reports of the others
/// say so.)
pub fn isolated(
    n: &str,
    members: &[&NodeId],
    heard: &BTreeMap<NodeId, Heard>,
    now_ms: u64,
    timeout: Duration,
) -> bool {
    if members.len() <= 1 {
        return false;
    }
    // Whether `from` hears `of`, by `from`'s current report; `None`: no such report.
    let hears = |from: &str, of: &str| match heard.get(from) {
        Some(h) if since(now_ms, h.at_ms) < timeout && !h.report.heard_ms.is_empty() => {
            Some(heard_age(heard, from, of, now_ms).is_some_and(|a| a < timeout))
        }
        _ => None,
    };
    let linked = members
        .iter()
        .filter(|m| m.as_str() != n)
        .filter(|m| hears(n, m) != Some(false) && hears(m, n) != Some(false))
        .count();
    linked + 1 < members.len() / 2 + 1
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
    const T_MS: u64 = 2000;

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

    fn heard(at_ms: u64, node: &str, epoch: u64, end: u64, commit: u64) -> (NodeId, Heard) {
        (
            node.to_string(),
            Heard {
                at_ms,
                report: NodeReport {
                    node: node.into(),
                    logs: vec![LogReport {
                        log: "l".into(),
                        epoch,
                        last_epoch: epoch,
                        end,
                        commit,
                        recovering: false,
                    }],
                    heard_ms: BTreeMap::new(),
                    sent_ms: 0,
                    storage: None,
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
        let t0 = 0u64;
        let now = 10_000u64;
        let m = meta(&["b"]);
        let h: BTreeMap<_, _> = [heard(now, "a", 1, 10, 10), heard(now, "b", 1, 10, 10)].into();
        assert!(decide(&m, &h, now, t0, &cfg(false)).is_empty());
        // The leader is silent, but this controller leader is new: wait.
        let h: BTreeMap<_, _> = [heard(now, "b", 1, 10, 10)].into();
        assert!(decide(&m, &h, now, now - T_MS / 2, &cfg(false)).is_empty());
    }

    #[test]
    fn a_silent_leader_is_replaced_by_a_sync_set_member() {
        let t0 = 0u64;
        let now = 10_000u64;
        let m = meta(&["b"]);
        let h: BTreeMap<_, _> = [
            heard(now - 2 * T_MS, "a", 1, 12, 10),
            heard(now, "b", 1, 10, 10),
            heard(now, "c", 1, 11, 10),
        ]
        .into();
        let cmds = decide(&m, &h, now, t0, &cfg(false));
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
        let t0 = 0u64;
        let now = 10_000u64;
        let m = meta(&["b"]);
        let h: BTreeMap<_, _> = [
            heard(now - 2 * T_MS, "a", 1, 12, 9),
            heard(now, "c", 1, 11, 9),
        ]
        .into();
        let cmds = decide(&m, &h, now, t0, &cfg(false));
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
        let cmds = decide(&m, &h, now, t0, &cfg(true));
        let [Command::Elect {
            leader,
            unclean: Some(u),
            ..
        }] = &cmds[..]
        else {
            panic!("{cmds:?}")
        };
        assert_eq!(leader, "c");
        assert_eq!((u.end, u.known_commit, u.at_ms, u.epoch), (11, 9, now, 2));
    }

    fn hearing(mut h: (NodeId, Heard), ms: &[(&str, u64)]) -> (NodeId, Heard) {
        h.1.report.heard_ms = ms.iter().map(|(n, a)| (n.to_string(), *a)).collect();
        h
    }

    #[test]
    fn a_leader_cut_off_in_either_direction_is_replaced_and_a_cut_off_follower_is_not() {
        let t0 = 0u64;
        let now = 10_000u64;
        let m = meta(&["b"]);
        let long = T.as_millis() as u64 * 2;
        let elected_b = |cmds: Vec<Command>| matches!(&cmds[..], [Command::Elect { leader, .. }] if leader == "b");
        // Followers to leader cut: a still reports, but hears nobody.
        let h: BTreeMap<_, _> = [
            hearing(heard(now, "a", 1, 10, 10), &[("b", long), ("c", long)]),
            hearing(heard(now, "b", 1, 10, 10), &[("a", 50), ("c", 50)]),
            hearing(heard(now, "c", 1, 10, 10), &[("a", 50), ("b", 50)]),
        ]
        .into();
        assert!(elected_b(decide(&m, &h, now, t0, &cfg(false))));
        // Leader to followers cut, a's reports still arriving (by another path): nobody hears
        // a.
        let h: BTreeMap<_, _> = [
            hearing(heard(now, "a", 1, 10, 10), &[("b", 50), ("c", 50)]),
            hearing(heard(now, "b", 1, 10, 10), &[("a", long), ("c", 50)]),
            hearing(heard(now, "c", 1, 10, 10), &[("a", long), ("b", 50)]),
        ]
        .into();
        assert!(elected_b(decide(&m, &h, now, t0, &cfg(false))));
        // Not yet for longer than leader_timeout: nothing happens.
        let short = T.as_millis() as u64 / 2;
        let h: BTreeMap<_, _> = [
            hearing(heard(now, "a", 1, 10, 10), &[("b", short), ("c", short)]),
            hearing(heard(now, "b", 1, 10, 10), &[("a", short), ("c", 50)]),
            hearing(heard(now, "c", 1, 10, 10), &[("a", short), ("b", 50)]),
        ]
        .into();
        assert!(decide(&m, &h, now, t0, &cfg(false)).is_empty());
        // A follower cut off both ways does not make the leader fail: a still has b.
        let h: BTreeMap<_, _> = [
            hearing(heard(now, "a", 1, 10, 10), &[("b", 50), ("c", long)]),
            hearing(heard(now, "b", 1, 10, 10), &[("a", 50), ("c", long)]),
            hearing(heard(now, "c", 1, 10, 10), &[("a", long), ("b", long)]),
        ]
        .into();
        assert!(decide(&m, &h, now, t0, &cfg(false)).is_empty());
        // Reports of an older node (no figures) count as contact.
        let h: BTreeMap<_, _> = [heard(now, "a", 1, 10, 10), heard(now, "b", 1, 10, 10)].into();
        assert!(decide(&m, &h, now, t0, &cfg(false)).is_empty());
    }

    #[test]
    fn a_leader_just_elected_has_leader_timeout_to_start_reporting() {
        let t0 = 0u64;
        let now = 10_000u64;
        let m = meta(&["b"]);
        let h: BTreeMap<_, _> = [heard(now, "b", 1, 10, 10)].into();
        let began: BTreeMap<String, u64> = [("l".to_string(), now - T_MS / 2)].into();
        assert!(decide_with(&m, &h, now, t0, &cfg(false), &began).is_empty());
        let began: BTreeMap<String, u64> = [("l".to_string(), now - 2 * T_MS)].into();
        assert_eq!(decide_with(&m, &h, now, t0, &cfg(false), &began).len(), 1);
    }

    #[test]
    fn a_leaderless_log_gets_a_leader_when_a_holder_returns_and_says_why_until_then() {
        let t0 = 0u64;
        let now = 10_000u64;
        let mut m = meta(&["b"]);
        m.apply(&Command::Depose {
            log: "l".into(),
            epoch: 1,
            reason: "old".into(),
        })
        .unwrap();
        let h: BTreeMap<_, _> = [heard(now, "c", 1, 11, 9)].into();
        let cmds = decide(&m, &h, now, t0, &cfg(false));
        let [Command::NoLeader {
            epoch: 2, reason, ..
        }] = &cmds[..]
        else {
            panic!("{cmds:?}")
        };
        // Once recorded, the same reason is not proposed again.
        m.apply(&cmds[0]).unwrap();
        assert!(decide(&m, &h, now, t0, &cfg(false)).is_empty(), "{reason}");
        // The old leader returns: it may lead again.
        let h: BTreeMap<_, _> = [heard(now, "c", 1, 11, 9), heard(now, "a", 1, 12, 9)].into();
        let cmds = decide(&m, &h, now, t0, &cfg(false));
        assert!(
            matches!(&cmds[..], [Command::Elect { leader, epoch: 2, .. }] if leader == "a"),
            "{cmds:?}"
        );
    }

    #[test]
    fn a_transfer_is_left_to_the_leader_and_expires_if_it_does_not_complete() {
        let t0 = 0u64;
        let now = 10_000u64;
        let mut m = meta(&["b"]);
        m.logs.get_mut("l").unwrap().transfer = Some(Transfer {
            to: "c".into(),
            since_ms: 1000,
        });
        let behind: BTreeMap<_, _> =
            [heard(now, "a", 1, 12, 10), heard(now, "c", 1, 11, 10)].into();
        assert!(decide(&m, &behind, now, t0, &cfg(false)).is_empty());
        // Even with equal ends reported, the controller does not elect the target: the reports
        // may be older than the leader's last appends.
        let caught_up: BTreeMap<_, _> =
            [heard(now, "a", 1, 12, 12), heard(now, "c", 1, 12, 12)].into();
        assert!(decide(&m, &caught_up, now, t0, &cfg(false)).is_empty());
        let late = 1000 + TRANSFER_TIMEOUT.as_millis() as u64 + 1;
        let behind: BTreeMap<_, _> =
            [heard(late, "a", 1, 12, 10), heard(late, "c", 1, 11, 10)].into();
        assert_eq!(
            decide(&m, &behind, late, t0, &cfg(false)),
            vec![Command::CancelTransfer {
                log: "l".into(),
                epoch: 1
            }]
        );
    }
}
