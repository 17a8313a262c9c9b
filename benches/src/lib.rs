//! Benchmark support: devices and fixtures shared by the criterion benches.
//!
//! [`NullDevice`] stands in for a disk when a benchmark measures engine logic and metadata
//! rather than device speed (snapshot creation, map lookups, allocation): writes vanish,
//! reads return zeros, flushes are free.
//!
//! [`report`] is the fio harness's result side (`benches/run.sh` → `bench-report`).

use std::sync::Arc;

use blockd::device::{self, BlockDevice, IoEngine, IoOp};
use blockd::engine::ImageHandle;
use blockd::engine::{Engine, PoolSpec, Qos, VolumeSpec};
use blockd::meta::rocks::RocksStore;

pub mod report;

/// A device that stores nothing but its first 4 KiB (the pool superblock, so that the
/// engine can be reopened on it): for benchmarks of everything but the device.
#[derive(Debug)]
pub struct NullDevice {
    size: u64,
    header: parking_lot::Mutex<Vec<u8>>,
}

const HEADER: usize = 4096;

impl NullDevice {
    pub fn new(size: u64) -> Self {
        NullDevice {
            size,
            header: parking_lot::Mutex::new(vec![0; HEADER]),
        }
    }
}

impl BlockDevice for NullDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn engine(&self) -> IoEngine {
        IoEngine::Memory
    }
    fn punch_zeroes(&self) -> bool {
        true
    }
    fn submit(&self, ops: &mut [IoOp<'_>]) -> device::Result<()> {
        for op in ops {
            device::check_range(op.offset(), op.len() as u64, self.size)?;
            let off = op.offset() as usize;
            match op {
                IoOp::Read { buf, .. } => {
                    buf.fill(0);
                    if off < HEADER {
                        let n = (HEADER - off).min(buf.len());
                        buf[..n].copy_from_slice(&self.header.lock()[off..off + n]);
                    }
                }
                IoOp::Write { buf, .. } => {
                    if off < HEADER {
                        let n = (HEADER - off).min(buf.len());
                        self.header.lock()[off..off + n].copy_from_slice(&buf[..n]);
                    }
                }
            }
        }
        Ok(())
    }
    fn flush(&self) -> device::Result<()> {
        Ok(())
    }
    fn punch(&self, offset: u64, len: u64) -> device::Result<()> {
        device::check_range(offset, len, self.size)
    }
}

/// Opens an engine on RocksDB in `dir/meta` over `device` (one pool "bench").
pub fn open_engine(dir: &std::path::Path, device: &Arc<NullDevice>, chunk_size: u64) -> Engine {
    open_engine_with_store(dir, device, chunk_size).0
}

/// Like [`open_engine`], also returning the store (to flush it and measure its size).
pub fn open_engine_with_store(
    dir: &std::path::Path,
    device: &Arc<NullDevice>,
    chunk_size: u64,
) -> (Engine, Arc<RocksStore>) {
    let meta = Arc::new(RocksStore::open(&dir.join("meta")).expect("rocksdb opens"));
    let engine = Engine::open(
        meta.clone(),
        vec![PoolSpec {
            name: "bench".into(),
            device: device.clone(),
            chunk_size,
            path: "null".into(),
        }],
    )
    .expect("engine opens");
    (engine, meta)
}

/// Creates volume `name` of `size` bytes in the default pool.
pub fn create_volume(engine: &Engine, name: &str, size: u64) {
    engine
        .create_volume(&VolumeSpec {
            name: name.into(),
            pool: None,
            size: Some(size),
            source: None,
            qos: Qos::default(),
        })
        .expect("volume");
}

/// Writes 4 KiB at the start of each chunk in `chunks` of image `h` (mapping each one),
/// committing every 100 K chunks and at the end.
pub fn write_chunks(
    engine: &Engine,
    h: &ImageHandle,
    chunk_size: u64,
    chunks: std::ops::Range<u64>,
) {
    let block = vec![1u8; 4096];
    for c in chunks {
        engine.write(h, c * chunk_size, &block).expect("write");
        if c % 100_000 == 99_999 {
            engine.flush().expect("flush");
        }
    }
    engine.flush().expect("flush");
}

/// An engine on RocksDB (in `dir`) and a null device of `chunks` chunks of `chunk_size`,
/// with one volume "vol" whose first `written` chunks are written and committed.
pub fn engine_with_written_chunks(
    dir: &std::path::Path,
    chunk_size: u64,
    chunks: u64,
    written: u64,
) -> (Engine, Arc<NullDevice>) {
    let device = Arc::new(NullDevice::new((chunks + 1) * chunk_size));
    let engine = open_engine(dir, &device, chunk_size);
    create_volume(&engine, "vol", chunks * chunk_size);
    let h = engine.open_image("vol").expect("open");
    write_chunks(&engine, &h, chunk_size, 0..written);
    (engine, device)
}
