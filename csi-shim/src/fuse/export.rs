//! The block device behind the FUSE file: the [`Export`] trait, the reconnecting NBD
//! export the server uses ([`NbdExport`]), and a disk in memory ([`MemoryExport`]) for
//! tests and the fuzz target.
//!
//! Invariants:
//! - [`Export::size`] is the size the export covers now; a request inside it is one the
//!   export accepts (the file system clamps and rejects against it);
//! - [`NbdExport`] completes a request or answers an errno: a transport error reconnects
//!   (a fresh handshake) and resends until `reconnect_timeout` has passed, then `EIO`;
//!   an error the NBD server answered is passed on as its errno (NBD errors are errnos).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::Errno;
use parking_lot::Mutex;

use crate::node::attach::nbd_client::{self as nbd, Connection};

/// An NBD command, by what it does to the export.
#[derive(Debug)]
pub enum Command<'a> {
    Read {
        offset: u64,
        buf: &'a mut [u8],
    },
    Write {
        offset: u64,
        data: &'a [u8],
    },
    Flush,
    /// Discard (`NBD_CMD_TRIM`): the range may read back as anything.
    Trim {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
    },
}

/// What [`super::ExportFile`] needs from the block device behind it.
pub trait Export: Send + 'static {
    /// The export's size in bytes: the file's size.
    fn size(&self) -> u64;
    /// The NBD transmission flags: which of flush, trim and write-zeroes it takes.
    fn flags(&self) -> u16;
    /// Learns a grown size, when there is one to learn (see the module docs of
    /// [`super`]); called before the file's size is reported.
    fn refresh_size(&mut self);
    /// Runs one command; `Err` is the errno the caller gets.
    fn run(&mut self, command: Command<'_>) -> Result<(), Errno>;
}

/// The NBD export csi-fuse-nbd serves: one connection, reconnected on transport errors.
#[derive(Debug)]
pub struct NbdExport {
    socket: PathBuf,
    export: String,
    size_file: Option<PathBuf>,
    reconnect_timeout: Duration,
    conn: Connection,
    /// A write's payload: the NBD client takes `&mut [u8]`, fuser lends `&[u8]`.
    scratch: Vec<u8>,
}

impl NbdExport {
    /// Connects to `export` on `socket`, retrying for `reconnect_timeout`.
    pub fn connect(
        socket: &Path,
        export: &str,
        size_file: Option<PathBuf>,
        reconnect_timeout: Duration,
    ) -> io::Result<Self> {
        let conn = open(socket, export, reconnect_timeout)?;
        Ok(NbdExport {
            socket: socket.to_path_buf(),
            export: export.to_string(),
            size_file,
            reconnect_timeout,
            conn,
            scratch: Vec::new(),
        })
    }

    /// One NBD request, reconnecting and resending on a transport error.
    fn request(
        &mut self,
        kind: nbd::Command,
        offset: u64,
        length: u32,
        data: &mut [u8],
    ) -> Result<(), Errno> {
        let deadline = Instant::now() + self.reconnect_timeout;
        loop {
            match self.conn.request(kind, offset, length, data) {
                Ok(0) => return Ok(()),
                Ok(error) => return Err(Errno::from_i32(i32::try_from(error).unwrap_or(0))),
                Err(err) => {
                    tracing::warn!(error = %err, kind = ?kind, offset, length, "NBD request failed; reconnecting");
                    if Instant::now() > deadline {
                        return Err(Errno::EIO);
                    }
                    match open(&self.socket, &self.export, self.reconnect_timeout) {
                        Ok(conn) => self.conn = conn,
                        Err(err) => {
                            tracing::error!(error = %err, socket = %self.socket.display(), "cannot reconnect; failing the request with EIO");
                            return Err(Errno::EIO);
                        }
                    }
                }
            }
        }
    }
}

/// Opens `export` on `socket`, retrying until `timeout` has passed.
fn open(socket: &Path, export: &str, timeout: Duration) -> io::Result<Connection> {
    let deadline = Instant::now() + timeout;
    loop {
        match Connection::open(socket, export) {
            Ok(conn) => return Ok(conn),
            Err(err) if Instant::now() < deadline => {
                tracing::warn!(socket = %socket.display(), error = %err, "cannot connect; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(err) => return Err(err),
        }
    }
}

impl Export for NbdExport {
    fn size(&self) -> u64 {
        self.conn.size
    }

    fn flags(&self) -> u16 {
        self.conn.flags
    }

    fn refresh_size(&mut self) {
        let Some(size_file) = &self.size_file else {
            return;
        };
        // Absent or unreadable: csi-shim has not asked for a size yet.
        let wanted = std::fs::read_to_string(size_file)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if wanted <= self.conn.size {
            return;
        }
        match open(&self.socket, &self.export, self.reconnect_timeout) {
            Ok(conn) => {
                tracing::info!(
                    from = self.conn.size,
                    to = conn.size,
                    wanted,
                    "export size refreshed"
                );
                self.conn = conn;
            }
            Err(err) => tracing::warn!(error = %err, wanted, "cannot refresh the export size"),
        }
    }

    fn run(&mut self, command: Command<'_>) -> Result<(), Errno> {
        match command {
            Command::Read { offset, buf } => {
                let len = u32::try_from(buf.len()).map_err(|_| Errno::EINVAL)?;
                self.request(nbd::Command::Read, offset, len, buf)
            }
            Command::Write { offset, data } => {
                let len = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
                let mut scratch = std::mem::take(&mut self.scratch);
                scratch.clear();
                scratch.extend_from_slice(data);
                let result = self.request(nbd::Command::Write, offset, len, &mut scratch);
                self.scratch = scratch;
                result
            }
            Command::Flush => self.request(nbd::Command::Flush, 0, 0, &mut []),
            Command::Trim { offset, len } => self.request(nbd::Command::Trim, offset, len, &mut []),
            Command::WriteZeroes { offset, len } => {
                self.request(nbd::Command::WriteZeroes, offset, len, &mut [])
            }
        }
    }
}

/// A disk in memory, shared with whoever holds a [`MemoryExport::disk`] handle: growing
/// that vector grows the export at its next [`Export::refresh_size`], as a grown NBD
/// export does at its next handshake. For tests and the fuzz target.
#[derive(Debug, Clone)]
pub struct MemoryExport {
    disk: Arc<Mutex<Vec<u8>>>,
    size: u64,
    flags: u16,
}

impl MemoryExport {
    /// A zeroed disk of `size` bytes that takes flush, trim and write-zeroes.
    pub fn new(size: usize) -> Self {
        MemoryExport {
            disk: Arc::new(Mutex::new(vec![0; size])),
            size: size as u64,
            flags: nbd::SEND_FLUSH | nbd::SEND_TRIM | nbd::SEND_WRITE_ZEROES,
        }
    }

    /// The same disk, advertising only `flags` (NBD transmission flags).
    pub fn with_flags(mut self, flags: u16) -> Self {
        self.flags = flags;
        self
    }

    /// The disk's bytes.
    pub fn disk(&self) -> Arc<Mutex<Vec<u8>>> {
        Arc::clone(&self.disk)
    }

    /// The disk range `offset..offset + len`, if the export covers it (and the disk,
    /// which a holder of [`MemoryExport::disk`] may have shrunk: then `ENOSPC`).
    fn range(&self, disk: &[u8], offset: u64, len: usize) -> Result<std::ops::Range<usize>, Errno> {
        let start = usize::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let end = start.checked_add(len).ok_or(Errno::EINVAL)?;
        if end as u64 > self.size || end > disk.len() {
            return Err(Errno::ENOSPC);
        }
        Ok(start..end)
    }
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> u16 {
        self.flags
    }

    fn refresh_size(&mut self) {
        self.size = self.disk.lock().len() as u64;
    }

    fn run(&mut self, command: Command<'_>) -> Result<(), Errno> {
        let mut disk = self.disk.lock();
        match command {
            Command::Read { offset, buf } => {
                let range = self.range(&disk, offset, buf.len())?;
                buf.copy_from_slice(&disk[range]);
            }
            Command::Write { offset, data } => {
                let range = self.range(&disk, offset, data.len())?;
                disk[range].copy_from_slice(data);
            }
            Command::Flush => {}
            Command::Trim { offset, len } | Command::WriteZeroes { offset, len } => {
                let range = self.range(&disk, offset, len as usize)?;
                disk[range].fill(0);
            }
        }
        Ok(())
    }
}
