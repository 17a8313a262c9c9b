//! NodeStageVolume and NodeUnstageVolume: export, attach, make the file system when the
//! device is blank, mount at the staging path; and the reverse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blockd_proto::v1::{ExportRequest, GetVolumeRequest};
use tonic::Code;

use super::capability::stage_compatible;
use super::error::{NodeError, Result};
use super::state::{Access, Capability, Phase, StagedVolume};
use super::{fs, mount, NodeService};
use crate::blockd::found;
use crate::ids::VolumeId;

impl NodeService {
    pub(super) async fn blockd_volume_size(&self, id: &VolumeId) -> Result<u64> {
        match self
            .driver
            .blockd
            .volumes()
            .get_volume(GetVolumeRequest {
                name: id.volume.clone(),
            })
            .await
        {
            Ok(volume) => Ok(volume.into_inner().size_bytes),
            Err(status) if status.code() == Code::NotFound => Err(NodeError::VolumeNotFound {
                volume_id: id.to_string(),
            }),
            Err(status) => Err(NodeError::Blockd(crate::blockd::upstream(
                &format!("looking up volume {}", id.volume),
                status,
            ))),
        }
    }

    /// Whether a staged volume is fully in place: attachment healthy and, for a file
    /// system, the device mounted at the staging path.
    pub(super) fn stage_intact(&self, record: &StagedVolume) -> Result<bool> {
        if record.phase != Phase::Staged || record.attachment.problem().is_some() {
            return Ok(false);
        }
        match record.capability.access {
            Access::Block => Ok(record.attachment.device().exists()),
            Access::Mount { .. } => Ok(mount::mount_at(&record.staging_path)?
                .is_some_and(|m| Path::new(&m.source) == record.attachment.device())),
        }
    }

    /// Unmounts the staging path (when our device is mounted there) and detaches.
    pub(super) async fn teardown(&self, record: &StagedVolume) -> Result<()> {
        if let Some(entry) = mount::mount_at(&record.staging_path)? {
            if Path::new(&entry.source) == record.attachment.device() {
                mount::unmount(&record.staging_path).await?;
                tracing::info!(volume_id = %record.volume_id, staging_path = %record.staging_path.display(), "unmounted");
            }
        }
        self.attacher
            .detach(&record.volume_id, Some(&record.attachment))
            .await
    }

    pub(super) async fn stage(
        &self,
        id: &VolumeId,
        staging: PathBuf,
        requested: Capability,
    ) -> Result<()> {
        let volume_id = id.to_string();
        if let Some(record) = self.record(&volume_id) {
            if record.staging_path != staging {
                return Err(NodeError::StagedElsewhere {
                    volume_id,
                    staged: record.staging_path,
                    requested: staging,
                });
            }
            if !stage_compatible(&record.capability, &requested) {
                return Err(NodeError::IncompatibleStage {
                    volume_id,
                    path: staging,
                    staged: record.capability.to_string(),
                    requested: requested.to_string(),
                });
            }
            if self.stage_intact(&record)? {
                tracing::info!(volume_id = %volume_id, "already staged");
                return Ok(());
            }
            tracing::warn!(volume_id = %volume_id, "staged volume is incomplete or broken; staging it again");
            self.teardown(&record).await?;
            self.forget(&volume_id)?;
        }

        self.blockd_volume_size(id).await?;
        self.attacher.check()?;
        let export = self
            .driver
            .blockd
            .exports()
            .export(ExportRequest {
                image: id.volume.clone(),
            })
            .await
            .map_err(|s| {
                NodeError::Blockd(crate::blockd::upstream(
                    &format!("exporting volume {}", id.volume),
                    s,
                ))
            })?
            .into_inner();
        let attachment = match self
            .attacher
            .attach(&volume_id, &id.volume, &export.uri)
            .await
        {
            Ok(attachment) => attachment,
            Err(err) => {
                if export.changed {
                    // We exported it for this stage: take the export back.
                    // force: the only client was the attachment that just failed.
                    let _ = self.driver.blockd.unexport(&id.volume, true).await;
                }
                return Err(err);
            }
        };
        tracing::info!(volume_id = %volume_id, device = %attachment.device().display(), uri = %export.uri, "attached");
        let mut record = StagedVolume {
            volume_id: volume_id.clone(),
            volume: id.volume.clone(),
            staging_path: staging,
            capability: requested,
            attachment,
            phase: Phase::Attached,
            published: BTreeMap::new(),
        };
        self.save(&record)?;

        match self.finish_stage(&mut record).await {
            Ok(()) => {
                record.phase = Phase::Staged;
                self.save(&record)
            }
            Err(err) => {
                // Leave nothing half-made behind; the CO retries the whole stage.
                match self.teardown(&record).await {
                    Ok(()) => self.forget(&volume_id)?,
                    Err(cleanup) => tracing::error!(
                        volume_id = %volume_id,
                        error = %cleanup,
                        "cleanup after a failed stage failed; NodeUnstageVolume retries it"
                    ),
                }
                Err(err)
            }
        }
    }

    /// mkfs (when blank) and mount, for a file-system volume; nothing for block.
    pub(super) async fn finish_stage(&self, record: &mut StagedVolume) -> Result<()> {
        let Access::Mount {
            fs_type,
            mount_flags,
        } = record.capability.access.clone()
        else {
            return Ok(());
        };
        let device = record.attachment.device().to_path_buf();
        let fs_name = match fs::probe(&device).await? {
            fs::Content::Blank => {
                let fs = fs::FsType::parse(&fs_type)?;
                tracing::info!(volume_id = %record.volume_id, device = %device.display(), fs_type = fs.name(), "blank volume: creating a file system");
                fs::mkfs(&device, fs).await?;
                fs.name().to_string()
            }
            fs::Content::Fs(found) => {
                if !fs_type.is_empty() && found != fs_type {
                    return Err(NodeError::FsMismatch {
                        volume_id: record.volume_id.clone(),
                        found,
                        requested: fs_type,
                    });
                }
                if found == "ext4" {
                    // A volume restored or cloned into a larger size: grow ext4 before
                    // mounting (offline resize needs no CAP_SYS_RESOURCE).
                    fs::grow_ext4_offline(&device).await?;
                }
                found
            }
            fs::Content::Other(found) => {
                return Err(NodeError::FsMismatch {
                    volume_id: record.volume_id.clone(),
                    found,
                    requested: fs::FsType::parse(&fs_type)?.name().to_string(),
                })
            }
        };
        std::fs::create_dir_all(&record.staging_path)
            .map_err(|e| NodeError::io(format!("Creating {}", record.staging_path.display()), e))?;
        let mut options = mount_flags.clone();
        if fs_name == "xfs" && !options.iter().any(|o| o == "nouuid") {
            // Clones of one volume share a UUID; XFS refuses the second mount without this.
            options.push("nouuid".to_string());
        }
        mount::mount(&device, &record.staging_path, &fs_name, &options).await?;
        tracing::info!(volume_id = %record.volume_id, staging_path = %record.staging_path.display(), fs_type = %fs_name, "mounted");
        if fs_name == "xfs" {
            let fs_bytes = mount::statvfs(&record.staging_path)
                .map(|st| st.f_blocks * st.f_frsize)
                .unwrap_or(u64::MAX);
            let device_bytes = fs::device_size(&device).unwrap_or(0);
            // xfs keeps its log inside the data section: compare with some slack.
            if device_bytes > fs_bytes.saturating_add(fs::GROW_SLACK) {
                fs::grow(&device, &record.staging_path, "xfs").await?;
            }
        }
        record.capability.access = Access::Mount {
            fs_type: fs_name,
            mount_flags,
        };
        Ok(())
    }

    pub(super) async fn unstage(&self, id: &VolumeId, staging: PathBuf) -> Result<()> {
        let volume_id = id.to_string();
        let Some(mut record) = self.record(&volume_id) else {
            // Not staged: clean up whatever a crashed stage may have left.
            return self.attacher.detach(&volume_id, None).await;
        };
        if record.staging_path != staging {
            tracing::info!(volume_id = %volume_id, staged = %record.staging_path.display(), requested = %staging.display(), "not staged at this path");
            return Ok(());
        }
        let mut still = Vec::new();
        for target in record.published.keys() {
            if mount::mount_at(target)?.is_some() {
                still.push(target.clone());
            }
        }
        if !still.is_empty() {
            return Err(NodeError::StillPublished {
                volume_id,
                targets: still,
            });
        }
        self.teardown(&record).await?;
        record.published.clear();
        record.phase = Phase::Attached;
        // force: teardown has just unmounted and detached this node's own client (kernel
        // NBD proxy or nbdfuse). blockd may not have seen its connection close yet, and
        // would refuse a plain unexport for it; any other client of a volume the CO is
        // unstaging has lost its claim to it.
        let unexported = self.driver.blockd.unexport(&id.volume, true).await;
        // On failure, keep the record: the retry finds nothing mounted or attached and
        // unexports again.
        found(unexported, || {
            format!("unexporting volume {} (local cleanup is done)", id.volume)
        })
        .map_err(NodeError::Blockd)?;
        self.forget(&volume_id)?;
        tracing::info!(volume_id = %volume_id, "unstaged");
        Ok(())
    }
}
