//! CSI GroupController: VolumeGroupSnapshots over blockd group snapshots: capabilities,
//! creation (idempotent by name and source set), every spec error code, members as
//! ordinary snapshots (GetSnapshot, restore with CreateVolume) that cannot be deleted
//! alone, and deletion of the whole group. Data is written and checked with qemu-io.

use blockd_proto::csi;
use blockd_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType};
use blockd_tests::csi_controller::{
    create, create_block_req, offers_service, plugin_capabilities, Env, MIB, NODE,
};
use blockd_tests::{expect_status, have_tool, qemu_io, skip};
use tonic::Code;

fn group_req(name: &str, sources: &[&str]) -> csi::CreateVolumeGroupSnapshotRequest {
    csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn group_snapshots_through_csi() {
    if !have_tool("qemu-io") {
        skip("qemu-io is not installed (tools/test.sh installs it)");
        return;
    }
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let mut g = env.groups().await;

        let caps = g
            .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
            .await
            .expect("GroupControllerGetCapabilities")
            .into_inner()
            .capabilities;
        assert!(caps.iter().any(|cap| matches!(
            cap.r#type,
            Some(csi::group_controller_service_capability::Type::Rpc(r))
                if r.r#type == csi::group_controller_service_capability::rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32
        )));
        let plugin = plugin_capabilities(&mut env.identity().await).await;
        assert!(offers_service(
            &plugin,
            csi::plugin_capability::service::Type::GroupControllerService
        ));

        let db = create(&mut c, create_block_req("db", 8 * MIB)).await.volume_id;
        let wal = create(&mut c, create_block_req("wal", 8 * MIB)).await.volume_id;
        let other = create(&mut c, create_block_req("other", 8 * MIB)).await.volume_id;
        let db_uri = env.export("db").await;
        let wal_uri = env.export("wal").await;
        // qemu-io blocks this thread only: the clients run on the runtime's workers.
        qemu_io(&db_uri, &["write -P 0xd1 0 1M"]);
        qemu_io(&wal_uri, &["write -P 0xa1 0 1M"]);

        // Errors first: none may leave anything behind.
        let cases: Vec<(&str, csi::CreateVolumeGroupSnapshotRequest, Code, &str)> = vec![
            ("no name", group_req("", &[&db]), Code::InvalidArgument, "name"),
            ("no sources", group_req("g", &[]), Code::InvalidArgument, "source_volume_ids"),
            ("a source twice", group_req("g", &[&db, &db]), Code::InvalidArgument, "more than once"),
            (
                "unknown parameter",
                csi::CreateVolumeGroupSnapshotRequest {
                    parameters: [("consistency".to_string(), "app".to_string())].into(),
                    ..group_req("g", &[&db])
                },
                Code::InvalidArgument,
                "consistency",
            ),
            ("missing volume", group_req("g", &[&db, &format!("{NODE}/gone")]), Code::NotFound, "gone"),
            ("malformed source", group_req("g", &[&db, "garbage"]), Code::NotFound, "garbage"),
            ("another node's volume", group_req("g", &[&db, "node-b/wal"]), Code::FailedPrecondition, "same node"),
        ];
        for (what, req, code, needle) in cases {
            expect_status(what, g.create_volume_group_snapshot(req).await, code, needle);
        }
        let snaps = c
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(snaps.entries.is_empty(), "a refused request made {snaps:?}");

        let created = g
            .create_volume_group_snapshot(group_req("nightly", &[&wal, &db]))
            .await
            .expect("CreateVolumeGroupSnapshot")
            .into_inner()
            .group_snapshot
            .expect("a group snapshot");
        assert_eq!(created.group_snapshot_id, format!("{NODE}/nightly"));
        assert!(created.ready_to_use);
        assert!(created.creation_time.is_some());
        let members: Vec<(String, String)> = created
            .snapshots
            .iter()
            .map(|s| (s.source_volume_id.clone(), s.snapshot_id.clone()))
            .collect();
        assert_eq!(
            members,
            [
                (db.clone(), format!("{NODE}/db@nightly-db")),
                (wal.clone(), format!("{NODE}/wal@nightly-wal")),
            ]
        );
        for s in &created.snapshots {
            assert_eq!(s.group_snapshot_id, created.group_snapshot_id);
            assert!(s.ready_to_use);
            assert_eq!(s.size_bytes, 8 * MIB);
        }
        let member_ids: Vec<String> = members.iter().map(|m| m.1.clone()).collect();

        // Idempotent by name with the same sources (in any order)…
        let again = g
            .create_volume_group_snapshot(group_req("nightly", &[&db, &wal]))
            .await
            .expect("repeated CreateVolumeGroupSnapshot")
            .into_inner()
            .group_snapshot
            .unwrap();
        assert_eq!(again, created);
        // …and ALREADY_EXISTS with others.
        expect_status(
            "same name, other sources",
            g.create_volume_group_snapshot(group_req("nightly", &[&db, &other]))
                .await,
            Code::AlreadyExists,
            "nightly",
        );

        // Members are ordinary snapshots that carry their group.
        let got = c
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: member_ids[0].clone(),
                ..Default::default()
            })
            .await
            .expect("GetSnapshot of a member")
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(got.group_snapshot_id, created.group_snapshot_id);
        expect_status(
            "DeleteSnapshot of a member",
            c.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: member_ids[0].clone(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "part of group snapshot",
        );

        // Get: by id with the member list; mismatches and unknown groups are refused.
        let fetched = g
            .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: created.group_snapshot_id.clone(),
                snapshot_ids: member_ids.iter().rev().cloned().collect(),
                ..Default::default()
            })
            .await
            .expect("GetVolumeGroupSnapshot")
            .into_inner()
            .group_snapshot
            .unwrap();
        assert_eq!(fetched, created);
        let get = |id: &str, ids: Vec<String>| csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: id.into(),
            snapshot_ids: ids,
            ..Default::default()
        };
        for (what, req, code, needle) in [
            ("no id", get("", member_ids.clone()), Code::InvalidArgument, "group_snapshot_id"),
            ("no snapshot_ids", get(&created.group_snapshot_id, vec![]), Code::InvalidArgument, "snapshot_ids"),
            ("a member missing", get(&created.group_snapshot_id, member_ids[..1].to_vec()), Code::InvalidArgument, "do not match"),
            ("unknown group", get(&format!("{NODE}/weekly"), member_ids.clone()), Code::NotFound, "weekly"),
            ("malformed id", get("nonsense", member_ids.clone()), Code::NotFound, "nonsense"),
        ] {
            expect_status(what, g.get_volume_group_snapshot(req).await, code, needle);
        }

        // Change the volumes after the instant; the restores read the instant.
        qemu_io(&db_uri, &["write -P 0xd2 0 1M"]);
        qemu_io(&wal_uri, &["write -P 0xa2 0 1M"]);
        for (name, member, pattern) in [
            ("db-restored", &member_ids[0], "0xd1"),
            ("wal-restored", &member_ids[1], "0xa1"),
        ] {
            let mut req = create_block_req(name, 8 * MIB);
            req.volume_content_source = Some(csi::VolumeContentSource {
                r#type: Some(SourceType::Snapshot(SnapshotSource {
                    snapshot_id: member.clone(),
                })),
            });
            create(&mut c, req).await;
            let uri = env.export(name).await;
            qemu_io(&uri, &[&format!("read -P {pattern} 0 1M"), "read -P 0 1M 7M"]);
        }

        // Delete: the member list must match; a member exported is in use.
        let delete = |ids: Vec<String>| csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: created.group_snapshot_id.clone(),
            snapshot_ids: ids,
            ..Default::default()
        };
        expect_status(
            "delete with a wrong member list",
            g.delete_volume_group_snapshot(delete(vec![member_ids[0].clone(), format!("{NODE}/x@y")]))
                .await,
            Code::InvalidArgument,
            "do not match",
        );
        env.export("db@nightly-db").await;
        expect_status(
            "delete while a member is exported",
            g.delete_volume_group_snapshot(delete(member_ids.clone())).await,
            Code::FailedPrecondition,
            "in use",
        );
        env.unexport("db@nightly-db").await;
        g.delete_volume_group_snapshot(delete(member_ids.clone()))
            .await
            .expect("DeleteVolumeGroupSnapshot");
        // Deleted means deleted, and a second delete is OK.
        g.delete_volume_group_snapshot(delete(member_ids.clone()))
            .await
            .expect("repeated DeleteVolumeGroupSnapshot");
        expect_status(
            "get after delete",
            g.get_volume_group_snapshot(get(&created.group_snapshot_id, member_ids.clone()))
                .await,
            Code::NotFound,
            "does not exist",
        );
        let left = c
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert!(left.is_empty(), "members left behind: {left:?}");
        // Restores outlive the group.
        let uri = env.export("db-restored").await;
        qemu_io(&uri, &["read -P 0xd1 0 1M"]);
    });
}
