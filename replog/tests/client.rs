//! The client library against real `replog node` processes.

mod common;

use std::time::Duration;

use bytes::Bytes;
use client::{AppendOptions, Client, ClientConfig, ErrorCode, ProducerOptions, ReadOptions, Trust};
use common::*;
use protocol::Acks;

fn config(env: &Env, node: &NodeProc) -> ClientConfig {
    ClientConfig::new([node.server()]).with_trust(Trust::CaFile(env.ca_pem()))
}

async fn read_all(client: &Client, log: &str) -> Vec<(u64, Bytes)> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let r = client.read(log, pos, ReadOptions::default()).await.unwrap();
        out.extend(r.records.into_iter().map(|r| (r.offset, r.value)));
        if r.next_offset >= r.committed {
            return out;
        }
        pos = r.next_offset;
    }
}

#[test]
fn producer_reads_and_tails_through_the_library_across_restart() {
    let env = Env::new();
    let node = env.node("n", &[]);
    let rt = rt();
    let values: Vec<Bytes> = (0..500)
        .map(|i| Bytes::from(format!("record-{i}")))
        .collect();
    rt.block_on(async {
        let client = Client::connect(config(&env, &node)).await.unwrap();
        client.create_log("lib").await.unwrap();
        assert_eq!(
            client.create_log("lib").await.unwrap_err().code(),
            Some(ErrorCode::LogExists)
        );

        let mut tail = client.tail("lib", 0).await.unwrap();
        let producer = client.producer("lib", ProducerOptions::default());
        let pending: Vec<_> = values.iter().cloned().map(|v| producer.send(v)).collect();
        for (i, p) in pending.into_iter().enumerate() {
            let r = p.await.unwrap();
            assert_eq!(
                (r.first, r.next, r.level),
                (i as u64, i as u64 + 1, Acks::Leader)
            );
        }
        // The tail saw every record, in order.
        for (i, v) in values.iter().enumerate() {
            let rec = tokio::time::timeout(Duration::from_secs(30), tail.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!((rec.offset, &rec.value), (i as u64, v));
        }
        let got = read_all(&client, "lib").await;
        assert_eq!(got.len(), values.len());
        assert!(got.iter().zip(&values).all(|((_, a), b)| a == b));

        // Plain and conditional appends.
        let r = client
            .append(
                "lib",
                vec![Bytes::from_static(b"plain")],
                AppendOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(r.first, 500);
        let conflict = client
            .append(
                "lib",
                vec![Bytes::from_static(b"late")],
                AppendOptions {
                    expected_offset: Some(500),
                    ..AppendOptions::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(conflict.code(), Some(ErrorCode::OffsetConflict));
        assert!(!conflict.is_unknown_outcome());
        let sync = client
            .append(
                "lib",
                vec![Bytes::from_static(b"x")],
                AppendOptions {
                    acks: Acks::Sync,
                    ..AppendOptions::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(sync.code(), Some(ErrorCode::NotEnoughReplicas));
        let logs = client.list_logs().await.unwrap();
        assert_eq!((logs[0].name.as_str(), logs[0].end), ("lib", 501));
    });

    // After a restart the same client configuration reads everything back.
    let node = node.restart();
    rt.block_on(async {
        let client = Client::connect(config(&env, &node)).await.unwrap();
        let got = read_all(&client, "lib").await;
        assert_eq!(got.len(), 501);
        assert_eq!(got[499].1, values[499]);
        assert_eq!(&got[500].1[..], b"plain");
        let status = client.status().await.unwrap();
        assert_eq!(status.role, "standalone");
        assert_eq!(status.shards, 2);
    });
}

#[test]
fn producer_survives_node_crashes_without_duplicates() {
    let env = Env::new();
    let mut node = Some(env.node("n", &[]));
    let rt = rt();
    rt.block_on(async {
        let cfg = config(&env, node.as_ref().unwrap()).with_retries(30);
        let client = Client::connect(cfg).await.unwrap();
        client.create_log("p").await.unwrap();
        let producer = client.producer("p", ProducerOptions::default());
        let mut receipts = Vec::new();
        for round in 0..3 {
            let values: Vec<Bytes> = (0..300)
                .map(|i| Bytes::from(format!("r{round}-{i}")))
                .collect();
            let pending: Vec<_> = values.iter().cloned().map(|v| producer.send(v)).collect();
            // Let some appends reach the node, then kill it with others in flight; it comes
            // back on the same address and the producer resends what was not acknowledged.
            tokio::time::sleep(Duration::from_millis(5)).await;
            node = Some(node.take().unwrap().crash_and_restart());
            for (v, p) in values.into_iter().zip(pending) {
                let r = tokio::time::timeout(Duration::from_secs(120), p)
                    .await
                    .unwrap()
                    .unwrap();
                receipts.push((r.first, v));
            }
        }
        // Every acknowledged record is stored exactly once, at the offset its receipt names.
        let got = read_all(&client, "p").await;
        assert_eq!(got.len(), receipts.len(), "records stored twice or lost");
        let by_offset: std::collections::HashMap<u64, Bytes> = got.into_iter().collect();
        for (offset, v) in receipts {
            assert_eq!(by_offset.get(&offset), Some(&v), "offset {offset}");
        }
    });
}

#[test]
fn tokens_and_trust_through_the_library() {
    let env = Env::new();
    let node = env.node("n", &["--token", "t0ken"]);
    let rt = rt();
    rt.block_on(async {
        let no_token = match Client::connect(config(&env, &node)).await {
            Ok(c) => c.status().await.unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(
            no_token.code(),
            Some(ErrorCode::Unauthenticated),
            "{no_token}"
        );
        let c = Client::connect(config(&env, &node).with_token("t0ken"))
            .await
            .unwrap();
        c.create_log("a").await.unwrap();
        // Missing CA file: a clear configuration error naming the path.
        let missing =
            ClientConfig::new([node.server()]).with_trust(Trust::CaFile(env.path("missing.pem")));
        let Err(err) = Client::connect(missing).await else {
            panic!("a missing CA file must fail");
        };
        assert!(err.to_string().contains("missing.pem"), "{err}");
    });
}
