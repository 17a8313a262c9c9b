//! The FUSE side of `csi-fuse-nbd`: one NBD export presented as the file `nbd` on a FUSE
//! mount, with a size that follows the export (unlike nbdfuse, which keeps the size it saw
//! at connect time), so that a loop device on the file can grow online.
//!
//! ```text
//!   loop (direct I/O) ──▶ /dev/fuse ──▶ fuser Session ──▶ ExportFile ──▶ NbdExport ──NBD──▶
//!                                        (decoding,       (this file    (reconnects,       csi-nbd-proxy
//!                                         replies)         system)       resends)          ──▶ blockd
//!                                          ▲
//!     csi-shim: writes WORK/size, stats the file (GETATTR re-reads it), `losetup -c`
//! ```
//!
//! What this module owns:
//! - [`ExportFile`]: the file system (a root directory holding one regular file), written
//!   against the [`fuser`] crate's [`fuser::Filesystem`] trait; fuser decodes the kernel's
//!   requests and encodes the replies, so no FUSE wire layout is written by hand here;
//! - [`Export`]: what the file needs from the block device behind it, with [`NbdExport`]
//!   (the NBD client of [`crate::node::attach::nbd_client`], reconnecting) and
//!   [`MemoryExport`] (a disk in memory, for tests and the fuzz target);
//! - [`serve`]: mounting and the session loop; [`peer`]: a stand-in for the kernel's end
//!   of `/dev/fuse` that drives the same session over a socket pair.
//!
//! Invariants:
//! - the file's size is the size the current NBD connection negotiated; when the size file
//!   names a larger size, GETATTR and LOOKUP reconnect (a fresh handshake learns the grown
//!   size) before answering, so no request ever targets bytes the connection does not
//!   cover: a read past the end is short, a write past the end fails with `ENOSPC`;
//! - attributes are never cached by the kernel (attribute TTL 0), so a `stat` is enough to
//!   publish a new size to the loop driver;
//! - the file is opened with `FOPEN_DIRECT_IO`: no page cache of ours under the loop
//!   device's direct I/O, and FSYNC reaches the export as an NBD flush;
//! - one request at a time, answered in order (one session thread, one NBD connection);
//!   an NBD transport error reconnects and resends (blockd restarts are hidden below us by
//!   csi-nbd-proxy);
//! - at most [`FLUSH_EVERY`] bytes are written between two NBD flushes, so the proxy's
//!   replay journal of unflushed writes stays small and its own flushes never run;
//! - the server exits when its mount goes away (`ENODEV` from `/dev/fuse`).
//!
//! Mounting: fuser's pure-Rust mount (no libfuse, no C dependency) calls mount(2) itself
//! with `fd=…,rootmode=…,user_id=…,group_id=…` options, as csi-fuse-nbd did before. It
//! falls back to the setuid `fusermount` helper only when mount(2) answers `EPERM`;
//! csi-fuse-nbd runs as root (CAP_SYS_ADMIN) next to csi-shim, so the fallback never runs
//! (and `fusermount` is not needed on the node).
//!
//! What fuser (0.18) trusts of the kernel, and the kernel guarantees: the header's `len`
//! equals the bytes read and is at least the header's size (`AnyRequest::try_from` slices
//! `data[40..len]`), a WRITE's `size` and a SETXATTR's value size equal the bytes that
//! follow, and an IOCTL's `in_size` fits the message (each is an `assert!` or a slice in
//! `ll/request.rs`). A message shorter than its opcode's arguments gets an `ENOSYS` reply;
//! one shorter than a header ends the session with an error. The fuzz target
//! (`fuzz/fuzz_targets/fuse_request.rs`) feeds arbitrary requests framed the kernel's way
//! through [`peer`].

mod export;
mod file;
pub mod peer;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use export::{Command, Export, MemoryExport, NbdExport};
pub use file::ExportFile;

/// The name of the one file in the mount.
pub const FILE_NAME: &str = "nbd";
/// The largest READ and WRITE the kernel sends (`max_read` and `max_write`).
pub const MAX_IO: u32 = 1 << 20;
/// Bytes written after which the server flushes on its own (see the module docs).
pub const FLUSH_EVERY: u64 = 32 << 20;

/// What the server serves and where.
#[derive(Debug, Clone)]
pub struct Config {
    pub mount_point: PathBuf,
    pub socket: PathBuf,
    pub export: String,
    /// A file holding the size csi-shim expects (decimal bytes); see the module docs.
    /// Without one, the file keeps the size the first connection saw.
    pub size_file: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
    /// How long to keep reconnecting before failing a request with EIO.
    pub reconnect_timeout: Duration,
}

/// Why the server could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("Cannot open NBD export {export:?} on {}", socket.display())]
    Connect {
        socket: PathBuf,
        export: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "Cannot mount FUSE on {} (csi-fuse-nbd mounts with mount(2) and needs CAP_SYS_ADMIN)",
        mount_point.display()
    )]
    Mount {
        mount_point: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write the pid file {}", path.display())]
    Pidfile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The FUSE session on {} failed", mount_point.display())]
    Session {
        mount_point: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The fuser session configuration: options for mount(2) and the one session thread.
fn session_config() -> fuser::Config {
    use fuser::MountOption;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        // The mount's source in /proc/mounts.
        MountOption::FSName("csi-fuse-nbd".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::CUSTOM(format!("max_read={MAX_IO}")),
    ];
    // The loop driver and csi-shim (root) use the file; `allow_other` also lets a
    // non-root stat it (fuser then checks no caller itself).
    config.acl = fuser::SessionACL::All;
    // One request at a time: there is one NBD connection behind the file.
    config.n_threads = Some(1);
    config
}

/// Mounts the FUSE file system at `cfg.mount_point` and serves until it is unmounted.
pub fn serve(cfg: Config) -> Result<(), FuseError> {
    let export = NbdExport::connect(
        &cfg.socket,
        &cfg.export,
        cfg.size_file.clone(),
        cfg.reconnect_timeout,
    )
    .map_err(|source| FuseError::Connect {
        socket: cfg.socket.clone(),
        export: cfg.export.clone(),
        source,
    })?;
    tracing::info!(
        socket = %cfg.socket.display(),
        export = %cfg.export,
        size = export.size(),
        "NBD export opened"
    );
    // Mounts and completes the INIT handshake with the kernel.
    let session = fuser::Session::new(ExportFile::new(export), &cfg.mount_point, &session_config())
        .map_err(|source| FuseError::Mount {
            mount_point: cfg.mount_point.clone(),
            source,
        })?;
    if let Some(path) = &cfg.pidfile {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|source| {
            FuseError::Pidfile {
                path: path.clone(),
                source,
            }
        })?;
    }
    tracing::info!(mount_point = %cfg.mount_point.display(), "serving");
    session.run().map_err(|source| FuseError::Session {
        mount_point: cfg.mount_point.clone(),
        source,
    })?;
    tracing::info!(mount_point = %cfg.mount_point.display(), "unmounted; exiting");
    Ok(())
}

/// The file this server presents under `mount_point`.
pub fn file_path(mount_point: &Path) -> PathBuf {
    mount_point.join(FILE_NAME)
}
