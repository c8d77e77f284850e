//! README.md's replicated SQLite lines, run as written against `replog dev` on its default
//! ports (no other test of this binary uses them); and the `primary` command fed a stream of
//! transactions right after its log is created.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use support::*;

/// The shell block that follows `heading` in README.md.
fn readme_block_after(heading: &str) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let after = &text[text.find(heading).expect("the heading in README.md")..];
    let start = after.find("```sh\n").expect("a shell block") + "```sh\n".len();
    let len = after[start..].find("```").expect("the block's end");
    after[start..start + len].to_string()
}

/// `replog dev` with its defaults, in `cwd`; stopped (SIGINT, as Ctrl-C) when dropped.
struct Dev(std::process::Child);

impl Dev {
    fn start(env: &Env, cwd: &std::path::Path) -> Dev {
        let mut child = Command::new(replog_bin())
            .arg("dev")
            .current_dir(cwd)
            .env("REPLOG_DEV_CA_DIR", env.ca_dir())
            .env("REPLOG_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..3 {
            let line = lines.next().unwrap().unwrap();
            assert!(line.contains("node-"), "{line}");
        }
        // The rest of what it prints is read as a terminal would.
        std::thread::spawn(move || lines.for_each(drop));
        Dev(child)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the dev process this test started and has not reaped.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGINT);
        }
        let _ = self.0.wait();
    }
}

fn path_with_binaries() -> String {
    let replog = replog_bin();
    let sqlite = std::path::Path::new(SQLITE_BIN);
    format!(
        "{}:{}:{}",
        replog.parent().unwrap().display(),
        sqlite.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn the_replicated_sqlite_lines_run_as_written() {
    let script = readme_block_after("### Replicated SQLite example");
    assert!(script.contains("replog-sqlite exec"), "{script}");
    let env = Env::new();
    let cwd = env.path("work");
    std::fs::create_dir_all(&cwd).unwrap();
    let _dev = Dev::start(&env, &cwd);
    std::fs::write(cwd.join("readme.sh"), &script).unwrap();
    // Its own process group: the replica it leaves running in the background is ended with it.
    let mut child = Command::new("bash")
        .args(["-e", "readme.sh"])
        .current_dir(&cwd)
        .env("PATH", path_with_binaries())
        .env("REPLOG_DEV_CA_DIR", env.ca_dir())
        .env_remove("REPLOG_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(env.path("readme.stderr")).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let status = child.wait().unwrap();
    // The replica started in the background prints as it goes, perhaps after the script ends.
    let wanted = [
        r#"{"token":0}"#,
        r#"{"token":1}"#,
        r#"{"k":"a","v":"1"}"#,
        r#"{"k":"b","v":"2"}"#,
        r#"{"event":"start","next":0,"source":"empty"}"#,
        r#"{"event":"start","next":2,"source":"snapshot"}"#,
        r#"{"token":2}"#,
    ];
    let mut lines: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !wanted.iter().all(|w| lines.iter().any(|l| l == w)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    // SAFETY: kill(2) on the process group of the script this test started.
    unsafe {
        libc::kill(-(group as libc::pid_t), libc::SIGTERM);
    }
    let stderr = std::fs::read_to_string(env.path("readme.stderr")).unwrap_or_default();
    assert!(status.success(), "{status}\n{lines:#?}\n{stderr}");
    for want in wanted {
        assert!(
            lines.iter().any(|l| l == want),
            "no {want} in {lines:#?}\n{stderr}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(r#"{"bytes":"#) && l.ends_with(r#""offset":2}"#)),
        "{lines:#?}"
    );
}

/// A primary fed transactions the moment its log is created waits through the refusals of
/// that window and commits every one; the first transaction that fails stops it (nothing after
/// it runs against a database missing it), unless `--keep-going`.
#[test]
fn the_primary_waits_out_the_create_window_and_stops_at_the_first_failure() {
    let env = Env::new();
    let [leader, _f1, _f2] = env.cluster();
    let server = leader.server();
    let primary = |db: &str, extra: &[&str], input: &str| {
        let mut child = Command::new(SQLITE_BIN)
            .args(["primary", "--db", db, "--server", &server, "--log"])
            .args(extra)
            .current_dir(env.path(""))
            .env("REPLOG_DEV_CA_DIR", env.ca_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let mut input = String::from("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)\n");
    for i in 0..50 {
        input.push_str(&format!("INSERT INTO t VALUES ({i}, 'v{i}')\n"));
    }
    let out = primary("a.db", &["app", "--create"], &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens: Vec<u64> = json_lines(&out.stdout)
        .iter()
        .map(|l| l["token"].as_u64().unwrap_or_else(|| panic!("{l}")))
        .collect();
    assert_eq!(tokens, (0..51).collect::<Vec<u64>>());

    // A failing transaction stops the primary: the line after it is not run.
    let input = "INSERT INTO t VALUES (100, 'x')\nINSERT INTO nowhere VALUES (1)\nINSERT INTO t VALUES (101, 'y')\n";
    let out = primary("a.db", &["app"], input);
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["token"], 51);
    assert_eq!(lines[1]["kind"], "sql", "{}", lines[1]);
    // --keep-going runs the rest, and still reports the failure in its status.
    let out = primary("a.db", &["app", "--keep-going"], input);
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["kind"], "sql", "{}", lines[0]);
    assert_eq!(lines[1]["kind"], "sql", "{}", lines[1]);
    assert_eq!(lines[2]["token"], 52, "{}", lines[2]);
}
