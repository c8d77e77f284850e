//! `replog-bench durable`'s second table: the same durable writes through the two io_uring
//! runtimes a node could be built on, tokio-uring (what log-core uses, beside quinn on tokio)
//! and glommio (its own rings, DMA files), one write at a time into pre-written files.
//!
//! - tokio-uring `write+fdatasync`: `File::write_at` then `File::sync_data`, log-core's path;
//! - tokio-uring `O_DIRECT|O_DSYNC write`: one aligned write to a file opened with both;
//! - glommio `buffered write+fdatasync`: `BufferedFile::write_at` then `fdatasync`;
//! - glommio `DMA write+fdatasync`: `DmaFile::write_at` (O_DIRECT) then `fdatasync`;
//! - glommio `DMA O_DSYNC write`: `DmaFile::write_at` on a file opened with `O_DSYNC` too.

use std::path::Path;
use std::time::Instant;

use crate::durable::{file_path, prewritten, Punts, Row};
use crate::hist::{self, Summary};

/// What one runtime does to make a write durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    TokioUringWriteFdatasync,
    TokioUringDirectDsync,
    GlommioBufferedWriteFdatasync,
    GlommioDmaWriteFdatasync,
    GlommioDmaDsync,
}

impl Way {
    pub const ALL: [Way; 5] = [
        Way::TokioUringWriteFdatasync,
        Way::TokioUringDirectDsync,
        Way::GlommioBufferedWriteFdatasync,
        Way::GlommioDmaWriteFdatasync,
        Way::GlommioDmaDsync,
    ];

    pub fn runtime(self) -> &'static str {
        match self {
            Way::TokioUringWriteFdatasync | Way::TokioUringDirectDsync => "tokio-uring 0.5",
            _ => "glommio 0.9",
        }
    }

    /// Flags the file is opened with (glommio opens its files itself).
    fn open_flags(self) -> i32 {
        match self {
            Way::TokioUringDirectDsync => libc::O_DIRECT | libc::O_DSYNC,
            _ => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Way::TokioUringWriteFdatasync => "write+fdatasync",
            Way::TokioUringDirectDsync => "O_DIRECT|O_DSYNC write",
            Way::GlommioBufferedWriteFdatasync => "buffered write+fdatasync",
            Way::GlommioDmaWriteFdatasync => "DMA write+fdatasync",
            Way::GlommioDmaDsync => "DMA O_DSYNC write",
        }
    }
}

/// What one way measured: per-write latencies (ns) and the time over the measured writes.
struct Timed {
    hist: hdrhistogram::Histogram<u64>,
    secs: f64,
    punted: Option<u64>,
}

/// `samples` writes of `block` bytes after `warmup` unmeasured ones, at consecutive positions.
/// `write(i)` makes write `i` durable.
async fn timed<F, Fut>(
    warmup: usize,
    samples: usize,
    punts: Option<&Punts>,
    mut write: F,
) -> Result<Timed, String>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut h = hist::new();
    let mut started = Instant::now();
    for i in 0..warmup + samples {
        if i == warmup {
            if let Some(p) = punts {
                p.clear();
            }
            started = Instant::now();
        }
        let t = Instant::now();
        write(i).await?;
        if i >= warmup {
            hist::record(&mut h, t.elapsed().as_nanos() as u64);
        }
    }
    Ok(Timed {
        hist: h,
        secs: started.elapsed().as_secs_f64(),
        punted: punts.map(|p| p.count()),
    })
}

fn tokio_uring_way(
    std_file: std::fs::File,
    way: Way,
    block: usize,
    warmup: usize,
    samples: usize,
    punts: Option<&Punts>,
) -> Result<Timed, String> {
    tokio_uring::start(async {
        let file = tokio_uring::fs::File::from_std(std_file);
        // An aligned buffer, handed back and forth between writes.
        let buf = std::cell::RefCell::new(Some(crate::durable::Aligned::new(block)));
        let out = timed(warmup, samples, punts, |i| {
            let b = buf.borrow_mut().take().expect("the buffer is back");
            let (file, buf) = (&file, &buf);
            async move {
                let (res, b) = file.write_all_at(b, (i * block) as u64).await;
                *buf.borrow_mut() = Some(b);
                res.map_err(|e| format!("write: {e}"))?;
                if way == Way::TokioUringWriteFdatasync {
                    file.sync_data()
                        .await
                        .map_err(|e| format!("fdatasync: {e}"))?;
                }
                Ok(())
            }
        })
        .await;
        let _ = file.close().await;
        out
    })
}

fn glommio_way(
    path: &Path,
    way: Way,
    block: usize,
    warmup: usize,
    samples: usize,
    punts: Option<&Punts>,
) -> Result<Timed, String> {
    use glommio::io::{BufferedFile, OpenOptions};
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .map_err(|e| format!("glommio executor: {e}"))?;
    ex.run(async move {
        match way {
            Way::GlommioBufferedWriteFdatasync => {
                let file: BufferedFile = OpenOptions::new()
                    .write(true)
                    .buffered_open(path)
                    .await
                    .map_err(|e| format!("glommio open: {e}"))?;
                let out = timed(warmup, samples, punts, |i| {
                    let file = &file;
                    async move {
                        file.write_at(vec![0xA5; block], (i * block) as u64)
                            .await
                            .map_err(|e| format!("glommio write: {e}"))?;
                        file.fdatasync()
                            .await
                            .map_err(|e| format!("glommio fdatasync: {e}"))
                    }
                })
                .await;
                let _ = file.close().await;
                out
            }
            _ => {
                let mut o = OpenOptions::new();
                o.write(true);
                if way == Way::GlommioDmaDsync {
                    o.custom_flags(libc::O_DSYNC);
                }
                let file = o
                    .dma_open(path)
                    .await
                    .map_err(|e| format!("glommio open: {e}"))?;
                let out = timed(warmup, samples, punts, |i| {
                    let file = &file;
                    async move {
                        let mut buf = file.alloc_dma_buffer(block);
                        buf.as_bytes_mut().fill(0xA5);
                        file.write_at(buf, (i * block) as u64)
                            .await
                            .map_err(|e| format!("glommio write: {e}"))?;
                        if way == Way::GlommioDmaWriteFdatasync {
                            file.fdatasync()
                                .await
                                .map_err(|e| format!("glommio fdatasync: {e}"))?;
                        }
                        Ok(())
                    }
                })
                .await;
                let _ = file.close().await;
                out
            }
        }
    })
}

/// Measure `way` in a new pre-written file in `dir`.
pub fn measure(
    dir: &Path,
    way: Way,
    block: usize,
    warmup: usize,
    samples: usize,
    punts: Option<&Punts>,
) -> Result<Row, String> {
    let path = file_path(dir, &format!("{}-{}", way.runtime(), way.name()));
    let file = prewritten(&path, (warmup + samples) * block, way.open_flags());
    let timed = file.and_then(|file| match way {
        Way::TokioUringWriteFdatasync | Way::TokioUringDirectDsync => {
            tokio_uring_way(file, way, block, warmup, samples, punts)
        }
        _ => {
            drop(file);
            glommio_way(&path, way, block, warmup, samples, punts)
        }
    });
    let _ = std::fs::remove_file(&path);
    let t = timed?;
    Ok(Row {
        runtime: way.runtime().to_string(),
        mode: way.name().to_string(),
        forced_async: false,
        latency: Summary::of(&t.hist),
        writes_per_sec: samples as f64 / t.secs,
        io_wq_per_write: t.punted.map(|p| p as f64 / samples as f64),
    })
}
