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
    CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, FLAG_SEND_FLUSH as SEND_FLUSH,
    FLAG_SEND_TRIM as SEND_TRIM, FLAG_SEND_WRITE_ZEROES as SEND_WRITE_ZEROES,
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

fn protocol(err: WireError) -> io::Error {
    match err {
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
        kind: u16,
        offset: u64,
        length: u32,
        data: &mut [u8],
    ) -> io::Result<u32> {
        self.cookie += 1;
        let head = Request {
            flags: 0,
            kind,
            cookie: self.cookie,
            offset,
            len: length,
        }
        .encode();
        if kind == CMD_WRITE {
            let mut msg = Vec::with_capacity(head.len() + data.len());
            msg.extend_from_slice(&head);
            msg.extend_from_slice(data);
            self.stream.write_all(&msg)?;
        } else {
            self.stream.write_all(&head)?;
        }
        let mut r = [0u8; wire::REPLY_LEN];
        self.stream.read_exact(&mut r)?;
        let reply = SimpleReply::decode(&r).map_err(protocol)?;
        if reply.cookie != self.cookie {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "reply for another request",
            ));
        }
        if kind == CMD_READ && reply.error == 0 {
            self.stream.read_exact(data)?;
        }
        Ok(reply.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::wire::{
        FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC,
        OPTION_REPLY_MAGIC as REPLY_MAGIC, OPT_GO, REP_ACK, REP_INFO, SIMPLE_REPLY_MAGIC,
    };
    use std::os::unix::net::UnixListener;

    fn read_u32(s: &mut impl Read) -> io::Result<u32> {
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(s: &mut impl Read) -> io::Result<u64> {
        let mut b = [0u8; 8];
        s.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// A one-connection NBD server with a 1 MiB export held in memory.
    fn fake_server(socket: &Path, size: u64) -> std::thread::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut disk = vec![0u8; size as usize];
            s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
            s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
            s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
                .unwrap();
            assert_eq!(read_u32(&mut s).unwrap(), 3);
            assert_eq!(read_u64(&mut s).unwrap(), IHAVEOPT);
            assert_eq!(read_u32(&mut s).unwrap(), OPT_GO);
            let len = read_u32(&mut s).unwrap();
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            assert_eq!(&data[4..8], b"disk");
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&(1u16 | SEND_FLUSH).to_be_bytes());
            for (kind, body) in [(REP_INFO, info), (REP_ACK, Vec::new())] {
                s.write_all(&REPLY_MAGIC.to_be_bytes()).unwrap();
                s.write_all(&OPT_GO.to_be_bytes()).unwrap();
                s.write_all(&kind.to_be_bytes()).unwrap();
                s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
                s.write_all(&body).unwrap();
            }
            let mut head = [0u8; 28];
            while s.read_exact(&mut head).is_ok() {
                let kind = u16::from_be_bytes([head[6], head[7]]);
                let offset = u64::from_be_bytes(head[16..24].try_into().unwrap()) as usize;
                let len = u32::from_be_bytes(head[24..28].try_into().unwrap()) as usize;
                let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                reply.extend_from_slice(&0u32.to_be_bytes());
                reply.extend_from_slice(&head[8..16]);
                match kind {
                    CMD_WRITE => s.read_exact(&mut disk[offset..offset + len]).unwrap(),
                    CMD_READ => reply.extend_from_slice(&disk[offset..offset + len]),
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
        assert_eq!(conn.request(CMD_WRITE, 4096, 8192, &mut data).unwrap(), 0);
        assert_eq!(conn.request(CMD_FLUSH, 0, 0, &mut []).unwrap(), 0);
        let mut back = vec![0u8; 8192];
        assert_eq!(conn.request(CMD_READ, 4096, 8192, &mut back).unwrap(), 0);
        assert_eq!(back, data);
        drop(conn);
        let disk = server.join().unwrap();
        assert!(disk[4096..12288].iter().all(|b| *b == 0x5a));
        assert!(disk[..4096].iter().all(|b| *b == 0));
    }
}
