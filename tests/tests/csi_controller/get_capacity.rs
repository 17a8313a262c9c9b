//! GetCapacity: creates, the over-provisioning ratio, writes and a full pool.

use super::*;

#[test]
fn get_capacity_follows_creates_and_refuses_past_the_ratio() {
    // Ratio 1: no over-provisioning, so every create takes room.
    let env = Env::start_with(&[], &["--overprovisioning-ratio", "1"]);
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let pool = env.blockd_pool("default").await;
        let cap_bytes = pool.capacity_bytes as i64;
        let reserve = cap_bytes / 50;

        let empty = capacity(&mut c, HashMap::new()).await;
        assert_eq!(empty.maximum_volume_size, Some(cap_bytes));
        assert_eq!(empty.available_capacity, pool.free_bytes as i64 - reserve);
        assert_eq!(empty.minimum_volume_size, Some(4096));
        // The default pool by name, and StorageClass parameters, give the same answer.
        let named = capacity(
            &mut c,
            params(&[
                ("pool", "default"),
                ("iopsPerGB", "20"),
                ("csi.storage.k8s.io/fstype", "xfs"),
            ]),
        )
        .await;
        assert_eq!(named, empty);

        create(&mut c, create_req("big", GIB)).await;
        let after = capacity(&mut c, HashMap::new()).await;
        assert_eq!(after.maximum_volume_size, Some(cap_bytes - GIB));
        assert_eq!(after.available_capacity, cap_bytes - GIB);

        // Past the ratio: RESOURCE_EXHAUSTED with the numbers.
        expect_code(
            "more than is left",
            c.create_volume(create_req("too-big", cap_bytes - GIB + 4096))
                .await,
            Code::ResourceExhausted,
            "over-provisioning",
        );
        // Exactly what is left still fits.
        create(&mut c, create_req("rest", cap_bytes - GIB)).await;
        let full = capacity(&mut c, HashMap::new()).await;
        assert_eq!(
            (full.available_capacity, full.maximum_volume_size),
            (0, Some(0))
        );
        // A retry of an existing volume is not a new promise.
        create(&mut c, create_req("rest", cap_bytes - GIB)).await;
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: format!("{NODE}/rest"),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(capacity(&mut c, HashMap::new()).await, after);

        // Another node's topology, an unknown pool, or unsupported capabilities: 0.
        for req in [
            csi::GetCapacityRequest {
                accessible_topology: Some(topology("node-b")),
                ..Default::default()
            },
            csi::GetCapacityRequest {
                parameters: params(&[("pool", "nvme")]),
                ..Default::default()
            },
            csi::GetCapacityRequest {
                volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly, block())],
                ..Default::default()
            },
        ] {
            let what = format!("{req:?}");
            let answer = c.get_capacity(req).await.expect("GetCapacity").into_inner();
            assert_eq!(answer.available_capacity, 0, "{what}");
        }
        let here = c
            .get_capacity(csi::GetCapacityRequest {
                accessible_topology: Some(topology(NODE)),
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await
            .expect("GetCapacity")
            .into_inner();
        assert_eq!(here, after);
        expect_code(
            "bad parameters",
            c.get_capacity(csi::GetCapacityRequest {
                parameters: params(&[("maxIops", "-1")]),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "maxIops",
        );
    });
}

/// Writes `len` bytes of a pattern at `offset` of an NBD export.
fn nbd_write(uri: &str, offset: u64, len: u64) {
    qemu_io(uri, &[&format!("write -P 0x5a {offset} {len}")]);
}

#[test]
fn capacity_follows_writes_and_a_full_pool_refuses_new_volumes() {
    if !have_tool("qemu-io") {
        skip("qemu-io is not installed (tools/test.sh installs it)");
        return;
    }
    let pool_dir = tempfile::tempdir().expect("pool dir");
    let pool = format!(
        "default={},size=64M",
        pool_dir.path().join("small.img").display()
    );
    let env = Env::start_with(&["--pool", &pool], &[]);
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let before = capacity(&mut c, HashMap::new()).await;
        assert!(before.available_capacity > 32 * MIB, "{before:?}");
        create(&mut c, create_req("filler", 64 * MIB)).await;
        // Thin: creating promised space but used none.
        assert_eq!(
            capacity(&mut c, HashMap::new()).await.available_capacity,
            before.available_capacity
        );
        let uri = env.export("filler").await;

        nbd_write(&uri, 0, 16 << 20);
        let after = capacity(&mut c, HashMap::new()).await;
        let used = before.available_capacity - after.available_capacity;
        assert!(
            (16 * MIB..=17 * MIB).contains(&used),
            "16 MiB written, capacity fell by {used}"
        );
        let pool = env.blockd_pool("default").await;
        // Fill all but a sliver below the 2% reserve.
        let fill_to = pool.capacity_bytes - pool.capacity_bytes / 100;
        nbd_write(&uri, 16 << 20, fill_to - (16 << 20));
        let full = capacity(&mut c, HashMap::new()).await;
        assert_eq!(full.available_capacity, 0, "{full:?}");
        expect_code(
            "pool full",
            c.create_volume(create_req("one-more", 4 * MIB)).await,
            Code::ResourceExhausted,
            "full",
        );
        // The existing volume is still there and a retry of it still answers.
        create(&mut c, create_req("filler", 64 * MIB)).await;
    });
}
