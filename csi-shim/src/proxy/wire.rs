//! The NBD wire as the proxy and the attachers use it: the encodings and the handshake
//! state machines come from the I/O-free [`nbd_wire`] crate (shared with blockd); this
//! module adds what needs a socket (the blocking client handshake) and the proxy's own
//! choice of transmission flags.
//!
//! Invariant: every connection a client handshake opens is in the transmission phase with
//! simple replies only (see [`nbd_wire::client`]).

use std::io::{self, Read, Write};

pub use nbd_wire::client::{BlockSize, ClientError, ExportInfo};
use nbd_wire::client::{ClientHandshake, ClientStep};
pub use nbd_wire::codec::*;

/// Transmission flags a simple-reply relay can offer its own clients unchanged. `DF`
/// (structured replies), `RESIZE` and `BLOCK_STATUS_PAYLOAD` (experimental extensions)
/// are not among them.
pub const PASSTHROUGH_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_READ_ONLY
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_ROTATIONAL
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_CAN_MULTI_CONN
    | NBD_FLAG_SEND_CACHE
    | NBD_FLAG_SEND_FAST_ZERO;

/// What went wrong while negotiating or decoding.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("I/O error on the NBD socket")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Handshake(#[from] ClientError),
    #[error("Bad message from the NBD peer")]
    Decode(#[from] DecodeError),
}

impl WireError {
    /// Whether the server answered but refused (as opposed to the connection failing).
    pub fn refused_reply(&self) -> Option<u32> {
        match self {
            WireError::Handshake(err) => err.refused_reply(),
            _ => None,
        }
    }
}

/// Runs the client side of a fixed-newstyle handshake on a connected, blocking stream:
/// `NBD_OPT_GO` for `export`, asking for `NBD_INFO_BLOCK_SIZE` when `want_block_size`
/// (the client then promises to honour the constraints). On success the stream is in
/// the transmission phase with simple replies. Set a read timeout on the socket first if
/// the peer may hang.
pub fn client_handshake<S: Read + Write>(
    s: &mut S,
    export: &str,
    want_block_size: bool,
) -> Result<ExportInfo, WireError> {
    let mut hs = ClientHandshake::new(export, want_block_size);
    loop {
        let mut buf = vec![0u8; hs.wants()];
        s.read_exact(&mut buf)?;
        match hs.feed(&buf)? {
            ClientStep::Send(bytes) => {
                s.write_all(&bytes)?;
                s.flush()?;
            }
            ClientStep::Continue => {}
            ClientStep::Ready(info) => return Ok(info),
        }
    }
}

/// A request header without flags or payload (a flush or a disconnect).
pub fn bare_request(command: Command, cookie: u64) -> Request {
    Request {
        flags: 0,
        command,
        cookie,
        offset: 0,
        length: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted peer: reads come from `input`, writes are collected.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn blocking_handshake_drives_the_state_machine_over_a_stream() {
        let mut input = Greeting {
            handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
        }
        .encode()
        .to_vec();
        input.extend(
            OptionReply::new(
                NBD_OPT_GO,
                OptionReplyBody::Info(Info::Export {
                    size: 1 << 20,
                    flags: NBD_FLAG_HAS_FLAGS,
                }),
            )
            .encode(),
        );
        input.extend(OptionReply::new(NBD_OPT_GO, OptionReplyBody::Ack).encode());
        let mut s = Script {
            input: io::Cursor::new(input.clone()),
            output: Vec::new(),
        };
        let info = client_handshake(&mut s, "v1", false).unwrap();
        assert_eq!(info.size, 1 << 20);
        assert_eq!(&s.output[..4], &3u32.to_be_bytes());

        // A stream that ends half-way is an I/O error, not a hang or a panic.
        let mut s = Script {
            input: io::Cursor::new(input[..30].to_vec()),
            output: Vec::new(),
        };
        assert!(matches!(
            client_handshake(&mut s, "v1", false),
            Err(WireError::Io(_))
        ));
    }

    #[test]
    fn refusals_are_told_apart_from_failures() {
        let mut input = Greeting {
            handshake_flags: NBD_FLAG_FIXED_NEWSTYLE,
        }
        .encode()
        .to_vec();
        input
            .extend(OptionReply::error(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, "no such export").encode());
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let err = client_handshake(&mut s, "v1", false).unwrap_err();
        assert_eq!(err.refused_reply(), Some(NBD_REP_ERR_UNKNOWN));
        assert!(err.to_string().contains("no such export"), "{err}");
    }
}
