//! NBD wire format for the proxy and the kernel attacher: the constants, the fixed-size
//! transmission headers, and the blocking fixed-newstyle client handshake (`NBD_OPT_GO`,
//! simple replies only).
//!
//! Owns nothing but encodings. Invariants:
//! - every number on the wire is big-endian (network byte order), as the protocol says;
//! - decoders check magics and lengths and return [`WireError`] instead of panicking, so a
//!   misbehaving peer can only end its own connection;
//! - the client handshake never negotiates structured replies, metadata contexts or
//!   extended headers: after it, every reply is a 16-byte simple reply, optionally followed
//!   by exactly the requested number of bytes for a successful `NBD_CMD_READ`.
//!
//! Written here rather than shared with `blockd::nbd::codec` because csi-shim must not
//! link the engine crate.

use std::io::{self, Read, Write};

// Handshake magics.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Transmission magics.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Transmission flags a simple-reply relay can offer its own clients unchanged. `DF`
/// (structured replies), `RESIZE` and `BLOCK_STATUS_PAYLOAD` (experimental extensions)
/// are not among them.
pub const PASSTHROUGH_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_READ_ONLY
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_ROTATIONAL
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN
    | FLAG_SEND_CACHE
    | FLAG_SEND_FAST_ZERO;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;

// Errors in simple replies.
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ESHUTDOWN: u32 = 108;

/// Request header length (magic, flags, type, cookie, offset, length).
pub const REQUEST_LEN: usize = 28;
/// Simple reply header length (magic, error, cookie).
pub const REPLY_LEN: usize = 16;
/// Option header length (magic, option, length), as sent by a client.
pub const OPTION_LEN: usize = 16;
/// Option reply header length (magic, option, type, length).
pub const OPTION_REPLY_LEN: usize = 20;

/// What went wrong while decoding or negotiating.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("I/O error on the NBD socket")]
    Io(#[from] io::Error),
    #[error("Bad magic {found:#x} in {what}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("The server does not speak fixed newstyle (handshake flags {0:#x})")]
    NotFixedNewstyle(u16),
    #[error("The server refused option {option} with reply {reply:#x}: {message}")]
    OptionRefused {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("Malformed option reply (type {reply:#x}, length {len})")]
    MalformedReply { reply: u32, len: u32 },
    #[error("The server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")]
    NoExportInfo,
}

impl WireError {
    /// Whether the server answered but refused (as opposed to the connection failing).
    pub fn refused_reply(&self) -> Option<u32> {
        match self {
            WireError::OptionRefused { reply, .. } => Some(*reply),
            _ => None,
        }
    }
}

/// A transmission request header (the payload of a write follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                what: "request",
                found: magic.into(),
            });
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        })
    }

    /// Whether `len` bytes of payload follow this header from the client.
    pub fn has_payload(&self) -> bool {
        self.kind == CMD_WRITE
    }
}

/// A simple reply header (the payload of a successful read follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; REPLY_LEN]) -> Result<SimpleReply, WireError> {
        let magic = be32(&b[0..4]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "simple reply",
                found: magic.into(),
            });
        }
        Ok(SimpleReply {
            error: be32(&b[4..8]),
            cookie: be64(&b[8..16]),
        })
    }
}

/// Size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// What a successful `NBD_OPT_GO` tells the client about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub block_size: Option<BlockSize>,
}

/// Encodes an option request from a client.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_LEN + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Encodes the data of `NBD_OPT_INFO`/`NBD_OPT_GO`: name and information requests.
pub fn encode_go_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + 2 + 2 * requests.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

/// Encodes an option reply from a server.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_REPLY_LEN + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of an `NBD_REP_INFO` reply carrying `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// The data of an `NBD_REP_INFO` reply carrying `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(bs: BlockSize) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&bs.min.to_be_bytes());
    b[6..10].copy_from_slice(&bs.preferred.to_be_bytes());
    b[10..14].copy_from_slice(&bs.max.to_be_bytes());
    b
}

/// Parsed `NBD_OPT_INFO`/`NBD_OPT_GO` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    pub name: Vec<u8>,
    pub requests: Vec<u16>,
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data; `None` when the lengths do not add up.
pub fn parse_go_data(data: &[u8]) -> Option<GoRequest> {
    if data.len() < 6 {
        return None;
    }
    let name_len = be32(&data[0..4]) as usize;
    if name_len > data.len() - 6 {
        return None;
    }
    let name = data[4..4 + name_len].to_vec();
    let rest = &data[4 + name_len..];
    let n = be16(&rest[0..2]) as usize;
    let list = &rest[2..];
    if list.len() != 2 * n {
        return None;
    }
    let requests = list.chunks_exact(2).map(be16).collect();
    Some(GoRequest { name, requests })
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
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    let magic = be64(&greeting[0..8]);
    if magic != NBDMAGIC {
        return Err(WireError::BadMagic {
            what: "greeting",
            found: magic,
        });
    }
    let opt_magic = be64(&greeting[8..16]);
    if opt_magic != IHAVEOPT {
        // Oldstyle servers send cliserv_magic here; we only speak newstyle.
        return Err(WireError::BadMagic {
            what: "newstyle greeting",
            found: opt_magic,
        });
    }
    let hflags = be16(&greeting[16..18]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(WireError::NotFixedNewstyle(hflags));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    let requests: &[u16] = if want_block_size {
        &[INFO_BLOCK_SIZE]
    } else {
        &[]
    };
    let mut out = cflags.to_be_bytes().to_vec();
    out.extend_from_slice(&encode_option(OPT_GO, &encode_go_data(export, requests)));
    s.write_all(&out)?;
    s.flush()?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut block_size = None;
    loop {
        let mut h = [0u8; OPTION_REPLY_LEN];
        s.read_exact(&mut h)?;
        let magic = be64(&h[0..8]);
        if magic != OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "option reply",
                found: magic,
            });
        }
        let option = be32(&h[8..12]);
        let reply = be32(&h[12..16]);
        let len = be32(&h[16..20]);
        if option != OPT_GO || len > 64 * 1024 {
            return Err(WireError::MalformedReply { reply, len });
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match reply {
            REP_ACK => {
                let (size, flags) = export_info.ok_or(WireError::NoExportInfo)?;
                return Ok(ExportInfo {
                    size,
                    flags,
                    block_size,
                });
            }
            REP_INFO => {
                if data.len() < 2 {
                    return Err(WireError::MalformedReply { reply, len });
                }
                match be16(&data[0..2]) {
                    INFO_EXPORT if data.len() == 12 => {
                        export_info = Some((be64(&data[2..10]), be16(&data[10..12])));
                    }
                    INFO_BLOCK_SIZE if data.len() == 14 => {
                        block_size = Some(BlockSize {
                            min: be32(&data[2..6]),
                            preferred: be32(&data[6..10]),
                            max: be32(&data[10..14]),
                        });
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(WireError::MalformedReply { reply, len });
                    }
                    // The client MUST ignore information it does not understand.
                    _ => {}
                }
            }
            r if r & REP_FLAG_ERROR != 0 => {
                return Err(WireError::OptionRefused {
                    option,
                    reply: r,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            _ => return Err(WireError::MalformedReply { reply, len }),
        }
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_byte_exact() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            len: 512,
        };
        let b = r.encode();
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
        assert_eq!(Request::decode(&b).unwrap(), r);
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(
            Request::decode(&bad),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn simple_reply_round_trips() {
        let r = SimpleReply {
            error: EIO,
            cookie: 7,
        };
        let b = r.encode();
        assert_eq!(&b[0..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5]);
        assert_eq!(SimpleReply::decode(&b).unwrap(), r);
    }

    #[test]
    fn go_data_parses_and_rejects_bad_lengths() {
        let data = encode_go_data("vol", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_go_data(&data).unwrap(),
            GoRequest {
                name: b"vol".to_vec(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }
        );
        assert!(parse_go_data(&data[..data.len() - 1]).is_none());
        assert!(parse_go_data(&[0, 0, 0, 9, 0, 0]).is_none());
        assert!(parse_go_data(&[0, 0, 0, 0, 0, 0]).is_some());
    }

    /// A scripted peer: reads go to `input`, writes are collected.
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

    fn greeting() -> Vec<u8> {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        g
    }

    #[test]
    fn client_handshake_reads_export_and_block_size() {
        let mut input = greeting();
        input.extend(encode_option_reply(
            OPT_GO,
            REP_INFO,
            &info_export(1 << 20, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH),
        ));
        // Unknown information types are ignored.
        input.extend(encode_option_reply(OPT_GO, REP_INFO, &[0, 99, 1, 2]));
        let bs = BlockSize {
            min: 512,
            preferred: 4096,
            max: 1 << 25,
        };
        input.extend(encode_option_reply(OPT_GO, REP_INFO, &info_block_size(bs)));
        input.extend(encode_option_reply(OPT_GO, REP_ACK, &[]));
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let info = client_handshake(&mut s, "v1", true).unwrap();
        assert_eq!(
            info,
            ExportInfo {
                size: 1 << 20,
                flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
                block_size: Some(bs)
            }
        );
        let mut expected = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        expected.extend(encode_option(
            OPT_GO,
            &encode_go_data("v1", &[INFO_BLOCK_SIZE]),
        ));
        assert_eq!(s.output, expected);
    }

    #[test]
    fn client_handshake_reports_refusal() {
        let mut input = greeting();
        input.extend(encode_option_reply(
            OPT_GO,
            REP_ERR_UNKNOWN,
            b"no such export",
        ));
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let err = client_handshake(&mut s, "v1", false).unwrap_err();
        assert_eq!(err.refused_reply(), Some(REP_ERR_UNKNOWN));
        assert!(err.to_string().contains("no such export"));
    }

    #[test]
    fn client_handshake_needs_export_info() {
        let mut input = greeting();
        input.extend(encode_option_reply(OPT_GO, REP_ACK, &[]));
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        assert!(matches!(
            client_handshake(&mut s, "v1", false),
            Err(WireError::NoExportInfo)
        ));
    }
}
