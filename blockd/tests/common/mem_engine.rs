//! An engine on an in-memory metadata store and device with one pool `p`, and the plain
//! volume spec, for the engine tests that need nothing more. Included with `#[path]` by
//! the tests that use it, so the others do not see unused code.

use std::sync::Arc;

use blockd::device::mem::MemDevice;
use blockd::device::BlockDevice;
use blockd::engine::{Engine, PoolSpec};
use blockd::meta::mem::MemStore;
use blockd::meta::MetaStore;

#[path = "volume_spec.rs"]
mod volume_spec;
pub use volume_spec::spec;

/// Opens (or reopens) the engine on `meta` and `dev`, with chunks of `chunk_size` bytes.
pub fn open(meta: &Arc<MemStore>, dev: &Arc<MemDevice>, chunk_size: u64) -> Engine {
    Engine::open(
        meta.clone() as Arc<dyn MetaStore>,
        vec![PoolSpec {
            name: "p".into(),
            device: dev.clone() as Arc<dyn BlockDevice>,
            chunk_size,
            path: "mem".into(),
        }],
    )
    .expect("engine opens")
}
