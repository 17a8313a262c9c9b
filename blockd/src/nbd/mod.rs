//! NBD: serves exported images to clients over the Network Block Device protocol.
//!
//! This module owns the protocol side of the data path:
//! - [`codec`]: every byte layout of the fixed-newstyle protocol, pure and fuzzable;
//! - [`server`]: the tokio server (unix socket; TCP only with TLS), the handshake, the
//!   transmission loop, unexport and graceful shutdown;
//! - [`tls`]: the TLS identity and client-certificate policy of the TCP listener;
//! - [`mem`]: a sparse in-memory export and registry, for tests and `nbd-memserver`.
//!
//! It does not know the engine. The server talks to storage through two small traits that
//! the engine (or a test) implements: an [`ExportRegistry`] resolves export names to
//! [`ExportTarget`]s, and a target does the I/O. Target methods are *blocking* (the engine
//! does synchronous io_uring/pread I/O), so the server calls them from tokio's blocking
//! pool, never on a runtime worker (unless a target opts in with
//! [`ExportTarget::nonblocking`]). Reads and plain writes are the exception when the
//! target offers an [`IoQueue`]: they are started and completed on the connection's own
//! task (io_uring + eventfd), with no thread hop, and answered one by one as they complete.
//!
//! ```text
//!  client ──unix/TLS──▶ connection task ─┬─ handshake (options) ── registry.open(name)
//!                                        └─ transmission (one task): read requests
//!                                             ├─▶ reads, plain writes ─▶ IoQueue (ring)
//!                                             │     start, submit, poll_complete
//!                                             └─▶ others: qos wait, spawn_blocking(op)
//!                                                   reply ─▶ channel ─┐
//!                  socket ◀── replies, out of order, vectored ◀───────┘ (same task)
//! ```
//!
//! Contract between the server and a target (what the server guarantees):
//! - `offset + len <= size` for every call, with `size` the value [`ExportTarget::size`]
//!   returned when the client connected; `len` fits the 32-bit NBD length;
//! - offsets and lengths are *not* necessarily aligned: a client that did not negotiate
//!   block sizes may send byte-granular requests, so targets accept any offset and length;
//! - `write`, `write_zeroes` and `discard` are never called on a read-only target;
//! - calls for one connection may run concurrently with each other and with calls of other
//!   connections to the same export (multi-conn); ordering between overlapping in-flight
//!   requests is the client's business, as with any disk;
//! - a FUA request is a write followed by [`ExportTarget::flush`] before the reply.
//!
//! What a target guarantees the server:
//! - `flush` makes every write that *completed* before the call durable, whichever
//!   connection sent it: this is how `NBD_FLAG_CAN_MULTI_CONN` is honoured;
//! - after `write_zeroes(.., ZeroMode::Punch)` the range reads as zeros (it may become a
//!   hole); after `write_zeroes(.., ZeroMode::Allocate)` it reads as zeros *and* is backed
//!   by allocated space (`NBD_CMD_FLAG_NO_HOLE`);
//! - `discard` is a hint: afterwards the range may read as anything;
//! - `block_status` extents are consecutive from `offset`, each non-empty; a target may
//!   describe less than asked (at least one extent) or report everything as data.

pub mod buffers;
pub mod codec;
pub mod mem;
pub mod server;
pub mod tls;

use std::fmt;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

pub use crate::qos::Qos;
pub use buffers::IoBuf;
pub use server::{Server, ServerConfig, ServerError, DEFAULT_BUSY_POLL};
pub use tls::{TlsConfig, TlsError};

/// A libc errno reported by a target for a failed I/O.
///
/// The engine's errors already carry an errno (`EngineError::errno()`), so targets return
/// that number and the server maps it to the NBD error set in one place,
/// [`Errno::nbd_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", io::Error::from_raw_os_error(self.0))]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ENOTSUP: Errno = Errno(libc::ENOTSUP);
    pub const ESHUTDOWN: Errno = Errno(libc::ESHUTDOWN);

    /// The NBD error value for this errno. The protocol allows only a fixed set; anything
    /// else is an I/O error from the client's point of view.
    pub fn nbd_error(self) -> u32 {
        match self.0 {
            libc::EPERM | libc::EACCES | libc::EROFS => codec::NBD_EPERM,
            libc::ENOMEM => codec::NBD_ENOMEM,
            libc::EINVAL | libc::ERANGE => codec::NBD_EINVAL,
            // The spec asks for EDQUOT and EFBIG to be reported as ENOSPC.
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => codec::NBD_ENOSPC,
            libc::EOVERFLOW => codec::NBD_EOVERFLOW,
            libc::ENOTSUP => codec::NBD_ENOTSUP,
            libc::ESHUTDOWN => codec::NBD_ESHUTDOWN,
            _ => codec::NBD_EIO,
        }
    }
}

impl From<io::Error> for Errno {
    fn from(err: io::Error) -> Self {
        Errno(err.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// What a range of an export holds, for `base:allocation` and for sparse reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated, contents unknown to the server (must be read).
    Data,
    /// Allocated and known to read as zeros (`NBD_STATE_ZERO`).
    Zero,
    /// Not allocated; reads as zeros (`NBD_STATE_HOLE | NBD_STATE_ZERO`).
    Hole,
}

/// A run of bytes with one [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub kind: ExtentKind,
}

/// How [`ExportTarget::write_zeroes`] may zero a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// The range may be deallocated (punched, tombstoned) as long as it reads as zeros.
    Punch,
    /// The range must stay (or become) allocated: the client sent `NBD_CMD_FLAG_NO_HOLE`.
    Allocate,
}

/// One exported image, as the server sees it. All methods may block.
pub trait ExportTarget: Send + Sync {
    /// Size in bytes, read once per connection at `NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`, and
    /// again when a request reaches past it (the export may have grown).
    fn size(&self) -> Result<u64, Errno>;

    /// Whether writes are refused (snapshots). Advertised as `NBD_FLAG_READ_ONLY`.
    fn read_only(&self) -> bool;

    /// Text for `NBD_INFO_DESCRIPTION` (empty: none sent).
    fn description(&self) -> String {
        String::new()
    }

    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno>;

    /// Reads several ranges, each `(offset, buf)` as in [`ExportTarget::read`]; one result
    /// per range, in order. A target that can submit them together (one device batch)
    /// overrides this; the default reads one after another.
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<(), Errno>> {
        reqs.iter_mut()
            .map(|(offset, buf)| self.read(*offset, buf))
            .collect()
    }

    /// Writes `data` at `offset`. Durable only after a later [`ExportTarget::flush`].
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno>;

    /// Makes `[offset, offset + len)` read as zeros, as `mode` allows.
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), Errno>;

    /// Whether `write_zeroes(.., ZeroMode::Punch)` is cheap (metadata only, no data
    /// written): decides `NBD_CMD_FLAG_FAST_ZERO` requests without trying them.
    fn punch_is_fast(&self) -> bool;

    /// A hint that the range is no longer needed (`NBD_CMD_TRIM`).
    fn discard(&self, offset: u64, len: u64) -> Result<(), Errno>;

    /// Makes every completed write durable, from any connection.
    fn flush(&self) -> Result<(), Errno>;

    /// Describes `[offset, offset + len)` as consecutive extents.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno>;

    /// Current QoS limits; read on every request so that changes apply at once. Called on
    /// the async runtime: must be cheap and must not block (read an atomic or a cached
    /// value).
    fn qos(&self) -> Qos {
        Qos::UNLIMITED
    }

    /// A queue for this connection's reads and plain (non-FUA) writes that completes them
    /// asynchronously (io_uring with an eventfd), or None to run every request through the
    /// methods above on the blocking pool. Called once per connection, on the blocking
    /// pool.
    fn io_queue(&self) -> Option<Box<dyn IoQueue>> {
        None
    }

    /// True only if every method returns in microseconds without sleeping or waiting for
    /// I/O (an in-memory target). The server then calls it directly on the runtime thread
    /// for requests up to 1 MiB, saving the hop to the blocking pool; a target that may
    /// block must keep the default (false), or it stalls every connection on that thread.
    fn nonblocking(&self) -> bool {
        false
    }
}

/// A connection's asynchronous reads and writes (see [`ExportTarget::io_queue`]).
///
/// Called only from the connection's own task, on the runtime: no method may block.
/// Dropping the queue waits for reads still in flight (their buffers belong to it).
pub trait IoQueue: Send {
    /// Starts reading `buf.len()` bytes at `offset` (validated as for
    /// [`ExportTarget::read`]); `tag` names it in [`IoQueue::poll_complete`].
    fn start(&mut self, tag: u64, offset: u64, buf: IoBuf) -> QueueStart;

    /// Starts writing `data` at `offset` (validated as for [`ExportTarget::write`], no
    /// FUA); reported like a read, with `data` given back. The default declines.
    fn start_write(&mut self, tag: u64, offset: u64, data: IoBuf) -> QueueStart {
        let _ = (tag, offset);
        QueueStart::Declined(data)
    }

    /// Hands the ops started since the last call to the device.
    fn submit(&mut self);

    /// Ops started and not yet reported.
    fn in_flight(&self) -> usize;

    /// Appends finished ops to `out`; `Ready` once at least one was appended.
    fn poll_complete(&mut self, cx: &mut Context<'_>, out: &mut Vec<QueueDone>) -> Poll<()>;
}

/// What [`IoQueue::start`] did with a read.
pub enum QueueStart {
    /// In flight: reported later by [`IoQueue::poll_complete`].
    Started,
    /// Finished at once (nothing to read from the device, or failed before any I/O).
    Done(QueueDone),
    /// Not started (the queue cannot take it now): run it through [`ExportTarget::read`].
    Declined(IoBuf),
}

/// A finished read or write of an [`IoQueue`].
pub struct QueueDone {
    pub tag: u64,
    pub result: Result<(), Errno>,
    pub buf: IoBuf,
    /// For a read: ranges of `buf` known to read as zeros (holes), ascending; the rest is
    /// data. Empty for a write.
    pub zeros: Vec<std::ops::Range<usize>>,
}

/// An export's entry in `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    pub description: String,
}

/// Why an export name cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No such export (answered `NBD_REP_ERR_UNKNOWN`).
    #[error("Export not found")]
    NotFound,
    /// The export exists but this client may not use it now (`NBD_REP_ERR_POLICY`).
    #[error("Export refused: {reason}")]
    Refused { reason: &'static str },
    /// The export could not be opened (`NBD_REP_ERR_UNKNOWN` with the message).
    #[error("Export could not be opened")]
    Io(#[from] Errno),
}

/// Resolves export names. Methods may block (they may consult the metadata store).
pub trait ExportRegistry: Send + Sync {
    /// Opens export `name` for one connection.
    fn open(&self, name: &str) -> Result<Arc<dyn ExportTarget>, OpenError>;

    /// The exports a client may list.
    fn list(&self) -> Vec<ExportListing>;
}

impl fmt::Debug for dyn ExportTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportTarget")
            .field("read_only", &self.read_only())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_to_the_nbd_set() {
        assert_eq!(Errno(libc::EROFS).nbd_error(), codec::NBD_EPERM);
        assert_eq!(Errno(libc::EDQUOT).nbd_error(), codec::NBD_ENOSPC);
        assert_eq!(Errno(libc::EFBIG).nbd_error(), codec::NBD_ENOSPC);
        assert_eq!(Errno(libc::EBADF).nbd_error(), codec::NBD_EIO);
        assert_eq!(Errno::ENOTSUP.nbd_error(), codec::NBD_ENOTSUP);
        assert_eq!(Errno::ESHUTDOWN.nbd_error(), codec::NBD_ESHUTDOWN);
        let io = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(Errno::from(io), Errno::ENOSPC);
    }
}
