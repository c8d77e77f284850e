//! Arbitrary bytes into `format::batch::decode`. Whatever it accepts must be a canonical batch:
//! re-encoding its header fields, producer metadata and records reproduces the accepted bytes
//! exactly.
//!
//! The crc32c covers the whole batch, so nearly every mutation of a valid input is rejected at
//! the checksum and the checks behind it are never reached. Each input is therefore decoded
//! twice: as given, and (if it is long enough to have a header) with its checksum repaired.
#![no_main]

use libfuzzer_sys::fuzz_target;
use format::batch::{self, BATCH_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = with_valid_crc(data) {
        check(&fixed);
    }
});

/// `data` with the header's crc32c field set to the checksum of the batch it declares (cut
/// short at the end of `data`), or `None` if it has no header or the checksum is already right.
fn with_valid_crc(data: &[u8]) -> Option<Vec<u8>> {
    let h = batch::header(data).ok()?;
    let end = h.batch_len().min(data.len());
    let crc = batch::compute_crc(&data[..end]);
    if crc == h.crc32c.get() {
        return None;
    }
    let mut fixed = data.to_vec();
    fixed[4..8].copy_from_slice(&crc.to_le_bytes());
    Some(fixed)
}

fn check(data: &[u8]) {
    let Ok(view) = batch::decode(data) else {
        return;
    };
    let bytes = view.as_bytes();
    let h = view.header();

    // The view is a prefix of the input, exactly one batch long.
    assert!(view.len() <= data.len());
    assert_eq!(view.len(), bytes.len());
    assert_eq!(bytes, &data[..bytes.len()]);
    assert_eq!(view.len(), h.batch_len());
    assert!(view.len() >= BATCH_HEADER_LEN);

    // Exactly `record_count` records, at consecutive offsets from `base_offset`.
    let count = h.record_count();
    assert!(count >= 1, "accepted a batch with no records");
    let base = h.base_offset().0;
    let mut values: Vec<&[u8]> = Vec::with_capacity(count as usize);
    for (i, r) in view.records().enumerate() {
        assert_eq!(
            Some(r.offset.0),
            base.checked_add(i as u64),
            "record {i} has the wrong offset"
        );
        values.push(r.value);
    }
    assert_eq!(values.len() as u64, u64::from(count));

    // Producer metadata exactly when the flag is set, with every record's sequence in range.
    let producer = view.producer();
    assert_eq!(producer.is_some(), h.has_producer());
    if let Some(p) = producer {
        assert!(p.first_sequence.checked_add(u64::from(count) - 1).is_some());
    }

    // Re-encoding from the decoded fields gives back the very same bytes.
    let again = batch::encode_with(
        h.base_offset(),
        h.epoch(),
        h.timestamp_us.get(),
        producer,
        &values,
    );
    assert_eq!(
        again.as_slice(),
        bytes,
        "decode accepted a non-canonical batch"
    );

    // The batch decodes the same on its own, without whatever followed it in `data`.
    let alone = batch::decode(bytes).expect("the accepted prefix alone does not decode");
    assert_eq!(alone.as_bytes(), bytes);
    assert!(alone.records().eq(view.records()));
    assert_eq!(alone.producer(), producer);
}
