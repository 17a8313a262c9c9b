//! The client side of the fixed-newstyle handshake, as a state machine: `NBD_OPT_GO` for one
//! export, optionally asking for `NBD_INFO_BLOCK_SIZE`, simple replies only.
//!
//! The handshake never negotiates structured replies, metadata contexts or extended
//! headers: after it, every reply is a 16-byte simple reply, optionally followed by exactly
//! the requested number of bytes for a successful `NBD_CMD_READ`.
//!
//! ```text
//!  Greeting (18 B) ──feed──▶ Send(client flags + NBD_OPT_GO)
//!  ReplyHeader (20 B) ──feed──▶ Continue                (data follows)
//!  ReplyData (len B) ──feed──▶ Continue | Ready(ExportInfo) | Err(refused, malformed)
//! ```
//!
//! Invariants: a reply header announcing more than [`MAX_OPTION_REPLY_LEN`] bytes is
//! refused before the caller allocates for it; information types the client does not know
//! are skipped, as the spec asks; `NBD_REP_ACK` without `NBD_INFO_EXPORT` is an error.

use crate::codec::{
    ClientFlags, ClientOption, DecodeError, Greeting, Info, InfoRequest, OptionReply,
    OptionReplyBody, OptionReplyHeader, GREETING_LEN, NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT, NBD_OPT_GO, NBD_REP_ACK, NBD_REP_FLAG_ERROR, NBD_REP_INFO,
    OPTION_REPLY_HEADER_LEN,
};

/// Largest option reply data the client accepts (blockd's largest is a few hundred bytes).
pub const MAX_OPTION_REPLY_LEN: u32 = 64 * 1024;

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
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    pub block_size: Option<BlockSize>,
}

/// Why the handshake failed (the connection is of no further use).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("Not a newstyle NBD server greeting")]
    Greeting(#[source] DecodeError),
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
    #[error("Bad option reply header")]
    BadReplyHeader(#[source] DecodeError),
    #[error("The server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")]
    NoExportInfo,
    #[error("The handshake is already over")]
    Finished,
}

impl ClientError {
    /// The reply type when the server answered but refused (as opposed to the connection
    /// or the protocol failing).
    pub fn refused_reply(&self) -> Option<u32> {
        match self {
            ClientError::OptionRefused { reply, .. } => Some(*reply),
            _ => None,
        }
    }
}

/// What the caller does after feeding bytes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStep {
    /// Send these bytes to the server, then read [`ClientHandshake::wants`] bytes.
    Send(Vec<u8>),
    /// Read [`ClientHandshake::wants`] bytes.
    Continue,
    /// The handshake is over: the connection is in the transmission phase.
    Ready(ExportInfo),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    ReplyHeader,
    ReplyData(OptionReplyHeader),
    Done,
}

/// The client side of one handshake.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    export: String,
    want_block_size: bool,
    state: State,
    export_info: Option<(u64, u16)>,
    block_size: Option<BlockSize>,
}

impl ClientHandshake {
    /// A handshake that opens `export`, asking for `NBD_INFO_BLOCK_SIZE` when
    /// `want_block_size` (the client then promises to honour the constraints).
    pub fn new(export: &str, want_block_size: bool) -> Self {
        Self {
            export: export.to_string(),
            want_block_size,
            state: State::Greeting,
            export_info: None,
            block_size: None,
        }
    }

    /// How many bytes the caller reads next (0 once the handshake is over).
    pub fn wants(&self) -> usize {
        match self.state {
            State::Greeting => GREETING_LEN,
            State::ReplyHeader => OPTION_REPLY_HEADER_LEN,
            State::ReplyData(header) => header.len as usize,
            State::Done => 0,
        }
    }

    /// Feeds the [`Self::wants`] bytes the caller read.
    pub fn feed(&mut self, input: &[u8]) -> Result<ClientStep, ClientError> {
        match self.state {
            State::Greeting => self.on_greeting(input),
            State::ReplyHeader => {
                let header =
                    OptionReplyHeader::decode(input).map_err(ClientError::BadReplyHeader)?;
                if header.option != NBD_OPT_GO || header.len > MAX_OPTION_REPLY_LEN {
                    return Err(ClientError::MalformedReply {
                        reply: header.reply,
                        len: header.len,
                    });
                }
                if header.len == 0 {
                    return self.on_reply(header, &[]);
                }
                self.state = State::ReplyData(header);
                Ok(ClientStep::Continue)
            }
            State::ReplyData(header) => self.on_reply(header, input),
            State::Done => Err(ClientError::Finished),
        }
    }

    fn on_greeting(&mut self, input: &[u8]) -> Result<ClientStep, ClientError> {
        let greeting = Greeting::decode(input).map_err(ClientError::Greeting)?;
        let hflags = greeting.handshake_flags;
        if hflags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::NotFixedNewstyle(hflags));
        }
        let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if hflags & NBD_FLAG_NO_ZEROES != 0 {
            cflags |= NBD_FLAG_C_NO_ZEROES;
        }
        let requests = if self.want_block_size {
            vec![NBD_INFO_BLOCK_SIZE]
        } else {
            Vec::new()
        };
        let mut out = ClientFlags(cflags).encode().to_vec();
        out.extend_from_slice(
            &ClientOption::Go(InfoRequest {
                name: self.export.clone(),
                requests,
            })
            .encode(),
        );
        self.state = State::ReplyHeader;
        Ok(ClientStep::Send(out))
    }

    fn on_reply(
        &mut self,
        header: OptionReplyHeader,
        data: &[u8],
    ) -> Result<ClientStep, ClientError> {
        let malformed = || ClientError::MalformedReply {
            reply: header.reply,
            len: header.len,
        };
        if data.len() != header.len as usize {
            return Err(malformed());
        }
        self.state = State::ReplyHeader;
        match header.reply {
            NBD_REP_ACK => {
                if !data.is_empty() {
                    return Err(malformed());
                }
                let (size, flags) = self.export_info.ok_or(ClientError::NoExportInfo)?;
                self.state = State::Done;
                Ok(ClientStep::Ready(ExportInfo {
                    size,
                    flags,
                    block_size: self.block_size,
                }))
            }
            NBD_REP_INFO => {
                let kind = match data {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => return Err(malformed()),
                };
                // The client MUST ignore information it does not understand.
                if kind != NBD_INFO_EXPORT && kind != NBD_INFO_BLOCK_SIZE {
                    return Ok(ClientStep::Continue);
                }
                let reply = OptionReply::decode(&header, data).map_err(|_| malformed())?;
                match reply.body {
                    OptionReplyBody::Info(Info::Export { size, flags }) => {
                        self.export_info = Some((size, flags));
                    }
                    OptionReplyBody::Info(Info::BlockSize {
                        min,
                        preferred,
                        max,
                    }) => {
                        self.block_size = Some(BlockSize {
                            min,
                            preferred,
                            max,
                        });
                    }
                    _ => return Err(malformed()),
                }
                Ok(ClientStep::Continue)
            }
            reply if reply & NBD_REP_FLAG_ERROR != 0 => Err(ClientError::OptionRefused {
                option: header.option,
                reply,
                message: String::from_utf8_lossy(data).into_owned(),
            }),
            _ => Err(malformed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::*;

    fn greeting() -> Vec<u8> {
        Greeting {
            handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
        }
        .encode()
        .to_vec()
    }

    fn reply(body: OptionReplyBody) -> Vec<u8> {
        OptionReply::new(NBD_OPT_GO, body).encode()
    }

    /// Drives `hs` over a scripted server byte stream; returns what the client sent.
    fn run(hs: &mut ClientHandshake, input: &[u8]) -> (Vec<u8>, Result<ExportInfo, ClientError>) {
        let mut sent = Vec::new();
        let mut pos = 0;
        loop {
            let n = hs.wants();
            let Some(chunk) = input.get(pos..pos + n) else {
                return (sent, Err(ClientError::Finished));
            };
            pos += n;
            match hs.feed(chunk) {
                Ok(ClientStep::Send(bytes)) => sent.extend(bytes),
                Ok(ClientStep::Continue) => {}
                Ok(ClientStep::Ready(info)) => return (sent, Ok(info)),
                Err(err) => return (sent, Err(err)),
            }
        }
    }

    #[test]
    fn reads_export_and_block_size_and_skips_unknown_info() {
        let mut input = greeting();
        input.extend(reply(OptionReplyBody::Info(Info::Export {
            size: 1 << 20,
            flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
        })));
        // Unknown information types are ignored.
        input.extend(
            OptionReply::new(NBD_OPT_GO, OptionReplyBody::Ack).encode()[..12]
                .iter()
                .copied()
                .chain(NBD_REP_INFO.to_be_bytes())
                .chain(4u32.to_be_bytes())
                .chain([0, 99, 1, 2]),
        );
        let bs = BlockSize {
            min: 512,
            preferred: 4096,
            max: 1 << 25,
        };
        input.extend(reply(OptionReplyBody::Info(Info::BlockSize {
            min: bs.min,
            preferred: bs.preferred,
            max: bs.max,
        })));
        input.extend(reply(OptionReplyBody::Ack));
        let mut hs = ClientHandshake::new("v1", true);
        let (sent, info) = run(&mut hs, &input);
        assert_eq!(
            info.unwrap(),
            ExportInfo {
                size: 1 << 20,
                flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
                block_size: Some(bs)
            }
        );
        let mut expected = (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        expected.extend(
            ClientOption::Go(InfoRequest {
                name: "v1".into(),
                requests: vec![NBD_INFO_BLOCK_SIZE],
            })
            .encode(),
        );
        assert_eq!(sent, expected);
        assert_eq!(hs.wants(), 0);
        assert_eq!(hs.feed(&[]), Err(ClientError::Finished));
    }

    #[test]
    fn reports_refusal_with_its_message() {
        let mut input = greeting();
        input
            .extend(OptionReply::error(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, "no such export").encode());
        let (_, res) = run(&mut ClientHandshake::new("v1", false), &input);
        let err = res.unwrap_err();
        assert_eq!(err.refused_reply(), Some(NBD_REP_ERR_UNKNOWN));
        assert!(err.to_string().contains("no such export"));
    }

    #[test]
    fn needs_export_info() {
        let mut input = greeting();
        input.extend(reply(OptionReplyBody::Ack));
        let (_, res) = run(&mut ClientHandshake::new("v1", false), &input);
        assert_eq!(res, Err(ClientError::NoExportInfo));
    }

    #[test]
    fn refuses_oldstyle_and_plain_newstyle_servers() {
        let mut old = NBD_MAGIC.to_be_bytes().to_vec();
        old.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        old.extend_from_slice(&[0, 0]);
        let (_, res) = run(&mut ClientHandshake::new("v", false), &old);
        assert!(matches!(res, Err(ClientError::Greeting(_))));
        let plain = Greeting { handshake_flags: 0 }.encode();
        let (_, res) = run(&mut ClientHandshake::new("v", false), &plain);
        assert_eq!(res, Err(ClientError::NotFixedNewstyle(0)));
    }

    #[test]
    fn oversized_replies_are_refused_before_reading_them() {
        let mut hs = ClientHandshake::new("v", false);
        hs.feed(&greeting()).unwrap();
        let mut header = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        header.extend(NBD_OPT_GO.to_be_bytes());
        header.extend(NBD_REP_INFO.to_be_bytes());
        header.extend((MAX_OPTION_REPLY_LEN + 1).to_be_bytes());
        assert!(matches!(
            hs.feed(&header),
            Err(ClientError::MalformedReply { .. })
        ));
    }

    proptest::proptest! {
        /// Whatever the server sends, the client ends in an answer or an error, never a
        /// panic, and never asks for more than the reply limit.
        #[test]
        fn arbitrary_server_bytes_never_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut input = greeting();
            input.extend(tail);
            let mut hs = ClientHandshake::new("v", true);
            let mut pos = 0;
            while hs.wants() > 0 {
                proptest::prop_assert!(hs.wants() <= MAX_OPTION_REPLY_LEN as usize);
                let n = hs.wants().min(input.len() - pos);
                if hs.feed(&input[pos..pos + n]).is_err() || n == 0 {
                    break;
                }
                pos += n;
            }
        }
    }
}
