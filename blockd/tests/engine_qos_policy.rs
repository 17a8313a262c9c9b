//! QoS policies: a volume's limits derived from a policy that blockd keeps, so that an
//! `iopsPerGB` limit follows the volume's size through resizes, survives a restart, and
//! changes on an open image from its next request.

use std::sync::Arc;

use blockd::device::mem::MemDevice;
use blockd::engine::{EngineError, Qos, QosPolicy};
use blockd::meta::mem::MemStore;

#[path = "common/mem_engine.rs"]
mod mem_engine;
use mem_engine::{open, spec};

/// The pool's chunk size.
const CHUNK: u64 = 64 << 10;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn per_gb(iops_per_gb: u64, cap: u64, bandwidth: u64) -> QosPolicy {
    QosPolicy {
        max_iops: cap,
        iops_per_gb,
        max_bandwidth_bytes: bandwidth,
    }
}

#[test]
fn effective_limits_scale_round_up_and_cap() {
    let p = per_gb(20, 0, 0);
    assert_eq!(p.effective(GIB).max_iops, 20);
    assert_eq!(p.effective(3 * GIB / 2).max_iops, 30);
    // Rounded up, and never 0 (which would mean unlimited).
    assert_eq!(p.effective(4096).max_iops, 1);
    assert_eq!(per_gb(3, 0, 0).effective(GIB / 2).max_iops, 2);
    // Capped.
    assert_eq!(
        per_gb(20, 25, 7).effective(2 * GIB),
        Qos {
            max_iops: 25,
            max_bandwidth_bytes: 7
        }
    );
    // No overflow on absurd inputs.
    assert_eq!(
        per_gb(u64::MAX, 0, 0).effective(u64::MAX).max_iops,
        u64::MAX
    );
    // A fixed policy is its limits, whatever the size.
    let fixed = QosPolicy::fixed(Qos {
        max_iops: 500,
        max_bandwidth_bytes: 1 << 20,
    });
    assert_eq!(
        fixed.effective(GIB),
        Qos {
            max_iops: 500,
            max_bandwidth_bytes: 1 << 20
        }
    );
    assert_eq!(fixed.effective(100 * GIB), fixed.effective(GIB));
}

#[test]
fn iops_per_gb_follows_resize_and_survives_restart() {
    // 1024 IOPS per GiB is one per MiB, so the sizes stay small (the pool is in memory).
    let meta = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new(128 * MIB));
    let e = open(&meta, &dev, CHUNK);
    let (v, created) = e
        .create_volume_with_policy(&spec("vol", 16 * MIB), Some(per_gb(1024, 50, 1 << 20)))
        .unwrap();
    assert!(created);
    assert_eq!(
        v.qos,
        Qos {
            max_iops: 16,
            max_bandwidth_bytes: 1 << 20
        }
    );
    assert_eq!(v.qos_policy, per_gb(1024, 50, 1 << 20));
    let h = e.open_image("vol").unwrap();
    assert_eq!(e.image_qos(&h).max_iops, 16);

    // Grow: the limit follows the size, and the open handle sees it.
    let v = e.resize_volume("vol", 32 * MIB, false).unwrap();
    assert_eq!(v.qos.max_iops, 32);
    assert_eq!(e.image_qos(&h).max_iops, 32);
    // Past the cap.
    let v = e.resize_volume("vol", 64 * MIB, false).unwrap();
    assert_eq!(v.qos.max_iops, 50);

    // Idempotent create: the same policy is the same volume, another policy is not.
    let (_, created) = e
        .create_volume_with_policy(&spec("vol", 64 * MIB), Some(per_gb(1024, 50, 1 << 20)))
        .unwrap();
    assert!(!created);
    let err = e
        .create_volume_with_policy(&spec("vol", 64 * MIB), Some(per_gb(512, 50, 1 << 20)))
        .unwrap_err();
    assert!(matches!(err, EngineError::AlreadyExists { .. }), "{err:?}");

    // Restart: the policy is durable and still drives resizes.
    e.shutdown().unwrap();
    drop((e, h));
    let e = open(&meta, &dev, CHUNK);
    let v = e.volume("vol").unwrap();
    assert_eq!(v.qos_policy, per_gb(1024, 50, 1 << 20));
    assert_eq!(v.qos.max_iops, 50);
    e.set_qos_policy("vol", per_gb(512, 0, 0)).unwrap();
    let v = e.resize_volume("vol", 96 * MIB, false).unwrap();
    assert_eq!(
        v.qos,
        Qos {
            max_iops: 48,
            max_bandwidth_bytes: 0
        }
    );
    e.shutdown().unwrap();
}

#[test]
fn set_qos_policy_changes_an_open_image_and_fixed_limits_stay_fixed() {
    let meta = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new(128 * MIB));
    let e = open(&meta, &dev, CHUNK);
    let mut fixed = spec("fixed", 16 * MIB);
    fixed.qos = Qos {
        max_iops: 40,
        max_bandwidth_bytes: 0,
    };
    let (v, _) = e.create_volume(&fixed).unwrap();
    assert_eq!(v.qos_policy, QosPolicy::fixed(fixed.qos));
    // Fixed limits do not scale.
    assert_eq!(
        e.resize_volume("fixed", 32 * MIB, false)
            .unwrap()
            .qos
            .max_iops,
        40
    );
    // A fixed create is idempotent through either entry point.
    let mut same = fixed.clone();
    same.size = Some(32 * MIB);
    assert!(!e.create_volume(&same).unwrap().1);
    assert!(
        !e.create_volume_with_policy(&same, Some(QosPolicy::fixed(fixed.qos)))
            .unwrap()
            .1
    );

    let h = e.open_image("fixed").unwrap();
    let v = e.set_qos_policy("fixed", per_gb(640, 0, 4096)).unwrap();
    assert_eq!(
        v.qos,
        Qos {
            max_iops: 20,
            max_bandwidth_bytes: 4096
        },
        "640/GiB × 1/32 GiB"
    );
    assert_eq!(
        e.image_qos(&h),
        v.qos,
        "the open image reads the new limits"
    );
    // set_qos replaces the policy with fixed limits.
    let v = e
        .set_qos(
            "fixed",
            Qos {
                max_iops: 7,
                max_bandwidth_bytes: 0,
            },
        )
        .unwrap();
    assert_eq!(
        v.qos_policy,
        QosPolicy::fixed(Qos {
            max_iops: 7,
            max_bandwidth_bytes: 0
        })
    );
    assert_eq!(
        e.resize_volume("fixed", 64 * MIB, false)
            .unwrap()
            .qos
            .max_iops,
        7
    );

    let err = e.set_qos_policy("missing", per_gb(1, 0, 0)).unwrap_err();
    assert!(matches!(err, EngineError::NotFound { .. }), "{err:?}");
    e.shutdown().unwrap();
}
