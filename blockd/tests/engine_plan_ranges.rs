//! `Engine::plan_read_ranges`, the read plan of frontends that cannot touch the request's
//! buffer (ublk zero copy): doing its device reads and zeroing its hole ranges must give
//! exactly what `Engine::read` gives, over holes, partial chunks, chunk boundaries, a
//! snapshot's shared chunks and a clone's, for random ranges.

use std::sync::Arc;

use blockd::device::mem::MemDevice;
use blockd::device::BlockDevice;
use blockd::engine::{Engine, Source};
use blockd::meta::mem::MemStore;

#[path = "common/mem_engine.rs"]
mod mem_engine;
use mem_engine::{open, spec};

const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 4 << 20;

/// A reproducible stream of numbers (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Reads `len` bytes at `offset` of `image` the way a zero-copy frontend does: the
/// planned device reads straight from the device, the hole ranges zeroed, and every
/// other byte left as it was (0xA5), so a range the plan forgets shows.
fn read_by_plan(engine: &Engine, dev: &MemDevice, image: &str, offset: u64, len: usize) -> Vec<u8> {
    let h = engine.open_image(image).expect("open image");
    let pin = engine.try_read_pin(&h).expect("nothing reclaims");
    let (reads, zeros) = engine
        .plan_read_ranges(&pin, &h, offset, len)
        .expect("plan");
    let mut buf = vec![0xA5u8; len];
    let mut covered = vec![false; len];
    for r in &reads {
        dev.read_at(r.offset, &mut buf[r.pos..r.pos + r.len])
            .expect("device read");
        covered[r.pos..r.pos + r.len].fill(true);
    }
    for z in zeros {
        buf[z.clone()].fill(0);
        assert!(
            covered[z.clone()].iter().all(|c| !c),
            "a hole range overlaps a device read"
        );
        covered[z].fill(true);
    }
    assert!(
        covered.iter().all(|&c| c),
        "the plan leaves bytes of the request untouched ({offset}+{len})"
    );
    buf
}

fn read_engine(engine: &Engine, image: &str, offset: u64, len: usize) -> Vec<u8> {
    let h = engine.open_image(image).expect("open image");
    let mut buf = vec![0u8; len];
    engine.read(&h, offset, &mut buf).expect("read");
    buf
}

#[test]
fn planned_ranges_read_what_the_engine_reads() {
    let meta = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new(64 << 20));
    let engine = open(&meta, &dev, CHUNK);
    engine.create_volume(&spec("v", SIZE)).expect("volume");
    let h = engine.open_image("v").expect("open");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let write_some = |engine: &Engine, seed: u8, rng: &mut Rng| {
        for i in 0..40u64 {
            let offset = rng.below(SIZE / 512) * 512;
            let len = (1 + rng.below(((SIZE - offset) / 512).min(64))) * 512;
            let data = vec![seed.wrapping_add(i as u8) | 1; len as usize];
            engine.write(&h, offset, &data).expect("write");
        }
    };
    write_some(&engine, 1, &mut rng);
    engine.create_snapshot("v", "s").expect("snapshot");
    write_some(&engine, 100, &mut rng);
    engine.flush().expect("flush");
    let mut clone = spec("c", SIZE);
    clone.source = Some(Source::Snapshot("s".into()));
    engine.create_volume(&clone).expect("clone");
    for image in ["v", "v@s", "c"] {
        for _ in 0..200 {
            let offset = rng.below(SIZE / 512) * 512;
            let len = ((1 + rng.below(((SIZE - offset) / 512).min(1024))) * 512) as usize;
            assert_eq!(
                read_by_plan(&engine, &dev, image, offset, len),
                read_engine(&engine, image, offset, len),
                "{image}: {offset}+{len}"
            );
        }
    }
    // Out of range is the engine's error, not a plan.
    let pin = engine.try_read_pin(&h).expect("pin");
    assert!(engine.plan_read_ranges(&pin, &h, SIZE - 512, 1024).is_err());
}
