//! Public value types of the engine API: specs that callers pass in, infos handed back.

use std::sync::Arc;

use crate::device::{BlockDevice, IoEngine};

/// Default chunk size: 64 KiB (qcow2's and LVM-thin's default). See `engine` module docs.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;
/// Smallest and largest allowed chunk sizes.
pub const MIN_CHUNK_SIZE: u64 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u64 = 4 * 1024 * 1024;
/// The size granule and the name length are API rules, shared with the clients.
pub use blockd_proto::rules::{MAX_NAME_LEN, MAX_VOLUME_SIZE, SIZE_GRANULE};
/// Default pool over-provisioning limit: the sizes of a pool's volumes may add up to at
/// most this multiple of its capacity (see [`crate::engine::Engine::set_max_overprovision`]).
/// Thin pools are meant to promise more than they hold, but not without bound: at 20×, a
/// pool fills up once its volumes are 5% written on average.
pub const DEFAULT_MAX_OVERPROVISION: f64 = 20.0;

/// A pool to attach when the engine opens.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    /// Chunk size used when the pool is created; an existing pool keeps its own.
    pub chunk_size: u64,
    /// Where the pool lives (file or device path), for display.
    pub path: String,
}

/// Per-volume quality of service; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Qos {
    pub max_iops: u64,
    pub max_bandwidth_bytes: u64,
}

/// What a volume's [`Qos`] is derived from: fixed limits, or an IOPS limit that scales
/// with the volume's size and follows it through resizes. 0 = no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QosPolicy {
    /// With `iops_per_gb == 0`, the IOPS limit; otherwise the cap on the scaled limit.
    pub max_iops: u64,
    /// IOPS per GiB of size: `ceil(iops_per_gb × size / 2^30)`, at least 1.
    pub iops_per_gb: u64,
    pub max_bandwidth_bytes: u64,
}

impl QosPolicy {
    /// The policy of fixed limits `qos`.
    pub fn fixed(qos: Qos) -> Self {
        QosPolicy {
            max_iops: qos.max_iops,
            iops_per_gb: 0,
            max_bandwidth_bytes: qos.max_bandwidth_bytes,
        }
    }

    /// The limits in force for a volume of `size_bytes`. Computed exactly (u128) and
    /// rounded up, as csi-shim computes `iopsPerGB` (so both agree on every size).
    pub fn effective(&self, size_bytes: u64) -> Qos {
        let max_iops = if self.iops_per_gb == 0 {
            self.max_iops
        } else {
            let scaled = (u128::from(self.iops_per_gb) * u128::from(size_bytes)).div_ceil(1 << 30);
            let scaled = u64::try_from(scaled).unwrap_or(u64::MAX).max(1);
            match self.max_iops {
                0 => scaled,
                cap => scaled.min(cap),
            }
        };
        Qos {
            max_iops,
            max_bandwidth_bytes: self.max_bandwidth_bytes,
        }
    }
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

/// What `create_volume` is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    /// None: the default pool (or the source's pool for clones).
    pub pool: Option<String>,
    /// Requested size in bytes (> 0); rounded up to [`SIZE_GRANULE`]. For clones, None
    /// means "the source's size".
    pub size: Option<u64>,
    pub source: Option<Source>,
    pub qos: Qos,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PoolInfo {
    pub name: String,
    pub path: String,
    pub uuid: String,
    pub chunk_size_bytes: u64,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub free_bytes: u64,
    pub provisioned_bytes: u64,
    pub io_engine: IoEngine,
    pub volumes: u64,
    pub snapshots: u64,
    /// "ok", or "failed: <reason>" after a fatal I/O error.
    pub health: String,
    pub is_default: bool,
    /// The over-provisioning limit (provisioned / capacity), None when unlimited.
    pub max_overprovision: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub pool: String,
    pub size_bytes: u64,
    /// Bytes of chunks holding data that this volume sees in its own lineage.
    pub allocated_bytes: u64,
    pub qos: Qos,
    /// What `qos` is derived from.
    pub qos_policy: QosPolicy,
    /// The volume's content source as created (by the name it had then).
    pub source: Option<Source>,
    /// The volume's stable id (a UUID).
    pub id: String,
    /// The id of the snapshot or volume it was cloned from.
    pub source_id: Option<String>,
    /// True when that source no longer exists (deleted; its name may now be another's).
    pub source_deleted: bool,
    /// True while it still reads through a parent (a clone not yet flattened).
    pub has_parent: bool,
    pub snapshots: u64,
    pub created_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// The volume it was taken from, by the name it had then (kept even after that
    /// volume is deleted).
    pub volume: String,
    /// The snapshot's stable id (a UUID).
    pub id: String,
    /// The id of the volume it was taken of.
    pub volume_id: String,
    /// True when that volume no longer exists (even if another volume now has its name).
    pub volume_deleted: bool,
    pub pool: String,
    pub size_bytes: u64,
    pub created_unix: u64,
    /// The group snapshot it belongs to, if any.
    pub group: Option<String>,
    /// The stable id of the snapshot this one reproduces (taken by `import-diff`).
    pub replica_of: Option<String>,
}

/// One extent of `block_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// True: reads as zeros and holds no data (a hole).
    pub hole: bool,
}

/// What fsck found (and repaired, when asked).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsckReport {
    pub pools: u64,
    pub images: u64,
    pub lineages: u64,
    pub mapped_chunks: u64,
    /// Chunks referenced by more than one map entry (never repairable automatically).
    pub double_owned: u64,
    /// Chunks allocated in memory that no map entry or in-flight write owns.
    pub leaked: u64,
    /// Map entries pointing outside their pool or at the superblock.
    pub bad_pointers: u64,
    /// Keys or records that do not decode or point at missing objects.
    pub bad_records: u64,
    /// Leaks (and orphan entries) given back.
    pub repaired: u64,
    /// Human-readable problems, one per line.
    pub problems: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.double_owned == 0
            && self.leaked == 0
            && self.bad_pointers == 0
            && self.bad_records == 0
    }
}

/// What one GC pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    pub entries_removed: u64,
    pub chunks_freed: u64,
    pub lineages_removed: u64,
    /// Entries still to be examined (0 when the pass finished everything).
    pub backlog: u64,
}
