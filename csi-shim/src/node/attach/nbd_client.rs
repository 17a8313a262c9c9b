//! A small blocking NBD client for the FUSE file server: fixed-newstyle handshake with
//! `NBD_OPT_GO`, simple replies, one request in flight.
//!
//! Invariant: a [`Connection`] either completes a request or reports an I/O error (a
//! reply that does not come within [`REPLY_TIMEOUT`] is one); the caller reconnects (a
//! fresh handshake, which also learns the export's current size) and resends. Protocol
//! reference: `shared/reference/nbd-protocol.md`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a request may wait for its reply before the connection counts as dead.
/// Longer than csi-nbd-proxy's reconnect window (120 s by default), inside which a
/// request legitimately waits for a restarting blockd: resending a request the proxy
/// may still execute would let an old write land after a newer one.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(150);

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;

/// Transmission flags.
pub const SEND_FLUSH: u16 = 1 << 2;
pub const SEND_TRIM: u16 = 1 << 5;
pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const READ_ONLY: u16 = 1 << 1;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// One NBD connection in the transmission phase.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

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

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Connection {
    /// Connects to `socket` and opens `export`.
    pub fn open(socket: &Path, export: &str) -> io::Result<Self> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        s.set_write_timeout(Some(REPLY_TIMEOUT))?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(protocol("not a fixed-newstyle NBD server".into()));
        }
        let server_flags = read_u16(&mut s)?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("server lacks fixed newstyle".into()));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
        let mut msg = Vec::new();
        msg.extend_from_slice(&client_flags.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
        msg.extend_from_slice(export.as_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&msg)?;
        let mut size = None;
        let mut flags = 0;
        loop {
            if read_u64(&mut s)? != REPLY_MAGIC {
                return Err(protocol("bad option reply magic".into()));
            }
            let _option = read_u32(&mut s)?;
            let kind = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            if kind & 0x8000_0000 != 0 {
                return Err(protocol(format!(
                    "server refused export {export:?} (reply {kind:#x}): {}",
                    String::from_utf8_lossy(data.get(..).unwrap_or_default())
                )));
            }
            match kind {
                REP_INFO if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    let mut sz = [0u8; 8];
                    sz.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(sz));
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_ACK => break,
                _ => {}
            }
        }
        let size = size.ok_or_else(|| protocol("server sent no export size".into()))?;
        Ok(Connection {
            stream: s,
            size,
            flags,
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
        let mut head = [0u8; 28];
        head[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        head[6..8].copy_from_slice(&kind.to_be_bytes());
        head[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        head[16..24].copy_from_slice(&offset.to_be_bytes());
        head[24..28].copy_from_slice(&length.to_be_bytes());
        if kind == CMD_WRITE {
            let mut msg = Vec::with_capacity(28 + data.len());
            msg.extend_from_slice(&head);
            msg.extend_from_slice(data);
            self.stream.write_all(&msg)?;
        } else {
            self.stream.write_all(&head)?;
        }
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(protocol("bad reply magic".into()));
        }
        let error = read_u32(&mut self.stream)?;
        if read_u64(&mut self.stream)? != self.cookie {
            return Err(protocol("reply for another request".into()));
        }
        if kind == CMD_READ && error == 0 {
            self.stream.read_exact(data)?;
        }
        Ok(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

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
