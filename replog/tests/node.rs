//! Black-box tests of `replog node` through the CLI and the raw wire protocol.

mod common;

use bytes::Bytes;
use common::*;
use protocol::{
    Acks, AppendRequest, ErrorCode, ReadRequest, Request, Response, TailRequest, RECEIPT_DUPLICATE,
};

fn append_req(log: &str, values: &[&str]) -> AppendRequest {
    AppendRequest {
        log: log.into(),
        acks: Acks::Leader,
        expected_offset: None,
        producer: None,
        timeout_ms: 0,
        records: values
            .iter()
            .map(|v| Bytes::copy_from_slice(v.as_bytes()))
            .collect(),
    }
}

fn error_code(r: &Response) -> ErrorCode {
    match r {
        Response::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn read_values(env: &Env, server: &str, log: &str, from: u64) -> Vec<(u64, String)> {
    env.cli_json(
        &[
            "read",
            "--server",
            server,
            "--log",
            log,
            "--from",
            &from.to_string(),
            "--json",
        ],
        "",
    )
    .into_iter()
    .map(|v| {
        (
            v["offset"].as_u64().unwrap(),
            v["value"].as_str().unwrap().to_string(),
        )
    })
    .collect()
}

#[test]
fn cli_appends_and_reads_back_across_restart_and_crash() {
    let env = Env::new();
    let node = env.node("n", &[]);
    let s = node.server();
    let created = env.cli_json(&["create", "--server", &s, "--log", "orders", "--json"], "");
    assert_eq!(created[0]["created"], true);
    // Creating it again fails clearly, unless asked to tolerate it.
    let again = env.cli(&["create", "--server", &s, "--log", "orders"], "");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    env.cli_ok(
        &[
            "create",
            "--server",
            &s,
            "--log",
            "orders",
            "--if-not-exists",
        ],
        "",
    );

    let receipts = env.cli_json(
        &["append", "--server", &s, "--log", "orders", "--json"],
        "first\nsecond\nthird\n",
    );
    let offsets: Vec<u64> = receipts
        .iter()
        .map(|r| r["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [0, 1, 2]);
    assert!(receipts
        .iter()
        .all(|r| r["level"] == "leader" && r["epoch"] == 1));
    let more = env.cli_json(
        &[
            "append", "--server", &s, "--log", "orders", "--acks", "none", "--json",
        ],
        "fourth\n",
    );
    assert_eq!(more[0]["offset"], 3);
    assert_eq!(more[0]["level"], "none");

    let want: Vec<(u64, String)> = ["first", "second", "third", "fourth"]
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64, v.to_string()))
        .collect();
    // acks=none is readable once committed; wait for it through read's min-offset semantics.
    let node = node.restart();
    let s = node.server();
    assert_eq!(read_values(&env, &s, "orders", 0), want);
    assert_eq!(read_values(&env, &s, "orders", 2), want[2..]);
    let count = env.cli_json(
        &[
            "read", "--server", &s, "--log", "orders", "--from", "1", "--count", "2", "--json",
        ],
        "",
    );
    assert_eq!(count.len(), 2);

    // Everything acknowledged at acks=leader survives SIGKILL.
    let node = node.crash_and_restart();
    let s = node.server();
    assert_eq!(read_values(&env, &s, "orders", 0)[..3], want[..3]);

    let status = env.cli_json(&["status", "--server", &s, "--json"], "");
    let logs = status[0]["logs"].as_array().unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0]["name"], "orders");
    assert!(logs[0]["end"].as_u64().unwrap() >= 3);
    assert_eq!(status[0]["role"], "standalone");

    // Replicated levels are refused with a clear error until there are replicas.
    let out = env.cli(
        &[
            "append", "--server", &s, "--log", "orders", "--acks", "sync",
        ],
        "x\n",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_enough_replicas"),
        "{out:?}"
    );
    // A missing log is a clear error too.
    let out = env.cli(
        &["read", "--server", &s, "--log", "nope", "--from", "0"],
        "",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("log_not_found"),
        "{out:?}"
    );
}

#[test]
fn idempotent_retry_is_stored_once_even_across_a_crash() {
    let env = Env::new();
    let node = env.node("n", &[]);
    let rt = rt();
    let conn = rt.block_on(env.connect(&node));
    rt.block_on(async {
        assert_eq!(exchange(&conn, &create_req("l")).await, Response::Ok);
        let mut a = append_req("l", &["a", "b"]);
        a.producer = Some((42, 0));
        let first = match exchange(&conn, &Request::Append(a.clone())).await {
            Response::Receipt(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!((first.first, first.next, first.flags), (0, 2, 0));
        // The same append again (a retry after a lost ack): the original receipt, marked.
        match exchange(&conn, &Request::Append(a.clone())).await {
            Response::Receipt(r) => {
                assert_eq!((r.first, r.next), (0, 2));
                assert_eq!(r.flags & RECEIPT_DUPLICATE, RECEIPT_DUPLICATE);
            }
            other => panic!("{other:?}"),
        }
        // Skipping sequences is refused, with the expected one in `detail`.
        let mut gap = append_req("l", &["z"]);
        gap.producer = Some((42, 5));
        match exchange(&conn, &Request::Append(gap)).await {
            Response::Error(e) => assert_eq!((e.code, e.detail), (ErrorCode::SequenceGap, 2)),
            other => panic!("{other:?}"),
        }
    });
    drop(conn);
    // The producer table is rebuilt from the log after a crash.
    let node = node.crash_and_restart();
    let conn = rt.block_on(env.connect(&node));
    rt.block_on(async {
        let mut a = append_req("l", &["a", "b"]);
        a.producer = Some((42, 0));
        match exchange(&conn, &Request::Append(a)).await {
            Response::Receipt(r) => {
                assert_eq!((r.first, r.next), (0, 2));
                assert_ne!(r.flags & RECEIPT_DUPLICATE, 0);
            }
            other => panic!("{other:?}"),
        }
        let mut next = append_req("l", &["c"]);
        next.producer = Some((42, 2));
        match exchange(&conn, &Request::Append(next)).await {
            Response::Receipt(r) => assert_eq!((r.first, r.flags), (2, 0)),
            other => panic!("{other:?}"),
        }
        // Conditional and idempotent together: the retry is a duplicate, not a conflict.
        let mut both = append_req("l", &["d"]);
        both.producer = Some((42, 3));
        both.expected_offset = Some(3);
        for round in 0..2 {
            match exchange(&conn, &Request::Append(both.clone())).await {
                Response::Receipt(r) => {
                    assert_eq!(r.first, 3);
                    assert_eq!(r.flags & RECEIPT_DUPLICATE != 0, round == 1);
                }
                other => panic!("{other:?}"),
            }
        }
    });
    assert_eq!(
        read_values(&env, &node.server(), "l", 0),
        vec![
            (0, "a".into()),
            (1, "b".into()),
            (2, "c".into()),
            (3, "d".into())
        ]
    );
}

#[test]
fn conditional_append_conflicts_name_the_real_end() {
    let env = Env::new();
    let node = env.node("n", &[]);
    let s = node.server();
    env.cli_ok(&["create", "--server", &s, "--log", "l"], "");
    let r = env.cli_json(
        &[
            "append",
            "--server",
            &s,
            "--log",
            "l",
            "--expected-offset",
            "0",
            "--json",
        ],
        "a\nb\n",
    );
    assert_eq!(r.len(), 2);
    let out = env.cli(
        &[
            "append",
            "--server",
            &s,
            "--log",
            "l",
            "--expected-offset",
            "1",
        ],
        "c\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("offset_conflict") && err.contains("2"),
        "{err}"
    );
    let ok = env.cli_json(
        &[
            "append",
            "--server",
            &s,
            "--log",
            "l",
            "--expected-offset",
            "2",
            "--json",
        ],
        "c\n",
    );
    assert_eq!(ok[0]["offset"], 2);
    assert_eq!(read_values(&env, &s, "l", 0).len(), 3);
}

#[test]
fn tail_delivers_records_as_they_commit() {
    let env = Env::new();
    let node = env.node("n", &[]);
    let s = node.server();
    env.cli_ok(&["create", "--server", &s, "--log", "t"], "");
    env.cli_ok(&["append", "--server", &s, "--log", "t"], "old\n");
    let tail = std::process::Command::new(BIN)
        .args([
            "tail", "--server", &s, "--log", "t", "--from", "0", "--count", "3", "--json",
        ])
        .env("REPLOG_DEV_CA_DIR", env.ca_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    env.cli_ok(&["append", "--server", &s, "--log", "t"], "new1\nnew2\n");
    let out = tail.wait_with_output().unwrap();
    assert!(out.status.success());
    let got: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let values: Vec<&str> = got.iter().map(|v| v["value"].as_str().unwrap()).collect();
    assert_eq!(values, ["old", "new1", "new2"]);

    // The raw stream: a tail from the end gets only what is appended after it started.
    let rt = rt();
    rt.block_on(async {
        let conn = env.connect(&node).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&encode(&Request::Tail(TailRequest {
            log: "t".into(),
            from: 3,
            bytes_max: 1 << 20,
        })))
        .await
        .unwrap();
        send.finish().unwrap();
        let append = exchange(&conn, &Request::Append(append_req("t", &["live"]))).await;
        assert!(matches!(append, Response::Receipt(r) if r.first == 3));
        let mut hdr = [0u8; 8];
        recv.read_exact(&mut hdr).await.unwrap();
        let h = protocol::FrameHeader::parse(&hdr, &protocol::Limits::default()).unwrap();
        let mut body = vec![0u8; h.body_len as usize];
        recv.read_exact(&mut body).await.unwrap();
        match protocol::decode_response(&h, body.into(), &protocol::Limits::default()).unwrap() {
            Response::Batches(b) => {
                assert_eq!(b.next_offset, 4);
                assert_eq!(batch_values(&b.batches, 3), vec![(3, b"live".to_vec())]);
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn garbage_gets_clear_errors_and_the_node_keeps_serving() {
    let env = Env::new();
    let node = env.node("n", &[]);
    let rt = rt();
    rt.block_on(async {
        let conn = env.connect(&node).await;
        assert_eq!(exchange(&conn, &create_req("keep")).await, Response::Ok);
        let r = exchange(&conn, &Request::Append(append_req("keep", &["precious"]))).await;
        assert!(matches!(r, Response::Receipt(_)), "{r:?}");

        let good = encode(&Request::Append(append_req("keep", &["x"])));
        // The valid frame with `bytes` written over it at `at`.
        let patched = |at: usize, bytes: &[u8]| {
            let mut b = good.to_vec();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            b
        };
        let mut trailing = good.to_vec();
        trailing.push(0xAA);
        let body_len = (trailing.len() - 8) as u32;
        trailing[0..4].copy_from_slice(&body_len.to_le_bytes());
        let mut too_many = append_req("keep", &["x"]);
        too_many.records = vec![Bytes::new(); 70_000];
        let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
            (
                "unknown version",
                patched(4, &[9]),
                ErrorCode::UnsupportedVersion,
            ),
            (
                "unknown kind",
                patched(5, &[0x3f]),
                ErrorCode::UnknownMessage,
            ),
            (
                "response kind as request",
                patched(5, &[0x80]),
                ErrorCode::UnknownMessage,
            ),
            ("reserved bits", patched(6, &[1]), ErrorCode::Malformed),
            (
                "length beyond frame_bytes_max",
                patched(0, &u32::MAX.to_le_bytes()),
                ErrorCode::LimitExceeded,
            ),
            (
                "stream closed mid-frame",
                good[..good.len() - 3].to_vec(),
                ErrorCode::Malformed,
            ),
            (
                "stream closed mid-header",
                good[..5].to_vec(),
                ErrorCode::Malformed,
            ),
            (
                "TLS alert bytes",
                vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28, 0x00],
                ErrorCode::UnsupportedVersion,
            ),
            ("trailing garbage in body", trailing, ErrorCode::Malformed),
            (
                "peer request on a client connection",
                encode(&Request::Ack { durable: 1 }).to_vec(),
                ErrorCode::UnknownMessage,
            ),
            (
                "record count beyond records_max",
                encode(&Request::Append(too_many)).to_vec(),
                ErrorCode::LimitExceeded,
            ),
        ];
        for (what, bytes, code) in cases {
            let r = exchange_raw(&conn, &bytes)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(r.len(), 1, "{what}: {r:?}");
            assert_eq!(error_code(&r[0]), code, "{what}: {r:?}");
        }
        // Name too long.
        let r = exchange(&conn, &create_req("n".repeat(300))).await;
        assert_eq!(error_code(&r), ErrorCode::LimitExceeded);
        let r = exchange(&conn, &create_req("bad/name")).await;
        assert_eq!(error_code(&r), ErrorCode::InvalidName);
        // An append too large for one batch (8 MiB frame limit is fine, 4 MiB batch is not).
        let mut big = append_req("keep", &[]);
        big.records = vec![Bytes::from(vec![1u8; 6 << 20])];
        let r = exchange(&conn, &Request::Append(big)).await;
        assert_eq!(error_code(&r), ErrorCode::LimitExceeded);
        // A read below the start or beyond the end.
        let r = exchange(
            &conn,
            &Request::Read(ReadRequest {
                log: "keep".into(),
                from: 99,
                bytes_max: 4096,
                wait_ms: 0,
                min_offset: 0,
            }),
        )
        .await;
        assert_eq!(error_code(&r), ErrorCode::OffsetOutOfRange);

        // The same connection still works, and so does a new one; the data is intact.
        let r = exchange(
            &conn,
            &Request::Read(ReadRequest {
                log: "keep".into(),
                from: 0,
                bytes_max: 1 << 20,
                wait_ms: 0,
                min_offset: 0,
            }),
        )
        .await;
        match r {
            Response::Batches(b) => {
                assert_eq!(batch_values(&b.batches, 0), vec![(0, b"precious".to_vec())])
            }
            other => panic!("{other:?}"),
        }
        let other = env.connect(&node).await;
        assert!(matches!(
            exchange(&other, &Request::Status).await,
            Response::Status(_)
        ));
    });
}

#[test]
fn tokens_are_required_when_configured() {
    let env = Env::new();
    let node = env.node("n", &["--token", "s3cret", "--token", "other"]);
    let s = node.server();
    let out = env.cli(&["status", "--server", &s], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unauthenticated"),
        "{out:?}"
    );
    let out = env.cli(&["status", "--server", &s, "--token", "wrong"], "");
    assert!(!out.status.success());
    env.cli_ok(
        &["create", "--server", &s, "--log", "l", "--token", "s3cret"],
        "",
    );
    env.cli_ok(&["status", "--server", &s, "--token", "other"], "");

    // A raw client that skips Auth is cut off with the unauthenticated close code.
    let rt = rt();
    rt.block_on(async {
        let conn = env.connect(&node).await;
        let _ = exchange_raw(&conn, &encode(&Request::Status)).await;
        let reason = conn.closed().await;
        assert!(
            matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == protocol::close_code::UNAUTHENTICATED.into()),
            "{reason:?}"
        );
    });
}

#[test]
fn untrusted_certificates_are_refused_both_ways() {
    let env = Env::new();
    let node = env.node("n", &[]);
    // A client trusting another CA refuses the node.
    let other = Env::new();
    let _other_node = other.node("o", &[]);
    let rt = rt();
    let err = rt
        .block_on(raw_connect(node.addr, &other.ca_pem(), None))
        .unwrap_err();
    assert!(
        err.contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );

    // A node that requires client certificates (production TLS from PEM files).
    let tls = node.data_dir.join("tls");
    let strict = env.node(
        "strict",
        &[
            "--tls-cert",
            tls.join("node.pem").to_str().unwrap(),
            "--tls-key",
            tls.join("node.key").to_str().unwrap(),
            "--tls-ca",
            env.ca_pem().to_str().unwrap(),
            "--client-ca",
            env.ca_pem().to_str().unwrap(),
        ],
    );
    rt.block_on(async {
        // Without a client certificate: refused.
        assert!(refused(strict.addr, &env.ca_pem(), None).await);
        // With a certificate from the other CA: refused.
        let otls = other.path("o").join("tls");
        let identity = (otls.join("node.pem"), otls.join("node.key"));
        assert!(refused(strict.addr, &env.ca_pem(), Some((&identity.0, &identity.1))).await);
        // With one from the trusted CA: served.
        let conn = raw_connect(
            strict.addr,
            &env.ca_pem(),
            Some((&tls.join("node.pem"), &tls.join("node.key"))),
        )
        .await
        .unwrap();
        assert!(matches!(
            exchange(&conn, &Request::Status).await,
            Response::Status(_)
        ));
        // The first node kept serving through all of it.
        let conn = env.connect(&node).await;
        assert!(matches!(
            exchange(&conn, &Request::ListLogs).await,
            Response::Logs(_)
        ));
    });
}

/// Whether the node refuses this client: the handshake fails, or (TLS 1.3 checks the client
/// certificate after the client considers the handshake done) the first exchange does.
async fn refused(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> bool {
    match raw_connect(addr, ca, identity).await {
        Err(_) => true,
        Ok(conn) => exchange_raw(&conn, &encode(&Request::Status))
            .await
            .is_err(),
    }
}

#[test]
fn connection_and_stream_limits_hold() {
    let env = Env::new();
    let cfg = env.write_config(
        "limits.toml",
        "[limits]\nconnections_max = 2\nstreams_per_connection_max = 4\nrequest_timeout_ms = 1500\n",
    );
    let node = env.node("n", &["--config", &cfg]);
    let rt = rt();
    rt.block_on(async {
        let a = env.connect(&node).await;
        let b = env.connect(&node).await;
        assert!(matches!(exchange(&a, &Request::Status).await, Response::Status(_)));
        // A third connection is closed at once with the busy code.
        let c = env.connect(&node).await;
        let reason = c.closed().await;
        assert!(
            matches!(&reason, quinn::ConnectionError::ApplicationClosed(x) if x.error_code == protocol::close_code::BUSY.into() && &x.reason[..] == b"busy"),
            "{reason:?}"
        );
        // Streams: four may be open at once. The node times out silent ones
        // (request_timeout_ms) with an error; their credit comes back once the client closes
        // its side, and only then can a fifth stream open.
        let mut held = Vec::new();
        for _ in 0..4 {
            let (mut send, recv) = b.open_bi().await.unwrap();
            send.write_all(&[1]).await.unwrap(); // the node sees the stream, never a full header
            held.push((send, recv));
        }
        let fifth = b.open_bi();
        tokio::pin!(fifth);
        let early = tokio::time::timeout(std::time::Duration::from_millis(500), &mut fifth).await;
        assert!(early.is_err(), "a fifth stream opened beyond streams_per_connection_max");
        for (mut send, mut recv) in held {
            let data = recv.read_to_end(1 << 20).await.unwrap();
            assert_eq!(error_code(&decode_all(&data).unwrap()[0]), ErrorCode::Timeout);
            let _ = send.reset(0u32.into());
        }
        let (mut send, mut recv) = fifth.await.unwrap();
        send.write_all(&encode(&Request::Status)).await.unwrap();
        send.finish().unwrap();
        let data = recv.read_to_end(1 << 20).await.unwrap();
        assert!(matches!(decode_all(&data).unwrap()[..], [Response::Status(_)]));
    });
}

#[test]
fn slow_readers_are_cut_off_and_memory_stays_bounded() {
    let env = Env::new();
    let cfg = env.write_config(
        "slow.toml",
        "[limits]\nwrite_stall_timeout_ms = 1000\nconnection_window_bytes = 1048576\n",
    );
    let node = env.node("n", &["--config", &cfg]);
    let rt = rt();
    rt.block_on(async {
        let conn = env.connect(&node).await;
        assert_eq!(exchange(&conn, &create_req("big")).await, Response::Ok);
        let value = Bytes::from(vec![7u8; 256 << 10]);
        for _ in 0..40 {
            let mut a = append_req("big", &[]);
            a.records = vec![value.clone(); 4];
            assert!(matches!(
                exchange(&conn, &Request::Append(a)).await,
                Response::Receipt(_)
            ));
        }
        let before = node.rss_anon_kib();
        // A reader that asks for everything and never reads: a tail and many big reads.
        let slow = env.connect(&node).await;
        let (mut send, mut tail_recv) = slow.open_bi().await.unwrap();
        send.write_all(&encode(&Request::Tail(TailRequest {
            log: "big".into(),
            from: 0,
            bytes_max: 4 << 20,
        })))
        .await
        .unwrap();
        send.finish().unwrap();
        let mut reads = Vec::new();
        for _ in 0..32 {
            let (mut send, recv) = slow.open_bi().await.unwrap();
            let r = Request::Read(ReadRequest {
                log: "big".into(),
                from: 0,
                bytes_max: 4 << 20,
                wait_ms: 0,
                min_offset: 0,
            });
            send.write_all(&encode(&r)).await.unwrap();
            send.finish().unwrap();
            reads.push(recv);
        }
        // The tail is reset with the slow-reader code once it stalls past the timeout.
        let reset = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            tail_recv.received_reset(),
        )
        .await
        .expect("the stalled tail was never reset");
        assert_eq!(
            reset.ok().flatten(),
            Some(protocol::close_code::SLOW_READER.into())
        );
        // 40 MiB are stored and 32 readers asked for 4 MiB each: the node's heap barely grew,
        // because answers are flow-controlled slices of the segment mappings.
        let after = node.rss_anon_kib();
        assert!(
            after < before + 64 * 1024,
            "anonymous memory grew from {before} KiB to {after} KiB"
        );
        // Others are still served.
        let fresh = env.connect(&node).await;
        assert!(matches!(
            exchange(&fresh, &Request::Status).await,
            Response::Status(_)
        ));
        drop(reads);
    });
}

#[test]
fn metrics_endpoint_counts_appends() {
    let env = Env::new();
    let node = env.node("n", &["--metrics-listen", "127.0.0.1:0"]);
    let s = node.server();
    env.cli_ok(&["create", "--server", &s, "--log", "m"], "");
    env.cli_ok(&["append", "--server", &s, "--log", "m"], "a\nb\nc\n");
    let addr = node.metrics.clone().expect("metrics address");
    let body = http_get(&addr, "/metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let appends = body
        .lines()
        .find_map(|l| l.strip_prefix("replog_append_records_total "))
        .unwrap();
    assert_eq!(appends.trim(), "3");
    assert!(body.contains("replog_append_latency_seconds_count"));
    assert!(body.contains("replog_flush_latency_seconds_bucket{le=\"+Inf\"}"));
    assert!(http_get(&addr, "/nope").starts_with("HTTP/1.1 404"));
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn bad_configuration_and_a_busy_data_dir_are_refused() {
    let env = Env::new();
    let cfg = env.write_config("typo.toml", "[limits]\nconections_max = 2\n");
    let out = std::process::Command::new(BIN)
        .args(["node", "--config", &cfg, "--data-dir"])
        .arg(env.path("x"))
        .env("REPLOG_DEV_CA_DIR", env.ca_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field"),
        "{out:?}"
    );

    let node = env.node("busy", &[]);
    let out = std::process::Command::new(BIN)
        .args(["node", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(env.path("busy"))
        .env("REPLOG_DEV_CA_DIR", env.ca_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{out:?}"
    );

    // A data directory belongs to one node id.
    let id = std::fs::read_to_string(node.data_dir.join("node-id")).unwrap();
    drop(node);
    let out = std::process::Command::new(BIN)
        .args([
            "node",
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            "someone-else",
            "--data-dir",
        ])
        .arg(env.path("busy"))
        .env("REPLOG_DEV_CA_DIR", env.ca_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("belongs to node") && err.contains(id.trim()),
        "{err}"
    );
}

#[test]
fn a_restarted_node_resets_connections_of_its_previous_life() {
    let env = Env::new();
    let node = env.node("n", &[]);
    let rt = rt();
    let conn = rt.block_on(env.connect(&node));
    assert!(matches!(
        rt.block_on(exchange(&conn, &Request::ListLogs)),
        Response::Logs(_)
    ));
    // Same data directory and address: the new process recognises the old connection ids and
    // answers them with a stateless reset, so the client learns at once that the connection is
    // gone (rather than after its idle timeout).
    let _node = node.crash_and_restart();
    let err = rt.block_on(async {
        let _ = exchange_raw(&conn, &encode(&Request::ListLogs)).await;
        conn.closed().await
    });
    assert!(matches!(err, quinn::ConnectionError::Reset), "{err:?}");
}

#[test]
fn read_size_token_length_and_idle_limits_hold() {
    let env = Env::new();
    let cfg = env.write_config(
        "small.toml",
        "[limits]\nread_bytes_max = 4096\nidle_timeout_ms = 1000\n[auth]\ntokens = [\"t\"]\n",
    );
    let node = env.node("n", &["--config", &cfg]);
    let rt = rt();
    rt.block_on(async {
        let conn = env.connect(&node).await;
        let ok = exchange(&conn, &Request::Auth { token: Bytes::from_static(b"t") }).await;
        assert_eq!(ok, Response::Ok);
        assert_eq!(exchange(&conn, &create_req("r")).await, Response::Ok);
        let value = "v".repeat(1000);
        for _ in 0..10 {
            let r = exchange(&conn, &Request::Append(append_req("r", &[&value]))).await;
            assert!(matches!(r, Response::Receipt(_)), "{r:?}");
        }
        // A read asking for 1 MiB gets at most read_bytes_max of whole batches.
        let read = Request::Read(ReadRequest {
            log: "r".into(),
            from: 0,
            bytes_max: 1 << 20,
            wait_ms: 0,
            min_offset: 0,
        });
        match exchange(&conn, &read).await {
            Response::Batches(b) => {
                assert!(b.batches.len() <= 4096 && !b.batches.is_empty(), "{}", b.batches.len());
                let n = batch_values(&b.batches, 0).len() as u64;
                assert_eq!(b.next_offset, n);
                assert!(n < 10);
            }
            other => panic!("{other:?}"),
        }
        // The connection goes quiet: the node closes it after idle_timeout_ms.
        let reason = tokio::time::timeout(std::time::Duration::from_secs(60), conn.closed())
            .await
            .unwrap();
        assert!(matches!(reason, quinn::ConnectionError::TimedOut), "{reason:?}");

        // A token longer than token_bytes_max is refused like a wrong one.
        let conn = env.connect(&node).await;
        let long = Bytes::from(vec![b't'; 5000]);
        let _ = exchange_raw(&conn, &encode(&Request::Auth { token: long })).await;
        let reason = conn.closed().await;
        assert!(
            matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == protocol::close_code::UNAUTHENTICATED.into()),
            "{reason:?}"
        );
    });
}

#[test]
fn producers_beyond_producers_per_log_max_are_forgotten_oldest_first() {
    let env = Env::new();
    let cfg = env.write_config("p.toml", "[limits]\nproducers_per_log_max = 2\n");
    let node = env.node("n", &["--config", &cfg]);
    let rt = rt();
    rt.block_on(async {
        let conn = env.connect(&node).await;
        assert_eq!(exchange(&conn, &create_req("l")).await, Response::Ok);
        let send = |pid: u64| {
            let mut a = append_req("l", &["x"]);
            a.producer = Some((pid, 0));
            Request::Append(a)
        };
        let flags = |r: Response| match r {
            Response::Receipt(r) => r.flags,
            other => panic!("{other:?}"),
        };
        for pid in [1, 2] {
            assert_eq!(flags(exchange(&conn, &send(pid)).await), 0);
        }
        assert_eq!(flags(exchange(&conn, &send(1)).await), RECEIPT_DUPLICATE);
        // A third producer evicts the least recently used one (2): its retry is stored again,
        // as documented, while producer 1 is still recognised.
        assert_eq!(flags(exchange(&conn, &send(3)).await), 0);
        assert_eq!(flags(exchange(&conn, &send(1)).await), RECEIPT_DUPLICATE);
        assert_eq!(flags(exchange(&conn, &send(2)).await), 0);
    });
}

#[test]
fn logs_max_caps_the_logs_of_a_node_across_restarts() {
    let env = Env::new();
    let cfg = env.write_config("logs.toml", "[limits]\nlogs_max = 2\n");
    let node = env.node("n", &["--config", &cfg]);
    let s = node.server();
    env.cli_ok(&["create", "--server", &s, "--log", "a"], "");
    env.cli_ok(&["create", "--server", &s, "--log", "b"], "");
    let out = env.cli(&["create", "--server", &s, "--log", "c"], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("limit_exceeded"),
        "{out:?}"
    );
    let node = node.restart();
    let out = env.cli(&["create", "--server", &node.server(), "--log", "c"], "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("logs_max"),
        "{out:?}"
    );
    let logs = env.cli_json(&["list", "--server", &node.server(), "--json"], "");
    assert_eq!(logs.len(), 2);
}

#[test]
fn a_full_shard_queue_slows_forwarding_down_and_loses_nothing() {
    let env = Env::new();
    let cfg = env.write_config("q.toml", "[limits]\nshard_queue_depth = 1\n");
    let node = env.node("n", &["--config", &cfg, "--metrics-listen", "127.0.0.1:0"]);
    // One log on each of the two shards: whichever shard the connection lands on, requests for
    // the other log are forwarded through a queue of depth 1.
    let names: Vec<String> = (0..2)
        .map(|shard| {
            (0..)
                .map(|i| format!("log-{i}"))
                .find(|n| server::shard_of(n, 2) == shard)
                .unwrap()
        })
        .collect();
    let rt = rt();
    rt.block_on(async {
        let conn = env.connect(&node).await;
        for n in &names {
            assert_eq!(exchange(&conn, &create_req(n.clone())).await, Response::Ok);
        }
        let mut tasks = Vec::new();
        for i in 0..64 {
            let conn = conn.clone();
            let log = names[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                exchange(&conn, &Request::Append(append_req(&log, &["x"]))).await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Response::Receipt(_)));
        }
        for n in &names {
            let r = exchange(
                &conn,
                &Request::Read(ReadRequest {
                    log: n.clone(),
                    from: 0,
                    bytes_max: 1 << 20,
                    wait_ms: 0,
                    min_offset: 0,
                }),
            )
            .await;
            match r {
                Response::Batches(b) => assert_eq!(batch_values(&b.batches, 0).len(), 32),
                other => panic!("{other:?}"),
            }
        }
    });
    let body = http_get(node.metrics.as_deref().unwrap(), "/metrics");
    let forwarded: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("replog_forwarded_total "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(forwarded >= 32, "forwarded {forwarded}");
}

#[test]
fn an_append_abandoned_by_its_client_is_not_stored() {
    let env = Env::new();
    let node = env.node("n", &[]);
    let rt = rt();
    rt.block_on(async {
        let conn = env.connect(&node).await;
        assert_eq!(exchange(&conn, &create_req("l")).await, Response::Ok);
        // The client stops reading the answer before the node gets to the request (both travel
        // together): the node must not store it, since the client may resend it elsewhere.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        recv.stop(0u32.into()).unwrap();
        send.write_all(&encode(&Request::Append(append_req("l", &["abandoned"]))))
            .await
            .unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
        let r = exchange(&conn, &Request::Append(append_req("l", &["kept"]))).await;
        assert!(matches!(&r, Response::Receipt(r) if r.first == 0), "{r:?}");
    });
}
