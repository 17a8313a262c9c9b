//! Block devices: where pool data lives.
//!
//! This module owns the [`BlockDevice`] trait and its backends:
//! - [`uring`]: io_uring, O_DIRECT, one ring per I/O thread, batched submission (production);
//! - [`sync`]: pread/pwrite fallback, chosen when io_uring cannot be set up or when forced;
//! - [`mem`]: an in-memory device with a volatile write cache, for tests (power cuts drop
//!   what was not flushed);
//! - [`faulty`]: wraps any device and fails every I/O after the N-th, for crash simulation.
//!
//! Invariants every backend keeps:
//! - an I/O never touches bytes outside `[offset, offset + len)` and never outside the device;
//! - `flush` returns only when every write that completed before the call is durable;
//! - `punch` makes the range read back as zeros when [`BlockDevice::punch_zeroes`] is true;
//!   when false it is only a hint (discard) and the engine never relies on its result.
//! - any offset/length is accepted (byte granularity); backends that need alignment
//!   (O_DIRECT) take an aligned fast path and a buffered path for the rest, never a
//!   read-modify-write of neighbouring bytes (which would race with concurrent writers).

pub mod faulty;
pub mod file;
pub mod mem;
pub mod sync;
pub mod uring;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// Alignment of buffers and offsets for the O_DIRECT fast path.
pub const IO_ALIGN: usize = 4096;

/// Errors of the device layer.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The request reaches past the end of the device.
    #[error("I/O at offset {offset} length {len} is beyond the device size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The backing file or device returned an error.
    #[error("Device I/O failed during {op}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// A fault-injection device refused the I/O (tests only).
    #[error("Injected fault after {after} I/Os")]
    Injected { after: u64 },
    /// The backend could not be opened or set up.
    #[error("Cannot open device {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl DeviceError {
    /// The errno a protocol reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::OutOfRange { .. } => libc::EINVAL,
            DeviceError::Io { source, .. } | DeviceError::Open { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            DeviceError::Injected { .. } => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, DeviceError>;

/// Which I/O engine serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoEngine {
    Uring,
    Sync,
    Memory,
}

impl fmt::Display for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoEngine::Uring => "uring",
            IoEngine::Sync => "sync",
            IoEngine::Memory => "memory",
        })
    }
}

/// What the caller asks for when opening a file or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// io_uring when it can be set up, else the sync fallback (logged once).
    Auto,
    Uring,
    Sync,
}

/// One I/O in a batch. Buffers are borrowed for the duration of [`BlockDevice::submit`].
#[derive(Debug)]
pub enum IoOp<'a> {
    Read { offset: u64, buf: &'a mut [u8] },
    Write { offset: u64, buf: &'a [u8] },
}

impl IoOp<'_> {
    pub fn offset(&self) -> u64 {
        match self {
            IoOp::Read { offset, .. } | IoOp::Write { offset, .. } => *offset,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            IoOp::Read { buf, .. } => buf.len(),
            IoOp::Write { buf, .. } => buf.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A block device: a flat byte range with reads, writes, flush and punch.
///
/// All methods are blocking and thread-safe; callers on an async runtime run them on
/// blocking threads. Backends that batch (io_uring) submit a whole `submit` call at once.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Which engine serves this device.
    fn engine(&self) -> IoEngine;

    /// Whether [`BlockDevice::punch`] guarantees that the range reads back as zeros
    /// (true for sparse files and memory devices).
    fn punch_zeroes(&self) -> bool;

    /// Executes every op; returns when all have completed. On error some ops may have
    /// completed and others not (as with a real disk).
    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()>;

    /// Makes every write completed before this call durable.
    fn flush(&self) -> Result<()>;

    /// Deallocates the range (fallocate PUNCH_HOLE on files, BLKDISCARD on devices).
    fn punch(&self, offset: u64, len: u64) -> Result<()>;

    /// A private ring for asynchronous reads and writes ([`uring::IoRing`]), when the
    /// backend has one (io_uring); None means "use `submit`".
    fn io_ring(&self) -> Option<uring::IoRing> {
        None
    }

    /// The descriptors behind the device, for frontends that submit their own I/O with
    /// buffers the kernel owns (ublk zero copy); None for backends without a file
    /// (memory, fault injection).
    fn raw_fds(&self) -> Option<RawFds> {
        None
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.submit(&mut [IoOp::Read { offset, buf }])
    }

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.submit(&mut [IoOp::Write { offset, buf }])
    }
}

/// The descriptors of a file-backed device ([`BlockDevice::raw_fds`]). They stay open as
/// long as the device does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFds {
    /// Takes any I/O (page cache).
    pub buffered: std::os::fd::RawFd,
    /// O_DIRECT, when the file system accepted it: offsets, lengths and memory aligned
    /// to [`IO_ALIGN`] only.
    pub direct: Option<std::os::fd::RawFd>,
}

/// Checks that `[offset, offset+len)` lies within a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::OutOfRange { offset, len, size }),
    }
}

/// A heap buffer aligned to [`IO_ALIGN`], usable for O_DIRECT.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (len may be 0).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                ptr: std::ptr::NonNull::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, IO_ALIGN).expect("buffer size overflows a Layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with the same layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Opens a file (created sparse at `create_size` when absent) or a block device with the
/// chosen engine. With [`EngineChoice::Auto`] a failure to set up io_uring falls back to the
/// sync engine and logs it once.
pub fn open_path(
    path: &Path,
    create_size: Option<u64>,
    choice: EngineChoice,
) -> Result<Arc<dyn BlockDevice>> {
    let target = file::Target::open(path, create_size)?;
    match choice {
        EngineChoice::Sync => Ok(Arc::new(sync::SyncDevice::new(target))),
        EngineChoice::Uring => Ok(Arc::new(uring::UringDevice::new(target)?)),
        EngineChoice::Auto => match uring::UringDevice::new(target.try_clone()?) {
            Ok(dev) => Ok(Arc::new(dev)),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "io_uring unavailable, using the sync I/O engine");
                Ok(Arc::new(sync::SyncDevice::new(target)))
            }
        },
    }
}
