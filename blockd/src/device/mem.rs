//! An in-memory block device with a volatile write cache, for tests.
//!
//! ```text
//!   write/punch ──► image (what reads see) ──┐
//!        └────────► cache: [(offset, before, after)], oldest first
//!   flush      ──► cache cleared: the image is the durable contents
//!   power_cut  ──► undo every cached write (newest first), redo a random subset of them
//!                  (oldest first), clear the cache: what a disk that lost power keeps
//! ```
//!
//! The device keeps one image (the contents reads see) plus an undo log of the writes not
//! yet flushed. This makes reads and writes plain memory copies, makes `flush` O(number of
//! cached writes) (it only drops the log), and costs memory only for unflushed data; the
//! durable contents are rebuilt on demand by undoing the log.
//!
//! Invariants:
//! - durable contents = the image with every cached write undone, newest first;
//! - a power cut keeps each cached write whole or drops it whole, and re-applies the
//!   kept ones in their original order — so a block never shows a value older than its
//!   last flushed one;
//! - like a real disk, the cache may write back on its own: when the cached bytes exceed
//!   the cache limit, the oldest cached writes become durable. Tests may therefore rely on
//!   flushed data surviving, never on unflushed data being lost, unless they stay under
//!   the limit (the default is at least the device size).

use std::collections::VecDeque;

use parking_lot::Mutex;

use super::{check_range, BlockDevice, IoEngine, IoOp, Result};

/// Smallest default cache limit, in cached bytes (before and after images together).
const MIN_DEFAULT_CACHE_LIMIT: usize = 64 << 20;

/// A memory-backed [`BlockDevice`] whose unflushed writes can be lost by [`MemDevice::power_cut`].
#[derive(Debug)]
pub struct MemDevice {
    size: u64,
    cache_limit: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The contents reads see: durable contents plus every cached write.
    image: Vec<u8>,
    /// Writes not yet durable, oldest first.
    cache: VecDeque<CachedWrite>,
    /// Bytes held by `cache` (before images plus after images).
    cached_bytes: usize,
}

#[derive(Debug)]
struct CachedWrite {
    offset: usize,
    /// The bytes the write replaced.
    before: Vec<u8>,
    after: Payload,
}

#[derive(Debug)]
enum Payload {
    Bytes(Vec<u8>),
    /// A punch: zeros, stored without allocating them.
    Zeros,
}

impl CachedWrite {
    fn len(&self) -> usize {
        self.before.len()
    }

    fn footprint(&self) -> usize {
        match &self.after {
            Payload::Bytes(bytes) => self.before.len() + bytes.len(),
            Payload::Zeros => self.before.len(),
        }
    }

    fn undo(&self, image: &mut [u8]) {
        image[self.offset..self.offset + self.len()].copy_from_slice(&self.before);
    }

    fn redo(&self, image: &mut [u8]) {
        let range = &mut image[self.offset..self.offset + self.len()];
        match &self.after {
            Payload::Bytes(bytes) => range.copy_from_slice(bytes),
            Payload::Zeros => range.fill(0),
        }
    }
}

impl MemDevice {
    /// A zero-filled device of `size` bytes whose cache holds at least `size` bytes of
    /// unflushed writes before it starts writing back on its own.
    ///
    /// Panics if `size` does not fit in memory addresses (a test-only device).
    pub fn new(size: u64) -> Self {
        let bytes = usize::try_from(size).expect("memory device size fits in usize");
        Self::with_cache_limit(size, bytes.saturating_mul(2).max(MIN_DEFAULT_CACHE_LIMIT))
    }

    /// A zero-filled device of `size` bytes whose cache writes its oldest writes back on
    /// its own once it holds more than `cache_limit` bytes (before and after images).
    pub fn with_cache_limit(size: u64, cache_limit: usize) -> Self {
        let bytes = usize::try_from(size).expect("memory device size fits in usize");
        Self::from_image(vec![0; bytes], cache_limit)
    }

    /// A device whose durable contents are `image`.
    pub fn from_image(image: Vec<u8>, cache_limit: usize) -> Self {
        MemDevice {
            size: image.len() as u64,
            cache_limit,
            state: Mutex::new(State {
                image,
                cache: VecDeque::new(),
                cached_bytes: 0,
            }),
        }
    }

    /// Simulates a power failure: each unflushed write is kept with probability
    /// `keep_ratio` (whole, in its original order) or dropped whole. Afterwards the device
    /// holds what the disk would hold after reboot, all of it durable.
    ///
    /// Deterministic for a given `seed` and sequence of writes.
    pub fn power_cut(&self, seed: u64, keep_ratio: f64) {
        let mut rng = SplitMix64(seed);
        let mut state = self.state.lock();
        let State { image, cache, .. } = &mut *state;
        let keep: Vec<bool> = cache.iter().map(|_| rng.next_f64() < keep_ratio).collect();
        for write in cache.iter().rev() {
            write.undo(image);
        }
        for (write, _) in cache.iter().zip(&keep).filter(|(_, &kept)| kept) {
            write.redo(image);
        }
        let dropped = keep.iter().filter(|&&kept| !kept).count();
        tracing::debug!(cached = keep.len(), dropped, "Memory device power cut");
        cache.clear();
        state.cached_bytes = 0;
    }

    /// The durable contents: what survives a power cut that drops every unflushed write.
    pub fn durable_snapshot(&self) -> Vec<u8> {
        let state = self.state.lock();
        let mut image = state.image.clone();
        for write in state.cache.iter().rev() {
            write.undo(&mut image);
        }
        image
    }

    /// A new device holding only the durable contents (a "reboot" onto what was flushed),
    /// with the same cache limit. This device is left unchanged.
    pub fn clone_durable(&self) -> MemDevice {
        MemDevice::from_image(self.durable_snapshot(), self.cache_limit)
    }

    /// How many writes (and punches) are cached and not yet durable.
    pub fn cached_writes(&self) -> usize {
        self.state.lock().cache.len()
    }

    /// Applies a write to the image and records it in the cache.
    fn cache_write(&self, state: &mut State, offset: usize, len: usize, after: Payload) {
        let write = CachedWrite {
            offset,
            before: state.image[offset..offset + len].to_vec(),
            after,
        };
        write.redo(&mut state.image);
        self.push(state, write);
    }

    fn push(&self, state: &mut State, write: CachedWrite) {
        state.cached_bytes += write.footprint();
        state.cache.push_back(write);
        // Write back on our own, oldest first: dropping the oldest undo record makes that
        // write durable without changing what reads see.
        while state.cached_bytes > self.cache_limit {
            match state.cache.pop_front() {
                Some(oldest) => state.cached_bytes -= oldest.footprint(),
                None => break,
            }
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn engine(&self) -> IoEngine {
        IoEngine::Memory
    }

    fn punch_zeroes(&self) -> bool {
        true
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        for op in ops.iter() {
            check_range(op.offset(), op.len() as u64, self.size)?;
        }
        let mut state = self.state.lock();
        for op in ops.iter_mut() {
            // In range of an in-memory image, so the offset fits in usize.
            let offset = op.offset() as usize;
            match op {
                IoOp::Read { buf, .. } => {
                    buf.copy_from_slice(&state.image[offset..offset + buf.len()])
                }
                IoOp::Write { buf: [], .. } => {}
                IoOp::Write { buf, .. } => {
                    self.cache_write(&mut state, offset, buf.len(), Payload::Bytes(buf.to_vec()))
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut state = self.state.lock();
        state.cache.clear();
        state.cached_bytes = 0;
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        // In range of an in-memory image, so both fit in usize.
        let mut state = self.state.lock();
        self.cache_write(&mut state, offset as usize, len as usize, Payload::Zeros);
        Ok(())
    }
}

/// A tiny deterministic generator (SplitMix64) so that power cuts replay from a seed
/// without a runtime dependency on `rand`.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(dev: &MemDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        dev.read_at(offset, &mut buf).unwrap();
        buf
    }

    #[test]
    fn mem_power_cut_keep_none_loses_unflushed_keeps_flushed() {
        let dev = MemDevice::new(1 << 20);
        dev.write_at(0, &[1; 5000]).unwrap();
        dev.write_at(100_000, &[2; 10]).unwrap();
        dev.flush().unwrap();
        dev.write_at(2500, &[3; 5000]).unwrap();
        dev.write_at(100_005, &[4; 10]).unwrap();
        dev.punch(0, 1000).unwrap();
        // Reads see the cache.
        assert_eq!(read(&dev, 0, 1000), vec![0; 1000]);
        assert_eq!(read(&dev, 2500, 5000), vec![3; 5000]);
        assert_eq!(dev.cached_writes(), 3);

        let rebooted = dev.clone_durable();
        dev.power_cut(7, 0.0);
        assert_eq!(dev.cached_writes(), 0);
        for image in [&dev, &rebooted] {
            assert_eq!(read(image, 0, 5000), vec![1; 5000]);
            assert_eq!(read(image, 5000, 2500), vec![0; 2500]);
            assert_eq!(read(image, 100_000, 10), vec![2; 10]);
            assert_eq!(read(image, 100_010, 5), vec![0; 5]);
        }
    }

    #[test]
    fn mem_power_cut_keep_all_keeps_everything_in_order() {
        let dev = MemDevice::new(64 << 10);
        dev.write_at(10, &[1; 100]).unwrap();
        dev.write_at(50, &[2; 100]).unwrap();
        dev.punch(60, 10).unwrap();
        let before = read(&dev, 0, 64 << 10);
        dev.power_cut(1, 1.0);
        assert_eq!(read(&dev, 0, 64 << 10), before);
        assert_eq!(dev.durable_snapshot(), before);
    }

    #[test]
    fn mem_power_cut_keeps_or_drops_each_write_whole() {
        let dev = MemDevice::new(1 << 20);
        dev.write_at(0, &vec![0xFF; 1 << 20]).unwrap();
        dev.flush().unwrap();
        for i in 0..200u64 {
            dev.write_at(i * 4096 + 3, &[i as u8; 3000]).unwrap();
        }
        dev.power_cut(42, 0.5);
        let (mut kept, mut dropped) = (0, 0);
        for i in 0..200u64 {
            let region = read(&dev, i * 4096 + 3, 3000);
            if region.iter().all(|&b| b == i as u8) {
                kept += 1;
            } else if region.iter().all(|&b| b == 0xFF) {
                dropped += 1;
            } else {
                panic!("write {i} was torn");
            }
        }
        assert!(kept > 50 && dropped > 50, "kept {kept}, dropped {dropped}");
        // The cut is durable: another cut changes nothing.
        let after = dev.durable_snapshot();
        dev.power_cut(43, 0.0);
        assert_eq!(dev.durable_snapshot(), after);
    }

    #[test]
    fn mem_power_cut_is_deterministic_per_seed() {
        let run = |seed| {
            let dev = MemDevice::new(64 << 10);
            for i in 0..100u64 {
                dev.write_at(i * 300, &[i as u8 + 1; 300]).unwrap();
            }
            dev.power_cut(seed, 0.5);
            dev.durable_snapshot()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn mem_clone_durable_leaves_the_original_alone() {
        let dev = MemDevice::new(8192);
        dev.write_at(0, &[1; 10]).unwrap();
        let clone = dev.clone_durable();
        assert_eq!(read(&clone, 0, 10), vec![0; 10]);
        assert_eq!(read(&dev, 0, 10), vec![1; 10]);
        assert_eq!(dev.cached_writes(), 1);
        clone.write_at(0, &[2; 10]).unwrap();
        assert_eq!(read(&dev, 0, 10), vec![1; 10]);
    }

    #[test]
    fn mem_cache_limit_writes_back_oldest_first() {
        // Each 1000-byte write costs 2000 cached bytes: at most 2 stay cached.
        let dev = MemDevice::with_cache_limit(64 << 10, 4000);
        for i in 0..5u64 {
            dev.write_at(i * 1000, &[i as u8 + 1; 1000]).unwrap();
        }
        assert_eq!(dev.cached_writes(), 2);
        dev.power_cut(0, 0.0);
        for i in 0..3u64 {
            assert_eq!(read(&dev, i * 1000, 1000), vec![i as u8 + 1; 1000]);
        }
        assert_eq!(read(&dev, 3000, 2000), vec![0; 2000]);
    }

    #[test]
    fn mem_flush_of_many_cached_writes_is_linear() {
        let dev = MemDevice::new(64 << 20);
        let start = std::time::Instant::now();
        for i in 0..200_000u64 {
            dev.write_at((i * 331) % ((64 << 20) - 512), &[i as u8; 512])
                .unwrap();
        }
        dev.flush().unwrap();
        assert_eq!(dev.cached_writes(), 0);
        // Generous bound: quadratic behaviour would take minutes.
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write { offset: u64, len: usize, value: u8 },
        Punch { offset: u64, len: u64 },
        Flush,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..16384, 1usize..3000, any::<u8>())
                .prop_map(|(offset, len, value)| Step::Write { offset, len, value }),
            1 => (0u64..16384, 0u64..5000).prop_map(|(offset, len)| Step::Punch { offset, len }),
            1 => Just(Step::Flush),
        ]
    }

    proptest! {
        /// Against a model holding the durable image and the list of unflushed writes:
        /// reads see every write, a full power cut keeps exactly the flushed state, and
        /// keeping everything keeps exactly what reads saw.
        #[test]
        fn mem_matches_the_volatile_cache_model(
            steps in proptest::collection::vec(step(), 1..60),
            keep_all in any::<bool>(),
        ) {
            const SIZE: usize = 20 << 10;
            let dev = MemDevice::new(SIZE as u64);
            let mut durable = vec![0u8; SIZE];
            let mut visible = vec![0u8; SIZE];
            for step in &steps {
                match *step {
                    Step::Write { offset, len, value } => {
                        let offset = offset as usize;
                        let len = len.min(SIZE - offset);
                        dev.write_at(offset as u64, &vec![value; len]).unwrap();
                        visible[offset..offset + len].fill(value);
                    }
                    Step::Punch { offset, len } => {
                        let len = len.min(SIZE as u64 - offset);
                        dev.punch(offset, len).unwrap();
                        visible[offset as usize..(offset + len) as usize].fill(0);
                    }
                    Step::Flush => {
                        dev.flush().unwrap();
                        durable.clone_from(&visible);
                    }
                }
                prop_assert_eq!(read(&dev, 0, SIZE), visible.clone());
                prop_assert_eq!(dev.durable_snapshot(), durable.clone());
            }
            if keep_all {
                dev.power_cut(3, 1.0);
                prop_assert_eq!(read(&dev, 0, SIZE), visible);
            } else {
                dev.power_cut(3, 0.0);
                prop_assert_eq!(read(&dev, 0, SIZE), durable);
            }
        }
    }

    #[test]
    fn mem_passes_the_behaviour_suite_with_a_tiny_cache() {
        // Writing back on its own must not change what reads see.
        crate::device::tests::run_suite(&MemDevice::with_cache_limit(4 << 20, 10_000), true);
    }
}
