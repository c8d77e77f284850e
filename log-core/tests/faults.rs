//! Fatal I/O errors (R5): a failed write or fdatasync stops the log for good; nothing unflushed
//! is ever reported durable; reopening re-validates from disk and keeps what was flushed.
//! Injected errors need the `fault-injection` feature (the test command enables all features);
//! the disk-full test uses a real, size-capped tmpfs when run as root.

mod common;

use common::{payload, read_all, small_config};
use log_core::{Epoch, Error, Log, Offset};

#[cfg(feature = "fault-injection")]
#[test]
fn fdatasync_error_is_fatal_and_never_retried() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let a = log.try_append(Epoch(1), &[b"durable"]).unwrap();
        log.wait_flushed(a.next).await.unwrap();
        log_core::fault::inject(dir.path(), "fdatasync", 0);
        let b = log.try_append(Epoch(1), &[b"never acknowledged"]).unwrap();
        let waited = log.wait_flushed(b.next).await;
        assert!(matches!(waited, Err(Error::Failed { .. })), "{waited:?}");
        assert_eq!(
            log.flush_offset(),
            a.next,
            "the failed flush did not advance flush_offset"
        );
        // Every later call fails the same way: no retry could report the record durable.
        assert!(matches!(
            log.try_append(Epoch(1), &[b"more"]),
            Err(Error::Failed { .. })
        ));
        assert!(matches!(
            log.wait_flushed(b.next).await,
            Err(Error::Failed { .. })
        ));
        assert!(matches!(
            log.truncate_after(a.next).await,
            Err(Error::Failed { .. })
        ));
        assert!(matches!(log.close().await, Err(Error::Failed { .. })));
        // Reopening re-validates from disk; the flushed record is there.
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(read_all(&log, Offset(0))[0].1, b"durable");
        log.close().await.unwrap();
    });
}

#[cfg(feature = "fault-injection")]
#[test]
fn write_error_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    tokio_uring::start(async {
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        log_core::fault::inject(dir.path(), "write", 3);
        let mut last = Ok(());
        for i in 0..10u64 {
            match log.append(Epoch(1), &[payload(1, i, 10)]).await {
                Ok(a) => last = log.wait_written(a.next).await,
                Err(e) => {
                    last = Err(e);
                    break;
                }
            }
        }
        assert!(matches!(last, Err(Error::Failed { .. })), "{last:?}");
        assert_eq!(log.end_offset(), Offset(3));
        let _ = log.close().await;
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert!(log.end_offset() >= Offset(3));
        log.close().await.unwrap();
    });
}

/// A real ENOSPC: the log's directory on a 256 KiB tmpfs. Zero-filling a segment (in the
/// background, or at a roll) or writing a sealed segment's index runs out of space; the log
/// fails loudly, and what was flushed before survives a reopen.
#[test]
fn disk_full_fails_the_log_without_losing_flushed_data() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: mounting a tmpfs needs root");
        return;
    }
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("full");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs");
    let dir = mnt.join("log");
    let result = std::panic::catch_unwind(|| {
        tokio_uring::start(async {
            let log = Log::open(&dir, small_config()).await.unwrap();
            let mut flushed = Offset(0);
            let mut failure = None;
            for i in 0..2000u64 {
                let r = match log.append(Epoch(1), &[payload(2, i, 500)]).await {
                    Ok(a) => log.wait_flushed(a.next).await.map(|()| a.next),
                    Err(e) => Err(e),
                };
                match r {
                    Ok(next) => flushed = next,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let failure = failure.expect("a 256 KiB file system filled up");
            // Most of the space held flushed records, not zeros prepared far ahead of them
            // (each batch is 48 + 4 + 500 bytes).
            assert!(flushed.0 * 552 >= 128 * 1024, "{flushed}");
            assert!(matches!(failure, Error::Failed { .. }), "{failure}");
            assert!(flushed > Offset(0));
            let _ = log.close().await;
            // Reopen (recovery removes the half-prepared segment): every flushed record is intact.
            let log = Log::open(&dir, small_config()).await.unwrap();
            let got = read_all(&log, Offset(0));
            assert!(got.len() as u64 >= flushed.0);
            for (o, v) in got {
                assert_eq!(v, payload(2, o, 500));
            }
            log.close().await.unwrap();
        })
    });
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
