//! NodeExpandVolume: grows the attachment to the volume's new size and the file system
//! on it, online.

use std::path::PathBuf;

use super::error::{NodeError, Result};
use super::state::Access;
use super::{fs, NodeService};
use crate::ids::VolumeId;

impl NodeService {
    pub(super) async fn expand(
        &self,
        id: &VolumeId,
        path: PathBuf,
        required: u64,
        requested_block: Option<bool>,
    ) -> Result<u64> {
        let mut record = self.record_at(id, &path)?;
        let is_block = record.capability.access == Access::Block;
        if requested_block.is_some_and(|b| b != is_block) {
            return Err(NodeError::BadCapability(
                "access type differs from the one the volume was staged with",
            ));
        }
        let volume_size = self.blockd_volume_size(id).await?;
        if required > volume_size {
            return Err(NodeError::CapacityOutOfRange {
                volume_id: id.to_string(),
                required,
                available: volume_size,
            });
        }
        let size = self
            .attacher
            .refresh_size(&mut record.attachment, volume_size)
            .await?;
        if let Access::Mount { fs_type, .. } = &record.capability.access {
            fs::grow(record.attachment.device(), &record.staging_path, fs_type).await?;
        }
        self.save(&record)?;
        tracing::info!(volume_id = %id, size_bytes = size, "expanded");
        Ok(size)
    }
}
