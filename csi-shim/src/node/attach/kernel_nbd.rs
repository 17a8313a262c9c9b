//! The kernel NBD attacher: the export, through csi-nbd-proxy, handed to the kernel's
//! `nbd` driver over generic netlink (the netlink client is [`super::nbd_netlink`]).
//!
//! ```text
//!   WORK/proxy.sock ◀── csi-nbd-proxy --exit-after-disconnect ──▶ blockd
//!        ▲ N × handshake (NBD_OPT_GO), then NBD_CMD_CONNECT with the N sockets ──▶ /dev/nbdX
//!   WORK/nbd.index     the device index, so detach finds it without a record
//!   WORK/upstream.json blockd's socket, the export and N, so reconnect can redo the proxy
//! ```
//!
//! - **Connections**: N sockets per device (one blk-mq queue and one kernel receive worker
//!   each) when blockd advertises `NBD_FLAG_CAN_MULTI_CONN`, else 1. The proxy serves each
//!   as its own client with its own upstream connection; its journal rules already cover
//!   several connections of one export.
//! - **Grow**: [`refresh_size`] sends `NBD_CMD_RECONFIGURE` with the new size; the kernel
//!   resizes the live device, and blockd serves offsets past the size a connection
//!   negotiated once the export has grown (see `blockd::nbd::server`), so the kernel's
//!   existing connections carry the new range.
//! - **Detach**: `NBD_CMD_DISCONNECT` makes the kernel send `NBD_CMD_DISC` on every
//!   connection; the proxy (started with `--exit-after-disconnect`) exits when the last one
//!   has gone, so detach waits milliseconds, not the seconds of a signal escalation.
//! - **Reconnect**: when the proxy is gone (its container restarted), the device keeps its
//!   queued I/O for the dead-connection timeout; [`reconnect`] starts a new proxy and hands
//!   the kernel fresh sockets with `NBD_CMD_RECONFIGURE`, and the mounted file system
//!   never sees an error.
//!
//! Invariants: the kernel holds the only references to the NBD sockets once connected, so
//! csi-shim can restart freely; the proxy hides blockd restarts from the kernel (the
//! kernel's timeouts are longer than the proxy's reconnect window, see
//! [`super::nbd_netlink`]); [`detach`] works from the work directory alone.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fuse_loop::{self, Helpers};
use super::{nbd_netlink, Attachment};
use crate::node::error::{NodeError, Result};
use crate::node::fs;
use crate::proxy::wire::{self, ExportInfo};

/// How long the handshakes of an attach may take (blockd has just exported the volume).
const ATTACH_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the handshakes of a reconnect may take: blockd may be starting too (a pod
/// restart), and the new proxy answers only once blockd does.
const RECONNECT_HANDSHAKE_TIMEOUT: Duration = crate::proxy::DEFAULT_RECONNECT_TIMEOUT;
/// How long detach gives the proxy to exit by itself after the disconnect before
/// signalling it (it exits within milliseconds of the kernel's `NBD_CMD_DISC`).
const PROXY_EXIT_GRACE: Duration = Duration::from_millis(500);

fn index_file(dir: &Path) -> PathBuf {
    dir.join("nbd.index")
}

fn upstream_file(dir: &Path) -> PathBuf {
    dir.join("upstream.json")
}

/// The device's `NBD_ATTR_BACKEND_IDENTIFIER`: the work directory, unique per volume and
/// per csi-shim state directory, so that the kernel refuses a reconfiguration of a device
/// that serves something else (an index reused after a reboot).
fn backend_of(dir: &Path) -> String {
    dir.display().to_string()
}

/// What [`reconnect`] needs to start the proxy again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Upstream {
    /// blockd's NBD socket.
    socket: PathBuf,
    export: String,
    /// Connections the device was made with.
    connections: usize,
}

fn netlink(context: &str, err: nbd_netlink::NetlinkError) -> NodeError {
    NodeError::io(context.to_string(), std::io::Error::other(err.to_string()))
}

fn joined(context: &str, err: tokio::task::JoinError) -> NodeError {
    NodeError::io(context.to_string(), std::io::Error::other(err))
}

/// Attaches `volume` (exported at `uri`) as `/dev/nbdX` with up to `connections` sockets.
pub async fn attach(
    dir: &Path,
    volume: &str,
    uri: &str,
    helpers: &Helpers,
    connections: usize,
) -> Result<Attachment> {
    detach(dir).await?;
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::io(format!("Creating {}", dir.display()), e))?;
    let upstream = fuse_loop::socket_of(uri).ok_or_else(|| {
        NodeError::io(
            format!("blockd returned export URI {uri:?} without a socket"),
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        )
    })?;
    let result = async {
        let (socket, proxy_pid) = match &helpers.proxy {
            Some(binary) => {
                let pid = fuse_loop::start_proxy(dir, binary, &upstream, volume, true).await?;
                (dir.join("proxy.sock"), Some(pid))
            }
            None => (upstream.clone(), None),
        };
        let export = volume.to_string();
        let sock_path = socket.clone();
        let backend = backend_of(dir);
        let (index, connections) = tokio::task::spawn_blocking(move || -> Result<_> {
            let (socks, info) =
                open_connections(&sock_path, &export, connections, ATTACH_HANDSHAKE_TIMEOUT)?;
            let n = socks.len();
            let index = nbd_netlink::connect(socks, &nbd_netlink::params_for(&info, &backend))
                .map_err(|e| netlink("NBD_CMD_CONNECT", e))?;
            Ok((index, n))
        })
        .await
        .map_err(|e| joined("Attaching through netlink", e))??;
        write_state(
            dir,
            index,
            &Upstream {
                socket: upstream.clone(),
                export: volume.to_string(),
                connections,
            },
        )?;
        tracing::info!(index, connections, volume, "nbd device connected");
        Ok(Attachment::KernelNbd {
            dir: dir.to_path_buf(),
            index,
            device: nbd_netlink::device_path(index),
            proxy_pid,
            socket,
        })
    }
    .await;
    if result.is_err() {
        if let Err(cleanup) = detach(dir).await {
            tracing::warn!(dir = %dir.display(), error = %cleanup, "cleanup after a failed attach failed");
        }
    }
    result
}

fn write_state(dir: &Path, index: u32, upstream: &Upstream) -> Result<()> {
    let json = serde_json::to_vec(upstream).map_err(|e| {
        NodeError::io(
            format!("Encoding {}", upstream_file(dir).display()),
            e.into(),
        )
    })?;
    std::fs::write(upstream_file(dir), json)
        .map_err(|e| NodeError::io(format!("Writing {}", upstream_file(dir).display()), e))?;
    std::fs::write(index_file(dir), format!("{index}\n"))
        .map_err(|e| NodeError::io(format!("Writing {}", index_file(dir).display()), e))
}

/// Opens up to `wanted` connections to `socket` and runs the handshake on each; fewer
/// (one) when the export does not allow several. Blocking.
fn open_connections(
    socket: &Path,
    export: &str,
    wanted: usize,
    timeout: Duration,
) -> Result<(Vec<OwnedFd>, ExportInfo)> {
    let connect = || -> Result<(OwnedFd, ExportInfo)> {
        let mut stream = UnixStream::connect(socket)
            .map_err(|e| NodeError::io(format!("Connecting to {}", socket.display()), e))?;
        let info = nbd_netlink::handshake_within(&mut stream, export, timeout)
            .map_err(|e| netlink("NBD handshake", e))?;
        Ok((OwnedFd::from(stream), info))
    };
    let (first, info) = connect()?;
    let n = connection_count(wanted, info.flags);
    let mut socks = vec![first];
    while socks.len() < n {
        let (sock, more) = connect()?;
        if more.size != info.size || more.flags != info.flags {
            return Err(NodeError::io(
                format!("Connecting to {}", socket.display()),
                std::io::Error::other(format!(
                    "the export changed between two handshakes (size {} -> {}, flags \
                     {:#x} -> {:#x})",
                    info.size, more.size, info.flags, more.flags
                )),
            ));
        }
        socks.push(sock);
    }
    Ok((socks, info))
}

/// How many connections a device gets: `wanted` (at least 1, at most the kernel's limit)
/// when the server allows several, else 1.
fn connection_count(wanted: usize, server_flags: u16) -> usize {
    if server_flags & wire::NBD_FLAG_CAN_MULTI_CONN == 0 {
        1
    } else {
        wanted.clamp(1, nbd_netlink::MAX_CONNECTIONS)
    }
}

/// Disconnects the device named in the work directory, stops the proxy, removes the
/// directory. Idempotent.
pub async fn detach(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let started = Instant::now();
    if let Some(index) = read_index(dir) {
        let connected = tokio::task::spawn_blocking(move || nbd_netlink::status(index))
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten()
            .unwrap_or(false);
        if connected {
            tokio::task::spawn_blocking(move || nbd_netlink::disconnect(index))
                .await
                .map_err(|e| joined("Disconnecting", e))?
                .map_err(|e| netlink("NBD_CMD_DISCONNECT", e))?;
            tracing::info!(index, "nbd device disconnected");
        }
    }
    // The proxy exits by itself once the kernel's NBD_CMD_DISC reached it; signal it only
    // if it does not (a device that never connected, a kernel whose DISC got lost).
    fuse_loop::stop_proxy(dir, PROXY_EXIT_GRACE).await;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(NodeError::io(format!("Removing {}", dir.display()), e)),
    }
    tracing::debug!(
        dir = %dir.display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "kernel nbd attachment removed"
    );
    Ok(())
}

fn read_index(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(index_file(dir))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
}

/// Makes device `index` (attached from work directory `dir`) at least `volume_size`
/// bytes, online (`NBD_CMD_RECONFIGURE`); returns the device size.
pub async fn refresh_size(dir: &Path, index: u32, device: &Path, volume_size: u64) -> Result<u64> {
    let read_size = |device: &Path| {
        fs::device_size(device)
            .map_err(|e| NodeError::io(format!("Reading the size of {}", device.display()), e))
    };
    let before = read_size(device)?;
    if before >= volume_size {
        return Ok(before);
    }
    let backend = backend_of(dir);
    tokio::task::spawn_blocking(move || nbd_netlink::resize(index, &backend, volume_size))
        .await
        .map_err(|e| joined("Resizing", e))?
        .map_err(|e| NodeError::OnlineGrowUnsupported {
            device: device.to_path_buf(),
            device_size: before,
            volume_size,
            detail: format!("the kernel refused NBD_CMD_RECONFIGURE with the new size: {e}"),
        })?;
    let after = read_size(device)?;
    if after < volume_size {
        return Err(NodeError::OnlineGrowUnsupported {
            device: device.to_path_buf(),
            device_size: after,
            volume_size,
            detail: "the kernel accepted the new size but the device did not grow".to_string(),
        });
    }
    tracing::info!(index, before, after, "nbd device resized");
    Ok(after)
}

/// Gives a connected device whose proxy is gone a new proxy and new sockets
/// (`NBD_CMD_RECONFIGURE`), so queued and new I/O continue; returns the new proxy's pid.
/// `Ok(None)` when there is nothing to do: the proxy runs, or the attachment has none.
/// The device keeps its index and the new proxy writes its pid file, which [`problem`]
/// reads, so the attachment record stays valid as it is.
pub async fn reconnect(attachment: &Attachment, helpers: &Helpers) -> Result<Option<u32>> {
    let Attachment::KernelNbd {
        dir,
        index,
        proxy_pid,
        ..
    } = attachment
    else {
        return Err(NodeError::BadCapability("not a kernel nbd attachment"));
    };
    let (Some(recorded), Some(binary)) = (*proxy_pid, helpers.proxy.as_ref()) else {
        return Ok(None);
    };
    let old_pid = live_proxy_pid(dir, recorded);
    if fuse_loop::process_is(old_pid, PROXY) {
        return Ok(None);
    }
    let index = *index;
    let connected = tokio::task::spawn_blocking(move || nbd_netlink::status(index))
        .await
        .map_err(|e| joined("Querying the device", e))?
        .map_err(|e| netlink("NBD_CMD_STATUS", e))?;
    if connected != Some(true) {
        return Err(NodeError::io(
            format!("Reconnecting /dev/nbd{index}"),
            std::io::Error::other("the device is not connected; NodeStageVolume attaches it again"),
        ));
    }
    let state = std::fs::read(upstream_file(dir))
        .map_err(|e| NodeError::io(format!("Reading {}", upstream_file(dir).display()), e))?;
    let upstream: Upstream = serde_json::from_slice(&state).map_err(|e| {
        NodeError::io(
            format!("Reading {}", upstream_file(dir).display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    let pid = fuse_loop::start_proxy(dir, binary, &upstream.socket, &upstream.export, true).await?;
    let socket = dir.join("proxy.sock");
    let backend = backend_of(dir);
    let export = upstream.export.clone();
    let wanted = upstream.connections;
    let done = tokio::task::spawn_blocking(move || -> Result<usize> {
        let (socks, _) = open_connections(&socket, &export, wanted, RECONNECT_HANDSHAKE_TIMEOUT)?;
        let n = socks.len();
        nbd_netlink::reconfigure(index, &backend, socks)
            .map_err(|e| netlink("NBD_CMD_RECONFIGURE", e))?;
        Ok(n)
    })
    .await
    .map_err(|e| joined("Reconnecting through netlink", e))
    .and_then(|r| r);
    match done {
        Ok(connections) => {
            tracing::info!(
                index,
                connections,
                proxy_pid = pid,
                old_proxy_pid = old_pid,
                "nbd device reconnected to a new proxy"
            );
            Ok(Some(pid))
        }
        Err(err) => {
            fuse_loop::stop_proxy(dir, Duration::ZERO).await;
            Err(err)
        }
    }
}

const PROXY: &str = "csi-nbd-proxy";

/// The proxy's pid: its pid file's (a proxy started by [`reconnect`]) or the recorded one.
fn live_proxy_pid(dir: &Path, recorded: u32) -> u32 {
    std::fs::read_to_string(dir.join("proxy.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(recorded)
}

/// Why the device (attached from `dir`) cannot serve I/O, if it cannot.
pub fn problem(dir: &Path, index: u32, proxy_pid: Option<u32>) -> Option<String> {
    match nbd_netlink::status(index) {
        Ok(Some(true)) => {}
        Ok(_) => return Some(format!("/dev/nbd{index} is not connected")),
        Err(e) => return Some(format!("cannot query /dev/nbd{index}: {e}")),
    }
    if let Some(recorded) = proxy_pid {
        let pid = live_proxy_pid(dir, recorded);
        if !fuse_loop::process_is(pid, PROXY) {
            return Some(format!(
                "csi-nbd-proxy (pid {pid}) is not running; see {}",
                dir.join("proxy.log").display()
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_connections_only_where_the_server_allows_them() {
        let multi = wire::NBD_FLAG_HAS_FLAGS | wire::NBD_FLAG_CAN_MULTI_CONN;
        assert_eq!(connection_count(4, multi), 4);
        assert_eq!(connection_count(0, multi), 1);
        assert_eq!(connection_count(1000, multi), nbd_netlink::MAX_CONNECTIONS);
        assert_eq!(connection_count(4, wire::NBD_FLAG_HAS_FLAGS), 1);
    }

    #[test]
    fn the_work_directory_says_how_to_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Upstream {
            socket: "/run/blockd/nbd.sock".into(),
            export: "pvc-1".into(),
            connections: 2,
        };
        write_state(dir.path(), 7, &upstream).unwrap();
        assert_eq!(read_index(dir.path()), Some(7));
        let back: Upstream =
            serde_json::from_slice(&std::fs::read(upstream_file(dir.path())).unwrap()).unwrap();
        assert_eq!(back, upstream);
    }

    #[tokio::test]
    async fn reconnect_leaves_a_running_or_absent_proxy_alone() {
        let dir = tempfile::tempdir().unwrap();
        let attachment = Attachment::KernelNbd {
            dir: dir.path().to_path_buf(),
            index: 3,
            device: "/dev/nbd3".into(),
            proxy_pid: None,
            socket: "/run/blockd/nbd.sock".into(),
        };
        let helpers = Helpers {
            proxy: Some("/nonexistent/csi-nbd-proxy".into()),
            fuse_file: None,
        };
        assert_eq!(reconnect(&attachment, &helpers).await.unwrap(), None);
        // A proxy whose pid file names a live process with the proxy's name would be left
        // alone too; here the pid file names this test process, which is not the proxy,
        // so a reconnect is attempted: it stops at the device, which is not connected.
        std::fs::write(
            dir.path().join("proxy.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let Attachment::KernelNbd {
            dir: d,
            index,
            device,
            socket,
            ..
        } = attachment
        else {
            unreachable!()
        };
        let attachment = Attachment::KernelNbd {
            dir: d,
            index,
            device,
            proxy_pid: Some(u32::MAX),
            socket,
        };
        assert_eq!(live_proxy_pid(dir.path(), u32::MAX), std::process::id());
        assert!(reconnect(&attachment, &helpers).await.is_err());
    }
}
