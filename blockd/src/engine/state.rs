//! The engine's in-memory state: the resolved chunk maps of every lineage, the images,
//! the per-pool allocators and the pending-remap overlay waiting for the next commit.
//!
//! Everything here sits behind one mutex (`Inner::state`). Holding it is short: lookups in
//! B-trees and bitmaps, never device or metadata I/O. The authoritative copy of every map
//! entry is in the metadata store; this mirror is rebuilt from it at open, and changes
//! reach it first here and then, in order, through `pending` at the next group commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use super::records::{ImageRecord, LineageRecord, ParentRef};
use crate::meta::keys::ZERO;
use crate::meta::WriteBatch;

/// A bitmap allocator of one pool's chunks. Chunk 0 (the superblock) is never free.
#[derive(Debug)]
pub struct Allocator {
    words: Vec<u64>,
    chunks: u64,
    free: u64,
    cursor: u64,
}

impl Allocator {
    /// All chunks free except chunk 0.
    pub fn new(chunks: u64) -> Self {
        let mut a = Allocator {
            words: vec![0; chunks.div_ceil(64) as usize],
            chunks,
            free: chunks,
            cursor: 1,
        };
        if chunks > 0 {
            a.mark_used(0);
        }
        a
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    pub fn free_chunks(&self) -> u64 {
        self.free
    }

    pub fn is_used(&self, chunk: u64) -> bool {
        self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// Marks a chunk used; returns false when it already was (double ownership).
    pub fn mark_used(&mut self, chunk: u64) -> bool {
        let w = &mut self.words[(chunk / 64) as usize];
        let bit = 1u64 << (chunk % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.free -= 1;
        true
    }

    pub fn release(&mut self, chunk: u64) {
        let w = &mut self.words[(chunk / 64) as usize];
        let bit = 1u64 << (chunk % 64);
        debug_assert!(*w & bit != 0, "releasing free chunk {chunk}");
        if *w & bit != 0 {
            *w &= !bit;
            self.free += 1;
        }
    }

    /// Next-fit allocation: sequential writes get neighbouring chunks, which keeps
    /// large reads contiguous on the device.
    pub fn allocate(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let nwords = self.words.len() as u64;
        let start_word = self.cursor / 64;
        for step in 0..=nwords {
            let wi = (start_word + step) % nwords;
            let w = self.words[wi as usize];
            if w == u64::MAX {
                continue;
            }
            // Within the starting word, skip bits below the cursor on the first visit.
            let mut candidates = !w;
            if step == 0 {
                candidates &= u64::MAX << (self.cursor % 64);
            }
            if candidates == 0 {
                continue;
            }
            let chunk = wi * 64 + u64::from(candidates.trailing_zeros());
            if chunk >= self.chunks {
                continue;
            }
            self.mark_used(chunk);
            self.cursor = chunk + 1;
            if self.cursor >= self.chunks {
                self.cursor = 1;
            }
            return Some(chunk);
        }
        // The cursor's own word below the cursor is only reached by a full wrap.
        (1..self.chunks).find(|&c| !self.is_used(c)).inspect(|&c| {
            self.mark_used(c);
        })
    }

    /// Free chunks as (first, count) runs, for punching at open.
    pub fn free_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut c = 0;
        while c < self.chunks {
            if self.is_used(c) {
                c += 1;
                continue;
            }
            let start = c;
            while c < self.chunks && !self.is_used(c) {
                c += 1;
            }
            runs.push((start, c - start));
        }
        runs
    }
}

/// One lineage: a volume head and its snapshots, sharing a chunk map keyed (chunk, epoch).
///
/// The map is private so that every change goes through [`Lineage::map_insert`] and
/// [`Lineage::map_remove`], which keep `by_epoch` — the same entries keyed (epoch, chunk)
/// — in step. That second index is what makes a snapshot delta cost O(changed chunks):
/// the chunks written in epochs `(e_base, e_target]` are a range of it (see
/// `engine::delta`), where the map itself would have to be walked whole. It costs about
/// as much memory again as the map (16 bytes of key per mapped chunk, plus tree overhead).
#[derive(Debug)]
pub struct Lineage {
    pub id: u64,
    pub rec: LineageRecord,
    /// Pool index into `Inner::pools`.
    pub pool: usize,
    /// (chunk, epoch) -> physical chunk, or `ZERO`.
    map: BTreeMap<(u64, u64), u64>,
    /// Every key of `map`, as (epoch, chunk).
    by_epoch: BTreeSet<(u64, u64)>,
    /// Epochs read by something other than the head: snapshots and clones' pins, counted.
    pub readers: BTreeMap<u64, u32>,
    /// Chunks with a copy-on-write in flight (a second writer waits for the first).
    pub cow_inflight: HashSet<u64>,
    /// Writers hold it shared; snapshot, clone-from-volume and shrink hold it exclusive
    /// to quiesce the volume.
    pub gate: Arc<RwLock<()>>,
    /// Deletes left entries that GC may reclaim.
    pub gc_dirty: bool,
}

impl Lineage {
    pub fn new(id: u64, rec: LineageRecord, pool: usize) -> Self {
        Lineage {
            id,
            rec,
            pool,
            map: BTreeMap::new(),
            by_epoch: BTreeSet::new(),
            readers: BTreeMap::new(),
            cow_inflight: HashSet::new(),
            gate: Arc::new(RwLock::new(())),
            gc_dirty: false,
        }
    }

    /// The chunk map, (chunk, epoch) -> physical chunk or `ZERO`.
    pub fn map(&self) -> &BTreeMap<(u64, u64), u64> {
        &self.map
    }

    /// Sets the entry of `chunk` at `epoch` (`key` = (chunk, epoch)); returns the old one.
    pub fn map_insert(&mut self, key: (u64, u64), phys: u64) -> Option<u64> {
        self.by_epoch.insert((key.1, key.0));
        self.map.insert(key, phys)
    }

    /// Removes the entry of `chunk` at `epoch` (`key` = (chunk, epoch)).
    pub fn map_remove(&mut self, key: &(u64, u64)) -> Option<u64> {
        self.by_epoch.remove(&(key.1, key.0));
        self.map.remove(key)
    }

    /// Chunks in `[from, to)` with an entry at an epoch in `(lo, hi]`, ascending with
    /// repeats (one per entry): O(epochs holding entries in the range + entries found).
    pub fn chunks_written_in(&self, lo: u64, hi: u64, from: u64, to: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if lo >= hi || from >= to {
            return out;
        }
        // Epochs that hold entries, from lo+1 on: empty epochs are skipped by seeking.
        let mut epoch = lo + 1;
        while epoch <= hi {
            let Some(&(e, _)) = self.by_epoch.range((epoch, 0)..).next() else {
                break;
            };
            if e > hi {
                break;
            }
            out.extend(self.by_epoch.range((e, from)..(e, to)).map(|&(_, c)| c));
            epoch = match e.checked_add(1) {
                Some(next) => next,
                None => break,
            };
        }
        out.sort_unstable();
        out
    }

    pub fn add_reader(&mut self, epoch: u64) {
        *self.readers.entry(epoch).or_insert(0) += 1;
    }

    pub fn remove_reader(&mut self, epoch: u64) {
        if let Some(n) = self.readers.get_mut(&epoch) {
            *n -= 1;
            if *n == 0 {
                self.readers.remove(&epoch);
            }
        }
        self.gc_dirty = true;
    }

    /// The entry visible at `epoch` for `chunk` within this lineage only.
    pub fn visible(&self, chunk: u64, epoch: u64) -> Option<(u64, u64)> {
        // One descent for the greatest key at or below (chunk, epoch), rather than a
        // bounded range's two: this runs for every chunk of every read.
        self.map
            .range(..=(chunk, epoch))
            .next_back()
            .filter(|(&(c, _), _)| c == chunk)
            .map(|(&(_, e), &p)| (e, p))
    }

    /// Whether any reader (the head when present, snapshots, pins) reads an epoch in
    /// `[from, to)`.
    pub fn read_in(&self, from: u64, to: u64) -> bool {
        if from >= to {
            return false;
        }
        if self.rec.head.is_some() && self.rec.e_head >= from && self.rec.e_head < to {
            return true;
        }
        self.readers.range(from..to).next().is_some()
    }

    /// Whether anything at all reads this lineage.
    pub fn has_readers(&self) -> bool {
        self.rec.head.is_some() || !self.readers.is_empty()
    }
}

/// How one chunk of an image reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Zero,
    /// Data in physical chunk `phys`; bytes at and beyond `valid` within the chunk read
    /// as zeros (a clone's parent limit cuts a chunk).
    Data {
        phys: u64,
        valid: u64,
    },
}

#[derive(Debug)]
pub struct State {
    pub images: HashMap<u64, ImageRecord>,
    pub volumes_by_name: HashMap<String, u64>,
    pub snapshots_by_name: HashMap<String, u64>,
    /// Live images by their stable id (`ImageRecord::uuid`).
    pub by_uuid: HashMap<String, u64>,
    pub lineages: HashMap<u64, Lineage>,
    pub allocators: Vec<Allocator>,
    /// Chunks reserved by writes in flight (allocated, not yet in any map).
    pub reserved: HashSet<(usize, u64)>,
    /// The pending-remap overlay's durable half: every change since the last commit.
    pub pending: WriteBatch,
    /// Chunks freed by `pending`; allocatable only after it is durable.
    pub pending_frees: Vec<(usize, u64)>,
    pub next_id: u64,
    /// Set after a fatal I/O error: everything but reads is refused until restart.
    pub failed: Option<String>,
    /// Problems found at open (double ownership); writes are refused while non-empty.
    pub open_problems: Vec<String>,
    /// Set while the metadata file system is full (see `engine::meta_space`).
    pub meta_full: Option<super::meta_space::MetaFull>,
}

impl State {
    /// Whether a live image has this stable id.
    pub fn is_live(&self, uuid: &str) -> bool {
        self.by_uuid.contains_key(uuid)
    }

    pub fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Resolves `chunk` of the image reading lineage `lineage` at `epoch`, following
    /// parents. `chunk_size` is the pool's.
    pub fn resolve(&self, lineage: u64, epoch: u64, chunk: u64, chunk_size: u64) -> Resolved {
        let mut l = lineage;
        let mut e = epoch;
        let mut limit = u64::MAX;
        let start = chunk * chunk_size;
        loop {
            let Some(lin) = self.lineages.get(&l) else {
                return Resolved::Zero;
            };
            if let Some((_, p)) = lin.visible(chunk, e) {
                if p == ZERO {
                    return Resolved::Zero;
                }
                let valid = limit.saturating_sub(start).min(chunk_size);
                return if valid == 0 {
                    Resolved::Zero
                } else {
                    Resolved::Data { phys: p, valid }
                };
            }
            match lin.rec.parent {
                Some(ParentRef {
                    lineage: pl,
                    epoch: pe,
                    limit: plimit,
                }) => {
                    limit = limit.min(plimit);
                    if start >= limit {
                        return Resolved::Zero;
                    }
                    l = pl;
                    e = pe;
                }
                None => return Resolved::Zero,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_never_hands_out_a_chunk_twice() {
        let mut a = Allocator::new(130);
        let mut seen = HashSet::new();
        while let Some(c) = a.allocate() {
            assert!(c != 0 && c < 130);
            assert!(seen.insert(c), "chunk {c} handed out twice");
        }
        assert_eq!(seen.len(), 129);
        assert_eq!(a.free_chunks(), 0);
        a.release(77);
        assert_eq!(a.allocate(), Some(77));
        assert_eq!(a.allocate(), None);
        assert_eq!(a.free_runs(), vec![]);
        a.release(5);
        a.release(6);
        assert_eq!(a.free_runs(), vec![(5, 2)]);
    }

    #[test]
    fn the_epoch_index_follows_every_map_change() {
        let rec = LineageRecord {
            pool: 0,
            e_head: 9,
            parent: None,
            head: Some(1),
        };
        let mut lin = Lineage::new(1, rec, 0);
        for (chunk, epoch) in [(5, 1), (3, 2), (9, 2), (3, 4), (700, 4), (2, 7), (4, 9)] {
            lin.map_insert((chunk, epoch), 100 + chunk);
        }
        // (lo, hi] by epoch, [from, to) by chunk, ascending.
        assert_eq!(lin.chunks_written_in(1, 4, 0, 1000), vec![3, 3, 9, 700]);
        assert_eq!(lin.chunks_written_in(1, 4, 4, 700), vec![9]);
        assert_eq!(lin.chunks_written_in(0, 1, 0, 10), vec![5]);
        assert_eq!(lin.chunks_written_in(4, 9, 0, 10), vec![2, 4]);
        assert!(lin.chunks_written_in(4, 4, 0, 10).is_empty());
        assert!(lin.chunks_written_in(9, u64::MAX, 0, u64::MAX).is_empty());
        // Removal and overwrite keep the index exact.
        lin.map_remove(&(3, 2));
        lin.map_insert((9, 2), 0);
        assert_eq!(lin.chunks_written_in(1, 4, 0, 1000), vec![3, 9, 700]);
        assert_eq!(lin.map().len(), lin.by_epoch.len());
        // The last epoch does not overflow the walk.
        lin.map_insert((1, u64::MAX), 0);
        assert_eq!(lin.chunks_written_in(9, u64::MAX, 0, 10), vec![1]);
    }
}
