//! A shard's thread: its tokio-uring runtime opens the logs the shard owns, starts the QUIC
//! endpoint on the shard's socket and the shard's background tasks (scrub, retention, the
//! follower role), hands each connection to [`crate::conn`] and each request forwarded from
//! another shard to [`crate::service`], and closes the logs at shutdown.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use log_core::Offset;
use tokio::sync::mpsc;

use crate::common::{Common, ShardMsg};
use crate::config::Role;
use crate::shard::{Shard, SNAPSHOT_PIN};
use crate::Error;

/// Names of the logs under `dir` that shard `id` of `shards` owns.
fn owned_logs(dir: &std::path::Path, id: usize, shards: usize) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(crate::io(format!("read {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(crate::io(format!("read {}", dir.display())))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if entry.path().is_dir()
            && log_core::validate_log_name(&name).is_ok()
            && crate::shard_of(&name, shards) == id
        {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The shard thread's body.
pub(crate) fn run(
    id: usize,
    common: Arc<Common>,
    socket: std::net::UdpSocket,
    (endpoint_config, server_config): (quinn::EndpointConfig, quinn::ServerConfig),
    mut rx: mpsc::Receiver<ShardMsg>,
    ready: std::sync::mpsc::Sender<Result<(), Error>>,
) {
    log_core::submit::start(async move {
        let shard = Rc::new(Shard {
            id,
            common: common.clone(),
            logs: RefCell::new(BTreeMap::new()),
            creating: RefCell::new(Default::default()),
            failed_logs: RefCell::new(Default::default()),
            closing: Rc::new(std::cell::Cell::new(false)),
        });
        let opened: Result<(), Error> = async {
            for name in owned_logs(&shard.logs_dir(), id, common.shards.len())? {
                shard.open_log(&name).await?;
                common
                    .log_count
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        }
        .await;
        let endpoint = match opened.and_then(|()| {
            quinn::Endpoint::new(
                endpoint_config,
                Some(server_config),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(crate::io("QUIC endpoint"))
        }) {
            Ok(ep) => ep,
            Err(e) => {
                let _ = ready.send(Err(e));
                close_logs(&shard).await.ok();
                return;
            }
        };
        let _ = ready.send(Ok(()));
        if common.config.log.scrub_bytes_per_sec > 0 {
            tokio_uring::spawn(crate::scrub::run(shard.clone()));
        }
        if let Some(policy) = common.config.retention() {
            tokio_uring::spawn(retention(shard.clone(), policy));
        }
        if common.control.is_some() {
            tokio_uring::spawn(crate::follow::steer(shard.clone()));
        } else if let Role::Follower(leader) = common.role {
            tokio_uring::spawn(crate::follow::run(shard.clone(), leader));
        }

        let accept = {
            let shard = shard.clone();
            let endpoint = endpoint.clone();
            tokio_uring::spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    tokio_uring::spawn(crate::conn::handle_incoming(shard.clone(), incoming));
                }
            })
        };

        let done = loop {
            match rx.recv().await {
                Some(ShardMsg::Stream {
                    req,
                    send,
                    recv,
                    accepted,
                }) => {
                    tokio_uring::spawn(crate::service::serve(
                        shard.clone(),
                        req,
                        send,
                        recv,
                        accepted,
                    ));
                }
                Some(ShardMsg::ListLogs(reply)) => {
                    let _ = reply.send(shard.describe());
                }
                Some(ShardMsg::Shutdown(reply)) => break Some(reply),
                None => break None,
            }
        };
        shard.closing.set(true);
        endpoint.close(protocol::close_code::NORMAL.into(), b"shutting down");
        accept.abort();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
        let result = close_logs(&shard).await;
        if let Some(reply) = done {
            let _ = reply.send(result);
        }
    });
}

/// Apply the retention policy to every log of the shard, every `log.retention_check_ms`.
async fn retention(shard: Rc<Shard>, policy: log_core::RetentionPolicy) {
    let every = std::time::Duration::from_millis(shard.common.config.log.retention_check_ms);
    while !shard.closing.get() {
        tokio::time::sleep(every).await;
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let logs = shard.entries();
        for (name, e) in logs {
            let cap = shard.common.config.replication.retention_pin_bytes_max;
            if let Some(repl) = e.leading() {
                repl.release_far_pins(&name, &e.log, cap);
            }
            if let Some(o) = e.snapshot.get().pin() {
                if e.log.bytes_from(Offset(o)).unwrap_or(0) > cap {
                    e.log.unpin(SNAPSHOT_PIN);
                }
            }
            let before = e.log.start_offset();
            match e.log.apply_retention(&policy, now_us) {
                Ok(start) if start > before => {
                    tracing::info!(log = %name, start = start.0, "retention moved the log start");
                }
                Ok(_) => {}
                Err(err) => tracing::error!(log = %name, error = %err, "retention failed"),
            }
        }
    }
}

async fn close_logs(shard: &Shard) -> Result<(), Error> {
    let logs = std::mem::take(&mut *shard.logs.borrow_mut());
    let mut first = Ok(());
    for (name, entry) in logs {
        // Closing writes and flushes what is queued, and refuses further appends from request
        // tasks that may still hold the log (they answer shutting_down).
        if let Err(e) = entry.log.clone().close().await {
            tracing::error!(log = %name, error = %e, "closing log failed");
            if first.is_ok() {
                first = Err(e.into());
            }
        }
    }
    first
}
