//! A minimal blocking NBD client for protocol checks against blockd and csi-nbd-proxy: the
//! encodings come from `nbd-wire`, so tests speak exactly the bytes the products do, and
//! a test can still send what a well-behaved client would not (unknown options, bad data).
//!
//! Every method panics with a message naming the step on a protocol error: these are test
//! assertions, not error handling.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nbd_wire::codec::{
    ClientFlags, ClientOption, Command, Greeting, InfoRequest, OptionHeader, OptionReply,
    OptionReplyBody, OptionReplyHeader, Request, SimpleReply, GREETING_LEN,
    NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_INFO_EXPORT,
    NBD_OPT_GO, NBD_REP_ACK, NBD_REP_INFO, OPTION_REPLY_HEADER_LEN, SIMPLE_REPLY_LEN,
};

/// One client connection, in the handshake until [`NbdClient::go`] succeeds.
pub struct NbdClient {
    pub s: UnixStream,
}

impl NbdClient {
    /// Connects, checks the fixed-newstyle greeting and answers it (`NO_ZEROES` included).
    pub fn connect(socket: &Path, timeout: Duration) -> NbdClient {
        let mut s = UnixStream::connect(socket).expect("connect to the NBD socket");
        s.set_read_timeout(Some(timeout)).unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).expect("greeting");
        let greeting = Greeting::decode(&g).expect("a newstyle greeting");
        assert_ne!(
            greeting.handshake_flags & NBD_FLAG_FIXED_NEWSTYLE,
            0,
            "fixed newstyle"
        );
        let flags = ClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        s.write_all(&flags.encode()).unwrap();
        NbdClient { s }
    }

    /// Sends option `option` with raw `data` (which may be malformed on purpose).
    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// The next option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).expect("option reply");
        let header = OptionReplyHeader::decode(&h).expect("option reply header");
        let mut data = vec![0u8; header.len as usize];
        self.s.read_exact(&mut data).unwrap();
        (header.option, header.reply, data)
    }

    /// `NBD_OPT_GO` for `export`; returns (size, transmission flags) or the error reply
    /// type.
    pub fn go(&mut self, export: &str) -> Result<(u64, u16), u32> {
        let go = ClientOption::Go(InfoRequest {
            name: export.to_string(),
            requests: Vec::new(),
        });
        self.s.write_all(&go.encode()).unwrap();
        let mut export_info = None;
        loop {
            let (option, reply, data) = self.option_reply();
            assert_eq!(option, NBD_OPT_GO);
            match reply {
                NBD_REP_ACK => return Ok(export_info.expect("NBD_INFO_EXPORT before ACK")),
                NBD_REP_INFO if data.starts_with(&NBD_INFO_EXPORT.to_be_bytes()) => {
                    let header = OptionReplyHeader {
                        option,
                        reply,
                        len: data.len() as u32,
                    };
                    let decoded = OptionReply::decode(&header, &data).expect("NBD_INFO_EXPORT");
                    if let OptionReplyBody::Info(nbd_wire::codec::Info::Export { size, flags }) =
                        decoded.body
                    {
                        export_info = Some((size, flags));
                    }
                }
                NBD_REP_INFO => {}
                r => return Err(r),
            }
        }
    }

    /// Sends a request header (and `payload` after it, as given).
    pub fn request(
        &mut self,
        command: Command,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length: len,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// The next simple reply: (error, cookie).
    pub fn reply(&mut self) -> io::Result<(u32, u64)> {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h)?;
        let reply = SimpleReply::decode(&h).expect("a simple reply");
        Ok((reply.error, reply.cookie))
    }

    /// Writes `data` at `offset` and expects success.
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(Command::Write, cookie, offset, data.len() as u32, data);
        assert_eq!(self.reply().expect("write reply"), (0, cookie));
    }

    /// Reads `len` bytes at `offset` and expects success.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(Command::Read, cookie, offset, len, &[]);
        assert_eq!(self.reply().expect("read reply"), (0, cookie));
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).expect("read payload");
        data
    }
}
