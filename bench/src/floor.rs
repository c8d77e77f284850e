//! The machine's floor, measured with the I/O paths replog itself uses: io_uring writes and
//! fdatasync at queue depth 1 into a pre-written file (the state a log segment is in when it
//! takes writes), fdatasync'd sequential write bandwidth, and QUIC (quinn, TLS 1.3) round
//! trips and bulk transfer on loopback. Every report divides its latencies by these.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::hist::{self, Hist, Summary};

/// The round-trip request: 1 KiB, the size of the records the targets are stated for.
pub const RTT_REQUEST_BYTES: usize = 1024;
/// The echo server's answer, about the size of a replog receipt.
pub const RTT_ANSWER_BYTES: usize = 40;
const ECHO_ALPN: &[u8] = b"replog-bench-echo";
/// Sequential-write floor: chunk size and bytes per fdatasync.
pub const SEQ_CHUNK_BYTES: usize = 1 << 20;
/// Longest a single floor step may take.
const STEP: Duration = Duration::from_secs(60);

/// How much a floor measures.
#[derive(Clone, Copy, Debug)]
pub struct FloorPlan {
    pub warmup: usize,
    pub samples: usize,
    /// Bytes written for the sequential bandwidth and sent for the QUIC bulk figure.
    pub bulk_bytes: u64,
}

impl FloorPlan {
    /// The full floor (`replog-bench floor`).
    pub fn full() -> FloorPlan {
        FloorPlan {
            warmup: 200,
            samples: 3000,
            bulk_bytes: 512 << 20,
        }
    }

    /// The floor each load run measures beside itself.
    pub fn quick() -> FloorPlan {
        FloorPlan {
            warmup: 50,
            samples: 1000,
            bulk_bytes: 128 << 20,
        }
    }
}

/// The machine's floor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Floor {
    /// 4 KiB io_uring write + fdatasync at queue depth 1.
    pub write_sync_4k: Summary,
    /// 64 KiB io_uring write + fdatasync at queue depth 1.
    pub write_sync_64k: Summary,
    /// Sequential 1 MiB io_uring writes, each followed by fdatasync, MB/s (10^6 bytes).
    pub seq_write_mb_s: f64,
    /// QUIC request (1 KiB) and answer on a fresh stream of one connection, loopback.
    pub quic_rtt_1k: Summary,
    /// One QUIC stream carrying bulk data on loopback, MB/s.
    pub quic_bulk_mb_s: f64,
    /// The directory written to and its filesystem.
    pub dir: String,
    pub filesystem: String,
}

/// Floors derived from the measured figures, per percentile: what an append at each
/// durability level cannot beat on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Derived {
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Floor {
    /// The write+fdatasync figure for a record of `bytes`: 4 KiB up to 4 KiB, else 64 KiB.
    pub fn disk(&self, bytes: usize) -> &Summary {
        if bytes <= 4096 {
            &self.write_sync_4k
        } else {
            &self.write_sync_64k
        }
    }

    /// The floor of an append of `bytes` at `acks` (`none`, `leader`, `sync`, `quorum`):
    /// - none: the round trip;
    /// - leader: round trip + fdatasync;
    /// - sync/quorum (semi-synchronous): round trip + max(leader fdatasync, round trip +
    ///   follower fdatasync) = 2 round trips + fdatasync.
    ///
    /// Percentiles of sums are composed from the percentiles of the parts, which is exact for
    /// the p50 of constant parts and otherwise an approximation that errs low for the tail.
    pub fn append(&self, acks: &str, bytes: usize) -> Derived {
        self.append_with(acks, bytes, &self.quic_rtt_1k)
    }

    /// [`Floor::append`] with the round trip `r` (for example one measured at a load's pace,
    /// see [`paced_rtt`]).
    pub fn append_with(&self, acks: &str, bytes: usize, r: &Summary) -> Derived {
        let d = self.disk(bytes);
        match acks {
            "none" => Derived {
                p50_us: r.p50_us,
                p99_us: r.p99_us,
            },
            "leader" => Derived {
                p50_us: r.p50_us + d.p50_us,
                p99_us: r.p99_us + d.p99_us,
            },
            _ => Derived {
                p50_us: 2.0 * r.p50_us + d.p50_us,
                p99_us: 2.0 * r.p99_us + d.p99_us,
            },
        }
    }

    /// The catch-up floor: min(QUIC bulk, sequential write) in MB/s.
    pub fn catchup_mb_s(&self) -> f64 {
        self.quic_bulk_mb_s.min(self.seq_write_mb_s)
    }
}

/// Measure the floor in `dir` (which should be on the disk the nodes use).
pub fn measure(dir: &Path, plan: FloorPlan) -> Result<Floor, String> {
    let write_sync_4k = Summary::of(&disk_latency(dir, 4096, plan)?);
    let write_sync_64k = Summary::of(&disk_latency(dir, 64 << 10, plan)?);
    let seq_write_mb_s = seq_write(dir, plan.bulk_bytes)?;
    let (rtt, bulk) = quic_floor(plan)?;
    Ok(Floor {
        write_sync_4k,
        write_sync_64k,
        seq_write_mb_s,
        quic_rtt_1k: Summary::of(&rtt),
        quic_bulk_mb_s: bulk,
        dir: dir.display().to_string(),
        filesystem: filesystem(dir),
    })
}

/// A file of `len` bytes, zero-filled and synced, opened for io_uring.
pub(crate) fn prewritten(path: &Path, len: usize) -> Result<std::fs::File, String> {
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    for pos in (0..len).step_by(zeros.len()) {
        let n = (len - pos).min(zeros.len());
        file.write_all_at(&zeros[..n], pos as u64)
            .map_err(|e| format!("zero-fill {}: {e}", path.display()))?;
    }
    file.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))?;
    Ok(file)
}

/// `block`-byte io_uring writes at consecutive positions, each followed by an io_uring
/// fdatasync, one at a time, into a pre-written file.
pub fn disk_latency(dir: &Path, block: usize, plan: FloorPlan) -> Result<Hist, String> {
    let path = dir.join(format!("floor-{block}"));
    let n = plan.warmup + plan.samples;
    let std_file = prewritten(&path, n * block)?;
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            tokio_uring::start(async {
                let file = tokio_uring::fs::File::from_std(std_file);
                let mut buf = vec![0xA5u8; block];
                let mut h = hist::new();
                for i in 0..n {
                    let t = Instant::now();
                    let (res, b) = file.write_all_at(buf, (i * block) as u64).await;
                    buf = b;
                    res.map_err(|e| format!("io_uring write: {e}"))?;
                    file.sync_data()
                        .await
                        .map_err(|e| format!("io_uring fdatasync: {e}"))?;
                    if i >= plan.warmup {
                        hist::record(&mut h, t.elapsed().as_nanos() as u64);
                    }
                }
                let _ = file.close().await;
                Ok(h)
            })
        })
        .join()
        .map_err(|_| "the disk floor thread panicked".to_string())?
    });
    let _ = std::fs::remove_file(&path);
    result
}

/// MB/s of `total` bytes written sequentially in 1 MiB io_uring writes to a new file, each
/// followed by fdatasync (how a catching-up follower stores large frames).
pub fn seq_write(dir: &Path, total: u64) -> Result<f64, String> {
    let path = dir.join("floor-seq");
    let std_file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            tokio_uring::start(async {
                let file = tokio_uring::fs::File::from_std(std_file);
                let mut buf = vec![0x5Au8; SEQ_CHUNK_BYTES];
                let t = Instant::now();
                let mut pos = 0u64;
                while pos < total {
                    let (res, b) = file.write_all_at(buf, pos).await;
                    buf = b;
                    res.map_err(|e| format!("io_uring write: {e}"))?;
                    file.sync_data()
                        .await
                        .map_err(|e| format!("io_uring fdatasync: {e}"))?;
                    pos += SEQ_CHUNK_BYTES as u64;
                }
                let secs = t.elapsed().as_secs_f64();
                let _ = file.close().await;
                Ok(pos as f64 / secs / 1e6)
            })
        })
        .join()
        .map_err(|_| "the sequential write thread panicked".to_string())?
    });
    let _ = std::fs::remove_file(&path);
    result
}

/// The filesystem holding `dir`: type, device and mount point of the longest mount above it.
pub fn filesystem(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && dir.starts_with(f[1])).then(|| (f[0], f[1], f[2]))
        })
        .max_by_key(|(_, mnt, _)| mnt.len())
        .map_or("unknown".into(), |(dev, mnt, ty)| {
            format!("{ty} ({dev} on {mnt})")
        })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An in-process QUIC echo server on its own thread and runtime (so the client side's runtime
/// is measured as a client, like a replog client against a node process). For each
/// bidirectional stream it reads the request to its end, then answers `RTT_ANSWER_BYTES`
/// bytes, or, for a bulk stream (first byte `b'B'`; round trips start with `b'r'`), the count of
/// bytes it read as 8 bytes.
pub struct Echo {
    pub addr: SocketAddr,
    cert: CertificateDer<'static>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    pub fn start() -> Result<Echo, String> {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .map_err(|e| e.to_string())?;
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .map_err(|e| e.to_string())?;
        tls.alpn_protocols = vec![ECHO_ALPN.to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    let ep = match quinn::Endpoint::server(config, ([127, 0, 0, 1], 0).into()) {
                        Ok(ep) => ep,
                        Err(e) => {
                            let _ = addr_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = addr_tx.send(ep.local_addr().map_err(|e| e.to_string()));
                    let accept = async {
                        while let Some(incoming) = ep.accept().await {
                            tokio::spawn(echo_connection(incoming));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                    ep.close(0u32.into(), b"");
                    let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
                });
            })
            .map_err(|e| e.to_string())?;
        let addr = addr_rx
            .recv_timeout(STEP)
            .map_err(|_| "the echo server did not start".to_string())??;
        Ok(Echo {
            addr,
            cert,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A client connection to the echo server, on its own endpoint.
    pub async fn connect(&self) -> Result<(quinn::Endpoint, quinn::Connection), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).map_err(|e| e.to_string())?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ECHO_ALPN.to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut ep =
            quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).map_err(|e| e.to_string())?;
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let connecting = ep
            .connect(self.addr, "localhost")
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(STEP, connecting)
            .await
            .map_err(|_| "connecting to the echo server timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok((ep, conn))
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn echo_connection(incoming: quinn::Incoming) {
    let Ok(conn) = incoming.await else { return };
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            if recv.read_exact(&mut first).await.is_err() {
                return;
            }
            if first[0] == b'B' {
                let mut n = 1u64;
                while let Ok(Some(chunk)) = recv.read_chunk(1 << 20, true).await {
                    n += chunk.bytes.len() as u64;
                }
                let _ = send.write_all(&n.to_le_bytes()).await;
            } else if recv.read_to_end(64 << 10).await.is_ok() {
                let _ = send.write_all(&[0x5A; RTT_ANSWER_BYTES]).await;
            }
            let _ = send.finish();
        });
    }
}

/// One round trip the way replog uses streams: a new bidirectional stream, the request and
/// finish, the answer read to its end.
pub async fn round_trip(conn: &quinn::Connection, req: &[u8]) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(req).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let answer = recv
        .read_to_end(4 * RTT_ANSWER_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    match answer.len() {
        RTT_ANSWER_BYTES => Ok(()),
        n => Err(format!("answer of {n} bytes instead of {RTT_ANSWER_BYTES}")),
    }
}

/// MB/s of `total` bytes sent on one stream and counted by the echo server.
pub async fn bulk(conn: &quinn::Connection, total: u64) -> Result<f64, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let chunk = bytes::Bytes::from(vec![b'B'; 1 << 20]);
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        send.write_chunk(chunk.clone())
            .await
            .map_err(|e| e.to_string())?;
        sent += chunk.len() as u64;
    }
    send.finish().map_err(|e| e.to_string())?;
    let answer = recv.read_to_end(8).await.map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(answer.try_into().map_err(|_| "a short bulk answer")?);
    if got != sent {
        return Err(format!("the echo server counted {got} bytes of {sent}"));
    }
    Ok(sent as f64 / secs / 1e6)
}

/// QUIC round trips to an in-process echo server issued in an open loop at `rate` per second
/// (the pacing of a load run), `samples` of them after a short warm-up. Between operations the
/// client and the server go idle, so each round trip pays the wake-ups a paced load pays: this
/// is the round-trip floor at that rate, which back-to-back round trips do not show.
pub fn paced_rtt(rate: f64, samples: u64) -> Result<Summary, String> {
    let echo = Echo::start()?;
    current_thread()?.block_on(async {
        let (ep, conn) = echo.connect().await?;
        let c = conn.clone();
        let req = bytes::Bytes::from(vec![b'r'; RTT_REQUEST_BYTES]);
        let out = crate::pace::run(
            crate::pace::Mode::Open {
                rate,
                in_flight_max: crate::pace::IN_FLIGHT_MAX,
            },
            Duration::from_millis(200),
            Duration::from_secs_f64(samples as f64 / rate),
            move |_, _| {
                let (c, req) = (c.clone(), req.clone());
                async move { round_trip(&c, &req).await }
            },
            None,
            &crate::progress::Progress::quiet(),
        )
        .await;
        conn.close(0u32.into(), b"");
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        match out.errors.iter().next() {
            Some((e, n)) => Err(format!("{n} paced round trips failed: {e}")),
            None => Ok(Summary::of(&out.latency)),
        }
    })
}

/// The client side's runtime: one thread, like a replog client's.
fn current_thread() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Round trips (one at a time) and one bulk transfer against an in-process echo server.
fn quic_floor(plan: FloorPlan) -> Result<(Hist, f64), String> {
    let echo = Echo::start()?;
    current_thread()?.block_on(async {
        let (ep, conn) = echo.connect().await?;
        let req = vec![b'r'; RTT_REQUEST_BYTES];
        let mut h = hist::new();
        for i in 0..plan.warmup + plan.samples {
            let t = Instant::now();
            tokio::time::timeout(STEP, round_trip(&conn, &req))
                .await
                .map_err(|_| "an echo round trip timed out".to_string())??;
            if i >= plan.warmup {
                hist::record(&mut h, t.elapsed().as_nanos() as u64);
            }
        }
        let mb_s = tokio::time::timeout(STEP, bulk(&conn, plan.bulk_bytes))
            .await
            .map_err(|_| "the bulk transfer timed out".to_string())??;
        conn.close(0u32.into(), b"");
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        Ok((h, mb_s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> FloorPlan {
        FloorPlan {
            warmup: 2,
            samples: 20,
            bulk_bytes: 4 << 20,
        }
    }

    #[test]
    fn the_floor_measures_every_figure() {
        let dir = tempfile::tempdir().unwrap();
        let f = measure(dir.path(), tiny()).unwrap();
        assert_eq!(f.write_sync_4k.count, 20);
        assert_eq!(f.write_sync_64k.count, 20);
        assert_eq!(f.quic_rtt_1k.count, 20);
        assert!(f.write_sync_4k.p50_us > 0.0 && f.quic_rtt_1k.p50_us > 0.0);
        assert!(f.seq_write_mb_s > 0.0 && f.quic_bulk_mb_s > 0.0);
        // Nothing is left behind in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // The derived floors add up as documented.
        let none = f.append("none", 1024);
        let leader = f.append("leader", 1024);
        let sync = f.append("sync", 1024);
        assert_eq!(none.p50_us, f.quic_rtt_1k.p50_us);
        assert_eq!(leader.p50_us, f.quic_rtt_1k.p50_us + f.write_sync_4k.p50_us);
        assert!((sync.p50_us - (leader.p50_us + f.quic_rtt_1k.p50_us)).abs() < 1e-9);
        let paced = paced_rtt(200.0, 40).unwrap();
        assert_eq!(paced.count, 40);
        let with = f.append_with("leader", 1024, &paced);
        assert_eq!(with.p50_us, paced.p50_us + f.write_sync_4k.p50_us);
        let big = f.append("leader", 16 << 10);
        assert_eq!(big.p50_us, f.quic_rtt_1k.p50_us + f.write_sync_64k.p50_us);
    }
}
