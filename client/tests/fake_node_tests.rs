//! The client against an in-process fake node (`fake_node`): the network paths (TLS trust,
//! tokens, redirects, retries, unknown outcomes, tails) without a real node.

mod fake_node;

use std::time::Duration;

use bytes::Bytes;
use client::{
    Acks, AppendOptions, Client, ClientConfig, Error, ErrorCode, ProducerOptions, ReadOptions,
    Trust, RECEIPT_DUPLICATE,
};
use fake_node::{FakeNode, TestCa};
use protocol::Request;

fn config(ca: &TestCa, servers: &[String]) -> ClientConfig {
    ClientConfig::new(servers.iter().cloned())
        .with_trust(Trust::CaFile(ca.ca_path()))
        .with_connect_timeout(Duration::from_secs(2))
        .with_request_timeout(Duration::from_secs(5))
}

async fn connect(ca: &TestCa, node: &FakeNode) -> Client {
    Client::connect(config(ca, &[node.addr_string()]))
        .await
        .unwrap()
}

fn values(n: usize) -> Vec<Bytes> {
    (0..n).map(|i| Bytes::from(format!("v{i}"))).collect()
}

fn read_min_offsets(node: &FakeNode) -> Vec<u64> {
    node.requests()
        .into_iter()
        .filter_map(|r| match r {
            Request::Read(r) => Some(r.min_offset),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn admin_append_and_read() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let c = connect(&ca, &node).await;

    c.create_log("a").await.unwrap();
    let err = c.create_log("a").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LogExists));
    assert!(!err.is_unknown_outcome());
    let logs = c.list_logs().await.unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].name, "a");
    assert_eq!(c.status().await.unwrap().node_id, "fake");

    let r1 = c
        .append("a", values(3), AppendOptions::default())
        .await
        .unwrap();
    assert_eq!((r1.first, r1.next), (0, 3));
    let r2 = c
        .append("a", values(2), AppendOptions::default())
        .await
        .unwrap();
    assert_eq!((r2.first, r2.next), (3, 5));

    // Record 1 lives in the first batch: record 0 is skipped.
    let read = c.read("a", 1, ReadOptions::default()).await.unwrap();
    let offsets: Vec<u64> = read.records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [1, 2, 3, 4]);
    assert_eq!(read.records[0].value, Bytes::from("v1"));
    assert_eq!(read.records[0].epoch, 1);
    assert_eq!((read.next_offset, read.committed), (5, 5));

    // Reads carry the highest offset seen (read-your-writes), unless overridden.
    let _ = c
        .read(
            "a",
            0,
            ReadOptions {
                min_offset: Some(0),
                ..ReadOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(read_min_offsets(&node), [5, 0]);

    let err = c
        .read("missing", 0, ReadOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LogNotFound));

    // Local argument checks.
    let err = c
        .append("a", Vec::new(), AppendOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[tokio::test]
async fn corrupt_reads_are_refused() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let c = connect(&ca, &node).await;
    c.create_log("a").await.unwrap();
    c.append("a", values(2), AppendOptions::default())
        .await
        .unwrap();
    node.with(|s| s.behaviour.corrupt_reads = true);
    let err = c.read("a", 0, ReadOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
}

fn at_least(min_offset: u64) -> ReadOptions {
    ReadOptions {
        min_offset: Some(min_offset),
        ..ReadOptions::default()
    }
}

/// A node holding log "a" with `records`, answering as a replica committed up to `behind`.
async fn replica(ca: &TestCa, records: &[&[u8]], behind: Option<u64>) -> FakeNode {
    let node = FakeNode::start(ca).await;
    node.create_direct("a");
    node.append_direct("a", records);
    node.with(|s| s.behaviour.behind = behind);
    node
}

#[tokio::test]
async fn a_behind_replica_passes_the_read_to_the_next_server() {
    let ca = TestCa::new();
    let first = replica(&ca, &[b"x0", b"x1", b"x2"], Some(1)).await;
    let second = replica(&ca, &[b"v0", b"v1", b"v2"], None).await;
    let c = Client::connect(config(&ca, &[first.addr_string(), second.addr_string()]))
        .await
        .unwrap();

    let read = c.read("a", 0, at_least(3)).await.unwrap();
    let got: Vec<Bytes> = read.records.into_iter().map(|r| r.value).collect();
    assert_eq!(got, values(3), "the second server's records");
    assert_eq!((read.next_offset, read.committed), (3, 3));
    // Each asked once, with the same min_offset.
    assert_eq!(read_min_offsets(&first), [3]);
    assert_eq!(read_min_offsets(&second), [3]);

    // The client stays with the server that served, and keeps asking for what it has seen.
    c.read("a", 0, ReadOptions::default()).await.unwrap();
    assert_eq!(read_min_offsets(&first), [3]);
    assert_eq!(read_min_offsets(&second), [3, 3]);
}

#[tokio::test]
async fn reads_fail_with_behind_when_no_server_has_reached_min_offset() {
    let ca = TestCa::new();
    let first = replica(&ca, &[b"0", b"1", b"2"], Some(1)).await;
    let second = replica(&ca, &[b"0", b"1", b"2"], Some(2)).await;
    let c = Client::connect(config(&ca, &[first.addr_string(), second.addr_string()]))
        .await
        .unwrap();

    let err = c.read("a", 0, at_least(3)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Behind), "{err}");
    assert!(!err.is_unknown_outcome());
    // The last answer: the second server's committed offset.
    assert!(matches!(err, Error::Server { detail: 2, .. }), "{err:?}");
    assert_eq!(read_min_offsets(&first), [3]);
    assert_eq!(read_min_offsets(&second), [3]);

    // read_batches does the same; it starts at the server asked last, then goes on in order.
    let err = c.read_batches("a", 0, at_least(3)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Server {
                code: ErrorCode::Behind,
                detail: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(read_min_offsets(&first), [3, 3]);
    assert_eq!(read_min_offsets(&second), [3, 3]);

    // A replica that catches up serves the read (the first server, asked last).
    first.with(|s| s.behaviour.behind = None);
    assert_eq!(c.read("a", 0, at_least(3)).await.unwrap().records.len(), 3);
    assert_eq!(read_min_offsets(&first), [3, 3, 3]);

    // With one configured server there is nobody else to ask.
    let single = connect(&ca, &second).await;
    let err = single.read("a", 0, at_least(3)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Behind), "{err}");
    assert_eq!(read_min_offsets(&second), [3, 3, 3]);
}

#[tokio::test]
async fn a_behind_read_skips_unreachable_servers() {
    let ca = TestCa::new();
    let first = replica(&ca, &[b"x0", b"x1"], Some(0)).await;
    let last = replica(&ca, &[b"v0", b"v1"], None).await;
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = silent.local_addr().unwrap().to_string();
    let cfg = config(&ca, &[first.addr_string(), dead, last.addr_string()])
        .with_connect_timeout(Duration::from_millis(300));
    let c = Client::connect(cfg).await.unwrap();
    let read = c.read("a", 0, at_least(2)).await.unwrap();
    let got: Vec<Bytes> = read.records.into_iter().map(|r| r.value).collect();
    assert_eq!(got, values(2));
    assert_eq!(read_min_offsets(&first), [2]);
    assert_eq!(read_min_offsets(&last), [2]);
}

#[tokio::test]
async fn read_batches_returns_the_stored_batches_whole() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let c = connect(&ca, &node).await;
    c.create_log("a").await.unwrap();
    c.append("a", values(3), AppendOptions::default())
        .await
        .unwrap();
    let p = c.producer("a", ProducerOptions::default());
    p.send(Bytes::from("produced")).await.unwrap();
    node.append_direct("a", &[b"x", b"y"]);
    let stored = node.stored_batches("a");
    assert_eq!(stored.len(), 3);

    // From inside the first batch: every batch, the first one whole.
    let read = c
        .read_batches("a", 1, ReadOptions::default())
        .await
        .unwrap();
    assert_eq!(read.batches, stored);
    assert_eq!((read.next_offset, read.committed), (6, 6));

    // One batch per answer, continuing at next_offset.
    let one = ReadOptions {
        bytes_max: 1,
        ..ReadOptions::default()
    };
    let mut got = Vec::new();
    let mut pos = 0;
    while pos < 6 {
        let read = c.read_batches("a", pos, one.clone()).await.unwrap();
        assert_eq!(read.batches.len(), 1);
        got.extend(read.batches);
        pos = read.next_offset;
    }
    assert_eq!(got, stored);
    let end = c
        .read_batches("a", 6, ReadOptions::default())
        .await
        .unwrap();
    assert!(end.batches.is_empty());
    assert_eq!(end.next_offset, 6);

    // Checked like read.
    node.with(|s| s.behaviour.corrupt_reads = true);
    let err = c
        .read_batches("a", 0, ReadOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
}

#[tokio::test]
async fn tokens_are_presented_on_every_connection() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    node.with(|s| s.behaviour.token = Some("s3cret".into()));

    let err = Client::connect(config(&ca, &[node.addr_string()]).with_token("wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthenticated), "{err}");
    // Without a token the handshake succeeds and the first request is refused.
    let c = Client::connect(config(&ca, &[node.addr_string()]))
        .await
        .unwrap();
    let err = c.list_logs().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthenticated), "{err}");

    let c = Client::connect(config(&ca, &[node.addr_string()]).with_token("s3cret"))
        .await
        .unwrap();
    c.create_log("a").await.unwrap();
    // A lost connection is re-established and re-authenticated.
    node.with(|s| s.behaviour.lose_read_answers = 1);
    assert!(c
        .read("a", 0, ReadOptions::default())
        .await
        .unwrap()
        .records
        .is_empty());
    let auths = node
        .requests()
        .iter()
        .filter(|r| matches!(r, Request::Auth { .. }))
        .count();
    assert!(auths >= 3, "{auths}");
}

#[tokio::test]
async fn wrong_trust_is_a_tls_error() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let err = Client::connect(config(&other, &[node.addr_string()]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");

    // A server name the certificate does not hold.
    let err = Client::connect(config(&ca, &[node.addr_string()]).with_server_name("elsewhere"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");

    // Dialling by name verifies against that name.
    let by_name = format!("localhost:{}", node.addr.port());
    let c = Client::connect(config(&ca, &[by_name])).await.unwrap();
    c.list_logs().await.unwrap();
}

#[tokio::test]
async fn client_certificates() {
    let ca = TestCa::new();
    let node = FakeNode::start_with(&ca, Some(&ca.ca_path())).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.client_identity(dir.path());
    let c = Client::connect(config(&ca, &[node.addr_string()]).with_client_cert(cert, key))
        .await
        .unwrap();
    c.list_logs().await.unwrap();

    // Without one, the node refuses the handshake (seen at connect or at the first request).
    match Client::connect(config(&ca, &[node.addr_string()])).await {
        Err(e) => assert!(matches!(e, Error::Tls(_) | Error::Connect(_)), "{e}"),
        Ok(c) => assert!(c.list_logs().await.is_err()),
    }
}

#[tokio::test]
async fn unreachable_servers_are_skipped_in_order() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    // Nothing listens on the first address (a bound, silent UDP socket).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = silent.local_addr().unwrap().to_string();
    let cfg = config(&ca, &[dead.clone(), node.addr_string()])
        .with_connect_timeout(Duration::from_millis(300));
    let c = Client::connect(cfg).await.unwrap();
    c.list_logs().await.unwrap();

    let cfg = config(&ca, &[dead])
        .with_connect_timeout(Duration::from_millis(200))
        .with_retries(0);
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(err, Error::Connect(_)), "{err}");
    assert!(!err.is_unknown_outcome());
}

#[tokio::test]
async fn not_leader_redirects_to_the_leader() {
    let ca = TestCa::new();
    let leader = FakeNode::start(&ca).await;
    let follower = FakeNode::start(&ca).await;
    follower.with(|s| s.behaviour.redirect = Some(leader.addr_string()));
    let c = connect(&ca, &follower).await;
    c.create_log("a").await.unwrap();
    let r = c
        .append("a", values(1), AppendOptions::default())
        .await
        .unwrap();
    assert_eq!(r.first, 0);
    assert_eq!(leader.stored("a"), values(1));
    // The client now talks to the leader directly.
    c.list_logs().await.unwrap();
    assert_eq!(follower.requests().len(), 1);

    // A redirect loop is followed a bounded number of hops at a time, then the configured
    // servers are asked again with backoff, until the request's deadline.
    let a = FakeNode::start(&ca).await;
    let b = FakeNode::start(&ca).await;
    a.with(|s| s.behaviour.redirect = Some(b.addr_string()));
    b.with(|s| s.behaviour.redirect = Some(a.addr_string()));
    let c = Client::connect(
        config(&ca, &[a.addr_string()]).with_request_timeout(Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let err = c.list_logs().await.unwrap_err();
    // The last answer, or the last attempt cut short by the deadline.
    assert!(
        err.code() == Some(ErrorCode::NotLeader) || err == Error::Timeout,
        "{err}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "gave up before the deadline"
    );
    let asked = a.requests().len() + b.requests().len();
    assert!(asked > 4 && asked < 100, "{asked} requests");
}

#[tokio::test]
async fn a_node_that_names_itself_leader_is_not_asked_again_and_again() {
    // A deposed node still on the controller's old record named itself (older nodes did):
    // the client moves on to the next configured server instead of failing.
    let ca = TestCa::new();
    let stale = FakeNode::start(&ca).await;
    let leader = FakeNode::start(&ca).await;
    stale.with(|s| s.behaviour.redirect = Some(stale.addr_string()));
    let c = Client::connect(config(&ca, &[stale.addr_string(), leader.addr_string()]))
        .await
        .unwrap();
    c.create_log("a").await.unwrap();
    assert!(leader.with(|s| s.logs.contains_key("a")));
    assert_eq!(stale.requests().len(), 1);
}

#[tokio::test]
async fn not_leader_without_a_leader_tries_the_next_server() {
    let ca = TestCa::new();
    let first = FakeNode::start(&ca).await;
    let second = FakeNode::start(&ca).await;
    first.with(|s| s.behaviour.redirect = Some(String::new()));
    let c = Client::connect(config(&ca, &[first.addr_string(), second.addr_string()]))
        .await
        .unwrap();
    c.create_log("a").await.unwrap();
    assert!(second.with(|s| s.logs.contains_key("a")));
}

#[tokio::test]
async fn a_plain_append_whose_answer_is_lost_has_an_unknown_outcome() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let c = connect(&ca, &node).await;
    c.create_log("a").await.unwrap();
    node.with(|s| s.behaviour.lose_append_answers = 1);
    let err = c
        .append("a", values(1), AppendOptions::default())
        .await
        .unwrap_err();
    assert!(err.is_unknown_outcome(), "{err}");
    assert!(matches!(err, Error::ConnectionLost(_)), "{err}");
    // Not retried: stored once; the client reconnects for the next request.
    assert_eq!(node.stored("a"), values(1));
    let r = c
        .append("a", values(1), AppendOptions::default())
        .await
        .unwrap();
    assert_eq!(r.first, 1);

    // No answer at all: a timeout, also an unknown outcome.
    node.with(|s| s.behaviour.silent_appends = true);
    let c = Client::connect(
        config(&ca, &[node.addr_string()]).with_request_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let err = c
        .append(
            "a",
            values(1),
            AppendOptions {
                acks: Acks::None,
                ..AppendOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err, Error::Timeout);
    assert!(err.is_unknown_outcome());
}

#[tokio::test]
async fn the_producer_resends_after_a_lost_answer_and_gets_a_duplicate_receipt() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let c = connect(&ca, &node).await;
    c.create_log("a").await.unwrap();
    let p = c.producer("a", ProducerOptions::default());
    assert_eq!(p.send(Bytes::from("first")).await.unwrap().first, 0);

    node.with(|s| s.behaviour.lose_append_answers = 1);
    let r = p.send(Bytes::from("second")).await.unwrap();
    assert_eq!((r.first, r.next), (1, 2));
    assert_ne!(r.flags & RECEIPT_DUPLICATE, 0, "answered by the resend");
    assert_eq!(
        node.stored("a"),
        [Bytes::from("first"), Bytes::from("second")]
    );

    // The two attempts carried the same producer id and sequence.
    let producers: Vec<(u64, u64)> = node
        .requests()
        .into_iter()
        .filter_map(|r| match r {
            Request::Append(a) => a.producer,
            _ => None,
        })
        .collect();
    assert_eq!(producers.len(), 3);
    assert_eq!(producers[1], producers[2]);
    assert_eq!(producers[1].1, 1);
}

#[tokio::test]
async fn many_producer_sends_become_few_appends() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let c = connect(&ca, &node).await;
    c.create_log("a").await.unwrap();
    let p = c.producer("a", ProducerOptions::default());
    let sends: Vec<_> = values(500).into_iter().map(|v| p.send(v)).collect();
    for (i, s) in sends.into_iter().enumerate() {
        assert_eq!(s.await.unwrap().first, i as u64);
    }
    p.flush().await.unwrap();
    let appends = node
        .requests()
        .iter()
        .filter(|r| matches!(r, Request::Append(_)))
        .count();
    assert!(appends <= 2, "{appends}");
    assert_eq!(node.stored("a"), values(500));

    // Read-your-writes: the next read waits for what the producer wrote.
    let read = c.read("a", 0, ReadOptions::default()).await.unwrap();
    assert_eq!(read.records.len(), 500);
    assert_eq!(read_min_offsets(&node), [500]);
}

#[tokio::test]
async fn reads_are_retried_after_a_lost_connection() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let c = connect(&ca, &node).await;
    c.create_log("a").await.unwrap();
    c.append("a", values(2), AppendOptions::default())
        .await
        .unwrap();
    node.with(|s| s.behaviour.lose_read_answers = 2);
    let read = c.read("a", 0, ReadOptions::default()).await.unwrap();
    assert_eq!(read.records.len(), 2);

    let c = Client::connect(config(&ca, &[node.addr_string()]).with_retries(0))
        .await
        .unwrap();
    node.with(|s| s.behaviour.lose_read_answers = 1);
    let err = c.read("a", 0, ReadOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::ConnectionLost(_)), "{err}");
}

async fn next(tail: &mut client::Tail) -> client::ReadRecord {
    tokio::time::timeout(Duration::from_secs(5), tail.next())
        .await
        .expect("a record arrives")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn tails_follow_the_log_and_survive_a_reset() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let c = connect(&ca, &node).await;
    c.create_log("a").await.unwrap();
    node.append_direct("a", &[b"0", b"1", b"2"]);

    let mut tail = c.tail("a", 1).await.unwrap();
    assert_eq!(next(&mut tail).await.offset, 1);
    assert_eq!(next(&mut tail).await.offset, 2);
    assert_eq!(tail.position(), 3);

    // Nothing yet: a pending next() can be cancelled without losing anything.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), tail.next())
            .await
            .is_err()
    );
    node.append_direct("a", &[b"3"]);
    let r = next(&mut tail).await;
    assert_eq!((r.offset, r.value.as_ref()), (3, b"3".as_slice()));

    // The node resets the stream: the tail resubscribes where it was.
    node.with(|s| s.behaviour.reset_tail_after = Some(0));
    node.append_direct("a", &[b"4", b"5"]);
    let r = next(&mut tail).await;
    assert_eq!(r.offset, 4);
    assert_eq!(next(&mut tail).await.offset, 5);
    drop(tail);

    // Errors end a tail.
    let mut tail = c.tail("missing", 0).await.unwrap();
    let err = tail.next().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LogNotFound));
    assert!(tail.next().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_multi_thread_runtime_and_across_clones() {
    let ca = TestCa::new();
    let node = FakeNode::start(&ca).await;
    let c = connect(&ca, &node).await;
    c.create_log("a").await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                c.append(
                    "a",
                    vec![Bytes::from(format!("{t}-{i}"))],
                    AppendOptions::default(),
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let read = c.read("a", 0, ReadOptions::default()).await.unwrap();
    assert_eq!(read.records.len(), 40);
    c.close().await;
    // Closed, yet usable: the next request reconnects.
    assert_eq!(c.list_logs().await.unwrap().len(), 1);
}
