//! The file system driven through fuser's real request path ([`super::peer`]), on a disk
//! in memory.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fuser::Errno;

use super::export::Command;
use super::peer::{opcode, request, KernelPeer, Reply, FILE, HEADER_LEN, ROOT};
use super::{Export, ExportFile, MemoryExport, FLUSH_EVERY, MAX_IO};

const MIB: usize = 1 << 20;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// `struct fuse_read_in` (also READDIR's argument).
fn read_in(offset: u64, size: u32) -> Vec<u8> {
    let mut b = vec![0u8; 40];
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..20].copy_from_slice(&size.to_le_bytes());
    b
}

/// `struct fuse_write_in` and the data.
fn write_in(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 40];
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// `struct fuse_fallocate_in`.
fn fallocate_in(offset: u64, length: u64, mode: i32) -> Vec<u8> {
    let mut b = vec![0u8; 32];
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..24].copy_from_slice(&length.to_le_bytes());
    b[24..28].copy_from_slice(&mode.to_le_bytes());
    b
}

/// `struct fuse_setattr_in` changing the size only.
fn setattr_size(size: u64) -> Vec<u8> {
    const FATTR_SIZE: u32 = 1 << 3;
    let mut b = vec![0u8; 88];
    b[0..4].copy_from_slice(&FATTR_SIZE.to_le_bytes());
    b[16..24].copy_from_slice(&size.to_le_bytes());
    b
}

/// The size in a GETATTR or SETATTR reply (`fuse_attr_out`: 16 bytes, then `fuse_attr`).
fn attr_size(reply: &Reply) -> u64 {
    u64_at(&reply.body, 24)
}

fn ok(reply: io::Result<Reply>) -> Reply {
    let reply = reply.expect("request answered");
    assert_eq!(reply.error, 0, "request failed: {reply:?}");
    reply
}

fn errno(reply: io::Result<Reply>) -> i32 {
    -reply.expect("request answered").error
}

#[test]
fn the_file_serves_the_export() {
    let export = MemoryExport::new(MIB);
    let disk = export.disk();
    let mut peer = KernelPeer::start(ExportFile::new(export)).unwrap();

    // The name, never-cached attributes, direct I/O.
    let entry = ok(peer.call(opcode::LOOKUP, ROOT, b"nbd\0"));
    assert_eq!(u64_at(&entry.body, 0), FILE, "node id");
    assert_eq!(u64_at(&entry.body, 24), 0, "attribute TTL");
    assert_eq!(u64_at(&entry.body, 48), MIB as u64, "size");
    assert_eq!(
        errno(peer.call(opcode::LOOKUP, ROOT, b"other\0")),
        libc::ENOENT
    );
    let root = ok(peer.call(opcode::GETATTR, ROOT, &[0; 16]));
    assert_eq!(u32_at(&root.body, 76) & libc::S_IFMT, libc::S_IFDIR);
    let file = ok(peer.call(opcode::GETATTR, FILE, &[0; 16]));
    assert_eq!(u32_at(&file.body, 76), libc::S_IFREG | 0o600);
    assert_eq!(attr_size(&file), MIB as u64);
    assert_eq!(
        errno(peer.call(opcode::GETATTR, 99, &[0; 16])),
        libc::ENOENT
    );
    let open = ok(peer.call(opcode::OPEN, FILE, &[0; 8]));
    assert_eq!(u32_at(&open.body, 8) & 1, 1, "FOPEN_DIRECT_IO");

    // Writes land on the disk, reads come from it; short at the end, refused past it.
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let written = ok(peer.call(opcode::WRITE, FILE, &write_in(4096, &data)));
    assert_eq!(u32_at(&written.body, 0), 8192);
    assert_eq!(&disk.lock()[4096..4096 + 8192], &data[..]);
    assert_eq!(
        ok(peer.call(opcode::READ, FILE, &read_in(4096, 8192))).body,
        data
    );
    let tail = ok(peer.call(opcode::READ, FILE, &read_in(MIB as u64 - 100, 4096)));
    assert_eq!(tail.body.len(), 100);
    assert!(
        ok(peer.call(opcode::READ, FILE, &read_in(MIB as u64 + 4096, 4096)))
            .body
            .is_empty()
    );
    // An offset past loff_t's range (the kernel never sends one) is refused by fuser.
    assert_eq!(
        errno(peer.call(opcode::READ, FILE, &read_in(u64::MAX, 4096))),
        libc::EINVAL
    );
    assert_eq!(
        errno(peer.call(opcode::WRITE, FILE, &write_in(MIB as u64 - 4096, &data))),
        libc::ENOSPC
    );
    assert_eq!(
        errno(peer.call(opcode::WRITE, FILE, &write_in(u64::MAX - 10, &data))),
        libc::EINVAL
    );
    assert_eq!(
        errno(peer.call(opcode::READ, FILE, &read_in(0, MAX_IO + 1))),
        libc::EINVAL
    );
    assert_eq!(
        errno(peer.call(opcode::READ, ROOT, &read_in(0, 16))),
        libc::EBADF
    );
    ok(peer.call(opcode::FSYNC, FILE, &[0; 16]));

    // Discard and zeroing become NBD commands; plain allocation is not supported.
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    ok(peer.call(
        opcode::FALLOCATE,
        FILE,
        &fallocate_in(4096, 4096, libc::FALLOC_FL_PUNCH_HOLE | keep),
    ));
    assert!(disk.lock()[4096..8192].iter().all(|b| *b == 0));
    ok(peer.call(
        opcode::FALLOCATE,
        FILE,
        &fallocate_in(8192, 4096, libc::FALLOC_FL_ZERO_RANGE | keep),
    ));
    assert!(disk.lock()[4096..12288].iter().all(|b| *b == 0));
    assert_eq!(
        errno(peer.call(opcode::FALLOCATE, FILE, &fallocate_in(0, 4096, 0))),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        errno(peer.call(
            opcode::FALLOCATE,
            FILE,
            &fallocate_in(u64::MAX, 2, libc::FALLOC_FL_PUNCH_HOLE | keep)
        )),
        libc::EINVAL
    );

    // The directory lists ".", ".." and "nbd", from any offset.
    let listing = ok(peer.call(opcode::READDIR, ROOT, &read_in(0, 4096)));
    let names = dirent_names(&listing.body);
    assert_eq!(names, [".", "..", "nbd"]);
    let rest = ok(peer.call(opcode::READDIR, ROOT, &read_in(2, 4096)));
    assert_eq!(dirent_names(&rest.body), ["nbd"]);
    assert!(ok(peer.call(opcode::READDIR, ROOT, &read_in(3, 4096)))
        .body
        .is_empty());
    ok(peer.call(opcode::STATFS, ROOT, &[]));

    // A grown export shows at the next stat; truncation to another size is refused.
    disk.lock().resize(2 * MIB, 0);
    let grown = ok(peer.call(opcode::GETATTR, FILE, &[0; 16]));
    assert_eq!(attr_size(&grown), 2 * MIB as u64);
    ok(peer.call(
        opcode::WRITE,
        FILE,
        &write_in(2 * MIB as u64 - 4096, &data[..4096]),
    ));
    assert_eq!(
        errno(peer.call(opcode::SETATTR, FILE, &setattr_size(0))),
        libc::EPERM
    );
    let same = ok(peer.call(opcode::SETATTR, FILE, &setattr_size(2 * MIB as u64)));
    assert_eq!(attr_size(&same), 2 * MIB as u64);

    // Unmounting ends the session cleanly.
    ok(peer.call(opcode::DESTROY, ROOT, &[]));
    peer.finish()
        .expect("the session ends without an error after DESTROY");
}

/// The names in a READDIR reply (`struct fuse_dirent`s, 8-byte aligned).
fn dirent_names(mut body: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    while body.len() >= 24 {
        let len = u32_at(body, 16) as usize;
        names.push(String::from_utf8_lossy(&body[24..24 + len]).into_owned());
        body = &body[(24 + len).div_ceil(8) * 8..];
    }
    names
}

/// Counts the flushes reaching a [`MemoryExport`].
#[derive(Debug)]
struct CountingExport {
    inner: MemoryExport,
    flushes: Arc<AtomicUsize>,
}

impl Export for CountingExport {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn flags(&self) -> u16 {
        self.inner.flags()
    }
    fn refresh_size(&mut self) {
        self.inner.refresh_size()
    }
    fn run(&mut self, command: Command<'_>) -> Result<(), Errno> {
        if matches!(command, Command::Flush) {
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.run(command)
    }
}

#[test]
fn writes_are_flushed_every_flush_every_bytes() {
    let flushes = Arc::new(AtomicUsize::new(0));
    let export = CountingExport {
        inner: MemoryExport::new(FLUSH_EVERY as usize),
        flushes: Arc::clone(&flushes),
    };
    let mut peer = KernelPeer::start(ExportFile::new(export)).unwrap();
    // Smaller than the kernel's writes: a socket pair's messages stay under its buffer.
    const CHUNK: u64 = 64 << 10;
    let chunk = vec![7u8; CHUNK as usize];
    for i in 0..FLUSH_EVERY / CHUNK {
        assert_eq!(
            flushes.load(Ordering::SeqCst),
            0,
            "flushed early, before write {i}"
        );
        ok(peer.call(opcode::WRITE, FILE, &write_in(i * CHUNK, &chunk)));
    }
    assert_eq!(flushes.load(Ordering::SeqCst), 1);
    // FSYNC flushes and restarts the count.
    ok(peer.call(opcode::FSYNC, FILE, &[0; 16]));
    assert_eq!(flushes.load(Ordering::SeqCst), 2);
    ok(peer.call(opcode::WRITE, FILE, &write_in(0, &chunk)));
    assert_eq!(flushes.load(Ordering::SeqCst), 2);
    // An export without NBD_FLAG_SEND_FLUSH gets no flush at all.
    let none = Arc::new(AtomicUsize::new(0));
    let export = CountingExport {
        inner: MemoryExport::new(MIB).with_flags(0),
        flushes: Arc::clone(&none),
    };
    let mut peer = KernelPeer::start(ExportFile::new(export)).unwrap();
    ok(peer.call(opcode::FSYNC, FILE, &[0; 16]));
    assert_eq!(
        errno(peer.call(
            opcode::FALLOCATE,
            FILE,
            &fallocate_in(
                0,
                4096,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            )
        )),
        libc::EOPNOTSUPP,
        "discard without NBD_FLAG_SEND_TRIM"
    );
    assert_eq!(none.load(Ordering::SeqCst), 0);
}

/// The hand-written decoder this replaced read fixed offsets of every request body and
/// panicked on a short one. Every truncation of every request the file system answers
/// now gets an error reply, the session keeps serving, and a message too short for a
/// header, or shorter than its header says, ends the session with an error, not a panic.
#[test]
fn short_and_malformed_requests_get_errors_not_panics() {
    let export = MemoryExport::new(MIB);
    let mut peer = KernelPeer::start(ExportFile::new(export)).unwrap();
    let requests: [(u32, u64, Vec<u8>); 15] = [
        (opcode::LOOKUP, ROOT, b"nbd\0".to_vec()),
        (opcode::FORGET, FILE, vec![0; 8]),
        (opcode::GETATTR, FILE, vec![0; 16]),
        (opcode::SETATTR, FILE, setattr_size(MIB as u64)),
        (opcode::OPEN, FILE, vec![0; 8]),
        (opcode::READ, FILE, read_in(0, 4096)),
        (opcode::WRITE, FILE, write_in(0, &[1; 512])),
        (opcode::RELEASE, FILE, vec![0; 24]),
        (opcode::FSYNC, FILE, vec![0; 16]),
        (opcode::FLUSH, FILE, vec![0; 24]),
        (opcode::OPENDIR, ROOT, vec![0; 8]),
        (opcode::READDIR, ROOT, read_in(0, 4096)),
        (opcode::RELEASEDIR, ROOT, vec![0; 24]),
        (opcode::ACCESS, FILE, vec![0; 8]),
        (
            opcode::FALLOCATE,
            FILE,
            fallocate_in(
                0,
                4096,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
        ),
    ];
    for (op, node, body) in &requests {
        // The arguments' fixed part: a WRITE's data and a LOOKUP's name may be shorter.
        let fixed = if *op == opcode::WRITE { 40 } else { body.len() };
        for len in 0..fixed {
            let reply = peer
                .call(*op, *node, &body[..len])
                .unwrap_or_else(|e| panic!("opcode {op} with {len} body bytes: {e}"));
            assert!(
                reply.error < 0,
                "opcode {op} with {len} of {fixed} body bytes was served: {reply:?}"
            );
        }
    }
    // Still serving.
    let file = ok(peer.call(opcode::GETATTR, FILE, &[0; 16]));
    assert_eq!(attr_size(&file), MIB as u64);
    // A header that claims more bytes than came: rejected, the session ends.
    let mut lying = request(opcode::GETATTR, 9999, FILE, &[0; 16]);
    lying[0..4].copy_from_slice(&200u32.to_le_bytes());
    peer.send(&lying).unwrap();
    let end = peer
        .finish()
        .expect_err("the session ends on an undecodable request");
    assert_eq!(end.kind(), io::ErrorKind::InvalidData, "{end}");

    // Shorter than a header.
    let peer = KernelPeer::start(ExportFile::new(MemoryExport::new(MIB))).unwrap();
    peer.send(&request(opcode::GETATTR, 5, FILE, &[])[..HEADER_LEN - 1])
        .unwrap();
    let end = peer
        .finish()
        .expect_err("the session ends on a short message");
    assert_eq!(end.kind(), io::ErrorKind::InvalidData, "{end}");
}

#[test]
fn kernel_framing_sets_only_length_fields() {
    let mut write = request(opcode::WRITE, 3, FILE, &write_in(64, &[9; 100]));
    write[HEADER_LEN + 16..HEADER_LEN + 20].copy_from_slice(&5u32.to_le_bytes());
    write[0..4].copy_from_slice(&1u32.to_le_bytes());
    let before = write.clone();
    super::peer::frame_like_the_kernel(&mut write);
    assert_eq!(u32_at(&write, 0) as usize, write.len());
    assert_eq!(u32_at(&write, HEADER_LEN + 16), 100);
    let changed: Vec<usize> = (0..write.len())
        .filter(|i| write[*i] != before[*i])
        .collect();
    assert!(changed
        .iter()
        .all(|i| *i < 4 || (HEADER_LEN + 16..HEADER_LEN + 20).contains(i)));
    // Too short for a header: only `len`, as far as it fits.
    let mut short = vec![0xffu8; 6];
    super::peer::frame_like_the_kernel(&mut short);
    assert_eq!(short, [6, 0, 0, 0, 0xff, 0xff]);
}
