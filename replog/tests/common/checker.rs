//! A checker over a recorded history: what every client operation was told (acknowledged at an
//! offset, a definite failure, or an unknown outcome), against what every replica serves after
//! the faults healed. Payloads are unique. It reports every violation of:
//! 1. no acknowledged append lost: each is at its offset on every replica;
//! 2. no offset with two payloads on any replicas;
//! 3. no duplicates: a payload at most once per replica;
//! 4. dense offsets from 0 on each replica;
//! 5. nothing stored that was never sent, or that was definitely refused.

use std::collections::{BTreeMap, HashMap};

/// What a client was told about one append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged, stored at this offset.
    Ok(u64),
    /// Definitely not stored.
    Failed,
    /// Sent, no answer: it may or may not be stored.
    Unknown,
}

/// One recorded operation.
#[derive(Clone, Debug)]
pub struct Op {
    pub value: String,
    pub outcome: Outcome,
}

/// Every violation of the rules above; empty when the history is consistent.
pub fn check(history: &[Op], replicas: &[(String, Vec<(u64, String)>)]) -> Vec<String> {
    let mut bad = Vec::new();
    let sent: HashMap<&str, &Outcome> = history
        .iter()
        .map(|o| (o.value.as_str(), &o.outcome))
        .collect();
    let mut at: BTreeMap<u64, (&str, &str)> = BTreeMap::new();
    for (name, records) in replicas {
        let mut seen: HashMap<&str, u64> = HashMap::new();
        for (i, (offset, value)) in records.iter().enumerate() {
            if *offset != i as u64 {
                bad.push(format!(
                    "{name}: offset {offset} where {i} was due (not dense)"
                ));
            }
            if let Some(first) = seen.insert(value, *offset) {
                bad.push(format!(
                    "{name}: {value:?} stored twice, at {first} and {offset}"
                ));
            }
            match sent.get(value.as_str()) {
                None => bad.push(format!("{name}: {value:?} at {offset} was never sent")),
                Some(Outcome::Failed) => bad.push(format!(
                    "{name}: {value:?} at {offset} was refused, yet it is stored"
                )),
                _ => {}
            }
            match at.get(offset) {
                Some((other, v)) if *v != value.as_str() => bad.push(format!(
                    "offset {offset} holds {v:?} on {other} and {value:?} on {name}"
                )),
                Some(_) => {}
                None => {
                    at.insert(*offset, (name, value));
                }
            }
        }
        for op in history {
            if let Outcome::Ok(offset) = op.outcome {
                let there = records.get(offset as usize).map(|(_, v)| v.as_str());
                if there != Some(op.value.as_str()) {
                    bad.push(format!(
                        "{name}: acknowledged {:?} at {offset} is missing (found {there:?})",
                        op.value
                    ));
                }
            }
        }
    }
    bad
}

#[test]
fn the_checker_passes_a_consistent_history_and_catches_planted_bugs() {
    let ok = |v: &str, o: u64| Op {
        value: v.into(),
        outcome: Outcome::Ok(o),
    };
    let history = vec![
        ok("a", 0),
        ok("b", 1),
        Op {
            value: "c".into(),
            outcome: Outcome::Unknown,
        },
        Op {
            value: "d".into(),
            outcome: Outcome::Failed,
        },
        ok("e", 3),
    ];
    let good: Vec<(u64, String)> = [(0, "a"), (1, "b"), (2, "c"), (3, "e")]
        .iter()
        .map(|(o, v)| (*o, v.to_string()))
        .collect();
    let replicas =
        |r: Vec<(u64, String)>| vec![("n1".to_string(), good.clone()), ("n2".to_string(), r)];
    assert!(check(&history, &replicas(good.clone())).is_empty());
    // An unknown outcome may be absent everywhere: then e moved down, which is a lost ack.
    let mut lost = good.clone();
    lost.remove(3);
    let v = check(&history, &replicas(lost));
    assert!(
        v.iter()
            .any(|m| m.contains("acknowledged \"e\" at 3 is missing")),
        "{v:?}"
    );
    // Acknowledged before the failover, truncated by a new leader that did not have it.
    let mut diverged = good.clone();
    diverged[1].1 = "x".into();
    let v = check(&history, &replicas(diverged));
    assert!(v.iter().any(|m| m.contains("offset 1 holds")), "{v:?}");
    assert!(v.iter().any(|m| m.contains("never sent")), "{v:?}");
    // A refused append stored anyway.
    let mut refused = good.clone();
    refused[2].1 = "d".into();
    let v = check(&history, &replicas(refused));
    assert!(
        v.iter()
            .any(|m| m.contains("was refused, yet it is stored")),
        "{v:?}"
    );
    // A retry stored twice.
    let mut twice = good.clone();
    twice.push((4, "e".into()));
    let v = check(&history, &replicas(twice));
    assert!(v.iter().any(|m| m.contains("stored twice")), "{v:?}");
    // A hole.
    let mut hole = good.clone();
    hole[3].0 = 7;
    let v = check(&history, &replicas(hole));
    assert!(v.iter().any(|m| m.contains("not dense")), "{v:?}");
}
