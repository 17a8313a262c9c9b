//! Metadata store: the durable home of every piece of blockd metadata.
//!
//! This module owns the [`MetaStore`] trait, its implementations and the key encoding:
//! - [`rocks`]: RocksDB (the only place in blockd that imports `rocksdb`);
//! - [`mem`]: an in-memory store with fault injection, for tests and crash simulation;
//! - [`keys`]: every key and value layout, in one place.
//!
//! The trait is deliberately small (TiKV's lesson: the engine must not see RocksDB):
//! point `get`, ordered range scans, `seek_for_prev`, and atomic write batches.
//! Invariants of every implementation:
//! - a [`WriteBatch`] is applied atomically and in order (a put then a delete of the same
//!   key leaves no key);
//! - `write(batch, sync = true)` returns only when the batch survives a crash, and every
//!   batch written before it survives too;
//! - scans return keys in ascending byte order.

#[cfg(test)]
mod conformance;
pub mod keys;
pub mod mem;
pub mod rocks;

use std::fmt;

/// Column families. Each has its own key space (see [`keys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// Store-wide records: format version, id counters.
    Meta,
    /// Pool records, by pool id.
    Pools,
    /// Image records (volumes and snapshots), by image id.
    Images,
    /// Lineage records, by lineage id.
    Lineages,
    /// The chunk map: lineage | chunk | epoch -> physical chunk or zero tombstone.
    Map,
    /// Intents of long operations (flatten), by intent id.
    Intents,
}

impl Cf {
    pub const ALL: [Cf; 6] = [
        Cf::Meta,
        Cf::Pools,
        Cf::Images,
        Cf::Lineages,
        Cf::Map,
        Cf::Intents,
    ];

    /// The column family's name in RocksDB.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Pools => "pools",
            Cf::Images => "images",
            Cf::Lineages => "lineages",
            Cf::Map => "map",
            Cf::Intents => "intents",
        }
    }
}

/// Errors of the metadata layer.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("Metadata store failed during {op}: {message}")]
    Store { op: &'static str, message: String },
    #[error("Cannot open the metadata store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("Injected metadata fault after {after} writes")]
    Injected { after: u64 },
    /// The file system holding the store is full (ENOSPC): the write changed nothing
    /// visible and may succeed once space is freed (the RocksDB store reopens itself then).
    #[error("Metadata store is out of space during {op}: {message}")]
    NoSpace { op: &'static str, message: String },
    #[error("Corrupt metadata key or value in {cf:?}: {what}")]
    Corrupt { cf: Cf, what: String },
}

pub type Result<T> = std::result::Result<T, MetaError>;

/// One operation of a write batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
}

/// An ordered list of puts and deletes applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put_cf(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Put {
            cf,
            key: key.into(),
            value: value.into(),
        });
    }
    pub fn delete_cf(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Delete {
            cf,
            key: key.into(),
        });
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn extend(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
    }
}

/// A key-value pair from a scan.
pub type Kv = (Vec<u8>, Vec<u8>);

/// The metadata store the engine sees.
pub trait MetaStore: Send + Sync + fmt::Debug {
    /// Point lookup.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Applies the batch atomically; with `sync` it is durable when this returns.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()>;

    /// Every pair with `start <= key < end` (an empty `end` means "to the end of the CF"),
    /// ascending, at most `limit` pairs (`usize::MAX` for all).
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Kv>>;

    /// The greatest pair with key `<= key`, if any.
    fn seek_for_prev(&self, cf: Cf, key: &[u8]) -> Result<Option<Kv>>;

    /// Store statistics for metrics (e.g. RocksDB write stalls); free-form name/value pairs.
    fn stats(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
}
