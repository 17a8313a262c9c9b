//! One ublk queue: its thread, its io_uring, and how each request reaches the engine.
//!
//! ```text
//!  queue thread (libublk ring, smol LocalExecutor)        tokio blocking pool
//!  ┌──────────────────────────────────────────┐
//!  │ tag task 0..depth: FETCH ─▶ iod ─────────┼──▶ Serve::execute (engine read/write/
//!  │     ▲                                    │       flush/discard/zeroes, QoS, metrics)
//!  │     └── COMMIT_AND_FETCH ◀── channel ◀───┼──── result, then a write to the eventfd
//!  │ kick task: READ eventfd ─ wakes the ring │
//!  └──────────────────────────────────────────┘
//! ```
//!
//! Invariants:
//! - the queue thread owns its ring and its tags; it never blocks on the engine: every
//!   engine call runs on a blocking-pool thread, so one slow request (a copy-on-write, a
//!   commit for a flush) never holds up the other tags of the queue;
//! - a tag's buffer ([`TagBuf`]) is shared with the one worker serving the tag's current
//!   request, and only touched by one side at a time: the worker between its spawn and
//!   its result, the kernel (through the queue) before the spawn and after the result;
//! - a write, discard or write-zeroes is answered only once the mappings it changed are
//!   committed ([`Engine::commit_pending`]; overwrites of committed chunks need no
//!   commit): the kernel keeps no copy of acknowledged data, unlike csi-nbd-proxy's
//!   journal, so this is what makes every acknowledged write survive a blockd crash;
//! - once the frontend is frozen (blockd is stopping), no result is ever committed: the
//!   request stays in flight until the process exits, and the kernel reissues it to the
//!   next blockd (`UBLK_F_USER_RECOVERY_REISSUE`). So a stop never fails an I/O.

use std::cell::UnsafeCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError};

use crate::device::AlignedBuf;
use crate::engine::{Engine, EngineError, ImageHandle};
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

impl Serve {
    fn frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Waits out the volume's QoS limits for a request of `bytes` payload bytes.
    fn admit(&self, bytes: u64) {
        let q = self.engine.image_qos(&self.handle);
        let limits = Qos {
            max_iops: q.max_iops,
            max_bandwidth_bytes: q.max_bandwidth_bytes,
        };
        if limits.is_unlimited() {
            return;
        }
        let wait = self.limiter.reserve(limits, bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Runs one request on the engine; the ublk result (bytes done, or -errno).
    fn execute(&self, req: Request, buf: &TagBuf) -> i32 {
        let start = Instant::now();
        let (op, bytes, result) = match req.op {
            sys::UBLK_IO_OP_READ => {
                self.admit(req.len as u64);
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
                self.admit(req.len as u64);
                // SAFETY: as for reads.
                let data = unsafe { buf.slice_mut(req.len) };
                let r = self.engine.write(&self.handle, req.offset, data);
                let r = r.and_then(|()| {
                    if req.flags & sys::UBLK_IO_F_FUA != 0 {
                        // FUA: durable before the reply, as the NBD server does it.
                        self.engine.flush()
                    } else {
                        self.engine.commit_pending()
                    }
                });
                (IoOp::Write, req.len, r)
            }
            sys::UBLK_IO_OP_FLUSH => (IoOp::Flush, 0, self.engine.flush()),
            sys::UBLK_IO_OP_DISCARD => {
                self.admit(0);
                (
                    IoOp::Trim,
                    0,
                    self.engine
                        .discard(&self.handle, req.offset, req.len as u64)
                        .and_then(|()| self.engine.commit_pending()),
                )
            }
            sys::UBLK_IO_OP_WRITE_ZEROES => {
                self.admit(0);
                (
                    IoOp::WriteZeroes,
                    0,
                    self.write_zeroes(req)
                        .and_then(|()| self.engine.commit_pending()),
                )
            }
            other => {
                tracing::debug!(image = %self.handle.name(), op = other, "unsupported ublk operation");
                return -libc::EOPNOTSUPP;
            }
        };
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
/// current request (never both at once, see the module docs).
pub(crate) struct TagBuf(UnsafeCell<AlignedBuf>);

// SAFETY: access is handed over, never shared: the queue thread gives the buffer to one
// worker at a time and waits for it to finish before using it again (module docs).
unsafe impl Sync for TagBuf {}
// SAFETY: AlignedBuf is Send; the cell adds no thread affinity.
unsafe impl Send for TagBuf {}

impl TagBuf {
    fn new(len: usize) -> Self {
        TagBuf(UnsafeCell::new(AlignedBuf::zeroed(len)))
    }

    fn addr(&self) -> *const u8 {
        // SAFETY: only the address is taken; the allocation never moves.
        unsafe { (*self.0.get()).as_ptr() }
    }

    /// The first `len` bytes (at most the buffer's length).
    ///
    /// # Safety
    /// The caller must be the buffer's only user for the slice's lifetime.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, len: usize) -> &mut [u8] {
        // SAFETY: exclusive use is the caller's promise.
        let buf = unsafe { &mut *self.0.get() };
        let len = len.min(buf.len());
        &mut buf[..len]
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
async fn tag_task(
    q: &UblkQueue<'_>,
    tag: u16,
    buf_bytes: usize,
    serve: &Arc<Serve>,
    kick: &Arc<Kick>,
) -> Result<(), UblkError> {
    let buf = Arc::new(TagBuf::new(buf_bytes));
    let (tx, rx) = smol::channel::bounded::<i32>(1);
    q.submit_io_prep_cmd(tag, BufDesc::RawAddress(buf.addr()), 0, None)
        .await?;
    loop {
        let iod = q.get_iod(tag);
        let req = Request {
            op: iod.op_flags & 0xff,
            flags: iod.op_flags,
            offset: iod.start_sector << 9,
            len: (iod.nr_sectors as usize) << 9,
        };
        if serve.frozen() {
            forever().await;
        }
        let work = {
            let (serve, buf, tx, kick) = (serve.clone(), buf.clone(), tx.clone(), kick.clone());
            move || {
                let res = serve.execute(req, &buf);
                let _ = tx.try_send(res);
                kick.kick();
            }
        };
        // A runtime that is shutting down drops the work: the request then waits for the
        // process to end and is reissued to the next blockd, like any frozen request.
        drop(serve.runtime.spawn_blocking(work));
        let res = match rx.recv().await {
            Ok(res) => res,
            Err(_) => forever().await,
        };
        if serve.frozen() {
            forever().await;
        }
        q.submit_io_commit_cmd(tag, BufDesc::RawAddress(buf.addr()), res)
            .await?;
    }
}

/// The body of one queue thread (libublk starts one per hardware queue).
pub(crate) fn serve_queue(qid: u16, dev: &UblkDev, serve: Arc<Serve>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
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
    let exe = smol::LocalExecutor::new();
    let mut tags = Vec::with_capacity(depth as usize);
    for tag in 0..depth {
        let (q, serve, kick) = (q.clone(), serve.clone(), kick.clone());
        tags.push(exe.spawn(async move {
            match tag_task(&q, tag, buf_bytes, &serve, &kick).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => {
                    tracing::error!(image = %serve.handle.name(), tag, error = %e, "ublk tag stopped")
                }
            }
        }));
    }
    let waker = {
        let (q, kick) = (q.clone(), kick.clone());
        exe.spawn(async move { kick.serve(&q).await })
    };
    smol::block_on(exe.run(async {
        let run_ops = || while exe.try_tick() {};
        let done = || tags.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::error!(image = %serve.handle.name(), queue = qid, error = %e, "ublk queue failed");
        }
    }));
    drop(waker);
    tracing::debug!(image = %serve.handle.name(), queue = qid, "ublk queue stopped");
}
