//! The harness of the CSI Controller tests (`tests/csi_controller/`,
//! `tests/csi_group_snapshots.rs`, `tests/csi_modify.rs`): a real blockd, a real csi-shim
//! for node [`NODE`] on it, gRPC clients of both, and the requests those tests build over
//! and over.

use std::collections::{HashMap, HashSet};

use blockd_proto::csi;
use blockd_proto::csi::controller_client::ControllerClient;
use blockd_proto::csi::group_controller_client::GroupControllerClient;
use blockd_proto::csi::identity_client::IdentityClient;
use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use blockd_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use blockd_proto::v1;
use tonic::transport::Channel;
use tonic::Code;

use crate::{runtime, CsiShim, Daemon};

/// The node id of the csi-shim under test.
pub const NODE: &str = "node-a";
pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

/// A blockd, a csi-shim for node [`NODE`] on it, and a runtime for the clients.
pub struct Env {
    pub daemon: Daemon,
    pub shim: CsiShim,
    pub rt: tokio::runtime::Runtime,
}

impl Env {
    pub fn start() -> Env {
        Env::start_with(&[], &[])
    }

    pub fn start_with(daemon_args: &[&str], shim_args: &[&str]) -> Env {
        let daemon = Daemon::start_with(daemon_args);
        let shim = CsiShim::start(&daemon, NODE, shim_args);
        Env {
            daemon,
            shim,
            rt: runtime(),
        }
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.shim.channel().await)
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.shim.channel().await)
    }

    pub async fn groups(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.shim.channel().await)
    }

    /// blockd's own view of a volume, `None` when blockd does not have it.
    pub async fn blockd_volume(&self, name: &str) -> Option<v1::Volume> {
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

    /// blockd's own view of pool `name`, which must exist.
    pub async fn blockd_pool(&self, name: &str) -> v1::Pool {
        let mut grpc = self.daemon.grpc().await;
        grpc.pools
            .get_pool(v1::GetPoolRequest { name: name.into() })
            .await
            .unwrap_or_else(|s| panic!("blockd GetPool {name}: {s}"))
            .into_inner()
    }

    pub async fn blockd_volume_names(&self) -> Vec<String> {
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

    /// Exports `image` on blockd; answers its NBD URI.
    pub async fn export(&self, image: &str) -> String {
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

    pub async fn unexport(&self, image: &str) {
        let mut grpc = self.daemon.grpc().await;
        grpc.exports
            .unexport(v1::UnexportRequest {
                image: image.into(),
                force: false,
            })
            .await
            .expect("blockd Unexport");
    }
}

pub fn cap(mode: Mode, access: AccessType) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(access),
    }
}

pub fn mount(fs: &str) -> AccessType {
    AccessType::Mount(MountVolume {
        fs_type: fs.into(),
        ..Default::default()
    })
}

pub fn block() -> AccessType {
    AccessType::Block(BlockVolume {})
}

/// Single-node writer, ext4.
pub fn rwo() -> csi::VolumeCapability {
    cap(Mode::SingleNodeWriter, mount("ext4"))
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

/// A CreateVolume of `required` bytes (no range when 0) for an [`rwo`] volume.
pub fn create_req(name: &str, required: i64) -> csi::CreateVolumeRequest {
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

/// A CreateVolume of `bytes` for a single-node-writer raw block volume.
pub fn create_block_req(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(bytes, 0),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter, block())],
        ..Default::default()
    }
}

pub fn topology(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([("topology.blockd.io/node".to_string(), node.to_string())]),
    }
}

pub fn from_snapshot(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        })),
    })
}

pub fn from_volume(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: id.into(),
        })),
    })
}

/// GetPluginCapabilities that must succeed; answers the capabilities.
pub async fn plugin_capabilities(id: &mut IdentityClient<Channel>) -> Vec<csi::PluginCapability> {
    id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .expect("GetPluginCapabilities")
        .into_inner()
        .capabilities
}

/// Whether `caps` (GetPluginCapabilities' answer) name the service `service`.
pub fn offers_service(
    caps: &[csi::PluginCapability],
    service: csi::plugin_capability::service::Type,
) -> bool {
    caps.iter().any(|c| {
        matches!(
            &c.r#type,
            Some(csi::plugin_capability::Type::Service(s)) if s.r#type == service as i32
        )
    })
}

/// ControllerGetCapabilities that must succeed; answers the RPC types it names.
pub async fn controller_rpcs(c: &mut ControllerClient<Channel>) -> HashSet<i32> {
    c.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .expect("ControllerGetCapabilities")
        .into_inner()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type.expect("a capability type") {
            csi::controller_service_capability::Type::Rpc(r) => r.r#type,
        })
        .collect()
}

/// ControllerGetVolume of `volume_id` that must succeed.
pub async fn get_volume(
    c: &mut ControllerClient<Channel>,
    volume_id: &str,
) -> csi::ControllerGetVolumeResponse {
    c.controller_get_volume(csi::ControllerGetVolumeRequest {
        volume_id: volume_id.into(),
    })
    .await
    .unwrap_or_else(|s| panic!("ControllerGetVolume {volume_id}: {s}"))
    .into_inner()
}

/// CreateVolume that must succeed; answers the volume.
pub async fn create(
    c: &mut ControllerClient<Channel>,
    req: csi::CreateVolumeRequest,
) -> csi::Volume {
    let name = req.name.clone();
    c.create_volume(req)
        .await
        .unwrap_or_else(|s| panic!("CreateVolume {name}: {s}"))
        .into_inner()
        .volume
        .expect("CreateVolume answers a volume")
}

/// CreateSnapshot that must succeed; answers the snapshot.
pub async fn snapshot(
    c: &mut ControllerClient<Channel>,
    volume_id: &str,
    name: &str,
) -> csi::Snapshot {
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
