//! Changed-block tracking: the allocated extents of an image, and the extents that may
//! differ between two images of one volume (a snapshot and a later snapshot, or a
//! snapshot and the live volume), read straight from the chunk map.
//!
//! # Why the map is enough
//! A head writes only at its lineage's `e_head`, and a snapshot freezes `e_S = e_head`
//! and bumps it. So a chunk whose content differs between snapshot `B` (epoch `e_B`) and
//! a later image `T` (epoch `e_T`) of the same lineage has at least one map entry with an
//! epoch in `(e_B, e_T]`: the write (or the zero tombstone of a discard) that changed it.
//! GC never breaks this: it drops an entry only when no reader sees it, i.e. when a newer
//! entry shadows it before the next reader epoch — and `e_T` is a reader, so that newer
//! entry is also in `(e_B, e_T]`. A discard that removed an entry outright (the head owned
//! it alone and nothing older was visible) made the chunk read zeros again, as it did in
//! `B`: no change, correctly not reported.
//!
//! # Across clones
//! A clone's lineage `L_c` points at its parent `(L_p, e_p, limit)`. When the target
//! descends from the base's lineage through such pointers, the target differs from the
//! base only where (a) some lineage below the base's (the clone and any clone between)
//! holds its own entry — any epoch, the clone started from its parent's content — or
//! (b) the base's lineage has an entry in `(e_B, e_p]` (the volume moved on before the
//! clone was cut), or (c) a parent `limit` cuts bytes the base has (reported whole).
//! Anything else is a [`EngineError::Unrelated`]: snapshots of unrelated volumes, a base
//! newer than the target, a flattened clone (its parent pointer is gone).
//!
//! # Cost
//! Each lineage keeps its map keyed both ways (`Lineage::map` by (chunk, epoch) and an
//! index by (epoch, chunk), kept in step by `Lineage::map_insert`/`map_remove`). A delta
//! reads the chunks written in `(e_B, e_T]` from the epoch index, so it costs O(changed
//! chunks) (plus one seek per epoch that holds entries, and one per window of
//! [`WINDOW_CHUNKS`] chunks), never O(volume size) or O(mapped chunks); then one `resolve`
//! per candidate. Allocated extents, and a clone's own entries, are whole by nature: those
//! walk the map. No device or metadata I/O either way. The state lock is taken per
//! window, so the data path is never held up by a long diff.
//!
//! Extents are chunk-granular (the pool's chunk size; the last one is cut at the image's
//! end), in ascending order, adjacent chunks of the same kind merged. A page stops after
//! `max_extents` extents and says where the next one starts.

use std::collections::BTreeSet;

use super::records::{ImageKind, ParentRef};
use super::state::{Resolved, State};
use super::{Engine, EngineError, ObjectKind, Result};

/// Chunks examined per state-lock hold.
pub const WINDOW_CHUNKS: u64 = 64 * 1024;

/// One extent of a diff or an allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    /// True: the target reads zeros over the whole extent (a discard or zeroing, or a
    /// cut parent limit). Always false for allocated extents.
    pub zero: bool,
}

/// The image a diff runs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffTarget<'a> {
    /// A snapshot, by name.
    Snapshot(&'a str),
    /// The live volume, by name.
    Volume(&'a str),
}

impl DiffTarget<'_> {
    fn label(&self) -> String {
        match self {
            DiffTarget::Snapshot(s) => format!("snapshot {s:?}"),
            DiffTarget::Volume(v) => format!("volume {v:?}"),
        }
    }
}

/// One page of extents.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExtentPage {
    /// The (target) image's size in bytes.
    pub image_size: u64,
    /// The pool's chunk size: the granularity of every extent.
    pub chunk_size: u64,
    pub extents: Vec<DiffExtent>,
    /// Where the next page starts, None when this page reached the end.
    pub next_offset: Option<u64>,
}

/// Facts about the two ends of a diff, for stream headers and identities.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiffEnds {
    pub base_volume: String,
    /// The base snapshot's stable id, and its volume's.
    pub base_id: String,
    pub base_volume_id: String,
    pub base_size: u64,
    pub base_epoch: u64,
    pub base_created_unix: u64,
    pub target_volume: String,
    pub target_size: u64,
    /// The target's epoch (the head's current `e_head` for a live volume).
    pub target_epoch: u64,
    pub target_created_unix: u64,
    /// The target's stable id (the snapshot's, or the live volume's), and its volume's.
    pub target_id: String,
    pub target_volume_id: String,
}

/// A snapshot's place in its lineage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotEpoch {
    pub name: String,
    /// The snapshot's stable id.
    pub id: String,
    pub epoch: u64,
    pub size: u64,
    pub created_unix: u64,
    /// The stable id of the snapshot this one reproduces (`import-diff`), or empty.
    pub replica_of: String,
}

/// Entries of `lineage` with an epoch in `(lo, hi]` (`lo` None: `[0, hi]`).
#[derive(Debug, Clone, Copy)]
struct Segment {
    lineage: u64,
    lo: Option<u64>,
    hi: u64,
}

/// Chunks `[from, to)` reported whole whatever the map says.
#[derive(Debug, Clone, Copy)]
struct Forced {
    from: u64,
    to: u64,
}

/// What a walk resolves each candidate chunk against.
#[derive(Debug, Clone)]
struct Plan {
    target_lineage: u64,
    /// None: the live head (its current `e_head`, re-read per window).
    target_epoch: Option<u64>,
    target_id: u64,
    target_label: String,
    segments: Vec<Segment>,
    forced: Vec<Forced>,
    /// Allocated mode: report only chunks that resolve to data.
    allocated: bool,
}

impl Engine {
    /// The extents of `image` ("VOL" or "VOL@SNAP") that hold data, through clone
    /// parents, from the chunk containing `start` on. `max_extents` 0: no limit.
    pub fn allocated_extents(
        &self,
        image: &str,
        start: u64,
        max_extents: usize,
    ) -> Result<ExtentPage> {
        let plan = {
            let st = self.inner.state.lock();
            let id = Self::image_id(&st, image)?;
            let img = &st.images[&id];
            let (epoch, hi) = match img.kind {
                ImageKind::Volume => (None, u64::MAX),
                ImageKind::Snapshot => (Some(img.epoch), img.epoch),
            };
            let mut segments = vec![Segment {
                lineage: img.lineage,
                lo: None,
                hi,
            }];
            for p in parent_chain(&st, img.lineage) {
                segments.push(Segment {
                    lineage: p.lineage,
                    lo: None,
                    hi: p.epoch,
                });
            }
            Plan {
                target_lineage: img.lineage,
                target_epoch: epoch,
                target_id: id,
                target_label: image.to_string(),
                segments,
                forced: Vec::new(),
                allocated: true,
            }
        };
        self.walk(&plan, start, max_extents)
    }

    /// The extents whose content may differ between snapshot `base` and `target` (a
    /// later snapshot of the same volume, or of a clone descending from it, or a live
    /// volume), from the chunk containing `start` on. `max_extents` 0: no limit.
    pub fn changed_extents(
        &self,
        base: &str,
        target: DiffTarget<'_>,
        start: u64,
        max_extents: usize,
    ) -> Result<ExtentPage> {
        let (plan, _) = self.diff_plan(base, target)?;
        self.walk(&plan, start, max_extents)
    }

    /// The snapshots of `volume` oldest first (by epoch), the head's epoch, the volume's
    /// size and its stable id.
    pub fn snapshot_epochs(&self, volume: &str) -> Result<(Vec<SnapshotEpoch>, u64, u64, String)> {
        let st = self.inner.state.lock();
        let vid = Self::volume_id(&st, volume)?;
        let vimg = &st.images[&vid];
        let lineage = vimg.lineage;
        let mut v: Vec<SnapshotEpoch> = st
            .snapshots_by_name
            .values()
            .map(|id| &st.images[id])
            .filter(|img| img.lineage == lineage)
            .map(|img| SnapshotEpoch {
                name: img.name.clone(),
                id: img.uuid.clone(),
                epoch: img.epoch,
                size: img.size,
                created_unix: img.created_unix,
                replica_of: img.replica_of.clone(),
            })
            .collect();
        v.sort_by_key(|s| s.epoch);
        Ok((
            v,
            st.lineages[&lineage].rec.e_head,
            vimg.size,
            vimg.uuid.clone(),
        ))
    }

    /// The two ends of a diff, checked as [`Engine::changed_extents`] checks them.
    pub fn diff_ends(&self, base: &str, target: DiffTarget<'_>) -> Result<DiffEnds> {
        Ok(self.diff_plan(base, target)?.1)
    }

    fn diff_plan(&self, base: &str, target: DiffTarget<'_>) -> Result<(Plan, DiffEnds)> {
        let st = self.inner.state.lock();
        let bid = Self::snapshot_id(&st, base)?;
        let bimg = &st.images[&bid];
        let (tid, tlabel) = match target {
            DiffTarget::Snapshot(s) => (Self::snapshot_id(&st, s)?, target.label()),
            DiffTarget::Volume(v) => (Self::volume_id(&st, v)?, target.label()),
        };
        let timg = &st.images[&tid];
        let tlin = &st.lineages[&timg.lineage];
        let (t_epoch, t_hi) = match timg.kind {
            ImageKind::Volume => (None, u64::MAX),
            ImageKind::Snapshot => (Some(timg.epoch), timg.epoch),
        };
        let unrelated = |reason: String| EngineError::Unrelated {
            base: format!("snapshot {base:?}"),
            target: tlabel.clone(),
            reason,
        };
        let cs = self.inner.pools[tlin.pool].chunk_size;
        let mut segments = Vec::new();
        let mut forced = Vec::new();
        let mut lineage = timg.lineage;
        let mut hi = t_hi;
        let mut parent = tlin.rec.parent;
        loop {
            if lineage == bimg.lineage {
                if bimg.epoch > hi {
                    return Err(unrelated(format!(
                        "the base was taken after the target (epoch {} > {})",
                        bimg.epoch,
                        if hi == u64::MAX {
                            "live".to_string()
                        } else {
                            hi.to_string()
                        }
                    )));
                }
                segments.push(Segment {
                    lineage,
                    lo: Some(bimg.epoch),
                    hi,
                });
                break;
            }
            // Everything this lineage holds itself may differ from the base.
            segments.push(Segment {
                lineage,
                lo: None,
                hi,
            });
            let Some(p) = parent else {
                return Err(unrelated(format!(
                    "they are not snapshots of one volume (the target does not descend \
                     from the base's volume {:?}, or was flattened)",
                    bimg.origin
                )));
            };
            if bimg.size > p.limit {
                forced.push(Forced {
                    from: p.limit / cs,
                    to: bimg.size.div_ceil(cs),
                });
            }
            lineage = p.lineage;
            hi = p.epoch;
            parent = st.lineages.get(&lineage).and_then(|l| l.rec.parent);
            if !st.lineages.contains_key(&lineage) {
                return Err(EngineError::Corrupt(format!(
                    "lineage {lineage} named as a parent does not exist"
                )));
            }
        }
        let origin = |img: &super::records::ImageRecord| match img.kind {
            ImageKind::Volume => img.name.clone(),
            ImageKind::Snapshot => img.origin.clone(),
        };
        let volume_id = |img: &super::records::ImageRecord| match img.kind {
            ImageKind::Volume => img.uuid.clone(),
            ImageKind::Snapshot => img.origin_id.clone(),
        };
        let ends = DiffEnds {
            base_volume: bimg.origin.clone(),
            base_id: bimg.uuid.clone(),
            base_volume_id: bimg.origin_id.clone(),
            target_id: timg.uuid.clone(),
            target_volume_id: volume_id(timg),
            base_size: bimg.size,
            base_epoch: bimg.epoch,
            base_created_unix: bimg.created_unix,
            target_volume: origin(timg),
            target_size: timg.size,
            target_epoch: t_epoch.unwrap_or(tlin.rec.e_head),
            target_created_unix: timg.created_unix,
        };
        let plan = Plan {
            target_lineage: timg.lineage,
            target_epoch: t_epoch,
            target_id: tid,
            target_label: tlabel,
            segments,
            forced,
            allocated: false,
        };
        Ok((plan, ends))
    }

    /// Walks the plan window by window from the chunk containing `start`.
    fn walk(&self, plan: &Plan, start: u64, max_extents: usize) -> Result<ExtentPage> {
        let max = if max_extents == 0 {
            usize::MAX
        } else {
            max_extents
        };
        let mut out: Vec<DiffExtent> = Vec::new();
        let (size, cs) = {
            let st = self.inner.state.lock();
            self.target_geometry(&st, plan)?
        };
        if start > size {
            return Err(EngineError::OutOfRange {
                image: plan.target_label.clone(),
                offset: start,
                len: 0,
                size,
            });
        }
        // Nothing ends after the end: an empty last page (not the partial last chunk).
        let end_chunk = if start == size { 0 } else { size.div_ceil(cs) };
        let mut window = start / cs;
        while window < end_chunk {
            let upto = window.saturating_add(WINDOW_CHUNKS).min(end_chunk);
            let st = self.inner.state.lock();
            // The target may have been resized or deleted between windows.
            let (size_now, _) = self.target_geometry(&st, plan)?;
            let limit = size_now.min(size);
            let epoch = match plan.target_epoch {
                Some(e) => e,
                None => st.lineages[&plan.target_lineage].rec.e_head,
            };
            for chunk in candidates(&st, plan, window, upto) {
                let offset = chunk * cs;
                if offset >= limit {
                    break;
                }
                let resolved = st.resolve(plan.target_lineage, epoch, chunk, cs);
                let zero = match resolved {
                    Resolved::Zero => true,
                    Resolved::Data { .. } => false,
                };
                if plan.allocated && zero {
                    continue;
                }
                let len = cs.min(limit - offset);
                if let Some(last) = out.last_mut() {
                    if last.offset + last.len == offset && last.zero == zero {
                        last.len += len;
                        continue;
                    }
                }
                if out.len() == max {
                    return Ok(ExtentPage {
                        image_size: size,
                        chunk_size: cs,
                        extents: out,
                        next_offset: Some(offset),
                    });
                }
                out.push(DiffExtent { offset, len, zero });
            }
            drop(st);
            window = upto;
        }
        Ok(ExtentPage {
            image_size: size,
            chunk_size: cs,
            extents: out,
            next_offset: None,
        })
    }

    /// The target's current size and its pool's chunk size.
    fn target_geometry(&self, st: &State, plan: &Plan) -> Result<(u64, u64)> {
        let img = st
            .images
            .get(&plan.target_id)
            .ok_or_else(|| EngineError::NotFound {
                kind: ObjectKind::Image,
                name: plan.target_label.clone(),
            })?;
        let lin = st
            .lineages
            .get(&img.lineage)
            .ok_or_else(|| EngineError::Corrupt(format!("image {:?} has no lineage", img.name)))?;
        Ok((img.size, self.inner.pools[lin.pool].chunk_size))
    }
}

/// The parent pointers above `lineage`, nearest first.
fn parent_chain(st: &State, lineage: u64) -> Vec<ParentRef> {
    let mut out = Vec::new();
    let mut cur = st.lineages.get(&lineage).and_then(|l| l.rec.parent);
    while let Some(p) = cur {
        out.push(p);
        cur = st.lineages.get(&p.lineage).and_then(|l| l.rec.parent);
    }
    out
}

/// Chunks in `[from, to)` with an entry in any segment, or forced, ascending and unique.
fn candidates(st: &State, plan: &Plan, from: u64, to: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for seg in &plan.segments {
        let Some(lin) = st.lineages.get(&seg.lineage) else {
            continue;
        };
        match seg.lo {
            // A delta: the epoch index holds exactly the chunks written in (lo, hi], so
            // the cost follows the change, not the volume.
            Some(lo) => set.extend(lin.chunks_written_in(lo, seg.hi, from, to)),
            // Everything up to hi (allocated extents, a clone's inherited base): every
            // entry in the window is a candidate anyway.
            None => {
                for (&(chunk, epoch), _) in lin.map().range((from, 0)..(to, 0)) {
                    if epoch <= seg.hi {
                        set.insert(chunk);
                    }
                }
            }
        }
    }
    for f in &plan.forced {
        let lo = f.from.max(from);
        let hi = f.to.min(to);
        set.extend(lo..hi.max(lo));
    }
    set
}
