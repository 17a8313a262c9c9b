//! Group snapshots at the engine: one instant across volumes under concurrent ordered
//! writes, idempotency and errors that change nothing, member protection, deletion,
//! restore from members, and durability across a restart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use blockd::device::mem::MemDevice;
use blockd::engine::{Engine, EngineError, Source};
use blockd::meta::mem::MemStore;

#[path = "common/mem_engine.rs"]
mod mem_engine;
use mem_engine::{open, spec};

/// The pool's chunk size.
const CHUNK: u64 = 64 << 10;
const BLOCK: usize = 4096;

/// A new engine (64 MiB in memory) with a 1 MiB volume of each name in `volumes`.
fn with_volumes(volumes: &[&str]) -> (Arc<MemStore>, Arc<MemDevice>, Engine) {
    let meta = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new(64 << 20));
    let e = open(&meta, &dev, CHUNK);
    for v in volumes {
        e.create_volume(&spec(v, 1 << 20)).unwrap();
    }
    (meta, dev, e)
}

fn stamp(n: u64) -> Vec<u8> {
    n.to_le_bytes().repeat(BLOCK / 8)
}

/// The counter stamped in the first block of `image` (0 when never written).
fn counter(e: &Engine, image: &str) -> u64 {
    let h = e.open_image(image).unwrap();
    let mut buf = vec![0u8; BLOCK];
    e.read(&h, 0, &mut buf).unwrap();
    let first = u64::from_le_bytes(buf[..8].try_into().unwrap());
    assert!(
        buf.chunks(8)
            .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == first),
        "{image}: a torn block"
    );
    first
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A writer stamps 1, 2, 3, … into volume a, then b, then c (each write completes before
/// the next starts) while group snapshots are taken. Every group must show a prefix of
/// that sequence: c <= b <= a <= c + 1. A snapshot of b with a value a's lacks would be a
/// broken instant.
#[test]
fn members_share_one_instant_under_ordered_writes() {
    let (_meta, _dev, e) = with_volumes(&["a", "b", "c"]);
    let stop = Arc::new(AtomicBool::new(false));
    // The last round the writer finished: each group waits for a new one, so groups and
    // writes interleave however the threads are scheduled.
    let progress = Arc::new(AtomicU64::new(0));
    let writer = {
        let (e, stop, progress) = (e.clone(), stop.clone(), progress.clone());
        std::thread::spawn(move || {
            let handles: Vec<_> = ["a", "b", "c"]
                .iter()
                .map(|v| e.open_image(v).unwrap())
                .collect();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                for h in &handles {
                    e.write(h, 0, &stamp(n)).unwrap();
                }
                progress.store(n, Ordering::Release);
            }
            n
        })
    };
    let mut seen = Vec::new();
    let mut rounds = 0;
    for i in 0..40 {
        while progress.load(Ordering::Acquire) == rounds {
            std::thread::yield_now();
        }
        rounds = progress.load(Ordering::Acquire);
        let group = format!("g{i}");
        // Listed in another order than written: the instant must not depend on it.
        let (info, created) = e
            .create_group_snapshot(&group, &names(&["c", "a", "b"]))
            .unwrap();
        assert!(created);
        assert_eq!(info.snapshots.len(), 3);
        let a = counter(&e, &format!("a@{group}-a"));
        let b = counter(&e, &format!("b@{group}-b"));
        let c = counter(&e, &format!("c@{group}-c"));
        assert!(
            c <= b && b <= a && a <= c + 1,
            "group {group}: a={a} b={b} c={c} is not one instant of a-then-b-then-c writes"
        );
        seen.push(a);
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    assert!(last > 0);
    // The snapshots are points in time: later groups never go backwards.
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let r = e.fsck(false).unwrap();
    assert!(r.is_clean(), "fsck: {r:?}");
    e.shutdown().unwrap();
}

#[test]
fn idempotent_errors_change_nothing_and_members_go_with_their_group() {
    let (meta, dev, e) = with_volumes(&["db", "wal", "other"]);
    let db = e.open_image("db").unwrap();
    let wal = e.open_image("wal").unwrap();
    e.write(&db, 0, &stamp(7)).unwrap();
    e.write(&wal, 0, &stamp(8)).unwrap();

    let (g, created) = e
        .create_group_snapshot("nightly", &names(&["wal", "db"]))
        .unwrap();
    assert!(created);
    let members: Vec<(&str, &str)> = g
        .snapshots
        .iter()
        .map(|s| (s.volume.as_str(), s.name.as_str()))
        .collect();
    assert_eq!(members, [("db", "nightly-db"), ("wal", "nightly-wal")]);
    assert!(g
        .snapshots
        .iter()
        .all(|s| s.group.as_deref() == Some("nightly")));

    // Same set in another order: the same group.
    let (again, created) = e
        .create_group_snapshot("nightly", &names(&["db", "wal"]))
        .unwrap();
    assert!(!created);
    assert_eq!(again, g);
    // Another set under the same name.
    let err = e
        .create_group_snapshot("nightly", &names(&["db"]))
        .unwrap_err();
    assert!(matches!(err, EngineError::AlreadyExists { .. }), "{err:?}");
    // A missing volume, a duplicate, an empty set, a bad name, a member name taken by a
    // plain snapshot: refused, and nothing is made.
    let before = e.snapshots(None).unwrap().len();
    let err = e
        .create_group_snapshot("g2", &names(&["db", "missing"]))
        .unwrap_err();
    assert!(matches!(err, EngineError::NotFound { .. }), "{err:?}");
    assert!(e
        .create_group_snapshot("g2", &names(&["db", "db"]))
        .is_err());
    assert!(e.create_group_snapshot("g2", &[]).is_err());
    assert!(matches!(
        e.create_group_snapshot("Bad", &names(&["db"])).unwrap_err(),
        EngineError::InvalidName { .. }
    ));
    e.create_snapshot("other", "g3-other").unwrap();
    let err = e
        .create_group_snapshot("g3", &names(&["db", "other"]))
        .unwrap_err();
    assert!(matches!(err, EngineError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(e.snapshots(None).unwrap().len(), before + 1);
    assert!(matches!(
        e.group_snapshot("g2").unwrap_err(),
        EngineError::NotFound { .. }
    ));

    // A member cannot be deleted alone.
    let err = e.delete_snapshot("nightly-db").unwrap_err();
    assert!(
        matches!(err, EngineError::FailedPrecondition { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("nightly"), "{err}");

    // Restore each member: it reads what its volume held at the instant.
    e.write(&db, 0, &stamp(70)).unwrap();
    for (volume, member, want) in [("db", "nightly-db", 7), ("wal", "nightly-wal", 8)] {
        let restored = format!("{volume}-restored");
        let mut s = spec(&restored, 1 << 20);
        s.source = Some(Source::Snapshot(member.into()));
        e.create_volume(&s).unwrap();
        assert_eq!(counter(&e, &restored), want, "{member}");
    }
    assert_eq!(counter(&e, "db"), 70);
    assert_eq!(e.group_snapshots().len(), 1);

    // Survives a restart.
    e.shutdown().unwrap();
    drop((e, db, wal));
    let e = open(&meta, &dev, CHUNK);
    let g2 = e.group_snapshot("nightly").unwrap();
    assert_eq!(g2, g);
    assert_eq!(counter(&e, "db@nightly-db"), 7);

    // Deleting the group deletes every member at once; then it is gone.
    e.delete_group_snapshot("nightly").unwrap();
    assert!(e.snapshot("nightly-db").is_err());
    assert!(e.snapshot("nightly-wal").is_err());
    assert!(e.group_snapshots().is_empty());
    assert!(matches!(
        e.delete_group_snapshot("nightly").unwrap_err(),
        EngineError::NotFound { .. }
    ));
    // The restores still read their data (clones keep what they read).
    assert_eq!(counter(&e, "db-restored"), 7);
    e.gc().unwrap();
    let r = e.fsck(false).unwrap();
    assert!(r.is_clean(), "fsck: {r:?}");
    e.shutdown().unwrap();
}
