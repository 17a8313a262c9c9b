//! The backing target of the file-based engines: a regular file or a block device.
//!
//! A [`Target`] owns two descriptors on the same inode:
//!
//! ```text
//!             aligned (offset, length, address all multiples of IO_ALIGN)
//!   I/O ──┬──────────────────────────────────────────────► direct fd   (O_DIRECT)
//!         └──────────────────────────────────────────────► buffered fd (page cache)
//!             anything else
//! ```
//!
//! Unaligned I/O goes through the page cache instead of a read-modify-write of the
//! surrounding block in user space, because such a read-modify-write would race with a
//! concurrent writer of the neighbouring bytes. Linux keeps direct and buffered I/O on
//! one inode coherent (a direct I/O writes back and invalidates the cached pages it
//! covers), so both paths see each other's writes.
//!
//! Invariants:
//! - both descriptors refer to the same inode (checked at open);
//! - `size` is fixed at open: a regular file is never grown or shrunk by this module
//!   after creation, and every I/O is range-checked against it by the engines;
//! - when the filesystem refuses O_DIRECT there is no direct descriptor and every I/O is
//!   buffered; this is logged once per process.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{check_range, AlignedBuf, DeviceError, Result, IO_ALIGN};

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272u32 as libc::Ioctl;
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::Ioctl = 0x4008_1272u32 as libc::Ioctl;

/// `_IO(0x12, 119)`: discard a byte range `[u64; 2] = [start, len]`.
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const BLKDISCARD: libc::Ioctl = 0x1277 as libc::Ioctl;
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const BLKDISCARD: libc::Ioctl = 0x2000_1277u32 as libc::Ioctl;

/// Whether the "O_DIRECT refused" warning was already logged by this process.
static DIRECT_REFUSED_LOGGED: AtomicBool = AtomicBool::new(false);
/// Whether the "punch hole unsupported" warning was already logged by this process.
static PUNCH_UNSUPPORTED_LOGGED: AtomicBool = AtomicBool::new(false);

/// Whether to try O_DIRECT when opening (tests force the buffered-only path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirectIo {
    Try,
    #[cfg_attr(not(test), allow(dead_code))]
    Off,
}

/// What kind of object backs the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RegularFile,
    /// A block device with its logical block size (the discard granularity).
    BlockDevice {
        logical_block: u64,
    },
}

/// An opened regular file or block device, with a direct and a buffered descriptor.
#[derive(Debug)]
pub struct Target {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    size: u64,
    kind: Kind,
}

impl Target {
    /// Opens `path`: an existing block device or regular file, or a new sparse regular file
    /// of `create_size` bytes when `path` does not exist. An existing file keeps its size
    /// even when `create_size` differs.
    pub fn open(path: &Path, create_size: Option<u64>) -> Result<Target> {
        Self::open_with(path, create_size, DirectIo::Try)
    }

    pub(crate) fn open_with(
        path: &Path,
        create_size: Option<u64>,
        direct: DirectIo,
    ) -> Result<Target> {
        let open_err = |source: io::Error| DeviceError::Open {
            path: path.display().to_string(),
            source,
        };
        let buffered = open_or_create(path, create_size).map_err(open_err)?;
        let meta = buffered.metadata().map_err(open_err)?;
        let file_type = meta.file_type();
        let kind = if file_type.is_block_device() {
            Kind::BlockDevice {
                logical_block: logical_block_size(&buffered).map_err(open_err)?,
            }
        } else if file_type.is_file() {
            Kind::RegularFile
        } else {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            )));
        };
        let size = match kind {
            Kind::RegularFile => meta.len(),
            Kind::BlockDevice { .. } => block_device_size(&buffered).map_err(open_err)?,
        };
        if let (Kind::RegularFile, Some(wanted)) = (kind, create_size) {
            if wanted != size {
                tracing::info!(
                    path = %path.display(),
                    size,
                    requested_size = wanted,
                    "Existing file keeps its size"
                );
            }
        }
        let direct = match (direct, kind) {
            (DirectIo::Off, _) => None,
            // O_DIRECT on such a device needs a larger alignment than IO_ALIGN.
            (DirectIo::Try, Kind::BlockDevice { logical_block })
                if logical_block > IO_ALIGN as u64 =>
            {
                None
            }
            (DirectIo::Try, _) => open_direct(path, &meta).map_err(open_err)?,
        };
        Ok(Target {
            path: path.to_path_buf(),
            buffered,
            direct,
            size,
            kind,
        })
    }

    /// Duplicates both descriptors.
    pub fn try_clone(&self) -> Result<Target> {
        let open_err = |source: io::Error| DeviceError::Open {
            path: self.path.display().to_string(),
            source,
        };
        Ok(Target {
            path: self.path.clone(),
            buffered: self.buffered.try_clone().map_err(open_err)?,
            direct: match &self.direct {
                Some(file) => Some(file.try_clone().map_err(open_err)?),
                None => None,
            },
            size: self.size,
            kind: self.kind,
        })
    }

    /// The path this target was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes, fixed at open.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_block_device(&self) -> bool {
        matches!(self.kind, Kind::BlockDevice { .. })
    }

    /// Whether [`Target::punch`] makes the range read back as zeros: true for regular
    /// files (hole punching), false for block devices (discard is only a hint).
    pub fn punch_zeroes(&self) -> bool {
        !self.is_block_device()
    }

    /// Whether aligned I/O can take the O_DIRECT path.
    pub fn has_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The buffered descriptor, for I/O that is not aligned and for syncing.
    pub fn buffered_file(&self) -> &File {
        &self.buffered
    }

    /// The O_DIRECT descriptor, when the filesystem accepted O_DIRECT.
    pub fn direct_file(&self) -> Option<&File> {
        self.direct.as_ref()
    }

    /// Both descriptors, raw.
    pub fn raw_fds(&self) -> super::RawFds {
        super::RawFds {
            buffered: self.buffered.as_raw_fd(),
            direct: self.direct.as_ref().map(|f| f.as_raw_fd()),
        }
    }

    /// Whether an I/O of `len` bytes at `offset` from/to memory at `addr` may use the
    /// O_DIRECT descriptor.
    pub fn direct_eligible(&self, offset: u64, addr: *const u8, len: usize) -> bool {
        let align = IO_ALIGN as u64;
        self.direct.is_some()
            && len > 0
            && offset.is_multiple_of(align)
            && (len as u64).is_multiple_of(align)
            && (addr as usize).is_multiple_of(IO_ALIGN)
    }

    /// The descriptor an I/O of `len` bytes at `offset` from/to `addr` goes through.
    pub fn file_for(&self, offset: u64, addr: *const u8, len: usize) -> &File {
        match &self.direct {
            Some(direct) if self.direct_eligible(offset, addr, len) => direct,
            _ => &self.buffered,
        }
    }

    /// Makes every completed write durable (`fdatasync`; one inode, so one call covers
    /// writes made through either descriptor).
    pub fn flush(&self) -> Result<()> {
        self.buffered.sync_data().map_err(|source| DeviceError::Io {
            op: "flush",
            source,
        })
    }

    /// Deallocates `[offset, offset + len)`: a hole punched in a regular file (reads back
    /// as zeros), a discard of the whole logical blocks inside the range on a block device
    /// (a hint; bytes of partially covered blocks are left untouched).
    pub fn punch(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        match self.kind {
            Kind::RegularFile => self.punch_file(offset, len),
            Kind::BlockDevice { logical_block } => self.discard(offset, len, logical_block),
        }
    }

    fn punch_file(&self, offset: u64, len: u64) -> Result<()> {
        let punch_err = |source: io::Error| DeviceError::Io {
            op: "punch",
            source,
        };
        // In range of a file, so both fit in off_t.
        let start =
            libc::off_t::try_from(offset).map_err(|_| out_of_range(offset, len, self.size))?;
        let length =
            libc::off_t::try_from(len).map_err(|_| out_of_range(offset, len, self.size))?;
        loop {
            // SAFETY: fallocate only reads its integer arguments; the descriptor is owned
            // by `self.buffered` and open for the duration of the call.
            let rc = unsafe {
                libc::fallocate(
                    self.buffered.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start,
                    length,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) => {
                    // The filesystem cannot punch holes: zeros written in place keep the
                    // "reads back as zeros" promise, at the cost of allocating the range.
                    if !PUNCH_UNSUPPORTED_LOGGED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            path = %self.path.display(),
                            "Filesystem does not support punching holes, writing zeros instead"
                        );
                    }
                    return self.write_zeros(offset, len).map_err(punch_err);
                }
                _ => return Err(punch_err(err)),
            }
        }
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK) as usize;
            self.buffered.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64, logical_block: u64) -> Result<()> {
        // Only whole logical blocks inside the range may be discarded: rounding outwards
        // would destroy neighbouring bytes.
        let start = offset.div_ceil(logical_block) * logical_block;
        let end = (offset + len) / logical_block * logical_block;
        if start >= end {
            return Ok(());
        }
        let range: [u64; 2] = [start, end - start];
        loop {
            // SAFETY: BLKDISCARD reads a `[u64; 2]` through the pointer, which points to a
            // live local array for the duration of the call.
            let rc = unsafe { libc::ioctl(self.buffered.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Discard is only a hint on block devices (punch_zeroes() is false), so a
                // device without discard support simply keeps its data.
                Some(libc::EOPNOTSUPP) => {
                    tracing::debug!(path = %self.path.display(), "Device does not support discard");
                    return Ok(());
                }
                _ => {
                    return Err(DeviceError::Io {
                        op: "punch",
                        source: err,
                    })
                }
            }
        }
    }
}

fn out_of_range(offset: u64, len: u64, size: u64) -> DeviceError {
    DeviceError::OutOfRange { offset, len, size }
}

/// Opens an existing path read-write, or creates a sparse regular file of `create_size`
/// bytes when it does not exist.
fn open_or_create(path: &Path, create_size: Option<u64>) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    match (options.open(path), create_size) {
        (Ok(file), _) => Ok(file),
        (Err(err), Some(size)) if err.kind() == io::ErrorKind::NotFound => {
            match options.clone().create_new(true).mode(0o600).open(path) {
                Ok(file) => {
                    if let Err(err) = make_durable_sparse(path, &file, size) {
                        // Do not leave a truncated file behind: a later open would keep its size.
                        let _ = std::fs::remove_file(path);
                        return Err(err);
                    }
                    tracing::info!(path = %path.display(), size, "Created sparse data file");
                    Ok(file)
                }
                // Somebody else created it in between: use theirs.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => options.open(path),
                Err(err) => Err(err),
            }
        }
        (Err(err), _) => Err(err),
    }
}

/// Sizes a new file and makes its existence and size durable (file, then its directory
/// entry), so that a crash right after pool creation cannot lose the data file.
fn make_durable_sparse(path: &Path, file: &File, size: u64) -> io::Result<()> {
    file.set_len(size)?;
    file.sync_all()?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Opens the O_DIRECT descriptor on the same inode as `meta`, or `None` when the
/// filesystem refuses O_DIRECT.
fn open_direct(path: &Path, meta: &std::fs::Metadata) -> io::Result<Option<File>> {
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let direct = match opened {
        Ok(file) => file,
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            log_direct_refused(path);
            return Ok(None);
        }
        Err(err) => return Err(err),
    };
    let direct_meta = direct.metadata()?;
    if (direct_meta.dev(), direct_meta.ino()) != (meta.dev(), meta.ino()) {
        return Err(io::Error::other(
            "path was replaced while it was being opened",
        ));
    }
    // Some filesystems accept the flag at open and refuse the I/O itself: probe with one
    // aligned read (harmless; a short read at the end of a small file is fine).
    let mut probe = AlignedBuf::zeroed(IO_ALIGN);
    match direct.read_at(&mut probe, 0) {
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            log_direct_refused(path);
            Ok(None)
        }
        // Other errors (a bad sector, say) are reported by the real I/O.
        _ => Ok(Some(direct)),
    }
}

fn log_direct_refused(path: &Path) {
    if !DIRECT_REFUSED_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(path = %path.display(), "O_DIRECT refused by the filesystem, using buffered I/O only");
    } else {
        tracing::debug!(path = %path.display(), "O_DIRECT refused by the filesystem, using buffered I/O only");
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live
    // local for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn logical_block_size(file: &File) -> io::Result<u64> {
    let mut block: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local
    // for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut block as *mut libc::c_int,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    match u64::try_from(block) {
        Ok(block) if block > 0 => Ok(block),
        _ => Err(io::Error::other(
            "device reports an invalid logical block size",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_sparse_file_of_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let target = Target::open(&path, Some(10 << 20)).unwrap();
        assert_eq!(target.size(), 10 << 20);
        assert!(!target.is_block_device());
        assert!(target.punch_zeroes());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 10 << 20);
        // Sparse: (almost) nothing allocated.
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} blocks allocated",
            meta.blocks()
        );
    }

    #[test]
    fn existing_file_keeps_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        drop(Target::open(&path, Some(1 << 20)).unwrap());
        let again = Target::open(&path, Some(2 << 20)).unwrap();
        assert_eq!(again.size(), 1 << 20);
        let without = Target::open(&path, None).unwrap();
        assert_eq!(without.size(), 1 << 20);
    }

    #[test]
    fn missing_file_without_size_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Target::open(&dir.path().join("absent"), None).unwrap_err();
        match err {
            DeviceError::Open { source, .. } => assert_eq!(source.kind(), io::ErrorKind::NotFound),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Target::open(dir.path(), None),
            Err(DeviceError::Open { .. })
        ));
    }

    #[test]
    fn aligned_io_takes_the_direct_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::open(&dir.path().join("data"), Some(1 << 20)).unwrap();
        // ext4/xfs/tmpfs on current kernels accept O_DIRECT; the fallback is tested by
        // forcing it off below.
        if !target.has_direct() {
            eprintln!("skipping: the filesystem of the temporary directory refuses O_DIRECT");
            return;
        }
        let buf = AlignedBuf::zeroed(2 * IO_ALIGN);
        let direct = target.direct_file().unwrap().as_raw_fd();
        let buffered = target.buffered_file().as_raw_fd();
        assert_eq!(
            target.file_for(4096, buf.as_ptr(), 4096).as_raw_fd(),
            direct
        );
        assert_eq!(
            target.file_for(4095, buf.as_ptr(), 4096).as_raw_fd(),
            buffered
        );
        assert_eq!(
            target.file_for(4096, buf.as_ptr(), 4095).as_raw_fd(),
            buffered
        );
        assert_eq!(
            target.file_for(4096, buf[1..].as_ptr(), 4096).as_raw_fd(),
            buffered
        );
        assert_eq!(target.file_for(4096, buf.as_ptr(), 0).as_raw_fd(), buffered);
    }

    #[test]
    fn buffered_only_target_never_takes_direct() {
        let dir = tempfile::tempdir().unwrap();
        let target =
            Target::open_with(&dir.path().join("data"), Some(1 << 20), DirectIo::Off).unwrap();
        assert!(!target.has_direct());
        let buf = AlignedBuf::zeroed(IO_ALIGN);
        assert!(!target.direct_eligible(0, buf.as_ptr(), IO_ALIGN));
        let clone = target.try_clone().unwrap();
        assert!(!clone.has_direct());
        assert_eq!(clone.size(), target.size());
    }

    #[test]
    fn punch_checks_range_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::open(&dir.path().join("data"), Some(64 << 10)).unwrap();
        target
            .buffered_file()
            .write_all_at(&[0xAB; 64 << 10], 0)
            .unwrap();
        target.punch(100, 9000).unwrap();
        let mut back = vec![0u8; 64 << 10];
        target.buffered_file().read_exact_at(&mut back, 0).unwrap();
        assert!(back[..100].iter().all(|&b| b == 0xAB));
        assert!(back[100..9100].iter().all(|&b| b == 0));
        assert!(back[9100..].iter().all(|&b| b == 0xAB));
        assert!(matches!(
            target.punch(60 << 10, 8 << 10),
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(matches!(
            target.punch(u64::MAX, 2),
            Err(DeviceError::OutOfRange { .. })
        ));
        target.punch(64 << 10, 0).unwrap();
        target.flush().unwrap();
    }
}
