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
mod fsck;
mod gc;
mod group;
mod io;
pub mod meta_space;
pub mod records;
mod state;
pub mod superblock;
pub mod types;

use std::collections::HashMap;
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
use records::{ImageKind, ImageRecord, Intent, LineageRecord, ParentRef, PoolRecord};

use blockd_proto::size::format_size;
use state::{Allocator, Lineage, State};
use superblock::Superblock;
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

/// Validates a volume or snapshot name: 1–128 chars of `[a-z0-9][a-z0-9._-]*`, no `..`.
pub fn validate_name(kind: ObjectKind, name: &str) -> Result<()> {
    let bad = |reason| {
        Err(EngineError::InvalidName {
            kind,
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("a name must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("a name must be at most 128 characters");
    }
    let first = name.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return bad("a name must start with a lowercase letter or a digit");
    }
    if !name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
    }) {
        return bad("a name may contain only a-z, 0-9, '.', '_' and '-'");
    }
    if name.contains("..") {
        return bad("a name must not contain '..'");
    }
    Ok(())
}

/// Rounds a requested size up to the size granule; rejects 0 and overflow.
pub fn round_size(name: &str, size: u64) -> Result<u64> {
    if size == 0 {
        return Err(EngineError::InvalidSize {
            name: name.to_string(),
            reason: "size must be greater than 0".into(),
        });
    }
    size.checked_next_multiple_of(SIZE_GRANULE)
        .filter(|s| *s <= i64::MAX as u64)
        .ok_or_else(|| EngineError::InvalidSize {
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
    /// Opens the engine over `meta` with the given pools attached. New pools are created
    /// (superblock written); existing ones are checked against their metadata. Every pool
    /// recorded in the metadata must be attached.
    pub fn open(meta: Arc<dyn MetaStore>, specs: Vec<PoolSpec>) -> Result<Engine> {
        if specs.is_empty() {
            return Err(EngineError::PoolMismatch {
                pool: String::new(),
                reason: "at least one pool must be attached".into(),
            });
        }
        let mut batch = WriteBatch::new();
        match meta.get(Cf::Meta, keys::FORMAT_KEY)? {
            None => batch.put_cf(
                Cf::Meta,
                keys::FORMAT_KEY,
                keys::FORMAT_VERSION.to_be_bytes().to_vec(),
            ),
            Some(v) if v == keys::FORMAT_VERSION.to_be_bytes() => {}
            Some(v) => {
                return Err(EngineError::Corrupt(format!(
                    "metadata format {v:?} is not supported by this build (format {})",
                    keys::FORMAT_VERSION
                )))
            }
        }
        let mut next_id = match meta.get(Cf::Meta, keys::NEXT_ID_KEY)? {
            Some(v) => keys::decode_u64(Cf::Meta, &v)?,
            None => 1,
        };

        // Pools: match records to specs by name.
        let mut records: HashMap<String, (u64, PoolRecord)> = HashMap::new();
        for (k, v) in meta.scan(Cf::Pools, &[], &[], usize::MAX)? {
            let id = keys::decode_id(Cf::Pools, &k)?;
            let rec: PoolRecord = records::decode(Cf::Pools, &v)?;
            records.insert(rec.name.clone(), (id, rec));
        }
        let mut seen = std::collections::HashSet::new();
        let mut pools = Vec::new();
        for (idx, spec) in specs.into_iter().enumerate() {
            if !seen.insert(spec.name.clone()) {
                return Err(EngineError::PoolMismatch {
                    pool: spec.name,
                    reason: "the pool is attached twice".into(),
                });
            }
            validate_name(ObjectKind::Pool, &spec.name)?;
            let dev = spec.device.clone();
            let found = Superblock::read(&spec.name, dev.as_ref())?;
            let (id, rec) = match (records.remove(&spec.name), found) {
                (Some((id, rec)), Some(sb)) => {
                    if sb.uuid_string() != rec.uuid {
                        return Err(EngineError::PoolMismatch {
                            pool: spec.name,
                            reason: format!(
                                "the device's pool UUID {} differs from the metadata's {}; this is another pool's device",
                                sb.uuid_string(),
                                rec.uuid
                            ),
                        });
                    }
                    if sb.chunk_size != rec.chunk_size || dev.size() < rec.size {
                        return Err(EngineError::PoolMismatch {
                            pool: spec.name,
                            reason: format!(
                                "device size {} / chunk size {} do not match the metadata ({} / {})",
                                dev.size(),
                                sb.chunk_size,
                                rec.size,
                                rec.chunk_size
                            ),
                        });
                    }
                    (id, rec)
                }
                (Some(_), None) => {
                    return Err(EngineError::PoolMismatch {
                        pool: spec.name,
                        reason: "the metadata knows this pool but the device has no superblock (wrong path, or the device was wiped)".into(),
                    })
                }
                (None, Some(sb)) => {
                    return Err(EngineError::PoolMismatch {
                        pool: spec.name,
                        reason: format!(
                            "the device already holds blockd pool {} that this metadata does not know; refusing to reuse it",
                            sb.uuid_string()
                        ),
                    })
                }
                (None, None) => {
                    let cs = spec.chunk_size;
                    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
                        return Err(EngineError::PoolMismatch {
                            pool: spec.name,
                            reason: format!("chunk size {cs} must be a power of two from 4 KiB to 4 MiB"),
                        });
                    }
                    let size = dev.size() / cs * cs;
                    if size < 2 * cs {
                        return Err(EngineError::PoolMismatch {
                            pool: spec.name,
                            reason: format!("device of {} bytes is too small for chunks of {cs}", dev.size()),
                        });
                    }
                    let sb = Superblock {
                        uuid: *uuid::Uuid::new_v4().as_bytes(),
                        chunk_size: cs,
                        size,
                    };
                    sb.write(dev.as_ref())?;
                    let rec = PoolRecord {
                        name: spec.name.clone(),
                        uuid: sb.uuid_string(),
                        chunk_size: cs,
                        size,
                        path: spec.path.clone(),
                    };
                    let id = next_id;
                    next_id += 1;
                    batch.put_cf(Cf::Pools, keys::id_key(id), records::encode(&rec));
                    tracing::info!(pool = %rec.name, uuid = %rec.uuid, size, chunk_size = cs, "created pool");
                    (id, rec)
                }
            };
            pools.push(Arc::new(PoolRt {
                id,
                idx,
                name: rec.name.clone(),
                path: spec.path,
                uuid: rec.uuid.clone(),
                chunk_size: rec.chunk_size,
                chunks: rec.size / rec.chunk_size,
                zeroed_free: dev.punch_zeroes(),
                device: dev,
                reclaim: RwLock::new(()),
                dirty: AtomicBool::new(false),
            }));
        }
        if let Some(name) = records.keys().next() {
            return Err(EngineError::PoolMismatch {
                pool: name.clone(),
                reason: "the metadata holds this pool but it is not attached; pass it with --pool NAME=PATH".into(),
            });
        }
        next_id_put(&mut batch, next_id);
        meta.write(batch, true)?;

        let pool_idx_by_id: HashMap<u64, usize> = pools.iter().map(|p| (p.id, p.idx)).collect();
        let mut st = State {
            images: HashMap::new(),
            volumes_by_name: HashMap::new(),
            snapshots_by_name: HashMap::new(),
            by_uuid: HashMap::new(),
            lineages: HashMap::new(),
            allocators: pools.iter().map(|p| Allocator::new(p.chunks)).collect(),
            reserved: Default::default(),
            pending: WriteBatch::new(),
            pending_frees: Vec::new(),
            next_id,
            failed: None,
            open_problems: Vec::new(),
            meta_full: None,
        };

        for (k, v) in meta.scan(Cf::Lineages, &[], &[], usize::MAX)? {
            let id = keys::decode_id(Cf::Lineages, &k)?;
            let rec: LineageRecord = records::decode(Cf::Lineages, &v)?;
            let Some(&pidx) = pool_idx_by_id.get(&rec.pool) else {
                return Err(EngineError::Corrupt(format!(
                    "lineage {id} names unknown pool id {}",
                    rec.pool
                )));
            };
            st.lineages.insert(id, Lineage::new(id, rec, pidx));
        }
        for (k, v) in meta.scan(Cf::Images, &[], &[], usize::MAX)? {
            let id = keys::decode_id(Cf::Images, &k)?;
            let rec: ImageRecord = records::decode(Cf::Images, &v)?;
            let Some(lin) = st.lineages.get_mut(&rec.lineage) else {
                return Err(EngineError::Corrupt(format!(
                    "image {:?} names unknown lineage {}",
                    rec.name, rec.lineage
                )));
            };
            match rec.kind {
                ImageKind::Volume => {
                    st.volumes_by_name.insert(rec.name.clone(), id);
                }
                ImageKind::Snapshot => {
                    lin.add_reader(rec.epoch);
                    st.snapshots_by_name.insert(rec.name.clone(), id);
                }
            }
            st.images.insert(id, rec);
        }
        // Records from before ids existed get theirs now, durably, once.
        let upgraded = assign_legacy_ids(&mut st, &pools);
        if !upgraded.is_empty() {
            let mut batch = WriteBatch::new();
            for id in &upgraded {
                image_put(&mut batch, *id, &st.images[id]);
            }
            meta.write(batch, true)?;
            tracing::info!(
                images = upgraded.len(),
                "gave stable ids to images recorded by an older version"
            );
        }
        for (&id, img) in &st.images {
            st.by_uuid.insert(img.uuid.clone(), id);
        }
        let pins: Vec<ParentRef> = st.lineages.values().filter_map(|l| l.rec.parent).collect();
        for p in pins {
            match st.lineages.get_mut(&p.lineage) {
                Some(parent) => parent.add_reader(p.epoch),
                None => {
                    return Err(EngineError::Corrupt(format!(
                        "a clone's parent lineage {} is missing",
                        p.lineage
                    )))
                }
            }
        }
        // The map, page by page (a full scan: free space is derived from it).
        let mut start: Vec<u8> = Vec::new();
        let mut mapped = 0u64;
        loop {
            let page = meta.scan(Cf::Map, &start, &[], 65536)?;
            let Some((last, _)) = page.last() else { break };
            let mut next = last.clone();
            next.push(0);
            for (k, v) in &page {
                let (l, c, e) = keys::decode_map_key(k)?;
                let phys = keys::decode_map_value(v)?;
                let Some(lin) = st.lineages.get_mut(&l) else {
                    st.open_problems
                        .push(format!("map entry ({l},{c},{e}) names missing lineage {l}"));
                    continue;
                };
                if phys != ZERO {
                    let alloc = &mut st.allocators[lin.pool];
                    if phys == 0 || phys >= alloc.chunks() {
                        st.open_problems.push(format!(
                            "map entry ({l},{c},{e}) points outside its pool: chunk {phys}"
                        ));
                        continue;
                    }
                    if !alloc.mark_used(phys) {
                        st.open_problems.push(format!(
                            "chunk {phys} is owned twice (again by ({l},{c},{e}))"
                        ));
                    }
                }
                lin.map_insert((c, e), phys);
                mapped += 1;
            }
            start = next;
        }
        for lin in st.lineages.values_mut() {
            lin.gc_dirty = true;
        }
        for problem in &st.open_problems {
            tracing::error!(problem = %problem, "metadata problem found at open; writes are refused until fsck repairs it");
        }
        let intents = meta.scan(Cf::Intents, &[], &[], usize::MAX)?;

        // Free chunks must read as zeros (see the module docs): punch every free run.
        for p in &pools {
            if !p.zeroed_free {
                continue;
            }
            for (first, count) in st.allocators[p.idx].free_runs() {
                p.device.punch(p.offset(first), count * p.chunk_size)?;
            }
        }
        tracing::info!(
            pools = pools.len(),
            lineages = st.lineages.len(),
            images = st.images.len(),
            mapped,
            "engine opened"
        );

        let engine = Engine {
            inner: Arc::new(Inner {
                meta,
                state: Mutex::new(st),
                cow_done: Condvar::new(),
                commit_lock: Mutex::new(()),
                control: Mutex::new(()),
                pools,
                background: Mutex::new(None),
                stats: EngineStats::default(),
                max_overprovision: Mutex::new(Some(DEFAULT_MAX_OVERPROVISION)),
            }),
        };
        for (k, v) in intents {
            let id = keys::decode_id(Cf::Intents, &k)?;
            let intent: Intent = records::decode(Cf::Intents, &v)?;
            tracing::info!(intent = id, ?intent, "an interrupted operation will resume");
        }
        Ok(engine)
    }

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

    /// Creates a volume, empty or cloned from a snapshot or a volume (O(1) either way).
    /// Idempotent: the same name with the same parameters returns the existing volume
    /// and `false`.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<(VolumeInfo, bool)> {
        self.create_volume_with_policy(spec, None)
    }

    /// [`Self::create_volume`] with a QoS policy: when given, it replaces `spec.qos`, the
    /// volume's limits are derived from it at the final size and follow later resizes.
    /// Idempotency compares policies (fixed limits compare as their fixed policy).
    pub fn create_volume_with_policy(
        &self,
        spec: &VolumeSpec,
        policy: Option<QosPolicy>,
    ) -> Result<(VolumeInfo, bool)> {
        validate_name(ObjectKind::Volume, &spec.name)?;
        // A fixed policy is stored as plain limits, exactly as before policies existed.
        let policy = policy.filter(|p| p.iops_per_gb != 0);
        let size = match spec.size {
            Some(s) => Some(round_size(&spec.name, s)?),
            None if spec.source.is_none() => {
                return Err(EngineError::InvalidSize {
                    name: spec.name.clone(),
                    reason: "a size is required for a new empty volume".into(),
                })
            }
            None => None,
        };
        if let Some(p) = &spec.pool {
            self.pool_by_name(p)?;
        }
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;

        // Resolve the source first: it fixes the pool and the minimum size.
        let (parent, src_pool, src_size, quiesce, src_id) = match &spec.source {
            None => (None, None, None, None, String::new()),
            Some(Source::Snapshot(s)) => {
                let sid = Self::snapshot_id(&st, s)?;
                let img = &st.images[&sid];
                let pool = st.lineages[&img.lineage].pool;
                let pr = ParentRef {
                    lineage: img.lineage,
                    epoch: img.epoch,
                    limit: img.size,
                };
                (Some(pr), Some(pool), Some(img.size), None, img.uuid.clone())
            }
            Some(Source::Volume(v)) => {
                let vid = Self::volume_id(&st, v)?;
                let img = &st.images[&vid];
                let lin = &st.lineages[&img.lineage];
                (
                    None,
                    Some(lin.pool),
                    Some(img.size),
                    Some((img.lineage, img.size)),
                    img.uuid.clone(),
                )
            }
        };
        let pool_idx = match (&spec.pool, src_pool) {
            (Some(p), Some(sp)) => {
                let pi = self.pool_by_name(p)?.idx;
                if pi != sp {
                    return Err(EngineError::InvalidSize {
                        name: spec.name.clone(),
                        reason: format!(
                            "a clone lives in its source's pool {:?}, not {p:?}",
                            self.inner.pools[sp].name
                        ),
                    });
                }
                pi
            }
            (Some(p), None) => self.pool_by_name(p)?.idx,
            (None, Some(sp)) => sp,
            (None, None) => 0,
        };
        let size = match (size, src_size) {
            (Some(s), Some(ss)) if s < ss => {
                return Err(EngineError::InvalidSize {
                    name: spec.name.clone(),
                    reason: format!(
                        "a clone must be at least as large as its source ({ss} bytes), not {s}"
                    ),
                })
            }
            (Some(s), _) => s,
            (None, Some(ss)) => ss,
            (None, None) => unreachable!("size checked above"),
        };

        // Idempotency by name.
        if let Some(&id) = st.volumes_by_name.get(&spec.name) {
            let img = &st.images[&id];
            let wanted = policy.unwrap_or(QosPolicy::fixed(spec.qos));
            // The same source means the same object, not only the same name: a clone of
            // a deleted snapshot is no clone of a new snapshot that took its name.
            let same = img.size == size
                && img.source == spec.source
                && img.source_id == src_id
                && Self::policy_of(img) == wanted
                && st.lineages[&img.lineage].pool == pool_idx;
            return if same {
                Ok((self.volume_info(&st, id), false))
            } else {
                Err(EngineError::AlreadyExists {
                    kind: ObjectKind::Volume,
                    name: spec.name.clone(),
                    detail: format!(
                        "with different parameters (size {} bytes, pool {:?})",
                        img.size, self.inner.pools[st.lineages[&img.lineage].pool].name
                    ),
                })
            };
        }

        self.check_provision(&st, pool_idx, size, || {
            format!("creating volume {:?} of {}", spec.name, format_size(size))
        })?;

        // Clone from a live volume: freeze its current epoch like a hidden snapshot.
        let mut _quiesced = None;
        let parent = match quiesce {
            None => parent,
            Some((src_lineage, src_size)) => {
                let gate = st.lineages[&src_lineage].gate.clone();
                drop(st);
                let guard = gate.write_arc();
                st = self.inner.state.lock();
                Self::check_writable(&st)?;
                let src = st
                    .lineages
                    .get_mut(&src_lineage)
                    .expect("source lineage exists under control lock");
                let epoch = src.rec.e_head;
                src.rec.e_head += 1;
                let rec = src.rec.clone();
                lineage_put(&mut st.pending, src_lineage, &rec);
                _quiesced = Some(guard);
                Some(ParentRef {
                    lineage: src_lineage,
                    epoch,
                    limit: src_size,
                })
            }
        };

        let lineage_id = st.alloc_id();
        let image_id = st.alloc_id();
        let lrec = LineageRecord {
            pool: self.inner.pools[pool_idx].id,
            e_head: 1,
            parent,
            head: Some(image_id),
        };
        let irec = ImageRecord {
            name: spec.name.clone(),
            kind: ImageKind::Volume,
            lineage: lineage_id,
            epoch: 0,
            size,
            qos: policy.map_or(spec.qos, |p| p.effective(size)),
            qos_policy: policy,
            source: spec.source.clone(),
            origin: String::new(),
            created_unix: now_unix(),
            exported: false,
            group: String::new(),
            uuid: records::new_id(),
            origin_id: String::new(),
            source_id: src_id,
            replica_of: String::new(),
        };
        if let Some(p) = parent {
            st.lineages
                .get_mut(&p.lineage)
                .expect("parent exists")
                .add_reader(p.epoch);
        }
        let next = st.next_id;
        lineage_put(&mut st.pending, lineage_id, &lrec);
        image_put(&mut st.pending, image_id, &irec);
        next_id_put(&mut st.pending, next);
        st.lineages
            .insert(lineage_id, Lineage::new(lineage_id, lrec, pool_idx));
        let uuid = irec.uuid.clone();
        st.by_uuid.insert(irec.uuid.clone(), image_id);
        st.images.insert(image_id, irec);
        st.volumes_by_name.insert(spec.name.clone(), image_id);
        let info = self.volume_info(&st, image_id);
        drop(st);
        self.commit()?;
        tracing::info!(
            volume = %spec.name,
            volume_id = %uuid,
            pool = %info.pool,
            size_bytes = size,
            source = ?spec.source,
            source_id = info.source_id.as_deref().unwrap_or(""),
            "created volume"
        );
        Ok((info, true))
    }

    /// Deletes a volume. Its snapshots and clones stay usable; GC reclaims what nothing
    /// reads any more.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::volume_id(&st, name)?;
        let img = st.images.remove(&id).expect("indexed image exists");
        st.volumes_by_name.remove(name);
        st.by_uuid.remove(&img.uuid);
        let lin = st
            .lineages
            .get_mut(&img.lineage)
            .expect("image lineage exists");
        lin.rec.head = None;
        lin.gc_dirty = true;
        let rec = lin.rec.clone();
        st.pending.delete_cf(Cf::Images, keys::id_key(id));
        lineage_put(&mut st.pending, img.lineage, &rec);
        drop(st);
        self.commit()?;
        tracing::info!(volume = %name, volume_id = %img.uuid, "deleted volume");
        Ok(())
    }

    /// Takes a snapshot in O(1): quiesce writers, record `e_S = e_head`, bump the epoch,
    /// commit. Idempotent for the same volume and name.
    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<(SnapshotInfo, bool)> {
        self.create_snapshot_replica(volume, name, None)
    }

    /// [`Engine::create_snapshot`], recording that the snapshot reproduces the snapshot
    /// with stable id `replica_of` (what `import-diff` takes after applying a stream).
    pub fn create_snapshot_replica(
        &self,
        volume: &str,
        name: &str,
        replica_of: Option<&str>,
    ) -> Result<(SnapshotInfo, bool)> {
        validate_name(ObjectKind::Snapshot, name)?;
        let _ctl = self.inner.control.lock();
        let st = self.inner.state.lock();
        Self::check_writable(&st)?;
        if let Some(&sid) = st.snapshots_by_name.get(name) {
            let img = &st.images[&sid];
            // The same volume by id; or, when no volume has that name any more, the
            // deleted one that had it (a retry after the volume went away).
            let same = match st.volumes_by_name.get(volume) {
                Some(vid) => st.images[vid].uuid == img.origin_id,
                None => img.origin == volume && !st.is_live(&img.origin_id),
            };
            return if same {
                Ok((self.snapshot_info(&st, sid), false))
            } else {
                let deleted = if st.is_live(&img.origin_id) {
                    ""
                } else {
                    " (deleted)"
                };
                Err(EngineError::AlreadyExists {
                    kind: ObjectKind::Snapshot,
                    name: name.to_string(),
                    detail: format!("of volume {:?}{deleted}", img.origin),
                })
            };
        }
        let vid = Self::volume_id(&st, volume)?;
        let lineage = st.images[&vid].lineage;
        let gate = st.lineages[&lineage].gate.clone();
        drop(st);
        let _quiesce = gate.write();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let size = st.images[&vid].size;
        let origin_id = st.images[&vid].uuid.clone();
        let id = st.alloc_id();
        let lin = st.lineages.get_mut(&lineage).expect("lineage exists");
        let epoch = lin.rec.e_head;
        lin.rec.e_head += 1;
        lin.add_reader(epoch);
        let lrec = lin.rec.clone();
        let irec = ImageRecord {
            name: name.to_string(),
            kind: ImageKind::Snapshot,
            lineage,
            epoch,
            size,
            qos: Qos::default(),
            qos_policy: None,
            source: None,
            origin: volume.to_string(),
            created_unix: now_unix(),
            exported: false,
            group: String::new(),
            uuid: records::new_id(),
            origin_id,
            source_id: String::new(),
            replica_of: replica_of.unwrap_or_default().to_string(),
        };
        let next = st.next_id;
        lineage_put(&mut st.pending, lineage, &lrec);
        image_put(&mut st.pending, id, &irec);
        next_id_put(&mut st.pending, next);
        st.by_uuid.insert(irec.uuid.clone(), id);
        st.images.insert(id, irec);
        st.snapshots_by_name.insert(name.to_string(), id);
        let info = self.snapshot_info(&st, id);
        drop(st);
        self.commit()?;
        tracing::info!(
            volume = %volume,
            volume_id = %info.volume_id,
            snapshot = %name,
            snapshot_id = %info.id,
            size_bytes = size,
            epoch,
            "created snapshot"
        );
        Ok((info, true))
    }

    /// Deletes a snapshot. If clones still read it, it disappears from listings now and
    /// its chunks are reclaimed when the last clone is deleted or flattened.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::snapshot_id(&st, name)?;
        Self::check_not_group_member(&st.images[&id])?;
        let img = st.images.remove(&id).expect("indexed image exists");
        st.snapshots_by_name.remove(name);
        st.by_uuid.remove(&img.uuid);
        if let Some(lin) = st.lineages.get_mut(&img.lineage) {
            lin.remove_reader(img.epoch);
        }
        st.pending.delete_cf(Cf::Images, keys::id_key(id));
        drop(st);
        self.commit()?;
        tracing::info!(
            snapshot = %name,
            snapshot_id = %img.uuid,
            volume = %img.origin,
            "deleted snapshot"
        );
        Ok(())
    }

    /// Changes a volume's QoS limits (0 = unlimited).
    pub fn set_qos(&self, name: &str, qos: Qos) -> Result<VolumeInfo> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::volume_id(&st, name)?;
        let img = st.images.get_mut(&id).expect("indexed");
        img.qos = qos;
        img.qos_policy = None;
        let rec = img.clone();
        image_put(&mut st.pending, id, &rec);
        let info = self.volume_info(&st, id);
        drop(st);
        self.commit()?;
        Ok(info)
    }

    /// Replaces a volume's QoS policy and applies the limits it gives at the current size.
    /// Open exports read the limits on every request, so running I/O sees the change at
    /// its next request.
    pub fn set_qos_policy(&self, name: &str, policy: QosPolicy) -> Result<VolumeInfo> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::volume_id(&st, name)?;
        let img = st.images.get_mut(&id).expect("indexed");
        img.qos = policy.effective(img.size);
        img.qos_policy = (policy.iops_per_gb != 0).then_some(policy);
        let rec = img.clone();
        image_put(&mut st.pending, id, &rec);
        let info = self.volume_info(&st, id);
        drop(st);
        self.commit()?;
        tracing::info!(
            volume = %name,
            max_iops = info.qos.max_iops,
            iops_per_gb = policy.iops_per_gb,
            max_bandwidth_bytes = info.qos.max_bandwidth_bytes,
            "set volume qos policy"
        );
        Ok(info)
    }

    /// The policy a volume record's limits come from.
    fn policy_of(img: &ImageRecord) -> QosPolicy {
        img.qos_policy.unwrap_or(QosPolicy::fixed(img.qos))
    }

    /// Marks an image ("VOL" or "VOL@SNAP") exported or not; persisted. Returns whether
    /// anything changed.
    pub fn set_exported(&self, image: &str, exported: bool) -> Result<bool> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::image_id(&st, image)?;
        let img = st.images.get_mut(&id).expect("indexed");
        if img.exported == exported {
            return Ok(false);
        }
        img.exported = exported;
        let rec = img.clone();
        image_put(&mut st.pending, id, &rec);
        drop(st);
        self.commit()?;
        Ok(true)
    }

    /// Exported images, as "VOL" or "VOL@SNAP", sorted.
    pub fn exported_images(&self) -> Vec<String> {
        let st = self.inner.state.lock();
        let mut v: Vec<String> = st
            .images
            .values()
            .filter(|i| i.exported)
            .map(|i| match i.kind {
                ImageKind::Volume => i.name.clone(),
                ImageKind::Snapshot => format!("{}@{}", i.origin, i.name),
            })
            .collect();
        v.sort();
        v
    }

    fn image_id(st: &State, image: &str) -> Result<u64> {
        match image.split_once('@') {
            None => Self::volume_id(st, image),
            Some((vol, snap)) => {
                let id = Self::snapshot_id(st, snap)?;
                if st.images[&id].origin != vol {
                    return Err(EngineError::NotFound {
                        kind: ObjectKind::Image,
                        name: image.to_string(),
                    });
                }
                Ok(id)
            }
        }
    }

    /// Opens "VOL" (read-write head) or "VOL@SNAP" (read-only snapshot) for I/O.
    pub fn open_image(&self, image: &str) -> Result<ImageHandle> {
        let st = self.inner.state.lock();
        let id = Self::image_id(&st, image)?;
        let img = &st.images[&id];
        let lin = &st.lineages[&img.lineage];
        Ok(ImageHandle {
            id,
            name: image.into(),
            volume: match img.kind {
                ImageKind::Volume => img.name.as_str().into(),
                ImageKind::Snapshot => img.origin.as_str().into(),
            },
            lineage: img.lineage,
            epoch: match img.kind {
                ImageKind::Volume => None,
                ImageKind::Snapshot => Some(img.epoch),
            },
            pool: lin.pool,
        })
    }

    /// The image's current size (a volume may be resized while open).
    pub fn image_size(&self, h: &ImageHandle) -> Result<u64> {
        let st = self.inner.state.lock();
        Ok(Self::live_image(&st, h)?.size)
    }

    /// The image's QoS limits (snapshots are unlimited).
    pub fn image_qos(&self, h: &ImageHandle) -> Qos {
        let st = self.inner.state.lock();
        Self::live_image(&st, h).map(|i| i.qos).unwrap_or_default()
    }

    fn live_image<'s>(st: &'s State, h: &ImageHandle) -> Result<&'s ImageRecord> {
        st.images.get(&h.id).ok_or_else(|| EngineError::NotFound {
            kind: ObjectKind::Image,
            name: h.name.to_string(),
        })
    }

    /// Resizes a volume. Growing is metadata only; shrinking needs `force` and zeroes what
    /// lies beyond the new end so that a later grow reads zeros there.
    pub fn resize_volume(&self, name: &str, new_size: u64, force: bool) -> Result<VolumeInfo> {
        let new_size = round_size(name, new_size)?;
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::volume_id(&st, name)?;
        let old = st.images[&id].size;
        if new_size < old && !force {
            return Err(EngineError::ShrinkRefused {
                name: name.to_string(),
                size: old,
                new_size,
            });
        }
        if new_size > old {
            let pool = st.lineages[&st.images[&id].lineage].pool;
            self.check_provision(&st, pool, new_size - old, || {
                format!(
                    "growing volume {name:?} from {} to {}",
                    format_size(old),
                    format_size(new_size)
                )
            })?;
        }
        if new_size < old {
            let lineage = st.images[&id].lineage;
            let gate = st.lineages[&lineage].gate.clone();
            drop(st);
            let h = self.open_image(name)?;
            {
                let _quiesce = gate.write();
                self.zero_range_quiesced(&h, new_size, old - new_size)?;
            }
            // Every chunk past the new end that read data now has an own entry at the
            // head (a zero tombstone or zeroed copy), so a later grow reads zeros there
            // while snapshots, which share the parent pointer, still read their data.
            st = self.inner.state.lock();
        }
        let img = st.images.get_mut(&id).expect("indexed");
        img.size = new_size;
        if let Some(policy) = img.qos_policy {
            // The IOPS limit follows the size (iopsPerGB); open exports read it per request.
            img.qos = policy.effective(new_size);
        }
        let rec = img.clone();
        image_put(&mut st.pending, id, &rec);
        let info = self.volume_info(&st, id);
        drop(st);
        self.commit()?;
        tracing::info!(
            volume = %name,
            old_size_bytes = old,
            new_size_bytes = new_size,
            "resized volume"
        );
        Ok(info)
    }
}

/// Gives images recorded before ids existed their stable ids (the rules are in the
/// [`records`] module docs) and returns the internal ids of the records it changed, for
/// the caller to persist. Images that already have ids are left alone, so running it
/// again changes nothing.
fn assign_legacy_ids(st: &mut State, pools: &[Arc<PoolRt>]) -> Vec<u64> {
    let pool_uuid = |st: &State, lineage: u64| {
        st.lineages
            .get(&lineage)
            .map(|l| pools[l.pool].uuid.clone())
            .unwrap_or_default()
    };
    // The live volume of a lineage, else the derived id its (deleted) volume had.
    let volume_of = |st: &State, lineage: u64| {
        st.lineages
            .get(&lineage)
            .and_then(|l| l.rec.head)
            .and_then(|h| st.images.get(&h))
            .map(|img| img.uuid.clone())
            .unwrap_or_else(|| records::derived_volume_id(&pool_uuid(st, lineage), lineage))
    };
    let mut ids: Vec<u64> = st.images.keys().copied().collect();
    ids.sort_unstable();
    let mut changed = std::collections::BTreeSet::new();
    for &id in &ids {
        let img = &st.images[&id];
        if !img.uuid.is_empty() {
            continue;
        }
        let pu = pool_uuid(st, img.lineage);
        let uuid = match img.kind {
            ImageKind::Volume => records::derived_volume_id(&pu, img.lineage),
            ImageKind::Snapshot => records::derived_snapshot_id(&pu, id),
        };
        st.images.get_mut(&id).expect("listed").uuid = uuid;
        changed.insert(id);
    }
    for &id in &ids {
        let img = &st.images[&id];
        if img.kind == ImageKind::Snapshot && img.origin_id.is_empty() {
            let origin = volume_of(st, img.lineage);
            st.images.get_mut(&id).expect("listed").origin_id = origin;
            changed.insert(id);
        }
    }
    for &id in &ids {
        let img = &st.images[&id];
        let Some(source) = img.source.clone() else {
            continue;
        };
        if img.kind != ImageKind::Volume || !img.source_id.is_empty() {
            continue;
        }
        let created = img.created_unix;
        let parent = st.lineages.get(&img.lineage).and_then(|l| l.rec.parent);
        let found = match (&source, parent) {
            (Source::Snapshot(_), Some(p)) => st
                .images
                .values()
                .find(|i| {
                    i.kind == ImageKind::Snapshot && i.lineage == p.lineage && i.epoch == p.epoch
                })
                .map(|i| i.uuid.clone()),
            (Source::Volume(_), Some(p)) => Some(volume_of(st, p.lineage)),
            // Flattened: only the name is left. An image of that name made after the
            // clone cannot be its source.
            (Source::Snapshot(name), None) => st
                .snapshots_by_name
                .get(name)
                .map(|i| &st.images[i])
                .filter(|i| i.created_unix <= created)
                .map(|i| i.uuid.clone()),
            (Source::Volume(name), None) => st
                .volumes_by_name
                .get(name)
                .map(|i| &st.images[i])
                .filter(|i| i.created_unix <= created)
                .map(|i| i.uuid.clone()),
        };
        // Nothing live matches: the source is gone, and a fresh id that matches nothing
        // says so for good.
        st.images.get_mut(&id).expect("listed").source_id = found.unwrap_or_else(records::new_id);
        changed.insert(id);
    }
    changed.into_iter().collect()
}
