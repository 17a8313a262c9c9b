//! A sparse in-memory export and registry, for tests and the `nbd-memserver` binary.
//!
//! [`MemExport`] keeps 4 KiB blocks in a map behind one mutex: a missing block is a hole
//! (reads as zeros, reported `NBD_STATE_HOLE | NBD_STATE_ZERO`), a present all-zero block
//! is allocated zeros (`NBD_STATE_ZERO`), anything else is data. It counts flushes and can
//! be told to fail writes, so server tests can check FUA, multi-conn flushes and errno
//! mapping. [`MemRegistry`] maps names to exports and can add and remove them at runtime.
//!
//! Invariants: every stored block is exactly [`BLOCK`] bytes and lies inside the export;
//! `write_zeroes(Punch)` and `discard` only drop whole blocks (partial blocks are zeroed in
//! place by `write_zeroes` and left alone by `discard`, which is only a hint).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    Errno, ExportListing, ExportRegistry, ExportTarget, Extent, ExtentKind, OpenError, ZeroMode,
};
use crate::qos::Qos;

/// Block size of the in-memory store.
pub const BLOCK: u64 = 4096;

/// A sparse in-memory export.
#[derive(Debug)]
pub struct MemExport {
    size: AtomicU64,
    read_only: bool,
    description: String,
    blocks: Mutex<HashMap<u64, Box<[u8]>>>,
    qos: Mutex<Qos>,
    flushes: AtomicU64,
    fail_writes: Mutex<Option<Errno>>,
    punch_is_fast: bool,
    nonblocking: bool,
}

impl MemExport {
    /// An empty (all-hole) export of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size: AtomicU64::new(size),
            read_only: false,
            description: String::new(),
            blocks: Mutex::new(HashMap::new()),
            qos: Mutex::new(Qos::UNLIMITED),
            flushes: AtomicU64::new(0),
            fail_writes: Mutex::new(None),
            punch_is_fast: true,
            nonblocking: false,
        }
    }

    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Whether punching counts as fast for `NBD_CMD_FLAG_FAST_ZERO` (default true).
    pub fn with_fast_punch(mut self, fast: bool) -> Self {
        self.punch_is_fast = fast;
        self
    }

    /// Whether to let the server call this export inline ([`ExportTarget::nonblocking`]).
    /// Off by default so that tests exercise the blocking-pool path the engine uses.
    pub fn with_inline_calls(mut self, inline: bool) -> Self {
        self.nonblocking = inline;
        self
    }

    /// Grows the export to `size` bytes (a smaller size is ignored), as a volume grows
    /// while clients are connected.
    pub fn grow(&self, size: u64) {
        self.size.fetch_max(size, Ordering::Relaxed);
    }

    /// Changes the QoS limits; applies to the next request.
    pub fn set_qos(&self, qos: Qos) {
        *self.qos.lock() = qos;
    }

    /// Makes every later write-like call fail with `errno` (None: succeed again).
    pub fn fail_writes(&self, errno: Option<Errno>) {
        *self.fail_writes.lock() = errno;
    }

    /// How many times `flush` was called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.blocks.lock().len()
    }

    /// Copies the export's bytes in `[offset, offset + len)` (test helper).
    pub fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.copy_out(offset, &mut buf);
        buf
    }

    fn check_write(&self) -> Result<(), Errno> {
        if self.read_only {
            return Err(Errno::EPERM);
        }
        match *self.fail_writes.lock() {
            Some(errno) => Err(errno),
            None => Ok(()),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Errno> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size.load(Ordering::Relaxed) => Ok(()),
            _ => Err(Errno::EINVAL),
        }
    }

    fn copy_out(&self, offset: u64, buf: &mut [u8]) {
        let blocks = self.blocks.lock();
        for_each_piece(offset, buf.len() as u64, |block, within, pos, n| {
            let dst = &mut buf[pos..pos + n];
            match blocks.get(&block) {
                Some(data) => dst.copy_from_slice(&data[within..within + n]),
                None => dst.fill(0),
            }
        });
    }
}

/// Calls `f(block index, offset within block, position in the range, length)` for each
/// piece of `[offset, offset + len)` cut at block boundaries.
fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut pos = 0u64;
    while pos < len {
        let abs = offset + pos;
        let block = abs / BLOCK;
        let within = abs % BLOCK;
        let n = (BLOCK - within).min(len - pos);
        f(block, within as usize, pos as usize, n as usize);
        pos += n;
    }
}

impl ExportTarget for MemExport {
    fn size(&self) -> Result<u64, Errno> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.check_range(offset, buf.len() as u64)?;
        self.copy_out(offset, buf);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.check_write()?;
        self.check_range(offset, data.len() as u64)?;
        let mut blocks = self.blocks.lock();
        for_each_piece(offset, data.len() as u64, |block, within, pos, n| {
            let stored = blocks
                .entry(block)
                .or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice());
            stored[within..within + n].copy_from_slice(&data[pos..pos + n]);
        });
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), Errno> {
        self.check_write()?;
        self.check_range(offset, len)?;
        let mut blocks = self.blocks.lock();
        for_each_piece(offset, len, |block, within, _, n| {
            let whole = n as u64 == BLOCK;
            match (mode, whole) {
                (ZeroMode::Punch, true) => {
                    blocks.remove(&block);
                }
                (ZeroMode::Allocate, _) => {
                    let stored = blocks
                        .entry(block)
                        .or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice());
                    stored[within..within + n].fill(0);
                }
                (ZeroMode::Punch, false) => {
                    // A hole already reads as zeros; only allocated blocks need zeroing.
                    if let Some(stored) = blocks.get_mut(&block) {
                        stored[within..within + n].fill(0);
                    }
                }
            }
        });
        Ok(())
    }

    fn punch_is_fast(&self) -> bool {
        self.punch_is_fast
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.check_write()?;
        self.check_range(offset, len)?;
        let mut blocks = self.blocks.lock();
        for_each_piece(offset, len, |block, _, _, n| {
            if n as u64 == BLOCK {
                blocks.remove(&block);
            }
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), Errno> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        self.check_range(offset, len)?;
        let blocks = self.blocks.lock();
        let mut out: Vec<Extent> = Vec::new();
        for_each_piece(offset, len, |block, _, _, n| {
            let kind = match blocks.get(&block) {
                None => ExtentKind::Hole,
                Some(data) if data.iter().all(|b| *b == 0) => ExtentKind::Zero,
                Some(_) => ExtentKind::Data,
            };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.len += n as u64,
                _ => out.push(Extent {
                    len: n as u64,
                    kind,
                }),
            }
        });
        Ok(out)
    }

    fn qos(&self) -> Qos {
        *self.qos.lock()
    }

    fn nonblocking(&self) -> bool {
        self.nonblocking
    }
}

/// A registry of in-memory exports, changeable at runtime.
#[derive(Debug, Default)]
pub struct MemRegistry {
    exports: Mutex<BTreeMap<String, Arc<MemExport>>>,
}

impl MemRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) export `name`.
    pub fn insert(&self, name: impl Into<String>, export: MemExport) -> Arc<MemExport> {
        let export = Arc::new(export);
        self.exports.lock().insert(name.into(), export.clone());
        export
    }

    /// Removes export `name`; existing connections keep their handle until closed.
    pub fn remove(&self, name: &str) -> Option<Arc<MemExport>> {
        self.exports.lock().remove(name)
    }

    pub fn get(&self, name: &str) -> Option<Arc<MemExport>> {
        self.exports.lock().get(name).cloned()
    }
}

impl ExportRegistry for MemRegistry {
    fn open(&self, name: &str) -> Result<Arc<dyn ExportTarget>, OpenError> {
        match self.exports.lock().get(name) {
            Some(export) => Ok(export.clone()),
            None => Err(OpenError::NotFound),
        }
    }

    fn list(&self) -> Vec<ExportListing> {
        self.exports
            .lock()
            .iter()
            .map(|(name, export)| ExportListing {
                name: name.clone(),
                description: export.description.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_read_write_and_status() {
        let e = MemExport::new(10 * BLOCK);
        e.write(1000, &[0xab; 7000]).unwrap();
        let mut buf = vec![0u8; 9000];
        e.read(0, &mut buf).unwrap();
        assert!(buf[..1000].iter().all(|b| *b == 0));
        assert!(buf[1000..8000].iter().all(|b| *b == 0xab));
        assert!(buf[8000..].iter().all(|b| *b == 0));
        assert_eq!(
            e.block_status(0, 10 * BLOCK).unwrap(),
            vec![
                Extent {
                    len: 2 * BLOCK,
                    kind: ExtentKind::Data
                },
                Extent {
                    len: 8 * BLOCK,
                    kind: ExtentKind::Hole
                },
            ]
        );
    }

    #[test]
    fn zeroing_modes() {
        let e = MemExport::new(4 * BLOCK);
        e.write(0, &[1; 4 * BLOCK as usize]).unwrap();
        e.write_zeroes(0, BLOCK, ZeroMode::Punch).unwrap();
        e.write_zeroes(BLOCK, BLOCK, ZeroMode::Allocate).unwrap();
        e.write_zeroes(2 * BLOCK + 10, 20, ZeroMode::Punch).unwrap();
        let kinds: Vec<_> = e
            .block_status(0, 4 * BLOCK)
            .unwrap()
            .iter()
            .map(|x| x.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![ExtentKind::Hole, ExtentKind::Zero, ExtentKind::Data]
        );
        assert_eq!(e.snapshot(2 * BLOCK + 5, 30)[5..25], [0u8; 20]);
    }

    #[test]
    fn read_only_and_injected_errors() {
        let e = MemExport::new(BLOCK).read_only(true);
        assert_eq!(e.write(0, &[1]), Err(Errno::EPERM));
        let e = MemExport::new(BLOCK);
        e.fail_writes(Some(Errno::ENOSPC));
        assert_eq!(e.write(0, &[1]), Err(Errno::ENOSPC));
        assert_eq!(e.read(BLOCK, &mut [0u8; 1]), Err(Errno::EINVAL));
    }
}
