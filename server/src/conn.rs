//! Connections and streams: admission, authentication, reading one request per stream, and
//! routing it to the shard that owns the log.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::{ErrorCode, LogInfo, LogReplication, Request, Response, StatusResponse};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::common::ShardMsg;
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::shard::Shard;
use crate::wire::{read_request, reply, reply_error, ReadFail};
use crate::Error;
use protocol::close_code;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the node waits for the client to receive an answer before closing a connection.
const LINGER: Duration = Duration::from_secs(1);

/// Accepted tokens: `auth.tokens` plus the lines of `auth.token_file`.
pub(crate) fn load_tokens(cfg: &NodeConfig) -> Result<Vec<Vec<u8>>, Error> {
    let mut tokens: Vec<Vec<u8>> = cfg
        .auth
        .tokens
        .iter()
        .map(|t| t.as_bytes().to_vec())
        .collect();
    if let Some(path) = &cfg.auth.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("auth.token_file {}: {e}", path.display())))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.as_bytes().to_vec()),
        );
    }
    if tokens
        .iter()
        .any(|t| t.is_empty() || t.len() > protocol::Limits::default().token_bytes_max as usize)
    {
        return Err(Error::Config("tokens must be 1 to 4096 bytes".into()));
    }
    Ok(tokens)
}

/// Compare a presented token with every accepted one, in time independent of where they differ.
fn token_accepted(tokens: &[Vec<u8>], presented: &[u8]) -> bool {
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        ok |= t.as_slice().ct_eq(presented);
    }
    ok.into()
}

struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.c.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) async fn handle_incoming(shard: Rc<Shard>, incoming: quinn::Incoming) {
    if shard.closing.get() {
        incoming.refuse();
        return;
    }
    let common = &shard.common;
    let metrics = common.metrics.clone();
    let open = metrics.c.connections_open.fetch_add(1, Ordering::Relaxed) + 1;
    let _open = OpenConnection(metrics.clone());
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            return;
        }
    };
    if open > common.config.limits.connections_max as u64 {
        metrics
            .c
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %conn.remote_address(), "connection refused: connections_max reached");
        conn.close(close_code::BUSY.into(), b"busy");
        return;
    }
    metrics
        .c
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    if alpn(&conn).as_deref() == Some(protocol::PEER_ALPN) {
        return handle_peer(shard, conn).await;
    }
    // Unidirectional streams carry controller frames between nodes; a client has none to send.
    tokio_uring::spawn(refuse_uni_streams(conn.clone()));
    if !common.tokens.is_empty() && !authenticate(&shard, &conn).await {
        metrics.c.auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %conn.remote_address(), "connection closed: authentication failed");
        conn.close(close_code::UNAUTHENTICATED.into(), b"unauthenticated");
        return;
    }
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio_uring::spawn(serve_stream(shard.clone(), send, recv, Instant::now()));
    }
}

async fn refuse_uni_streams(conn: quinn::Connection) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let _ = recv.stop(close_code::UNEXPECTED_STREAM.into());
    }
}

/// The ALPN protocol the connection agreed on.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// A connection from another node (ALPN `replog-peer/1`): it must present a certificate issued
/// by the cluster CA; each replication stream must further come from the node its certificate
/// names.
async fn handle_peer(shard: Rc<Shard>, conn: quinn::Connection) {
    let trusted = crate::tls::verify_cluster_cert(&*shard.common.cluster, &conn).is_ok();
    if !trusted {
        shard
            .common
            .metrics
            .c
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %conn.remote_address(), "peer connection refused: no certificate from the cluster CA");
        conn.close(
            close_code::UNAUTHENTICATED.into(),
            b"not a node of this cluster",
        );
        return;
    }
    // A follower holds one stream per log it replicates, and opens more for its requests:
    // room for every log up to `logs_max`, far beyond a client's `streams_per_connection_max`.
    conn.set_max_concurrent_bi_streams(shard.common.config.peer_streams_max().into());
    if let Some(control) = shard.common.control.clone() {
        tokio_uring::spawn(control_frames(shard.clone(), conn.clone(), control));
    }
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio_uring::spawn(serve_peer_stream(
            shard.clone(),
            conn.clone(),
            send,
            recv,
            Instant::now(),
        ));
    }
}

/// Hand the controller frames of a peer connection (one per unidirectional stream) to the
/// controller, once the connection's certificate is known to name their sender.
async fn control_frames(
    shard: Rc<Shard>,
    conn: quinn::Connection,
    control: Arc<crate::controller::node::NodeController>,
) {
    let mut verified: Option<String> = None;
    while let Ok(mut recv) = conn.accept_uni().await {
        let bytes = match recv
            .read_to_end(crate::controller::CONTROL_FRAME_BYTES_MAX)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(peer = %conn.remote_address(), error = %e, "controller frame not read");
                continue;
            }
        };
        let Some((from, frame)) = crate::controller::parse_frame(&bytes) else {
            tracing::warn!(peer = %conn.remote_address(), "malformed controller frame");
            continue;
        };
        if verified.as_deref() != Some(from) {
            if let Err(e) = crate::tls::verify_peer(&*shard.common.cluster, &conn, from) {
                shard
                    .common
                    .metrics
                    .c
                    .auth_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %conn.remote_address(), claimed = %from, error = %e, "controller frame refused");
                continue;
            }
            verified = Some(from.to_string());
        }
        control.deliver(from, Bytes::copy_from_slice(frame));
    }
}

async fn serve_peer_stream(
    shard: Rc<Shard>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    accepted: Instant,
) {
    let cfg = &shard.common.config;
    let req = match read_request(&mut recv, cfg, &cfg.protocol_limits()).await {
        Ok(r) => r,
        Err(ReadFail::Answer(code, msg)) => {
            return reply_error(&shard.common, &mut send, code, &msg).await
        }
        Err(ReadFail::Gone) => return,
    };
    let log = match &req {
        Request::ListLogs => {
            let (logs, _) = all_logs(&shard).await;
            return reply(&shard.common, &mut send, &Response::Logs(logs)).await;
        }
        Request::Replicate(r) => {
            if let Err(e) = crate::tls::verify_peer(&*shard.common.cluster, &conn, &r.follower) {
                shard
                    .common
                    .metrics
                    .c
                    .auth_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %conn.remote_address(), follower = %r.follower, error = %e, "replication refused");
                return reply_error(&shard.common, &mut send, ErrorCode::Unauthenticated, &e).await;
            }
            r.log.clone()
        }
        // A read: a replica repairing a damaged range from this one.
        Request::EpochEnd { log, .. }
        | Request::GetSnapshot { log }
        | Request::Checksum { log, .. } => log.clone(),
        Request::Read(r) => r.log.clone(),
        _ => {
            let msg =
                "a peer connection carries only list_logs, replicate, epoch_end, get_snapshot, read and checksum";
            return reply_error(&shard.common, &mut send, ErrorCode::UnknownMessage, msg).await;
        }
    };
    let recv = matches!(req, Request::Replicate(_)).then_some(recv);
    forward(shard, &log, req, send, recv, accepted).await;
}

/// The first stream must carry a valid token. Never logs the token.
async fn authenticate(shard: &Rc<Shard>, conn: &quinn::Connection) -> bool {
    let timeout = Duration::from_millis(shard.common.config.limits.request_timeout_ms as u64);
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(timeout, conn.accept_bi()).await else {
        return false;
    };
    // Before authentication a peer may send nothing larger than an Auth frame: the header
    // alone refuses a bigger body, so an unauthenticated peer cannot make the node buffer a
    // full frame_bytes_max.
    let cfg = &shard.common.config;
    let limits = protocol::Limits {
        frame_bytes_max: 2 + u32::from(cfg.protocol_limits().token_bytes_max),
        snapshot_bytes_max: 0,
        ..cfg.protocol_limits()
    };
    let ok = match read_request(&mut recv, cfg, &limits).await {
        Ok(Request::Auth { token }) => token_accepted(&shard.common.tokens, &token),
        _ => false,
    };
    if ok {
        reply(&shard.common, &mut send, &Response::Ok).await;
    } else {
        reply_error(
            &shard.common,
            &mut send,
            ErrorCode::Unauthenticated,
            "a valid token is required",
        )
        .await;
        let _ = tokio::time::timeout(LINGER, send.stopped()).await;
    }
    ok
}

async fn serve_stream(
    shard: Rc<Shard>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    accepted: Instant,
) {
    let cfg = &shard.common.config;
    let req = match read_request(&mut recv, cfg, &cfg.protocol_limits()).await {
        Ok(r) => r,
        Err(ReadFail::Answer(code, msg)) => {
            tracing::debug!(code = code.name(), %msg, "bad request");
            reply_error(&shard.common, &mut send, code, &msg).await;
            return;
        }
        Err(ReadFail::Gone) => return,
    };
    drop(recv);
    route(shard, req, send, accepted).await;
}

/// Serve a request here, or hand it with its stream to the shard that owns the log.
async fn route(shard: Rc<Shard>, req: Request, mut send: quinn::SendStream, accepted: Instant) {
    let log = match &req {
        r if r.is_peer() => {
            let msg = "peer requests are accepted only from nodes, on the replog-peer/1 ALPN";
            return reply_error(&shard.common, &mut send, ErrorCode::UnknownMessage, msg).await;
        }
        Request::Auth { .. } => return reply(&shard.common, &mut send, &Response::Ok).await,
        Request::ListLogs => {
            let (logs, _) = all_logs(&shard).await;
            return reply(&shard.common, &mut send, &Response::Logs(logs)).await;
        }
        Request::Status => {
            let c = &shard.common;
            let (logs, replication) = all_logs(&shard).await;
            let status = StatusResponse {
                node_id: c.node_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                role: c.role.name().into(),
                shards: c.shards.len() as u16,
                uptime_ms: c.started.elapsed().as_millis() as u64,
                connections: c.metrics.c.connections_open.load(Ordering::Relaxed) as u32,
                logs,
                leader: match c.role {
                    crate::config::Role::Follower(a) => a.to_string(),
                    _ => String::new(),
                },
                replication,
                controller: c.control.as_ref().map(|c| c.status()),
                quarantined: follower::quarantine::list(
                    &c.config.node.data_dir.join(crate::layout::QUARANTINE_DIR),
                )
                .into_iter()
                .map(|q| protocol::Quarantined {
                    log: q.log,
                    from: q.from,
                    to: q.to,
                    records: q.records,
                    bytes: q.bytes,
                    epochs: q.epochs,
                    at_ms: q.at_ms,
                    file: q.file.display().to_string(),
                })
                .collect(),
                damaged: c.damaged.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            };
            return reply(
                &shard.common,
                &mut send,
                &Response::Status(Box::new(status)),
            )
            .await;
        }
        Request::CreateLog { name, .. } => name,
        Request::Transfer { log, .. } => log,
        Request::Append(a) => &a.log,
        Request::Read(r) => &r.log,
        Request::Tail(t) => &t.log,
        Request::PutSnapshot(p) => &p.log,
        Request::GetSnapshot { log } => log,
        Request::Replicate(_)
        | Request::Ack { .. }
        | Request::EpochEnd { .. }
        | Request::Checksum { .. } => {
            unreachable!("peer requests are answered above")
        }
    };
    let log = log.clone();
    forward(shard, &log, req, send, None, accepted).await
}

/// Serve a request for `log` here if this shard owns it, else hand it to the owner.
async fn forward(
    shard: Rc<Shard>,
    log: &str,
    req: Request,
    send: quinn::SendStream,
    recv: Option<quinn::RecvStream>,
    accepted: Instant,
) {
    let owner = crate::shard_of(log, shard.common.shards.len());
    if owner == shard.id {
        return crate::service::serve(shard, req, send, recv, accepted).await;
    }
    shard
        .common
        .metrics
        .c
        .forwarded
        .fetch_add(1, Ordering::Relaxed);
    if let Err(e) = shard.common.shards[owner]
        .send(ShardMsg::Stream {
            req,
            send,
            recv,
            accepted,
        })
        .await
    {
        if let ShardMsg::Stream { mut send, .. } = e.0 {
            reply_error(
                &shard.common,
                &mut send,
                ErrorCode::ShuttingDown,
                "the node is shutting down",
            )
            .await;
        }
    }
}

/// The logs of every shard, by name, and the replication of those this node leads.
async fn all_logs(shard: &Rc<Shard>) -> (Vec<LogInfo>, Vec<LogReplication>) {
    let (mut logs, mut repl) = shard.describe();
    for (i, s) in shard.common.shards.iter().enumerate() {
        if i == shard.id {
            continue;
        }
        let (tx, rx) = oneshot::channel();
        if s.send(ShardMsg::ListLogs(tx)).await.is_ok() {
            if let Ok((more, more_repl)) = rx.await {
                logs.extend(more);
                repl.extend(more_repl);
            }
        }
    }
    logs.sort_by(|a, b| a.name.cmp(&b.name));
    repl.sort_by(|a, b| a.log.cmp(&b.log));
    (logs, repl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let tokens = vec![b"alpha".to_vec(), b"beta-token".to_vec()];
        assert!(token_accepted(&tokens, b"alpha"));
        assert!(token_accepted(&tokens, b"beta-token"));
        assert!(!token_accepted(&tokens, b"alph"));
        assert!(!token_accepted(&tokens, b"alphaa"));
        assert!(!token_accepted(&tokens, b""));
        assert!(!token_accepted(&[], b"alpha"));
    }
}
