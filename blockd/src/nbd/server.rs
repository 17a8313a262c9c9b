//! The NBD server: listeners, handshake, transmission, unexport and shutdown.
//!
//! This module owns every client connection and the state the server shares between them
//! (the export registry, the tunables, the table of connections with their stop signals,
//! the per-export QoS limiters). A connection runs as one tokio task through two phases,
//! each in its own submodule:
//!
//! ```text
//!  listen      accept (unix / TLS) ─► ConnSlot in the table, task spawned
//!  handshake   greeting, options ─► NBD_OPT_GO / NBD_OPT_EXPORT_NAME opens a Session
//!  transmit    requests ─► target / I/O queue ─► replies (one writer per connection)
//! ```
//!
//! - [`listen`]: the unix and TLS listeners, the accept loop, unexport
//!   ([`Server::close_export`]) and listener shutdown;
//! - [`handshake`]: fixed newstyle negotiation, STARTTLS, export opening;
//! - [`transmit`]: request validation, dispatch to the target, reply encoding and writing.
//!
//! Invariants:
//! - a connection's [`ConnSlot`] exists exactly as long as its task (removed by
//!   [`ConnGuard`] on any exit, panics included), and names the export it uses while it
//!   uses it ([`AttachGuard`]), so unexport can find and wait for every user;
//! - a protocol violation or a socket error ends only its own connection;
//! - graceful close ([`Server::close_export`], listener shutdown): stop reading requests,
//!   let in-flight ones finish and their replies be written, flush the target, then close.
//!
//! Choices where the spec leaves room, and why:
//! - `NBD_CMD_FLAG_FAST_ZERO`: with `NBD_CMD_FLAG_NO_HOLE` the zeros must be written, which
//!   is never faster than a write, so it fails at once with `NBD_ENOTSUP`; without it the
//!   request succeeds only if the target says punching is metadata-only
//!   ([`punch_is_fast`](crate::nbd::ExportTarget::punch_is_fast)), otherwise
//!   `NBD_ENOTSUP` without touching data.
//! - Block sizes (512 / 4096 / 32 MiB) are always advertised; alignment is enforced
//!   (`NBD_EINVAL`) only for clients that requested `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`,
//!   since others were promised nothing stricter than the defaults (minimum 1).
//! - `NBD_FLAG_CAN_MULTI_CONN` is always set: targets are shared by all connections of an
//!   export and a target flush covers writes from every connection.
//! - Read-only exports do not advertise FUA, TRIM, WRITE_ZEROES or FAST_ZERO; writes to
//!   them fail with `NBD_EPERM`.
//! - Writes past the end get `NBD_ENOSPC`, other out-of-range requests `NBD_EINVAL` (the
//!   spec's "SHOULD" for each). "The end" is the size negotiated at the handshake until a
//!   request reaches past it: then the target's size is read again (on the blocking pool),
//!   and an export that grew meanwhile serves the new range on the same connection. The
//!   kernel NBD client learns a grown size over netlink, never by a new handshake, so
//!   csi-shim's online expansion of `/dev/nbdX` depends on this.
//! - `NBD_CMD_CACHE` is accepted as a no-op (not advertised; some clients send it anyway).

mod handshake;
mod listen;
mod transmit;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use super::codec::DecodeError;
use super::ExportRegistry;
use crate::qos::Limiter;

/// Smallest block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest read or write payload accepted (and advertised).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Option data beyond this is drained and answered `NBD_REP_ERR_TOO_BIG`: the largest
/// legitimate option (`NBD_OPT_SET_META_CONTEXT` with a few queries) is far smaller.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// A client that sends more options than this in one handshake is treated as a denial of
/// service and disconnected (the spec allows it).
const MAX_OPTIONS: usize = 4096;
/// The only metadata context, and its id for `NBD_OPT_SET_META_CONTEXT`.
const BASE_ALLOCATION: &str = "base:allocation";
const BASE_ALLOCATION_ID: u32 = 1;

/// Tunables of the server; [`ServerConfig::default`] fits a storage daemon.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests per connection between header read and reply written.
    pub max_requests_in_flight: usize,
    /// Payload bytes (reads and writes) per connection in flight; at least [`MAX_PAYLOAD`].
    pub max_bytes_in_flight: usize,
    /// Time a client has to get from connect to transmission.
    pub handshake_timeout: Duration,
    /// Time a graceful close waits for in-flight requests before dropping the connection.
    pub drain_timeout: Duration,
    /// How long a connection on a unix socket keeps polling its socket and its io_uring
    /// queue after its last progress before it sleeps; zero never polls. See
    /// [`DEFAULT_BUSY_POLL`].
    pub busy_poll: Duration,
}

/// The default busy-poll budget: a few client round trips. Polling costs CPU only while
/// a connection is busy (at most this long after its last request or completion), and
/// saves the two wakeups per request that otherwise dominate small-block latency.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(100);

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_requests_in_flight: 128,
            max_bytes_in_flight: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

/// Errors of the listeners.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Bind(#[from] blockd_proto::unix_socket::BindError),
    #[error("Accepting connections failed")]
    Accept(#[source] io::Error),
}

/// Why a connection ended (for logs).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("Socket I/O failed")]
    Io(#[from] io::Error),
    #[error("Protocol violation")]
    Protocol(#[from] DecodeError),
    #[error("Client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("Handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("Export {name:?} cannot be opened")]
    ExportName { name: String },
    #[error("Client refused TLS on a TLS-only listener")]
    TlsRequired,
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
}

/// Why a connection is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    ExportClosed,
    Shutdown,
}

/// The NBD server. Cheap to clone: clones share connections and exports.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Arc<dyn ExportRegistry>,
    config: ServerConfig,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, ConnSlot>>,
    limiters: Mutex<HashMap<String, Weak<Limiter>>>,
}

/// The server's handle on one connection.
struct ConnSlot {
    listener: u64,
    stop: watch::Sender<Stop>,
    /// Closed (sender dropped) when the connection task ends.
    done: watch::Receiver<()>,
    attached: Option<Attachment>,
}

/// The export a connection uses, with a signal closed when it lets go of it.
struct Attachment {
    export: String,
    released: watch::Receiver<()>,
}

impl Server {
    /// A server resolving export names through `registry`, with default tunables.
    pub fn new(registry: Arc<dyn ExportRegistry>) -> Self {
        Self::with_config(registry, ServerConfig::default())
    }

    pub fn with_config(registry: Arc<dyn ExportRegistry>, mut config: ServerConfig) -> Self {
        config.max_requests_in_flight = config.max_requests_in_flight.clamp(1, 1 << 16);
        config.max_bytes_in_flight = config
            .max_bytes_in_flight
            .clamp(MAX_PAYLOAD as usize, u32::MAX as usize);
        Self {
            shared: Arc::new(Shared {
                registry,
                config,
                next_id: AtomicU64::new(1),
                conns: Mutex::new(HashMap::new()),
                limiters: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// Displays an error with its sources, `outer: inner: innermost`.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// Removes the connection's slot when its task ends (by any path, panics included).
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
    _done: watch::Sender<()>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.conns.lock().remove(&self.id);
    }
}

/// Marks the connection as using an export until dropped.
struct AttachGuard {
    shared: Arc<Shared>,
    id: u64,
    _released: watch::Sender<()>,
}

impl AttachGuard {
    fn new(shared: &Arc<Shared>, id: u64, export: &str) -> Self {
        let (tx, rx) = watch::channel(());
        if let Some(slot) = shared.conns.lock().get_mut(&id) {
            slot.attached = Some(Attachment {
                export: export.to_owned(),
                released: rx,
            });
        }
        Self {
            shared: shared.clone(),
            id,
            _released: tx,
        }
    }
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.shared.conns.lock().get_mut(&self.id) {
            slot.attached = None;
            // An unexport that raced with this connection's NBD_OPT_GO is over for it:
            // the connection may go on negotiating other exports.
            slot.stop.send_if_modified(|s| {
                if *s == Stop::ExportClosed {
                    *s = Stop::Run;
                    true
                } else {
                    false
                }
            });
        }
    }
}

impl Shared {
    fn limiter(&self, export: &str) -> Arc<Limiter> {
        let mut map = self.limiters.lock();
        if let Some(l) = map.get(export).and_then(Weak::upgrade) {
            return l;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(Limiter::new());
        map.insert(export.to_owned(), Arc::downgrade(&l));
        l
    }
}

/// Reads and discards `n` bytes without allocating them.
async fn drain<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Runs a blocking closure on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(f).await
}

fn is_disconnect(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

#[cfg(test)]
mod tests;
