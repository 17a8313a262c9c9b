//! Server tests over in-memory duplex streams, with a raw client built on the codec.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::transmit::{plan_read, status_descriptors, Segment};
use super::*;
use crate::nbd::codec::*;
use crate::nbd::mem::{MemExport, MemRegistry, BLOCK};
use crate::nbd::Errno;
use crate::nbd::{
    ExportRegistry, ExportTarget, Extent, ExtentKind, IoBuf, IoQueue, OpenError, QueueDone,
    QueueStart, ZeroMode,
};

const SIZE: u64 = 64 * BLOCK;
const FAST_SIZE: u64 = 8 << 20;

fn setup() -> (Server, Arc<MemRegistry>) {
    let registry = Arc::new(MemRegistry::new());
    registry.insert("vol", MemExport::new(SIZE).with_description("a volume"));
    registry.insert("snap", MemExport::new(SIZE).read_only(true));
    registry.insert("slow", MemExport::new(SIZE).with_fast_punch(false));
    registry.insert("fast", MemExport::new(FAST_SIZE).with_inline_calls(true));
    (Server::new(registry.clone()), registry)
}

/// A raw NBD client speaking through the codec.
struct Client {
    s: DuplexStream,
    structured: bool,
}

impl Client {
    async fn connect(server: &Server) -> Client {
        let (c, s) = tokio::io::duplex(1 << 20);
        let server = server.clone();
        tokio::spawn(async move { server.serve_stream(s).await });
        Client {
            s: c,
            structured: false,
        }
    }

    /// Reads the greeting and sends fixed newstyle + no zeroes.
    async fn greet(server: &Server) -> Client {
        let mut c = Self::connect(server).await;
        let mut g = [0u8; GREETING_LEN];
        c.s.read_exact(&mut g).await.unwrap();
        let g = Greeting::decode(&g).unwrap();
        assert_eq!(
            g.handshake_flags,
            NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        );
        c.s.write_all(&ClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).encode())
            .await
            .unwrap();
        c
    }

    async fn reply(&mut self) -> OptionReply {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let h = OptionReplyHeader::decode(&h).unwrap();
        let mut data = vec![0u8; h.len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        OptionReply::decode(&h, &data).unwrap()
    }

    /// Sends an option and collects replies up to the final one (ACK or error).
    async fn option(&mut self, opt: ClientOption) -> Vec<OptionReplyBody> {
        self.s.write_all(&opt.encode()).await.unwrap();
        let mut out = Vec::new();
        loop {
            let r = self.reply().await;
            assert_eq!(r.option, opt.code());
            let last = matches!(r.body, OptionReplyBody::Ack | OptionReplyBody::Error { .. });
            out.push(r.body);
            if last {
                return out;
            }
        }
    }

    async fn structured(&mut self) {
        let r = self.option(ClientOption::StructuredReply).await;
        assert_eq!(r, vec![OptionReplyBody::Ack]);
        self.structured = true;
    }

    /// GO with block-size and name info requested; returns (size, flags).
    async fn go(&mut self, name: &str, block_size: bool) -> (u64, u16) {
        let mut requests = vec![NBD_INFO_NAME, NBD_INFO_DESCRIPTION];
        if block_size {
            requests.push(NBD_INFO_BLOCK_SIZE);
        }
        let replies = self
            .option(ClientOption::Go(InfoRequest {
                name: name.into(),
                requests,
            }))
            .await;
        assert_eq!(replies.last(), Some(&OptionReplyBody::Ack), "{replies:?}");
        let export = replies.iter().find_map(|r| match r {
            OptionReplyBody::Info(Info::Export { size, flags }) => Some((*size, *flags)),
            _ => None,
        });
        export.expect("NBD_INFO_EXPORT")
    }

    async fn connect_go(server: &Server, name: &str, structured: bool) -> (Client, u16) {
        let mut c = Self::greet(server).await;
        if structured {
            c.structured().await;
            let r = c
                .option(ClientOption::SetMetaContext(MetaContextRequest {
                    export: name.into(),
                    queries: vec![BASE_ALLOCATION.into()],
                }))
                .await;
            assert_eq!(r.len(), 2, "{r:?}");
        }
        let (_, flags) = c.go(name, true).await;
        (c, flags)
    }

    async fn send(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, length: u32) {
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&req.encode()).await.unwrap();
    }

    async fn simple(&mut self, data_len: usize) -> (SimpleReply, Vec<u8>) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let r = SimpleReply::decode(&h).unwrap();
        let mut data = Vec::new();
        if r.error == 0 && data_len > 0 {
            data = vec![0u8; data_len];
            self.s.read_exact(&mut data).await.unwrap();
        }
        (r, data)
    }

    /// Reads one reply of either kind: (cookie, error, chunks).
    async fn any_reply(&mut self, read_len: usize) -> (u64, u32, Vec<Chunk>) {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).await.unwrap();
        if u32::from_be_bytes(magic) == SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; SIMPLE_REPLY_LEN - 4];
            self.s.read_exact(&mut rest).await.unwrap();
            let mut all = magic.to_vec();
            all.extend_from_slice(&rest);
            let r = SimpleReply::decode(&all).unwrap();
            let mut chunks = Vec::new();
            if r.error == 0 && read_len > 0 {
                let mut data = vec![0u8; read_len];
                self.s.read_exact(&mut data).await.unwrap();
                chunks.push(Chunk::OffsetData { offset: 0, data });
            }
            return (r.cookie, r.error, chunks);
        }
        let mut rest = [0u8; CHUNK_HEADER_LEN - 4];
        self.s.read_exact(&mut rest).await.unwrap();
        let mut all = magic.to_vec();
        all.extend_from_slice(&rest);
        let mut h = ChunkHeader::decode(&all).unwrap();
        let mut chunks = Vec::new();
        let cookie = h.cookie;
        let mut error = 0;
        loop {
            let mut payload = vec![0u8; h.length as usize];
            self.s.read_exact(&mut payload).await.unwrap();
            let r = StructuredReply::decode(&h, &payload).unwrap();
            assert_eq!(r.cookie, cookie, "chunks of one reply are sent together");
            if let Chunk::Error { error: e, .. } = &r.chunk {
                error = *e;
            }
            chunks.push(r.chunk);
            if h.is_done() {
                return (cookie, error, chunks);
            }
            let mut hb = [0u8; CHUNK_HEADER_LEN];
            self.s.read_exact(&mut hb).await.unwrap();
            h = ChunkHeader::decode(&hb).unwrap();
        }
    }

    /// Round trip of one request; returns (error, chunks).
    async fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> (u32, Vec<Chunk>) {
        self.send(command, flags, 7, offset, length).await;
        self.s.write_all(payload).await.unwrap();
        let read_len = if command == Command::Read {
            length as usize
        } else {
            0
        };
        let (cookie, error, chunks) = self.any_reply(read_len).await;
        assert_eq!(cookie, 7);
        (error, chunks)
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.call(Command::Write, 0, offset, data.len() as u32, data)
            .await
            .0
    }

    /// Reads and reassembles data (holes as zeros); returns (error, bytes).
    async fn read(&mut self, offset: u64, len: u32) -> (u32, Vec<u8>) {
        let (error, chunks) = self.call(Command::Read, 0, offset, len, &[]).await;
        (error, reassemble(offset, len, &chunks))
    }

    async fn expect_eof(&mut self) {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b))
            .await
            .expect("server closes the connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "connection should be closed");
    }
}

fn reassemble(offset: u64, len: u32, chunks: &[Chunk]) -> Vec<u8> {
    let mut out = vec![0x5au8; len as usize];
    for c in chunks {
        match c {
            Chunk::OffsetData { offset: o, data } => {
                // Simple replies are stored with offset 0 relative to the request.
                let start = if *o == 0 { 0 } else { (*o - offset) as usize };
                out[start..start + data.len()].copy_from_slice(data);
            }
            Chunk::OffsetHole { offset: o, len } => {
                let start = (*o - offset) as usize;
                out[start..start + *len as usize].fill(0);
            }
            _ => {}
        }
    }
    out
}

#[tokio::test]
async fn go_reports_size_flags_and_block_sizes() {
    let (server, _) = setup();
    let mut c = Client::greet(&server).await;
    let replies = c
        .option(ClientOption::Go(InfoRequest {
            name: "vol".into(),
            requests: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION],
        }))
        .await;
    let flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_CAN_MULTI_CONN;
    assert_eq!(
        replies,
        vec![
            OptionReplyBody::Info(Info::Export { size: SIZE, flags }),
            OptionReplyBody::Info(Info::Description("a volume".into())),
            OptionReplyBody::Info(Info::BlockSize {
                min: 512,
                preferred: 4096,
                max: 32 << 20
            }),
            OptionReplyBody::Ack,
        ]
    );
}

#[tokio::test]
async fn read_only_export_flags_and_eperm() {
    let (server, _) = setup();
    let (mut c, flags) = Client::connect_go(&server, "snap", true).await;
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(flags & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES), 0);
    assert_ne!(flags & NBD_FLAG_SEND_DF, 0, "DF with structured replies");
    assert_eq!(c.write(0, &[1; 512]).await, NBD_EPERM);
    assert_eq!(c.call(Command::Trim, 0, 0, 512, &[]).await.0, NBD_EPERM);
    assert_eq!(c.read(0, 512).await, (0, vec![0; 512]));
}

#[tokio::test]
async fn unknown_and_invalid_options_then_go_still_works() {
    let (server, _) = setup();
    let mut c = Client::greet(&server).await;
    let r = c.option(ClientOption::Unknown(99)).await;
    assert!(matches!(
        r[..],
        [OptionReplyBody::Error {
            code: NBD_REP_ERR_UNSUP,
            ..
        }]
    ));
    // NBD_OPT_LIST with data is invalid.
    c.s.write_all(
        &OptionHeader {
            option: NBD_OPT_LIST,
            len: 3,
        }
        .encode(),
    )
    .await
    .unwrap();
    c.s.write_all(b"abc").await.unwrap();
    let r = c.reply().await;
    assert!(matches!(
        r.body,
        OptionReplyBody::Error {
            code: NBD_REP_ERR_INVALID,
            ..
        }
    ));
    // STARTTLS on a plain listener: policy.
    let r = c.option(ClientOption::StartTls).await;
    assert!(matches!(
        r[..],
        [OptionReplyBody::Error {
            code: NBD_REP_ERR_POLICY,
            ..
        }]
    ));
    // Unknown export.
    let r = c
        .option(ClientOption::Go(InfoRequest {
            name: "nope".into(),
            requests: vec![],
        }))
        .await;
    assert!(matches!(
        r[..],
        [OptionReplyBody::Error {
            code: NBD_REP_ERR_UNKNOWN,
            ..
        }]
    ));
    // Oversized option data is drained and refused; the stream stays in sync.
    let big = 1 << 20;
    c.s.write_all(
        &OptionHeader {
            option: NBD_OPT_INFO,
            len: big,
        }
        .encode(),
    )
    .await
    .unwrap();
    c.s.write_all(&vec![0u8; big as usize]).await.unwrap();
    let r = c.reply().await;
    assert!(matches!(
        r.body,
        OptionReplyBody::Error {
            code: NBD_REP_ERR_TOO_BIG,
            ..
        }
    ));
    let (size, _) = c.go("vol", false).await;
    assert_eq!(size, SIZE);
    assert_eq!(c.write(0, b"hello").await, 0);
}

#[tokio::test]
async fn list_and_meta_contexts() {
    let (server, _) = setup();
    let mut c = Client::greet(&server).await;
    let r = c.option(ClientOption::List).await;
    let names: Vec<_> = r
        .iter()
        .filter_map(|b| match b {
            OptionReplyBody::Server { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["fast", "slow", "snap", "vol"]);
    // Meta contexts need structured replies first.
    let set = ClientOption::SetMetaContext(MetaContextRequest {
        export: "vol".into(),
        queries: vec![BASE_ALLOCATION.into()],
    });
    let r = c.option(set.clone()).await;
    assert!(matches!(
        r[..],
        [OptionReplyBody::Error {
            code: NBD_REP_ERR_INVALID,
            ..
        }]
    ));
    c.structured().await;
    let r = c
        .option(ClientOption::ListMetaContext(MetaContextRequest {
            export: "vol".into(),
            queries: vec![],
        }))
        .await;
    assert_eq!(
        r,
        vec![
            OptionReplyBody::MetaContext {
                id: 0,
                name: BASE_ALLOCATION.into()
            },
            OptionReplyBody::Ack
        ]
    );
    // Unknown namespaces are ignored; "base:" selects nothing in SET.
    let r = c
        .option(ClientOption::SetMetaContext(MetaContextRequest {
            export: "vol".into(),
            queries: vec!["x-foo:bar".into(), "base:".into()],
        }))
        .await;
    assert_eq!(r, vec![OptionReplyBody::Ack]);
    let r = c.option(set).await;
    assert_eq!(
        r,
        vec![
            OptionReplyBody::MetaContext {
                id: BASE_ALLOCATION_ID,
                name: BASE_ALLOCATION.into()
            },
            OptionReplyBody::Ack
        ]
    );
    // Contexts chosen for "vol" do not apply to "snap": block status is refused there.
    c.go("snap", true).await;
    assert_eq!(
        c.call(Command::BlockStatus, 0, 0, 4096, &[]).await.0,
        NBD_EINVAL
    );
}

#[tokio::test]
async fn simple_replies_read_write_and_errors() {
    let (server, reg) = setup();
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    let data: Vec<u8> = (0..70144u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(c.write(1024, &data).await, 0);
    let (err, got) = c.read(1024, 70144).await;
    assert_eq!(err, 0);
    assert_eq!(got, data);
    assert_eq!(reg.get("vol").unwrap().snapshot(1024, 70144), data);
    // Out of range: read EINVAL, write ENOSPC (payload still consumed).
    assert_eq!(c.read(SIZE - 512, 1024).await.0, NBD_EINVAL);
    assert_eq!(c.write(SIZE - 512, &[1; 1024]).await, NBD_ENOSPC);
    assert_eq!(c.read(u64::MAX - 10, 512).await.0, NBD_EINVAL);
    // Unknown command and invalid flags.
    assert_eq!(
        c.call(Command::Unknown(42), 0, 0, 0, &[]).await.0,
        NBD_EINVAL
    );
    assert_eq!(
        c.call(Command::Read, NBD_CMD_FLAG_REQ_ONE, 0, 512, &[])
            .await
            .0,
        NBD_EINVAL
    );
    // DF is not valid without structured replies.
    assert_eq!(
        c.call(Command::Read, NBD_CMD_FLAG_DF, 0, 512, &[]).await.0,
        NBD_EINVAL
    );
    // Block status without a context.
    assert_eq!(
        c.call(Command::BlockStatus, 0, 0, 512, &[]).await.0,
        NBD_EINVAL
    );
    // Alignment is enforced because the client asked for block sizes.
    assert_eq!(c.write(100, &[1; 512]).await, NBD_EINVAL);
    // ...but a request ending exactly at the export end is fine.
    assert_eq!(c.read(SIZE - 512, 512).await.0, 0);
    // The connection is still healthy.
    assert_eq!(c.read(1000, 10).await.0, NBD_EINVAL);
    let mut expect = vec![0u8; 512];
    expect.extend_from_slice(&data[..512]);
    assert_eq!(c.read(512, 1024).await, (0, expect));
}

/// A connection made before the export grew serves the new range once a request reaches
/// into it (the kernel NBD client learns a new size over netlink, not by a handshake).
#[tokio::test]
async fn a_grown_export_serves_the_new_range_on_old_connections() {
    let (server, reg) = setup();
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    assert_eq!(c.write(SIZE, &[7; 4096]).await, NBD_ENOSPC);
    assert_eq!(c.read(SIZE, 4096).await.0, NBD_EINVAL);
    reg.get("vol").unwrap().grow(2 * SIZE);
    assert_eq!(c.write(SIZE, &[7; 4096]).await, 0);
    assert_eq!(c.read(SIZE, 4096).await, (0, vec![7; 4096]));
    // A request ending exactly at the new end passes the alignment tail rule.
    assert_eq!(c.read(2 * SIZE - 512, 512).await.0, 0);
    // Past the new end is still refused, and the connection stays healthy.
    assert_eq!(c.read(2 * SIZE - 512, 1024).await.0, NBD_EINVAL);
    assert_eq!(c.write(2 * SIZE, &[1; 512]).await, NBD_ENOSPC);
    assert_eq!(c.read(0, 512).await, (0, vec![0; 512]));
}

#[tokio::test]
async fn unaligned_requests_allowed_without_block_size_negotiation() {
    let (server, _) = setup();
    let mut c = Client::greet(&server).await;
    c.go("vol", false).await;
    assert_eq!(c.write(3, b"xyz").await, 0);
    assert_eq!(c.read(2, 5).await, (0, b"\0xyz\0".to_vec()));
}

#[tokio::test]
async fn oversized_requests_are_refused_without_dropping_the_connection() {
    let (server, _) = setup();
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    // Read > 32 MiB with simple replies: EINVAL, no payload.
    c.send(Command::Read, 0, 1, 0, MAX_PAYLOAD + 512).await;
    let (r, _) = c.simple(0).await;
    assert_eq!(r.error, NBD_EINVAL);
    // Write > 32 MiB: the payload is drained, then EINVAL.
    let len = MAX_PAYLOAD + 4096;
    c.send(Command::Write, 0, 2, 0, len).await;
    let (mut r, mut w) = tokio::io::split(c.s);
    let writer = tokio::spawn(async move {
        let chunk = vec![0u8; 1 << 20];
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        w
    });
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    r.read_exact(&mut h).await.unwrap();
    assert_eq!(SimpleReply::decode(&h).unwrap().error, NBD_EINVAL);
    let w = writer.await.unwrap();
    c.s = r.unsplit(w);
    assert_eq!(c.write(0, &[9; 512]).await, 0);
}

#[tokio::test]
async fn structured_sparse_reads_and_df() {
    let (server, _) = setup();
    let (mut c, _) = Client::connect_go(&server, "vol", true).await;
    assert_eq!(c.write(BLOCK, &[0xab; BLOCK as usize]).await, 0);
    let (err, chunks) = c.call(Command::Read, 0, 0, 3 * BLOCK as u32, &[]).await;
    assert_eq!(err, 0);
    assert_eq!(chunks.len(), 3, "{chunks:?}");
    assert_eq!(
        chunks[0],
        Chunk::OffsetHole {
            offset: 0,
            len: 4096
        }
    );
    assert!(
        matches!(&chunks[1], Chunk::OffsetData { offset: 4096, data } if data.len() == 4096 && data.iter().all(|b| *b == 0xab))
    );
    assert_eq!(
        chunks[2],
        Chunk::OffsetHole {
            offset: 8192,
            len: 4096
        }
    );
    // DF: one data chunk with the zeros explicit.
    let (err, chunks) = c
        .call(Command::Read, NBD_CMD_FLAG_DF, 0, 3 * BLOCK as u32, &[])
        .await;
    assert_eq!(err, 0);
    assert_eq!(chunks.len(), 1);
    assert_eq!(reassemble(0, 3 * 4096, &chunks)[4096..8192], [0xab; 4096]);
    // Zero-length read: a lone NONE chunk.
    let (err, chunks) = c.call(Command::Read, 0, 0, 0, &[]).await;
    assert_eq!((err, chunks), (0, vec![Chunk::None]));
    // Errors on reads are structured too.
    let (err, chunks) = c.call(Command::Read, 0, SIZE, 512, &[]).await;
    assert_eq!(err, NBD_EINVAL);
    assert!(matches!(chunks[..], [Chunk::Error { .. }]));
    // Over 32 MiB with structured replies: EOVERFLOW.
    assert_eq!(
        c.call(Command::Read, 0, 0, MAX_PAYLOAD + 512, &[]).await.0,
        NBD_EOVERFLOW
    );
}

#[tokio::test]
async fn block_status_and_zeroing_modes() {
    let (server, reg) = setup();
    let (mut c, _) = Client::connect_go(&server, "vol", true).await;
    assert_eq!(c.write(0, &[1; 4 * BLOCK as usize]).await, 0);
    // Block 0 punched, block 1 zeroed but kept allocated (NO_HOLE).
    assert_eq!(
        c.call(Command::WriteZeroes, 0, 0, BLOCK as u32, &[])
            .await
            .0,
        0
    );
    assert_eq!(
        c.call(
            Command::WriteZeroes,
            NBD_CMD_FLAG_NO_HOLE,
            BLOCK,
            BLOCK as u32,
            &[]
        )
        .await
        .0,
        0
    );
    let (err, chunks) = c
        .call(Command::BlockStatus, 0, 0, 8 * BLOCK as u32, &[])
        .await;
    assert_eq!(err, 0);
    let Chunk::BlockStatus {
        context_id,
        descriptors,
    } = &chunks[0]
    else {
        panic!("{chunks:?}")
    };
    assert_eq!(*context_id, BASE_ALLOCATION_ID);
    let expect = [
        (4096, NBD_STATE_HOLE | NBD_STATE_ZERO),
        (4096, NBD_STATE_ZERO),
        (8192, 0),
        (16384, NBD_STATE_HOLE | NBD_STATE_ZERO),
    ];
    let got: Vec<_> = descriptors.iter().map(|d| (d.length, d.flags)).collect();
    assert_eq!(got, expect);
    // REQ_ONE: one descriptor, no longer than asked.
    let (_, chunks) = c
        .call(
            Command::BlockStatus,
            NBD_CMD_FLAG_REQ_ONE,
            2 * BLOCK,
            1024,
            &[],
        )
        .await;
    assert!(
        matches!(&chunks[0], Chunk::BlockStatus { descriptors, .. } if descriptors == &vec![BlockDescriptor { length: 1024, flags: 0 }])
    );
    // FAST_ZERO with NO_HOLE: fails fast, contents untouched.
    let fz = NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE;
    assert_eq!(
        c.call(Command::WriteZeroes, fz, 2 * BLOCK, BLOCK as u32, &[])
            .await
            .0,
        NBD_ENOTSUP
    );
    assert_eq!(reg.get("vol").unwrap().snapshot(2 * BLOCK, 4), vec![1; 4]);
    // FAST_ZERO alone on a target whose punch is fast: done.
    assert_eq!(
        c.call(
            Command::WriteZeroes,
            NBD_CMD_FLAG_FAST_ZERO,
            2 * BLOCK,
            BLOCK as u32,
            &[]
        )
        .await
        .0,
        0
    );
    assert_eq!(reg.get("vol").unwrap().snapshot(2 * BLOCK, 4), vec![0; 4]);
    // Trim is a hint; write-zeroes beyond the end is ENOSPC.
    assert_eq!(
        c.call(Command::Trim, 0, 3 * BLOCK, BLOCK as u32, &[])
            .await
            .0,
        0
    );
    assert_eq!(
        c.call(Command::WriteZeroes, 0, SIZE, 512, &[]).await.0,
        NBD_ENOSPC
    );

    let (mut slow, _) = Client::connect_go(&server, "slow", true).await;
    assert_eq!(
        slow.call(
            Command::WriteZeroes,
            NBD_CMD_FLAG_FAST_ZERO,
            0,
            BLOCK as u32,
            &[]
        )
        .await
        .0,
        NBD_ENOTSUP
    );
    assert_eq!(
        slow.call(Command::WriteZeroes, 0, 0, BLOCK as u32, &[])
            .await
            .0,
        0
    );
}

#[tokio::test]
async fn fua_and_flush_reach_the_target() {
    let (server, reg) = setup();
    let vol = reg.get("vol").unwrap();
    let (mut a, _) = Client::connect_go(&server, "vol", false).await;
    assert_eq!(a.write(0, &[1; 512]).await, 0);
    assert_eq!(vol.flush_count(), 0);
    assert_eq!(
        a.call(Command::Write, NBD_CMD_FLAG_FUA, 0, 512, &[2; 512])
            .await
            .0,
        0
    );
    assert_eq!(vol.flush_count(), 1);
    assert_eq!(a.call(Command::Flush, 0, 0, 0, &[]).await.0, 0);
    assert_eq!(vol.flush_count(), 2);
    // Multi-conn: a second connection sees the first one's acknowledged writes.
    let (mut b, _) = Client::connect_go(&server, "vol", false).await;
    assert_eq!(b.read(0, 512).await.1, vec![2; 512]);
}

#[tokio::test]
async fn target_errors_map_to_nbd_errors() {
    let (server, reg) = setup();
    let (mut c, _) = Client::connect_go(&server, "vol", true).await;
    reg.get("vol")
        .unwrap()
        .fail_writes(Some(Errno(libc::EDQUOT)));
    let (err, chunks) = c.call(Command::Write, 0, 0, 512, &[1; 512]).await;
    assert_eq!(err, NBD_ENOSPC);
    assert!(matches!(&chunks[0], Chunk::Error { message, .. } if message.contains("write")));
    reg.get("vol")
        .unwrap()
        .fail_writes(Some(Errno(libc::EBADF)));
    assert_eq!(c.write(0, &[1; 512]).await, NBD_EIO);
}

#[tokio::test]
async fn pipelined_requests_are_all_answered() {
    let (server, _) = setup();
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    for i in 0..64u64 {
        c.send(Command::Write, 0, i, i * 512, 512).await;
        c.s.write_all(&[i as u8; 512]).await.unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let (r, _) = c.simple(0).await;
        assert_eq!(r.error, 0);
        seen.insert(r.cookie);
    }
    assert_eq!(seen.len(), 64);
    for i in 0..64u64 {
        c.send(Command::Read, 0, 1000 + i, i * 512, 512).await;
    }
    // Replies may come in any order; simple read replies carry no length, so map each
    // cookie back to its request.
    for _ in 0..64 {
        let (r, data) = c.simple(512).await;
        let i = r.cookie - 1000;
        assert_eq!(data, vec![i as u8; 512]);
    }
}

#[tokio::test]
async fn protocol_garbage_closes_only_that_connection() {
    let (server, _) = setup();
    // Bad option magic.
    let mut c = Client::greet(&server).await;
    c.s.write_all(&[0xff; 16]).await.unwrap();
    c.expect_eof().await;
    // Unknown client flags.
    let mut c = Client::connect(&server).await;
    let mut g = [0u8; GREETING_LEN];
    c.s.read_exact(&mut g).await.unwrap();
    c.s.write_all(&0x8000_0000u32.to_be_bytes()).await.unwrap();
    c.expect_eof().await;
    // Bad request magic during transmission.
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    c.s.write_all(&[0u8; REQUEST_LEN]).await.unwrap();
    c.expect_eof().await;
    // Disconnect mid-payload.
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    c.send(Command::Write, 0, 1, 0, 4096).await;
    c.s.write_all(&[1; 100]).await.unwrap();
    drop(c);
    // Abort is acknowledged.
    let mut c = Client::greet(&server).await;
    assert_eq!(
        c.option(ClientOption::Abort).await,
        vec![OptionReplyBody::Ack]
    );
    c.expect_eof().await;
    // The server still serves.
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    assert_eq!(c.write(0, &[3; 512]).await, 0);
    c.send(Command::Disc, 0, 0, 0, 0).await;
    c.expect_eof().await;
}

#[tokio::test]
async fn export_name_option_enters_transmission() {
    let (server, _) = setup();
    let mut c = Client::greet(&server).await;
    c.s.write_all(&ClientOption::ExportName("vol".into()).encode())
        .await
        .unwrap();
    let mut r = [0u8; EXPORT_NAME_REPLY_LEN];
    c.s.read_exact(&mut r).await.unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE);
    // No zeroes were negotiated, so the next bytes are a reply to our request.
    assert_eq!(c.write(1, b"ab").await, 0);
    // An unknown name with EXPORT_NAME ends the session.
    let mut c = Client::greet(&server).await;
    c.s.write_all(&ClientOption::ExportName("nope".into()).encode())
        .await
        .unwrap();
    c.expect_eof().await;
}

#[tokio::test]
async fn close_export_drains_flushes_and_disconnects() {
    let (server, reg) = setup();
    let vol = reg.get("vol").unwrap();
    let (mut a, _) = Client::connect_go(&server, "vol", false).await;
    let (mut b, _) = Client::connect_go(&server, "snap", false).await;
    assert_eq!(a.write(0, &[1; 512]).await, 0);
    assert_eq!(server.connection_count(Some("vol")), 1);
    reg.remove("vol");
    assert_eq!(server.close_export("vol").await, 1);
    assert_eq!(vol.flush_count(), 1, "graceful close flushes");
    a.expect_eof().await;
    assert_eq!(server.connection_count(Some("vol")), 0);
    // Other exports are untouched; the removed one cannot be opened again.
    assert_eq!(b.read(0, 512).await.0, 0);
    let mut c = Client::greet(&server).await;
    let r = c
        .option(ClientOption::Go(InfoRequest {
            name: "vol".into(),
            requests: vec![],
        }))
        .await;
    assert!(matches!(
        r[..],
        [OptionReplyBody::Error {
            code: NBD_REP_ERR_UNKNOWN,
            ..
        }]
    ));
}

#[tokio::test]
async fn qos_limits_requests_per_second() {
    let (server, reg) = setup();
    reg.get("vol").unwrap().set_qos(crate::qos::Qos {
        max_iops: 100,
        max_bandwidth_bytes: 0,
    });
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    let start = std::time::Instant::now();
    // Burst of 10 (100 ms at 100/s), then 30 more at 10 ms each.
    for i in 0..40u64 {
        c.send(Command::Read, 0, i, 0, 512).await;
    }
    for _ in 0..40 {
        assert_eq!(c.simple(512).await.0.error, 0);
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(280) && elapsed < Duration::from_millis(1000),
        "{elapsed:?}"
    );
    // Flush is not limited; unlimited again applies at once.
    reg.get("vol").unwrap().set_qos(crate::qos::Qos::UNLIMITED);
    let start = std::time::Instant::now();
    for i in 0..40u64 {
        c.send(Command::Read, 0, i, 0, 512).await;
    }
    for _ in 0..40 {
        c.simple(512).await;
    }
    assert!(start.elapsed() < Duration::from_millis(250));
}

#[test]
fn plan_read_merges_and_covers_the_request() {
    let e = |len, kind| Extent { len, kind };
    let segs = plan_read(
        10000,
        &[
            e(100, ExtentKind::Hole),
            e(100, ExtentKind::Zero),
            e(0, ExtentKind::Data),
            e(300, ExtentKind::Data),
            e(1 << 40, ExtentKind::Hole),
        ],
    );
    assert_eq!(
        segs,
        vec![
            Segment::Zero(0..200),
            Segment::Data(200..500),
            Segment::Zero(500..10000)
        ]
    );
    // Extents that stop short: the rest is data.
    assert_eq!(
        plan_read(100, &[e(10, ExtentKind::Hole)]),
        vec![Segment::Zero(0..10), Segment::Data(10..100)]
    );
    assert_eq!(plan_read(100, &[]), vec![Segment::Data(0..100)]);
}

#[test]
fn status_descriptors_clip_and_fall_back() {
    let e = |len, kind| Extent { len, kind };
    let d = status_descriptors(
        1000,
        &[e(600, ExtentKind::Hole), e(600, ExtentKind::Data)],
        false,
    );
    assert_eq!(
        d,
        vec![
            BlockDescriptor {
                length: 600,
                flags: 3
            },
            BlockDescriptor {
                length: 400,
                flags: 0
            }
        ]
    );
    assert_eq!(
        status_descriptors(1000, &[], true),
        vec![BlockDescriptor {
            length: 1000,
            flags: 0
        }]
    );
}

#[tokio::test]
async fn inline_target_path_serves_small_and_large_requests() {
    let (server, reg) = setup();
    let (mut c, _) = Client::connect_go(&server, "fast", true).await;
    // Small requests run inline, a 2 MiB one on the blocking pool; both must be right.
    assert_eq!(c.write(0, &[4; 4096]).await, 0);
    let big: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(FAST_SIZE - (2 << 20), &big).await, 0);
    assert_eq!(c.read(0, 4096).await, (0, vec![4; 4096]));
    assert_eq!(c.read(FAST_SIZE - (2 << 20), 2 << 20).await, (0, big));
    assert_eq!(
        c.call(Command::Write, NBD_CMD_FLAG_FUA, 4096, 512, &[1; 512])
            .await
            .0,
        0
    );
    assert_eq!(reg.get("fast").unwrap().flush_count(), 1);
}

/// A target that delegates to a [`MemExport`] but holds every flush until released, and
/// optionally serves reads through a [`FakeQueue`].
struct Gated {
    inner: Arc<MemExport>,
    open: Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
    flushes_started: Arc<std::sync::atomic::AtomicU64>,
    queue: bool,
}

impl Gated {
    fn release(&self) {
        *self.open.0.lock() = true;
        self.open.1.notify_all();
    }
}

impl ExportTarget for Gated {
    fn size(&self) -> Result<u64, Errno> {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.inner.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), Errno> {
        self.inner.write_zeroes(offset, len, mode)
    }
    fn punch_is_fast(&self) -> bool {
        true
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<(), Errno> {
        self.flushes_started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.0.lock();
        while !*open {
            self.open.1.wait(&mut open);
        }
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        self.inner.block_status(offset, len)
    }
    fn io_queue(&self) -> Option<Box<dyn IoQueue>> {
        self.queue.then(|| {
            Box::new(FakeQueue {
                inner: self.inner.clone(),
                started: Vec::new(),
                waker: None,
            }) as Box<dyn IoQueue>
        })
    }
}

/// Completes reads newest first, one per poll; declines reads at offset 0 (those take the
/// blocking path).
struct FakeQueue {
    inner: Arc<MemExport>,
    started: Vec<(u64, u64, IoBuf)>,
    waker: Option<std::task::Waker>,
}

impl IoQueue for FakeQueue {
    fn start(&mut self, tag: u64, offset: u64, buf: IoBuf) -> QueueStart {
        if offset == 0 {
            return QueueStart::Declined(buf);
        }
        self.started.push((tag, offset, buf));
        QueueStart::Started
    }
    fn submit(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
    fn in_flight(&self) -> usize {
        self.started.len()
    }
    fn poll_complete(
        &mut self,
        cx: &mut std::task::Context<'_>,
        out: &mut Vec<QueueDone>,
    ) -> std::task::Poll<()> {
        let Some((tag, offset, mut buf)) = self.started.pop() else {
            self.waker = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        };
        let result = self.inner.read(offset, &mut buf);
        out.push(QueueDone {
            tag,
            result,
            buf,
            zeros: Vec::new(),
        });
        std::task::Poll::Ready(())
    }
}

struct GatedRegistry(Arc<Gated>);

impl ExportRegistry for GatedRegistry {
    fn open(&self, _name: &str) -> Result<Arc<dyn ExportTarget>, OpenError> {
        Ok(self.0.clone())
    }
    fn list(&self) -> Vec<super::super::ExportListing> {
        Vec::new()
    }
}

fn gated(queue: bool) -> (Server, Arc<Gated>) {
    let target = Arc::new(Gated {
        inner: Arc::new(MemExport::new(SIZE)),
        open: Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new())),
        flushes_started: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        queue,
    });
    (Server::new(Arc::new(GatedRegistry(target.clone()))), target)
}

/// A flush stuck in the target does not hold back the replies of requests sent after it,
/// and its own reply comes once it completes, covering the writes acknowledged before it.
async fn slow_flush_does_not_block_other_replies(queue: bool) {
    let (server, target) = gated(queue);
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    // Acknowledged before the flush is sent.
    assert_eq!(c.write(4096, &[1u8; 4096]).await, 0);
    c.send(Command::Flush, 0, 99, 0, 0).await;
    while target
        .flushes_started
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Sent after the flush: writes and reads (some through the read queue, offset 0
    // declined by it) are all answered while the flush waits.
    for i in 0..16u64 {
        c.send(Command::Write, 0, 100 + i, (8 + i) * 4096, 4096)
            .await;
        c.s.write_all(&[i as u8; 4096]).await.unwrap();
    }
    for _ in 0..16 {
        let (r, _) = c.simple(0).await;
        assert_eq!(r.error, 0);
        assert_ne!(r.cookie, 99, "the flush is still running");
    }
    for i in 0..16u64 {
        c.send(Command::Read, 0, 200 + i, i * 4096, 4096).await;
    }
    for _ in 0..16 {
        let (r, data) = c.simple(4096).await;
        assert_ne!(r.cookie, 99, "the flush is still running");
        let i = r.cookie - 200;
        let want = match i {
            1 => 1u8,
            8.. => (i - 8) as u8,
            _ => 0,
        };
        assert_eq!(data, vec![want; 4096], "read {i}");
    }
    target.release();
    let (r, _) = c.simple(0).await;
    assert_eq!((r.cookie, r.error), (99, 0));
    assert_eq!(target.inner.flush_count(), 1);
    assert_eq!(target.inner.snapshot(4096, 4096), vec![1u8; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_flush_does_not_block_other_replies_blocking_reads() {
    slow_flush_does_not_block_other_replies(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_flush_does_not_block_other_replies_queued_reads() {
    slow_flush_does_not_block_other_replies(true).await;
}

/// Reads through a read queue are answered as they complete (here newest first), each
/// with its own data, also when a batch mixes queued and declined reads; a close waits
/// for reads in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_reads_are_answered_out_of_order_with_their_data() {
    let (server, target) = gated(true);
    target.release();
    let (mut c, _) = Client::connect_go(&server, "vol", true).await;
    for i in 0..32u64 {
        assert_eq!(c.write(i * 4096, &[i as u8 + 1; 4096]).await, 0);
    }
    let mut wire = Vec::new();
    for i in 0..32u64 {
        wire.extend_from_slice(
            &Request {
                flags: 0,
                command: Command::Read,
                cookie: 500 + i,
                offset: i * 4096,
                length: 4096,
            }
            .encode(),
        );
    }
    c.s.write_all(&wire).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..32 {
        let (cookie, error, chunks) = c.any_reply(4096).await;
        assert_eq!(error, 0);
        let i = cookie - 500;
        assert_eq!(reassemble(i * 4096, 4096, &chunks), vec![i as u8 + 1; 4096]);
        seen.insert(cookie);
    }
    assert_eq!(seen.len(), 32);
    c.send(Command::Disc, 0, 0, 0, 0).await;
    c.expect_eof().await;
}

/// A target whose flushes wait at a gate, counting how many run at once.
struct Throttled {
    inner: MemExport,
    gate: tokio::sync::Semaphore,
    running: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl ExportTarget for Throttled {
    fn size(&self) -> Result<u64, Errno> {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.inner.read(offset, buf)
    }
    fn flush(&self) -> Result<(), Errno> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.running.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        // Blocking pool thread: waiting here is what the target is allowed to do.
        while self.gate.try_acquire().is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.running.fetch_sub(1, SeqCst);
        self.inner.flush()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.inner.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), Errno> {
        self.inner.write_zeroes(offset, len, mode)
    }
    fn punch_is_fast(&self) -> bool {
        true
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.inner.discard(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        self.inner.block_status(offset, len)
    }
}

struct ThrottledRegistry(Arc<Throttled>);

impl ExportRegistry for ThrottledRegistry {
    fn open(&self, _name: &str) -> Result<Arc<dyn ExportTarget>, OpenError> {
        Ok(self.0.clone())
    }
    fn list(&self) -> Vec<super::super::ExportListing> {
        Vec::new()
    }
}

/// Requests beyond `max_requests_in_flight` are not read until earlier ones are
/// answered: with flushes held in the target (each one its own blocking call), no more
/// than the limit ever run at once, and every request is answered once they may go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded() {
    use std::sync::atomic::Ordering::SeqCst;
    let target = Arc::new(Throttled {
        inner: MemExport::new(SIZE),
        gate: tokio::sync::Semaphore::new(0),
        running: Default::default(),
        most: Default::default(),
    });
    let config = ServerConfig {
        max_requests_in_flight: 3,
        ..ServerConfig::default()
    };
    let server = Server::with_config(Arc::new(ThrottledRegistry(target.clone())), config);
    let (mut c, _) = Client::connect_go(&server, "vol", false).await;
    let mut wire = Vec::new();
    for i in 0..40u64 {
        wire.extend_from_slice(
            &Request {
                flags: 0,
                command: Command::Flush,
                cookie: i,
                offset: 0,
                length: 0,
            }
            .encode(),
        );
    }
    c.s.write_all(&wire).await.unwrap();
    while target.running.load(SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    target.gate.add_permits(1000);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (r, _) = c.simple(0).await;
        assert_eq!(r.error, 0);
        seen.insert(r.cookie);
    }
    assert_eq!(seen.len(), 40);
    let most = target.most.load(SeqCst);
    assert!(most <= 3, "{most} flushes ran at once");
}
