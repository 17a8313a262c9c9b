//! The io_uring engine (production).
//!
//! ```text
//!  submit(ops) ─► take a ring from the pool ─► waves of non-conflicting ops
//!                                               │  push one SQE per op (≤ RING_ENTRIES in flight)
//!                                               │  submit_and_wait, reap CQEs by user_data
//!                                               │  short transfer ─► resubmit the remainder
//!                                               ▼
//!                                 all CQEs reaped ─► ring back to the pool ─► return
//! ```
//!
//! Besides the pooled rings behind [`BlockDevice::submit`], a caller may own an [`IoRing`]:
//! a private ring whose reads and writes complete asynchronously, signalled on an eventfd
//! (the NBD server's data path; [`AsyncRing`] registers it with tokio). Such a ring owns
//! each op's buffer from push to completion and hands it back with the result, so its API
//! has nothing unsafe for the caller to promise.
//!
//! Rings: one per I/O thread, taken from a pool for the duration of a call (a thread that
//! finds the pool empty sets up a new ring), so concurrent callers never share a
//! submission queue. `SINGLE_ISSUER`/`DEFER_TASKRUN` are not used because a pooled ring
//! moves between threads. Both descriptors of the [`Target`] are registered as fixed
//! files on every ring: slot [`BUFFERED_SLOT`] and slot [`DIRECT_SLOT`]. Buffers are not
//! registered: they belong to the caller and change with every call.
//!
//! Invariants:
//! - no call returns, and no ring goes back to the pool, while the kernel may still use
//!   one of the caller's buffers: every pushed SQE has had its CQE reaped. If that cannot
//!   be guaranteed (a broken ring, a panic mid-flight) the process aborts rather than let
//!   the kernel write into freed memory;
//! - ops of one batch that overlap an earlier op of the batch (and either writes) run in a
//!   later wave, after it completed, so a batch behaves as if executed in order — as with
//!   the sync engine — while independent ops are in flight together;
//! - `flush` is an `IORING_OP_FSYNC` (DATASYNC) pushed only after every write of earlier
//!   `submit` calls has completed (`submit` is synchronous), since io_uring does not order
//!   an fsync against writes still in flight.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use io_uring::{opcode, register::Probe, types, IoUring};
use parking_lot::{Condvar, Mutex};

use super::file::Target;
use super::{check_range, AlignedBuf, BlockDevice, DeviceError, IoEngine, IoOp, Result, IO_ALIGN};

/// Submission queue size of each ring, and the most SQEs one call keeps in flight.
const RING_ENTRIES: u32 = 128;
/// Largest transfer of one SQE (its length is a u32); a multiple of IO_ALIGN so that the
/// pieces of an aligned op stay aligned.
const MAX_SQE_LEN: usize = 1 << 30;
/// Idle rings kept in the pool; more are closed when returned.
const MAX_IDLE_RINGS: usize = 64;
/// Fixed-file slot of the buffered descriptor.
const BUFFERED_SLOT: u32 = 0;
/// Fixed-file slot of the O_DIRECT descriptor (the buffered one again when there is none).
const DIRECT_SLOT: u32 = 1;
/// user_data of the fsync SQE (data ops use their index in the batch).
const FSYNC_TAG: u64 = u64::MAX;

const _: () = assert!(MAX_SQE_LEN.is_multiple_of(IO_ALIGN) && MAX_SQE_LEN <= u32::MAX as usize);

/// A [`BlockDevice`] served by io_uring.
pub struct UringDevice {
    target: Target,
    pool: RingPool,
}

impl fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringDevice")
            .field("target", &self.target)
            .field("rings", &self.pool.created.load(Ordering::Relaxed))
            .finish()
    }
}

impl UringDevice {
    /// Sets up the first ring (checking that the kernel supports the opcodes used) and
    /// registers the target's descriptors. Fails with [`DeviceError::Open`] when io_uring
    /// is unavailable (old kernel, seccomp, memlock limit), so that callers can fall back
    /// to the sync engine.
    pub fn new(target: Target) -> Result<UringDevice> {
        let buffered = target.buffered_file().as_raw_fd();
        let direct = target
            .direct_file()
            .map_or(buffered, |file| file.as_raw_fd());
        let pool = RingPool {
            idle: Mutex::new(Vec::new()),
            returned: Condvar::new(),
            created: AtomicUsize::new(0),
            fds: [buffered, direct],
        };
        let open_err = |source: io::Error| DeviceError::Open {
            path: target.path().display().to_string(),
            source,
        };
        let ring = pool.setup_ring().map_err(open_err)?;
        probe_opcodes(&ring).map_err(open_err)?;
        pool.created.store(1, Ordering::Relaxed);
        pool.idle.lock().push(ring);
        tracing::debug!(path = %target.path().display(), direct = target.has_direct(), "io_uring engine set up");
        Ok(UringDevice { target, pool })
    }

    /// The file or block device behind this device.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A private [`IoRing`] on this device's files.
    pub fn io_ring(&self) -> io::Result<IoRing> {
        IoRing::new(self.pool.fds, self.target.has_direct())
    }

    /// The fixed-file slot an I/O goes through.
    fn slot_for(&self, offset: u64, addr: *const u8, len: usize) -> u32 {
        if self.target.direct_eligible(offset, addr, len) {
            DIRECT_SLOT
        } else {
            BUFFERED_SLOT
        }
    }

    /// Runs one wave of ops that do not conflict with each other, resubmitting short
    /// transfers, until every pushed SQE has completed.
    fn run_wave(
        &self,
        ring: &mut IoUring,
        transfers: &mut [Transfer],
        wave: &[usize],
    ) -> Result<()> {
        let mut queue: VecDeque<usize> = wave.iter().copied().collect();
        let mut in_flight = InFlight(0);
        let mut first_err: Option<DeviceError> = None;
        loop {
            if first_err.is_none() {
                let mut sq = ring.submission();
                while in_flight.0 < RING_ENTRIES as usize {
                    let Some(&index) = queue.front() else { break };
                    let entry = self.sqe_for(&transfers[index], index);
                    // SAFETY: the SQE points into a buffer borrowed by `submit` for the
                    // whole call, at `done..done + len` within its bounds; `in_flight`
                    // counts it until its CQE is reaped, and this function does not return
                    // (and aborts on unwind) before every counted SQE has completed.
                    if unsafe { sq.push(&entry) }.is_err() {
                        break;
                    }
                    queue.pop_front();
                    in_flight.0 += 1;
                }
            }
            if in_flight.0 == 0 {
                // Nothing pushed and nothing pending: the queue is empty or we stopped on
                // an error.
                break;
            }
            if let Err(err) = enter(ring) {
                abort_in_flight(&err, in_flight.0);
            }
            for cqe in ring.completion() {
                in_flight.0 -= 1;
                // Data SQEs carry their index in `transfers` (see `sqe_for`).
                let index = cqe.user_data() as usize;
                let Some(transfer) = transfers.get_mut(index) else {
                    continue;
                };
                match usize::try_from(cqe.result()) {
                    Err(_) => {
                        let errno = -cqe.result();
                        if errno == libc::EINTR || errno == libc::EAGAIN {
                            queue.push_back(index);
                        } else {
                            first_err.get_or_insert(DeviceError::Io {
                                op: transfer.op_name(),
                                source: io::Error::from_raw_os_error(errno),
                            });
                        }
                    }
                    Ok(0) => {
                        let kind = if transfer.write {
                            io::ErrorKind::WriteZero
                        } else {
                            io::ErrorKind::UnexpectedEof
                        };
                        first_err.get_or_insert(DeviceError::Io {
                            op: transfer.op_name(),
                            source: kind.into(),
                        });
                    }
                    Ok(n) => {
                        transfer.done += n;
                        if transfer.done < transfer.len {
                            queue.push_back(index);
                        }
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn sqe_for(&self, transfer: &Transfer, index: usize) -> io_uring::squeue::Entry {
        let offset = transfer.offset + transfer.done as u64;
        // In bounds of the buffer: done < len.
        let addr = transfer.addr.wrapping_add(transfer.done);
        let len = (transfer.len - transfer.done).min(MAX_SQE_LEN);
        let fd = types::Fixed(self.slot_for(offset, addr, len));
        let entry = if transfer.write {
            opcode::Write::new(fd, addr, len as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(fd, addr, len as u32)
                .offset(offset)
                .build()
        };
        entry.user_data(index as u64)
    }
}

impl BlockDevice for UringDevice {
    fn size(&self) -> u64 {
        self.target.size()
    }

    fn engine(&self) -> IoEngine {
        IoEngine::Uring
    }

    fn punch_zeroes(&self) -> bool {
        self.target.punch_zeroes()
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        for op in ops.iter() {
            check_range(op.offset(), op.len() as u64, self.size())?;
        }
        let mut transfers: Vec<Transfer> = ops
            .iter_mut()
            .filter(|op| !op.is_empty())
            .map(|op| match op {
                IoOp::Read { offset, buf } => Transfer {
                    offset: *offset,
                    addr: buf.as_mut_ptr(),
                    len: buf.len(),
                    done: 0,
                    write: false,
                },
                IoOp::Write { offset, buf } => Transfer {
                    offset: *offset,
                    // Only read by the kernel for a write.
                    addr: buf.as_ptr().cast_mut(),
                    len: buf.len(),
                    done: 0,
                    write: true,
                },
            })
            .collect();
        if transfers.is_empty() {
            return Ok(());
        }
        let mut ring = self.pool.take()?;
        let mut wave: Vec<usize> = Vec::new();
        for index in 0..transfers.len() {
            if wave
                .iter()
                .any(|&earlier| transfers[earlier].conflicts(&transfers[index]))
            {
                self.run_wave(ring.get(), &mut transfers, &wave)?;
                wave.clear();
            }
            wave.push(index);
        }
        self.run_wave(ring.get(), &mut transfers, &wave)
    }

    fn flush(&self) -> Result<()> {
        let mut pooled = self.pool.take()?;
        let ring = pooled.get();
        let entry = opcode::Fsync::new(types::Fixed(BUFFERED_SLOT))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(FSYNC_TAG);
        let flush_err = |source: io::Error| DeviceError::Io {
            op: "flush",
            source,
        };
        loop {
            // SAFETY: an fsync SQE references no memory; the ring is exclusively ours and
            // its submission queue is empty (every call drains it before returning).
            unsafe { ring.submission().push(&entry) }
                .map_err(|_| flush_err(io::Error::other("submission queue unexpectedly full")))?;
            if let Err(err) = enter(ring) {
                // No buffer is involved, so the broken ring can simply be closed.
                pooled.discard();
                return Err(flush_err(err));
            }
            let result = ring
                .completion()
                .find(|cqe| cqe.user_data() == FSYNC_TAG)
                .map(|cqe| cqe.result());
            match result {
                Some(0) => return Ok(()),
                Some(res) if -res == libc::EINTR || -res == libc::EAGAIN => continue,
                Some(res) => return Err(flush_err(io::Error::from_raw_os_error(-res))),
                // `enter` waited for a completion and only this SQE was in flight.
                None => {
                    pooled.discard();
                    return Err(flush_err(io::Error::other("fsync completion missing")));
                }
            }
        }
    }

    fn raw_fds(&self) -> Option<super::RawFds> {
        Some(self.target.raw_fds())
    }

    fn io_ring(&self) -> Option<IoRing> {
        match UringDevice::io_ring(self) {
            Ok(ring) => Some(ring),
            Err(err) => {
                tracing::debug!(error = %err, "Cannot set up a read ring; reads stay synchronous");
                None
            }
        }
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        // Deallocation is rare and not latency-critical: the synchronous syscall is enough.
        self.target.punch(offset, len)
    }
}

/// Whether a ring op reads into its buffer or writes from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingDir {
    Read,
    Write,
}

/// One device transfer of a ring op: `len` bytes at device `offset`, to or from the op's
/// buffer at `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSpan {
    pub pos: usize,
    pub len: usize,
    pub offset: u64,
}

/// A finished ring op: its tag, its result (the first error among its spans), and its
/// buffer, handed back.
#[derive(Debug)]
pub struct RingDone {
    pub tag: u64,
    pub result: io::Result<()>,
    pub buf: AlignedBuf,
}

/// A private ring for reads and writes that complete asynchronously: the NBD server pushes
/// them and learns about completions through an eventfd it polls on its runtime (see
/// [`AsyncRing`]), instead of a thread blocking in [`BlockDevice::submit`]. Ops of one
/// ring are not ordered against each other (overlapping requests in flight are the
/// client's business, as with any disk).
///
/// Owned by one task; the same fixed files as the pool's rings (which keep the files open
/// in the kernel for as long as the ring lives).
///
/// ```text
///  push(tag, dir, buf, spans) ─► op (owns buf) ─► one transfer per span ─► waiting
///  waiting ─► SQE while fewer than the completion queue's size are with the kernel
///  reap: CQE ─► transfer done (short: back to waiting) ─► op's last ─► RingDone(tag, buf)
/// ```
///
/// Invariants:
/// - the ring owns each op's buffer from [`IoRing::push`] until [`IoRing::reap`] returns
///   it; a push it refuses hands the buffer back. No caller can free or touch memory the
///   kernel still uses, and no push API is unsafe;
/// - at most the completion queue's size of SQEs are with the kernel at once: further
///   transfers wait in the ring (in order) until completions make room, so no completion
///   is ever dropped or left in the kernel's overflow list;
/// - dropping the ring waits for every transfer the kernel has (and aborts the process if
///   it cannot), so no buffer is freed early by the ring's owner unwinding.
pub struct IoRing {
    ring: IoUring,
    eventfd: std::os::fd::OwnedFd,
    direct: bool,
    /// Transfers the kernel may have at once: the completion queue's size.
    room: usize,
    /// Ops pushed and not yet reaped, by index.
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    live_ops: usize,
    /// Transfers of live ops, by index (an SQE's `user_data`).
    transfers: Vec<Option<RingTransfer>>,
    free_transfers: Vec<usize>,
    /// SQEs pushed (submitted or still in the submission queue) and not yet completed.
    in_kernel: usize,
    /// Transfers waiting for room, in push order.
    waiting: VecDeque<usize>,
}

/// One op of an [`IoRing`]: the buffer it owns and its transfers still to complete.
struct Op {
    tag: u64,
    buf: AlignedBuf,
    left: usize,
    error: Option<io::Error>,
}

/// One device transfer of an [`IoRing`] op: raw address into the op's buffer, and
/// progress.
struct RingTransfer {
    offset: u64,
    addr: *mut u8,
    len: usize,
    /// Bytes already transferred (short reads/writes are resubmitted from here).
    done: usize,
    write: bool,
    /// The op (index in `IoRing::ops`) whose buffer `addr` points into.
    op: usize,
}

// SAFETY: the raw addresses in the transfers point into the `AlignedBuf`s owned by the
// ring's own ops (heap memory that does not move with the ring); they are only handed to
// the kernel, never dereferenced by the ring, whichever thread it moves to.
unsafe impl Send for IoRing {}

impl fmt::Debug for IoRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoRing")
            .field("ops", &self.live_ops)
            .field("in_kernel", &self.in_kernel)
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

/// Completion queue of a [`IoRing`]: room for a connection's reads in flight.
const READ_RING_CQ: u32 = 4096;

impl IoRing {
    fn new(fds: [RawFd; 2], direct: bool) -> io::Result<IoRing> {
        Self::with_sizes(fds, direct, RING_ENTRIES, READ_RING_CQ)
    }

    fn with_sizes(fds: [RawFd; 2], direct: bool, sq: u32, cq: u32) -> io::Result<IoRing> {
        // Cooperative task running (Linux 5.19+): a completion does not interrupt the
        // owner with an IPI while it runs (on a virtual machine an IPI is a VM exit); it
        // is posted at the owner's next system call, which `submit` makes when the
        // kernel flags work waiting (`IORING_SQ_TASKRUN`). A sleeping owner is still
        // woken. Older kernels refuse the flags: plain setup then.
        let ring = match IoUring::builder()
            .setup_clamp()
            .setup_cqsize(cq)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(sq)
        {
            Ok(ring) => ring,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
                .setup_clamp()
                .setup_cqsize(cq)
                .build(sq)?,
            Err(e) => return Err(e),
        };
        ring.submitter().register_files(&fds)?;
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let eventfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        ring.submitter().register_eventfd(fd)?;
        let room = ring.params().cq_entries() as usize;
        Ok(IoRing {
            ring,
            eventfd,
            direct,
            room,
            ops: Vec::new(),
            free_ops: Vec::new(),
            live_ops: 0,
            transfers: Vec::new(),
            free_transfers: Vec::new(),
            in_kernel: 0,
            waiting: VecDeque::new(),
        })
    }

    /// The eventfd signalled (counter incremented) for every completion.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Ops pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.live_ops
    }

    /// Takes `buf` and queues one device transfer per span (reads into `buf`, or writes
    /// from it); [`IoRing::reap`] reports the op with `tag` once every span completed, and
    /// hands `buf` back. Transfers go to the kernel at the next [`IoRing::submit`] (or
    /// earlier when the submission queue fills up), as completion queue room allows.
    ///
    /// Refused, with `buf` handed back, when `spans` is empty or a span is empty or
    /// reaches past the end of `buf`.
    pub fn push(
        &mut self,
        tag: u64,
        dir: RingDir,
        mut buf: AlignedBuf,
        spans: &[RingSpan],
    ) -> std::result::Result<(), (io::Error, AlignedBuf)> {
        let fits = |s: &RingSpan| {
            s.len > 0 && s.pos.checked_add(s.len).is_some_and(|end| end <= buf.len())
        };
        if spans.is_empty() || !spans.iter().all(fits) {
            let err = io::Error::new(
                io::ErrorKind::InvalidInput,
                "ring op without spans, or a span outside its buffer",
            );
            return Err((err, buf));
        }
        let base = buf.as_mut_ptr();
        let op = insert(
            &mut self.ops,
            &mut self.free_ops,
            Op {
                tag,
                buf,
                left: spans.len(),
                error: None,
            },
        );
        self.live_ops += 1;
        for span in spans {
            let index = insert(
                &mut self.transfers,
                &mut self.free_transfers,
                RingTransfer {
                    offset: span.offset,
                    // In bounds: checked above.
                    addr: base.wrapping_add(span.pos),
                    len: span.len,
                    done: 0,
                    write: dir == RingDir::Write,
                    op,
                },
            );
            self.waiting.push_back(index);
        }
        // A full submission queue is handed to the kernel here; an error doing so leaves
        // the transfers queued, and the next `submit` reports it.
        let _ = self.fill();
        Ok(())
    }

    /// Moves waiting transfers into the submission queue while the completion queue has
    /// room, handing a full submission queue to the kernel.
    fn fill(&mut self) -> io::Result<()> {
        while self.in_kernel < self.room {
            let Some(&index) = self.waiting.front() else {
                return Ok(());
            };
            let entry = self.sqe_for(index);
            // SAFETY: the SQE points into the buffer of a live op, within its bounds
            // (`done < len`, span checked at push); the ring owns that buffer until the
            // op is reaped, which needs this SQE's completion first.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.waiting.pop_front();
                self.in_kernel += 1;
                continue;
            }
            // Submission queue full: hand it to the kernel, then go on.
            if !self.enter_submit()? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The SQE for (the rest of) transfer `index`.
    fn sqe_for(&self, index: usize) -> io_uring::squeue::Entry {
        let t = self.transfers[index]
            .as_ref()
            .expect("queued transfer is live");
        let offset = t.offset + t.done as u64;
        let addr = t.addr.wrapping_add(t.done);
        let len = (t.len - t.done).min(MAX_SQE_LEN);
        let aligned = offset.is_multiple_of(IO_ALIGN as u64)
            && len.is_multiple_of(IO_ALIGN)
            && (addr as usize).is_multiple_of(IO_ALIGN);
        let fd = types::Fixed(if self.direct && aligned {
            DIRECT_SLOT
        } else {
            BUFFERED_SLOT
        });
        let entry = if t.write {
            opcode::Write::new(fd, addr, len as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(fd, addr, len as u32)
                .offset(offset)
                .build()
        };
        entry.user_data(index as u64)
    }

    /// `io_uring_enter` without waiting; false when the kernel asks to reap first.
    fn enter_submit(&mut self) -> io::Result<bool> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(true),
                Err(err) => match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Completions must be reaped first; the owner does on its next wakeup.
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => return Ok(false),
                    _ => return Err(err),
                },
            }
        }
    }

    /// Hands queued transfers to the kernel without waiting for any. Makes no system
    /// call when there is nothing to hand over (it runs after every reap).
    pub fn submit(&mut self) -> io::Result<()> {
        self.fill()?;
        let idle = {
            let sq = self.ring.submission();
            // An overflowed completion queue is only flushed by an enter, and completions
            // the kernel holds for us (cooperative task running) are posted by one: make
            // one then.
            sq.is_empty() && !sq.cq_overflow() && !sq.taskrun()
        };
        if idle {
            return Ok(());
        }
        self.enter_submit().map(|_| ())
    }

    /// Clears the eventfd counter (before reaping, so that later completions signal again).
    pub fn clear_eventfd(&self) {
        let mut value = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer; a non-blocking eventfd with a zero
        // counter fails with EAGAIN, which is fine.
        unsafe { libc::read(self.eventfd.as_raw_fd(), value.as_mut_ptr().cast(), 8) };
    }

    /// Appends the ops whose every transfer completed, with their buffers; resubmits
    /// short and interrupted transfers, and queues waiting ones into the room made.
    pub fn reap(&mut self, out: &mut Vec<RingDone>) -> io::Result<()> {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (index, res) in completions {
            let index = index as usize;
            let Some(t) = self.transfers.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            self.in_kernel -= 1;
            let result = match usize::try_from(res) {
                Err(_) if -res == libc::EINTR || -res == libc::EAGAIN => None,
                Err(_) => Some(Err(io::Error::from_raw_os_error(-res))),
                Ok(0) if t.write => Some(Err(io::ErrorKind::WriteZero.into())),
                Ok(0) => Some(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => {
                    t.done += n;
                    (t.done >= t.len).then_some(Ok(()))
                }
            };
            let Some(result) = result else {
                // The rest goes again, ahead of transfers not started yet.
                self.waiting.push_front(index);
                continue;
            };
            let t = self.transfers[index].take().expect("live transfer");
            self.free_transfers.push(index);
            let op = self.ops[t.op].as_mut().expect("live op");
            if let Err(e) = result {
                op.error.get_or_insert(e);
            }
            op.left -= 1;
            if op.left == 0 {
                let op = self.ops[t.op].take().expect("live op");
                self.free_ops.push(t.op);
                self.live_ops -= 1;
                out.push(RingDone {
                    tag: op.tag,
                    result: op.error.map_or(Ok(()), Err),
                    buf: op.buf,
                });
            }
        }
        self.submit()
    }

    /// Blocks until the kernel has completed every transfer it was given; transfers still
    /// waiting for room are dropped with their ops. For dropping the ring, and for owners
    /// that must outlive the ring's I/O (blocking: never on a runtime thread in normal
    /// operation).
    pub fn wait_idle(&mut self) {
        self.waiting.clear();
        while self.in_kernel > 0 {
            if let Err(err) = enter(&mut self.ring) {
                abort_in_flight(&err, self.in_kernel);
            }
            let done = self.ring.completion().count();
            self.in_kernel -= done;
        }
        self.ops.clear();
        self.free_ops.clear();
        self.transfers.clear();
        self.free_transfers.clear();
        self.live_ops = 0;
    }
}

impl AsRawFd for IoRing {
    /// The eventfd (see [`IoRing::eventfd`]), so that the ring itself can be registered
    /// with a reactor.
    fn as_raw_fd(&self) -> RawFd {
        self.eventfd()
    }
}

impl Drop for IoRing {
    fn drop(&mut self) {
        self.wait_idle();
    }
}

/// Puts `value` in a free slot of `slots` (or a new one); returns its index.
fn insert<T>(slots: &mut Vec<Option<T>>, free: &mut Vec<usize>, value: T) -> usize {
    match free.pop() {
        Some(index) => {
            slots[index] = Some(value);
            index
        }
        None => {
            slots.push(Some(value));
            slots.len() - 1
        }
    }
}

/// An [`IoRing`] whose completions wake a tokio task: its eventfd is registered with the
/// runtime's reactor, and the ring lives inside that registration (so it is deregistered
/// before the descriptor closes, by construction).
///
/// If the reactor stops answering (the runtime is shutting down), completions are still
/// collected: the task is woken again at once and reaps the ring directly, so a task
/// waiting for its I/O is never left without a wakeup.
pub struct AsyncRing {
    fd: tokio::io::unix::AsyncFd<IoRing>,
    /// The reactor failed us once: reap by polling from now on.
    unpolled: bool,
}

impl fmt::Debug for AsyncRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncRing")
            .field("ring", self.fd.get_ref())
            .field("unpolled", &self.unpolled)
            .finish()
    }
}

impl AsyncRing {
    /// Registers `ring` with the current tokio runtime's reactor (call inside a runtime).
    pub fn new(ring: IoRing) -> io::Result<AsyncRing> {
        // SAFETY: the descriptor is the ring's eventfd, an `OwnedFd` the ring holds for its
        // whole life and never replaces, and the ring lives inside the `AsyncFd`: the
        // descriptor stays open and the same until the registration is gone.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(AsyncRing {
            fd,
            unpolled: false,
        })
    }

    /// The ring, to push ops and submit them.
    pub fn ring(&mut self) -> &mut IoRing {
        self.fd.get_mut()
    }

    /// Appends finished ops to `out`; `Ready` once at least one was appended. `Pending`
    /// always leaves a wakeup behind: the reactor's, or an immediate one when the reactor
    /// failed.
    pub fn poll_complete(&mut self, cx: &mut Context<'_>, out: &mut Vec<RingDone>) -> Poll<()> {
        let before = out.len();
        loop {
            // Reap first: a caller that busy-polls sees completions before the reactor
            // has delivered the eventfd's readiness.
            let ring = self.fd.get_mut();
            if let Err(e) = ring.reap(out) {
                tracing::warn!(error = %e, "io_uring submission failed");
            }
            if out.len() > before {
                return Poll::Ready(());
            }
            if self.unpolled {
                // No reactor will wake this task: ask to be polled again.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match self.fd.poll_read_ready_mut(cx) {
                // Clear readiness and the counter, then reap again: a completion that
                // lands after this point signals the eventfd again, and one that landed
                // before it is in the queue.
                Poll::Ready(Ok(mut ready)) => {
                    ready.clear_ready();
                    self.fd.get_mut().clear_eventfd();
                }
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, "Polling an io_uring ring failed; reaping it by polling");
                    self.unpolled = true;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
/// One op of a batch as the ring sees it: raw address and progress.
struct Transfer {
    offset: u64,
    addr: *mut u8,
    len: usize,
    /// Bytes already transferred (short reads/writes are resubmitted from here).
    done: usize,
    write: bool,
}

impl Transfer {
    fn op_name(&self) -> &'static str {
        if self.write {
            "write"
        } else {
            "read"
        }
    }

    /// Whether running `self` and `later` concurrently could differ from running them in
    /// order: they overlap and at least one writes.
    fn conflicts(&self, later: &Transfer) -> bool {
        let self_end = self.offset + self.len as u64;
        let later_end = later.offset + later.len as u64;
        (self.write || later.write) && self.offset < later_end && later.offset < self_end
    }
}

/// The number of SQEs the kernel may still be executing with a caller's buffer.
///
/// Dropping it while non-zero (a panic between push and reap) would let the caller free
/// buffers the kernel still writes into, so that aborts instead.
struct InFlight(usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0 != 0 {
            tracing::error!(
                in_flight = self.0,
                "io_uring operations abandoned in flight, aborting"
            );
            std::process::abort();
        }
    }
}

/// Submits pending SQEs and waits for at least one completion, retrying transient errors.
///
/// Another error means the ring is broken; the caller decides what that costs (see
/// [`abort_in_flight`]).
fn enter(ring: &mut IoUring) -> io::Result<()> {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => return Ok(()),
            Err(err) => match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // CQ overflow backlog: completions are already there to reap.
                Some(libc::EBUSY) if !ring.completion().is_empty() => return Ok(()),
                Some(libc::EAGAIN) | Some(libc::EBUSY) => std::thread::yield_now(),
                _ => return Err(err),
            },
        }
    }
}

/// Called when the ring broke while operations were in flight with the caller's buffers:
/// returning (or unwinding) would let the caller free memory the kernel may still write
/// into, which cannot be made safe, so the process stops.
fn abort_in_flight(err: &io::Error, in_flight: usize) -> ! {
    tracing::error!(error = %err, in_flight, "io_uring_enter failed with operations in flight, aborting");
    std::process::abort()
}

fn probe_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring does not support IORING_OP_{name}"),
            ));
        }
    }
    Ok(())
}

/// Rings not in use, shared by the threads calling into one device.
struct RingPool {
    idle: Mutex<Vec<IoUring>>,
    /// Signalled when a ring goes back to the pool (for threads that could not set up one).
    returned: Condvar,
    created: AtomicUsize,
    /// Descriptors to register in the fixed slots of every ring.
    fds: [RawFd; 2],
}

impl RingPool {
    fn setup_ring(&self) -> io::Result<IoUring> {
        let ring = IoUring::builder().setup_clamp().build(RING_ENTRIES)?;
        ring.submitter().register_files(&self.fds)?;
        Ok(ring)
    }

    /// Takes an idle ring or sets up a new one; when setting up fails (memlock or
    /// resource limits), waits for another thread to return one.
    fn take(&self) -> Result<PooledRing<'_>> {
        if let Some(ring) = self.idle.lock().pop() {
            return Ok(PooledRing {
                ring: Some(ring),
                pool: self,
            });
        }
        match self.setup_ring() {
            Ok(ring) => {
                let rings = self.created.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(rings, "Set up another io_uring ring");
                Ok(PooledRing {
                    ring: Some(ring),
                    pool: self,
                })
            }
            Err(err) => {
                if self.created.load(Ordering::Relaxed) == 0 {
                    return Err(DeviceError::Io {
                        op: "io_uring setup",
                        source: err,
                    });
                }
                tracing::debug!(error = %err, "Cannot set up another io_uring ring, waiting for one");
                let mut idle = self.idle.lock();
                loop {
                    if let Some(ring) = idle.pop() {
                        return Ok(PooledRing {
                            ring: Some(ring),
                            pool: self,
                        });
                    }
                    self.returned.wait(&mut idle);
                }
            }
        }
    }
}

/// A ring taken from the pool; goes back on drop.
struct PooledRing<'a> {
    /// Always `Some` until dropped.
    ring: Option<IoUring>,
    pool: &'a RingPool,
}

impl PooledRing<'_> {
    fn get(&mut self) -> &mut IoUring {
        self.ring.as_mut().expect("ring present until drop")
    }
}

impl PooledRing<'_> {
    /// Closes a ring in an unknown state instead of returning it to the pool.
    fn discard(mut self) {
        if self.ring.take().is_some() {
            self.pool.created.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for PooledRing<'_> {
    fn drop(&mut self) {
        let Some(ring) = self.ring.take() else { return };
        let mut idle = self.pool.idle.lock();
        if idle.len() < MAX_IDLE_RINGS {
            idle.push(ring);
            drop(idle);
            self.pool.returned.notify_one();
        } else {
            drop(idle);
            self.pool.created.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::file::DirectIo;
    use crate::device::AlignedBuf;

    fn device(size: u64) -> Option<(tempfile::TempDir, UringDevice)> {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::open(&dir.path().join("data"), Some(size)).unwrap();
        match UringDevice::new(target) {
            Ok(dev) => Some((dir, dev)),
            Err(err) if crate::device::tests::uring_unavailable(&err) => {
                eprintln!("skipping: io_uring is not available here: {err}");
                None
            }
            Err(err) => panic!("io_uring setup failed: {err:?}"),
        }
    }

    #[test]
    fn uring_engine_reports_itself() {
        let Some((_dir, dev)) = device(1 << 20) else {
            return;
        };
        assert_eq!(dev.engine(), IoEngine::Uring);
        assert_eq!(dev.size(), 1 << 20);
        assert!(dev.punch_zeroes());
    }

    #[test]
    fn uring_batch_larger_than_the_ring() {
        let Some((_dir, dev)) = device(4 << 20) else {
            return;
        };
        // 3 * RING_ENTRIES ops, half aligned, half not.
        let count = 3 * RING_ENTRIES as usize;
        let mut bufs: Vec<AlignedBuf> = (0..count)
            .map(|i| {
                let mut buf = AlignedBuf::zeroed(IO_ALIGN);
                buf.fill(i as u8);
                buf
            })
            .collect();
        let mut ops: Vec<IoOp<'_>> = bufs
            .iter()
            .enumerate()
            .map(|(i, buf)| IoOp::Write {
                offset: (i * IO_ALIGN + (i % 2) * 7) as u64,
                buf: if i % 2 == 0 {
                    &buf[..]
                } else {
                    &buf[..IO_ALIGN - 7]
                },
            })
            .collect();
        dev.submit(&mut ops).unwrap();
        drop(ops);
        for buf in bufs.iter_mut() {
            buf.fill(0xEE);
        }
        let mut ops: Vec<IoOp<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| IoOp::Read {
                offset: (i * IO_ALIGN) as u64,
                buf: &mut buf[..],
            })
            .collect();
        dev.submit(&mut ops).unwrap();
        drop(ops);
        for (i, buf) in bufs.iter().enumerate() {
            let skip = (i % 2) * 7;
            assert!(buf[skip..].iter().all(|&b| b == i as u8), "op {i}");
        }
    }

    #[test]
    fn uring_many_threads_use_separate_rings() {
        let Some((_dir, dev)) = device(1 << 20) else {
            return;
        };
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let dev = &dev;
                s.spawn(move || {
                    for round in 0..50u64 {
                        let data = [t; 100];
                        let offset = u64::from(t) * 100_000 + round * 100;
                        dev.write_at(offset, &data).unwrap();
                        let mut back = [0u8; 100];
                        dev.read_at(offset, &mut back).unwrap();
                        assert_eq!(back, data);
                    }
                    dev.flush().unwrap();
                });
            }
        });
        assert!(dev.pool.created.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn uring_buffered_only_target_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let target =
            Target::open_with(&dir.path().join("data"), Some(4 << 20), DirectIo::Off).unwrap();
        match UringDevice::new(target) {
            Ok(dev) => crate::device::tests::run_suite(&dev, true),
            Err(err) if crate::device::tests::uring_unavailable(&err) => {
                eprintln!("skipping: io_uring is not available here: {err}");
            }
            Err(err) => panic!("io_uring setup failed: {err:?}"),
        }
    }

    /// Waits (blocking) until `ring` reports `n` more ops.
    fn wait_for(ring: &mut IoRing, n: usize) -> Vec<RingDone> {
        let mut done = Vec::new();
        while done.len() < n {
            enter(&mut ring.ring).unwrap();
            ring.reap(&mut done).unwrap();
            assert!(ring.in_kernel <= ring.room);
        }
        done
    }

    fn span(pos: usize, len: usize, offset: u64) -> RingSpan {
        RingSpan { pos, len, offset }
    }

    #[test]
    fn io_ring_completes_aligned_and_unaligned_ops_by_tag() {
        let Some((_dir, dev)) = device(1 << 20) else {
            return;
        };
        let mut data = AlignedBuf::zeroed(64 << 10);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        dev.write_at(0, &data).unwrap();
        let mut ring = dev.io_ring().unwrap();
        // (tag, offset, len): aligned (O_DIRECT slot) and unaligned (buffered slot).
        let reads = [
            (1u64, 0u64, 4096usize),
            (2, 8192, 16384),
            (3, 4097, 1000),
            (4, 100, 5),
        ];
        for &(tag, offset, len) in &reads {
            let buf = AlignedBuf::zeroed(len);
            ring.push(tag, RingDir::Read, buf, &[span(0, len, offset)])
                .unwrap();
        }
        // One op in two spans: the buffer's halves from two places.
        ring.push(
            5,
            RingDir::Read,
            AlignedBuf::zeroed(8192),
            &[span(0, 4096, 12288), span(4096, 4096, 0)],
        )
        .unwrap();
        assert_eq!(ring.in_flight(), 5);
        ring.submit().unwrap();
        let mut done = wait_for(&mut ring, 5);
        assert_eq!(ring.in_flight(), 0);
        done.sort_by_key(|d| d.tag);
        let tags: Vec<u64> = done.iter().map(|d| d.tag).collect();
        assert_eq!(tags, [1, 2, 3, 4, 5]);
        for (&(tag, offset, len), d) in reads.iter().zip(&done) {
            assert!(d.result.is_ok());
            let at = offset as usize;
            assert_eq!(&d.buf[..], &data[at..at + len], "read {tag}");
        }
        assert_eq!(&done[4].buf[..4096], &data[12288..16384]);
        assert_eq!(&done[4].buf[4096..], &data[..4096]);
        // Writes, aligned and not, then read back.
        ring.push(
            20,
            RingDir::Write,
            AlignedBuf::zeroed(8192),
            &[span(0, 8192, 16384)],
        )
        .unwrap();
        ring.push(
            21,
            RingDir::Write,
            AlignedBuf::zeroed(8192),
            &[span(5, 3, 30001)],
        )
        .unwrap();
        ring.submit().unwrap();
        let done = wait_for(&mut ring, 2);
        assert!(done.iter().all(|d| d.result.is_ok()));
        let mut back = vec![9u8; 32768];
        dev.read_at(0, &mut back).unwrap();
        assert_eq!(&back[..16384], &data[..16384]);
        assert!(back[16384..24576].iter().all(|&b| b == 0));
        assert_eq!(&back[24576..30001], &data[24576..30001]);
        assert_eq!(&back[30001..30004], &[0, 0, 0]);
        assert_eq!(&back[30004..], &data[30004..32768]);
        // Past the end: an error, not a hang, and the buffer comes back.
        ring.push(
            9,
            RingDir::Read,
            AlignedBuf::zeroed(4096),
            &[span(0, 4096, (1 << 20) - 2048)],
        )
        .unwrap();
        ring.submit().unwrap();
        let done = wait_for(&mut ring, 1);
        assert_eq!(done[0].tag, 9);
        assert!(done[0].result.is_err());
        assert_eq!(done[0].buf.len(), 4096);
        // Dropping with ops in flight waits for them.
        ring.push(
            10,
            RingDir::Read,
            AlignedBuf::zeroed(4096),
            &[span(0, 4096, 0)],
        )
        .unwrap();
        ring.submit().unwrap();
        drop(ring);
    }

    #[test]
    fn io_ring_refuses_bad_spans_and_hands_the_buffer_back() {
        let Some((_dir, dev)) = device(1 << 20) else {
            return;
        };
        let mut ring = dev.io_ring().unwrap();
        let mut buf = AlignedBuf::zeroed(4096);
        buf.fill(7);
        let addr = buf.as_ptr();
        for spans in [
            vec![],
            vec![span(0, 0, 0)],
            vec![span(1, 4096, 0)],
            vec![span(0, 512, 0), span(usize::MAX, 2, 0)],
        ] {
            let (err, back) = ring.push(1, RingDir::Read, buf, &spans).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{spans:?}");
            assert_eq!(back.as_ptr(), addr, "the same buffer comes back");
            assert!(back.iter().all(|&b| b == 7), "untouched");
            buf = back;
        }
        assert_eq!(ring.in_flight(), 0);
    }

    /// More transfers than the completion queue holds: the rest wait in the ring, and the
    /// kernel never has more than the completion queue's size at once.
    #[test]
    fn io_ring_bounds_transfers_by_the_completion_queue() {
        let Some((_dir, dev)) = device(1 << 20) else {
            return;
        };
        let mut data = AlignedBuf::zeroed(256 * 512);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        dev.write_at(0, &data).unwrap();
        let mut ring = IoRing::with_sizes(dev.pool.fds, dev.target.has_direct(), 4, 8).unwrap();
        assert_eq!(ring.room, 8);
        // 64 ops of 4 spans each: 256 transfers of 512 bytes, 8 at a time.
        for tag in 0..64u64 {
            let spans: Vec<RingSpan> = (0..4)
                .map(|k| span(k * 512, 512, (tag * 4 + k as u64) * 512))
                .collect();
            ring.push(tag, RingDir::Read, AlignedBuf::zeroed(2048), &spans)
                .unwrap();
            assert!(ring.in_kernel <= ring.room);
        }
        ring.submit().unwrap();
        assert_eq!(ring.in_kernel, 8);
        let done = wait_for(&mut ring, 64);
        for d in &done {
            assert!(d.result.is_ok());
            let at = d.tag as usize * 2048;
            assert_eq!(&d.buf[..], &data[at..at + 2048], "op {}", d.tag);
        }
        assert_eq!((ring.in_flight(), ring.in_kernel), (0, 0));
    }

    /// A waker that counts its wakeups.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: std::sync::Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The reactor that polled the ring's eventfd is gone (its runtime shut down): polling
    /// fails, yet every `Pending` must leave a wakeup behind, and the op still completes.
    #[test]
    fn async_ring_wakes_its_task_when_the_reactor_is_gone() {
        let Some((_dir, dev)) = device(1 << 20) else {
            return;
        };
        dev.write_at(0, &[5u8; 4096]).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let mut ring = {
            let _entered = runtime.enter();
            AsyncRing::new(dev.io_ring().unwrap()).unwrap()
        };
        drop(runtime);
        ring.ring()
            .push(
                1,
                RingDir::Read,
                AlignedBuf::zeroed(4096),
                &[span(0, 4096, 0)],
            )
            .unwrap();
        ring.ring().submit().unwrap();
        let counter = std::sync::Arc::new(CountingWaker(Default::default()));
        let waker = std::task::Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut done = Vec::new();
        let mut polls = 0u64;
        loop {
            let woken = counter.0.load(Ordering::SeqCst);
            match ring.poll_complete(&mut cx, &mut done) {
                Poll::Ready(()) => break,
                Poll::Pending => assert!(
                    counter.0.load(Ordering::SeqCst) > woken,
                    "Pending without a wakeup: the task would never run again"
                ),
            }
            polls += 1;
            if polls.is_multiple_of(1024) {
                std::thread::yield_now();
            }
        }
        assert_eq!(done.len(), 1);
        assert!(done[0].result.is_ok());
        assert!(done[0].buf.iter().all(|&b| b == 5));
    }

    #[test]
    fn uring_overlapping_ops_in_one_batch_run_in_order() {
        let Some((_dir, dev)) = device(1 << 20) else {
            return;
        };
        let first = AlignedBuf::zeroed(2 * IO_ALIGN);
        let mut second = AlignedBuf::zeroed(IO_ALIGN);
        second.fill(2);
        let mut back = vec![9u8; 3 * IO_ALIGN];
        let mut ops = [
            IoOp::Write {
                offset: 0,
                buf: &first,
            },
            IoOp::Write {
                offset: 4096,
                buf: &second,
            },
            IoOp::Read {
                offset: 0,
                buf: &mut back,
            },
        ];
        dev.submit(&mut ops).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..8192].iter().all(|&b| b == 2));
        assert!(back[8192..].iter().all(|&b| b == 0));
    }
}
