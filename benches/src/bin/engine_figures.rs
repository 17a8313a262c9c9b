//! `engine-figures`: engine figures that are sizes and one-off times rather than
//! per-operation costs, printed as JSON ([`EngineFigures`]) on stdout, progress on stderr.
//!
//! - RSS with 1 TiB of thin volumes: VmRSS with the engine open, after creating 16 × 64 GiB
//!   volumes, and after mapping some chunks across them;
//! - metadata bytes per TiB written: RocksDB SST bytes after writing N chunks of 64 KiB
//!   (memtables flushed), scaled to 1 TiB;
//! - startup time over those N mapped chunks;
//! - snapshot creation time for volumes with 1 K, 100 K and 1 M written chunks (medians,
//!   sizes interleaved so machine noise hits them alike): it must stay flat;
//! - changed-block tracking (`delta`): time to compute the delta between two snapshots of a
//!   1 TiB and a 4 TiB volume with 0.1 % and 1 % of 1 TiB changed in between, and time and
//!   bytes to export it (delta plus reading every changed byte, as `export-diff` does): they
//!   follow the number of changed chunks, not the volume's size.
//!
//! The engine runs on RocksDB in `$BLOCKD_BENCH_SCRATCH` (default: a temporary directory)
//! over a [`NullDevice`], so data I/O costs nothing and the figures are the engine's own.
//! `BLOCKD_BENCH_FIGURE_CHUNKS` (default 1000000) sets the largest volume.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use blockd::engine::DiffTarget;
use blockd_bench::report::{
    DeltaFigure, EngineFigures, MetadataFigure, RssFigure, SnapshotFigure, StartupFigure,
};
use blockd_bench::{create_volume, open_engine, open_engine_with_store, write_chunks, NullDevice};

const CHUNK: u64 = 64 << 10;
const TIB: u64 = 1 << 40;
const RSS_VOLUMES: u64 = 16;
const RSS_CHUNKS_PER_VOLUME: u64 = 4096;
const SNAPSHOT_SAMPLES: usize = 15;
/// Chunks written before the base snapshot of the delta figures (spread over the volume).
const DELTA_BASE_CHUNKS: u64 = 200_000;
/// Extents per delta page, as blockd's API pages them.
const DELTA_PAGE: usize = 1024;

fn main() {
    if let Err(err) = run() {
        eprintln!("engine-figures: error: {err:#}");
        std::process::exit(1);
    }
}

fn progress(msg: &str) {
    eprintln!("engine-figures: {msg}");
}

fn run() -> Result<()> {
    let started = Instant::now();
    let largest: u64 = match std::env::var("BLOCKD_BENCH_FIGURE_CHUNKS") {
        Ok(v) => v
            .parse()
            .context("BLOCKD_BENCH_FIGURE_CHUNKS must be a number")?,
        Err(_) => 1_000_000,
    };
    let parent = std::env::var_os("BLOCKD_BENCH_SCRATCH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix("engine-figures-")
        .tempdir_in(&parent)
        .with_context(|| format!("temporary directory in {}", parent.display()))?;

    // First, while the process is small: RSS does not give memory back reliably.
    let rss = rss_figure(&scratch.path().join("rss"))?;
    let (metadata, startup, snapshot_create) = map_figures(&scratch.path().join("map"), largest)?;
    let delta = delta_figures(&scratch.path().join("delta"))?;
    let figures = EngineFigures {
        chunk_size_bytes: CHUNK,
        metadata,
        startup,
        rss,
        snapshot_create,
        delta,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    println!("{}", serde_json::to_string_pretty(&figures)?);
    Ok(())
}

fn rss_figure(dir: &Path) -> Result<RssFigure> {
    std::fs::create_dir_all(dir)?;
    let device = Arc::new(NullDevice::new(TIB + 2 * CHUNK));
    let engine = open_engine(dir, &device, CHUNK);
    let rss_empty_bytes = vm_rss()?;
    let size = TIB / RSS_VOLUMES;
    for v in 0..RSS_VOLUMES {
        create_volume(&engine, &format!("thin{v}"), size);
    }
    let rss_provisioned_bytes = vm_rss()?;
    progress(&format!(
        "rss: {RSS_VOLUMES} volumes of {} GiB; mapping {RSS_CHUNKS_PER_VOLUME} chunks in each",
        size >> 30
    ));
    let stride = size / CHUNK / RSS_CHUNKS_PER_VOLUME;
    let block = vec![1u8; 4096];
    for v in 0..RSS_VOLUMES {
        let h = engine.open_image(&format!("thin{v}"))?;
        // Spread across the volume, as a filesystem's writes would be.
        for i in 0..RSS_CHUNKS_PER_VOLUME {
            engine.write(&h, i * stride * CHUNK, &block)?;
        }
        engine.flush()?;
    }
    let rss_mapped_bytes = vm_rss()?;
    engine.shutdown()?;
    Ok(RssFigure {
        volumes: RSS_VOLUMES,
        provisioned_bytes: TIB,
        mapped_chunks: RSS_VOLUMES * RSS_CHUNKS_PER_VOLUME,
        rss_empty_bytes,
        rss_provisioned_bytes,
        rss_mapped_bytes,
    })
}

fn map_figures(
    dir: &Path,
    largest: u64,
) -> Result<(MetadataFigure, StartupFigure, Vec<SnapshotFigure>)> {
    std::fs::create_dir_all(dir)?;
    let mut sizes = vec![1_000u64, 100_000, largest];
    sizes.retain(|&n| n <= largest);
    sizes.dedup();
    let total: u64 = sizes.iter().sum();
    let device = Arc::new(NullDevice::new((2 * total + 1) * CHUNK));
    let (engine, store) = open_engine_with_store(dir, &device, CHUNK);
    for &n in &sizes {
        progress(&format!("writing {n} chunks"));
        let t = Instant::now();
        create_volume(&engine, &format!("v{n}"), 2 * n * CHUNK);
        let h = engine.open_image(&format!("v{n}"))?;
        write_chunks(&engine, &h, CHUNK, 0..n);
        progress(&format!(
            "  {:.1} s ({:.0} chunks/s)",
            t.elapsed().as_secs_f64(),
            n as f64 / t.elapsed().as_secs_f64()
        ));
    }
    store.flush()?;
    let (sst_bytes, dir_bytes) = store_bytes(&dir.join("meta"))?;
    let metadata = MetadataFigure {
        chunks_written: total,
        sst_bytes,
        dir_bytes,
        bytes_per_tib: (sst_bytes as f64 * TIB as f64 / (total * CHUNK) as f64) as u64,
    };
    progress(&format!(
        "metadata: {sst_bytes} SST bytes for {total} chunks, {} per TiB",
        metadata.bytes_per_tib
    ));

    engine.shutdown()?;
    drop(engine);
    drop(store);
    let t = Instant::now();
    let engine = open_engine(dir, &device, CHUNK);
    let startup = StartupFigure {
        mapped_chunks: total,
        open_ms: t.elapsed().as_secs_f64() * 1000.0,
    };
    progress(&format!(
        "startup over {total} mapped chunks: {:.0} ms",
        startup.open_ms
    ));

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    for i in 0..SNAPSHOT_SAMPLES {
        for (k, &n) in sizes.iter().enumerate() {
            let t = Instant::now();
            engine.create_snapshot(&format!("v{n}"), &format!("s{n}-{i}"))?;
            samples[k].push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let snapshots: Vec<SnapshotFigure> = sizes
        .iter()
        .zip(samples)
        .map(|(&n, mut s)| {
            s.sort_by(f64::total_cmp);
            SnapshotFigure {
                written_chunks: n,
                median_us: s[s.len() / 2],
                samples: s.len(),
            }
        })
        .collect();
    for s in &snapshots {
        progress(&format!(
            "snapshot of a volume with {} written chunks: median {:.0} µs",
            s.written_chunks, s.median_us
        ));
    }
    engine.shutdown()?;
    Ok((metadata, startup, snapshots))
}

/// Deltas of 1 TiB and 4 TiB volumes with 0.1 % and 1 % of a TiB changed.
fn delta_figures(dir: &Path) -> Result<Vec<DeltaFigure>> {
    std::fs::create_dir_all(dir)?;
    let volumes = [TIB, 4 * TIB];
    let changes = [TIB / CHUNK / 1000, TIB / CHUNK / 100];
    let pool = volumes.iter().sum::<u64>() + 4 * CHUNK;
    let device = Arc::new(NullDevice::new(pool));
    let engine = open_engine(dir, &device, CHUNK);
    let mut out = Vec::new();
    for (vi, &size) in volumes.iter().enumerate() {
        let chunks = size / CHUNK;
        let name = format!("d{vi}");
        create_volume(&engine, &name, size);
        let h = engine.open_image(&name)?;
        let block = vec![1u8; 4096];
        // A base spread over the whole volume, then the changes, each spread too.
        let base_stride = chunks / DELTA_BASE_CHUNKS;
        for i in 0..DELTA_BASE_CHUNKS {
            engine.write(&h, i * base_stride * CHUNK, &block)?;
        }
        engine.flush()?;
        engine.create_snapshot(&name, &format!("{name}-base"))?;
        for (ci, &changed) in changes.iter().enumerate() {
            progress(&format!(
                "delta: {} TiB volume, {changed} changed chunks",
                size / TIB
            ));
            // The smaller step's chunks are a subset of the larger one's (its stride is a
            // multiple), so the delta from the base is exactly `changed` chunks.
            let stride = chunks / changed;
            for i in 0..changed {
                engine.write(&h, (i * stride + 1) * CHUNK, &block)?;
                if i % 100_000 == 99_999 {
                    engine.flush()?;
                }
            }
            engine.flush()?;
            let target = format!("{name}-t{ci}");
            engine.create_snapshot(&name, &target)?;
            let base = format!("{name}-base");

            let t = Instant::now();
            let (extents, delta_bytes) = walk_delta(&engine, &base, &target, |_, _| Ok(()))?;
            let delta_ms = t.elapsed().as_secs_f64() * 1000.0;

            let image = engine.open_image(&format!("{name}@{target}"))?;
            let mut buf = vec![0u8; CHUNK as usize];
            let mut export_bytes = 0u64;
            let t = Instant::now();
            walk_delta(&engine, &base, &target, |offset, len| {
                let mut at = offset;
                while at < offset + len {
                    let n = CHUNK.min(offset + len - at);
                    engine.read(&image, at, &mut buf[..n as usize])?;
                    export_bytes += n;
                    at += n;
                }
                Ok(())
            })?;
            let export_ms = t.elapsed().as_secs_f64() * 1000.0;
            progress(&format!(
                "  delta {delta_ms:.0} ms ({extents} extents), export {export_ms:.0} ms ({} MiB)",
                export_bytes >> 20
            ));
            out.push(DeltaFigure {
                volume_bytes: size,
                base_chunks: DELTA_BASE_CHUNKS,
                changed_chunks: changed,
                changed_fraction_of_tib: (changed * CHUNK) as f64 / TIB as f64,
                extents,
                delta_bytes,
                delta_ms,
                export_ms,
                export_bytes,
            });
        }
    }
    engine.shutdown()?;
    Ok(out)
}

/// Pages through the delta from `base` to `target`, calling `each(offset, len)` for every
/// data extent; returns (extents, bytes).
fn walk_delta(
    engine: &blockd::engine::Engine,
    base: &str,
    target: &str,
    mut each: impl FnMut(u64, u64) -> blockd::engine::Result<()>,
) -> Result<(u64, u64)> {
    let (mut extents, mut bytes) = (0u64, 0u64);
    let mut next = Some(0);
    while let Some(offset) = next {
        let page =
            engine.changed_extents(base, DiffTarget::Snapshot(target), offset, DELTA_PAGE)?;
        for x in &page.extents {
            extents += 1;
            bytes += x.len;
            if !x.zero {
                each(x.offset, x.len)?;
            }
        }
        next = page.next_offset;
    }
    Ok((extents, bytes))
}

/// (bytes of `*.sst` files, bytes of every file) in a RocksDB directory.
fn store_bytes(dir: &Path) -> Result<(u64, u64)> {
    let mut sst = 0;
    let mut all = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() {
            all += meta.len();
            if entry.path().extension().is_some_and(|e| e == "sst") {
                sst += meta.len();
            }
        }
    }
    Ok((sst, all))
}

/// This process's resident set size (VmRSS in /proc/self/status).
fn vm_rss() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS in /proc/self/status")?
        .parse()?;
    Ok(kib * 1024)
}
