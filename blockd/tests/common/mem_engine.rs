//! An engine on an in-memory metadata store and device with one pool `p` (64 KiB chunks),
//! and the plain volume spec, for the engine tests that need nothing more. Included with
//! `#[path]` by the tests that use it, so the others do not see unused code.

use std::sync::Arc;

use blockd::device::mem::MemDevice;
use blockd::device::BlockDevice;
use blockd::engine::{Engine, PoolSpec, Qos, VolumeSpec};
use blockd::meta::mem::MemStore;
use blockd::meta::MetaStore;

/// Opens (or reopens) the engine on `meta` and `dev`.
pub fn open(meta: &Arc<MemStore>, dev: &Arc<MemDevice>) -> Engine {
    Engine::open(
        meta.clone() as Arc<dyn MetaStore>,
        vec![PoolSpec {
            name: "p".into(),
            device: dev.clone() as Arc<dyn BlockDevice>,
            chunk_size: 64 << 10,
            path: "mem".into(),
        }],
    )
    .expect("engine opens")
}

/// A new empty volume of `size` bytes in the default pool, without QoS.
pub fn spec(name: &str, size: u64) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        pool: None,
        size: Some(size),
        source: None,
        qos: Qos::default(),
    }
}
