//! The framing of the server side of the fixed-newstyle handshake, as a state machine: the
//! greeting, the client flags, then option requests one by one, each decoded into a
//! [`ClientOption`]. What to answer an option (and when to enter transmission) is the
//! server's policy; the replies are encoded with [`crate::codec::OptionReply`] and
//! [`ServerHandshake::export_name_reply`].
//!
//! ```text
//!  greeting() ──send──▶
//!  ClientFlags (4 B) ──feed──▶ Continue
//!  OptionHeader (16 B) ──feed──▶ Continue (data follows) | Option | Invalid
//!  OptionData (len B) ──feed──▶ Option(ClientOption) | Invalid { option, error }
//! ```
//!
//! Invariants: client flags the server did not offer end the handshake (the spec's MUST);
//! an option announcing more than the server's limit is refused before the caller
//! allocates for it; a syntactically bad option is reported as [`ServerStep::Invalid`] (the
//! server answers `NBD_REP_ERR_INVALID`, or drops the connection for
//! `NBD_OPT_EXPORT_NAME`, which has no way to fail softly).

use crate::codec::{
    encode_export_name_reply, ClientFlags, ClientOption, DecodeError, Greeting, OptionHeader,
    CLIENT_FLAGS_LEN, GREETING_LEN, OPTION_HEADER_LEN,
};

/// Why the handshake cannot go on (the server drops the connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    #[error("Bad client flags")]
    ClientFlags(#[source] DecodeError),
    #[error("Bad option request header")]
    OptionHeader(#[source] DecodeError),
    #[error("Option {option} carries {len} bytes of data, more than the {max}-byte limit")]
    OptionTooLong { option: u32, len: u32, max: u32 },
}

/// What the server does after feeding bytes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerStep {
    /// Read [`ServerHandshake::wants`] bytes.
    Continue,
    /// A well-formed option: answer it (then read [`ServerHandshake::wants`] bytes, unless
    /// the answer ends the handshake).
    Option(ClientOption),
    /// A malformed option with code `option`.
    Invalid { option: u32, error: DecodeError },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData(OptionHeader),
}

/// The server side of one handshake.
#[derive(Debug, Clone)]
pub struct ServerHandshake {
    handshake_flags: u16,
    max_option_len: u32,
    client_flags: ClientFlags,
    state: State,
}

impl ServerHandshake {
    /// A handshake that offers `handshake_flags` (`NBD_FLAG_FIXED_NEWSTYLE`, ...) and
    /// accepts options of at most `max_option_len` bytes of data.
    pub fn new(handshake_flags: u16, max_option_len: u32) -> Self {
        Self {
            handshake_flags,
            max_option_len,
            client_flags: ClientFlags(0),
            state: State::ClientFlags,
        }
    }

    /// The greeting the server sends first.
    pub fn greeting(&self) -> [u8; GREETING_LEN] {
        Greeting {
            handshake_flags: self.handshake_flags,
        }
        .encode()
    }

    /// How many bytes the server reads next.
    pub fn wants(&self) -> usize {
        match self.state {
            State::ClientFlags => CLIENT_FLAGS_LEN,
            State::OptionHeader => OPTION_HEADER_LEN,
            State::OptionData(header) => header.len as usize,
        }
    }

    /// The client's flags (0 until they were read).
    pub fn client_flags(&self) -> ClientFlags {
        self.client_flags
    }

    /// Feeds the [`Self::wants`] bytes the server read.
    pub fn feed(&mut self, input: &[u8]) -> Result<ServerStep, ServerError> {
        match self.state {
            State::ClientFlags => {
                self.client_flags = ClientFlags::decode(input, self.handshake_flags)
                    .map_err(ServerError::ClientFlags)?;
                self.state = State::OptionHeader;
                Ok(ServerStep::Continue)
            }
            State::OptionHeader => {
                let header = OptionHeader::decode(input).map_err(ServerError::OptionHeader)?;
                if header.len > self.max_option_len {
                    return Err(ServerError::OptionTooLong {
                        option: header.option,
                        len: header.len,
                        max: self.max_option_len,
                    });
                }
                if header.len == 0 {
                    return Ok(Self::decode(header.option, &[]));
                }
                self.state = State::OptionData(header);
                Ok(ServerStep::Continue)
            }
            State::OptionData(header) => {
                self.state = State::OptionHeader;
                if input.len() != header.len as usize {
                    return Ok(ServerStep::Invalid {
                        option: header.option,
                        error: DecodeError::BadLength {
                            len: header.len.into(),
                        },
                    });
                }
                Ok(Self::decode(header.option, input))
            }
        }
    }

    fn decode(option: u32, data: &[u8]) -> ServerStep {
        match ClientOption::decode(option, data) {
            Ok(opt) => ServerStep::Option(opt),
            Err(error) => ServerStep::Invalid { option, error },
        }
    }

    /// The reply to `NBD_OPT_EXPORT_NAME`, padded unless the client asked for no zeroes.
    pub fn export_name_reply(&self, size: u64, transmission_flags: u16) -> Vec<u8> {
        encode_export_name_reply(size, transmission_flags, self.client_flags.no_zeroes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::*;

    const FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

    /// Feeds a client byte stream; returns the steps that carried an option.
    fn run(input: &[u8]) -> (Vec<ServerStep>, Option<ServerError>) {
        let mut hs = ServerHandshake::new(FLAGS, 1024);
        let mut steps = Vec::new();
        let mut pos = 0;
        while pos + hs.wants() <= input.len() {
            let n = hs.wants();
            match hs.feed(&input[pos..pos + n]) {
                Ok(ServerStep::Continue) => {}
                Ok(step) => steps.push(step),
                Err(err) => return (steps, Some(err)),
            }
            pos += n;
        }
        (steps, None)
    }

    #[test]
    fn options_are_framed_and_decoded() {
        let go = ClientOption::Go(InfoRequest {
            name: "vol".into(),
            requests: vec![NBD_INFO_BLOCK_SIZE],
        });
        let mut input = ClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
            .encode()
            .to_vec();
        input.extend(ClientOption::List.encode());
        input.extend(go.encode());
        input.extend(
            OptionHeader {
                option: NBD_OPT_LIST,
                len: 1,
            }
            .encode(),
        );
        input.push(b'x');
        input.extend(ClientOption::Unknown(42).encode());
        let (steps, err) = run(&input);
        assert_eq!(err, None);
        assert_eq!(steps.len(), 4);
        assert_eq!(steps[0], ServerStep::Option(ClientOption::List));
        assert_eq!(steps[1], ServerStep::Option(go));
        assert!(matches!(
            steps[2],
            ServerStep::Invalid {
                option: NBD_OPT_LIST,
                ..
            }
        ));
        assert_eq!(steps[3], ServerStep::Option(ClientOption::Unknown(42)));
    }

    #[test]
    fn unknown_client_flags_and_oversized_options_end_the_handshake() {
        let (_, err) = run(&8u32.to_be_bytes());
        assert!(matches!(err, Some(ServerError::ClientFlags(_))));
        let mut input = ClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE).encode().to_vec();
        input.extend(
            OptionHeader {
                option: NBD_OPT_GO,
                len: 1025,
            }
            .encode(),
        );
        let (_, err) = run(&input);
        assert!(matches!(
            err,
            Some(ServerError::OptionTooLong { len: 1025, .. })
        ));
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        let mut hs = ServerHandshake::new(FLAGS, 1024);
        hs.feed(&ClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE).encode())
            .unwrap();
        assert_eq!(hs.export_name_reply(1, 2).len(), 134);
        let mut hs = ServerHandshake::new(FLAGS, 1024);
        hs.feed(&ClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).encode())
            .unwrap();
        assert_eq!(hs.export_name_reply(1, 2).len(), 10);
        assert_eq!(
            Greeting::decode(&hs.greeting()).unwrap().handshake_flags,
            FLAGS
        );
    }

    proptest::proptest! {
        /// Whatever the client sends, the server never panics and never asks for more
        /// than its option limit.
        #[test]
        fn arbitrary_client_bytes_never_panic(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut hs = ServerHandshake::new(FLAGS, 256);
            let mut pos = 0;
            while pos + hs.wants() <= input.len() {
                proptest::prop_assert!(hs.wants() <= 256usize.max(OPTION_HEADER_LEN));
                let n = hs.wants();
                if hs.feed(&input[pos..pos + n]).is_err() {
                    break;
                }
                pos += n;
            }
        }
    }
}
