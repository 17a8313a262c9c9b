//! blockd: a local block-storage engine and daemon.
//!
//! Layers, each owning its own state (see `docs/design.md`):
//! - [`device`]: the `BlockDevice` trait and its backends (io_uring, sync, memory, faulty);
//! - [`meta`]: the metadata store trait, its RocksDB and in-memory implementations, and keys;
//! - [`engine`]: pools, lineages, epochs, chunk maps, copy-on-write, allocation, GC, fsck.
//!
//! The engine is generic over devices and metadata stores through trait objects, so the
//! same code runs on io_uring + RocksDB in production and on fault-injecting memory
//! backends in crash-simulation tests.

pub mod api;
pub mod config;
pub mod device;
pub mod engine;
pub mod exports;
pub mod fault;
pub mod meta;
pub mod metrics;
pub mod nbd;
pub mod qos;
pub mod ublk;
