//! Engine micro-benchmarks.
//!
//! - `snapshot_create/N`: taking a snapshot of a volume with N written chunks. The epoch
//!   design makes it one small metadata batch, so the time must stay flat from 1 K to 1 M.
//! - `map_lookup`: a 4 KiB read of a written chunk on a null device (map resolution cost).
//! - `first_touch_write`: a 4 KiB write into a never-written chunk (allocation + overlay).
//! - `open_with_map/N`: opening the engine over N mapped chunks (startup time).

use std::time::{Duration, Instant};

use blockd_bench::{engine_with_written_chunks, open_engine};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const CHUNK: u64 = 4096;

fn sizes() -> Vec<u64> {
    match std::env::var("BLOCKD_BENCH_QUICK") {
        Ok(_) => vec![1_000, 100_000],
        Err(_) => vec![1_000, 100_000, 1_000_000],
    }
}

fn snapshot_create(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot_create");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for n in sizes() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _dev) = engine_with_written_chunks(dir.path(), CHUNK, 2 * n, n);
        let mut i = 0u64;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i += 1;
                engine.create_snapshot("vol", &format!("s{i}")).unwrap();
            })
        });
        engine.shutdown().unwrap();
    }
    group.finish();
}

fn data_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let n = 100_000;
    let (engine, _dev) = engine_with_written_chunks(dir.path(), CHUNK, 4 * n, n);
    let h = engine.open_image("vol").unwrap();
    let mut buf = vec![0u8; 4096];
    let mut i = 0u64;
    c.bench_function("map_lookup_read_4k", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            engine.read(&h, i * CHUNK, &mut buf).unwrap();
        })
    });
    let mut next = n;
    c.bench_function("first_touch_write_4k", |b| {
        b.iter(|| {
            next += 1;
            if next >= 4 * n {
                next = n;
                // Wrapped: the chunks are owned now; keep measuring allocation elsewhere.
            }
            engine.write(&h, next * CHUNK, &buf).unwrap();
        })
    });
    engine.shutdown().unwrap();
}

fn open_with_map(c: &mut Criterion) {
    let mut group = c.benchmark_group("open_with_map");
    group.sample_size(10);
    for n in sizes() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, dev) = engine_with_written_chunks(dir.path(), CHUNK, 2 * n, n);
        engine.shutdown().unwrap();
        drop(engine);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let e = open_engine(dir.path(), &dev, CHUNK);
                    total += t.elapsed();
                    drop(e);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, snapshot_create, data_path, open_with_map);
criterion_main!(benches);
