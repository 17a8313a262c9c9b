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

use csi_shim::proxy::{self, wire, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream as TokioStream};

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const NBD_OPT_GO: u32 = 7;
const NBD_OPT_INFO: u32 = 6;
const NBD_REP_ACK: u32 = 1;
const NBD_REP_INFO: u32 = 3;
const NBD_REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const EXPORT_SIZE: u64 = 1 << 20;
// HAS_FLAGS | SEND_FLUSH
const TRANSMISSION_FLAGS: u16 = 1 | 4;

async fn option_reply(s: &mut TokioStream, option: u32, kind: u32, data: &[u8]) {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out).await.expect("option reply");
}

fn simple_reply(cookie: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out
}

/// One upstream connection: fixed-newstyle handshake, then transmission where the first
/// write is answered at once and the next write's reply is held until a flush arrives,
/// then both replies go out in one write (the write's first).
async fn scripted_upstream(mut s: TokioStream) {
    s.write_all(b"NBDMAGIC").await.expect("magic");
    s.write_all(&IHAVEOPT.to_be_bytes())
        .await
        .expect("ihaveopt");
    s.write_all(&3u16.to_be_bytes())
        .await
        .expect("handshake flags");
    let _client_flags = s.read_u32().await.expect("client flags");
    loop {
        let magic = s.read_u64().await.expect("option magic");
        assert_eq!(magic, IHAVEOPT);
        let option = s.read_u32().await.expect("option");
        let len = s.read_u32().await.expect("option length");
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.expect("option data");
        if option == NBD_OPT_GO || option == NBD_OPT_INFO {
            let mut info = Vec::new();
            info.extend_from_slice(&0u16.to_be_bytes()); // NBD_INFO_EXPORT
            info.extend_from_slice(&EXPORT_SIZE.to_be_bytes());
            info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
            option_reply(&mut s, option, NBD_REP_INFO, &info).await;
            option_reply(&mut s, option, NBD_REP_ACK, &[]).await;
            if option == NBD_OPT_GO {
                break;
            }
        } else {
            option_reply(&mut s, option, NBD_REP_ERR_UNSUP, &[]).await;
        }
    }
    let mut writes = 0;
    let mut held_write: Option<u64> = None;
    let mut held_flush: Option<u64> = None;
    loop {
        let mut header = [0u8; 28];
        if s.read_exact(&mut header).await.is_err() {
            return;
        }
        assert_eq!(
            u32::from_be_bytes(header[0..4].try_into().unwrap()),
            REQUEST_MAGIC
        );
        let kind = u16::from_be_bytes(header[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[24..28].try_into().unwrap());
        match kind {
            CMD_WRITE => {
                let mut payload = vec![0u8; len as usize];
                s.read_exact(&mut payload).await.expect("write payload");
                writes += 1;
                if writes == 2 {
                    held_write = Some(cookie);
                } else {
                    s.write_all(&simple_reply(cookie)).await.expect("reply");
                }
            }
            CMD_FLUSH if held_flush.is_none() && writes < 3 => held_flush = Some(cookie),
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
    let mut out = Vec::with_capacity(28 + payload.len());
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&CMD_WRITE.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn read_reply(s: &mut UnixStream) -> std::io::Result<(u32, u64)> {
    let mut r = [0u8; 16];
    s.read_exact(&mut r)?;
    assert_eq!(
        u32::from_be_bytes(r[0..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    Ok((
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    ))
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
