//! A small blocking NBD client for the FUSE file server: fixed-newstyle handshake with
//! `NBD_OPT_GO`, simple replies, one request in flight. The wire format (constants,
//! handshake, request and reply encoding) is csi-nbd-proxy's, in [`crate::proxy::wire`].
//!
//! Invariant: a [`Connection`] either completes a request or reports an I/O error (a
//! reply that does not come within [`REPLY_TIMEOUT`] is one); the caller reconnects (a
//! fresh handshake, which also learns the export's current size) and resends. Protocol
//! reference: the NBD project's `doc/proto.md`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::proxy::wire::{self, Request, SimpleReply, WireError};
pub use crate::proxy::wire::{
    Command, NBD_FLAG_SEND_FLUSH as SEND_FLUSH, NBD_FLAG_SEND_TRIM as SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES as SEND_WRITE_ZEROES,
};

/// How long a request may wait for its reply before the connection counts as dead.
/// Longer than csi-nbd-proxy's reconnect window (120 s by default), inside which a
/// request legitimately waits for a restarting blockd: resending a request the proxy
/// may still execute would let an old write land after a newer one.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(150);

/// One NBD connection in the transmission phase.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

fn protocol(err: impl Into<WireError>) -> io::Error {
    match err.into() {
        WireError::Io(err) => err,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl Connection {
    /// Connects to `socket` and opens `export`.
    pub fn open(socket: &Path, export: &str) -> io::Result<Self> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        s.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let info = wire::client_handshake(&mut s, export, false).map_err(protocol)?;
        Ok(Connection {
            stream: s,
            size: info.size,
            flags: info.flags,
            cookie: 0,
        })
    }

    /// Sends one request and waits for its reply; `data` is the payload of a write or
    /// the buffer of a read. Returns the server's error number (0 on success).
    pub fn request(
        &mut self,
        command: Command,
        offset: u64,
        length: u32,
        data: &mut [u8],
    ) -> io::Result<u32> {
        self.cookie += 1;
        let head = Request {
            flags: 0,
            command,
            cookie: self.cookie,
            offset,
            length,
        }
        .encode();
        if command == Command::Write {
            let mut msg = Vec::with_capacity(head.len() + data.len());
            msg.extend_from_slice(&head);
            msg.extend_from_slice(data);
            self.stream.write_all(&msg)?;
        } else {
            self.stream.write_all(&head)?;
        }
        let mut r = [0u8; wire::SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut r)?;
        let reply = SimpleReply::decode(&r).map_err(protocol)?;
        if reply.cookie != self.cookie {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "reply for another request",
            ));
        }
        if command == Command::Read && reply.error == 0 {
            self.stream.read_exact(data)?;
        }
        Ok(reply.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::wire::{
        ClientFlags, ClientOption, Greeting, Info, OptionHeader, OptionReply, OptionReplyBody,
        CLIENT_FLAGS_LEN, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES,
        NBD_OPT_GO, OPTION_HEADER_LEN, REQUEST_LEN,
    };
    use std::os::unix::net::UnixListener;

    fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    }

    /// A one-connection NBD server with an export held in memory.
    fn fake_server(socket: &Path, size: u64) -> std::thread::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut disk = vec![0u8; size as usize];
            let hflags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
            s.write_all(
                &Greeting {
                    handshake_flags: hflags,
                }
                .encode(),
            )
            .unwrap();
            let cflags = ClientFlags::decode(&read_n(&mut s, CLIENT_FLAGS_LEN), hflags).unwrap();
            assert!(cflags.fixed_newstyle() && cflags.no_zeroes());
            let header = OptionHeader::decode(&read_n(&mut s, OPTION_HEADER_LEN)).unwrap();
            assert_eq!(header.option, NBD_OPT_GO);
            let data = read_n(&mut s, header.len as usize);
            let ClientOption::Go(go) = ClientOption::decode(header.option, &data).unwrap() else {
                panic!("expected NBD_OPT_GO");
            };
            assert_eq!(go.name, "disk");
            let info = Info::Export {
                size,
                flags: NBD_FLAG_HAS_FLAGS | SEND_FLUSH,
            };
            for body in [OptionReplyBody::Info(info), OptionReplyBody::Ack] {
                s.write_all(&OptionReply::new(NBD_OPT_GO, body).encode())
                    .unwrap();
            }
            let mut head = [0u8; REQUEST_LEN];
            while s.read_exact(&mut head).is_ok() {
                let req = Request::decode(&head).unwrap();
                let (offset, len) = (req.offset as usize, req.length as usize);
                let mut reply = SimpleReply {
                    error: 0,
                    cookie: req.cookie,
                }
                .encode()
                .to_vec();
                match req.command {
                    Command::Write => s.read_exact(&mut disk[offset..offset + len]).unwrap(),
                    Command::Read => reply.extend_from_slice(&disk[offset..offset + len]),
                    _ => {}
                }
                s.write_all(&reply).unwrap();
            }
            disk
        })
    }

    #[test]
    fn handshake_then_write_read_flush() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let server = fake_server(&socket, 1 << 20);
        let mut conn = Connection::open(&socket, "disk").unwrap();
        assert_eq!(conn.size, 1 << 20);
        assert_ne!(conn.flags & SEND_FLUSH, 0);
        let mut data = vec![0x5au8; 8192];
        assert_eq!(
            conn.request(Command::Write, 4096, 8192, &mut data).unwrap(),
            0
        );
        assert_eq!(conn.request(Command::Flush, 0, 0, &mut []).unwrap(), 0);
        let mut back = vec![0u8; 8192];
        assert_eq!(
            conn.request(Command::Read, 4096, 8192, &mut back).unwrap(),
            0
        );
        assert_eq!(back, data);
        drop(conn);
        let disk = server.join().unwrap();
        assert!(disk[4096..12288].iter().all(|b| *b == 0x5a));
        assert!(disk[..4096].iter().all(|b| *b == 0));
    }
}
