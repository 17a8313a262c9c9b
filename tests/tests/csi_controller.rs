//! CSI Identity and Controller conformance: every RPC csi-shim serves, its spec error
//! cases, idempotency of every mutating call, pagination, capacity, snapshots, restores
//! and clones, other-node ids, concurrency and Probe across a blockd restart.
//!
//! Each test runs its own blockd and csi-shim (real processes over their unix sockets)
//! on private temporary directories, so tests run in parallel and leave nothing behind.
//! The blockd side of every answer is checked through blockd's own API.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use blockd_proto::csi;
use blockd_proto::csi::controller_client::ControllerClient;
use blockd_proto::csi::controller_service_capability::rpc;
use blockd_proto::csi::identity_client::IdentityClient;
use blockd_proto::csi::plugin_capability::{service, volume_expansion};
use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use blockd_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use blockd_proto::v1;
use blockd_tests::expect_status as expect_code;
use blockd_tests::{have_tool, runtime, skip, CsiShim, Daemon};
use tonic::transport::Channel;
use tonic::Code;

const NODE: &str = "node-a";
const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;

/// A blockd, a csi-shim for node `node-a` on it, and a runtime for the clients.
struct Env {
    daemon: Daemon,
    shim: CsiShim,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn start() -> Env {
        Env::start_with(&[], &[])
    }

    fn start_with(daemon_args: &[&str], shim_args: &[&str]) -> Env {
        let daemon = Daemon::start_with(daemon_args);
        let shim = CsiShim::start(&daemon, NODE, shim_args);
        Env {
            daemon,
            shim,
            rt: runtime(),
        }
    }

    async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.shim.channel().await)
    }

    async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.shim.channel().await)
    }

    async fn blockd_volume(&self, name: &str) -> Option<v1::Volume> {
        let mut grpc = self.daemon.grpc().await;
        match grpc
            .volumes
            .get_volume(v1::GetVolumeRequest { name: name.into() })
            .await
        {
            Ok(v) => Some(v.into_inner()),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => panic!("blockd GetVolume {name}: {s}"),
        }
    }

    async fn blockd_volume_names(&self) -> Vec<String> {
        let mut grpc = self.daemon.grpc().await;
        grpc.volumes
            .list_volumes(v1::ListVolumesRequest::default())
            .await
            .expect("blockd ListVolumes")
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| v.name)
            .collect()
    }

    async fn export(&self, image: &str) -> String {
        let mut grpc = self.daemon.grpc().await;
        grpc.exports
            .export(v1::ExportRequest {
                image: image.into(),
            })
            .await
            .expect("blockd Export")
            .into_inner()
            .uri
    }
}

fn cap(mode: Mode, access: AccessType) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(access),
    }
}

fn mount(fs: &str) -> AccessType {
    AccessType::Mount(MountVolume {
        fs_type: fs.into(),
        ..Default::default()
    })
}

fn block() -> AccessType {
    AccessType::Block(BlockVolume {})
}

fn rwo() -> csi::VolumeCapability {
    cap(Mode::SingleNodeWriter, mount("ext4"))
}

fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

fn create_req(name: &str, required: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: if required > 0 {
            range(required, 0)
        } else {
            None
        },
        volume_capabilities: vec![rwo()],
        ..Default::default()
    }
}

fn topology(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([("topology.blockd.io/node".to_string(), node.to_string())]),
    }
}

fn from_snapshot(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        })),
    })
}

fn from_volume(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: id.into(),
        })),
    })
}

async fn create(c: &mut ControllerClient<Channel>, req: csi::CreateVolumeRequest) -> csi::Volume {
    let name = req.name.clone();
    c.create_volume(req)
        .await
        .unwrap_or_else(|s| panic!("CreateVolume {name}: {s}"))
        .into_inner()
        .volume
        .expect("CreateVolume answers a volume")
}

async fn snapshot(c: &mut ControllerClient<Channel>, volume_id: &str, name: &str) -> csi::Snapshot {
    c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: volume_id.into(),
        name: name.into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("CreateSnapshot {name}: {s}"))
    .into_inner()
    .snapshot
    .expect("CreateSnapshot answers a snapshot")
}

async fn capacity(
    c: &mut ControllerClient<Channel>,
    parameters: HashMap<String, String>,
) -> csi::GetCapacityResponse {
    c.get_capacity(csi::GetCapacityRequest {
        parameters,
        ..Default::default()
    })
    .await
    .expect("GetCapacity")
    .into_inner()
}

#[test]
fn identity_info_capabilities_and_controller_capabilities() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut id = env.identity().await;
        let info = id
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .expect("GetPluginInfo")
            .into_inner();
        assert_eq!(info.name, "blockd.csi.io");
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

        let caps = id
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities;
        let mut services = HashSet::new();
        let mut expansion = None;
        for c in caps {
            match c.r#type.expect("a capability type") {
                csi::plugin_capability::Type::Service(s) => {
                    services.insert(s.r#type);
                }
                csi::plugin_capability::Type::VolumeExpansion(e) => expansion = Some(e.r#type),
            }
        }
        assert!(services.contains(&(service::Type::ControllerService as i32)));
        assert!(services.contains(&(service::Type::VolumeAccessibilityConstraints as i32)));
        assert_eq!(expansion, Some(volume_expansion::Type::Online as i32));

        let caps: HashSet<i32> = env
            .controller()
            .await
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .expect("ControllerGetCapabilities")
            .into_inner()
            .capabilities
            .into_iter()
            .map(|c| match c.r#type.expect("a capability type") {
                csi::controller_service_capability::Type::Rpc(r) => r.r#type,
            })
            .collect();
        for want in [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::CloneVolume,
            rpc::Type::ListVolumes,
            rpc::Type::ListSnapshots,
            rpc::Type::GetCapacity,
            rpc::Type::ExpandVolume,
            rpc::Type::GetVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::ListVolumesPublishedNodes,
            rpc::Type::GetSnapshot,
            rpc::Type::ModifyVolume,
        ] {
            assert!(caps.contains(&(want as i32)), "missing {want:?}");
        }
        // Not advertised, so not served: the spec's UNIMPLEMENTED.
        assert!(!caps.contains(&(rpc::Type::PublishUnpublishVolume as i32)));
        let publish = env
            .controller()
            .await
            .controller_publish_volume(csi::ControllerPublishVolumeRequest::default())
            .await;
        assert_eq!(publish.unwrap_err().code(), Code::Unimplemented);
    });
}

async fn probe_ready(id: &mut IdentityClient<Channel>) -> bool {
    id.probe(csi::ProbeRequest {})
        .await
        .expect("Probe answers OK whether or not blockd is up")
        .into_inner()
        .ready
        .expect("Probe sets ready")
}

/// Polls Probe until it says `want` (the shim's channel to blockd reconnects lazily).
async fn wait_probe(id: &mut IdentityClient<Channel>, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if probe_ready(id).await == want {
            return;
        }
        assert!(Instant::now() < deadline, "Probe never said ready={want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn probe_follows_blockd_down_and_up() {
    let mut env = Env::start();
    let rt = runtime();
    let mut id = rt.block_on(env.identity());
    rt.block_on(wait_probe(&mut id, true));
    assert!(env.daemon.stop().success(), "blockd stops cleanly");
    // Not ready while blockd is away, and the answer comes quickly (no hang).
    let started = Instant::now();
    assert!(!rt.block_on(probe_ready(&mut id)));
    assert!(started.elapsed() < Duration::from_secs(10));
    // Controller calls that need blockd fail with a retryable code meanwhile.
    let err = rt
        .block_on(async {
            env.controller()
                .await
                .create_volume(create_req("while-down", 4 * MIB))
                .await
        })
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("blockd"), "{err:?}");
    env.daemon.restart();
    rt.block_on(wait_probe(&mut id, true));
    rt.block_on(async {
        create(
            &mut env.controller().await,
            create_req("after-restart", 4 * MIB),
        )
        .await;
    });
}

#[test]
fn create_volume_defaults_topology_context_and_idempotency() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        // No capacity range: the 1 GiB default.
        let v = create(&mut c, create_req("pvc-default", 0)).await;
        assert_eq!(v.capacity_bytes, GIB);
        assert_eq!(v.volume_id, format!("{NODE}/pvc-default"));
        assert_eq!(v.accessible_topology, vec![topology(NODE)]);
        assert_eq!(v.volume_context["pool"], "default");
        assert_eq!(v.volume_context["fsType"], "ext4");
        assert!(v.content_source.is_none());

        // Round up to 4 KiB; the same request again returns the same volume.
        let mut req = create_req("pvc-odd", 5000);
        req.parameters = params(&[
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "default"),
            ("csi.storage.k8s.io/pv/name", "pvc-odd"),
        ]);
        let first = create(&mut c, req.clone()).await;
        assert_eq!(first.capacity_bytes, 8192);
        let second = create(&mut c, req.clone()).await;
        assert_eq!(first, second);
        // A compatible range (the existing size fits it) is the same volume too.
        let mut wider = req.clone();
        wider.capacity_range = range(4096, 1 << 20);
        assert_eq!(create(&mut c, wider).await.volume_id, first.volume_id);
        assert_eq!(env.blockd_volume("pvc-odd").await.unwrap().size_bytes, 8192);

        // Rounding never passes the limit: the largest 4 KiB multiple below it.
        let mut capped = create_req("pvc-capped", 0);
        capped.capacity_range = range(4000, 5000);
        assert_eq!(create(&mut c, capped).await.capacity_bytes, 4096);

        // Same name, incompatible: ALREADY_EXISTS.
        let mut bigger = req.clone();
        bigger.capacity_range = range(64 * MIB, 0);
        expect_code(
            "same name, other size",
            c.create_volume(bigger).await,
            Code::AlreadyExists,
            "pvc-odd",
        );
        let mut limited = req.clone();
        limited.parameters = params(&[("maxIops", "100")]);
        expect_code(
            "same name, other QoS",
            c.create_volume(limited).await,
            Code::AlreadyExists,
            "QoS",
        );

        // Names that are not blockd names map to a stable derived name.
        let odd = create(&mut c, create_req("My Volume #1", 4 * MIB)).await;
        let again = create(&mut c, create_req("My Volume #1", 4 * MIB)).await;
        assert_eq!(odd.volume_id, again.volume_id);
        assert!(odd.volume_id.starts_with(&format!("{NODE}/csi-")));

        // Topology: a requisite that admits this node is fine; one that does not is
        // RESOURCE_EXHAUSTED so that the provisioner tries elsewhere.
        let mut here = create_req("pvc-topo", 4 * MIB);
        here.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![topology("node-z"), topology(NODE)],
            preferred: vec![topology(NODE)],
        });
        create(&mut c, here).await;
        let mut elsewhere = create_req("pvc-elsewhere", 4 * MIB);
        elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![topology("node-b")],
            preferred: vec![],
        });
        expect_code(
            "requisite topology of another node",
            c.create_volume(elsewhere).await,
            Code::ResourceExhausted,
            NODE,
        );
        assert!(env.blockd_volume("pvc-elsewhere").await.is_none());

        // A pool this node does not have: provision elsewhere.
        let mut no_pool = create_req("pvc-nopool", 4 * MIB);
        no_pool.parameters = params(&[("pool", "ssd")]);
        expect_code(
            "unknown pool",
            c.create_volume(no_pool).await,
            Code::ResourceExhausted,
            "ssd",
        );

        // Block and every single-node mode are served.
        for (i, mode) in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ]
        .into_iter()
        .enumerate()
        {
            let mut req = create_req(&format!("pvc-mode-{i}"), 4 * MIB);
            req.volume_capabilities = vec![cap(mode, block()), cap(mode, mount("xfs"))];
            let v = create(&mut c, req).await;
            assert_eq!(v.volume_context["fsType"], "xfs");
        }
    });
}

#[test]
fn create_volume_refuses_bad_requests_with_spec_codes() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let base = create_req("pvc-bad", 4 * MIB);
        let cases: Vec<(&str, csi::CreateVolumeRequest, Code, &str)> = vec![
            (
                "no name",
                csi::CreateVolumeRequest {
                    name: String::new(),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "name",
            ),
            (
                "no capabilities",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "volume_capabilities",
            ),
            (
                "multi-node reader",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly, mount(""))],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "MULTI_NODE_READER_ONLY",
            ),
            (
                "multi-node writer",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter, block())],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "MULTI_NODE_MULTI_WRITER",
            ),
            (
                "no access mode",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![csi::VolumeCapability {
                        access_mode: None,
                        access_type: Some(block()),
                    }],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "access_mode",
            ),
            (
                "no access type",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![csi::VolumeCapability {
                        access_mode: Some(AccessMode {
                            mode: Mode::SingleNodeWriter as i32,
                        }),
                        access_type: None,
                    }],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "access_type",
            ),
            (
                "btrfs",
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![cap(Mode::SingleNodeWriter, mount("btrfs"))],
                    ..base.clone()
                },
                Code::InvalidArgument,
                "btrfs",
            ),
            (
                "unknown parameter",
                csi::CreateVolumeRequest {
                    parameters: params(&[("type", "io1")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "type",
            ),
            (
                "bad fstype parameter",
                csi::CreateVolumeRequest {
                    parameters: params(&[("csi.storage.k8s.io/fstype", "zfs")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "zfs",
            ),
            (
                "fstype parameter against capability",
                csi::CreateVolumeRequest {
                    parameters: params(&[("csi.storage.k8s.io/fstype", "xfs")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "fs_type",
            ),
            (
                "bad maxIops",
                csi::CreateVolumeRequest {
                    parameters: params(&[("maxIops", "lots")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "maxIops",
            ),
            (
                "bad iopsPerGB",
                csi::CreateVolumeRequest {
                    parameters: params(&[("iopsPerGB", "0")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "iopsPerGB",
            ),
            (
                "bad maxBandwidth",
                csi::CreateVolumeRequest {
                    parameters: params(&[("maxBandwidth", "10GB")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "maxBandwidth",
            ),
            (
                "limit below required",
                csi::CreateVolumeRequest {
                    capacity_range: range(8 * MIB, 4 * MIB),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "limit_bytes",
            ),
            (
                "negative required",
                csi::CreateVolumeRequest {
                    capacity_range: range(-1, 0),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "negative",
            ),
            (
                "no 4 KiB multiple in range",
                csi::CreateVolumeRequest {
                    capacity_range: range(4097, 8000),
                    ..base.clone()
                },
                Code::OutOfRange,
                "4096",
            ),
            (
                "larger than blockd allows",
                csi::CreateVolumeRequest {
                    capacity_range: range(i64::MAX, 0),
                    ..base.clone()
                },
                Code::OutOfRange,
                "largest",
            ),
            (
                "past the over-provisioning ratio",
                csi::CreateVolumeRequest {
                    // The test pool is 2 GiB and the default ratio 4.
                    capacity_range: range(9 * GIB, 0),
                    ..base.clone()
                },
                Code::ResourceExhausted,
                "over-provisioning",
            ),
            (
                "mutable parameter the driver cannot change",
                csi::CreateVolumeRequest {
                    mutable_parameters: params(&[("pool", "default")]),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "mutable_parameters",
            ),
            (
                "content source without a type",
                csi::CreateVolumeRequest {
                    volume_content_source: Some(csi::VolumeContentSource { r#type: None }),
                    ..base.clone()
                },
                Code::InvalidArgument,
                "volume_content_source",
            ),
        ];
        for (what, req, code, needle) in cases {
            expect_code(what, c.create_volume(req).await, code, needle);
        }
        assert!(
            env.blockd_volume_names().await.is_empty(),
            "no refused request may leave a volume behind"
        );
    });
}

#[test]
fn seed_offerings_give_their_qos() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        // deploy/kubernetes/storageclasses.yaml, after the seed chapter's table 4.1.
        let default_block = params(&[
            ("pool", "default"),
            ("csi.storage.k8s.io/fstype", "ext4"),
            ("maxBandwidth", "90Mi"),
        ]);
        let performance_block = params(&[
            ("pool", "default"),
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("iopsPerGB", "20"),
            ("maxIops", "64000"),
            ("maxBandwidth", "1000Mi"),
        ]);
        let mut req = create_req("pvc0", GIB);
        req.parameters = default_block;
        let v = create(&mut c, req).await;
        assert_eq!(v.volume_context["fsType"], "ext4");
        let qos = env.blockd_volume("pvc0").await.unwrap().qos.unwrap();
        assert_eq!((qos.max_iops, qos.max_bandwidth_bytes), (0, 90 << 20));

        let mut req = create_req("pvc1", 3 * GIB / 2);
        req.volume_capabilities = vec![cap(Mode::SingleNodeWriter, mount("xfs"))];
        req.parameters = performance_block.clone();
        let v = create(&mut c, req.clone()).await;
        assert_eq!(v.volume_context["fsType"], "xfs");
        let qos = env.blockd_volume("pvc1").await.unwrap().qos.unwrap();
        assert_eq!(qos.max_iops, 30, "20 IOPS per GiB of a 1.5 GiB volume");
        assert_eq!(qos.max_bandwidth_bytes, 1000 << 20);
        // Idempotent with the same class.
        assert_eq!(create(&mut c, req).await, v);

        // maxIops caps iopsPerGB.
        let mut req = create_req("pvc2", 2 * GIB);
        req.parameters = params(&[("iopsPerGB", "20"), ("maxIops", "25")]);
        create(&mut c, req).await;
        let qos = env.blockd_volume("pvc2").await.unwrap().qos.unwrap();
        assert_eq!((qos.max_iops, qos.max_bandwidth_bytes), (25, 0));

        // Bandwidth as plain bytes.
        let mut req = create_req("pvc3", 4 * MIB);
        req.parameters = params(&[("maxBandwidth", "1048576"), ("maxIops", "500")]);
        create(&mut c, req).await;
        let qos = env.blockd_volume("pvc3").await.unwrap().qos.unwrap();
        assert_eq!((qos.max_iops, qos.max_bandwidth_bytes), (500, 1 << 20));

        // No QoS parameters: unlimited.
        create(&mut c, create_req("pvc4", 4 * MIB)).await;
        let qos = env.blockd_volume("pvc4").await.unwrap().qos.unwrap();
        assert_eq!((qos.max_iops, qos.max_bandwidth_bytes), (0, 0));
    });
}

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
        let got = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: big.volume_id.clone(),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner()
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
fn delete_volume_is_idempotent_and_refuses_what_it_must() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let v = create(&mut c, create_req("doomed", 4 * MIB)).await;
        for id in [
            v.volume_id.clone(),
            v.volume_id.clone(),
            format!("{NODE}/never-existed"),
            "malformed".into(),
            format!("{NODE}/UPPER"),
        ] {
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("DeleteVolume {id}: {s}"));
        }
        assert!(env.blockd_volume("doomed").await.is_none());
        expect_code(
            "no id",
            c.delete_volume(csi::DeleteVolumeRequest::default()).await,
            Code::InvalidArgument,
            "volume_id",
        );
        expect_code(
            "another node's volume",
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: "node-b/doomed".into(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
            "node-b",
        );
        // In use (staged on this node, i.e. exported): FAILED_PRECONDITION, untouched.
        let busy = create(&mut c, create_req("busy", 4 * MIB)).await;
        env.export("busy").await;
        expect_code(
            "exported volume",
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: busy.volume_id.clone(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
            "in use",
        );
        assert!(env.blockd_volume("busy").await.is_some());
    });
}

#[test]
fn validate_volume_capabilities() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let v = create(&mut c, create_req("vvc", 4 * MIB)).await;
        let validate =
            |caps: Vec<csi::VolumeCapability>, parameters| csi::ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id.clone(),
                volume_capabilities: caps,
                parameters,
                volume_context: v.volume_context.clone(),
                ..Default::default()
            };
        let ok = c
            .validate_volume_capabilities(validate(
                vec![rwo(), cap(Mode::SingleNodeMultiWriter, block())],
                params(&[("maxIops", "10")]),
            ))
            .await
            .expect("Validate")
            .into_inner();
        let confirmed = ok.confirmed.expect("supported capabilities are confirmed");
        assert_eq!(confirmed.volume_capabilities.len(), 2);
        assert_eq!(confirmed.volume_context, v.volume_context);

        for (what, caps, parameters) in [
            (
                "multi-node",
                vec![cap(Mode::MultiNodeMultiWriter, mount(""))],
                HashMap::new(),
            ),
            (
                "btrfs",
                vec![cap(Mode::SingleNodeWriter, mount("btrfs"))],
                HashMap::new(),
            ),
            ("unknown parameter", vec![rwo()], params(&[("zone", "a")])),
        ] {
            let answer = c
                .validate_volume_capabilities(validate(caps, parameters))
                .await
                .unwrap_or_else(|s| panic!("{what}: {s}"))
                .into_inner();
            assert!(answer.confirmed.is_none(), "{what} must not be confirmed");
            assert!(!answer.message.is_empty(), "{what}: say why");
        }

        expect_code(
            "no capabilities",
            c.validate_volume_capabilities(validate(vec![], HashMap::new()))
                .await,
            Code::InvalidArgument,
            "volume_capabilities",
        );
        for id in [format!("{NODE}/missing"), "garbage".to_string()] {
            expect_code(
                "unknown volume",
                c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: id,
                    volume_capabilities: vec![rwo()],
                    ..Default::default()
                })
                .await,
                Code::NotFound,
                "does not exist",
            );
        }
        expect_code(
            "no volume id",
            c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

#[test]
fn list_volumes_paginates_and_reports_status() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let mut want = HashSet::new();
        for i in 0..7 {
            want.insert(
                create(&mut c, create_req(&format!("vol-{i}"), 4 * MIB))
                    .await
                    .volume_id,
            );
        }
        env.export("vol-3").await;

        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = c
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 3,
                    starting_token: token.clone(),
                })
                .await
                .expect("ListVolumes")
                .into_inner();
            assert!(page.entries.len() <= 3);
            pages += 1;
            for entry in page.entries {
                let volume = entry.volume.expect("volume");
                let status = entry.status.expect("status");
                let published = volume.volume_id == format!("{NODE}/vol-3");
                assert_eq!(
                    status.published_node_ids,
                    if published {
                        vec![NODE.to_string()]
                    } else {
                        vec![]
                    },
                    "{}",
                    volume.volume_id
                );
                assert!(!status.volume_condition.expect("condition").abnormal);
                assert_eq!(volume.capacity_bytes, 4 * MIB);
                assert_eq!(volume.accessible_topology, vec![topology(NODE)]);
                seen.push(volume.volume_id);
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        assert_eq!(pages, 3);
        assert_eq!(seen.len(), 7, "no duplicates across pages: {seen:?}");
        assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), want);

        // A page past a volume deleted in between still continues correctly.
        let first = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: format!("{NODE}/vol-1"),
            ..Default::default()
        })
        .await
        .unwrap();
        let rest = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 0,
                starting_token: first.next_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rest.entries.len(), 5);
        assert!(rest.next_token.is_empty());

        expect_code(
            "invalid starting_token",
            c.list_volumes(csi::ListVolumesRequest {
                max_entries: 1,
                starting_token: "not-a-token".into(),
            })
            .await,
            Code::Aborted,
            "starting_token",
        );
        expect_code(
            "negative max_entries",
            c.list_volumes(csi::ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
            Code::InvalidArgument,
            "max_entries",
        );

        // ControllerGetVolume: published and healthy, or NOT_FOUND.
        let got = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: format!("{NODE}/vol-3"),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner();
        let status = got.status.expect("status");
        assert_eq!(status.published_node_ids, vec![NODE.to_string()]);
        let condition = status.volume_condition.expect("condition");
        assert!(!condition.abnormal, "{}", condition.message);
        assert_eq!(
            got.volume.expect("volume").volume_context["pool"],
            "default"
        );
        for (id, code) in [
            (format!("{NODE}/vol-1"), Code::NotFound),
            ("junk".to_string(), Code::NotFound),
            (String::new(), Code::InvalidArgument),
            ("node-b/vol-3".to_string(), Code::FailedPrecondition),
        ] {
            expect_code(
                &format!("ControllerGetVolume {id:?}"),
                c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id })
                    .await,
                code,
                "",
            );
        }
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

#[test]
fn expand_volume() {
    let env = Env::start();
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let v = create(&mut c, create_req("grow", 8 * MIB)).await;
        let expand = |required, limit, capability: Option<csi::VolumeCapability>| {
            csi::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: range(required, limit),
                volume_capability: capability,
                ..Default::default()
            }
        };
        let grown = c
            .controller_expand_volume(expand(16 * MIB, 0, Some(rwo())))
            .await
            .expect("expand")
            .into_inner();
        assert_eq!(grown.capacity_bytes, 16 * MIB);
        assert!(grown.node_expansion_required, "mount volumes need the node");
        assert_eq!(
            env.blockd_volume("grow").await.unwrap().size_bytes,
            16 << 20
        );
        // Again, and smaller than now: nothing to do, same answer.
        for required in [16 * MIB, 8 * MIB] {
            let again = c
                .controller_expand_volume(expand(required, 0, Some(rwo())))
                .await
                .expect("idempotent expand")
                .into_inner();
            assert_eq!(again.capacity_bytes, 16 * MIB);
        }
        // Block volumes need no node step.
        let block_cap = cap(Mode::SingleNodeWriter, block());
        let grown = c
            .controller_expand_volume(expand(20 * MIB + 1, 24 * MIB, Some(block_cap)))
            .await
            .expect("expand block")
            .into_inner();
        assert_eq!(grown.capacity_bytes, 20 * MIB + 4096);
        assert!(!grown.node_expansion_required);

        for (what, req, code, needle) in [
            (
                "limit below the current size",
                expand(0, 8 * MIB, None),
                Code::OutOfRange,
                "shrink",
            ),
            (
                "limit below required",
                expand(32 * MIB, 24 * MIB, None),
                Code::InvalidArgument,
                "limit_bytes",
            ),
            (
                "no capacity range",
                csi::ControllerExpandVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "capacity_range",
            ),
            (
                "unsupported capability",
                expand(32 * MIB, 0, Some(cap(Mode::MultiNodeMultiWriter, block()))),
                Code::InvalidArgument,
                "MULTI_NODE",
            ),
            (
                "past the over-provisioning ratio",
                expand(9 * GIB, 0, None),
                Code::ResourceExhausted,
                "over-provisioning",
            ),
            (
                "unknown volume",
                csi::ControllerExpandVolumeRequest {
                    volume_id: format!("{NODE}/nope"),
                    capacity_range: range(32 * MIB, 0),
                    ..Default::default()
                },
                Code::NotFound,
                "nope",
            ),
            (
                "another node's volume",
                csi::ControllerExpandVolumeRequest {
                    volume_id: "node-b/grow".into(),
                    capacity_range: range(32 * MIB, 0),
                    ..Default::default()
                },
                Code::FailedPrecondition,
                "node-b",
            ),
            (
                "no volume id",
                csi::ControllerExpandVolumeRequest {
                    capacity_range: range(32 * MIB, 0),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "volume_id",
            ),
        ] {
            expect_code(what, c.controller_expand_volume(req).await, code, needle);
        }
        assert_eq!(
            env.blockd_volume("grow").await.unwrap().size_bytes,
            (20 << 20) + 4096,
            "refused expansions change nothing"
        );
    });
}

#[test]
fn get_capacity_follows_creates_and_refuses_past_the_ratio() {
    // Ratio 1: no over-provisioning, so every create takes room.
    let env = Env::start_with(&[], &["--overprovisioning-ratio", "1"]);
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let mut grpc = env.daemon.grpc().await;
        let pool = grpc
            .pools
            .get_pool(v1::GetPoolRequest {
                name: "default".into(),
            })
            .await
            .expect("GetPool")
            .into_inner();
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
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            uri,
            "-c",
            &format!("write -P 0x5a {offset} {len}"),
        ])
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io write: {text}"
    );
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
        let mut grpc = env.daemon.grpc().await;
        let pool = grpc
            .pools
            .get_pool(v1::GetPoolRequest {
                name: "default".into(),
            })
            .await
            .expect("GetPool")
            .into_inner();
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

#[test]
fn concurrent_identical_calls_are_aborted_not_duplicated() {
    let env = Env::start();
    env.rt.block_on(async {
        let c = env.controller().await;
        let mut aborted = 0;
        // Races are timing-dependent: a few rounds make an overlap (and so ABORTED)
        // certain in practice; every round must end with exactly one volume.
        for round in 0..5 {
            let name = format!("race-{round}");
            let mut calls = Vec::new();
            for _ in 0..24 {
                let mut c = c.clone();
                let req = create_req(&name, 4 * MIB);
                calls.push(tokio::spawn(async move { c.create_volume(req).await }));
            }
            let mut ok = 0;
            for call in calls {
                match call.await.expect("task") {
                    Ok(answer) => {
                        ok += 1;
                        let v = answer.into_inner().volume.expect("volume");
                        assert_eq!(v.volume_id, format!("{NODE}/{name}"));
                        assert_eq!(v.capacity_bytes, 4 * MIB);
                    }
                    Err(status) => {
                        assert_eq!(status.code(), Code::Aborted, "{status:?}");
                        assert!(status.message().contains("in progress"));
                        aborted += 1;
                    }
                }
            }
            assert!(ok >= 1, "round {round}: at least one call must succeed");
            let names = env.blockd_volume_names().await;
            assert_eq!(
                names.iter().filter(|n| **n == name).count(),
                1,
                "round {round}: {names:?}"
            );
            // The retry after the race succeeds with the same volume.
            let mut c = c.clone();
            create(&mut c, create_req(&name, 4 * MIB)).await;

            // Racing deletes: only OK or ABORTED, and the volume is gone after.
            let mut calls = Vec::new();
            for _ in 0..12 {
                let mut c = c.clone();
                let req = csi::DeleteVolumeRequest {
                    volume_id: format!("{NODE}/{name}"),
                    ..Default::default()
                };
                calls.push(tokio::spawn(async move { c.delete_volume(req).await }));
            }
            for call in calls {
                if let Err(status) = call.await.expect("task") {
                    assert_eq!(status.code(), Code::Aborted, "{status:?}");
                    aborted += 1;
                }
            }
            let mut c = c.clone();
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: format!("{NODE}/{name}"),
                ..Default::default()
            })
            .await
            .expect("DeleteVolume after the race");
            assert!(env.blockd_volume(&name).await.is_none());
        }
        assert!(
            aborted > 0,
            "no call was ever aborted: the op locks do not serialise"
        );
    });
}

#[test]
fn controller_only_mode_serves_the_controller() {
    let env = Env::start_with(&[], &["--mode", "controller"]);
    env.rt.block_on(async {
        let caps = env
            .identity()
            .await
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities;
        assert!(caps.iter().any(|c| matches!(
            c.r#type,
            Some(csi::plugin_capability::Type::Service(s))
                if s.r#type == service::Type::ControllerService as i32
        )));
        create(&mut env.controller().await, create_req("ctl-only", 4 * MIB)).await;
    });
    // Node mode does not claim a controller service.
    let daemon = Daemon::start();
    let shim = CsiShim::start(&daemon, NODE, &["--mode", "node"]);
    let rt = runtime();
    rt.block_on(async {
        let caps = IdentityClient::new(shim.channel().await)
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities;
        assert!(!caps.iter().any(|c| matches!(
            c.r#type,
            Some(csi::plugin_capability::Type::Service(s))
                if s.r#type == service::Type::ControllerService as i32
        )));
    });
}

/// A stand-in for blockd whose only pool has failed, for what a real daemon cannot be
/// made to do on demand: report a failed pool. It serves the three services the
/// controller's read paths use; everything else is UNIMPLEMENTED.
mod failed_blockd {
    use std::path::Path;

    use blockd_proto::v1;
    use blockd_proto::v1::daemon_service_server::{DaemonService, DaemonServiceServer};
    use blockd_proto::v1::pool_service_server::{PoolService, PoolServiceServer};
    use blockd_proto::v1::volume_service_server::{VolumeService, VolumeServiceServer};
    use tonic::{Request, Response, Status};

    pub const HEALTH: &str = "failed: write to /dev/sdz: Input/output error (os error 5)";

    #[derive(Clone)]
    pub struct Failed;

    fn pool() -> v1::Pool {
        v1::Pool {
            name: "default".into(),
            capacity_bytes: 1 << 30,
            free_bytes: 1 << 29,
            provisioned_bytes: 64 << 20,
            health: HEALTH.into(),
            is_default: true,
            ..Default::default()
        }
    }

    fn volume() -> v1::Volume {
        v1::Volume {
            name: "vol".into(),
            pool: "default".into(),
            size_bytes: 64 << 20,
            qos: Some(v1::Qos::default()),
            exported: true,
            ..Default::default()
        }
    }

    fn unused<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not part of this stand-in"))
    }

    #[tonic::async_trait]
    impl DaemonService for Failed {
        async fn get_status(
            &self,
            _: Request<v1::GetStatusRequest>,
        ) -> Result<Response<v1::DaemonStatus>, Status> {
            Ok(Response::new(v1::DaemonStatus {
                health: HEALTH.into(),
                ..Default::default()
            }))
        }
        async fn fsck(
            &self,
            _: Request<v1::FsckRequest>,
        ) -> Result<Response<v1::FsckReport>, Status> {
            unused()
        }
        async fn gc(&self, _: Request<v1::GcRequest>) -> Result<Response<v1::GcReport>, Status> {
            unused()
        }
    }

    #[tonic::async_trait]
    impl PoolService for Failed {
        async fn list_pools(
            &self,
            _: Request<v1::ListPoolsRequest>,
        ) -> Result<Response<v1::ListPoolsResponse>, Status> {
            Ok(Response::new(v1::ListPoolsResponse {
                pools: vec![pool()],
                next_page_token: String::new(),
            }))
        }
        async fn get_pool(
            &self,
            _: Request<v1::GetPoolRequest>,
        ) -> Result<Response<v1::Pool>, Status> {
            Ok(Response::new(pool()))
        }
    }

    #[tonic::async_trait]
    impl VolumeService for Failed {
        async fn create_volume(
            &self,
            _: Request<v1::CreateVolumeRequest>,
        ) -> Result<Response<v1::CreateVolumeResponse>, Status> {
            unused()
        }
        async fn get_volume(
            &self,
            request: Request<v1::GetVolumeRequest>,
        ) -> Result<Response<v1::Volume>, Status> {
            if request.get_ref().name == "vol" {
                Ok(Response::new(volume()))
            } else {
                Err(Status::not_found("volume not found"))
            }
        }
        async fn list_volumes(
            &self,
            _: Request<v1::ListVolumesRequest>,
        ) -> Result<Response<v1::ListVolumesResponse>, Status> {
            Ok(Response::new(v1::ListVolumesResponse {
                volumes: vec![volume()],
                next_page_token: String::new(),
            }))
        }
        async fn delete_volume(
            &self,
            _: Request<v1::DeleteVolumeRequest>,
        ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
            unused()
        }
        async fn resize_volume(
            &self,
            _: Request<v1::ResizeVolumeRequest>,
        ) -> Result<Response<v1::Volume>, Status> {
            unused()
        }
        async fn set_volume_qos(
            &self,
            _: Request<v1::SetVolumeQosRequest>,
        ) -> Result<Response<v1::Volume>, Status> {
            unused()
        }
        async fn set_volume_qos_policy(
            &self,
            _: Request<v1::SetVolumeQosPolicyRequest>,
        ) -> Result<Response<v1::Volume>, Status> {
            unused()
        }
        type FlattenVolumeStream = tokio_stream::Empty<Result<v1::FlattenProgress, Status>>;
        async fn flatten_volume(
            &self,
            _: Request<v1::FlattenVolumeRequest>,
        ) -> Result<Response<Self::FlattenVolumeStream>, Status> {
            unused()
        }
    }

    /// Serves the stand-in on `socket` until the runtime stops.
    pub fn serve(rt: &tokio::runtime::Runtime, socket: &Path) {
        let _ = std::fs::remove_file(socket);
        let listener = {
            let _entered = rt.enter();
            tokio::net::UnixListener::bind(socket).expect("bind the stand-in's socket")
        };
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(DaemonServiceServer::new(Failed))
                .add_service(PoolServiceServer::new(Failed))
                .add_service(VolumeServiceServer::new(Failed))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
    }
}

#[test]
fn a_failed_pool_makes_probe_unhealthy_and_volumes_abnormal() {
    // A real blockd hands its socket path over to the stand-in.
    let mut env = Env::start();
    assert!(env.daemon.stop().success());
    failed_blockd::serve(&env.rt, &env.daemon.api_socket());
    env.rt.block_on(async {
        let mut id = env.identity().await;
        // The shim's channel may still hold the old connection for a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match id.probe(csi::ProbeRequest {}).await {
                Err(status) => break status,
                Ok(_) => {
                    assert!(Instant::now() < deadline, "Probe never saw the failed pool");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(failed_blockd::HEALTH),
            "{status:?}"
        );

        let mut c = env.controller().await;
        let got = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: format!("{NODE}/vol"),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner();
        let status = got.status.expect("status");
        assert_eq!(status.published_node_ids, vec![NODE.to_string()]);
        let condition = status.volume_condition.expect("condition");
        assert!(condition.abnormal);
        assert!(
            condition.message.contains(failed_blockd::HEALTH),
            "{condition:?}"
        );

        let listed = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner()
            .entries;
        assert_eq!(listed.len(), 1);
        let condition = listed[0].status.clone().unwrap().volume_condition.unwrap();
        assert!(condition.abnormal);

        let room = capacity(&mut c, HashMap::new()).await;
        assert_eq!(
            (room.available_capacity, room.maximum_volume_size),
            (0, Some(0))
        );
        expect_code(
            "create on a failed pool",
            c.create_volume(create_req("new", 4 * MIB)).await,
            Code::ResourceExhausted,
            "Input/output error",
        );
    });
}

#[test]
fn volumes_live_in_the_named_pool_and_clones_stay_with_their_source() {
    let dir = tempfile::tempdir().expect("pool dir");
    let default_pool = format!("default={},size=1G", dir.path().join("a.img").display());
    let fast_pool = format!("fast={},size=512M", dir.path().join("b.img").display());
    let env = Env::start_with(&["--pool", &default_pool, "--pool", &fast_pool], &[]);
    env.rt.block_on(async {
        let mut c = env.controller().await;
        let mut req = create_req("on-fast", 8 * MIB);
        req.parameters = params(&[("pool", "fast")]);
        let v = create(&mut c, req.clone()).await;
        assert_eq!(v.volume_context["pool"], "fast");
        assert_eq!(env.blockd_volume("on-fast").await.unwrap().pool, "fast");
        // The same name in another pool is another volume.
        let mut elsewhere = req.clone();
        elsewhere.parameters = params(&[("pool", "default")]);
        expect_code(
            "same name, other pool",
            c.create_volume(elsewhere).await,
            Code::AlreadyExists,
            "pool",
        );

        let snap = snapshot(&mut c, &v.volume_id, "fast-snap").await;
        // No pool parameter: the restore lands in the source's pool.
        let mut restore = create_req("restored", 16 * MIB);
        restore.volume_content_source = from_snapshot(&snap.snapshot_id);
        let r = create(&mut c, restore.clone()).await;
        assert_eq!(r.volume_context["pool"], "fast");
        assert_eq!(env.blockd_volume("restored").await.unwrap().pool, "fast");
        // Another pool for a copy-on-write restore or clone: the source is incompatible.
        for (name, source) in [
            ("restored-default", from_snapshot(&snap.snapshot_id)),
            ("clone-default", from_volume(&v.volume_id)),
        ] {
            let mut req = create_req(name, 16 * MIB);
            req.volume_content_source = source;
            req.parameters = params(&[("pool", "default")]);
            expect_code(
                name,
                c.create_volume(req).await,
                Code::InvalidArgument,
                "pool",
            );
        }

        // Capacity is per pool.
        let fast = capacity(&mut c, params(&[("pool", "fast")])).await;
        let default = capacity(&mut c, HashMap::new()).await;
        assert!(
            fast.maximum_volume_size < default.maximum_volume_size,
            "fast {fast:?}, default {default:?}"
        );
        let mut grpc = env.daemon.grpc().await;
        let pool = grpc
            .pools
            .get_pool(v1::GetPoolRequest {
                name: "fast".into(),
            })
            .await
            .expect("GetPool fast")
            .into_inner();
        assert_eq!(
            fast.maximum_volume_size,
            Some(4 * pool.capacity_bytes as i64 - (24 * MIB)),
            "ratio 4 times capacity, less the 8 + 16 MiB provisioned"
        );
    });
}
