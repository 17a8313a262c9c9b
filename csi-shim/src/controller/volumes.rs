//! The volume RPCs: CreateVolume (blank, restore, clone), DeleteVolume,
//! ValidateVolumeCapabilities, ListVolumes, GetCapacity, ControllerExpandVolume and
//! ControllerGetVolume (ControllerModifyVolume is in [`super::modify`]).

use std::collections::HashMap;

use blockd_proto::csi::volume_capability::AccessType;
use blockd_proto::csi::volume_content_source::{self, SnapshotSource};
use blockd_proto::csi::*;
use blockd_proto::model::{NameKind, PageRequest};
use blockd_proto::size::format_size;
use blockd_proto::v1;
use tonic::Status;

use super::capability;
use super::capacity::{self, Range, SIZE_GRANULE};
use super::modify::{self, MutableParams};
use super::{require_field, ControllerService, Located};
use crate::blockd::{found, upstream};
use crate::ids::{blockd_name, SnapshotId, VolumeId};
use crate::params::{self, VolumeParams};

/// Checks the required fields of a CreateVolume content source (`INVALID_ARGUMENT`):
/// it names a snapshot or a volume, by a non-empty id. Whether the id names anything is
/// `locate_source`'s and `resolve`'s question, asked later.
fn source_fields(source: &VolumeContentSource) -> Result<(), Status> {
    match &source.r#type {
        None => Err(Status::invalid_argument(
            "volume_content_source is set but names neither a snapshot nor a volume",
        )),
        Some(volume_content_source::Type::Snapshot(s)) if s.snapshot_id.is_empty() => Err(
            Status::invalid_argument("volume_content_source.snapshot.snapshot_id is required"),
        ),
        Some(volume_content_source::Type::Volume(v)) if v.volume_id.is_empty() => Err(
            Status::invalid_argument("volume_content_source.volume.volume_id is required"),
        ),
        Some(_) => Ok(()),
    }
}

/// What a new volume is to be made from: a snapshot or volume on this node, named but
/// not yet looked up (so that a retried CreateVolume finds its volume even if the source
/// has gone since).
struct Source {
    blockd: v1::create_volume_request::Source,
    /// For a snapshot: the volume its id says it was taken from.
    origin: Option<String>,
    /// The request's content source, echoed in the answer.
    csi: VolumeContentSource,
}

/// A source as blockd has it.
struct Resolved {
    size: u64,
    pool: String,
}

impl Source {
    /// Whether an existing volume was made from this source.
    fn matches(&self, volume: &v1::Volume) -> bool {
        use v1::create_volume_request::Source as Want;
        use v1::volume::Source as Have;
        match (&self.blockd, &volume.source) {
            (Want::SourceSnapshot(want), Some(Have::SourceSnapshot(have))) => want == have,
            (Want::SourceVolume(want), Some(Have::SourceVolume(have))) => want == have,
            _ => false,
        }
    }
}

/// The page of a listing, in the order of blockd names (tokens are blockd's: the last name
/// of the previous page, so deletions between pages lose nothing). `max_entries` 0 means
/// every entry, as the spec says; a token this controller did not hand out is `ABORTED`
/// (the spec's code).
pub(super) fn page(max_entries: i32, starting_token: &str) -> Result<PageRequest, Status> {
    let size = usize::try_from(max_entries).map_err(|_| {
        Status::invalid_argument(format!(
            "max_entries must not be negative (got {max_entries})"
        ))
    })?;
    let mut page = PageRequest::new(1, starting_token).map_err(|_| {
        Status::aborted(format!(
            "starting_token {starting_token:?} is not a token this plugin handed out; \
             start the listing again with an empty starting_token"
        ))
    })?;
    page.size = if size == 0 { usize::MAX } else { size };
    Ok(page)
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl ControllerService {
    /// The CSI view of a blockd volume.
    fn csi_volume(
        &self,
        volume: &v1::Volume,
        mut context: HashMap<String, String>,
        content_source: Option<VolumeContentSource>,
    ) -> Volume {
        context.insert(params::CONTEXT_POOL.to_string(), volume.pool.clone());
        Volume {
            capacity_bytes: saturating_i64(volume.size_bytes),
            volume_id: VolumeId::new(self.node(), &volume.name).to_string(),
            volume_context: context,
            content_source,
            accessible_topology: vec![self.topology()],
        }
    }

    /// The content source of an existing volume, as CSI ids; `snapshot_origins` maps
    /// snapshot names to the volume they were taken from. `None` when the source is gone.
    fn content_source_of(
        &self,
        volume: &v1::Volume,
        snapshot_origins: &HashMap<String, String>,
    ) -> Option<VolumeContentSource> {
        let kind = match volume.source.as_ref()? {
            v1::volume::Source::SourceSnapshot(snapshot) => {
                let origin = snapshot_origins.get(snapshot)?;
                volume_content_source::Type::Snapshot(SnapshotSource {
                    snapshot_id: SnapshotId::new(self.node(), origin, snapshot).to_string(),
                })
            }
            v1::volume::Source::SourceVolume(source) => {
                volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                    volume_id: VolumeId::new(self.node(), source).to_string(),
                })
            }
        };
        Some(VolumeContentSource { r#type: Some(kind) })
    }

    /// The condition of a volume: abnormal when its pool has failed.
    fn condition(volume: &v1::Volume, pools: &HashMap<String, String>) -> VolumeCondition {
        match pools.get(&volume.pool).map(String::as_str) {
            Some("ok") => VolumeCondition {
                abnormal: false,
                message: "volume is healthy".into(),
            },
            Some(health) => VolumeCondition {
                abnormal: true,
                message: format!(
                    "pool {:?} holding the volume is not healthy: {health}; see `blockctl pool \
                     show {}` and the blockd log",
                    volume.pool, volume.pool
                ),
            },
            None => VolumeCondition {
                abnormal: true,
                message: format!("pool {:?} holding the volume is missing", volume.pool),
            },
        }
    }

    fn published_nodes(&self, volume: &v1::Volume) -> Vec<String> {
        if volume.exported {
            vec![self.node().to_string()]
        } else {
            Vec::new()
        }
    }

    /// Pool name → health, for volume conditions.
    async fn pool_health(&self) -> Result<HashMap<String, String>, Status> {
        let pools = self.driver.blockd.list_pools().await?;
        Ok(pools.into_iter().map(|p| (p.name, p.health)).collect())
    }

    /// Checks that a CreateVolume content source names something on this node:
    /// `NOT_FOUND` when the id cannot name anything, `RESOURCE_EXHAUSTED` when it names
    /// another node (the provisioner then tries the node holding it).
    fn locate_source(&self, source: VolumeContentSource) -> Result<Source, Status> {
        use v1::create_volume_request::Source as Blockd;
        let Some(kind) = source.r#type.clone() else {
            return Err(Status::invalid_argument(
                "volume_content_source is set but names neither a snapshot nor a volume",
            ));
        };
        let (blockd, origin) = match kind {
            volume_content_source::Type::Snapshot(SnapshotSource { snapshot_id }) => {
                match self.locate_snapshot(&snapshot_id) {
                    Located::Malformed(err) => {
                        return Err(Status::not_found(format!(
                            "source snapshot {snapshot_id:?} does not exist: {err}"
                        )))
                    }
                    Located::Elsewhere(sid) => {
                        return Err(Status::resource_exhausted(format!(
                            "source snapshot {snapshot_id:?} lives on node {:?}; a volume made \
                             from it can only be provisioned there, not on {:?}",
                            sid.node,
                            self.node()
                        )))
                    }
                    Located::Here(sid) => (Blockd::SourceSnapshot(sid.snapshot), Some(sid.volume)),
                }
            }
            volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id,
            }) => match self.locate_volume(&volume_id) {
                Located::Malformed(err) => {
                    return Err(Status::not_found(format!(
                        "source volume {volume_id:?} does not exist: {err}"
                    )))
                }
                Located::Elsewhere(vid) => {
                    return Err(Status::resource_exhausted(format!(
                        "source volume {volume_id:?} lives on node {:?}; a clone of it can \
                         only be provisioned there, not on {:?}",
                        vid.node,
                        self.node()
                    )))
                }
                Located::Here(vid) => (Blockd::SourceVolume(vid.volume), None),
            },
        };
        Ok(Source {
            blockd,
            origin,
            csi: source,
        })
    }

    /// Looks a located source up in blockd: its size and pool, or `NOT_FOUND`.
    async fn resolve(&self, source: &Source) -> Result<Resolved, Status> {
        use v1::create_volume_request::Source as Blockd;
        let missing = |what: &str, name: &str| {
            Status::not_found(format!(
                "source {what} {name:?} does not exist on node {:?}",
                self.node()
            ))
        };
        match &source.blockd {
            Blockd::SourceSnapshot(name) => {
                let snapshot = self
                    .blockd_snapshot(name)
                    .await?
                    .filter(|s| source.origin.as_ref() == Some(&s.volume))
                    .ok_or_else(|| missing("snapshot", name))?;
                Ok(Resolved {
                    size: snapshot.size_bytes,
                    pool: snapshot.pool,
                })
            }
            Blockd::SourceVolume(name) => {
                let volume = self
                    .blockd_volume(name)
                    .await?
                    .ok_or_else(|| missing("volume", name))?;
                Ok(Resolved {
                    size: volume.size_bytes,
                    pool: volume.pool,
                })
            }
        }
    }

    pub(super) async fn create(
        &self,
        req: CreateVolumeRequest,
    ) -> Result<CreateVolumeResponse, Status> {
        require_field(req.name.is_empty(), "name")?;
        let access = capability::check(&req.volume_capabilities)?;
        let mut params = VolumeParams::parse(&req.parameters)?;
        // A VolumeAttributesClass given at creation: its keys win over the StorageClass's.
        MutableParams::parse(&req.mutable_parameters)?.overlay(&mut params);
        let fs_type = match (params.fs_type, access.fs_type) {
            (Some(param), Some(cap)) if param != cap => {
                return Err(Status::invalid_argument(format!(
                    "parameter {}={param} contradicts the mount capability's fs_type {cap}",
                    params::FS_TYPE
                )))
            }
            (param, cap) => param.or(cap),
        };
        let range = Range::parse(req.capacity_range.as_ref())?;
        if let Some(source) = &req.volume_content_source {
            source_fields(source)?;
        }
        if let Some(topology) = &req.accessibility_requirements {
            if !topology.requisite.is_empty() && !topology.requisite.iter().any(|t| self.admits(t))
            {
                return Err(Status::resource_exhausted(format!(
                    "accessibility_requirements do not admit node {:?} (topology key {}); \
                     this csi-shim can only provision volumes on its own node",
                    self.node(),
                    crate::ids::TOPOLOGY_KEY
                )));
            }
        }
        let source = match req.volume_content_source.clone() {
            None => None,
            Some(source) => Some(self.locate_source(source)?),
        };

        let name = blockd_name(NameKind::Volume, &req.name);
        let id = VolumeId::new(self.node(), &name);
        let _guard = self.driver.locks.try_lock(&id.to_string())?;

        let mut context = HashMap::new();
        if access.mount {
            if let Some(fs) = fs_type {
                context.insert(params::CONTEXT_FS_TYPE.to_string(), fs.to_string());
            }
        }
        let echo = source.as_ref().map(|s| s.csi.clone());

        if let Some(existing) = self.blockd_volume(&name).await? {
            self.check_compatible(&existing, &range, &params, source.as_ref())?;
            tracing::info!(volume = %id, size_bytes = existing.size_bytes, "volume already exists");
            return Ok(CreateVolumeResponse {
                volume: Some(self.csi_volume(&existing, context, echo)),
            });
        }

        let resolved = match &source {
            None => None,
            Some(source) => Some(self.resolve(source).await?),
        };
        let size = capacity::new_volume_size(&range, resolved.as_ref().map(|s| s.size))?;
        let pool_name = match (&params.pool, &resolved) {
            (Some(pool), Some(source)) if *pool != source.pool => {
                return Err(Status::invalid_argument(format!(
                    "the source lives in pool {:?}, but parameter pool={pool:?}: a copy-on-write \
                     clone or restore stays in its source's pool; drop the pool parameter or \
                     use a StorageClass for pool {:?}",
                    source.pool, source.pool
                )))
            }
            (Some(pool), _) => Some(pool.as_str()),
            (None, Some(source)) => Some(source.pool.as_str()),
            (None, None) => None,
        };
        let pool = self.blockd_pool(pool_name).await?.ok_or_else(|| {
            Status::resource_exhausted(format!(
                "node {:?} has no blockd pool {:?}",
                self.node(),
                pool_name.unwrap_or("(default)")
            ))
        })?;
        capacity::admit(
            &pool,
            self.driver.args.overprovisioning_ratio,
            size,
            self.node(),
        )?;
        let qos = params.qos(size);
        let policy = modify::policy_of(&params);
        let created = self
            .driver
            .blockd
            .volumes()
            .create_volume(v1::CreateVolumeRequest {
                name: name.clone(),
                size_bytes: Some(size),
                pool: pool.name.clone(),
                source: source.as_ref().map(|s| s.blockd.clone()),
                // blockd derives the same limits from the policy and keeps the policy,
                // so that the IOPS limit follows the size on expansion.
                max_iops: policy.max_iops,
                max_bandwidth_bytes: policy.max_bandwidth_bytes,
                iops_per_gb: policy.iops_per_gb,
            })
            .await
            .map_err(|status| upstream(&format!("creating volume {name:?}"), status))?
            .into_inner();
        let volume = created
            .volume
            .ok_or_else(|| Status::internal("blockd answered CreateVolume without a volume"))?;
        tracing::info!(
            volume = %id,
            pool = %volume.pool,
            size_bytes = volume.size_bytes,
            max_iops = qos.max_iops,
            max_bandwidth_bytes = qos.max_bandwidth_bytes,
            source = ?volume.source,
            created = created.created,
            "created volume"
        );
        Ok(CreateVolumeResponse {
            volume: Some(self.csi_volume(&volume, context, echo)),
        })
    }

    /// `ALREADY_EXISTS` unless `existing` is what this request would have made.
    fn check_compatible(
        &self,
        existing: &v1::Volume,
        range: &Range,
        params: &VolumeParams,
        source: Option<&Source>,
    ) -> Result<(), Status> {
        let conflict = |what: String| {
            Status::already_exists(format!(
                "volume {:?} already exists with {what}; use another name or the same \
                 parameters",
                existing.name
            ))
        };
        if !range.admits(existing.size_bytes) {
            return Err(conflict(format!(
                "size {} bytes, outside the requested capacity_range",
                existing.size_bytes
            )));
        }
        match source {
            None if existing.source.is_some() => {
                return Err(conflict(format!("content source {:?}", existing.source)))
            }
            Some(source) if !source.matches(existing) => {
                return Err(conflict(format!(
                    "content source {:?}, not {:?}",
                    existing.source, source.blockd
                )))
            }
            _ => {}
        }
        if let Some(pool) = &params.pool {
            if *pool != existing.pool {
                return Err(conflict(format!("pool {:?}", existing.pool)));
            }
        }
        let want = params.qos(existing.size_bytes);
        let have = existing.qos.unwrap_or_default();
        if want.max_iops != have.max_iops || want.max_bandwidth_bytes != have.max_bandwidth_bytes {
            return Err(conflict(format!(
                "QoS max_iops={} max_bandwidth_bytes={} (these parameters give max_iops={} \
                 max_bandwidth_bytes={})",
                have.max_iops, have.max_bandwidth_bytes, want.max_iops, want.max_bandwidth_bytes
            )));
        }
        Ok(())
    }

    pub(super) async fn delete(
        &self,
        req: DeleteVolumeRequest,
    ) -> Result<DeleteVolumeResponse, Status> {
        require_field(req.volume_id.is_empty(), "volume_id")?;
        let vid = match self.locate_volume(&req.volume_id) {
            Located::Malformed(err) => {
                // No volume can have this id, so it is already gone (the spec's OK).
                tracing::info!(error = %err, "malformed volume id: nothing to delete");
                return Ok(DeleteVolumeResponse {});
            }
            Located::Elsewhere(vid) => {
                return Err(self.elsewhere("volume", &req.volume_id, &vid.node));
            }
            Located::Here(vid) => vid,
        };
        let _guard = self.driver.locks.try_lock(&vid.to_string())?;
        let Some(volume) = self.blockd_volume(&vid.volume).await? else {
            tracing::info!("volume does not exist: nothing to delete");
            return Ok(DeleteVolumeResponse {});
        };
        if volume.exported {
            return Err(Status::failed_precondition(format!(
                "volume {:?} is in use: it is exported over NBD (staged on node {:?}); \
                 unstage it first (or `blockctl unexport {}`)",
                req.volume_id,
                self.node(),
                vid.volume
            )));
        }
        // Never force: a volume with connected NBD clients is in use, and CSI lets
        // DeleteVolume say so (FAILED_PRECONDITION, passed through).
        let result = self.driver.blockd.delete_volume(&vid.volume, false).await;
        let deleted = found(result, || format!("deleting volume {:?}", vid.volume))?;
        if deleted.is_some() {
            tracing::info!(volume = %vid, "deleted volume");
        }
        Ok(DeleteVolumeResponse {})
    }

    pub(super) async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, Status> {
        require_field(req.volume_id.is_empty(), "volume_id")?;
        let checked = capability::check(&req.volume_capabilities);
        if let Err(err) = &checked {
            if err.is_missing_field() {
                return Err(Status::invalid_argument(err.to_string()));
            }
        }
        let vid = self.local_volume("volume", &req.volume_id)?;
        if self.blockd_volume(&vid.volume).await?.is_none() {
            return Err(Status::not_found(format!(
                "volume {:?} does not exist",
                req.volume_id
            )));
        }
        let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        if let Err(err) = checked {
            return Ok(unconfirmed(err.to_string()));
        }
        if let Err(err) = VolumeParams::parse(&req.parameters) {
            return Ok(unconfirmed(err.to_string()));
        }
        if let Err(err) = MutableParams::parse(&req.mutable_parameters) {
            return Ok(unconfirmed(err.message().to_string()));
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    pub(super) async fn list(
        &self,
        req: ListVolumesRequest,
    ) -> Result<ListVolumesResponse, Status> {
        let page = page(req.max_entries, &req.starting_token)?;
        let volumes = self.all_volumes().await?;
        let origins: HashMap<String, String> = if volumes
            .iter()
            .any(|v| matches!(v.source, Some(v1::volume::Source::SourceSnapshot(_))))
        {
            self.all_snapshots()
                .await?
                .into_iter()
                .map(|s| (s.name, s.volume))
                .collect()
        } else {
            HashMap::new()
        };
        let pools = self.pool_health().await?;
        let (volumes, next_token) = page.apply(volumes, |v| v.name.as_str());
        let entries = volumes
            .iter()
            .map(|v| list_volumes_response::Entry {
                volume: Some(self.csi_volume(
                    v,
                    HashMap::new(),
                    self.content_source_of(v, &origins),
                )),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: self.published_nodes(v),
                    volume_condition: Some(Self::condition(v, &pools)),
                }),
            })
            .collect();
        Ok(ListVolumesResponse {
            entries,
            next_token,
        })
    }

    pub(super) async fn capacity(
        &self,
        req: GetCapacityRequest,
    ) -> Result<GetCapacityResponse, Status> {
        let params = VolumeParams::parse(&req.parameters)?;
        let nothing = |why: &str| {
            tracing::debug!(reason = why, "no capacity for this request");
            GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: None,
            }
        };
        if !req.volume_capabilities.is_empty() {
            if let Err(err) = capability::check(&req.volume_capabilities) {
                return Ok(nothing(&err.to_string()));
            }
        }
        if let Some(topology) = &req.accessible_topology {
            if !self.admits(topology) {
                return Ok(nothing("the topology does not name this node"));
            }
        }
        let Some(pool) = self.blockd_pool(params.pool.as_deref()).await? else {
            return Ok(nothing("no such pool on this node"));
        };
        let room = capacity::room(&pool, self.driver.args.overprovisioning_ratio);
        tracing::debug!(
            pool = %pool.name,
            free_bytes = pool.free_bytes,
            provisioned_bytes = pool.provisioned_bytes,
            available = room.available,
            maximum_volume_size = room.max_volume_size,
            "capacity"
        );
        Ok(GetCapacityResponse {
            available_capacity: saturating_i64(room.available),
            maximum_volume_size: Some(saturating_i64(room.max_volume_size)),
            minimum_volume_size: Some(SIZE_GRANULE as i64),
        })
    }

    pub(super) async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, Status> {
        require_field(req.volume_id.is_empty(), "volume_id")?;
        let Some(range) = req.capacity_range.as_ref() else {
            return Err(Status::invalid_argument("capacity_range is required"));
        };
        let range = Range::parse(Some(range))?;
        if range.is_empty() {
            return Err(capacity::SizeError::Empty.into());
        }
        let node_expansion_required = match &req.volume_capability {
            Some(cap) => {
                capability::check(std::slice::from_ref(cap))?;
                !matches!(cap.access_type, Some(AccessType::Block(_)))
            }
            // Unknown: let the node decide (NodeExpandVolume on a block volume is a no-op).
            None => true,
        };
        let vid = self.local_volume("volume", &req.volume_id)?;
        let _guard = self.driver.locks.try_lock(&vid.to_string())?;
        let volume = self.blockd_volume(&vid.volume).await?.ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let size = capacity::expanded_size(&range, volume.size_bytes)?;
        if size > volume.size_bytes {
            if let Some(pool) = self.blockd_pool(Some(&volume.pool)).await? {
                capacity::admit(
                    &pool,
                    self.driver.args.overprovisioning_ratio,
                    size - volume.size_bytes,
                    self.node(),
                )?;
            }
            let resized = self
                .driver
                .blockd
                .volumes()
                .resize_volume(v1::ResizeVolumeRequest {
                    name: vid.volume.clone(),
                    size_bytes: size,
                    force: false,
                })
                .await
                .map_err(|status| upstream(&format!("resizing volume {:?}", vid.volume), status))?
                .into_inner();
            tracing::info!(
                volume = %vid,
                old_size_bytes = volume.size_bytes,
                size_bytes = resized.size_bytes,
                old_size = %format_size(volume.size_bytes),
                new_size = %format_size(resized.size_bytes),
                "expanded volume"
            );
            return Ok(ControllerExpandVolumeResponse {
                capacity_bytes: saturating_i64(resized.size_bytes),
                node_expansion_required,
            });
        }
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: saturating_i64(volume.size_bytes),
            node_expansion_required,
        })
    }

    pub(super) async fn get(
        &self,
        req: ControllerGetVolumeRequest,
    ) -> Result<ControllerGetVolumeResponse, Status> {
        require_field(req.volume_id.is_empty(), "volume_id")?;
        let vid = self.local_volume("volume", &req.volume_id)?;
        let volume = self.blockd_volume(&vid.volume).await?.ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let mut origins = HashMap::new();
        if let Some(v1::volume::Source::SourceSnapshot(snapshot)) = &volume.source {
            if let Some(s) = self.blockd_snapshot(snapshot).await? {
                origins.insert(s.name, s.volume);
            }
        }
        let pools = self.pool_health().await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(self.csi_volume(
                &volume,
                HashMap::new(),
                self.content_source_of(&volume, &origins),
            )),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: self.published_nodes(&volume),
                volume_condition: Some(Self::condition(&volume, &pools)),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn bad_tokens_are_aborted_and_negative_sizes_invalid() {
        assert_eq!(page(-1, "").unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(page(5, "garbage").unwrap_err().code(), Code::Aborted);
        let p = page(2, "").unwrap();
        let (first, token) = p.apply(vec!["c", "a", "b"], |s| s);
        assert_eq!(first, vec!["a", "b"]);
        let (rest, token) = page(2, &token).unwrap().apply(vec!["c", "a", "b"], |s| s);
        assert_eq!((rest, token.as_str()), (vec!["c"], ""));
        // 0: no limit, however many there are (blockd's own pages stop at 1000).
        let many: Vec<String> = (0..2500).map(|i| format!("v{i:05}")).collect();
        let (all, token) = page(0, "").unwrap().apply(many.clone(), |s| s.as_str());
        assert_eq!((all.len(), token.as_str()), (2500, ""));
        let (big, token) = page(2000, "").unwrap().apply(many, |s| s.as_str());
        assert_eq!(big.len(), 2000);
        assert!(!token.is_empty());
    }
}
