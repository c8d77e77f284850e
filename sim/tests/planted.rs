//! The checker finds what it claims to find: each planted bug (`protocol::planted`) is caught
//! within a few simulated hours, by the check that names its kind of failure. Runs with the
//! `planted-bugs` feature (as `cargo test --workspace --all-features` builds it).
#![cfg(feature = "planted-bugs")]

use protocol::planted::Bug;
use sim::{run_planted, Config, Failure};

/// Run seeds 1, 2, ... with `bug` planted until one fails; at most `seeds` runs.
fn finds(bug: Bug, cfg: &Config, seeds: u64) -> Failure {
    for seed in 1..=seeds {
        if let Err(f) = run_planted(seed, cfg, bug) {
            eprintln!("{bug:?}: seed {seed}: {}", f.violations[0]);
            return f;
        }
    }
    panic!(
        "{bug:?} planted, and {seeds} runs of {} ms found nothing",
        cfg.duration_ms
    );
}

fn minutes(m: u64) -> Config {
    Config {
        duration_ms: m * 60_000,
        ..Config::default()
    }
}

fn says(f: &Failure, words: &[&str]) -> bool {
    f.violations
        .iter()
        .any(|v| words.iter().all(|w| v.contains(w)))
}

#[test]
fn an_ack_before_the_followers_fsync_makes_a_receipt_name_a_holder_that_is_not_durable() {
    let f = finds(Bug::AckBeforeFollowerFsync, &minutes(10), 4);
    assert!(says(&f, &["receipt", "durably up to"]), "{f}");
}

#[test]
fn lag_judged_by_last_heard_loses_the_sync_set_of_an_idle_log() {
    let f = finds(Bug::LagByLastHeard, &minutes(5), 4);
    assert!(says(&f, &["did not succeed at the first attempt"]), "{f}");
}

#[test]
fn an_election_outside_the_sync_set_loses_acknowledged_records() {
    let f = finds(Bug::ElectOutsideSyncSet, &minutes(60), 8);
    let lost = says(&f, &["below the record", "acknowledged"])
        || says(&f, &["truncated", "acknowledged"])
        || says(&f, &["lost record"]);
    assert!(lost, "{f}");
}

#[test]
fn a_commit_offset_from_the_leaders_written_end_makes_a_receipt_untrue() {
    let f = finds(Bug::CommitFromWrittenEnd, &minutes(10), 4);
    assert!(says(&f, &["receipt", "durably up to"]), "{f}");
}

#[test]
fn a_stale_epoch_append_is_acknowledged_after_its_epoch_ended() {
    let f = finds(Bug::StaleEpochAccepted, &minutes(60), 12);
    assert!(says(&f, &["acknowledged", "after epoch"]), "{f}");
}

#[test]
fn truncating_below_the_commit_offset_removes_acknowledged_records() {
    let f = finds(Bug::TruncateBelowCommit, &minutes(10), 4);
    assert!(says(&f, &["truncated", "acknowledged"]), "{f}");
}

#[test]
fn a_lease_without_a_drift_margin_acknowledges_after_the_next_epoch_began() {
    // Clocks that drift up to 15% and a long leader_timeout widen the window the missing
    // margin leaves; the real lease (half of leader_timeout) stays safe with them (the soak
    // runs the same settings without the bug).
    let cfg = Config {
        leader_timeout_ms: 6_000,
        drift: 0.15,
        ..minutes(60)
    };
    let f = finds(Bug::LeaseWithoutMargin, &cfg, 12);
    assert!(says(&f, &["acknowledged", "after epoch"]), "{f}");
}

#[test]
fn a_forgotten_producer_stores_a_retried_append_twice() {
    let f = finds(Bug::IdempotentTwice, &minutes(20), 8);
    assert!(says(&f, &["stored twice"]), "{f}");
}

#[test]
fn retention_past_the_latest_snapshot_leaves_a_reader_without_the_records_after_it() {
    // Snapshots far apart: the latest often lies more than retention keeps below the commit
    // offset, so only its pin holds retention back.
    let cfg = Config {
        snapshot_every_records: 5_000,
        ..minutes(30)
    };
    let f = finds(Bug::SnapshotUnpinned, &cfg, 8);
    assert!(says(&f, &["past its latest snapshot"]), "{f}");
}
