//! Request buffers of one connection: aligned, and recycled.
//!
//! Read buffers and write payloads are [`AlignedBuf`]s so that aligned requests take the
//! device's O_DIRECT path (a `Vec<u8>` is only 16-byte aligned, which sent every NBD
//! request through the page cache). Allocating and zeroing an aligned buffer per request
//! costs more than the request itself for large transfers, so a connection keeps the
//! buffers of finished requests in a [`BufPool`], by power-of-two size class, and hands
//! them out again.
//!
//! Invariants:
//! - a pool belongs to one connection: a recycled buffer holds bytes of an earlier request
//!   of the same client, never of another client; and every user overwrites the part it
//!   sends (reads fill the whole buffer or fail, write payloads are read in full);
//! - the pool keeps at most [`POOL_MAX_BYTES`] of idle buffers; anything beyond is freed.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::device::{AlignedBuf, IO_ALIGN};

/// Idle bytes a connection keeps for reuse.
const POOL_MAX_BYTES: usize = 64 << 20;
/// Size classes: `IO_ALIGN << k` for `k < CLASSES` (4 KiB .. 32 MiB).
const CLASSES: usize = 14;

/// Recycled aligned buffers of one connection.
#[derive(Default)]
pub struct BufPool {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    classes: [Vec<AlignedBuf>; CLASSES],
    bytes: usize,
}

/// The size class holding `len` bytes, or None when too large to pool.
fn class_of(len: usize) -> Option<usize> {
    let blocks = len.div_ceil(IO_ALIGN).max(1);
    let class = blocks.next_power_of_two().trailing_zeros() as usize;
    (class < CLASSES).then_some(class)
}

impl BufPool {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A buffer of `len` bytes with unspecified contents (bytes of an earlier request of
    /// this connection, or zeros).
    pub fn take(self: &Arc<Self>, len: usize) -> IoBuf {
        if len == 0 {
            return IoBuf {
                buf: Some(AlignedBuf::zeroed(0)),
                len: 0,
                pool: None,
            };
        }
        let Some(class) = class_of(len) else {
            return IoBuf {
                buf: Some(AlignedBuf::zeroed(len)),
                len,
                pool: None,
            };
        };
        let recycled = {
            let mut idle = self.idle.lock();
            let buf = idle.classes[class].pop();
            if let Some(b) = &buf {
                idle.bytes -= b.len();
            }
            buf
        };
        let buf = recycled.unwrap_or_else(|| AlignedBuf::zeroed(IO_ALIGN << class));
        IoBuf {
            buf: Some(buf),
            len,
            pool: Some(self.clone()),
        }
    }

    fn give_back(&self, buf: AlignedBuf) {
        let Some(class) = class_of(buf.len()) else {
            return;
        };
        let mut idle = self.idle.lock();
        if idle.bytes + buf.len() <= POOL_MAX_BYTES {
            idle.bytes += buf.len();
            idle.classes[class].push(buf);
        }
    }
}

/// An aligned buffer of `len` bytes, returned to its pool when dropped.
pub struct IoBuf {
    /// Always `Some` until dropped.
    buf: Option<AlignedBuf>,
    len: usize,
    pool: Option<Arc<BufPool>>,
}

impl IoBuf {
    /// An unpooled empty buffer.
    pub fn empty() -> Self {
        IoBuf {
            buf: Some(AlignedBuf::zeroed(0)),
            len: 0,
            pool: None,
        }
    }
}

/// Where an [`IoBuf`]'s memory came from, while the memory itself is lent out as an
/// [`AlignedBuf`] (to an io_uring ring, which owns the buffers of its ops).
#[derive(Default)]
pub struct BufHome {
    len: usize,
    pool: Option<Arc<BufPool>>,
}

impl IoBuf {
    /// Splits the buffer into its aligned memory (at least `len()` bytes) and what
    /// [`BufHome::restore`] needs to make it an `IoBuf` of the same length again.
    pub fn detach(mut self) -> (AlignedBuf, BufHome) {
        let buf = self.buf.take().expect("present until drop");
        let home = BufHome {
            len: self.len,
            pool: self.pool.take(),
        };
        (buf, home)
    }
}

impl BufHome {
    /// The buffer again, with the length it had; `buf` is the memory [`IoBuf::detach`]
    /// gave out (anything shorter is taken as unpooled and clipped).
    pub fn restore(self, buf: AlignedBuf) -> IoBuf {
        let len = self.len.min(buf.len());
        IoBuf {
            buf: Some(buf),
            len,
            pool: self.pool,
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf.as_ref().expect("present until drop")[..self.len]
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut().expect("present until drop")[..self.len]
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let (Some(pool), Some(buf)) = (self.pool.take(), self.buf.take()) {
            pool.give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_sized_and_recycled() {
        let pool = BufPool::new();
        let mut a = pool.take(5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a.as_ptr() as usize % IO_ALIGN, 0);
        a.fill(7);
        let addr = a.as_ptr();
        drop(a);
        let b = pool.take(8192);
        assert_eq!(b.as_ptr(), addr, "same size class is reused");
        assert_eq!(b.len(), 8192);
        let c = pool.take(4096);
        assert_ne!(c.as_ptr(), addr);
        assert!(pool.take(0).is_empty());
        // Beyond the largest class: allocated exactly, not pooled.
        let big = pool.take((IO_ALIGN << CLASSES) + 1);
        assert_eq!(big.len(), (IO_ALIGN << CLASSES) + 1);
    }

    #[test]
    fn detached_buffers_come_back_whole() {
        let pool = BufPool::new();
        let mut a = pool.take(5000);
        a.fill(3);
        let addr = a.as_ptr();
        let (mem, home) = a.detach();
        assert_eq!(mem.len(), 8192, "the whole size class is lent");
        let a = home.restore(mem);
        assert_eq!((a.as_ptr(), a.len()), (addr, 5000));
        assert!(a.iter().all(|&b| b == 3));
        drop(a);
        assert_eq!(
            pool.take(8192).as_ptr(),
            addr,
            "restored buffers go back to the pool"
        );
    }

    #[test]
    fn pool_keeps_a_bounded_amount() {
        let pool = BufPool::new();
        let bufs: Vec<IoBuf> = (0..(POOL_MAX_BYTES >> 20) + 8)
            .map(|_| pool.take(1 << 20))
            .collect();
        drop(bufs);
        assert!(pool.idle.lock().bytes <= POOL_MAX_BYTES);
    }
}
