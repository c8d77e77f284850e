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

/// Sequential fdatasync'd writes of one chunk size.
struct Bw {
    label: String,
    chunk: usize,
    ops: u64,
    secs: f64,
}

impl Bw {
    fn mb_s(&self) -> f64 {
        (self.ops * self.chunk as u64) as f64 / self.secs / 1e6
    }
}

struct Group {
    appenders: usize,
    records: u64,
    syncs: u64,
    secs: f64,
    rolls: usize,
    lat: Histogram<u64>,
    raw: Option<Bw>,
}

/// Item 5: `rows` are (name, GB/s through `log.read`, GB/s over a Vec of the same bytes).
struct Read {
    bytes: usize,
    batches: usize,
    fill_mb_s: f64,
    rows: [(&'static str, f64, f64); 3],
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

/// Item 1: 4 KiB write_all_at + sync_data at queue depth 1, sequential, in one file preparation.
async fn floor(dir: &Path, mode: &str, warmup: usize, samples: usize) -> Histogram<u64> {
    let path = dir.join(format!("floor-{mode}"));
    let len = ((warmup + samples) * 4 * KIB) as u64;
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
    let mut buf = vec![0xA5u8; 4 * KIB];
    let mut h = hist();
    for i in 0..warmup + samples {
        let t = Instant::now();
        buf = write_sync(&file, buf, (i * 4 * KIB) as u64).await;
        if i >= warmup {
            h.saturating_record(ns(t));
        }
    }
    file.close().await.unwrap();
    std::fs::remove_file(&path).unwrap();
    h
}

/// Items 2 and 4: `chunk`-byte writes, each followed by fdatasync, going sequentially round a
/// pre-written file of `len` bytes for `dur` (at least 10 timed writes).
async fn seq_sync(file: &File, len: u64, chunk: usize, dur: Duration, label: String) -> Bw {
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
    let (ops, secs) = (ops - 3, t.elapsed().as_secs_f64());
    Bw {
        label,
        chunk,
        ops,
        secs,
    }
}

/// Open a fresh log, then wait for the segment it prepares in the background right after open
/// (zero-fill + fsync, as long again as the first one open awaited) so it does not disturb the
/// measurement that follows.
async fn open_log(dir: &Path) -> Log {
    let t = Instant::now();
    let log = Log::open(dir, LogConfig::default()).await.unwrap();
    tokio::time::sleep(t.elapsed() * 3 / 2 + Duration::from_millis(200)).await;
    log
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
    let segments = log.segment_count();
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
    Group {
        appenders: n,
        records: records.get(),
        syncs: syncs.get().0.max(1),
        secs: start.elapsed().as_secs_f64(),
        rolls: log.segment_count() - segments,
        lat: lat.replace(hist()),
        raw: None,
    }
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
async fn mmap_read(dir: &Path, total: usize) -> Read {
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
    Read {
        bytes,
        batches,
        fill_mb_s,
        rows: [
            (
                "u64 sum, 1st pass (faults)",
                bytes as f64 / cold / 1e9,
                mem_sum,
            ),
            ("u64 sum, best of 3", sum, mem_sum),
            ("crc32c, best of 3", crc_gb_s, mem_crc),
        ],
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

/// A JSON string literal.
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Three decimals are plenty, and keep the JSON readable.
fn r(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `obj! { "key": value, .. }`: one JSON object; each value must Display as JSON already.
macro_rules! obj {
    ($($k:literal: $v:expr),* $(,)?) => {
        format!("{{{}}}", [$(format!("\"{}\":{}", $k, $v)),*].join(","))
    };
}

fn lat_json(h: &Histogram<u64>) -> String {
    let p = pcts(h).map(r);
    obj! {
        "samples": h.len(), "p50_us": p[0], "p90_us": p[1], "p99_us": p[2], "p999_us": p[3],
        "max_us": p[4]
    }
}

fn lat_row(name: &str, h: &Histogram<u64>) -> String {
    let p = pcts(h);
    let cols: String = p.iter().map(|v| format!(" {v:>9.1}")).collect();
    format!("  {name:<12}{cols}")
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
    let kernel = kernel.trim();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rec_disk = encoded_len(&[[0u8; REC]]);
    let started = Instant::now();

    let out = tokio_uring::start(async {
        let mut floors = Vec::new();
        for mode in ["prewritten", "growing", "fallocated"] {
            eprintln!("log_bench: floor: 4 KiB write+fdatasync, {mode} file");
            floors.push((mode, floor(&dir, mode, p.warmup, p.samples).await));
        }

        eprintln!("log_bench: raw sequential fdatasync'd bandwidth");
        let raw_path = dir.join("raw-bandwidth");
        let raw = File::create(&raw_path).await.unwrap();
        prewrite(&raw, p.bw_file).await;
        let mut bws = Vec::new();
        for (label, kib) in RAW_CHUNKS {
            bws.push(seq_sync(&raw, p.bw_file, kib * KIB, p.bw_secs, label.into()).await);
        }

        eprintln!("log_bench: log-core: single append + flush latency");
        let log = open_log(&dir.join("log")).await;
        let single = log_latency(&log, p.warmup, p.samples).await;
        let mut groups = Vec::new();
        for n in APPENDERS {
            eprintln!("log_bench: log-core: group commit, {n} appenders");
            groups.push(group_commit(&log, n, p.gc_secs).await);
        }
        log.close().await.unwrap();
        // Raw runs at the observed group sizes come after the log is closed, so its background
        // segment preparation cannot share the disk with them.
        for g in &mut groups {
            let chunk = ((g.records as usize * rec_disk) / g.syncs as usize).max(1);
            let label = format!("{chunk} B");
            g.raw = Some(seq_sync(&raw, p.bw_file, chunk, p.bw_secs, label).await);
        }
        raw.close().await.unwrap();
        std::fs::remove_file(&raw_path).unwrap();

        eprintln!("log_bench: mmap read");
        let read = mmap_read(&dir.join("read-log"), p.read_bytes).await;
        (floors, bws, single, groups, read)
    });
    let (floors, bws, single, groups, read) = out;
    let total_secs = started.elapsed().as_secs_f64();
    let ratio = pcts(&single)[0] / pcts(&floors[0].1)[0];
    let verdict = if ratio <= 1.2 {
        "met".to_string()
    } else {
        format!("MISSED by {:.0}%", (ratio / 1.2 - 1.0) * 100.0)
    };
    let mib_bw = bws[1].mb_s();
    // (records/s, payload MB/s, disk MB/s, avg group records, raw MB/s at the group size)
    let gstats = |g: &Group| {
        let rec_s = g.records as f64 / g.secs;
        let raw = g.raw.as_ref().unwrap().mb_s();
        let per_sync = g.records as f64 / g.syncs as f64;
        let disk = rec_s * rec_disk as f64 / 1e6;
        (rec_s, rec_s * REC as f64 / 1e6, disk, per_sync, raw)
    };

    if p.json {
        let floors_js = floors
            .iter()
            .map(|(m, h)| format!("{}:{}", q(m), lat_json(h)));
        let bw_js = bws.iter().map(|b| {
            obj! {
                "label": q(&b.label), "chunk_bytes": b.chunk, "ops": b.ops, "secs": r(b.secs),
                "mb_s": r(b.mb_s()), "ops_s": r(b.ops as f64 / b.secs)
            }
        });
        let gc_js = groups.iter().map(|g| {
            let (rec_s, mb_s, disk, per_sync, raw) = gstats(g);
            obj! {
                "appenders": g.appenders, "records": g.records, "secs": r(g.secs),
                "records_s": r(rec_s), "payload_mb_s": r(mb_s), "disk_mb_s": r(disk),
                "fdatasyncs": g.syncs, "avg_group_records": r(per_sync),
                "avg_group_bytes": g.raw.as_ref().unwrap().chunk, "segment_rolls": g.rolls,
                "latency": lat_json(&g.lat), "raw_at_group_mb_s": r(raw),
                "ratio_to_raw_at_group": r(disk / raw), "ratio_to_raw_1mib": r(disk / mib_bw)
            }
        });
        let conditions = obj! {
            "dir": q(&dir.display().to_string()), "fs": q(&fs), "kernel": q(kernel), "cpus": cpus,
            "quick": p.quick, "record_bytes": REC, "record_disk_bytes": rec_disk,
            "total_secs": r(total_secs)
        };
        let rows = read.rows.map(|(name, log, mem)| {
            obj! { "touch": q(name), "log_gb_s": r(log), "memory_gb_s": r(mem), "ratio": r(log / mem) }
        });
        let mmap = obj! {
            "bytes": read.bytes, "batches": read.batches, "fill_mb_s": r(read.fill_mb_s),
            "read_bytes_max": MIB, "passes": format!("[{}]", rows.join(","))
        };
        println!(
            "{}",
            obj! {
                "conditions": conditions,
                "floor_4k_qd1": format!("{{{}}}", floors_js.collect::<Vec<_>>().join(",")),
                "raw_seq_fdatasync": format!("[{}]", bw_js.collect::<Vec<_>>().join(",")),
                "append_flush_latency": lat_json(&single), "append_ratio_to_floor_p50": r(ratio),
                "append_ratio_target": 1.2,
                "group_commit": format!("[{}]", gc_js.collect::<Vec<_>>().join(",")),
                "mmap_read": mmap
            }
        );
        return;
    }

    let hdr = "                     p50       p90       p99     p99.9       max";
    let quick = if p.quick { ", --quick" } else { "" };
    println!(
        "log_bench  ({total_secs:.0} s{quick})\n  dir     {}\n  fs      {fs}",
        dir.display()
    );
    println!("  kernel  {kernel}, {cpus} CPUs; MB = 1e6 B, GB = 1e9 B, latencies in µs\n");
    println!("1. Raw floor: 4 KiB write_all_at + sync_data, QD1, sequential ({} samples after {} warm-up)\n{hdr}", p.samples, p.warmup);
    for (mode, h) in &floors {
        println!("{}", lat_row(mode, h));
    }
    println!(
        "\n2. Raw sequential write + fdatasync into a pre-written {} MiB file (~{:.1} s each)",
        p.bw_file >> 20,
        p.bw_secs.as_secs_f64()
    );
    println!("  chunk            ops/s      MB/s   records/s");
    for b in &bws {
        let ops_s = b.ops as f64 / b.secs;
        let recs = b.label.split_once(" x ").map_or("-".into(), |(n, _)| {
            format!("{:.0}", ops_s * n.parse::<f64>().unwrap())
        });
        let mb_s = b.mb_s();
        println!("  {:<12} {ops_s:>9.1} {mb_s:>9.1} {recs:>11}", b.label);
    }
    println!("\n3. log-core: try_append(1 x {REC} B) + wait_flushed(next), one at a time ({} samples after {} warm-up)\n{hdr}", p.samples, p.warmup);
    println!("{}", lat_row("append+flush", &single));
    println!("  p50 ratio to floor (prewritten) p50: {ratio:.2}x  (target <= 1.2x: {verdict})\n");
    println!("4. log-core group commit: N appenders on one thread, each append 1 KiB + wait_flushed, ~{:.0} s each", p.gc_secs.as_secs_f64());
    println!(
        "   disk MB/s counts {rec_disk} B per record (batch header + length prefix + payload);"
    );
    println!(
        "   fdatasyncs = distinct flush_offset values seen by woken appenders; raw@group = item 2"
    );
    println!("   at a chunk of the average group's bytes, measured after the log was closed");
    println!("     N     rec/s     MB/s diskMB/s syncs/s    group rec/B   p50 µs   p99 µs rolls raw@group ÷raw@grp ÷raw1MiB");
    for g in &groups {
        let (rec_s, mb_s, disk, per_sync, raw) = gstats(g);
        let l = pcts(&g.lat);
        let group = format!("{per_sync:.1}/{}", g.raw.as_ref().unwrap().chunk);
        println!(
            "  {:>4} {rec_s:>9.0} {mb_s:>8.1} {disk:>8.1} {:>7.0} {group:>14} {:>8.0} {:>8.0} {:>5} {raw:>9.1} {:>7.2}x {:>7.2}x",
            g.appenders, g.syncs as f64 / g.secs, l[0], l[2], g.rolls, disk / raw, disk / mib_bw
        );
    }
    println!("  raw 1 MiB chunks: {mib_bw:.1} MB/s\n");
    println!(
        "5. mmap read: log.read({} KiB at a time) over {} MiB in {} batches of 1..64 KiB records (filled at {:.0} MB/s, flushed)",
        MIB / KIB, read.bytes >> 20, read.batches, read.fill_mb_s
    );
    println!("  touch every byte with                log GB/s Vec GB/s   ratio");
    for (name, log, mem) in read.rows {
        println!("  {name:<36} {log:>8.2} {mem:>8.2} {:>6.2}x", log / mem);
    }
}
