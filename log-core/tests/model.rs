//! Property test: random append / flush / read / truncate / purge / reopen sequences against a
//! simple in-memory model of what the log must contain.

mod common;

use common::small_config;
use log_core::{Epoch, Log, Offset};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Append {
        records: Vec<Vec<u8>>,
        new_epoch: bool,
    },
    Flush,
    Read {
        from: u16,
        bytes_max: u16,
    },
    Truncate {
        to: u16,
    },
    Purge {
        before: u16,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..700), 1..6), proptest::bool::weighted(0.1))
            .prop_map(|(records, new_epoch)| Op::Append { records, new_epoch }),
        2 => Just(Op::Flush),
        3 => (any::<u16>(), any::<u16>()).prop_map(|(from, bytes_max)| Op::Read { from, bytes_max }),
        1 => any::<u16>().prop_map(|to| Op::Truncate { to }),
        1 => any::<u16>().prop_map(|before| Op::Purge { before }),
        1 => Just(Op::Reopen),
    ]
}

/// The model: batches in order, each (base offset, epoch, records).
#[derive(Default, Debug)]
struct Model {
    start: u64,
    batches: Vec<(u64, u64, Vec<Vec<u8>>)>,
    epoch: u64,
}

impl Model {
    fn end(&self) -> u64 {
        self.batches
            .last()
            .map_or(self.start, |(b, _, r)| b + r.len() as u64)
    }
    fn record(&self, offset: u64) -> Option<&[u8]> {
        self.batches
            .iter()
            .find(|(b, _, r)| offset >= *b && offset < b + r.len() as u64)
            .map(|(b, _, r)| r[(offset - b) as usize].as_slice())
    }
    /// Batch boundaries from `start` to the end, inclusive.
    fn boundaries(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.batches.iter().map(|(b, _, _)| *b).collect();
        v.push(self.end());
        v.retain(|b| *b >= self.start);
        v
    }
}

fn pick(n: u16, len: usize) -> usize {
    n as usize % len.max(1)
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let mut log = Log::open(dir.path(), small_config()).await.unwrap();
        let mut m = Model {
            epoch: 1,
            ..Model::default()
        };
        for op in ops {
            match op {
                Op::Append { records, new_epoch } => {
                    if new_epoch {
                        m.epoch += 1;
                    }
                    let a = log.append(Epoch(m.epoch), &records).await.unwrap();
                    assert_eq!(a.first.0, m.end());
                    m.batches.push((a.first.0, m.epoch, records));
                }
                Op::Flush => {
                    log.wait_flushed(Offset(m.end())).await.unwrap();
                    assert!(log.flush_offset().0 >= m.end());
                }
                Op::Read { from, bytes_max } => {
                    log.wait_written(Offset(m.end())).await.unwrap();
                    let span = m.end() - m.start + 1;
                    let from = m.start + u64::from(from) % span;
                    let r = log
                        .read(Offset(from), Offset(u64::MAX), usize::from(bytes_max))
                        .unwrap();
                    if from < m.end() {
                        assert!(!r.batches.is_empty());
                    }
                    let mut expect = from;
                    for b in &r.batches {
                        for rec in b.view().records() {
                            if rec.offset.0 >= from {
                                assert_eq!(rec.offset.0, expect);
                                assert_eq!(Some(rec.value), m.record(expect), "offset {expect}");
                                expect += 1;
                            }
                        }
                    }
                    assert_eq!(r.next_offset.0, expect.max(from));
                }
                Op::Truncate { to } => {
                    let bounds = m.boundaries();
                    let to = bounds[pick(to, bounds.len())];
                    log.truncate_after(Offset(to)).await.unwrap();
                    m.batches.retain(|(b, _, _)| *b < to);
                    assert_eq!(log.end_offset().0, to);
                }
                Op::Purge { before } => {
                    let span = m.end() - m.start + 1;
                    let before = m.start + u64::from(before) % span;
                    let start = log.purge_before(Offset(before)).unwrap().0;
                    assert!(start >= m.start && start <= before.max(m.start));
                    assert!(
                        m.boundaries().contains(&start),
                        "start {start} is a batch boundary"
                    );
                    m.start = start;
                    m.batches.retain(|(b, _, _)| *b >= start);
                }
                Op::Reopen => {
                    log.wait_flushed(Offset(m.end())).await.unwrap();
                    log.close().await.unwrap();
                    log = Log::open(dir.path(), small_config()).await.unwrap();
                    assert!(log.recovery_report().torn_tail.is_none());
                }
            }
            assert_eq!(log.next_offset().0, m.end());
            assert_eq!(log.start_offset().0, m.start);
        }
        // Final full comparison, after a reopen.
        log.wait_flushed(Offset(m.end())).await.unwrap();
        log.close().await.unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let got = common::read_all(&log, Offset(m.start));
        let want: Vec<(u64, Vec<u8>)> = m
            .batches
            .iter()
            .flat_map(|(b, _, r)| {
                r.iter()
                    .enumerate()
                    .map(move |(i, v)| (b + i as u64, v.clone()))
            })
            .collect();
        assert_eq!(got, want);
        // The epoch history agrees with the batches: the entry in force at each batch's base
        // offset names that batch's epoch.
        let history = log.epoch_history();
        for (b, e, _) in &m.batches {
            let i = history.partition_point(|h| h.start_offset.0 <= *b);
            assert!(i > 0, "no epoch recorded for offset {b}");
            assert_eq!(history[i - 1].epoch.0, *e, "epoch at offset {b}");
        }
        log.close().await.unwrap();
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
