//! The CSI Node service: stage (export + attach + mkfs when blank + mount), publish (bind
//! mounts of the staged file system or of the raw device), stats with volume condition,
//! online expansion, node info.
//!
//! ```text
//!   NodeStageVolume    blockd Export ─▶ attach (attach/) ─▶ blkid -p ─▶ mkfs if blank ─▶ mount STAGING
//!   NodePublishVolume  mount --bind STAGING TARGET (or the device onto a file)  [remount ro]
//!   NodeUnpublish      umount TARGET, remove it
//!   NodeUnstage        umount STAGING ─▶ detach ─▶ blockd Unexport ─▶ drop the record
//! ```
//!
//! Inline ephemeral volumes ([`ephemeral`]): a NodePublishVolume whose volume context has
//! `csi.storage.k8s.io/ephemeral: "true"` creates the blockd volume and runs the stage and
//! publish above on it (a private staging path under `--state-dir/ephemeral/`); its
//! NodeUnpublishVolume runs unpublish and unstage and deletes the volume. An unpublish of
//! an id this driver never hands out (not `NODE/VOLUME`) with no ephemeral record is an
//! ephemeral volume already removed: it succeeds once nothing is mounted at the target.
//!
//! Ownership and invariants:
//! - this module owns `--state-dir/volumes/` (records, see [`state`]) and
//!   `--state-dir/attach/` (per-volume work directories, see [`attach`]); the in-memory map
//!   mirrors the records and is rebuilt from them in [`NodeService::start`];
//! - one operation per volume at a time (`driver.locks`; a concurrent call gets
//!   `ABORTED`), so a record is only changed by the call holding its volume's lock;
//! - every RPC is idempotent and checks the kernel (mount table, loop devices, helper
//!   processes) rather than trusting the record, so a repeat after a crash repairs what is
//!   missing; unstage and unpublish of something already gone succeed;
//! - csi-shim holds no resource of a staged volume in its own process: a restart (even
//!   SIGKILL) leaves mounts and I/O working, and the restarted process can unstage them.
//!
//! Every RPC checks its request in the spec's order: first every required field
//! (`INVALID_ARGUMENT`, naming the field), then the request's own preconditions
//! (publishing without a staging path, an access mode no blockd volume supports), and
//! only then the volume id and the volume (`NOT_FOUND`), so that a request with both a
//! missing field and an unknown volume is answered `INVALID_ARGUMENT`.
//!
//! Submodules: `stage`, `publish`, `stats` and `expand` (the RPC bodies), `capability`
//! (volume capabilities: validation, supported modes, compatibility with what is staged).

pub mod attach;
mod capability;
pub mod ephemeral;
pub mod error;
pub mod exec;
mod expand;
pub mod fs;
pub mod mount;
mod publish;
mod stage;
pub mod state;
mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use blockd_proto::csi::node_server::Node;
use blockd_proto::csi::{
    node_service_capability, NodeExpandVolumeRequest, NodeExpandVolumeResponse,
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability,
    NodeStageVolumeRequest, NodeStageVolumeResponse, NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology,
};
use parking_lot::Mutex;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use self::attach::Attacher;
use self::capability::{capability, supported};
use self::error::{NodeError, Result};
use self::state::{Access, StagedVolume, StateStore};
use self::stats::clamp;
use crate::ids::{VolumeId, TOPOLOGY_KEY};
use crate::Driver;

pub struct NodeService {
    driver: Arc<Driver>,
    store: StateStore,
    attacher: Attacher,
    /// Records of inline ephemeral volumes (`--state-dir/ephemeral/`), keyed by kubelet's
    /// volume id; see [`ephemeral`].
    ephemeral: StateStore,
    /// Volume id → record; mirrors `store`.
    records: Mutex<BTreeMap<String, StagedVolume>>,
}

impl NodeService {
    /// Rebuilds the record of staged volumes from `--state-dir` and checks each one.
    ///
    /// Attachments need no re-attaching: their helpers run outside csi-shim. A volume
    /// whose attachment is broken (say, after a reboot) is reported here and repaired by
    /// the next NodeStageVolume, or cleaned up by NodeUnstageVolume; a kernel NBD device
    /// whose proxy died (a restart of this container) is reconnected to a new proxy in
    /// the background at once ([`Attacher::spawn_reconnect`]).
    pub async fn start(driver: Arc<Driver>) -> anyhow::Result<Self> {
        let store = StateStore::open(&driver.args.state_dir.join("volumes"))?;
        let ephemeral = StateStore::open(&driver.args.state_dir.join("ephemeral"))?;
        let attacher = Attacher::new(&driver.args, driver.blockd.clone());
        let mut records = BTreeMap::new();
        for record in store.load_all()? {
            match record.attachment.problem() {
                None => tracing::info!(
                    volume_id = %record.volume_id,
                    device = %record.attachment.device().display(),
                    staging_path = %record.staging_path.display(),
                    published = record.published.len(),
                    "staged volume still attached"
                ),
                Some(problem) => {
                    tracing::warn!(
                        volume_id = %record.volume_id,
                        problem = %problem,
                        "staged volume is broken; NodeStageVolume repairs it, NodeUnstageVolume removes it"
                    );
                    // A kernel NBD device outlives its proxy (killed with our container):
                    // reconnect it to a new one before its queued I/O times out.
                    attacher.spawn_reconnect(&driver.locks, &record.volume_id, &record.attachment);
                }
            }
            records.insert(record.volume_id.clone(), record);
        }
        tracing::info!(
            attacher = attacher.kind().name(),
            staged = records.len(),
            state_dir = %driver.args.state_dir.display(),
            "node service ready"
        );
        if driver.args.attach == crate::config::AttachMode::Ublk {
            if let Some(reason) = attach::ublk::unavailable() {
                tracing::warn!(reason = %reason, "--attach ublk cannot stage volumes on this node");
            }
        }
        if driver.args.attach == crate::config::AttachMode::Nbd {
            if let Some(reason) = attach::kernel_nbd_unavailable() {
                tracing::warn!(reason = %reason, "--attach nbd cannot stage volumes on this node");
            }
        }
        Ok(NodeService {
            driver,
            store,
            attacher,
            ephemeral,
            records: Mutex::new(records),
        })
    }

    fn record(&self, volume_id: &str) -> Option<StagedVolume> {
        self.records.lock().get(volume_id).cloned()
    }

    fn save(&self, record: &StagedVolume) -> Result<()> {
        self.store.save(record)?;
        self.records
            .lock()
            .insert(record.volume_id.clone(), record.clone());
        Ok(())
    }

    fn forget(&self, volume_id: &str) -> Result<()> {
        self.store.remove(volume_id)?;
        self.records.lock().remove(volume_id);
        Ok(())
    }

    /// Parses a volume id and checks that the volume lives on this node (`NOT_FOUND`
    /// otherwise). Callers check that the field is set first, with [`required_id`].
    fn volume_id(&self, raw: &str) -> Result<VolumeId> {
        required_id(raw)?;
        let id = VolumeId::parse(raw)?;
        if id.node != self.driver.args.node_id {
            return Err(NodeError::OtherNode {
                volume_id: raw.to_string(),
                owner: id.node,
                here: self.driver.args.node_id.clone(),
            });
        }
        Ok(id)
    }
}

/// A required volume id: set (`INVALID_ARGUMENT` otherwise). Whether it names a volume
/// is [`NodeService::volume_id`]'s question.
fn required_id(raw: &str) -> Result<&str> {
    if raw.is_empty() {
        return Err(NodeError::MissingField("volume_id"));
    }
    Ok(raw)
}

/// A required absolute path argument.
fn required_path(raw: &str, field: &'static str) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(NodeError::MissingField(field));
    }
    absolute_path(raw, field)
}

/// An optional path argument: `None` when unset, absolute when set.
fn optional_path(raw: &str, field: &'static str) -> Result<Option<PathBuf>> {
    if raw.is_empty() {
        return Ok(None);
    }
    absolute_path(raw, field).map(Some)
}

fn absolute_path(raw: &str, field: &'static str) -> Result<PathBuf> {
    let path = PathBuf::from(raw);
    if !path.is_absolute() {
        return Err(NodeError::RelativePath { field, path });
    }
    Ok(path)
}

/// The `volume_path` of NodeGetVolumeStats and NodeExpandVolume: required, and otherwise
/// just a key into the staged volume's record. A path that is not where the volume is
/// staged or published, relative or missing ones included, is the spec's "volume does
/// not exist on the specified path" (`NOT_FOUND`), answered by [`NodeService::record_at`].
fn volume_path(raw: &str) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(NodeError::MissingField("volume_path"));
    }
    Ok(PathBuf::from(raw))
}

/// Runs an RPC body in a span with the volume id, logging its failure once.
async fn traced<T>(
    rpc: &'static str,
    volume_id: &str,
    body: impl std::future::Future<Output = std::result::Result<T, Status>>,
) -> std::result::Result<Response<T>, Status> {
    let span = tracing::info_span!("rpc", rpc, volume_id = %volume_id);
    let result = body.instrument(span.clone()).await;
    match result {
        Ok(response) => Ok(Response::new(response)),
        Err(status) => {
            span.in_scope(
                || tracing::warn!(code = ?status.code(), message = %status.message(), "rpc failed"),
            );
            Err(status)
        }
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> std::result::Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodeStageVolume", &req.volume_id, async {
            required_id(&req.volume_id)?;
            let staging = required_path(&req.staging_target_path, "staging_target_path")?;
            let cap = capability(req.volume_capability.as_ref())?;
            supported(&cap)?;
            let id = self.volume_id(&req.volume_id)?;
            let _guard = self.driver.locks.try_lock(&req.volume_id)?;
            self.stage(&id, staging, cap).await?;
            Ok(NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> std::result::Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodeUnstageVolume", &req.volume_id, async {
            required_id(&req.volume_id)?;
            let staging = required_path(&req.staging_target_path, "staging_target_path")?;
            let id = self.volume_id(&req.volume_id)?;
            let _guard = self.driver.locks.try_lock(&req.volume_id)?;
            self.unstage(&id, staging).await?;
            Ok(NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> std::result::Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodePublishVolume", &req.volume_id, async {
            required_id(&req.volume_id)?;
            let target = required_path(&req.target_path, "target_path")?;
            let cap = capability(req.volume_capability.as_ref())?;
            let staging = optional_path(&req.staging_target_path, "staging_target_path")?;
            if ephemeral::requested(&req.volume_context) {
                // Kubelet's own volume id, no staging path: the node makes the volume.
                supported(&cap)?;
                let _guard = self.driver.locks.try_lock(&req.volume_id)?;
                self.publish_ephemeral(
                    &req.volume_id,
                    target,
                    cap,
                    req.readonly,
                    &req.volume_context,
                )
                .await?;
                return Ok(NodePublishVolumeResponse {});
            }
            let Some(staging) = staging else {
                // The spec's code for "staging target path not set" (we stage/unstage).
                return Err(Status::failed_precondition(
                    "staging_target_path is required: this driver stages volumes \
                     (NodeStageVolume) before publishing them",
                ));
            };
            supported(&cap)?;
            let id = self.volume_id(&req.volume_id)?;
            let _guard = self.driver.locks.try_lock(&req.volume_id)?;
            self.publish(&id, staging, target, cap, req.readonly)
                .await?;
            Ok(NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodeUnpublishVolume", &req.volume_id, async {
            required_id(&req.volume_id)?;
            let target = required_path(&req.target_path, "target_path")?;
            {
                let _guard = self.driver.locks.try_lock(&req.volume_id)?;
                if self.unpublish_ephemeral(&req.volume_id, &target).await? {
                    return Ok(NodeUnpublishVolumeResponse {});
                }
            }
            let id = self.volume_id(&req.volume_id)?;
            let _guard = self.driver.locks.try_lock(&req.volume_id)?;
            self.unpublish(&id, target).await?;
            Ok(NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> std::result::Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        traced("NodeGetVolumeStats", &req.volume_id, async {
            required_id(&req.volume_id)?;
            let path = volume_path(&req.volume_path)?;
            optional_path(&req.staging_target_path, "staging_target_path")?;
            let id = match self.ephemeral_stats_id(&req.volume_id)? {
                Some(id) => id,
                None => self.volume_id(&req.volume_id)?,
            };
            Ok(self.stats(&id, path).await?)
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> std::result::Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        traced("NodeExpandVolume", &req.volume_id, async {
            required_id(&req.volume_id)?;
            let path = volume_path(&req.volume_path)?;
            optional_path(&req.staging_target_path, "staging_target_path")?;
            let requested = req
                .volume_capability
                .as_ref()
                .map(|cap| capability(Some(cap)))
                .transpose()?;
            let required = req
                .capacity_range
                .map(|r| r.required_bytes.max(0) as u64)
                .unwrap_or(0);
            if let Some(range) = req.capacity_range {
                if range.limit_bytes > 0 && range.required_bytes > range.limit_bytes {
                    return Err(Status::out_of_range(format!(
                        "capacity_range: required_bytes {} exceeds limit_bytes {}",
                        range.required_bytes, range.limit_bytes
                    )));
                }
            }
            if let Some(cap) = &requested {
                // NodeExpandVolume's code for "exceeds capabilities" is INVALID_ARGUMENT.
                supported(cap).map_err(|e| Status::invalid_argument(e.to_string()))?;
            }
            let requested_block = requested.map(|cap| cap.access == Access::Block);
            let id = self.volume_id(&req.volume_id)?;
            let _guard = self.driver.locks.try_lock(&req.volume_id)?;
            let size = self.expand(&id, path, required, requested_block).await?;
            Ok(NodeExpandVolumeResponse {
                capacity_bytes: clamp(size),
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> std::result::Result<Response<NodeGetInfoResponse>, Status> {
        let node_id = self.driver.args.node_id.clone();
        Ok(Response::new(NodeGetInfoResponse {
            node_id: node_id.clone(),
            max_volumes_per_node: self.driver.args.max_volumes.max(0),
            accessible_topology: Some(Topology {
                segments: [(TOPOLOGY_KEY.to_string(), node_id)].into(),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn errors_map_to_the_spec_codes() {
        let code = |e: NodeError| Status::from(e).code();
        assert_eq!(code(NodeError::MissingField("x")), Code::InvalidArgument);
        assert_eq!(
            code(NodeError::RelativePath {
                field: "target_path",
                path: "rel".into()
            }),
            Code::InvalidArgument
        );
        assert_eq!(
            code(NodeError::UnknownPath {
                volume_id: "a/b".into(),
                path: "some/path".into()
            }),
            Code::NotFound
        );
        assert_eq!(
            code(NodeError::OtherNode {
                volume_id: "a/b".into(),
                owner: "a".into(),
                here: "c".into()
            }),
            Code::NotFound
        );
        assert_eq!(
            code(NodeError::NotStaged {
                volume_id: "a/b".into()
            }),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(NodeError::IncompatibleStage {
                volume_id: "a/b".into(),
                path: "/s".into(),
                staged: "x".into(),
                requested: "y".into()
            }),
            Code::AlreadyExists
        );
    }

    #[test]
    fn relative_and_empty_paths_are_rejected() {
        assert!(matches!(
            required_path("", "target_path"),
            Err(NodeError::MissingField("target_path"))
        ));
        assert!(matches!(
            required_path("rel/x", "target_path"),
            Err(NodeError::RelativePath { .. })
        ));
        assert_eq!(required_path("/a", "t").unwrap(), PathBuf::from("/a"));
        assert_eq!(optional_path("", "t").unwrap(), None);
        assert!(matches!(
            optional_path("rel", "t"),
            Err(NodeError::RelativePath { .. })
        ));
        // volume_path names a place to look the volume up: only its absence is invalid.
        assert!(matches!(
            volume_path(""),
            Err(NodeError::MissingField("volume_path"))
        ));
        assert_eq!(
            volume_path("some/path").unwrap(),
            PathBuf::from("some/path")
        );
        assert!(matches!(
            required_id(""),
            Err(NodeError::MissingField("volume_id"))
        ));
    }
}
