//! In-memory metadata store with crash simulation and fault injection.
//!
//! [`MemStore`] keeps one `BTreeMap` per column family under a `parking_lot::RwLock`, and
//! models durability the way RocksDB's WAL does:
//!
//! ```text
//!   durable tables  +  [unsynced batch 1, unsynced batch 2, ...]  =  visible tables
//!                      '---- a crash keeps some prefix of these ---'
//! ```
//!
//! - `write(batch, sync = false)` is visible to readers at once and appended to the
//!   unsynced list;
//! - `write(batch, sync = true)` makes itself and every unsynced batch before it durable
//!   (a WAL sync covers everything written before it);
//! - RocksDB may also make unsynced batches durable on its own (the WAL is a file the OS
//!   writes back whenever it likes), but only whole batches and only in order, so
//!   [`MemStore::crash_copy`] keeps the durable state plus a *prefix* of the unsynced
//!   batches, never a torn or reordered one.
//!
//! Invariants: `visible == durable + every unsynced batch applied in order`; a batch is
//! applied wholly or not at all (a tripped [`FaultClock`] rejects it before anything
//! changes). Reads never fail, even once the clock has tripped: the fault models a
//! crash of the write path, and what was acknowledged before it stays readable.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use super::{BatchOp, Cf, Kv, MetaError, MetaStore, Result, WriteBatch};
use crate::fault::FaultClock;

/// One ordered table per column family, indexed by [`slot`].
type Tables = [BTreeMap<Vec<u8>, Vec<u8>>; Cf::ALL.len()];

/// The table index of a column family.
fn slot(cf: Cf) -> usize {
    match cf {
        Cf::Meta => 0,
        Cf::Pools => 1,
        Cf::Images => 2,
        Cf::Lineages => 3,
        Cf::Map => 4,
        Cf::Intents => 5,
    }
}

/// Applies every operation of `batch` to `tables`, in order.
fn apply(tables: &mut Tables, batch: &WriteBatch) {
    for op in &batch.ops {
        match op {
            BatchOp::Put { cf, key, value } => {
                tables[slot(*cf)].insert(key.clone(), value.clone());
            }
            BatchOp::Delete { cf, key } => {
                tables[slot(*cf)].remove(key);
            }
        }
    }
}

/// A deterministic 64-bit mix of `seed` (splitmix64), so that `crash_copy` needs no RNG
/// dependency outside tests and the same seed always picks the same crash point.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Default, Clone)]
struct State {
    /// What survives any crash.
    durable: Tables,
    /// `durable` with every unsynced batch applied: what readers see.
    visible: Tables,
    /// Batches written with `sync = false` since the last synced write, oldest first.
    unsynced: Vec<WriteBatch>,
}

/// An in-memory [`MetaStore`] that can simulate crashes (see the module docs).
pub struct MemStore {
    state: RwLock<State>,
    /// When set, every write ticks it first and fails once it has tripped.
    faults: Option<Arc<FaultClock>>,
    /// The file system is full: every write fails with [`MetaError::NoSpace`].
    full: AtomicBool,
}

impl MemStore {
    /// Creates an empty store that never fails.
    pub fn new() -> Self {
        Self {
            state: RwLock::new(State::default()),
            faults: None,
            full: AtomicBool::new(false),
        }
    }

    /// Creates an empty store whose writes tick `clock` and fail once it has tripped.
    pub fn with_faults(clock: Arc<FaultClock>) -> Self {
        Self {
            state: RwLock::new(State::default()),
            faults: Some(clock),
            full: AtomicBool::new(false),
        }
    }

    /// Makes every later write fail with [`MetaError::NoSpace`] (`true`) or succeed again
    /// (`false`), as a file system that filled up and then got space back.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    /// How many batches were written with `sync = false` since the last synced write.
    pub fn unsynced_len(&self) -> usize {
        self.state.read().unsynced.len()
    }

    /// The store as it would be after a crash: the durable state plus a prefix of the
    /// unsynced batches whose length is chosen by `seed` (anything from none to all).
    pub fn crash_copy(&self, seed: u64) -> MemStore {
        let state = self.state.read();
        // `len + 1` choices: keep 0..=len batches. The cast cannot truncate: the result
        // is at most `len`, a usize.
        let kept = (mix(seed) % (state.unsynced.len() as u64 + 1)) as usize;
        Self::recovered(&state, kept)
    }

    /// The store as it would be after a crash that kept exactly the first `kept` unsynced
    /// batches (clamped to [`unsynced_len`](Self::unsynced_len)); lets a test walk every
    /// crash point instead of sampling them.
    pub fn crash_copy_at(&self, kept: usize) -> MemStore {
        let state = self.state.read();
        Self::recovered(&state, kept.min(state.unsynced.len()))
    }

    /// The store as it would be after a crash that lost every unsynced batch.
    pub fn durable_copy(&self) -> MemStore {
        self.crash_copy_at(0)
    }

    /// A fresh store holding `durable` plus `unsynced[..kept]`, all of it durable (it is
    /// what a restarted daemon reads back from disk). It has no fault clock.
    fn recovered(state: &State, kept: usize) -> MemStore {
        let mut tables = state.durable.clone();
        for batch in &state.unsynced[..kept] {
            apply(&mut tables, batch);
        }
        MemStore {
            state: RwLock::new(State {
                durable: tables.clone(),
                visible: tables,
                unsynced: Vec::new(),
            }),
            faults: None,
            full: AtomicBool::new(false),
        }
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemStore {
    // Not derived: dumping every key of a test pool would drown the output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.read();
        let keys: Vec<(&str, usize)> = Cf::ALL
            .iter()
            .map(|cf| (cf.name(), state.visible[slot(*cf)].len()))
            .collect();
        f.debug_struct("MemStore")
            .field("keys", &keys)
            .field("unsynced_batches", &state.unsynced.len())
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

impl MetaStore for MemStore {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.state.read().visible[slot(cf)].get(key).cloned())
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        if let Some(clock) = &self.faults {
            clock
                .tick()
                .map_err(|after| MetaError::Injected { after })?;
        }
        if self.full.load(Ordering::SeqCst) {
            return Err(MetaError::NoSpace {
                op: "write",
                message: "No space left on device (simulated)".into(),
            });
        }
        let mut state = self.state.write();
        apply(&mut state.visible, &batch);
        if sync {
            // A WAL sync persists everything written before it, in order.
            let unsynced = std::mem::take(&mut state.unsynced);
            for earlier in &unsynced {
                apply(&mut state.durable, earlier);
            }
            apply(&mut state.durable, &batch);
        } else if !batch.is_empty() {
            state.unsynced.push(batch);
        }
        Ok(())
    }

    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Kv>> {
        // `BTreeMap::range` panics on an inverted range; an inverted or empty range simply
        // holds nothing.
        if limit == 0 || (!end.is_empty() && start >= end) {
            return Ok(Vec::new());
        }
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        let state = self.state.read();
        Ok(state.visible[slot(cf)]
            .range::<[u8], _>((Bound::Included(start), upper))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn seek_for_prev(&self, cf: Cf, key: &[u8]) -> Result<Option<Kv>> {
        let state = self.state.read();
        Ok(state.visible[slot(cf)]
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(k, v)| (k.clone(), v.clone())))
    }
}

#[cfg(test)]
mod tests {
    //! Crash and fault behaviour specific to the in-memory store; the behaviour every
    //! store shares is in `meta::conformance`.

    use super::*;

    fn put(key: &[u8], value: &[u8]) -> WriteBatch {
        let mut b = WriteBatch::new();
        b.put_cf(Cf::Images, key, value);
        b
    }

    fn get(store: &MemStore, key: &[u8]) -> Option<Vec<u8>> {
        store.get(Cf::Images, key).unwrap()
    }

    #[test]
    fn unsynced_writes_are_visible_but_lost_by_durable_copy() {
        let store = MemStore::new();
        store.write(put(b"a", b"1"), true).unwrap();
        store.write(put(b"b", b"2"), false).unwrap();
        store.write(put(b"a", b"3"), false).unwrap();
        assert_eq!(get(&store, b"a").as_deref(), Some(&b"3"[..]));
        assert_eq!(get(&store, b"b").as_deref(), Some(&b"2"[..]));
        assert_eq!(store.unsynced_len(), 2);

        let crashed = store.durable_copy();
        assert_eq!(get(&crashed, b"a").as_deref(), Some(&b"1"[..]));
        assert_eq!(get(&crashed, b"b"), None);
        assert_eq!(crashed.unsynced_len(), 0);
        // The original is untouched by taking a copy.
        assert_eq!(get(&store, b"a").as_deref(), Some(&b"3"[..]));
    }

    #[test]
    fn synced_write_makes_every_earlier_batch_durable() {
        let store = MemStore::new();
        store.write(put(b"a", b"1"), false).unwrap();
        let mut del = WriteBatch::new();
        del.delete_cf(Cf::Images, b"a".to_vec());
        del.put_cf(Cf::Pools, b"p".to_vec(), b"x".to_vec());
        store.write(del, false).unwrap();
        store.write(put(b"c", b"3"), true).unwrap();
        assert_eq!(store.unsynced_len(), 0);

        let crashed = store.durable_copy();
        assert_eq!(get(&crashed, b"a"), None);
        assert_eq!(
            crashed.get(Cf::Pools, b"p").unwrap().as_deref(),
            Some(&b"x"[..])
        );
        assert_eq!(get(&crashed, b"c").as_deref(), Some(&b"3"[..]));
    }

    #[test]
    fn empty_synced_batch_is_a_barrier() {
        let store = MemStore::new();
        store.write(put(b"a", b"1"), false).unwrap();
        store.write(WriteBatch::new(), true).unwrap();
        assert_eq!(get(&store.durable_copy(), b"a").as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn crash_copy_keeps_a_prefix_of_unsynced_batches() {
        let store = MemStore::new();
        store.write(put(b"base", b"0"), true).unwrap();
        // Batch i puts key i and overwrites "last" with i: a prefix of length n shows keys
        // 0..n and "last" == n - 1, whatever else a torn or reordered replay would show.
        let n = 8u8;
        for i in 0..n {
            let mut b = put(&[i], &[i]);
            b.put_cf(Cf::Images, b"last".to_vec(), vec![i]);
            store.write(b, false).unwrap();
        }
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let crashed = store.crash_copy(seed);
            assert_eq!(get(&crashed, b"base").as_deref(), Some(&b"0"[..]));
            let kept = (0..n)
                .take_while(|i| get(&crashed, &[*i]).is_some())
                .count();
            for i in kept as u8..n {
                assert_eq!(get(&crashed, &[i]), None, "seed {seed}: not a prefix");
            }
            let last = get(&crashed, b"last");
            match kept {
                0 => assert_eq!(last, None),
                k => assert_eq!(last, Some(vec![k as u8 - 1])),
            }
            // The same seed always picks the same crash point.
            assert_eq!(
                store
                    .crash_copy(seed)
                    .scan(Cf::Images, b"", b"", usize::MAX)
                    .unwrap(),
                crashed.scan(Cf::Images, b"", b"", usize::MAX).unwrap()
            );
            seen.insert(kept);
        }
        // 200 seeds over 9 outcomes: every crash point, including none and all, shows up.
        assert_eq!(seen.len(), usize::from(n) + 1);
    }

    #[test]
    fn crash_copy_at_walks_every_crash_point() {
        let store = MemStore::new();
        for i in 0..4u8 {
            store.write(put(&[i], &[i]), false).unwrap();
        }
        for kept in 0..=6 {
            let crashed = store.crash_copy_at(kept);
            let keys = crashed.scan(Cf::Images, b"", b"", usize::MAX).unwrap();
            assert_eq!(keys.len(), kept.min(4));
        }
    }

    #[test]
    fn fault_clock_fails_exactly_after_n_writes_and_applies_nothing() {
        for n in 1..5u64 {
            let clock = Arc::new(FaultClock::new());
            clock.arm(Some(n));
            let store = MemStore::with_faults(clock.clone());
            for i in 0..n {
                store.write(put(&[i as u8], b"v"), i % 2 == 0).unwrap();
            }
            let mut failing = put(b"new", b"v");
            failing.delete_cf(Cf::Images, vec![0u8]);
            failing.put_cf(Cf::Map, b"m".to_vec(), b"v".to_vec());
            let err = store.write(failing, true).unwrap_err();
            assert!(
                matches!(err, MetaError::Injected { after } if after == n),
                "{err}"
            );
            assert!(clock.tripped());
            // Nothing of the failing batch is visible, and nothing after it succeeds.
            assert_eq!(get(&store, b"new"), None);
            assert_eq!(get(&store, &[0]).as_deref(), Some(&b"v"[..]));
            assert_eq!(store.get(Cf::Map, b"m").unwrap(), None);
            assert!(store.write(put(b"later", b"v"), false).is_err());
            // Reads keep working after the trip.
            assert_eq!(
                store.scan(Cf::Images, b"", b"", usize::MAX).unwrap().len(),
                n as usize
            );
            // The failed batch is not in any crash outcome either.
            for seed in 0..20 {
                assert_eq!(get(&store.crash_copy(seed), b"new"), None);
            }
        }
    }

    #[test]
    fn fault_injecting_and_recovered_stores_conform() {
        let clock = Arc::new(FaultClock::new());
        clock.arm(Some(1_000_000));
        super::super::conformance::conformance(&MemStore::with_faults(clock));

        // A store recovered from a crash is an ordinary store, whatever its history.
        let store = MemStore::new();
        super::super::conformance::conformance(&store);
        store.write(WriteBatch::new(), true).unwrap();
        store.write(put(b"x", b"1"), false).unwrap();
        let mut del = WriteBatch::new();
        del.delete_cf(Cf::Images, b"x".to_vec());
        store.write(del, false).unwrap();
        super::super::conformance::conformance(&store.crash_copy_at(2));
    }

    #[test]
    fn a_full_store_refuses_writes_until_space_returns() {
        let store = MemStore::new();
        store.write(put(b"a", b"1"), true).unwrap();
        store.set_full(true);
        let err = store.write(put(b"b", b"2"), true).unwrap_err();
        assert!(matches!(err, MetaError::NoSpace { .. }), "{err}");
        assert_eq!(get(&store, b"b"), None);
        assert_eq!(get(&store.durable_copy(), b"b"), None);
        // Reads keep working.
        assert_eq!(get(&store, b"a").as_deref(), Some(&b"1"[..]));
        store.set_full(false);
        store.write(put(b"b", b"2"), true).unwrap();
        assert_eq!(get(&store.durable_copy(), b"b").as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn disarmed_clock_never_fails() {
        let clock = Arc::new(FaultClock::new());
        let store = MemStore::with_faults(clock.clone());
        for i in 0..100u8 {
            store.write(put(&[i], b"v"), false).unwrap();
        }
        assert_eq!(clock.ticks(), 100);
    }
}
