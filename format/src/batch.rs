//! The batch format: a fixed 48-byte little-endian header followed by length-prefixed records.
//!
//! ```text
//! 0  magic          u32  "RPLG"
//! 4  crc32c         u32  over bytes 8..48 of the header and the whole payload
//! 8  version        u16  FORMAT_VERSION
//! 10 flags          u16  FLAG_PRODUCER or 0; every other bit must be 0
//! 12 record_count   u32  >= 1
//! 16 base_offset    u64  offset of the first record
//! 24 epoch          u64  leader epoch the batch was appended in
//! 32 timestamp_us   u64  append time, microseconds since the Unix epoch
//! 40 payload_len    u32  bytes after the header
//! 44 reserved       u32  0
//! 48 payload        [producer prefix] then record_count x (len: u32, bytes)
//! ```
//!
//! With [`FLAG_PRODUCER`] set, the payload starts with a 16-byte producer prefix (counted in
//! `payload_len`, covered by the crc):
//!
//! ```text
//! 0  producer_id     u64  non-zero; 0 means "no producer" and is refused
//! 8  first_sequence  u64  sequence of the first record; record i has first_sequence + i
//! ```
//! The layout is the on-disk format and the replication wire format: followers store the
//! leader's bytes verbatim. `docs/log-format.md` is the reference.

use std::num::NonZeroU64;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::types::{Epoch, Offset};

/// Size of [`BatchHeader`] in bytes.
pub const BATCH_HEADER_LEN: usize = 48;
/// `b"RPLG"` read as a little-endian u32.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"RPLG");
/// The only batch format version this build writes and reads.
pub const BATCH_FORMAT_VERSION: u16 = 1;
/// Hard upper bound on `payload_len` that the decoder accepts, whatever the configuration: a
/// length beyond it is damage, not a big batch, and is rejected before anything is allocated.
pub const BATCH_PAYLOAD_BYTES_MAX: usize = 64 << 20;
/// Bytes of the length prefix in front of every record.
pub const RECORD_PREFIX_LEN: usize = 4;
/// Header `flags` bit: the payload starts with a producer prefix ([`ProducerMeta`]).
pub const FLAG_PRODUCER: u16 = 0x0001;
/// Every `flags` bit this build understands; a batch with any other bit set is refused.
pub const KNOWN_FLAGS: u16 = FLAG_PRODUCER;
/// Bytes of the producer prefix at the start of the payload when [`FLAG_PRODUCER`] is set:
/// `producer_id` u64, then `first_sequence` u64.
pub const PRODUCER_PREFIX_LEN: usize = 16;

/// Producer metadata a batch may carry, for an idempotent-producer layer to rebuild its
/// producer id -> last sequence table from the log.
///
/// The records of the batch have sequences `first_sequence`, `first_sequence + 1`, ... in
/// offset order. A producer id of 0 means "no producer" and cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProducerMeta {
    pub producer_id: NonZeroU64,
    /// Sequence number of the batch's first record.
    pub first_sequence: u64,
}

/// The batch header, read and written in place through `zerocopy`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct BatchHeader {
    pub magic: U32,
    pub crc32c: U32,
    pub version: U16,
    pub flags: U16,
    pub record_count: U32,
    pub base_offset: U64,
    pub epoch: U64,
    pub timestamp_us: U64,
    pub payload_len: U32,
    pub reserved: U32,
}

const _: () = assert!(std::mem::size_of::<BatchHeader>() == BATCH_HEADER_LEN);

impl BatchHeader {
    pub fn base_offset(&self) -> Offset {
        Offset(self.base_offset.get())
    }
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.get())
    }
    pub fn record_count(&self) -> u32 {
        self.record_count.get()
    }
    /// The offset after the batch's last record.
    pub fn next_offset(&self) -> Offset {
        self.base_offset().plus(u64::from(self.record_count()))
    }
    /// Header plus payload.
    pub fn batch_len(&self) -> usize {
        BATCH_HEADER_LEN + self.payload_len.get() as usize
    }
    /// True when [`FLAG_PRODUCER`] is set: the payload starts with a producer prefix.
    pub fn has_producer(&self) -> bool {
        self.flags.get() & FLAG_PRODUCER != 0
    }
    /// Bytes at the start of the payload before the first record.
    fn records_start(&self) -> usize {
        if self.has_producer() {
            PRODUCER_PREFIX_LEN
        } else {
            0
        }
    }
    /// True when every header byte is zero: the end of data in a zero-filled segment.
    pub fn is_zero(&self) -> bool {
        self.as_bytes().iter().all(|b| *b == 0)
    }
}

/// Why bytes are not a valid batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("{0} bytes is shorter than a batch header")]
    ShortHeader(usize),
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unknown batch format version {0}")]
    UnknownVersion(u16),
    #[error("payload length {len} beyond the {available} bytes available (limit {max})")]
    LengthOutOfBounds { len: u64, available: u64, max: u64 },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("record count {0} is zero or does not match the payload")]
    BadRecordCount(u32),
    #[error("reserved header field is not zero")]
    ReservedNotZero,
    #[error("unknown flag bits {0:#06x}")]
    UnknownFlags(u16),
    #[error("payload of {0} bytes is shorter than the producer prefix its flags announce")]
    ShortProducerPrefix(u32),
    #[error("producer prefix has producer id 0")]
    ZeroProducerId,
    #[error("offsets of the batch run past the largest offset")]
    OffsetOverflow,
    #[error("sequence numbers of the batch run past the largest sequence number")]
    SequenceOverflow,
}

/// A validated batch borrowed from a buffer.
#[derive(Clone, Copy, Debug)]
pub struct BatchView<'a> {
    header: &'a BatchHeader,
    /// Header and payload, exactly as stored.
    bytes: &'a [u8],
}

/// One record of a batch, with its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub offset: Offset,
    pub value: &'a [u8],
}

/// Parse only the header at the start of `bytes`, checking nothing but its size.
pub fn header(bytes: &[u8]) -> Result<&BatchHeader, BatchError> {
    let (h, _) =
        BatchHeader::ref_from_prefix(bytes).map_err(|_| BatchError::ShortHeader(bytes.len()))?;
    Ok(h)
}

/// Check the header fields that can be checked without the payload: magic, version, flags,
/// reserved field, and a length that fits in `available` bytes (counting the header) and the hard
/// limit, and holds the producer prefix if the flags announce one.
pub fn check_header(h: &BatchHeader, available: usize) -> Result<(), BatchError> {
    if h.magic.get() != BATCH_MAGIC {
        return Err(BatchError::BadMagic(h.magic.get()));
    }
    if h.version.get() != BATCH_FORMAT_VERSION {
        return Err(BatchError::UnknownVersion(h.version.get()));
    }
    let unknown = h.flags.get() & !KNOWN_FLAGS;
    if unknown != 0 {
        return Err(BatchError::UnknownFlags(unknown));
    }
    if h.reserved.get() != 0 {
        return Err(BatchError::ReservedNotZero);
    }
    let len = h.payload_len.get() as usize;
    if len > BATCH_PAYLOAD_BYTES_MAX || BATCH_HEADER_LEN + len > available {
        return Err(BatchError::LengthOutOfBounds {
            len: len as u64,
            available: available.saturating_sub(BATCH_HEADER_LEN) as u64,
            max: BATCH_PAYLOAD_BYTES_MAX as u64,
        });
    }
    if len < h.records_start() {
        return Err(BatchError::ShortProducerPrefix(len as u32));
    }
    let count = h.record_count.get();
    if count == 0 || count as usize > (len - h.records_start()) / RECORD_PREFIX_LEN {
        return Err(BatchError::BadRecordCount(count));
    }
    if h.base_offset.get().checked_add(u64::from(count)).is_none() {
        return Err(BatchError::OffsetOverflow);
    }
    Ok(())
}

/// The crc32c the header of this batch must carry.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[8..])
}

/// Decode and fully validate the batch at the start of `bytes` (which may continue past it).
pub fn decode(bytes: &[u8]) -> Result<BatchView<'_>, BatchError> {
    let h = header(bytes)?;
    check_header(h, bytes.len())?;
    let batch = &bytes[..h.batch_len()];
    let computed = compute_crc(batch);
    if computed != h.crc32c.get() {
        return Err(BatchError::ChecksumMismatch {
            stored: h.crc32c.get(),
            computed,
        });
    }
    let view = BatchView {
        header: h,
        bytes: batch,
    };
    if h.has_producer() {
        let (id, first_sequence) = read_producer_prefix(view.payload());
        if id == 0 {
            return Err(BatchError::ZeroProducerId);
        }
        if first_sequence
            .checked_add(u64::from(h.record_count()) - 1)
            .is_none()
        {
            return Err(BatchError::SequenceOverflow);
        }
    }
    // Records must tile the rest of the payload exactly, `record_count` of them.
    let mut rest = view.record_bytes();
    for _ in 0..h.record_count() {
        let Some(len) = rest.get(..RECORD_PREFIX_LEN) else {
            return Err(BatchError::BadRecordCount(h.record_count()));
        };
        let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
        if rest.len() - RECORD_PREFIX_LEN < len {
            return Err(BatchError::BadRecordCount(h.record_count()));
        }
        rest = &rest[RECORD_PREFIX_LEN + len..];
    }
    if !rest.is_empty() {
        return Err(BatchError::BadRecordCount(h.record_count()));
    }
    Ok(view)
}

/// `producer_id` and `first_sequence` from the start of a payload that holds the prefix.
fn read_producer_prefix(payload: &[u8]) -> (u64, u64) {
    let id = u64::from_le_bytes(payload[..8].try_into().unwrap());
    let first_sequence = u64::from_le_bytes(payload[8..PRODUCER_PREFIX_LEN].try_into().unwrap());
    (id, first_sequence)
}

impl<'a> BatchView<'a> {
    pub fn header(&self) -> &'a BatchHeader {
        self.header
    }
    /// Header and payload, exactly as stored.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Everything after the header: the producer prefix, if any, then the records.
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[BATCH_HEADER_LEN..]
    }
    /// The length-prefixed records: the payload after the producer prefix, if any.
    fn record_bytes(&self) -> &'a [u8] {
        &self.payload()[self.header.records_start()..]
    }
    /// The producer metadata, if the batch carries any ([`FLAG_PRODUCER`]).
    pub fn producer(&self) -> Option<ProducerMeta> {
        if !self.header.has_producer() {
            return None;
        }
        let (id, first_sequence) = read_producer_prefix(self.payload());
        Some(ProducerMeta {
            producer_id: NonZeroU64::new(id).expect("decode refuses producer id 0"),
            first_sequence,
        })
    }
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The records, in offset order. The batch was validated by [`decode`], so this cannot fail.
    /// The producer prefix, if any, is not a record.
    pub fn records(&self) -> impl Iterator<Item = Record<'a>> + 'a {
        let mut rest = self.record_bytes();
        let mut offset = self.header.base_offset();
        (0..self.header.record_count()).map(move |_| {
            let len = u32::from_le_bytes(rest[..RECORD_PREFIX_LEN].try_into().unwrap()) as usize;
            let value = &rest[RECORD_PREFIX_LEN..RECORD_PREFIX_LEN + len];
            rest = &rest[RECORD_PREFIX_LEN + len..];
            let record = Record { offset, value };
            offset = offset.plus(1);
            record
        })
    }
}

/// Encoded size of a batch holding `records`, without producer metadata.
pub fn encoded_len<R: AsRef<[u8]>>(records: &[R]) -> usize {
    encoded_len_with(None, records)
}

/// Encoded size of a batch holding `records`, with a producer prefix if `producer` is `Some`.
pub fn encoded_len_with<R: AsRef<[u8]>>(producer: Option<ProducerMeta>, records: &[R]) -> usize {
    let prefix = if producer.is_some() {
        PRODUCER_PREFIX_LEN
    } else {
        0
    };
    BATCH_HEADER_LEN
        + prefix
        + records
            .iter()
            .map(|r| RECORD_PREFIX_LEN + r.as_ref().len())
            .sum::<usize>()
}

/// Append one encoded batch, without producer metadata, to `out` (no intermediate buffer) and
/// return its header. See [`encode_into_with`].
pub fn encode_into<R: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    base_offset: Offset,
    epoch: Epoch,
    timestamp_us: u64,
    records: &[R],
) -> BatchHeader {
    encode_into_with(out, base_offset, epoch, timestamp_us, None, records)
}

/// Append one encoded batch to `out` (no intermediate buffer) and return its header. With
/// `Some(producer)`, the batch has [`FLAG_PRODUCER`] set and starts its payload with the
/// producer prefix. The caller has checked sizes against its limits, and that the offsets (and
/// sequences) of the records fit in a u64; `records` must not be empty.
pub fn encode_into_with<R: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    base_offset: Offset,
    epoch: Epoch,
    timestamp_us: u64,
    producer: Option<ProducerMeta>,
    records: &[R],
) -> BatchHeader {
    assert!(!records.is_empty(), "a batch needs at least one record");
    let start = out.len();
    let payload_len = encoded_len_with(producer, records) - BATCH_HEADER_LEN;
    assert!(payload_len <= BATCH_PAYLOAD_BYTES_MAX);
    let flags = if producer.is_some() { FLAG_PRODUCER } else { 0 };
    let mut header = BatchHeader {
        magic: BATCH_MAGIC.into(),
        crc32c: 0.into(),
        version: BATCH_FORMAT_VERSION.into(),
        flags: flags.into(),
        record_count: u32::try_from(records.len()).unwrap().into(),
        base_offset: base_offset.0.into(),
        epoch: epoch.0.into(),
        timestamp_us: timestamp_us.into(),
        payload_len: (payload_len as u32).into(),
        reserved: 0.into(),
    };
    out.extend_from_slice(header.as_bytes());
    if let Some(p) = producer {
        out.extend_from_slice(&p.producer_id.get().to_le_bytes());
        out.extend_from_slice(&p.first_sequence.to_le_bytes());
    }
    for r in records {
        let r = r.as_ref();
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        out.extend_from_slice(r);
    }
    let crc = compute_crc(&out[start..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    header.crc32c = crc.into();
    // Pair assertion: what we just wrote decodes.
    debug_assert!(decode(&out[start..]).is_ok());
    header
}

/// Encode one batch, without producer metadata, into a fresh buffer.
pub fn encode<R: AsRef<[u8]>>(
    base_offset: Offset,
    epoch: Epoch,
    timestamp_us: u64,
    records: &[R],
) -> Vec<u8> {
    encode_with(base_offset, epoch, timestamp_us, None, records)
}

/// Encode one batch into a fresh buffer, with producer metadata if `producer` is `Some`.
pub fn encode_with<R: AsRef<[u8]>>(
    base_offset: Offset,
    epoch: Epoch,
    timestamp_us: u64,
    producer: Option<ProducerMeta>,
    records: &[R],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len_with(producer, records));
    encode_into_with(
        &mut out,
        base_offset,
        epoch,
        timestamp_us,
        producer,
        records,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_is_48_bytes_and_little_endian() {
        let b = encode(Offset(0x0102), Epoch(7), 99, &[b"ab".as_slice()]);
        assert_eq!(b.len(), 48 + 4 + 2);
        assert_eq!(&b[0..4], b"RPLG");
        assert_eq!(&b[16..24], &0x0102u64.to_le_bytes());
        assert_eq!(&b[24..32], &7u64.to_le_bytes());
        assert_eq!(&b[40..44], &6u32.to_le_bytes());
        assert_eq!(&b[48..52], &2u32.to_le_bytes());
    }

    #[test]
    fn rejects_each_kind_of_damage() {
        let good = encode(Offset(5), Epoch(1), 1, &[b"hello".as_slice(), b"w"]);
        assert!(decode(&good).is_ok());
        assert!(matches!(
            decode(&good[..20]),
            Err(BatchError::ShortHeader(20))
        ));
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(decode(&b), Err(BatchError::BadMagic(_))));
        let mut b = good.clone();
        b[8] = 9;
        assert!(matches!(decode(&b), Err(BatchError::UnknownVersion(9))));
        let mut b = good.clone();
        b[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&b),
            Err(BatchError::LengthOutOfBounds { .. })
        ));
        let mut b = good.clone();
        *b.last_mut().unwrap() ^= 0x40;
        assert!(matches!(
            decode(&b),
            Err(BatchError::ChecksumMismatch { .. })
        ));
        let mut b = good.clone();
        b[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(decode(&b), Err(BatchError::BadRecordCount(0))));
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(BatchError::LengthOutOfBounds { .. })
        ));
    }

    #[test]
    fn offsets_past_the_largest_offset_are_rejected() {
        // Found by the batch_decode fuzz target: a crc-valid batch at base u64::MAX.
        let b = encode(Offset(u64::MAX - 1), Epoch(1), 0, &[b"a".as_slice()]);
        assert_eq!(decode(&b).unwrap().header().next_offset(), Offset(u64::MAX));
        let mut b = b;
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let crc = compute_crc(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&b), Err(BatchError::OffsetOverflow)));
    }

    #[test]
    fn record_lengths_must_tile_the_payload() {
        // A crc-valid batch whose record count disagrees with its records.
        let mut b = encode(Offset(0), Epoch(1), 1, &[b"abcd".as_slice(), b"ef"]);
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        let crc = compute_crc(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&b), Err(BatchError::BadRecordCount(1))));
    }

    fn producer(id: u64, first_sequence: u64) -> ProducerMeta {
        ProducerMeta {
            producer_id: NonZeroU64::new(id).unwrap(),
            first_sequence,
        }
    }

    /// `b` with its crc32c field recomputed, so that a test reaches the checks behind it.
    fn with_valid_crc(mut b: Vec<u8>) -> Vec<u8> {
        let crc = compute_crc(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn producer_prefix_layout() {
        let p = producer(0x0A0B, 0x0C0D);
        let b = encode_with(Offset(9), Epoch(3), 5, Some(p), &[b"ab".as_slice(), b"c"]);
        assert_eq!(
            b.len(),
            encoded_len_with(Some(p), &[b"ab".as_slice(), b"c"])
        );
        assert_eq!(b.len(), 48 + 16 + 4 + 2 + 4 + 1);
        assert_eq!(&b[10..12], &FLAG_PRODUCER.to_le_bytes());
        assert_eq!(&b[40..44], &27u32.to_le_bytes());
        assert_eq!(&b[48..56], &0x0A0Bu64.to_le_bytes());
        assert_eq!(&b[56..64], &0x0C0Du64.to_le_bytes());
        assert_eq!(&b[64..68], &2u32.to_le_bytes());
        assert_eq!(compute_crc(&b).to_le_bytes(), b[4..8]);
    }

    #[test]
    fn round_trip_with_and_without_producer() {
        let records = [b"hello".as_slice(), b"", b"world"];
        let plain = encode(Offset(7), Epoch(2), 11, &records);
        let view = decode(&plain).unwrap();
        assert!(!view.header().has_producer());
        assert_eq!(view.producer(), None);
        assert_eq!(plain, encode_with(Offset(7), Epoch(2), 11, None, &records));

        let p = producer(42, 1000);
        let with = encode_with(Offset(7), Epoch(2), 11, Some(p), &records);
        assert_eq!(with.len(), plain.len() + PRODUCER_PREFIX_LEN);
        let view = decode(&with).unwrap();
        assert!(view.header().has_producer());
        assert_eq!(view.producer(), Some(p));
        assert_eq!(view.header().next_offset(), Offset(10));
        assert_eq!(view.payload().len(), PRODUCER_PREFIX_LEN + plain.len() - 48);
    }

    #[test]
    fn records_skip_the_producer_prefix() {
        let records = [b"abc".as_slice(), b"defgh"];
        let b = encode_with(
            Offset(100),
            Epoch(1),
            0,
            Some(producer(u64::MAX, 0)),
            &records,
        );
        let got: Vec<Record<'_>> = decode(&b).unwrap().records().collect();
        assert_eq!(
            got,
            [
                Record {
                    offset: Offset(100),
                    value: b"abc"
                },
                Record {
                    offset: Offset(101),
                    value: b"defgh"
                },
            ]
        );
    }

    #[test]
    fn producer_prefix_too_short_is_rejected() {
        // One 8-byte record: a 12-byte payload, four bytes short of a producer prefix.
        let mut b = encode(Offset(0), Epoch(1), 1, &[[1u8; 8]]);
        b[10..12].copy_from_slice(&FLAG_PRODUCER.to_le_bytes());
        let b = with_valid_crc(b);
        assert_eq!(decode(&b).unwrap_err(), BatchError::ShortProducerPrefix(12));
        let h = header(&b).unwrap();
        assert_eq!(
            check_header(h, b.len()),
            Err(BatchError::ShortProducerPrefix(12))
        );

        // Long enough for the prefix but then no room for the record it counts.
        let mut b = encode(Offset(0), Epoch(1), 1, &[[1u8; 12]]);
        b[10..12].copy_from_slice(&FLAG_PRODUCER.to_le_bytes());
        let b = with_valid_crc(b);
        assert_eq!(decode(&b).unwrap_err(), BatchError::BadRecordCount(1));

        // The flag on a batch whose records do not start with a prefix: they no longer tile.
        let mut b = encode(Offset(0), Epoch(1), 1, &[[1u8; 8], [2u8; 8]]);
        b[10..12].copy_from_slice(&FLAG_PRODUCER.to_le_bytes());
        let b = with_valid_crc(b);
        assert!(decode(&b).is_err());
    }

    #[test]
    fn unknown_flag_bits_are_rejected() {
        for bit in 1..16 {
            for base in [0, FLAG_PRODUCER] {
                let flags = base | 1 << bit;
                let mut b = encode_with(Offset(0), Epoch(1), 1, Some(producer(1, 1)), &[b"x"]);
                b[10..12].copy_from_slice(&flags.to_le_bytes());
                let b = with_valid_crc(b);
                assert_eq!(
                    decode(&b).unwrap_err(),
                    BatchError::UnknownFlags(1 << bit),
                    "flags {flags:#06x}"
                );
            }
        }
        assert_eq!(KNOWN_FLAGS, FLAG_PRODUCER);
    }

    #[test]
    fn producer_id_zero_is_rejected() {
        let mut b = encode_with(Offset(0), Epoch(1), 1, Some(producer(5, 9)), &[b"x"]);
        b[48..56].copy_from_slice(&0u64.to_le_bytes());
        let b = with_valid_crc(b);
        assert_eq!(decode(&b).unwrap_err(), BatchError::ZeroProducerId);
    }

    #[test]
    fn sequences_past_the_largest_sequence_are_rejected() {
        let b = encode_with(
            Offset(0),
            Epoch(1),
            1,
            Some(producer(5, u64::MAX - 1)),
            &[b"x".as_slice(), b"y"],
        );
        assert_eq!(
            decode(&b).unwrap().producer().unwrap().first_sequence,
            u64::MAX - 1
        );
        let mut b = b;
        b[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        let b = with_valid_crc(b);
        assert_eq!(decode(&b).unwrap_err(), BatchError::SequenceOverflow);
    }

    proptest! {
        #[test]
        fn round_trip(base in 0u64..1 << 60, epoch in 0u64..1000, ts: u64,
                      producer in proptest::option::of((1u64.., 0u64..=u64::MAX - 32)),
                      records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20)) {
            let producer = producer.map(|(id, seq)| super::tests::producer(id, seq));
            let bytes = encode_with(Offset(base), Epoch(epoch), ts, producer, &records);
            prop_assert_eq!(bytes.len(), encoded_len_with(producer, &records));
            let view = decode(&bytes).unwrap();
            prop_assert_eq!(view.as_bytes(), &bytes[..]);
            prop_assert_eq!(view.header().next_offset(), Offset(base + records.len() as u64));
            prop_assert_eq!(view.producer(), producer);
            let got: Vec<_> = view.records().map(|r| r.value.to_vec()).collect();
            prop_assert_eq!(got, records);
        }

        #[test]
        fn decode_never_panics_and_reencodes_what_it_accepts(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(view) = decode(&bytes) {
                let values: Vec<&[u8]> = view.records().map(|r| r.value).collect();
                let h = view.header();
                let again = encode_with(h.base_offset(), h.epoch(), h.timestamp_us.get(), view.producer(), &values);
                prop_assert_eq!(&again[..], view.as_bytes());
            }
        }

        #[test]
        fn any_single_bit_flip_is_detected(flip in 0usize..(48 + 4 + 16) * 8) {
            let good = encode(Offset(3), Epoch(2), 77, &[[7u8; 16]]);
            let mut b = good.clone();
            b[flip / 8] ^= 1 << (flip % 8);
            prop_assert!(decode(&b).is_err());
        }

        #[test]
        fn any_single_bit_flip_in_a_producer_batch_is_detected(flip in 0usize..(48 + 16 + 4 + 16) * 8) {
            let good = encode_with(Offset(3), Epoch(2), 77, Some(producer(8, 500)), &[[7u8; 16]]);
            let mut b = good.clone();
            b[flip / 8] ^= 1 << (flip % 8);
            prop_assert!(decode(&b).is_err());
        }
    }
}
