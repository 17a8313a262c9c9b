//! The plain volume spec (default pool, no source, no QoS) that most engine tests create
//! their volumes from. Included with `#[path]` by the tests that use it (and by
//! `mem_engine.rs`), so the others do not see unused code.

use blockd::engine::{Qos, VolumeSpec};

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
