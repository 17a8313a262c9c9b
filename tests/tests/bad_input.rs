//! The bad-input matrix: every RPC with each kind of invalid field returns the documented
//! gRPC code and a message naming the problem, and the daemon keeps serving (it never
//! panics on input).

use blockd_proto::model::encode_token;
use blockd_proto::v1;
use blockd_proto::v1::create_volume_request::Source;
use blockd_tests::{runtime, snapshot_request, Daemon};
use tonic::Code;

fn create(name: &str, size: Option<u64>) -> v1::CreateVolumeRequest {
    v1::CreateVolumeRequest {
        name: name.to_string(),
        size_bytes: size,
        ..Default::default()
    }
}

/// Checks a failed call: its code, and that its message contains every `needle`.
fn expect(
    case: &str,
    result: Result<impl std::fmt::Debug, tonic::Status>,
    code: Code,
    needles: &[&str],
) {
    match result {
        Ok(value) => panic!("{case}: expected {code:?}, got success {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{case}: {}", status.message());
            for needle in needles {
                assert!(
                    status.message().contains(needle),
                    "{case}: message {:?} lacks {needle:?}",
                    status.message()
                );
            }
            assert!(
                !status.message().contains('\n'),
                "{case}: multi-line message"
            );
        }
    }
}

#[test]
fn every_rpc_refuses_bad_input_with_the_right_code() {
    let d = Daemon::start();
    let rt = runtime();
    rt.block_on(async {
        let mut g = d.grpc().await;
        let ok = g
            .volumes
            .create_volume(create("vol", Some(1 << 20)))
            .await
            .unwrap();
        assert!(ok.into_inner().created);
        g.snapshots
            .create_snapshot(snapshot_request("vol", "snap"))
            .await
            .unwrap();

        // --- CreateVolume ---
        expect(
            "empty name",
            g.volumes.create_volume(create("", Some(4096))).await,
            Code::InvalidArgument,
            &["name", "must not be empty"],
        );
        expect(
            "bad characters",
            g.volumes
                .create_volume(create("Bad/Name", Some(4096)))
                .await,
            Code::InvalidArgument,
            &["\"Bad/Name\""],
        );
        expect(
            "leading dash",
            g.volumes.create_volume(create("-x", Some(4096))).await,
            Code::InvalidArgument,
            &["\"-x\""],
        );
        expect(
            "dot-dot",
            g.volumes.create_volume(create("a..b", Some(4096))).await,
            Code::InvalidArgument,
            &["\"a..b\"", ".."],
        );
        expect(
            "too long",
            g.volumes
                .create_volume(create(&"x".repeat(129), Some(4096)))
                .await,
            Code::InvalidArgument,
            &["128"],
        );
        expect(
            "zero size",
            g.volumes.create_volume(create("v0", Some(0))).await,
            Code::InvalidArgument,
            &["size_bytes", "greater than 0"],
        );
        expect(
            "no size",
            g.volumes.create_volume(create("v0", None)).await,
            Code::InvalidArgument,
            &["size_bytes"],
        );
        let mut req = create("v0", Some(4096));
        req.pool = "nope".into();
        expect(
            "unknown pool",
            g.volumes.create_volume(req).await,
            Code::NotFound,
            &["pool", "\"nope\""],
        );
        let mut req = create("v0", Some(4096));
        req.pool = "No Pool".into();
        expect(
            "bad pool name",
            g.volumes.create_volume(req).await,
            Code::InvalidArgument,
            &["pool"],
        );
        let mut req = create("v0", None);
        req.source = Some(Source::SourceSnapshot("missing".into()));
        expect(
            "unknown source snapshot",
            g.volumes.create_volume(req).await,
            Code::NotFound,
            &["snapshot", "\"missing\""],
        );
        let mut req = create("v0", None);
        req.source = Some(Source::SourceVolume("missing".into()));
        expect(
            "unknown source volume",
            g.volumes.create_volume(req).await,
            Code::NotFound,
            &["volume", "\"missing\""],
        );
        let mut req = create("v0", None);
        req.source = Some(Source::SourceSnapshot("Bad".into()));
        expect(
            "bad source name",
            g.volumes.create_volume(req).await,
            Code::InvalidArgument,
            &["source_snapshot"],
        );
        expect(
            "duplicate with a different size",
            g.volumes.create_volume(create("vol", Some(2 << 20))).await,
            Code::AlreadyExists,
            &["\"vol\"", "already exists"],
        );
        let mut req = create("vol", Some(1 << 20));
        req.max_iops = 100;
        expect(
            "duplicate with different QoS",
            g.volumes.create_volume(req).await,
            Code::AlreadyExists,
            &["\"vol\""],
        );
        // The same parameters again: success, not created.
        let again = g
            .volumes
            .create_volume(create("vol", Some(1 << 20)))
            .await
            .unwrap()
            .into_inner();
        assert!(!again.created);

        // --- Get / Delete / Resize / QoS / Flatten ---
        expect(
            "get missing",
            g.volumes
                .get_volume(v1::GetVolumeRequest {
                    name: "missing".into(),
                })
                .await,
            Code::NotFound,
            &["volume \"missing\" not found"],
        );
        expect(
            "get bad name",
            g.volumes
                .get_volume(v1::GetVolumeRequest { name: "".into() })
                .await,
            Code::InvalidArgument,
            &["name"],
        );
        expect(
            "delete missing",
            g.volumes
                .delete_volume(v1::DeleteVolumeRequest {
                    name: "missing".into(),
                    force: false,
                })
                .await,
            Code::NotFound,
            &["\"missing\""],
        );
        expect(
            "shrink without force",
            g.volumes
                .resize_volume(v1::ResizeVolumeRequest {
                    name: "vol".into(),
                    size_bytes: 4096,
                    force: false,
                })
                .await,
            Code::FailedPrecondition,
            &["\"vol\"", "shrink"],
        );
        expect(
            "resize to zero",
            g.volumes
                .resize_volume(v1::ResizeVolumeRequest {
                    name: "vol".into(),
                    size_bytes: 0,
                    force: true,
                })
                .await,
            Code::InvalidArgument,
            &["size_bytes"],
        );
        expect(
            "resize missing",
            g.volumes
                .resize_volume(v1::ResizeVolumeRequest {
                    name: "missing".into(),
                    size_bytes: 4096,
                    force: false,
                })
                .await,
            Code::NotFound,
            &["\"missing\""],
        );
        expect(
            "qos missing",
            g.volumes
                .set_volume_qos(v1::SetVolumeQosRequest {
                    name: "missing".into(),
                    qos: None,
                })
                .await,
            Code::NotFound,
            &["\"missing\""],
        );
        expect(
            "flatten missing",
            g.volumes
                .flatten_volume(v1::FlattenVolumeRequest {
                    name: "missing".into(),
                })
                .await,
            Code::NotFound,
            &["\"missing\""],
        );

        // --- Pagination ---
        for token in ["garbage", "00", "zz", &encode_token("vol")[4..]] {
            expect(
                "bad page token (volumes)",
                g.volumes
                    .list_volumes(v1::ListVolumesRequest {
                        page_size: 1,
                        page_token: token.into(),
                    })
                    .await,
                Code::InvalidArgument,
                &["page_token"],
            );
        }
        expect(
            "bad page token (snapshots)",
            g.snapshots
                .list_snapshots(v1::ListSnapshotsRequest {
                    page_token: "nope".into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            &["page_token"],
        );
        expect(
            "bad page token (pools)",
            g.pools
                .list_pools(v1::ListPoolsRequest {
                    page_token: "nope".into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            &["page_token"],
        );

        // --- Snapshots ---
        expect(
            "snapshot of missing volume",
            g.snapshots
                .create_snapshot(snapshot_request("missing", "s"))
                .await,
            Code::NotFound,
            &["\"missing\""],
        );
        expect(
            "snapshot empty name",
            g.snapshots
                .create_snapshot(snapshot_request("vol", ""))
                .await,
            Code::InvalidArgument,
            &["snapshot name"],
        );
        expect(
            "snapshot bad chars",
            g.snapshots
                .create_snapshot(snapshot_request("vol", "s@1"))
                .await,
            Code::InvalidArgument,
            &["\"s@1\""],
        );
        g.volumes
            .create_volume(create("other", Some(4096)))
            .await
            .unwrap();
        expect(
            "snapshot name taken by another volume",
            g.snapshots
                .create_snapshot(snapshot_request("other", "snap"))
                .await,
            Code::AlreadyExists,
            &["\"snap\""],
        );
        expect(
            "get missing snapshot",
            g.snapshots
                .get_snapshot(v1::GetSnapshotRequest {
                    name: "missing".into(),
                })
                .await,
            Code::NotFound,
            &["snapshot \"missing\" not found"],
        );
        expect(
            "delete missing snapshot",
            g.snapshots
                .delete_snapshot(v1::DeleteSnapshotRequest {
                    name: "missing".into(),
                })
                .await,
            Code::NotFound,
            &["\"missing\""],
        );
        expect(
            "list snapshots of missing volume",
            g.snapshots
                .list_snapshots(v1::ListSnapshotsRequest {
                    volume: "missing".into(),
                    ..Default::default()
                })
                .await,
            Code::NotFound,
            &["\"missing\""],
        );

        // --- Pools ---
        expect(
            "get missing pool",
            g.pools
                .get_pool(v1::GetPoolRequest {
                    name: "missing".into(),
                })
                .await,
            Code::NotFound,
            &["pool \"missing\""],
        );

        // --- Exports ---
        expect(
            "export missing",
            g.exports
                .export(v1::ExportRequest {
                    image: "missing".into(),
                })
                .await,
            Code::NotFound,
            &["\"missing\""],
        );
        expect(
            "export missing snapshot",
            g.exports
                .export(v1::ExportRequest {
                    image: "vol@missing".into(),
                })
                .await,
            Code::NotFound,
            &["missing"],
        );
        expect(
            "export snapshot of the wrong volume",
            g.exports
                .export(v1::ExportRequest {
                    image: "other@snap".into(),
                })
                .await,
            Code::NotFound,
            &["other@snap"],
        );
        expect(
            "export empty",
            g.exports
                .export(v1::ExportRequest { image: "".into() })
                .await,
            Code::InvalidArgument,
            &["image"],
        );
        expect(
            "export bad",
            g.exports
                .export(v1::ExportRequest {
                    image: "a@b@c".into(),
                })
                .await,
            Code::InvalidArgument,
            &["\"a@b@c\""],
        );
        expect(
            "unexport missing",
            g.exports
                .unexport(v1::UnexportRequest {
                    image: "missing".into(),
                    force: false,
                })
                .await,
            Code::NotFound,
            &["\"missing\""],
        );

        // The daemon is still healthy after all of that.
        let status = g
            .daemon
            .get_status(v1::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.health, "ok");
        assert_eq!(status.volume_count, 2);
    });
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

#[test]
fn pagination_walks_every_volume_once() {
    let d = Daemon::start();
    let rt = runtime();
    rt.block_on(async {
        let mut g = d.grpc().await;
        for i in 0..23 {
            g.volumes
                .create_volume(create(&format!("p{i:02}"), Some(4096)))
                .await
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = g
                .volumes
                .list_volumes(v1::ListVolumesRequest {
                    page_size: 5,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.volumes.len() <= 5);
            seen.extend(page.volumes.into_iter().map(|v| v.name));
            pages += 1;
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(pages, 5);
        let expected: Vec<String> = (0..23).map(|i| format!("p{i:02}")).collect();
        assert_eq!(seen, expected);
    });
}
