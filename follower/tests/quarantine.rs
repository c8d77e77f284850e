//! A divergent suffix is copied to quarantine, byte for byte, with a report that says what it
//! was, before it is truncated; the reports are listed back.

mod common;

use common::config;
use follower::quarantine;
use log_core::{batch, Epoch, Log, Offset};

#[test]
fn a_suffix_is_kept_whole_and_reported_before_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let qdir = dir.path().join("quarantine");
    tokio_uring::start(async {
        let log = Log::open(dir.path().join("orders"), config())
            .await
            .unwrap();
        // 20 records of epoch 1, then 10 of epoch 2 (the suffix a new leader never had), over
        // several segments.
        for i in 0..15u32 {
            let epoch = if i < 10 { Epoch(1) } else { Epoch(2) };
            let rec = vec![i as u8; 700];
            log.try_append(epoch, &[&rec, &rec]).unwrap();
        }
        log.wait_flushed(log.next_offset()).await.unwrap();
        assert_eq!(log.next_offset(), Offset(30));
        let suffix: Vec<u8> = log
            .read(Offset(20), log.end_offset(), usize::MAX)
            .unwrap()
            .batches
            .iter()
            .flat_map(|b| b.to_vec())
            .collect();

        let r = quarantine::save(&log, "orders", 20, &qdir)
            .unwrap()
            .unwrap();
        assert_eq!((r.from, r.to, r.records), (20, 30, 10));
        assert_eq!(r.epochs, vec![2]);
        assert_eq!(r.bytes, suffix.len() as u64);
        // The file holds the batches as stored: each still passes its crc check.
        let kept = std::fs::read(&r.file).unwrap();
        assert_eq!(kept, suffix);
        let mut rest = &kept[..];
        let mut records = 0;
        while !rest.is_empty() {
            let view = batch::decode(rest).expect("a whole, valid batch");
            records += view.header().record_count();
            rest = &rest[view.header().batch_len()..];
        }
        assert_eq!(records, 10);
        log.truncate_after(Offset(20)).await.unwrap();
        assert_eq!(log.next_offset(), Offset(20));

        // Nothing after the end: nothing to keep.
        assert_eq!(quarantine::save(&log, "orders", 20, &qdir).unwrap(), None);
        // A suffix starting inside a batch keeps the batch, counting only what is truncated.
        let r2 = quarantine::save(&log, "orders", 19, &qdir)
            .unwrap()
            .unwrap();
        assert_eq!((r2.from, r2.to, r2.records), (19, 20, 1));
        assert_eq!(r2.epochs, vec![1]);
        log.close().await.unwrap();
    });
    let listed = quarantine::list(&qdir);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed.iter().map(|r| r.from).collect::<Vec<_>>().len(), 2);
    assert!(listed.iter().all(|r| r.log == "orders"));
    assert!(listed
        .iter()
        .any(|r| (r.from, r.to, r.epochs.clone()) == (20, 30, vec![2])));
    // A damaged report is skipped, not misread.
    let bad = listed[0].file.with_extension("report");
    std::fs::write(&bad, "replog-quarantine 1\nlog orders\nfrom x to y\n").unwrap();
    assert_eq!(quarantine::list(&qdir).len(), 1);
}
