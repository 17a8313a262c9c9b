//! CSI GroupController: crash-consistent VolumeGroupSnapshots on blockd group snapshots.
//!
//! ```text
//! CSI group name "groupsnapshot-…" --ids::blockd_name--> blockd group G
//! CSI group snapshot id  = NODE/G
//! member snapshot ids    = NODE/VOLUME@G-VOLUME   (ordinary snapshot ids: GetSnapshot,
//!                                                  ListSnapshots and CreateVolume from
//!                                                  them work as for any snapshot)
//! ```
//!
//! blockd takes every member in one metadata commit after quiescing all of them, so the
//! members share one instant (the spec's write-order consistency). Invariants:
//! - CreateVolumeGroupSnapshot is idempotent by name for the same set of source volumes
//!   (in any order); another set is `ALREADY_EXISTS`. Volumes of another node cannot be
//!   snapshotted with this node's: `FAILED_PRECONDITION`.
//! - Members carry `group_snapshot_id`; DeleteSnapshot refuses them (`INVALID_ARGUMENT`,
//!   as the spec orders); DeleteVolumeGroupSnapshot deletes them all at once.
//! - `snapshot_ids` of Get/Delete must name exactly the members (`INVALID_ARGUMENT` on a
//!   mismatch); a group that no longer exists is OK for Delete and `NOT_FOUND` for Get.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use blockd_proto::csi::group_controller_server::GroupController;
use blockd_proto::csi::group_controller_service_capability::{self, rpc};
use blockd_proto::csi::*;
use blockd_proto::model::NameKind;
use blockd_proto::v1;
use tonic::{Code, Request, Response, Status};

use super::{no_class_parameters, require_field, traced, ControllerService};
use crate::blockd::{found, upstream};
use crate::ids::{blockd_name, parse_node_name, IdError};
use crate::Driver;

/// A parsed CSI group snapshot id, `NODE/GROUP`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupSnapshotId {
    pub node: String,
    pub group: String,
}

impl GroupSnapshotId {
    pub fn new(node: impl Into<String>, group: impl Into<String>) -> Self {
        GroupSnapshotId {
            node: node.into(),
            group: group.into(),
        }
    }

    pub fn parse(id: &str) -> Result<Self, IdError> {
        let (node, group) = parse_node_name(
            id,
            "group snapshot",
            "NODE/GROUP",
            NameKind::Snapshot,
            "group_snapshot_id",
        )?;
        Ok(GroupSnapshotId::new(node, group))
    }
}

impl fmt::Display for GroupSnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.group)
    }
}

/// The lock key of a group: its blockd name is unique on this node.
fn lock_key(node: &str, group: &str) -> String {
    format!("group:{node}/{group}")
}

/// The CSI GroupController service of this node.
pub struct GroupControllerService {
    controller: ControllerService,
}

impl GroupControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        GroupControllerService {
            controller: ControllerService::new(driver),
        }
    }

    fn node(&self) -> &str {
        self.controller.node()
    }

    fn driver(&self) -> &Driver {
        &self.controller.driver
    }

    /// The CSI view of a blockd group snapshot.
    fn csi_group(&self, group: &v1::GroupSnapshot) -> VolumeGroupSnapshot {
        VolumeGroupSnapshot {
            group_snapshot_id: GroupSnapshotId::new(self.node(), &group.name).to_string(),
            snapshots: group
                .snapshots
                .iter()
                .map(|s| self.controller.csi_snapshot(s))
                .collect(),
            creation_time: Some(prost_types::Timestamp {
                seconds: i64::try_from(group.created_unix).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            // O(1) snapshots: complete when blockd answers.
            ready_to_use: true,
        }
    }

    /// The blockd group `name`, or `None` when there is none.
    async fn blockd_group(&self, name: &str) -> Result<Option<v1::GroupSnapshot>, Status> {
        let request = v1::GetGroupSnapshotRequest {
            name: name.to_string(),
        };
        let result = self
            .driver()
            .blockd
            .groups()
            .get_group_snapshot(request)
            .await;
        let group = found(result, || format!("looking up group snapshot {name:?}"))?;
        Ok(group.map(Response::into_inner))
    }

    /// `INVALID_ARGUMENT` unless `ids` names exactly the members of `group`.
    fn check_members(&self, group: &VolumeGroupSnapshot, ids: &[String]) -> Result<(), Status> {
        let have: BTreeSet<&str> = group
            .snapshots
            .iter()
            .map(|s| s.snapshot_id.as_str())
            .collect();
        let given: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        if have != given || given.len() != ids.len() {
            return Err(Status::invalid_argument(format!(
                "snapshot_ids {ids:?} do not match the members of group snapshot {:?}: {:?}",
                group.group_snapshot_id,
                have.into_iter().collect::<Vec<_>>()
            )));
        }
        Ok(())
    }

    /// The group id `id` of this node: malformed is `NOT_FOUND`, another node's
    /// `FAILED_PRECONDITION`; `None` for a malformed id (it names nothing).
    fn local_group(&self, id: &str) -> Result<Option<GroupSnapshotId>, Status> {
        match GroupSnapshotId::parse(id) {
            Err(err) => {
                tracing::info!(error = %err, "malformed group snapshot id");
                Ok(None)
            }
            Ok(gid) if gid.node == self.node() => Ok(Some(gid)),
            Ok(gid) => Err(self.controller.elsewhere("group snapshot", id, &gid.node)),
        }
    }

    async fn create(
        &self,
        req: CreateVolumeGroupSnapshotRequest,
    ) -> Result<CreateVolumeGroupSnapshotResponse, Status> {
        require_field(req.name.is_empty(), "name")?;
        require_field(req.source_volume_ids.is_empty(), "source_volume_ids")?;
        no_class_parameters(
            &req.parameters,
            "VolumeGroupSnapshotClass",
            "group snapshots",
        )?;
        let distinct: BTreeSet<&String> = req.source_volume_ids.iter().collect();
        if distinct.len() != req.source_volume_ids.len() {
            return Err(Status::invalid_argument(
                "source_volume_ids names a volume more than once",
            ));
        }
        let mut volumes = Vec::with_capacity(req.source_volume_ids.len());
        for id in &req.source_volume_ids {
            let vid = match self.controller.locate_volume(id) {
                super::Located::Here(vid) => vid,
                super::Located::Elsewhere(vid) => {
                    return Err(Status::failed_precondition(format!(
                        "source volume {id:?} lives on node {:?}, not on {:?}: a group \
                         snapshot is taken by one node's blockd, so all its volumes must \
                         live on the same node",
                        vid.node,
                        self.node()
                    )))
                }
                super::Located::Malformed(err) => {
                    return Err(Status::not_found(format!(
                        "source volume {id:?} does not exist: {err}"
                    )))
                }
            };
            volumes.push(vid.volume);
        }
        let name = blockd_name(NameKind::Snapshot, &req.name);
        let _guard = self
            .driver()
            .locks
            .try_lock(&lock_key(self.node(), &name))?;
        let result = self
            .driver()
            .blockd
            .groups()
            .create_group_snapshot(v1::CreateGroupSnapshotRequest {
                name: name.clone(),
                volumes: volumes.clone(),
            })
            .await;
        let created = match result {
            Ok(answer) => answer.into_inner(),
            Err(status) if status.code() == Code::AlreadyExists => {
                return Err(Status::already_exists(format!(
                    "group snapshot {:?} cannot be made of {:?}: {}",
                    req.name,
                    req.source_volume_ids,
                    status.message()
                )))
            }
            Err(status) => {
                return Err(upstream(
                    &format!("taking group snapshot {name:?} of volumes {volumes:?}"),
                    status,
                ))
            }
        };
        let group = created.group.ok_or_else(|| {
            Status::internal("blockd answered CreateGroupSnapshot without the group")
        })?;
        tracing::info!(
            group = %name,
            members = group.snapshots.len(),
            created = created.created,
            "created group snapshot"
        );
        Ok(CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.csi_group(&group)),
        })
    }

    async fn delete(
        &self,
        req: DeleteVolumeGroupSnapshotRequest,
    ) -> Result<DeleteVolumeGroupSnapshotResponse, Status> {
        require_field(req.group_snapshot_id.is_empty(), "group_snapshot_id")?;
        require_field(req.snapshot_ids.is_empty(), "snapshot_ids")?;
        let Some(gid) = self.local_group(&req.group_snapshot_id)? else {
            return Ok(DeleteVolumeGroupSnapshotResponse {});
        };
        let _guard = self
            .driver()
            .locks
            .try_lock(&lock_key(self.node(), &gid.group))?;
        let Some(group) = self.blockd_group(&gid.group).await? else {
            tracing::info!("group snapshot does not exist: nothing to delete");
            return Ok(DeleteVolumeGroupSnapshotResponse {});
        };
        self.check_members(&self.csi_group(&group), &req.snapshot_ids)?;
        if let Some(s) = group.snapshots.iter().find(|s| s.exported) {
            return Err(Status::failed_precondition(format!(
                "group snapshot {:?} is in use: its member {}@{} is exported read-only over \
                 NBD; `blockctl unexport {}@{}` first",
                req.group_snapshot_id, s.volume, s.name, s.volume, s.name
            )));
        }
        let result = self
            .driver()
            .blockd
            .groups()
            .delete_group_snapshot(v1::DeleteGroupSnapshotRequest {
                name: gid.group.clone(),
            })
            .await;
        let deleted = found(result, || {
            format!("deleting group snapshot {:?}", gid.group)
        })?;
        if deleted.is_some() {
            tracing::info!(group = %gid, "deleted group snapshot");
        }
        Ok(DeleteVolumeGroupSnapshotResponse {})
    }

    async fn get(
        &self,
        req: GetVolumeGroupSnapshotRequest,
    ) -> Result<GetVolumeGroupSnapshotResponse, Status> {
        require_field(req.group_snapshot_id.is_empty(), "group_snapshot_id")?;
        require_field(req.snapshot_ids.is_empty(), "snapshot_ids")?;
        let not_found = || {
            Status::not_found(format!(
                "group snapshot {:?} does not exist",
                req.group_snapshot_id
            ))
        };
        let gid = self
            .local_group(&req.group_snapshot_id)?
            .ok_or_else(not_found)?;
        let group = self.blockd_group(&gid.group).await?.ok_or_else(not_found)?;
        let group = self.csi_group(&group);
        self.check_members(&group, &req.snapshot_ids)?;
        Ok(GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(group),
        })
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(GroupControllerGetCapabilitiesResponse {
            capabilities: vec![GroupControllerServiceCapability {
                r#type: Some(group_controller_service_capability::Type::Rpc(
                    group_controller_service_capability::Rpc {
                        r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                    },
                )),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!(
            "create_volume_group_snapshot",
            name = %req.name,
            volumes = ?req.source_volume_ids
        );
        traced("CreateVolumeGroupSnapshot", span, self.create(req)).await
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!(
            "delete_volume_group_snapshot",
            group = %req.group_snapshot_id
        );
        traced("DeleteVolumeGroupSnapshot", span, self.delete(req)).await
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let span =
            tracing::debug_span!("get_volume_group_snapshot", group = %req.group_snapshot_id);
        traced("GetVolumeGroupSnapshot", span, self.get(req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_round_trip_and_reject_garbage() {
        let id = GroupSnapshotId::new("node-a", "groupsnapshot-1");
        assert_eq!(id.to_string(), "node-a/groupsnapshot-1");
        assert_eq!(
            GroupSnapshotId::parse("node-a/groupsnapshot-1").unwrap(),
            id
        );
        for bad in [
            "",
            "node-a",
            "/g",
            "node-a/",
            "node-a/a/b",
            "node-a/v@s",
            "node-a/G",
        ] {
            assert!(GroupSnapshotId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
