//! Regression test for csi-nbd-proxy's reply path, against a scripted upstream.
//!
//! When the replay journal passes its limit the proxy sends a flush of its own. If that
//! flush's reply arrived in the same read as a client's reply, the client's reply used to
//! stay in the proxy's write buffer: a client that waits for it before sending more (one
//! request at a time, as a FUSE server does) hung for good. The scripted upstream here
//! forces exactly that arrival order, deterministically.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use csi_shim::proxy::wire::{
    self, ClientOption, Command, Greeting, Info, OptionHeader, OptionReply, OptionReplyBody,
    Request, SimpleReply, CLIENT_FLAGS_LEN, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES, NBD_FLAG_SEND_FLUSH, NBD_OPT_GO, NBD_REP_ERR_UNSUP, OPTION_HEADER_LEN,
    REQUEST_LEN, SIMPLE_REPLY_LEN,
};
use csi_shim::proxy::{self, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream as TokioStream};

const EXPORT_SIZE: u64 = 1 << 20;
const TRANSMISSION_FLAGS: u16 = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH;

async fn read_n(s: &mut TokioStream, n: usize, what: &str) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await.expect(what);
    b
}

fn simple_reply(cookie: u64) -> Vec<u8> {
    SimpleReply { error: 0, cookie }.encode().to_vec()
}

/// One upstream connection: fixed-newstyle handshake, then transmission where the first
/// write is answered at once and the next write's reply is held until a flush arrives,
/// then both replies go out in one write (the write's first).
async fn scripted_upstream(mut s: TokioStream) {
    let greeting = Greeting {
        handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
    };
    s.write_all(&greeting.encode()).await.expect("greeting");
    read_n(&mut s, CLIENT_FLAGS_LEN, "client flags").await;
    loop {
        let header = OptionHeader::decode(&read_n(&mut s, OPTION_HEADER_LEN, "option").await)
            .expect("option header");
        let data = read_n(&mut s, header.len as usize, "option data").await;
        let option = ClientOption::decode(header.option, &data).expect("option data");
        let reply = |body| OptionReply::new(header.option, body).encode();
        if let ClientOption::Go(_) | ClientOption::Info(_) = option {
            let info = Info::Export {
                size: EXPORT_SIZE,
                flags: TRANSMISSION_FLAGS,
            };
            s.write_all(&reply(OptionReplyBody::Info(info)))
                .await
                .expect("info");
            s.write_all(&reply(OptionReplyBody::Ack))
                .await
                .expect("ack");
            if header.option == NBD_OPT_GO {
                break;
            }
        } else {
            let unsup = OptionReply::error(header.option, NBD_REP_ERR_UNSUP, "");
            s.write_all(&unsup.encode()).await.expect("unsup");
        }
    }
    let mut writes = 0;
    let mut held_write: Option<u64> = None;
    let mut held_flush: Option<u64> = None;
    loop {
        let mut header = [0u8; REQUEST_LEN];
        if s.read_exact(&mut header).await.is_err() {
            return;
        }
        let req = Request::decode(&header).expect("request");
        let cookie = req.cookie;
        match req.command {
            Command::Write => {
                read_n(&mut s, req.length as usize, "write payload").await;
                writes += 1;
                if writes == 2 {
                    held_write = Some(cookie);
                } else {
                    s.write_all(&simple_reply(cookie)).await.expect("reply");
                }
            }
            Command::Flush if held_flush.is_none() && writes < 3 => held_flush = Some(cookie),
            _ => s.write_all(&simple_reply(cookie)).await.expect("reply"),
        }
        if let (Some(w), Some(f)) = (held_write, held_flush) {
            let mut both = simple_reply(w);
            both.extend_from_slice(&simple_reply(f));
            s.write_all(&both).await.expect("both replies");
            held_write = None;
            held_flush = Some(u64::MAX); // answered: later flushes go straight through
            writes = 3;
        }
    }
}

fn write_request(cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Request {
        flags: 0,
        command: Command::Write,
        cookie,
        offset,
        length: payload.len() as u32,
    }
    .encode()
    .to_vec();
    out.extend_from_slice(payload);
    out
}

fn read_reply(s: &mut UnixStream) -> std::io::Result<(u32, u64)> {
    let mut r = [0u8; SIMPLE_REPLY_LEN];
    s.read_exact(&mut r)?;
    let reply = SimpleReply::decode(&r).expect("simple reply");
    Ok((reply.error, reply.cookie))
}

#[test]
fn a_client_reply_ahead_of_an_internal_flush_reply_is_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream_path = dir.path().join("upstream.sock");
    let listen_path = dir.path().join("proxy.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let upstream = {
        let _guard = rt.enter();
        UnixListener::bind(&upstream_path).expect("bind upstream")
    };
    rt.spawn(async move {
        while let Ok((s, _)) = upstream.accept().await {
            tokio::spawn(scripted_upstream(s));
        }
    });
    let cfg = Config {
        listen: listen_path.clone(),
        upstream_socket: upstream_path,
        export: "x".into(),
        reconnect_timeout: Duration::from_secs(5),
        journal_limit: 4096,
        exit_after_disconnect: false,
    };
    let shared = proxy::Shared::new(cfg);
    let listener = {
        let _guard = rt.enter();
        proxy::bind(&listen_path).expect("bind proxy")
    };
    rt.spawn(proxy::serve(
        Arc::clone(&shared),
        listener,
        std::future::pending(),
    ));

    let mut client = UnixStream::connect(&listen_path).expect("connect to the proxy");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let info = wire::client_handshake(&mut client, "x", false).expect("handshake");
    assert_eq!(info.size, EXPORT_SIZE);
    // 8 KiB acknowledged and unflushed: past the 4 KiB limit, so the proxy flushes.
    client
        .write_all(&write_request(1, 0, &[7u8; 8192]))
        .expect("send write 1");
    assert_eq!(read_reply(&mut client).expect("reply 1"), (0, 1));
    // Its reply comes in one read together with the internal flush's reply.
    client
        .write_all(&write_request(2, 8192, &[8u8; 4096]))
        .expect("send write 2");
    let reply = read_reply(&mut client)
        .expect("the second write's reply must arrive, not wait behind the internal flush");
    assert_eq!(reply, (0, 2));
    drop(rt);
}
