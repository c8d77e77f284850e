//! `replog dev`: start local node processes on loopback and supervise them until Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Args;

#[derive(Args)]
pub struct DevArgs {
    /// Number of node processes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Parent directory of the nodes' data directories (node-1, node-2, ...).
    #[arg(long, alias = "data-dir", default_value = "replog-dev")]
    dir: PathBuf,
    /// QUIC port of the first node; the others follow it (0: any free ports).
    #[arg(long, default_value_t = 7001)]
    base_port: u16,
    /// Prometheus port of the first node; the others follow it (0: any free ports).
    #[arg(long, default_value_t = 9101)]
    metrics_base_port: u16,
    /// Shards per node.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Size of the leader's sync set (0 = asynchronous, 1 = semi-synchronous).
    #[arg(long, default_value_t = 1)]
    sync_replicas: usize,
    /// A node configuration file (TOML, as for `replog node --config`) every node reads; the
    /// addresses, data directories and roles `dev` gives override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print one JSON object per node instead of a table.
    #[arg(long)]
    json: bool,
}

struct Running {
    name: String,
    role: &'static str,
    data: PathBuf,
    child: Child,
    addr: String,
    metrics: String,
    /// Reaped already: its pid may belong to another process now, never signal it.
    exited: bool,
}

/// Node 1 leads every log; the others follow it.
fn spawn_node(
    exe: &PathBuf,
    a: &DevArgs,
    i: usize,
    leader: Option<&str>,
) -> Result<Running, String> {
    let name = format!("node-{}", i + 1);
    let data = a.dir.join(&name);
    let port = |base: u16| if base == 0 { 0 } else { base as usize + i };
    let listen = format!("127.0.0.1:{}", port(a.base_port));
    let metrics = format!("127.0.0.1:{}", port(a.metrics_base_port));
    let mut cmd = Command::new(exe);
    cmd.args([
        "node",
        "--node-id",
        &name,
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics,
    ])
    .arg("--data-dir")
    .arg(&data)
    .args(["--shards", &a.shards.to_string()]);
    if let Some(config) = &a.config {
        cmd.arg("--config").arg(config);
    }
    // The embedded controller needs every member's address up front: fixed ports only.
    if a.nodes > 1 && a.base_port != 0 {
        let members: Vec<String> = (1..=a.nodes)
            .map(|n| format!("node-{n}=127.0.0.1:{}", a.base_port as usize + n - 1))
            .collect();
        cmd.args(["--member", &members.join(",")]);
    }
    let role = match leader {
        Some(l) => {
            cmd.args(["--leader", l]);
            "follower"
        }
        None if a.nodes > 1 => {
            let followers: Vec<String> = (2..=a.nodes).map(|n| format!("node-{n}")).collect();
            cmd.args(["--follower", &followers.join(",")]);
            cmd.args([
                "--sync-replicas",
                &a.sync_replicas.min(a.nodes - 1).to_string(),
            ]);
            "leader"
        }
        None => "standalone",
    };
    // A node never outlives `dev`, however `dev` ends (even killed): the kernel sends it
    // SIGTERM when its parent dies.
    // SAFETY: prctl(2) is async-signal-safe and touches nothing of the parent's memory.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start {name}: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("{name}: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|_| format!("{name} did not start (see its log above)"))?;
    Ok(Running {
        name,
        role,
        data,
        child,
        addr: v["addr"].as_str().unwrap_or(&listen).to_string(),
        metrics: v["metrics"].as_str().unwrap_or(&metrics).to_string(),
        exited: false,
    })
}

pub fn run(a: DevArgs) -> Result<(), String> {
    if a.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the replog executable: {e}"))?;
    let mut nodes: Vec<Running> = Vec::new();
    for i in 0..a.nodes {
        let leader = nodes.first().map(|n| n.addr.clone());
        match spawn_node(&exe, &a, i, leader.as_deref()) {
            Ok(r) => nodes.push(r),
            Err(e) => {
                stop(&mut nodes);
                return Err(e);
            }
        }
    }
    // What it prints is for whoever started it; a reader that went away (a closed pipe) must
    // not end the supervisor and leave its nodes behind.
    let mut lines = Vec::new();
    for n in &nodes {
        if a.json {
            lines.push(
                serde_json::json!({
                    "node": n.name, "addr": n.addr, "metrics": n.metrics,
                    "role": n.role, "pid": n.child.id(), "data_dir": n.data,
                })
                .to_string(),
            );
        } else {
            lines.push(format!(
                "{}  addr {}  role {:<10}  pid {}  metrics http://{}/metrics  data {}",
                n.name,
                n.addr,
                n.role,
                n.child.id(),
                n.metrics,
                n.data.display()
            ));
        }
    }
    if !a.json {
        let first = &nodes[0].addr;
        lines.push(format!(
            "data under {}; Ctrl-C stops every node",
            a.dir.display()
        ));
        let all: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
        lines.push(format!("try: replog create --server {first} --log demo && echo hello | replog append --server {first} --log demo --acks sync"));
        lines.push(format!(
            "     replog read --server {} --log demo   # any replica serves reads",
            all.join(",")
        ));
        lines.push(format!(
            "     replog status --server {first}   # followers, sync set, lag"
        ));
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
    supervise(&mut nodes);
    stop(&mut nodes);
    Ok(())
}

/// Wait for Ctrl-C or SIGTERM, reporting nodes that exit meanwhile.
fn supervise(nodes: &mut [Running]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("signal runtime");
    rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                _ = term.recv() => return,
                _ = tick.tick() => {
                    for n in nodes.iter_mut().filter(|n| !n.exited) {
                        if let Ok(Some(status)) = n.child.try_wait() {
                            eprintln!("replog dev: {} (pid {}) exited: {status}", n.name, n.child.id());
                            n.exited = true;
                        }
                    }
                }
            }
        }
    });
}

/// SIGTERM every node we started, and wait for them.
fn stop(nodes: &mut [Running]) {
    for n in nodes.iter_mut() {
        // A child that exited is reaped here (try_wait), never signalled afterwards.
        if n.exited || !matches!(n.child.try_wait(), Ok(None)) {
            n.exited = true;
            continue;
        }
        // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
        unsafe {
            libc::kill(n.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    for n in nodes.iter_mut().filter(|n| !n.exited) {
        let _ = n.child.wait();
    }
}
