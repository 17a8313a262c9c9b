//! The bridge between the engine and the NBD server: which images clients may open, and
//! how NBD requests become engine calls.
//!
//! Invariants:
//! - only images the API exported (`Engine::exported_images`, persisted) can be opened;
//!   everything else answers "unknown export", exactly like a name that does not exist;
//! - `VOL@SNAP` opens read-only; the engine refuses writes to it as well (defence in depth);
//! - every request is recorded in the per-image metrics (ops, bytes, latency, errors);
//! - QoS limits are read from the engine on every request, so `set_qos` applies at once;
//! - reads, and writes that overwrite chunks the volume already owns, may complete
//!   asynchronously ([`EngineIoQueue`]): planned by the engine, done on the connection's own
//!   io_uring ring, each holding a [`ReadPin`] (the pool's reclaim lock, shared) or a
//!   [`WritePin`] (also the lineage's writer gate, so no snapshot starts under it) from plan
//!   to completion, as the synchronous calls hold those locks. The ring owns each op's
//!   buffer until it completes; the queue's `Drop` waits for the ring's I/O before the
//!   pins go. Writes that need fresh chunks or copy-on-write, and FUA writes, take the
//!   synchronous path.

use std::ops::Range;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::device::uring::{AsyncRing, RingDir, RingDone, RingSpan};
use crate::engine::{DeviceIo, Engine, EngineError, ImageHandle, ReadPin, WritePin};
use crate::metrics::{ImageIoMetrics, IoOp, Metrics};
use crate::nbd::buffers::BufHome;
use crate::nbd::{
    Errno, ExportListing, ExportRegistry, ExportTarget, Extent, ExtentKind, IoBuf, IoQueue,
    OpenError, QueueDone, QueueStart, ZeroMode,
};
use crate::qos::Qos;

/// Exported engine images, as the NBD server sees them.
#[derive(Clone)]
pub struct EngineExports {
    engine: Engine,
    metrics: Metrics,
}

impl std::fmt::Debug for EngineExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineExports")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl EngineExports {
    pub fn new(engine: Engine, metrics: Metrics) -> Self {
        EngineExports { engine, metrics }
    }
}

fn errno(e: &EngineError) -> Errno {
    Errno(e.errno())
}

impl ExportRegistry for EngineExports {
    fn open(&self, name: &str) -> Result<Arc<dyn ExportTarget>, OpenError> {
        if !self.engine.exported_images().iter().any(|n| n == name) {
            return Err(OpenError::NotFound);
        }
        let handle = match self.engine.open_image(name) {
            Ok(h) => h,
            Err(EngineError::NotFound { .. }) => return Err(OpenError::NotFound),
            Err(e) => return Err(OpenError::Io(errno(&e))),
        };
        Ok(Arc::new(EngineTarget {
            engine: self.engine.clone(),
            io: self.metrics.image_io(name),
            handle,
        }))
    }

    fn list(&self) -> Vec<ExportListing> {
        self.engine
            .exported_images()
            .into_iter()
            .map(|name| ExportListing {
                description: if name.contains('@') {
                    format!("blockd snapshot {name} (read-only)")
                } else {
                    format!("blockd volume {name}")
                },
                name,
            })
            .collect()
    }
}

/// One open image.
struct EngineTarget {
    engine: Engine,
    handle: ImageHandle,
    io: ImageIoMetrics,
}

impl EngineTarget {
    fn timed<T>(
        &self,
        op: IoOp,
        bytes: u64,
        f: impl FnOnce() -> Result<T, EngineError>,
    ) -> Result<T, Errno> {
        let start = Instant::now();
        match f() {
            Ok(v) => {
                self.io.record(op, bytes, start.elapsed());
                Ok(v)
            }
            Err(e) => {
                self.io.record_error(op);
                tracing::debug!(image = %self.handle.name(), error = %e, "NBD request failed");
                Err(errno(&e))
            }
        }
    }
}

impl ExportTarget for EngineTarget {
    fn size(&self) -> Result<u64, Errno> {
        self.engine.image_size(&self.handle).map_err(|e| errno(&e))
    }

    fn read_only(&self) -> bool {
        self.handle.read_only()
    }

    fn description(&self) -> String {
        format!("blockd image {}", self.handle.name())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let n = buf.len() as u64;
        self.timed(IoOp::Read, n, || {
            self.engine.read(&self.handle, offset, buf)
        })
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<(), Errno>> {
        let start = Instant::now();
        let results = self.engine.read_batch(&self.handle, reqs);
        // The batch completes as a whole: each request's latency is the batch's.
        let latency = start.elapsed();
        reqs.iter()
            .zip(results)
            .map(|((_, buf), result)| match result {
                Ok(()) => {
                    self.io.record(IoOp::Read, buf.len() as u64, latency);
                    Ok(())
                }
                Err(e) => {
                    self.io.record_error(IoOp::Read);
                    tracing::debug!(image = %self.handle.name(), error = %e, "NBD request failed");
                    Err(errno(&e))
                }
            })
            .collect()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.timed(IoOp::Write, data.len() as u64, || {
            self.engine.write(&self.handle, offset, data)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), Errno> {
        self.timed(IoOp::WriteZeroes, len, || match mode {
            // Holes read as zeros: whole chunks become holes, partial ones get zeros.
            ZeroMode::Punch => self.engine.write_zeroes(&self.handle, offset, len),
            // NO_HOLE: real zeros must stay allocated.
            ZeroMode::Allocate => {
                const STEP: u64 = 1 << 20;
                let zeros = vec![0u8; STEP.min(len) as usize];
                let mut done = 0;
                while done < len {
                    let n = STEP.min(len - done);
                    self.engine
                        .write(&self.handle, offset + done, &zeros[..n as usize])?;
                    done += n;
                }
                Ok(())
            }
        })
    }

    fn punch_is_fast(&self) -> bool {
        // Whole chunks are metadata-only; partial chunks need a small write, still fast.
        true
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.timed(IoOp::Trim, len, || {
            self.engine.discard(&self.handle, offset, len)
        })
    }

    fn flush(&self) -> Result<(), Errno> {
        self.timed(IoOp::Flush, 0, || self.engine.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        self.timed(IoOp::BlockStatus, 0, || {
            self.engine
                .block_status(&self.handle, offset, len)
                .map(|v| {
                    v.into_iter()
                        .map(|e| Extent {
                            len: e.len,
                            kind: if e.hole {
                                ExtentKind::Hole
                            } else {
                                ExtentKind::Data
                            },
                        })
                        .collect()
                })
        })
    }

    fn io_queue(&self) -> Option<Box<dyn IoQueue>> {
        let ring = self.engine.io_ring(&self.handle)?;
        let ring = AsyncRing::new(ring)
            .inspect_err(
                |e| tracing::debug!(error = %e, "Cannot poll an io_uring ring; reads stay synchronous"),
            )
            .ok()?;
        Some(Box::new(EngineIoQueue {
            ring,
            ops: FxHashMap::default(),
            done: Vec::new(),
            engine: self.engine.clone(),
            handle: self.handle.clone(),
            io: self.io.clone(),
        }))
    }

    fn qos(&self) -> Qos {
        let q = self.engine.image_qos(&self.handle);
        Qos {
            max_iops: q.max_iops,
            max_bandwidth_bytes: q.max_bandwidth_bytes,
        }
    }
}

/// What keeps the chunks of an op in flight owned by the image (released only after the
/// last device I/O of the op completed).
enum Pin {
    /// Only held, never read: dropping it releases the chunks.
    Read(#[allow(dead_code)] ReadPin),
    Write(WritePin),
}

/// A read or write in flight on an [`EngineIoQueue`]; its buffer is the ring's until the
/// op completes.
struct InFlight {
    home: BufHome,
    zeros: Vec<Range<usize>>,
    start: Instant,
    pin: Pin,
}

/// One connection's asynchronous reads and overwrites of an engine image, on its own
/// io_uring ring.
///
/// The ring owns each op's buffer until the op completes; the pins of ops in flight are
/// here, and [`Drop`] waits for the ring's I/O before they are released.
struct EngineIoQueue {
    ring: AsyncRing,
    /// By tag: sequential numbers, hashed cheaply (this is every request's path).
    ops: FxHashMap<u64, InFlight>,
    done: Vec<RingDone>,
    engine: Engine,
    handle: ImageHandle,
    io: ImageIoMetrics,
}

impl Drop for EngineIoQueue {
    fn drop(&mut self) {
        // The pins in `ops` keep the chunks under the ring's I/O owned by this image: the
        // I/O must be over before they go (fields drop after this).
        self.ring.ring().wait_idle();
    }
}

impl EngineIoQueue {
    fn finish(&self, tag: u64, op: InFlight, buf: IoBuf, error: Option<Errno>) -> QueueDone {
        let kind = match &op.pin {
            Pin::Read(_) => IoOp::Read,
            Pin::Write(pin) => {
                if error.is_none() {
                    self.engine.overwritten(pin);
                }
                IoOp::Write
            }
        };
        let result = match error {
            None => {
                self.io.record(kind, buf.len() as u64, op.start.elapsed());
                Ok(())
            }
            Some(errno) => {
                self.io.record_error(kind);
                tracing::debug!(image = %self.handle.name(), error = %errno, "NBD request failed");
                Err(errno)
            }
        };
        QueueDone {
            tag,
            result,
            buf,
            zeros: op.zeros,
        }
    }

    /// Hands `buf` to the ring for `spans`; the op completes in `poll_complete`, or at
    /// once when there is nothing to do on the device or the ring refuses it.
    fn start_op(
        &mut self,
        tag: u64,
        dir: RingDir,
        buf: IoBuf,
        spans: Vec<DeviceIo>,
        op: InFlight,
    ) -> QueueStart {
        if spans.is_empty() {
            return QueueStart::Done(self.finish(tag, op, buf, None));
        }
        let spans: Vec<RingSpan> = spans
            .into_iter()
            .map(|s| RingSpan {
                pos: s.pos,
                len: s.len,
                offset: s.offset,
            })
            .collect();
        let (mem, home) = buf.detach();
        match self.ring.ring().push(tag, dir, mem, &spans) {
            Ok(()) => {
                self.ops.insert(tag, InFlight { home, ..op });
                QueueStart::Started
            }
            Err((e, mem)) => {
                let buf = home.restore(mem);
                QueueStart::Done(self.finish(tag, op, buf, Some(Errno::from(e))))
            }
        }
    }
}

impl IoQueue for EngineIoQueue {
    fn start(&mut self, tag: u64, offset: u64, mut buf: IoBuf) -> QueueStart {
        // A commit waiting to release chunks: let the synchronous path wait for it.
        let Some(pin) = self.engine.try_read_pin(&self.handle) else {
            return QueueStart::Declined(buf);
        };
        let start = Instant::now();
        let (spans, zeros) = match self.engine.plan_read(&pin, &self.handle, offset, &mut buf) {
            Ok(planned) => planned,
            Err(e) => {
                self.io.record_error(IoOp::Read);
                tracing::debug!(image = %self.handle.name(), error = %e, "NBD request failed");
                return QueueStart::Done(QueueDone {
                    tag,
                    result: Err(errno(&e)),
                    buf,
                    zeros: Vec::new(),
                });
            }
        };
        let op = InFlight {
            home: BufHome::default(),
            zeros,
            start,
            pin: Pin::Read(pin),
        };
        self.start_op(tag, RingDir::Read, buf, spans, op)
    }

    fn start_write(&mut self, tag: u64, offset: u64, data: IoBuf) -> QueueStart {
        // A snapshot or a chunk release waiting: let the synchronous path wait for it.
        let Some(pin) = self.engine.try_write_pin(&self.handle) else {
            return QueueStart::Declined(data);
        };
        let start = Instant::now();
        let spans = match self
            .engine
            .plan_overwrite(&pin, &self.handle, offset, data.len() as u64)
        {
            Ok(Some(spans)) => spans,
            // Needs fresh chunks or copy-on-write: the synchronous path does that.
            Ok(None) => return QueueStart::Declined(data),
            Err(e) => {
                self.io.record_error(IoOp::Write);
                tracing::debug!(image = %self.handle.name(), error = %e, "NBD request failed");
                return QueueStart::Done(QueueDone {
                    tag,
                    result: Err(errno(&e)),
                    buf: data,
                    zeros: Vec::new(),
                });
            }
        };
        let op = InFlight {
            home: BufHome::default(),
            zeros: Vec::new(),
            start,
            pin: Pin::Write(pin),
        };
        self.start_op(tag, RingDir::Write, data, spans, op)
    }

    fn submit(&mut self) {
        if let Err(e) = self.ring.ring().submit() {
            // The ops stay queued; the next submit or reap retries.
            tracing::warn!(error = %e, "io_uring submit failed");
        }
    }

    fn in_flight(&self) -> usize {
        self.ops.len()
    }

    fn poll_complete(&mut self, cx: &mut Context<'_>, out: &mut Vec<QueueDone>) -> Poll<()> {
        let mut done = std::mem::take(&mut self.done);
        let polled = self.ring.poll_complete(cx, &mut done);
        for RingDone { tag, result, buf } in done.drain(..) {
            let Some(mut op) = self.ops.remove(&tag) else {
                continue;
            };
            let buf = std::mem::take(&mut op.home).restore(buf);
            let error = result.err().map(Errno::from);
            out.push(self.finish(tag, op, buf, error));
        }
        self.done = done;
        polled
    }
}

#[cfg(test)]
mod tests {
    //! The engine behind the NBD server, io_uring read ring included, checked against a
    //! model with many requests in flight on one connection.

    use std::collections::HashMap;
    use std::sync::Arc;

    use rand::{Rng, SeedableRng};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::EngineExports;
    use crate::device::{open_path, EngineChoice, IoEngine};
    use crate::engine::{Engine, PoolSpec, Qos, VolumeSpec};
    use crate::meta::mem::MemStore;
    use crate::metrics::Metrics;
    use crate::nbd::codec::*;
    use crate::nbd::{ExportRegistry, Server, ServerConfig};

    const SIZE: u64 = 8 << 20;
    const SLOT: u64 = 64 << 10;

    fn engine(dir: &std::path::Path) -> Engine {
        let device = open_path(&dir.join("pool.img"), Some(64 << 20), EngineChoice::Auto).unwrap();
        let engine = Engine::open(
            Arc::new(MemStore::new()),
            vec![PoolSpec {
                name: "p".into(),
                device,
                chunk_size: 64 << 10,
                path: "pool.img".into(),
            }],
        )
        .unwrap();
        engine
            .create_volume(&VolumeSpec {
                name: "v".into(),
                pool: None,
                size: Some(SIZE),
                source: None,
                qos: Qos::default(),
            })
            .unwrap();
        engine.set_exported("v", true).unwrap();
        engine
    }

    /// A client's end of a connection.
    trait Client: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Client for T {}

    /// How the test client reaches the server.
    enum Transport {
        /// An in-memory stream (no socket: the server never busy-polls it).
        Duplex,
        /// A unix socket in `dir`: the server busy-polls its descriptor.
        Unix(std::path::PathBuf),
    }

    async fn connect(server: &Server, structured: bool, transport: &Transport) -> Box<dyn Client> {
        let mut c: Box<dyn Client> = match transport {
            Transport::Duplex => {
                let (c, s) = tokio::io::duplex(4 << 20);
                let server = server.clone();
                tokio::spawn(async move { server.serve_stream(s).await });
                Box::new(c)
            }
            Transport::Unix(dir) => {
                let path = dir.join("nbd.sock");
                let server = server.clone();
                let listening = path.clone();
                tokio::spawn(async move {
                    server
                        .serve_unix(&listening, std::future::pending())
                        .await
                        .unwrap()
                });
                let mut tries = 0;
                loop {
                    match tokio::net::UnixStream::connect(&path).await {
                        Ok(c) => break Box::new(c),
                        Err(_) if tries < 500 => {
                            tries += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                        Err(e) => panic!("cannot connect to {}: {e}", path.display()),
                    }
                }
            }
        };
        let mut g = [0u8; GREETING_LEN];
        c.read_exact(&mut g).await.unwrap();
        c.write_all(&ClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).encode())
            .await
            .unwrap();
        let mut options = Vec::new();
        if structured {
            options.push(ClientOption::StructuredReply);
        }
        options.push(ClientOption::Go(InfoRequest {
            name: "v".into(),
            requests: vec![],
        }));
        for opt in options {
            c.write_all(&opt.encode()).await.unwrap();
            loop {
                let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
                c.read_exact(&mut h).await.unwrap();
                let h = OptionReplyHeader::decode(&h).unwrap();
                let mut data = vec![0u8; h.len as usize];
                c.read_exact(&mut data).await.unwrap();
                match OptionReply::decode(&h, &data).unwrap().body {
                    OptionReplyBody::Ack => break,
                    OptionReplyBody::Info(_) => {}
                    other => panic!("option refused: {other:?}"),
                }
            }
        }
        c
    }

    /// Reads one reply; returns (cookie, error, data) with the data of a read reassembled
    /// (holes as zeros) from `len` bytes at `offset`.
    async fn reply(c: &mut dyn Client, reads: &HashMap<u64, (u64, u32)>) -> (u64, u32, Vec<u8>) {
        let mut magic = [0u8; 4];
        c.read_exact(&mut magic).await.unwrap();
        if u32::from_be_bytes(magic) == SIMPLE_REPLY_MAGIC {
            let mut all = magic.to_vec();
            all.resize(SIMPLE_REPLY_LEN, 0);
            c.read_exact(&mut all[4..]).await.unwrap();
            let r = SimpleReply::decode(&all).unwrap();
            let mut data = Vec::new();
            if let (0, Some(&(_, len))) = (r.error, reads.get(&r.cookie)) {
                data = vec![0u8; len as usize];
                c.read_exact(&mut data).await.unwrap();
            }
            return (r.cookie, r.error, data);
        }
        let mut all = magic.to_vec();
        all.resize(CHUNK_HEADER_LEN, 0);
        c.read_exact(&mut all[4..]).await.unwrap();
        let mut h = ChunkHeader::decode(&all).unwrap();
        let cookie = h.cookie;
        let (offset, len) = reads.get(&cookie).copied().unwrap_or((0, 0));
        let mut data = vec![0xAAu8; len as usize];
        let mut covered = 0u64;
        let mut error = 0;
        loop {
            let mut payload = vec![0u8; h.length as usize];
            c.read_exact(&mut payload).await.unwrap();
            let r = StructuredReply::decode(&h, &payload).unwrap();
            assert_eq!(r.cookie, cookie, "chunks of one reply are sent together");
            match r.chunk {
                Chunk::OffsetData {
                    offset: at,
                    data: d,
                } => {
                    let at = (at - offset) as usize;
                    data[at..at + d.len()].copy_from_slice(&d);
                    covered += d.len() as u64;
                }
                Chunk::OffsetHole { offset: at, len: n } => {
                    let at = (at - offset) as usize;
                    data[at..at + n as usize].fill(0);
                    covered += u64::from(n);
                }
                Chunk::Error { error: e, .. } => error = e,
                _ => {}
            }
            if h.is_done() {
                if error == 0 {
                    assert_eq!(covered, u64::from(len), "read reply covers the request");
                }
                return (cookie, error, data);
            }
            let mut hb = [0u8; CHUNK_HEADER_LEN];
            c.read_exact(&mut hb).await.unwrap();
            h = ChunkHeader::decode(&hb).unwrap();
        }
    }

    async fn many_in_flight_requests_match_a_model(structured: bool, busy_poll: bool) {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let registry = Arc::new(EngineExports::new(engine.clone(), Metrics::new()));
        let target = registry.open("v").unwrap();
        let queued = tokio::task::spawn_blocking(move || target.io_queue().is_some())
            .await
            .unwrap();
        let uring = engine.pools()[0].io_engine == IoEngine::Uring;
        assert_eq!(queued, uring, "reads are asynchronous exactly on io_uring");
        let (server, transport) = if busy_poll {
            // A long window, so that the connection polls through most waits: requests
            // are read straight from the socket and completions reaped without a wakeup.
            let config = ServerConfig {
                busy_poll: std::time::Duration::from_millis(10),
                ..ServerConfig::default()
            };
            let server = Server::with_config(registry, config);
            (server, Transport::Unix(dir.path().to_path_buf()))
        } else {
            (Server::new(registry), Transport::Duplex)
        };
        let mut c = connect(&server, structured, &transport).await;
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(if structured { 7 } else { 8 });
        let mut cookie = 0u64;
        for round in 0..60 {
            // Requests of a round use distinct 64 KiB slots, so their order does not matter.
            let mut slots: Vec<u64> = (0..SIZE / SLOT).collect();
            let count = rng.gen_range(1..=48);
            let mut wire = Vec::new();
            let mut reads: HashMap<u64, (u64, u32)> = HashMap::new();
            let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut expected = HashMap::new();
            for _ in 0..count {
                let slot = slots.swap_remove(rng.gen_range(0..slots.len()));
                let aligned = rng.gen_bool(0.7);
                let (at, len) = if aligned {
                    let blocks = SLOT / 4096;
                    let first = rng.gen_range(0..blocks);
                    let n = rng.gen_range(1..=blocks - first);
                    (slot * SLOT + first * 4096, (n * 4096) as u32)
                } else {
                    let first = rng.gen_range(0..SLOT - 1);
                    let n = rng.gen_range(0..=SLOT - first);
                    (slot * SLOT + first, n as u32)
                };
                cookie += 1;
                let (command, flags, payload) = match rng.gen_range(0..10) {
                    0..=4 => (Command::Read, 0, None),
                    5..=7 => {
                        let mut data = vec![0u8; len as usize];
                        rng.fill(&mut data[..]);
                        let fua = if rng.gen_bool(0.2) {
                            NBD_CMD_FLAG_FUA
                        } else {
                            0
                        };
                        (Command::Write, fua, Some(data))
                    }
                    8 => (Command::WriteZeroes, 0, None),
                    _ => (Command::Flush, 0, None),
                };
                let (offset, length) = if command == Command::Flush {
                    (0, 0)
                } else {
                    (at, len)
                };
                wire.extend_from_slice(
                    &Request {
                        flags,
                        command,
                        cookie,
                        offset,
                        length,
                    }
                    .encode(),
                );
                match command {
                    Command::Read => {
                        reads.insert(cookie, (at, len));
                        expected
                            .insert(cookie, Some(model[at as usize..][..len as usize].to_vec()));
                    }
                    Command::Write => {
                        let data = payload.expect("write payload");
                        wire.extend_from_slice(&data);
                        writes.push((at, data));
                        expected.insert(cookie, None);
                    }
                    Command::WriteZeroes => {
                        writes.push((at, vec![0u8; len as usize]));
                        expected.insert(cookie, None);
                    }
                    _ => {
                        expected.insert(cookie, None);
                    }
                }
            }
            c.write_all(&wire).await.unwrap();
            for _ in 0..count {
                let (got, error, data) = reply(&mut *c, &reads).await;
                assert_eq!(error, 0, "round {round} cookie {got}");
                let want = expected.remove(&got).expect("one reply per cookie");
                if let Some(want) = want {
                    assert!(
                        data == want,
                        "round {round}: read {:?} differs",
                        reads[&got]
                    );
                }
            }
            assert!(expected.is_empty());
            for (at, data) in writes {
                model[at as usize..][..data.len()].copy_from_slice(&data);
            }
        }
        // Everything, in 1 MiB reads in flight together.
        let mut wire = Vec::new();
        let mut reads = HashMap::new();
        for i in 0..SIZE >> 20 {
            cookie += 1;
            reads.insert(cookie, (i << 20, 1u32 << 20));
            wire.extend_from_slice(
                &Request {
                    flags: 0,
                    command: Command::Read,
                    cookie,
                    offset: i << 20,
                    length: 1 << 20,
                }
                .encode(),
            );
        }
        c.write_all(&wire).await.unwrap();
        for _ in 0..reads.len() {
            let (got, error, data) = reply(&mut *c, &reads).await;
            assert_eq!(error, 0);
            let at = reads[&got].0 as usize;
            assert!(data == model[at..at + (1 << 20)], "final read at {at}");
        }
    }

    /// An overwrite in flight (its pin held) keeps a snapshot from starting, so the
    /// snapshot never shares a chunk still being overwritten in place; after the
    /// snapshot the same range needs copy-on-write and is not planned as an overwrite.
    #[test]
    fn write_pin_holds_off_snapshots_and_overwrites_stop_after_one() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let h = engine.open_image("v").unwrap();
        // A hole is not an overwrite.
        let pin = engine.try_write_pin(&h).unwrap();
        assert_eq!(engine.plan_overwrite(&pin, &h, 0, 4096).unwrap(), None);
        drop(pin);
        engine.write(&h, 0, &[7u8; 8192]).unwrap();
        let pin = engine.try_write_pin(&h).unwrap();
        let ops = engine
            .plan_overwrite(&pin, &h, 4096, 4096)
            .unwrap()
            .unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!((ops[0].pos, ops[0].len), (0, 4096));
        let (tx, rx) = std::sync::mpsc::channel();
        let snapper = {
            let engine = engine.clone();
            std::thread::spawn(move || {
                engine.create_snapshot("v", "s").unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "snapshot started while an overwrite was in flight"
        );
        // While the snapshot waits, no new pin is handed out.
        assert!(engine.try_write_pin(&h).is_none());
        engine.overwritten(&pin);
        drop(pin);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        snapper.join().unwrap();
        let pin = engine.try_write_pin(&h).unwrap();
        assert_eq!(engine.plan_overwrite(&pin, &h, 4096, 4096).unwrap(), None);
        drop(pin);
        let snap = engine.open_image("v@s").unwrap();
        assert!(
            engine.try_write_pin(&snap).is_none(),
            "snapshots are read-only"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_in_flight_structured_requests_match_a_model() {
        many_in_flight_requests_match_a_model(true, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_in_flight_simple_requests_match_a_model() {
        many_in_flight_requests_match_a_model(false, false).await;
    }

    /// The same over a unix socket that the connection busy-polls: requests read behind
    /// the reactor's back, completions reaped before their eventfd is seen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_polled_requests_match_a_model() {
        many_in_flight_requests_match_a_model(true, true).await;
        many_in_flight_requests_match_a_model(false, true).await;
    }
}
