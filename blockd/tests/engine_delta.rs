//! Model-based property test of changed-block tracking (`engine::delta`): random writes,
//! write-zeroes, discards, grows, snapshots, snapshot deletions, GC, reopens and a clone
//! with its own snapshots; then for every ordered pair of images (base snapshot, later
//! snapshot or live volume, across the clone boundary too) the delta
//! - covers every byte whose content differs (base read zero-extended to the target size),
//! - reports at chunk granularity nothing but chunks some operation touched in between,
//! - marks as `zero` only extents that read zeros in the target,
//! - is identical when fetched in small pages from any start offset,
//!
//! and every unrelated pair (target older than base, snapshots of different volumes) is
//! refused with `EngineError::Unrelated`. Allocated extents are checked the same way:
//! they cover every non-zero byte and only chunks ever touched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use blockd::device::mem::MemDevice;
use blockd::engine::{DiffExtent, DiffTarget, Engine, EngineError, ExtentPage, Source, VolumeSpec};
use blockd::meta::mem::MemStore;
use proptest::prelude::*;

#[path = "common/mem_engine.rs"]
mod mem_engine;
use mem_engine::{open, spec};

const CHUNK: u64 = 8192;
const POOL: u64 = 8 << 20;
const VOL: u64 = 20 * CHUNK + 4096;

#[derive(Debug, Clone)]
enum Op {
    /// `clone`: act on the clone (when it exists) instead of the volume.
    Write {
        clone: bool,
        off: u64,
        len: u64,
        byte: u8,
    },
    Zero {
        clone: bool,
        off: u64,
        len: u64,
    },
    Discard {
        clone: bool,
        off: u64,
        len: u64,
    },
    Grow {
        clone: bool,
        by: u64,
    },
    Snapshot {
        clone: bool,
    },
    /// Deletes the n-th live snapshot (mod their count), if any.
    DeleteSnapshot(usize),
    /// Clones the n-th snapshot of the volume (once).
    Clone(usize),
    Gc,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let off = 0u64..VOL;
    let len = prop_oneof![1u64..700, 1u64..(3 * CHUNK), Just(CHUNK)];
    prop_oneof![
        10 => (any::<bool>(), off.clone(), len.clone(), 1u8..=255)
            .prop_map(|(clone, off, len, byte)| Op::Write { clone, off, len, byte }),
        2 => (any::<bool>(), off.clone(), len.clone())
            .prop_map(|(clone, off, len)| Op::Zero { clone, off, len }),
        2 => (any::<bool>(), off, len).prop_map(|(clone, off, len)| Op::Discard { clone, off, len }),
        1 => (any::<bool>(), 1u64..3).prop_map(|(clone, by)| Op::Grow { clone, by: by * 4096 }),
        4 => any::<bool>().prop_map(|clone| Op::Snapshot { clone }),
        1 => (0usize..8).prop_map(Op::DeleteSnapshot),
        1 => (0usize..8).prop_map(Op::Clone),
        1 => Just(Op::Gc),
        1 => Just(Op::Reopen),
    ]
}

/// One writer's history: the chunk ranges each operation touched, in order. A clone's
/// timeline starts as a copy of its parent's up to the clone point, so positions compare
/// across the boundary.
#[derive(Debug, Clone, Default)]
struct Timeline {
    touched: Vec<(u64, u64)>,
    /// (parent timeline, sequence number of the snapshot it was cloned from).
    parent: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
struct Snap {
    timeline: usize,
    pos: usize,
    /// Creation order across all snapshots (epochs order snapshots of one timeline).
    seq: usize,
    data: Vec<u8>,
    deleted: bool,
}

struct Harness {
    meta: Arc<MemStore>,
    dev: Arc<MemDevice>,
    engine: Engine,
    /// 0: volume "v", 1: clone "c".
    timelines: Vec<Timeline>,
    live: Vec<Vec<u8>>,
    snaps: BTreeMap<String, Snap>,
    next_snap: usize,
}

fn vol_name(t: usize) -> &'static str {
    ["v", "c"][t]
}

impl Harness {
    /// The names of the snapshots not deleted, in name order.
    fn live_snapshots(&self) -> Vec<String> {
        self.snaps
            .iter()
            .filter(|(_, s)| !s.deleted)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn new() -> Self {
        let meta = Arc::new(MemStore::new());
        let dev = Arc::new(MemDevice::new(POOL));
        let engine = open(&meta, &dev, CHUNK);
        engine.create_volume(&spec("v", VOL)).unwrap();
        Harness {
            meta,
            dev,
            engine,
            timelines: vec![Timeline::default()],
            live: vec![vec![0; VOL as usize]],
            snaps: BTreeMap::new(),
            next_snap: 0,
        }
    }

    fn pick(&self, clone: bool) -> usize {
        usize::from(clone && self.timelines.len() > 1)
    }

    fn touch(&mut self, t: usize, off: u64, len: u64) {
        self.timelines[t]
            .touched
            .push((off / CHUNK, (off + len - 1) / CHUNK));
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write {
                clone,
                off,
                len,
                byte,
            } => {
                let t = self.pick(clone);
                let size = self.live[t].len() as u64;
                let (off, len) = (off % size, len.min(size - off % size));
                let h = self.engine.open_image(vol_name(t)).unwrap();
                let data = vec![byte; len as usize];
                self.engine.write(&h, off, &data).unwrap();
                self.live[t][off as usize..(off + len) as usize].copy_from_slice(&data);
                self.touch(t, off, len);
            }
            Op::Zero { clone, off, len } | Op::Discard { clone, off, len } => {
                let t = self.pick(clone);
                let size = self.live[t].len() as u64;
                let (off, len) = (off % size, len.min(size - off % size));
                let h = self.engine.open_image(vol_name(t)).unwrap();
                if matches!(op, Op::Zero { .. }) {
                    self.engine.write_zeroes(&h, off, len).unwrap();
                    self.live[t][off as usize..(off + len) as usize].fill(0);
                } else {
                    self.engine.discard(&h, off, len).unwrap();
                    let first = off.div_ceil(CHUNK) * CHUNK;
                    let last = (off + len) / CHUNK * CHUNK;
                    if last > first {
                        self.live[t][first as usize..last as usize].fill(0);
                    }
                }
                self.touch(t, off, len);
            }
            Op::Grow { clone, by } => {
                let t = self.pick(clone);
                let size = self.live[t].len() as u64 + by;
                self.engine.resize_volume(vol_name(t), size, false).unwrap();
                self.live[t].resize(size as usize, 0);
            }
            Op::Snapshot { clone } => {
                let t = self.pick(clone);
                let name = format!("s{}", self.next_snap);
                self.next_snap += 1;
                self.engine.create_snapshot(vol_name(t), &name).unwrap();
                self.snaps.insert(
                    name,
                    Snap {
                        timeline: t,
                        pos: self.timelines[t].touched.len(),
                        seq: self.next_snap - 1,
                        data: self.live[t].clone(),
                        deleted: false,
                    },
                );
            }
            Op::DeleteSnapshot(n) => {
                let live = self.live_snapshots();
                if live.is_empty() {
                    return;
                }
                let name = &live[n % live.len()];
                self.engine.delete_snapshot(name).unwrap();
                self.snaps.get_mut(name).unwrap().deleted = true;
            }
            Op::Clone(n) => {
                if self.timelines.len() > 1 {
                    return;
                }
                let of_v: Vec<String> = self
                    .snaps
                    .iter()
                    .filter(|(_, s)| !s.deleted && s.timeline == 0)
                    .map(|(n, _)| n.clone())
                    .collect();
                if of_v.is_empty() {
                    return;
                }
                let name = of_v[n % of_v.len()].clone();
                let snap = self.snaps[&name].clone();
                let size = snap.data.len() as u64 + CHUNK;
                self.engine
                    .create_volume(&VolumeSpec {
                        name: "c".into(),
                        pool: None,
                        size: Some(size),
                        source: Some(Source::Snapshot(name)),
                        qos: Default::default(),
                    })
                    .unwrap();
                let mut data = snap.data.clone();
                data.resize(size as usize, 0);
                self.timelines.push(Timeline {
                    touched: self.timelines[0].touched[..snap.pos].to_vec(),
                    parent: Some((0, snap.seq)),
                });
                self.live.push(data);
            }
            Op::Gc => {
                self.engine.gc().unwrap();
            }
            Op::Reopen => {
                self.engine.shutdown().unwrap();
                self.engine = open(&self.meta, &self.dev, CHUNK);
            }
        }
    }

    /// Whether snapshot `sa` of timeline `a` is an ancestor-or-equal of the image with
    /// sequence number `sb` (usize::MAX: live) of timeline `b`.
    fn descends(&self, a: usize, sa: usize, b: usize, sb: usize) -> bool {
        let (mut t, mut p) = (b, sb);
        loop {
            if t == a {
                return sa <= p;
            }
            match self.timelines[t].parent {
                Some((pt, pp)) => (t, p) = (pt, pp),
                None => return false,
            }
        }
    }
}

/// Every extent of a delta or allocation, fetched in pages of `max` from `start`.
fn paged(
    mut f: impl FnMut(u64, usize) -> Result<ExtentPage, EngineError>,
    start: u64,
    max: usize,
) -> Vec<DiffExtent> {
    let mut out = Vec::new();
    let mut at = Some(start);
    while let Some(off) = at {
        let page = f(off, max).unwrap();
        assert!(page.extents.len() <= max, "page longer than asked");
        out.extend(page.extents);
        at = page.next_offset;
    }
    out
}

fn chunks_of(extents: &[DiffExtent]) -> BTreeSet<u64> {
    extents
        .iter()
        .flat_map(|x| (x.offset / CHUNK)..(x.offset + x.len).div_ceil(CHUNK))
        .collect()
}

fn check_well_formed(extents: &[DiffExtent], size: u64) {
    for w in extents.windows(2) {
        assert!(
            w[0].offset + w[0].len <= w[1].offset,
            "extents overlap or are out of order: {w:?}"
        );
    }
    for x in extents {
        assert!(x.len > 0 && x.offset % CHUNK == 0, "bad extent {x:?}");
        assert!(
            x.offset + x.len <= size,
            "extent {x:?} beyond the end {size}"
        );
    }
}

fn check_pair(h: &Harness, base: &str, target: (&str, DiffTarget<'_>), start: u64, max: usize) {
    let b = &h.snaps[base];
    let (label, tgt) = target;
    let (t_tl, t_pos, t_seq, t_data) = match tgt {
        DiffTarget::Snapshot(s) => {
            let s = &h.snaps[s];
            (s.timeline, s.pos, s.seq, &s.data)
        }
        DiffTarget::Volume(v) => {
            let t = usize::from(v == "c");
            (t, h.timelines[t].touched.len(), usize::MAX, &h.live[t])
        }
    };
    let result = h.engine.changed_extents(base, tgt, 0, 0);
    if !h.descends(b.timeline, b.seq, t_tl, t_seq) {
        match result {
            Err(EngineError::Unrelated { .. }) => return,
            other => panic!("delta {base} -> {label} should be refused, got {other:?}"),
        }
    }
    let full = result
        .unwrap_or_else(|e| panic!("delta {base} -> {label} failed: {e}"))
        .extents;
    let size = t_data.len() as u64;
    check_well_formed(&full, size);
    let reported = chunks_of(&full);
    // Covers every changed byte.
    for (i, &byte) in t_data.iter().enumerate() {
        let before = b.data.get(i).copied().unwrap_or(0);
        if byte != before {
            let c = i as u64 / CHUNK;
            assert!(
                reported.contains(&c),
                "delta {base} -> {label} misses changed byte {i} (chunk {c}): {full:?}"
            );
        }
    }
    // Nothing but touched chunks.
    let touched: BTreeSet<u64> = h.timelines[t_tl].touched[b.pos..t_pos]
        .iter()
        .flat_map(|&(a, z)| a..=z)
        .collect();
    for c in &reported {
        assert!(
            touched.contains(c),
            "delta {base} -> {label} reports untouched chunk {c}: {full:?}"
        );
    }
    // Zero extents read zeros in the target.
    for x in full.iter().filter(|x| x.zero) {
        assert!(
            t_data[x.offset as usize..(x.offset + x.len) as usize]
                .iter()
                .all(|&b| b == 0),
            "extent {x:?} of {base} -> {label} is marked zero but holds data"
        );
    }
    // Pages from `start` give the same extents from the chunk holding `start` on.
    let start = start % (size + 1);
    let from_start = paged(
        |off, m| h.engine.changed_extents(base, tgt, off, m),
        start,
        max,
    );
    let expect: Vec<DiffExtent> = split_from(&full, start / CHUNK * CHUNK);
    assert_eq!(
        from_start, expect,
        "paged delta {base} -> {label} from {start}"
    );
}

/// `extents` restricted to bytes at or after `from` (a chunk boundary).
fn split_from(extents: &[DiffExtent], from: u64) -> Vec<DiffExtent> {
    extents
        .iter()
        .filter(|x| x.offset + x.len > from)
        .map(|x| {
            let offset = x.offset.max(from);
            DiffExtent {
                offset,
                len: x.offset + x.len - offset,
                zero: x.zero,
            }
        })
        .collect()
}

fn check_allocated(h: &Harness, image: &str, data: &[u8], ever: &BTreeSet<u64>) {
    let ext = h.engine.allocated_extents(image, 0, 0).unwrap().extents;
    check_well_formed(&ext, data.len() as u64);
    let chunks = chunks_of(&ext);
    for (i, &b) in data.iter().enumerate() {
        if b != 0 {
            assert!(
                chunks.contains(&(i as u64 / CHUNK)),
                "allocated extents of {image} miss byte {i}: {ext:?}"
            );
        }
    }
    for c in &chunks {
        assert!(
            ever.contains(c),
            "{image}: chunk {c} allocated but never written"
        );
    }
    assert!(ext.iter().all(|x| !x.zero));
    let paged_ext = paged(|off, m| h.engine.allocated_extents(image, off, m), 0, 1);
    assert_eq!(paged_ext, ext, "paged allocated extents of {image}");
}

fn run(ops: &[Op], start: u64, max: usize) {
    let mut h = Harness::new();
    for op in ops {
        h.apply(op);
    }
    let snaps = h.live_snapshots();
    for base in &snaps {
        for target in &snaps {
            check_pair(&h, base, (target, DiffTarget::Snapshot(target)), start, max);
        }
        for t in 0..h.timelines.len() {
            let v = vol_name(t);
            check_pair(&h, base, (v, DiffTarget::Volume(v)), start, max);
        }
    }
    for t in 0..h.timelines.len() {
        let ever: BTreeSet<u64> = h.timelines[t]
            .touched
            .iter()
            .flat_map(|&(a, z)| a..=z)
            .collect();
        check_allocated(&h, vol_name(t), &h.live[t], &ever);
        for name in &snaps {
            let s = &h.snaps[name];
            if s.timeline == t {
                let image = format!("{}@{name}", vol_name(t));
                check_allocated(&h, &image, &s.data, &ever);
            }
        }
    }
    assert!(h.engine.fsck(false).unwrap().is_clean());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn deltas_cover_exactly_the_changed_chunks(
        ops in proptest::collection::vec(op(), 1..60),
        start in 0u64..VOL,
        max in 1usize..4,
    ) {
        run(&ops, start, max);
    }
}

#[test]
fn delta_of_unrelated_volumes_names_both() {
    let h = Harness::new();
    h.engine.create_volume(&spec("w", VOL)).unwrap();
    h.engine.create_snapshot("v", "a").unwrap();
    h.engine.create_snapshot("w", "b").unwrap();
    let err = h
        .engine
        .changed_extents("a", DiffTarget::Snapshot("b"), 0, 0)
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngineError::Unrelated { .. }), "{err:?}");
    assert!(text.contains("\"a\"") && text.contains("\"b\""), "{text}");
    let err = h
        .engine
        .changed_extents("a", DiffTarget::Snapshot("a"), VOL + 1, 0)
        .unwrap_err();
    assert!(matches!(err, EngineError::OutOfRange { .. }), "{err:?}");
    let empty = h
        .engine
        .changed_extents("a", DiffTarget::Snapshot("a"), VOL, 0)
        .unwrap();
    assert!(empty.extents.is_empty() && empty.next_offset.is_none());
}
