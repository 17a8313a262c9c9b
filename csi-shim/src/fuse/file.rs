//! [`ExportFile`]: the file system csi-fuse-nbd mounts, a root directory holding one
//! regular file (`nbd`) whose bytes are an [`Export`]'s, written against
//! [`fuser::Filesystem`]; see the module docs of [`super`] for its invariants.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use super::export::{Command, Export};
use super::{FILE_NAME, FLUSH_EVERY, MAX_IO};
use crate::node::attach::nbd_client as nbd;

const ROOT: INodeNo = INodeNo::ROOT;
const FILE: INodeNo = INodeNo(2);
/// How long the kernel may cache the name `nbd` (the attributes are never cached).
const ENTRY_TTL: Duration = Duration::from_secs(1);
/// The longest discard or zeroing sent as one NBD command (NBD lengths are 32 bits).
const MAX_ZERO_STEP: u64 = 1 << 30;

const FALLOC_FL_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_FL_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const FALLOC_FL_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// The file system: an [`Export`] as the file `nbd`.
#[derive(Debug)]
pub struct ExportFile<E: Export> {
    /// fuser calls in through `&self`; one session thread, so the lock is never contended.
    state: Mutex<State<E>>,
}

#[derive(Debug)]
struct State<E> {
    export: E,
    /// Bytes written since the last flush.
    unflushed: u64,
    /// The buffer reads land in, kept across requests.
    buf: Vec<u8>,
}

impl<E: Export> ExportFile<E> {
    pub fn new(export: E) -> Self {
        ExportFile {
            state: Mutex::new(State {
                export,
                unflushed: 0,
                buf: Vec::new(),
            }),
        }
    }
}

/// The attributes of `ino` (the root or the file) when the export has `size` bytes.
fn attr(ino: INodeNo, size: u64) -> FileAttr {
    let (kind, perm, nlink, size) = if ino == ROOT {
        (FileType::Directory, 0o755, 2, 0)
    } else {
        (FileType::RegularFile, 0o600, 1, size)
    };
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl<E: Export> State<E> {
    /// The attributes of `ino`, after learning a grown export size for the file.
    fn attr(&mut self, ino: INodeNo) -> Result<FileAttr, Errno> {
        if ino == FILE {
            self.export.refresh_size();
        } else if ino != ROOT {
            return Err(Errno::ENOENT);
        }
        Ok(attr(ino, self.export.size()))
    }

    /// The end of `offset..offset + len` when it lies inside the export.
    fn inside(&self, offset: u64, len: u64) -> Result<u64, Errno> {
        match offset.checked_add(len) {
            Some(end) if end <= self.export.size() => Ok(end),
            _ => Err(Errno::ENOSPC),
        }
    }

    fn takes(&self, flag: u16) -> bool {
        self.export.flags() & flag != 0
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|len| *len <= MAX_IO)
            .ok_or(Errno::EINVAL)?;
        self.inside(offset, u64::from(len))?;
        self.export.run(Command::Write { offset, data })?;
        self.unflushed += u64::from(len);
        if self.unflushed >= FLUSH_EVERY && self.takes(nbd::SEND_FLUSH) {
            self.flush()?;
        }
        Ok(len)
    }

    fn flush(&mut self) -> Result<(), Errno> {
        self.unflushed = 0;
        if self.takes(nbd::SEND_FLUSH) {
            self.export.run(Command::Flush)
        } else {
            Ok(())
        }
    }

    /// Discards (`FALLOC_FL_PUNCH_HOLE`) or zeroes (`FALLOC_FL_ZERO_RANGE`) a range, as
    /// the loop driver asks for REQ_OP_DISCARD and REQ_OP_WRITE_ZEROES.
    fn fallocate(&mut self, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        let known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
        let zeroes = mode & FALLOC_FL_PUNCH_HOLE == 0;
        let (needed, known_mode) = if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            (nbd::SEND_TRIM, true)
        } else if mode & FALLOC_FL_ZERO_RANGE != 0 {
            (nbd::SEND_WRITE_ZEROES, true)
        } else {
            // Plain allocation: the file is as large as the export already.
            (0, false)
        };
        if !known_mode || mode & !known != 0 || !self.takes(needed) {
            return Err(Errno::EOPNOTSUPP);
        }
        let end = self.inside(offset, length)?;
        let mut at = offset;
        while at < end {
            let len = (end - at).min(MAX_ZERO_STEP) as u32;
            let command = if zeroes {
                Command::WriteZeroes { offset: at, len }
            } else {
                Command::Trim { offset: at, len }
            };
            self.export.run(command)?;
            at += u64::from(len);
        }
        Ok(())
    }
}

impl<E: Export> Filesystem for ExportFile<E> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        tracing::debug!(kernel_abi = %config.kernel_abi(), "FUSE INIT");
        if let Err(nearest) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(nearest);
        }
        // The kernel offers its largest readahead; take up to one request's worth.
        if let Err(nearest) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT || name != OsStr::new(FILE_NAME) {
            return reply.error(Errno::ENOENT);
        }
        match self.state.lock().attr(FILE) {
            Ok(attr) => reply.entry_with_ttls(&Duration::ZERO, &ENTRY_TTL, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state.lock().attr(ino) {
            Ok(attr) => reply.attr(&Duration::ZERO, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    /// Changes nothing: the owner, mode and times are fixed, and the size is the export's
    /// (a truncation to another size gets `EPERM`).
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.state.lock().attr(ino) {
            Ok(attr) if size.is_some_and(|size| size != attr.size) => {
                tracing::debug!(?size, export_size = attr.size, "truncation refused");
                reply.error(Errno::EPERM)
            }
            Ok(attr) => reply.attr(&Duration::ZERO, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            FILE => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE {
            return reply.error(Errno::EBADF);
        }
        if size > MAX_IO {
            return reply.error(Errno::EINVAL);
        }
        let mut state = self.state.lock();
        let State { export, buf, .. } = &mut *state;
        // A read past the end is short (empty at or past it), like a regular file's.
        let len = u64::from(size).min(export.size().saturating_sub(offset)) as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let buf = &mut buf[..len];
        if len == 0 {
            return reply.data(buf);
        }
        match export.run(Command::Read { offset, buf }) {
            Ok(()) => reply.data(buf),
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE {
            return reply.error(Errno::EBADF);
        }
        match self.state.lock().write(offset, data) {
            Ok(written) => reply.written(written),
            Err(errno) => reply.error(errno),
        }
    }

    /// `close(2)`: nothing is buffered here, so nothing to do.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state.lock().flush() {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            ROOT => reply.opened(FileHandle(0), FopenFlags::empty()),
            FILE => reply.error(Errno::ENOTDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, FILE_NAME),
        ];
        // An entry's offset is the one of the entry after it.
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    /// Grants every access: the mount lives in csi-shim's private work directory and its
    /// users (csi-shim, the loop driver) are root.
    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE {
            return reply.error(Errno::EBADF);
        }
        match self.state.lock().fallocate(offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }
}
