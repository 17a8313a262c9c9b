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

pub mod attach;
pub mod error;
pub mod exec;
pub mod fs;
pub mod mount;
pub mod state;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockd_proto::csi::node_server::Node;
use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_proto::csi::volume_capability::AccessType;
use blockd_proto::csi::{
    node_service_capability, volume_usage, NodeExpandVolumeRequest, NodeExpandVolumeResponse,
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability,
    NodeStageVolumeRequest, NodeStageVolumeResponse, NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology,
    VolumeCapability, VolumeCondition, VolumeUsage,
};
use blockd_proto::v1::{ExportRequest, GetVolumeRequest, UnexportRequest};
use parking_lot::Mutex;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use self::attach::Attacher;
use self::error::{NodeError, Result};
use self::state::{Access, Capability, Phase, Publication, StagedVolume, StateStore};
use crate::ids::{VolumeId, TOPOLOGY_KEY};
use crate::Driver;

/// How long the I/O probe of NodeGetVolumeStats may take before the volume is abnormal.
const IO_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct NodeService {
    driver: Arc<Driver>,
    store: StateStore,
    attacher: Attacher,
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
        let attacher = Attacher::new(&driver.args);
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
        if driver.args.attach == crate::config::AttachMode::Nbd {
            if let Some(reason) = attach::kernel_nbd_unavailable() {
                tracing::warn!(reason = %reason, "--attach nbd cannot stage volumes on this node");
            }
        }
        Ok(NodeService {
            driver,
            store,
            attacher,
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

    async fn blockd_volume_size(&self, id: &VolumeId) -> Result<u64> {
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
    fn stage_intact(&self, record: &StagedVolume) -> Result<bool> {
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
    async fn teardown(&self, record: &StagedVolume) -> Result<()> {
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

    async fn stage(&self, id: &VolumeId, staging: PathBuf, requested: Capability) -> Result<()> {
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
                    let _ = self
                        .driver
                        .blockd
                        .exports()
                        .unexport(UnexportRequest {
                            image: id.volume.clone(),
                            force: true,
                        })
                        .await;
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
    async fn finish_stage(&self, record: &mut StagedVolume) -> Result<()> {
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

    async fn unstage(&self, id: &VolumeId, staging: PathBuf) -> Result<()> {
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
        match self
            .driver
            .blockd
            .exports()
            .unexport(UnexportRequest {
                image: id.volume.clone(),
                // force: teardown has just unmounted and detached this node's own client
                // (kernel NBD proxy or nbdfuse). blockd may not have seen its connection
                // close yet, and would refuse a plain unexport for it; any other client
                // of a volume the CO is unstaging has lost its claim to it.
                force: true,
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => {
                // Keep the record: the retry finds nothing mounted or attached and
                // unexports again.
                return Err(NodeError::Blockd(crate::blockd::upstream(
                    &format!("unexporting volume {} (local cleanup is done)", id.volume),
                    status,
                )));
            }
        }
        self.forget(&volume_id)?;
        tracing::info!(volume_id = %volume_id, "unstaged");
        Ok(())
    }

    async fn publish(
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

    async fn unpublish(&self, id: &VolumeId, target: PathBuf) -> Result<()> {
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
    fn record_at(&self, id: &VolumeId, path: &Path) -> Result<StagedVolume> {
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

    async fn stats(&self, id: &VolumeId, path: PathBuf) -> Result<NodeGetVolumeStatsResponse> {
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

    async fn expand(
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

fn clamp(v: u64) -> i64 {
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

/// Whether a repeated NodeStageVolume matches what is staged. An empty requested fs type
/// means "whatever the volume holds".
fn stage_compatible(staged: &Capability, requested: &Capability) -> bool {
    access_compatible(&staged.access, &requested.access) && staged.mode == requested.mode
}

/// Whether a publication's capability fits the staged volume (mode may differ: publish
/// decides read-only and single/multi writer per target).
fn publish_compatible(staged: &Capability, requested: &Capability) -> bool {
    match (&staged.access, &requested.access) {
        (Access::Block, Access::Block) => true,
        (Access::Mount { fs_type: a, .. }, Access::Mount { fs_type: b, .. }) => {
            b.is_empty() || a == b
        }
        _ => false,
    }
}

fn access_compatible(staged: &Access, requested: &Access) -> bool {
    match (staged, requested) {
        (Access::Block, Access::Block) => true,
        (
            Access::Mount {
                fs_type: a,
                mount_flags: fa,
            },
            Access::Mount {
                fs_type: b,
                mount_flags: fb,
            },
        ) => {
            let mut fa = fa.clone();
            let mut fb = fb.clone();
            fa.sort();
            fb.sort();
            (b.is_empty() || a == b) && fa == fb
        }
        _ => false,
    }
}

/// Validates a capability's fields (`INVALID_ARGUMENT`) and turns it into the node's
/// form. Whether blockd supports its access mode is [`supported`]'s question, asked after
/// every field of the request is checked.
fn capability(cap: Option<&VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or(NodeError::MissingField("volume_capability"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or(NodeError::BadCapability("access_mode is required"))?;
    let mode = Mode::try_from(mode.mode)
        .map_err(|_| NodeError::BadCapability("access_mode has an unknown value"))?;
    if mode == Mode::Unknown {
        return Err(NodeError::BadCapability("access_mode is required"));
    }
    let access = match cap.access_type.as_ref().ok_or(NodeError::BadCapability(
        "access_type (mount or block) is required",
    ))? {
        AccessType::Block(_) => Access::Block,
        AccessType::Mount(m) => {
            if !m.fs_type.is_empty() {
                fs::FsType::parse(&m.fs_type)?;
            }
            Access::Mount {
                fs_type: m.fs_type.clone(),
                mount_flags: m.mount_flags.clone(),
            }
        }
    };
    Ok(Capability {
        access,
        mode: mode.as_str_name().to_string(),
    })
}

/// Checks that blockd serves a (validated) capability's access mode: every
/// `SINGLE_NODE_*` mode, no `MULTI_NODE_*` one (a blockd volume lives on one node).
fn supported(cap: &Capability) -> Result<()> {
    match Mode::from_str_name(&cap.mode) {
        Some(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => Ok(()),
        _ => Err(NodeError::UnsupportedAccessMode(cap.mode.clone())),
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
            let id = self.volume_id(&req.volume_id)?;
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
    use blockd_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            })),
        }
    }

    #[test]
    fn capabilities_are_validated() {
        assert!(matches!(
            capability(None),
            Err(NodeError::MissingField("volume_capability"))
        ));
        let mut no_type = mount_cap("", Mode::SingleNodeWriter);
        no_type.access_type = None;
        assert!(matches!(
            capability(Some(&no_type)),
            Err(NodeError::BadCapability(_))
        ));
        assert!(matches!(
            capability(Some(&mount_cap("btrfs", Mode::SingleNodeWriter))),
            Err(NodeError::UnsupportedFsType(_))
        ));
        // A multi-node mode is a well-formed field that blockd does not support.
        let multi = capability(Some(&mount_cap("", Mode::MultiNodeMultiWriter))).unwrap();
        assert!(matches!(
            supported(&multi),
            Err(NodeError::UnsupportedAccessMode(_))
        ));
        let single = capability(Some(&mount_cap("", Mode::SingleNodeMultiWriter))).unwrap();
        assert!(supported(&single).is_ok());
        assert!(matches!(
            capability(Some(&mount_cap("", Mode::Unknown))),
            Err(NodeError::BadCapability(_))
        ));
        let block = VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        };
        assert_eq!(capability(Some(&block)).unwrap().access, Access::Block);
    }

    #[test]
    fn stage_compatibility_treats_an_empty_fs_type_as_any() {
        let staged = capability(Some(&mount_cap("xfs", Mode::SingleNodeWriter))).unwrap();
        let any = capability(Some(&mount_cap("", Mode::SingleNodeWriter))).unwrap();
        let ext4 = capability(Some(&mount_cap("ext4", Mode::SingleNodeWriter))).unwrap();
        let other_mode = capability(Some(&mount_cap("xfs", Mode::SingleNodeReaderOnly))).unwrap();
        assert!(stage_compatible(&staged, &any));
        assert!(!stage_compatible(&staged, &ext4));
        assert!(!stage_compatible(&staged, &other_mode));
        assert!(publish_compatible(&staged, &other_mode));
    }

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
