//! Opening the engine: the metadata format, the attached pools, the images and lineages,
//! the chunk map (from which free space is derived), and the resumption of interrupted
//! operations.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::meta::keys::{self, ZERO};
use crate::meta::{Cf, MetaStore, WriteBatch};

use super::records::{self, ImageKind, ImageRecord, Intent, LineageRecord, ParentRef, PoolRecord};
use super::state::{Allocator, Lineage, State};
use super::superblock::Superblock;
use super::types::{PoolSpec, Source, DEFAULT_MAX_OVERPROVISION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use super::{
    image_put, next_id_put, validate_name, Engine, EngineError, EngineStats, Inner, ObjectKind,
    PoolRt, Result,
};

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
        check_format(meta.as_ref(), &mut batch)?;
        let mut next_id = match meta.get(Cf::Meta, keys::NEXT_ID_KEY)? {
            Some(v) => keys::decode_u64(Cf::Meta, &v)?,
            None => 1,
        };
        let pools = attach_pools(meta.as_ref(), specs, &mut batch, &mut next_id)?;
        next_id_put(&mut batch, next_id);
        meta.write(batch, true)?;

        let mut st = load_images(meta.as_ref(), &pools, next_id)?;
        let mapped = load_map(meta.as_ref(), &mut st)?;
        for lin in st.lineages.values_mut() {
            lin.gc_dirty = true;
        }
        for problem in &st.open_problems {
            tracing::error!(problem = %problem, "metadata problem found at open; writes are refused until fsck repairs it");
        }
        let intents = meta.scan(Cf::Intents, &[], &[], usize::MAX)?;
        punch_free_chunks(&pools, &st)?;
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
}

/// Checks the metadata format version, recording it (in `batch`) in fresh metadata.
fn check_format(meta: &dyn MetaStore, batch: &mut WriteBatch) -> Result<()> {
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
    Ok(())
}

/// Matches the attached pools to the pool records by name: an existing pool is checked
/// against its device's superblock, a new one is created (its record goes into `batch`).
/// Every pool the metadata records must be attached.
fn attach_pools(
    meta: &dyn MetaStore,
    specs: Vec<PoolSpec>,
    batch: &mut WriteBatch,
    next_id: &mut u64,
) -> Result<Vec<Arc<PoolRt>>> {
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
                check_pool(&spec, &rec, &sb)?;
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
            (None, None) => create_pool(&spec, batch, next_id)?,
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
            reason:
                "the metadata holds this pool but it is not attached; pass it with --pool NAME=PATH"
                    .into(),
        });
    }
    Ok(pools)
}

/// Checks that an existing pool's device is the one its record describes.
fn check_pool(spec: &PoolSpec, rec: &PoolRecord, sb: &Superblock) -> Result<()> {
    let dev = &spec.device;
    if sb.uuid_string() != rec.uuid {
        return Err(EngineError::PoolMismatch {
            pool: spec.name.clone(),
            reason: format!(
                "the device's pool UUID {} differs from the metadata's {}; this is another pool's device",
                sb.uuid_string(),
                rec.uuid
            ),
        });
    }
    if sb.chunk_size != rec.chunk_size || dev.size() < rec.size {
        return Err(EngineError::PoolMismatch {
            pool: spec.name.clone(),
            reason: format!(
                "device size {} / chunk size {} do not match the metadata ({} / {})",
                dev.size(),
                sb.chunk_size,
                rec.size,
                rec.chunk_size
            ),
        });
    }
    Ok(())
}

/// Creates a pool on a device without a superblock: writes the superblock and puts the
/// pool's record (with a fresh id) into `batch`.
fn create_pool(
    spec: &PoolSpec,
    batch: &mut WriteBatch,
    next_id: &mut u64,
) -> Result<(u64, PoolRecord)> {
    let dev = &spec.device;
    let cs = spec.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(EngineError::PoolMismatch {
            pool: spec.name.clone(),
            reason: format!("chunk size {cs} must be a power of two from 4 KiB to 4 MiB"),
        });
    }
    let size = dev.size() / cs * cs;
    if size < 2 * cs {
        return Err(EngineError::PoolMismatch {
            pool: spec.name.clone(),
            reason: format!(
                "device of {} bytes is too small for chunks of {cs}",
                dev.size()
            ),
        });
    }
    let sb = Superblock {
        uuid: *uuid::Uuid::new_v4().as_bytes(),
        chunk_size: cs,
        size,
    };
    sb.write(spec.device.as_ref())?;
    let rec = PoolRecord {
        name: spec.name.clone(),
        uuid: sb.uuid_string(),
        chunk_size: cs,
        size,
        path: spec.path.clone(),
    };
    let id = *next_id;
    *next_id += 1;
    batch.put_cf(Cf::Pools, keys::id_key(id), records::encode(&rec));
    tracing::info!(pool = %rec.name, uuid = %rec.uuid, size, chunk_size = cs, "created pool");
    Ok((id, rec))
}

/// Builds the in-memory state from the lineage and image records: indexes by name and
/// id, readers of every lineage (snapshots and the epochs clones pin), and stable ids for
/// records written before ids existed (persisted at once).
fn load_images(meta: &dyn MetaStore, pools: &[Arc<PoolRt>], next_id: u64) -> Result<State> {
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
    let upgraded = assign_legacy_ids(&mut st, pools);
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
    Ok(st)
}

/// Loads the chunk map, page by page (a full scan: free space is derived from it), into
/// the lineages and the allocators. Entries that cannot be right (a missing lineage, a
/// chunk outside its pool or owned twice) are recorded as open problems, not loaded
/// twice. Returns how many entries were loaded.
fn load_map(meta: &dyn MetaStore, st: &mut State) -> Result<u64> {
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
    Ok(mapped)
}

/// Free chunks must read as zeros (see the module docs of `engine`): punches every free
/// run on pools whose device punches to zeros.
fn punch_free_chunks(pools: &[Arc<PoolRt>], st: &State) -> Result<()> {
    for p in pools {
        if !p.zeroed_free {
            continue;
        }
        for (first, count) in st.allocators[p.idx].free_runs() {
            p.device.punch(p.offset(first), count * p.chunk_size)?;
        }
    }
    Ok(())
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
