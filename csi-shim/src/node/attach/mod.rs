//! Attachers: how a blockd export becomes a block device on this node.
//!
//! ```text
//!   blockd ── ublk (blockd serves the device itself) ─────────────────→ /dev/ublkbN
//!   blockd NBD socket ──(csi-nbd-proxy, when installed)──┬─ kernel nbd (netlink) → /dev/nbdN
//!                                                       └─ csi-fuse-nbd (or nbdfuse) → FUSE file
//!                                                            → loop (direct I/O) → /dev/loopN
//! ```
//!
//! - ublk, where the kernel has it (see [`ublk`]): blockd creates and serves the device
//!   itself and recovers it in place after its own restart; csi-shim only asks.
//! - Kernel NBD, configured over generic netlink, where the `nbd` module is loaded (see
//!   [`kernel_nbd`]: several connections per device, online grow, prompt detach, and
//!   reconnect to a new proxy).
//! - fuse-loop everywhere else: a FUSE server presents the export as a file on a private
//!   FUSE mount and `losetup --direct-io=on` turns that file into a loop device. The server
//!   is `csi-fuse-nbd` (see [`crate::fuse`]; its file grows with the export, so volumes
//!   expand online) when installed next to csi-shim, else `nbdfuse` (fixed size).
//!
//! `--attach auto` prefers ublk, then kernel NBD, then fuse-loop, and logs why it chose.
//!
//! Invariants:
//! - every process an attachment needs (nbdfuse, the proxy) runs in its own session
//!   (`setsid`), with its output in a log file, so a restart or SIGKILL of csi-shim leaves
//!   mounted volumes working;
//! - every resource of an attachment lives under one per-volume work directory
//!   (`--state-dir/attach/<volume key>/`), so [`Attacher::detach`] can find and undo a
//!   half-made attachment even when no record of it was written;
//! - [`Attachment`] is the serialisable description stored in the volume's state record.

pub mod fuse_loop;
pub mod kernel_nbd;
pub mod nbd_client;
pub mod nbd_netlink;
pub mod ublk;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{NodeError, Result};
use super::state::file_key;
use crate::config::{Args, AttachMode};
use crate::locks::OpLocks;

/// A live attachment, as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Attachment {
    FuseLoop {
        /// The work directory (FUSE mount point, pid files, logs).
        dir: PathBuf,
        /// The loop device, e.g. `/dev/loop3`.
        device: PathBuf,
        /// The FUSE server's command name (`csi-fuse-nbd` or `nbdfuse`) and pid.
        fuse_server: String,
        fuse_pid: u32,
        /// The reconnecting proxy between nbdfuse and blockd, when one runs.
        proxy_pid: Option<u32>,
        /// The NBD URI nbdfuse serves.
        uri: String,
    },
    KernelNbd {
        /// The work directory (proxy socket and pid file, device index).
        dir: PathBuf,
        index: u32,
        /// `/dev/nbdN`.
        device: PathBuf,
        proxy_pid: Option<u32>,
        /// The NBD socket the kernel was given (the proxy's, or blockd's).
        socket: PathBuf,
    },
    Ublk {
        /// The blockd image the device shows.
        image: String,
        /// `/dev/ublkbN`.
        device: PathBuf,
    },
}

impl Attachment {
    /// The block device a file system or a publication uses.
    pub fn device(&self) -> &Path {
        match self {
            Attachment::FuseLoop { device, .. }
            | Attachment::KernelNbd { device, .. }
            | Attachment::Ublk { device, .. } => device,
        }
    }

    /// Why this attachment cannot serve I/O, if it cannot.
    pub fn problem(&self) -> Option<String> {
        match self {
            Attachment::FuseLoop { .. } => fuse_loop::problem(self),
            Attachment::KernelNbd {
                dir,
                index,
                proxy_pid,
                ..
            } => kernel_nbd::problem(dir, *index, *proxy_pid),
            Attachment::Ublk { device, .. } => ublk::problem(device),
        }
    }
}

/// Which attacher a node uses, resolved from `--attach`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ublk,
    KernelNbd,
    FuseLoop,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ublk => "ublk",
            Kind::KernelNbd => "kernel nbd",
            Kind::FuseLoop => "fuse-loop",
        }
    }
}

/// Whether the kernel `nbd` module is loaded (or built in).
pub fn kernel_nbd_present() -> bool {
    Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists()
}

/// Why kernel NBD cannot be used on this node, if it cannot.
pub fn kernel_nbd_unavailable() -> Option<String> {
    if nbd_netlink::available() {
        return None;
    }
    if !kernel_nbd_present() {
        return Some(
            "the kernel nbd module is not loaded (no /sys/module/nbd, no /dev/nbd0); \
             run `modprobe nbd` or start csi-shim with --attach fuse-loop"
                .to_string(),
        );
    }
    Some(
        "the kernel nbd module is loaded but its generic netlink family does not answer; \
         start csi-shim with --attach fuse-loop"
            .to_string(),
    )
}

/// The attacher `--attach auto` takes: ublk, then kernel NBD, then fuse-loop; and why,
/// for the log.
fn auto_kind(ublk_missing: Option<String>, nbd_missing: Option<String>) -> (Kind, String) {
    match (ublk_missing, nbd_missing) {
        (None, _) => (
            Kind::Ublk,
            "the kernel has ublk (/dev/ublk-control): blockd serves the devices itself and \
             recovers them in place after a restart"
                .to_string(),
        ),
        (Some(no_ublk), None) => (
            Kind::KernelNbd,
            format!("no ublk ({no_ublk}); the kernel nbd module answers"),
        ),
        (Some(no_ublk), Some(no_nbd)) => (
            Kind::FuseLoop,
            format!("no ublk ({no_ublk}); no kernel NBD ({no_nbd})"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_ublk_then_nbd_then_fuse_loop() {
        let no = || Some("missing".to_string());
        assert_eq!(auto_kind(None, None).0, Kind::Ublk);
        assert_eq!(auto_kind(None, no()).0, Kind::Ublk);
        assert_eq!(auto_kind(no(), None).0, Kind::KernelNbd);
        let (kind, why) = auto_kind(no(), no());
        assert_eq!(kind, Kind::FuseLoop);
        assert!(
            why.contains("no ublk") && why.contains("no kernel NBD"),
            "{why}"
        );
    }
}

/// Attaches and detaches volumes for the node service.
#[derive(Debug)]
pub struct Attacher {
    kind: Kind,
    /// Connections per kernel NBD device (`--nbd-connections`).
    nbd_connections: usize,
    /// `--state-dir/attach`: one work directory per volume.
    root: PathBuf,
    /// Helper binaries installed next to csi-shim.
    helpers: fuse_loop::Helpers,
    /// blockd, which attaches ublk devices.
    blockd: crate::blockd::Blockd,
}

impl Attacher {
    pub fn new(args: &Args, blockd: crate::blockd::Blockd) -> Self {
        let kind = match args.attach {
            AttachMode::FuseLoop => Kind::FuseLoop,
            AttachMode::Nbd => Kind::KernelNbd,
            AttachMode::Ublk => Kind::Ublk,
            AttachMode::Auto => {
                let (kind, why) = auto_kind(ublk::unavailable(), kernel_nbd_unavailable());
                tracing::info!(attacher = kind.name(), reason = %why, "--attach auto chose");
                kind
            }
        };
        let beside = |name: &str| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join(name)))
                .filter(|p| p.is_file())
        };
        let helpers = fuse_loop::Helpers {
            proxy: beside("csi-nbd-proxy"),
            fuse_file: beside("csi-fuse-nbd"),
        };
        tracing::info!(proxy = ?helpers.proxy, fuse_file = ?helpers.fuse_file, "attach helpers");
        Attacher {
            kind,
            nbd_connections: args.nbd_connections(),
            root: args.state_dir.join("attach"),
            helpers,
            blockd,
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The work directory of `volume_id`.
    pub fn work_dir(&self, volume_id: &str) -> PathBuf {
        self.root.join(file_key(volume_id))
    }

    /// Whether this node's attacher can attach at all (checked before exporting).
    pub fn check(&self) -> Result<()> {
        match self.kind {
            Kind::FuseLoop => Ok(()),
            Kind::Ublk => match ublk::unavailable() {
                None => Ok(()),
                Some(reason) => Err(NodeError::AttachUnavailable {
                    mode: Kind::Ublk.name(),
                    reason,
                }),
            },
            Kind::KernelNbd => match kernel_nbd_unavailable() {
                None => Ok(()),
                Some(reason) => Err(NodeError::AttachUnavailable {
                    mode: Kind::KernelNbd.name(),
                    reason,
                }),
            },
        }
    }

    /// Attaches blockd image `volume`, exported at `uri`.
    pub async fn attach(&self, volume_id: &str, volume: &str, uri: &str) -> Result<Attachment> {
        match self.kind {
            Kind::Ublk => {
                self.check()?;
                ublk::attach(&self.blockd, volume).await
            }
            Kind::FuseLoop => {
                let dir = self.work_dir(volume_id);
                fuse_loop::attach(&dir, volume, uri, &self.helpers).await
            }
            Kind::KernelNbd => {
                self.check()?;
                let dir = self.work_dir(volume_id);
                kernel_nbd::attach(&dir, volume, uri, &self.helpers, self.nbd_connections).await
            }
        }
    }

    /// Detaches whatever exists for `volume_id`: the recorded attachment and anything
    /// left in its work directory. Idempotent.
    pub async fn detach(&self, volume_id: &str, attachment: Option<&Attachment>) -> Result<()> {
        let dir = match attachment {
            Some(Attachment::FuseLoop { dir, .. } | Attachment::KernelNbd { dir, .. }) => {
                dir.clone()
            }
            Some(Attachment::Ublk { image, .. }) => {
                return ublk::detach(&self.blockd, image).await;
            }
            None => {
                if self.kind == Kind::Ublk {
                    // A stage that crashed before its record: blockd may hold a device.
                    if let Ok(id) = crate::ids::VolumeId::parse(volume_id) {
                        ublk::detach(&self.blockd, &id.volume).await?;
                    }
                }
                self.work_dir(volume_id)
            }
        };
        if dir.join("nbd.index").exists() {
            kernel_nbd::detach(&dir).await
        } else {
            fuse_loop::detach(&dir).await
        }
    }

    /// Makes the device follow the (grown) size of the export; returns the device size.
    pub async fn refresh_size(&self, attachment: &mut Attachment, volume_size: u64) -> Result<u64> {
        match attachment {
            Attachment::FuseLoop { .. } => fuse_loop::refresh_size(attachment, volume_size).await,
            Attachment::KernelNbd {
                dir, index, device, ..
            } => kernel_nbd::refresh_size(dir, *index, device, volume_size).await,
            // blockd resizes its device itself (where the kernel can): report what the
            // device shows, and say so when it lags behind the volume.
            Attachment::Ublk { device, .. } => {
                let size = ublk::device_size(device)?;
                if size < volume_size {
                    return Err(NodeError::OnlineGrowUnsupported {
                        device: device.clone(),
                        device_size: size,
                        volume_size,
                        detail: "this kernel cannot resize a live ublk device \
                                 (UBLK_F_UPDATE_SIZE, Linux 6.16+); unstage and stage the \
                                 volume again to see the new size"
                            .to_string(),
                    });
                }
                Ok(size)
            }
        }
    }

    /// Repairs, in the background, an attachment whose helper died while its device
    /// lives on, without disturbing a file system mounted on it: a kernel NBD device gets a
    /// new proxy and new sockets ([`kernel_nbd::reconnect`]). Runs under the volume's
    /// operation lock (skipped when an operation holds it: that operation repairs or
    /// removes the attachment itself). A fuse-loop attachment cannot be repaired in place
    /// (its loop device holds the dead FUSE file): NodeStageVolume redoes it.
    pub fn spawn_reconnect(&self, locks: &OpLocks, volume_id: &str, attachment: &Attachment) {
        if !matches!(attachment, Attachment::KernelNbd { .. }) {
            return;
        }
        let Ok(guard) = locks.try_lock(volume_id) else {
            return;
        };
        let helpers = self.helpers.clone();
        let attachment = attachment.clone();
        let volume_id = volume_id.to_string();
        tokio::spawn(async move {
            let _guard = guard;
            match kernel_nbd::reconnect(&attachment, &helpers).await {
                Ok(Some(pid)) => tracing::info!(volume_id, proxy_pid = pid, "volume reconnected"),
                Ok(None) => {}
                Err(err) => tracing::warn!(
                    volume_id,
                    error = %err,
                    "cannot reconnect the volume; NodeStageVolume repairs it, NodeUnstageVolume removes it"
                ),
            }
        });
    }
}
