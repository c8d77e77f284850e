//! Protocol frames on QUIC streams, for every side: the node reading requests and writing
//! answers and replication frames, a follower and a client reading answers and writing
//! requests.
//!
//! `protocol` decides what a frame means and holds the limits; this crate moves frames over
//! quinn streams: [`FrameReader`] reads one frame at a time, checking the header against the
//! limits before it allocates the body, and keeps its progress across cancelled reads;
//! [`write`] and [`write_within`] write frames, the latter resetting a stream whose peer takes
//! nothing for too long.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use protocol::{close_code, FrameHeader, Limits, ProtocolError, Request, Response};
use quinn::{ReadError, RecvStream, SendStream, VarInt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFail {
    /// The stream was reset, or its connection was lost.
    #[error("{0}")]
    Stream(#[from] ReadError),
    /// The bytes are not a frame this side accepts: a header or body that fails the checks,
    /// a frame of the wrong direction, or a stream that ended inside a frame.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}

/// Which frames a reader expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// The node's side: requests from clients and followers. A bad frame is answered with an
    /// `Error` frame by the caller, so the stream is not stopped.
    Requests,
    /// A client's or a follower's side: answers from a node. A bad frame stops the stream with
    /// [`close_code::PROTOCOL_VIOLATION`] (protocol.md section 3.3).
    Responses,
}

/// Reads frames from one stream. Progress is kept in the reader, so a read that is cancelled
/// (its future dropped, in a `select!`) loses nothing: the next call resumes where it stopped.
pub struct FrameReader {
    direction: Direction,
    head: [u8; protocol::FRAME_HEADER_LEN],
    head_filled: usize,
    header: Option<FrameHeader>,
    body: Vec<u8>,
    body_filled: usize,
}

impl FrameReader {
    /// A reader of requests (the node's side of a stream).
    pub fn requests() -> FrameReader {
        FrameReader::new(Direction::Requests)
    }

    /// A reader of answers (a client's or a follower's side of a stream).
    pub fn responses() -> FrameReader {
        FrameReader::new(Direction::Responses)
    }

    fn new(direction: Direction) -> FrameReader {
        FrameReader {
            direction,
            head: [0; protocol::FRAME_HEADER_LEN],
            head_filled: 0,
            header: None,
            body: Vec::new(),
            body_filled: 0,
        }
    }

    /// Read one request. `Ok(None)` when the stream ended cleanly where a frame would start.
    pub async fn request(
        &mut self,
        recv: &mut RecvStream,
        limits: &Limits,
    ) -> Result<Option<Request>, ReadFail> {
        debug_assert_eq!(self.direction, Direction::Requests);
        self.decoded(recv, limits, protocol::decode_request).await
    }

    /// Read one answer. `Ok(None)` when the stream ended cleanly where a frame would start.
    pub async fn response(
        &mut self,
        recv: &mut RecvStream,
        limits: &Limits,
    ) -> Result<Option<Response>, ReadFail> {
        debug_assert_eq!(self.direction, Direction::Responses);
        self.decoded(recv, limits, protocol::decode_response).await
    }

    /// One frame, decoded by `decode`; `Ok(None)` when the stream ended between frames.
    async fn decoded<T>(
        &mut self,
        recv: &mut RecvStream,
        limits: &Limits,
        decode: fn(&FrameHeader, Bytes, &Limits) -> Result<T, ProtocolError>,
    ) -> Result<Option<T>, ReadFail> {
        let Some((header, body)) = self.frame(recv, limits).await? else {
            return Ok(None);
        };
        Ok(Some(self.checked(recv, decode(&header, body, limits))?))
    }

    /// A decoding result; on a violation by a node, the stream is stopped.
    fn checked<T>(
        &self,
        recv: &mut RecvStream,
        r: Result<T, ProtocolError>,
    ) -> Result<T, ProtocolError> {
        if r.is_err() && self.direction == Direction::Responses {
            let _ = recv.stop(VarInt::from_u32(close_code::PROTOCOL_VIOLATION));
        }
        r
    }

    /// Read one frame's header and body; the header passes its limits and its direction before
    /// the body is allocated.
    async fn frame(
        &mut self,
        recv: &mut RecvStream,
        limits: &Limits,
    ) -> Result<Option<(FrameHeader, Bytes)>, ReadFail> {
        while self.header.is_none() {
            match recv.read(&mut self.head[self.head_filled..]).await? {
                None if self.head_filled == 0 => return Ok(None),
                None => return Err(ProtocolError::Truncated("frame header").into()),
                Some(n) => self.head_filled += n,
            }
            if self.head_filled == self.head.len() {
                let header = FrameHeader::parse(&self.head, limits).and_then(|h| {
                    let expected = match self.direction {
                        Direction::Requests => h.is_request(),
                        Direction::Responses => h.is_response(),
                    };
                    if expected {
                        Ok(h)
                    } else {
                        Err(ProtocolError::UnknownKind(h.kind))
                    }
                });
                let header = self.checked(recv, header)?;
                self.body = vec![0u8; header.body_len as usize];
                self.body_filled = 0;
                self.header = Some(header);
            }
        }
        while self.body_filled < self.body.len() {
            match recv.read(&mut self.body[self.body_filled..]).await? {
                None => return Err(ProtocolError::Truncated("frame body").into()),
                Some(n) => self.body_filled += n,
            }
        }
        let header = self.header.take().expect("a header was parsed");
        debug_assert_eq!(self.body.len(), header.body_len as usize);
        self.head_filled = 0;
        Ok(Some((header, Bytes::from(std::mem::take(&mut self.body)))))
    }
}

/// One request as a frame.
pub fn encode_request(req: &Request) -> Bytes {
    let mut out = BytesMut::new();
    protocol::encode_request(req, &mut out);
    out.freeze()
}

/// One answer as a frame.
pub fn encode_response(resp: &Response) -> Bytes {
    let mut out = BytesMut::new();
    protocol::encode_response(resp, &mut out);
    out.freeze()
}

/// Write `frame` in full.
pub async fn write(send: &mut SendStream, frame: &[u8]) -> Result<(), quinn::WriteError> {
    send.write_all(frame).await
}

/// Why [`write_within`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriteFail {
    /// The peer stopped the stream, or the connection was lost.
    #[error("{0}")]
    Stream(#[from] quinn::WriteError),
    /// The peer took nothing for the whole stall timeout: the stream was reset with
    /// [`close_code::SLOW_READER`].
    #[error("the reader took nothing for {0:?}; the stream was reset")]
    Stalled(Duration),
}

/// Write `chunks` in full as long as the peer keeps taking data: a stream whose peer accepts
/// nothing for `stall` is reset with [`close_code::SLOW_READER`]. The chunks written are
/// taken out of the slice (left empty).
pub async fn write_within(
    send: &mut SendStream,
    chunks: &mut [Bytes],
    stall: Duration,
) -> Result<(), WriteFail> {
    let mut i = 0;
    while i < chunks.len() {
        match tokio::time::timeout(stall, send.write_chunks(&mut chunks[i..])).await {
            Ok(Ok(written)) => i += written.chunks,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                let _ = send.reset(close_code::SLOW_READER.into());
                return Err(WriteFail::Stalled(stall));
            }
        }
        while i < chunks.len() && chunks[i].is_empty() {
            i += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
