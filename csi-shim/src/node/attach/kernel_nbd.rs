//! The kernel NBD attacher: the export, through csi-nbd-proxy, handed to the kernel's
//! `nbd` driver over generic netlink (the netlink client is [`super::nbd_netlink`]).
//!
//! ```text
//!   WORK/proxy.sock ◀── csi-nbd-proxy ──▶ blockd
//!        ▲ handshake (NBD_OPT_GO), then NBD_CMD_CONNECT with the socket ──▶ /dev/nbdN
//!   WORK/nbd.index   the device index, so detach finds it without a record
//! ```
//!
//! Invariants: the kernel holds the only reference to the NBD socket once connected, so
//! csi-shim can restart freely; the proxy hides blockd restarts from the kernel (its dead
//! connection timeout is longer than the proxy's reconnect window); [`detach`] works from
//! the work directory alone.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::fuse_loop::{self, Helpers};
use super::{nbd_netlink, Attachment};
use crate::node::error::{NodeError, Result};
use crate::node::fs;

fn index_file(dir: &Path) -> PathBuf {
    dir.join("nbd.index")
}

fn netlink(context: &str, err: nbd_netlink::NetlinkError) -> NodeError {
    NodeError::io(context.to_string(), std::io::Error::other(err.to_string()))
}

/// Attaches `volume` (exported at `uri`) as `/dev/nbdN`.
pub async fn attach(dir: &Path, volume: &str, uri: &str, helpers: &Helpers) -> Result<Attachment> {
    detach(dir).await?;
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::io(format!("Creating {}", dir.display()), e))?;
    let upstream = fuse_loop::socket_of(uri).ok_or_else(|| {
        NodeError::io(
            format!("blockd returned export URI {uri:?} without a socket"),
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        )
    })?;
    let (socket, proxy_pid) = match &helpers.proxy {
        Some(binary) => {
            let pid = fuse_loop::start_proxy(dir, binary, &upstream, volume).await?;
            (dir.join("proxy.sock"), Some(pid))
        }
        None => (upstream, None),
    };
    let export = volume.to_string();
    let sock_path = socket.clone();
    let connected = tokio::task::spawn_blocking(move || -> Result<u32> {
        let mut stream = UnixStream::connect(&sock_path)
            .map_err(|e| NodeError::io(format!("Connecting to {}", sock_path.display()), e))?;
        let info = nbd_netlink::handshake(&mut stream, &export)
            .map_err(|e| netlink("NBD handshake", e))?;
        let block_size = nbd_netlink::kernel_block_size(&info);
        nbd_netlink::connect(OwnedFd::from(stream), info.size, info.flags, block_size)
            .map_err(|e| netlink("NBD_CMD_CONNECT", e))
    })
    .await
    .map_err(|e| NodeError::io("Attaching through netlink", std::io::Error::other(e)));
    let index = match connected {
        Ok(Ok(index)) => index,
        Ok(Err(err)) | Err(err) => {
            let _ = detach(dir).await;
            return Err(err);
        }
    };
    std::fs::write(index_file(dir), format!("{index}\n"))
        .map_err(|e| NodeError::io(format!("Writing {}", index_file(dir).display()), e))?;
    Ok(Attachment::KernelNbd {
        dir: dir.to_path_buf(),
        index,
        device: nbd_netlink::device_path(index),
        proxy_pid,
        socket,
    })
}

/// Disconnects the device named in the work directory, stops the proxy, removes the
/// directory. Idempotent.
pub async fn detach(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let index = std::fs::read_to_string(index_file(dir))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if let Some(index) = index {
        let connected = tokio::task::spawn_blocking(move || nbd_netlink::status(index))
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten()
            .unwrap_or(false);
        if connected {
            tokio::task::spawn_blocking(move || nbd_netlink::disconnect(index))
                .await
                .map_err(|e| NodeError::io("Disconnecting", std::io::Error::other(e)))?
                .map_err(|e| netlink("NBD_CMD_DISCONNECT", e))?;
            tracing::info!(index, "nbd device disconnected");
        }
    }
    fuse_loop::stop_proxy(dir).await;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::io(format!("Removing {}", dir.display()), e)),
    }
}

/// The device size after a grow; the kernel learns a new size only through a
/// reconfiguration the netlink client does not offer yet.
pub fn refresh_size(device: &Path, volume_size: u64) -> Result<u64> {
    let size = fs::device_size(device)
        .map_err(|e| NodeError::io(format!("Reading the size of {}", device.display()), e))?;
    if size < volume_size {
        return Err(NodeError::OnlineGrowUnsupported {
            device: device.to_path_buf(),
            device_size: size,
            volume_size,
            detail: "the kernel NBD attacher cannot resize a connected device yet; \
                     unstage and stage the volume to pick up the new size"
                .to_string(),
        });
    }
    Ok(size)
}

/// Why the device cannot serve I/O, if it cannot.
pub fn problem(index: u32, proxy_pid: Option<u32>) -> Option<String> {
    match nbd_netlink::status(index) {
        Ok(Some(true)) => {}
        Ok(_) => return Some(format!("/dev/nbd{index} is not connected")),
        Err(e) => return Some(format!("cannot query /dev/nbd{index}: {e}")),
    }
    if let Some(pid) = proxy_pid {
        if !fuse_loop::process_is(pid, "csi-nbd-proxy") {
            return Some(format!("csi-nbd-proxy (pid {pid}) is not running"));
        }
    }
    None
}
