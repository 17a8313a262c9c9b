//! The bridge between the engine and the NBD server: which images clients may open, and
//! how NBD requests become engine calls.
//!
//! Invariants:
//! - only images the API exported (`Engine::exported_images`, persisted) can be opened;
//!   everything else answers "unknown export", exactly like a name that does not exist;
//! - `VOL@SNAP` opens read-only; the engine refuses writes to it as well (defence in depth);
//! - every request is recorded in the per-image metrics (ops, bytes, latency, errors);
//! - QoS limits are read from the engine on every request, so `set_qos` applies at once.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{Engine, EngineError, ImageHandle};
use crate::metrics::{ImageIoMetrics, IoOp, Metrics};
use crate::nbd::{
    Errno, ExportListing, ExportRegistry, ExportTarget, Extent, ExtentKind, OpenError, ZeroMode,
};
use crate::qos::Qos;

/// Exported engine images, as the NBD server sees them.
#[derive(Clone)]
pub struct EngineExports {
    engine: Engine,
    metrics: Metrics,
}

impl std::fmt::Debug for EngineExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineExports")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl EngineExports {
    pub fn new(engine: Engine, metrics: Metrics) -> Self {
        EngineExports { engine, metrics }
    }
}

fn errno(e: &EngineError) -> Errno {
    Errno(e.errno())
}

impl ExportRegistry for EngineExports {
    fn open(&self, name: &str) -> Result<Arc<dyn ExportTarget>, OpenError> {
        if !self.engine.exported_images().iter().any(|n| n == name) {
            return Err(OpenError::NotFound);
        }
        let handle = match self.engine.open_image(name) {
            Ok(h) => h,
            Err(EngineError::NotFound { .. }) => return Err(OpenError::NotFound),
            Err(e) => return Err(OpenError::Io(errno(&e))),
        };
        Ok(Arc::new(EngineTarget {
            engine: self.engine.clone(),
            io: self.metrics.image_io(name),
            handle,
        }))
    }

    fn list(&self) -> Vec<ExportListing> {
        self.engine
            .exported_images()
            .into_iter()
            .map(|name| ExportListing {
                description: if name.contains('@') {
                    format!("blockd snapshot {name} (read-only)")
                } else {
                    format!("blockd volume {name}")
                },
                name,
            })
            .collect()
    }
}

/// One open image.
struct EngineTarget {
    engine: Engine,
    handle: ImageHandle,
    io: ImageIoMetrics,
}

impl EngineTarget {
    fn timed<T>(
        &self,
        op: IoOp,
        bytes: u64,
        f: impl FnOnce() -> Result<T, EngineError>,
    ) -> Result<T, Errno> {
        let start = Instant::now();
        match f() {
            Ok(v) => {
                self.io.record(op, bytes, start.elapsed());
                Ok(v)
            }
            Err(e) => {
                self.io.record_error(op);
                tracing::debug!(image = %self.handle.name(), error = %e, "NBD request failed");
                Err(errno(&e))
            }
        }
    }
}

impl ExportTarget for EngineTarget {
    fn size(&self) -> Result<u64, Errno> {
        self.engine.image_size(&self.handle).map_err(|e| errno(&e))
    }

    fn read_only(&self) -> bool {
        self.handle.read_only()
    }

    fn description(&self) -> String {
        format!("blockd image {}", self.handle.name())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let n = buf.len() as u64;
        self.timed(IoOp::Read, n, || {
            self.engine.read(&self.handle, offset, buf)
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.timed(IoOp::Write, data.len() as u64, || {
            self.engine.write(&self.handle, offset, data)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), Errno> {
        self.timed(IoOp::WriteZeroes, len, || match mode {
            // Holes read as zeros: whole chunks become holes, partial ones get zeros.
            ZeroMode::Punch => self.engine.write_zeroes(&self.handle, offset, len),
            // NO_HOLE: real zeros must stay allocated.
            ZeroMode::Allocate => {
                const STEP: u64 = 1 << 20;
                let zeros = vec![0u8; STEP.min(len) as usize];
                let mut done = 0;
                while done < len {
                    let n = STEP.min(len - done);
                    self.engine
                        .write(&self.handle, offset + done, &zeros[..n as usize])?;
                    done += n;
                }
                Ok(())
            }
        })
    }

    fn punch_is_fast(&self) -> bool {
        // Whole chunks are metadata-only; partial chunks need a small write, still fast.
        true
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.timed(IoOp::Trim, len, || {
            self.engine.discard(&self.handle, offset, len)
        })
    }

    fn flush(&self) -> Result<(), Errno> {
        self.timed(IoOp::Flush, 0, || self.engine.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        self.timed(IoOp::BlockStatus, 0, || {
            self.engine
                .block_status(&self.handle, offset, len)
                .map(|v| {
                    v.into_iter()
                        .map(|e| Extent {
                            len: e.len,
                            kind: if e.hole {
                                ExtentKind::Hole
                            } else {
                                ExtentKind::Data
                            },
                        })
                        .collect()
                })
        })
    }

    fn qos(&self) -> Qos {
        let q = self.engine.image_qos(&self.handle);
        Qos {
            max_iops: q.max_iops,
            max_bandwidth_bytes: q.max_bandwidth_bytes,
        }
    }
}
