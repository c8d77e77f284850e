//! Frames over real quinn streams on loopback.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::{close_code, ErrorCode, Limits, ProtocolError, Request, Response};
use quinn::{ReadError, RecvStream, SendStream, WriteError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;

/// Two ends of one QUIC connection on 127.0.0.1; the accepting end's receive windows are
/// `window` bytes.
struct Pair {
    dialer: quinn::Connection,
    acceptor: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

async fn pair(window: u32) -> Pair {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = CertificateDer::from(key.cert.der().to_vec());
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));

    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], pkcs8)
        .unwrap();
    tls.alpn_protocols = vec![protocol::ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(window.into());
    transport.receive_window(window.into());
    server.transport_config(Arc::new(transport));
    let accepting = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![protocol::ALPN.to_vec()];
    let mut dialing = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    dialing.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    )));
    let addr = accepting.local_addr().unwrap();
    let (dialer, acceptor) = tokio::join!(
        async { dialing.connect(addr, "localhost").unwrap().await.unwrap() },
        async { accepting.accept().await.unwrap().await.unwrap() },
    );
    Pair {
        dialer,
        acceptor,
        _endpoints: (accepting, dialing),
    }
}

/// A stream from the dialer to the acceptor: the dialer's send side and the acceptor's
/// receive side (a stream is announced to the peer by its first bytes).
async fn stream(p: &Pair, first: &[u8]) -> (SendStream, RecvStream, RecvStream, SendStream) {
    let (mut send, recv_back) = p.dialer.open_bi().await.unwrap();
    send.write_all(first).await.unwrap();
    let (send_back, recv) = p.acceptor.accept_bi().await.unwrap();
    (send, recv, recv_back, send_back)
}

fn ping() -> Request {
    Request::Status
}

#[tokio::test]
async fn frames_round_trip_and_a_clean_end_between_frames_is_the_end() {
    let p = pair(1 << 20).await;
    let limits = Limits::default();
    let mut two = encode_request(&ping()).to_vec();
    two.extend_from_slice(&encode_request(&Request::ListLogs));
    let (mut send, mut recv, mut back, mut answer) = stream(&p, &two).await;
    send.finish().unwrap();
    let mut reader = FrameReader::requests();
    assert_eq!(
        reader.request(&mut recv, &limits).await.unwrap(),
        Some(ping())
    );
    assert_eq!(
        reader.request(&mut recv, &limits).await.unwrap(),
        Some(Request::ListLogs)
    );
    assert_eq!(reader.request(&mut recv, &limits).await.unwrap(), None);

    write(&mut answer, &encode_response(&Response::Ok))
        .await
        .unwrap();
    answer.finish().unwrap();
    let mut reader = FrameReader::responses();
    assert_eq!(
        reader.response(&mut back, &limits).await.unwrap(),
        Some(Response::Ok)
    );
    assert_eq!(reader.response(&mut back, &limits).await.unwrap(), None);
}

#[tokio::test]
async fn a_stream_that_ends_inside_a_frame_is_truncated() {
    let p = pair(1 << 20).await;
    let limits = Limits::default();
    let frame = encode_request(&Request::EpochEnd {
        log: "a-log".into(),
        epoch: 3,
    });
    assert!(frame.len() > protocol::FRAME_HEADER_LEN);
    for (cut, what) in [(3, "frame header"), (frame.len() - 1, "frame body")] {
        let (mut send, mut recv, _, _) = stream(&p, &frame[..cut]).await;
        send.finish().unwrap();
        match FrameReader::requests().request(&mut recv, &limits).await {
            Err(ReadFail::Protocol(ProtocolError::Truncated(w))) => assert_eq!(w, what),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_frame_over_the_limit_is_refused_before_its_body_and_a_bad_answer_stops_the_stream() {
    let p = pair(1 << 20).await;
    let limits = Limits {
        frame_bytes_max: 64,
        ..Limits::default()
    };
    // An answer declaring a body over the 64-byte limit: refused from the header alone; the node's side
    // learns that the stream was stopped as a protocol violation.
    let big = encode_response(&Response::Error(protocol::ErrorResponse {
        code: ErrorCode::Internal,
        message: "x".repeat(1000),
        leader: String::new(),
        detail: 0,
    }));
    let (mut send, mut recv, _, _) = stream(&p, &big[..protocol::FRAME_HEADER_LEN]).await;
    match FrameReader::responses().response(&mut recv, &limits).await {
        Err(ReadFail::Protocol(e)) => assert_eq!(e.code(), ErrorCode::LimitExceeded, "{e}"),
        other => panic!("{other:?}"),
    }
    let stopped = loop {
        match send.write_all(&big[protocol::FRAME_HEADER_LEN..]).await {
            Err(e) => break e,
            Ok(()) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    assert_eq!(
        stopped,
        WriteError::Stopped(close_code::PROTOCOL_VIOLATION.into())
    );

    // A request where an answer is expected, and the reverse: the wrong direction.
    let (_s, mut recv, _, _) = stream(&p, &encode_request(&ping())).await;
    assert!(matches!(
        FrameReader::responses().response(&mut recv, &limits).await,
        Err(ReadFail::Protocol(ProtocolError::UnknownKind(_)))
    ));
    let (_s, mut recv, _, _) = stream(&p, &encode_response(&Response::Ok)).await;
    assert!(matches!(
        FrameReader::requests().request(&mut recv, &limits).await,
        Err(ReadFail::Protocol(ProtocolError::UnknownKind(_)))
    ));
}

#[tokio::test]
async fn a_cancelled_read_loses_nothing() {
    let p = pair(1 << 20).await;
    let limits = Limits::default();
    let frame = encode_request(&Request::ListLogs);
    let (mut send, mut recv, _, _) = stream(&p, &frame[..5]).await;
    let mut reader = FrameReader::requests();
    // Nothing more comes: the read is abandoned with part of the header consumed.
    let first = tokio::time::timeout(
        Duration::from_millis(50),
        reader.request(&mut recv, &limits),
    )
    .await;
    assert!(first.is_err(), "{first:?}");
    send.write_all(&frame[5..]).await.unwrap();
    send.finish().unwrap();
    assert_eq!(
        reader.request(&mut recv, &limits).await.unwrap(),
        Some(Request::ListLogs)
    );
}

#[tokio::test]
async fn a_peer_that_takes_nothing_is_reset_as_a_slow_reader() {
    // The acceptor grants a 4 KiB window and never reads.
    let p = pair(4096).await;
    let (mut send, mut recv, _, _) = stream(&p, b"!").await;
    let mut chunks = [Bytes::from(vec![7u8; 64 * 1024])];
    match write_within(&mut send, &mut chunks, Duration::from_millis(100)).await {
        Err(WriteFail::Stalled(d)) => assert_eq!(d, Duration::from_millis(100)),
        other => panic!("{other:?}"),
    }
    // The reader sees the reset code, after what the window let through.
    let mut buf = vec![0u8; 64 * 1024];
    let code = loop {
        match recv.read(&mut buf).await {
            Ok(Some(_)) => continue,
            Err(ReadError::Reset(code)) => break code,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, close_code::SLOW_READER.into());
}
