//! Running out of metadata space: the degraded state the engine enters when the file
//! system under the metadata store fills up, and how it leaves it by itself.
//!
//! ```text
//!          a commit fails with NoSpace                 a commit succeeds
//!   ok ───────────────────────────────▶ metadata full ─────────────────▶ ok
//!                                        │      ▲
//!                                        └──────┘ probes: every flush, the background
//!                                          commit timer, and a write that needs a fresh
//!                                          chunk once the back-off has passed
//! ```
//!
//! While the metadata is full:
//! - reads, and writes to chunks the volume head already owns (in place: no metadata
//!   changes), keep working;
//! - a write that needs a fresh chunk fails with [`EngineError::MetaFull`] before
//!   anything is reserved or written, and so do write-zeroes, discard, snapshots,
//!   creates, deletes, resizes, GC and flatten (`Engine::check_writable`): each needs a
//!   metadata write that cannot be made durable. NBD clients see `NBD_ENOSPC`, gRPC
//!   callers `RESOURCE_EXHAUSTED` with a message that says where to free space;
//! - a flush (and so a FUA write) fails the same way: what it was to make durable is not.
//!
//! Nothing is lost or misdirected. The batch of the failed commit and the chunk frees it
//! carried go back to the *front* of the overlay (`State::pending`, `State::pending_frees`),
//! ahead of anything added meanwhile, so the next commit writes them again in the same
//! order. Writing a batch twice is harmless (puts and deletes of fixed keys, in order), so
//! it does not matter whether the failed write reached the disk. No chunk such a batch
//! maps goes back to the allocator (the in-memory map entry still owns it), and its frees
//! are released only after a commit that succeeded (the rule of `commit.rs`). A write
//! acknowledged before the failure stays readable from the overlay and becomes durable
//! with the first commit that succeeds; a crash before that loses it, as any write no
//! successful flush covered may be lost.
//!
//! A control operation whose own commit is the one that fails returns `MetaFull` while
//! its change stays in the overlay: it becomes durable with the next successful commit
//! (a crash before that undoes it), and the same request retried afterwards finds it done
//! (every control operation is idempotent). While degraded, control operations are
//! refused before they change anything.
//!
//! Leaving the state: the engine's next probe commits the retained batch and clears the
//! state once the store accepts writes again. RocksDB stops its writes after a failed
//! WAL append and does not resume by itself when space is freed (its `SstFileManager`
//! recovery did not clear it, as tested): the RocksDB store reopens its database once
//! the file system has room (`meta::rocks`), and the probe's commit goes through. Probes from writes are spaced by an exponential back-off
//! ([`PROBE_BACKOFF_START`] to [`PROBE_BACKOFF_MAX`]) so that a stream of writes to a full
//! engine does not turn into a stream of doomed metadata writes.

use std::time::{Duration, Instant};

use crate::meta::{MetaError, WriteBatch};

use super::error::{EngineError, Result};
use super::state::State;
use super::Engine;

/// First delay between probes from writes after the metadata filled up.
pub const PROBE_BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest delay between probes from writes (RocksDB itself re-checks every 5 s).
pub const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The engine's metadata file system is full (see the module docs).
#[derive(Debug, Clone)]
pub struct MetaFull {
    /// When the first commit failed.
    pub since: Instant,
    /// The last error the metadata store gave.
    pub detail: String,
    /// A write that needs a fresh chunk probes (tries a commit) from then on.
    next_probe: Instant,
    backoff: Duration,
}

impl MetaFull {
    fn new(detail: String) -> Self {
        let now = Instant::now();
        MetaFull {
            since: now,
            detail,
            next_probe: now + PROBE_BACKOFF_START,
            backoff: PROBE_BACKOFF_START,
        }
    }

    /// Another failed commit: the next probe waits twice as long (up to the maximum).
    fn failed_again(&mut self, detail: String) {
        self.detail = detail;
        self.backoff = (self.backoff * 2).min(PROBE_BACKOFF_MAX);
        self.next_probe = Instant::now() + self.backoff;
    }

    /// The error operations that need metadata space get.
    pub fn error(&self) -> EngineError {
        EngineError::MetaFull {
            detail: self.detail.clone(),
        }
    }

    /// The pool health line (`blockctl pool show`).
    pub fn health(&self) -> String {
        format!(
            "degraded: metadata file system full for {}s ({}); writes to unallocated space fail until space is freed there",
            self.since.elapsed().as_secs(),
            self.detail
        )
    }
}

/// Whether a commit error means "the metadata file system is full". While already
/// degraded, any metadata error counts: RocksDB answers writes with its stored
/// background error (or a recovery status) until it has resumed.
fn is_meta_space_error(st: &State, err: &EngineError) -> bool {
    match err {
        EngineError::Meta(MetaError::NoSpace { .. }) => true,
        EngineError::Meta(_) => st.meta_full.is_some(),
        _ => false,
    }
}

impl Engine {
    /// Refuses operations that need metadata space while the metadata is full.
    pub(crate) fn check_meta_space(st: &State) -> Result<()> {
        match &st.meta_full {
            Some(full) => Err(full.error()),
            None => Ok(()),
        }
    }

    /// After a failed commit of `batch` and `frees`: when the failure is a full metadata
    /// file system, puts both back at the front of the overlay, enters (or stays in) the
    /// degraded state and returns the error for the caller; otherwise returns `None`
    /// and leaves everything to the fatal path.
    pub(crate) fn retain_after_meta_full(
        st: &mut State,
        err: &EngineError,
        batch: WriteBatch,
        frees: Vec<(usize, u64)>,
    ) -> Option<EngineError> {
        if !is_meta_space_error(st, err) {
            return None;
        }
        let mut retained = batch;
        retained.extend(std::mem::take(&mut st.pending));
        st.pending = retained;
        let mut retained_frees = frees;
        retained_frees.append(&mut st.pending_frees);
        st.pending_frees = retained_frees;
        let detail = match err {
            EngineError::Meta(MetaError::NoSpace { message, .. }) => message.clone(),
            other => other.to_string(),
        };
        match &mut st.meta_full {
            Some(full) => full.failed_again(detail),
            None => {
                tracing::error!(
                    error = %err,
                    pending = st.pending.len(),
                    "metadata file system full: writes to unallocated space fail until space is freed; the changes already acknowledged are kept in memory and committed once there is room"
                );
                st.meta_full = Some(MetaFull::new(detail));
            }
        }
        st.meta_full.as_ref().map(MetaFull::error)
    }

    /// After a successful commit: leaves the degraded state, if the engine was in it.
    pub(crate) fn meta_space_recovered(&self) {
        let mut st = self.inner().state.lock();
        if let Some(full) = st.meta_full.take() {
            tracing::info!(
                degraded_seconds = full.since.elapsed().as_secs(),
                "metadata file system has room again; writes to unallocated space resume"
            );
        }
    }

    /// Called by a write before it plans: while the metadata is full and the back-off has
    /// passed, tries a commit, which leaves the degraded state when it succeeds. Must be
    /// called holding no engine lock (a commit takes them).
    pub(crate) fn probe_meta_space(&self) {
        let due = {
            let mut st = self.inner().state.lock();
            match &mut st.meta_full {
                Some(full) if Instant::now() >= full.next_probe => {
                    // Claim this probe so that concurrent writers do not all try.
                    full.next_probe = Instant::now() + full.backoff;
                    true
                }
                _ => false,
            }
        };
        if due {
            // Its outcome is the state itself; the write that follows sees it.
            let _ = self.commit();
        }
    }
}
