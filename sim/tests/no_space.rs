//! The controller on a full disk: it holds the write and tries it again after pauses that
//! double from `NO_SPACE_RETRY_MIN` and stop growing at `NO_SPACE_RETRY_MAX`, and resumes
//! within one pause once space returns.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use node_core::controller::core::{
    ControllerCore, CoreConfig, ProposeError, NO_SPACE_RETRY_MAX, NO_SPACE_RETRY_MIN,
};
use node_core::controller::meta::{Command, Member};
use sim::disk::{RaftDisk, SimRaftStore};

const STEP_MS: u64 = 10;

#[test]
fn a_full_controller_disk_is_retried_with_pauses_doubling_up_to_no_space_retry_max() {
    let disk = Rc::new(RefCell::new(RaftDisk::default()));
    let members = BTreeMap::from([(
        "a".to_string(),
        Member {
            raft_id: 1,
            addr: "127.0.0.1:1".into(),
        },
    )]);
    let mut core = ControllerCore::new(
        CoreConfig {
            node_id: "a".into(),
            members,
            failover: None,
            election_ticks: (10, 20),
            cluster_id: "c1".into(),
        },
        SimRaftStore::open(disk.clone(), &[1]),
        0,
    )
    .unwrap();
    let now = std::cell::Cell::new(0);
    let step = |core: &mut ControllerCore<SimRaftStore>| {
        now.set(now.get() + STEP_MS);
        core.tick(now.get());
        core.process(now.get()).unwrap();
        now.get()
    };
    while core.meta().cluster_id.is_empty() {
        assert!(step(&mut core) < 60_000, "a one-member cluster forms");
    }
    core.take_outcomes();

    disk.borrow_mut().full = true;
    let id = core
        .propose(Command::Withdraw {
            log: "l".into(),
            node: "a".into(),
        })
        .unwrap();
    // Each refused write, by when it was made.
    let mut attempts = Vec::new();
    let mut seen = 0;
    let until = step(&mut core) + 60_000;
    loop {
        let refused = disk.borrow().refused;
        if refused > seen {
            seen = refused;
            attempts.push(now.get());
        }
        if step(&mut core) > until {
            break;
        }
    }
    assert!(core.no_space().is_some());
    assert!(matches!(
        core.propose(Command::Withdraw {
            log: "l".into(),
            node: "a".into(),
        }),
        Err(ProposeError::NoSpace(e)) if e.no_space
    ));
    let (min, max) = (
        NO_SPACE_RETRY_MIN.as_millis() as u64,
        NO_SPACE_RETRY_MAX.as_millis() as u64,
    );
    let pauses: Vec<u64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    let mut expected = min;
    for (i, p) in pauses.iter().enumerate() {
        assert!(
            (expected..=expected + STEP_MS).contains(p),
            "pause {i} is {p} ms, expected {expected}: {pauses:?}"
        );
        expected = (expected * 2).min(max);
    }
    // The pauses reached the cap and stayed there.
    assert!(
        pauses.iter().filter(|p| **p >= max).count() >= 3,
        "{pauses:?}"
    );

    // Space returns: the held write is made within one pause, and the proposal applies.
    disk.borrow_mut().full = false;
    let freed = now.get();
    while core.no_space().is_some() {
        assert!(
            step(&mut core) <= freed + max + STEP_MS,
            "resumed within one pause"
        );
    }
    let mut outcomes = Vec::new();
    while outcomes.is_empty() {
        step(&mut core);
        outcomes = core.take_outcomes();
    }
    assert_eq!(outcomes[0].0, id);
}
