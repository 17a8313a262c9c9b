//! Engine errors: one enum for every engine operation, with an errno for the data path
//! and enough context (object kind and name) for a person to act on the message.

use blockd_proto::size::format_size;

use crate::device::DeviceError;
use crate::meta::MetaError;

/// What kind of object an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Pool,
    Volume,
    Snapshot,
    Image,
    GroupSnapshot,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectKind::Pool => "pool",
            ObjectKind::Volume => "volume",
            ObjectKind::Snapshot => "snapshot",
            ObjectKind::Image => "image",
            ObjectKind::GroupSnapshot => "group snapshot",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: ObjectKind, name: String },

    #[error("{kind} {name:?} already exists {detail}")]
    AlreadyExists {
        kind: ObjectKind,
        name: String,
        detail: String,
    },

    #[error("Invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        kind: ObjectKind,
        name: String,
        reason: &'static str,
    },

    #[error("Invalid size for {name:?}: {reason}")]
    InvalidSize { name: String, reason: String },

    #[error("I/O at offset {offset} length {len} is beyond the end of {image:?} ({size} bytes)")]
    OutOfRange {
        image: String,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("Pool {pool:?} is full: no free chunk for a write to {image:?}")]
    NoSpace { pool: String, image: String },

    /// The pool's over-provisioning limit (`blockd --max-overprovision`) would be passed.
    #[error(
        "Pool {pool:?} would be over-provisioned: {what} takes the sum of its volume sizes from {} to {} ({:.2}x its capacity of {}), past the limit of {max_ratio}x ({}); delete or shrink volumes, or run blockd with a higher --max-overprovision (0 = unlimited)",
        format_size(*provisioned),
        format_size(provisioned + requested),
        (provisioned + requested) as f64 / (*capacity).max(1) as f64,
        format_size(*capacity),
        format_size((*capacity as f64 * max_ratio) as u64)
    )]
    OverProvisioned {
        pool: String,
        /// What asked, e.g. `creating volume "v" of 4096 bytes`.
        what: String,
        provisioned: u64,
        requested: u64,
        capacity: u64,
        max_ratio: f64,
    },

    #[error("{image:?} is a read-only snapshot image")]
    ReadOnly { image: String },

    #[error("Refusing to shrink volume {name:?} from {size} to {new_size} bytes without force")]
    ShrinkRefused {
        name: String,
        size: u64,
        new_size: u64,
    },

    #[error("{kind} {name:?} cannot be changed now: {reason}")]
    FailedPrecondition {
        kind: ObjectKind,
        name: String,
        reason: String,
    },

    #[error("Pool {pool:?} does not match its metadata: {reason}")]
    PoolMismatch { pool: String, reason: String },

    #[error("Metadata is inconsistent: {0}")]
    Corrupt(String),

    #[error("The engine stopped after a fatal I/O error and must be restarted: {0}")]
    Failed(String),

    /// The metadata store's file system is full; the engine runs degraded until a commit
    /// succeeds again (see `engine::meta_space`).
    #[error(
        "The metadata file system is full ({detail}): writes to unallocated space, flushes, \
         discards, snapshots and other changes fail until space is freed on the file system \
         of blockd's --state-dir; reads and overwrites of allocated data keep working; once there is \
         room blockd resumes by itself within seconds"
    )]
    MetaFull { detail: String },

    #[error("No delta from {base} to {target}: {reason}")]
    Unrelated {
        base: String,
        target: String,
        reason: String,
    },

    #[error(transparent)]
    Device(#[from] DeviceError),

    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl EngineError {
    /// The errno a protocol (NBD) reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::NotFound { .. } => libc::ENOENT,
            EngineError::AlreadyExists { .. } => libc::EEXIST,
            EngineError::InvalidName { .. }
            | EngineError::InvalidSize { .. }
            | EngineError::OutOfRange { .. } => libc::EINVAL,
            EngineError::NoSpace { .. }
            | EngineError::OverProvisioned { .. }
            | EngineError::MetaFull { .. } => libc::ENOSPC,
            EngineError::ReadOnly { .. } => libc::EPERM,
            EngineError::ShrinkRefused { .. } | EngineError::FailedPrecondition { .. } => {
                libc::EBUSY
            }
            EngineError::Unrelated { .. } => libc::EINVAL,
            EngineError::PoolMismatch { .. }
            | EngineError::Corrupt(_)
            | EngineError::Failed(_)
            | EngineError::Meta(_) => libc::EIO,
            EngineError::Device(e) => e.errno(),
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
