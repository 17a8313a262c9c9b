//! The client side of the handshake (`nbd_wire::client`, as csi-shim's attachers and
//! csi-nbd-proxy's upstream connections drive it) fed arbitrary server bytes: greeting and
//! option replies. It must never panic nor ask for more than the reply limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_wire::client::{ClientHandshake, ClientStep, MAX_OPTION_REPLY_LEN};

fuzz_target!(|data: &[u8]| {
    let want_block_size = data.first().is_some_and(|b| b & 1 == 1);
    let mut hs = ClientHandshake::new("export", want_block_size);
    let mut input = data.get(1..).unwrap_or_default();
    loop {
        let want = hs.wants();
        assert!(want <= MAX_OPTION_REPLY_LEN as usize);
        if input.len() < want {
            let _ = hs.clone().feed(input);
            return;
        }
        let (now, later) = input.split_at(want);
        input = later;
        match hs.feed(now) {
            Ok(ClientStep::Ready(info)) => {
                assert!(want_block_size || info.block_size.is_none());
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
});
