//! ublk attachments: blockd itself serves the volume as `/dev/ublkbN`.
//!
//! csi-shim only asks (blockd.v1 `AttachUblk` / `DetachUblk`); blockd creates the
//! device, serves its queues from the engine with io_uring, records the attachment, and
//! recovers the device in place after its own restart (`UBLK_F_USER_RECOVERY`), so a
//! mounted file system rides through a blockd restart with no helper process on this
//! side: no proxy, no reconnect.

use std::path::{Path, PathBuf};

use blockd_proto::v1::{AttachUblkRequest, DetachUblkRequest};
use tonic::Code;

use super::Attachment;
use crate::blockd::{upstream, Blockd};
use crate::node::error::{NodeError, Result};

/// The ublk driver's control device.
const CONTROL: &str = "/dev/ublk-control";

/// Why ublk cannot be used on this node, if it cannot.
pub fn unavailable() -> Option<String> {
    if Path::new(CONTROL).exists() {
        return None;
    }
    Some(format!(
        "no {CONTROL}: the ublk_drv module is not loaded (Linux 6.0 or later: `modprobe ublk_drv`)"
    ))
}

/// Asks blockd to attach `image`; idempotent.
pub async fn attach(blockd: &Blockd, image: &str) -> Result<Attachment> {
    let resp = blockd
        .exports()
        .attach_ublk(AttachUblkRequest {
            image: image.to_string(),
        })
        .await
        .map_err(|s| NodeError::Blockd(upstream(&format!("attaching {image} as ublk"), s)))?
        .into_inner();
    let device = resp.device.map(|d| d.device).unwrap_or_default();
    if device.is_empty() {
        return Err(NodeError::Blockd(tonic::Status::internal(format!(
            "blockd attached {image} as ublk but named no device"
        ))));
    }
    let device = PathBuf::from(device);
    wait_for_node(&device).await;
    Ok(Attachment::Ublk {
        image: image.to_string(),
        device,
    })
}

/// Asks blockd to detach `image`; idempotent (a missing image is detached already).
pub async fn detach(blockd: &Blockd, image: &str) -> Result<()> {
    match blockd
        .exports()
        .detach_ublk(DetachUblkRequest {
            image: image.to_string(),
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::NotFound => Ok(()),
        Err(status) => Err(NodeError::Blockd(upstream(
            &format!("detaching {image} from ublk"),
            status,
        ))),
    }
}

/// Why the device cannot serve I/O, if it cannot (its node is gone).
pub fn problem(device: &Path) -> Option<String> {
    if device.exists() {
        None
    } else {
        Some(format!(
            "{} does not exist (blockd recovers it at start; is blockd running?)",
            device.display()
        ))
    }
}

/// The device's size in bytes, from sysfs.
pub fn device_size(device: &Path) -> Result<u64> {
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = PathBuf::from(format!("/sys/block/{name}/size"));
    let text = std::fs::read_to_string(&path).map_err(|source| NodeError::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    let sectors: u64 = text.trim().parse().unwrap_or(0);
    Ok(sectors * 512)
}

/// Waits (briefly) for udev or devtmpfs to make the device node.
async fn wait_for_node(device: &Path) {
    for _ in 0..100 {
        if device.exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
