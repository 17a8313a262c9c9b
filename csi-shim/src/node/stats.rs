//! NodeGetVolumeStats: usage of the file system or the device, and the volume condition
//! (attachment health and an I/O probe that bypasses the page cache).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use blockd_proto::csi::{volume_usage, NodeGetVolumeStatsResponse, VolumeCondition, VolumeUsage};

use super::error::{NodeError, Result};
use super::state::Access;
use super::{fs, mount, NodeService};
use crate::ids::VolumeId;

/// How long the I/O probe of NodeGetVolumeStats may take before the volume is abnormal.
const IO_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl NodeService {
    pub(super) async fn stats(
        &self,
        id: &VolumeId,
        path: PathBuf,
    ) -> Result<NodeGetVolumeStatsResponse> {
        let record = self.record_at(id, &path)?;
        if !path.exists() {
            return Err(NodeError::UnknownPath {
                volume_id: id.to_string(),
                path,
            });
        }
        let device = record.attachment.device().to_path_buf();
        let mut problem = record.attachment.problem();
        let mut usage = Vec::new();
        match record.capability.access {
            Access::Mount { .. } => {
                match mount::mount_at(&path)? {
                    Some(m) if Path::new(&m.source) == device => {}
                    Some(m) => {
                        problem.get_or_insert(format!(
                            "{} shows {} mounted, not {}",
                            path.display(),
                            m.source,
                            device.display()
                        ));
                    }
                    None => {
                        problem.get_or_insert(format!(
                            "{} is no longer a mount point",
                            path.display()
                        ));
                    }
                }
                if problem.is_none() {
                    match mount::statvfs(&path) {
                        Ok(st) => {
                            let frsize = st.f_frsize;
                            let bytes = |blocks: u64| clamp(blocks.saturating_mul(frsize));
                            usage.push(VolumeUsage {
                                total: bytes(st.f_blocks),
                                available: bytes(st.f_bavail),
                                used: bytes(st.f_blocks.saturating_sub(st.f_bfree)),
                                unit: volume_usage::Unit::Bytes as i32,
                            });
                            usage.push(VolumeUsage {
                                total: clamp(st.f_files),
                                available: clamp(st.f_ffree),
                                used: clamp(st.f_files.saturating_sub(st.f_ffree)),
                                unit: volume_usage::Unit::Inodes as i32,
                            });
                        }
                        Err(e) => {
                            problem.get_or_insert(format!("statvfs {}: {e}", path.display()));
                        }
                    }
                }
            }
            Access::Block => match fs::device_size(&path) {
                Ok(size) => usage.push(VolumeUsage {
                    total: clamp(size),
                    unit: volume_usage::Unit::Bytes as i32,
                    ..Default::default()
                }),
                Err(e) => {
                    problem.get_or_insert(format!("reading the size of {}: {e}", path.display()));
                }
            },
        }
        if problem.is_none() {
            problem = probe_io(&device).await.err();
        }
        let volume_condition = Some(match problem {
            None => VolumeCondition {
                abnormal: false,
                message: format!("attached at {} and serving I/O", device.display()),
            },
            Some(message) => {
                tracing::warn!(volume_id = %id, problem = %message, "volume abnormal");
                VolumeCondition {
                    abnormal: true,
                    message,
                }
            }
        });
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition,
        })
    }
}

pub(super) fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads the first 4 KiB of `device`, bypassing the page cache, within a timeout.
async fn probe_io(device: &Path) -> std::result::Result<(), String> {
    let device = device.to_path_buf();
    let shown = device.display().to_string();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&device)?;
        // O_DIRECT wants an aligned buffer: take the aligned 4 KiB inside 8 KiB.
        let mut buf = vec![0u8; 8192];
        let offset = buf.as_ptr().align_offset(4096);
        file.read_exact_at(&mut buf[offset..offset + 4096], 0)
    });
    match tokio::time::timeout(IO_PROBE_TIMEOUT, read).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(format!("reading {shown} failed: {e}")),
        Ok(Err(e)) => Err(format!("reading {shown} failed: {e}")),
        Err(_) => Err(format!(
            "reading {shown} did not finish within {IO_PROBE_TIMEOUT:?}"
        )),
    }
}
