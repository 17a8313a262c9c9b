//! The storage engine: pools, thin volumes, O(1) snapshots and clones, copy-on-write,
//! group commit, GC, flatten and fsck.
//!
//! # Model
//! A pool is a device cut into fixed chunks (chunk 0 holds the superblock). A volume and
//! its snapshots form a *lineage* `L` sharing one chunk map `L | chunk | epoch -> physical`.
//! The head writes at epoch `e_head`; a snapshot records `e_S = e_head` and bumps `e_head`,
//! one small batch whatever the volume size. An image reading at epoch `e` sees, for each
//! chunk, the entry with the greatest epoch `<= e`, else its parent lineage at the pinned
//! epoch (clones), else zeros. A head write overwrites in place only an entry at `e_head`;
//! anything older may be seen by a snapshot and is copied-on-write to a fresh chunk.
//! Every physical chunk is owned by exactly one map entry or is free; free space is
//! derived from the map at open, so no refcounts exist to drift.
//!
//! # Crash safety (docs/design.md, "Crash safety")
//! - New mappings live in the in-memory overlay (`State::pending`) until a group commit
//!   flushes every dirty device and then writes one synced batch: a mapping is never
//!   durable before its data.
//! - Chunks freed by a commit go back to the allocator only after that commit is durable
//!   and every in-flight I/O on the pool has drained (`PoolRt::reclaim`); on pools whose
//!   device punches to zeros, they are punched first, and at open every free run is
//!   punched, so "a free chunk reads zeros" holds and a first 4 KiB write into a fresh
//!   chunk writes 4 KiB, not the whole chunk. On devices without that guarantee the
//!   first write fills the whole chunk.
//! - Snapshot and clone-from-volume quiesce the lineage (exclusive `gate`) and commit.
//! - Any metadata or device error during a commit fails the engine (`State::failed`):
//!   memory and disk may disagree, so only a restart (which rebuilds from disk) is safe.
//!   A full metadata file system is the exception: the engine keeps the batch, refuses
//!   new allocations and resumes by itself ([`meta_space`]).
//!
//! # Where this differs from the first design, and why
//! - Epoch 0 is reserved for chunks copied by flatten: they sit *under* every entry of the
//!   clone, so its snapshots keep reading what they read through the parent.
//! - GC needs no cursor intent: it derives its work from durable images and lineages, so a
//!   crash mid-GC simply redoes the remaining work.
//! - A forced shrink writes zero tombstones (or zeroed copies) at the head for every chunk
//!   past the new end instead of lowering a clone's parent limit: the parent pointer is
//!   shared with the clone's snapshots, which must keep reading through it.
//! - Every metadata batch is written synced (control operations are rare and the data
//!   path batches its remaps), so a crash loses at most a suffix of batches.
//! - Images carry stable ids (UUIDs) besides their names, and every link between images
//!   (a snapshot's volume, a clone's source) is kept by id, so a name reused after a
//!   delete never inherits another object's history; see [`records`] for how records
//!   written before ids existed get theirs.
//! - A pool refuses creates, clones and grows that would take the sum of its volume
//!   sizes past `max_overprovision` × its capacity ([`Engine::set_max_overprovision`]).
//! - The in-memory map mirrors every lineage (not only exported ones): free space has to be
//!   rebuilt from a full map scan at open anyway, and the mirror costs about 40 bytes per
//!   mapped chunk (64 MiB per TiB written at 64 KiB chunks).

mod commit;
pub mod delta;
pub mod error;
mod flatten;
mod fsck;
mod gc;
mod group;
mod images;
mod io;
pub mod meta_space;
mod open;
pub mod records;
mod state;
pub mod superblock;
pub mod types;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::device::BlockDevice;
use crate::meta::keys::{self, ZERO};
use crate::meta::{Cf, MetaStore, WriteBatch};

pub use delta::{DiffEnds, DiffExtent, DiffTarget, ExtentPage, SnapshotEpoch};
pub use error::{EngineError, ObjectKind, Result};
pub use group::{member_name, GroupSnapshotInfo};
pub use io::{DeviceIo, ReadPin, WritePin};
use records::{ImageKind, ImageRecord, LineageRecord};

use state::State;
pub use types::*;

/// One attached pool at run time. Immutable after open except for the counters.
#[derive(Debug)]
pub(crate) struct PoolRt {
    pub id: u64,
    pub idx: usize,
    pub name: String,
    pub path: String,
    pub uuid: String,
    pub chunk_size: u64,
    pub chunks: u64,
    pub device: Arc<dyn BlockDevice>,
    /// Data I/O holds it shared for its whole duration; releasing freed chunks takes it
    /// exclusively for a moment so no I/O on a chunk can outlive that chunk's ownership.
    pub reclaim: RwLock<()>,
    /// A free chunk reads as zeros (the device punches holes that read back zeros).
    pub zeroed_free: bool,
    /// Writes since the last device flush.
    pub dirty: AtomicBool,
}

impl PoolRt {
    pub fn offset(&self, phys: u64) -> u64 {
        phys * self.chunk_size
    }
}

pub(crate) struct Inner {
    pub meta: Arc<dyn MetaStore>,
    pub state: Mutex<State>,
    /// Signalled when a copy-on-write completes (writers of the same chunk wait on it).
    pub cow_done: Condvar,
    /// One commit at a time.
    pub commit_lock: Mutex<()>,
    /// Serialises control-plane operations (create, delete, snapshot, resize, ...).
    pub control: Mutex<()>,
    pub pools: Vec<Arc<PoolRt>>,
    pub background: Mutex<Option<commit::Background>>,
    pub stats: EngineStats,
    /// Over-provisioning limit (provisioned / capacity) per pool; None = unlimited.
    pub max_overprovision: Mutex<Option<f64>>,
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub commits: AtomicU64,
    pub cow_copies: AtomicU64,
    pub gc_freed_chunks: AtomicU64,
    /// Map entries of lineages GC still has to examine, after the last pass.
    pub gc_backlog: AtomicU64,
}

/// The engine handle. Cheap to clone; every method is blocking and thread-safe.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("pools", &self.inner.pools.len())
            .finish()
    }
}

/// An open image (volume head or snapshot) for the data path.
#[derive(Debug, Clone)]
pub struct ImageHandle {
    id: u64,
    name: Arc<str>,
    volume: Arc<str>,
    lineage: u64,
    /// None: the head (reads at the lineage's current `e_head`).
    epoch: Option<u64>,
    pool: usize,
}

impl ImageHandle {
    /// "VOL" or "VOL@SNAP".
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn volume(&self) -> &str {
        &self.volume
    }
    pub fn read_only(&self) -> bool {
        self.epoch.is_some()
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Validates a volume or snapshot name against the API's naming rule
/// ([`blockd_proto::rules::check_name`]).
pub fn validate_name(kind: ObjectKind, name: &str) -> Result<()> {
    blockd_proto::rules::check_name(name).map_err(|why| EngineError::InvalidName {
        kind,
        name: name.to_string(),
        reason: why.reason(),
    })
}

/// Rounds a requested size up to the size granule; rejects 0 and sizes past
/// [`MAX_VOLUME_SIZE`].
pub fn round_size(name: &str, size: u64) -> Result<u64> {
    if size == 0 {
        return Err(EngineError::InvalidSize {
            name: name.to_string(),
            reason: "size must be greater than 0".into(),
        });
    }
    blockd_proto::rules::round_volume_size(size).ok_or_else(|| EngineError::InvalidSize {
        name: name.to_string(),
        reason: format!("size {size} is too large"),
    })
}

fn lineage_put(batch: &mut WriteBatch, id: u64, rec: &LineageRecord) {
    batch.put_cf(Cf::Lineages, keys::id_key(id), records::encode(rec));
}

fn image_put(batch: &mut WriteBatch, id: u64, rec: &ImageRecord) {
    batch.put_cf(Cf::Images, keys::id_key(id), records::encode(rec));
}

fn next_id_put(batch: &mut WriteBatch, next: u64) {
    batch.put_cf(Cf::Meta, keys::NEXT_ID_KEY, keys::u64_value(next));
}

impl Engine {
    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    fn pool_by_name(&self, name: &str) -> Result<&Arc<PoolRt>> {
        self.inner
            .pools
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| EngineError::NotFound {
                kind: ObjectKind::Pool,
                name: name.to_string(),
            })
    }

    /// The default pool's name (the first attached).
    pub fn default_pool(&self) -> &str {
        &self.inner.pools[0].name
    }

    /// Sets the pools' over-provisioning limit: creates, clones and grows that would take
    /// the sum of a pool's volume sizes past `ratio` × its capacity are refused with
    /// [`EngineError::OverProvisioned`]. None (or a ratio that is not a positive finite
    /// number) means unlimited. The default is [`DEFAULT_MAX_OVERPROVISION`]. Lowering it
    /// below a pool's current ratio refuses further growth there; nothing is taken away.
    pub fn set_max_overprovision(&self, ratio: Option<f64>) {
        *self.inner.max_overprovision.lock() = ratio.filter(|r| r.is_finite() && *r > 0.0);
    }

    /// The over-provisioning limit in force (None = unlimited).
    pub fn max_overprovision(&self) -> Option<f64> {
        *self.inner.max_overprovision.lock()
    }

    /// Sum of the sizes of the volumes in pool `idx`.
    fn provisioned(st: &State, idx: usize) -> u64 {
        st.images
            .values()
            .filter(|img| img.kind == ImageKind::Volume)
            .filter(|img| st.lineages.get(&img.lineage).is_some_and(|l| l.pool == idx))
            .map(|img| img.size)
            .sum()
    }

    /// Refuses adding `requested` bytes of volume size to pool `idx` past the limit.
    fn check_provision(
        &self,
        st: &State,
        idx: usize,
        requested: u64,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let Some(max_ratio) = self.max_overprovision() else {
            return Ok(());
        };
        let p = &self.inner.pools[idx];
        let capacity = (p.chunks - 1) * p.chunk_size;
        let provisioned = Self::provisioned(st, idx);
        let limit = capacity as f64 * max_ratio;
        if (provisioned.saturating_add(requested)) as f64 > limit {
            return Err(EngineError::OverProvisioned {
                pool: p.name.clone(),
                what: what(),
                provisioned,
                requested,
                capacity,
                max_ratio,
            });
        }
        Ok(())
    }

    /// Engine counters (commits, copy-on-write copies, chunks freed by GC).
    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    fn pool_info(&self, st: &State, p: &PoolRt) -> PoolInfo {
        let alloc = &st.allocators[p.idx];
        let capacity = (p.chunks - 1) * p.chunk_size;
        let free = alloc.free_chunks() * p.chunk_size;
        let mut provisioned = 0;
        let mut volumes = 0;
        let mut snapshots = 0;
        for img in st.images.values() {
            let Some(lin) = st.lineages.get(&img.lineage) else {
                continue;
            };
            if lin.pool != p.idx {
                continue;
            }
            match img.kind {
                ImageKind::Volume => {
                    provisioned += img.size;
                    volumes += 1;
                }
                ImageKind::Snapshot => snapshots += 1,
            }
        }
        let health = match (&st.failed, st.open_problems.first()) {
            (Some(f), _) => format!("failed: {f}"),
            (None, Some(p)) => format!("degraded: {p}"),
            (None, None) => st
                .meta_full
                .as_ref()
                .map_or_else(|| "ok".to_string(), |full| full.health()),
        };
        PoolInfo {
            name: p.name.clone(),
            path: p.path.clone(),
            uuid: p.uuid.clone(),
            chunk_size_bytes: p.chunk_size,
            capacity_bytes: capacity,
            allocated_bytes: capacity - free,
            free_bytes: free,
            provisioned_bytes: provisioned,
            io_engine: p.device.engine(),
            volumes,
            snapshots,
            health,
            is_default: p.idx == 0,
            max_overprovision: self.max_overprovision(),
        }
    }

    pub fn pools(&self) -> Vec<PoolInfo> {
        let st = self.inner.state.lock();
        self.inner
            .pools
            .iter()
            .map(|p| self.pool_info(&st, p))
            .collect()
    }

    pub fn pool(&self, name: &str) -> Result<PoolInfo> {
        let p = self.pool_by_name(name)?;
        let st = self.inner.state.lock();
        Ok(self.pool_info(&st, p))
    }

    fn volume_info(&self, st: &State, id: u64) -> VolumeInfo {
        let img = &st.images[&id];
        let lin = &st.lineages[&img.lineage];
        let pool = &self.inner.pools[lin.pool];
        let mut allocated = 0u64;
        let mut last_chunk = None;
        // Entries are ordered (chunk, epoch): the last per chunk is what the head sees.
        for (&(c, _), &p) in lin.map().iter().rev() {
            if last_chunk == Some(c) {
                continue;
            }
            last_chunk = Some(c);
            if p != ZERO {
                allocated += pool.chunk_size;
            }
        }
        let snapshots = st
            .images
            .values()
            .filter(|i| i.kind == ImageKind::Snapshot && i.lineage == img.lineage)
            .count() as u64;
        let source_id =
            (img.source.is_some() && !img.source_id.is_empty()).then(|| img.source_id.clone());
        VolumeInfo {
            name: img.name.clone(),
            pool: pool.name.clone(),
            size_bytes: img.size,
            allocated_bytes: allocated.min(img.size.next_multiple_of(pool.chunk_size)),
            qos: img.qos,
            qos_policy: Self::policy_of(img),
            source: img.source.clone(),
            id: img.uuid.clone(),
            source_deleted: source_id.as_deref().is_some_and(|s| !st.is_live(s)),
            source_id,
            has_parent: lin.rec.parent.is_some(),
            snapshots,
            created_unix: img.created_unix,
        }
    }

    fn snapshot_info(&self, st: &State, id: u64) -> SnapshotInfo {
        let img = &st.images[&id];
        let pool = st
            .lineages
            .get(&img.lineage)
            .map(|l| self.inner.pools[l.pool].name.clone())
            .unwrap_or_default();
        SnapshotInfo {
            name: img.name.clone(),
            volume: img.origin.clone(),
            id: img.uuid.clone(),
            volume_id: img.origin_id.clone(),
            volume_deleted: !st.is_live(&img.origin_id),
            pool,
            size_bytes: img.size,
            created_unix: img.created_unix,
            group: (!img.group.is_empty()).then(|| img.group.clone()),
            replica_of: (!img.replica_of.is_empty()).then(|| img.replica_of.clone()),
        }
    }

    fn volume_id(st: &State, name: &str) -> Result<u64> {
        st.volumes_by_name
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::NotFound {
                kind: ObjectKind::Volume,
                name: name.to_string(),
            })
    }

    fn snapshot_id(st: &State, name: &str) -> Result<u64> {
        st.snapshots_by_name
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::NotFound {
                kind: ObjectKind::Snapshot,
                name: name.to_string(),
            })
    }

    /// Refuses changes: after a fatal error, with metadata problems, and while the
    /// metadata file system is full (`meta_space`).
    fn check_writable(st: &State) -> Result<()> {
        Self::check_alive(st)?;
        Self::check_meta_space(st)
    }

    /// Refuses data-path writes after a fatal error or with metadata problems.
    fn check_alive(st: &State) -> Result<()> {
        if let Some(f) = &st.failed {
            return Err(EngineError::Failed(f.clone()));
        }
        if let Some(p) = st.open_problems.first() {
            return Err(EngineError::Failed(format!(
                "metadata needs fsck --repair: {p}"
            )));
        }
        Ok(())
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        let st = self.inner.state.lock();
        let id = Self::volume_id(&st, name)?;
        Ok(self.volume_info(&st, id))
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let st = self.inner.state.lock();
        let mut v: Vec<_> = st
            .volumes_by_name
            .values()
            .map(|&id| self.volume_info(&st, id))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let st = self.inner.state.lock();
        let id = Self::snapshot_id(&st, name)?;
        Ok(self.snapshot_info(&st, id))
    }

    /// Snapshots, optionally of one volume, sorted by name. A volume that exists is
    /// matched by id (a snapshot of an earlier, deleted volume of the same name is not
    /// its snapshot); a name no volume has now lists the snapshots its deleted volume
    /// left.
    pub fn snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let st = self.inner.state.lock();
        let live = volume.and_then(|vol| st.volumes_by_name.get(vol).map(|id| &st.images[id].uuid));
        let mut v: Vec<_> = st
            .snapshots_by_name
            .values()
            .filter(|id| {
                let img = &st.images[id];
                match (volume, live) {
                    (None, _) => true,
                    (Some(_), Some(uuid)) => img.origin_id == *uuid,
                    (Some(vol), None) => img.origin == vol,
                }
            })
            .map(|&id| self.snapshot_info(&st, id))
            .collect();
        if let Some(vol) = volume {
            if v.is_empty() && !st.volumes_by_name.contains_key(vol) {
                return Err(EngineError::NotFound {
                    kind: ObjectKind::Volume,
                    name: vol.to_string(),
                });
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }
}
