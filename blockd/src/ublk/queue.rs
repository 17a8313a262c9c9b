//! One ublk queue: its thread, its io_uring, and how each request reaches the engine.
//!
//! ```text
//!  queue thread (libublk ring, smol LocalExecutor)        tokio blocking pool
//!  ┌──────────────────────────────────────────┐
//!  │ tag task 0..depth: FETCH ─▶ iod ─────────┼──▶ Serve::execute (engine read/write/
//!  │     ▲   │ zero copy: READ/WRITE_FIXED    │       flush/discard/zeroes, metrics)
//!  │     │   ▼ on the pool file, same ring    │
//!  │     └── COMMIT_AND_FETCH ◀── channel ◀───┼──── result, then a write to the eventfd
//!  │ kick task: READ eventfd ─ wakes the ring │
//!  └──────────────────────────────────────────┘
//! ```
//!
//! Two data paths, chosen per device by its flags (a recovered device keeps the flags it
//! was created with):
//! - **copy**: each tag has a buffer of its own that the kernel copies request data into
//!   and out of; every request runs on the blocking pool.
//! - **zero copy** (`UBLK_F_AUTO_BUF_REG`, Linux 6.16+): the kernel registers each
//!   request's own pages in the ring's buffer table at the tag's index, and the queue
//!   thread moves the data between them and the pool file with `READ_FIXED` /
//!   `WRITE_FIXED` on the same ring, never touching it. Reads are planned with
//!   [`Engine::plan_read_ranges`] (holes are read from `/dev/zero` into the request), and
//!   writes that land in chunks the volume already owns with [`Engine::plan_overwrite`].
//!   What needs the engine's full write path (a fresh chunk, copy-on-write, a snapshot,
//!   a pool being reclaimed) or fails on the fast path goes through a *bounce* slot: the
//!   tag's part of a memfd the queue maps, filled from (or copied into) the request by
//!   the same fixed-buffer opcodes, and served by the blocking pool as on the copy path.
//!   Flush, discard and write-zeroes carry no data and always run on the blocking pool.
//!
//! Invariants:
//! - the queue thread owns its ring and its tags; it never blocks on the engine: every
//!   engine call that may wait (a copy-on-write, a commit, QoS) runs on a blocking-pool
//!   thread or as a ring timeout, so one slow request never holds up the other tags;
//! - a tag's buffer ([`TagBuf`]) is shared with the one worker serving the tag's current
//!   request, and only touched by one side at a time: the worker between its spawn and
//!   its result, the kernel (through the queue) before the spawn and after the result;
//! - a zero-copy I/O runs under the engine's read or write pin, which keeps the chunks it
//!   touches owned by the volume until it completes, as the synchronous path does;
//! - a write, discard or write-zeroes is answered only once the mappings it changed are
//!   committed ([`Engine::commit_pending`]; overwrites of committed chunks need no
//!   commit): the kernel keeps no copy of acknowledged data, unlike csi-nbd-proxy's
//!   journal, so this is what makes every acknowledged write survive a blockd crash. A
//!   zero-copy overwrite asks [`Engine::commit_idle`], which never blocks, and hands the
//!   commit to the blocking pool when one is running or pending;
//! - once the frontend is frozen (blockd is stopping), no result is ever committed: the
//!   request stays in flight until the process exits, and the kernel reissues it to the
//!   next blockd (`UBLK_F_USER_RECOVERY_REISSUE`). So a stop never fails an I/O.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError};

use crate::device::{AlignedBuf, RawFds, IO_ALIGN};
use crate::engine::{DeviceIo, Engine, EngineError, ImageHandle};
use crate::metrics::{ImageIoMetrics, IoOp};
use crate::qos::{Limiter, Qos};

/// What every queue of one device shares with the workers serving it.
pub(crate) struct Serve {
    pub engine: Engine,
    pub handle: ImageHandle,
    pub io: ImageIoMetrics,
    pub limiter: Limiter,
    /// Set when blockd stops: results are no longer committed (see the module docs).
    pub frozen: Arc<AtomicBool>,
    pub runtime: tokio::runtime::Handle,
}

/// One request, as read from the queue's descriptor.
#[derive(Debug, Clone, Copy)]
struct Request {
    op: u32,
    flags: u32,
    offset: u64,
    len: usize,
}

impl Request {
    /// The payload bytes the volume's QoS counts, None for what it does not limit.
    fn qos_bytes(&self) -> Option<u64> {
        match self.op {
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => Some(self.len as u64),
            sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => Some(0),
            _ => None,
        }
    }
}

impl Serve {
    fn frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// How long a request of `bytes` payload bytes must wait for the volume's QoS
    /// limits (zero when unlimited); reserves its share.
    fn qos_wait(&self, bytes: u64) -> Duration {
        let q = self.engine.image_qos(&self.handle);
        let limits = Qos {
            max_iops: q.max_iops,
            max_bandwidth_bytes: q.max_bandwidth_bytes,
        };
        if limits.is_unlimited() {
            return Duration::ZERO;
        }
        self.limiter.reserve(limits, bytes, Instant::now())
    }

    /// Waits out the volume's QoS limits for `req`, on a blocking thread.
    fn admit(&self, req: Request) {
        if let Some(bytes) = req.qos_bytes() {
            let wait = self.qos_wait(bytes);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
    }

    /// Runs one (admitted) request on the engine; the ublk result (bytes done, or
    /// -errno).
    fn execute(&self, req: Request, buf: &TagBuf) -> i32 {
        let start = Instant::now();
        let (op, bytes, result) = match req.op {
            sys::UBLK_IO_OP_READ => {
                // SAFETY: the tag task spawned this worker and waits for its result before
                // the kernel or anything else touches the buffer again (module docs).
                let data = unsafe { buf.slice_mut(req.len) };
                (
                    IoOp::Read,
                    req.len,
                    self.engine.read(&self.handle, req.offset, data),
                )
            }
            sys::UBLK_IO_OP_WRITE => {
                // SAFETY: as for reads.
                let data = unsafe { buf.slice_mut(req.len) };
                let r = self.engine.write(&self.handle, req.offset, data);
                (IoOp::Write, req.len, r.and_then(|()| self.settle(req)))
            }
            sys::UBLK_IO_OP_FLUSH => (IoOp::Flush, 0, self.engine.flush()),
            sys::UBLK_IO_OP_DISCARD => (
                IoOp::Trim,
                0,
                self.engine
                    .discard(&self.handle, req.offset, req.len as u64)
                    .and_then(|()| self.engine.commit_pending()),
            ),
            sys::UBLK_IO_OP_WRITE_ZEROES => (
                IoOp::WriteZeroes,
                0,
                self.write_zeroes(req)
                    .and_then(|()| self.engine.commit_pending()),
            ),
            other => {
                tracing::debug!(image = %self.handle.name(), op = other, "unsupported ublk operation");
                return -libc::EOPNOTSUPP;
            }
        };
        self.finish(op, req, bytes, start, result)
    }

    /// What a written request still needs before its answer: with FUA, a flush (as the
    /// NBD server does it); otherwise the commit of any mapping it changed.
    fn settle(&self, req: Request) -> Result<(), EngineError> {
        if req.flags & sys::UBLK_IO_F_FUA != 0 {
            self.engine.flush()
        } else {
            self.engine.commit_pending()
        }
    }

    /// Records a request's outcome; its ublk result.
    fn finish(
        &self,
        op: IoOp,
        req: Request,
        bytes: usize,
        start: Instant,
        result: Result<(), EngineError>,
    ) -> i32 {
        match result {
            Ok(()) => {
                self.io
                    .record(op, bytes.max(req.len) as u64, start.elapsed());
                bytes as i32
            }
            Err(e) => {
                self.io.record_error(op);
                tracing::debug!(image = %self.handle.name(), error = %e, "ublk request failed");
                -e.errno()
            }
        }
    }

    /// WRITE_ZEROES: holes where allowed; with NOUNMAP, real zeros that stay allocated.
    fn write_zeroes(&self, req: Request) -> Result<(), EngineError> {
        if req.flags & sys::UBLK_IO_F_NOUNMAP == 0 {
            return self
                .engine
                .write_zeroes(&self.handle, req.offset, req.len as u64);
        }
        const STEP: u64 = 1 << 20;
        let len = req.len as u64;
        let zeros = vec![0u8; STEP.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = STEP.min(len - done);
            self.engine
                .write(&self.handle, req.offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

/// A tag's I/O buffer, shared between the queue thread and the worker of the tag's
/// current request (never both at once, see the module docs): its own allocation on the
/// copy path, its slot of the queue's [`Bounce`] on the zero-copy path.
pub(crate) struct TagBuf {
    ptr: *mut u8,
    len: usize,
    _owner: BufOwner,
}

enum BufOwner {
    Heap(#[allow(dead_code)] AlignedBuf),
    Bounce(#[allow(dead_code)] Arc<Bounce>),
}

// SAFETY: access is handed over, never shared: the queue thread gives the buffer to one
// worker at a time and waits for it to finish before using it again (module docs); the
// memory is owned by `_owner`, which is Send and Sync.
unsafe impl Sync for TagBuf {}
// SAFETY: as above.
unsafe impl Send for TagBuf {}

impl TagBuf {
    fn heap(len: usize) -> Self {
        let mut buf = AlignedBuf::zeroed(len);
        TagBuf {
            ptr: buf.as_mut_ptr(),
            len,
            _owner: BufOwner::Heap(buf),
        }
    }

    fn bounce(bounce: &Arc<Bounce>, tag: u16) -> Self {
        TagBuf {
            // SAFETY: the slot lies inside the mapping (`Bounce::new` sizes it for every
            // tag), which lives as long as the Arc this buffer keeps.
            ptr: unsafe { bounce.map.add(bounce.slot_offset(tag) as usize) },
            len: bounce.slot,
            _owner: BufOwner::Bounce(bounce.clone()),
        }
    }

    fn addr(&self) -> *const u8 {
        self.ptr
    }

    /// The first `len` bytes (at most the buffer's length).
    ///
    /// # Safety
    /// The caller must be the buffer's only user for the slice's lifetime.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, len: usize) -> &mut [u8] {
        // SAFETY: the memory is live for `self.len` bytes (owned by `_owner`); exclusive
        // use is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.len)) }
    }
}

/// The bounce memory of a zero-copy queue: a memfd with one slot per tag, mapped. The
/// queue thread moves a request's data between its registered buffer and the slot
/// through the file (fixed-buffer opcodes need a file), the engine through the mapping.
/// Untouched slots cost nothing (shared memory is allocated on first use).
pub(crate) struct Bounce {
    fd: OwnedFd,
    map: *mut u8,
    slot: usize,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; which part each thread may touch is the
// tag protocol's business (see `TagBuf`).
unsafe impl Send for Bounce {}
// SAFETY: as above.
unsafe impl Sync for Bounce {}

impl Bounce {
    fn new(tags: u16, slot: usize) -> std::io::Result<Bounce> {
        let len = slot * tags as usize;
        // SAFETY: plain syscall with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"blockd-ublk-bounce".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone()?).set_len(len as u64)?;
        // SAFETY: maps `len` bytes of our own memfd; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Bounce {
            fd,
            map: map.cast(),
            slot,
            len,
        })
    }

    fn slot_offset(&self, tag: u16) -> u64 {
        tag as u64 * self.slot as u64
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no TagBuf outlives this (each keeps
        // the Arc).
        unsafe { libc::munmap(self.map.cast(), self.len) };
    }
}

/// What a zero-copy queue needs beside its ring.
pub(crate) struct ZeroCopy {
    /// The pool file's descriptors (kept open by the engine, which `Serve` holds).
    fds: RawFds,
    /// Where holes read from.
    zero: File,
    bounce: Arc<Bounce>,
}

impl ZeroCopy {
    fn new(engine: &Engine, handle: &ImageHandle, tags: u16, slot: usize) -> std::io::Result<Self> {
        let fds = engine.pool_fds(handle).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the pool has no file to do zero-copy I/O on",
            )
        })?;
        Ok(ZeroCopy {
            fds,
            zero: File::open("/dev/zero")?,
            bounce: Arc::new(Bounce::new(tags, slot)?),
        })
    }

    /// The descriptor an I/O of `len` bytes at pool `offset`, at `pos` in the request,
    /// goes through: O_DIRECT when everything is aligned for it.
    fn fd_for(&self, offset: u64, pos: usize, len: usize) -> i32 {
        let align = IO_ALIGN;
        match self.fds.direct {
            Some(fd)
                if offset.is_multiple_of(align as u64)
                    && pos.is_multiple_of(align)
                    && len.is_multiple_of(align) =>
            {
                fd
            }
            _ => self.fds.buffered,
        }
    }
}

/// Which way a fixed-buffer transfer moves the request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// From a file into the request (serving a read).
    IntoRequest,
    /// From the request into a file (serving a write).
    OutOfRequest,
}

/// Moves data between tag `tag`'s registered request buffer and files, all transfers at
/// once on the queue's ring: each is (descriptor, position in the request, length, file
/// offset). True when every one moved all its bytes.
async fn fixed_io(
    q: &UblkQueue<'_>,
    tag: u16,
    dir: Dir,
    transfers: impl IntoIterator<Item = (i32, usize, usize, u64)>,
) -> bool {
    // Pushed now, awaited below: the ring submits them together.
    let pending: Vec<_> = transfers
        .into_iter()
        .map(|(fd, pos, len, offset)| {
            // A registered kernel buffer is addressed from 0: `pos` is the offset in it.
            let sqe = match dir {
                Dir::IntoRequest => {
                    opcode::ReadFixed::new(types::Fd(fd), pos as *mut u8, len as u32, tag)
                        .offset(offset)
                        .build()
                }
                Dir::OutOfRequest => {
                    opcode::WriteFixed::new(types::Fd(fd), pos as *const u8, len as u32, tag)
                        .offset(offset)
                        .build()
                }
            };
            (q.ublk_submit_sqe(sqe), len)
        })
        .collect();
    let mut all = true;
    for (done, len) in pending {
        let res = done.await;
        if res != len as i32 {
            tracing::debug!(tag, result = res, len, "ublk zero-copy transfer fell short");
            all = false;
        }
    }
    all
}

/// One tag of a queue, with what serving it needs.
struct Tag<'a> {
    q: &'a UblkQueue<'a>,
    tag: u16,
    serve: Arc<Serve>,
    kick: Arc<Kick>,
    buf: Arc<TagBuf>,
    zc: Option<Rc<ZeroCopy>>,
    tx: smol::channel::Sender<i32>,
    rx: smol::channel::Receiver<i32>,
}

impl Tag<'_> {
    /// How the kernel hands this tag's requests over: its own buffer, or auto
    /// registration at the tag's index of the ring's buffer table.
    fn buf_desc(&self) -> BufDesc<'static> {
        match self.zc {
            Some(_) => BufDesc::AutoReg(sys::ublk_auto_buf_reg {
                index: self.tag,
                flags: 0,
                reserved0: 0,
                reserved1: 0,
            }),
            None => BufDesc::RawAddress(self.buf.addr()),
        }
    }

    /// Runs `work` on the blocking pool and waits for its result without blocking the
    /// queue thread.
    async fn offload(&self, work: impl FnOnce(&Serve, &TagBuf) -> i32 + Send + 'static) -> i32 {
        let (serve, buf, tx, kick) = (
            self.serve.clone(),
            self.buf.clone(),
            self.tx.clone(),
            self.kick.clone(),
        );
        // A runtime that is shutting down drops the work: the request then waits for the
        // process to end and is reissued to the next blockd, like any frozen request.
        drop(self.serve.runtime.spawn_blocking(move || {
            let res = work(&serve, &buf);
            let _ = tx.try_send(res);
            kick.kick();
        }));
        match self.rx.recv().await {
            Ok(res) => res,
            Err(_) => forever().await,
        }
    }

    /// Waits out the volume's QoS limits on the ring (a timeout), not on a thread.
    async fn admit(&self, req: Request) {
        let Some(bytes) = req.qos_bytes() else {
            return;
        };
        let wait = self.serve.qos_wait(bytes);
        if wait.is_zero() {
            return;
        }
        // Lives until the timeout completes: the kernel reads it when it is submitted.
        let ts = types::Timespec::from(wait);
        let _ = self
            .q
            .ublk_submit_sqe(opcode::Timeout::new(&ts).build())
            .await;
    }

    /// Serves one request; its ublk result.
    async fn handle(&self, req: Request) -> i32 {
        let Some(zc) = &self.zc else {
            return self
                .offload(move |serve, buf| {
                    serve.admit(req);
                    serve.execute(req, buf)
                })
                .await;
        };
        self.admit(req).await;
        match req.op {
            sys::UBLK_IO_OP_READ => {
                if let Some(res) = self.read_in_place(zc, req).await {
                    return res;
                }
                let res = self.offload(move |s, b| s.execute(req, b)).await;
                if res != req.len as i32 {
                    return res;
                }
                if self.bounce(zc, Dir::IntoRequest, req.len).await {
                    res
                } else {
                    -libc::EIO
                }
            }
            sys::UBLK_IO_OP_WRITE => {
                if let Some(res) = self.write_in_place(zc, req).await {
                    return res;
                }
                if !self.bounce(zc, Dir::OutOfRequest, req.len).await {
                    return -libc::EIO;
                }
                self.offload(move |s, b| s.execute(req, b)).await
            }
            // No data: nothing to gain on the ring, and they may wait for a commit.
            _ => self.offload(move |s, b| s.execute(req, b)).await,
        }
    }

    /// Copies `len` bytes between the request and this tag's bounce slot; true when all
    /// of them moved.
    async fn bounce(&self, zc: &ZeroCopy, dir: Dir, len: usize) -> bool {
        let slot = zc.bounce.slot_offset(self.tag);
        let fd = zc.bounce.fd.as_raw_fd();
        fixed_io(self.q, self.tag, dir, [(fd, 0, len, slot)]).await
    }

    /// A read straight from the pool file into the request; None when it must take the
    /// bounce path (the pool is being reclaimed, or a transfer fell short).
    async fn read_in_place(&self, zc: &ZeroCopy, req: Request) -> Option<i32> {
        let start = Instant::now();
        let serve = &self.serve;
        let pin = serve.engine.try_read_pin(&serve.handle)?;
        let (reads, zeros) =
            match serve
                .engine
                .plan_read_ranges(&pin, &serve.handle, req.offset, req.len)
            {
                Ok(plan) => plan,
                Err(e) => return Some(serve.finish(IoOp::Read, req, 0, start, Err(e))),
            };
        let zero_fd = zc.zero.as_raw_fd();
        let transfers = reads
            .iter()
            .map(|&DeviceIo { pos, len, offset }| (zc.fd_for(offset, pos, len), pos, len, offset))
            .chain(zeros.iter().map(|r| (zero_fd, r.start, r.len(), 0)));
        let done = fixed_io(self.q, self.tag, Dir::IntoRequest, transfers).await;
        drop(pin);
        done.then(|| serve.finish(IoOp::Read, req, req.len, start, Ok(())))
    }

    /// A write straight from the request into chunks the volume owns; None when it needs
    /// the engine's write path (see the module docs) or a transfer fell short.
    async fn write_in_place(&self, zc: &ZeroCopy, req: Request) -> Option<i32> {
        let start = Instant::now();
        let serve = &self.serve;
        let pin = serve.engine.try_write_pin(&serve.handle)?;
        let writes =
            match serve
                .engine
                .plan_overwrite(&pin, &serve.handle, req.offset, req.len as u64)
            {
                Ok(Some(writes)) => writes,
                Ok(None) => return None,
                Err(e) => return Some(serve.finish(IoOp::Write, req, 0, start, Err(e))),
            };
        let transfers = writes
            .iter()
            .map(|&DeviceIo { pos, len, offset }| (zc.fd_for(offset, pos, len), pos, len, offset));
        let done = fixed_io(self.q, self.tag, Dir::OutOfRequest, transfers).await;
        serve.engine.overwritten(&pin);
        drop(pin);
        if !done {
            return None;
        }
        // The chunk's mapping may still wait for its commit (a write a moment ago made
        // it): then the answer waits for that commit too.
        if req.flags & sys::UBLK_IO_F_FUA != 0 || !serve.engine.commit_idle() {
            let settled = self
                .offload(move |s, _| match s.settle(req) {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::debug!(image = %s.handle.name(), error = %e, "ublk write's commit failed");
                        -e.errno()
                    }
                })
                .await;
            if settled < 0 {
                serve.io.record_error(IoOp::Write);
                return Some(settled);
            }
        }
        Some(serve.finish(IoOp::Write, req, req.len, start, Ok(())))
    }
}

/// The eventfd workers write to wake the queue thread out of its ring wait.
pub(crate) struct Kick {
    fd: OwnedFd,
    /// Where the pending eventfd read lands. Leaked on purpose (8 bytes per queue): a
    /// read still in the ring when the queue ends may complete after everything else of
    /// the queue is gone, and must not land in freed memory.
    slot: *mut u64,
}

// SAFETY: workers only write(2) to the eventfd; `slot` is written by the kernel for the
// queue thread's read and never read by anyone else.
unsafe impl Sync for Kick {}
// SAFETY: as above.
unsafe impl Send for Kick {}

impl Kick {
    fn new() -> std::io::Result<Kick> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Kick {
            // SAFETY: a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            slot: Box::into_raw(Box::new(0u64)),
        })
    }

    /// Wakes the queue thread.
    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd; a full counter
        // (EAGAIN) means a wake-up is pending anyway.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Keeps one read of the eventfd in the queue's ring, so a worker's kick ends the
    /// ring's wait and the executor polls the woken tag tasks.
    async fn serve(&self, q: &UblkQueue<'_>) {
        loop {
            let sqe = io_uring::opcode::Read::new(
                io_uring::types::Fd(self.fd.as_raw_fd()),
                self.slot.cast(),
                std::mem::size_of::<u64>() as u32,
            )
            .build();
            let res = q.ublk_submit_sqe(sqe).await;
            if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                tracing::warn!(error = res, "ublk queue wake-up read failed");
                return;
            }
            if q.is_stopping() {
                return;
            }
        }
    }
}

/// Never resolves: a request that must not complete (the frontend is frozen).
async fn forever() -> ! {
    std::future::pending::<()>().await;
    unreachable!("pending never resolves")
}

/// Serves one tag of a queue until the queue goes down.
async fn tag_task(tag: &Tag<'_>) -> Result<(), UblkError> {
    tag.q
        .submit_io_prep_cmd(tag.tag, tag.buf_desc(), 0, None)
        .await?;
    loop {
        let iod = tag.q.get_iod(tag.tag);
        let req = Request {
            op: iod.op_flags & 0xff,
            flags: iod.op_flags,
            offset: iod.start_sector << 9,
            len: (iod.nr_sectors as usize) << 9,
        };
        if tag.serve.frozen() {
            forever().await;
        }
        let res = tag.handle(req).await;
        if tag.serve.frozen() {
            forever().await;
        }
        tag.q
            .submit_io_commit_cmd(tag.tag, tag.buf_desc(), res)
            .await?;
    }
}

/// Whether a device serves its requests with zero copy (see the module docs).
pub(crate) fn zero_copy(dev: &UblkDev) -> bool {
    dev.dev_info.flags & sys::UBLK_F_AUTO_BUF_REG as u64 != 0
}

/// The body of one queue thread (libublk starts one per hardware queue).
pub(crate) fn serve_queue(qid: u16, dev: &UblkDev, serve: Arc<Serve>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(image = %serve.handle.name(), queue = qid, error = %e, "cannot set up a ublk queue");
            return;
        }
    };
    // The tags bring their own buffers (`TagBuf`, shared with the workers), which
    // libublk does not track: tell it this queue's buffers are in place, or the start of
    // the device waits for them for ever.
    dev.notify_buffer_registration_complete(false);
    let kick = match Kick::new() {
        Ok(k) => Arc::new(k),
        Err(e) => {
            tracing::error!(image = %serve.handle.name(), queue = qid, error = %e, "cannot create a ublk queue eventfd");
            return;
        }
    };
    let depth = dev.dev_info.queue_depth;
    let buf_bytes = dev.dev_info.max_io_buf_bytes as usize;
    let zc = if zero_copy(dev) {
        match ZeroCopy::new(&serve.engine, &serve.handle, depth, buf_bytes) {
            Ok(zc) => Some(Rc::new(zc)),
            Err(e) => {
                // The device was created for zero copy: it cannot be served otherwise.
                tracing::error!(image = %serve.handle.name(), queue = qid, error = %e, "cannot set up zero copy for a ublk queue");
                return;
            }
        }
    } else {
        None
    };
    let tags: Vec<Tag<'_>> = (0..depth)
        .map(|tag| {
            let (tx, rx) = smol::channel::bounded::<i32>(1);
            let buf = match &zc {
                Some(zc) => TagBuf::bounce(&zc.bounce, tag),
                None => TagBuf::heap(buf_bytes),
            };
            Tag {
                q: &q,
                tag,
                serve: serve.clone(),
                kick: kick.clone(),
                buf: Arc::new(buf),
                zc: zc.clone(),
                tx,
                rx,
            }
        })
        .collect();
    let exe = smol::LocalExecutor::new();
    let tasks: Vec<_> = tags
        .iter()
        .map(|tag| {
            exe.spawn(async move {
                match tag_task(tag).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => {
                        tracing::error!(image = %tag.serve.handle.name(), tag = tag.tag, error = %e, "ublk tag stopped")
                    }
                }
            })
        })
        .collect();
    let waker = exe.spawn(kick.serve(&q));
    smol::block_on(exe.run(async {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::error!(image = %serve.handle.name(), queue = qid, error = %e, "ublk queue failed");
        }
    }));
    drop(waker);
    tracing::debug!(image = %serve.handle.name(), queue = qid, "ublk queue stopped");
}
