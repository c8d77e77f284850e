//! A node's side of one QUIC stream's frames: reading a request (within the request timeout),
//! writing frames to a peer that may stall, and answering with a response or an error. Every
//! request handler and the leader's replication streams use these.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use protocol::{ErrorCode, ErrorResponse, ProtocolError, Request, Response};

use crate::common::Common;
use crate::config::NodeConfig;

/// Why no request came out of a stream.
pub(crate) enum ReadFail {
    /// Answer with this error.
    Answer(ErrorCode, String),
    /// The stream is gone; nobody to answer.
    Gone,
}

impl From<ProtocolError> for ReadFail {
    fn from(e: ProtocolError) -> Self {
        ReadFail::Answer(e.code(), e.to_string())
    }
}

/// Read exactly one request frame. The body is allocated only after the header passed its
/// limits.
pub(crate) async fn read_request(
    recv: &mut quinn::RecvStream,
    cfg: &NodeConfig,
    limits: &protocol::Limits,
) -> Result<Request, ReadFail> {
    let timeout = Duration::from_millis(cfg.limits.request_timeout_ms as u64);
    let mut reader = frames::FrameReader::requests();
    match tokio::time::timeout(timeout, read_frame(&mut reader, recv, limits)).await {
        Ok(r) => r,
        Err(_) => Err(ReadFail::Answer(
            ErrorCode::Timeout,
            format!("no complete request within {} ms", timeout.as_millis()),
        )),
    }
}

/// Read one request frame, however long it takes to come. A stream that ends before a frame
/// is a truncated request.
pub(crate) async fn read_frame(
    reader: &mut frames::FrameReader,
    recv: &mut quinn::RecvStream,
    limits: &protocol::Limits,
) -> Result<Request, ReadFail> {
    match reader.request(recv, limits).await {
        Ok(Some(req)) => Ok(req),
        Ok(None) => Err(ProtocolError::Truncated("frame header").into()),
        Err(frames::ReadFail::Protocol(e)) => Err(e.into()),
        Err(frames::ReadFail::Stream(_)) => Err(ReadFail::Gone),
    }
}

/// Write `chunks` in full, as long as the peer keeps taking data: a stream whose peer accepts
/// nothing for `write_stall_timeout_ms` is reset with the slow-reader code. Returns whether
/// everything was written (a peer that went away, or was cut off, is not an error of the
/// node's).
pub(crate) async fn write_all(
    common: &Common,
    send: &mut quinn::SendStream,
    chunks: &mut [Bytes],
) -> bool {
    let stall = Duration::from_millis(common.config.limits.write_stall_timeout_ms as u64);
    match frames::write_within(send, chunks, stall).await {
        Ok(()) => true,
        Err(frames::WriteFail::Stream(_)) => false,
        Err(e @ frames::WriteFail::Stalled(_)) => {
            common
                .metrics
                .c
                .slow_readers_cut
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!("{e}");
            false
        }
    }
}

/// Write one response frame and finish the stream.
pub(crate) async fn reply(common: &Common, send: &mut quinn::SendStream, resp: &Response) {
    if write_all(common, send, &mut [frames::encode_response(resp)]).await {
        let _ = send.finish();
    }
}

pub(crate) async fn reply_error(
    common: &Common,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    msg: &str,
) {
    send_error(common, send, code, msg, 0, None).await
}

pub(crate) async fn send_error(
    common: &Common,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    msg: &str,
    detail: u64,
    log: Option<&str>,
) {
    common.metrics.record_error(code);
    let leader = match code {
        ErrorCode::NotLeader => common.leader_hint(log),
        _ => String::new(),
    };
    let resp = Response::Error(ErrorResponse {
        code,
        message: msg.to_string(),
        leader,
        detail,
    });
    reply(common, send, &resp).await
}
