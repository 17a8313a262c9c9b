//! CSI SnapshotMetadata (changed-block tracking) against the spec's semantics, with a real
//! blockd and csi-shim: the capability, VARIABLE_LENGTH tuples in ascending, non-overlapping
//! order, `volume_capacity_bytes`, `max_results` per message, resuming from a
//! `starting_offset` (the first tuple ends after it), and the error codes the spec names.

use blockd_proto::csi;
use blockd_proto::csi::identity_client::IdentityClient;
use blockd_proto::csi::plugin_capability::service;
use blockd_proto::csi::snapshot_metadata_client::SnapshotMetadataClient;
use blockd_proto::v1;
use blockd_proto::v1::image_data_service_client::ImageDataServiceClient;
use blockd_tests::csi_controller::{offers_service, plugin_capabilities};
use blockd_tests::{expect_status, snapshot_request};
use blockd_tests::{runtime, CsiShim, Daemon};
use tonic::transport::Channel;
use tonic::Code;

const NODE: &str = "node-a";
const K: i64 = 1024;
const CHUNK: i64 = 64 * K;
const SIZE: i64 = 4 << 20;

/// The (offset, size) tuples of one stream message, checking its invariants: variable
/// length tuples, the volume's capacity, and at most `max` tuples (when `max` is set).
fn message_tuples(
    kind: i32,
    capacity: i64,
    metadata: &[csi::BlockMetadata],
    max: i32,
) -> Vec<(i64, i64)> {
    assert_eq!(kind, csi::BlockMetadataType::VariableLength as i32);
    assert_eq!(capacity, SIZE);
    if max > 0 {
        assert!(metadata.len() <= max as usize);
    }
    metadata
        .iter()
        .map(|b| (b.byte_offset, b.size_bytes))
        .collect()
}

/// (offset, size) tuples of a whole stream, checking the per-message invariants.
async fn allocated(
    client: &mut SnapshotMetadataClient<Channel>,
    snapshot: &str,
    start: i64,
    max: i32,
) -> Vec<(i64, i64)> {
    let mut stream = client
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: snapshot.into(),
            starting_offset: start,
            max_results: max,
            secrets: Default::default(),
        })
        .await
        .expect("GetMetadataAllocated")
        .into_inner();
    let mut out = Vec::new();
    let mut messages = 0;
    while let Some(msg) = stream.message().await.expect("message") {
        messages += 1;
        let (kind, capacity) = (msg.block_metadata_type, msg.volume_capacity_bytes);
        out.extend(message_tuples(kind, capacity, &msg.block_metadata, max));
    }
    assert!(messages >= 1, "at least one message carries the capacity");
    check_order(&out, start);
    out
}

async fn delta(
    client: &mut SnapshotMetadataClient<Channel>,
    base: &str,
    target: &str,
    start: i64,
    max: i32,
) -> Vec<(i64, i64)> {
    let mut stream = client
        .get_metadata_delta(csi::GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset: start,
            max_results: max,
            secrets: Default::default(),
        })
        .await
        .expect("GetMetadataDelta")
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await.expect("message") {
        let (kind, capacity) = (msg.block_metadata_type, msg.volume_capacity_bytes);
        out.extend(message_tuples(kind, capacity, &msg.block_metadata, max));
    }
    check_order(&out, start);
    out
}

/// Ascending, non-overlapping, positive sizes, and nothing ending at or before `start`.
fn check_order(tuples: &[(i64, i64)], start: i64) {
    for w in tuples.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlap or disorder: {w:?}");
    }
    for t in tuples {
        assert!(t.1 > 0, "empty tuple {t:?}");
        assert!(
            t.0 + t.1 > start,
            "tuple {t:?} ends before starting_offset {start}"
        );
    }
}

/// The bytes covered by `tuples` at or after `from`.
fn from(tuples: &[(i64, i64)], from: i64) -> Vec<(i64, i64)> {
    tuples
        .iter()
        .filter(|t| t.0 + t.1 > from)
        .map(|&(o, s)| {
            let o2 = o.max(from / CHUNK * CHUNK);
            (o2, o + s - o2)
        })
        .collect()
}

async fn write(data: &mut ImageDataServiceClient<Channel>, at: &[(i64, i64, u8)]) {
    let msgs: Vec<v1::WriteImageRequest> = at
        .iter()
        .enumerate()
        .map(|(i, &(off, len, byte))| v1::WriteImageRequest {
            volume: if i == 0 { "v".into() } else { String::new() },
            offset: off as u64,
            data: if byte == 0 {
                vec![]
            } else {
                vec![byte; len as usize]
            },
            zero_length: if byte == 0 { len as u64 } else { 0 },
            force: false,
        })
        .collect();
    data.write_image(tokio_stream::iter(msgs))
        .await
        .expect("WriteImage");
}

#[test]
fn snapshot_metadata_follows_the_spec() {
    let daemon = Daemon::start();
    let shim = CsiShim::start(&daemon, NODE, &[]);
    daemon.ctl_ok(&["volume", "create", "v", "--size", "4M"]);
    daemon.ctl_ok(&["volume", "create", "w", "--size", "4M"]);
    let rt = runtime();
    rt.block_on(async {
        let grpc = daemon.grpc().await;
        let mut data = ImageDataServiceClient::new(grpc.channel.clone());
        let mut snaps = grpc.snapshots.clone();
        let snap = |name: &str| snapshot_request("v", name);
        // s1: chunks 0-1, 4, 10; s2: chunk 4 rewritten, chunk 10 zeroed, chunk 20 new.
        write(
            &mut data,
            &[
                (0, 2 * CHUNK, 1),
                (4 * CHUNK + 7, 100, 2),
                (10 * CHUNK, CHUNK, 3),
            ],
        )
        .await;
        snaps.create_snapshot(snap("s1")).await.expect("s1");
        write(
            &mut data,
            &[
                (4 * CHUNK, 10, 4),
                (10 * CHUNK, CHUNK, 0),
                (20 * CHUNK + 5, 5, 5),
            ],
        )
        .await;
        snaps.create_snapshot(snap("s2")).await.expect("s2");
        snaps
            .create_snapshot(snapshot_request("w", "w1"))
            .await
            .expect("w1");

        let channel = shim.channel().await;
        let caps = plugin_capabilities(&mut IdentityClient::new(channel.clone())).await;
        assert!(offers_service(
            &caps,
            service::Type::SnapshotMetadataService
        ));

        let mut client = SnapshotMetadataClient::new(channel);
        let (s1, s2) = ("node-a/v@s1", "node-a/v@s2");

        let all = allocated(&mut client, s1, 0, 0).await;
        assert_eq!(
            all,
            vec![(0, 2 * CHUNK), (4 * CHUNK, CHUNK), (10 * CHUNK, CHUNK)]
        );
        assert_eq!(allocated(&mut client, s1, 0, 1).await, all);
        // Resume from the end of the first tuple, and from inside the second.
        assert_eq!(
            allocated(&mut client, s1, 2 * CHUNK, 2).await,
            all[1..].to_vec()
        );
        let mid = 4 * CHUNK + 1000;
        assert_eq!(allocated(&mut client, s1, mid, 0).await, from(&all, mid));
        assert_eq!(allocated(&mut client, s1, SIZE, 0).await, vec![]);

        let changed = delta(&mut client, s1, s2, 0, 0).await;
        assert_eq!(
            changed,
            vec![(4 * CHUNK, CHUNK), (10 * CHUNK, CHUNK), (20 * CHUNK, CHUNK)]
        );
        assert_eq!(delta(&mut client, s1, s2, 0, 1).await, changed);
        for start in [
            1,
            4 * CHUNK,
            4 * CHUNK + 5,
            5 * CHUNK,
            10 * CHUNK + CHUNK - 1,
            21 * CHUNK,
        ] {
            assert_eq!(
                delta(&mut client, s1, s2, start, 2).await,
                from(&changed, start),
                "resume from {start}"
            );
        }
        assert_eq!(delta(&mut client, s2, s2, 0, 0).await, vec![]);

        // The errors the spec names.
        let alloc_req = |id: &str, start: i64, max: i32| csi::GetMetadataAllocatedRequest {
            snapshot_id: id.into(),
            starting_offset: start,
            max_results: max,
            secrets: Default::default(),
        };
        expect_status(
            "no snapshot_id",
            client.get_metadata_allocated(alloc_req("", 0, 0)).await,
            Code::InvalidArgument,
            "snapshot_id",
        );
        expect_status(
            "unknown snapshot",
            client
                .get_metadata_allocated(alloc_req("node-a/v@nope", 0, 0))
                .await,
            Code::NotFound,
            "nope",
        );
        expect_status(
            "malformed id",
            client
                .get_metadata_allocated(alloc_req("garbage", 0, 0))
                .await,
            Code::NotFound,
            "garbage",
        );
        expect_status(
            "another node's snapshot",
            client
                .get_metadata_allocated(alloc_req("node-b/v@s1", 0, 0))
                .await,
            Code::NotFound,
            "node-b",
        );
        expect_status(
            "wrong volume in the id",
            client
                .get_metadata_allocated(alloc_req("node-a/w@s1", 0, 0))
                .await,
            Code::NotFound,
            "s1",
        );
        expect_status(
            "negative offset",
            client.get_metadata_allocated(alloc_req(s1, -1, 0)).await,
            Code::OutOfRange,
            "starting_offset",
        );
        expect_status(
            "offset past the end",
            client
                .get_metadata_allocated(alloc_req(s1, SIZE + 1, 0))
                .await,
            Code::OutOfRange,
            "starting_offset",
        );
        expect_status(
            "negative max_results",
            client.get_metadata_allocated(alloc_req(s1, 0, -1)).await,
            Code::InvalidArgument,
            "max_results",
        );
        let delta_req = |b: &str, t: &str, start: i64| csi::GetMetadataDeltaRequest {
            base_snapshot_id: b.into(),
            target_snapshot_id: t.into(),
            starting_offset: start,
            max_results: 0,
            secrets: Default::default(),
        };
        expect_status(
            "no target",
            client.get_metadata_delta(delta_req(s1, "", 0)).await,
            Code::InvalidArgument,
            "target_snapshot_id",
        );
        expect_status(
            "unknown base",
            client
                .get_metadata_delta(delta_req("node-a/v@nope", s2, 0))
                .await,
            Code::NotFound,
            "nope",
        );
        expect_status(
            "different volumes",
            client
                .get_metadata_delta(delta_req(s1, "node-a/w@w1", 0))
                .await,
            Code::FailedPrecondition,
            "different volumes",
        );
        expect_status(
            "base after target",
            client.get_metadata_delta(delta_req(s2, s1, 0)).await,
            Code::FailedPrecondition,
            "s2",
        );
        expect_status(
            "delta offset past the end",
            client.get_metadata_delta(delta_req(s1, s2, SIZE + 1)).await,
            Code::OutOfRange,
            "starting_offset",
        );
    });
}
