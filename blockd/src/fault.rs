//! A shared fault clock for crash simulation (tests only, but compiled always so that the
//! fault-injecting backends are real code paths, not test-only forks).
//!
//! Every I/O of a fault-injecting device and every write of a fault-injecting metadata
//! store calls [`FaultClock::tick`]; once `fail_after` ticks have passed, every further
//! tick fails. Sharing one clock between device and metadata reproduces SPDK's
//! "fail every I/O after the N-th" across both halves of the system.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct FaultClock {
    ticks: AtomicU64,
    /// 0 means "never fail".
    fail_after: AtomicU64,
}

impl FaultClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails every tick after the `n`-th from now on (n >= 1); `None` disarms.
    pub fn arm(&self, n: Option<u64>) {
        self.ticks.store(0, Ordering::SeqCst);
        self.fail_after.store(n.unwrap_or(0), Ordering::SeqCst);
    }

    /// Counts one I/O; returns `Err(n)` when it must fail (n = the armed limit).
    pub fn tick(&self) -> Result<(), u64> {
        let limit = self.fail_after.load(Ordering::SeqCst);
        let t = self.ticks.fetch_add(1, Ordering::SeqCst) + 1;
        if limit != 0 && t > limit {
            Err(limit)
        } else {
            Ok(())
        }
    }

    /// How many ticks were counted since the last `arm`.
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::SeqCst)
    }

    /// Whether the clock has started failing.
    pub fn tripped(&self) -> bool {
        let limit = self.fail_after.load(Ordering::SeqCst);
        limit != 0 && self.ticks() > limit
    }
}
