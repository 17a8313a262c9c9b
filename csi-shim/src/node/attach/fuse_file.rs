//! `csi-fuse-nbd`: presents one NBD export as the file `nbd` on a FUSE mount, with a size
//! that follows the export (unlike nbdfuse, which keeps the size it saw at connect time),
//! so that a loop device on the file can grow online.
//!
//! ```text
//!   loop (direct I/O) ──▶ /dev/fuse ──▶ this server ──NBD──▶ csi-nbd-proxy ──▶ blockd
//!                                          ▲
//!     csi-shim: writes WORK/size, stats the file (GETATTR re-reads it), `losetup -c`
//! ```
//!
//! Invariants:
//! - the file's size is the size the current NBD connection negotiated; when the size file
//!   names a larger size, GETATTR reconnects (a fresh handshake learns the grown size)
//!   before answering, so no request ever targets bytes the connection does not cover;
//! - attributes are never cached by the kernel (`attr_valid` 0), so a `stat` is enough to
//!   publish a new size to the loop driver;
//! - one request at a time, answered in order; an NBD transport error reconnects and
//!   resends (blockd restarts are hidden below us by csi-nbd-proxy);
//! - at most [`FLUSH_EVERY`] bytes are written between two NBD flushes, so the proxy's
//!   replay journal of unflushed writes stays small and its own flushes never run;
//! - the server exits when its mount goes away (`ENODEV` from `/dev/fuse`).
//!
//! The FUSE wire structs follow `linux/fuse.h` (protocol 7.31).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::nbd_client::{self as nbd, Connection};

const ROOT: u64 = 1;
const FILE: u64 = 2;
const FILE_NAME: &[u8] = b"nbd";
const MAX_WRITE: u32 = 1 << 20;
/// Bytes written after which the server flushes on its own (see the module docs).
pub const FLUSH_EVERY: u64 = 32 << 20;

const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const ACCESS: u32 = 34;
const INTERRUPT: u32 = 36;
const DESTROY: u32 = 38;
const BATCH_FORGET: u32 = 42;
const FALLOCATE: u32 = 43;

const FOPEN_DIRECT_IO: u32 = 1;
const INIT_ASYNC_READ: u32 = 1;
const INIT_BIG_WRITES: u32 = 1 << 5;
const INIT_MAX_PAGES: u32 = 1 << 22;

const FALLOC_FL_KEEP_SIZE: u32 = 1;
const FALLOC_FL_PUNCH_HOLE: u32 = 2;
const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

/// What the server serves and where.
#[derive(Debug, Clone)]
pub struct Config {
    pub mount_point: PathBuf,
    pub socket: PathBuf,
    pub export: String,
    /// A file holding the size csi-shim expects (decimal bytes); see the module docs.
    pub size_file: PathBuf,
    pub pidfile: Option<PathBuf>,
    /// How long to keep reconnecting before failing a request with EIO.
    pub reconnect_timeout: Duration,
}

struct Server {
    cfg: Config,
    conn: Connection,
    /// Bytes written since the last flush.
    unflushed: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// `struct fuse_attr` (88 bytes).
fn attr(node: u64, size: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(88);
    let (mode, nlink) = if node == ROOT {
        (libc::S_IFDIR | 0o755, 2u32)
    } else {
        (libc::S_IFREG | 0o600, 1u32)
    };
    a.extend_from_slice(&node.to_le_bytes()); // ino
    a.extend_from_slice(&size.to_le_bytes()); // size
    a.extend_from_slice(&size.div_ceil(512).to_le_bytes()); // blocks
    a.extend_from_slice(&[0u8; 24]); // atime, mtime, ctime
    a.extend_from_slice(&[0u8; 12]); // *timensec
    a.extend_from_slice(&mode.to_le_bytes());
    a.extend_from_slice(&nlink.to_le_bytes());
    a.extend_from_slice(&[0u8; 12]); // uid, gid, rdev
    a.extend_from_slice(&4096u32.to_le_bytes()); // blksize
    a.extend_from_slice(&0u32.to_le_bytes()); // flags
    a
}

/// `struct fuse_attr_out`.
fn attr_out(node: u64, size: u64) -> Vec<u8> {
    let mut out = vec![0u8; 16]; // attr_valid = 0: never cached
    out.extend_from_slice(&attr(node, size));
    out
}

impl Server {
    fn connect(cfg: &Config) -> io::Result<Connection> {
        let deadline = Instant::now() + cfg.reconnect_timeout;
        loop {
            match Connection::open(&cfg.socket, &cfg.export) {
                Ok(conn) => return Ok(conn),
                Err(e) if Instant::now() < deadline => {
                    eprintln!(
                        "csi-fuse-nbd: connecting to {}: {e}; retrying",
                        cfg.socket.display()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One NBD request, reconnecting and resending on a transport error.
    fn nbd(
        &mut self,
        kind: nbd::Command,
        offset: u64,
        length: u32,
        data: &mut [u8],
    ) -> Result<(), i32> {
        let deadline = Instant::now() + self.cfg.reconnect_timeout;
        loop {
            match self.conn.request(kind, offset, length, data) {
                Ok(0) => return Ok(()),
                Ok(error) => return Err(error as i32),
                Err(e) => {
                    eprintln!("csi-fuse-nbd: NBD request failed: {e}; reconnecting");
                    if Instant::now() > deadline {
                        return Err(libc::EIO);
                    }
                    match Self::connect(&self.cfg) {
                        Ok(conn) => self.conn = conn,
                        Err(_) => return Err(libc::EIO),
                    }
                }
            }
        }
    }

    /// Picks up a grown export (see the module docs).
    fn refresh_size(&mut self) {
        let wanted = std::fs::read_to_string(&self.cfg.size_file)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if wanted > self.conn.size {
            match Self::connect(&self.cfg) {
                Ok(conn) => {
                    eprintln!(
                        "csi-fuse-nbd: export size {} -> {}",
                        self.conn.size, conn.size
                    );
                    self.conn = conn;
                }
                Err(e) => eprintln!("csi-fuse-nbd: cannot refresh the size: {e}"),
            }
        }
    }

    /// Handles one request; `None` means "send no reply".
    fn handle(&mut self, opcode: u32, node: u64, body: &[u8]) -> Option<Result<Vec<u8>, i32>> {
        let size = self.conn.size;
        Some(match opcode {
            INIT => {
                let mut out = Vec::with_capacity(64);
                out.extend_from_slice(&7u32.to_le_bytes());
                out.extend_from_slice(&31u32.to_le_bytes());
                out.extend_from_slice(&(1u32 << 20).to_le_bytes()); // max_readahead
                out.extend_from_slice(
                    &(INIT_ASYNC_READ | INIT_BIG_WRITES | INIT_MAX_PAGES).to_le_bytes(),
                );
                out.extend_from_slice(&16u16.to_le_bytes()); // max_background
                out.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
                out.extend_from_slice(&MAX_WRITE.to_le_bytes());
                out.extend_from_slice(&1u32.to_le_bytes()); // time_gran
                out.extend_from_slice(&((MAX_WRITE / 4096) as u16).to_le_bytes()); // max_pages
                out.resize(64, 0);
                Ok(out)
            }
            LOOKUP => {
                let name = body.split(|b| *b == 0).next().unwrap_or_default();
                if node == ROOT && name == FILE_NAME {
                    self.refresh_size();
                    let mut out = Vec::with_capacity(128);
                    out.extend_from_slice(&FILE.to_le_bytes()); // nodeid
                    out.extend_from_slice(&0u64.to_le_bytes()); // generation
                    out.extend_from_slice(&1u64.to_le_bytes()); // entry_valid
                    out.extend_from_slice(&0u64.to_le_bytes()); // attr_valid
                    out.extend_from_slice(&[0u8; 8]); // nsecs
                    out.extend_from_slice(&attr(FILE, self.conn.size));
                    Ok(out)
                } else {
                    Err(libc::ENOENT)
                }
            }
            GETATTR | SETATTR => {
                if node == FILE {
                    self.refresh_size();
                }
                Ok(attr_out(node, self.conn.size))
            }
            OPEN | OPENDIR => {
                let mut out = vec![0u8; 16];
                if opcode == OPEN {
                    out[8..12].copy_from_slice(&FOPEN_DIRECT_IO.to_le_bytes());
                }
                Ok(out)
            }
            READ if node == FILE => {
                let offset = le64(body, 8);
                let want = le32(body, 16) as u64;
                let len = want.min(size.saturating_sub(offset)) as u32;
                let mut data = vec![0u8; len as usize];
                if len > 0 {
                    self.nbd(nbd::Command::Read, offset, len, &mut data)
                        .map(|()| data)
                } else {
                    Ok(data)
                }
            }
            WRITE if node == FILE => {
                let offset = le64(body, 8);
                let len = le32(body, 16);
                let mut data = body.get(40..40 + len as usize).unwrap_or_default().to_vec();
                if offset + u64::from(len) > size {
                    Err(libc::ENOSPC)
                } else {
                    let written = self.nbd(nbd::Command::Write, offset, len, &mut data);
                    self.unflushed += u64::from(len);
                    let flushed = if written.is_ok()
                        && self.unflushed >= FLUSH_EVERY
                        && self.conn.flags & nbd::SEND_FLUSH != 0
                    {
                        self.unflushed = 0;
                        self.nbd(nbd::Command::Flush, 0, 0, &mut [])
                    } else {
                        Ok(())
                    };
                    written.and(flushed).map(|()| {
                        let mut out = len.to_le_bytes().to_vec();
                        out.extend_from_slice(&[0u8; 4]);
                        out
                    })
                }
            }
            FSYNC if self.conn.flags & nbd::SEND_FLUSH != 0 => {
                self.unflushed = 0;
                self.nbd(nbd::Command::Flush, 0, 0, &mut [])
                    .map(|()| Vec::new())
            }
            FALLOCATE if node == FILE => {
                let offset = le64(body, 8);
                let length = le64(body, 16);
                let mode = le32(body, 24);
                let (kind, needed) = if mode & FALLOC_FL_PUNCH_HOLE != 0 {
                    (nbd::Command::Trim, nbd::SEND_TRIM)
                } else if mode & FALLOC_FL_ZERO_RANGE != 0 {
                    (nbd::Command::WriteZeroes, nbd::SEND_WRITE_ZEROES)
                } else {
                    (nbd::Command::Read, 0)
                };
                if needed == 0
                    || self.conn.flags & needed == 0
                    || offset + length > size
                    || (mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
                        != 0
                {
                    Err(libc::EOPNOTSUPP)
                } else {
                    let mut done = 0u64;
                    let mut result = Ok(Vec::new());
                    while done < length {
                        let step = (length - done).min(1 << 30);
                        if let Err(e) = self.nbd(kind, offset + done, step as u32, &mut []) {
                            result = Err(e);
                            break;
                        }
                        done += step;
                    }
                    result
                }
            }
            READDIR if node == ROOT => {
                let offset = le64(body, 8);
                let max = le32(body, 16) as usize;
                let entries: [(u64, &[u8], u32); 3] = [
                    (ROOT, b".", libc::DT_DIR as u32),
                    (ROOT, b"..", libc::DT_DIR as u32),
                    (FILE, FILE_NAME, libc::DT_REG as u32),
                ];
                let mut out = Vec::new();
                for (i, (ino, name, kind)) in entries.iter().enumerate().skip(offset as usize) {
                    let mut ent = Vec::new();
                    ent.extend_from_slice(&ino.to_le_bytes());
                    ent.extend_from_slice(&((i + 1) as u64).to_le_bytes());
                    ent.extend_from_slice(&(name.len() as u32).to_le_bytes());
                    ent.extend_from_slice(&kind.to_le_bytes());
                    ent.extend_from_slice(name);
                    ent.resize(ent.len().div_ceil(8) * 8, 0);
                    if out.len() + ent.len() > max {
                        break;
                    }
                    out.extend_from_slice(&ent);
                }
                Ok(out)
            }
            STATFS => {
                let mut out = vec![0u8; 80];
                out[40..44].copy_from_slice(&4096u32.to_le_bytes()); // bsize
                out[44..48].copy_from_slice(&255u32.to_le_bytes()); // namelen
                out[48..52].copy_from_slice(&4096u32.to_le_bytes()); // frsize
                Ok(out)
            }
            RELEASE | RELEASEDIR | FLUSH | ACCESS | FSYNC | DESTROY => Ok(Vec::new()),
            FORGET | BATCH_FORGET | INTERRUPT => return None,
            _ => Err(libc::ENOSYS),
        })
    }
}

/// Mounts the FUSE file system at `cfg.mount_point` and serves until it is unmounted.
pub fn serve(cfg: Config) -> io::Result<()> {
    let conn = Server::connect(&cfg)?;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let target = CString::new(cfg.mount_point.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let options = CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,max_read={MAX_WRITE}",
        dev.as_raw_fd()
    ))
    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let source = CString::new("csi-fuse-nbd").unwrap_or_default();
    let fstype = CString::new("fuse").unwrap_or_default();
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(pidfile) = &cfg.pidfile {
        std::fs::write(pidfile, format!("{}\n", std::process::id()))?;
    }
    let mut server = Server {
        cfg,
        conn,
        unflushed: 0,
    };
    run(&mut server, dev)
}

fn run(server: &mut Server, dev: File) -> io::Result<()> {
    // SAFETY: dup(2) of an fd we own; the new fd is owned by the File made from it.
    let dup = unsafe { libc::dup(dev.as_raw_fd()) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh fd nobody else owns.
    let mut writer = unsafe { File::from_raw_fd(dup) };
    let mut reader = dev;
    let mut buf = vec![0u8; MAX_WRITE as usize + 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::ENOENT) | Some(libc::EAGAIN)
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if n < 40 {
            continue;
        }
        let opcode = le32(&buf, 4);
        let unique = le64(&buf, 8);
        let node = le64(&buf, 16);
        let body = &buf[40..n];
        let reply = server.handle(opcode, node, body);
        let Some(reply) = reply else { continue };
        let (error, payload) = match reply {
            Ok(p) => (0i32, p),
            Err(e) => (-e, Vec::new()),
        };
        let mut out = Vec::with_capacity(16 + payload.len());
        out.extend_from_slice(&((16 + payload.len()) as u32).to_le_bytes());
        out.extend_from_slice(&error.to_le_bytes());
        out.extend_from_slice(&unique.to_le_bytes());
        out.extend_from_slice(&payload);
        if let Err(e) = writer.write_all(&out) {
            // ENOENT: the request was interrupted; anything else ends the session.
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
        if opcode == DESTROY {
            return Ok(());
        }
    }
}

/// Parses `--mount DIR --socket SOCK --export NAME --size-file FILE [--pidfile FILE]
/// [--reconnect-timeout SECS]`.
pub fn parse_args(args: impl Iterator<Item = String>) -> Result<Config, String> {
    let mut cfg = Config {
        mount_point: PathBuf::new(),
        socket: PathBuf::new(),
        export: String::new(),
        size_file: PathBuf::new(),
        pidfile: None,
        reconnect_timeout: Duration::from_secs(60),
    };
    let mut args = args;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mount" => cfg.mount_point = value()?.into(),
            "--socket" => cfg.socket = value()?.into(),
            "--export" => cfg.export = value()?,
            "--size-file" => cfg.size_file = value()?.into(),
            "--pidfile" => cfg.pidfile = Some(value()?.into()),
            "--reconnect-timeout" => {
                let v = value()?;
                cfg.reconnect_timeout = Duration::from_secs(
                    v.parse()
                        .map_err(|_| format!("bad --reconnect-timeout {v:?}"))?,
                )
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if cfg.mount_point.as_os_str().is_empty()
        || cfg.socket.as_os_str().is_empty()
        || cfg.export.is_empty()
    {
        return Err("usage: csi-fuse-nbd --mount DIR --socket SOCK --export NAME --size-file FILE [--pidfile FILE] [--reconnect-timeout SECS]".into());
    }
    Ok(cfg)
}

/// Whether `path` is the file this server presents under `mount_point`.
pub fn file_path(mount_point: &Path) -> PathBuf {
    mount_point.join("nbd")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_parsed_and_checked() {
        let args = [
            "--mount",
            "/m",
            "--socket",
            "/s",
            "--export",
            "v",
            "--size-file",
            "/z",
            "--pidfile",
            "/p",
            "--reconnect-timeout",
            "5",
        ];
        let cfg = parse_args(args.iter().map(|s| s.to_string())).unwrap();
        assert_eq!(cfg.mount_point, PathBuf::from("/m"));
        assert_eq!(cfg.export, "v");
        assert_eq!(cfg.pidfile, Some(PathBuf::from("/p")));
        assert_eq!(cfg.reconnect_timeout, Duration::from_secs(5));
        assert!(parse_args(["--mount", "/m"].iter().map(|s| s.to_string())).is_err());
        assert!(parse_args(["--bogus"].iter().map(|s| s.to_string())).is_err());
        assert!(parse_args(["--export"].iter().map(|s| s.to_string())).is_err());
    }

    #[test]
    fn attributes_have_the_kernel_layout() {
        let a = attr(FILE, 1 << 20);
        assert_eq!(a.len(), 88);
        assert_eq!(le64(&a, 8), 1 << 20);
        assert_eq!(le32(&a, 60), libc::S_IFREG | 0o600);
        assert_eq!(attr_out(ROOT, 0).len(), 104);
        assert_eq!(le32(&attr(ROOT, 0), 60), libc::S_IFDIR | 0o755);
    }
}
