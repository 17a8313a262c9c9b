//! Group commit and the background worker.
//!
//! A commit takes the overlay's pending batch and frees, flushes every dirty device, writes
//! the batch with `sync = true`, and only then releases the freed chunks (after punching
//! them, and after every I/O in flight on their pool has drained). Commits run on FLUSH,
//! on FUA, at every control-plane change, on a timer, and when the overlay grows large.
//!
//! The background worker runs the timer, GC passes, and resumes interrupted flattens.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::meta::Cf;

use super::error::{EngineError, Result};
use super::records::{self, Intent};
use super::Engine;

/// Pending map changes that trigger a commit without waiting for the timer.
const KICK_THRESHOLD: usize = 8192;

pub(crate) struct Background {
    tx: mpsc::Sender<Msg>,
    handle: Option<JoinHandle<()>>,
}

enum Msg {
    Kick,
    Stop,
}

impl Engine {
    /// Makes everything written so far durable: the data, then its mappings.
    pub fn flush(&self) -> Result<()> {
        self.commit()
    }

    /// Makes every mapping changed so far durable (with the data it points to), or
    /// returns at once when none is pending. Unlike [`Engine::flush`] it does not sync
    /// devices that only took in-place overwrites of committed chunks: those already
    /// survive a crash of this process (not of the machine), which is what a frontend
    /// that acknowledges writes without a journal of its own (ublk) needs before it
    /// answers. A commit already running when it is called has finished when it returns.
    pub fn commit_pending(&self) -> Result<()> {
        {
            let inner = self.inner();
            // Waits for a running commit: its batch is durable once we hold the lock.
            let _one = inner.commit_lock.lock();
            let st = inner.state.lock();
            if let Some(f) = &st.failed {
                return Err(EngineError::Failed(f.clone()));
            }
            if st.pending.is_empty() && st.pending_frees.is_empty() {
                return Ok(());
            }
        }
        self.commit()
    }

    /// Whether [`Engine::commit_pending`] would return at once: no commit running, no
    /// mapping waiting for one, the engine not failed. Never blocks, so a frontend can
    /// ask it on its I/O thread and hand the commit to a blocking thread only when needed.
    pub fn commit_idle(&self) -> bool {
        let inner = self.inner();
        let Some(_one) = inner.commit_lock.try_lock() else {
            return false;
        };
        let st = inner.state.lock();
        st.failed.is_none() && st.pending.is_empty() && st.pending_frees.is_empty()
    }

    /// One group commit (see the module docs). After a failure the engine is failed,
    /// except when the metadata file system is full: then the engine keeps the batch and
    /// runs degraded until a later commit succeeds (`meta_space`).
    pub fn commit(&self) -> Result<()> {
        let inner = self.inner();
        let _one = inner.commit_lock.lock();
        let (batch, frees, was_full) = {
            let mut st = inner.state.lock();
            if let Some(f) = &st.failed {
                return Err(EngineError::Failed(f.clone()));
            }
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.pending_frees),
                st.meta_full.is_some(),
            )
        };
        let result = (|| -> Result<()> {
            for pool in &inner.pools {
                if pool.dirty.swap(false, Ordering::SeqCst) {
                    pool.device.flush()?;
                }
            }
            if !batch.is_empty() {
                // A copy: a batch that fails for want of space is kept and written again
                // (`meta_space`). It is small next to the device flush before it.
                inner.meta.write(batch.clone(), true)?;
                inner.stats.commits.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })();
        if let Err(e) = result {
            let mut st = inner.state.lock();
            if let Some(full) = Self::retain_after_meta_full(&mut st, &e, batch, frees) {
                return Err(full);
            }
            let why = format!("commit failed: {e}");
            tracing::error!(error = %e, "commit failed; the engine refuses further changes until restarted");
            st.failed = Some(why);
            return Err(e);
        }
        if was_full {
            self.meta_space_recovered();
        }
        if frees.is_empty() {
            return Ok(());
        }
        // The frees are durable: wait until no I/O that may still touch them is in flight.
        for pool in &inner.pools {
            let mine: Vec<u64> = frees
                .iter()
                .filter(|(p, _)| *p == pool.idx)
                .map(|(_, c)| *c)
                .collect();
            if mine.is_empty() {
                continue;
            }
            drop(pool.reclaim.write());
            let mut released = Vec::with_capacity(mine.len());
            for chunk in mine {
                let ok = match pool.device.punch(pool.offset(chunk), pool.chunk_size) {
                    Ok(()) => true,
                    // A chunk that cannot be punched on a zeroing pool would break "free
                    // chunks read zeros": keep it allocated (a leak fsck reports) instead.
                    Err(e) if pool.zeroed_free => {
                        tracing::warn!(pool = %pool.name, chunk, error = %e, "punch failed; chunk withheld");
                        false
                    }
                    Err(_) => true,
                };
                if ok {
                    released.push(chunk);
                }
            }
            let mut st = inner.state.lock();
            for chunk in released {
                st.allocators[pool.idx].release(chunk);
            }
        }
        Ok(())
    }

    /// Asks the background worker for an early commit when the overlay is large.
    pub(crate) fn maybe_kick_commit(&self, pending: usize) {
        if pending >= KICK_THRESHOLD {
            if let Some(bg) = self.inner().background.lock().as_ref() {
                let _ = bg.tx.send(Msg::Kick);
            }
        }
    }

    /// Starts the background worker: commits every `interval`, GC passes, and resumption
    /// of interrupted flattens. Idempotent.
    pub fn start_background(&self, interval: Duration) {
        let mut slot = self.inner().background.lock();
        if slot.is_some() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let engine = self.clone();
        let handle = std::thread::Builder::new()
            .name("blockd-commit".into())
            .spawn(move || engine.background_loop(rx, interval))
            .expect("spawning the commit thread");
        *slot = Some(Background {
            tx,
            handle: Some(handle),
        });
    }

    fn background_loop(&self, rx: mpsc::Receiver<Msg>, interval: Duration) {
        self.resume_intents();
        loop {
            match rx.recv_timeout(interval) {
                Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Msg::Kick) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Err(e) = self.commit() {
                match e {
                    // Logged once when it started (`meta_space`); every retry would spam.
                    EngineError::MetaFull { .. } => {
                        tracing::debug!(error = %e, "metadata still full; commit retried later")
                    }
                    _ => tracing::error!(error = %e, "background commit failed"),
                }
                continue;
            }
            match self.gc() {
                Ok(s) if s.chunks_freed > 0 || s.lineages_removed > 0 => {
                    tracing::debug!(
                        freed = s.chunks_freed,
                        lineages = s.lineages_removed,
                        backlog = s.backlog,
                        "gc pass"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "gc pass failed"),
            }
        }
    }

    /// Resumes every flatten interrupted by a crash.
    pub fn resume_intents(&self) {
        let intents = match self.inner().meta.scan(Cf::Intents, &[], &[], usize::MAX) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot read intents");
                return;
            }
        };
        for (_, v) in intents {
            match records::decode::<Intent>(Cf::Intents, &v) {
                Ok(Intent::Flatten { lineage, .. }) => {
                    if let Err(e) = self.flatten_lineage(lineage, &mut |_, _| {}) {
                        tracing::error!(lineage, error = %e, "resuming flatten failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "undecodable intent"),
            }
        }
    }

    /// Stops background work and commits what is pending. The engine stays usable for
    /// reads; further writes are committed only by explicit flushes.
    pub fn shutdown(&self) -> Result<()> {
        let bg = self.inner().background.lock().take();
        if let Some(mut bg) = bg {
            let _ = bg.tx.send(Msg::Stop);
            if let Some(h) = bg.handle.take() {
                let _ = h.join();
            }
        }
        self.commit()
    }
}
