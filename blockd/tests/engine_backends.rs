//! The engine's behaviour suite, written once and run on every backend: the in-memory
//! device, a real sparse file through the sync (pread/pwrite) engine and through io_uring,
//! and a real loop device (both engines) — the last with RocksDB metadata like the others
//! that touch disk. Test names carry the backend: `mem_`, `sync_`, `uring_`, `loop_`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockd::device::mem::MemDevice;
use blockd::device::{open_path, BlockDevice, EngineChoice, IoEngine};
use blockd::engine::{Engine, EngineError, PoolSpec, Source};
use blockd::meta::mem::MemStore;
use blockd::meta::rocks::RocksStore;
use blockd::meta::MetaStore;

mod common;
#[path = "common/volume_spec.rs"]
mod volume_spec;
use volume_spec::spec;

const MIB: u64 = 1 << 20;

enum Kind {
    Mem,
    File(EngineChoice),
    Loop(EngineChoice),
}

/// Detaches a loop device when dropped, even if the test panics.
struct LoopGuard(String);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    meta_dir: PathBuf,
    dev_path: PathBuf,
    kind: Kind,
    size: u64,
    chunk: u64,
    mem: Option<(Arc<MemStore>, Arc<MemDevice>)>,
    _loop: Option<LoopGuard>,
}

impl Fixture {
    /// None (with a printed reason) when the backend cannot run on this machine.
    fn new(kind: Kind, size: u64, chunk: u64) -> Option<Fixture> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pool.img");
        let mut dev_path = file.clone();
        let mut guard = None;
        let mut mem = None;
        match &kind {
            Kind::Mem => mem = Some((Arc::new(MemStore::new()), Arc::new(MemDevice::new(size)))),
            Kind::File(_) => {}
            Kind::Loop(_) => {
                let f = std::fs::File::create(&file).expect("create backing file");
                f.set_len(size).expect("size backing file");
                let out = Command::new("losetup")
                    .args(["-f", "--show", "--direct-io=on"])
                    .arg(&file)
                    .output();
                match out {
                    Ok(o) if o.status.success() => {
                        let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
                        guard = Some(LoopGuard(p.clone()));
                        dev_path = PathBuf::from(p);
                    }
                    Ok(o) => {
                        common::skip(&format!(
                            "losetup failed: {}",
                            String::from_utf8_lossy(&o.stderr).trim()
                        ));
                        return None;
                    }
                    Err(e) => {
                        common::skip(&format!("losetup unavailable: {e}"));
                        return None;
                    }
                }
            }
        }
        Some(Fixture {
            meta_dir: dir.path().join("meta"),
            _dir: dir,
            dev_path,
            kind,
            size,
            chunk,
            mem,
            _loop: guard,
        })
    }

    fn open(&self) -> Engine {
        let (meta, device): (Arc<dyn MetaStore>, Arc<dyn BlockDevice>) =
            match (&self.kind, &self.mem) {
                (Kind::Mem, Some((m, d))) => (m.clone(), d.clone()),
                (Kind::File(choice), _) => (
                    Arc::new(RocksStore::open(&self.meta_dir).expect("rocksdb opens")),
                    open_path(&self.dev_path, Some(self.size), *choice).expect("pool file opens"),
                ),
                (Kind::Loop(choice), _) => (
                    Arc::new(RocksStore::open(&self.meta_dir).expect("rocksdb opens")),
                    open_path(&self.dev_path, None, *choice).expect("loop device opens"),
                ),
                (Kind::Mem, None) => unreachable!(),
            };
        match &self.kind {
            Kind::File(EngineChoice::Uring) | Kind::Loop(EngineChoice::Uring) => {
                assert_eq!(device.engine(), IoEngine::Uring)
            }
            Kind::File(EngineChoice::Sync) | Kind::Loop(EngineChoice::Sync) => {
                assert_eq!(device.engine(), IoEngine::Sync)
            }
            _ => {}
        }
        Engine::open(
            meta,
            vec![PoolSpec {
                name: "p".into(),
                device,
                chunk_size: self.chunk,
                path: display(&self.dev_path),
            }],
        )
        .expect("engine opens")
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

fn read(e: &Engine, image: &str, off: u64, len: usize) -> Vec<u8> {
    let h = e.open_image(image).unwrap();
    let mut buf = vec![0xEEu8; len];
    e.read(&h, off, &mut buf).unwrap();
    buf
}

fn write(e: &Engine, image: &str, off: u64, data: &[u8]) -> Result<(), EngineError> {
    let h = e.open_image(image)?;
    e.write(&h, off, data)
}

fn assert_clean(e: &Engine) {
    let r = e.fsck(false).unwrap();
    assert!(r.is_clean(), "fsck: {r:?}");
}

/// Reads and writes at any offset and length, spanning chunks; zeroes, discards,
/// range errors; everything survives a reopen.
fn basic_io(f: Fixture) {
    let e = f.open();
    e.create_volume(&spec("a", 10 * MIB)).unwrap();
    e.create_volume(&spec("b", 3 * MIB + 1)).unwrap();
    let cases: [(u64, usize, u8); 6] = [
        (0, 512, 1),
        (4096, 4096, 2),
        (f.chunk - 100, 300, 3),
        (3 * f.chunk + 7, 2 * f.chunk as usize + 13, 4),
        (5 * MIB + 12345, 70_001, 5),
        (10 * MIB - 1000, 1000, 6),
    ];
    for (off, len, seed) in cases {
        write(&e, "a", off, &pattern(seed, len)).unwrap();
    }
    write(&e, "b", 0, &pattern(9, 8192)).unwrap();
    for (off, len, seed) in cases {
        assert_eq!(
            read(&e, "a", off, len),
            pattern(seed, len),
            "a at {off}+{len}"
        );
    }
    assert_eq!(
        read(&e, "a", 2 * MIB, 8192),
        vec![0; 8192],
        "never written reads zeros"
    );
    // Out of range: an error, never a wrap-around.
    let h = e.open_image("a").unwrap();
    let mut buf = vec![0; 2];
    assert!(matches!(
        e.read(&h, 10 * MIB - 1, &mut buf),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        e.write(&h, u64::MAX - 1, &[1, 2, 3]),
        Err(EngineError::OutOfRange { .. })
    ));
    // Write-zeroes over a partial and whole chunks; discard of whole chunks frees space.
    e.write_zeroes(&h, 3 * f.chunk + 7, f.chunk + 10).unwrap();
    let mut expect = pattern(4, 2 * f.chunk as usize + 13);
    expect[..f.chunk as usize + 10].fill(0);
    assert_eq!(read(&e, "a", 3 * f.chunk + 7, expect.len()), expect);
    let before = e.volume("a").unwrap().allocated_bytes;
    e.discard(&h, 5 * MIB, MIB).unwrap();
    e.flush().unwrap();
    let after = e.volume("a").unwrap().allocated_bytes;
    assert!(after < before, "discard frees space ({before} -> {after})");
    assert_eq!(read(&e, "a", 5 * MIB + 12345, 70_001), vec![0; 70_001]);
    e.flush().unwrap();
    assert_clean(&e);
    e.shutdown().unwrap();
    drop(h);
    drop(e);

    let e = f.open();
    assert_eq!(read(&e, "a", 0, 512), pattern(1, 512));
    assert_eq!(read(&e, "a", 10 * MIB - 1000, 1000), pattern(6, 1000));
    assert_eq!(read(&e, "b", 0, 8192), pattern(9, 8192));
    assert_eq!(
        e.volume("b").unwrap().size_bytes,
        3 * MIB + 4096,
        "size rounded up to 4 KiB"
    );
    assert_clean(&e);
}

/// Snapshots read their point in time, clones diverge, restore into a larger size,
/// flatten, delete with dependants, GC, reopen.
fn snapshots_and_clones(f: Fixture) {
    let e = f.open();
    e.create_volume(&spec("vol", 4 * MIB)).unwrap();
    let a = pattern(1, 3 * MIB as usize);
    write(&e, "vol", 0, &a).unwrap();
    e.create_snapshot("vol", "s1").unwrap();
    let b = pattern(2, MIB as usize);
    write(&e, "vol", MIB / 2, &b).unwrap();
    assert_eq!(read(&e, "vol@s1", 0, a.len()), a, "snapshot reads A");
    let mut head = a.clone();
    head[MIB as usize / 2..MIB as usize / 2 + b.len()].copy_from_slice(&b);
    assert_eq!(read(&e, "vol", 0, head.len()), head, "head reads B");
    assert!(matches!(
        write(&e, "vol@s1", 0, &[1]),
        Err(EngineError::ReadOnly { .. })
    ));

    // Restore into a larger volume, from the snapshot; clone of the live volume.
    let mut from_snap = spec("restored", 8 * MIB);
    from_snap.source = Some(Source::Snapshot("s1".into()));
    e.create_volume(&from_snap).unwrap();
    let mut from_vol = spec("copy", 4 * MIB);
    from_vol.source = Some(Source::Volume("vol".into()));
    e.create_volume(&from_vol).unwrap();
    assert_eq!(read(&e, "restored", 0, a.len()), a);
    assert_eq!(
        read(&e, "restored", 6 * MIB, 4096),
        vec![0; 4096],
        "the grown part reads zeros"
    );
    assert_eq!(read(&e, "copy", 0, head.len()), head);
    write(&e, "restored", 100, b"diverged").unwrap();
    write(&e, "vol", 100, b"original").unwrap();
    assert_eq!(&read(&e, "restored", 100, 8)[..], b"diverged");
    assert_eq!(&read(&e, "copy", 100, 8)[..], &head[100..108]);
    assert_eq!(
        read(&e, "vol@s1", 0, a.len()),
        a,
        "snapshot unchanged by clones"
    );

    // Deleting the origin volume keeps its snapshot and clones working.
    e.delete_volume("vol").unwrap();
    e.gc().unwrap();
    assert_eq!(read(&e, "vol@s1", 0, a.len()), a);
    // Deleting a snapshot with a clone hides it; the clone still reads through it.
    e.delete_snapshot("s1").unwrap();
    assert!(e.snapshot("s1").is_err());
    e.gc().unwrap();
    let mut restored = a.clone();
    restored[100..108].copy_from_slice(b"diverged");
    assert_eq!(read(&e, "restored", 0, a.len()), restored);
    let mut progress = Vec::new();
    let info = e
        .flatten_volume("restored", &mut |d, t| progress.push((d, t)))
        .unwrap();
    assert!(!info.has_parent);
    assert!(
        progress.last().is_some_and(|&(d, t)| d == t),
        "progress reaches the end: {progress:?}"
    );
    e.gc().unwrap();
    assert_eq!(read(&e, "restored", 0, a.len()), restored);
    assert_clean(&e);
    e.shutdown().unwrap();
    drop(e);
    let e = f.open();
    assert_eq!(read(&e, "restored", 0, a.len()), restored);
    assert_eq!(read(&e, "copy", 0, head.len()), head);
    assert_clean(&e);
}

/// Write a pattern into A, delete A, GC, create B in the same space: B reads zeros.
fn freed_data_never_leaks(f: Fixture) {
    let e = f.open();
    let cap = e.pool("p").unwrap().capacity_bytes;
    e.create_volume(&spec("a", cap)).unwrap();
    let data = pattern(7, (cap / 2) as usize);
    write(&e, "a", 0, &data).unwrap();
    // Partial writes too, so that partially written chunks are among the freed ones.
    for i in 0..16 {
        write(&e, "a", cap / 2 + i * f.chunk + 512, &pattern(8, 1024)).unwrap();
    }
    e.flush().unwrap();
    e.delete_volume("a").unwrap();
    e.gc().unwrap();
    assert_eq!(e.pool("p").unwrap().allocated_bytes, 0);
    e.create_volume(&spec("b", cap)).unwrap();
    // Fill B with small writes at the start of every chunk: each lands in a recycled chunk.
    for c in 0..(cap / f.chunk) {
        write(&e, "b", c * f.chunk, &[0xB0; 512]).unwrap();
    }
    for c in 0..(cap / f.chunk) {
        let got = read(&e, "b", c * f.chunk, f.chunk as usize);
        assert!(got[..512].iter().all(|&x| x == 0xB0));
        assert!(
            got[512..].iter().all(|&x| x == 0),
            "chunk {c} of B shows A's data"
        );
    }
    assert_clean(&e);
}

/// A full pool fails writes with NoSpace; earlier data is intact; deleting frees space
/// and writes resume.
fn pool_full_enospc(f: Fixture) {
    let e = f.open();
    let cap = e.pool("p").unwrap().capacity_bytes;
    e.create_volume(&spec("big", 2 * cap)).unwrap();
    e.create_volume(&spec("other", cap / 4)).unwrap();
    write(&e, "other", 0, &pattern(3, (cap / 8) as usize)).unwrap();
    e.create_snapshot("other", "keep").unwrap();
    let mut off = 0;
    let chunk = pattern(5, f.chunk as usize);
    let err = loop {
        match write(&e, "big", off, &chunk) {
            Ok(()) => off += f.chunk,
            Err(err) => break err,
        }
        assert!(off <= 2 * cap, "the pool never filled");
    };
    assert!(matches!(err, EngineError::NoSpace { .. }), "{err}");
    assert_eq!(err.errno(), libc::ENOSPC);
    // Everything written before still reads back; reads, snapshot deletes still work.
    assert_eq!(read(&e, "big", 0, f.chunk as usize), chunk);
    assert_eq!(read(&e, "big", off - f.chunk, f.chunk as usize), chunk);
    assert_eq!(
        read(&e, "other", 0, (cap / 8) as usize),
        pattern(3, (cap / 8) as usize)
    );
    assert!(
        matches!(
            write(&e, "other", 0, &[1; 4096]),
            Err(EngineError::NoSpace { .. })
        ),
        "CoW needs a chunk too"
    );
    e.delete_snapshot("keep").unwrap();
    e.flush().unwrap();
    e.delete_volume("big").unwrap();
    e.gc().unwrap();
    write(&e, "other", 0, &[1; 4096]).unwrap();
    e.create_volume(&spec("again", MIB)).unwrap();
    write(&e, "again", 0, &pattern(6, MIB as usize)).unwrap();
    assert_eq!(read(&e, "again", 0, MIB as usize), pattern(6, MIB as usize));
    assert_clean(&e);
}

/// Every test above on a backend `$kind`, in module `$prefix`; each runs on a fixture
/// (`@case`: pool size and chunk size) when the backend is available here.
macro_rules! suite {
    ($prefix:ident, $kind:expr) => {
        mod $prefix {
            use super::*;
            suite!(@case basic_io, $kind, 64 * MIB, 64 * 1024);
            suite!(@case snapshots_and_clones, $kind, 64 * MIB, 64 * 1024);
            suite!(@case freed_data_never_leaks, $kind, 8 * MIB, 16 * 1024);
            suite!(@case pool_full_enospc, $kind, 4 * MIB, 64 * 1024);
        }
    };
    (@case $test:ident, $kind:expr, $pool:expr, $chunk:expr) => {
        #[test]
        fn $test() {
            if let Some(f) = Fixture::new($kind, $pool, $chunk) {
                super::$test(f);
            }
        }
    };
}

suite!(mem_backend, Kind::Mem);
suite!(sync_file, Kind::File(EngineChoice::Sync));
suite!(uring_file, Kind::File(EngineChoice::Uring));
suite!(loop_sync, Kind::Loop(EngineChoice::Sync));
suite!(loop_uring, Kind::Loop(EngineChoice::Uring));

/// A pool refuses to open with someone else's metadata (UUID mismatch).
#[test]
fn sync_pool_uuid_mismatch_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    let open = |meta: &str| {
        let meta: Arc<dyn MetaStore> = Arc::new(RocksStore::open(&dir.path().join(meta)).unwrap());
        let dev = open_path(&path, Some(16 * MIB), EngineChoice::Sync).unwrap();
        Engine::open(
            meta,
            vec![PoolSpec {
                name: "p".into(),
                device: dev,
                chunk_size: 65536,
                path: display(&path),
            }],
        )
    };
    open("meta1").unwrap().shutdown().unwrap();
    let err = open("meta2").unwrap_err();
    assert!(matches!(err, EngineError::PoolMismatch { .. }), "{err}");
    assert!(err.to_string().contains("does not know"), "{err}");
    open("meta1").expect("the right metadata still opens");
}
