//! A replica fed frames built from a real leader log: stored verbatim, or refused with nothing
//! written.

mod common;

use bytes::{Bytes, BytesMut};
use common::config;
use follower::{ApplyError, Replica};
use log_core::{Epoch, Log, Offset};
use protocol::replication::Refusal;
use protocol::ReplicatedResponse;

/// The leader's batches from `from` to its end, as one frame.
fn frame(leader: &Log, from: u64, epoch: u64, commit: u64) -> ReplicatedResponse {
    let read = leader
        .read(Offset(from), leader.end_offset(), usize::MAX)
        .unwrap();
    let mut batches = BytesMut::new();
    for b in &read.batches {
        batches.extend_from_slice(b);
    }
    ReplicatedResponse {
        epoch,
        commit,
        next_offset: read.next_offset.0,
        batches: batches.freeze(),
    }
}

fn all_bytes(log: &Log) -> Vec<u8> {
    let read = log
        .read(log.start_offset(), log.end_offset(), usize::MAX)
        .unwrap();
    read.batches.iter().flat_map(|b| b.to_vec()).collect()
}

#[test]
fn frames_are_stored_verbatim_or_refused_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let leader = Log::open(dir.path().join("leader"), config())
            .await
            .unwrap();
        for i in 0..40u32 {
            let epoch = if i < 20 { Epoch(1) } else { Epoch(2) };
            let rec = vec![i as u8; 300];
            leader.try_append(epoch, &[&rec, &rec]).unwrap();
        }
        leader.wait_flushed(leader.next_offset()).await.unwrap();
        let mut replica = Replica::new(
            Log::open(dir.path().join("follower"), config())
                .await
                .unwrap(),
        );

        // A stale epoch (the replica has seen epoch 2 below), a bad crc, a gap, a lying
        // next_offset and a batch from a later epoch than its frame: each refused, log untouched.
        let good = frame(&leader, 0, 2, 40);
        let mut corrupt = good.batches.to_vec();
        corrupt[100] ^= 0x01;
        let bad_crc = ReplicatedResponse {
            batches: Bytes::from(corrupt),
            ..good.clone()
        };
        assert!(matches!(
            replica.apply(&bad_crc).await,
            Err(ApplyError::Corrupt { .. })
        ));
        let later = frame(&leader, 10, 2, 40);
        assert!(matches!(
            replica.apply(&later).await,
            Err(ApplyError::Refused(Refusal::Gap {
                expected: 0,
                got: 10
            }))
        ));
        let lying = ReplicatedResponse {
            next_offset: 7,
            ..good.clone()
        };
        assert!(matches!(
            replica.apply(&lying).await,
            Err(ApplyError::BadNextOffset { .. })
        ));
        let future = ReplicatedResponse {
            epoch: 1,
            ..good.clone()
        };
        assert!(matches!(
            replica.apply(&future).await,
            Err(ApplyError::Refused(Refusal::FutureBatchEpoch {
                frame: 1,
                batch: 2
            }))
        ));
        assert_eq!(
            replica.log().next_offset(),
            Offset(0),
            "nothing was written"
        );

        // The good frame: stored byte for byte, then acknowledged once durable.
        assert_eq!(replica.apply(&good).await.unwrap().end, 80);
        assert_eq!(replica.sync().await.unwrap(), Some(80));
        assert_eq!(replica.sync().await.unwrap(), None);
        assert_eq!(all_bytes(replica.log()), all_bytes(&leader));
        assert_eq!(
            replica.readable(),
            Offset(40),
            "readers see only the leader's commit"
        );
        assert_eq!(replica.log().epoch_history(), leader.epoch_history());

        // A deposed leader (epoch 1) is refused from now on, even for a frame that fits.
        leader.try_append(Epoch(2), &[b"more"]).unwrap();
        let stale = ReplicatedResponse {
            epoch: 1,
            ..frame(&leader, 80, 1, 80)
        };
        let before = replica.log().next_offset();
        assert!(matches!(
            replica.apply(&stale).await,
            Err(ApplyError::Refused(Refusal::StaleEpoch { seen: 2, got: 1 }))
                | Err(ApplyError::Refused(Refusal::FutureBatchEpoch { .. }))
        ));
        assert_eq!(replica.log().next_offset(), before);
        leader.close().await.unwrap();
        replica.into_log().close().await.unwrap();
    });
}

#[test]
fn a_replica_resumes_where_its_log_ends_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let leader = Log::open(dir.path().join("leader"), config())
            .await
            .unwrap();
        leader.try_append(Epoch(3), &[b"a", b"b"]).unwrap();
        leader.wait_flushed(Offset(2)).await.unwrap();
        {
            let mut replica =
                Replica::new(Log::open(dir.path().join("f"), config()).await.unwrap());
            replica.apply(&frame(&leader, 0, 3, 2)).await.unwrap();
            replica.sync().await.unwrap();
            replica.into_log().close().await.unwrap();
        }
        leader.try_append(Epoch(3), &[b"c"]).unwrap();
        leader.wait_flushed(Offset(3)).await.unwrap();
        let mut replica = Replica::new(Log::open(dir.path().join("f"), config()).await.unwrap());
        assert_eq!(replica.state().epoch(), 3);
        // Resending what it already has is a gap (it expects offset 2), so nothing doubles.
        assert!(matches!(
            replica.apply(&frame(&leader, 0, 3, 3)).await,
            Err(ApplyError::Refused(Refusal::Gap {
                expected: 2,
                got: 0
            }))
        ));
        assert_eq!(
            replica.apply(&frame(&leader, 2, 3, 3)).await.unwrap().end,
            3
        );
        assert_eq!(replica.sync().await.unwrap(), Some(3));
        assert_eq!(all_bytes(replica.log()), all_bytes(&leader));
        leader.close().await.unwrap();
        replica.into_log().close().await.unwrap();
    });
}
