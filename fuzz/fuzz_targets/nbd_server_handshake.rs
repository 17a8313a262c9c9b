//! The server side of the handshake (`nbd_wire::server`, as csi-nbd-proxy drives it) fed
//! arbitrary client bytes: client flags, option headers, option data. It must never panic
//! nor ask for more than its option limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_wire::codec::{ClientOption, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES};
use nbd_wire::server::{ServerHandshake, ServerStep};

const MAX_OPTION: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    let mut hs = ServerHandshake::new(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, MAX_OPTION);
    let mut input = data;
    loop {
        let want = hs.wants();
        assert!(want <= MAX_OPTION as usize);
        if input.len() < want {
            // The server would wait for more; a short message must fail cleanly too.
            let _ = hs.clone().feed(input);
            return;
        }
        let (now, later) = input.split_at(want);
        input = later;
        match hs.feed(now) {
            Ok(ServerStep::Option(ClientOption::ExportName(_))) => {
                let _ = hs.export_name_reply(1 << 20, 1);
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
});
