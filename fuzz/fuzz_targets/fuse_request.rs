//! Fuzzes the FUSE request path of `csi-fuse-nbd`: fuser's decoding of each request, its
//! dispatch, `csi_shim::fuse::ExportFile`'s handling (offsets, sizes, ranges, modes) and
//! fuser's replies, on a 64 KiB disk in memory.
//!
//! fuser has no public decoder to call, so the target drives the real session the way
//! the kernel does: `csi_shim::fuse::peer::replay` sends each request over a
//! `SOCK_SEQPACKET` socket pair (message boundaries as on `/dev/fuse`) to a
//! `fuser::Session` made with `Session::from_fd`, after the INIT handshake, and reads the
//! replies as they come. A panic anywhere (the session's threads included) aborts: a crash.
//!
//! Input: a sequence of requests, each `[len: u16 LE][opcode: u8][nodeid: u8][body]`
//! (`len` counts what follows it; the last request takes what is left). The header's
//! length field, and the length fields fuser trusts the kernel to set (a WRITE's size, a
//! SETXATTR's value size, an IOCTL's in_size), are set as the kernel sets them
//! (`peer::frame_like_the_kernel`): every other byte, the whole body included, is the
//! fuzzer's. The session ends at the end of the input (fuser stops with `InvalidData` on
//! the zero-byte read that closing makes), at a FUSE_DESTROY, or at an undecodable
//! request; any other end is a failure.
//!
//! Run (from the repository root, on the stable toolchain):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none fuse_request -- -max_total_time=60`

#![no_main]

use std::io;

use csi_shim::fuse::{peer, ExportFile, MemoryExport};
use libfuzzer_sys::fuzz_target;

/// Splits the input into requests (see the module docs).
fn requests(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut unique = 2u64; // 1 was the INIT
    while data.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (record, next) = rest.split_at(len.min(rest.len()));
        data = next;
        let [opcode, nodeid, body @ ..] = record else {
            continue;
        };
        out.push(peer::request(
            u32::from(*opcode),
            unique,
            u64::from(*nodeid),
            body,
        ));
        unique += 1;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let file = ExportFile::new(MemoryExport::new(64 << 10));
    match peer::replay(file, requests(data)) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::InvalidData => {}
        Err(err) => panic!("the FUSE session failed: {err}"),
    }
});
