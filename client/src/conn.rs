//! Connections and frames: dialling nodes, authenticating, and one exchange on one stream.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use protocol::{ErrorCode, Limits, ProtocolError, Request, Response};
use quinn::{ConnectionError, ReadError, RecvStream, SendStream, VarInt};

use crate::config::ServerAddr;
use crate::{Error, Result};

/// QUIC application code for a normal close or stop.
pub(crate) const CODE_NORMAL: u32 = 0;
/// QUIC application code for a protocol violation.
const CODE_PROTOCOL: u32 = protocol::close_code::PROTOCOL_VIOLATION;
const CODE_BUSY: u64 = protocol::close_code::BUSY as u64;
const CODE_UNAUTHENTICATED: u64 = protocol::close_code::UNAUTHENTICATED as u64;
const CODE_SLOW_READER: u64 = protocol::close_code::SLOW_READER as u64;
/// Most resolved addresses of one host tried at once.
const ADDRESSES_PER_HOST_MAX: usize = 4;

/// Encode one request into a frame.
pub(crate) fn encode(req: &Request) -> Bytes {
    frames::encode_request(req)
}

/// The error for a connection that ended.
pub(crate) fn connection_error(e: &ConnectionError) -> Error {
    match e {
        ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            match close.error_code.into_inner() {
                CODE_UNAUTHENTICATED => Error::Server {
                    code: ErrorCode::Unauthenticated,
                    message: if reason.is_empty() {
                        "the node closed the connection: a valid token is required".into()
                    } else {
                        reason
                    },
                    leader: String::new(),
                    detail: 0,
                },
                // The node refuses a connection over its limit before it accepts any stream:
                // nothing was processed, so this is a definite failure, worth a later retry.
                CODE_BUSY => Error::Connect(format!(
                    "the node refused the connection because it is busy ({reason})"
                )),
                code => Error::ConnectionLost(format!(
                    "the node closed the connection (code {code}{}{reason})",
                    if reason.is_empty() { "" } else { ": " }
                )),
            }
        }
        ConnectionError::TransportError(t) if is_crypto(u64::from(t.code)) => {
            Error::Tls(t.to_string())
        }
        ConnectionError::ConnectionClosed(c) if is_crypto(u64::from(c.error_code)) => {
            Error::Tls(format!("the node refused the handshake: {c}"))
        }
        other => Error::ConnectionLost(other.to_string()),
    }
}

/// QUIC transport error codes 0x100..=0x1ff carry a TLS alert.
fn is_crypto(code: u64) -> bool {
    (0x100..=0x1ff).contains(&code)
}

fn read_error(e: ReadError) -> Error {
    match e {
        ReadError::Reset(code) if code.into_inner() == CODE_SLOW_READER => {
            Error::ConnectionLost("the node reset the stream: this reader was too slow".into())
        }
        ReadError::Reset(code) => {
            Error::ConnectionLost(format!("the node reset the stream (code {code})"))
        }
        ReadError::ConnectionLost(e) => connection_error(&e),
        other => Error::ConnectionLost(other.to_string()),
    }
}

/// Reads answer frames from a stream, resuming where a cancelled read stopped; a frame that
/// fails its checks stops the stream as a protocol violation.
pub(crate) struct FrameReader(frames::FrameReader);

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader(frames::FrameReader::responses())
    }
}

impl FrameReader {
    /// Read one response frame. `Ok(None)` when the stream ended cleanly where a frame would
    /// start.
    pub async fn read(
        &mut self,
        recv: &mut RecvStream,
        limits: &Limits,
    ) -> Result<Option<Response>> {
        self.0.response(recv, limits).await.map_err(|e| match e {
            frames::ReadFail::Stream(e) => read_error(e),
            frames::ReadFail::Protocol(e) => Error::Protocol(e),
        })
    }
}

/// Write one request frame and finish the send side. A node that stopped reading (it answered
/// early, for example because the header failed its checks) is not an error: its answer is read
/// from the receive side.
pub(crate) async fn write_request(send: &mut SendStream, frame: &[u8]) -> Result<()> {
    match frames::write(send, frame).await {
        Ok(()) => {
            let _ = send.finish();
            Ok(())
        }
        Err(quinn::WriteError::Stopped(_)) => Ok(()),
        Err(quinn::WriteError::ConnectionLost(e)) => Err(connection_error(&e)),
        Err(e) => Err(Error::ConnectionLost(e.to_string())),
    }
}

/// Open a stream on `conn` and send `frame` on it. `sent` is set once the request may have left.
pub(crate) async fn open_and_send(
    conn: &quinn::Connection,
    frame: &[u8],
    sent: &mut bool,
) -> Result<(SendStream, RecvStream)> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| connection_error(&e))?;
    *sent = true;
    write_request(&mut send, frame).await?;
    Ok((send, recv))
}

/// One exchange on a new stream of `conn`: send `frame`, read one answer. `sent` is set once the
/// request may have left (everything before that is certain to have had no effect).
pub(crate) async fn exchange(
    conn: &quinn::Connection,
    frame: &[u8],
    limits: &Limits,
    sent: &mut bool,
) -> Result<Response> {
    let (_send, mut recv) = open_and_send(conn, frame, sent).await?;
    match FrameReader::default().read(&mut recv, limits).await {
        Ok(Some(resp)) => Ok(resp),
        Ok(None) => Err(Error::ConnectionLost(
            "the node ended the stream without an answer".into(),
        )),
        Err(e) => {
            // A peer that does not speak the protocol correctly loses the connection. A frame
            // over this client's own limit, or an error code from a later revision of the
            // protocol, is not such a violation.
            let violation = matches!(&e, Error::Protocol(p) if !matches!(
                p,
                ProtocolError::FrameTooLarge { .. } | ProtocolError::UnknownErrorCode(_)
            ));
            if violation {
                conn.close(VarInt::from_u32(CODE_PROTOCOL), b"protocol violation");
            }
            Err(e)
        }
    }
}

/// quinn endpoints, one per address family, created on first use.
#[derive(Default)]
pub(crate) struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    /// The endpoint for dialling `target`, bound to `0.0.0.0:0` or `[::]:0`.
    pub fn for_target(&mut self, target: &SocketAddr) -> Result<quinn::Endpoint> {
        let (slot, bind): (_, SocketAddr) = if target.is_ipv4() {
            (&mut self.v4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into())
        } else {
            (&mut self.v6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        };
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| Error::Connect(format!("cannot bind a UDP socket on {bind}: {e}")))?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Every endpoint created so far.
    pub fn all(&self) -> impl Iterator<Item = &quinn::Endpoint> {
        self.v4.iter().chain(self.v6.iter())
    }
}

/// What a dial needs besides the address.
pub(crate) struct DialParams<'a> {
    pub quic: &'a quinn::ClientConfig,
    pub server_name: Option<&'a str>,
    pub token: Option<&'a str>,
    pub limits: &'a Limits,
    pub connect_timeout: Duration,
}

/// Resolve `addr`, connect to one of its addresses (several are tried at once), and
/// authenticate if a token is configured. Bounded by `connect_timeout` as a whole.
pub(crate) async fn dial(
    addr: &ServerAddr,
    endpoints: &std::sync::Mutex<Endpoints>,
    params: &DialParams<'_>,
) -> Result<quinn::Connection> {
    let work = async {
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((addr.host.as_str(), addr.port))
            .await
            .map_err(|e| Error::Connect(format!("cannot resolve {addr}: {e}")))?
            .fold(Vec::new(), |mut v, a| {
                if !v.contains(&a) && v.len() < ADDRESSES_PER_HOST_MAX {
                    v.push(a);
                }
                v
            });
        if resolved.is_empty() {
            return Err(Error::Connect(format!("{addr} resolves to no address")));
        }
        let name = addr.tls_name(params.server_name);
        let mut attempts = FuturesUnordered::new();
        for target in resolved {
            let endpoint = endpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .for_target(&target)?;
            attempts.push(connect_one(endpoint, target, name, params));
        }
        let mut last = None;
        while let Some(result) = attempts.next().await {
            match result {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(prefer(last, e)),
            }
        }
        Err(last.unwrap_or_else(|| Error::Connect(format!("cannot connect to {addr}"))))
    };
    match tokio::time::timeout(params.connect_timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(Error::Connect(format!(
            "no answer from {addr} within {:?}",
            params.connect_timeout
        ))),
    }
}

/// Of two failures, the one to report: a TLS or authentication failure says more than a
/// transport failure.
pub(crate) fn prefer(earlier: Option<Error>, later: Error) -> Error {
    match earlier {
        Some(e @ (Error::Tls(_) | Error::Server { .. } | Error::Config(_)))
            if later.is_transient() =>
        {
            e
        }
        _ => later,
    }
}

async fn connect_one(
    endpoint: quinn::Endpoint,
    target: SocketAddr,
    name: &str,
    params: &DialParams<'_>,
) -> Result<quinn::Connection> {
    let connecting = endpoint
        .connect_with(params.quic.clone(), target, name)
        .map_err(|e| match e {
            quinn::ConnectError::InvalidServerName(n) => Error::Config(format!(
                "{n:?} is not a valid TLS server name (a DNS name or an IP address)"
            )),
            other => Error::Connect(format!("{target}: {other}")),
        })?;
    let conn = connecting.await.map_err(|e| match connection_error(&e) {
        Error::ConnectionLost(m) => Error::Connect(format!("{target}: {m}")),
        Error::Tls(m) => Error::Tls(format!("{target} ({name}): {m}")),
        other => other,
    })?;
    if let Some(token) = params.token {
        authenticate(&conn, token, params.limits)
            .await
            .inspect_err(|_| conn.close(VarInt::from_u32(CODE_NORMAL), b""))?;
    }
    tracing::debug!(%target, name, "connected");
    Ok(conn)
}

/// The first exchange of a connection when a token is configured.
async fn authenticate(conn: &quinn::Connection, token: &str, limits: &Limits) -> Result<()> {
    let frame = encode(&Request::Auth {
        token: Bytes::copy_from_slice(token.as_bytes()),
    });
    let mut sent = false;
    match exchange(conn, &frame, limits, &mut sent).await {
        Ok(Response::Ok) => Ok(()),
        Ok(Response::Error(e)) => Err(e.into()),
        Ok(_) => Err(ProtocolError::Malformed("unexpected answer to Auth").into()),
        // A node refusing the token closes the connection with code 5; the close may race the
        // end of the stream.
        Err(e) => match conn.close_reason() {
            Some(reason) => match connection_error(&reason) {
                e @ Error::Server { .. } => Err(e),
                _ => Err(e.not_sent()),
            },
            None => Err(e.not_sent()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ApplicationClose;

    #[test]
    fn close_codes_map_to_errors() {
        let closed = |code: u32, reason: &'static [u8]| {
            connection_error(&ConnectionError::ApplicationClosed(ApplicationClose {
                error_code: VarInt::from_u32(code),
                reason: Bytes::from_static(reason),
            }))
        };
        assert_eq!(closed(5, b"").code(), Some(ErrorCode::Unauthenticated));
        // Refused as busy before any stream: a definite failure, retried later.
        let busy = closed(2, b"busy");
        assert!(
            matches!(&busy, Error::Connect(m) if m.contains("busy")),
            "{busy}"
        );
        assert!(!busy.is_unknown_outcome());
        assert!(closed(0, b"").is_transient());
        assert!(connection_error(&ConnectionError::TimedOut).is_transient());
        assert!(connection_error(&ConnectionError::Reset).is_transient());
    }

    #[test]
    fn tls_failures_are_preferred_over_transport_failures() {
        let e = prefer(
            Some(Error::Tls("unknown issuer".into())),
            Error::Connect("x".into()),
        );
        assert!(matches!(e, Error::Tls(_)));
        let e = prefer(Some(Error::Connect("x".into())), Error::Tls("y".into()));
        assert!(matches!(e, Error::Tls(_)));
        let e = prefer(None, Error::Connect("x".into()));
        assert!(matches!(e, Error::Connect(_)));
    }
}
