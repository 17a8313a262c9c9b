//! CSI inline ephemeral volumes: a volume declared in the pod spec, which the node creates
//! in NodePublishVolume and deletes in NodeUnpublishVolume (the CSIDriver lists the
//! `Ephemeral` lifecycle mode). Kubelet marks such a publish with the volume context
//! `csi.storage.k8s.io/ephemeral: "true"`, sends the pod's `volumeAttributes` as the rest
//! of the context, no staging path, and a `volume_id` of its own making.
//!
//! ```text
//!   NodePublishVolume    record ─▶ blockd CreateVolume ─▶ stage (private staging dir) ─▶ publish
//!   NodeUnpublishVolume  unpublish ─▶ unstage (unmount, detach, unexport) ─▶ DeleteVolume ─▶ drop record
//! ```
//!
//! Attributes (`volumeAttributes` in the pod), all optional:
//!
//! | key                                   | value                                        | default |
//! |---------------------------------------|----------------------------------------------|---------|
//! | `size`                                | a Kubernetes quantity: `1Gi`, `500Mi`, `2G`  | `1Gi`   |
//! | `fsType` or `csi.storage.k8s.io/fstype` | `ext4` or `xfs` (also the pod's `csi.fsType`) | `ext4` |
//! | `pool`, `maxIops`, `iopsPerGB`, `maxBandwidth` | as in a StorageClass ([`crate::params`]) | none |
//!
//! Invariants:
//! - the blockd volume is named by a pure function of kubelet's `volume_id`
//!   ([`ephemeral_volume_name`]), and it is staged as the node's own volume
//!   `NODE/NAME` at `--state-dir/ephemeral/<id>/staging`, so every step is the persistent
//!   flow's idempotent step and a retry after a crash finds what the first try made;
//! - a record under `--state-dir/ephemeral/` is written before the volume is created and
//!   removed only after it is deleted: while anything of the volume may exist, the record
//!   says so, and NodeUnpublishVolume (or the retried publish) finishes the job;
//! - a publish that fails takes back everything it made, so a pod whose volume could not
//!   be set up (a final error, after which kubelet does not unpublish) leaves nothing;
//!   a crash leaves the record, and kubelet's retry or unpublish cleans up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blockd_proto::v1;
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::error::NodeError;
use super::state::{file_key, Access, Capability};
use super::NodeService;
use crate::blockd::{found, upstream};
use crate::controller::capacity::{self, Range};
use crate::ids::{ephemeral_volume_name, VolumeId, EPHEMERAL_CONTEXT_KEY};
use crate::params::{self, VolumeParams};

/// The size of an ephemeral volume whose attributes name none.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// The attribute giving an ephemeral volume's size.
pub const SIZE: &str = "size";

/// Environment variable naming a step at which csi-shim kills itself (SIGKILL), so that
/// tests can crash it between the steps of an ephemeral publish: `ephemeral-created`
/// (volume created, not staged) or `ephemeral-staged` (staged, not published).
pub const CRASH_POINT_ENV: &str = "CSI_SHIM_CRASH_POINT";

/// Whether a NodePublishVolume's volume context asks for an inline ephemeral volume.
pub fn requested(context: &HashMap<String, String>) -> bool {
    context.get(EPHEMERAL_CONTEXT_KEY).map(String::as_str) == Some("true")
}

/// What the node keeps about one ephemeral volume (one JSON file per `volume_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EphemeralVolume {
    /// Kubelet's volume id.
    pub volume_id: String,
    /// The blockd volume name.
    pub volume: String,
    /// The private staging directory.
    pub staging_path: PathBuf,
}

/// A validated ephemeral volume request.
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    size: u64,
    fs_type: params::FsType,
    params: VolumeParams,
}

/// Reads the volume attributes (see the module docs); `INVALID_ARGUMENT` naming the
/// attribute for anything it cannot use. `cap_fs_type` is the mount capability's fs type.
fn parse_spec(context: &HashMap<String, String>, cap_fs_type: &str) -> Result<Spec, Status> {
    let invalid = |key: &str, value: &str, reason: String| {
        Status::invalid_argument(format!(
            "Inline ephemeral volume attribute {key}={value:?}: {reason}"
        ))
    };
    let mut rest = HashMap::new();
    let mut size = DEFAULT_SIZE;
    for (key, value) in context {
        match key.as_str() {
            SIZE => {
                size = params::parse_quantity(value).map_err(|e| {
                    invalid(
                        key,
                        value,
                        format!("expected a Kubernetes quantity such as 1Gi or 500Mi: {e}"),
                    )
                })?;
                if size == 0 {
                    return Err(invalid(key, value, "must be greater than 0".into()));
                }
            }
            params::CONTEXT_FS_TYPE => {
                rest.insert(params::FS_TYPE.to_string(), value.clone());
            }
            _ => {
                rest.insert(key.clone(), value.clone());
            }
        }
    }
    let params = VolumeParams::parse(&rest).map_err(|e| {
        Status::invalid_argument(format!("Inline ephemeral volume attributes: {e}"))
    })?;
    let size = capacity::new_volume_size(
        &Range {
            required: size,
            limit: None,
        },
        None,
    )
    .map_err(|e| {
        invalid(
            SIZE,
            context.get(SIZE).map(String::as_str).unwrap_or_default(),
            e.to_string(),
        )
    })?;
    let fs_type = match (params.fs_type, params::FsType::parse(cap_fs_type)) {
        (Some(attr), Some(cap)) if attr != cap => {
            return Err(Status::invalid_argument(format!(
                "Inline ephemeral volume attribute fsType {attr} contradicts the pod's \
                 csi.fsType {cap}"
            )))
        }
        (attr, cap) => attr.or(cap).unwrap_or(params::FsType::Ext4),
    };
    Ok(Spec {
        size,
        fs_type,
        params,
    })
}

/// Kills this process with SIGKILL when [`CRASH_POINT_ENV`] names `point` (tests only).
fn crash_point(point: &str) {
    if std::env::var(CRASH_POINT_ENV).is_ok_and(|p| p == point) {
        tracing::warn!(point, "crash point reached: killing csi-shim");
        // SAFETY: kill(2) on our own pid; the process ends here, as after `kill -9`.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

impl NodeService {
    fn ephemeral_record(&self, volume_id: &str) -> Result<Option<EphemeralVolume>, NodeError> {
        self.ephemeral.get(volume_id)
    }

    /// The node-internal id under which an ephemeral volume is staged.
    fn ephemeral_id(&self, record: &EphemeralVolume) -> VolumeId {
        VolumeId::new(&self.driver.args.node_id, &record.volume)
    }

    /// The internal id to use for a NodeGetVolumeStats of `volume_id`, when it is an
    /// ephemeral volume of this node.
    pub(super) fn ephemeral_stats_id(
        &self,
        volume_id: &str,
    ) -> Result<Option<VolumeId>, NodeError> {
        Ok(self
            .ephemeral_record(volume_id)?
            .map(|record| self.ephemeral_id(&record)))
    }

    /// NodePublishVolume of an inline ephemeral volume (the caller holds `volume_id`'s
    /// lock and has validated the capability).
    pub(super) async fn publish_ephemeral(
        &self,
        volume_id: &str,
        target: PathBuf,
        cap: Capability,
        readonly: bool,
        context: &HashMap<String, String>,
    ) -> Result<(), Status> {
        let cap_fs_type = match &cap.access {
            Access::Mount { fs_type, .. } => fs_type.clone(),
            Access::Block => String::new(),
        };
        let spec = parse_spec(context, &cap_fs_type)?;
        let record = match self.ephemeral_record(volume_id)? {
            Some(record) => record,
            None => {
                let record = EphemeralVolume {
                    volume_id: volume_id.to_string(),
                    volume: ephemeral_volume_name(volume_id),
                    staging_path: self
                        .driver
                        .args
                        .state_dir
                        .join("ephemeral")
                        .join(file_key(volume_id))
                        .join("staging"),
                };
                // Before anything exists: from here on, the record says what to clean up.
                self.ephemeral.put(volume_id, &record)?;
                record
            }
        };
        let id = self.ephemeral_id(&record);
        let _inner = self.driver.locks.try_lock(&id.to_string())?;
        // A volume already serving a pod is never taken back because a repeated publish
        // asked for something else.
        let in_use = self
            .record(&id.to_string())
            .is_some_and(|staged| !staged.published.is_empty());
        match self
            .set_up_ephemeral(&record, &id, &spec, target, cap, readonly)
            .await
        {
            Ok(()) => Ok(()),
            Err(err) if in_use => Err(err),
            Err(err) => {
                // Take back what this publish made: kubelet does not unpublish a volume
                // whose publish failed with a final error.
                if let Err(cleanup) = self.tear_down_ephemeral(&record, &id).await {
                    tracing::error!(
                        volume_id,
                        error = %cleanup.message(),
                        "cleanup after a failed ephemeral publish failed; NodeUnpublishVolume retries it"
                    );
                }
                Err(err)
            }
        }
    }

    async fn set_up_ephemeral(
        &self,
        record: &EphemeralVolume,
        id: &VolumeId,
        spec: &Spec,
        target: PathBuf,
        cap: Capability,
        readonly: bool,
    ) -> Result<(), Status> {
        self.create_ephemeral(id, spec).await?;
        crash_point("ephemeral-created");
        let stage_cap = Capability {
            access: match &cap.access {
                Access::Mount { mount_flags, .. } => Access::Mount {
                    fs_type: spec.fs_type.as_str().to_string(),
                    mount_flags: mount_flags.clone(),
                },
                Access::Block => Access::Block,
            },
            mode: cap.mode.clone(),
        };
        std::fs::create_dir_all(&record.staging_path)
            .map_err(|e| NodeError::io(format!("Creating {}", record.staging_path.display()), e))?;
        self.stage(id, record.staging_path.clone(), stage_cap)
            .await?;
        crash_point("ephemeral-staged");
        self.publish(id, record.staging_path.clone(), target, cap, readonly)
            .await?;
        tracing::info!(volume_id = %record.volume_id, volume = %record.volume, "ephemeral volume published");
        Ok(())
    }

    /// Creates the blockd volume unless it exists (a retry), after checking that its pool
    /// has room (`RESOURCE_EXHAUSTED` otherwise).
    async fn create_ephemeral(&self, id: &VolumeId, spec: &Spec) -> Result<(), Status> {
        let mut volumes = self.driver.blockd.volumes();
        let result = volumes
            .get_volume(v1::GetVolumeRequest {
                name: id.volume.clone(),
            })
            .await;
        if let Some(existing) = found(result, || format!("looking up volume {}", id.volume))? {
            let existing = existing.into_inner();
            tracing::info!(volume = %id, size_bytes = existing.size_bytes, "ephemeral volume already exists");
            return Ok(());
        }
        let pools = self.driver.blockd.list_pools().await?;
        let pool = pools
            .into_iter()
            .find(|p| match &spec.params.pool {
                Some(name) => p.name == *name,
                None => p.is_default,
            })
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "Inline ephemeral volume attribute pool={:?}: node {:?} has no such blockd pool",
                    spec.params.pool.as_deref().unwrap_or("(default)"),
                    self.driver.args.node_id
                ))
            })?;
        capacity::admit(
            &pool,
            self.driver.args.overprovisioning_ratio,
            spec.size,
            &self.driver.args.node_id,
        )?;
        let qos = spec.params.qos(spec.size);
        let created = volumes
            .create_volume(v1::CreateVolumeRequest {
                name: id.volume.clone(),
                size_bytes: Some(spec.size),
                pool: pool.name.clone(),
                max_iops: qos.max_iops,
                max_bandwidth_bytes: qos.max_bandwidth_bytes,
                ..Default::default()
            })
            .await
            .map_err(|status| upstream(&format!("creating volume {}", id.volume), status))?
            .into_inner();
        tracing::info!(
            volume = %id,
            pool = %pool.name,
            size_bytes = spec.size,
            max_iops = qos.max_iops,
            max_bandwidth_bytes = qos.max_bandwidth_bytes,
            created = created.created,
            "created ephemeral volume"
        );
        Ok(())
    }

    /// NodeUnpublishVolume of `volume_id` when it is (or was) an inline ephemeral volume;
    /// `false` when it is a persistent volume the caller handles. The caller holds
    /// `volume_id`'s lock.
    pub(super) async fn unpublish_ephemeral(
        &self,
        volume_id: &str,
        target: &Path,
    ) -> Result<bool, Status> {
        let Some(record) = self.ephemeral_record(volume_id)? else {
            if VolumeId::parse(volume_id).is_ok() {
                return Ok(false);
            }
            // Not an id csi-shim hands out and no record: an ephemeral volume already
            // gone (a repeated unpublish). Make sure nothing is left at the target.
            let id = VolumeId::new(&self.driver.args.node_id, ephemeral_volume_name(volume_id));
            self.unpublish(&id, target.to_path_buf()).await?;
            return Ok(true);
        };
        let id = self.ephemeral_id(&record);
        let _inner = self.driver.locks.try_lock(&id.to_string())?;
        self.unpublish(&id, target.to_path_buf()).await?;
        self.tear_down_ephemeral(&record, &id).await?;
        Ok(true)
    }

    /// Removes everything of an ephemeral volume, in reverse order of creation: its
    /// publications, its stage (mount, attachment, export), the blockd volume, the
    /// staging directory, and last the record. Each step is a no-op when already done.
    async fn tear_down_ephemeral(
        &self,
        record: &EphemeralVolume,
        id: &VolumeId,
    ) -> Result<(), Status> {
        if let Some(staged) = self.record(&id.to_string()) {
            for target in staged.published.keys() {
                self.unpublish(id, target.clone()).await?;
            }
        }
        self.unstage(id, record.staging_path.clone()).await?;
        // A crash between export and attach leaves an export no stage record knows of.
        // force: unstage above already detached this node's client; blockd may not have
        // seen its connection close yet (as in node unstage).
        let unexported = self.driver.blockd.unexport(&id.volume, true).await;
        found(unexported, || {
            format!("unexporting ephemeral volume {}", id.volume)
        })?;
        // force: unexported just above, with its connections closed.
        let result = self.driver.blockd.delete_volume(&id.volume, true).await;
        let deleted = found(result, || {
            format!("deleting ephemeral volume {}", id.volume)
        })?;
        if deleted.is_some() {
            tracing::info!(volume = %id, "deleted ephemeral volume");
        }
        if let Some(dir) = record.staging_path.parent() {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(NodeError::io(format!("Removing {}", dir.display()), e).into())
                }
            }
        }
        self.ephemeral.remove(&record.volume_id)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::string_map as ctx;
    use tonic::Code;

    #[test]
    fn only_a_true_ephemeral_key_asks_for_an_ephemeral_volume() {
        assert!(requested(&ctx(&[(EPHEMERAL_CONTEXT_KEY, "true")])));
        assert!(!requested(&ctx(&[(EPHEMERAL_CONTEXT_KEY, "false")])));
        assert!(!requested(&ctx(&[("pool", "p")])));
    }

    #[test]
    fn attributes_give_size_fs_type_and_qos() {
        let spec = parse_spec(&ctx(&[(EPHEMERAL_CONTEXT_KEY, "true")]), "").unwrap();
        assert_eq!(spec.size, DEFAULT_SIZE);
        assert_eq!(spec.fs_type, params::FsType::Ext4);
        let spec = parse_spec(
            &ctx(&[
                (EPHEMERAL_CONTEXT_KEY, "true"),
                (SIZE, "64Mi"),
                ("fsType", "xfs"),
                ("maxIops", "100"),
            ]),
            "",
        )
        .unwrap();
        assert_eq!(spec.size, 64 << 20);
        assert_eq!(spec.fs_type, params::FsType::Xfs);
        assert_eq!(spec.params.qos(spec.size).max_iops, 100);
        // A size that is not a multiple of 4 KiB rounds up; the pod's csi.fsType counts.
        let spec = parse_spec(&ctx(&[(SIZE, "1M")]), "xfs").unwrap();
        assert_eq!(spec.size, 1_003_520);
        assert_eq!(spec.fs_type, params::FsType::Xfs);
    }

    #[test]
    fn bad_attributes_are_invalid_arguments_naming_the_key() {
        for (pairs, cap_fs, needle) in [
            (&[(SIZE, "lots")][..], "", "size"),
            (&[(SIZE, "0")][..], "", "size"),
            (&[(SIZE, "-1Gi")][..], "", "size"),
            (&[("fsType", "btrfs")][..], "", "fstype"),
            (&[("fsType", "xfs")][..], "ext4", "contradicts"),
            (&[("colour", "red")][..], "", "colour"),
            (&[("maxIops", "0")][..], "", "maxIops"),
        ] {
            let err = parse_spec(&ctx(pairs), cap_fs).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{pairs:?}");
            assert!(
                err.message().contains(needle),
                "{pairs:?}: {}",
                err.message()
            );
        }
    }
}
