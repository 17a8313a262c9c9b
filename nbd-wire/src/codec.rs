//! NBD wire format: pure encoders and decoders, no I/O.
//!
//! This module owns every byte layout of the fixed-newstyle NBD protocol
//! (the NBD project's `doc/proto.md`): the server greeting and client flags, option
//! requests and option replies of the handshake, transmission requests, simple replies and
//! structured reply chunks. Servers and clients read fixed-size headers from their socket
//! and hand the bytes here; the handshakes ([`crate::client`], [`crate::server`]), tests
//! and fuzzers drive the same functions.
//!
//! Invariants:
//! - no decoder panics, whatever the input: every length is checked before it is used and
//!   every failure is a typed [`DecodeError`] (proptest feeds random bytes to each decoder);
//! - `decode(encode(x)) == x` for every message this module can encode;
//! - decoders never allocate more than the input they were given (lengths read from the
//!   wire are checked against the bytes actually present before any allocation).
//!
//! ```text
//!  handshake                       transmission
//!  S: NBDMAGIC IHAVEOPT hsflags    C: request header (28 B) [+ write payload]
//!  C: client flags                 S: simple reply (16 B) [+ read payload]
//!  C: IHAVEOPT opt len data ...    S: structured chunk header (20 B) + payload ...
//!  S: REPLY_MAGIC opt type len data
//! ```

use std::fmt;

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second magic of the greeting and prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server to client, 16 bits).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (client to server, 32 bits).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits, in `NBD_INFO_EXPORT` and after `NBD_OPT_EXPORT_NAME`).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option codes.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types; errors have bit 31 set.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

/// Information types of `NBD_REP_INFO`.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Command flags (16 bits, in every request).
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and chunk types.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// NBD error values (a fixed set, numerically equal to the Linux errnos).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// `base:allocation` status flags.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Longest string the protocol allows (export names, error messages, context names).
pub const MAX_STRING_LEN: usize = 4096;

/// Size of the server greeting: two magics and the handshake flags.
pub const GREETING_LEN: usize = 18;
/// Size of the client flags, the client's answer to the greeting.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Size of an option request header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of the reply to `NBD_OPT_EXPORT_NAME` without the 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NBD_FLAG_C_NO_ZEROES`.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// Why some bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("Bad magic {found:#x} (expected {expected:#x})")]
    BadMagic { expected: u64, found: u64 },
    #[error("Message truncated: need {needed} bytes, have {got}")]
    Truncated { needed: usize, got: usize },
    #[error("Trailing bytes: {extra} bytes after the end of the message")]
    Trailing { extra: usize },
    #[error("String of {len} bytes is longer than the {MAX_STRING_LEN}-byte limit")]
    StringTooLong { len: usize },
    #[error("String is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("Length field {len} is inconsistent with the message")]
    BadLength { len: u64 },
    #[error("Unknown client flags {flags:#x}")]
    UnknownClientFlags { flags: u32 },
    #[error("Unknown structured reply type {kind:#x}")]
    UnknownChunkType { kind: u16 },
    #[error("Field {field} has invalid value {value}")]
    BadField { field: &'static str, value: u64 },
}

/// A cursor over input bytes; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                needed: self.pos.saturating_add(n),
                got: self.buf.len(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    fn string(&mut self, len: usize) -> Result<String, DecodeError> {
        if len > MAX_STRING_LEN {
            return Err(DecodeError::StringTooLong { len });
        }
        parse_string(self.bytes(len)?)
    }

    /// A string prefixed by its 32-bit length.
    fn string32(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        if len > self.remaining() {
            return Err(DecodeError::BadLength { len: len as u64 });
        }
        self.string(len)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing { extra }),
        }
    }
}

fn parse_string(bytes: &[u8]) -> Result<String, DecodeError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(DecodeError::StringTooLong { len: bytes.len() });
    }
    if bytes.contains(&0) {
        return Err(DecodeError::BadString);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadString)
}

/// Message text sent to a client is cut to the protocol's string limit on a char boundary.
fn clip_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING_LEN {
        return msg;
    }
    let mut end = MAX_STRING_LEN;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn check_magic64(found: u64, expected: u64) -> Result<(), DecodeError> {
    if found == expected {
        Ok(())
    } else {
        Err(DecodeError::BadMagic { expected, found })
    }
}

// ---------------------------------------------------------------------------------------
// Greeting and client flags
// ---------------------------------------------------------------------------------------

/// The first message of a newstyle server: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub handshake_flags: u16,
}

impl Greeting {
    pub fn encode(&self) -> [u8; GREETING_LEN] {
        let mut out = [0u8; GREETING_LEN];
        out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[16..].copy_from_slice(&self.handshake_flags.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        check_magic64(r.u64()?, NBD_MAGIC)?;
        check_magic64(r.u64()?, IHAVEOPT)?;
        let handshake_flags = r.u16()?;
        r.finish()?;
        Ok(Self { handshake_flags })
    }
}

/// The client's 32-bit answer to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    /// Decodes the client flags, rejecting bits the server did not offer: the spec says the
    /// server MUST drop the connection when the client sets an unknown flag or one that does
    /// not match something the server advertised.
    pub fn decode(buf: &[u8], server_flags: u16) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let flags = r.u32()?;
        r.finish()?;
        let mut allowed = NBD_FLAG_C_FIXED_NEWSTYLE;
        if server_flags & NBD_FLAG_NO_ZEROES != 0 {
            allowed |= NBD_FLAG_C_NO_ZEROES;
        }
        if flags & !allowed != 0 {
            return Err(DecodeError::UnknownClientFlags { flags });
        }
        Ok(Self(flags))
    }

    pub fn encode(&self) -> [u8; 4] {
        self.0.to_be_bytes()
    }

    pub fn fixed_newstyle(&self) -> bool {
        self.0 & NBD_FLAG_C_FIXED_NEWSTYLE != 0
    }

    pub fn no_zeroes(&self) -> bool {
        self.0 & NBD_FLAG_C_NO_ZEROES != 0
    }
}

// ---------------------------------------------------------------------------------------
// Options (handshake requests)
// ---------------------------------------------------------------------------------------

/// The fixed part of an option request: `IHAVEOPT`, option code, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        check_magic64(r.u64()?, IHAVEOPT)?;
        let option = r.u32()?;
        let len = r.u32()?;
        r.finish()?;
        Ok(Self { option, len })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Requested `NBD_INFO_*` items, in the client's order.
    pub requests: Vec<u16>,
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A decoded option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    /// `NBD_OPT_ABORT`; any data is ignored, as the spec asks.
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// An option this server does not implement (answered with `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

impl ClientOption {
    /// The option code.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => NBD_OPT_EXPORT_NAME,
            ClientOption::Abort => NBD_OPT_ABORT,
            ClientOption::List => NBD_OPT_LIST,
            ClientOption::StartTls => NBD_OPT_STARTTLS,
            ClientOption::Info(_) => NBD_OPT_INFO,
            ClientOption::Go(_) => NBD_OPT_GO,
            ClientOption::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => NBD_OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => NBD_OPT_SET_META_CONTEXT,
            ClientOption::Unknown(code) => *code,
        }
    }

    /// Decodes the data of option `option`. An error means the option is syntactically
    /// invalid: the server answers `NBD_REP_ERR_INVALID` (or, for `NBD_OPT_EXPORT_NAME`,
    /// which cannot fail softly, ends the session).
    pub fn decode(option: u32, data: &[u8]) -> Result<Self, DecodeError> {
        let no_data = |opt: ClientOption| {
            if data.is_empty() {
                Ok(opt)
            } else {
                Err(DecodeError::Trailing { extra: data.len() })
            }
        };
        match option {
            NBD_OPT_EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(data)?)),
            NBD_OPT_ABORT => Ok(ClientOption::Abort),
            NBD_OPT_LIST => no_data(ClientOption::List),
            NBD_OPT_STARTTLS => no_data(ClientOption::StartTls),
            NBD_OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
            NBD_OPT_INFO => Ok(ClientOption::Info(decode_info_request(data)?)),
            NBD_OPT_GO => Ok(ClientOption::Go(decode_info_request(data)?)),
            NBD_OPT_LIST_META_CONTEXT => {
                Ok(ClientOption::ListMetaContext(decode_meta_request(data)?))
            }
            NBD_OPT_SET_META_CONTEXT => {
                Ok(ClientOption::SetMetaContext(decode_meta_request(data)?))
            }
            other => Ok(ClientOption::Unknown(other)),
        }
    }

    /// Encodes the option with its header (as a client sends it).
    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::new();
        match self {
            ClientOption::ExportName(name) => data.extend_from_slice(name.as_bytes()),
            ClientOption::Abort
            | ClientOption::List
            | ClientOption::StartTls
            | ClientOption::StructuredReply
            | ClientOption::Unknown(_) => {}
            ClientOption::Info(req) | ClientOption::Go(req) => {
                put_u32(&mut data, req.name.len() as u32);
                data.extend_from_slice(req.name.as_bytes());
                put_u16(&mut data, req.requests.len() as u16);
                for r in &req.requests {
                    put_u16(&mut data, *r);
                }
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                put_u32(&mut data, req.export.len() as u32);
                data.extend_from_slice(req.export.as_bytes());
                put_u32(&mut data, req.queries.len() as u32);
                for q in &req.queries {
                    put_u32(&mut data, q.len() as u32);
                    data.extend_from_slice(q.as_bytes());
                }
            }
        }
        let mut out = OptionHeader {
            option: self.code(),
            len: data.len() as u32,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(&data);
        out
    }
}

fn decode_info_request(data: &[u8]) -> Result<InfoRequest, DecodeError> {
    let mut r = Reader::new(data);
    let name_len = r.u32()? as usize;
    // The spec: the name length MUST be no larger than the option data length - 6.
    if name_len > data.len().saturating_sub(6) {
        return Err(DecodeError::BadLength {
            len: name_len as u64,
        });
    }
    let name = r.string(name_len)?;
    let count = r.u16()? as usize;
    if r.remaining() != count * 2 {
        return Err(DecodeError::BadLength { len: count as u64 });
    }
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        requests.push(r.u16()?);
    }
    r.finish()?;
    Ok(InfoRequest { name, requests })
}

fn decode_meta_request(data: &[u8]) -> Result<MetaContextRequest, DecodeError> {
    let mut r = Reader::new(data);
    let export = r.string32()?;
    let count = r.u32()? as usize;
    // Each query takes at least its 4-byte length: bound the allocation by the input.
    if count > r.remaining() / 4 {
        return Err(DecodeError::BadLength { len: count as u64 });
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(r.string32()?);
    }
    r.finish()?;
    Ok(MetaContextRequest { export, queries })
}

// ---------------------------------------------------------------------------------------
// Option replies
// ---------------------------------------------------------------------------------------

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        check_magic64(r.u64()?, OPTION_REPLY_MAGIC)?;
        let option = r.u32()?;
        let reply = r.u32()?;
        let len = r.u32()?;
        r.finish()?;
        Ok(Self { option, reply, len })
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize { min: u32, preferred: u32, max: u32 },
}

/// The body of an option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReplyBody {
    Ack,
    Server {
        name: String,
        description: String,
    },
    Info(Info),
    MetaContext {
        id: u32,
        name: String,
    },
    /// Any reply type with bit 31 set, with its optional human-readable message.
    Error {
        code: u32,
        message: String,
    },
}

/// A complete option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub body: OptionReplyBody,
}

impl OptionReply {
    pub fn new(option: u32, body: OptionReplyBody) -> Self {
        Self { option, body }
    }

    /// An error reply with a message for the user.
    pub fn error(option: u32, code: u32, message: impl Into<String>) -> Self {
        Self::new(
            option,
            OptionReplyBody::Error {
                code,
                message: message.into(),
            },
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::new();
        let reply = match &self.body {
            OptionReplyBody::Ack => NBD_REP_ACK,
            OptionReplyBody::Server { name, description } => {
                put_u32(&mut data, name.len() as u32);
                data.extend_from_slice(name.as_bytes());
                data.extend_from_slice(clip_message(description).as_bytes());
                NBD_REP_SERVER
            }
            OptionReplyBody::Info(info) => {
                match info {
                    Info::Export { size, flags } => {
                        put_u16(&mut data, NBD_INFO_EXPORT);
                        put_u64(&mut data, *size);
                        put_u16(&mut data, *flags);
                    }
                    Info::Name(name) => {
                        put_u16(&mut data, NBD_INFO_NAME);
                        data.extend_from_slice(name.as_bytes());
                    }
                    Info::Description(text) => {
                        put_u16(&mut data, NBD_INFO_DESCRIPTION);
                        data.extend_from_slice(clip_message(text).as_bytes());
                    }
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        put_u16(&mut data, NBD_INFO_BLOCK_SIZE);
                        put_u32(&mut data, *min);
                        put_u32(&mut data, *preferred);
                        put_u32(&mut data, *max);
                    }
                }
                NBD_REP_INFO
            }
            OptionReplyBody::MetaContext { id, name } => {
                put_u32(&mut data, *id);
                data.extend_from_slice(name.as_bytes());
                NBD_REP_META_CONTEXT
            }
            OptionReplyBody::Error { code, message } => {
                data.extend_from_slice(clip_message(message).as_bytes());
                *code | NBD_REP_FLAG_ERROR
            }
        };
        let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
        put_u64(&mut out, OPTION_REPLY_MAGIC);
        put_u32(&mut out, self.option);
        put_u32(&mut out, reply);
        put_u32(&mut out, data.len() as u32);
        out.extend_from_slice(&data);
        out
    }

    /// Decodes the body of a reply whose header was already read.
    pub fn decode(header: &OptionReplyHeader, data: &[u8]) -> Result<Self, DecodeError> {
        if data.len() != header.len as usize {
            return Err(DecodeError::BadLength {
                len: header.len as u64,
            });
        }
        let mut r = Reader::new(data);
        let body = match header.reply {
            NBD_REP_ACK => OptionReplyBody::Ack,
            NBD_REP_SERVER => {
                let name = r.string32()?;
                let description = parse_string(r.rest())?;
                OptionReplyBody::Server { name, description }
            }
            NBD_REP_INFO => {
                let kind = r.u16()?;
                let info = match kind {
                    NBD_INFO_EXPORT => Info::Export {
                        size: r.u64()?,
                        flags: r.u16()?,
                    },
                    NBD_INFO_NAME => Info::Name(parse_string(r.rest())?),
                    NBD_INFO_DESCRIPTION => Info::Description(parse_string(r.rest())?),
                    NBD_INFO_BLOCK_SIZE => Info::BlockSize {
                        min: r.u32()?,
                        preferred: r.u32()?,
                        max: r.u32()?,
                    },
                    other => {
                        return Err(DecodeError::BadField {
                            field: "info type",
                            value: other as u64,
                        })
                    }
                };
                OptionReplyBody::Info(info)
            }
            NBD_REP_META_CONTEXT => {
                let id = r.u32()?;
                let name = parse_string(r.rest())?;
                OptionReplyBody::MetaContext { id, name }
            }
            code if code & NBD_REP_FLAG_ERROR != 0 => OptionReplyBody::Error {
                code,
                message: parse_string(r.rest())?,
            },
            other => {
                return Err(DecodeError::BadField {
                    field: "reply type",
                    value: other as u64,
                })
            }
        };
        r.finish()?;
        Ok(Self {
            option: header.option,
            body,
        })
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, optional zero padding.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES);
    put_u64(&mut out, size);
    put_u16(&mut out, flags);
    if !no_zeroes {
        out.resize(EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES, 0);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Transmission requests
// ---------------------------------------------------------------------------------------

/// Transmission command types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A command this server does not know; answered with `NBD_EINVAL`.
    Unknown(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }

    /// The lower-case name used in logs.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Unknown(_) => "unknown",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Unknown(v) => write!(f, "unknown({v})"),
            other => f.write_str(other.name()),
        }
    }
}

/// A transmission request header (the write payload, if any, follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic {
                expected: REQUEST_MAGIC as u64,
                found: magic as u64,
            });
        }
        let flags = r.u16()?;
        let command = Command::from_u16(r.u16()?);
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_u16().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Whether `length` bytes of payload follow this header from the client (a write).
    pub fn has_payload(&self) -> bool {
        self.command == Command::Write
    }
}

// ---------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------

/// A simple reply header (read data, if any, follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(DecodeError::BadMagic {
                expected: SIMPLE_REPLY_MAGIC as u64,
                found: magic as u64,
            });
        }
        let error = r.u32()?;
        let cookie = r.u64()?;
        r.finish()?;
        Ok(Self { error, cookie })
    }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut out = [0u8; CHUNK_HEADER_LEN];
        out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(DecodeError::BadMagic {
                expected: STRUCTURED_REPLY_MAGIC as u64,
                found: magic as u64,
            });
        }
        let flags = r.u16()?;
        let kind = r.u16()?;
        let cookie = r.u64()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self {
            flags,
            kind,
            cookie,
            length,
        })
    }

    pub fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }
}

/// The header and the offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk, to be followed by
/// `data_len` bytes of data: lets the server send read data without copying it.
pub fn encode_offset_data_prefix(
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len: u32,
) -> [u8; CHUNK_HEADER_LEN + 8] {
    let mut out = [0u8; CHUNK_HEADER_LEN + 8];
    out[..CHUNK_HEADER_LEN].copy_from_slice(
        &ChunkHeader {
            flags,
            kind: NBD_REPLY_TYPE_OFFSET_DATA,
            cookie,
            length: data_len.saturating_add(8),
        }
        .encode(),
    );
    out[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// One `base:allocation` (or other context) extent in a block status chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// The payload of a structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    OffsetData {
        offset: u64,
        data: Vec<u8>,
    },
    OffsetHole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        context_id: u32,
        descriptors: Vec<BlockDescriptor>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
}

impl Chunk {
    pub fn kind(&self) -> u16 {
        match self {
            Chunk::None => NBD_REPLY_TYPE_NONE,
            Chunk::OffsetData { .. } => NBD_REPLY_TYPE_OFFSET_DATA,
            Chunk::OffsetHole { .. } => NBD_REPLY_TYPE_OFFSET_HOLE,
            Chunk::BlockStatus { .. } => NBD_REPLY_TYPE_BLOCK_STATUS,
            Chunk::Error { .. } => NBD_REPLY_TYPE_ERROR,
            Chunk::ErrorOffset { .. } => NBD_REPLY_TYPE_ERROR_OFFSET,
        }
    }
}

/// A complete structured reply chunk (header and payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructuredReply {
    pub flags: u16,
    pub cookie: u64,
    pub chunk: Chunk,
}

impl StructuredReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        match &self.chunk {
            Chunk::None => {}
            Chunk::OffsetData { offset, data } => {
                put_u64(&mut payload, *offset);
                payload.extend_from_slice(data);
            }
            Chunk::OffsetHole { offset, len } => {
                put_u64(&mut payload, *offset);
                put_u32(&mut payload, *len);
            }
            Chunk::BlockStatus {
                context_id,
                descriptors,
            } => {
                put_u32(&mut payload, *context_id);
                for d in descriptors {
                    put_u32(&mut payload, d.length);
                    put_u32(&mut payload, d.flags);
                }
            }
            Chunk::Error { error, message } => {
                let message = clip_message(message);
                put_u32(&mut payload, *error);
                put_u16(&mut payload, message.len() as u16);
                payload.extend_from_slice(message.as_bytes());
            }
            Chunk::ErrorOffset {
                error,
                message,
                offset,
            } => {
                let message = clip_message(message);
                put_u32(&mut payload, *error);
                put_u16(&mut payload, message.len() as u16);
                payload.extend_from_slice(message.as_bytes());
                put_u64(&mut payload, *offset);
            }
        }
        let mut out = ChunkHeader {
            flags: self.flags,
            kind: self.chunk.kind(),
            cookie: self.cookie,
            length: payload.len() as u32,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes a chunk payload whose header was already read, enforcing the per-type
    /// length rules of the spec.
    pub fn decode(header: &ChunkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() != header.length as usize {
            return Err(DecodeError::BadLength {
                len: header.length as u64,
            });
        }
        let bad_len = || DecodeError::BadLength {
            len: header.length as u64,
        };
        let mut r = Reader::new(payload);
        let chunk = match header.kind {
            NBD_REPLY_TYPE_NONE => {
                if !payload.is_empty() {
                    return Err(bad_len());
                }
                if !header.is_done() {
                    return Err(DecodeError::BadField {
                        field: "flags",
                        value: header.flags as u64,
                    });
                }
                Chunk::None
            }
            NBD_REPLY_TYPE_OFFSET_DATA => {
                if payload.len() < 9 {
                    return Err(bad_len());
                }
                Chunk::OffsetData {
                    offset: r.u64()?,
                    data: r.rest().to_vec(),
                }
            }
            NBD_REPLY_TYPE_OFFSET_HOLE => {
                if payload.len() != 12 {
                    return Err(bad_len());
                }
                let offset = r.u64()?;
                let len = r.u32()?;
                if len == 0 {
                    return Err(DecodeError::BadField {
                        field: "hole size",
                        value: 0,
                    });
                }
                Chunk::OffsetHole { offset, len }
            }
            NBD_REPLY_TYPE_BLOCK_STATUS => {
                if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
                    return Err(bad_len());
                }
                let context_id = r.u32()?;
                let mut descriptors = Vec::with_capacity((payload.len() - 4) / 8);
                while r.remaining() > 0 {
                    let length = r.u32()?;
                    let flags = r.u32()?;
                    if length == 0 {
                        return Err(DecodeError::BadField {
                            field: "extent length",
                            value: 0,
                        });
                    }
                    descriptors.push(BlockDescriptor { length, flags });
                }
                Chunk::BlockStatus {
                    context_id,
                    descriptors,
                }
            }
            NBD_REPLY_TYPE_ERROR | NBD_REPLY_TYPE_ERROR_OFFSET => {
                let fixed = if header.kind == NBD_REPLY_TYPE_ERROR {
                    6
                } else {
                    14
                };
                if payload.len() < fixed {
                    return Err(bad_len());
                }
                let error = r.u32()?;
                if error == 0 {
                    return Err(DecodeError::BadField {
                        field: "error",
                        value: 0,
                    });
                }
                let msg_len = r.u16()? as usize;
                if msg_len > payload.len() - fixed {
                    return Err(DecodeError::BadLength {
                        len: msg_len as u64,
                    });
                }
                let message = r.string(msg_len)?;
                if header.kind == NBD_REPLY_TYPE_ERROR {
                    Chunk::Error { error, message }
                } else {
                    Chunk::ErrorOffset {
                        error,
                        message,
                        offset: r.u64()?,
                    }
                }
            }
            kind => return Err(DecodeError::UnknownChunkType { kind }),
        };
        r.finish()?;
        Ok(Self {
            flags: header.flags,
            cookie: header.cookie,
            chunk,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        // Printable text without NUL, multi-byte characters included.
        "[a-zA-Z0-9@:._ éß漢-]{0,40}"
    }

    fn info_request() -> impl Strategy<Value = InfoRequest> {
        (name(), proptest::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, requests)| InfoRequest { name, requests })
    }

    fn meta_request() -> impl Strategy<Value = MetaContextRequest> {
        (name(), proptest::collection::vec(name(), 0..6))
            .prop_map(|(export, queries)| MetaContextRequest { export, queries })
    }

    fn client_option() -> impl Strategy<Value = ClientOption> {
        prop_oneof![
            name().prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StartTls),
            Just(ClientOption::StructuredReply),
            info_request().prop_map(ClientOption::Info),
            info_request().prop_map(ClientOption::Go),
            meta_request().prop_map(ClientOption::ListMetaContext),
            meta_request().prop_map(ClientOption::SetMetaContext),
            (11u32..).prop_map(ClientOption::Unknown),
        ]
    }

    fn option_reply() -> impl Strategy<Value = OptionReply> {
        let body = prop_oneof![
            Just(OptionReplyBody::Ack),
            (name(), name())
                .prop_map(|(name, description)| OptionReplyBody::Server { name, description }),
            (any::<u64>(), any::<u16>())
                .prop_map(|(size, flags)| OptionReplyBody::Info(Info::Export { size, flags })),
            name().prop_map(|n| OptionReplyBody::Info(Info::Name(n))),
            name().prop_map(|n| OptionReplyBody::Info(Info::Description(n))),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max)| {
                OptionReplyBody::Info(Info::BlockSize {
                    min,
                    preferred,
                    max,
                })
            }),
            (any::<u32>(), name()).prop_map(|(id, name)| OptionReplyBody::MetaContext { id, name }),
            (1u32..=9, name()).prop_map(|(c, message)| OptionReplyBody::Error {
                code: NBD_REP_FLAG_ERROR | c,
                message
            }),
        ];
        (any::<u32>(), body).prop_map(|(option, body)| OptionReply { option, body })
    }

    fn request() -> impl Strategy<Value = Request> {
        (
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(|(flags, cmd, cookie, offset, length)| Request {
                flags,
                command: Command::from_u16(cmd),
                cookie,
                offset,
                length,
            })
    }

    fn chunk() -> impl Strategy<Value = (u16, Chunk)> {
        let descriptor =
            (1u32.., any::<u32>()).prop_map(|(length, flags)| BlockDescriptor { length, flags });
        prop_oneof![
            Just((NBD_REPLY_FLAG_DONE, Chunk::None)),
            (
                any::<u16>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 1..64)
            )
                .prop_map(|(f, offset, data)| (f, Chunk::OffsetData { offset, data })),
            (any::<u16>(), any::<u64>(), 1u32..)
                .prop_map(|(f, offset, len)| (f, Chunk::OffsetHole { offset, len })),
            (
                any::<u16>(),
                any::<u32>(),
                proptest::collection::vec(descriptor, 1..16)
            )
                .prop_map(|(f, context_id, descriptors)| (
                    f,
                    Chunk::BlockStatus {
                        context_id,
                        descriptors
                    }
                )),
            (any::<u16>(), 1u32.., name())
                .prop_map(|(f, error, message)| (f, Chunk::Error { error, message })),
            (any::<u16>(), 1u32.., name(), any::<u64>()).prop_map(|(f, error, message, offset)| (
                f,
                Chunk::ErrorOffset {
                    error,
                    message,
                    offset
                }
            )),
        ]
    }

    proptest! {
        #[test]
        fn client_option_round_trip(opt in client_option()) {
            let bytes = opt.encode();
            let header = OptionHeader::decode(&bytes[..OPTION_HEADER_LEN]).unwrap();
            prop_assert_eq!(header.len as usize, bytes.len() - OPTION_HEADER_LEN);
            let decoded = ClientOption::decode(header.option, &bytes[OPTION_HEADER_LEN..]).unwrap();
            prop_assert_eq!(decoded, opt);
        }

        #[test]
        fn option_reply_round_trip(reply in option_reply()) {
            let bytes = reply.encode();
            let header = OptionReplyHeader::decode(&bytes[..OPTION_REPLY_HEADER_LEN]).unwrap();
            let decoded = OptionReply::decode(&header, &bytes[OPTION_REPLY_HEADER_LEN..]).unwrap();
            prop_assert_eq!(decoded, reply);
        }

        #[test]
        fn request_round_trip(req in request()) {
            prop_assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        }

        #[test]
        fn simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
            let reply = SimpleReply { error, cookie };
            prop_assert_eq!(SimpleReply::decode(&reply.encode()).unwrap(), reply);
        }

        #[test]
        fn structured_reply_round_trip((flags, chunk) in chunk(), cookie in any::<u64>()) {
            let reply = StructuredReply { flags, cookie, chunk };
            let bytes = reply.encode();
            let header = ChunkHeader::decode(&bytes[..CHUNK_HEADER_LEN]).unwrap();
            let decoded = StructuredReply::decode(&header, &bytes[CHUNK_HEADER_LEN..]).unwrap();
            prop_assert_eq!(decoded, reply);
        }

        #[test]
        fn offset_data_prefix_matches_full_encoding(
            flags in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 1..64),
        ) {
            let full = StructuredReply { flags, cookie, chunk: Chunk::OffsetData { offset, data: data.clone() } }.encode();
            let prefix = encode_offset_data_prefix(flags, cookie, offset, data.len() as u32);
            prop_assert_eq!(&full[..prefix.len()], &prefix[..]);
            prop_assert_eq!(&full[prefix.len()..], &data[..]);
        }

        #[test]
        fn greeting_and_flags_round_trip(hs in any::<u16>(), cf in 0u32..4) {
            let g = Greeting { handshake_flags: hs };
            prop_assert_eq!(Greeting::decode(&g.encode()).unwrap(), g);
            let flags = ClientFlags(cf);
            prop_assert_eq!(ClientFlags::decode(&flags.encode(), NBD_FLAG_NO_ZEROES).unwrap(), flags);
        }

        /// Arbitrary bytes never make a decoder panic.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), code in any::<u32>(), kind in any::<u16>(), flags in any::<u16>()) {
            let _ = Greeting::decode(&bytes);
            let _ = ClientFlags::decode(&bytes, NBD_FLAG_NO_ZEROES);
            let _ = OptionHeader::decode(&bytes);
            let _ = ClientOption::decode(code, &bytes);
            for option in 0..12 {
                let _ = ClientOption::decode(option, &bytes);
            }
            let _ = OptionReplyHeader::decode(&bytes);
            for reply in [NBD_REP_ACK, NBD_REP_SERVER, NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_ERR_UNSUP, code] {
                let header = OptionReplyHeader { option: 0, reply, len: bytes.len() as u32 };
                let _ = OptionReply::decode(&header, &bytes);
            }
            let _ = Request::decode(&bytes);
            let _ = SimpleReply::decode(&bytes);
            let _ = ChunkHeader::decode(&bytes);
            for kind in [0, 1, 2, 5, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET, kind] {
                let header = ChunkHeader { flags, kind, cookie: 0, length: bytes.len() as u32 };
                let _ = StructuredReply::decode(&header, &bytes);
            }
        }

        /// Structured decoding of random payloads that start like valid ones.
        #[test]
        fn option_data_with_random_lengths_never_panics(name_len in any::<u32>(), count in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut data = name_len.to_be_bytes().to_vec();
            data.extend_from_slice(&count.to_be_bytes());
            data.extend_from_slice(&tail);
            for option in [NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_SET_META_CONTEXT, NBD_OPT_LIST_META_CONTEXT] {
                let _ = ClientOption::decode(option, &data);
            }
        }
    }

    #[test]
    fn go_name_length_beyond_data_is_invalid() {
        let mut data = 100u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc\0\0");
        assert!(matches!(
            ClientOption::decode(NBD_OPT_GO, &data),
            Err(DecodeError::BadLength { .. })
        ));
    }

    #[test]
    fn list_with_data_is_invalid_and_abort_ignores_data() {
        assert!(ClientOption::decode(NBD_OPT_LIST, b"x").is_err());
        assert_eq!(
            ClientOption::decode(NBD_OPT_ABORT, b"whatever").unwrap(),
            ClientOption::Abort
        );
    }

    #[test]
    fn unknown_client_flags_are_rejected() {
        assert!(ClientFlags::decode(&4u32.to_be_bytes(), NBD_FLAG_NO_ZEROES).is_err());
        // NO_ZEROES is only valid when the server offered it.
        assert!(ClientFlags::decode(&2u32.to_be_bytes(), 0).is_err());
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(encode_export_name_reply(1, 2, false).len(), 134);
        assert_eq!(encode_export_name_reply(1, 2, true).len(), 10);
    }

    #[test]
    fn long_error_messages_are_clipped() {
        let msg = "é".repeat(3000);
        let bytes = OptionReply::error(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, msg).encode();
        assert!(bytes.len() - OPTION_REPLY_HEADER_LEN <= MAX_STRING_LEN);
        let header = OptionReplyHeader::decode(&bytes[..OPTION_REPLY_HEADER_LEN]).unwrap();
        assert!(OptionReply::decode(&header, &bytes[OPTION_REPLY_HEADER_LEN..]).is_ok());
    }
}
