//! log-core against the raw disk floor on one disk: fdatasync latency, group commit, mmap reads.

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use log_core::batch::encoded_len;
use log_core::{Epoch, Log, LogConfig, Offset};
use tokio_uring::buf::BoundedBuf;
use tokio_uring::fs::File;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Payload of one record in the latency and group-commit runs.
const REC: usize = KIB;
const EPOCH: Epoch = Epoch(1);
const APPENDERS: [usize; 3] = [16, 64, 256];
/// Item 2's chunks (label, KiB): two bulk sizes, then N x 1 KiB records as one write, which is
/// what a group commit of N records costs at the floor.
const RAW_CHUNKS: [(&str, usize); 5] = [
    ("256 KiB", 256),
    ("1 MiB", 1024),
    ("16 x 1 KiB", 16),
    ("64 x 1 KiB", 64),
    ("256 x 1 KiB", 256),
];

/// The report: a text table, and beside it one flat JSON object of "section.key": value fields.
#[derive(Default)]
struct Out {
    text: String,
    json: Vec<String>,
}

/// `put! { out, prefix, name = value, .. }`: numeric JSON fields `prefix.name`. Braces keep
/// rustfmt from spreading the fields one per line.
macro_rules! put {
    ($o:expr, $prefix:expr, $($k:ident = $v:expr),* $(,)?) => {
        $( $o.num(&format!("{}.{}", $prefix, stringify!($k)), $v as f64); )*
    };
}

/// A JSON string literal.
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Out {
    fn say(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
    }
    /// Three decimals are plenty; a non-finite number (an empty run) becomes null.
    fn num(&mut self, key: &str, v: f64) {
        let v = if v.is_finite() {
            ((v * 1e3).round() / 1e3).to_string()
        } else {
            "null".into()
        };
        self.json.push(format!("{}:{v}", q(key)));
    }
    fn str(&mut self, key: &str, v: &str) {
        self.json.push(format!("{}:{}", q(key), q(v)));
    }
    /// A latency row: p50, p90, p99, p99.9, max in µs.
    fn lat(&mut self, key: &str, label: &str, h: &Histogram<u64>) {
        let p = pcts(h);
        let cols: String = p.iter().map(|v| format!(" {v:>9.1}")).collect();
        self.say(&format!("  {label:<16}{cols}"));
        put! { self, key, p50_us = p[0], p90_us = p[1], p99_us = p[2], p999_us = p[3],
        max_us = p[4] }
        put! { self, key, samples = h.len() }
    }
}

const TABLE4: &str = concat!(
    "     N     rec/s     MB/s diskMB/s syncs/s    group rec/B   p50 µs   p99 µs rolls  cpu",
    " raw@group ratio@grp ratio1MiB"
);
const LAT_HEADER: &str = "                         p50       p90       p99     p99.9       max";

/// The command line, and the sizes of the run (`--quick` shrinks them all).
struct Params {
    dir: Option<PathBuf>,
    quick: bool,
    json: bool,
    warmup: usize,
    samples: usize,
    bw_secs: Duration,
    bw_file: u64,
    gc_secs: Duration,
    read_bytes: usize,
}

struct Group {
    appenders: usize,
    records: u64,
    syncs: u64,
    secs: f64,
    rolls: usize,
    /// Share of the wall time this thread was on a CPU.
    cpu: f64,
    lat: Histogram<u64>,
}

fn parse_args() -> Params {
    let (mut dir, mut quick, mut json) = (None, false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = Some(args.next().expect("--dir needs a path").into()),
            "--quick" => quick = true,
            "--json" => json = true,
            // `cargo bench` passes `--bench` (and any filter) to every bench binary.
            _ => {}
        }
    }
    Params {
        dir,
        quick,
        json,
        warmup: if quick { 20 } else { 100 },
        samples: if quick { 300 } else { 2000 },
        bw_secs: Duration::from_millis(if quick { 500 } else { 2000 }),
        bw_file: if quick { 32 << 20 } else { 128 << 20 },
        gc_secs: Duration::from_secs(if quick { 1 } else { 3 }),
        read_bytes: if quick { 64 << 20 } else { 256 << 20 },
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).unwrap()
}

fn ns(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

/// p50, p90, p99, p99.9 and max, in microseconds.
fn pcts(h: &Histogram<u64>) -> [f64; 5] {
    let q = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    [q(0.5), q(0.9), q(0.99), q(0.999), h.max() as f64 / 1e3]
}

/// One write_all_at + sync_data (fdatasync); hands the buffer back.
async fn write_sync(file: &File, buf: Vec<u8>, pos: u64) -> Vec<u8> {
    let (r, buf) = file.write_all_at(buf, pos).await;
    r.unwrap();
    file.sync_data().await.unwrap();
    buf
}

/// Zero-fill `len` bytes and fsync, so later writes overwrite allocated, written blocks: the
/// state log-core's prepared segments are in.
async fn prewrite(file: &File, len: u64) {
    let mut zeros = vec![0u8; MIB];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(MIB as u64) as usize;
        let (r, s) = file.write_all_at(zeros.slice(..n), pos).await;
        r.unwrap();
        zeros = s.into_inner();
        pos += n as u64;
    }
    file.sync_all().await.unwrap();
}

/// Item 1: `size`-byte write_all_at + sync_data at queue depth 1, sequential, in one file
/// preparation.
async fn floor(
    dir: &Path,
    mode: &str,
    size: usize,
    warmup: usize,
    samples: usize,
) -> Histogram<u64> {
    let path = dir.join(format!("floor-{mode}"));
    let len = ((warmup + samples) * size) as u64;
    let file = File::create(&path).await.unwrap();
    match mode {
        "prewritten" => prewrite(&file, len).await,
        // The allocation is made durable up front so that only the writes are timed.
        "fallocated" => {
            file.fallocate(0, len, 0).await.unwrap();
            file.sync_all().await.unwrap();
        }
        _ => {}
    }
    let mut buf = vec![0xA5u8; size];
    let mut h = hist();
    for i in 0..warmup + samples {
        let t = Instant::now();
        buf = write_sync(&file, buf, (i * size) as u64).await;
        if i >= warmup {
            h.saturating_record(ns(t));
        }
    }
    file.close().await.unwrap();
    std::fs::remove_file(&path).unwrap();
    h
}

/// Items 2 and 4: `chunk`-byte writes, each followed by fdatasync, going sequentially round a
/// pre-written file of `len` bytes for `dur` (at least 10 timed writes). Returns (ops/s, MB/s).
async fn seq_sync(file: &File, len: u64, chunk: usize, dur: Duration) -> (f64, f64) {
    let mut buf = vec![0x5Au8; chunk];
    let (mut pos, mut ops, mut t) = (0u64, 0u64, Instant::now());
    // Three untimed writes first: the first fdatasync after a pause can pay for other work.
    while ops < 13 || t.elapsed() < dur {
        t = if ops == 3 { Instant::now() } else { t };
        pos = if pos + chunk as u64 > len { 0 } else { pos };
        buf = write_sync(file, buf, pos).await;
        pos += chunk as u64;
        ops += 1;
    }
    let ops_s = (ops - 3) as f64 / t.elapsed().as_secs_f64();
    (ops_s, ops_s * chunk as f64 / 1e6)
}

/// Open a fresh log in the state a busy log reaches: the default config, except that the first
/// segment already has the largest size (`segment_bytes_max`, zero-filled while `open` waits),
/// as the write rate sizes a busy log's segments after its first roll or two. Nothing else is
/// prepared until the segment is half full, so no preparation shares the disk with the
/// measurement that follows until then.
async fn open_log(dir: &Path) -> Log {
    let d = LogConfig::default();
    let config = LogConfig {
        segment_initial_bytes: d.segment_bytes_max,
        ..d
    };
    Log::open(dir, config).await.unwrap()
}

/// Item 3: one 1 KiB record at a time, try_append then wait_flushed(next).
async fn log_latency(log: &Log, warmup: usize, samples: usize) -> Histogram<u64> {
    let rec = vec![0x42u8; REC];
    let mut h = hist();
    for i in 0..warmup + samples {
        let t = Instant::now();
        let a = log.try_append(EPOCH, std::slice::from_ref(&rec)).unwrap();
        log.wait_flushed(a.next).await.unwrap();
        if i >= warmup {
            h.saturating_record(ns(t));
        }
    }
    h
}

/// Item 4: `n` appenders on this thread, each looping append(1 KiB) + wait_flushed, for `dur`.
/// fdatasyncs are counted as the distinct flush_offset values appenders see when woken: every
/// fdatasync that covers new records wakes at least one of them, and flush_offset only grows.
async fn group_commit(log: &Log, n: usize, dur: Duration) -> Group {
    let records = Rc::new(Cell::new(0u64));
    let syncs = Rc::new(Cell::new((0u64, log.flush_offset())));
    let lat = Rc::new(RefCell::new(hist()));
    let (segments, cpu) = (log.segment_count(), thread_cpu_ns());
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (log, records, syncs, lat) =
                (log.clone(), records.clone(), syncs.clone(), lat.clone());
            tokio_uring::spawn(async move {
                let rec = vec![0x42u8; REC];
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let a = log.append(EPOCH, std::slice::from_ref(&rec)).await;
                    log.wait_flushed(a.unwrap().next).await.unwrap();
                    lat.borrow_mut().saturating_record(ns(t));
                    records.set(records.get() + 1);
                    let (count, last) = syncs.get();
                    let now = log.flush_offset();
                    if now != last {
                        syncs.set((count + 1, now));
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    Group {
        appenders: n,
        records: records.get(),
        syncs: syncs.get().0.max(1),
        secs,
        cpu: (thread_cpu_ns() - cpu) as f64 / 1e9 / secs,
        rolls: log.segment_count() - segments,
        lat: lat.replace(hist()),
    }
}

/// CPU time of this thread, where the log's tasks and the appenders all run (ns; 0 if unknown).
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    s.split(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Touch every byte as little-endian u64 words: a memory-bound pass the compiler vectorises.
fn sum64(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail: u64 = words.remainder().iter().map(|b| u64::from(*b)).sum();
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap());
    words.map(word).fold(tail, u64::wrapping_add)
}

/// One pass of `log.read` over the whole log with 1 MiB reads (a consumer's fetch size),
/// applying `touch` to every batch. Returns (bytes, batches, seconds).
fn read_pass(log: &Log, end: Offset, touch: &mut dyn FnMut(&[u8])) -> (usize, usize, f64) {
    let t = Instant::now();
    let (mut from, mut bytes, mut batches) = (log.start_offset(), 0, 0);
    while from < end {
        let r = log.read(from, end, MIB).unwrap();
        for b in &r.batches {
            touch(b);
            bytes += b.len();
        }
        batches += r.batches.len();
        from = r.next_offset;
    }
    (bytes, batches, t.elapsed().as_secs_f64())
}

/// Best of three timed passes of `f`, in GB/s over `bytes`.
fn best_gb_s(bytes: usize, mut f: impl FnMut()) -> f64 {
    let mut pass = || {
        let t = Instant::now();
        f();
        bytes as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    (0..3).map(|_| pass()).fold(0.0, f64::max)
}

/// Item 5: fill a log with `total` bytes of 1..64 KiB records, flush, then read it back.
async fn mmap_read(dir: &Path, total: usize, o: &mut Out) {
    let log = open_log(dir).await;
    // A fixed LCG: the same record sizes in every run.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..64 * KIB).map(|i| (i * 31 % 251) as u8).collect();
    let (mut filled, mut next) = (0usize, Offset(0));
    let t = Instant::now();
    while filled < total {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let len = KIB + ((x >> 33) % (63 * KIB as u64 + 1)) as usize;
        next = log.append(EPOCH, &[&data[..len]]).await.unwrap().next;
        filled += len;
    }
    log.wait_flushed(next).await.unwrap();
    let fill_mb_s = filled as f64 / t.elapsed().as_secs_f64() / 1e6;
    let mut acc = 0u64;
    // The first pass maps the page-cache pages into this process (minor faults); later ones
    // find them mapped.
    let (bytes, batches, cold) = read_pass(&log, next, &mut |b| acc ^= sum64(b));
    let sum = best_gb_s(bytes, || {
        _ = read_pass(&log, next, &mut |b| acc ^= sum64(b))
    });
    // One crc32c over the whole stream, chained across batches, as over the Vec below.
    let mut crc = 0u32;
    let crc_gb_s = best_gb_s(bytes, || {
        _ = read_pass(&log, next, &mut |b| crc = crc32c::crc32c_append(crc, b))
    });
    // The memory floor: the same bytes copied into one Vec, touched the same ways.
    let mut copy = Vec::with_capacity(bytes);
    read_pass(&log, next, &mut |b| copy.extend_from_slice(b));
    let mem_sum = best_gb_s(bytes, || acc ^= sum64(black_box(&copy)));
    let mem_crc = best_gb_s(bytes, || crc ^= crc32c::crc32c(black_box(&copy)));
    black_box((acc, crc));
    log.close().await.unwrap();
    let mib = bytes >> 20;
    o.say(&format!(
        "\n5. mmap read: log.read(1 MiB at a time) over {mib} MiB in {batches} batches"
    ));
    o.say(&format!(
        "   of 1..64 KiB records (appended at {fill_mb_s:.0} MB/s, then flushed)"
    ));
    o.say("  touch every byte with                log GB/s Vec GB/s   ratio");
    put! { o, "read", bytes = bytes, batches = batches, fill_mb_s = fill_mb_s }
    let rows = [
        (
            "sum_first_pass",
            "u64 sum, 1st pass (faults)",
            bytes as f64 / cold / 1e9,
            mem_sum,
        ),
        ("sum", "u64 sum, best of 3", sum, mem_sum),
        ("crc32c", "crc32c, best of 3", crc_gb_s, mem_crc),
    ];
    for (key, name, log, mem) in rows {
        o.say(&format!(
            "  {name:<36} {log:>8.2} {mem:>8.2} {:>6.2}x",
            log / mem
        ));
        put! { o, format!("read.{key}"), log_gb_s = log, memory_gb_s = mem, ratio = log / mem }
    }
}

/// The filesystem holding `dir`: the longest mount point above it in /proc/self/mounts.
fn fs_type(dir: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((f.next()?, f.next()?, f.next()?))
        })
        .filter(|(_, mnt, _)| dir.starts_with(mnt))
        .max_by_key(|(_, mnt, _)| mnt.len())
        .map_or("unknown".into(), |(dev, mnt, ty)| {
            format!("{ty} ({dev} on {mnt})")
        })
}

/// The workspace target dir, from this binary's path `<target>/release/deps/log_bench-*`.
fn default_parent() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.ancestors().nth(3).map(Path::to_path_buf))
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| ".".into())
}

fn main() {
    let p = parse_args();
    let parent = p.dir.clone().unwrap_or_else(default_parent);
    let tmp = tempfile::Builder::new()
        .prefix("log_bench-")
        .tempdir_in(&parent)
        .expect("create a temporary directory under --dir");
    let dir = tmp.path().canonicalize().unwrap();
    let fs = fs_type(&dir);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rec_disk = encoded_len(&[[0u8; REC]]);
    let started = Instant::now();
    let mut o = Out::default();
    o.say(&format!(
        "log_bench{}",
        if p.quick { " --quick" } else { "" }
    ));
    let conditions = [
        ("dir", dir.display().to_string()),
        ("fs", fs),
        ("kernel", kernel.trim().into()),
    ];
    for (k, v) in &conditions {
        o.say(&format!("  {k:<7} {v}"));
        o.str(&format!("conditions.{k}"), v);
    }
    o.say(&format!(
        "  {cpus} CPUs; {REC} B records ({rec_disk} B on disk: batch header + length prefix)"
    ));
    o.say("  MB = 1e6 B, GB = 1e9 B, latencies in µs\n");
    put! { o, "conditions", cpus = cpus, quick = u8::from(p.quick), record_bytes = REC,
    record_disk_bytes = rec_disk }

    tokio_uring::start(async {
        let samples = format!("{} samples after {} warm-up", p.samples, p.warmup);
        o.say(&format!(
            "1. Raw floor: <size> B write_all_at + sync_data, QD1 ({samples})"
        ));
        o.say("   (a) prewritten = zero-filled + fsynced, overwritten sequentially; (b) growing =");
        o.say(&format!(
            "   appending; (c) fallocated + fsynced, then written\n{LAT_HEADER}"
        ));
        // The last row repeats (a) with log-core's write pattern for item 3: one batch of one
        // 1 KiB record per write, so writes are unaligned and rewrite the previous page.
        let modes = [
            ("prewritten", 4 * KIB),
            ("growing", 4 * KIB),
            ("fallocated", 4 * KIB),
        ];
        let mut floor_p50 = Vec::new();
        for (mode, size) in modes.into_iter().chain([("prewritten", rec_disk)]) {
            eprintln!("log_bench: floor: {size} B write+fdatasync, {mode} file");
            let h = floor(&dir, mode, size, p.warmup, p.samples).await;
            o.lat(
                &format!("floor.{mode}_{size}"),
                &format!("{mode} {size}"),
                &h,
            );
            floor_p50.push(pcts(&h)[0]);
        }

        eprintln!("log_bench: raw sequential fdatasync'd bandwidth");
        let raw_path = dir.join("raw-bandwidth");
        let raw = File::create(&raw_path).await.unwrap();
        prewrite(&raw, p.bw_file).await;
        o.say(&format!(
            "\n2. Raw sequential write + fdatasync into a pre-written {} MiB file (~{:.1} s each)",
            p.bw_file >> 20,
            p.bw_secs.as_secs_f64()
        ));
        o.say("  chunk            ops/s      MB/s   records/s");
        let mut mib_bw = 0.0;
        for (label, kib) in RAW_CHUNKS {
            let (ops_s, mb_s) = seq_sync(&raw, p.bw_file, kib * KIB, p.bw_secs).await;
            // N x 1 KiB rows also count records.
            let key = format!("raw.{}", label.replace(' ', "_"));
            put! { o, key, ops_s = ops_s, mb_s = mb_s }
            let mut row = format!("  {label:<12} {ops_s:>9.1} {mb_s:>9.1}");
            // N x 1 KiB rows also count records.
            if let Some((n, _)) = label.split_once(" x ") {
                let recs = ops_s * n.parse::<f64>().unwrap();
                row += &format!(" {recs:>11.0}");
                put! { o, key, records_s = recs }
            }
            o.say(&row);
            mib_bw = if kib == 1024 { mb_s } else { mib_bw };
        }

        eprintln!("log_bench: log-core: single append + flush latency");
        let log = open_log(&dir.join("log")).await;
        let single = log_latency(&log, p.warmup, p.samples).await;
        // The disk's floor drifts over time (host caches, neighbours): measure (a) again now.
        let again = floor(&dir, "prewritten", 4 * KIB, p.warmup, p.samples).await;
        // The same on a new log with the defaults: a 1 MiB first segment, the next one sized
        // by the write rate and prepared in the background once the first is half full.
        eprintln!("log_bench: log-core: the same on a new log with the default config");
        let fresh = Log::open(dir.join("new-log"), LogConfig::default())
            .await
            .unwrap();
        let new_log = log_latency(&fresh, p.warmup, p.samples).await;
        let (new_rolls, new_disk) = (fresh.segment_count() - 1, fresh.disk_bytes());
        fresh.close().await.unwrap();
        o.say("\n3. log-core: try_append(one 1 KiB record) + wait_flushed(next), one at a time");
        o.say(&format!("   ({samples})\n{LAT_HEADER}"));
        o.lat("append", "append+flush", &single);
        o.lat("append.floor_again", "floor (a) again", &again);
        o.lat("append.new_log", "new log, defaults", &new_log);
        let (ratio, same) = (
            pcts(&single)[0] / floor_p50[0],
            pcts(&single)[0] / floor_p50[3],
        );
        let drift = pcts(&again)[0] / floor_p50[0];
        let verdict = if ratio <= 1.2 {
            "met".into()
        } else {
            format!("MISSED by {:.0}%", (ratio / 1.2 - 1.0) * 100.0)
        };
        o.say(&format!(
            "  p50 / floor (a) prewritten 4096 p50: {ratio:.2}x  (target <= 1.2x: {verdict})"
        ));
        o.say(&format!(
            "  p50 / floor prewritten {rec_disk} p50 (same write pattern): {same:.2}x"
        ));
        o.say(&format!(
            "  floor (a) re-measured right after item 3: its p50 moved {drift:.2}x since item 1"
        ));
        o.say(&format!(
            "  new log: {new_rolls} rolls, {} MiB of segments at the end",
            new_disk >> 20
        ));
        put! { o, "append.new_log", rolls = new_rolls, disk_bytes = new_disk }
        put! { o, "append", ratio_to_floor_p50 = ratio, target = 1.2,
        ratio_to_same_pattern_floor_p50 = same, floor_drift = drift }

        let mut groups = Vec::new();
        for n in APPENDERS {
            eprintln!("log_bench: log-core: group commit, {n} appenders");
            groups.push(group_commit(&log, n, p.gc_secs).await);
        }
        log.close().await.unwrap();
        let secs = p.gc_secs.as_secs_f64();
        o.say("\n4. log-core group commit: N appenders (tokio_uring::spawn, one thread), each");
        o.say(&format!(
            "   looping append(1 KiB) + wait_flushed, ~{secs:.0} s each. syncs = distinct"
        ));
        o.say("   flush_offset values seen by woken appenders; cpu = this thread's share of wall;");
        o.say(
            "   raw@group = item 2 at a chunk of the average group's bytes, after the log closed",
        );
        o.say(TABLE4);
        for g in &groups {
            // After the log is closed, so its background segment preparation cannot share the disk.
            let chunk = ((g.records as usize * rec_disk) / g.syncs as usize).max(1);
            let raw = seq_sync(&raw, p.bw_file, chunk, p.bw_secs).await.1;
            let rec_s = g.records as f64 / g.secs;
            let (mb_s, disk) = (rec_s * REC as f64 / 1e6, rec_s * rec_disk as f64 / 1e6);
            let (per_sync, syncs_s) = (g.records as f64 / g.syncs as f64, g.syncs as f64 / g.secs);
            let (n, rolls, cpu, l) = (g.appenders, g.rolls, g.cpu * 100.0, pcts(&g.lat));
            let group = format!("{per_sync:.1}/{chunk}");
            let left =
                format!("{n:>6} {rec_s:>9.0} {mb_s:>8.1} {disk:>8.1} {syncs_s:>7.0} {group:>14}");
            let (r_grp, r_mib, p50, p99) = (disk / raw, disk / mib_bw, l[0], l[2]);
            let right = format!("{p50:>8.0} {p99:>8.0} {rolls:>5} {cpu:>3.0}% {raw:>9.1}");
            o.say(&format!("{left} {right} {r_grp:>8.2}x {r_mib:>8.2}x"));
            put! { o, format!("group.{n}"), records_s = rec_s, payload_mb_s = mb_s,
            disk_mb_s = disk, syncs_s = syncs_s, avg_group_records = per_sync,
            avg_group_bytes = chunk, p50_us = p50, p99_us = p99, p999_us = l[3], max_us = l[4],
            segment_rolls = rolls, thread_cpu = g.cpu, raw_at_group_mb_s = raw,
            ratio_to_raw_at_group = r_grp, ratio_to_raw_1mib = r_mib, secs = g.secs }
        }
        o.say(&format!("  raw 1 MiB chunks: {mib_bw:.1} MB/s"));
        raw.close().await.unwrap();
        std::fs::remove_file(&raw_path).unwrap();

        eprintln!("log_bench: mmap read");
        mmap_read(&dir.join("read-log"), p.read_bytes, &mut o).await;
    });
    let total = started.elapsed().as_secs_f64();
    o.num("conditions.total_secs", total);
    if p.json {
        println!("{{{}}}", o.json.join(","));
    } else {
        print!("{}", o.text);
        println!("\ntotal {total:.0} s");
    }
}
