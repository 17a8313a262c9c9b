//! Per-volume operation serialisation.
//!
//! The CSI spec lets a plugin answer `ABORTED` when "there is already an operation pending
//! for the specified volume"; the orchestrator retries with backoff. Holding a key for the
//! length of one call, and refusing a second call on the same key instead of queueing it,
//! means a slow mkfs never piles up duplicate work behind it.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use tonic::Status;

/// The set of keys (volume or snapshot ids, or CSI names) with an operation in flight.
#[derive(Debug, Clone, Default)]
pub struct OpLocks {
    inflight: Arc<Mutex<HashSet<String>>>,
}

/// Releases its key when dropped, including on an early return or a cancelled call.
#[derive(Debug)]
pub struct OpGuard {
    inflight: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl OpLocks {
    /// Takes `key` for the caller, or `ABORTED` when another operation holds it.
    pub fn try_lock(&self, key: &str) -> Result<OpGuard, Status> {
        let mut inflight = self.inflight.lock();
        if !inflight.insert(key.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on {key:?} is already in progress; retry later"
            )));
        }
        Ok(OpGuard {
            inflight: Arc::clone(&self.inflight),
            key: key.to_string(),
        })
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.inflight.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_aborted_until_the_first_drops() {
        let locks = OpLocks::default();
        let first = locks.try_lock("n/v").unwrap();
        let err = locks.try_lock("n/v").unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
        let _other = locks.try_lock("n/w").unwrap();
        drop(first);
        locks.try_lock("n/v").unwrap();
    }
}
