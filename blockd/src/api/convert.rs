//! Conversions between engine values and `blockd.v1` messages.

use std::collections::{HashMap, HashSet};

use blockd_proto::model::{self, VolumeSource};
use blockd_proto::v1;

use crate::engine::{
    FsckReport, GcStats, PoolInfo, Qos, QosPolicy, SnapshotInfo, Source, VolumeInfo, VolumeSpec,
};

/// The images currently exported over NBD and attached as ublk devices, for the
/// `exported` and `ublk_device` fields of listings.
#[derive(Debug, Default)]
pub(crate) struct Exported {
    nbd: HashSet<String>,
    ublk: HashMap<String, u32>,
}

impl Exported {
    /// What the engine records now.
    pub(crate) fn of(engine: &crate::engine::Engine) -> Exported {
        Exported {
            nbd: engine.exported_images().into_iter().collect(),
            ublk: engine.ublk_devices().into_iter().collect(),
        }
    }

    fn contains(&self, image: &str) -> bool {
        self.nbd.contains(image)
    }

    fn ublk_device(&self, image: &str) -> String {
        self.ublk
            .get(image)
            .map(|id| format!("/dev/ublkb{id}"))
            .unwrap_or_default()
    }
}

pub(crate) fn pool(p: PoolInfo) -> v1::Pool {
    let ratio = if p.capacity_bytes == 0 {
        0.0
    } else {
        p.provisioned_bytes as f64 / p.capacity_bytes as f64
    };
    v1::Pool {
        name: p.name,
        path: p.path,
        uuid: p.uuid,
        chunk_size_bytes: p.chunk_size_bytes,
        capacity_bytes: p.capacity_bytes,
        allocated_bytes: p.allocated_bytes,
        free_bytes: p.free_bytes,
        provisioned_bytes: p.provisioned_bytes,
        overprovisioning_ratio: ratio,
        io_engine: p.io_engine.to_string(),
        volume_count: p.volumes,
        snapshot_count: p.snapshots,
        health: p.health,
        is_default: p.is_default,
        max_overprovisioning_ratio: p.max_overprovision.unwrap_or(0.0),
    }
}

pub(crate) fn qos(q: Qos) -> v1::Qos {
    v1::Qos {
        max_iops: q.max_iops,
        max_bandwidth_bytes: q.max_bandwidth_bytes,
    }
}

pub(crate) fn engine_qos(q: model::QosLimits) -> Qos {
    Qos {
        max_iops: q.max_iops,
        max_bandwidth_bytes: q.max_bandwidth_bytes,
    }
}

pub(crate) fn qos_policy(p: QosPolicy) -> v1::QosPolicy {
    v1::QosPolicy {
        max_iops: p.max_iops,
        iops_per_gb: p.iops_per_gb,
        max_bandwidth_bytes: p.max_bandwidth_bytes,
    }
}

pub(crate) fn engine_qos_policy(p: model::QosPolicy) -> QosPolicy {
    QosPolicy {
        max_iops: p.max_iops,
        iops_per_gb: p.iops_per_gb,
        max_bandwidth_bytes: p.max_bandwidth_bytes,
    }
}

/// The policy a create request asks for: `None` for fixed limits (`spec.qos`).
pub(crate) fn create_policy(req: &model::CreateVolume) -> Option<QosPolicy> {
    (req.iops_per_gb != 0).then_some(QosPolicy {
        max_iops: req.qos.max_iops,
        iops_per_gb: req.iops_per_gb,
        max_bandwidth_bytes: req.qos.max_bandwidth_bytes,
    })
}

pub(crate) fn volume(v: VolumeInfo, exported: &Exported) -> v1::Volume {
    let is_exported = exported.contains(&v.name);
    let ublk_device = exported.ublk_device(&v.name);
    v1::Volume {
        source: v.source.map(|s| match s {
            Source::Snapshot(name) => v1::volume::Source::SourceSnapshot(name),
            Source::Volume(name) => v1::volume::Source::SourceVolume(name),
        }),
        name: v.name,
        pool: v.pool,
        size_bytes: v.size_bytes,
        allocated_bytes: v.allocated_bytes,
        qos: Some(qos(v.qos)),
        qos_policy: Some(qos_policy(v.qos_policy)),
        has_parent: v.has_parent,
        snapshot_count: v.snapshots,
        created_unix: v.created_unix,
        exported: is_exported,
        ublk_device,
        id: v.id,
        source_id: v.source_id.unwrap_or_default(),
        source_deleted: v.source_deleted,
    }
}

pub(crate) fn snapshot(s: SnapshotInfo, exported: &Exported) -> v1::Snapshot {
    let image = format!("{}@{}", s.volume, s.name);
    let is_exported = exported.contains(&image);
    v1::Snapshot {
        name: s.name,
        volume: s.volume,
        pool: s.pool,
        size_bytes: s.size_bytes,
        created_unix: s.created_unix,
        exported: is_exported,
        ublk_device: exported.ublk_device(&image),
        group: s.group.unwrap_or_default(),
        replica_of: s.replica_of.unwrap_or_default(),
        id: s.id,
        volume_id: s.volume_id,
        volume_deleted: s.volume_deleted,
    }
}

pub(crate) fn volume_spec(req: model::CreateVolume) -> VolumeSpec {
    VolumeSpec {
        name: req.name.into_string(),
        pool: req.pool.map(|p| p.into_string()),
        size: req.size_bytes,
        source: req.source.map(|s| match s {
            VolumeSource::Snapshot(name) => Source::Snapshot(name.into_string()),
            VolumeSource::Volume(name) => Source::Volume(name.into_string()),
        }),
        qos: engine_qos(req.qos),
    }
}

/// `clean` also holds after a repair that gave back every leaked chunk it found.
pub(crate) fn fsck(r: FsckReport, repair: bool) -> v1::FsckReport {
    let repaired_all_leaks = repair
        && r.leaked <= r.repaired
        && r.double_owned == 0
        && r.bad_pointers == 0
        && r.bad_records == 0;
    v1::FsckReport {
        clean: r.is_clean() || repaired_all_leaks,
        pools: r.pools,
        images: r.images,
        lineages: r.lineages,
        mapped_chunks: r.mapped_chunks,
        double_owned: r.double_owned,
        leaked: r.leaked,
        bad_pointers: r.bad_pointers,
        bad_records: r.bad_records,
        repaired: r.repaired,
        problems: r.problems,
    }
}

pub(crate) fn gc(g: GcStats) -> v1::GcReport {
    v1::GcReport {
        entries_removed: g.entries_removed,
        chunks_freed: g.chunks_freed,
        lineages_removed: g.lineages_removed,
        backlog: g.backlog,
    }
}
