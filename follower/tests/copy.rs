//! The local copy's files: the recovering marker, and the replacement of a copy at bootstrap.

mod common;

use common::config;
use follower::copy;
use log_core::{Epoch, Log, Offset};

#[test]
fn the_recovering_marker_is_set_durably_and_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("logs").join("orders");
    assert!(!copy::is_recovering(&log_dir));
    // The directory does not exist yet: marking creates it.
    copy::mark_recovering(&log_dir).unwrap();
    assert!(copy::is_recovering(&log_dir));
    assert!(log_dir.join(copy::RECOVERING_FILE).exists());
    copy::clear_recovering(&log_dir).unwrap();
    assert!(!copy::is_recovering(&log_dir));
    // Clearing a copy that is not recovering is an error that names the file.
    let err = copy::clear_recovering(&log_dir).unwrap_err();
    assert!(err.to_string().contains(copy::RECOVERING_FILE), "{err}");
}

#[test]
fn a_replaced_copy_starts_where_the_leader_starts_and_keeps_nothing_of_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    tokio_uring::start(async {
        let log = Log::open(logs.join("orders"), config()).await.unwrap();
        log.try_append(Epoch(1), &[b"old".as_slice(), b"records"])
            .unwrap();
        log.wait_flushed(log.next_offset()).await.unwrap();
        log.close().await.unwrap();
        // A copy left aside by a replacement that a crash cut short goes too.
        std::fs::create_dir_all(logs.join(".orders.replaced")).unwrap();

        let log = copy::replace(&logs, "orders", Offset(40), config())
            .await
            .unwrap();
        assert_eq!(
            (log.start_offset(), log.next_offset()),
            (Offset(40), Offset(40))
        );
        log.try_append(Epoch(3), &[b"new".as_slice()]).unwrap();
        log.wait_flushed(log.next_offset()).await.unwrap();
        log.close().await.unwrap();
        assert!(!logs.join(".orders.replaced").exists());

        let log = Log::open(logs.join("orders"), config()).await.unwrap();
        assert_eq!(
            (log.start_offset(), log.next_offset()),
            (Offset(40), Offset(41))
        );
        log.close().await.unwrap();
    });
}
