//! A small in-process stand-in for a replog node, speaking the wire protocol over QUIC, with
//! switches to misbehave (redirect, lose answers, stay silent, corrupt reads, reset tails, lag
//! behind as a replica).
//! It exists to exercise the client's network paths; it is not a reference implementation.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use format::{Epoch, Offset, ProducerMeta};
use protocol::idempotence::{Decision, ProducerTable, StoredAppend};
use protocol::{
    BatchesResponse, ErrorCode, ErrorResponse, FrameHeader, Limits, LogInfo, Receipt, Request,
    Response, StatusResponse, RECEIPT_DUPLICATE,
};
use quinn::VarInt;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A CA written to a directory as `ca.pem`, able to issue node certificates.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        TestCa {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn issue(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
    }

    /// Write a client certificate and key signed by this CA; returns (cert, key) paths.
    pub fn client_identity(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["client".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (dir.join("client.pem"), dir.join("client.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

#[derive(Default)]
pub struct LogState {
    /// Encoded batches, in offset order.
    batches: Vec<Bytes>,
    end: u64,
    producers: Option<ProducerTable>,
}

/// What the node does; tests flip these.
#[derive(Default)]
pub struct Behaviour {
    /// Token required as the first exchange of a connection.
    pub token: Option<String>,
    /// Answer everything but Auth with not_leader naming this leader ("" for unknown).
    pub redirect: Option<String>,
    /// Store this many appends, then close the connection instead of answering.
    pub lose_append_answers: usize,
    /// Close the connection instead of answering this many reads.
    pub lose_read_answers: usize,
    /// Never answer appends.
    pub silent_appends: bool,
    /// Flip a byte in the batches of read answers.
    pub corrupt_reads: bool,
    /// Reset a tail stream after sending this many frames on it, once.
    pub reset_tail_after: Option<usize>,
    /// Act as a replica that has committed only up to this offset, whatever it stores: reads
    /// with a higher `min_offset` are answered `behind` with this offset in `detail`.
    pub behind: Option<u64>,
}

#[derive(Default)]
pub struct State {
    pub logs: HashMap<String, LogState>,
    pub behaviour: Behaviour,
    /// Every request decoded, in arrival order.
    pub requests: Vec<Request>,
    pub connections: usize,
}

pub struct FakeNode {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
    endpoint: quinn::Endpoint,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(0), b"");
    }
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&Path>,
) -> quinn::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            use rustls_pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(chain, key).unwrap();
    tls.alpn_protocols = vec![protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    quinn::ServerConfig::with_crypto(Arc::new(crypto))
}

impl FakeNode {
    /// A node on 127.0.0.1 with a certificate for `localhost`, `127.0.0.1` and `::1`.
    pub async fn start(ca: &TestCa) -> FakeNode {
        FakeNode::start_with(ca, None).await
    }

    pub async fn start_with(ca: &TestCa, client_ca: Option<&Path>) -> FakeNode {
        let (chain, key) = ca.issue(&["localhost", "127.0.0.1", "::1"]);
        let endpoint = quinn::Endpoint::server(
            server_config(chain, key, client_ca),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let node = FakeNode {
            addr: endpoint.local_addr().unwrap(),
            state: Arc::new(Mutex::new(State::default())),
            changed: Arc::new(tokio::sync::Notify::new()),
            endpoint: endpoint.clone(),
        };
        let (state, changed) = (node.state.clone(), node.changed.clone());
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let (state, changed) = (state.clone(), changed.clone());
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve_connection(conn, state, changed).await;
                    }
                });
            }
        });
        node
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Create an empty log directly, as another client would.
    pub fn create_direct(&self, log: &str) {
        let mut s = self.state.lock().unwrap();
        s.logs.insert(
            log.to_string(),
            LogState {
                producers: Some(ProducerTable::new(100)),
                ..LogState::default()
            },
        );
    }

    /// Append records directly, as another writer would.
    pub fn append_direct(&self, log: &str, records: &[&[u8]]) {
        let mut s = self.state.lock().unwrap();
        let l = s.logs.get_mut(log).expect("log exists");
        let b = format::batch::encode(Offset(l.end), Epoch(1), 1, records);
        l.end += records.len() as u64;
        l.batches.push(Bytes::from(b));
        drop(s);
        self.changed.notify_waiters();
    }

    /// Every stored record value of `log`, in offset order.
    pub fn stored(&self, log: &str) -> Vec<Bytes> {
        let s = self.state.lock().unwrap();
        let mut out = Vec::new();
        for b in &s.logs[log].batches {
            let view = format::batch::decode(b).unwrap();
            out.extend(view.records().map(|r| Bytes::copy_from_slice(r.value)));
        }
        out
    }

    /// The stored batches of `log`, exactly as encoded, in offset order.
    pub fn stored_batches(&self, log: &str) -> Vec<Bytes> {
        self.state.lock().unwrap().logs[log].batches.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }
}

async fn read_request(recv: &mut quinn::RecvStream) -> Option<Request> {
    let limits = Limits::default();
    let mut head = [0u8; 8];
    recv.read_exact(&mut head).await.ok()?;
    let h = FrameHeader::parse(&head, &limits).ok()?;
    let mut body = vec![0u8; h.body_len as usize];
    recv.read_exact(&mut body).await.ok()?;
    protocol::decode_request(&h, Bytes::from(body), &limits).ok()
}

async fn answer(send: &mut quinn::SendStream, resp: &Response) {
    let mut out = BytesMut::new();
    protocol::encode_response(resp, &mut out);
    let _ = send.write_all(&out).await;
}

async fn serve_connection(
    conn: quinn::Connection,
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
) {
    state.lock().unwrap().connections += 1;
    let token = state.lock().unwrap().behaviour.token.clone();
    if let Some(token) = token {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let req = read_request(&mut recv).await;
        if let Some(r) = &req {
            state.lock().unwrap().requests.push(r.clone());
        }
        match req {
            Some(Request::Auth { token: t }) if t == token.as_bytes() => {
                answer(&mut send, &Response::Ok).await;
                let _ = send.finish();
            }
            _ => {
                conn.close(VarInt::from_u32(5), b"unauthenticated");
                return;
            }
        }
    }
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (conn, state, changed) = (conn.clone(), state.clone(), changed.clone());
        tokio::spawn(async move { serve_stream(conn, send, recv, state, changed).await });
    }
}

fn error(code: ErrorCode, leader: &str) -> Response {
    Response::Error(ErrorResponse {
        code,
        message: String::new(),
        leader: leader.to_string(),
        detail: 0,
    })
}

fn info(name: &str, l: &LogState) -> LogInfo {
    LogInfo {
        name: name.to_string(),
        start: 0,
        end: l.end,
        committed: l.end,
        flushed: l.end,
        epoch: 1,
        disk_bytes: l.batches.iter().map(|b| b.len() as u64).sum(),
        snapshot: None,
    }
}

/// Batches from the one containing `from`, up to `bytes_max` (at least one).
fn batches_from(l: &LogState, from: u64, bytes_max: u32) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let mut next = from;
    for b in &l.batches {
        let h = format::batch::header(b).unwrap();
        if h.next_offset().0 <= from {
            continue;
        }
        if !out.is_empty() && out.len() + b.len() > bytes_max as usize {
            break;
        }
        out.extend_from_slice(b);
        next = h.next_offset().0;
    }
    (out, next)
}

async fn serve_stream(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
) {
    let Some(req) = read_request(&mut recv).await else {
        answer(&mut send, &error(ErrorCode::Malformed, "")).await;
        return;
    };
    state.lock().unwrap().requests.push(req.clone());
    let redirect = state.lock().unwrap().behaviour.redirect.clone();
    if let Some(leader) = redirect {
        answer(&mut send, &error(ErrorCode::NotLeader, &leader)).await;
        let _ = send.finish();
        return;
    }
    let resp = match req {
        Request::Replicate(_)
        | Request::Ack { .. }
        | Request::EpochEnd { .. }
        | Request::Checksum { .. }
        | Request::PutSnapshot(_)
        | Request::GetSnapshot { .. }
        | Request::Transfer { .. } => error(ErrorCode::UnknownMessage, "peer request"),
        Request::Auth { .. } => Response::Ok,
        Request::CreateLog { name, .. } => {
            let mut s = state.lock().unwrap();
            match s.logs.entry(name) {
                std::collections::hash_map::Entry::Occupied(_) => error(ErrorCode::LogExists, ""),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(LogState {
                        producers: Some(ProducerTable::new(100)),
                        ..LogState::default()
                    });
                    Response::Ok
                }
            }
        }
        Request::ListLogs => {
            let s = state.lock().unwrap();
            let mut logs: Vec<LogInfo> = s.logs.iter().map(|(n, l)| info(n, l)).collect();
            logs.sort_by(|a, b| a.name.cmp(&b.name));
            Response::Logs(logs)
        }
        Request::Status => {
            let s = state.lock().unwrap();
            Response::Status(Box::new(StatusResponse {
                node_id: "fake".into(),
                version: "0.0.0".into(),
                role: "standalone".into(),
                shards: 1,
                uptime_ms: 1,
                connections: s.connections as u32,
                logs: s.logs.iter().map(|(n, l)| info(n, l)).collect(),
                leader: String::new(),
                replication: Vec::new(),
                controller: None,
                quarantined: Vec::new(),
                damaged: Vec::new(),
            }))
        }
        Request::Append(a) => {
            let silent = state.lock().unwrap().behaviour.silent_appends;
            if silent {
                // Hold the stream open without answering.
                let _ = conn.closed().await;
                return;
            }
            let mut s = state.lock().unwrap();
            let lose = s.behaviour.lose_append_answers > 0;
            let resp = match s.logs.get_mut(&a.log) {
                None => error(ErrorCode::LogNotFound, ""),
                Some(l) => {
                    let count = a.records.len() as u32;
                    let decision = match a.producer {
                        Some((id, seq)) => l.producers.as_mut().unwrap().check(id, seq, count),
                        None => Decision::Append,
                    };
                    match decision {
                        Decision::Append => {
                            let first = l.end;
                            let producer = a.producer.map(|(id, seq)| ProducerMeta {
                                producer_id: NonZeroU64::new(id).unwrap(),
                                first_sequence: seq,
                            });
                            let b = format::batch::encode_with(
                                Offset(first),
                                Epoch(1),
                                1,
                                producer,
                                &a.records,
                            );
                            l.batches.push(Bytes::from(b));
                            l.end += count as u64;
                            if let Some((id, seq)) = a.producer {
                                l.producers.as_mut().unwrap().record(
                                    id,
                                    seq,
                                    count,
                                    StoredAppend {
                                        first,
                                        next: l.end,
                                        epoch: 1,
                                    },
                                );
                            }
                            Response::Receipt(Receipt {
                                first,
                                next: l.end,
                                epoch: 1,
                                level: a.acks,
                                flags: 0,
                                replicas: 1,
                                holders: vec!["fake".into()],
                            })
                        }
                        Decision::Duplicate(st) => Response::Receipt(Receipt {
                            first: st.first,
                            next: st.next,
                            epoch: st.epoch,
                            level: a.acks,
                            flags: RECEIPT_DUPLICATE,
                            replicas: 1,
                            holders: vec!["fake".into()],
                        }),
                        Decision::SequenceGap { expected } => Response::Error(ErrorResponse {
                            code: ErrorCode::SequenceGap,
                            message: String::new(),
                            leader: String::new(),
                            detail: expected,
                        }),
                        Decision::Stale { .. } => error(ErrorCode::StaleSequence, ""),
                    }
                }
            };
            if lose {
                s.behaviour.lose_append_answers -= 1;
                drop(s);
                changed.notify_waiters();
                conn.close(VarInt::from_u32(0), b"answer lost");
                return;
            }
            drop(s);
            changed.notify_waiters();
            resp
        }
        Request::Read(r) => {
            let mut s = state.lock().unwrap();
            if s.behaviour.lose_read_answers > 0 {
                s.behaviour.lose_read_answers -= 1;
                drop(s);
                conn.close(VarInt::from_u32(0), b"answer lost");
                return;
            }
            let corrupt = s.behaviour.corrupt_reads;
            let behind = s.behaviour.behind;
            // The committed horizon a replica lagging at `behind` would have.
            let log = s
                .logs
                .get(&r.log)
                .map(|l| (l, behind.map_or(l.end, |b| b.min(l.end))));
            match log {
                None => error(ErrorCode::LogNotFound, ""),
                Some((_, committed)) if r.min_offset > committed => {
                    Response::Error(ErrorResponse {
                        code: ErrorCode::Behind,
                        message: String::new(),
                        leader: String::new(),
                        detail: committed,
                    })
                }
                Some((l, _)) if r.from > l.end => error(ErrorCode::OffsetOutOfRange, ""),
                Some((l, _)) => {
                    let (mut batches, next) = batches_from(l, r.from, r.bytes_max);
                    if corrupt && !batches.is_empty() {
                        let last = batches.len() - 1;
                        batches[last] ^= 0x40;
                    }
                    Response::Batches(BatchesResponse {
                        next_offset: next,
                        committed: l.end,
                        batches: Bytes::from(batches),
                    })
                }
            }
        }
        Request::Tail(t) => {
            serve_tail(send, t, state, changed).await;
            return;
        }
    };
    answer(&mut send, &resp).await;
    let _ = send.finish();
}

async fn serve_tail(
    mut send: quinn::SendStream,
    t: protocol::TailRequest,
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
) {
    let mut position = t.from;
    let mut frames = 0usize;
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let frame = {
            let mut s = state.lock().unwrap();
            let reset = s.behaviour.reset_tail_after;
            if reset == Some(frames) {
                s.behaviour.reset_tail_after = None;
                drop(s);
                let _ = send.reset(VarInt::from_u32(6));
                return;
            }
            match s.logs.get(&t.log) {
                None => Some(error(ErrorCode::LogNotFound, "")),
                Some(l) => {
                    let (batches, next) = batches_from(l, position, t.bytes_max);
                    if batches.is_empty() {
                        None
                    } else {
                        let frame = Response::Batches(BatchesResponse {
                            next_offset: next,
                            committed: l.end,
                            batches: Bytes::from(batches),
                        });
                        position = next;
                        Some(frame)
                    }
                }
            }
        };
        match frame {
            Some(resp @ Response::Error(_)) => {
                answer(&mut send, &resp).await;
                let _ = send.finish();
                return;
            }
            Some(resp) => {
                let mut out = BytesMut::new();
                protocol::encode_response(&resp, &mut out);
                if send.write_all(&out).await.is_err() {
                    return;
                }
                frames += 1;
            }
            None => {
                tokio::select! {
                    _ = notified => {}
                    _ = send.stopped() => return,
                }
            }
        }
    }
}
