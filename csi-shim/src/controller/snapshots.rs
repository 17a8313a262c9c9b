//! The snapshot RPCs: CreateSnapshot, DeleteSnapshot, GetSnapshot and ListSnapshots.
//!
//! blockd snapshot names are unique across the daemon, so the CSI snapshot name maps to
//! one blockd snapshot name (`ids::blockd_name`) whatever the source volume; the id adds
//! the volume (`NODE/VOLUME@SNAPSHOT`) so that the id alone says what it was taken from.
//! Snapshots outlive their volume (blockd keeps them), so an id stays valid after
//! DeleteVolume of its source.

use blockd_proto::csi::*;
use blockd_proto::model::NameKind;
use blockd_proto::v1;
use tonic::{Code, Status};

use super::volumes::page;
use super::{no_class_parameters, require_field, ControllerService, Located};
use crate::blockd::{found, upstream};
use crate::ids::{blockd_name, SnapshotId, VolumeId};

/// The lock key of a snapshot: its blockd name is unique on this node.
fn lock_key(node: &str, snapshot: &str) -> String {
    format!("snapshot:{node}/{snapshot}")
}

impl ControllerService {
    /// The CSI view of a blockd snapshot.
    pub(super) fn csi_snapshot(&self, snapshot: &v1::Snapshot) -> Snapshot {
        Snapshot {
            size_bytes: i64::try_from(snapshot.size_bytes).unwrap_or(i64::MAX),
            snapshot_id: SnapshotId::new(self.node(), &snapshot.volume, &snapshot.name).to_string(),
            source_volume_id: VolumeId::new(self.node(), &snapshot.volume).to_string(),
            creation_time: Some(prost_types::Timestamp {
                seconds: i64::try_from(snapshot.created_unix).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            // blockd snapshots are O(1) and complete when CreateSnapshot answers.
            ready_to_use: true,
            group_snapshot_id: if snapshot.group.is_empty() {
                String::new()
            } else {
                super::groups::GroupSnapshotId::new(self.node(), &snapshot.group).to_string()
            },
        }
    }

    pub(super) async fn snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, Status> {
        require_field(req.name.is_empty(), "name")?;
        require_field(req.source_volume_id.is_empty(), "source_volume_id")?;
        no_class_parameters(&req.parameters, "VolumeSnapshotClass", "snapshots")?;
        let vid = self.local_volume("source volume", &req.source_volume_id)?;
        let name = blockd_name(NameKind::Snapshot, &req.name);
        let _guard = self.driver.locks.try_lock(&lock_key(self.node(), &name))?;
        if let Some(existing) = self.blockd_snapshot(&name).await? {
            if existing.volume != vid.volume {
                return Err(Status::already_exists(format!(
                    "snapshot {:?} already exists, taken from volume {:?}, not from {:?}; use \
                     another name",
                    req.name,
                    VolumeId::new(self.node(), &existing.volume).to_string(),
                    req.source_volume_id
                )));
            }
            tracing::info!(snapshot = %name, "snapshot already exists");
            return Ok(CreateSnapshotResponse {
                snapshot: Some(self.csi_snapshot(&existing)),
            });
        }
        let result = self
            .driver
            .blockd
            .snapshots()
            .create_snapshot(v1::CreateSnapshotRequest {
                volume: vid.volume.clone(),
                name: name.clone(),
                replica_of: String::new(),
            })
            .await;
        let created = match result {
            Ok(answer) => answer.into_inner(),
            Err(status) if status.code() == Code::NotFound => {
                return Err(Status::not_found(format!(
                    "source volume {:?} does not exist",
                    req.source_volume_id
                )))
            }
            Err(status) => {
                return Err(upstream(
                    &format!("snapshotting volume {:?} as {name:?}", vid.volume),
                    status,
                ))
            }
        };
        let snapshot = created
            .snapshot
            .ok_or_else(|| Status::internal("blockd answered CreateSnapshot without a snapshot"))?;
        tracing::info!(
            snapshot = %name,
            volume = %vid,
            size_bytes = snapshot.size_bytes,
            created = created.created,
            "created snapshot"
        );
        Ok(CreateSnapshotResponse {
            snapshot: Some(self.csi_snapshot(&snapshot)),
        })
    }

    pub(super) async fn delete_snap(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotResponse, Status> {
        require_field(req.snapshot_id.is_empty(), "snapshot_id")?;
        let sid = match self.locate_snapshot(&req.snapshot_id) {
            Located::Malformed(err) => {
                tracing::info!(error = %err, "malformed snapshot id: nothing to delete");
                return Ok(DeleteSnapshotResponse {});
            }
            Located::Elsewhere(sid) => {
                return Err(self.elsewhere("snapshot", &req.snapshot_id, &sid.node))
            }
            Located::Here(sid) => sid,
        };
        let _guard = self
            .driver
            .locks
            .try_lock(&lock_key(self.node(), &sid.snapshot))?;
        let existing = self
            .blockd_snapshot(&sid.snapshot)
            .await?
            .filter(|s| s.volume == sid.volume);
        let Some(snapshot) = existing else {
            tracing::info!("snapshot does not exist: nothing to delete");
            return Ok(DeleteSnapshotResponse {});
        };
        if !snapshot.group.is_empty() {
            // The spec's "Snapshot is part of a group": it goes with its group only.
            return Err(Status::invalid_argument(format!(
                "snapshot {:?} is part of group snapshot {:?} and cannot be deleted alone; \
                 delete the VolumeGroupSnapshot",
                req.snapshot_id,
                super::groups::GroupSnapshotId::new(self.node(), &snapshot.group).to_string()
            )));
        }
        if snapshot.exported {
            return Err(Status::failed_precondition(format!(
                "snapshot {:?} is in use: it is exported read-only over NBD; `blockctl \
                 unexport {}` first",
                req.snapshot_id,
                sid.image()
            )));
        }
        let result = self
            .driver
            .blockd
            .snapshots()
            .delete_snapshot(v1::DeleteSnapshotRequest {
                name: sid.snapshot.clone(),
            })
            .await;
        let deleted = found(result, || format!("deleting snapshot {:?}", sid.snapshot))?;
        if deleted.is_some() {
            tracing::info!(snapshot = %sid, "deleted snapshot");
        }
        Ok(DeleteSnapshotResponse {})
    }

    pub(super) async fn get_snap(
        &self,
        req: GetSnapshotRequest,
    ) -> Result<GetSnapshotResponse, Status> {
        require_field(req.snapshot_id.is_empty(), "snapshot_id")?;
        let sid = self.local_snapshot(&req.snapshot_id)?;
        let snapshot = self
            .blockd_snapshot(&sid.snapshot)
            .await?
            .filter(|s| s.volume == sid.volume)
            .ok_or_else(|| {
                Status::not_found(format!("snapshot {:?} does not exist", req.snapshot_id))
            })?;
        Ok(GetSnapshotResponse {
            snapshot: Some(self.csi_snapshot(&snapshot)),
        })
    }

    pub(super) async fn list_snaps(
        &self,
        req: ListSnapshotsRequest,
    ) -> Result<ListSnapshotsResponse, Status> {
        let page = page(req.max_entries, &req.starting_token)?;
        // An id that is malformed or names another node matches nothing here.
        let volume_filter = if req.source_volume_id.is_empty() {
            None
        } else {
            match self.locate_volume(&req.source_volume_id) {
                Located::Here(vid) => Some(vid.volume),
                Located::Elsewhere(_) | Located::Malformed(_) => {
                    return Ok(ListSnapshotsResponse::default())
                }
            }
        };
        let snapshots = if req.snapshot_id.is_empty() {
            self.all_snapshots().await?
        } else {
            match self.locate_snapshot(&req.snapshot_id) {
                Located::Here(sid) => self
                    .blockd_snapshot(&sid.snapshot)
                    .await?
                    .filter(|s| s.volume == sid.volume)
                    .into_iter()
                    .collect(),
                Located::Elsewhere(_) | Located::Malformed(_) => Vec::new(),
            }
        };
        let snapshots: Vec<v1::Snapshot> = snapshots
            .into_iter()
            .filter(|s| volume_filter.as_ref().is_none_or(|v| *v == s.volume))
            .collect();
        let (snapshots, next_token) = page.apply(snapshots, |s| s.name.as_str());
        Ok(ListSnapshotsResponse {
            entries: snapshots
                .iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(self.csi_snapshot(s)),
                })
                .collect(),
            next_token,
        })
    }
}
