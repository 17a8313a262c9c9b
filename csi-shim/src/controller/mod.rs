//! CSI Controller service: volumes, snapshots, clones, expansion, capacity and listings,
//! each turned into `blockd.v1` calls on this node's blockd.
//!
//! ```text
//! CSI name "pvc-…"  --ids::blockd_name-->  blockd volume "pvc-…"
//! CSI volume id      = NODE/VOLUME          (NODE = --node-id of the csi-shim that made it)
//! CSI snapshot id    = NODE/VOLUME@SNAPSHOT
//! ```
//!
//! Invariants:
//! - One operation per object at a time: mutating calls take [`crate::locks::OpLocks`]
//!   on the volume id (`NODE/VOLUME`) or on `snapshot:NODE/SNAPSHOT`; a concurrent call
//!   on the same object gets `ABORTED` and the orchestrator retries.
//! - Every RPC validates every required field of its request (`INVALID_ARGUMENT`, naming
//!   the field) before it parses an id or asks blockd anything, as the spec orders it: a
//!   request with a missing field and an unknown id is `INVALID_ARGUMENT`, not
//!   `NOT_FOUND`.
//! - Every mutating call is idempotent: a retry finds what the first call made (names map
//!   to blockd names by a pure function) and answers as the first call did.
//! - An id naming another node is never `NOT_FOUND`: CreateVolume from such a source is
//!   `RESOURCE_EXHAUSTED` (the provisioner reschedules to the node holding it); any other
//!   call on it is `FAILED_PRECONDITION` saying which node's csi-shim must handle it.
//!   A malformed id cannot name anything: deletes answer OK, lookups NOT_FOUND.
//! - blockd keeps snapshots alive when their volume is deleted, so DeleteVolume never
//!   fails because of snapshots (the spec's "independent snapshots" case).
//!
//! Choices where the spec leaves room (each has a test in `tests/tests/csi_controller.rs`):
//! - DeleteVolume of a volume that is exported (staged on this node) is
//!   `FAILED_PRECONDITION` ("volume in use"); the volume is left untouched.
//! - CreateVolume from a snapshot or volume with `required_bytes` below the source's size,
//!   or `limit_bytes` below it, is `OUT_OF_RANGE` (a restore is never silently larger than
//!   asked); a larger size is an O(1) restore/clone.
//! - A clone or restore stays in its source's pool: a `pool` parameter naming another pool
//!   is `INVALID_ARGUMENT` (the spec's "source incompatible").
//! - A pool the node does not have, a failed pool, a full pool (free space at or below 2%
//!   of capacity) and a size past `--overprovisioning-ratio` are all `RESOURCE_EXHAUSTED`
//!   for CreateVolume, and 0 for GetCapacity: "not on this node, try another".
//! - ControllerExpandVolume to a size the volume already has (or below it) is a no-op
//!   answering the current size; a `limit_bytes` below the current size is `OUT_OF_RANGE`
//!   (blockd volumes never shrink through CSI).
//! - ValidateVolumeCapabilities answers unsupported capabilities or parameters with no
//!   `confirmed` and a message (the spec's way), and only missing fields with
//!   `INVALID_ARGUMENT`.
//! - QoS is a policy blockd keeps: an `iopsPerGB` volume's IOPS limit follows it when
//!   expanded; ControllerModifyVolume (VolumeAttributesClass) changes the policy live,
//!   key by key ([`modify`]). `blockctl volume set-qos` sets fixed limits by hand.
//!
//! Submodules: [`capability`] (access modes and types), [`capacity`] (sizes and room),
//! [`modify`] (mutable parameters), `volumes` and `snapshots` (the RPC bodies).

pub mod capability;
pub mod capacity;
pub mod groups;
pub mod modify;
mod snapshots;
mod volumes;

use std::future::Future;
use std::sync::Arc;

use blockd_proto::csi::controller_server::Controller;
use blockd_proto::csi::controller_service_capability::{self, rpc};
use blockd_proto::csi::*;
use blockd_proto::v1;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::blockd::{found, upstream};
use crate::ids::{IdError, SnapshotId, VolumeId, TOPOLOGY_KEY};
use crate::Driver;

pub use groups::GroupControllerService;

pub struct ControllerService {
    driver: Arc<Driver>,
}

impl ControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { driver }
    }

    fn node(&self) -> &str {
        &self.driver.args.node_id
    }

    /// This node's topology segment.
    fn topology(&self) -> Topology {
        Topology {
            segments: [(TOPOLOGY_KEY.to_string(), self.node().to_string())].into(),
        }
    }

    /// Whether `topology` admits this node: it names this node under the topology key.
    fn admits(&self, topology: &Topology) -> bool {
        topology
            .segments
            .get(TOPOLOGY_KEY)
            .is_some_and(|node| node == self.node())
    }

    /// Where a volume id points.
    fn locate_volume(&self, id: &str) -> Located<VolumeId> {
        match VolumeId::parse(id) {
            Err(err) => Located::Malformed(err),
            Ok(vid) if vid.node == self.node() => Located::Here(vid),
            Ok(vid) => Located::Elsewhere(vid),
        }
    }

    /// Where a snapshot id points.
    fn locate_snapshot(&self, id: &str) -> Located<SnapshotId> {
        match SnapshotId::parse(id) {
            Err(err) => Located::Malformed(err),
            Ok(sid) if sid.node == self.node() => Located::Here(sid),
            Ok(sid) => Located::Elsewhere(sid),
        }
    }

    /// The volume id `id` of this node, for calls that act on an existing volume: a
    /// malformed id is `NOT_FOUND` (no volume can have it), another node's is
    /// [`Self::elsewhere`]. `what` names the role in messages ("volume", "source volume").
    fn local_volume(&self, what: &str, id: &str) -> Result<VolumeId, Status> {
        match self.locate_volume(id) {
            Located::Here(vid) => Ok(vid),
            Located::Elsewhere(vid) => Err(self.elsewhere(what, id, &vid.node)),
            Located::Malformed(err) => Err(Status::not_found(format!(
                "{what} {id:?} does not exist: {err}"
            ))),
        }
    }

    /// Like [`Self::local_volume`], for an existing snapshot.
    fn local_snapshot(&self, id: &str) -> Result<SnapshotId, Status> {
        match self.locate_snapshot(id) {
            Located::Here(sid) => Ok(sid),
            Located::Elsewhere(sid) => Err(self.elsewhere("snapshot", id, &sid.node)),
            Located::Malformed(err) => Err(Status::not_found(format!(
                "snapshot {id:?} does not exist: {err}"
            ))),
        }
    }

    /// `FAILED_PRECONDITION` for an operation on an object another node holds.
    fn elsewhere(&self, what: &str, id: &str, node: &str) -> Status {
        Status::failed_precondition(format!(
            "{what} {id:?} lives on node {node:?}, not on {:?}: the csi-shim of node \
             {node:?} serves it (with --node-deployment, the sidecars of that node)",
            self.node()
        ))
    }

    /// The blockd volume `name`, or `None` when blockd has none by that name.
    async fn blockd_volume(&self, name: &str) -> Result<Option<v1::Volume>, Status> {
        let request = v1::GetVolumeRequest {
            name: name.to_string(),
        };
        let result = self.driver.blockd.volumes().get_volume(request).await;
        let volume = found(result, || format!("looking up volume {name:?}"))?;
        Ok(volume.map(Response::into_inner))
    }

    /// The blockd snapshot `name`, or `None` when blockd has none by that name.
    async fn blockd_snapshot(&self, name: &str) -> Result<Option<v1::Snapshot>, Status> {
        let result = self.driver.blockd.get_snapshot(name).await;
        found(result, || format!("looking up snapshot {name:?}"))
    }

    /// The pool named `name`, or the default pool; `None` when there is no such pool.
    async fn blockd_pool(&self, name: Option<&str>) -> Result<Option<v1::Pool>, Status> {
        let pools = self.driver.blockd.list_pools().await?;
        Ok(pools.into_iter().find(|p| match name {
            Some(name) => p.name == name,
            None => p.is_default,
        }))
    }

    /// Every blockd volume (all pages).
    async fn all_volumes(&self) -> Result<Vec<v1::Volume>, Status> {
        let mut client = self.driver.blockd.volumes();
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_volumes(v1::ListVolumesRequest {
                    page_size: 0,
                    page_token,
                })
                .await
                .map_err(|status| upstream("listing volumes", status))?
                .into_inner();
            all.extend(page.volumes);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    /// Every blockd snapshot (all pages).
    async fn all_snapshots(&self) -> Result<Vec<v1::Snapshot>, Status> {
        let mut client = self.driver.blockd.snapshots();
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_snapshots(v1::ListSnapshotsRequest {
                    volume: String::new(),
                    page_size: 0,
                    page_token,
                })
                .await
                .map_err(|status| upstream("listing snapshots", status))?
                .into_inner();
            all.extend(page.snapshots);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }
}

/// Where an id points, relative to this node.
enum Located<T> {
    Here(T),
    Elsewhere(T),
    Malformed(IdError),
}

/// `INVALID_ARGUMENT` ("FIELD is required") when the request left the required `field`
/// `empty`.
fn require_field(empty: bool, field: &str) -> Result<(), Status> {
    if empty {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

/// `INVALID_ARGUMENT` for the first of `parameters` (from a `class`, of the objects
/// `what`) that is not one the external sidecars add (`csi.storage.k8s.io/...`): blockd.csi.io
/// takes none for these objects.
fn no_class_parameters(
    parameters: &std::collections::HashMap<String, String>,
    class: &str,
    what: &str,
) -> Result<(), Status> {
    if let Some(key) = parameters
        .keys()
        .find(|k| !k.starts_with("csi.storage.k8s.io/"))
    {
        return Err(Status::invalid_argument(format!(
            "unknown {class} parameter {key:?}: blockd.csi.io {what} take no parameters"
        )));
    }
    Ok(())
}

/// Runs one RPC body inside `span` and logs how it ended: successes of mutating calls at
/// info, refusals the caller must fix at info, failures at warn. Errors are logged here and
/// nowhere else.
async fn traced<T>(
    rpc: &'static str,
    span: tracing::Span,
    body: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    async move {
        match body.await {
            Ok(answer) => {
                tracing::debug!(rpc, "ok");
                Ok(Response::new(answer))
            }
            Err(status) => {
                match status.code() {
                    Code::Internal | Code::Unknown | Code::Unavailable | Code::DataLoss => {
                        tracing::warn!(rpc, code = ?status.code(), error = status.message(), "failed")
                    }
                    _ => {
                        tracing::info!(rpc, code = ?status.code(), error = status.message(), "refused")
                    }
                }
                Err(status)
            }
        }
    }
    .instrument(span)
    .await
}

/// The RPCs this controller serves.
const CAPABILITIES: &[rpc::Type] = &[
    rpc::Type::CreateDeleteVolume,
    rpc::Type::CreateDeleteSnapshot,
    rpc::Type::CloneVolume,
    rpc::Type::ListVolumes,
    rpc::Type::ListSnapshots,
    rpc::Type::GetCapacity,
    rpc::Type::ExpandVolume,
    rpc::Type::GetVolume,
    rpc::Type::VolumeCondition,
    rpc::Type::SingleNodeMultiWriter,
    rpc::Type::ListVolumesPublishedNodes,
    rpc::Type::GetSnapshot,
    rpc::Type::ModifyVolume,
];

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("create_volume", name = %req.name);
        traced("CreateVolume", span, self.create(req)).await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("delete_volume", volume = %req.volume_id);
        traced("DeleteVolume", span, self.delete(req)).await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("validate_volume_capabilities", volume = %req.volume_id);
        traced("ValidateVolumeCapabilities", span, self.validate(req)).await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("list_volumes", max_entries = req.max_entries);
        traced("ListVolumes", span, self.list(req)).await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("get_capacity");
        traced("GetCapacity", span, self.capacity(req)).await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|&kind| ControllerServiceCapability {
                r#type: Some(controller_service_capability::Type::Rpc(
                    controller_service_capability::Rpc {
                        r#type: kind as i32,
                    },
                )),
            })
            .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!(
            "create_snapshot",
            name = %req.name,
            volume = %req.source_volume_id
        );
        traced("CreateSnapshot", span, self.snapshot(req)).await
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("delete_snapshot", snapshot = %req.snapshot_id);
        traced("DeleteSnapshot", span, self.delete_snap(req)).await
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!(
            "list_snapshots",
            snapshot = %req.snapshot_id,
            volume = %req.source_volume_id
        );
        traced("ListSnapshots", span, self.list_snaps(req)).await
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("get_snapshot", snapshot = %req.snapshot_id);
        traced("GetSnapshot", span, self.get_snap(req)).await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("controller_expand_volume", volume = %req.volume_id);
        traced("ControllerExpandVolume", span, self.expand(req)).await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("controller_get_volume", volume = %req.volume_id);
        traced("ControllerGetVolume", span, self.get(req)).await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("controller_modify_volume", volume = %req.volume_id);
        traced("ControllerModifyVolume", span, self.modify(req)).await
    }
}
