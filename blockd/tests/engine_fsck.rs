//! fsck finds what it must (double ownership, pointers outside the pool, orphan entries)
//! and repairs what it may; GC and flatten resume after a crash in the middle; several
//! pools live side by side in one engine.

use std::sync::Arc;

use blockd::device::faulty::FaultyDevice;
use blockd::device::mem::MemDevice;
use blockd::device::BlockDevice;
use blockd::engine::{Engine, EngineError, PoolSpec, Source};
use blockd::fault::FaultClock;
use blockd::meta::keys;
use blockd::meta::mem::MemStore;
use blockd::meta::{Cf, MetaStore, WriteBatch};

#[path = "common/volume_spec.rs"]
mod volume_spec;
use volume_spec::spec;

const CHUNK: u64 = 16 * 1024;
const MIB: u64 = 1 << 20;

fn pool(name: &str, dev: Arc<dyn BlockDevice>) -> PoolSpec {
    PoolSpec {
        name: name.into(),
        device: dev,
        chunk_size: CHUNK,
        path: format!("mem:{name}"),
    }
}

/// A new engine on an in-memory store and 8 MiB device, pool `p`, with volume `a` of 1 MiB.
fn with_volume_a() -> (Arc<MemStore>, Arc<dyn BlockDevice>, Engine) {
    let meta = Arc::new(MemStore::new());
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8 * MIB));
    let e = Engine::open(meta.clone(), vec![pool("p", dev.clone())]).unwrap();
    e.create_volume(&spec("a", MIB)).unwrap();
    (meta, dev, e)
}

fn fill(e: &Engine, vol: &str, len: usize, byte: u8) {
    let h = e.open_image(vol).unwrap();
    e.write(&h, 0, &vec![byte; len]).unwrap();
}

/// Finds the lineage id and one mapped chunk of the store's map.
fn first_map_entry(meta: &MemStore) -> (u64, u64, u64, u64) {
    let kv = meta.scan(Cf::Map, &[], &[], 1).unwrap();
    let (k, v) = &kv[0];
    let (l, c, e) = keys::decode_map_key(k).unwrap();
    (l, c, e, keys::decode_map_value(v).unwrap())
}

#[test]
fn fsck_reports_double_ownership_and_refuses_writes() {
    let (meta, dev, e) = with_volume_a();
    fill(&e, "a", 4 * CHUNK as usize, 1);
    e.shutdown().unwrap();
    drop(e);
    // Corrupt: a second map entry pointing at an already owned chunk.
    let (l, _, epoch, phys) = first_map_entry(&meta);
    let mut b = WriteBatch::new();
    b.put_cf(Cf::Map, keys::map_key(l, 40, epoch), keys::map_value(phys));
    meta.write(b, true).unwrap();

    let e = Engine::open(meta.clone(), vec![pool("p", dev)]).unwrap();
    let r = e.fsck(false).unwrap();
    assert_eq!(r.double_owned, 1, "{r:?}");
    assert!(!r.is_clean());
    assert!(
        r.problems.iter().any(|p| p.contains("owned by")),
        "{:?}",
        r.problems
    );
    let h = e.open_image("a").unwrap();
    assert!(
        matches!(e.write(&h, 0, &[1]), Err(EngineError::Failed(_))),
        "writes refused"
    );
    let mut buf = [0u8; 16];
    e.read(&h, 0, &mut buf).expect("reads still work");
    assert!(e.pool("p").unwrap().health.starts_with("degraded"));
    let r = e.fsck(true).unwrap();
    assert_eq!(
        r.double_owned, 1,
        "double ownership is never repaired automatically"
    );
}

#[test]
fn fsck_repairs_orphans_and_bad_pointers_are_reported() {
    let (meta, dev, e) = with_volume_a();
    fill(&e, "a", CHUNK as usize, 1);
    e.shutdown().unwrap();
    drop(e);
    let mut b = WriteBatch::new();
    b.put_cf(Cf::Map, keys::map_key(999_999, 0, 1), keys::map_value(7)); // orphan lineage
    meta.write(b, true).unwrap();
    let e = Engine::open(meta.clone(), vec![pool("p", dev.clone())]).unwrap();
    let r = e.fsck(false).unwrap();
    assert!(r.bad_records >= 1 && !r.is_clean(), "{r:?}");
    let r = e.fsck(true).unwrap();
    assert!(r.repaired >= 1, "{r:?}");
    let r = e.fsck(false).unwrap();
    assert!(r.is_clean(), "clean after repair: {r:?}");
    let h = e.open_image("a").unwrap();
    e.write(&h, 0, &[2; 512])
        .expect("writes allowed after repair");
    e.shutdown().unwrap();
    drop(e);

    // A pointer outside the pool.
    let (l, _, epoch, _) = first_map_entry(&meta);
    let mut b = WriteBatch::new();
    b.put_cf(
        Cf::Map,
        keys::map_key(l, 50, epoch),
        keys::map_value(1 << 40),
    );
    meta.write(b, true).unwrap();
    let e = Engine::open(meta, vec![pool("p", dev)]).unwrap();
    let r = e.fsck(false).unwrap();
    assert_eq!(r.bad_pointers, 1, "{r:?}");
}

/// A metadata store and a device that fail together once `clock` is armed, and can then
/// lose power.
struct Faulty {
    clock: Arc<FaultClock>,
    meta: Arc<MemStore>,
    mem: Arc<MemDevice>,
}

impl Faulty {
    /// A new store and device of `size` bytes, and the engine (pool `p`) on them.
    fn open(size: u64) -> (Faulty, Engine) {
        let clock = Arc::new(FaultClock::new());
        let meta = Arc::new(MemStore::with_faults(clock.clone()));
        let mem = Arc::new(MemDevice::new(size));
        let dev: Arc<dyn BlockDevice> = Arc::new(FaultyDevice::new(mem.clone(), clock.clone()));
        let e = Engine::open(meta.clone(), vec![pool("p", dev)]).unwrap();
        (Faulty { clock, meta, mem }, e)
    }

    /// Drops `e`, disarms the clock, cuts the power (seed `seed`, each unflushed write
    /// kept with probability `keep_ratio`) and opens the engine on what survived.
    fn crash_and_reopen(&self, e: Engine, seed: u64, keep_ratio: f64) -> Engine {
        drop(e);
        self.clock.arm(None);
        self.mem.power_cut(seed, keep_ratio);
        let dev: Arc<dyn BlockDevice> = Arc::new(self.mem.clone_durable());
        let meta = Arc::new(self.meta.crash_copy(seed));
        Engine::open(meta, vec![pool("p", dev)]).unwrap()
    }
}

#[test]
fn crash_during_gc_resumes_and_reclaims_everything() {
    for fail_after in [1u64, 2, 3, 5, 8, 13] {
        let (f, e) = Faulty::open(16 * MIB);
        e.create_volume(&spec("big", 8 * MIB)).unwrap();
        e.create_volume(&spec("keep", MIB)).unwrap();
        fill(&e, "big", 6 * MIB as usize, 3);
        fill(&e, "keep", MIB as usize, 4);
        e.create_snapshot("big", "s").unwrap();
        fill(&e, "big", MIB as usize, 5);
        e.flush().unwrap();
        e.delete_volume("big").unwrap();
        e.delete_snapshot("s").unwrap();
        f.clock.arm(Some(fail_after));
        let _ = e.gc();
        let e = f.crash_and_reopen(e, fail_after, 0.5);
        e.gc().unwrap();
        let p = e.pool("p").unwrap();
        assert_eq!(
            p.allocated_bytes, MIB,
            "only 'keep' stays allocated (fail after {fail_after})"
        );
        let h = e.open_image("keep").unwrap();
        let mut buf = vec![0; MIB as usize];
        e.read(&h, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 4));
        assert!(e.fsck(false).unwrap().is_clean());
    }
}

#[test]
fn crash_during_flatten_resumes_from_its_intent() {
    for fail_after in [2u64, 5, 9, 20, 40] {
        let (f, e) = Faulty::open(32 * MIB);
        e.create_volume(&spec("base", 4 * MIB)).unwrap();
        fill(&e, "base", 4 * MIB as usize, 6);
        e.create_snapshot("base", "gold").unwrap();
        let mut c = spec("clone", 6 * MIB);
        c.source = Some(Source::Snapshot("gold".into()));
        e.create_volume(&c).unwrap();
        let h = e.open_image("clone").unwrap();
        e.write(&h, 0, &[9; 4096]).unwrap();
        e.flush().unwrap();
        f.clock.arm(Some(fail_after));
        let r = e.flatten_volume("clone", &mut |_, _| {});
        assert!(
            r.is_err(),
            "the fault interrupts the flatten (fail after {fail_after})"
        );
        let e = f.crash_and_reopen(e, fail_after, 0.3);
        e.resume_intents();
        let info = e.volume("clone").unwrap();
        assert!(
            !info.has_parent,
            "the interrupted flatten finished after restart"
        );
        // The clone no longer needs its parent: deleting both frees everything else.
        e.delete_snapshot("gold").unwrap();
        e.delete_volume("base").unwrap();
        e.gc().unwrap();
        let h = e.open_image("clone").unwrap();
        let mut buf = vec![0; 6 * MIB as usize];
        e.read(&h, 0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 9));
        assert!(buf[4096..4 * MIB as usize].iter().all(|&b| b == 6));
        assert!(buf[4 * MIB as usize..].iter().all(|&b| b == 0));
        assert_eq!(e.pool("p").unwrap().allocated_bytes, 4 * MIB);
        assert!(e.fsck(false).unwrap().is_clean());
    }
}

#[test]
fn several_pools_in_one_engine() {
    let meta = Arc::new(MemStore::new());
    let d1: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8 * MIB));
    let d2: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(16 * MIB));
    let e = Engine::open(
        meta.clone(),
        vec![pool("fast", d1.clone()), pool("slow", d2.clone())],
    )
    .unwrap();
    assert_eq!(e.default_pool(), "fast");
    e.create_volume(&spec("a", MIB)).unwrap();
    let mut b = spec("b", MIB);
    b.pool = Some("slow".into());
    e.create_volume(&b).unwrap();
    let mut dup = spec("a", MIB);
    dup.pool = Some("slow".into());
    assert!(
        matches!(
            e.create_volume(&dup),
            Err(EngineError::AlreadyExists { .. })
        ),
        "names are unique across pools"
    );
    let mut bad = spec("c", MIB);
    bad.pool = Some("nope".into());
    assert!(matches!(
        e.create_volume(&bad),
        Err(EngineError::NotFound { .. })
    ));
    fill(&e, "a", MIB as usize, 1);
    fill(&e, "b", MIB as usize, 2);
    let pools = e.pools();
    assert_eq!(pools.len(), 2);
    assert_eq!(pools[0].allocated_bytes, MIB);
    assert_eq!(pools[1].allocated_bytes, MIB);
    assert_eq!(pools[1].provisioned_bytes, MIB);
    e.shutdown().unwrap();
    drop(e);
    // Every known pool must be attached.
    let err = Engine::open(meta.clone(), vec![pool("fast", d1.clone())]).unwrap_err();
    assert!(err.to_string().contains("slow"), "{err}");
    let e = Engine::open(meta, vec![pool("fast", d1), pool("slow", d2)]).unwrap();
    assert_eq!(e.volume("b").unwrap().pool, "slow");
    assert!(e.fsck(false).unwrap().is_clean());
}
