//! Model-based property test of the engine: random sequences of create / write / read /
//! write-zeroes / discard / snapshot / clone / flatten / delete / resize / GC / reopen
//! across several images, every read compared with a plain in-memory reference model,
//! fsck clean after every sequence.

use std::collections::BTreeMap;
use std::sync::Arc;

use blockd::device::mem::MemDevice;
use blockd::engine::{Engine, EngineError, Qos, Source, VolumeSpec};
use blockd::meta::mem::MemStore;
use proptest::prelude::*;

#[path = "common/mem_engine.rs"]
mod mem_engine;
use mem_engine::{open, spec};

const CHUNK: u64 = 8192;
const POOL: u64 = 4 << 20;
const MAX_VOL: u64 = 96 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Create {
        slot: u8,
        size: u64,
    },
    Write {
        slot: u8,
        off: u64,
        len: u64,
        byte: u8,
    },
    Read {
        slot: u8,
        off: u64,
        len: u64,
    },
    Zero {
        slot: u8,
        off: u64,
        len: u64,
    },
    Discard {
        slot: u8,
        off: u64,
        len: u64,
    },
    Snapshot {
        slot: u8,
        snap: u8,
    },
    CloneSnap {
        slot: u8,
        snap: u8,
        grow: u64,
    },
    CloneVol {
        slot: u8,
        from: u8,
    },
    Flatten {
        slot: u8,
    },
    DeleteVol {
        slot: u8,
    },
    DeleteSnap {
        snap: u8,
    },
    Resize {
        slot: u8,
        size: u64,
        force: bool,
    },
    Gc,
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0u8..4;
    let snap = 0u8..4;
    let off = 0u64..MAX_VOL;
    let len = prop_oneof![1u64..600, 1u64..(3 * CHUNK), Just(CHUNK), Just(2 * CHUNK)];
    prop_oneof![
        2 => (slot.clone(), 1u64..=MAX_VOL).prop_map(|(slot, size)| Op::Create { slot, size }),
        8 => (slot.clone(), off.clone(), len.clone(), 1u8..=255).prop_map(|(slot, off, len, byte)| Op::Write { slot, off, len, byte }),
        4 => (slot.clone(), off.clone(), len.clone()).prop_map(|(slot, off, len)| Op::Read { slot, off, len }),
        1 => (slot.clone(), off.clone(), len.clone()).prop_map(|(slot, off, len)| Op::Zero { slot, off, len }),
        1 => (slot.clone(), off.clone(), len.clone()).prop_map(|(slot, off, len)| Op::Discard { slot, off, len }),
        2 => (slot.clone(), snap.clone()).prop_map(|(slot, snap)| Op::Snapshot { slot, snap }),
        1 => (slot.clone(), snap.clone(), 0u64..3).prop_map(|(slot, snap, grow)| Op::CloneSnap { slot, snap, grow }),
        1 => (slot.clone(), slot.clone()).prop_map(|(slot, from)| Op::CloneVol { slot, from }),
        1 => slot.clone().prop_map(|slot| Op::Flatten { slot }),
        1 => slot.clone().prop_map(|slot| Op::DeleteVol { slot }),
        1 => snap.prop_map(|snap| Op::DeleteSnap { snap }),
        1 => (slot, 1u64..=MAX_VOL, any::<bool>()).prop_map(|(slot, size, force)| Op::Resize { slot, size, force }),
        1 => Just(Op::Gc),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn round(size: u64) -> u64 {
    size.div_ceil(4096) * 4096
}

struct Harness {
    meta: Arc<MemStore>,
    dev: Arc<MemDevice>,
    engine: Engine,
    /// name -> contents, for volumes.
    vols: BTreeMap<String, Vec<u8>>,
    /// snapshot name -> (origin volume, contents).
    snaps: BTreeMap<String, (String, Vec<u8>)>,
    /// Volumes created as clones (a plain create of the same name is never "the same").
    clones: std::collections::BTreeSet<String>,
    /// Snapshots whose volume was deleted. Snapshots belong to a volume by identity, so
    /// a later volume of the same name is not theirs: creating the snapshot again "on" it
    /// is AlreadyExists, not an idempotent retry.
    orphaned: std::collections::BTreeSet<String>,
}

impl Harness {
    fn new() -> Self {
        let meta = Arc::new(MemStore::new());
        let dev = Arc::new(MemDevice::new(POOL));
        let engine = open(&meta, &dev, CHUNK);
        Harness {
            meta,
            dev,
            engine,
            vols: BTreeMap::new(),
            snaps: BTreeMap::new(),
            clones: Default::default(),
            orphaned: Default::default(),
        }
    }

    fn vname(slot: u8) -> String {
        format!("v{slot}")
    }
    fn sname(snap: u8) -> String {
        format!("s{snap}")
    }

    fn clip(size: u64, off: u64, len: u64) -> Option<(u64, u64)> {
        if off >= size {
            return None;
        }
        Some((off, len.min(size - off)))
    }

    /// The volume in `slot` and the part of `off`+`len` inside it; `None` when the slot
    /// has no volume or the range starts past its end.
    fn clipped(&self, slot: u8, off: u64, len: u64) -> Option<(String, u64, u64)> {
        let name = Self::vname(slot);
        let model = self.vols.get(&name)?;
        let (off, len) = Self::clip(model.len() as u64, off, len)?;
        Some((name, off, len))
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Create { slot, size } => {
                let name = Self::vname(slot);
                let r = self.engine.create_volume(&spec(&name, size));
                match self.vols.get(&name) {
                    Some(v) if v.len() as u64 == round(size) && !self.clones.contains(&name) => {
                        assert!(!r.unwrap().1, "idempotent create")
                    }
                    Some(_) => {
                        assert!(matches!(r, Err(EngineError::AlreadyExists { .. })), "{r:?}")
                    }
                    None => {
                        let (info, created) = r.unwrap();
                        assert!(created);
                        assert_eq!(info.size_bytes, round(size));
                        assert_eq!(info.allocated_bytes, 0);
                        self.vols.insert(name, vec![0; round(size) as usize]);
                    }
                }
            }
            Op::Write {
                slot,
                off,
                len,
                byte,
            } => {
                let name = Self::vname(slot);
                let Some(model) = self.vols.get_mut(&name) else {
                    return;
                };
                let h = self.engine.open_image(&name).unwrap();
                let Some((off, len)) = Self::clip(model.len() as u64, off, len) else {
                    let r = self.engine.write(&h, off, &[byte]);
                    assert!(matches!(r, Err(EngineError::OutOfRange { .. })), "{r:?}");
                    return;
                };
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                match self.engine.write(&h, off, &data) {
                    Ok(()) => model[off as usize..(off + len) as usize].copy_from_slice(&data),
                    Err(EngineError::NoSpace { .. }) => {}
                    Err(e) => panic!("write failed: {e}"),
                }
            }
            Op::Read { slot, off, len } => {
                let Some((name, off, len)) = self.clipped(slot, off, len) else {
                    return;
                };
                let model = &self.vols[&name];
                let h = self.engine.open_image(&name).unwrap();
                let mut buf = vec![0xEE; len as usize];
                self.engine.read(&h, off, &mut buf).unwrap();
                assert!(
                    buf == model[off as usize..(off + len) as usize],
                    "read of {name} at {off}+{len} differs from the model"
                );
            }
            Op::Zero { slot, off, len } | Op::Discard { slot, off, len } => {
                let Some((name, off, len)) = self.clipped(slot, off, len) else {
                    return;
                };
                let model = self.vols.get_mut(&name).expect("clipped to a volume");
                let h = self.engine.open_image(&name).unwrap();
                if matches!(op, Op::Zero { .. }) {
                    match self.engine.write_zeroes(&h, off, len) {
                        Ok(()) => model[off as usize..(off + len) as usize].fill(0),
                        Err(EngineError::NoSpace { .. }) => {}
                        Err(e) => panic!("write_zeroes failed: {e}"),
                    }
                } else {
                    self.engine.discard(&h, off, len).unwrap();
                    // Whole chunks inside the range read zeros; partial ones are unchanged.
                    let first = off.div_ceil(CHUNK) * CHUNK;
                    let last = (off + len) / CHUNK * CHUNK;
                    if last > first {
                        model[first as usize..last as usize].fill(0);
                    }
                }
            }
            Op::Snapshot { slot, snap } => {
                let vol = Self::vname(slot);
                let name = Self::sname(snap);
                let r = self.engine.create_snapshot(&vol, &name);
                match (self.snaps.get(&name), self.vols.get(&vol)) {
                    // Its volume is gone and another one took the name.
                    (Some((origin, _)), Some(_))
                        if *origin == vol && self.orphaned.contains(&name) =>
                    {
                        assert!(matches!(r, Err(EngineError::AlreadyExists { .. })), "{r:?}")
                    }
                    (Some((origin, _)), _) if *origin == vol => assert!(!r.unwrap().1),
                    (Some(_), _) => {
                        assert!(matches!(r, Err(EngineError::AlreadyExists { .. })), "{r:?}")
                    }
                    (None, None) => {
                        assert!(matches!(r, Err(EngineError::NotFound { .. })), "{r:?}")
                    }
                    (None, Some(content)) => {
                        let (info, created) = r.unwrap();
                        assert!(created);
                        assert_eq!(info.size_bytes, content.len() as u64);
                        self.snaps.insert(name, (vol, content.clone()));
                    }
                }
            }
            Op::CloneSnap { slot, snap, grow } => {
                let name = Self::vname(slot);
                let sname = Self::sname(snap);
                let Some((_, content)) = self.snaps.get(&sname) else {
                    return;
                };
                if self.vols.contains_key(&name) {
                    return;
                }
                let size = content.len() as u64 + grow * 4096;
                let (info, created) = self
                    .engine
                    .create_volume(&VolumeSpec {
                        name: name.clone(),
                        pool: None,
                        size: Some(size),
                        source: Some(Source::Snapshot(sname)),
                        qos: Qos::default(),
                    })
                    .unwrap();
                assert!(created && info.size_bytes == size);
                let mut c = content.clone();
                c.resize(size as usize, 0);
                self.clones.insert(name.clone());
                self.vols.insert(name, c);
            }
            Op::CloneVol { slot, from } => {
                let name = Self::vname(slot);
                let src = Self::vname(from);
                let Some(content) = self.vols.get(&src).cloned() else {
                    return;
                };
                if self.vols.contains_key(&name) {
                    return;
                }
                self.engine
                    .create_volume(&VolumeSpec {
                        name: name.clone(),
                        pool: None,
                        size: None,
                        source: Some(Source::Volume(src)),
                        qos: Qos::default(),
                    })
                    .unwrap();
                self.clones.insert(name.clone());
                self.vols.insert(name, content);
            }
            Op::Flatten { slot } => {
                let name = Self::vname(slot);
                if !self.vols.contains_key(&name) {
                    return;
                }
                match self.engine.flatten_volume(&name, &mut |_, _| {}) {
                    Ok(info) => assert!(!info.has_parent),
                    Err(EngineError::NoSpace { .. }) => {}
                    Err(e) => panic!("flatten failed: {e}"),
                }
            }
            Op::DeleteVol { slot } => {
                let name = Self::vname(slot);
                let r = self.engine.delete_volume(&name);
                self.clones.remove(&name);
                if self.vols.remove(&name).is_some() {
                    r.unwrap();
                    for (snap, (origin, _)) in &self.snaps {
                        if *origin == name {
                            self.orphaned.insert(snap.clone());
                        }
                    }
                } else {
                    assert!(matches!(r, Err(EngineError::NotFound { .. })));
                }
            }
            Op::DeleteSnap { snap } => {
                let name = Self::sname(snap);
                let r = self.engine.delete_snapshot(&name);
                self.orphaned.remove(&name);
                if self.snaps.remove(&name).is_some() {
                    r.unwrap();
                } else {
                    assert!(matches!(r, Err(EngineError::NotFound { .. })));
                }
            }
            Op::Resize { slot, size, force } => {
                let name = Self::vname(slot);
                let Some(model) = self.vols.get_mut(&name) else {
                    return;
                };
                let new = round(size);
                let r = self.engine.resize_volume(&name, size, force);
                if new < model.len() as u64 && !force {
                    assert!(matches!(r, Err(EngineError::ShrinkRefused { .. })), "{r:?}");
                    return;
                }
                match r {
                    Ok(info) => {
                        assert_eq!(info.size_bytes, new);
                        model.resize(new as usize, 0);
                    }
                    Err(EngineError::NoSpace { .. }) => {
                        // A shrink may need space to zero a partial chunk; only allowed when full.
                    }
                    Err(e) => panic!("resize failed: {e}"),
                }
            }
            Op::Gc => {
                self.engine.gc().unwrap();
            }
            Op::Flush => self.engine.flush().unwrap(),
            Op::Reopen => {
                self.engine.shutdown().unwrap();
                self.engine = open(&self.meta, &self.dev, CHUNK);
            }
        }
    }

    fn verify_all(&self) {
        for (name, model) in &self.vols {
            let h = self.engine.open_image(name).unwrap();
            let mut buf = vec![0xEE; model.len()];
            self.engine.read(&h, 0, &mut buf).unwrap();
            assert!(&buf == model, "volume {name} differs from the model");
            let info = self.engine.volume(name).unwrap();
            assert_eq!(info.size_bytes, model.len() as u64);
        }
        for (name, (origin, model)) in &self.snaps {
            let h = self.engine.open_image(&format!("{origin}@{name}")).unwrap();
            assert!(h.read_only());
            let mut buf = vec![0xEE; model.len()];
            self.engine.read(&h, 0, &mut buf).unwrap();
            assert!(&buf == model, "snapshot {name} differs from the model");
            assert!(matches!(
                self.engine.write(&h, 0, &[1]),
                Err(EngineError::ReadOnly { .. })
            ));
        }
        let report = self.engine.fsck(false).unwrap();
        assert!(report.is_clean(), "fsck: {report:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn model_random_sequences_match_reference(ops in proptest::collection::vec(op(), 1..120)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.verify_all();
        // Everything deleted and collected: the pool is empty again, nothing leaks.
        let names: Vec<String> = h.vols.keys().cloned().collect();
        for n in names {
            h.engine.delete_volume(&n).unwrap();
        }
        let snaps: Vec<String> = h.snaps.keys().cloned().collect();
        for s in snaps {
            h.engine.delete_snapshot(&s).unwrap();
        }
        h.engine.gc().unwrap();
        let pool = h.engine.pool("p").unwrap();
        prop_assert_eq!(pool.allocated_bytes, 0, "space leaked after deleting everything");
        h.vols.clear();
        h.snaps.clear();
        h.orphaned.clear();
        h.verify_all();
    }
}

#[test]
fn model_snapshot_clone_flatten_scenario() {
    let mut h = Harness::new();
    use Op::*;
    for op in [
        Create {
            slot: 0,
            size: 40_000,
        },
        Write {
            slot: 0,
            off: 100,
            len: 20_000,
            byte: 7,
        },
        Snapshot { slot: 0, snap: 0 },
        Write {
            slot: 0,
            off: 5000,
            len: 3000,
            byte: 9,
        },
        CloneSnap {
            slot: 1,
            snap: 0,
            grow: 2,
        },
        Write {
            slot: 1,
            off: 8000,
            len: 100,
            byte: 3,
        },
        DeleteSnap { snap: 0 },
        Gc,
        Read {
            slot: 1,
            off: 0,
            len: 50_000,
        },
        Flatten { slot: 1 },
        Gc,
        Reopen,
        Resize {
            slot: 0,
            size: 10_000,
            force: true,
        },
        Resize {
            slot: 0,
            size: 40_000,
            force: false,
        },
        CloneVol { slot: 2, from: 1 },
        Write {
            slot: 1,
            off: 0,
            len: 1,
            byte: 1,
        },
        DeleteVol { slot: 1 },
        Gc,
        Reopen,
    ] {
        h.apply(&op);
        h.verify_all();
    }
}
