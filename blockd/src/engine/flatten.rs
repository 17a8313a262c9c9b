//! Flatten: copies into a clone (at epoch 0, under all of its own entries) every chunk it
//! still reads through its parent, in batches, each committed with an intent record
//! carrying the cursor; the last step drops the parent pointer and the intent. A crash
//! leaves the intent, and the background worker resumes from its cursor.

use std::sync::atomic::Ordering;

use crate::device::{AlignedBuf, IoOp};
use crate::meta::keys;
use crate::meta::Cf;

use super::error::{EngineError, Result};
use super::records::{self, Intent};
use super::state::Resolved;
use super::types::VolumeInfo;
use super::{lineage_put, next_id_put, Engine};

/// Chunks copied per flatten commit.
const FLATTEN_BATCH: usize = 64;

impl Engine {
    /// Copies everything a clone reads through its parent into the clone and drops the
    /// parent, so the clone no longer depends on it. Reports progress as chunks examined
    /// of chunks to examine.
    pub fn flatten_volume(
        &self,
        name: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VolumeInfo> {
        let lineage = {
            let st = self.inner().state.lock();
            let id = Self::volume_id(&st, name)?;
            st.images[&id].lineage
        };
        self.flatten_lineage(lineage, progress)?;
        self.volume(name)
    }

    pub(crate) fn flatten_lineage(
        &self,
        lineage: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        // Find or create the intent.
        let (intent_id, mut cursor) = {
            let _ctl = self.inner().control.lock();
            let mut found = None;
            for (k, v) in self.inner().meta.scan(Cf::Intents, &[], &[], usize::MAX)? {
                let Intent::Flatten { lineage: l, cursor } = records::decode(Cf::Intents, &v)?;
                if l == lineage {
                    found = Some((keys::decode_id(Cf::Intents, &k)?, cursor));
                }
            }
            match found {
                Some(f) => f,
                None => {
                    let mut st = self.inner().state.lock();
                    Self::check_writable(&st)?;
                    let Some(lin) = st.lineages.get(&lineage) else {
                        return Ok(());
                    };
                    if lin.rec.parent.is_none() {
                        return Ok(());
                    }
                    let id = st.alloc_id();
                    let next = st.next_id;
                    next_id_put(&mut st.pending, next);
                    st.pending.put_cf(
                        Cf::Intents,
                        keys::id_key(id),
                        records::encode(&Intent::Flatten { lineage, cursor: 0 }),
                    );
                    drop(st);
                    self.commit()?;
                    (id, 0)
                }
            }
        };
        loop {
            let (pool, copies, total, done) = {
                let st = self.inner().state.lock();
                Self::check_writable(&st)?;
                let Some(lin) = st.lineages.get(&lineage) else {
                    // The clone was deleted meanwhile: nothing left to flatten.
                    drop(st);
                    return self.finish_flatten(intent_id, None);
                };
                let pool = self.inner().pools[lin.pool].clone();
                let cs = pool.chunk_size;
                let Some(parent) = lin.rec.parent else {
                    drop(st);
                    return self.finish_flatten(intent_id, None);
                };
                let total = parent.limit.div_ceil(cs);
                let min_reader = lin
                    .readers
                    .keys()
                    .next()
                    .copied()
                    .into_iter()
                    .chain(lin.rec.head.map(|_| lin.rec.e_head))
                    .min()
                    .unwrap_or(0);
                let mut copies = Vec::new();
                let mut c = cursor;
                while c < total && copies.len() < FLATTEN_BATCH {
                    let first_own = lin
                        .map()
                        .range((c, 0)..(c + 1, 0))
                        .next()
                        .map(|(&(_, e), _)| e);
                    let needed = match first_own {
                        None => true,
                        Some(0) => false,
                        Some(e) => min_reader < e,
                    };
                    if needed {
                        if let Resolved::Data { phys, valid } =
                            st.resolve(parent.lineage, parent.epoch, c, cs)
                        {
                            let valid = valid.min(parent.limit.saturating_sub(c * cs));
                            if valid > 0 {
                                copies.push((c, phys, valid));
                            }
                        }
                    }
                    c += 1;
                }
                (pool, copies, total, c)
            };
            // Reserve destinations, copy, then record at epoch 0.
            let mut dests = Vec::with_capacity(copies.len());
            {
                let mut st = self.inner().state.lock();
                for _ in &copies {
                    match st.allocators[pool.idx].allocate() {
                        Some(p) => {
                            st.reserved.insert((pool.idx, p));
                            dests.push(p);
                        }
                        None => {
                            for p in dests.drain(..) {
                                st.reserved.remove(&(pool.idx, p));
                                st.allocators[pool.idx].release(p);
                            }
                            return Err(EngineError::NoSpace {
                                pool: pool.name.clone(),
                                image: format!("flatten of lineage {lineage}"),
                            });
                        }
                    }
                }
            }
            let copy_result = (|| -> Result<()> {
                let _reclaim = pool.reclaim.read();
                let mut bufs: Vec<AlignedBuf> = copies
                    .iter()
                    .map(|_| AlignedBuf::zeroed(pool.chunk_size as usize))
                    .collect();
                let mut reads: Vec<IoOp<'_>> = copies
                    .iter()
                    .zip(bufs.iter_mut())
                    .map(|(&(_, phys, valid), b)| IoOp::Read {
                        offset: pool.offset(phys),
                        buf: &mut b[..valid as usize],
                    })
                    .collect();
                pool.device.submit(&mut reads)?;
                drop(reads);
                pool.dirty.store(true, Ordering::SeqCst);
                let mut writes: Vec<IoOp<'_>> = dests
                    .iter()
                    .zip(bufs.iter())
                    .map(|(&d, b)| IoOp::Write {
                        offset: pool.offset(d),
                        buf: b,
                    })
                    .collect();
                pool.device.submit(&mut writes)?;
                // Again after the writes: a commit that ran while they were in flight may
                // have cleared the flag and flushed before they landed, and the commit
                // that publishes these copies must not skip the device flush.
                pool.dirty.store(true, Ordering::SeqCst);
                Ok(())
            })();
            {
                let mut st = self.inner().state.lock();
                for &d in &dests {
                    st.reserved.remove(&(pool.idx, d));
                }
                if let Err(e) = copy_result {
                    for &d in &dests {
                        st.pending_frees.push((pool.idx, d));
                    }
                    drop(st);
                    let _ = self.commit();
                    return Err(e);
                }
                let st = &mut *st;
                match st.lineages.get_mut(&lineage) {
                    Some(lin) => {
                        for (&(c, _, _), &d) in copies.iter().zip(dests.iter()) {
                            lin.map_insert((c, 0), d);
                            st.pending.put_cf(
                                Cf::Map,
                                keys::map_key(lineage, c, 0),
                                keys::map_value(d),
                            );
                        }
                    }
                    None => {
                        for &d in &dests {
                            st.pending_frees.push((pool.idx, d));
                        }
                    }
                }
                st.pending.put_cf(
                    Cf::Intents,
                    keys::id_key(intent_id),
                    records::encode(&Intent::Flatten {
                        lineage,
                        cursor: done,
                    }),
                );
            }
            self.commit()?;
            cursor = done;
            progress(done.min(total), total);
            if done >= total {
                return self.finish_flatten(intent_id, Some(lineage));
            }
        }
    }

    fn finish_flatten(&self, intent_id: u64, lineage: Option<u64>) -> Result<()> {
        {
            let _ctl = self.inner().control.lock();
            let mut st = self.inner().state.lock();
            if let Some(lid) = lineage {
                if let Some(lin) = st.lineages.get_mut(&lid) {
                    // A head write may have overtaken a copy: let GC look again.
                    lin.gc_dirty = true;
                    if let Some(p) = lin.rec.parent.take() {
                        let rec = lin.rec.clone();
                        lineage_put(&mut st.pending, lid, &rec);
                        if let Some(parent) = st.lineages.get_mut(&p.lineage) {
                            parent.remove_reader(p.epoch);
                        }
                    }
                }
            }
            st.pending.delete_cf(Cf::Intents, keys::id_key(intent_id));
        }
        self.commit()?;
        tracing::info!(lineage = ?lineage, "flatten finished");
        Ok(())
    }
}
