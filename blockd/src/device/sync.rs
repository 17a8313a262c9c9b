//! The pread/pwrite engine: the fallback when io_uring cannot be set up, and the engine
//! kept green in tests as the simplest correct reference.
//!
//! Each op of a batch runs to completion, in order, on the calling thread: aligned ops on
//! the O_DIRECT descriptor of the [`Target`], the others on its buffered descriptor (see
//! [`super::file`] for why there is no read-modify-write). A batch is range-checked as a
//! whole before any op runs, so an out-of-range request changes nothing.

use std::io;
use std::os::unix::fs::FileExt;

use super::file::Target;
use super::{check_range, BlockDevice, DeviceError, IoEngine, IoOp, Result};

/// A [`BlockDevice`] served by positional reads and writes on the calling thread.
#[derive(Debug)]
pub struct SyncDevice {
    target: Target,
}

impl SyncDevice {
    pub fn new(target: Target) -> Self {
        SyncDevice { target }
    }

    /// The file or block device behind this device.
    pub fn target(&self) -> &Target {
        &self.target
    }
}

impl BlockDevice for SyncDevice {
    fn size(&self) -> u64 {
        self.target.size()
    }

    fn engine(&self) -> IoEngine {
        IoEngine::Sync
    }

    fn raw_fds(&self) -> Option<super::RawFds> {
        Some(self.target.raw_fds())
    }

    fn punch_zeroes(&self) -> bool {
        self.target.punch_zeroes()
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        for op in ops.iter() {
            check_range(op.offset(), op.len() as u64, self.size())?;
        }
        for op in ops.iter_mut() {
            match op {
                IoOp::Read { offset, buf } => read_exact_at(&self.target, *offset, buf)
                    .map_err(|source| DeviceError::Io { op: "read", source })?,
                IoOp::Write { offset, buf } => {
                    write_all_at(&self.target, *offset, buf).map_err(|source| DeviceError::Io {
                        op: "write",
                        source,
                    })?
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.target.flush()
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        self.target.punch(offset, len)
    }
}

/// Reads all of `buf` at `offset`, choosing the descriptor per attempt: after a short
/// O_DIRECT transfer the remainder may no longer be aligned.
fn read_exact_at(target: &Target, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let file = target.file_for(offset, buf.as_ptr(), buf.len());
        match file.read_at(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Writes all of `buf` at `offset`, choosing the descriptor per attempt like
/// [`read_exact_at`].
fn write_all_at(target: &Target, mut offset: u64, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let file = target.file_for(offset, buf.as_ptr(), buf.len());
        match file.write_at(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::file::DirectIo;

    #[test]
    fn sync_engine_reports_itself() {
        let dir = tempfile::tempdir().unwrap();
        let dev = SyncDevice::new(Target::open(&dir.path().join("data"), Some(1 << 20)).unwrap());
        assert_eq!(dev.engine(), IoEngine::Sync);
        assert_eq!(dev.size(), 1 << 20);
        assert!(dev.punch_zeroes());
    }

    #[test]
    fn sync_buffered_only_target_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let target =
            Target::open_with(&dir.path().join("data"), Some(4 << 20), DirectIo::Off).unwrap();
        crate::device::tests::run_suite(&SyncDevice::new(target), true);
    }
}
