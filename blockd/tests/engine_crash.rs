//! Crash simulation, SPDK-style: every device I/O and metadata write after the N-th fails
//! (N = 1, 2, 3, ...), then the machine "loses power" (unflushed device writes are dropped
//! at random, unsynced metadata too) and the engine reopens on what survived.
//!
//! After every crash: every write acknowledged before a completed flush reads back (or a
//! value written after it — a disk's volatile cache may keep those), every snapshot taken
//! reads exactly what the volume held when it was taken, no sector shows another
//! volume's data or torn garbage, and fsck finds no double ownership or leak.

use std::collections::BTreeMap;
use std::sync::Arc;

use blockd::device::faulty::FaultyDevice;
use blockd::device::mem::MemDevice;
use blockd::device::BlockDevice;
use blockd::engine::{Engine, ImageHandle, PoolSpec, Qos, VolumeSpec};
use blockd::fault::FaultClock;
use blockd::meta::mem::MemStore;
use blockd::meta::MetaStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHUNK: u64 = 8192;
const POOL: u64 = 2 << 20;
const VOL: u64 = 96 * 1024;
const SECTOR: u64 = 512;
const SECTORS: usize = (VOL / SECTOR) as usize;
const VOLS: [&str; 2] = ["a", "b"];

/// What each sector of a volume may read after a crash.
#[derive(Clone)]
struct SectorModel {
    /// Value after the last completed flush (0 = zeros).
    flushed: Vec<u64>,
    /// Values written since (any of them may have reached the disk).
    since: Vec<Vec<u64>>,
}

impl SectorModel {
    fn new() -> Self {
        SectorModel {
            flushed: vec![0; SECTORS],
            since: vec![Vec::new(); SECTORS],
        }
    }
    fn latest(&self) -> Vec<u64> {
        (0..SECTORS)
            .map(|s| *self.since[s].last().unwrap_or(&self.flushed[s]))
            .collect()
    }
    fn settle(&mut self) {
        self.flushed = self.latest();
        self.since.iter_mut().for_each(Vec::clear);
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

/// A fresh world with both volumes created and some flushed data, no faults armed.
fn setup(seed: u64) -> (World, Engine, BTreeMap<&'static str, SectorModel>, u64) {
    let clock = Arc::new(FaultClock::new());
    let mem_dev = Arc::new(MemDevice::new(POOL));
    let meta = Arc::new(MemStore::with_faults(clock.clone()));
    let dev: Arc<dyn BlockDevice> = Arc::new(FaultyDevice::new(mem_dev.clone(), clock.clone()));
    let engine = Engine::open(meta.clone() as Arc<dyn MetaStore>, pool_spec(dev)).unwrap();
    let mut models = BTreeMap::new();
    for v in VOLS {
        engine
            .create_volume(&VolumeSpec {
                name: v.into(),
                pool: None,
                size: Some(VOL),
                source: None,
                qos: Qos::default(),
            })
            .unwrap();
        models.insert(v, SectorModel::new());
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seq = 1;
    // Some flushed baseline data so that copy-on-write and in-place paths both run.
    for (vi, v) in VOLS.iter().enumerate() {
        let h = engine.open_image(v).unwrap();
        for _ in 0..6 {
            write_random(
                &engine,
                &h,
                vi,
                &mut rng,
                &mut seq,
                models.get_mut(v).unwrap(),
            )
            .unwrap();
        }
    }
    engine.flush().unwrap();
    models.values_mut().for_each(SectorModel::settle);
    (
        World {
            mem_dev,
            meta,
            clock,
        },
        engine,
        models,
        seq,
    )
}

fn write_random(
    engine: &Engine,
    h: &ImageHandle,
    vi: usize,
    rng: &mut StdRng,
    seq: &mut u64,
    model: &mut SectorModel,
) -> blockd::engine::Result<()> {
    let n = rng.gen_range(1..=40usize);
    let first = rng.gen_range(0..SECTORS - n);
    let mut buf = vec![0u8; n * SECTOR as usize];
    let mut stamps = Vec::new();
    for (i, sec) in buf.chunks_mut(SECTOR as usize).enumerate() {
        let stamp = ((vi as u64 + 1) << 40) | *seq;
        *seq += 1;
        stamp_sector(sec, stamp);
        stamps.push((first + i, stamp));
    }
    // A failed write may still have reached the disk in part: record it either way.
    for (s, stamp) in stamps {
        model.since[s].push(stamp);
    }
    engine.write(h, first as u64 * SECTOR, &buf)
}

/// Runs random operations until one fails or `ops` have run. Returns the snapshots
/// known to be taken (name -> (volume, contents per sector)).
fn workload(
    engine: &Engine,
    models: &mut BTreeMap<&'static str, SectorModel>,
    seed: u64,
    mut seq: u64,
    ops: usize,
) -> BTreeMap<String, (&'static str, Vec<u64>)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut snaps = BTreeMap::new();
    for i in 0..ops {
        let vi = rng.gen_range(0..VOLS.len());
        let v = VOLS[vi];
        let h = engine.open_image(v).unwrap();
        let r = match rng.gen_range(0..20) {
            0..=11 => write_random(
                engine,
                &h,
                vi,
                &mut rng,
                &mut seq,
                models.get_mut(v).unwrap(),
            ),
            12..=13 => {
                let r = engine.flush();
                if r.is_ok() {
                    models.values_mut().for_each(SectorModel::settle);
                }
                r
            }
            14..=15 => {
                let name = format!("snap{i}");
                let r = engine.create_snapshot(v, &name);
                if r.is_ok() {
                    // A snapshot is a commit point for everything written before it.
                    models.values_mut().for_each(SectorModel::settle);
                    snaps.insert(name, (v, models[v].flushed.clone()));
                }
                r.map(|_| ())
            }
            16 => {
                let chunk = rng.gen_range(0..VOL / CHUNK);
                let per = (CHUNK / SECTOR) as usize;
                let m = models.get_mut(v).unwrap();
                for s in chunk as usize * per..(chunk as usize + 1) * per {
                    m.since[s].push(0);
                }
                if rng.gen_bool(0.5) {
                    engine.discard(&h, chunk * CHUNK, CHUNK)
                } else {
                    engine.write_zeroes(&h, chunk * CHUNK, CHUNK)
                }
            }
            17 => match snaps.keys().next().cloned() {
                Some(name) => {
                    // Even a failed delete may have become durable: stop checking it.
                    snaps.remove(&name);
                    engine.delete_snapshot(&name)
                }
                None => Ok(()),
            },
            _ => engine.gc().map(|_| ()),
        };
        if r.is_err() {
            break;
        }
    }
    snaps
}

/// Power cut and reboot: drop unflushed device writes at random, keep what metadata
/// may have made durable, reopen without faults, check every invariant.
fn crash_and_verify(
    world: &World,
    engine: Engine,
    models: &BTreeMap<&'static str, SectorModel>,
    snaps: &BTreeMap<String, (&'static str, Vec<u64>)>,
    seed: u64,
) {
    drop(engine);
    world.clock.arm(None);
    world.mem_dev.power_cut(seed, 0.5);
    let dev: Arc<dyn BlockDevice> = Arc::new(world.mem_dev.clone_durable());
    let meta = Arc::new(world.meta.crash_copy(seed));
    let engine =
        Engine::open(meta as Arc<dyn MetaStore>, pool_spec(dev)).expect("reopen after crash");
    for (v, m) in models {
        let h = engine
            .open_image(v)
            .expect("volume created before the crash exists");
        let mut buf = vec![0u8; VOL as usize];
        engine.read(&h, 0, &mut buf).unwrap();
        for (s, sec) in buf.chunks(SECTOR as usize).enumerate() {
            let got = decode_sector(sec)
                .unwrap_or_else(|| panic!("volume {v} sector {s} holds torn or foreign bytes"));
            let ok = got == m.flushed[s] || m.since[s].contains(&got);
            assert!(
                ok,
                "volume {v} sector {s} reads stamp {got:#x}; allowed {:#x} or {:x?} (seed {seed})",
                m.flushed[s], m.since[s]
            );
        }
    }
    for (name, (v, content)) in snaps {
        let h = engine
            .open_image(&format!("{v}@{name}"))
            .unwrap_or_else(|e| panic!("snapshot {name} taken before the crash is gone: {e}"));
        let mut buf = vec![0u8; VOL as usize];
        engine.read(&h, 0, &mut buf).unwrap();
        for (s, sec) in buf.chunks(SECTOR as usize).enumerate() {
            assert_eq!(
                decode_sector(sec),
                Some(content[s]),
                "snapshot {name} sector {s} changed (seed {seed})"
            );
        }
    }
    let report = engine.fsck(false).unwrap();
    assert!(
        report.is_clean(),
        "fsck after crash (seed {seed}): {report:?}"
    );
    // And the engine keeps working.
    let h = engine.open_image("a").unwrap();
    engine.write(&h, 0, &[0x42; 4096]).unwrap();
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
        let (world, engine, mut models, seq) = setup(seed);
        world.clock.arm(None);
        workload(&engine, &mut models, seed, seq, ops);
        let total = world.clock.ticks();
        drop(engine);
        assert!(total > 10, "the workload does I/O");
        let step = (total / 150).max(1);
        let mut n = 1;
        while n <= total + 1 {
            let (world, engine, mut models, seq) = setup(seed);
            world.clock.arm(Some(n));
            let snaps = workload(&engine, &mut models, seed, seq, ops);
            crash_and_verify(&world, engine, &models, &snaps, seed * 1000 + n);
            n += step;
        }
    }
}

#[test]
fn crash_power_cut_at_random_points() {
    for seed in 0..40u64 {
        let (world, engine, mut models, seq) = setup(seed);
        let ops = StdRng::seed_from_u64(seed).gen_range(1..80);
        let snaps = workload(&engine, &mut models, seed, seq, ops);
        crash_and_verify(&world, engine, &models, &snaps, seed);
    }
}
