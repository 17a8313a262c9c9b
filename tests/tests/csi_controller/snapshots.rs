//! CreateSnapshot, DeleteSnapshot, ListSnapshots, restores and clones.

use super::*;

#[test]
fn snapshots_restores_and_clones() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let src = create(&mut c, create_req("src", 8 * MIB)).await;
        let other = create(&mut c, create_req("other", 8 * MIB)).await;

        let snap = snapshot(&mut c, &src.volume_id, "snap-1").await;
        assert_eq!(snap.snapshot_id, format!("{NODE}/src@snap-1"));
        assert_eq!(snap.source_volume_id, src.volume_id);
        assert_eq!(snap.size_bytes, 8 * MIB);
        assert!(snap.ready_to_use);
        let created = snap.creation_time.expect("creation_time");
        assert!(created.seconds > 1_600_000_000);
        // Idempotent; the same name of another volume is ALREADY_EXISTS.
        assert_eq!(snapshot(&mut c, &src.volume_id, "snap-1").await, snap);
        expect_code(
            "snapshot name reused for another volume",
            c.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: other.volume_id.clone(),
                name: "snap-1".into(),
                ..Default::default()
            })
            .await,
            Code::AlreadyExists,
            "snap-1",
        );
        for (what, req, code) in [
            (
                "no name",
                csi::CreateSnapshotRequest {
                    source_volume_id: src.volume_id.clone(),
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
            (
                "no source",
                csi::CreateSnapshotRequest {
                    name: "s".into(),
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
            (
                "missing source volume",
                csi::CreateSnapshotRequest {
                    name: "s".into(),
                    source_volume_id: format!("{NODE}/nope"),
                    ..Default::default()
                },
                Code::NotFound,
            ),
            (
                "source volume on another node",
                csi::CreateSnapshotRequest {
                    name: "s".into(),
                    source_volume_id: "node-b/src".into(),
                    ..Default::default()
                },
                Code::FailedPrecondition,
            ),
            (
                "unknown parameter",
                csi::CreateSnapshotRequest {
                    name: "s".into(),
                    source_volume_id: src.volume_id.clone(),
                    parameters: params(&[("speed", "fast")]),
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
        ] {
            expect_code(what, c.create_snapshot(req).await, code, "");
        }

        // GetSnapshot: the same snapshot, or NOT_FOUND.
        let got = c
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("GetSnapshot")
            .into_inner()
            .snapshot;
        assert_eq!(got.as_ref(), Some(&snap));
        for (id, code) in [
            (format!("{NODE}/src@nope"), Code::NotFound),
            (format!("{NODE}/other@snap-1"), Code::NotFound),
            ("junk".to_string(), Code::NotFound),
            (String::new(), Code::InvalidArgument),
            ("node-b/src@snap-1".to_string(), Code::FailedPrecondition),
        ] {
            expect_code(
                &format!("GetSnapshot {id:?}"),
                c.get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: id,
                    ..Default::default()
                })
                .await,
                code,
                "",
            );
        }

        // Restore at the source's size (no range), and into a larger volume (O(1)).
        let mut req = create_req("restore-same", 0);
        req.volume_content_source = from_snapshot(&snap.snapshot_id);
        let same = create(&mut c, req).await;
        assert_eq!(same.capacity_bytes, 8 * MIB);
        assert_eq!(same.content_source, from_snapshot(&snap.snapshot_id));
        let mut req = create_req("restore-big", 64 * MIB);
        req.volume_content_source = from_snapshot(&snap.snapshot_id);
        req.parameters = params(&[("pool", "default")]);
        let big = create(&mut c, req.clone()).await;
        assert_eq!(big.capacity_bytes, 64 * MIB);
        assert_eq!(create(&mut c, req.clone()).await, big, "idempotent restore");
        let blockd_big = env.blockd_volume("restore-big").await.unwrap();
        assert_eq!(blockd_big.size_bytes, 64 << 20);
        assert_eq!(
            blockd_big.source,
            Some(v1::volume::Source::SourceSnapshot("snap-1".into()))
        );
        // The same name from no source, or another source, is another volume.
        let mut blank = req.clone();
        blank.volume_content_source = None;
        expect_code(
            "same name without the source",
            c.create_volume(blank).await,
            Code::AlreadyExists,
            "restore-big",
        );

        // Smaller than the source: OUT_OF_RANGE, whichever bound says so.
        for (what, capacity_range) in [
            ("required below source", range(4 * MIB, 0)),
            ("limit below source", range(0, 4 * MIB)),
        ] {
            let mut req = create_req("restore-small", 0);
            req.capacity_range = capacity_range;
            req.volume_content_source = from_snapshot(&snap.snapshot_id);
            expect_code(what, c.create_volume(req).await, Code::OutOfRange, "source");
        }

        // Clone from a volume.
        let mut req = create_req("clone", 16 * MIB);
        req.volume_content_source = from_volume(&src.volume_id);
        let clone = create(&mut c, req.clone()).await;
        assert_eq!(clone.capacity_bytes, 16 * MIB);
        assert_eq!(clone.content_source, from_volume(&src.volume_id));
        assert_eq!(create(&mut c, req).await, clone, "idempotent clone");
        assert_eq!(
            env.blockd_volume("clone").await.unwrap().source,
            Some(v1::volume::Source::SourceVolume("src".into()))
        );

        // Sources that do not exist here: NOT_FOUND; on another node: RESOURCE_EXHAUSTED.
        let cases = [
            (
                "missing snapshot",
                from_snapshot(&format!("{NODE}/src@nope")),
                Code::NotFound,
            ),
            (
                "snapshot id naming the wrong volume",
                from_snapshot(&format!("{NODE}/other@snap-1")),
                Code::NotFound,
            ),
            (
                "malformed snapshot id",
                from_snapshot("garbage"),
                Code::NotFound,
            ),
            (
                "missing volume",
                from_volume(&format!("{NODE}/nope")),
                Code::NotFound,
            ),
            ("malformed volume id", from_volume("x"), Code::NotFound),
            (
                "snapshot on another node",
                from_snapshot("node-b/src@snap-1"),
                Code::ResourceExhausted,
            ),
            (
                "volume on another node",
                from_volume("node-b/src"),
                Code::ResourceExhausted,
            ),
        ];
        for (what, source, code) in cases {
            let mut req = create_req("from-elsewhere", 16 * MIB);
            req.volume_content_source = source;
            expect_code(what, c.create_volume(req).await, code, "");
        }
        assert!(env.blockd_volume("from-elsewhere").await.is_none());

        // ControllerGetVolume reports where a restore came from.
        let got = get_volume(&mut c, &big.volume_id)
            .await
            .volume
            .expect("volume");
        assert_eq!(got.content_source, from_snapshot(&snap.snapshot_id));
        assert_eq!(got.capacity_bytes, 64 * MIB);

        // The snapshot outlives its volume and still restores.
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: src.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume of a volume with snapshots and clones");
        let listed = c
            .list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("ListSnapshots")
            .into_inner()
            .entries;
        assert_eq!(listed.len(), 1);
        let mut req = create_req("restore-after-delete", 0);
        req.volume_content_source = from_snapshot(&snap.snapshot_id);
        assert_eq!(create(&mut c, req).await.capacity_bytes, 8 * MIB);

        // DeleteSnapshot: idempotent, unknown and malformed ids are OK.
        for id in [
            snap.snapshot_id.clone(),
            snap.snapshot_id.clone(),
            format!("{NODE}/src@never"),
            "not-an-id".into(),
        ] {
            c.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("DeleteSnapshot {id}: {s}"));
        }
        expect_code(
            "DeleteSnapshot without an id",
            c.delete_snapshot(csi::DeleteSnapshotRequest::default())
                .await,
            Code::InvalidArgument,
            "snapshot_id",
        );
        expect_code(
            "DeleteSnapshot of another node's snapshot",
            c.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: "node-b/src@snap-1".into(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
            "node-b",
        );
        let mut grpc = env.daemon.grpc().await;
        let left = grpc
            .snapshots
            .list_snapshots(v1::ListSnapshotsRequest::default())
            .await
            .expect("blockd ListSnapshots")
            .into_inner()
            .snapshots;
        assert!(left.is_empty(), "{left:?}");
        // Restores made from the deleted snapshot are still there, and a late retry of
        // the CreateVolume that made one still answers with it.
        assert!(env.blockd_volume("restore-big").await.is_some());
        let mut retry = create_req("restore-big", 64 * MIB);
        retry.volume_content_source = from_snapshot(&snap.snapshot_id);
        retry.parameters = params(&[("pool", "default")]);
        assert_eq!(create(&mut c, retry).await, big);
        // A new volume from the deleted snapshot is NOT_FOUND.
        let mut late = create_req("restore-late", 0);
        late.volume_content_source = from_snapshot(&snap.snapshot_id);
        expect_code(
            "restore from a deleted snapshot",
            c.create_volume(late).await,
            Code::NotFound,
            "snap-1",
        );
    });
}

#[test]
fn list_snapshots_filters_and_paginates() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let a = create(&mut c, create_req("vol-a", 4 * MIB)).await;
        let b = create(&mut c, create_req("vol-b", 4 * MIB)).await;
        for i in 0..3 {
            snapshot(&mut c, &a.volume_id, &format!("a-{i}")).await;
        }
        for i in 0..2 {
            snapshot(&mut c, &b.volume_id, &format!("b-{i}")).await;
        }
        let list = |req: csi::ListSnapshotsRequest| {
            let mut c = c.clone();
            async move {
                let answer = c
                    .list_snapshots(req)
                    .await
                    .expect("ListSnapshots")
                    .into_inner();
                let ids: Vec<String> = answer
                    .entries
                    .into_iter()
                    .map(|e| e.snapshot.expect("snapshot").snapshot_id)
                    .collect();
                (ids, answer.next_token)
            }
        };

        // All, two per page.
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let (ids, next) = list(csi::ListSnapshotsRequest {
                max_entries: 2,
                starting_token: token.clone(),
                ..Default::default()
            })
            .await;
            assert!(ids.len() <= 2);
            all.extend(ids);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(
            all,
            vec![
                format!("{NODE}/vol-a@a-0"),
                format!("{NODE}/vol-a@a-1"),
                format!("{NODE}/vol-a@a-2"),
                format!("{NODE}/vol-b@b-0"),
                format!("{NODE}/vol-b@b-1"),
            ]
        );

        // By source volume, paged.
        let (ids, next) = list(csi::ListSnapshotsRequest {
            source_volume_id: b.volume_id.clone(),
            max_entries: 1,
            ..Default::default()
        })
        .await;
        assert_eq!(ids, vec![format!("{NODE}/vol-b@b-0")]);
        let (ids, next) = list(csi::ListSnapshotsRequest {
            source_volume_id: b.volume_id.clone(),
            max_entries: 1,
            starting_token: next,
            ..Default::default()
        })
        .await;
        assert_eq!(ids, vec![format!("{NODE}/vol-b@b-1")]);
        assert!(next.is_empty());

        // By id; unknown, malformed or other-node ids and volumes list nothing.
        let (ids, _) = list(csi::ListSnapshotsRequest {
            snapshot_id: format!("{NODE}/vol-a@a-1"),
            ..Default::default()
        })
        .await;
        assert_eq!(ids, vec![format!("{NODE}/vol-a@a-1")]);
        for req in [
            csi::ListSnapshotsRequest {
                snapshot_id: format!("{NODE}/vol-b@a-1"),
                ..Default::default()
            },
            csi::ListSnapshotsRequest {
                snapshot_id: "no-such-id".into(),
                ..Default::default()
            },
            csi::ListSnapshotsRequest {
                snapshot_id: "node-b/vol-a@a-1".into(),
                ..Default::default()
            },
            csi::ListSnapshotsRequest {
                source_volume_id: format!("{NODE}/vol-z"),
                ..Default::default()
            },
            csi::ListSnapshotsRequest {
                source_volume_id: "node-b/vol-a".into(),
                ..Default::default()
            },
            csi::ListSnapshotsRequest {
                snapshot_id: format!("{NODE}/vol-a@a-1"),
                source_volume_id: b.volume_id.clone(),
                ..Default::default()
            },
        ] {
            let what = format!("{req:?}");
            let (ids, next) = list(req).await;
            assert!(ids.is_empty() && next.is_empty(), "{what}: {ids:?}");
        }

        expect_code(
            "invalid starting_token",
            c.list_snapshots(csi::ListSnapshotsRequest {
                starting_token: "zz".into(),
                ..Default::default()
            })
            .await,
            Code::Aborted,
            "starting_token",
        );
        expect_code(
            "negative max_entries",
            c.list_snapshots(csi::ListSnapshotsRequest {
                max_entries: -3,
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "max_entries",
        );
    });
}
