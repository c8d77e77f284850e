//! Frame header and message bodies: encoders and limit-enforcing decoders.
//!
//! Decoding is two-step so that nothing is allocated before its length is checked:
//! [`FrameHeader::parse`] validates the fixed 8-byte header (version, kind, body length against
//! [`Limits::frame_bytes_max`]); the caller then reads exactly `body_len` bytes and calls
//! [`decode_request`] or [`decode_response`], which check every inner length against the bytes
//! that are really there and against the limits.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::message::*;
use crate::{ErrorCode, ProtocolError};

/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// The only protocol version this crate speaks.
pub const KNOWN_VERSION: u8 = 1;

mod kind {
    pub const AUTH: u8 = 0x01;
    pub const CREATE_LOG: u8 = 0x02;
    pub const LIST_LOGS: u8 = 0x03;
    pub const STATUS: u8 = 0x04;
    pub const APPEND: u8 = 0x05;
    pub const READ: u8 = 0x06;
    pub const TAIL: u8 = 0x07;
    pub const PUT_SNAPSHOT: u8 = 0x08;
    pub const GET_SNAPSHOT: u8 = 0x09;
    pub const TRANSFER: u8 = 0x0A;
    pub const REPLICATE: u8 = 0x10;
    pub const ACK: u8 = 0x11;
    pub const EPOCH_END: u8 = 0x12;
    pub const CHECKSUM: u8 = 0x13;

    pub const OK: u8 = 0x80;
    pub const ERROR: u8 = 0x81;
    pub const RECEIPT: u8 = 0x82;
    pub const LOGS: u8 = 0x83;
    pub const STATUS_RESP: u8 = 0x84;
    pub const BATCHES: u8 = 0x85;
    pub const SNAPSHOT: u8 = 0x86;
    pub const REPLICATED: u8 = 0x90;
    pub const EPOCH_END_RESP: u8 = 0x91;
    pub const CHECKSUM_RESP: u8 = 0x92;

    pub fn is_request(k: u8) -> bool {
        (AUTH..=TRANSFER).contains(&k) || (REPLICATE..=CHECKSUM).contains(&k)
    }

    pub fn is_response(k: u8) -> bool {
        (OK..=SNAPSHOT).contains(&k) || (REPLICATED..=CHECKSUM_RESP).contains(&k)
    }
}

/// `CreateLog` flag: answer once the log exists on the leader, without waiting for its sync
/// set.
const CREATE_NO_WAIT: u8 = 0x01;
const APPEND_HAS_EXPECTED: u8 = 0x01;
const APPEND_HAS_PRODUCER: u8 = 0x02;
const APPEND_KNOWN_FLAGS: u8 = APPEND_HAS_EXPECTED | APPEND_HAS_PRODUCER;

/// Hard limits enforced by the decoder. A node and a client each choose theirs; the defaults
/// are what a node uses unless configured otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body accepted, in bytes.
    pub frame_bytes_max: u32,
    /// Most records in one append.
    pub records_max: u32,
    /// Longest log name, in bytes.
    pub name_bytes_max: u16,
    /// Longest bearer token, in bytes.
    pub token_bytes_max: u16,
    /// Longest free-text field (error message, node id, addresses), in bytes.
    pub text_bytes_max: u16,
    /// Largest application snapshot: the body of a `PutSnapshot` or `Snapshot` frame may be
    /// this plus its fixed fields (those two kinds are checked against this instead of
    /// `frame_bytes_max`).
    pub snapshot_bytes_max: u32,
}

/// Fixed fields in front of a snapshot's data: log name (at most 2 + name_bytes_max), offset,
/// crc32c and data length.
const SNAPSHOT_FIXED_MAX: u32 = 2 + 255 + 8 + 4 + 4;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            frame_bytes_max: 8 << 20,
            records_max: 65_536,
            name_bytes_max: format::LOG_NAME_BYTES_MAX as u16,
            token_bytes_max: 4096,
            text_bytes_max: 4096,
            snapshot_bytes_max: 64 << 20,
        }
    }
}

/// The fixed header in front of every frame: `body_len u32 LE | version u8 | kind u8 |
/// reserved u16 (0)`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub body_len: u32,
}

impl FrameHeader {
    /// Validate a header. Fails on an unknown version, a non-zero reserved field, an unknown
    /// kind, or a body longer than `limits.frame_bytes_max`.
    pub fn parse(
        bytes: &[u8; FRAME_HEADER_LEN],
        limits: &Limits,
    ) -> Result<FrameHeader, ProtocolError> {
        let body_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
        let version = bytes[4];
        let kind = bytes[5];
        let reserved = u16::from_le_bytes([bytes[6], bytes[7]]);
        if version != KNOWN_VERSION {
            return Err(ProtocolError::UnsupportedVersion(version));
        }
        if reserved != 0 {
            return Err(ProtocolError::ReservedNotZero(reserved));
        }
        if !kind::is_request(kind) && !kind::is_response(kind) {
            return Err(ProtocolError::UnknownKind(kind));
        }
        let max = if kind == kind::PUT_SNAPSHOT || kind == kind::SNAPSHOT {
            limits.snapshot_bytes_max.saturating_add(SNAPSHOT_FIXED_MAX)
        } else {
            limits.frame_bytes_max
        };
        if body_len > max {
            return Err(ProtocolError::FrameTooLarge {
                len: body_len as u64,
                max,
            });
        }
        Ok(FrameHeader { kind, body_len })
    }

    pub fn is_request(&self) -> bool {
        kind::is_request(self.kind)
    }

    pub fn is_response(&self) -> bool {
        kind::is_response(self.kind)
    }

    fn encode(kind: u8, body_len: u32) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&body_len.to_le_bytes());
        h[4] = KNOWN_VERSION;
        h[5] = kind;
        h
    }
}

// ---------------------------------------------------------------- encoding

fn begin(out: &mut BytesMut, kind: u8) -> usize {
    let at = out.len();
    out.put_slice(&FrameHeader::encode(kind, 0));
    at
}

fn finish(out: &mut BytesMut, at: usize) {
    let body_len = out.len() - at - FRAME_HEADER_LEN;
    let body_len = u32::try_from(body_len).expect("frame body over 4 GiB");
    out[at..at + 4].copy_from_slice(&body_len.to_le_bytes());
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    let len = u16::try_from(s.len()).expect("string field over 64 KiB");
    out.put_u16_le(len);
    out.put_slice(s);
}

fn put_log_info(out: &mut BytesMut, logs: &[LogInfo]) {
    out.put_u32_le(logs.len() as u32);
    for l in logs {
        put_str(out, l.name.as_bytes());
        out.put_u64_le(l.start);
        out.put_u64_le(l.end);
        out.put_u64_le(l.committed);
        out.put_u64_le(l.flushed);
        out.put_u64_le(l.epoch);
        out.put_u64_le(l.disk_bytes);
        out.put_u8(u8::from(l.snapshot.is_some()));
        out.put_u64_le(l.snapshot.unwrap_or(0));
    }
}

/// The body of `PutSnapshot` and `Snapshot` (the same fields).
fn put_snapshot(out: &mut BytesMut, p: &Snapshot) {
    put_str(out, p.log.as_bytes());
    out.put_u64_le(p.offset);
    out.put_u32_le(p.crc32c);
    out.put_u32_le(p.data.len() as u32);
    out.put_slice(&p.data);
}

/// Append one request frame (header and body) to `out`.
pub fn encode_request(req: &Request, out: &mut BytesMut) {
    match req {
        Request::Auth { token } => {
            let at = begin(out, kind::AUTH);
            put_str(out, token);
            finish(out, at);
        }
        Request::CreateLog { name, no_wait } => {
            let at = begin(out, kind::CREATE_LOG);
            put_str(out, name.as_bytes());
            // Sent only when a flag is set, so that the common request stays as it always was.
            if *no_wait {
                out.put_u8(CREATE_NO_WAIT);
            }
            finish(out, at);
        }
        Request::Transfer { log, to } => {
            let at = begin(out, kind::TRANSFER);
            put_str(out, log.as_bytes());
            put_str(out, to.as_bytes());
            finish(out, at);
        }
        Request::ListLogs => {
            let at = begin(out, kind::LIST_LOGS);
            finish(out, at);
        }
        Request::Status => {
            let at = begin(out, kind::STATUS);
            finish(out, at);
        }
        Request::Append(a) => {
            let at = begin(out, kind::APPEND);
            put_str(out, a.log.as_bytes());
            out.put_u8(a.acks as u8);
            let mut flags = 0;
            if a.expected_offset.is_some() {
                flags |= APPEND_HAS_EXPECTED;
            }
            if a.producer.is_some() {
                flags |= APPEND_HAS_PRODUCER;
            }
            out.put_u8(flags);
            out.put_u16_le(0);
            out.put_u64_le(a.expected_offset.unwrap_or(0));
            let (pid, seq) = a.producer.unwrap_or((0, 0));
            out.put_u64_le(pid);
            out.put_u64_le(seq);
            out.put_u32_le(a.timeout_ms);
            out.put_u32_le(a.records.len() as u32);
            for r in &a.records {
                out.put_u32_le(r.len() as u32);
                out.put_slice(r);
            }
            finish(out, at);
        }
        Request::Read(r) => {
            let at = begin(out, kind::READ);
            put_str(out, r.log.as_bytes());
            out.put_u64_le(r.from);
            out.put_u32_le(r.bytes_max);
            out.put_u32_le(r.wait_ms);
            out.put_u64_le(r.min_offset);
            finish(out, at);
        }
        Request::Tail(t) => {
            let at = begin(out, kind::TAIL);
            put_str(out, t.log.as_bytes());
            out.put_u64_le(t.from);
            out.put_u32_le(t.bytes_max);
            finish(out, at);
        }
        Request::PutSnapshot(p) => {
            let at = begin(out, kind::PUT_SNAPSHOT);
            put_snapshot(out, p);
            finish(out, at);
        }
        Request::GetSnapshot { log } => {
            let at = begin(out, kind::GET_SNAPSHOT);
            put_str(out, log.as_bytes());
            finish(out, at);
        }
        Request::Replicate(r) => {
            let at = begin(out, kind::REPLICATE);
            put_str(out, r.log.as_bytes());
            put_str(out, r.follower.as_bytes());
            put_str(out, r.addr.as_bytes());
            out.put_u64_le(r.from);
            out.put_u64_le(r.last_epoch);
            out.put_u64_le(r.durable);
            finish(out, at);
        }
        Request::Ack { durable } => {
            let at = begin(out, kind::ACK);
            out.put_u64_le(*durable);
            finish(out, at);
        }
        Request::EpochEnd { log, epoch } => {
            let at = begin(out, kind::EPOCH_END);
            put_str(out, log.as_bytes());
            out.put_u64_le(*epoch);
            finish(out, at);
        }
        Request::Checksum { log, from, until } => {
            let at = begin(out, kind::CHECKSUM);
            put_str(out, log.as_bytes());
            out.put_u64_le(*from);
            out.put_u64_le(*until);
            finish(out, at);
        }
    }
}

/// Append one response frame to `out`. For [`Response::Batches`] this copies the batches; a
/// node serving reads from its mappings writes [`encode_batches_prefix`] and then the batch
/// slices instead.
pub fn encode_response(resp: &Response, out: &mut BytesMut) {
    match resp {
        Response::Ok => {
            let at = begin(out, kind::OK);
            finish(out, at);
        }
        Response::Error(e) => {
            let at = begin(out, kind::ERROR);
            out.put_u16_le(e.code as u16);
            out.put_u64_le(e.detail);
            put_str(out, e.message.as_bytes());
            put_str(out, e.leader.as_bytes());
            finish(out, at);
        }
        Response::Receipt(r) => {
            let at = begin(out, kind::RECEIPT);
            out.put_u64_le(r.first);
            out.put_u64_le(r.next);
            out.put_u64_le(r.epoch);
            out.put_u8(r.level as u8);
            out.put_u8(r.flags);
            out.put_u16_le(r.replicas);
            out.put_u16_le(r.holders.len() as u16);
            for h in &r.holders {
                put_str(out, h.as_bytes());
            }
            finish(out, at);
        }
        Response::Logs(logs) => {
            let at = begin(out, kind::LOGS);
            put_log_info(out, logs);
            finish(out, at);
        }
        Response::Status(s) => {
            let at = begin(out, kind::STATUS_RESP);
            put_str(out, s.node_id.as_bytes());
            put_str(out, s.version.as_bytes());
            put_str(out, s.role.as_bytes());
            out.put_u16_le(s.shards);
            out.put_u64_le(s.uptime_ms);
            out.put_u32_le(s.connections);
            put_log_info(out, &s.logs);
            put_str(out, s.leader.as_bytes());
            out.put_u32_le(s.replication.len() as u32);
            for l in &s.replication {
                put_str(out, l.log.as_bytes());
                out.put_u64_le(l.commit);
                out.put_u16_le(l.sync_replicas);
                out.put_u16_le(l.sync_shortfall);
                out.put_u32_le(l.followers.len() as u32);
                for f in &l.followers {
                    put_str(out, f.id.as_bytes());
                    put_str(out, f.addr.as_bytes());
                    out.put_u64_le(f.durable);
                    out.put_u8(u8::from(f.connected) | u8::from(f.in_sync_set) << 1);
                    out.put_u64_le(f.lag_records);
                    out.put_u64_le(f.lag_bytes);
                    out.put_u64_le(f.lag_ms);
                    out.put_u64_le(f.catchup_done_bytes);
                    out.put_u64_le(f.catchup_total_bytes);
                }
            }
            put_controller(out, s.controller.as_ref());
            out.put_u32_le(s.quarantined.len() as u32);
            for q in &s.quarantined {
                put_str(out, q.log.as_bytes());
                out.put_u64_le(q.from);
                out.put_u64_le(q.to);
                out.put_u64_le(q.records);
                out.put_u64_le(q.bytes);
                out.put_u32_le(q.epochs.len() as u32);
                for e in &q.epochs {
                    out.put_u64_le(*e);
                }
                out.put_u64_le(q.at_ms);
                put_str(out, q.file.as_bytes());
            }
            out.put_u32_le(s.damaged.len() as u32);
            for d in &s.damaged {
                put_str(out, d.log.as_bytes());
                out.put_u64_le(d.from);
                out.put_u64_le(d.until);
                put_str(out, d.file.as_bytes());
                out.put_u64_le(d.position);
                put_str(out, d.detail.as_bytes());
                out.put_u64_le(d.at_ms);
                out.put_u64_le(d.repaired_ms);
            }
            finish(out, at);
        }
        Response::Batches(b) => {
            out.put_slice(&encode_batches_prefix(
                b.next_offset,
                b.committed,
                b.batches.len(),
            ));
            out.put_slice(&b.batches);
        }
        Response::Snapshot(p) => {
            let at = begin(out, kind::SNAPSHOT);
            put_snapshot(out, p);
            finish(out, at);
        }
        Response::Replicated(r) => {
            out.put_slice(&encode_replicated_prefix(
                r.epoch,
                r.commit,
                r.next_offset,
                r.batches.len(),
            ));
            out.put_slice(&r.batches);
        }
        Response::EpochEnd { epoch, end } => {
            let at = begin(out, kind::EPOCH_END_RESP);
            out.put_u64_le(*epoch);
            out.put_u64_le(*end);
            finish(out, at);
        }
        Response::Checksum { crc, bytes } => {
            let at = begin(out, kind::CHECKSUM_RESP);
            out.put_u32_le(*crc);
            out.put_u64_le(*bytes);
            finish(out, at);
        }
    }
}

/// Length of the header plus fixed fields of a [`Response::Batches`] frame.
pub const BATCHES_PREFIX_LEN: usize = FRAME_HEADER_LEN + 16;

/// The frame header and fixed fields of a [`Response::Batches`] frame whose batches total
/// `batches_len` bytes; the batches follow it on the stream verbatim.
pub fn encode_batches_prefix(
    next_offset: u64,
    committed: u64,
    batches_len: usize,
) -> [u8; BATCHES_PREFIX_LEN] {
    let body_len = u32::try_from(16 + batches_len).expect("batches frame over 4 GiB");
    let mut p = [0u8; BATCHES_PREFIX_LEN];
    p[..FRAME_HEADER_LEN].copy_from_slice(&FrameHeader::encode(kind::BATCHES, body_len));
    p[8..16].copy_from_slice(&next_offset.to_le_bytes());
    p[16..24].copy_from_slice(&committed.to_le_bytes());
    p
}

/// Length of the header plus fixed fields of a [`Response::Replicated`] frame.
pub const REPLICATED_PREFIX_LEN: usize = FRAME_HEADER_LEN + 24;

/// The frame header and fixed fields of a [`Response::Replicated`] frame whose batches total
/// `batches_len` bytes; the batches follow it on the stream verbatim.
pub fn encode_replicated_prefix(
    epoch: u64,
    commit: u64,
    next_offset: u64,
    batches_len: usize,
) -> [u8; REPLICATED_PREFIX_LEN] {
    let body_len = u32::try_from(24 + batches_len).expect("replicated frame over 4 GiB");
    let mut p = [0u8; REPLICATED_PREFIX_LEN];
    p[..FRAME_HEADER_LEN].copy_from_slice(&FrameHeader::encode(kind::REPLICATED, body_len));
    p[8..16].copy_from_slice(&epoch.to_le_bytes());
    p[16..24].copy_from_slice(&commit.to_le_bytes());
    p[24..32].copy_from_slice(&next_offset.to_le_bytes());
    p
}

// ---------------------------------------------------------------- decoding

struct Reader<'a> {
    body: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(body: &'a Bytes) -> Self {
        Reader { body, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }

    fn need(&self, n: usize, what: &'static str) -> Result<(), ProtocolError> {
        if self.remaining() < n {
            Err(ProtocolError::Truncated(what))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        self.need(1, what)?;
        let v = self.body[self.pos];
        self.pos += 1;
        Ok(v)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        self.need(2, what)?;
        let v = (&self.body[self.pos..]).get_u16_le();
        self.pos += 2;
        Ok(v)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        self.need(4, what)?;
        let v = (&self.body[self.pos..]).get_u32_le();
        self.pos += 4;
        Ok(v)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        self.need(8, what)?;
        let v = (&self.body[self.pos..]).get_u64_le();
        self.pos += 8;
        Ok(v)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, ProtocolError> {
        self.need(n, what)?;
        let b = self.body.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    /// A u16-length-prefixed byte string of at most `max` bytes.
    fn short_bytes(&mut self, max: u16, what: &'static str) -> Result<Bytes, ProtocolError> {
        let len = self.u16(what)?;
        if len > max {
            return Err(ProtocolError::TooLong {
                what,
                len: len as u64,
                max: max as u64,
            });
        }
        self.bytes(len as usize, what)
    }

    fn string(&mut self, max: u16, what: &'static str) -> Result<String, ProtocolError> {
        let b = self.short_bytes(max, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| ProtocolError::Malformed("string field is not UTF-8"))
    }

    fn rest(&mut self) -> Bytes {
        let b = self.body.slice(self.pos..);
        self.pos = self.body.len();
        b
    }

    fn end(&self) -> Result<(), ProtocolError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(ProtocolError::TrailingBytes(n)),
        }
    }
}

/// Decode a request body. `header` must come from [`FrameHeader::parse`] and `body` must be
/// exactly `header.body_len` bytes.
pub fn decode_request(
    header: &FrameHeader,
    body: Bytes,
    limits: &Limits,
) -> Result<Request, ProtocolError> {
    debug_assert_eq!(body.len(), header.body_len as usize);
    let mut r = Reader::new(&body);
    let req = match header.kind {
        kind::AUTH => Request::Auth {
            token: r.short_bytes(limits.token_bytes_max, "token")?,
        },
        kind::CREATE_LOG => {
            let name = r.string(limits.name_bytes_max, "log name")?;
            // The flags byte is optional: a body that ends after the name asks to wait.
            let flags = if r.remaining() > 0 {
                r.u8("create flags")?
            } else {
                0
            };
            if flags & !CREATE_NO_WAIT != 0 {
                return Err(ProtocolError::Malformed("unknown create flag bits"));
            }
            Request::CreateLog {
                name,
                no_wait: flags & CREATE_NO_WAIT != 0,
            }
        }
        kind::TRANSFER => Request::Transfer {
            log: r.string(limits.name_bytes_max, "log name")?,
            to: r.string(limits.text_bytes_max, "target node")?,
        },
        kind::LIST_LOGS => Request::ListLogs,
        kind::STATUS => Request::Status,
        kind::APPEND => {
            let log = r.string(limits.name_bytes_max, "log name")?;
            let acks = r.u8("acks")?;
            let acks = Acks::from_u8(acks).ok_or(ProtocolError::Malformed("unknown acks level"))?;
            let flags = r.u8("append flags")?;
            if flags & !APPEND_KNOWN_FLAGS != 0 {
                return Err(ProtocolError::Malformed("unknown append flag bits"));
            }
            let reserved = r.u16("append reserved")?;
            if reserved != 0 {
                return Err(ProtocolError::ReservedNotZero(reserved));
            }
            let expected = r.u64("expected offset")?;
            let producer_id = r.u64("producer id")?;
            let sequence = r.u64("first sequence")?;
            let timeout_ms = r.u32("timeout")?;
            let count = r.u32("record count")?;
            if count == 0 {
                return Err(ProtocolError::Malformed("an append carries no records"));
            }
            if count > limits.records_max {
                return Err(ProtocolError::TooLong {
                    what: "record count",
                    len: count as u64,
                    max: limits.records_max as u64,
                });
            }
            // Every record needs at least its 4-byte length: a count the body cannot hold is
            // refused before the vector is sized by it.
            if count as usize > r.remaining() / 4 {
                return Err(ProtocolError::Truncated("records"));
            }
            let mut records = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let len = r.u32("record length")? as usize;
                records.push(r.bytes(len, "record value")?);
            }
            // A field its flag does not enable must be zero: one request has one encoding.
            if (flags & APPEND_HAS_EXPECTED == 0 && expected != 0)
                || (flags & APPEND_HAS_PRODUCER == 0 && (producer_id != 0 || sequence != 0))
            {
                return Err(ProtocolError::Malformed(
                    "expected offset or producer fields set without their flag",
                ));
            }
            let producer = if flags & APPEND_HAS_PRODUCER != 0 {
                if producer_id == 0 {
                    return Err(ProtocolError::Malformed("producer id 0 is reserved"));
                }
                Some((producer_id, sequence))
            } else {
                None
            };
            Request::Append(AppendRequest {
                log,
                acks,
                expected_offset: (flags & APPEND_HAS_EXPECTED != 0).then_some(expected),
                producer,
                timeout_ms,
                records,
            })
        }
        kind::READ => Request::Read(ReadRequest {
            log: r.string(limits.name_bytes_max, "log name")?,
            from: r.u64("from")?,
            bytes_max: r.u32("bytes_max")?,
            wait_ms: r.u32("wait_ms")?,
            min_offset: r.u64("min_offset")?,
        }),
        kind::TAIL => Request::Tail(TailRequest {
            log: r.string(limits.name_bytes_max, "log name")?,
            from: r.u64("from")?,
            bytes_max: r.u32("bytes_max")?,
        }),
        kind::PUT_SNAPSHOT => Request::PutSnapshot(decode_snapshot(&mut r, limits)?),
        kind::GET_SNAPSHOT => Request::GetSnapshot {
            log: r.string(limits.name_bytes_max, "log name")?,
        },
        kind::REPLICATE => Request::Replicate(ReplicateRequest {
            log: r.string(limits.name_bytes_max, "log name")?,
            follower: r.string(limits.text_bytes_max, "follower id")?,
            addr: r.string(limits.text_bytes_max, "follower address")?,
            from: r.u64("from")?,
            last_epoch: r.u64("last epoch")?,
            durable: r.u64("durable")?,
        }),
        kind::ACK => Request::Ack {
            durable: r.u64("durable")?,
        },
        kind::EPOCH_END => Request::EpochEnd {
            log: r.string(limits.name_bytes_max, "log name")?,
            epoch: r.u64("epoch")?,
        },
        kind::CHECKSUM => Request::Checksum {
            log: r.string(limits.name_bytes_max, "log name")?,
            from: r.u64("from")?,
            until: r.u64("until")?,
        },
        other => return Err(ProtocolError::UnknownKind(other)),
    };
    r.end()?;
    Ok(req)
}

fn decode_snapshot(r: &mut Reader<'_>, limits: &Limits) -> Result<Snapshot, ProtocolError> {
    let log = r.string(limits.name_bytes_max, "log name")?;
    let offset = r.u64("snapshot offset")?;
    let crc32c = r.u32("snapshot crc32c")?;
    let len = r.u32("snapshot length")?;
    if len > limits.snapshot_bytes_max {
        return Err(ProtocolError::TooLong {
            what: "snapshot",
            len: len as u64,
            max: limits.snapshot_bytes_max as u64,
        });
    }
    let data = r.bytes(len as usize, "snapshot data")?;
    Ok(Snapshot {
        log,
        offset,
        crc32c,
        data,
    })
}

fn decode_log_info(r: &mut Reader<'_>, limits: &Limits) -> Result<Vec<LogInfo>, ProtocolError> {
    let count = r.u32("log count")? as usize;
    // name length (2) + seven u64 + a flag = 59 bytes at least per entry.
    if count > r.remaining() / 59 {
        return Err(ProtocolError::Truncated("log list"));
    }
    let mut logs = Vec::with_capacity(count);
    for _ in 0..count {
        logs.push(LogInfo {
            name: r.string(limits.name_bytes_max, "log name")?,
            start: r.u64("start")?,
            end: r.u64("end")?,
            committed: r.u64("committed")?,
            flushed: r.u64("flushed")?,
            epoch: r.u64("epoch")?,
            disk_bytes: r.u64("disk bytes")?,
            snapshot: {
                let has = r.u8("snapshot flag")?;
                let offset = r.u64("snapshot offset")?;
                match has {
                    0 if offset == 0 => None,
                    1 => Some(offset),
                    _ => return Err(ProtocolError::Malformed("bad snapshot flag")),
                }
            },
        });
    }
    Ok(logs)
}

/// The controller section of a status answer: a presence byte, then the fields.
fn put_controller(out: &mut BytesMut, c: Option<&ControllerStatus>) {
    let Some(c) = c else {
        out.put_u8(0);
        return;
    };
    out.put_u8(1);
    put_str(out, c.cluster_id.as_bytes());
    put_str(out, c.leader.as_bytes());
    out.put_u64_le(c.term);
    out.put_u64_le(c.applied);
    put_strs(out, &c.members);
    out.put_u32_le(c.logs.len() as u32);
    for l in &c.logs {
        put_str(out, l.log.as_bytes());
        put_str(out, l.leader.as_bytes());
        out.put_u64_le(l.epoch);
        put_strs(out, &l.sync_set);
        put_str(out, l.no_leader.as_bytes());
        put_str(out, l.transfer_to.as_bytes());
        out.put_u32_le(l.unclean_elections);
    }
    put_strs(out, &c.reachable);
    put_str(out, c.problem.as_bytes());
}

fn put_strs(out: &mut BytesMut, list: &[String]) {
    out.put_u32_le(list.len() as u32);
    for s in list {
        put_str(out, s.as_bytes());
    }
}

fn decode_strs(
    r: &mut Reader<'_>,
    max: u16,
    what: &'static str,
) -> Result<Vec<String>, ProtocolError> {
    let n = r.u32(what)? as usize;
    // A length prefix (2) at least per string.
    if n > r.remaining() / 2 {
        return Err(ProtocolError::Truncated(what));
    }
    (0..n).map(|_| r.string(max, what)).collect()
}

fn decode_quarantined(
    r: &mut Reader<'_>,
    limits: &Limits,
) -> Result<Vec<Quarantined>, ProtocolError> {
    let n = r.u32("quarantine count")? as usize;
    // name (2) + five u64 (40) + epoch count (4) + file (2) at least per entry.
    if n > r.remaining() / 48 {
        return Err(ProtocolError::Truncated("quarantine list"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let log = r.string(limits.name_bytes_max, "log name")?;
        let (from, to) = (r.u64("from")?, r.u64("to")?);
        let (records, bytes) = (r.u64("records")?, r.u64("bytes")?);
        let k = r.u32("epoch count")? as usize;
        if k > r.remaining() / 8 {
            return Err(ProtocolError::Truncated("epoch list"));
        }
        let epochs = (0..k).map(|_| r.u64("epoch")).collect::<Result<_, _>>()?;
        out.push(Quarantined {
            log,
            from,
            to,
            records,
            bytes,
            epochs,
            at_ms: r.u64("at_ms")?,
            file: r.string(limits.text_bytes_max, "quarantine file")?,
        });
    }
    Ok(out)
}

fn decode_damaged(r: &mut Reader<'_>, limits: &Limits) -> Result<Vec<Damaged>, ProtocolError> {
    let n = r.u32("damaged count")? as usize;
    // name (2) + three u64 (24) + two strings (4) + two u64 (16) at least per entry.
    if n > r.remaining() / 46 {
        return Err(ProtocolError::Truncated("damaged list"));
    }
    let text = limits.text_bytes_max;
    (0..n)
        .map(|_| {
            Ok(Damaged {
                log: r.string(limits.name_bytes_max, "log name")?,
                from: r.u64("from")?,
                until: r.u64("until")?,
                file: r.string(text, "damaged file")?,
                position: r.u64("position")?,
                detail: r.string(text, "damage")?,
                at_ms: r.u64("at_ms")?,
                repaired_ms: r.u64("repaired_ms")?,
            })
        })
        .collect()
}

fn decode_controller(
    r: &mut Reader<'_>,
    limits: &Limits,
) -> Result<Option<ControllerStatus>, ProtocolError> {
    match r.u8("controller presence")? {
        0 => return Ok(None),
        1 => {}
        _ => {
            return Err(ProtocolError::Malformed(
                "controller presence is not 0 or 1",
            ))
        }
    }
    let text = limits.text_bytes_max;
    let cluster_id = r.string(text, "cluster id")?;
    let leader = r.string(text, "controller leader")?;
    let term = r.u64("term")?;
    let applied = r.u64("applied")?;
    let members = decode_strs(r, text, "members")?;
    let n = r.u32("controlled log count")? as usize;
    // name (2) + leader (2) + epoch (8) + list (4) + two strings (4) + count (4) at least.
    if n > r.remaining() / 24 {
        return Err(ProtocolError::Truncated("controlled log list"));
    }
    let mut logs = Vec::with_capacity(n);
    for _ in 0..n {
        logs.push(ControlledLog {
            log: r.string(limits.name_bytes_max, "log name")?,
            leader: r.string(text, "log leader")?,
            epoch: r.u64("epoch")?,
            sync_set: decode_strs(r, text, "sync set")?,
            no_leader: r.string(text, "no-leader reason")?,
            transfer_to: r.string(text, "transfer target")?,
            unclean_elections: r.u32("unclean elections")?,
        });
    }
    Ok(Some(ControllerStatus {
        cluster_id,
        leader,
        term,
        applied,
        members,
        logs,
        reachable: decode_strs(r, text, "reachable members")?,
        problem: r.string(text, "controller problem")?,
    }))
}

fn decode_replication(
    r: &mut Reader<'_>,
    limits: &Limits,
) -> Result<Vec<LogReplication>, ProtocolError> {
    let count = r.u32("replication count")? as usize;
    // name (2) + commit (8) + sizes (4) + follower count (4) at least per entry.
    if count > r.remaining() / 18 {
        return Err(ProtocolError::Truncated("replication list"));
    }
    let mut logs = Vec::with_capacity(count);
    for _ in 0..count {
        let log = r.string(limits.name_bytes_max, "log name")?;
        let commit = r.u64("commit")?;
        let sync_replicas = r.u16("sync replicas")?;
        let sync_shortfall = r.u16("sync shortfall")?;
        let n = r.u32("follower count")? as usize;
        // two names (4) + six u64 (48) + flags (1) at least per follower.
        if n > r.remaining() / 53 {
            return Err(ProtocolError::Truncated("follower list"));
        }
        let mut followers = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.string(limits.text_bytes_max, "follower id")?;
            let addr = r.string(limits.text_bytes_max, "follower address")?;
            let durable = r.u64("durable")?;
            let flags = r.u8("follower flags")?;
            if flags & !0b11 != 0 {
                return Err(ProtocolError::Malformed("unknown follower flag bits"));
            }
            followers.push(FollowerStatus {
                id,
                addr,
                durable,
                connected: flags & 1 != 0,
                in_sync_set: flags & 2 != 0,
                lag_records: r.u64("lag records")?,
                lag_bytes: r.u64("lag bytes")?,
                lag_ms: r.u64("lag ms")?,
                catchup_done_bytes: r.u64("catch-up done")?,
                catchup_total_bytes: r.u64("catch-up total")?,
            });
        }
        logs.push(LogReplication {
            log,
            commit,
            sync_replicas,
            sync_shortfall,
            followers,
        });
    }
    Ok(logs)
}

/// Decode a response body (see [`decode_request`] for the contract).
pub fn decode_response(
    header: &FrameHeader,
    body: Bytes,
    limits: &Limits,
) -> Result<Response, ProtocolError> {
    debug_assert_eq!(body.len(), header.body_len as usize);
    let mut r = Reader::new(&body);
    let resp = match header.kind {
        kind::OK => Response::Ok,
        kind::ERROR => {
            let raw = r.u16("error code")?;
            let code = ErrorCode::from_u16(raw).ok_or(ProtocolError::UnknownErrorCode(raw))?;
            Response::Error(ErrorResponse {
                code,
                detail: r.u64("detail")?,
                message: r.string(limits.text_bytes_max, "error message")?,
                leader: r.string(limits.text_bytes_max, "leader address")?,
            })
        }
        kind::RECEIPT => {
            let first = r.u64("first")?;
            let next = r.u64("next")?;
            let epoch = r.u64("epoch")?;
            let level =
                Acks::from_u8(r.u8("level")?).ok_or(ProtocolError::Malformed("unknown level"))?;
            let flags = r.u8("flags")?;
            let replicas = r.u16("replicas")?;
            if next <= first {
                return Err(ProtocolError::Malformed("receipt range is empty"));
            }
            let count = r.u16("holder count")? as usize;
            // Each name needs at least its 2-byte length.
            if count > r.remaining() / 2 {
                return Err(ProtocolError::Truncated("holders"));
            }
            let mut holders = Vec::with_capacity(count);
            for _ in 0..count {
                holders.push(r.string(limits.text_bytes_max, "holder id")?);
            }
            Response::Receipt(Receipt {
                first,
                next,
                epoch,
                level,
                flags,
                replicas,
                holders,
            })
        }
        kind::LOGS => Response::Logs(decode_log_info(&mut r, limits)?),
        kind::STATUS_RESP => Response::Status(Box::new(StatusResponse {
            node_id: r.string(limits.text_bytes_max, "node id")?,
            version: r.string(limits.text_bytes_max, "version")?,
            role: r.string(limits.text_bytes_max, "role")?,
            shards: r.u16("shards")?,
            uptime_ms: r.u64("uptime")?,
            connections: r.u32("connections")?,
            logs: decode_log_info(&mut r, limits)?,
            leader: r.string(limits.text_bytes_max, "leader address")?,
            replication: decode_replication(&mut r, limits)?,
            controller: decode_controller(&mut r, limits)?,
            quarantined: decode_quarantined(&mut r, limits)?,
            damaged: decode_damaged(&mut r, limits)?,
        })),
        kind::BATCHES => Response::Batches(BatchesResponse {
            next_offset: r.u64("next offset")?,
            committed: r.u64("committed")?,
            batches: r.rest(),
        }),
        kind::SNAPSHOT => Response::Snapshot(decode_snapshot(&mut r, limits)?),
        kind::REPLICATED => Response::Replicated(ReplicatedResponse {
            epoch: r.u64("epoch")?,
            commit: r.u64("commit")?,
            next_offset: r.u64("next offset")?,
            batches: r.rest(),
        }),
        kind::EPOCH_END_RESP => Response::EpochEnd {
            epoch: r.u64("epoch")?,
            end: r.u64("end")?,
        },
        kind::CHECKSUM_RESP => Response::Checksum {
            crc: r.u32("crc")?,
            bytes: r.u64("bytes")?,
        },
        other => return Err(ProtocolError::UnknownKind(other)),
    };
    r.end()?;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(frame: &BytesMut) -> (FrameHeader, Bytes) {
        let h = FrameHeader::parse(frame[..8].try_into().unwrap(), &Limits::default()).unwrap();
        let body = Bytes::copy_from_slice(&frame[8..]);
        assert_eq!(body.len(), h.body_len as usize);
        (h, body)
    }

    fn roundtrip_req(req: Request) {
        let mut out = BytesMut::new();
        encode_request(&req, &mut out);
        let (h, body) = split(&out);
        assert!(h.is_request());
        assert_eq!(decode_request(&h, body, &Limits::default()).unwrap(), req);
    }

    fn roundtrip_resp(resp: Response) {
        let mut out = BytesMut::new();
        encode_response(&resp, &mut out);
        let (h, body) = split(&out);
        assert_eq!(decode_response(&h, body, &Limits::default()).unwrap(), resp);
    }

    fn append(records: Vec<Bytes>) -> AppendRequest {
        AppendRequest {
            log: "orders".into(),
            acks: Acks::Leader,
            expected_offset: Some(42),
            producer: Some((7, 100)),
            timeout_ms: 5000,
            records,
        }
    }

    #[test]
    fn every_message_round_trips() {
        roundtrip_req(Request::Auth {
            token: Bytes::from_static(b"s3cret"),
        });
        roundtrip_req(Request::CreateLog {
            name: "a.b-c_d".into(),
            no_wait: false,
        });
        roundtrip_req(Request::CreateLog {
            name: "a.b-c_d".into(),
            no_wait: true,
        });
        roundtrip_req(Request::ListLogs);
        roundtrip_req(Request::Status);
        roundtrip_req(Request::Append(append(vec![
            Bytes::from_static(b"x"),
            Bytes::new(),
        ])));
        roundtrip_req(Request::Read(ReadRequest {
            log: "l".into(),
            from: 9,
            bytes_max: 1 << 20,
            wait_ms: 10,
            min_offset: 3,
        }));
        roundtrip_req(Request::Tail(TailRequest {
            log: "l".into(),
            from: 1,
            bytes_max: 77,
        }));
        roundtrip_resp(Response::Ok);
        roundtrip_resp(Response::Error(ErrorResponse {
            code: ErrorCode::NotLeader,
            message: "ask elsewhere".into(),
            leader: "127.0.0.1:7001".into(),
            detail: 5,
        }));
        roundtrip_resp(Response::Receipt(Receipt {
            first: 1,
            next: 3,
            epoch: 2,
            level: Acks::Leader,
            flags: RECEIPT_DUPLICATE,
            replicas: 2,
            holders: vec!["n1".into(), "n2".into()],
        }));
        let logs = vec![LogInfo {
            name: "x".into(),
            start: 0,
            end: 10,
            committed: 9,
            flushed: 10,
            epoch: 1,
            disk_bytes: 4096,
            snapshot: Some(7),
        }];
        roundtrip_resp(Response::Logs(logs.clone()));
        roundtrip_resp(Response::Status(Box::new(StatusResponse {
            node_id: "n1".into(),
            version: "0.1.0".into(),
            role: "standalone".into(),
            shards: 2,
            uptime_ms: 12,
            connections: 3,
            logs,
            leader: "127.0.0.1:7001".into(),
            replication: vec![LogReplication {
                log: "x".into(),
                commit: 9,
                sync_replicas: 1,
                sync_shortfall: 0,
                followers: vec![FollowerStatus {
                    id: "n2".into(),
                    addr: "127.0.0.1:7002".into(),
                    durable: 9,
                    connected: true,
                    in_sync_set: true,
                    lag_records: 1,
                    lag_bytes: 100,
                    lag_ms: 3,
                    catchup_done_bytes: 5,
                    catchup_total_bytes: 6,
                }],
            }],
            controller: Some(ControllerStatus {
                cluster_id: "c0ffee".into(),
                leader: "n2".into(),
                term: 4,
                applied: 17,
                members: vec!["n1=127.0.0.1:7001".into(), "n2=127.0.0.1:7002".into()],
                logs: vec![ControlledLog {
                    log: "x".into(),
                    leader: String::new(),
                    epoch: 3,
                    sync_set: vec!["n2".into()],
                    no_leader: "nobody holds it all".into(),
                    transfer_to: String::new(),
                    unclean_elections: 1,
                }],
                reachable: vec!["n1".into()],
                problem: "no controller leader".into(),
            }),
            quarantined: vec![Quarantined {
                log: "x".into(),
                from: 7,
                to: 9,
                records: 2,
                bytes: 150,
                epochs: vec![3],
                at_ms: 1234,
                file: "/data/quarantine/x/1234-7-9.batches".into(),
            }],
            damaged: vec![Damaged {
                log: "x".into(),
                from: 3,
                until: 5,
                file: "/data/logs/x/00000000000000000000.seg".into(),
                position: 4096,
                detail: "checksum mismatch".into(),
                at_ms: 99,
                repaired_ms: 100,
            }],
        })));
        roundtrip_resp(Response::Batches(BatchesResponse {
            next_offset: 5,
            committed: 5,
            batches: Bytes::from_static(b"opaque batch bytes"),
        }));
        roundtrip_req(Request::Replicate(ReplicateRequest {
            log: "l".into(),
            follower: "node-2".into(),
            addr: "127.0.0.1:7002".into(),
            from: 10,
            last_epoch: 2,
            durable: 9,
        }));
        roundtrip_req(Request::Ack { durable: 77 });
        let snap = Snapshot {
            log: "l".into(),
            offset: 12,
            crc32c: 0xdead_beef,
            data: Bytes::from_static(b"state"),
        };
        roundtrip_req(Request::PutSnapshot(snap.clone()));
        roundtrip_req(Request::GetSnapshot { log: "l".into() });
        roundtrip_req(Request::Transfer {
            log: "l".into(),
            to: "node-2".into(),
        });
        roundtrip_resp(Response::Snapshot(snap));
        roundtrip_req(Request::EpochEnd {
            log: "l".into(),
            epoch: 3,
        });
        roundtrip_resp(Response::Replicated(ReplicatedResponse {
            epoch: 3,
            commit: 8,
            next_offset: 12,
            batches: Bytes::from_static(b"batches"),
        }));
        roundtrip_resp(Response::EpochEnd { epoch: 2, end: 70 });
        roundtrip_req(Request::Checksum {
            log: "x".into(),
            from: 10,
            until: 20,
        });
        roundtrip_resp(Response::Checksum {
            crc: 0xdead_beef,
            bytes: 4096,
        });
    }

    #[test]
    fn header_rejects_version_kind_reserved_and_length() {
        let l = Limits::default();
        let mut h = FrameHeader::encode(kind::STATUS, 0);
        assert!(FrameHeader::parse(&h, &l).is_ok());
        h[4] = 2;
        assert_eq!(
            FrameHeader::parse(&h, &l),
            Err(ProtocolError::UnsupportedVersion(2))
        );
        let mut h = FrameHeader::encode(0x42, 0);
        assert_eq!(
            FrameHeader::parse(&h, &l),
            Err(ProtocolError::UnknownKind(0x42))
        );
        h[5] = kind::STATUS;
        h[6] = 1;
        assert_eq!(
            FrameHeader::parse(&h, &l),
            Err(ProtocolError::ReservedNotZero(1))
        );
        let h = FrameHeader::encode(kind::APPEND, l.frame_bytes_max);
        assert!(FrameHeader::parse(&h, &l).is_ok());
        let h = FrameHeader::encode(kind::APPEND, l.frame_bytes_max + 1);
        let err = FrameHeader::parse(&h, &l).unwrap_err();
        assert_eq!(err.code(), ErrorCode::LimitExceeded);
        // A TLS alert or HTTP request read as a header is refused on its length or version.
        assert!(FrameHeader::parse(b"GET / HT", &l).is_err());
    }

    #[test]
    fn append_limits_are_enforced() {
        let limits = Limits {
            records_max: 2,
            ..Limits::default()
        };
        let mut out = BytesMut::new();
        encode_request(
            &Request::Append(append(vec![Bytes::from_static(b"a"); 3])),
            &mut out,
        );
        let (h, body) = split(&out);
        let err = decode_request(&h, body, &limits).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::TooLong {
                    what: "record count",
                    ..
                }
            ),
            "{err}"
        );

        // A record length pointing past the body.
        let mut out = BytesMut::new();
        encode_request(
            &Request::Append(append(vec![Bytes::from_static(b"abc")])),
            &mut out,
        );
        let n = out.len();
        out[n - 7..n - 3].copy_from_slice(&1000u32.to_le_bytes());
        let (h, body) = split(&out);
        assert_eq!(
            decode_request(&h, body, &Limits::default()),
            Err(ProtocolError::Truncated("record value"))
        );

        // A huge count with a tiny body is refused before allocating.
        let mut out = BytesMut::new();
        encode_request(
            &Request::Append(append(vec![Bytes::from_static(b"a")])),
            &mut out,
        );
        let n = out.len();
        out[n - 9..n - 5].copy_from_slice(&60_000u32.to_le_bytes());
        let (h, body) = split(&out);
        assert_eq!(
            decode_request(&h, body, &Limits::default()),
            Err(ProtocolError::Truncated("records"))
        );

        // Fields set without their flag.
        let mut out = BytesMut::new();
        let mut a = append(vec![Bytes::from_static(b"a")]);
        a.expected_offset = None;
        a.producer = None;
        encode_request(&Request::Append(a), &mut out);
        for at in [
            8 + 2 + 6 + 4 + 3,
            8 + 2 + 6 + 4 + 8 + 5,
            8 + 2 + 6 + 4 + 16 + 2,
        ] {
            let mut bad = out.clone();
            bad[at] = 1;
            let (h, body) = split(&bad);
            assert!(
                matches!(
                    decode_request(&h, body, &Limits::default()),
                    Err(ProtocolError::Malformed(_))
                ),
                "byte {at}"
            );
        }

        // Producer id 0 and empty appends.
        let mut a = append(vec![Bytes::from_static(b"a")]);
        a.producer = Some((0, 1));
        let mut out = BytesMut::new();
        encode_request(&Request::Append(a), &mut out);
        let (h, body) = split(&out);
        assert!(matches!(
            decode_request(&h, body, &Limits::default()),
            Err(ProtocolError::Malformed(_))
        ));
        let mut out = BytesMut::new();
        encode_request(&Request::Append(append(vec![])), &mut out);
        let (h, body) = split(&out);
        assert!(matches!(
            decode_request(&h, body, &Limits::default()),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn names_tokens_and_trailing_bytes() {
        let limits = Limits::default();
        let long = "n".repeat(limits.name_bytes_max as usize + 1);
        let mut out = BytesMut::new();
        encode_request(
            &Request::CreateLog {
                name: long,
                no_wait: false,
            },
            &mut out,
        );
        let (h, body) = split(&out);
        assert!(matches!(
            decode_request(&h, body, &limits),
            Err(ProtocolError::TooLong {
                what: "log name",
                ..
            })
        ));

        // The optional flags byte, then one byte too many.
        let create_ok = |out: &mut BytesMut| {
            let create = Request::CreateLog {
                name: "ok".into(),
                no_wait: false,
            };
            encode_request(&create, out)
        };
        let mut out = BytesMut::new();
        create_ok(&mut out);
        out.put_u8(0);
        out.put_u8(0);
        finish(&mut out, 0);
        let (h, body) = split(&out);
        assert_eq!(
            decode_request(&h, body, &limits),
            Err(ProtocolError::TrailingBytes(1))
        );
        // A flag bit nobody defined.
        let mut out = BytesMut::new();
        create_ok(&mut out);
        out.put_u8(0x02);
        finish(&mut out, 0);
        let (h, body) = split(&out);
        assert!(matches!(
            decode_request(&h, body, &limits),
            Err(ProtocolError::Malformed(_))
        ));

        let mut out = BytesMut::new();
        encode_request(
            &Request::CreateLog {
                name: "ok".into(),
                no_wait: false,
            },
            &mut out,
        );
        out[10] = 0xff;
        let (h, body) = split(&out);
        assert!(matches!(
            decode_request(&h, body, &limits),
            Err(ProtocolError::Malformed(_))
        ));

        // A response kind is not a request.
        let mut out = BytesMut::new();
        encode_response(&Response::Ok, &mut out);
        let (h, body) = split(&out);
        assert_eq!(
            decode_request(&h, body, &limits),
            Err(ProtocolError::UnknownKind(kind::OK))
        );
    }

    proptest! {
        /// Arbitrary bytes never panic the decoders, whatever the kind.
        #[test]
        fn garbage_never_panics(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let limits = Limits::default();
            let h = FrameHeader { kind, body_len: body.len() as u32 };
            let body = Bytes::from(body);
            let _ = decode_request(&h, body.clone(), &limits);
            let _ = decode_response(&h, body, &limits);
        }

        #[test]
        fn appends_round_trip(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..16),
                              expected in proptest::option::of(any::<u64>()),
                              producer in proptest::option::of((1..u64::MAX, any::<u64>()))) {
            roundtrip_req(Request::Append(AppendRequest {
                log: "p".into(),
                acks: Acks::None,
                expected_offset: expected,
                producer,
                timeout_ms: 0,
                records: records.into_iter().map(Bytes::from).collect(),
            }));
        }
    }
}
