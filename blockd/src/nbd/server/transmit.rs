//! Transmission: requests in, target calls, replies out, all on the connection's task.
//!
//! The connection's task ([`Transmission`]) reads requests into its own buffer and
//! validates them (range, alignment, flags, size limits), every request already buffered
//! at once. A rejected request is answered at once. Valid reads and non-FUA writes are
//! started on the target's [`IoQueue`] when it has one (io_uring: started, submitted and
//! completed on this same task; ops the queue declines fall back to the blocking pool),
//! else reads run as one batch on the blocking pool; every other valid request runs on
//! tokio's blocking pool (after an async QoS wait when the export is limited, which reads
//! and writes then wait for too), and the blocking closure encodes its reply and sends it
//! back to the task over a channel. The task writes replies in completion order (the
//! protocol allows it; the cookie matches them to requests), gathered into vectored
//! writes. Payloads and read buffers are aligned and recycled per connection
//! ([`crate::nbd::buffers`]), so aligned requests reach the device with O_DIRECT.
//!
//! Busy-polling: on a plain socket, a connection with nothing to do keeps polling its
//! socket and its ring for a while after its last progress before it sleeps: up to
//! [`ServerConfig::busy_poll`](super::ServerConfig), adapted to how soon work came the
//! last times (as QEMU adapts its AioContext polling). A sleeping connection costs two
//! wakeups per request (the device's completion, the client's next request), each of
//! which, on a virtual machine, is a halted vCPU woken by an interrupt; polling briefly
//! answers both from a running thread. While the connection has reads or writes in flight
//! on its ring, it polls up to [`INFLIGHT_POLL_FACTOR`] times longer (1 ms by default):
//! their completions are sure to come within a device's latency, and a device under a
//! deep queue takes hundreds of microseconds, more than the short window; waiting for
//! the client's next request never polls longer than the short window. The price is CPU:
//! a connection keeping its device busy spends up to a core on it (a benchmark's QD32
//! 4 KiB reads: 96 % of a core instead of 35 %, for about 1.4× the IOPS on a 2-vCPU VM).
//! When it closes, a connection logs (debug, `BLOCKD_LOG=blockd::nbd=debug`) how often it
//! went to sleep while polling, and for what (the client, the device, room in the socket),
//! and how often its window collapsed: the figures that tell whether polling pays on a
//! given machine.
//! The ring is reaped from its completion queue in
//! memory, the socket read with a non-blocking `recv` behind the reactor's back (the
//! reactor's readiness is only cleared by a read that would block, so it never misses
//! data arriving later).
//!
//! Invariants:
//! - at most `max_requests_in_flight` requests and `max_bytes_in_flight` payload bytes per
//!   connection are between "header read" and "reply written": the task counts them and
//!   stops parsing requests while either limit is reached, so a client that stops reading
//!   replies stops being read;
//! - a request's length is checked against [`MAX_PAYLOAD`] *before* anything is allocated
//!   for it; an oversized write payload is skipped as it arrives and answered
//!   `NBD_EINVAL`, keeping the stream in sync;
//! - target methods run only on the blocking pool, never on a runtime worker, unless the
//!   target declares itself non-blocking ([`ExportTarget::nonblocking`]); a [`IoQueue`]
//!   is called on the runtime by contract (it never blocks);
//! - a panic in a target call becomes an `NBD_EIO` reply to that request;
//! - graceful close: stop reading requests, let in-flight ones finish and their replies be
//!   written, flush the target, then close. QoS waits are cut short with `NBD_ESHUTDOWN`.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};

use super::handshake::Session;
use super::{
    blocking, is_disconnect, ConnError, Shared, Stop, BASE_ALLOCATION_ID, MAX_PAYLOAD,
    MIN_BLOCK_SIZE,
};
use crate::nbd::buffers::{BufPool, IoBuf};
use crate::nbd::codec::*;
use crate::nbd::{
    Errno, ExportTarget, Extent, ExtentKind, IoQueue, QueueDone, QueueStart, ZeroMode,
};
use crate::qos::Limiter;

/// The spec's cap on descriptors in one block status chunk.
const MAX_EXTENTS: usize = 1 << 20;
/// Read buffer of a connection: room for a queue depth's worth of 4 KiB writes, whose
/// requests can then be decoded and started together.
const READ_BUFFER: usize = 256 << 10;
/// Largest request run inline (on the runtime thread) for a non-blocking target.
const INLINE_MAX: u32 = 1 << 20;
/// A sparse read with more pieces than this is sent as one data chunk instead.
const MAX_READ_SEGMENTS: usize = 1 << 16;

/// Per-connection state shared by the request tasks.
struct RequestCtx {
    target: Arc<dyn ExportTarget>,
    export: String,
    /// The export size requests are checked against: negotiated at the handshake, raised
    /// when the export grows (see [`RequestCtx::refresh_size`]).
    size: AtomicU64,
    flags: u16,
    structured: bool,
    base_allocation: bool,
    strict_alignment: bool,
    /// [`ExportTarget::nonblocking`], read once per connection.
    nonblocking: bool,
    limiter: Arc<Limiter>,
    /// Aligned buffers for payloads and reads, recycled within the connection.
    bufs: Arc<BufPool>,
}

/// A request refused before reaching the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reject {
    error: u32,
    message: &'static str,
}

const fn reject(error: u32, message: &'static str) -> Reject {
    Reject { error, message }
}

impl RequestCtx {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Whether `req` reaches past the size this connection checks against.
    fn past_end(&self, req: &Request) -> bool {
        req.offset
            .checked_add(req.length as u64)
            .is_none_or(|end| end > self.size())
    }

    /// Re-reads the target's size (on the blocking pool) after a request reached past the
    /// end; returns whether it grew. A volume may grow while connected, and a client may
    /// learn the new size without a new handshake: the kernel NBD client is told it over
    /// netlink (csi-shim's online expansion). Only ever raises the size: a shrink needs
    /// `force` in the engine, which checks its own bounds.
    async fn refresh_size(&self) -> bool {
        let target = self.target.clone();
        match blocking(move || target.size()).await {
            Ok(Ok(size)) => {
                let before = self.size.fetch_max(size, Ordering::Relaxed);
                if size > before {
                    info!(export = %self.export, before, size, "export grew; serving the new size");
                }
                size > before
            }
            _ => false,
        }
    }

    /// Validates a request against the negotiated session; `Ok` means the target may be
    /// called with it as is.
    fn check(&self, req: &Request) -> Result<(), Reject> {
        let mut allowed = NBD_CMD_FLAG_FUA;
        match req.command {
            Command::Read if self.structured => allowed |= NBD_CMD_FLAG_DF,
            Command::WriteZeroes => {
                allowed |= NBD_CMD_FLAG_NO_HOLE;
                if self.flags & NBD_FLAG_SEND_FAST_ZERO != 0 {
                    allowed |= NBD_CMD_FLAG_FAST_ZERO;
                }
            }
            Command::BlockStatus => allowed |= NBD_CMD_FLAG_REQ_ONE,
            Command::Unknown(_) => return Err(reject(NBD_EINVAL, "unknown command")),
            _ => {}
        }
        if req.flags & !allowed != 0 {
            return Err(reject(
                NBD_EINVAL,
                "command flags not valid for this command",
            ));
        }
        let writes = matches!(
            req.command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        if req.command == Command::Flush || req.command == Command::Disc {
            // Offset and length are reserved; nothing to check.
            return Ok(());
        }
        if writes && self.flags & NBD_FLAG_READ_ONLY != 0 {
            return Err(reject(NBD_EPERM, "export is read-only"));
        }
        // The payload limit first: it is what protects the server, whatever the range.
        match req.command {
            Command::Read if req.length > MAX_PAYLOAD => {
                return Err(if self.structured {
                    reject(NBD_EOVERFLOW, "read larger than the 32 MiB maximum payload")
                } else {
                    reject(NBD_EINVAL, "read larger than the 32 MiB maximum payload")
                })
            }
            Command::Write if req.length > MAX_PAYLOAD => {
                return Err(reject(
                    NBD_EINVAL,
                    "write larger than the 32 MiB maximum payload",
                ))
            }
            _ => {}
        }
        let size = self.size();
        let end = req.offset.checked_add(req.length as u64);
        if end.is_none_or(|end| end > size) {
            return Err(match req.command {
                Command::Write | Command::WriteZeroes => {
                    reject(NBD_ENOSPC, "request reaches beyond the end of the export")
                }
                _ => reject(NBD_EINVAL, "request reaches beyond the end of the export"),
            });
        }
        let end = end.unwrap_or(0);
        if self.strict_alignment && req.command != Command::BlockStatus {
            let min = MIN_BLOCK_SIZE as u64;
            let tail_ok = (req.length as u64).is_multiple_of(min) || end == size;
            if !req.offset.is_multiple_of(min) || !tail_ok {
                return Err(reject(
                    NBD_EINVAL,
                    "request is not aligned to the 512-byte minimum block size",
                ));
            }
        }
        match req.command {
            Command::BlockStatus if !self.base_allocation => Err(reject(
                NBD_EINVAL,
                "no metadata context was negotiated for this export",
            )),
            Command::BlockStatus if req.length == 0 => {
                Err(reject(NBD_EINVAL, "block status of zero bytes"))
            }
            _ => Ok(()),
        }
    }
}

/// One piece of an outgoing reply.
enum Frame {
    Bytes(Vec<u8>),
    /// A range of [`Outgoing::buf`].
    Data(Range<usize>),
}

/// An encoded reply, queued for the socket.
struct Outgoing {
    frames: Vec<Frame>,
    buf: IoBuf,
    /// Payload bytes its request counts against `max_bytes_in_flight` until written.
    cost: u32,
}

impl Outgoing {
    fn frame(&self, i: usize) -> &[u8] {
        match &self.frames[i] {
            Frame::Bytes(b) => b,
            Frame::Data(r) => &self.buf[r.clone()],
        }
    }

    fn len(&self) -> usize {
        (0..self.frames.len()).map(|i| self.frame(i).len()).sum()
    }
}

/// What a request produced, before encoding.
enum Outcome {
    Done,
    Error { error: u32, message: String },
    Read { buf: IoBuf, segments: Vec<Segment> },
    BlockStatus(Vec<BlockDescriptor>),
}

/// A piece of a read reply: data from the buffer, or a range known to read as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Data(Range<usize>),
    Zero(Range<usize>),
}

/// How the request-reading loop ended.
enum End {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// Graceful close asked by the server.
    Stopped,
    ClientGone,
    Failed(ConnError),
}

fn end_of(err: ConnError) -> End {
    match err {
        ConnError::Io(e) if is_disconnect(&e) => End::ClientGone,
        other => End::Failed(other),
    }
}

/// A request read off the wire, with what it needs to run.
struct Incoming {
    req: Request,
    verdict: Result<(), Reject>,
    payload: IoBuf,
    /// Payload bytes counted against `max_bytes_in_flight` (reads and writes).
    cost: u32,
}

/// Most reply pieces written with one vectored write.
const MAX_IOVECS: usize = 64;
/// Bytes gathered for one write (beyond it, the rest waits for the next write).
const WRITE_GATHER: usize = 256 << 10;
/// Rounds of work one poll of the connection does before yielding to other tasks.
const ROUNDS_PER_POLL: usize = 32;
/// The shortest busy-polling window; a window that shrinks below it turns polling off
/// until a quick wakeup grows it again.
const MIN_POLL_WINDOW: Duration = Duration::from_micros(4);
/// How many times longer than [`ServerConfig::busy_poll`](super::ServerConfig) a
/// connection polls while it has device I/O in flight (see the module docs).
const INFLIGHT_POLL_FACTOR: u32 = 10;

/// Why the connection's poll stopped to let the async loop act.
enum Event {
    /// A request reached past the end: read the export's size again, then go on.
    Refresh,
    End(End),
}

/// What parsing the read buffer got to.
enum Parsed {
    /// Everything buffered was taken; more bytes are needed.
    More,
    /// The next request waits for in-flight ones to finish (request or byte limit).
    Blocked,
    Refresh,
    Disconnect,
}

/// What one attempt at reading did.
enum ReadStep {
    Progress,
    Idle,
    Event(Event),
}

/// One connection in transmission: a single task reads requests, starts them, collects
/// their results and writes the replies.
///
/// ```text
///  socket ─► rbuf ─► parse ─┬─ reads, plain writes ─► IoQueue (io_uring) ─┐
///                           └─ others ─► blocking pool ─► channel ─────────┤
///  socket ◀── writev ◀── out (replies in completion order) ◀──────────────┘
/// ```
///
/// Everything is driven from [`Transmission::poll_step`]: with no task hop between
/// reading a request, submitting its I/O and writing its reply, a request on an
/// [`IoQueue`] costs no wakeup but the socket's and the ring's.
struct Transmission<S> {
    ctx: Arc<RequestCtx>,
    stream: S,
    /// Bytes read and not yet parsed: `rbuf[rpos..rend]`.
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
    /// A write whose payload is still arriving, and how much of it is in.
    partial: Option<(Incoming, usize)>,
    /// Payload bytes of a refused write still to be skipped.
    skip: u64,
    /// The current header was checked again after refreshing the export's size.
    refreshed: bool,
    /// Replies not yet written, and how much of the first one is.
    out: VecDeque<Outgoing>,
    written: usize,
    /// Reply pieces gathered for a stream without vectored writes.
    stage: Vec<u8>,
    flush_pending: bool,
    /// Writing failed: the client is gone, replies are dropped as they come.
    write_failed: bool,
    /// Requests between "header read" and "reply written", and their payload bytes.
    requests: usize,
    bytes: usize,
    max_requests: usize,
    max_bytes: usize,
    queue: Option<Box<dyn IoQueue>>,
    /// Requests on the queue, by tag.
    queued: FxHashMap<u64, Incoming>,
    next_tag: u64,
    unsubmitted: bool,
    done: Vec<QueueDone>,
    /// Replies of requests run elsewhere (blocking pool, QoS waits).
    tx: mpsc::UnboundedSender<Vec<Outgoing>>,
    rx: mpsc::UnboundedReceiver<Vec<Outgoing>>,
    stop: watch::Receiver<Stop>,
    /// The socket's descriptor, read directly while busy-polling (plain sockets only).
    socket: Option<RawFd>,
    /// The most a connection polls after its last progress before sleeping (zero: never).
    busy_poll: Duration,
    /// How long it polls now: adapted to how long it waits for work (see [`Self::adapt`]).
    poll_window: Duration,
    /// When the connection last ran out of work, until its next progress, and the most
    /// it would poll then ([`Self::poll_cap`]).
    idle_since: Option<(Instant, Duration)>,
    /// Busy-polling now: reads go to the descriptor when the reactor has no readiness.
    spinning: bool,
    /// Why the connection slept, counted for the close log.
    waits: Waits,
}

/// How often a connection went to sleep, and for what: logged (debug) when it closes, to
/// see whether busy-polling does its job on a given machine.
#[derive(Debug, Default)]
struct Waits {
    /// Slept waiting for the client's next request.
    client: u64,
    /// Slept with device I/O in flight on the ring.
    device: u64,
    /// Slept with replies waiting for room in the socket.
    socket: u64,
    /// The polling window collapsed to zero (polling turned off until work comes quickly).
    window_off: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transmission<S> {
    /// Does all the work there is without waiting: replies of finished requests, the
    /// socket's writes and (with `reading`) reads, new requests started. `Ready` only for
    /// what needs the async loop ([`Event`]); `Pending` with wakeups registered otherwise.
    fn poll_step(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<Event> {
        let mut rounds = 0;
        while rounds < ROUNDS_PER_POLL {
            let mut progress = self.poll_results(cx);
            match self.poll_write(cx) {
                Ok(p) => progress |= p,
                Err(e) => {
                    self.fail_writes();
                    if reading {
                        return Poll::Ready(Event::End(end_of(ConnError::Io(e))));
                    }
                    progress = true;
                }
            }
            if reading {
                match self.poll_read(cx) {
                    ReadStep::Progress => progress = true,
                    ReadStep::Idle => {}
                    ReadStep::Event(event) => {
                        self.submit();
                        return Poll::Ready(event);
                    }
                }
            }
            self.submit();
            if progress {
                if let Some((since, cap)) = self.idle_since.take() {
                    self.adapt(since.elapsed(), cap);
                }
                rounds += 1;
                continue;
            }
            if !self.busy_polls() {
                break;
            }
            let now = Instant::now();
            let cap = self.poll_cap();
            let (since, _) = *self.idle_since.get_or_insert((now, cap));
            if now.duration_since(since) >= self.poll_window.min(cap) {
                self.count_wait();
                break;
            }
            self.spinning = true;
            std::hint::spin_loop();
        }
        self.spinning = false;
        if rounds == ROUNDS_PER_POLL {
            // Plenty done: let other tasks run, and come back.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Counts a sleep by what the connection waits for.
    fn count_wait(&mut self) {
        if !self.out.is_empty() {
            self.waits.socket += 1;
        } else if self.queued.is_empty() {
            self.waits.client += 1;
        } else {
            self.waits.device += 1;
        }
    }

    /// Whether to poll on instead of sleeping when there is nothing to do: with a budget,
    /// on a plain socket (whose descriptor can be read without the reactor), while the
    /// client is still there. How long is [`Transmission::poll_window`]'s business.
    ///
    /// Sleeping costs two wakeups per request (the device's completion, the client's
    /// next request); on a virtual machine, waking an idle vCPU costs tens of
    /// microseconds, so a short poll turns that into latency and IOPS (QEMU's adaptive
    /// AioContext polling makes the same trade).
    fn busy_polls(&self) -> bool {
        !self.busy_poll.is_zero() && self.socket.is_some() && !self.write_failed
    }

    /// The most the connection polls now: [`Transmission::busy_poll`] while it waits for
    /// its client, [`INFLIGHT_POLL_FACTOR`] times that while device I/O is in flight, and
    /// nothing while replies wait for room in the socket: only the client reading them
    /// makes progress then, and a spinning thread would take the CPU it needs (large
    /// reads on a small machine).
    fn poll_cap(&self) -> Duration {
        if !self.out.is_empty() {
            Duration::ZERO
        } else if self.queued.is_empty() {
            self.busy_poll
        } else {
            self.busy_poll * INFLIGHT_POLL_FACTOR
        }
    }

    /// Adapts the polling window to `idle`, the time the connection last waited for work
    /// (polling and sleeping) when it could poll up to `cap`: polling that would have
    /// caught the work grows the window (up to `cap`), a wait longer than the most we
    /// would poll halves it. So a connection polls while its client and device answer
    /// quickly, and stops spending CPU on one that is idle or waits on a slow device.
    fn adapt(&mut self, idle: Duration, cap: Duration) {
        // A wait for the client to read our replies says nothing about polling.
        if cap.is_zero() || idle <= self.poll_window.min(cap) {
            return;
        }
        if idle > cap {
            self.poll_window /= 2;
            if self.poll_window < MIN_POLL_WINDOW {
                if !self.poll_window.is_zero() {
                    self.waits.window_off += 1;
                }
                self.poll_window = Duration::ZERO;
            }
        } else {
            self.poll_window = (self.poll_window * 2).max(MIN_POLL_WINDOW).min(cap);
        }
    }

    /// Hands ops started on the queue to the device.
    fn submit(&mut self) {
        if self.unsubmitted {
            if let Some(q) = self.queue.as_mut() {
                q.submit();
            }
            self.unsubmitted = false;
        }
    }

    /// Moves finished requests' replies to `out`: from the queue and from the channel.
    fn poll_results(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        if let Some(q) = self.queue.as_mut() {
            if q.in_flight() > 0 && q.poll_complete(cx, &mut self.done).is_ready() {
                for done in std::mem::take(&mut self.done) {
                    if let Some(incoming) = self.queued.remove(&done.tag) {
                        let reply = queued_reply(&self.ctx, incoming, done);
                        self.out.push_back(reply);
                    }
                }
                progress = true;
            }
        }
        while let Poll::Ready(Some(batch)) = self.rx.poll_recv(cx) {
            self.out.extend(batch);
            progress = true;
        }
        if self.write_failed {
            self.fail_writes();
        }
        progress
    }

    /// Drops every queued reply (the client is gone), releasing what they held.
    fn fail_writes(&mut self) {
        self.write_failed = true;
        while let Some(o) = self.out.pop_front() {
            self.release(&o);
        }
        self.written = 0;
        self.flush_pending = false;
    }

    fn release(&mut self, o: &Outgoing) {
        self.requests -= 1;
        self.bytes -= o.cost as usize;
    }

    /// Writes queued replies, vectored, until the socket would block; then flushes.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut progress = false;
        while !self.out.is_empty() {
            let n = {
                let mut slices: Vec<io::IoSlice<'_>> = Vec::with_capacity(MAX_IOVECS);
                let mut skip = self.written;
                let mut total = 0usize;
                'fill: for o in &self.out {
                    for i in 0..o.frames.len() {
                        let f = o.frame(i);
                        if skip >= f.len() {
                            skip -= f.len();
                            continue;
                        }
                        slices.push(io::IoSlice::new(&f[skip..]));
                        total += f.len() - skip;
                        skip = 0;
                        if slices.len() == MAX_IOVECS || total >= WRITE_GATHER {
                            break 'fill;
                        }
                    }
                }
                let polled = if self.stream.is_write_vectored() || slices.len() == 1 {
                    Pin::new(&mut self.stream).poll_write_vectored(cx, &slices)
                } else {
                    // One write per piece would make one TLS record per piece: gather
                    // them first.
                    self.stage.clear();
                    for s in &slices {
                        self.stage.extend_from_slice(s);
                    }
                    Pin::new(&mut self.stream).poll_write(cx, &self.stage)
                };
                match polled {
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => return Ok(progress),
                }
            };
            progress = true;
            self.flush_pending = true;
            let mut n = n;
            while n > 0 {
                let rest = self.out[0].len() - self.written;
                if n < rest {
                    self.written += n;
                    break;
                }
                n -= rest;
                self.written = 0;
                let o = self.out.pop_front().expect("a reply was written");
                self.release(&o);
            }
            // An empty reply (none are) would stay at the front: skip such.
            while self.out.front().is_some_and(|o| o.len() == 0) {
                let o = self.out.pop_front().expect("present");
                self.release(&o);
            }
        }
        if self.flush_pending {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flush_pending = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(progress)
    }

    /// Parses and starts what the read buffer holds, then reads more from the socket.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> ReadStep {
        let mut batch = Vec::new();
        let parsed = self.parse(&mut batch);
        let started = !batch.is_empty();
        if started {
            self.start(batch);
        }
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => return ReadStep::Event(Event::End(End::Failed(e))),
        };
        match parsed {
            Parsed::More => {}
            Parsed::Blocked if started => return ReadStep::Progress,
            Parsed::Blocked => return ReadStep::Idle,
            Parsed::Refresh => return ReadStep::Event(Event::Refresh),
            Parsed::Disconnect => return ReadStep::Event(Event::End(End::Disconnect)),
        }
        // Read more: straight into a large payload when nothing else is buffered.
        let direct = self.rpos == self.rend
            && self
                .partial
                .as_ref()
                .is_some_and(|(inc, filled)| inc.payload.len() - filled >= self.rbuf.len() / 2);
        let polled = if direct {
            let (inc, filled) = self.partial.as_mut().expect("checked");
            let socket = self.socket.filter(|_| self.spinning);
            let polled = read_some(&mut self.stream, cx, socket, &mut inc.payload[*filled..]);
            if let Poll::Ready(Ok(n)) = polled {
                *filled += n;
            }
            polled
        } else {
            if self.rpos == self.rend {
                self.rpos = 0;
                self.rend = 0;
            } else if self.rpos > 0 && self.rbuf.len() - self.rend < REQUEST_LEN {
                self.rbuf.copy_within(self.rpos..self.rend, 0);
                self.rend -= self.rpos;
                self.rpos = 0;
            }
            let socket = self.socket.filter(|_| self.spinning);
            let polled = read_some(&mut self.stream, cx, socket, &mut self.rbuf[self.rend..]);
            if let Poll::Ready(Ok(n)) = polled {
                self.rend += n;
            }
            polled
        };
        match polled {
            Poll::Ready(Ok(0)) => ReadStep::Event(Event::End(End::ClientGone)),
            Poll::Ready(Ok(_)) => ReadStep::Progress,
            Poll::Ready(Err(e)) => ReadStep::Event(Event::End(end_of(ConnError::Io(e)))),
            Poll::Pending if started => ReadStep::Progress,
            Poll::Pending => ReadStep::Idle,
        }
    }

    /// Takes every whole request out of the read buffer, as far as the in-flight limits
    /// allow, into `batch`. A request's length is checked before anything is allocated
    /// for it; a refused write's payload is skipped, not buffered.
    fn parse(&mut self, batch: &mut Vec<Incoming>) -> Result<Parsed, ConnError> {
        loop {
            let avail = self.rend - self.rpos;
            if self.skip > 0 {
                let n = self.skip.min(avail as u64) as usize;
                self.rpos += n;
                self.skip -= n as u64;
                if self.skip > 0 {
                    return Ok(Parsed::More);
                }
                continue;
            }
            if let Some((inc, filled)) = self.partial.as_mut() {
                let n = (inc.payload.len() - *filled).min(avail);
                inc.payload[*filled..*filled + n]
                    .copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
                *filled += n;
                self.rpos += n;
                if *filled < inc.payload.len() {
                    return Ok(Parsed::More);
                }
                let (inc, _) = self.partial.take().expect("present");
                batch.push(inc);
                continue;
            }
            if avail < REQUEST_LEN {
                return Ok(Parsed::More);
            }
            // A bad magic means we lost track of the stream: nothing sensible can follow.
            let req = Request::decode(&self.rbuf[self.rpos..self.rpos + REQUEST_LEN])?;
            if req.command == Command::Disc {
                self.rpos += REQUEST_LEN;
                return Ok(Parsed::Disconnect);
            }
            let verdict = self.ctx.check(&req);
            if verdict.is_err() && !self.refreshed && self.ctx.past_end(&req) {
                return Ok(Parsed::Refresh);
            }
            let cost = match (req.command, verdict) {
                (Command::Read, Ok(())) | (Command::Write, Ok(())) => req.length,
                _ => 0,
            };
            if self.requests >= self.max_requests || self.bytes + cost as usize > self.max_bytes {
                return Ok(Parsed::Blocked);
            }
            self.rpos += REQUEST_LEN;
            self.refreshed = false;
            self.requests += 1;
            self.bytes += cost as usize;
            let mut incoming = Incoming {
                req,
                verdict,
                payload: IoBuf::empty(),
                cost,
            };
            if req.command == Command::Write {
                if verdict.is_ok() {
                    incoming.payload = self.ctx.bufs.take(req.length as usize);
                    self.partial = Some((incoming, 0));
                } else {
                    // Keep the stream in sync without holding the (maybe huge) payload.
                    self.skip = req.length as u64;
                    batch.push(incoming);
                }
                continue;
            }
            batch.push(incoming);
        }
    }

    /// Starts the requests parsed together: plain reads and writes on the queue (when the
    /// export has one and no QoS limit), else reads as one batch on the blocking pool;
    /// everything else through [`dispatch`] one by one.
    fn start(&mut self, batch: Vec<Incoming>) {
        let ctx = &self.ctx;
        let unlimited = ctx.target.qos().is_unlimited();
        if let (Some(queue), true) = (self.queue.as_mut(), unlimited) {
            for mut incoming in batch {
                let queued = match incoming.req.command {
                    Command::Read => true,
                    // FUA needs a flush after the write: the blocking path does both.
                    Command::Write => !incoming.req.has_flag(NBD_CMD_FLAG_FUA),
                    _ => false,
                };
                if incoming.verdict.is_err() || !queued {
                    dispatch(ctx, incoming, &self.tx, &self.stop);
                    continue;
                }
                let tag = self.next_tag;
                self.next_tag += 1;
                let offset = incoming.req.offset;
                let started = if incoming.req.command == Command::Write {
                    let data = std::mem::replace(&mut incoming.payload, IoBuf::empty());
                    queue.start_write(tag, offset, data)
                } else {
                    let buf = ctx.bufs.take(incoming.req.length as usize);
                    queue.start(tag, offset, buf)
                };
                match started {
                    QueueStart::Started => {
                        self.queued.insert(tag, incoming);
                        self.unsubmitted = true;
                    }
                    QueueStart::Done(done) => self.out.push_back(queued_reply(ctx, incoming, done)),
                    QueueStart::Declined(buf) => {
                        if incoming.req.command == Command::Write {
                            incoming.payload = buf;
                        }
                        run_blocking(ctx.clone(), incoming, self.tx.clone());
                    }
                }
            }
            return;
        }
        if batch.len() == 1 || ctx.nonblocking || !unlimited {
            for incoming in batch {
                dispatch(ctx, incoming, &self.tx, &self.stop);
            }
            return;
        }
        let mut reads = Vec::new();
        for incoming in batch {
            if incoming.verdict.is_ok() && incoming.req.command == Command::Read {
                reads.push(incoming);
            } else {
                dispatch(ctx, incoming, &self.tx, &self.stop);
            }
        }
        match reads.len() {
            0 => {}
            1 => dispatch(ctx, reads.pop().expect("one read"), &self.tx, &self.stop),
            _ => run_read_batch(ctx.clone(), reads, self.tx.clone()),
        }
    }

    /// Whether every request read has been answered (or dropped with the client).
    fn idle(&self) -> bool {
        self.requests == 0 && !self.flush_pending
    }
}

pub(super) async fn transmit<S>(
    shared: &Arc<Shared>,
    session: Session,
    stream: S,
    mut stop: watch::Receiver<Stop>,
    socket: Option<RawFd>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = &shared.config;
    let span = tracing::info_span!("transmission", export = %session.export);
    let ctx = Arc::new(RequestCtx {
        target: session.target.clone(),
        export: session.export.clone(),
        size: AtomicU64::new(session.size),
        flags: session.flags,
        structured: session.structured,
        base_allocation: session.base_allocation,
        strict_alignment: session.strict_alignment,
        nonblocking: session.target.nonblocking(),
        limiter: shared.limiter(&session.export),
        bufs: BufPool::new(),
    });
    // Reads and plain writes complete asynchronously on this task when the target offers
    // a queue.
    let queue = {
        let target = ctx.target.clone();
        blocking(move || target.io_queue()).await.ok().flatten()
    };
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Outgoing>>();
    let mut conn = Transmission {
        ctx: ctx.clone(),
        stream,
        rbuf: vec![0u8; READ_BUFFER].into_boxed_slice(),
        rpos: 0,
        rend: 0,
        partial: None,
        skip: 0,
        refreshed: false,
        out: VecDeque::new(),
        written: 0,
        stage: Vec::new(),
        flush_pending: false,
        write_failed: false,
        requests: 0,
        bytes: 0,
        max_requests: config.max_requests_in_flight,
        max_bytes: config.max_bytes_in_flight,
        queue,
        queued: FxHashMap::default(),
        next_tag: 0,
        unsubmitted: false,
        done: Vec::new(),
        tx,
        rx,
        stop: stop.clone(),
        socket,
        busy_poll: config.busy_poll,
        poll_window: Duration::ZERO,
        idle_since: None,
        spinning: false,
        waits: Waits::default(),
    };

    let end = async {
        loop {
            let event = tokio::select! {
                biased;
                _ = stop.wait_for(|st| *st != Stop::Run) => Event::End(End::Stopped),
                event = std::future::poll_fn(|cx| conn.poll_step(cx, true)) => event,
            };
            match event {
                Event::Refresh => {
                    conn.ctx.refresh_size().await;
                    conn.refreshed = true;
                }
                Event::End(end) => return end,
            }
        }
    }
    .instrument(span.clone())
    .await;

    // Let in-flight requests finish and their replies be written.
    let drained = tokio::time::timeout(
        config.drain_timeout,
        std::future::poll_fn(|cx| match conn.poll_step(cx, false) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending if conn.idle() => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }),
    )
    .await
    .is_ok();
    if !drained {
        warn!(parent: &span, "in-flight requests did not finish in time; closing anyway");
    }
    if matches!(end, End::Stopped) {
        // Graceful close: what was acknowledged must be durable before we let go.
        let target = ctx.target.clone();
        match blocking(move || target.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(errno)) => warn!(parent: &span, error = %errno, "flush on close failed"),
            Err(_) => warn!(parent: &span, "flush on close panicked"),
        }
    }
    if !conn.write_failed {
        // Orderly close (TLS close_notify); the peer may be gone already.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.stream.shutdown()).await;
    }
    debug!(
        parent: &span,
        sleeps_for_client = conn.waits.client,
        sleeps_for_device = conn.waits.device,
        sleeps_for_socket = conn.waits.socket,
        polling_turned_off = conn.waits.window_off,
        poll_window_us = conn.poll_window.as_micros() as u64,
        "connection closed: busy-polling sleeps"
    );
    // Ops still on the queue (a drain that timed out) are waited for as it drops.
    drop(conn);
    drop(session);
    match end {
        End::Disconnect => {
            debug!(parent: &span, "client sent NBD_CMD_DISC");
            Ok(())
        }
        End::Stopped => {
            info!(parent: &span, "connection closed by server");
            Ok(())
        }
        End::ClientGone => Ok(()),
        End::Failed(err) => Err(err),
    }
}

/// Reads into `buf` through the stream; when the reactor has no readiness and `socket`
/// is given (busy-polling), straight from the descriptor (see [`read_socket`]).
fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    socket: Option<RawFd>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut rb = ReadBuf::new(buf);
    match Pin::new(stream).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => match socket {
            Some(fd) => read_socket(fd, buf),
            None => Poll::Pending,
        },
    }
}

/// Reads from the socket `fd` without waiting, behind the reactor's back: while
/// busy-polling, data that arrived since the reactor last looked is there before the
/// reactor says so. The reactor's own readiness stays right: it is only cleared by a
/// read that would block, and every byte arriving after such a read signals it again.
fn read_socket(fd: RawFd, buf: &mut [u8]) -> Poll<io::Result<usize>> {
    // SAFETY: `fd` is the connection's socket, open for as long as the transmission
    // holds its stream; recv writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n >= 0 {
        return Poll::Ready(Ok(n as usize));
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Poll::Pending,
        _ => Poll::Ready(Err(err)),
    }
}

/// The reply to a read or write finished by an [`IoQueue`].
fn queued_reply(ctx: &RequestCtx, incoming: Incoming, read: QueueDone) -> Outgoing {
    let req = incoming.req;
    let outcome = match read.result {
        Ok(()) if req.command == Command::Write => Outcome::Done,
        Ok(()) => {
            let len = read.buf.len();
            let sparse = ctx.structured && !req.has_flag(NBD_CMD_FLAG_DF);
            let segments = if len == 0 {
                Vec::new()
            } else if sparse {
                plan_read(len, &zero_extents(len, &read.zeros))
            } else {
                vec![Segment::Data(0..len)]
            };
            Outcome::Read {
                buf: read.buf,
                segments,
            }
        }
        Err(errno) => {
            debug!(export = %ctx.export, command = %req.command, offset = req.offset, length = req.length, error = %errno, "request failed");
            Outcome::Error {
                error: errno.nbd_error(),
                message: format!("{} failed: {errno}", req.command),
            }
        }
    };
    let (frames, buf) = encode_outcome(ctx, &req, outcome);
    Outgoing {
        frames,
        buf,
        cost: incoming.cost,
    }
}

/// Extents of a buffer of `len` bytes whose `zeros` ranges (ascending) are holes.
fn zero_extents(len: usize, zeros: &[Range<usize>]) -> Vec<Extent> {
    let mut out = Vec::with_capacity(zeros.len() * 2 + 1);
    let mut pos = 0usize;
    for z in zeros {
        if z.start > pos {
            out.push(Extent {
                len: (z.start - pos) as u64,
                kind: ExtentKind::Data,
            });
        }
        out.push(Extent {
            len: (z.end - z.start) as u64,
            kind: ExtentKind::Hole,
        });
        pos = z.end;
    }
    if pos < len {
        out.push(Extent {
            len: (len - pos) as u64,
            kind: ExtentKind::Data,
        });
    }
    out
}

/// Runs validated reads as one batch on the blocking pool and queues their replies
/// together.
fn run_read_batch(
    ctx: Arc<RequestCtx>,
    batch: Vec<Incoming>,
    tx: mpsc::UnboundedSender<Vec<Outgoing>>,
) {
    tokio::task::spawn_blocking(move || {
        let reqs: Vec<Request> = batch.iter().map(|i| i.req).collect();
        let outcomes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_batch(&ctx, &reqs)
        }))
        .unwrap_or_else(|_| {
            warn!(export = %ctx.export, requests = reqs.len(), "batched target read panicked");
            reqs.iter()
                .map(|_| Outcome::Error {
                    error: NBD_EIO,
                    message: "read failed: internal error".to_owned(),
                })
                .collect()
        });
        let replies = batch
            .into_iter()
            .zip(outcomes)
            .map(|(incoming, outcome)| {
                let (frames, buf) = encode_outcome(&ctx, &incoming.req, outcome);
                Outgoing {
                    frames,
                    buf,
                    cost: incoming.cost,
                }
            })
            .collect();
        // If the writer is gone the client is too; the permits drop with the message.
        let _ = tx.send(replies);
    });
}

/// Reads for several validated read requests: zero segments planned per request as in
/// [`read`], then every data segment of the batch in one [`ExportTarget::read_many`].
fn read_batch(ctx: &RequestCtx, reqs: &[Request]) -> Vec<Outcome> {
    let target = &*ctx.target;
    let mut bufs: Vec<IoBuf> = reqs
        .iter()
        .map(|r| ctx.bufs.take(r.length as usize))
        .collect();
    let segments: Vec<Vec<Segment>> = reqs
        .iter()
        .map(|r| {
            let len = r.length as usize;
            let sparse = ctx.structured && !r.has_flag(NBD_CMD_FLAG_DF);
            if len == 0 {
                Vec::new()
            } else if sparse {
                match target.block_status(r.offset, len as u64) {
                    Ok(extents) => plan_read(len, &extents),
                    Err(_) => vec![Segment::Data(0..len)],
                }
            } else {
                vec![Segment::Data(0..len)]
            }
        })
        .collect();
    let mut failed: Vec<Option<Errno>> = vec![None; reqs.len()];
    {
        let mut ranges: Vec<(u64, &mut [u8])> = Vec::with_capacity(reqs.len());
        let mut owner: Vec<usize> = Vec::with_capacity(reqs.len());
        for (i, (buf, segs)) in bufs.iter_mut().zip(&segments).enumerate() {
            let mut rest: &mut [u8] = buf;
            let mut consumed = 0usize;
            for seg in segs {
                if let Segment::Data(r) = seg {
                    let tail = std::mem::take(&mut rest);
                    let (_, tail) = tail.split_at_mut(r.start - consumed);
                    let (mine, tail) = tail.split_at_mut(r.len());
                    rest = tail;
                    consumed = r.end;
                    ranges.push((reqs[i].offset + r.start as u64, mine));
                    owner.push(i);
                }
            }
        }
        let results = target.read_many(&mut ranges);
        for (i, result) in owner.into_iter().zip(results) {
            if let Err(errno) = result {
                failed[i].get_or_insert(errno);
            }
        }
    }
    reqs.iter()
        .zip(bufs.into_iter().zip(segments))
        .zip(failed)
        .map(|((req, (buf, segments)), failed)| match failed {
            None => Outcome::Read { buf, segments },
            Some(errno) => {
                debug!(export = %ctx.export, command = %req.command, offset = req.offset, length = req.length, error = %errno, "request failed");
                Outcome::Error {
                    error: errno.nbd_error(),
                    message: format!("{} failed: {errno}", req.command),
                }
            }
        })
        .collect()
}

/// Starts a request: rejected ones are answered at once; valid ones run on the blocking
/// pool, which also encodes and queues the reply (one thread hop per request). Only a
/// request that must wait for QoS tokens gets an async task for the wait.
fn dispatch(
    ctx: &Arc<RequestCtx>,
    incoming: Incoming,
    tx: &mpsc::UnboundedSender<Vec<Outgoing>>,
    stop: &watch::Receiver<Stop>,
) {
    let req = incoming.req;
    if let Err(rej) = incoming.verdict {
        debug!(command = %req.command, offset = req.offset, length = req.length, error = rej.error, reason = rej.message, "request rejected");
        let outcome = Outcome::Error {
            error: rej.error,
            message: rej.message.to_owned(),
        };
        send_reply(ctx, tx, &req, outcome, incoming.cost);
        return;
    }
    let qos = qos_cost(&req).and_then(|bytes| {
        let limits = ctx.target.qos();
        (!limits.is_unlimited()).then_some((limits, bytes))
    });
    let Some((limits, bytes)) = qos else {
        run_blocking(ctx.clone(), incoming, tx.clone());
        return;
    };
    let (ctx, tx, mut stop) = (ctx.clone(), tx.clone(), stop.clone());
    tokio::spawn(
        async move {
            let admitted = tokio::select! {
                biased;
                _ = ctx.limiter.admit(limits, bytes) => true,
                _ = stop.wait_for(|st| *st != Stop::Run) => false,
            };
            if admitted {
                run_blocking(ctx, incoming, tx);
            } else {
                let outcome = Outcome::Error {
                    error: NBD_ESHUTDOWN,
                    message: "server is closing the connection".to_owned(),
                };
                send_reply(&ctx, &tx, &req, outcome, incoming.cost);
            }
        }
        .instrument(tracing::Span::current()),
    );
}

/// What a request costs in QoS terms (payload bytes), or None if it is not limited.
fn qos_cost(req: &Request) -> Option<u64> {
    match req.command {
        Command::Read | Command::Write => Some(req.length as u64),
        Command::Trim | Command::WriteZeroes => Some(0),
        // Flush, block status and cache are not the I/O the limits are about.
        _ => None,
    }
}

fn send_reply(
    ctx: &RequestCtx,
    tx: &mpsc::UnboundedSender<Vec<Outgoing>>,
    req: &Request,
    outcome: Outcome,
    cost: u32,
) {
    let (frames, buf) = encode_outcome(ctx, req, outcome);
    // If the writer is gone the client is too; the permits drop with the message.
    let _ = tx.send(vec![Outgoing { frames, buf, cost }]);
}

/// Runs a validated request on the blocking pool and queues its reply from there.
///
/// A target that declares itself non-blocking ([`ExportTarget::nonblocking`]) is called
/// inline instead for requests up to [`INLINE_MAX`] bytes: the hop to the blocking pool
/// and back costs more than such a call (measured 3-5x fewer 4 KiB IOPS with the hop on
/// the memory target).
fn run_blocking(
    ctx: Arc<RequestCtx>,
    incoming: Incoming,
    tx: mpsc::UnboundedSender<Vec<Outgoing>>,
) {
    let inline = ctx.nonblocking && incoming.req.length <= INLINE_MAX;
    let run = move || {
        let Incoming {
            req, payload, cost, ..
        } = incoming;
        // A panicking target must still produce a reply, or the client waits forever.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(&ctx, req, payload)))
                .unwrap_or_else(|_| {
                    warn!(export = %ctx.export, command = %req.command, "target call panicked");
                    Outcome::Error {
                        error: NBD_EIO,
                        message: format!("{} failed: internal error", req.command),
                    }
                });
        send_reply(&ctx, &tx, &req, outcome, cost);
    };
    if inline {
        run();
    } else {
        tokio::task::spawn_blocking(run);
    }
}

/// Runs a validated request against the target. Blocking: call on the blocking pool.
fn execute(ctx: &RequestCtx, req: Request, payload: IoBuf) -> Outcome {
    let target = &*ctx.target;
    let offset = req.offset;
    let len = req.length as u64;
    let fua = req.has_flag(NBD_CMD_FLAG_FUA);
    let command = req.command;
    let flush_if_fua = || if fua { target.flush() } else { Ok(()) };
    let result: Result<Outcome, Errno> = match command {
        Command::Read => {
            let sparse = ctx.structured && !req.has_flag(NBD_CMD_FLAG_DF);
            read(target, ctx.bufs.take(len as usize), offset, sparse)
        }
        Command::Write => target
            .write(offset, &payload)
            .and_then(|()| flush_if_fua())
            .map(|()| Outcome::Done),
        Command::Flush => target.flush().map(|()| Outcome::Done),
        Command::Trim if len == 0 => Ok(Outcome::Done),
        Command::Trim => target
            .discard(offset, len)
            .and_then(|()| flush_if_fua())
            .map(|()| Outcome::Done),
        Command::WriteZeroes => {
            let no_hole = req.has_flag(NBD_CMD_FLAG_NO_HOLE);
            let fast = req.has_flag(NBD_CMD_FLAG_FAST_ZERO);
            if fast && (no_hole || !target.punch_is_fast()) {
                // Fail fast, before touching anything (spec: SHOULD NOT alter contents).
                return Outcome::Error {
                    error: NBD_ENOTSUP,
                    message: "zeroing would not be faster than writing".to_owned(),
                };
            }
            if len == 0 {
                return Outcome::Done;
            }
            let mode = if no_hole {
                ZeroMode::Allocate
            } else {
                ZeroMode::Punch
            };
            target
                .write_zeroes(offset, len, mode)
                .and_then(|()| flush_if_fua())
                .map(|()| Outcome::Done)
        }
        Command::BlockStatus => {
            let req_one = req.has_flag(NBD_CMD_FLAG_REQ_ONE);
            target
                .block_status(offset, len)
                .map(|extents| Outcome::BlockStatus(status_descriptors(len, &extents, req_one)))
        }
        Command::Cache => Ok(Outcome::Done),
        Command::Disc | Command::Unknown(_) => Ok(Outcome::Error {
            error: NBD_EINVAL,
            message: "unknown command".to_owned(),
        }),
    };
    result.unwrap_or_else(|errno| {
        debug!(export = %ctx.export, command = %command, offset, length = len, error = %errno, "request failed");
        Outcome::Error {
            error: errno.nbd_error(),
            message: format!("{command} failed: {errno}"),
        }
    })
}

/// Reads `len` bytes at `offset`; with `sparse`, ranges the target reports as zeros are
/// not read and become hole chunks.
fn read(
    target: &dyn ExportTarget,
    mut buf: IoBuf,
    offset: u64,
    sparse: bool,
) -> Result<Outcome, Errno> {
    let len = buf.len();
    if len == 0 {
        return Ok(Outcome::Read {
            buf,
            segments: Vec::new(),
        });
    }
    let segments = if sparse {
        // Block status is only an optimisation here: if it fails, read everything.
        match target.block_status(offset, len as u64) {
            Ok(extents) => plan_read(len, &extents),
            Err(_) => vec![Segment::Data(0..len)],
        }
    } else {
        vec![Segment::Data(0..len)]
    };
    for seg in &segments {
        if let Segment::Data(r) = seg {
            target.read(offset + r.start as u64, &mut buf[r.clone()])?;
        }
    }
    Ok(Outcome::Read { buf, segments })
}

/// Cuts a read of `len` bytes into data and zero segments following `extents`. Whatever
/// the extents do not cover is data; zero-length extents are skipped.
pub(super) fn plan_read(len: usize, extents: &[Extent]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let mut pos = 0usize;
    for ext in extents {
        if pos >= len {
            break;
        }
        let n = ext.len.min((len - pos) as u64) as usize;
        if n == 0 {
            continue;
        }
        let zero = matches!(ext.kind, ExtentKind::Zero | ExtentKind::Hole);
        match (out.last_mut(), zero) {
            (Some(Segment::Zero(r)), true) | (Some(Segment::Data(r)), false) => r.end += n,
            (_, true) => out.push(Segment::Zero(pos..pos + n)),
            (_, false) => out.push(Segment::Data(pos..pos + n)),
        }
        pos += n;
    }
    if pos < len {
        match out.last_mut() {
            Some(Segment::Data(r)) => r.end = len,
            _ => out.push(Segment::Data(pos..len)),
        }
    }
    if out.len() > MAX_READ_SEGMENTS {
        return vec![Segment::Data(0..len)];
    }
    out
}

/// `base:allocation` descriptors for a block status request of `len` bytes.
pub(super) fn status_descriptors(
    len: u64,
    extents: &[Extent],
    req_one: bool,
) -> Vec<BlockDescriptor> {
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut pos = 0u64;
    for ext in extents {
        if pos >= len || out.len() >= MAX_EXTENTS {
            break;
        }
        // Clipped to the request, which fits 32 bits, so every length fits too.
        let n = ext.len.min(len - pos);
        if n == 0 {
            continue;
        }
        let flags = match ext.kind {
            ExtentKind::Data => 0,
            ExtentKind::Zero => NBD_STATE_ZERO,
            ExtentKind::Hole => NBD_STATE_HOLE | NBD_STATE_ZERO,
        };
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += n as u32,
            _ => out.push(BlockDescriptor {
                length: n as u32,
                flags,
            }),
        }
        pos += n;
    }
    if out.is_empty() {
        // The target told us nothing: "allocated, contents unknown" is always correct.
        out.push(BlockDescriptor {
            length: len as u32,
            flags: 0,
        });
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Encodes an outcome as the reply the session calls for.
fn encode_outcome(ctx: &RequestCtx, req: &Request, outcome: Outcome) -> (Vec<Frame>, IoBuf) {
    let cookie = req.cookie;
    let simple = |error: u32| Frame::Bytes(SimpleReply { error, cookie }.encode().to_vec());
    let structured = |flags: u16, chunk: Chunk| {
        Frame::Bytes(
            StructuredReply {
                flags,
                cookie,
                chunk,
            }
            .encode(),
        )
    };
    match outcome {
        Outcome::Done => (vec![simple(0)], IoBuf::empty()),
        Outcome::Error { error, message } => {
            if ctx.structured {
                (
                    vec![structured(
                        NBD_REPLY_FLAG_DONE,
                        Chunk::Error { error, message },
                    )],
                    IoBuf::empty(),
                )
            } else {
                (vec![simple(error)], IoBuf::empty())
            }
        }
        Outcome::Read { buf, segments } => {
            if !ctx.structured {
                let frames = vec![simple(0), Frame::Data(0..buf.len())];
                return (frames, buf);
            }
            if segments.is_empty() {
                return (vec![structured(NBD_REPLY_FLAG_DONE, Chunk::None)], buf);
            }
            let last = segments.len() - 1;
            let mut frames = Vec::with_capacity(segments.len() * 2);
            for (i, seg) in segments.into_iter().enumerate() {
                // All data is in hand, so no error can follow: the last content chunk
                // may carry DONE (saves an NBD_REPLY_TYPE_NONE chunk).
                let flags = if i == last { NBD_REPLY_FLAG_DONE } else { 0 };
                match seg {
                    Segment::Data(r) => {
                        frames.push(Frame::Bytes(
                            encode_offset_data_prefix(
                                flags,
                                cookie,
                                req.offset + r.start as u64,
                                r.len() as u32,
                            )
                            .to_vec(),
                        ));
                        frames.push(Frame::Data(r));
                    }
                    Segment::Zero(r) => frames.push(structured(
                        flags,
                        Chunk::OffsetHole {
                            offset: req.offset + r.start as u64,
                            len: r.len() as u32,
                        },
                    )),
                }
            }
            (frames, buf)
        }
        Outcome::BlockStatus(descriptors) => (
            vec![structured(
                NBD_REPLY_FLAG_DONE,
                Chunk::BlockStatus {
                    context_id: BASE_ALLOCATION_ID,
                    descriptors,
                },
            )],
            IoBuf::empty(),
        ),
    }
}
