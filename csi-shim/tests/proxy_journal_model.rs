//! Model-based test of csi-nbd-proxy's replay journal: random writes (FUA or not),
//! write-zeroes, reads and flushes from two client connections, interleaved with kills of
//! the upstream NBD server — between requests, and on the arrival of a request (before or
//! after the server applied it, without a reply) — checked against a plain model.
//!
//! The upstream is an in-process NBD server over a disk with a volatile write cache, per
//! 512-byte sector: a write lands in the cache, a flush makes the cache durable, a FUA
//! write is durable by itself, and a kill keeps an arbitrary subset of the cached sectors
//! (in order) and drops the rest, closes every connection, and restarts the listener.
//!
//! The model is what the clients were told: requests are sequential, so the contents
//! after every acknowledged write are exact. Checked:
//! - every read returns exactly the acknowledged contents, across any number of kills
//!   (the proxy replays every acknowledged, unflushed write and resends what was in
//!   flight, in order);
//! - when a client flush is acknowledged, the server's *durable* contents equal the
//!   acknowledged contents (the proxy never acknowledges a flush the upstream did not
//!   make), and after a FUA write its range is durable;
//! - at the end, after a final kill, the whole export reads back.
//!
//! The proxy is driven only through its public API (`Shared`, `bind`, `serve`), with the
//! test's own client and server codecs, so that the test holds whatever the wire crate is.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use csi_shim::proxy::{self, Config};
use parking_lot::Mutex;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream as TokioStream};
use tokio::sync::watch;

const SECTOR: usize = 512;
const SECTORS: usize = 512;
const EXPORT_SIZE: u64 = (SECTORS * SECTOR) as u64;
/// Small, so that the proxy's own flushes (journal past its limit) run too.
const JOURNAL_LIMIT: usize = 24 * 1024;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;
// HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_WRITE_ZEROES | CAN_MULTI_CONN
const TRANSMISSION_FLAGS: u16 = 1 | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 8);

/// A deterministic 64-bit mix (splitmix64) for the server's choices.
fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What the next request to reach the server does, when armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// Kill the server before applying the request.
    KillBefore,
    /// Apply the request, then kill the server before it replies.
    KillAfter,
}

/// The upstream's disk: durable sectors, a volatile cache of sector writes in order, and
/// what readers see (durable with the cache applied).
struct Disk {
    /// Bumped by every kill; a connection of an older epoch applies nothing more.
    epoch: u64,
    durable: Vec<u8>,
    visible: Vec<u8>,
    cache: Vec<(usize, Vec<u8>)>,
    trigger: Option<Trigger>,
    rng: u64,
    kills: u64,
}

impl Disk {
    fn write(&mut self, offset: usize, data: &[u8], fua: bool) {
        self.visible[offset..offset + data.len()].copy_from_slice(data);
        for (i, sector) in data.chunks(SECTOR).enumerate() {
            let s = offset / SECTOR + i;
            if fua {
                // Durable now; an older cached copy of the sector can no longer land.
                self.cache.retain(|(c, _)| *c != s);
                self.durable[s * SECTOR..(s + 1) * SECTOR].copy_from_slice(sector);
            } else {
                self.cache.push((s, sector.to_vec()));
            }
        }
    }

    fn flush(&mut self) {
        self.durable.copy_from_slice(&self.visible);
        self.cache.clear();
    }

    /// A power cut: an arbitrary subset of the cached sectors lands, in order.
    fn crash(&mut self) {
        for (s, data) in std::mem::take(&mut self.cache) {
            if mix(&mut self.rng) & 1 == 0 {
                self.durable[s * SECTOR..(s + 1) * SECTOR].copy_from_slice(&data);
            }
        }
        self.visible.copy_from_slice(&self.durable);
        self.epoch += 1;
        self.kills += 1;
    }
}

/// The in-process upstream NBD server.
struct Upstream {
    path: PathBuf,
    disk: Mutex<Disk>,
    killed: watch::Sender<u64>,
}

impl Upstream {
    fn new(path: PathBuf, seed: u64) -> Arc<Upstream> {
        Arc::new(Upstream {
            path,
            disk: Mutex::new(Disk {
                epoch: 1,
                durable: vec![0; SECTORS * SECTOR],
                visible: vec![0; SECTORS * SECTOR],
                cache: Vec::new(),
                trigger: None,
                rng: seed,
                kills: 0,
            }),
            killed: watch::channel(1).0,
        })
    }

    /// Kills the server: every connection drops, unflushed sectors are kept or lost at
    /// random, and the listener comes back shortly after.
    fn kill(&self) {
        let mut d = self.disk.lock();
        self.kill_locked(&mut d);
    }

    fn kill_locked(&self, d: &mut Disk) {
        d.crash();
        self.killed.send_replace(d.epoch);
    }
}

/// Binds the listener, serves until a kill, waits a little, and binds again, forever.
async fn supervise(up: Arc<Upstream>) {
    loop {
        let _ = std::fs::remove_file(&up.path);
        let listener = UnixListener::bind(&up.path).expect("bind the upstream socket");
        let (epoch, pause) = {
            let mut d = up.disk.lock();
            let pause = mix(&mut d.rng) % 20;
            (d.epoch, Duration::from_millis(pause))
        };
        let mut killed = up.killed.subscribe();
        loop {
            tokio::select! {
                _ = killed.wait_for(|e| *e != epoch) => break,
                accepted = listener.accept() => {
                    if let Ok((s, _)) = accepted {
                        tokio::spawn(serve_upstream(Arc::clone(&up), s, epoch));
                    }
                }
            }
        }
        drop(listener);
        tokio::time::sleep(pause).await;
    }
}

async fn option_reply(s: &mut TokioStream, option: u32, kind: u32, data: &[u8]) {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    let _ = s.write_all(&out).await;
}

/// One upstream connection of epoch `epoch`, until it ends or the server is killed.
async fn serve_upstream(up: Arc<Upstream>, mut s: TokioStream, epoch: u64) {
    let mut killed = up.killed.subscribe();
    tokio::select! {
        _ = killed.wait_for(|e| *e != epoch) => {}
        _ = upstream_session(&up, &mut s, epoch) => {}
    }
}

async fn upstream_session(up: &Upstream, s: &mut TokioStream, epoch: u64) -> std::io::Result<()> {
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&greeting).await?;
    let _client_flags = s.read_u32().await?;
    loop {
        let magic = s.read_u64().await?;
        assert_eq!(magic, IHAVEOPT, "option magic from the proxy");
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        if option == OPT_GO || option == OPT_INFO {
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&EXPORT_SIZE.to_be_bytes());
            info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
            option_reply(s, option, REP_INFO, &info).await;
            option_reply(s, option, REP_ACK, &[]).await;
            if option == OPT_GO {
                break;
            }
        } else {
            option_reply(s, option, REP_ERR_UNSUP, &[]).await;
        }
    }
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h).await?;
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            REQUEST_MAGIC
        );
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
        let payload = if kind == CMD_WRITE {
            let mut p = vec![0u8; len];
            s.read_exact(&mut p).await?;
            Some(p)
        } else {
            None
        };
        if kind == CMD_DISC {
            return Ok(());
        }
        assert!(offset + len <= SECTORS * SECTOR, "request past the end");
        let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        reply.extend_from_slice(&0u32.to_be_bytes());
        reply.extend_from_slice(&cookie.to_be_bytes());
        {
            let mut d = up.disk.lock();
            if d.epoch != epoch {
                // Killed meanwhile: a dead server applies nothing.
                return Ok(());
            }
            let trigger = d.trigger.take();
            if trigger == Some(Trigger::KillBefore) {
                up.kill_locked(&mut d);
                return Ok(());
            }
            let fua = flags & CMD_FLAG_FUA != 0;
            match kind {
                CMD_WRITE => d.write(offset, payload.as_deref().unwrap_or_default(), fua),
                CMD_WRITE_ZEROES => d.write(offset, &vec![0u8; len], fua),
                CMD_FLUSH => d.flush(),
                CMD_READ => reply.extend_from_slice(&d.visible[offset..offset + len]),
                other => panic!("unexpected NBD command {other} from the proxy"),
            }
            if trigger == Some(Trigger::KillAfter) {
                up.kill_locked(&mut d);
                return Ok(());
            }
        }
        s.write_all(&reply).await?;
    }
}

/// A synchronous NBD client of the proxy (one request at a time).
struct Client {
    s: UnixStream,
    cookie: u64,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let mut s = UnixStream::connect(path).expect("connect to the proxy");
        // A hang is a failure, not a stuck test.
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        assert_eq!(
            u64::from_be_bytes(greeting[0..8].try_into().unwrap()),
            NBDMAGIC
        );
        assert_eq!(
            u64::from_be_bytes(greeting[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        let name = b"x";
        let mut out = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&out).expect("send NBD_OPT_GO");
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).expect("option reply");
            assert_eq!(
                u64::from_be_bytes(h[0..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).expect("option reply data");
            match reply {
                REP_INFO if data[0..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("the proxy refused NBD_OPT_GO: reply {other:#x}"),
            }
        }
        assert_eq!(size, Some(EXPORT_SIZE));
        Client { s, cookie: 0 }
    }

    /// Sends one request, checks that it succeeded, and returns the data it read.
    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: usize,
        len: usize,
        data: &[u8],
    ) -> Vec<u8> {
        self.cookie += 1;
        let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&(offset as u64).to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.s.write_all(&out).expect("send a request");
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).expect("a reply from the proxy");
        assert_eq!(
            u32::from_be_bytes(r[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
        assert_eq!(error, 0, "request {kind} at {offset}+{len} failed");
        assert_eq!(
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
            self.cookie
        );
        let mut buf = Vec::new();
        if kind == CMD_READ {
            buf.resize(len, 0);
            self.s.read_exact(&mut buf).expect("read data");
        }
        buf
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        conn: usize,
        sector: usize,
        sectors: usize,
        fua: bool,
        byte: u8,
    },
    Zero {
        conn: usize,
        sector: usize,
        sectors: usize,
    },
    Read {
        conn: usize,
        sector: usize,
        sectors: usize,
    },
    Flush {
        conn: usize,
    },
    /// Kill the upstream now, between requests.
    Kill,
    /// Kill the upstream when the next request reaches it.
    KillOnNext(Trigger),
}

fn range() -> impl Strategy<Value = (usize, usize)> {
    (0..SECTORS, 1usize..=32).prop_map(|(s, n)| (s.min(SECTORS - n), n))
}

fn op() -> impl Strategy<Value = Op> {
    let conn = 0usize..2;
    prop_oneof![
        8 => (conn.clone(), range(), any::<bool>(), 1u8..=255).prop_map(
            |(conn, (sector, sectors), fua, byte)| Op::Write {
                conn,
                sector,
                sectors,
                // FUA one time in four.
                fua: fua && byte % 2 == 0,
                byte,
            }
        ),
        2 => (conn.clone(), range()).prop_map(|(conn, (sector, sectors))| Op::Zero {
            conn,
            sector,
            sectors
        }),
        3 => (conn.clone(), range()).prop_map(|(conn, (sector, sectors))| Op::Read {
            conn,
            sector,
            sectors
        }),
        2 => conn.prop_map(|conn| Op::Flush { conn }),
        2 => Just(Op::Kill),
        1 => Just(Op::KillOnNext(Trigger::KillBefore)),
        1 => Just(Op::KillOnNext(Trigger::KillAfter)),
    ]
}

/// Runs one sequence against a fresh server and proxy; returns how many kills happened.
fn run(ops: &[Op], seed: u64) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream_path = dir.path().join("upstream.sock");
    let listen = dir.path().join("proxy.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let up = Upstream::new(upstream_path.clone(), seed);
    rt.spawn(supervise(Arc::clone(&up)));
    let shared = proxy::Shared::new(Config {
        listen: listen.clone(),
        upstream_socket: upstream_path,
        export: "x".into(),
        // Never give up within a test: a kill is always followed by a restart.
        reconnect_timeout: Duration::from_secs(60),
        journal_limit: JOURNAL_LIMIT,
        exit_after_disconnect: false,
    });
    let listener = {
        let _guard = rt.enter();
        proxy::bind(&listen).expect("bind the proxy socket")
    };
    rt.spawn(proxy::serve(
        Arc::clone(&shared),
        listener,
        std::future::pending(),
    ));
    let mut clients = [Client::connect(&listen), Client::connect(&listen)];
    // What the clients were told the export holds.
    let mut acked = vec![0u8; SECTORS * SECTOR];

    for op in ops {
        match *op {
            Op::Write {
                conn,
                sector,
                sectors,
                fua,
                byte,
            } => {
                let (off, len) = (sector * SECTOR, sectors * SECTOR);
                let data = vec![byte; len];
                let flags = if fua { CMD_FLAG_FUA } else { 0 };
                clients[conn].request(CMD_WRITE, flags, off, len, &data);
                acked[off..off + len].copy_from_slice(&data);
                if fua {
                    let d = up.disk.lock();
                    assert!(
                        d.durable[off..off + len] == data[..],
                        "an acknowledged FUA write at sector {sector} is not durable"
                    );
                }
            }
            Op::Zero {
                conn,
                sector,
                sectors,
            } => {
                let (off, len) = (sector * SECTOR, sectors * SECTOR);
                clients[conn].request(CMD_WRITE_ZEROES, 0, off, len, &[]);
                acked[off..off + len].fill(0);
            }
            Op::Read {
                conn,
                sector,
                sectors,
            } => {
                let (off, len) = (sector * SECTOR, sectors * SECTOR);
                let got = clients[conn].request(CMD_READ, 0, off, len, &[]);
                check_same(&got, &acked[off..off + len], sector, "a read");
            }
            Op::Flush { conn } => {
                clients[conn].request(CMD_FLUSH, 0, 0, 0, &[]);
                let d = up.disk.lock();
                check_same(&d.durable, &acked, 0, "the durable contents after a flush");
            }
            Op::Kill => up.kill(),
            Op::KillOnNext(trigger) => up.disk.lock().trigger = Some(trigger),
        }
    }
    // Everything acknowledged reads back on both connections, is made durable by a
    // flush, and survives one more kill.
    for c in clients.iter_mut() {
        let got = c.request(CMD_READ, 0, 0, SECTORS * SECTOR, &[]);
        check_same(&got, &acked, 0, "the final read");
    }
    clients[0].request(CMD_FLUSH, 0, 0, 0, &[]);
    check_same(
        &up.disk.lock().durable,
        &acked,
        0,
        "the durable contents at the end",
    );
    up.kill();
    let got = clients[1].request(CMD_READ, 0, 0, SECTORS * SECTOR, &[]);
    check_same(&got, &acked, 0, "a read after the last kill");
    let kills = up.disk.lock().kills;
    drop(clients);
    // Not a plain drop: that would wait for a reconnect's blocking handshake to finish.
    rt.shutdown_timeout(Duration::from_secs(1));
    kills
}

/// Compares two images sector by sector; `first` is the sector `got` starts at.
fn check_same(got: &[u8], want: &[u8], first: usize, what: &str) {
    if got == want {
        return;
    }
    let bad = got
        .chunks(SECTOR)
        .zip(want.chunks(SECTOR))
        .position(|(g, w)| g != w)
        .unwrap_or(0);
    panic!(
        "{what}: sector {} reads {:#x}.., acknowledged {:#x}..",
        first + bad,
        got[bad * SECTOR],
        want[bad * SECTOR]
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn acknowledged_writes_survive_upstream_kills(
        ops in prop::collection::vec(op(), 1..60),
        seed in any::<u64>(),
    ) {
        run(&ops, seed);
    }
}

/// A fixed sequence with every kind of kill, so that the property above cannot pass by
/// never killing (the strategy could, in principle, draw none).
#[test]
fn every_kind_of_kill_is_exercised() {
    let w = |conn, sector, byte| Op::Write {
        conn,
        sector,
        sectors: 8,
        fua: false,
        byte,
    };
    let ops = vec![
        w(0, 0, 1),
        w(1, 4, 2),
        Op::Kill,
        Op::Read {
            conn: 0,
            sector: 0,
            sectors: 16,
        },
        Op::KillOnNext(Trigger::KillAfter),
        w(1, 8, 3),
        Op::KillOnNext(Trigger::KillBefore),
        w(0, 2, 4),
        Op::Flush { conn: 1 },
        w(0, 100, 5),
        Op::KillOnNext(Trigger::KillBefore),
        Op::Flush { conn: 0 },
        Op::Write {
            conn: 1,
            sector: 96,
            sectors: 8,
            fua: true,
            byte: 6,
        },
        Op::Kill,
    ];
    let kills = run(&ops, 7);
    // Five kills in the sequence and the final one.
    assert_eq!(kills, 6);
}
