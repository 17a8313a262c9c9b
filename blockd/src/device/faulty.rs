//! A fault-injecting wrapper: every I/O after the N-th fails, as in SPDK's power-failure
//! tests.
//!
//! Each read, write, flush and punch counts one tick of the shared [`FaultClock`] before
//! it reaches the inner device; once the clock has tripped, the I/O fails with
//! [`DeviceError::Injected`] and never reaches the inner device. In a batch, the ops before
//! the first failing tick are executed (as one batch) and the rest are not, like a disk
//! that stops in the middle of a queue.
//!
//! Sharing the clock with a fault-injecting metadata store makes "the N-th I/O of the whole
//! system" the crash point; a crash test then reboots onto the durable contents of the
//! inner device (e.g. [`super::mem::MemDevice::clone_durable`]).

use std::sync::Arc;

use crate::fault::FaultClock;

use super::{BlockDevice, DeviceError, IoEngine, IoOp, Result};

/// Wraps a device and fails every I/O once its [`FaultClock`] has tripped.
#[derive(Debug)]
pub struct FaultyDevice {
    inner: Arc<dyn BlockDevice>,
    clock: Arc<FaultClock>,
}

impl FaultyDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, clock: Arc<FaultClock>) -> Self {
        FaultyDevice { inner, clock }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    /// The clock deciding when I/O starts failing.
    pub fn clock(&self) -> &Arc<FaultClock> {
        &self.clock
    }

    fn tick(&self) -> Result<()> {
        self.clock
            .tick()
            .map_err(|after| DeviceError::Injected { after })
    }
}

impl BlockDevice for FaultyDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn engine(&self) -> IoEngine {
        self.inner.engine()
    }

    fn punch_zeroes(&self) -> bool {
        self.inner.punch_zeroes()
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        // Stop ticking at the first failure: later ops are not issued at all.
        let mut failure = None;
        let mut allowed = 0;
        for _ in ops.iter() {
            match self.tick() {
                Ok(()) => allowed += 1,
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            }
        }
        if allowed > 0 {
            self.inner.submit(&mut ops[..allowed])?;
        }
        failure.map_or(Ok(()), Err)
    }

    fn flush(&self) -> Result<()> {
        self.tick()?;
        self.inner.flush()
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        self.tick()?;
        self.inner.punch(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::mem::MemDevice;

    fn setup(fail_after: Option<u64>) -> (Arc<MemDevice>, FaultyDevice) {
        let mem = Arc::new(MemDevice::new(crate::device::tests::MIN_SIZE));
        let clock = Arc::new(FaultClock::new());
        clock.arm(fail_after);
        let faulty = FaultyDevice::new(mem.clone(), clock);
        (mem, faulty)
    }

    #[test]
    fn faulty_fails_exactly_after_n_ticks() {
        for n in 1..6u64 {
            let (mem, dev) = setup(Some(n));
            let mut completed = 0;
            let err = loop {
                match dev.write_at(completed * 10, &[1; 10]) {
                    Ok(()) => completed += 1,
                    Err(err) => break err,
                }
            };
            assert_eq!(completed, n);
            assert!(matches!(err, DeviceError::Injected { after } if after == n));
            assert_eq!(err.errno(), libc::EIO);
            assert!(dev.clock().tripped());
            // Every later I/O fails too and never reaches the device.
            assert!(matches!(dev.flush(), Err(DeviceError::Injected { .. })));
            assert!(matches!(
                dev.punch(0, 10),
                Err(DeviceError::Injected { .. })
            ));
            let mut back = [0u8; 10];
            assert!(dev.read_at(0, &mut back).is_err());
            let mut check = vec![0u8; 100];
            mem.read_at(0, &mut check).unwrap();
            assert_eq!(check.iter().filter(|&&b| b == 1).count() as u64, n * 10);
        }
    }

    #[test]
    fn faulty_batch_executes_only_the_ops_before_the_failing_tick() {
        let (mem, dev) = setup(Some(3));
        dev.flush().unwrap(); // tick 1
        let bufs: Vec<[u8; 4]> = (1..=4).map(|i| [i; 4]).collect();
        let mut ops: Vec<IoOp<'_>> = bufs
            .iter()
            .enumerate()
            .map(|(i, buf)| IoOp::Write {
                offset: i as u64 * 4,
                buf,
            })
            .collect();
        // Ticks 2 and 3 pass, tick 4 fails: ops 0 and 1 land, 2 and 3 do not.
        assert!(matches!(
            dev.submit(&mut ops),
            Err(DeviceError::Injected { after: 3 })
        ));
        let mut back = [0u8; 16];
        mem.read_at(0, &mut back).unwrap();
        assert_eq!(back, [1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(dev.clock().ticks(), 4);
    }

    #[test]
    fn faulty_disarmed_passes_everything_through() {
        let (mem, dev) = setup(None);
        assert_eq!(dev.engine(), IoEngine::Memory);
        assert_eq!(dev.size(), mem.size());
        assert!(dev.punch_zeroes());
        crate::device::tests::run_suite(&dev, true);
        assert!(!dev.clock().tripped());
    }

    #[test]
    fn faulty_crash_then_reboot_onto_durable_contents() {
        let (mem, dev) = setup(Some(3));
        dev.write_at(0, b"flushed").unwrap();
        dev.flush().unwrap();
        dev.write_at(100, b"cached").unwrap();
        assert!(dev.write_at(200, b"refused").is_err());
        let rebooted = mem.clone_durable();
        let mut back = [0u8; 7];
        rebooted.read_at(0, &mut back).unwrap();
        assert_eq!(&back, b"flushed");
        rebooted.read_at(100, &mut back[..6]).unwrap();
        assert_eq!(&back[..6], &[0; 6]);
    }
}
