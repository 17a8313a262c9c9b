//! NodePublishVolume and NodeUnpublishVolume: bind mounts of the staged file system, or of
//! the raw device onto a file, read-only where asked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blockd_proto::csi::volume_capability::access_mode::Mode;

use super::capability::publish_compatible;
use super::error::{NodeError, Result};
use super::state::{Access, Capability, Phase, Publication, StagedVolume};
use super::{mount, NodeService};
use crate::ids::VolumeId;

impl NodeService {
    pub(super) async fn publish(
        &self,
        id: &VolumeId,
        staging: PathBuf,
        target: PathBuf,
        requested: Capability,
        readonly: bool,
    ) -> Result<()> {
        let volume_id = id.to_string();
        let Some(mut record) = self.record(&volume_id) else {
            // Tell "does not exist" from "not staged here".
            self.blockd_volume_size(id).await?;
            return Err(NodeError::NotStaged { volume_id });
        };
        if record.staging_path != staging || record.phase != Phase::Staged {
            return Err(NodeError::NotStaged { volume_id });
        }
        if !publish_compatible(&record.capability, &requested) {
            return Err(NodeError::CapabilityMismatch {
                volume_id,
                staged: record.capability.to_string(),
                requested: requested.to_string(),
            });
        }
        let publication = Publication {
            capability: requested.clone(),
            readonly,
        };
        let device = record.attachment.device().to_path_buf();
        let source = match record.capability.access {
            Access::Block => device.clone(),
            Access::Mount { .. } => record.staging_path.clone(),
        };
        if let Some(existing) = record.published.get(&target) {
            if *existing != publication {
                return Err(NodeError::IncompatiblePublish {
                    volume_id,
                    target,
                    published: format!("{} readonly={}", existing.capability, existing.readonly),
                    requested: format!("{requested} readonly={readonly}"),
                });
            }
            if mount::mount_at(&target)?.is_some_and(|m| Path::new(&m.source) == device) {
                return Ok(());
            }
        }
        // Publications whose mount disappeared no longer count.
        let mut live = BTreeMap::new();
        for (path, p) in std::mem::take(&mut record.published) {
            if path == target || mount::mount_at(&path)?.is_some() {
                live.insert(path, p);
            }
        }
        record.published = live;
        if requested.mode != Mode::SingleNodeMultiWriter.as_str_name() {
            if let Some(other) = record.published.keys().find(|p| **p != target) {
                return Err(NodeError::SingleWriter {
                    volume_id,
                    other: other.clone(),
                    mode: requested.mode.clone(),
                });
            }
        }

        let read_only = readonly || requested.mode == Mode::SingleNodeReaderOnly.as_str_name();
        match record.capability.access {
            Access::Block => {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .map_err(|e| {
                        NodeError::io(format!("Creating device file {}", target.display()), e)
                    })?;
            }
            Access::Mount { .. } => std::fs::create_dir_all(&target)
                .map_err(|e| NodeError::io(format!("Creating {}", target.display()), e))?,
        }
        if mount::mount_at(&target)?.is_some() {
            // Something else (a stale mount) sits there: replace it.
            mount::unmount(&target).await?;
        }
        mount::bind(&source, &target, read_only).await?;
        tracing::info!(volume_id = %volume_id, target = %target.display(), read_only, "published");
        record.published.insert(target, publication);
        self.save(&record)
    }

    pub(super) async fn unpublish(&self, id: &VolumeId, target: PathBuf) -> Result<()> {
        let volume_id = id.to_string();
        mount::unmount(&target).await?;
        let removed = match std::fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        removed.map_err(|e| NodeError::io(format!("Removing {}", target.display()), e))?;
        if let Some(mut record) = self.record(&volume_id) {
            if record.published.remove(&target).is_some() {
                self.save(&record)?;
            }
        }
        tracing::info!(volume_id = %volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    /// The record of a volume known at `path` (its staging path or a target).
    pub(super) fn record_at(&self, id: &VolumeId, path: &Path) -> Result<StagedVolume> {
        let volume_id = id.to_string();
        let record = self
            .record(&volume_id)
            .ok_or_else(|| NodeError::UnknownPath {
                volume_id: volume_id.clone(),
                path: path.to_path_buf(),
            })?;
        if record.staging_path != path && !record.published.contains_key(path) {
            return Err(NodeError::UnknownPath {
                volume_id,
                path: path.to_path_buf(),
            });
        }
        Ok(record)
    }
}
