//! Records out of the batches of a `Batches` frame.

use bytes::Bytes;
use format::batch;

use crate::{Error, Result};

/// One record read from a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRecord {
    /// The record's offset in the log.
    pub offset: u64,
    /// The leader epoch the record was appended in.
    pub epoch: u64,
    /// When the record's batch was appended, in microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// The record's bytes (shares the memory of the answer it came in).
    pub value: Bytes,
}

/// Validate the batches of a `Batches` frame that answers a read (or continues a tail) at `from`,
/// and return them.
///
/// Every batch is decoded and crc-checked ([`batch::decode`]); the batches must be contiguous,
/// the first must contain `from`, and the last must end at `next_offset` (an answer without
/// batches must have `next_offset == from`). Any failure is [`Error::Corrupt`].
pub(crate) fn check_batches<'a>(
    log: &str,
    batches: &'a [u8],
    from: u64,
    next_offset: u64,
) -> Result<Vec<batch::BatchView<'a>>> {
    let corrupt = |what: String| Error::Corrupt(format!("read of log {log:?} at {from}: {what}"));
    let mut views = Vec::new();
    let mut pos = 0usize;
    let mut expected_base: Option<u64> = None;
    while pos < batches.len() {
        let view = batch::decode(&batches[pos..])
            .map_err(|e| corrupt(format!("batch at byte {pos}: {e}")))?;
        let header = view.header();
        let base = header.base_offset().0;
        let end = header.next_offset().0;
        match expected_base {
            None if !(base <= from && from < end) => {
                return Err(corrupt(format!(
                    "first batch holds offsets {base}..{end}, not the offset asked for"
                )));
            }
            Some(expected) if base != expected => {
                return Err(corrupt(format!(
                    "batch at byte {pos} starts at offset {base}, expected {expected}"
                )));
            }
            _ => {}
        }
        expected_base = Some(end);
        views.push(view);
        pos += view.len();
    }
    let end = expected_base.unwrap_or(from);
    if end != next_offset {
        return Err(corrupt(format!(
            "the batches end at offset {end} but the answer says the next offset is {next_offset}"
        )));
    }
    Ok(views)
}

/// The batches of a read answer at `from`, validated by [`check_batches`], each as a whole
/// batch exactly as stored (sharing the memory of the answer).
pub(crate) fn split_batches(
    log: &str,
    batches: &Bytes,
    from: u64,
    next_offset: u64,
) -> Result<Vec<Bytes>> {
    let views = check_batches(log, batches, from, next_offset)?;
    Ok(views
        .into_iter()
        .map(|view| batches.slice_ref(view.as_bytes()))
        .collect())
}

/// The records at or above `from` of the batches of a read answer (or of a tail frame) at
/// `from`, validated by [`check_batches`]. If any batch fails its checks, no record is returned.
pub(crate) fn extract_records(
    log: &str,
    batches: &Bytes,
    from: u64,
    next_offset: u64,
) -> Result<Vec<ReadRecord>> {
    let views = check_batches(log, batches, from, next_offset)?;
    let mut records = Vec::new();
    for view in views {
        let header = view.header();
        let epoch = header.epoch().0;
        let timestamp_us = header.timestamp_us.get();
        records.extend(
            view.records()
                .filter(|r| r.offset.0 >= from)
                .map(|r| ReadRecord {
                    offset: r.offset.0,
                    epoch,
                    timestamp_us,
                    value: batches.slice_ref(r.value),
                }),
        );
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use format::{Epoch, Offset, ProducerMeta};
    use std::num::NonZeroU64;

    fn batches(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    fn values(records: &[ReadRecord]) -> Vec<(u64, &[u8])> {
        records
            .iter()
            .map(|r| (r.offset, r.value.as_ref()))
            .collect()
    }

    #[test]
    fn skips_records_below_from_and_keeps_metadata() {
        let b = batches(&[
            &batch::encode(Offset(10), Epoch(2), 111, &[b"a".as_slice(), b"b", b"c"]),
            &batch::encode_with(
                Offset(13),
                Epoch(3),
                222,
                Some(ProducerMeta {
                    producer_id: NonZeroU64::new(7).unwrap(),
                    first_sequence: 0,
                }),
                &[b"d".as_slice(), b""],
            ),
        ]);
        let records = extract_records("l", &b, 11, 15).unwrap();
        assert_eq!(
            values(&records),
            [(11, b"b".as_slice()), (12, b"c"), (13, b"d"), (14, b"")]
        );
        assert_eq!((records[0].epoch, records[0].timestamp_us), (2, 111));
        assert_eq!((records[2].epoch, records[2].timestamp_us), (3, 222));

        // From the start of the batch: nothing is skipped.
        assert_eq!(extract_records("l", &b, 10, 15).unwrap().len(), 5);
        // An empty answer.
        assert!(extract_records("l", &Bytes::new(), 15, 15)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn crc_failure_is_corrupt() {
        let good = batch::encode(Offset(0), Epoch(1), 1, &[b"hello".as_slice()]);
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x20;
        let err = extract_records("l", &batches(&[&bad]), 0, 1).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt(m) if m.contains("checksum")),
            "{err}"
        );

        // A damaged second batch fails the whole answer: nothing of it is delivered.
        let mut second = batch::encode(Offset(1), Epoch(1), 1, &[b"x".as_slice()]);
        second[20] ^= 1;
        let err = extract_records("l", &batches(&[&good, &second]), 0, 2).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err}");

        // Trailing garbage shorter than a header.
        let mut b = good.clone();
        b.extend_from_slice(&[0; 7]);
        assert!(matches!(
            extract_records("l", &Bytes::from(b), 0, 1),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn offsets_must_be_contiguous_and_match_the_answer() {
        let a = batch::encode(Offset(0), Epoch(1), 1, &[b"a".as_slice(), b"b"]);
        let b = batch::encode(Offset(2), Epoch(1), 1, &[b"c".as_slice()]);
        let gap = batch::encode(Offset(5), Epoch(1), 1, &[b"z".as_slice()]);
        assert_eq!(
            extract_records("l", &batches(&[&a, &b]), 1, 3)
                .unwrap()
                .len(),
            2
        );
        let corrupt = |r: Result<Vec<ReadRecord>>| matches!(r, Err(Error::Corrupt(_)));
        // A hole between batches.
        assert!(corrupt(extract_records("l", &batches(&[&a, &gap]), 0, 6)));
        // The first batch does not contain `from`.
        assert!(corrupt(extract_records("l", &batches(&[&b]), 0, 3)));
        assert!(corrupt(extract_records("l", &batches(&[&a]), 2, 2)));
        // next_offset disagrees with the batches.
        assert!(corrupt(extract_records("l", &batches(&[&a]), 0, 3)));
        assert!(corrupt(extract_records("l", &Bytes::new(), 4, 5)));
    }
}
