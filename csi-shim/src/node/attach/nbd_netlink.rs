//! Kernel NBD attacher over generic netlink (`linux/nbd-netlink.h`): a hand-written
//! client that hands the kernel a socket already past the NBD handshake and gets a
//! `/dev/nbdN` back.
//!
//! ```text
//!  UnixStream to csi-nbd-proxy ──handshake() (NBD_OPT_GO)──▶ connect(fd, size, flags, bs)
//!        ──NBD_CMD_CONNECT──▶ kernel: /dev/nbdN ──… proxy restarted …──▶ reconfigure(N, new fd)
//!        ──NBD_CMD_DISCONNECT──▶ gone
//! ```
//!
//! This module owns the netlink wire format (message building and parsing, pure and unit
//! tested byte for byte) and one blocking request/acknowledge exchange per call. It keeps
//! no state: every call opens its own `NETLINK_GENERIC` socket and resolves the `nbd`
//! family id (`CTRL_CMD_GETFAMILY`), so it can run from any thread.
//!
//! Invariants:
//! - every request carries `NLM_F_ACK` and a call returns only after the kernel's
//!   acknowledgement (or its error, as [`NetlinkError::Kernel`] with the errno);
//! - the socket descriptor given to [`connect`]/[`reconfigure`] stays open until the
//!   kernel has answered (the kernel takes its own reference), then it is closed here;
//! - the kernel I/O timeout ([`DEFAULT_IO_TIMEOUT`]) is longer than the proxy's
//!   reconnect window, because a request may legitimately wait in the proxy while blockd
//!   restarts; a timeout would fail the I/O and turn the file system read-only.
//!
//! `unsafe` is used only for the libc socket calls, each with its `SAFETY` note.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proxy::wire::{self, ExportInfo, WireError};

// netlink(7) / genetlink.
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_VERSION: u8 = 1;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// linux/nbd-netlink.h.
const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_STATUS: u8 = 5;

/// Kernel I/O timeout: longer than the proxy's default 120 s reconnect window.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the kernel keeps a device whose connection died waiting for
/// [`reconfigure`] before failing I/O.
pub const DEFAULT_DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for the kernel's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("Cannot open a generic netlink socket")]
    Socket(#[source] io::Error),
    #[error("Netlink I/O failed")]
    Io(#[source] io::Error),
    #[error("The kernel has no `nbd` generic netlink family (is the nbd module loaded?)")]
    FamilyNotFound,
    #[error("The kernel refused {op}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("Malformed netlink reply: {0}")]
    Malformed(&'static str),
    #[error("Block size {0} is not a power of two between 512 and 4096")]
    InvalidBlockSize(u32),
    #[error("NBD handshake with the proxy failed")]
    Handshake(#[from] WireError),
}

/// Device parameters for [`connect_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectParams {
    /// Export size in bytes.
    pub size: u64,
    /// Logical block size (512..=4096, power of two).
    pub block_size: u32,
    /// Transmission flags from the handshake (`NBD_FLAG_*`).
    pub server_flags: u16,
    pub io_timeout: Duration,
    pub dead_conn_timeout: Duration,
}

/// `/dev/nbd<index>`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// Whether kernel NBD can be used: the module is loaded (or built in and has devices)
/// and its netlink family resolves.
pub fn available() -> bool {
    if !Path::new("/sys/module/nbd").exists() && !Path::new("/dev/nbd0").exists() {
        return false;
    }
    Netlink::open().and_then(|mut nl| nl.family_id()).is_ok()
}

/// Runs the NBD client handshake (`NBD_OPT_GO`, simple replies, asking for block sizes)
/// on a connected stream to the proxy; afterwards the stream is ready for the kernel.
pub fn handshake(stream: &mut UnixStream, export: &str) -> Result<ExportInfo, NetlinkError> {
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(NetlinkError::Io)?;
    let info = wire::client_handshake(stream, export, true)?;
    stream.set_read_timeout(None).map_err(NetlinkError::Io)?;
    Ok(info)
}

/// The kernel block size for an export: the server's minimum, raised to 512 and to its
/// preferred size where the kernel allows it (at most 4096).
pub fn kernel_block_size(info: &ExportInfo) -> u32 {
    match info.block_size {
        Some(bs) => bs.preferred.clamp(512, 4096).max(bs.min.min(4096)),
        None => 512,
    }
}

/// Hands `sock` (past the handshake) to the kernel and returns the new device index
/// (`/dev/nbd<index>`), with the default timeouts.
pub fn connect(sock: OwnedFd, size: u64, flags: u16, block_size: u32) -> Result<u32, NetlinkError> {
    connect_with(
        sock,
        &ConnectParams {
            size,
            block_size,
            server_flags: flags,
            io_timeout: DEFAULT_IO_TIMEOUT,
            dead_conn_timeout: DEFAULT_DEAD_CONN_TIMEOUT,
        },
    )
}

/// [`connect`] with explicit parameters.
pub fn connect_with(sock: OwnedFd, params: &ConnectParams) -> Result<u32, NetlinkError> {
    let bs = params.block_size;
    if !bs.is_power_of_two() || !(512..=4096).contains(&bs) {
        return Err(NetlinkError::InvalidBlockSize(bs));
    }
    let mut nl = Netlink::open()?;
    let family = nl.family_id()?;
    let seq = nl.next_seq();
    let msg = connect_message(family, seq, sock.as_raw_fd() as u32, params);
    let replies = nl.exchange(&msg, seq, "NBD_CMD_CONNECT")?;
    drop(sock);
    replies
        .iter()
        .find_map(|attrs| find_u32(attrs, NBD_ATTR_INDEX))
        .ok_or(NetlinkError::Malformed(
            "NBD_CMD_CONNECT reply without NBD_ATTR_INDEX",
        ))
}

/// Gives device `index` a new socket (past the handshake) after its connection died.
pub fn reconfigure(index: u32, sock: OwnedFd) -> Result<(), NetlinkError> {
    let mut nl = Netlink::open()?;
    let family = nl.family_id()?;
    let seq = nl.next_seq();
    let msg = reconfigure_message(family, seq, index, sock.as_raw_fd() as u32);
    nl.exchange(&msg, seq, "NBD_CMD_RECONFIGURE")?;
    drop(sock);
    Ok(())
}

/// Disconnects device `index` (the kernel fails outstanding I/O and frees the device).
pub fn disconnect(index: u32) -> Result<(), NetlinkError> {
    let mut nl = Netlink::open()?;
    let family = nl.family_id()?;
    let seq = nl.next_seq();
    let mut m = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_DISCONNECT,
        NBD_GENL_VERSION,
    );
    m.u32(NBD_ATTR_INDEX, index);
    nl.exchange(&m.finish(), seq, "NBD_CMD_DISCONNECT")?;
    Ok(())
}

/// Whether device `index` has a live connection (`None`: the kernel does not list it).
pub fn status(index: u32) -> Result<Option<bool>, NetlinkError> {
    let mut nl = Netlink::open()?;
    let family = nl.family_id()?;
    let seq = nl.next_seq();
    let mut m = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_STATUS,
        NBD_GENL_VERSION,
    );
    m.u32(NBD_ATTR_INDEX, index);
    let replies = nl.exchange(&m.finish(), seq, "NBD_CMD_STATUS")?;
    Ok(replies
        .iter()
        .find_map(|attrs| device_connected(attrs, index)))
}

fn device_connected(attrs: &[u8], index: u32) -> Option<bool> {
    let list = find_attr(attrs, NBD_ATTR_DEVICE_LIST)?;
    for (ty, item) in AttrIter(list) {
        if ty != NBD_DEVICE_ITEM {
            continue;
        }
        if find_u32(item, NBD_DEVICE_INDEX) == Some(index) {
            return Some(
                find_attr(item, NBD_DEVICE_CONNECTED).is_some_and(|v| v.first() == Some(&1)),
            );
        }
    }
    None
}

fn connect_message(family: u16, seq: u32, fd: u32, p: &ConnectParams) -> Vec<u8> {
    let mut m = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_CONNECT,
        NBD_GENL_VERSION,
    );
    m.u64(NBD_ATTR_SIZE_BYTES, p.size);
    m.u64(NBD_ATTR_BLOCK_SIZE_BYTES, p.block_size.into());
    m.u64(NBD_ATTR_SERVER_FLAGS, p.server_flags.into());
    m.u64(NBD_ATTR_TIMEOUT, p.io_timeout.as_secs());
    m.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, p.dead_conn_timeout.as_secs());
    sockets(&mut m, fd);
    m.finish()
}

fn reconfigure_message(family: u16, seq: u32, index: u32, fd: u32) -> Vec<u8> {
    let mut m = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_RECONFIGURE,
        NBD_GENL_VERSION,
    );
    m.u32(NBD_ATTR_INDEX, index);
    sockets(&mut m, fd);
    m.finish()
}

fn sockets(m: &mut MessageBuilder, fd: u32) {
    let socks = m.nest_start(NBD_ATTR_SOCKETS);
    let item = m.nest_start(NBD_SOCK_ITEM);
    m.u32(NBD_SOCK_FD, fd);
    m.nest_end(item);
    m.nest_end(socks);
}

fn getfamily_message(seq: u32) -> Vec<u8> {
    let mut m = MessageBuilder::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        CTRL_VERSION,
    );
    m.string(CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
    m.finish()
}

/// Builds one netlink message: `nlmsghdr`, `genlmsghdr`, then attributes, each padded
/// to 4 bytes; lengths are patched in by [`MessageBuilder::finish`]/`nest_end`. Netlink
/// uses host byte order.
struct MessageBuilder {
    buf: Vec<u8>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl MessageBuilder {
    fn new(ty: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        MessageBuilder { buf }
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) {
        let len = NLA_HDRLEN + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    fn u64(&mut self, ty: u16, v: u64) {
        self.attr(ty, &v.to_ne_bytes());
    }

    fn string(&mut self, ty: u16, s: &str) {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(ty, &b);
    }

    fn nest_start(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// Iterates `(type without flags, payload)` over a run of attributes.
struct AttrIter<'a>(&'a [u8]);

impl<'a> Iterator for AttrIter<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16::from_ne_bytes([self.0[0], self.0[1]]) as usize;
        let ty = u16::from_ne_bytes([self.0[2], self.0[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > self.0.len() {
            return None;
        }
        let payload = &self.0[NLA_HDRLEN..len];
        self.0 = &self.0[align4(len).min(self.0.len())..];
        Some((ty, payload))
    }
}

fn find_attr(attrs: &[u8], ty: u16) -> Option<&[u8]> {
    AttrIter(attrs).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

fn find_u32(attrs: &[u8], ty: u16) -> Option<u32> {
    let p = find_attr(attrs, ty)?;
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

/// What one received buffer said about request `seq`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    /// The attributes of each data message (after the genl header).
    messages: Vec<Vec<u8>>,
    /// The acknowledgement (or error) arrived: nothing more will come.
    done: bool,
}

/// Parses the messages in one datagram from the kernel.
fn parse_replies(buf: &[u8], seq: u32, op: &'static str) -> Result<Parsed, NetlinkError> {
    let mut parsed = Parsed::default();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(NetlinkError::Malformed("message length"));
        }
        let ty = u16::from_ne_bytes([rest[4], rest[5]]);
        let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
        let body = &rest[NLMSG_HDRLEN..len];
        rest = &rest[align4(len).min(rest.len())..];
        if msg_seq != seq {
            continue;
        }
        match ty {
            NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(i32::from_ne_bytes)
                    .ok_or(NetlinkError::Malformed("short NLMSG_ERROR"))?;
                if code != 0 {
                    return Err(NetlinkError::Kernel { op, errno: -code });
                }
                parsed.done = true;
            }
            NLMSG_DONE => parsed.done = true,
            _ => {
                let attrs = body
                    .get(GENL_HDRLEN..)
                    .ok_or(NetlinkError::Malformed("short generic netlink message"))?;
                parsed.messages.push(attrs.to_vec());
            }
        }
    }
    Ok(parsed)
}

/// Parses the family id out of a `CTRL_CMD_GETFAMILY` reply.
fn family_from(messages: &[Vec<u8>]) -> Option<u16> {
    messages.iter().find_map(|attrs| {
        let p = find_attr(attrs, CTRL_ATTR_FAMILY_ID)?;
        Some(u16::from_ne_bytes(p.get(..2)?.try_into().ok()?))
    })
}

/// One `NETLINK_GENERIC` socket.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Netlink, NetlinkError> {
        // SAFETY: socket(2) with constant arguments; the result is checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor socket(2) just returned and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt(2) on our socket with a pointer to a live timeval and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: bind(2) on our socket with a pointer to a live sockaddr_nl and its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        Ok(Netlink { fd, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    fn family_id(&mut self) -> Result<u16, NetlinkError> {
        let seq = self.next_seq();
        match self.exchange(&getfamily_message(seq), seq, "CTRL_CMD_GETFAMILY") {
            Ok(messages) => family_from(&messages).ok_or(NetlinkError::FamilyNotFound),
            Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ENOENT => {
                Err(NetlinkError::FamilyNotFound)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends one request and collects the attributes of every reply until the ack.
    fn exchange(
        &mut self,
        msg: &[u8],
        seq: u32,
        op: &'static str,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        // SAFETY: sockaddr_nl is plain old data; all-zero (port 0) addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sendto(2) from a live buffer of `msg.len()` bytes to a live address.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(NetlinkError::Io(io::Error::last_os_error()));
        }
        let mut messages = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: recv(2) into a live buffer of `buf.len()` bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(NetlinkError::Io(io::Error::last_os_error()));
            }
            let parsed = parse_replies(&buf[..n as usize], seq, op)?;
            messages.extend(parsed.messages);
            if parsed.done {
                return Ok(messages);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }
    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }
    fn ne64(v: u64) -> [u8; 8] {
        v.to_ne_bytes()
    }

    #[test]
    fn getfamily_is_byte_exact() {
        let mut expected = Vec::new();
        expected.extend(ne32(28)); // nlmsg_len
        expected.extend(ne16(0x10)); // GENL_ID_CTRL
        expected.extend(ne16(1 | 4)); // NLM_F_REQUEST | NLM_F_ACK
        expected.extend(ne32(9)); // seq
        expected.extend(ne32(0)); // pid
        expected.extend([3, 1, 0, 0]); // CTRL_CMD_GETFAMILY, version 1
        expected.extend(ne16(8)); // nla_len: 4 + "nbd\0"
        expected.extend(ne16(2)); // CTRL_ATTR_FAMILY_NAME
        expected.extend(b"nbd\0");
        assert_eq!(getfamily_message(9), expected);
    }

    #[test]
    fn odd_length_attributes_are_padded() {
        let mut m = MessageBuilder::new(0x1a, 1, 1, 0, 1);
        m.string(7, "ab"); // 4 + 3 bytes, one byte of padding
        m.u32(8, 0xdead_beef);
        let msg = m.finish();
        assert_eq!(msg.len(), 20 + 8 + 8);
        assert_eq!(
            &msg[20..28],
            &[
                ne16(7)[0],
                ne16(7)[1],
                ne16(7)[0],
                ne16(7)[1],
                b'a',
                b'b',
                0,
                0
            ][..]
        );
        assert_eq!(&msg[28..30], &ne16(8));
        assert_eq!(&msg[32..36], &ne32(0xdead_beef));
        // And they parse back.
        let attrs: Vec<_> = AttrIter(&msg[20..]).collect();
        assert_eq!(attrs, vec![(7, &b"ab\0"[..]), (8, &ne32(0xdead_beef)[..])]);
    }

    #[test]
    fn connect_is_byte_exact() {
        let p = ConnectParams {
            size: 1 << 30,
            block_size: 4096,
            server_flags: 0x10d,
            io_timeout: Duration::from_secs(180),
            dead_conn_timeout: Duration::from_secs(120),
        };
        let mut e = Vec::new();
        e.extend(ne32(96));
        e.extend(ne16(0x1a)); // the resolved nbd family
        e.extend(ne16(5));
        e.extend(ne32(3));
        e.extend(ne32(0));
        e.extend([1, 1, 0, 0]); // NBD_CMD_CONNECT, version 1
        for (ty, v) in [
            (2u16, 1u64 << 30),
            (3, 4096),
            (5, 0x10d),
            (4, 180),
            (8, 120),
        ] {
            e.extend(ne16(12));
            e.extend(ne16(ty));
            e.extend(ne64(v));
        }
        e.extend(ne16(16)); // NBD_ATTR_SOCKETS, nested
        e.extend(ne16(7 | 0x8000));
        e.extend(ne16(12)); // NBD_SOCK_ITEM, nested
        e.extend(ne16(1 | 0x8000));
        e.extend(ne16(8)); // NBD_SOCK_FD
        e.extend(ne16(1));
        e.extend(ne32(5));
        assert_eq!(connect_message(0x1a, 3, 5, &p), e);
    }

    #[test]
    fn reconfigure_is_byte_exact() {
        let mut e = Vec::new();
        e.extend(ne32(44));
        e.extend(ne16(0x1a));
        e.extend(ne16(5));
        e.extend(ne32(4));
        e.extend(ne32(0));
        e.extend([3, 1, 0, 0]); // NBD_CMD_RECONFIGURE
        e.extend(ne16(8));
        e.extend(ne16(1)); // NBD_ATTR_INDEX
        e.extend(ne32(2));
        e.extend(ne16(16));
        e.extend(ne16(7 | 0x8000));
        e.extend(ne16(12));
        e.extend(ne16(1 | 0x8000));
        e.extend(ne16(8));
        e.extend(ne16(1));
        e.extend(ne32(9));
        assert_eq!(reconfigure_message(0x1a, 4, 2, 9), e);
    }

    fn header(len: u32, ty: u16, seq: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(ne32(len));
        h.extend(ne16(ty));
        h.extend(ne16(0));
        h.extend(ne32(seq));
        h.extend(ne32(4242));
        h
    }

    #[test]
    fn parses_a_family_reply_and_its_ack() {
        // CTRL_CMD_NEWFAMILY with FAMILY_NAME "nbd" and FAMILY_ID 0x1a (2 bytes + pad).
        let mut buf = header(36, 0x10, 1);
        buf.extend([1, 2, 0, 0]);
        buf.extend(ne16(8));
        buf.extend(ne16(2));
        buf.extend(b"nbd\0");
        buf.extend(ne16(6));
        buf.extend(ne16(1));
        buf.extend(ne16(0x1a));
        buf.extend([0, 0]);
        // The ack: NLMSG_ERROR with error 0 and the original header.
        buf.extend(header(36, NLMSG_ERROR, 1));
        buf.extend(0i32.to_ne_bytes());
        buf.extend(header(28, 0x10, 1));
        let parsed = parse_replies(&buf, 1, "CTRL_CMD_GETFAMILY").unwrap();
        assert!(parsed.done);
        assert_eq!(parsed.messages.len(), 1);
        assert_eq!(family_from(&parsed.messages), Some(0x1a));
    }

    #[test]
    fn parses_an_error_ack() {
        let mut buf = header(36, NLMSG_ERROR, 5);
        buf.extend((-libc::EBUSY).to_ne_bytes());
        buf.extend(header(96, 0x1a, 5));
        let err = parse_replies(&buf, 5, "NBD_CMD_CONNECT").unwrap_err();
        assert!(matches!(
            err,
            NetlinkError::Kernel { op: "NBD_CMD_CONNECT", errno } if errno == libc::EBUSY
        ));
        assert!(err.to_string().contains("NBD_CMD_CONNECT"));
        // Messages for another request are skipped.
        let parsed = parse_replies(&buf, 6, "NBD_CMD_CONNECT").unwrap();
        assert_eq!(parsed, Parsed::default());
        // A truncated message is malformed, not a panic.
        assert!(matches!(
            parse_replies(&buf[..30], 5, "x"),
            Err(NetlinkError::Malformed(_))
        ));
    }

    #[test]
    fn parses_connect_index_and_status() {
        let mut attrs = Vec::new();
        attrs.extend(ne16(8));
        attrs.extend(ne16(NBD_ATTR_INDEX));
        attrs.extend(ne32(3));
        assert_eq!(find_u32(&attrs, NBD_ATTR_INDEX), Some(3));

        // NBD_ATTR_DEVICE_LIST { NBD_DEVICE_ITEM { INDEX 3, CONNECTED 1 } }
        let mut item = Vec::new();
        item.extend(ne16(8));
        item.extend(ne16(NBD_DEVICE_INDEX));
        item.extend(ne32(3));
        item.extend(ne16(5));
        item.extend(ne16(NBD_DEVICE_CONNECTED));
        item.extend([1, 0, 0, 0]);
        let mut list = Vec::new();
        list.extend(ne16(4 + item.len() as u16));
        list.extend(ne16(NBD_DEVICE_ITEM | NLA_F_NESTED));
        list.extend(&item);
        let mut status = Vec::new();
        status.extend(ne16(4 + list.len() as u16));
        status.extend(ne16(NBD_ATTR_DEVICE_LIST | NLA_F_NESTED));
        status.extend(&list);
        assert_eq!(device_connected(&status, 3), Some(true));
        assert_eq!(device_connected(&status, 4), None);
    }

    #[test]
    fn block_size_is_checked_before_talking_to_the_kernel() {
        let (a, _b) = UnixStream::pair().unwrap();
        let err = connect(a.into(), 1 << 20, 1, 1000).unwrap_err();
        assert!(matches!(err, NetlinkError::InvalidBlockSize(1000)));
    }

    #[test]
    fn kernel_block_size_follows_the_server() {
        let mut info = ExportInfo {
            size: 1 << 20,
            flags: 1,
            block_size: None,
        };
        assert_eq!(kernel_block_size(&info), 512);
        info.block_size = Some(wire::BlockSize {
            min: 512,
            preferred: 4096,
            max: 1 << 25,
        });
        assert_eq!(kernel_block_size(&info), 4096);
        info.block_size = Some(wire::BlockSize {
            min: 1,
            preferred: 65536,
            max: 1 << 25,
        });
        assert_eq!(kernel_block_size(&info), 4096);
    }

    #[test]
    fn available_is_false_without_the_module() {
        if Path::new("/sys/module/nbd").exists() {
            eprintln!("the nbd module is loaded here; available() may be true");
            return;
        }
        assert!(!available());
        // Resolving the family directly fails cleanly too.
        if let Ok(mut nl) = Netlink::open() {
            assert!(matches!(
                nl.family_id(),
                Err(NetlinkError::FamilyNotFound) | Err(NetlinkError::Kernel { .. })
            ));
        }
    }
}
