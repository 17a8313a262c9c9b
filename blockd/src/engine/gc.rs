//! Garbage collection.
//!
//! GC removes map entries no reader can see and lineages nothing reads. An entry
//! `(c, e_i)` is visible to a reader at epoch `x` iff `e_i <= x < e_{i+1}` (the next entry
//! of the same chunk), so it is garbage iff no reader epoch falls in that window. Readers
//! of a lineage are its head, its snapshots, and the epochs its clones pin. GC derives its
//! work from the durable images and lineages, so after a crash it simply finds the rest.
//! Flatten, which also rewrites chunk maps, is in `flatten`.

use std::sync::atomic::Ordering;

use crate::meta::keys::{self, ZERO};
use crate::meta::Cf;

use super::error::Result;
use super::types::GcStats;
use super::Engine;

/// Map entries removed per GC commit: bounds the batch size and the lock hold time.
const GC_BATCH: usize = 16384;

impl Engine {
    /// One GC pass over lineages with reclaimable entries; commits what it frees.
    pub fn gc(&self) -> Result<GcStats> {
        let mut stats = GcStats::default();
        loop {
            let (removed, more) = self.gc_round(&mut stats)?;
            self.commit()?;
            if !more || removed == 0 {
                break;
            }
        }
        let st = self.inner().state.lock();
        stats.backlog = st
            .lineages
            .values()
            .filter(|l| l.gc_dirty)
            .map(|l| l.map().len() as u64)
            .sum();
        drop(st);
        self.inner()
            .stats
            .gc_freed_chunks
            .fetch_add(stats.chunks_freed, Ordering::Relaxed);
        self.inner()
            .stats
            .gc_backlog
            .store(stats.backlog, Ordering::Relaxed);
        Ok(stats)
    }

    /// Removes up to [`GC_BATCH`] garbage entries; returns (entries and lineages removed,
    /// whether more work may remain).
    fn gc_round(&self, stats: &mut GcStats) -> Result<(u64, bool)> {
        let _ctl = self.inner().control.lock();
        let mut st = self.inner().state.lock();
        Self::check_writable(&st)?;
        let mut budget = GC_BATCH;
        let mut removed = 0u64;
        let mut more = false;
        let dirty: Vec<u64> = st
            .lineages
            .values()
            .filter(|l| l.gc_dirty)
            .map(|l| l.id)
            .collect();
        for lid in dirty {
            if budget == 0 {
                more = true;
                break;
            }
            let lin = &st.lineages[&lid];
            let pool = lin.pool;
            let drop_all = !lin.has_readers();
            let mut garbage: Vec<(u64, u64, u64)> = Vec::new();
            let mut complete = true;
            let mut iter = lin.map().iter().peekable();
            while let Some((&(c, e), &p)) = iter.next() {
                let next_e = match iter.peek() {
                    Some((&(c2, e2), _)) if c2 == c => e2,
                    _ => u64::MAX,
                };
                if drop_all || !lin.read_in(e, next_e) {
                    if garbage.len() == budget {
                        complete = false;
                        break;
                    }
                    garbage.push((c, e, p));
                }
            }
            budget -= garbage.len();
            removed += garbage.len() as u64;
            stats.entries_removed += garbage.len() as u64;
            let lin = st.lineages.get_mut(&lid).expect("exists");
            for &(c, e, _) in &garbage {
                lin.map_remove(&(c, e));
            }
            if complete {
                lin.gc_dirty = false;
            } else {
                more = true;
            }
            let emptied = drop_all && complete && lin.map().is_empty();
            for &(c, e, p) in &garbage {
                st.pending.delete_cf(Cf::Map, keys::map_key(lid, c, e));
                if p != ZERO {
                    st.pending_frees.push((pool, p));
                    stats.chunks_freed += 1;
                }
            }
            if emptied {
                let lin = st.lineages.remove(&lid).expect("exists");
                st.pending.delete_cf(Cf::Lineages, keys::id_key(lid));
                if let Some(p) = lin.rec.parent {
                    if let Some(parent) = st.lineages.get_mut(&p.lineage) {
                        // Marks the parent dirty: its pinned entries may be garbage now.
                        parent.remove_reader(p.epoch);
                        more = true;
                    }
                }
                stats.lineages_removed += 1;
                removed += 1;
            }
        }
        Ok((removed, more))
    }
}
