//! The CSI spec's order of checks, RPC by RPC: every required field is validated before
//! anything is looked up, so a request that both lacks a field and names a volume (or
//! snapshot) that does not exist is `INVALID_ARGUMENT`, never `NOT_FOUND` (nor the
//! `FAILED_PRECONDITION` or `RESOURCE_EXHAUSTED` an id of another node gets). And the
//! lookups that follow answer `NOT_FOUND` where the spec says so, e.g. NodeGetVolumeStats
//! for a `volume_path` where the volume is not.
//!
//! Each test names one RPC and one missing (or malformed) field and sends it with every
//! kind of unknown id: a well-formed id of this node that blockd does not have, a
//! malformed id, and an id of another node. None of these requests reaches a mount, so
//! the tests need neither root nor FUSE. Each test runs its own blockd and csi-shim.

use std::future::Future;
use std::path::PathBuf;

use blockd_proto::csi;
use blockd_proto::csi::controller_client::ControllerClient;
use blockd_proto::csi::node_client::NodeClient;
use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use blockd_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use blockd_tests::expect_status as expect_code;
use blockd_tests::{runtime, CsiShim, Daemon};
use tonic::transport::Channel;
use tonic::Code;

const NODE: &str = "node-a";

/// Volume ids that name no volume here: absent from blockd, malformed, another node's.
const UNKNOWN_VOLUMES: [&str; 4] = ["node-a/no-such-volume", "garbage", "id", "node-b/elsewhere"];

/// Snapshot ids that name no snapshot here.
const UNKNOWN_SNAPSHOTS: [&str; 3] = ["node-a/no-such-volume@snap", "garbage", "node-b/v@s"];

/// What a test talks to: csi-shim's Node and Controller services, and a directory that
/// lives as long as the shim (for absolute paths that do not exist).
struct Clients {
    node: NodeClient<Channel>,
    controller: ControllerClient<Channel>,
    scratch: PathBuf,
}

impl Clients {
    /// An absolute path under the scratch directory that does not exist.
    fn nowhere(&self, name: &str) -> String {
        self.scratch
            .join("nowhere")
            .join(name)
            .display()
            .to_string()
    }
}

/// Runs `test` against a fresh blockd and csi-shim (node `node-a`, `--mode all`).
fn run<F, Fut>(test: F)
where
    F: FnOnce(Clients) -> Fut,
    Fut: Future<Output = ()>,
{
    let daemon = Daemon::start();
    let shim = CsiShim::start(&daemon, NODE, &[]);
    let rt = runtime();
    rt.block_on(async {
        let channel = shim.channel().await;
        test(Clients {
            node: NodeClient::new(channel.clone()),
            controller: ControllerClient::new(channel),
            scratch: shim.scratch().to_path_buf(),
        })
        .await
    });
}

fn cap(mode: Mode, access: Option<AccessType>) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: access,
    }
}

fn mount(fs: &str) -> Option<AccessType> {
    Some(AccessType::Mount(MountVolume {
        fs_type: fs.into(),
        ..Default::default()
    }))
}

/// A capability every RPC accepts.
fn rwo() -> csi::VolumeCapability {
    cap(Mode::SingleNodeWriter, mount("ext4"))
}

/// A well-formed capability blockd does not support.
fn multi_node() -> csi::VolumeCapability {
    cap(Mode::MultiNodeMultiWriter, mount("ext4"))
}

/// A capability missing its access type.
fn typeless() -> csi::VolumeCapability {
    cap(Mode::SingleNodeWriter, None)
}

/// A capability missing its access mode.
fn modeless() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: None,
        access_type: mount("ext4"),
    }
}

fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

// ---------------------------------------------------------------------------------------
// NodeStageVolume

fn stage(
    id: &str,
    staging: &str,
    cap: Option<csi::VolumeCapability>,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        volume_capability: cap,
        ..Default::default()
    }
}

#[test]
fn node_stage_without_volume_id_is_invalid() {
    run(|mut c| async move {
        let staging = c.nowhere("staging");
        let r = c.node.node_stage_volume(stage("", &staging, None)).await;
        expect_code(
            "NodeStageVolume without anything",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
        let r = c
            .node
            .node_stage_volume(stage("", &staging, Some(rwo())))
            .await;
        expect_code(
            "NodeStageVolume without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

#[test]
fn node_stage_of_an_unknown_volume_without_staging_path_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_VOLUMES {
            let r = c.node.node_stage_volume(stage(id, "", Some(rwo()))).await;
            expect_code(
                &format!("NodeStageVolume {id} without staging_target_path"),
                r,
                Code::InvalidArgument,
                "staging_target_path",
            );
            let r = c
                .node
                .node_stage_volume(stage(id, "rel/staging", Some(rwo())))
                .await;
            expect_code(
                &format!("NodeStageVolume {id} with a relative staging_target_path"),
                r,
                Code::InvalidArgument,
                "staging_target_path",
            );
        }
    });
}

#[test]
fn node_stage_of_an_unknown_volume_without_capability_is_invalid() {
    run(|mut c| async move {
        let staging = c.nowhere("staging");
        for id in UNKNOWN_VOLUMES {
            let r = c.node.node_stage_volume(stage(id, &staging, None)).await;
            expect_code(
                &format!("NodeStageVolume {id} without volume_capability"),
                r,
                Code::InvalidArgument,
                "volume_capability",
            );
            let r = c
                .node
                .node_stage_volume(stage(id, &staging, Some(typeless())))
                .await;
            expect_code(
                &format!("NodeStageVolume {id} without access_type"),
                r,
                Code::InvalidArgument,
                "access_type",
            );
            let r = c
                .node
                .node_stage_volume(stage(id, &staging, Some(modeless())))
                .await;
            expect_code(
                &format!("NodeStageVolume {id} without access_mode"),
                r,
                Code::InvalidArgument,
                "access_mode",
            );
            // Incomplete and unsupported at once: the missing field.
            let multi_typeless = cap(Mode::MultiNodeMultiWriter, None);
            let r = c
                .node
                .node_stage_volume(stage(id, &staging, Some(multi_typeless)))
                .await;
            expect_code(
                &format!("NodeStageVolume {id} multi-node without access_type"),
                r,
                Code::InvalidArgument,
                "access_type",
            );
            let r = c
                .node
                .node_stage_volume(stage(
                    id,
                    &staging,
                    Some(cap(Mode::SingleNodeWriter, mount("ntfs"))),
                ))
                .await;
            expect_code(
                &format!("NodeStageVolume {id} with fs_type ntfs"),
                r,
                Code::InvalidArgument,
                "ntfs",
            );
        }
    });
}

#[test]
fn node_stage_of_an_unknown_volume_with_every_field_is_not_found() {
    run(|mut c| async move {
        let staging = c.nowhere("staging");
        for id in UNKNOWN_VOLUMES {
            let r = c
                .node
                .node_stage_volume(stage(id, &staging, Some(rwo())))
                .await;
            expect_code(&format!("NodeStageVolume {id}"), r, Code::NotFound, id);
        }
    });
}

// ---------------------------------------------------------------------------------------
// NodeUnstageVolume

#[test]
fn node_unstage_without_volume_id_is_invalid() {
    run(|mut c| async move {
        let r = c
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest::default())
            .await;
        expect_code(
            "NodeUnstageVolume without anything",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
        let r = c
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: String::new(),
                staging_target_path: c.nowhere("staging"),
            })
            .await;
        expect_code(
            "NodeUnstageVolume without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

#[test]
fn node_unstage_of_an_unknown_volume_without_staging_path_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_VOLUMES {
            for (path, what) in [("", "without"), ("rel/staging", "with a relative")] {
                let r = c
                    .node
                    .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                        volume_id: id.into(),
                        staging_target_path: path.into(),
                    })
                    .await;
                expect_code(
                    &format!("NodeUnstageVolume {id} {what} staging_target_path"),
                    r,
                    Code::InvalidArgument,
                    "staging_target_path",
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// NodePublishVolume

fn publish(
    id: &str,
    staging: &str,
    target: &str,
    cap: Option<csi::VolumeCapability>,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: cap,
        ..Default::default()
    }
}

#[test]
fn node_publish_without_volume_id_is_invalid() {
    run(|mut c| async move {
        let (staging, target) = (c.nowhere("staging"), c.nowhere("target"));
        let r = c.node.node_publish_volume(publish("", "", "", None)).await;
        expect_code(
            "NodePublishVolume without anything",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
        let r = c
            .node
            .node_publish_volume(publish("", &staging, &target, Some(rwo())))
            .await;
        expect_code(
            "NodePublishVolume without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

#[test]
fn node_publish_of_an_unknown_volume_without_target_path_is_invalid() {
    run(|mut c| async move {
        let staging = c.nowhere("staging");
        for id in UNKNOWN_VOLUMES {
            for (target, what) in [("", "without"), ("rel/target", "with a relative")] {
                let r = c
                    .node
                    .node_publish_volume(publish(id, &staging, target, Some(rwo())))
                    .await;
                expect_code(
                    &format!("NodePublishVolume {id} {what} target_path"),
                    r,
                    Code::InvalidArgument,
                    "target_path",
                );
            }
            // Missing next to "staging target path not set" (FAILED_PRECONDITION): the
            // missing field wins.
            let r = c
                .node
                .node_publish_volume(publish(id, "", "", Some(rwo())))
                .await;
            expect_code(
                &format!("NodePublishVolume {id} without target_path and staging path"),
                r,
                Code::InvalidArgument,
                "target_path",
            );
        }
    });
}

#[test]
fn node_publish_of_an_unknown_volume_without_capability_is_invalid() {
    run(|mut c| async move {
        let (staging, target) = (c.nowhere("staging"), c.nowhere("target"));
        for id in UNKNOWN_VOLUMES {
            let r = c
                .node
                .node_publish_volume(publish(id, &staging, &target, None))
                .await;
            expect_code(
                &format!("NodePublishVolume {id} without volume_capability"),
                r,
                Code::InvalidArgument,
                "volume_capability",
            );
            let r = c
                .node
                .node_publish_volume(publish(id, &staging, &target, Some(typeless())))
                .await;
            expect_code(
                &format!("NodePublishVolume {id} without access_type"),
                r,
                Code::InvalidArgument,
                "access_type",
            );
            let r = c
                .node
                .node_publish_volume(publish(id, &staging, &target, Some(modeless())))
                .await;
            expect_code(
                &format!("NodePublishVolume {id} without access_mode"),
                r,
                Code::InvalidArgument,
                "access_mode",
            );
            let r = c
                .node
                .node_publish_volume(publish(id, "", &target, None))
                .await;
            expect_code(
                &format!("NodePublishVolume {id} without volume_capability and staging path"),
                r,
                Code::InvalidArgument,
                "volume_capability",
            );
        }
    });
}

#[test]
fn node_publish_of_an_unknown_volume_with_a_relative_staging_path_is_invalid() {
    run(|mut c| async move {
        let target = c.nowhere("target");
        for id in UNKNOWN_VOLUMES {
            let r = c
                .node
                .node_publish_volume(publish(id, "rel/staging", &target, Some(rwo())))
                .await;
            expect_code(
                &format!("NodePublishVolume {id} with a relative staging_target_path"),
                r,
                Code::InvalidArgument,
                "staging_target_path",
            );
        }
    });
}

#[test]
fn node_publish_of_an_unknown_volume_with_every_field_is_not_found() {
    run(|mut c| async move {
        let (staging, target) = (c.nowhere("staging"), c.nowhere("target"));
        for id in UNKNOWN_VOLUMES {
            let r = c
                .node
                .node_publish_volume(publish(id, &staging, &target, Some(rwo())))
                .await;
            expect_code(&format!("NodePublishVolume {id}"), r, Code::NotFound, id);
        }
    });
}

// ---------------------------------------------------------------------------------------
// NodeUnpublishVolume

#[test]
fn node_unpublish_without_volume_id_is_invalid() {
    run(|mut c| async move {
        let r = c
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest::default())
            .await;
        expect_code(
            "NodeUnpublishVolume without anything",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
        let r = c
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: String::new(),
                target_path: c.nowhere("target"),
            })
            .await;
        expect_code(
            "NodeUnpublishVolume without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

#[test]
fn node_unpublish_of_an_unknown_volume_without_target_path_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_VOLUMES {
            for (target, what) in [("", "without"), ("rel/target", "with a relative")] {
                let r = c
                    .node
                    .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                        volume_id: id.into(),
                        target_path: target.into(),
                    })
                    .await;
                expect_code(
                    &format!("NodeUnpublishVolume {id} {what} target_path"),
                    r,
                    Code::InvalidArgument,
                    "target_path",
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// NodeGetVolumeStats

fn stats(id: &str, path: &str, staging: &str) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: staging.into(),
    }
}

#[test]
fn node_stats_without_volume_id_is_invalid() {
    run(|mut c| async move {
        let r = c
            .node
            .node_get_volume_stats(stats("", "some/path", ""))
            .await;
        expect_code(
            "NodeGetVolumeStats without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
        let r = c.node.node_get_volume_stats(stats("", "", "")).await;
        expect_code(
            "NodeGetVolumeStats without anything",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

#[test]
fn node_stats_of_an_unknown_volume_without_volume_path_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_VOLUMES {
            let r = c.node.node_get_volume_stats(stats(id, "", "")).await;
            expect_code(
                &format!("NodeGetVolumeStats {id} without volume_path"),
                r,
                Code::InvalidArgument,
                "volume_path",
            );
        }
    });
}

#[test]
fn node_stats_of_an_unknown_volume_with_a_relative_staging_path_is_invalid() {
    run(|mut c| async move {
        let path = c.nowhere("volume");
        for id in UNKNOWN_VOLUMES {
            let r = c
                .node
                .node_get_volume_stats(stats(id, &path, "rel/staging"))
                .await;
            expect_code(
                &format!("NodeGetVolumeStats {id} with a relative staging_target_path"),
                r,
                Code::InvalidArgument,
                "staging_target_path",
            );
        }
    });
}

#[test]
fn node_stats_where_no_volume_is_is_not_found() {
    run(|mut c| async move {
        let absent = c.nowhere("volume");
        let staging = c.nowhere("staging");
        for id in UNKNOWN_VOLUMES {
            // csi-sanity's "volume is not found": a relative path that does not exist.
            for path in ["some/path", absent.as_str()] {
                let r = c.node.node_get_volume_stats(stats(id, path, "")).await;
                expect_code(
                    &format!("NodeGetVolumeStats {id} at {path}"),
                    r,
                    Code::NotFound,
                    id,
                );
                let r = c
                    .node
                    .node_get_volume_stats(stats(id, path, &staging))
                    .await;
                expect_code(
                    &format!("NodeGetVolumeStats {id} at {path} with a staging path"),
                    r,
                    Code::NotFound,
                    id,
                );
            }
        }
        // A volume blockd has, never staged: nowhere on this node either.
        let volume = c
            .controller
            .create_volume(csi::CreateVolumeRequest {
                name: "stats-order".into(),
                capacity_range: range(16 << 20, 0),
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("CreateVolume answers a volume");
        for path in ["some/path", absent.as_str(), "/"] {
            let r = c
                .node
                .node_get_volume_stats(stats(&volume.volume_id, path, ""))
                .await;
            expect_code(
                &format!("NodeGetVolumeStats of an unstaged volume at {path}"),
                r,
                Code::NotFound,
                path,
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// NodeExpandVolume

fn node_expand(
    id: &str,
    path: &str,
    cap: Option<csi::VolumeCapability>,
) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        volume_capability: cap,
        ..Default::default()
    }
}

#[test]
fn node_expand_of_an_unknown_volume_without_volume_path_is_invalid() {
    run(|mut c| async move {
        let r = c
            .node
            .node_expand_volume(node_expand("", "some/path", None))
            .await;
        expect_code(
            "NodeExpandVolume without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
        for id in UNKNOWN_VOLUMES {
            let r = c.node.node_expand_volume(node_expand(id, "", None)).await;
            expect_code(
                &format!("NodeExpandVolume {id} without volume_path"),
                r,
                Code::InvalidArgument,
                "volume_path",
            );
        }
    });
}

#[test]
fn node_expand_of_an_unknown_volume_with_a_bad_capability_is_invalid() {
    run(|mut c| async move {
        let path = c.nowhere("volume");
        for id in UNKNOWN_VOLUMES {
            let r = c
                .node
                .node_expand_volume(node_expand(id, &path, Some(typeless())))
                .await;
            expect_code(
                &format!("NodeExpandVolume {id} without access_type"),
                r,
                Code::InvalidArgument,
                "access_type",
            );
            // NodeExpandVolume's code for "exceeds capabilities" is INVALID_ARGUMENT.
            let r = c
                .node
                .node_expand_volume(node_expand(id, &path, Some(multi_node())))
                .await;
            expect_code(
                &format!("NodeExpandVolume {id} multi-node"),
                r,
                Code::InvalidArgument,
                "MULTI_NODE_MULTI_WRITER",
            );
        }
    });
}

#[test]
fn node_expand_where_no_volume_is_is_not_found() {
    run(|mut c| async move {
        let absent = c.nowhere("volume");
        for id in UNKNOWN_VOLUMES {
            for path in ["some/path", absent.as_str()] {
                let r = c.node.node_expand_volume(node_expand(id, path, None)).await;
                expect_code(
                    &format!("NodeExpandVolume {id} at {path}"),
                    r,
                    Code::NotFound,
                    id,
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// CreateVolume

fn create(
    name: &str,
    caps: Vec<csi::VolumeCapability>,
    source: Option<SourceType>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(16 << 20, 0),
        volume_capabilities: caps,
        volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    }
}

fn snapshot_source(id: &str) -> Option<SourceType> {
    Some(SourceType::Snapshot(SnapshotSource {
        snapshot_id: id.into(),
    }))
}

fn volume_source(id: &str) -> Option<SourceType> {
    Some(SourceType::Volume(VolumeSource {
        volume_id: id.into(),
    }))
}

#[test]
fn create_volume_from_an_unknown_source_without_name_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_SNAPSHOTS {
            let r = c
                .controller
                .create_volume(create("", vec![rwo()], snapshot_source(id)))
                .await;
            expect_code(
                &format!("CreateVolume from snapshot {id} without name"),
                r,
                Code::InvalidArgument,
                "name",
            );
        }
        for id in UNKNOWN_VOLUMES {
            let r = c
                .controller
                .create_volume(create("", vec![rwo()], volume_source(id)))
                .await;
            expect_code(
                &format!("CreateVolume from volume {id} without name"),
                r,
                Code::InvalidArgument,
                "name",
            );
        }
    });
}

#[test]
fn create_volume_from_an_unknown_source_without_capabilities_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_SNAPSHOTS {
            let r = c
                .controller
                .create_volume(create("order", vec![], snapshot_source(id)))
                .await;
            expect_code(
                &format!("CreateVolume from snapshot {id} without volume_capabilities"),
                r,
                Code::InvalidArgument,
                "volume_capabilities",
            );
            // An unsupported capability, then an incomplete one: the missing field.
            let r = c
                .controller
                .create_volume(create(
                    "order",
                    vec![multi_node(), typeless()],
                    snapshot_source(id),
                ))
                .await;
            expect_code(
                &format!("CreateVolume from snapshot {id}, second capability without access_type"),
                r,
                Code::InvalidArgument,
                "access_type",
            );
        }
        for id in UNKNOWN_VOLUMES {
            let r = c
                .controller
                .create_volume(create("order", vec![modeless()], volume_source(id)))
                .await;
            expect_code(
                &format!("CreateVolume from volume {id} without access_mode"),
                r,
                Code::InvalidArgument,
                "access_mode",
            );
        }
    });
}

#[test]
fn create_volume_with_a_source_without_id_is_invalid() {
    run(|mut c| async move {
        let r = c
            .controller
            .create_volume(create("order", vec![rwo()], snapshot_source("")))
            .await;
        expect_code(
            "CreateVolume from a snapshot without snapshot_id",
            r,
            Code::InvalidArgument,
            "snapshot_id",
        );
        let r = c
            .controller
            .create_volume(create("order", vec![rwo()], volume_source("")))
            .await;
        expect_code(
            "CreateVolume from a volume without volume_id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
        // Before the topology refusal (RESOURCE_EXHAUSTED) too.
        let mut req = create("order", vec![rwo()], snapshot_source(""));
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![csi::Topology {
                segments: [("topology.blockd.io/node".to_string(), "node-b".to_string())].into(),
            }],
            preferred: vec![],
        });
        let r = c.controller.create_volume(req).await;
        expect_code(
            "CreateVolume for node-b from a snapshot without snapshot_id",
            r,
            Code::InvalidArgument,
            "snapshot_id",
        );
        let mut req = create("order", vec![rwo()], None);
        req.volume_content_source = Some(csi::VolumeContentSource { r#type: None });
        let r = c.controller.create_volume(req).await;
        expect_code(
            "CreateVolume from a source of no kind",
            r,
            Code::InvalidArgument,
            "volume_content_source",
        );
    });
}

#[test]
fn create_volume_from_an_unknown_source_with_every_field_is_not_found() {
    run(|mut c| async move {
        for id in ["node-a/no-such-volume@snap", "garbage"] {
            let r = c
                .controller
                .create_volume(create("order", vec![rwo()], snapshot_source(id)))
                .await;
            expect_code(
                &format!("CreateVolume from snapshot {id}"),
                r,
                Code::NotFound,
                "does not exist",
            );
        }
        for id in ["node-a/no-such-volume", "garbage"] {
            let r = c
                .controller
                .create_volume(create("order", vec![rwo()], volume_source(id)))
                .await;
            expect_code(
                &format!("CreateVolume from volume {id}"),
                r,
                Code::NotFound,
                "does not exist",
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// DeleteVolume

#[test]
fn delete_volume_without_volume_id_is_invalid() {
    run(|mut c| async move {
        let r = c
            .controller
            .delete_volume(csi::DeleteVolumeRequest::default())
            .await;
        expect_code(
            "DeleteVolume without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

// ---------------------------------------------------------------------------------------
// ValidateVolumeCapabilities

fn validate(id: &str, caps: Vec<csi::VolumeCapability>) -> csi::ValidateVolumeCapabilitiesRequest {
    csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

#[test]
fn validate_capabilities_without_volume_id_is_invalid() {
    run(|mut c| async move {
        let r = c
            .controller
            .validate_volume_capabilities(validate("", vec![rwo()]))
            .await;
        expect_code(
            "ValidateVolumeCapabilities without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
        let r = c
            .controller
            .validate_volume_capabilities(validate("", vec![]))
            .await;
        expect_code(
            "ValidateVolumeCapabilities without anything",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

#[test]
fn validate_capabilities_of_an_unknown_volume_without_capabilities_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_VOLUMES {
            let r = c
                .controller
                .validate_volume_capabilities(validate(id, vec![]))
                .await;
            expect_code(
                &format!("ValidateVolumeCapabilities {id} without volume_capabilities"),
                r,
                Code::InvalidArgument,
                "volume_capabilities",
            );
            let r = c
                .controller
                .validate_volume_capabilities(validate(id, vec![modeless()]))
                .await;
            expect_code(
                &format!("ValidateVolumeCapabilities {id} without access_mode"),
                r,
                Code::InvalidArgument,
                "access_mode",
            );
            // An unsupported capability (an unconfirmed answer, after the lookup) before an
            // incomplete one: the missing field, before the lookup.
            let r = c
                .controller
                .validate_volume_capabilities(validate(id, vec![multi_node(), typeless()]))
                .await;
            expect_code(
                &format!("ValidateVolumeCapabilities {id}, second capability without access_type"),
                r,
                Code::InvalidArgument,
                "access_type",
            );
        }
    });
}

#[test]
fn validate_capabilities_of_an_unknown_volume_with_every_field_is_not_found() {
    run(|mut c| async move {
        for id in ["node-a/no-such-volume", "garbage", "id"] {
            for caps in [vec![rwo()], vec![multi_node()]] {
                let r = c
                    .controller
                    .validate_volume_capabilities(validate(id, caps))
                    .await;
                expect_code(
                    &format!("ValidateVolumeCapabilities {id}"),
                    r,
                    Code::NotFound,
                    id,
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// ControllerExpandVolume

fn controller_expand(
    id: &str,
    range: Option<csi::CapacityRange>,
    cap: Option<csi::VolumeCapability>,
) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: range,
        volume_capability: cap,
        ..Default::default()
    }
}

#[test]
fn controller_expand_without_volume_id_is_invalid() {
    run(|mut c| async move {
        let r = c
            .controller
            .controller_expand_volume(controller_expand("", range(32 << 20, 0), None))
            .await;
        expect_code(
            "ControllerExpandVolume without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
    });
}

#[test]
fn controller_expand_of_an_unknown_volume_without_capacity_range_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_VOLUMES {
            let r = c
                .controller
                .controller_expand_volume(controller_expand(id, None, None))
                .await;
            expect_code(
                &format!("ControllerExpandVolume {id} without capacity_range"),
                r,
                Code::InvalidArgument,
                "capacity_range",
            );
            let r = c
                .controller
                .controller_expand_volume(controller_expand(id, range(0, 0), None))
                .await;
            expect_code(
                &format!("ControllerExpandVolume {id} with an empty capacity_range"),
                r,
                Code::InvalidArgument,
                "capacity_range",
            );
            let r = c
                .controller
                .controller_expand_volume(controller_expand(id, range(-1, 0), None))
                .await;
            expect_code(
                &format!("ControllerExpandVolume {id} with a negative required_bytes"),
                r,
                Code::InvalidArgument,
                "required_bytes",
            );
        }
    });
}

#[test]
fn controller_expand_of_an_unknown_volume_with_a_bad_capability_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_VOLUMES {
            let r = c
                .controller
                .controller_expand_volume(controller_expand(
                    id,
                    range(32 << 20, 0),
                    Some(typeless()),
                ))
                .await;
            expect_code(
                &format!("ControllerExpandVolume {id} without access_type"),
                r,
                Code::InvalidArgument,
                "access_type",
            );
        }
    });
}

#[test]
fn controller_expand_of_an_unknown_volume_with_every_field_is_not_found() {
    run(|mut c| async move {
        for id in ["node-a/no-such-volume", "garbage", "id"] {
            let r = c
                .controller
                .controller_expand_volume(controller_expand(id, range(32 << 20, 0), None))
                .await;
            expect_code(
                &format!("ControllerExpandVolume {id}"),
                r,
                Code::NotFound,
                id,
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// ControllerGetVolume

#[test]
fn controller_get_volume_without_volume_id_is_invalid_and_unknown_ids_not_found() {
    run(|mut c| async move {
        let r = c
            .controller
            .controller_get_volume(csi::ControllerGetVolumeRequest::default())
            .await;
        expect_code(
            "ControllerGetVolume without id",
            r,
            Code::InvalidArgument,
            "volume_id",
        );
        for id in ["node-a/no-such-volume", "garbage", "id"] {
            let r = c
                .controller
                .controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: id.into(),
                })
                .await;
            expect_code(&format!("ControllerGetVolume {id}"), r, Code::NotFound, id);
        }
    });
}

// ---------------------------------------------------------------------------------------
// CreateSnapshot

fn create_snapshot(source: &str, name: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

#[test]
fn create_snapshot_of_an_unknown_volume_without_name_is_invalid() {
    run(|mut c| async move {
        for id in UNKNOWN_VOLUMES {
            let r = c.controller.create_snapshot(create_snapshot(id, "")).await;
            expect_code(
                &format!("CreateSnapshot of {id} without name"),
                r,
                Code::InvalidArgument,
                "name",
            );
            let mut req = create_snapshot(id, "order");
            req.parameters = [("colour".to_string(), "blue".to_string())].into();
            let r = c.controller.create_snapshot(req).await;
            expect_code(
                &format!("CreateSnapshot of {id} with an unknown parameter"),
                r,
                Code::InvalidArgument,
                "colour",
            );
        }
    });
}

#[test]
fn create_snapshot_without_source_volume_id_is_invalid() {
    run(|mut c| async move {
        let r = c
            .controller
            .create_snapshot(create_snapshot("", "order"))
            .await;
        expect_code(
            "CreateSnapshot without source_volume_id",
            r,
            Code::InvalidArgument,
            "source_volume_id",
        );
        let r = c.controller.create_snapshot(create_snapshot("", "")).await;
        expect_code(
            "CreateSnapshot without anything",
            r,
            Code::InvalidArgument,
            "is required",
        );
    });
}

#[test]
fn create_snapshot_of_an_unknown_volume_with_every_field_is_not_found() {
    run(|mut c| async move {
        for id in ["node-a/no-such-volume", "garbage", "id"] {
            let r = c
                .controller
                .create_snapshot(create_snapshot(id, "order"))
                .await;
            expect_code(&format!("CreateSnapshot of {id}"), r, Code::NotFound, id);
        }
    });
}

// ---------------------------------------------------------------------------------------
// DeleteSnapshot and GetSnapshot

#[test]
fn delete_snapshot_without_snapshot_id_is_invalid() {
    run(|mut c| async move {
        let r = c
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest::default())
            .await;
        expect_code(
            "DeleteSnapshot without id",
            r,
            Code::InvalidArgument,
            "snapshot_id",
        );
    });
}

#[test]
fn get_snapshot_without_snapshot_id_is_invalid_and_unknown_ids_not_found() {
    run(|mut c| async move {
        let r = c
            .controller
            .get_snapshot(csi::GetSnapshotRequest::default())
            .await;
        expect_code(
            "GetSnapshot without id",
            r,
            Code::InvalidArgument,
            "snapshot_id",
        );
        for id in ["node-a/no-such-volume@snap", "garbage"] {
            let r = c
                .controller
                .get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: id.into(),
                    ..Default::default()
                })
                .await;
            expect_code(&format!("GetSnapshot {id}"), r, Code::NotFound, id);
        }
    });
}
