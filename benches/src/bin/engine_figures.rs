//! `engine-figures`: engine figures that are sizes and one-off times rather than
//! per-operation costs, printed as JSON ([`EngineFigures`]) on stdout, progress on stderr.
//!
//! - RSS with 1 TiB of thin volumes: VmRSS with the engine open, after creating 16 × 64 GiB
//!   volumes, and after mapping some chunks across them;
//! - metadata bytes per TiB written: RocksDB SST bytes after writing N chunks of 64 KiB
//!   (memtables flushed), scaled to 1 TiB;
//! - startup time over those N mapped chunks;
//! - snapshot creation time for volumes with 1 K, 100 K and 1 M written chunks (medians,
//!   sizes interleaved so machine noise hits them alike): it must stay flat.
//!
//! The engine runs on RocksDB in `$BLOCKD_BENCH_SCRATCH` (default: a temporary directory)
//! over a [`NullDevice`], so data I/O costs nothing and the figures are the engine's own.
//! `BLOCKD_BENCH_FIGURE_CHUNKS` (default 1000000) sets the largest volume.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use blockd_bench::report::{
    EngineFigures, MetadataFigure, RssFigure, SnapshotFigure, StartupFigure,
};
use blockd_bench::{create_volume, open_engine, open_engine_with_store, write_chunks, NullDevice};

const CHUNK: u64 = 64 << 10;
const TIB: u64 = 1 << 40;
const RSS_VOLUMES: u64 = 16;
const RSS_CHUNKS_PER_VOLUME: u64 = 4096;
const SNAPSHOT_SAMPLES: usize = 15;

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
    let figures = EngineFigures {
        chunk_size_bytes: CHUNK,
        metadata,
        startup,
        rss,
        snapshot_create,
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
