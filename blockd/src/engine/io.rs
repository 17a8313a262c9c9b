//! The data path: read, write, write-zeroes, discard and block status on an image.
//!
//! Every operation splits its byte range into per-chunk pieces, decides what to do for
//! each piece under the state lock (no I/O there), then does the device I/O as one batch
//! with the lock released, and finally records new mappings in the overlay.
//!
//! Locks, always taken in this order and each at most once per operation (a second shared
//! acquisition could queue behind a waiting exclusive one and deadlock):
//! lineage `gate` (writers shared; snapshot/shrink exclusive) -> pool `reclaim` (all data
//! I/O shared; release of freed chunks exclusive) -> `state` (short, never across I/O).
//! A commit is never started while holding `gate` or `reclaim` shared.

use std::sync::Arc;

use crate::device::{AlignedBuf, IoOp};
use crate::meta::keys::{self, ZERO};
use crate::meta::Cf;

use super::error::{EngineError, Result};
use super::state::{Resolved, State};
use super::types::Extent;
use super::{Engine, ImageHandle, PoolRt};

/// One device I/O of a planned image read or write: `len` bytes at device `offset`, to or
/// from the caller's buffer at `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceIo {
    pub pos: usize,
    pub len: usize,
    pub offset: u64,
}

/// Appends a device I/O of `len` bytes at device `offset` for the caller's buffer at
/// `pos`, merged into the last one when both are contiguous in the buffer and on the
/// device.
fn push_coalesced(ops: &mut Vec<DeviceIo>, pos: usize, len: usize, offset: u64) {
    match ops.last_mut() {
        Some(last) if last.pos + last.len == pos && last.offset + last.len as u64 == offset => {
            last.len += len;
        }
        _ => ops.push(DeviceIo { pos, len, offset }),
    }
}

/// Holds a lineage's writer gate and its pool's `reclaim` lock shared, as a synchronous
/// write does for its whole duration. May move between threads.
pub struct WritePin {
    gate: Arc<parking_lot::RwLock<()>>,
    pool: Arc<PoolRt>,
}

impl std::fmt::Debug for WritePin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritePin")
            .field("pool", &self.pool.name)
            .finish()
    }
}

impl Drop for WritePin {
    fn drop(&mut self) {
        // SAFETY: `try_write_pin` took both locks shared and forgot the guards; this pin
        // is the only owner of those holds and gives each back once.
        unsafe {
            self.pool.reclaim.force_unlock_read();
            self.gate.force_unlock_read();
        }
    }
}

/// Holds a pool's `reclaim` lock shared, as data I/O does for its whole duration, so no
/// chunk read under it is released and reused before the pin is dropped. Unlike a guard it
/// may move between threads.
pub struct ReadPin {
    pool: Arc<PoolRt>,
}

impl std::fmt::Debug for ReadPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPin")
            .field("pool", &self.pool.name)
            .finish()
    }
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        // SAFETY: `try_read_pin` took the lock shared and forgot the guard; this pin is the
        // only owner of that hold and gives it back once.
        unsafe { self.pool.reclaim.force_unlock_read() };
    }
}

/// One chunk's share of a request.
#[derive(Debug, Clone, Copy)]
struct Piece {
    chunk: u64,
    /// Offset within the chunk.
    at: u64,
    len: u64,
    /// Offset within the request.
    pos: usize,
}

fn pieces(offset: u64, len: u64, chunk_size: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut cur = offset;
    std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let chunk = cur / chunk_size;
        let at = cur % chunk_size;
        let n = (chunk_size - at).min(end - cur);
        let p = Piece {
            chunk,
            at,
            len: n,
            pos: (cur - offset) as usize,
        };
        cur += n;
        Some(p)
    })
}

/// What a write does with one piece.
#[derive(Debug)]
enum WritePlan {
    /// The head alone owns `phys`: overwrite in place.
    InPlace { piece: Piece, phys: u64 },
    /// Write into freshly reserved `phys`, merging the old content `source` around the
    /// piece unless the piece covers the whole chunk.
    Fresh {
        piece: Piece,
        phys: u64,
        source: Resolved,
    },
}

impl Engine {
    fn check_range(st: &State, h: &ImageHandle, offset: u64, len: u64) -> Result<u64> {
        let img = Self::live_image(st, h)?;
        match offset.checked_add(len) {
            Some(end) if end <= img.size => Ok(img.size),
            _ => Err(EngineError::OutOfRange {
                image: h.name.to_string(),
                offset,
                len,
                size: img.size,
            }),
        }
    }

    fn head_epoch(st: &State, h: &ImageHandle) -> u64 {
        h.epoch
            .unwrap_or_else(|| st.lineages[&h.lineage].rec.e_head)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, h: &ImageHandle, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut one = [(offset, buf)];
        self.read_batch(h, &mut one)
            .pop()
            .expect("one result per request")
    }

    /// Reads several ranges of one image, each `(offset, buf)`, planned under one state
    /// lock and submitted to the device as one batch; one result per range, in order.
    pub fn read_batch(&self, h: &ImageHandle, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        let pool = &self.inner.pools[h.pool];
        let cs = pool.chunk_size;
        let reclaim = pool.reclaim.read();
        // Per request: the (piece, resolved) pairs, decided under the lock, or the error.
        let plans: Vec<Result<Vec<(Piece, Resolved)>>> = {
            let st = self.inner.state.lock();
            reqs.iter()
                .map(|(offset, buf)| {
                    Self::check_range(&st, h, *offset, buf.len() as u64)?;
                    let epoch = Self::head_epoch(&st, h);
                    Ok(pieces(*offset, buf.len() as u64, cs)
                        .map(|p| (p, st.resolve(h.lineage, epoch, p.chunk, cs)))
                        .collect())
                })
                .collect()
        };
        let count = reqs.len();
        let mut io: Vec<IoOp<'_>> = Vec::with_capacity(count);
        let mut results: Vec<Result<()>> = Vec::with_capacity(count);
        for ((_, buf), plan) in reqs.iter_mut().zip(plans) {
            match plan {
                Ok(plan) => {
                    Self::read_ops(pool, &plan, buf, &mut io);
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if io.is_empty() {
            return results;
        }
        match pool.device.submit(&mut io) {
            Ok(()) => results,
            Err(e) if count == 1 => vec![Err(e.into())],
            Err(_) => {
                // Which request failed is unknown: read them again one by one (reads
                // change nothing), without holding `reclaim` twice.
                drop(io);
                drop(reclaim);
                reqs.iter_mut()
                    .map(|(offset, buf)| self.read(h, *offset, buf))
                    .collect()
            }
        }
    }

    /// Zero-fills what `plan` says reads as zeros and appends the device reads for the
    /// rest, physically contiguous pieces coalesced into one I/O each.
    fn read_ops<'a>(
        pool: &PoolRt,
        plan: &[(Piece, Resolved)],
        buf: &'a mut [u8],
        io: &mut Vec<IoOp<'a>>,
    ) {
        let ops = Self::device_reads(pool, plan, buf);
        let mut rest: &mut [u8] = buf;
        let mut consumed = 0usize;
        for DeviceIo { pos, len, offset } in ops {
            let tail = std::mem::take(&mut rest);
            let (_, tail) = tail.split_at_mut(pos - consumed);
            let (mine, tail) = tail.split_at_mut(len);
            rest = tail;
            consumed = pos + len;
            io.push(IoOp::Read { offset, buf: mine });
        }
    }

    /// Zero-fills what `plan` says reads as zeros; returns the device reads for the rest.
    fn device_reads(pool: &PoolRt, plan: &[(Piece, Resolved)], buf: &mut [u8]) -> Vec<DeviceIo> {
        let mut ops: Vec<DeviceIo> = Vec::new();
        for (p, r) in plan {
            let (pos, len) = (p.pos, p.len as usize);
            match *r {
                Resolved::Zero => buf[pos..pos + len].fill(0),
                Resolved::Data { phys, valid } => {
                    let data_len = valid.saturating_sub(p.at).min(p.len) as usize;
                    buf[pos + data_len..pos + len].fill(0);
                    if data_len == 0 {
                        continue;
                    }
                    push_coalesced(&mut ops, pos, data_len, pool.offset(phys) + p.at);
                }
            }
        }
        ops
    }

    /// Pins the image's pool for reads planned with [`Engine::plan_read`], without
    /// waiting: None while a commit waits to release freed chunks (then read the
    /// synchronous way, which waits for it).
    pub fn try_read_pin(&self, h: &ImageHandle) -> Option<ReadPin> {
        let pool = self.inner.pools[h.pool].clone();
        let guard = pool.reclaim.try_read()?;
        // The shared hold outlives the guard (the pin may move to another thread); it is
        // given back exactly once, by `ReadPin::drop`.
        std::mem::forget(guard);
        Some(ReadPin { pool })
    }

    /// Plans a read of `buf.len()` bytes at `offset` without doing the device I/O: fills
    /// the ranges that read as zeros and returns the device reads for the rest, which the
    /// caller must complete while holding `pin`. Also returns which byte ranges of `buf`
    /// are known zeros (holes), in order.
    pub fn plan_read(
        &self,
        pin: &ReadPin,
        h: &ImageHandle,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(Vec<DeviceIo>, Vec<std::ops::Range<usize>>)> {
        let plan = self.read_plan(pin, h, offset, buf.len() as u64)?;
        let pool = &self.inner.pools[h.pool];
        Ok((
            Self::device_reads(pool, &plan, buf),
            Self::zero_ranges(&plan),
        ))
    }

    /// [`Engine::plan_read`] for a buffer the caller cannot touch (a ublk request's,
    /// which only the kernel can write): the device reads, and the ranges the caller
    /// must zero itself, both in order.
    pub fn plan_read_ranges(
        &self,
        pin: &ReadPin,
        h: &ImageHandle,
        offset: u64,
        len: usize,
    ) -> Result<(Vec<DeviceIo>, Vec<std::ops::Range<usize>>)> {
        let plan = self.read_plan(pin, h, offset, len as u64)?;
        let pool = &self.inner.pools[h.pool];
        let mut ops: Vec<DeviceIo> = Vec::new();
        for (p, r) in &plan {
            if let Resolved::Data { phys, valid } = *r {
                let data_len = valid.saturating_sub(p.at).min(p.len) as usize;
                if data_len > 0 {
                    push_coalesced(&mut ops, p.pos, data_len, pool.offset(phys) + p.at);
                }
            }
        }
        Ok((ops, Self::zero_ranges(&plan)))
    }

    /// Where each piece of a read of `len` bytes at `offset` lives, under `pin`.
    fn read_plan(
        &self,
        pin: &ReadPin,
        h: &ImageHandle,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(Piece, Resolved)>> {
        let pool = &self.inner.pools[h.pool];
        debug_assert!(Arc::ptr_eq(pool, &pin.pool), "pin of another pool");
        let cs = pool.chunk_size;
        let st = self.inner.state.lock();
        Self::check_range(&st, h, offset, len)?;
        let epoch = Self::head_epoch(&st, h);
        Ok(pieces(offset, len, cs)
            .map(|p| (p, st.resolve(h.lineage, epoch, p.chunk, cs)))
            .collect())
    }

    /// The byte ranges of a planned read that read as zeros, adjacent ones merged.
    fn zero_ranges(plan: &[(Piece, Resolved)]) -> Vec<std::ops::Range<usize>> {
        let mut zeros: Vec<std::ops::Range<usize>> = Vec::new();
        for (p, r) in plan {
            let start = match *r {
                Resolved::Zero => p.pos,
                Resolved::Data { valid, .. } => {
                    p.pos + valid.saturating_sub(p.at).min(p.len) as usize
                }
            };
            let end = p.pos + p.len as usize;
            if start < end {
                match zeros.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => zeros.push(start..end),
                }
            }
        }
        zeros
    }

    /// The descriptors of the image's pool device, for I/O the caller submits itself
    /// under a [`ReadPin`] or [`WritePin`] (None for pools without a file).
    pub fn pool_fds(&self, h: &ImageHandle) -> Option<crate::device::RawFds> {
        self.inner.pools[h.pool].device.raw_fds()
    }

    /// Pins a volume head for overwrites planned with [`Engine::plan_overwrite`], without
    /// waiting: its lineage gate shared (so no snapshot starts while the write is in
    /// flight) and its pool's reclaim lock shared. None for snapshots, deleted images, or
    /// while a snapshot or a release of freed chunks waits (then write the synchronous way).
    pub fn try_write_pin(&self, h: &ImageHandle) -> Option<WritePin> {
        let gate = self.writer_gate(h).ok()?;
        let pool = self.inner.pools[h.pool].clone();
        let gate_guard = gate.try_read()?;
        let Some(reclaim_guard) = pool.reclaim.try_read() else {
            drop(gate_guard);
            return None;
        };
        // Both shared holds outlive their guards (the pin may move to another thread);
        // `WritePin::drop` gives each back exactly once.
        std::mem::forget(gate_guard);
        std::mem::forget(reclaim_guard);
        Some(WritePin { gate, pool })
    }

    /// Plans a write of `len` bytes at `offset` that overwrites chunks the head already
    /// owns, without doing the device I/O: the device writes (`pos` into the caller's data)
    /// the caller must complete while holding `pin`, then report with
    /// [`Engine::overwritten`]. None when any piece needs more (a fresh chunk,
    /// copy-on-write, a chunk being copied): use [`Engine::write`].
    pub fn plan_overwrite(
        &self,
        pin: &WritePin,
        h: &ImageHandle,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<DeviceIo>>> {
        let pool = &self.inner.pools[h.pool];
        debug_assert!(Arc::ptr_eq(pool, &pin.pool), "pin of another pool");
        let cs = pool.chunk_size;
        let mut ops: Vec<DeviceIo> = Vec::new();
        {
            let st = self.inner.state.lock();
            // In place: needs no metadata, so it works while the metadata is full too.
            Self::check_alive(&st)?;
            Self::check_range(&st, h, offset, len)?;
            let lin = &st.lineages[&h.lineage];
            let e_head = lin.rec.e_head;
            for p in pieces(offset, len, cs) {
                if lin.cow_inflight.contains(&p.chunk) {
                    return Ok(None);
                }
                let phys = match lin.map().get(&(p.chunk, e_head)) {
                    Some(&phys) if phys != ZERO => phys,
                    _ => return Ok(None),
                };
                push_coalesced(&mut ops, p.pos, p.len as usize, pool.offset(phys) + p.at);
            }
        }
        pool.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Some(ops))
    }

    /// Reports that the device writes of a [`Engine::plan_overwrite`] completed: the
    /// next flush syncs the device (see `execute_write`).
    pub fn overwritten(&self, pin: &WritePin) {
        pin.pool
            .dirty
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A private asynchronous read ring on the image's pool device, when it has one.
    pub fn io_ring(&self, h: &ImageHandle) -> Option<crate::device::uring::IoRing> {
        self.inner.pools[h.pool].device.io_ring()
    }

    /// The lineage gate a writer of `h` holds shared; refuses snapshots and deleted images.
    fn writer_gate(&self, h: &ImageHandle) -> Result<std::sync::Arc<parking_lot::RwLock<()>>> {
        if h.read_only() {
            return Err(EngineError::ReadOnly {
                image: h.name.to_string(),
            });
        }
        let st = self.inner.state.lock();
        Self::live_image(&st, h)?;
        Ok(st.lineages[&h.lineage].gate.clone())
    }

    /// Writes `data` at `offset` of a volume head. The new mappings are in the overlay
    /// when this returns; they become durable at the next commit (`flush`).
    pub fn write(&self, h: &ImageHandle, offset: u64, data: &[u8]) -> Result<()> {
        self.probe_meta_space();
        let gate = self.writer_gate(h)?;
        let _writer = gate.read();
        let pending = self.write_quiesced(h, offset, data)?;
        drop(_writer);
        self.maybe_kick_commit(pending);
        Ok(())
    }

    /// The write path for callers that already hold the lineage gate. Returns the
    /// overlay's size (pending changes) for the commit trigger.
    pub(crate) fn write_quiesced(
        &self,
        h: &ImageHandle,
        offset: u64,
        data: &[u8],
    ) -> Result<usize> {
        let pool = self.inner.pools[h.pool].clone();
        let _reclaim = pool.reclaim.read();
        let plans = self.plan_write(&pool, h, offset, data.len() as u64)?;
        let result = self.execute_write(&pool, &plans, data);
        let pending = self.finish_write(&pool, h, &plans, result.is_ok());
        result.map(|()| pending)
    }

    /// Decides in-place vs fresh for every piece and reserves fresh chunks. Waits while
    /// another writer copies-on-write one of the chunks (ascending chunk order, so two
    /// writers never wait on each other in a cycle: nothing is reserved before waiting).
    fn plan_write(
        &self,
        pool: &PoolRt,
        h: &ImageHandle,
        offset: u64,
        len: u64,
    ) -> Result<Vec<WritePlan>> {
        let cs = pool.chunk_size;
        let mut st = self.inner.state.lock();
        loop {
            // Pieces the head owns are written in place even while the metadata is full;
            // a fresh chunk checks for metadata space below.
            Self::check_alive(&st)?;
            Self::check_range(&st, h, offset, len)?;
            let lin = &st.lineages[&h.lineage];
            let busy = pieces(offset, len, cs).any(|p| lin.cow_inflight.contains(&p.chunk));
            if busy {
                self.inner.cow_done.wait(&mut st);
                continue;
            }
            break;
        }
        let e_head = st.lineages[&h.lineage].rec.e_head;
        let mut plans = Vec::new();
        for p in pieces(offset, len, cs) {
            let own = st.lineages[&h.lineage]
                .map()
                .get(&(p.chunk, e_head))
                .copied();
            match own {
                Some(phys) if phys != ZERO => plans.push(WritePlan::InPlace { piece: p, phys }),
                _ => {
                    let source = st.resolve(h.lineage, e_head, p.chunk, cs);
                    // A fresh chunk needs a metadata commit to be kept: none is handed
                    // out while the metadata is full.
                    let phys =
                        match Self::check_meta_space(&st) {
                            Ok(()) => st.allocators[pool.idx].allocate().ok_or_else(|| {
                                EngineError::NoSpace {
                                    pool: pool.name.clone(),
                                    image: h.name.to_string(),
                                }
                            }),
                            Err(e) => Err(e),
                        };
                    let phys = match phys {
                        Ok(phys) => phys,
                        Err(e) => {
                            // Undo this request's reservations.
                            for plan in &plans {
                                if let WritePlan::Fresh { piece, phys, .. } = plan {
                                    st.allocators[pool.idx].release(*phys);
                                    st.reserved.remove(&(pool.idx, *phys));
                                    st.lineages
                                        .get_mut(&h.lineage)
                                        .expect("exists")
                                        .cow_inflight
                                        .remove(&piece.chunk);
                                }
                            }
                            return Err(e);
                        }
                    };
                    st.reserved.insert((pool.idx, phys));
                    st.lineages
                        .get_mut(&h.lineage)
                        .expect("exists")
                        .cow_inflight
                        .insert(p.chunk);
                    plans.push(WritePlan::Fresh {
                        piece: p,
                        phys,
                        source,
                    });
                }
            }
        }
        Ok(plans)
    }

    fn execute_write(&self, pool: &PoolRt, plans: &[WritePlan], data: &[u8]) -> Result<()> {
        let cs = pool.chunk_size;
        pool.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        // Copy-on-write sources are read first, in one batch.
        let mut merged: Vec<Option<AlignedBuf>> = Vec::with_capacity(plans.len());
        {
            let mut reads = Vec::new();
            let mut bufs: Vec<(usize, AlignedBuf, u64, u64)> = Vec::new();
            for (i, plan) in plans.iter().enumerate() {
                merged.push(None);
                if let WritePlan::Fresh { piece, source, .. } = plan {
                    let whole = piece.at == 0 && piece.len == cs;
                    match *source {
                        Resolved::Data { phys, valid } if !whole => {
                            bufs.push((i, AlignedBuf::zeroed(cs as usize), phys, valid));
                        }
                        Resolved::Zero if !whole && !pool.zeroed_free => {
                            merged[i] = Some(AlignedBuf::zeroed(cs as usize));
                        }
                        _ => {}
                    }
                }
            }
            for (_, buf, phys, valid) in bufs.iter_mut() {
                reads.push(IoOp::Read {
                    offset: pool.offset(*phys),
                    buf: &mut buf[..*valid as usize],
                });
            }
            if !reads.is_empty() {
                pool.device.submit(&mut reads)?;
                self.inner
                    .stats
                    .cow_copies
                    .fetch_add(reads.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            drop(reads);
            for (i, buf, _, _) in bufs {
                merged[i] = Some(buf);
            }
        }
        let mut writes: Vec<IoOp<'_>> = Vec::with_capacity(plans.len());
        // Fill merge buffers first (needs &mut), then borrow everything immutably.
        for (plan, m) in plans.iter().zip(merged.iter_mut()) {
            if let (WritePlan::Fresh { piece, .. }, Some(buf)) = (plan, m.as_mut()) {
                let at = piece.at as usize;
                buf[at..at + piece.len as usize]
                    .copy_from_slice(&data[piece.pos..piece.pos + piece.len as usize]);
            }
        }
        for (plan, m) in plans.iter().zip(merged.iter()) {
            match plan {
                WritePlan::InPlace { piece, phys } => writes.push(IoOp::Write {
                    offset: pool.offset(*phys) + piece.at,
                    buf: &data[piece.pos..piece.pos + piece.len as usize],
                }),
                WritePlan::Fresh { piece, phys, .. } => match m {
                    Some(buf) => writes.push(IoOp::Write {
                        offset: pool.offset(*phys),
                        buf,
                    }),
                    None => writes.push(IoOp::Write {
                        offset: pool.offset(*phys) + piece.at,
                        buf: &data[piece.pos..piece.pos + piece.len as usize],
                    }),
                },
            }
        }
        // Coalescing adjacent writes matters for sequential streams: neighbouring fresh
        // chunks are usually neighbours on the device too.
        pool.device.submit(&mut writes)?;
        // Dirty again now that the data is written: a commit that cleared the flag while
        // these writes were in flight may have synced the device before they landed, and
        // the next flush must not skip the device sync for writes acknowledged after it.
        pool.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Records completed fresh chunks in the overlay (or gives them back on failure) and
    /// wakes writers waiting on those chunks.
    fn finish_write(&self, pool: &PoolRt, h: &ImageHandle, plans: &[WritePlan], ok: bool) -> usize {
        if plans.iter().all(|p| matches!(p, WritePlan::InPlace { .. })) {
            // The hot overwrite path: nothing to record, no lock to take.
            return 0;
        }
        let mut any = false;
        let mut st = self.inner.state.lock();
        let e_head = st.lineages[&h.lineage].rec.e_head;
        for plan in plans {
            let WritePlan::Fresh { piece, phys, .. } = plan else {
                continue;
            };
            any = true;
            st.reserved.remove(&(pool.idx, *phys));
            let lin = st.lineages.get_mut(&h.lineage).expect("exists");
            lin.cow_inflight.remove(&piece.chunk);
            if ok {
                lin.map_insert((piece.chunk, e_head), *phys);
                // An older own entry nothing else reads is garbage now: free it with this
                // commit rather than waiting for a GC pass.
                let older = lin
                    .map()
                    .range((piece.chunk, 0)..(piece.chunk, e_head))
                    .next_back()
                    .map(|(&(_, e), &p)| (e, p));
                let mut freed = None;
                if let Some((e_old, p_old)) = older {
                    if !lin.read_in(e_old, e_head) {
                        lin.map_remove(&(piece.chunk, e_old));
                        freed = Some((e_old, p_old));
                    }
                }
                st.pending.put_cf(
                    Cf::Map,
                    keys::map_key(h.lineage, piece.chunk, e_head),
                    keys::map_value(*phys),
                );
                if let Some((e_old, p_old)) = freed {
                    st.pending
                        .delete_cf(Cf::Map, keys::map_key(h.lineage, piece.chunk, e_old));
                    if p_old != ZERO {
                        st.pending_frees.push((pool.idx, p_old));
                    }
                }
            } else {
                // Never referenced: it may hold partial data, so it goes through the
                // same punch-then-release path as any freed chunk.
                st.pending_frees.push((pool.idx, *phys));
            }
        }
        let pending = st.pending.len();
        drop(st);
        if any {
            self.inner.cow_done.notify_all();
        }
        pending
    }

    /// Zeroes a range: whole chunks become holes (freed or hidden by a zero tombstone),
    /// partial chunks get zeros written unless they already read as zeros.
    pub fn write_zeroes(&self, h: &ImageHandle, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(h, offset, len, true)
    }

    /// Discards a range: whole chunks become holes; partially covered chunks are left as
    /// they are (a discard is advisory, as NBD_CMD_TRIM allows).
    pub fn discard(&self, h: &ImageHandle, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(h, offset, len, false)
    }

    fn zero_or_discard(
        &self,
        h: &ImageHandle,
        offset: u64,
        len: u64,
        zero_partial: bool,
    ) -> Result<()> {
        let gate = self.writer_gate(h)?;
        let _writer = gate.read();
        self.zero_quiesced(h, offset, len, zero_partial)
    }

    /// Zeroes `[offset, offset+len)` with the lineage gate already held (used by shrink).
    pub(crate) fn zero_range_quiesced(&self, h: &ImageHandle, offset: u64, len: u64) -> Result<()> {
        self.zero_quiesced(h, offset, len, true)
    }

    fn zero_quiesced(
        &self,
        h: &ImageHandle,
        offset: u64,
        len: u64,
        zero_partial: bool,
    ) -> Result<()> {
        let pool = self.inner.pools[h.pool].clone();
        let cs = pool.chunk_size;
        let mut partial = Vec::new();
        {
            let mut st = self.inner.state.lock();
            Self::check_writable(&st)?;
            Self::check_range(&st, h, offset, len)?;
            for p in pieces(offset, len, cs) {
                if p.at == 0 && p.len == cs {
                    while st.lineages[&h.lineage].cow_inflight.contains(&p.chunk) {
                        self.inner.cow_done.wait(&mut st);
                    }
                    Self::hole_chunk(&mut st, &pool, h.lineage, p.chunk);
                } else if zero_partial {
                    let e_head = st.lineages[&h.lineage].rec.e_head;
                    if st.resolve(h.lineage, e_head, p.chunk, cs) != Resolved::Zero {
                        partial.push(p);
                    }
                }
            }
        }
        for p in partial {
            let zeros = vec![0u8; p.len as usize];
            self.write_quiesced(h, p.chunk * cs + p.at, &zeros)?;
        }
        Ok(())
    }

    /// Makes one whole chunk of the head read as zeros.
    fn hole_chunk(st: &mut State, pool: &PoolRt, lineage: u64, chunk: u64) {
        let cs = pool.chunk_size;
        let lin = st.lineages.get_mut(&lineage).expect("exists");
        let e_head = lin.rec.e_head;
        let own = lin.map().get(&(chunk, e_head)).copied();
        let older = lin
            .map()
            .range((chunk, 0)..(chunk, e_head))
            .next_back()
            .is_some();
        let parent_covers = lin.rec.parent.is_some_and(|p| chunk * cs < p.limit);
        match own {
            Some(ZERO) => {}
            Some(phys) => {
                if older || parent_covers {
                    lin.map_insert((chunk, e_head), ZERO);
                    st.pending.put_cf(
                        Cf::Map,
                        keys::map_key(lineage, chunk, e_head),
                        keys::map_value(ZERO),
                    );
                } else {
                    lin.map_remove(&(chunk, e_head));
                    st.pending
                        .delete_cf(Cf::Map, keys::map_key(lineage, chunk, e_head));
                }
                st.pending_frees.push((pool.idx, phys));
            }
            None => {
                if st.resolve(lineage, e_head, chunk, cs) != Resolved::Zero {
                    let lin = st.lineages.get_mut(&lineage).expect("exists");
                    lin.map_insert((chunk, e_head), ZERO);
                    st.pending.put_cf(
                        Cf::Map,
                        keys::map_key(lineage, chunk, e_head),
                        keys::map_value(ZERO),
                    );
                }
            }
        }
    }

    /// Holes and data of `[offset, offset+len)`, in chunk granularity, adjacent extents
    /// of the same kind merged.
    pub fn block_status(&self, h: &ImageHandle, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let pool = &self.inner.pools[h.pool];
        let cs = pool.chunk_size;
        let st = self.inner.state.lock();
        Self::check_range(&st, h, offset, len)?;
        let epoch = Self::head_epoch(&st, h);
        let mut out: Vec<Extent> = Vec::new();
        for p in pieces(offset, len, cs) {
            let hole = match st.resolve(h.lineage, epoch, p.chunk, cs) {
                Resolved::Zero => true,
                Resolved::Data { valid, .. } => valid <= p.at,
            };
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += p.len,
                _ => out.push(Extent { len: p.len, hole }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_exactly() {
        let v: Vec<_> = pieces(100, 200_000, 65536).collect();
        assert_eq!(v.first().unwrap().at, 100);
        assert_eq!(v.iter().map(|p| p.len).sum::<u64>(), 200_000);
        for w in v.windows(2) {
            assert_eq!(w[0].pos as u64 + w[0].len, w[1].pos as u64);
            assert_eq!(w[1].at, 0);
            assert_eq!(w[0].chunk + 1, w[1].chunk);
        }
        assert_eq!(pieces(0, 0, 4096).count(), 0);
    }
}
