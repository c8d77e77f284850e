//! Produce 100 records to a log through an idempotent producer, then read them back.
//!
//! Start a node in development mode (it creates the development CA that this example trusts
//! by default, in `$REPLOG_DEV_CA_DIR` or `~/.replog/dev-ca`), then run the example against it:
//!
//! ```text
//! replog node --data-dir /tmp/replog-demo            # listens on 127.0.0.1:7000
//! cargo run -p client --example produce_consume       # or: ... -- 127.0.0.1:7000 [log]
//! ```

use std::time::Instant;

use bytes::Bytes;
use client::{Client, ClientConfig, ErrorCode, ProducerOptions, ReadOptions};

const RECORDS: usize = 100;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or_else(|| "127.0.0.1:7000".to_string());
    let log = args.next().unwrap_or_else(|| "example".to_string());

    let client = Client::connect(ClientConfig::new([server.clone()])).await?;
    println!("connected to {server}");
    match client.create_log(&log).await {
        Ok(()) => println!("created log {log}"),
        Err(e) if e.code() == Some(ErrorCode::LogExists) => println!("log {log} exists"),
        Err(e) => return Err(e.into()),
    }

    // Queue every record at once: the producer batches them into few appends.
    let started = Instant::now();
    let producer = client.producer(&log, ProducerOptions::default());
    let receipts: Vec<_> = (0..RECORDS)
        .map(|i| producer.send(Bytes::from(format!("record {i}"))))
        .collect();
    let mut first = None;
    for receipt in receipts {
        let receipt = receipt.await?;
        first.get_or_insert(receipt.first);
    }
    let first = first.unwrap_or(0);
    println!(
        "produced {RECORDS} records at offsets {first}..{} in {:?}",
        first + RECORDS as u64,
        started.elapsed()
    );

    // Read them back; the client asks the node for at least what it wrote (read-your-writes).
    let mut from = first;
    let mut seen = 0;
    while seen < RECORDS {
        let read = client.read(&log, from, ReadOptions::default()).await?;
        if read.records.is_empty() {
            break;
        }
        for record in read.records.iter().take(RECORDS - seen) {
            println!(
                "offset {:>6}  epoch {}  {}",
                record.offset,
                record.epoch,
                String::from_utf8_lossy(&record.value)
            );
            seen += 1;
        }
        from = read.next_offset;
    }
    println!("read back {seen} records");
    client.close().await;
    Ok(())
}
