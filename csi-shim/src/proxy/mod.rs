//! `csi-nbd-proxy`: a reconnecting NBD proxy between an attacher (nbdfuse, the kernel NBD
//! client) and blockd, so that a restart of blockd does not kill mounted file systems.
//!
//! ```text
//!  client ──unix──▶ proxy (one process per staged volume) ──unix──▶ blockd NBD socket
//!    conn 1 ───────▶ [conn task A: client→upstream] ──────────────▶ upstream conn 1
//!            ◀────── [conn task B: upstream→client] ◀──────────────
//!    conn 2 ───────▶ ...                                            upstream conn 2
//!                      shared: journal + generation + recovery lock
//! ```
//!
//! This module owns the listener, the per-process [`Shared`] state (configuration, the
//! journal of acknowledged-but-unflushed writes, the upstream *generation*) and recovery;
//! [`conn`] owns one client connection; [`wire`] the encodings.
//!
//! Why a journal: blockd (like a disk with a volatile cache) may lose writes it
//! acknowledged but that no `NBD_CMD_FLUSH` covered when it is killed. A client of the
//! proxy never sees that crash, so the proxy must make it invisible: it keeps every
//! acknowledged, non-FUA write and write-zeroes (payloads are shared `Arc`s, no copy) until
//! a successful flush covers it, and replays them after a reconnect before anything else.
//! A FUA write is durable by itself and needs no replay, except to keep its place after
//! an older journaled write it overlaps: replaying that one alone would put the older data
//! back over it, so such a FUA write is journaled too.
//! The journal is bounded: past [`Config::journal_limit`] bytes the proxy issues a flush of
//! its own.
//!
//! Invariants:
//! - every upstream connection belongs to a generation; a reply is accepted only if its
//!   connection's generation is current (checked under the journal lock for writes), so
//!   a write is either in the journal or still in its connection's in-flight table, never
//!   neither;
//! - recovery (one at a time, under `recovery`) bumps the generation first, which makes
//!   every connection abandon its upstream; then it replays the journal on a fresh
//!   upstream connection (overlapping writes never in the same batch, so the server cannot
//!   reorder them), flushes, and only then do connections reconnect and resend their
//!   in-flight requests: a write acknowledged before a request was sent is always applied
//!   before it;
//! - a flush reply retires only journal entries acknowledged before the flush was sent
//!   (from every connection when upstream sets `NBD_FLAG_CAN_MULTI_CONN`, else from the
//!   flushing connection only);
//! - when the upstream stays away longer than `--reconnect-timeout`, every request in
//!   flight is answered `NBD_EIO` and the client connection is closed; the journal is kept
//!   and replayed first by the next client that gets through;
//! - with [`Config::exit_after_disconnect`] (the kernel attacher's proxies) the process
//!   ends once a client that entered transmission has sent `NBD_CMD_DISC` and no client is
//!   left in transmission: the kernel sends `NBD_CMD_DISC` on every connection when its
//!   device is disconnected, so the proxy goes with it instead of waiting for a signal.
//!   A client that merely closes (a kernel socket shut down after an I/O timeout, which
//!   `NBD_CMD_RECONFIGURE` may replace) does not end it.
//!
//! Assumption: losing an upstream connection means the daemon behind it went away (all
//! its connections die together). A daemon that drops one connection but keeps serving
//! others could, in a narrow window, execute an abandoned request after its replay.

pub mod conn;
pub mod wire;

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use wire::{Command, ExportInfo, Request, SimpleReply, WireError};

/// How long one upstream connect + handshake may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: first delay and cap.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Requests per batch when replaying the journal.
const REPLAY_BATCH: usize = 64;
/// Default bytes of acknowledged, unflushed writes kept before the proxy flushes itself.
pub const DEFAULT_JOURNAL_LIMIT: usize = 64 << 20;
/// Default reconnect window (`--reconnect-timeout`): how long a blockd restart may take
/// before requests fail. The kernel attacher's timeouts are derived from it
/// (`node::attach::nbd_netlink`).
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// What the proxy serves and where it forwards.
#[derive(Debug, Clone)]
pub struct Config {
    /// The unix socket clients connect to.
    pub listen: PathBuf,
    /// blockd's NBD unix socket.
    pub upstream_socket: PathBuf,
    /// The export (image) name upstream; every name a client asks for maps to it.
    pub export: String,
    /// How long to keep reconnecting after the upstream went away.
    pub reconnect_timeout: Duration,
    /// Bytes of acknowledged, unflushed writes kept for replay before the proxy issues a
    /// flush of its own.
    pub journal_limit: usize,
    /// Exit once a client sent `NBD_CMD_DISC` and no client is left in transmission.
    pub exit_after_disconnect: bool,
}

/// Errors that end the proxy or one of its upstream attempts.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("Cannot listen for clients")]
    Bind(#[from] blockd_proto::unix_socket::BindError),
    #[error("Cannot connect to the upstream NBD socket")]
    Connect(#[source] io::Error),
    #[error("Upstream handshake failed")]
    Handshake(#[from] WireError),
    #[error("Upstream unavailable for {waited:?}, giving up; last error: {last}")]
    GaveUp { waited: Duration, last: String },
}

/// An upstream connection in the transmission phase.
pub struct Upstream {
    pub stream: UnixStream,
    pub info: ExportInfo,
}

/// One acknowledged write kept until a flush covers it.
#[derive(Debug, Clone)]
struct Journaled {
    seq: u64,
    conn: u64,
    req: Request,
    payload: Option<Arc<Vec<u8>>>,
}

#[derive(Debug, Default)]
struct Journal {
    /// Current upstream generation.
    gen: u64,
    /// The last recovery gave up: the entries still need replaying.
    failed: bool,
    next_seq: u64,
    entries: VecDeque<Journaled>,
    bytes: usize,
    /// An internal flush is in flight.
    flush_pending: bool,
}

/// What happened to a reply handed to [`Shared::accept_reply`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Relay it to the client.
    Yes { flush_now: bool },
    /// Its connection belongs to an old generation: keep the request for replay.
    Stale,
}

/// Where a reply came from: the connection's generation, id and upstream flags.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    pub gen: u64,
    pub conn: u64,
    pub upstream_flags: u16,
}

/// Per-process state shared by all client connections.
pub struct Shared {
    pub cfg: Config,
    journal: Mutex<Journal>,
    gen_tx: watch::Sender<u64>,
    recovery: tokio::sync::Mutex<()>,
    next_conn: AtomicU64,
    clients: Mutex<Clients>,
    /// Becomes true when the last client in transmission left after an `NBD_CMD_DISC`.
    finished: watch::Sender<bool>,
}

/// Clients in the transmission phase.
#[derive(Debug, Default)]
struct Clients {
    in_transmission: usize,
    disconnect_seen: bool,
}

/// Counts one client in transmission until dropped (see [`Shared::enter_transmission`]).
pub(crate) struct InTransmission {
    shared: Arc<Shared>,
    sent_disc: bool,
}

impl InTransmission {
    /// The client sent `NBD_CMD_DISC`.
    pub(crate) fn sent_disc(&mut self) {
        self.sent_disc = true;
    }
}

impl Drop for InTransmission {
    fn drop(&mut self) {
        let mut c = self.shared.clients.lock();
        c.in_transmission -= 1;
        c.disconnect_seen |= self.sent_disc;
        if c.in_transmission == 0 && c.disconnect_seen {
            self.shared.finished.send_replace(true);
        }
    }
}

impl Shared {
    pub fn new(cfg: Config) -> Arc<Shared> {
        // Generations start at 1: 0 marks a request never sent.
        let (gen_tx, _) = watch::channel(1);
        Arc::new(Shared {
            cfg,
            journal: Mutex::new(Journal {
                gen: 1,
                ..Journal::default()
            }),
            gen_tx,
            recovery: tokio::sync::Mutex::new(()),
            next_conn: AtomicU64::new(1),
            clients: Mutex::new(Clients::default()),
            finished: watch::channel(false).0,
        })
    }

    /// Counts a client that entered transmission until the returned guard is dropped.
    pub(crate) fn enter_transmission(self: &Arc<Self>) -> InTransmission {
        self.clients.lock().in_transmission += 1;
        InTransmission {
            shared: Arc::clone(self),
            sent_disc: false,
        }
    }

    pub(crate) fn conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.journal.lock().gen
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.gen_tx.subscribe()
    }

    /// The journal position a flush sent now covers (entries with a smaller sequence).
    pub(crate) fn flush_mark(&self) -> u64 {
        self.journal.lock().next_seq
    }

    /// Accepts a successful or failed reply from a connection of generation `gen`:
    /// journals writes that need it, retires what a flush covered. `flags` are the
    /// upstream transmission flags.
    pub(crate) fn accept_reply(
        &self,
        origin: Origin,
        req: &Request,
        payload: Option<&Arc<Vec<u8>>>,
        error: u32,
        flush_mark: u64,
    ) -> Accepted {
        let Origin {
            gen,
            conn,
            upstream_flags,
        } = origin;
        let mut j = self.journal.lock();
        if j.gen != gen {
            return Accepted::Stale;
        }
        if error != 0 || upstream_flags & wire::NBD_FLAG_SEND_FLUSH == 0 {
            // Nothing to keep: a failed write changed nothing we must restore, and
            // without flush support there is no point at which it could be dropped.
            return Accepted::Yes { flush_now: false };
        }
        let fua = req.flags & wire::NBD_CMD_FLAG_FUA != 0
            && upstream_flags & wire::NBD_FLAG_SEND_FUA != 0;
        match req.command {
            Command::Write | Command::WriteZeroes
                if !fua || j.entries.iter().any(|e| overlaps(&e.req, req)) =>
            {
                let seq = j.next_seq;
                j.next_seq += 1;
                j.bytes += payload.map_or(0, |p| p.len());
                j.entries.push_back(Journaled {
                    seq,
                    conn,
                    req: *req,
                    payload: payload.cloned(),
                });
                let flush_now = j.bytes > self.cfg.journal_limit && !j.flush_pending;
                if flush_now {
                    j.flush_pending = true;
                }
                Accepted::Yes { flush_now }
            }
            Command::Flush => {
                let multi = upstream_flags & wire::NBD_FLAG_CAN_MULTI_CONN != 0;
                retire(&mut j, flush_mark, (!multi).then_some(conn));
                Accepted::Yes { flush_now: false }
            }
            _ => Accepted::Yes { flush_now: false },
        }
    }

    /// An internal flush ended (successfully or not).
    pub(crate) fn internal_flush_done(&self) {
        self.journal.lock().flush_pending = false;
    }

    /// Waits for any recovery in progress and returns the generation a new upstream
    /// connection belongs to; replays a journal left by a failed recovery first.
    pub async fn ready_generation(&self) -> Result<u64, ProxyError> {
        loop {
            let (gen, failed) = {
                let _guard = self.recovery.lock().await;
                let j = self.journal.lock();
                (j.gen, j.failed)
            };
            if !failed {
                return Ok(gen);
            }
            self.recover(gen).await?;
        }
    }

    /// Called by a connection whose upstream of generation `seen` failed. The first
    /// caller for a generation bumps it (making every connection drop its upstream),
    /// replays the journal on a new upstream connection and flushes; later callers wait
    /// for that and get its outcome. Returns the generation to reconnect in.
    pub async fn recover(&self, seen: u64) -> Result<u64, ProxyError> {
        let _guard = self.recovery.lock().await;
        let (gen, entries) = {
            let mut j = self.journal.lock();
            if j.gen != seen {
                if j.failed {
                    return Err(ProxyError::GaveUp {
                        waited: self.cfg.reconnect_timeout,
                        last: "an earlier recovery gave up".into(),
                    });
                }
                return Ok(j.gen);
            }
            j.gen += 1;
            j.failed = false;
            // An internal flush of the old generation will never be answered there; it
            // is resent or superseded by the replay's own flush.
            j.flush_pending = false;
            (j.gen, j.entries.clone())
        };
        self.gen_tx.send_replace(gen);
        let started = Instant::now();
        info!(
            generation = gen,
            journal_entries = entries.len(),
            "upstream lost; recovering"
        );
        if entries.is_empty() {
            return Ok(gen);
        }
        let deadline = started + self.cfg.reconnect_timeout;
        match self.replay_journal(&entries, deadline).await {
            Ok(failed_writes) => {
                let last = entries.back().map_or(0, |e| e.seq);
                let mut j = self.journal.lock();
                retire(&mut j, last + 1, None);
                if failed_writes > 0 {
                    error!(
                        failed_writes,
                        "writes acknowledged before the upstream restart failed on replay"
                    );
                }
                info!(
                    generation = gen,
                    replayed = entries.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "journal replayed and flushed"
                );
                Ok(gen)
            }
            Err(err) => {
                error!(generation = gen, error = %err, "recovery gave up; journal kept");
                self.journal.lock().failed = true;
                Err(err)
            }
        }
    }

    /// Replays `entries` in order on a new upstream connection (pipelined in batches of
    /// non-overlapping requests), then flushes. Returns how many replayed writes failed.
    async fn replay_journal(
        &self,
        entries: &VecDeque<Journaled>,
        deadline: Instant,
    ) -> Result<usize, ProxyError> {
        loop {
            let up = connect_with_backoff(&self.cfg, false, deadline).await?;
            match replay_on(up, entries).await {
                Ok(failed) => return Ok(failed),
                Err(err) if Instant::now() < deadline => {
                    warn!(error = %err, "journal replay interrupted; retrying");
                    tokio::time::sleep(BACKOFF_START).await;
                }
                Err(err) => {
                    return Err(ProxyError::GaveUp {
                        waited: self.cfg.reconnect_timeout,
                        last: err.to_string(),
                    })
                }
            }
        }
    }
}

fn retire(j: &mut Journal, mark: u64, only_conn: Option<u64>) {
    let before = j.entries.len();
    let mut freed = 0;
    match only_conn {
        None => {
            while j.entries.front().is_some_and(|e| e.seq < mark) {
                if let Some(e) = j.entries.pop_front() {
                    freed += e.payload.map_or(0, |p| p.len());
                }
            }
        }
        Some(conn) => j.entries.retain(|e| {
            let drop = e.seq < mark && e.conn == conn;
            if drop {
                freed += e.payload.as_ref().map_or(0, |p| p.len());
            }
            !drop
        }),
    }
    j.bytes -= freed;
    if before != j.entries.len() {
        debug!(
            retired = before - j.entries.len(),
            kept = j.entries.len(),
            "journal entries covered by a flush"
        );
    }
}

fn overlaps(a: &Request, b: &Request) -> bool {
    let (a0, a1) = (a.offset, a.offset.saturating_add(a.length.into()));
    let (b0, b1) = (b.offset, b.offset.saturating_add(b.length.into()));
    a0 < b1 && b0 < a1
}

async fn replay_on(up: Upstream, entries: &VecDeque<Journaled>) -> io::Result<usize> {
    let (r, w) = up.stream.into_split();
    let mut r = BufReader::new(r);
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let mut failed = 0;
    let mut batch: Vec<&Journaled> = Vec::with_capacity(REPLAY_BATCH);
    let mut i = 0;
    let mut cookie = 0u64;
    while i < entries.len() || !batch.is_empty() {
        let next = entries.get(i);
        let fits = next.is_some_and(|e| {
            batch.len() < REPLAY_BATCH && !batch.iter().any(|b| overlaps(&b.req, &e.req))
        });
        if fits {
            if let Some(e) = next {
                batch.push(e);
                i += 1;
                continue;
            }
        }
        for e in &batch {
            cookie += 1;
            let req = Request { cookie, ..e.req };
            w.write_all(&req.encode()).await?;
            if let Some(p) = &e.payload {
                w.write_all(p).await?;
            }
        }
        w.flush().await?;
        for _ in 0..batch.len() {
            let reply = read_simple_reply(&mut r).await?;
            if reply.error != 0 {
                failed += 1;
                error!(error = reply.error, "replayed write failed");
            }
        }
        batch.clear();
    }
    cookie += 1;
    let flush = wire::bare_request(Command::Flush, cookie);
    w.write_all(&flush.encode()).await?;
    w.flush().await?;
    let reply = read_simple_reply(&mut r).await?;
    if reply.error != 0 {
        return Err(io::Error::other(format!(
            "flush after replay failed with NBD error {}",
            reply.error
        )));
    }
    let disc = wire::bare_request(Command::Disc, cookie + 1);
    let _ = w.write_all(&disc.encode()).await;
    let _ = w.flush().await;
    Ok(failed)
}

async fn read_simple_reply<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> io::Result<SimpleReply> {
    let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
    r.read_exact(&mut h).await?;
    SimpleReply::decode(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Connects to the upstream socket and runs the client handshake once (on the blocking
/// pool, with a timeout).
pub async fn connect_upstream(cfg: &Config, want_block_size: bool) -> Result<Upstream, ProxyError> {
    let path = cfg.upstream_socket.clone();
    let export = cfg.export.clone();
    let joined = tokio::task::spawn_blocking(move || -> Result<_, ProxyError> {
        let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(ProxyError::Connect)?;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
            .map_err(ProxyError::Connect)?;
        let info = wire::client_handshake(&mut s, &export, want_block_size)?;
        s.set_read_timeout(None)
            .and_then(|()| s.set_write_timeout(None))
            .and_then(|()| s.set_nonblocking(true))
            .map_err(ProxyError::Connect)?;
        Ok((s, info))
    })
    .await
    .map_err(|e| ProxyError::Connect(io::Error::other(e)))?;
    let (s, info) = joined?;
    let stream = UnixStream::from_std(s).map_err(ProxyError::Connect)?;
    Ok(Upstream { stream, info })
}

/// [`connect_upstream`] with exponential backoff until `deadline`.
pub async fn connect_with_backoff(
    cfg: &Config,
    want_block_size: bool,
    deadline: Instant,
) -> Result<Upstream, ProxyError> {
    let started = Instant::now();
    let mut delay = BACKOFF_START;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match connect_upstream(cfg, want_block_size).await {
            Ok(up) => {
                if attempts > 1 {
                    info!(
                        attempts,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "upstream reconnected"
                    );
                }
                return Ok(up);
            }
            Err(err) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(ProxyError::GaveUp {
                        waited: now.duration_since(started),
                        last: format!("{err:#}"),
                    });
                }
                debug!(attempts, error = %err, "upstream not ready; retrying");
                tokio::time::sleep(delay.min(deadline - now)).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Shuts a socket down in both directions (wakes any task blocked on it) without
/// closing the descriptor its owner still holds.
pub(crate) fn shutdown_socket(fd: &impl AsRawFd) {
    // SAFETY: shutdown(2) on a descriptor borrowed from a live socket object; it does not
    // close or invalidate the descriptor.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// Binds `path` (mode 0600), replacing a stale socket left by a killed predecessor but
/// refusing to steal one a live process still answers on, or to remove any other file.
pub fn bind(path: &Path) -> Result<UnixListener, ProxyError> {
    use blockd_proto::unix_socket;
    let (listener, _) = unix_socket::bind_tokio(path, unix_socket::PRIVATE_SOCKET_MODE)?;
    Ok(listener)
}

/// Accepts clients on `listener` until `shutdown` resolves (or, with
/// [`Config::exit_after_disconnect`], the last client disconnected), one task per client.
pub async fn serve(
    shared: Arc<Shared>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut finished = shared.finished.subscribe();
    let exit_after_disconnect = shared.cfg.exit_after_disconnect;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = last_client_left(&mut finished), if exit_after_disconnect => {
                info!("the last client disconnected with NBD_CMD_DISC; exiting");
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    tokio::spawn(conn::run(shared, stream));
                }
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Resolves once [`Shared::finished`] is true (never, if its sender is gone).
async fn last_client_left(finished: &mut watch::Receiver<bool>) {
    if finished.wait_for(|f| *f).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Starts `csi-nbd-proxy` as a detached process: its own session (setsid), so that
/// signals to the caller's process group (a csi-shim restart) do not reach it; stdio
/// closed except stderr, which goes to `log` when given. Returns the child: reap it
/// (e.g. `wait` on a blocking thread) or it stays a zombie after exiting until the caller
/// exits; once the caller is gone, init (or the subreaper) reaps it.
pub fn spawn_detached(
    binary: &Path,
    cfg: &Config,
    pidfile: Option<&Path>,
    log: Option<std::fs::File>,
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(binary);
    cmd.arg("--listen")
        .arg(&cfg.listen)
        .arg("--upstream-socket")
        .arg(&cfg.upstream_socket)
        .arg("--export")
        .arg(&cfg.export)
        .arg("--reconnect-timeout")
        .arg(cfg.reconnect_timeout.as_secs().max(1).to_string())
        .arg("--log-format")
        .arg("json")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(p) = pidfile {
        cmd.arg("--pidfile").arg(p);
    }
    if cfg.exit_after_disconnect {
        cmd.arg("--exit-after-disconnect");
    }
    match log {
        Some(f) => cmd.stderr(f),
        None => cmd.stderr(Stdio::null()),
    };
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent; it
    // runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            listen: "/nonexistent/l".into(),
            upstream_socket: "/nonexistent/u".into(),
            export: "v".into(),
            reconnect_timeout: Duration::from_secs(1),
            journal_limit: 8192,
            exit_after_disconnect: true,
        }
    }

    fn write(offset: u64, len: u32, flags: u16) -> Request {
        Request {
            flags,
            command: Command::Write,
            cookie: 0,
            offset,
            length: len,
        }
    }

    fn flush() -> Request {
        Request {
            command: Command::Flush,
            ..write(0, 0, 0)
        }
    }

    fn o(gen: u64, conn: u64, upstream_flags: u16) -> Origin {
        Origin {
            gen,
            conn,
            upstream_flags,
        }
    }

    const FLAGS: u16 = wire::NBD_FLAG_HAS_FLAGS
        | wire::NBD_FLAG_SEND_FLUSH
        | wire::NBD_FLAG_SEND_FUA
        | wire::NBD_FLAG_CAN_MULTI_CONN;

    #[test]
    fn journal_keeps_unflushed_writes_until_a_covering_flush() {
        let shared = Shared::new(cfg());
        let p = Arc::new(vec![1u8; 4096]);
        let w = write(0, 4096, 0);
        assert_eq!(
            shared.accept_reply(o(1, 1, FLAGS), &w, Some(&p), 0, 0),
            Accepted::Yes { flush_now: false }
        );
        let mark = shared.flush_mark();
        // Acknowledged after the flush was sent: not covered by it.
        shared.accept_reply(o(1, 2, FLAGS), &write(8192, 4096, 0), Some(&p), 0, 0);
        // FUA writes over nothing journaled and failed writes are never kept.
        shared.accept_reply(
            o(1, 1, FLAGS),
            &write(65536, 4096, wire::NBD_CMD_FLAG_FUA),
            Some(&p),
            0,
            0,
        );
        shared.accept_reply(o(1, 1, FLAGS), &w, Some(&p), wire::NBD_EIO, 0);
        assert_eq!(shared.journal.lock().entries.len(), 2);
        shared.accept_reply(o(1, 2, FLAGS), &flush(), None, 0, mark);
        let j = shared.journal.lock();
        assert_eq!(j.entries.len(), 1);
        assert_eq!(j.entries[0].req.offset, 8192);
        assert_eq!(j.bytes, 4096);
    }

    #[test]
    fn a_fua_write_over_a_journaled_write_keeps_its_place_in_the_replay() {
        let shared = Shared::new(cfg());
        let old = Arc::new(vec![1u8; 4096]);
        let new = Arc::new(vec![2u8; 4096]);
        shared.accept_reply(o(1, 1, FLAGS), &write(0, 4096, 0), Some(&old), 0, 0);
        // Durable by itself and overlapping nothing journaled: not kept.
        shared.accept_reply(
            o(1, 1, FLAGS),
            &write(65536, 4096, wire::NBD_CMD_FLAG_FUA),
            Some(&new),
            0,
            0,
        );
        assert_eq!(shared.journal.lock().entries.len(), 1);
        // Over the journaled write: kept after it, so a replay ends with the new data.
        shared.accept_reply(
            o(1, 1, FLAGS),
            &write(2048, 4096, wire::NBD_CMD_FLAG_FUA),
            Some(&new),
            0,
            0,
        );
        let j = shared.journal.lock();
        assert_eq!(j.entries.len(), 2);
        assert_eq!(j.entries[1].req.offset, 2048);
        assert_eq!(j.entries[1].payload.as_deref(), Some(&*new));
    }

    #[test]
    fn without_multi_conn_a_flush_retires_only_its_connection() {
        let shared = Shared::new(cfg());
        let p = Arc::new(vec![1u8; 512]);
        let flags = FLAGS & !wire::NBD_FLAG_CAN_MULTI_CONN;
        shared.accept_reply(o(1, 1, flags), &write(0, 512, 0), Some(&p), 0, 0);
        shared.accept_reply(o(1, 2, flags), &write(512, 512, 0), Some(&p), 0, 0);
        let mark = shared.flush_mark();
        shared.accept_reply(o(1, 2, flags), &flush(), None, 0, mark);
        let j = shared.journal.lock();
        assert_eq!(j.entries.len(), 1);
        assert_eq!(j.entries[0].conn, 1);
    }

    #[test]
    fn stale_generation_replies_are_refused_and_the_limit_asks_for_a_flush() {
        let shared = Shared::new(cfg());
        shared.journal.lock().gen = 3;
        let p = Arc::new(vec![0u8; 4096]);
        // The reply to a 4 KiB write at `offset`, from a connection of generation `gen`.
        let reply = |gen, offset| {
            shared.accept_reply(o(gen, 1, FLAGS), &write(offset, 4096, 0), Some(&p), 0, 0)
        };
        let accepted = |flush_now| Accepted::Yes { flush_now };
        assert_eq!(reply(2, 0), Accepted::Stale);
        assert_eq!(reply(3, 0), accepted(false));
        assert_eq!(reply(3, 4096), accepted(false));
        // Over the 8 KiB limit: exactly one internal flush is requested.
        assert_eq!(reply(3, 8192), accepted(true));
        assert_eq!(reply(3, 8192), accepted(false));
    }

    #[test]
    fn finished_only_after_a_disconnect_and_the_last_client() {
        let shared = Shared::new(cfg());
        let finished = shared.finished.subscribe();
        let mut a = shared.enter_transmission();
        let b = shared.enter_transmission();
        // A client that closes without NBD_CMD_DISC (say, a socket the kernel shut down
        // after a timeout) ends nothing.
        drop(b);
        assert!(!*finished.borrow());
        let c = shared.enter_transmission();
        a.sent_disc();
        drop(a);
        assert!(!*finished.borrow(), "a client is still in transmission");
        drop(c);
        assert!(*finished.borrow());
    }

    #[test]
    fn overlap_is_half_open() {
        assert!(overlaps(&write(0, 4096, 0), &write(4095, 1, 0)));
        assert!(!overlaps(&write(0, 4096, 0), &write(4096, 1, 0)));
        assert!(!overlaps(&write(4096, 4096, 0), &write(0, 4096, 0)));
    }
}
