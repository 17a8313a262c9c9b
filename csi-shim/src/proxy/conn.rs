//! One client connection of the proxy: the downstream fixed-newstyle handshake, then the
//! relay of the transmission phase with replay across upstream reconnects.
//!
//! Two tasks per connection:
//! - **A** (`client_to_upstream`) reads requests, records each in the in-flight
//!   [`Table`] (with its write payload), and sends it upstream with the slot index as
//!   the upstream cookie;
//! - **B** (`upstream_to_client`) reads replies, finds the request by slot (which also
//!   gives the read length), lets [`Shared::accept_reply`] journal it, and writes the
//!   simple reply with the client's own cookie. B alone writes to the client.
//!
//! Invariants:
//! - a request stays in the table until its reply has been accepted in the current
//!   generation, so every request without a reply is resent after a reconnect; a slot's
//!   `sent_gen` makes sure it is sent at most once per generation (A and the replay task
//!   both hold the writer lock when sending);
//! - B never waits for the writer lock while the upstream might be blocked on us: the
//!   in-flight replay after a reconnect and internal flushes run in their own tasks;
//! - a read reply is taken off the upstream socket whole before anything is written to
//!   the client, so abandoning an upstream mid-reply never corrupts the client stream.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn, Instrument};

use nbd_wire::server::{ServerHandshake, ServerStep};

use super::wire::{
    self, ClientOption, Command, ExportInfo, Info, OptionReply, OptionReplyBody, Request,
    SimpleReply,
};
use super::{Accepted, ProxyError, Shared, Upstream};

/// Largest write payload accepted from a client (the protocol's DoS threshold is 32 MiB;
/// anything bigger is a hard disconnect).
const MAX_WRITE: u32 = 64 << 20;
/// Largest option data accepted during the handshake.
const MAX_OPTION: u32 = 64 << 10;

/// A request waiting for its reply.
#[derive(Debug)]
struct InFlight {
    req: Request,
    payload: Option<Arc<Vec<u8>>>,
    /// Order of arrival, for replay.
    seq: u64,
    /// Generation it was last sent in (0: never).
    sent_gen: u64,
    /// For flushes: the journal position when sent.
    flush_mark: u64,
    /// A flush issued by the proxy itself (no client reply).
    internal: bool,
}

#[derive(Debug, Default)]
struct Table {
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    next_seq: u64,
    live: usize,
    /// The client sent NBD_CMD_DISC.
    disc: bool,
}

impl Table {
    fn insert(&mut self, req: Request, payload: Option<Arc<Vec<u8>>>, internal: bool) -> usize {
        let entry = InFlight {
            req,
            payload,
            seq: self.next_seq,
            sent_gen: 0,
            flush_mark: 0,
            internal,
        };
        self.next_seq += 1;
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(entry);
                i
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        }
    }

    fn get(&self, slot: u64) -> Option<&InFlight> {
        self.slots.get(usize::try_from(slot).ok()?)?.as_ref()
    }

    fn remove(&mut self, slot: usize) -> Option<InFlight> {
        let e = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.live -= 1;
        Some(e)
    }

    /// Live slots in arrival order.
    fn pending(&self) -> Vec<usize> {
        let mut v: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|e| (e.seq, i)))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, i)| i).collect()
    }
}

struct UpWriter {
    w: Option<BufWriter<OwnedWriteHalf>>,
    gen: u64,
}

/// State both tasks of a connection share.
struct Conn {
    id: u64,
    shared: Arc<Shared>,
    table: Mutex<Table>,
    writer: Arc<tokio::sync::Mutex<UpWriter>>,
    /// Upstream transmission flags (as negotiated at the first handshake).
    upstream_flags: u16,
    want_block_size: bool,
    size: u64,
    client_gone: Notify,
}

impl Conn {
    /// Sends slot `slot` upstream unless it was already sent in the writer's generation
    /// or no upstream is installed (then the reconnect replays it).
    async fn send(&self, w: &mut UpWriter, slot: usize, flush: bool) {
        let gen = w.gen;
        if self.shared.generation() != gen {
            // Recovery started: leave it for the replay.
            return;
        }
        let Some(up) = w.w.as_mut() else { return };
        let (header, payload) = {
            let mut t = self.table.lock();
            let Some(Some(e)) = t.slots.get_mut(slot) else {
                return;
            };
            if e.sent_gen == gen {
                return;
            }
            e.sent_gen = gen;
            if e.req.command == Command::Flush {
                e.flush_mark = self.shared.flush_mark();
            }
            let req = Request {
                cookie: slot as u64,
                ..e.req
            };
            (req.encode(), e.payload.clone())
        };
        let res = async {
            up.write_all(&header).await?;
            if let Some(p) = &payload {
                up.write_all(p).await?;
            }
            if flush {
                up.flush().await?;
            }
            io::Result::Ok(())
        }
        .await;
        if let Err(err) = res {
            debug!(error = %err, "upstream write failed; waiting for reconnect");
            shutdown_writer(w);
        }
    }
}

fn shutdown_writer(w: &mut UpWriter) {
    if let Some(up) = w.w.take() {
        super::shutdown_socket(up.get_ref().as_ref());
    }
}

/// Serves one client from handshake to close.
pub async fn run(shared: Arc<Shared>, stream: UnixStream) {
    let id = shared.conn_id();
    let span = tracing::info_span!("client", conn = id, export = %shared.cfg.export);
    async move {
        match serve(shared, stream, id).await {
            Ok(()) => debug!("client connection closed"),
            // A client hanging up (or a liveness probe connecting and leaving) is normal.
            Err(ConnError::Io(err)) => debug!(error = %err, "client connection closed"),
            Err(err) => warn!(error = %err, "client connection ended with an error"),
        }
    }
    .instrument(span)
    .await
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("I/O error with the client")]
    Io(#[from] io::Error),
    #[error("Client protocol violation: {0}")]
    Protocol(String),
    #[error(transparent)]
    Upstream(#[from] ProxyError),
}

async fn serve(shared: Arc<Shared>, mut stream: UnixStream, id: u64) -> Result<(), ConnError> {
    let Some((up, gen, want_block_size)) = handshake(&shared, &mut stream).await? else {
        return Ok(());
    };
    let mut in_transmission = shared.enter_transmission();
    info!(
        size = up.info.size,
        flags = up.info.flags,
        generation = gen,
        "client entered transmission"
    );
    let (cr, cw) = stream.into_split();
    let (ur, uw) = up.stream.into_split();
    let conn = Arc::new(Conn {
        id,
        shared: Arc::clone(&shared),
        table: Mutex::new(Table::default()),
        writer: Arc::new(tokio::sync::Mutex::new(UpWriter {
            w: Some(BufWriter::with_capacity(256 << 10, uw)),
            gen,
        })),
        upstream_flags: up.info.flags,
        want_block_size,
        size: up.info.size,
        client_gone: Notify::new(),
    });
    let a = tokio::spawn(
        client_to_upstream(Arc::clone(&conn), BufReader::with_capacity(256 << 10, cr))
            .in_current_span(),
    );
    let res = upstream_to_client(
        Arc::clone(&conn),
        BufReader::with_capacity(256 << 10, ur),
        gen,
        BufWriter::with_capacity(256 << 10, cw),
    )
    .await;
    a.abort();
    let mut w = conn.writer.lock().await;
    shutdown_writer(&mut w);
    if conn.table.lock().disc {
        in_transmission.sent_disc();
    }
    res
}

/// Runs the server side of the fixed-newstyle handshake. Returns the upstream connection
/// when the client entered transmission, `None` when it left.
async fn handshake(
    shared: &Shared,
    s: &mut UnixStream,
) -> Result<Option<(Upstream, u64, bool)>, ConnError> {
    let mut hs = ServerHandshake::new(
        wire::NBD_FLAG_FIXED_NEWSTYLE | wire::NBD_FLAG_NO_ZEROES,
        MAX_OPTION,
    );
    s.write_all(&hs.greeting()).await?;
    loop {
        let mut buf = vec![0u8; hs.wants()];
        match s.read_exact(&mut buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let opt = match hs.feed(&buf) {
            Ok(ServerStep::Continue) => continue,
            Ok(ServerStep::Option(opt)) => opt,
            Ok(ServerStep::Invalid { option, error }) => {
                if option == wire::NBD_OPT_EXPORT_NAME {
                    // No way to report an error: a failure is a hard disconnect.
                    return Err(ConnError::Protocol(format!("NBD_OPT_EXPORT_NAME: {error}")));
                }
                // The proxy offers no structured replies, so the options that need them are
                // unsupported whatever their payload (as before the shared codec).
                if matches!(
                    option,
                    wire::NBD_OPT_STRUCTURED_REPLY
                        | wire::NBD_OPT_LIST_META_CONTEXT
                        | wire::NBD_OPT_SET_META_CONTEXT
                ) {
                    let msg = format!("option {option} is not supported by csi-nbd-proxy");
                    s.write_all(&OptionReply::error(option, wire::NBD_REP_ERR_UNSUP, msg).encode())
                        .await?;
                    continue;
                }
                let msg = format!("malformed option {option}: {error}");
                s.write_all(&OptionReply::error(option, wire::NBD_REP_ERR_INVALID, msg).encode())
                    .await?;
                continue;
            }
            Err(err) => return Err(ConnError::Protocol(err.to_string())),
        };
        let option = opt.code();
        let reply = |body: OptionReplyBody| OptionReply::new(option, body).encode();
        match opt {
            ClientOption::Abort => {
                let _ = s.write_all(&reply(OptionReplyBody::Ack)).await;
                return Ok(None);
            }
            ClientOption::List => {
                let server = OptionReplyBody::Server {
                    name: shared.cfg.export.clone(),
                    description: String::new(),
                };
                s.write_all(&reply(server)).await?;
                s.write_all(&reply(OptionReplyBody::Ack)).await?;
            }
            ClientOption::ExportName(_) => {
                // No way to report an error: a failure is a hard disconnect.
                let (up, gen) = open_upstream(shared, false).await?;
                let flags = up.info.flags & wire::PASSTHROUGH_FLAGS;
                s.write_all(&hs.export_name_reply(up.info.size, flags))
                    .await?;
                return Ok(Some((up, gen, false)));
            }
            ClientOption::Info(go) | ClientOption::Go(go) => {
                let want_block_size = go.requests.contains(&wire::NBD_INFO_BLOCK_SIZE);
                let (up, gen) = match open_upstream(shared, want_block_size).await {
                    Ok(v) => v,
                    Err(err) => {
                        let code = match &err {
                            ProxyError::Handshake(w) => {
                                w.refused_reply().unwrap_or(wire::NBD_REP_ERR_SHUTDOWN)
                            }
                            _ => wire::NBD_REP_ERR_SHUTDOWN,
                        };
                        warn!(error = %err, "upstream unavailable for a new client");
                        let msg = format!("upstream: {err}");
                        s.write_all(&OptionReply::error(option, code, msg).encode())
                            .await?;
                        continue;
                    }
                };
                let ExportInfo {
                    size,
                    flags,
                    block_size,
                } = up.info;
                let export = Info::Export {
                    size,
                    flags: flags & wire::PASSTHROUGH_FLAGS,
                };
                s.write_all(&reply(OptionReplyBody::Info(export))).await?;
                if go.requests.contains(&wire::NBD_INFO_NAME) {
                    let name = Info::Name(shared.cfg.export.clone());
                    s.write_all(&reply(OptionReplyBody::Info(name))).await?;
                }
                if let Some(bs) = block_size {
                    let bs = Info::BlockSize {
                        min: bs.min,
                        preferred: bs.preferred,
                        max: bs.max,
                    };
                    s.write_all(&reply(OptionReplyBody::Info(bs))).await?;
                }
                s.write_all(&reply(OptionReplyBody::Ack)).await?;
                if option == wire::NBD_OPT_GO {
                    return Ok(Some((up, gen, want_block_size)));
                }
                close_upstream(up).await;
            }
            _ => {
                let msg = "option not supported by the proxy";
                s.write_all(&OptionReply::error(option, wire::NBD_REP_ERR_UNSUP, msg).encode())
                    .await?;
            }
        }
    }
}

/// A fresh upstream connection for a new client, in a generation that is ready.
async fn open_upstream(
    shared: &Shared,
    want_block_size: bool,
) -> Result<(Upstream, u64), ProxyError> {
    let deadline = Instant::now() + shared.cfg.reconnect_timeout;
    loop {
        let gen = shared.ready_generation().await?;
        let up = super::connect_with_backoff(&shared.cfg, want_block_size, deadline).await?;
        if shared.generation() == gen {
            return Ok((up, gen));
        }
        // A recovery started meanwhile: this connection may predate its journal replay.
        close_upstream(up).await;
    }
}

async fn close_upstream(up: Upstream) {
    let mut s = up.stream;
    let disc = wire::bare_request(Command::Disc, 0);
    let _ = s.write_all(&disc.encode()).await;
}

/// Task A: client requests to the upstream.
async fn client_to_upstream(conn: Arc<Conn>, mut rd: BufReader<OwnedReadHalf>) {
    let res = relay_requests(&conn, &mut rd).await;
    match res {
        Ok(true) => debug!("client sent NBD_CMD_DISC"),
        Ok(false) => {
            debug!("client closed its connection");
            conn.client_gone.notify_one();
        }
        Err(err) => {
            warn!(error = %err, "ending the connection");
            conn.client_gone.notify_one();
        }
    }
}

/// Returns `Ok(true)` after NBD_CMD_DISC, `Ok(false)` when the client hung up.
async fn relay_requests(conn: &Conn, rd: &mut BufReader<OwnedReadHalf>) -> Result<bool, ConnError> {
    let mut h = [0u8; wire::REQUEST_LEN];
    loop {
        match rd.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let req = Request::decode(&h).map_err(|e| ConnError::Protocol(e.to_string()))?;
        let payload = if req.has_payload() {
            if req.length > MAX_WRITE {
                return Err(ConnError::Protocol(format!(
                    "write of {} bytes exceeds {MAX_WRITE}",
                    req.length
                )));
            }
            let mut p = vec![0u8; req.length as usize];
            match rd.read_exact(&mut p).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e.into()),
            }
            Some(Arc::new(p))
        } else {
            None
        };
        if req.command == Command::Disc {
            // The server side (blockd) finishes what is outstanding, then closes; B
            // relays those replies and ends at the upstream EOF.
            conn.table.lock().disc = true;
            let mut w = conn.writer.lock().await;
            if let Some(up) = w.w.as_mut() {
                let disc = Request { cookie: 0, ..req };
                let _ = up.write_all(&disc.encode()).await;
                let _ = up.flush().await;
            }
            return Ok(true);
        }
        let slot = conn.table.lock().insert(req, payload, false);
        let more = !rd.buffer().is_empty();
        let mut w = conn.writer.lock().await;
        conn.send(&mut w, slot, !more).await;
    }
}

enum Step {
    /// A reply for `slot` with `error` (read payload, if any, is in the buffer).
    Reply {
        slot: usize,
        error: u32,
    },
    /// The upstream failed or a recovery started elsewhere.
    Lost(String),
    ClientGone,
}

async fn read_reply(
    conn: &Conn,
    r: &mut BufReader<OwnedReadHalf>,
    buf: &mut Vec<u8>,
) -> Result<(usize, u32), String> {
    let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
    r.read_exact(&mut h).await.map_err(|e| e.to_string())?;
    let reply = SimpleReply::decode(&h).map_err(|e| e.to_string())?;
    let read_len = {
        let t = conn.table.lock();
        let e = t
            .get(reply.cookie)
            .ok_or_else(|| format!("reply for unknown cookie {}", reply.cookie))?;
        (e.req.command == Command::Read && reply.error == 0).then_some(e.req.length as usize)
    };
    if let Some(len) = read_len {
        if buf.len() < len {
            buf.resize(len, 0);
        }
        r.read_exact(&mut buf[..len])
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok((reply.cookie as usize, reply.error))
}

/// Task B: upstream replies to the client, and reconnects.
async fn upstream_to_client(
    conn: Arc<Conn>,
    mut up: BufReader<OwnedReadHalf>,
    mut gen: u64,
    mut cw: BufWriter<OwnedWriteHalf>,
) -> Result<(), ConnError> {
    let shared = Arc::clone(&conn.shared);
    let mut gen_rx = shared.subscribe();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let step = tokio::select! {
            r = read_reply(&conn, &mut up, &mut buf) => match r {
                Ok((slot, error)) => Step::Reply { slot, error },
                Err(e) => Step::Lost(e),
            },
            _ = gen_rx.wait_for(|g| *g != gen) => Step::Lost("recovery started on another connection".into()),
            _ = conn.client_gone.notified() => Step::ClientGone,
        };
        match step {
            Step::ClientGone => return Ok(()),
            Step::Reply { slot, error } => {
                let (req, payload, mark, internal) = {
                    let t = conn.table.lock();
                    let Some(Some(e)) = t.slots.get(slot) else {
                        return Err(ConnError::Protocol("reply slot vanished".into()));
                    };
                    (e.req, e.payload.clone(), e.flush_mark, e.internal)
                };
                let origin = super::Origin {
                    gen,
                    conn: conn.id,
                    upstream_flags: conn.upstream_flags,
                };
                let accepted = shared.accept_reply(origin, &req, payload.as_ref(), error, mark);
                let flush_now = match accepted {
                    Accepted::Stale => {
                        cw.flush().await?;
                        up = match reconnect(&conn, up, &mut gen, "generation changed").await {
                            Ok(up) => up,
                            Err(err) => return give_up(&conn, &mut cw, err).await,
                        };
                        continue;
                    }
                    Accepted::Yes { flush_now } => flush_now,
                };
                conn.table.lock().remove(slot);
                if internal {
                    shared.internal_flush_done();
                    if error != 0 {
                        warn!(error, "internal flush failed");
                    }
                } else {
                    let reply = SimpleReply {
                        error,
                        cookie: req.cookie,
                    };
                    cw.write_all(&reply.encode()).await?;
                    if req.command == Command::Read && error == 0 {
                        cw.write_all(&buf[..req.length as usize]).await?;
                    }
                }
                // Flush whenever no further reply is already buffered, whatever this reply
                // was: an internal flush's reply can be the last one buffered, and leaving
                // the client's replies before it unsent would stall a client that waits
                // for them before sending more.
                if up.buffer().is_empty() {
                    cw.flush().await?;
                }
                if flush_now {
                    spawn_internal_flush(&conn);
                }
            }
            Step::Lost(why) => {
                let done = {
                    let t = conn.table.lock();
                    t.disc && t.live == 0
                };
                if done {
                    cw.flush().await?;
                    return Ok(());
                }
                up = match reconnect(&conn, up, &mut gen, &why).await {
                    Ok(up) => up,
                    Err(err) => return give_up(&conn, &mut cw, err).await,
                };
            }
        }
    }
}

fn spawn_internal_flush(conn: &Arc<Conn>) {
    let req = wire::bare_request(Command::Flush, 0);
    let slot = conn.table.lock().insert(req, None, true);
    let conn = Arc::clone(conn);
    tokio::spawn(
        async move {
            let mut w = conn.writer.lock().await;
            conn.send(&mut w, slot, true).await;
        }
        .in_current_span(),
    );
}

/// Drops the failed upstream, waits for the shared recovery, connects again and resends
/// every request still in flight (in a task, so replies are read meanwhile). On giving
/// up, fails everything in flight with `NBD_EIO` and ends the connection.
async fn reconnect(
    conn: &Arc<Conn>,
    old: BufReader<OwnedReadHalf>,
    gen: &mut u64,
    why: &str,
) -> Result<BufReader<OwnedReadHalf>, ConnError> {
    let started = Instant::now();
    let in_flight = conn.table.lock().live;
    warn!(
        reason = why,
        in_flight,
        generation = *gen,
        "upstream connection lost"
    );
    // Wake task A if it is blocked writing to the old upstream, then take the writer.
    super::shutdown_socket(old.get_ref().as_ref());
    drop(old);
    {
        let mut w = conn.writer.lock().await;
        shutdown_writer(&mut w);
    }
    let shared = &conn.shared;
    let deadline = started + shared.cfg.reconnect_timeout;
    let result = async {
        let mut seen = *gen;
        loop {
            let new_gen = shared.recover(seen).await?;
            let up =
                super::connect_with_backoff(&shared.cfg, conn.want_block_size, deadline).await?;
            if shared.generation() == new_gen {
                return Ok::<_, ProxyError>((up, new_gen));
            }
            // Another recovery started while we connected: wait for it and retry.
            close_upstream(up).await;
            seen = new_gen;
        }
    }
    .await;
    let (up, new_gen) = match result {
        Ok(v) => v,
        Err(err) => {
            error!(error = %err, in_flight, "giving up on the upstream; failing requests in flight");
            return Err(err.into());
        }
    };
    if up.info.size != conn.size {
        warn!(
            old_size = conn.size,
            new_size = up.info.size,
            "export size changed across the reconnect"
        );
    }
    if up.info.flags != conn.upstream_flags {
        warn!(
            old_flags = conn.upstream_flags,
            new_flags = up.info.flags,
            "export flags changed across the reconnect"
        );
    }
    *gen = new_gen;
    let (r, w) = up.stream.into_split();
    let guard = Arc::clone(&conn.writer).lock_owned().await;
    let replay_conn = Arc::clone(conn);
    tokio::spawn(
        async move {
            let mut guard = guard;
            guard.w = Some(BufWriter::with_capacity(256 << 10, w));
            guard.gen = new_gen;
            let pending = replay_conn.table.lock().pending();
            let n = pending.len();
            for slot in pending {
                replay_conn.send(&mut guard, slot, false).await;
            }
            let disc = replay_conn.table.lock().disc;
            if let Some(up) = guard.w.as_mut() {
                if disc {
                    let req = wire::bare_request(Command::Disc, 0);
                    let _ = up.write_all(&req.encode()).await;
                }
                if up.flush().await.is_err() {
                    shutdown_writer(&mut guard);
                }
            }
            info!(
                resent = n,
                generation = new_gen,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "reconnected; requests in flight resent"
            );
        }
        .in_current_span(),
    );
    Ok(BufReader::with_capacity(256 << 10, r))
}

/// Fails everything in flight with `NBD_EIO` and closes the client connection.
async fn give_up(
    conn: &Conn,
    cw: &mut BufWriter<OwnedWriteHalf>,
    err: ConnError,
) -> Result<(), ConnError> {
    let _ = fail_in_flight(conn, cw, wire::NBD_EIO).await;
    let _ = cw.shutdown().await;
    Err(err)
}

/// Answers every request still in flight with `err` (used when giving up).
async fn fail_in_flight(
    conn: &Conn,
    cw: &mut BufWriter<OwnedWriteHalf>,
    err: u32,
) -> io::Result<()> {
    let pending: Vec<InFlight> = {
        let mut t = conn.table.lock();
        let slots = t.pending();
        slots.into_iter().filter_map(|s| t.remove(s)).collect()
    };
    for e in pending.into_iter().filter(|e| !e.internal) {
        let reply = SimpleReply {
            error: err,
            cookie: e.req.cookie,
        };
        cw.write_all(&reply.encode()).await?;
    }
    cw.flush().await
}
