//! Marks a process as an I/O flusher (`prctl(PR_SET_IO_FLUSHER)`, Linux 5.6+): csi-nbd-proxy
//! and csi-fuse-nbd sit in the write-back path of the devices they serve, so memory
//! reclaim may wait on writes that only they can complete.
//!
//! ```text
//!  reclaim ─▶ write back dirty pages of /dev/nbdN ─▶ kernel nbd ─▶ csi-nbd-proxy ─▶ blockd
//!                                                                  └ allocates memory ┘
//! ```
//!
//! Without the flag, an allocation in the proxy under memory pressure may itself enter
//! reclaim and wait for write-back to the very device it serves: a deadlock. The flag
//! (`PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE`) makes the kernel reclaim for this process
//! without starting I/O and exempts it from the dirty throttling of others' write-back.
//!
//! Invariants and choices:
//! - the flag belongs to a thread and is inherited by threads created after it is set, so
//!   [`become_io_flusher`] runs first in `main`, before the async runtime starts threads;
//! - it needs `CAP_SYS_RESOURCE`; without it (an unprivileged container, a test machine)
//!   the process logs a warning and runs on: it works, with the deadlock risk above under
//!   memory pressure;
//! - no `mlockall`: it would pin every mapping the process ever makes (tokio's buffers,
//!   stacks, the 64 MiB replay journal) and turn allocation failures into crashes, to
//!   protect against paging in our own code, which comes from the root file system and
//!   never waits on the devices we serve. Swap on a blockd volume is not supported.
//!
//! This is duplicated, deliberately small, in blockd's `main` (csi-shim never links blockd).

use std::io;

/// `PR_SET_IO_FLUSHER` from `linux/prctl.h` (the libc crate defines it for Android only).
const PR_SET_IO_FLUSHER: libc::c_int = 57;
/// `PR_GET_IO_FLUSHER`.
const PR_GET_IO_FLUSHER: libc::c_int = 58;

/// Sets `PR_SET_IO_FLUSHER` on the calling thread (and threads it creates afterwards).
pub fn set() -> io::Result<()> {
    // SAFETY: prctl(2) with integer arguments only; no memory is passed or retained.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the calling thread is an I/O flusher (`None`: the kernel does not say).
pub fn get() -> Option<bool> {
    // SAFETY: prctl(2) with integer arguments only; no memory is passed or retained.
    let rc = unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0 as libc::c_ulong, 0, 0, 0) };
    (rc >= 0).then_some(rc == 1)
}

/// [`set`], logging the outcome; failure is a warning, never fatal. Call it before any
/// thread is started.
pub fn become_io_flusher(process: &str) {
    match set() {
        Ok(()) => tracing::info!(process, "running as an I/O flusher (PR_SET_IO_FLUSHER)"),
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => tracing::warn!(
            process,
            "cannot set PR_SET_IO_FLUSHER without CAP_SYS_RESOURCE; continuing: under \
             memory pressure, reclaim may wait on write-back through this process"
        ),
        Err(err) => tracing::warn!(
            process,
            error = %err,
            "cannot set PR_SET_IO_FLUSHER (Linux 5.6 or later has it); continuing"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_either_works_or_is_refused_cleanly() {
        // Run on a thread of its own: the flag would stay on the test harness's thread.
        std::thread::spawn(|| match set() {
            Ok(()) => assert_eq!(get(), Some(true)),
            Err(err) => {
                assert!(
                    matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)),
                    "{err}"
                );
                assert_ne!(get(), Some(true));
            }
        })
        .join()
        .unwrap();
    }
}
