//! blockd-demo: opens the engine on a state directory (a sparse pool file and RocksDB
//! metadata), then creates a volume, writes to it, snapshots it, clones the snapshot,
//! and prints what it did and what each image reads. A quick way to see the engine work
//! without the daemon.
//!
//! By default the state directory is a private temporary one, removed at exit, so the
//! demo never meets a daemon's state; `--state-dir` keeps it somewhere chosen.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use blockd::device::{open_path, EngineChoice};
use blockd::engine::{Engine, PoolSpec, Qos, Source, VolumeSpec, DEFAULT_CHUNK_SIZE};
use blockd::meta::rocks::RocksStore;
use clap::Parser;

/// Exercise the blockd engine on a local state directory.
///
/// Example: `blockd-demo` (a private temporary directory) or
/// `blockd-demo --state-dir ./demo-data` (kept after the demo).
#[derive(Parser)]
struct Args {
    /// Where the pool file (pool.img, 10 GiB sparse) and the metadata (meta/) live;
    /// kept after the demo. Default: a private temporary directory, removed at exit.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// I/O engine: auto, uring or sync.
    #[arg(long, default_value = "auto", value_parser = ["auto", "uring", "sync"])]
    io_engine: String,
}

/// A private temporary directory, removed (with everything in it) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> anyhow::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let path =
            std::env::temp_dir().join(format!("blockd-demo-{}-{nanos:09}", std::process::id()));
        let mut builder = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&path).with_context(|| {
            format!(
                "cannot create a temporary state directory {}",
                path.display()
            )
        })?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    // Declared before the engine opens, so it is removed after the engine is gone.
    let mut temp = None;
    let result = (|| {
        let state_dir = match &args.state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create state directory {}", dir.display()))?;
                println!("state directory: {}", dir.display());
                dir.clone()
            }
            None => {
                let dir = temp.insert(TempDir::create()?).0.clone();
                println!(
                    "state directory: {} (private, removed at exit; --state-dir DIR keeps one)",
                    dir.display()
                );
                dir
            }
        };
        run(&args, &state_dir)
    })();
    drop(temp);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the context chain, without a backtrace or line breaks.
            let text = format!("{err:#}");
            eprintln!(
                "error: {}",
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, state_dir: &Path) -> anyhow::Result<()> {
    let choice = match args.io_engine.as_str() {
        "uring" => EngineChoice::Uring,
        "sync" => EngineChoice::Sync,
        _ => EngineChoice::Auto,
    };
    // The metadata store first: its lock refuses a directory a daemon (or another demo)
    // is using before the pool file is touched.
    let meta = RocksStore::open(&state_dir.join("meta")).context("opening the metadata store")?;
    let pool_path = state_dir.join("pool.img");
    let device = open_path(&pool_path, Some(10 << 30), choice).context("opening the pool file")?;
    let engine = Engine::open(
        Arc::new(meta),
        vec![PoolSpec {
            name: "default".into(),
            device,
            chunk_size: DEFAULT_CHUNK_SIZE,
            path: pool_path.display().to_string(),
        }],
    )
    .context("opening the engine")?;

    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let vol = format!("demo-{stamp}");
    let (info, _) = engine.create_volume(&VolumeSpec {
        name: vol.clone(),
        pool: None,
        size: Some(1 << 30),
        source: None,
        qos: Qos::default(),
    })?;
    println!(
        "created volume {} ({} bytes, {} allocated)",
        info.name, info.size_bytes, info.allocated_bytes
    );
    let h = engine.open_image(&vol)?;
    engine.write(&h, 0, b"hello from blockd: version A")?;
    engine.flush()?;
    let snap = format!("{vol}-snap");
    engine.create_snapshot(&vol, &snap)?;
    println!("took snapshot {snap}");
    engine.write(&h, 0, b"hello from blockd: version B")?;
    let clone = format!("{vol}-clone");
    engine.create_volume(&VolumeSpec {
        name: clone.clone(),
        pool: None,
        size: Some(2 << 30),
        source: Some(Source::Snapshot(snap.clone())),
        qos: Qos::default(),
    })?;
    println!("cloned {snap} into {clone} at 2 GiB");
    for image in [vol.clone(), format!("{vol}@{snap}"), clone.clone()] {
        let h = engine.open_image(&image)?;
        let mut buf = [0u8; 28];
        engine.read(&h, 0, &mut buf)?;
        println!("{image:>40}: {}", String::from_utf8_lossy(&buf));
    }
    engine.flush()?;
    for p in engine.pools() {
        println!(
            "pool {}: capacity {} allocated {} provisioned {} chunk {} engine {}",
            p.name,
            p.capacity_bytes,
            p.allocated_bytes,
            p.provisioned_bytes,
            p.chunk_size_bytes,
            p.io_engine
        );
    }
    let report = engine.fsck(false)?;
    println!(
        "fsck: {}",
        if report.is_clean() {
            "clean"
        } else {
            "PROBLEMS"
        }
    );
    engine.shutdown()?;
    Ok(())
}
