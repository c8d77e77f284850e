//! The batch format: a fixed 48-byte little-endian header followed by length-prefixed records.
//!
//! ```text
//! 0  magic          u32  "RPLG"
//! 4  crc32c         u32  over bytes 8..48 of the header and the whole payload
//! 8  version        u16  FORMAT_VERSION
//! 10 flags          u16  0 (reserved)
//! 12 record_count   u32  >= 1
//! 16 base_offset    u64  offset of the first record
//! 24 epoch          u64  leader epoch the batch was appended in
//! 32 timestamp_us   u64  append time, microseconds since the Unix epoch
//! 40 payload_len    u32  bytes after the header
//! 44 reserved       u32  0
//! 48 payload        record_count x (len: u32, bytes)
//! ```
//! The layout is the on-disk format and the replication wire format: followers store the
//! leader's bytes verbatim. `docs/log-format.md` is the reference.

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
    #[error("reserved header fields are not zero")]
    ReservedNotZero,
    #[error("offsets of the batch run past the largest offset")]
    OffsetOverflow,
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

/// Check the header fields that can be checked without the payload: magic, version, reserved
/// fields, and a length that fits in `available` bytes (counting the header) and the hard limit.
pub fn check_header(h: &BatchHeader, available: usize) -> Result<(), BatchError> {
    if h.magic.get() != BATCH_MAGIC {
        return Err(BatchError::BadMagic(h.magic.get()));
    }
    if h.version.get() != BATCH_FORMAT_VERSION {
        return Err(BatchError::UnknownVersion(h.version.get()));
    }
    if h.flags.get() != 0 || h.reserved.get() != 0 {
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
    let count = h.record_count.get();
    if count == 0 || count as usize > len / RECORD_PREFIX_LEN {
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
    // Records must tile the payload exactly, `record_count` of them.
    let mut rest = view.payload();
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

impl<'a> BatchView<'a> {
    pub fn header(&self) -> &'a BatchHeader {
        self.header
    }
    /// Header and payload, exactly as stored.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// The records' bytes after the header.
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[BATCH_HEADER_LEN..]
    }
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The records, in offset order. The batch was validated by [`decode`], so this cannot fail.
    pub fn records(&self) -> impl Iterator<Item = Record<'a>> + 'a {
        let mut rest = self.payload();
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

/// Encoded size of a batch holding `records`.
pub fn encoded_len<R: AsRef<[u8]>>(records: &[R]) -> usize {
    BATCH_HEADER_LEN
        + records
            .iter()
            .map(|r| RECORD_PREFIX_LEN + r.as_ref().len())
            .sum::<usize>()
}

/// Append one encoded batch to `out` (no intermediate buffer) and return its header.
/// The caller has checked sizes against its limits; `records` must not be empty.
pub fn encode_into<R: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    base_offset: Offset,
    epoch: Epoch,
    timestamp_us: u64,
    records: &[R],
) -> BatchHeader {
    assert!(!records.is_empty(), "a batch needs at least one record");
    let start = out.len();
    let payload_len = encoded_len(records) - BATCH_HEADER_LEN;
    assert!(payload_len <= BATCH_PAYLOAD_BYTES_MAX);
    let mut header = BatchHeader {
        magic: BATCH_MAGIC.into(),
        crc32c: 0.into(),
        version: BATCH_FORMAT_VERSION.into(),
        flags: 0.into(),
        record_count: u32::try_from(records.len()).unwrap().into(),
        base_offset: base_offset.0.into(),
        epoch: epoch.0.into(),
        timestamp_us: timestamp_us.into(),
        payload_len: (payload_len as u32).into(),
        reserved: 0.into(),
    };
    out.extend_from_slice(header.as_bytes());
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

/// Encode one batch into a fresh buffer.
pub fn encode<R: AsRef<[u8]>>(
    base_offset: Offset,
    epoch: Epoch,
    timestamp_us: u64,
    records: &[R],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(records));
    encode_into(&mut out, base_offset, epoch, timestamp_us, records);
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

    proptest! {
        #[test]
        fn round_trip(base in 0u64..1 << 60, epoch in 0u64..1000, ts: u64,
                      records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20)) {
            let bytes = encode(Offset(base), Epoch(epoch), ts, &records);
            let view = decode(&bytes).unwrap();
            prop_assert_eq!(view.as_bytes(), &bytes[..]);
            prop_assert_eq!(view.header().next_offset(), Offset(base + records.len() as u64));
            let got: Vec<_> = view.records().map(|r| r.value.to_vec()).collect();
            prop_assert_eq!(got, records);
        }

        #[test]
        fn decode_never_panics_and_reencodes_what_it_accepts(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(view) = decode(&bytes) {
                let values: Vec<&[u8]> = view.records().map(|r| r.value).collect();
                let h = view.header();
                let again = encode(h.base_offset(), h.epoch(), h.timestamp_us.get(), &values);
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
    }
}
