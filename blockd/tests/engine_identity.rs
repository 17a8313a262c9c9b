//! Images have stable ids, and links between images follow ids, not names: a snapshot of
//! a deleted volume says so even after a new volume takes the name; a clone of a deleted
//! snapshot says so even after a new snapshot takes the name. Records written before ids
//! existed get ids once, at open, and keep them. Pools refuse volume sizes past their
//! over-provisioning limit.

use std::sync::Arc;

use blockd::device::mem::MemDevice;
use blockd::device::BlockDevice;
use blockd::engine::{
    Engine, EngineError, PoolSpec, Qos, Source, VolumeSpec, DEFAULT_MAX_OVERPROVISION,
};
use blockd::meta::keys;
use blockd::meta::mem::MemStore;
use blockd::meta::{Cf, MetaStore, WriteBatch};

#[path = "common/volume_spec.rs"]
mod volume_spec;
use volume_spec::spec;

const MIB: u64 = 1 << 20;

fn open(meta: &Arc<MemStore>, dev: &Arc<dyn BlockDevice>) -> Engine {
    Engine::open(
        meta.clone(),
        vec![PoolSpec {
            name: "p".into(),
            device: dev.clone(),
            chunk_size: 16 * 1024,
            path: "mem:p".into(),
        }],
    )
    .unwrap()
}

fn fresh() -> (Arc<MemStore>, Arc<dyn BlockDevice>, Engine) {
    let meta = Arc::new(MemStore::new());
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8 * MIB));
    let e = open(&meta, &dev);
    (meta, dev, e)
}

fn clone_of(name: &str, source: Source) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        pool: None,
        size: None,
        source: Some(source),
        qos: Qos::default(),
    }
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

#[test]
fn a_snapshot_of_a_deleted_volume_never_belongs_to_its_namesake() {
    let (_meta, _dev, e) = fresh();
    let (old, _) = e.create_volume(&spec("vol1", MIB)).unwrap();
    assert!(is_uuid(&old.id), "{}", old.id);
    let (snap, _) = e.create_snapshot("vol1", "snap1").unwrap();
    assert!(is_uuid(&snap.id) && snap.id != old.id);
    assert_eq!(snap.volume_id, old.id);
    assert!(!snap.volume_deleted);
    assert_eq!(e.snapshots(Some("vol1")).unwrap().len(), 1);

    e.delete_volume("vol1").unwrap();
    let snap = e.snapshot("snap1").unwrap();
    assert_eq!((snap.volume.as_str(), snap.volume_deleted), ("vol1", true));
    // With no volume of that name, listing by the name finds what the deleted one left.
    assert_eq!(e.snapshots(Some("vol1")).unwrap().len(), 1);

    let (new, _) = e.create_volume(&spec("vol1", MIB)).unwrap();
    assert_ne!(new.id, old.id, "a new volume gets a new id");
    let snap = e.snapshot("snap1").unwrap();
    assert!(
        snap.volume_deleted,
        "snap1 is not a snapshot of the new vol1"
    );
    assert_eq!(snap.volume_id, old.id);
    assert!(e.snapshots(None).unwrap()[0].volume_deleted);
    assert!(
        e.snapshots(Some("vol1")).unwrap().is_empty(),
        "the new vol1 has no snapshots"
    );
    // Taking "snap1" of the new vol1 is not an idempotent retry: it is another volume.
    match e.create_snapshot("vol1", "snap1") {
        Err(EngineError::AlreadyExists { detail, .. }) => {
            assert!(detail.contains("(deleted)"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    // A retry for the live volume it belongs to is idempotent.
    e.create_volume(&spec("vol2", MIB)).unwrap();
    let (first, created) = e.create_snapshot("vol2", "s2").unwrap();
    assert!(created);
    let (again, created) = e.create_snapshot("vol2", "s2").unwrap();
    assert!(!created);
    assert_eq!(first.id, again.id);
}

#[test]
fn a_clone_of_a_deleted_snapshot_never_points_at_its_namesake() {
    let (_meta, _dev, e) = fresh();
    e.create_volume(&spec("vol1", MIB)).unwrap();
    let (snap, _) = e.create_snapshot("vol1", "snap1").unwrap();
    let (clone, _) = e
        .create_volume(&clone_of("c", Source::Snapshot("snap1".into())))
        .unwrap();
    assert_eq!(clone.source_id.as_deref(), Some(snap.id.as_str()));
    assert!(!clone.source_deleted);
    let (vclone, _) = e
        .create_volume(&clone_of("cv", Source::Volume("vol1".into())))
        .unwrap();
    let vol1 = e.volume("vol1").unwrap();
    assert_eq!(vclone.source_id.as_deref(), Some(vol1.id.as_str()));

    e.delete_snapshot("snap1").unwrap();
    let clone = e.volume("c").unwrap();
    assert!(clone.source_deleted);
    assert_eq!(clone.source, Some(Source::Snapshot("snap1".into())));

    // A new snap1 of another volume: the clone still names the deleted one, and vol2
    // is no clone of anything.
    e.create_volume(&spec("vol2", MIB)).unwrap();
    let (new_snap, _) = e.create_snapshot("vol2", "snap1").unwrap();
    assert_ne!(new_snap.id, snap.id);
    let clone = e.volume("c").unwrap();
    assert!(clone.source_deleted, "c came from the deleted snap1");
    assert_eq!(clone.source_id.as_deref(), Some(snap.id.as_str()));
    let vol2 = e.volume("vol2").unwrap();
    assert_eq!((vol2.source, vol2.source_id), (None, None));
    // Re-creating "c from snap1" now means another snapshot: not the same volume.
    match e.create_volume(&clone_of("c", Source::Snapshot("snap1".into()))) {
        Err(EngineError::AlreadyExists { .. }) => {}
        other => panic!("{other:?}"),
    }

    // A clone of a deleted volume says so after a new volume takes the name.
    e.delete_volume("vol1").unwrap();
    e.create_volume(&spec("vol1", MIB)).unwrap();
    let vclone = e.volume("cv").unwrap();
    assert!(vclone.source_deleted);
    assert_eq!(vclone.source_id.as_deref(), Some(vol1.id.as_str()));
}

#[test]
fn ids_survive_a_restart() {
    let (meta, dev, e) = fresh();
    let (v, _) = e.create_volume(&spec("vol1", MIB)).unwrap();
    let (s, _) = e.create_snapshot("vol1", "snap1").unwrap();
    let (c, _) = e
        .create_volume(&clone_of("c", Source::Snapshot("snap1".into())))
        .unwrap();
    e.shutdown().unwrap();
    drop(e);
    let e = open(&meta, &dev);
    assert_eq!(e.volume("vol1").unwrap().id, v.id);
    assert_eq!(e.snapshot("snap1").unwrap(), s);
    assert_eq!(e.volume("c").unwrap().source_id, c.source_id);
}

/// Rewrites every image record as a version without ids wrote it.
fn strip_ids(meta: &MemStore) {
    let mut batch = WriteBatch::new();
    for (k, v) in meta.scan(Cf::Images, &[], &[], usize::MAX).unwrap() {
        let mut rec: serde_json::Value = serde_json::from_slice(&v).unwrap();
        let obj = rec.as_object_mut().unwrap();
        for field in ["uuid", "origin_id", "source_id"] {
            assert!(obj.remove(field).is_some() || field != "uuid", "{rec}");
        }
        batch.put_cf(Cf::Images, k, serde_json::to_vec(&rec).unwrap());
    }
    meta.write(batch, true).unwrap();
}

fn stored_ids(meta: &MemStore) -> Vec<(u64, String)> {
    meta.scan(Cf::Images, &[], &[], usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let rec: serde_json::Value = serde_json::from_slice(&v).unwrap();
            (
                keys::decode_id(Cf::Images, &k).unwrap(),
                rec["uuid"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn records_from_before_ids_get_stable_ids_once() {
    let (meta, dev, e) = fresh();
    e.create_volume(&spec("vol1", MIB)).unwrap();
    e.create_snapshot("vol1", "snap1").unwrap();
    e.create_snapshot("vol1", "snapx").unwrap();
    e.create_volume(&clone_of("c1", Source::Snapshot("snap1".into())))
        .unwrap();
    e.create_volume(&clone_of("cx", Source::Snapshot("snapx".into())))
        .unwrap();
    e.create_volume(&clone_of("cv", Source::Volume("vol1".into())))
        .unwrap();
    e.create_volume(&clone_of("cf", Source::Snapshot("snap1".into())))
        .unwrap();
    e.flatten_volume("cf", &mut |_, _| {}).unwrap();
    e.create_volume(&spec("other", MIB)).unwrap();
    e.delete_snapshot("snapx").unwrap();
    e.create_snapshot("other", "snapx").unwrap();
    e.delete_volume("vol1").unwrap();
    e.create_volume(&spec("vol1", MIB)).unwrap();
    e.shutdown().unwrap();
    drop(e);

    strip_ids(&meta);
    assert!(stored_ids(&meta).iter().all(|(_, id)| id.is_empty()));
    let e = open(&meta, &dev);
    let ids = stored_ids(&meta);
    assert!(
        ids.iter().all(|(_, id)| is_uuid(id)),
        "every record got an id, durably: {ids:?}"
    );
    let mut unique: Vec<&String> = ids.iter().map(|(_, id)| id).collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids are unique: {ids:?}");

    let vol1 = e.volume("vol1").unwrap();
    let other = e.volume("other").unwrap();
    let snap1 = e.snapshot("snap1").unwrap();
    let snapx = e.snapshot("snapx").unwrap();
    // snap1's volume is the deleted vol1, not the new one.
    assert!(snap1.volume_deleted);
    assert_ne!(snap1.volume_id, vol1.id);
    // The new snapx belongs to the live "other".
    assert_eq!(snapx.volume_id, other.id);
    assert!(!snapx.volume_deleted);
    // c1's snapshot is alive; cx's snapx was deleted (the live snapx is another one);
    // cv's volume was deleted (the live vol1 is another one); flattened cf finds snap1,
    // which is older than it.
    let c1 = e.volume("c1").unwrap();
    assert_eq!(c1.source_id.as_deref(), Some(snap1.id.as_str()));
    assert!(!c1.source_deleted);
    let cx = e.volume("cx").unwrap();
    assert!(cx.source_deleted);
    assert_ne!(cx.source_id.as_deref(), Some(snapx.id.as_str()));
    let cv = e.volume("cv").unwrap();
    assert!(cv.source_deleted);
    assert_eq!(cv.source_id.as_deref(), Some(snap1.volume_id.as_str()));
    let cf = e.volume("cf").unwrap();
    assert_eq!(cf.source_id.as_deref(), Some(snap1.id.as_str()));

    // Once given, ids stay: the next open changes nothing.
    let listed = (e.volumes(), e.snapshots(None).unwrap());
    e.shutdown().unwrap();
    drop(e);
    let e = open(&meta, &dev);
    assert_eq!(stored_ids(&meta), ids);
    assert_eq!((e.volumes(), e.snapshots(None).unwrap()), listed);
}

#[test]
fn pools_refuse_sizes_past_their_overprovisioning_limit() {
    let (_meta, _dev, e) = fresh();
    assert_eq!(e.max_overprovision(), Some(DEFAULT_MAX_OVERPROVISION));
    let capacity = e.pool("p").unwrap().capacity_bytes;
    e.set_max_overprovision(Some(2.0));
    assert_eq!(e.pool("p").unwrap().max_overprovision, Some(2.0));

    // Up to the limit is fine (sizes are multiples of 4 KiB, so is the capacity).
    e.create_volume(&spec("a", capacity)).unwrap();
    e.create_volume(&spec("b", capacity)).unwrap();
    let refused = |r: Result<_, EngineError>| match r {
        Err(err @ EngineError::OverProvisioned { .. }) => {
            let text = err.to_string();
            assert!(
                text.contains("--max-overprovision") && text.contains("\"p\""),
                "{text}"
            );
            text
        }
        other => panic!("{other:?}"),
    };
    let text = refused(e.create_volume(&spec("c", 4096)).map(|_| ()));
    assert!(text.contains("creating volume \"c\""), "{text}");
    // Clones and grows count too; an idempotent retry and a shrink do not.
    e.create_snapshot("a", "s").unwrap();
    refused(
        e.create_volume(&clone_of("c", Source::Snapshot("s".into())))
            .map(|_| ()),
    );
    refused(
        e.create_volume(&clone_of("c", Source::Volume("a".into())))
            .map(|_| ()),
    );
    let text = refused(e.resize_volume("a", capacity + 4096, false).map(|_| ()));
    assert!(text.contains("growing volume \"a\""), "{text}");
    let (_, created) = e.create_volume(&spec("a", capacity)).unwrap();
    assert!(!created);
    e.resize_volume("b", capacity / 2, true).unwrap();
    e.create_volume(&spec("c", capacity / 2)).unwrap();
    assert_eq!(e.pool("p").unwrap().provisioned_bytes, 2 * capacity);

    // Unlimited.
    e.set_max_overprovision(None);
    assert_eq!(e.pool("p").unwrap().max_overprovision, None);
    e.create_volume(&spec("huge", 1 << 40)).unwrap();
    // A limit below what is already promised takes nothing away; it refuses growth.
    e.set_max_overprovision(Some(1.0));
    e.volume("huge").unwrap();
    refused(e.create_volume(&spec("more", 4096)).map(|_| ()));
    e.delete_volume("huge").unwrap();
    e.set_max_overprovision(Some(f64::NAN));
    assert_eq!(e.max_overprovision(), None, "nonsense means unlimited");
}
