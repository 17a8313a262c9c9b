//! A stand-in for the kernel's end of `/dev/fuse`, so tests and the fuzz target drive the
//! real request path (fuser's decoding and dispatch, [`ExportFile`], fuser's replies)
//! without a mount.
//!
//! ```text
//!   KernelPeer ──SOCK_SEQPACKET socket pair──▶ fuser::Session::from_fd ──▶ ExportFile
//!    (requests, framed as the kernel frames them; replies read back)
//! ```
//!
//! A `SOCK_SEQPACKET` socket keeps message boundaries as `/dev/fuse` does: one `read(2)`
//! returns one request, one `writev(2)` sends one reply. Unlike `/dev/fuse`, a message
//! must fit the socket's buffer (about 200 KiB by default), so tests write in smaller
//! pieces than the kernel's 1 MiB. Closing our sending side ends the
//! session the way no kernel does (fuser reads a zero-byte request and stops with
//! `InvalidData`); [`KernelPeer::finish`] expects that.
//!
//! Invariant: every message [`frame_like_the_kernel`] has touched holds what the kernel
//! guarantees and fuser trusts (see the module docs of [`super`]); its other bytes are
//! anyone's.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::{Export, ExportFile};

/// The size of `struct fuse_in_header`.
pub const HEADER_LEN: usize = 40;
/// The size of `struct fuse_out_header`.
pub const REPLY_HEADER_LEN: usize = 16;
/// The inode of the mount's root.
pub const ROOT: u64 = 1;
/// The inode of the file `nbd`.
pub const FILE: u64 = 2;
/// How long a test waits for a reply before failing instead of hanging (not a timing
/// assertion: a served request answers at once).
const REPLY_WAIT: Duration = Duration::from_secs(60);

/// Opcodes of `linux/fuse.h` (`enum fuse_opcode`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
}

/// A request: `struct fuse_in_header` (uid, gid and pid 0: root) followed by `body`.
pub fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(HEADER_LEN + body.len());
    msg.extend_from_slice(&0u32.to_le_bytes()); // len, set below
    msg.extend_from_slice(&opcode.to_le_bytes());
    msg.extend_from_slice(&unique.to_le_bytes());
    msg.extend_from_slice(&nodeid.to_le_bytes());
    msg.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    msg.extend_from_slice(body);
    frame_like_the_kernel(&mut msg);
    msg
}

fn put_u32(msg: &mut [u8], at: usize, value: u32) {
    if let Some(field) = msg.get_mut(at..at + 4) {
        field.copy_from_slice(&value.to_le_bytes());
    }
}

fn get_u32(msg: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(msg.get(at..at + 4)?.try_into().ok()?))
}

/// Makes `msg`'s length fields say what the kernel's always say: the header's `len` is
/// the message's length, a WRITE's `size` and a SETXATTR's value size are the bytes that
/// follow, an IOCTL's `in_size` fits the message. Every other byte is left as it is.
pub fn frame_like_the_kernel(msg: &mut [u8]) {
    let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
    put_u32(msg, 0, len);
    let Some(op) = get_u32(msg, 4) else {
        return;
    };
    if msg.len() < HEADER_LEN {
        return;
    }
    let body = &mut msg[HEADER_LEN..];
    match op {
        // struct fuse_write_in (40 bytes), `size` at 16, then the data.
        opcode::WRITE if body.len() >= 40 => {
            let size = (body.len() - 40) as u32;
            put_u32(body, 16, size);
        }
        // struct fuse_setxattr_in (8 bytes), `size` at 0, then the name, NUL, the value.
        opcode::SETXATTR if body.len() >= 8 => {
            if let Some(nul) = body[8..].iter().position(|b| *b == 0) {
                let size = (body.len() - 8 - nul - 1) as u32;
                put_u32(body, 0, size);
            }
        }
        // struct fuse_ioctl_in (32 bytes), `in_size` at 24, then the input data.
        opcode::IOCTL if body.len() >= 32 => {
            let room = (body.len() - 32) as u32;
            let in_size = get_u32(body, 24).unwrap_or(0).min(room);
            put_u32(body, 24, in_size);
        }
        _ => {}
    }
}

/// A reply as the kernel reads it: `struct fuse_out_header` and what follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub unique: u64,
    /// 0 or a negated errno.
    pub error: i32,
    pub body: Vec<u8>,
}

impl Reply {
    fn parse(msg: &[u8]) -> io::Result<Reply> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        if msg.len() < REPLY_HEADER_LEN {
            return Err(bad("reply shorter than fuse_out_header"));
        }
        let len = get_u32(msg, 0).unwrap_or(0) as usize;
        if len != msg.len() {
            return Err(bad("reply length field disagrees with the message"));
        }
        Ok(Reply {
            error: i32::from_le_bytes(msg[4..8].try_into().unwrap_or_default()),
            unique: u64::from_le_bytes(msg[8..16].try_into().unwrap_or_default()),
            body: msg[REPLY_HEADER_LEN..].to_vec(),
        })
    }
}

/// The kernel's end of a FUSE session over a socket pair, the file system's end served by
/// fuser on a background thread.
#[derive(Debug)]
pub struct KernelPeer {
    sock: File,
    session: fuser::BackgroundSession,
    next_unique: u64,
}

/// A `SOCK_SEQPACKET` socket pair.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair(2) writes two fds into the array it is given, which outlives
    // the call.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh from socketpair(2) and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message without raising SIGPIPE (a fuzz target has no Rust `main` to
/// ignore it). Waits while the socket is full and `alive` says the session still reads;
/// `BrokenPipe` once it does not.
fn send(sock: &File, msg: &[u8], alive: impl Fn() -> bool) -> io::Result<()> {
    loop {
        // SAFETY: `msg` is a valid buffer for the call's duration; the fd is open.
        let rc = unsafe {
            libc::send(
                sock.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if rc >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if alive() => {
                let mut pollfd = libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: poll(2) on one pollfd that outlives the call.
                unsafe { libc::poll(&mut pollfd, 1, 10) };
            }
            io::ErrorKind::WouldBlock => return Err(io::ErrorKind::BrokenPipe.into()),
            _ => return Err(err),
        }
    }
}

/// Reads one message; `None` once the session has closed its end.
fn receive(sock: &mut File, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match sock.read(buf) {
            Ok(0) => return Ok(None),
            Ok(n) => return Ok(Some(n)),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
}

/// `struct fuse_init_in` of a 7.31 kernel offering async reads, big writes and max_pages.
fn init_body() -> Vec<u8> {
    const ASYNC_READ: u32 = 1;
    const BIG_WRITES: u32 = 1 << 5;
    const MAX_PAGES: u32 = 1 << 22;
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&7u32.to_le_bytes());
    body.extend_from_slice(&31u32.to_le_bytes());
    body.extend_from_slice(&super::MAX_IO.to_le_bytes()); // max_readahead
    body.extend_from_slice(&(ASYNC_READ | BIG_WRITES | MAX_PAGES).to_le_bytes());
    body.resize(64, 0); // flags2, unused
    body
}

impl KernelPeer {
    /// Starts a session of `file`: sends INIT, lets fuser answer it, and serves the rest on
    /// a background thread.
    pub fn start<E: Export>(file: ExportFile<E>) -> io::Result<KernelPeer> {
        let (ours, theirs) = seqpacket_pair()?;
        let sock = File::from(ours);
        // A missing reply fails a test instead of hanging it.
        crate::socket::set_receive_timeout(&sock, REPLY_WAIT)?;
        send(&sock, &request(opcode::INIT, 1, 0, &init_body()), || true)?;
        let mut config = fuser::Config::default();
        config.n_threads = Some(1);
        let session = fuser::Session::from_fd(file, theirs, fuser::SessionACL::All, config)?;
        let mut peer = KernelPeer {
            sock,
            session: session.spawn()?,
            next_unique: 2,
        };
        let init = peer
            .receive()?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no reply to FUSE_INIT"))?;
        if init.error != 0 || init.unique != 1 {
            return Err(io::Error::other(format!("FUSE_INIT failed: {init:?}")));
        }
        Ok(peer)
    }

    /// Sends one message as it is; `BrokenPipe` once the session has ended.
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        send(&self.sock, msg, || !self.session.guard.is_finished())
    }

    /// Reads one reply; `None` once the session has ended.
    pub fn receive(&mut self) -> io::Result<Option<Reply>> {
        let mut buf = vec![0u8; super::MAX_IO as usize + 4096];
        match receive(&mut self.sock, &mut buf)? {
            Some(n) => Reply::parse(&buf[..n]).map(Some),
            None => Ok(None),
        }
    }

    /// Sends a request (with a fresh unique id) and reads its reply.
    pub fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> io::Result<Reply> {
        let unique = self.next_unique;
        self.next_unique += 1;
        self.send(&request(opcode, unique, nodeid, body))?;
        let reply = self
            .receive()?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the session ended"))?;
        if reply.unique != unique {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "reply to request {} while waiting for {unique}",
                    reply.unique
                ),
            ));
        }
        Ok(reply)
    }

    /// Closes the kernel's sending side, waits for the session to end, and returns what
    /// it ended with: `Err(InvalidData)` for the zero-byte request that closing makes (or
    /// an earlier undecodable one), `Ok` after a FUSE_DESTROY. A panic in the session is an
    /// `Err` of another kind. Replies not read yet are dropped.
    pub fn finish(self) -> io::Result<()> {
        // SAFETY: shutdown(2) on an fd we own; it changes no memory.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_WR) };
        self.session.join()
    }
}

/// Runs `messages`, each framed as the kernel frames it, through a session of `file`,
/// reading replies concurrently (as the kernel does) so that none blocks the session;
/// returns what the session ended with (see [`KernelPeer::finish`]). The fuzz target's
/// entry point.
pub fn replay<E: Export>(
    file: ExportFile<E>,
    messages: impl IntoIterator<Item = Vec<u8>>,
) -> io::Result<()> {
    let peer = KernelPeer::start(file)?;
    let mut reader = peer.sock.try_clone()?;
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; super::MAX_IO as usize + 4096];
        while let Ok(Some(_)) = receive(&mut reader, &mut buf) {}
    });
    for mut msg in messages {
        frame_like_the_kernel(&mut msg);
        // EPIPE: the session has ended (an undecodable request ends it).
        if peer.send(&msg).is_err() {
            break;
        }
    }
    let result = peer.finish();
    let _ = drain.join();
    result
}
