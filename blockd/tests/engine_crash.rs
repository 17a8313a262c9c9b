//! Crash simulation, SPDK-style: every device I/O and metadata write after the N-th fails
//! (N = 1, 2, 3, ...), then the machine "loses power" (unflushed device writes are dropped
//! at random, unsynced metadata too) and the engine reopens on what survived.
//!
//! The workload writes, flushes, discards, takes and deletes snapshots, runs GC, clones
//! (from a snapshot, possibly larger, and from a live volume), grows and force-shrinks
//! volumes, deletes volumes and flattens clones, on a changing set of volumes.
//!
//! After every crash: every write acknowledged before a completed flush reads back (or a
//! value written after it — a disk's volatile cache may keep those), every volume has its
//! last committed size (or, for a resize the crash interrupted, the new one), every
//! snapshot taken reads exactly what the volume held when it was taken (also after its
//! volume was deleted), a clone reads its source's content, no sector shows another
//! volume's data or torn garbage, a new volume reads zeros everywhere, an interrupted
//! flatten resumes, and fsck finds no double ownership or leak.

use std::collections::BTreeMap;
use std::sync::Arc;

use blockd::device::faulty::FaultyDevice;
use blockd::device::mem::MemDevice;
use blockd::device::BlockDevice;
use blockd::engine::{Engine, ImageHandle, PoolSpec, Qos, Source, VolumeSpec};
use blockd::fault::FaultClock;
use blockd::meta::mem::MemStore;
use blockd::meta::MetaStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHUNK: u64 = 8192;
const POOL: u64 = 4 << 20;
/// Size of the two volumes the workload starts with.
const VOL: u64 = 96 * 1024;
/// No volume grows (or is cloned) past this.
const MAX_VOL: u64 = 160 * 1024;
const SECTOR: u64 = 512;
const MAX_SECTORS: usize = (MAX_VOL / SECTOR) as usize;
/// The workload keeps at most this many live volumes.
const MAX_VOLUMES: usize = 5;

/// What each sector of a volume may read after a crash, and its size.
#[derive(Clone)]
struct VolModel {
    /// Distinguishes this volume's stamps from every other volume's.
    tag: u64,
    /// The size after the last successful resize (or create).
    size: u64,
    /// A resize that failed may have become durable anyway: the size it asked for.
    size_in_doubt: Option<u64>,
    /// Value after the last completed flush (0 = zeros), for every sector up to
    /// `MAX_SECTORS` (past the size: 0, which is what a later grow must read).
    flushed: Vec<u64>,
    /// Values written since (any of them may have reached the disk).
    since: Vec<Vec<u64>>,
}

impl VolModel {
    fn new(tag: u64, size: u64, flushed: Vec<u64>) -> Self {
        let mut flushed = flushed;
        flushed.resize(MAX_SECTORS, 0);
        VolModel {
            tag,
            size,
            size_in_doubt: None,
            flushed,
            since: vec![Vec::new(); MAX_SECTORS],
        }
    }
    fn sectors(&self) -> usize {
        (self.size / SECTOR) as usize
    }
    fn latest(&self) -> Vec<u64> {
        (0..MAX_SECTORS)
            .map(|s| *self.since[s].last().unwrap_or(&self.flushed[s]))
            .collect()
    }
    fn settle(&mut self) {
        self.flushed = self.latest();
        self.since.iter_mut().for_each(Vec::clear);
    }
}

/// A snapshot known to be taken: its volume and exact contents (one value per sector).
struct SnapModel {
    volume: String,
    content: Vec<u64>,
}

/// Everything the checks after a crash know.
#[derive(Default)]
struct Model {
    volumes: BTreeMap<String, VolModel>,
    snaps: BTreeMap<String, SnapModel>,
    next_tag: u64,
    seq: u64,
}

impl Model {
    fn settle_all(&mut self) {
        self.volumes.values_mut().for_each(VolModel::settle);
    }
    fn new_tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }
}

fn stamp_sector(buf: &mut [u8], stamp: u64) {
    for w in buf.chunks_mut(8) {
        w.copy_from_slice(&stamp.to_le_bytes());
    }
}

fn decode_sector(buf: &[u8]) -> Option<u64> {
    let first = u64::from_le_bytes(buf[..8].try_into().unwrap());
    buf.chunks(8)
        .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == first)
        .then_some(first)
}

struct World {
    mem_dev: Arc<MemDevice>,
    meta: Arc<MemStore>,
    clock: Arc<FaultClock>,
}

fn pool_spec(dev: Arc<dyn BlockDevice>) -> Vec<PoolSpec> {
    vec![PoolSpec {
        name: "p".into(),
        device: dev,
        chunk_size: CHUNK,
        path: "mem".into(),
    }]
}

fn volume_spec(name: &str, size: Option<u64>, source: Option<Source>) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        pool: None,
        size,
        source,
        qos: Qos::default(),
    }
}

/// A fresh world with two volumes created and some flushed data, no faults armed.
fn setup(seed: u64) -> (World, Engine, Model) {
    let clock = Arc::new(FaultClock::new());
    let mem_dev = Arc::new(MemDevice::new(POOL));
    let meta = Arc::new(MemStore::with_faults(clock.clone()));
    let dev: Arc<dyn BlockDevice> = Arc::new(FaultyDevice::new(mem_dev.clone(), clock.clone()));
    let engine = Engine::open(meta.clone() as Arc<dyn MetaStore>, pool_spec(dev)).unwrap();
    let mut model = Model::default();
    for v in ["a", "b"] {
        engine
            .create_volume(&volume_spec(v, Some(VOL), None))
            .unwrap();
        let tag = model.new_tag();
        model
            .volumes
            .insert(v.to_string(), VolModel::new(tag, VOL, Vec::new()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    // Some flushed baseline data so that copy-on-write and in-place paths both run.
    for v in ["a", "b"] {
        let h = engine.open_image(v).unwrap();
        for _ in 0..6 {
            write_random(&engine, &h, v, &mut rng, &mut model).unwrap();
        }
    }
    engine.flush().unwrap();
    model.settle_all();
    (
        World {
            mem_dev,
            meta,
            clock,
        },
        engine,
        model,
    )
}

fn write_random(
    engine: &Engine,
    h: &ImageHandle,
    v: &str,
    rng: &mut StdRng,
    model: &mut Model,
) -> blockd::engine::Result<()> {
    let vm = &model.volumes[v];
    let sectors = vm.sectors();
    let tag = vm.tag;
    let n = rng.gen_range(1..=40usize.min(sectors));
    let first = rng.gen_range(0..=sectors - n);
    let mut buf = vec![0u8; n * SECTOR as usize];
    let mut stamps = Vec::new();
    for (i, sec) in buf.chunks_mut(SECTOR as usize).enumerate() {
        model.seq += 1;
        let stamp = (tag << 40) | model.seq;
        stamp_sector(sec, stamp);
        stamps.push((first + i, stamp));
    }
    // A failed write may still have reached the disk in part: record it either way.
    let vm = model.volumes.get_mut(v).expect("live volume");
    for (s, stamp) in stamps {
        vm.since[s].push(stamp);
    }
    engine.write(h, first as u64 * SECTOR, &buf)
}

/// A random live volume.
fn pick_volume(rng: &mut StdRng, model: &Model) -> String {
    let i = rng.gen_range(0..model.volumes.len());
    model.volumes.keys().nth(i).expect("in range").clone()
}

/// Runs random operations until one fails or `ops` have run, updating `model` with what
/// a crash at any later point must preserve.
fn workload(engine: &Engine, model: &mut Model, seed: u64, ops: usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    for i in 0..ops {
        let v = pick_volume(&mut rng, model);
        let h = engine.open_image(&v).unwrap();
        let r = match rng.gen_range(0..30) {
            0..=11 | 27..=29 => write_random(engine, &h, &v, &mut rng, model),
            12..=13 => {
                let r = engine.flush();
                if r.is_ok() {
                    model.settle_all();
                }
                r
            }
            14..=15 => {
                let name = format!("snap{i}");
                let r = engine.create_snapshot(&v, &name);
                if r.is_ok() {
                    // A snapshot is a commit point for everything written before it.
                    model.settle_all();
                    let vm = &model.volumes[&v];
                    model.snaps.insert(
                        name,
                        SnapModel {
                            volume: v.clone(),
                            content: vm.flushed[..vm.sectors()].to_vec(),
                        },
                    );
                }
                r.map(|_| ())
            }
            16 => {
                let vm = model.volumes.get_mut(&v).expect("live");
                let chunk = rng.gen_range(0..vm.size / CHUNK);
                let per = (CHUNK / SECTOR) as usize;
                for s in chunk as usize * per..(chunk as usize + 1) * per {
                    vm.since[s].push(0);
                }
                if rng.gen_bool(0.5) {
                    engine.discard(&h, chunk * CHUNK, CHUNK)
                } else {
                    engine.write_zeroes(&h, chunk * CHUNK, CHUNK)
                }
            }
            17 => match model.snaps.keys().next().cloned() {
                Some(name) => {
                    // Even a failed delete may have become durable: stop checking it.
                    model.snaps.remove(&name);
                    engine.delete_snapshot(&name)
                }
                None => Ok(()),
            },
            18 => engine.gc().map(|_| ()),
            19..=20 if model.volumes.len() < MAX_VOLUMES => {
                // A clone of a snapshot, possibly larger than it.
                let Some(snap) = model
                    .snaps
                    .keys()
                    .nth(rng.gen_range(0..model.snaps.len().max(1)))
                else {
                    continue;
                };
                let snap = snap.clone();
                let content = model.snaps[&snap].content.clone();
                let base = content.len() as u64 * SECTOR;
                let size = (base + rng.gen_range(0..=2u64) * CHUNK).min(MAX_VOL);
                let name = format!("c{i}");
                let r = engine.create_volume(&volume_spec(
                    &name,
                    Some(size),
                    Some(Source::Snapshot(snap)),
                ));
                // A failed create may have become durable: such a clone is not checked
                // (fsck still covers it).
                if r.is_ok() {
                    model.settle_all();
                    let tag = model.new_tag();
                    model
                        .volumes
                        .insert(name, VolModel::new(tag, size, content));
                }
                r.map(|_| ())
            }
            21 if model.volumes.len() < MAX_VOLUMES => {
                // A clone of a live volume: quiesces it and commits.
                let name = format!("c{i}");
                let r = engine.create_volume(&volume_spec(
                    &name,
                    None,
                    Some(Source::Volume(v.clone())),
                ));
                if r.is_ok() {
                    model.settle_all();
                    let src = &model.volumes[&v];
                    let (size, content) = (src.size, src.flushed[..src.sectors()].to_vec());
                    let tag = model.new_tag();
                    model
                        .volumes
                        .insert(name, VolModel::new(tag, size, content));
                }
                r.map(|_| ())
            }
            22 => {
                let vm = model.volumes.get_mut(&v).expect("live");
                let new = (vm.size + rng.gen_range(1..=3u64) * CHUNK).min(MAX_VOL);
                let r = engine.resize_volume(&v, new, false);
                resized(model, &v, new, r.is_ok());
                r.map(|_| ())
            }
            23 if model.volumes[&v].size >= 3 * CHUNK => {
                // A forced shrink, to a size that need not be a chunk multiple: what lies
                // past the new end must read zeros after a later grow.
                let vm = model.volumes.get_mut(&v).expect("live");
                let new = vm.size - rng.gen_range(1..=vm.size / CHUNK - 1) * CHUNK
                    + rng.gen_range(0..2u64) * 4096;
                for s in (new / SECTOR) as usize..vm.sectors() {
                    vm.since[s].push(0);
                }
                let r = engine.resize_volume(&v, new, true);
                resized(model, &v, new, r.is_ok());
                r.map(|_| ())
            }
            24 if model.volumes.len() > 1 => {
                // Even a failed delete may have become durable: stop checking the volume.
                // Its snapshots and clones must live on.
                model.volumes.remove(&v);
                engine.delete_volume(&v)
            }
            25..=26 => {
                // Flattening a volume without a parent does nothing (no commit).
                let clone = engine.volume(&v).unwrap().has_parent;
                let r = engine.flatten_volume(&v, &mut |_, _| {});
                if r.is_ok() && clone {
                    model.settle_all();
                }
                r.map(|_| ())
            }
            _ => write_random(engine, &h, &v, &mut rng, model),
        };
        if r.is_err() {
            break;
        }
    }
}

/// Records a resize of `v` to `new`: done (a commit point) or in doubt.
fn resized(model: &mut Model, v: &str, new: u64, ok: bool) {
    if ok {
        model.settle_all();
        let vm = model.volumes.get_mut(v).expect("live");
        vm.size = new;
    } else {
        model.volumes.get_mut(v).expect("live").size_in_doubt = Some(new);
    }
}

/// Checks every volume and snapshot of `model` against `engine`.
fn verify(engine: &Engine, model: &Model, seed: u64, when: &str) {
    for (v, m) in &model.volumes {
        let h = engine
            .open_image(v)
            .unwrap_or_else(|e| panic!("{when}: volume {v} created before the crash: {e}"));
        let size = engine.image_size(&h).unwrap();
        assert!(
            size == m.size || Some(size) == m.size_in_doubt,
            "{when}: volume {v} is {size} bytes; allowed {} or {:?} (seed {seed})",
            m.size,
            m.size_in_doubt
        );
        let mut buf = vec![0u8; size as usize];
        engine.read(&h, 0, &mut buf).unwrap();
        for (s, sec) in buf.chunks(SECTOR as usize).enumerate() {
            let got = decode_sector(sec).unwrap_or_else(|| {
                panic!("{when}: volume {v} sector {s} holds torn or foreign bytes (seed {seed})")
            });
            let ok = got == m.flushed[s] || m.since[s].contains(&got);
            assert!(
                ok,
                "{when}: volume {v} sector {s} reads stamp {got:#x}; allowed {:#x} or {:x?} (seed {seed})",
                m.flushed[s], m.since[s]
            );
        }
    }
    for (name, snap) in &model.snaps {
        let image = format!("{}@{name}", snap.volume);
        let h = engine.open_image(&image).unwrap_or_else(|e| {
            panic!("{when}: snapshot {image} taken before the crash is gone: {e} (seed {seed})")
        });
        let size = engine.image_size(&h).unwrap();
        assert_eq!(
            size,
            snap.content.len() as u64 * SECTOR,
            "{when}: snapshot {image} size (seed {seed})"
        );
        let mut buf = vec![0u8; size as usize];
        engine.read(&h, 0, &mut buf).unwrap();
        for (s, sec) in buf.chunks(SECTOR as usize).enumerate() {
            assert_eq!(
                decode_sector(sec),
                Some(snap.content[s]),
                "{when}: snapshot {image} sector {s} changed (seed {seed})"
            );
        }
    }
    let report = engine.fsck(false).unwrap();
    assert!(report.is_clean(), "{when}: fsck (seed {seed}): {report:?}");
}

/// Power cut and reboot: drop unflushed device writes at random, keep what metadata
/// may have made durable, reopen without faults, check every invariant.
fn crash_and_verify(world: &World, engine: Engine, model: &Model, seed: u64) {
    drop(engine);
    world.clock.arm(None);
    world.mem_dev.power_cut(seed, 0.5);
    let dev: Arc<dyn BlockDevice> = Arc::new(world.mem_dev.clone_durable());
    let meta = Arc::new(world.meta.crash_copy(seed));
    let engine =
        Engine::open(meta as Arc<dyn MetaStore>, pool_spec(dev)).expect("reopen after crash");
    verify(&engine, model, seed, "after the crash");
    // A flatten the crash interrupted finishes now and changes no content.
    engine.resume_intents();
    verify(
        &engine,
        model,
        seed,
        "after resuming interrupted operations",
    );

    // A new volume reads zeros everywhere, whatever chunks deleted volumes left.
    let (fresh, _) = engine
        .create_volume(&volume_spec("fresh", Some(MAX_VOL), None))
        .expect("create a volume after the crash");
    let h = engine.open_image(&fresh.name).unwrap();
    let mut buf = vec![0xffu8; MAX_VOL as usize];
    engine.read(&h, 0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|b| *b == 0),
        "a new volume reads data (seed {seed})"
    );
    // And the engine keeps working.
    for v in model.volumes.keys().chain(std::iter::once(&fresh.name)) {
        let h = engine.open_image(v).unwrap();
        engine.write(&h, 0, &[0x42; 4096]).unwrap();
    }
    engine.flush().unwrap();
    engine.gc().unwrap();
    let report = engine.fsck(false).unwrap();
    assert!(
        report.is_clean(),
        "fsck after post-crash writes (seed {seed}): {report:?}"
    );
}

#[test]
fn crash_fail_every_io_after_n() {
    let ops = 60;
    for seed in 0..3u64 {
        // How many I/Os does the whole workload take without faults?
        let (world, engine, mut model) = setup(seed);
        world.clock.arm(None);
        workload(&engine, &mut model, seed, ops);
        let total = world.clock.ticks();
        drop(engine);
        assert!(total > 10, "the workload does I/O");
        let step = (total / 150).max(1);
        let mut n = 1;
        while n <= total + 1 {
            let (world, engine, mut model) = setup(seed);
            world.clock.arm(Some(n));
            workload(&engine, &mut model, seed, ops);
            crash_and_verify(&world, engine, &model, seed * 1000 + n);
            n += step;
        }
    }
}

#[test]
fn crash_power_cut_at_random_points() {
    for seed in 0..40u64 {
        let (world, engine, mut model) = setup(seed);
        let ops = StdRng::seed_from_u64(seed).gen_range(1..80);
        workload(&engine, &mut model, seed, ops);
        crash_and_verify(&world, engine, &model, seed);
    }
}

/// The workload really runs every kind of operation: a test that only wrote would pass
/// the checks above just as well.
#[test]
fn the_workload_clones_resizes_deletes_and_flattens() {
    let mut seen_clone_of_snapshot = false;
    let mut seen_clone_of_volume = false;
    let mut seen_flatten = false;
    let mut seen_delete = false;
    let mut seen_resize = false;
    for seed in 0..3u64 {
        let (_world, engine, mut model) = setup(seed);
        workload(&engine, &mut model, seed, 60);
        for v in engine.volumes() {
            match &v.source {
                Some(Source::Snapshot(_)) => seen_clone_of_snapshot = true,
                Some(Source::Volume(_)) => seen_clone_of_volume = true,
                None => {}
            }
            if v.source.is_some() && !v.has_parent {
                seen_flatten = true;
            }
            if v.size_bytes != VOL && v.source.is_none() {
                seen_resize = true;
            }
        }
        seen_delete |= engine
            .snapshots(None)
            .unwrap()
            .iter()
            .any(|s| s.volume_deleted)
            || !model.volumes.contains_key("a")
            || !model.volumes.contains_key("b");
        verify(&engine, &model, seed, "without a crash");
    }
    assert!(seen_clone_of_snapshot, "no clone of a snapshot");
    assert!(seen_clone_of_volume, "no clone of a volume");
    assert!(seen_flatten, "no flattened clone");
    assert!(seen_delete, "no deleted volume");
    assert!(seen_resize, "no resized volume");
}
