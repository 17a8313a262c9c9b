//! The connection to blockd's gRPC API.
//!
//! The channel is lazy: csi-shim starts (and answers Identity, with Probe saying "not
//! ready") before blockd is up, and reconnects by itself when blockd restarts, so no call
//! path ever holds a dead connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use blockd_proto::v1::daemon_service_client::DaemonServiceClient;
use blockd_proto::v1::export_service_client::ExportServiceClient;
use blockd_proto::v1::group_snapshot_service_client::GroupSnapshotServiceClient;
use blockd_proto::v1::image_data_service_client::ImageDataServiceClient;
use blockd_proto::v1::pool_service_client::PoolServiceClient;
use blockd_proto::v1::snapshot_service_client::SnapshotServiceClient;
use blockd_proto::v1::volume_service_client::VolumeServiceClient;
use blockd_proto::v1::{
    DeleteVolumeRequest, DeleteVolumeResponse, GetSnapshotRequest, ListPoolsRequest, Pool,
    Snapshot, UnexportRequest, UnexportResponse,
};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

/// How long one blockd call may take before the shim gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One method per blockd service, `name: Client`: a client of it on the shared channel.
macro_rules! service_clients {
    ($($name:ident: $client:ident,)*) => {$(
        pub fn $name(&self) -> $client<Channel> {
            $client::new(self.channel.clone())
        }
    )*};
}

/// A cheap-to-clone handle on blockd's API.
#[derive(Debug, Clone)]
pub struct Blockd {
    channel: Channel,
    socket: PathBuf,
}

impl Blockd {
    /// A handle that connects on first use (and again after blockd restarts).
    pub fn lazy(socket: &Path) -> Self {
        let path = socket.to_path_buf();
        let channel = Endpoint::from_static("http://blockd.local")
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }));
        Blockd {
            channel,
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    service_clients! {
        pools: PoolServiceClient,
        volumes: VolumeServiceClient,
        snapshots: SnapshotServiceClient,
        exports: ExportServiceClient,
        daemon: DaemonServiceClient,
        groups: GroupSnapshotServiceClient,
        image_data: ImageDataServiceClient,
    }

    /// Every pool of this node's blockd.
    pub async fn list_pools(&self) -> Result<Vec<Pool>, Status> {
        Ok(self
            .pools()
            .list_pools(ListPoolsRequest::default())
            .await
            .map_err(|status| upstream("listing pools", status))?
            .into_inner()
            .pools)
    }

    /// blockd's snapshot `name`, or blockd's own error (NOT_FOUND when it has none).
    pub async fn get_snapshot(&self, name: &str) -> Result<Snapshot, Status> {
        let request = GetSnapshotRequest {
            name: name.to_string(),
        };
        Ok(self.snapshots().get_snapshot(request).await?.into_inner())
    }

    /// Deletes volume `name`; `force` deletes it even with NBD clients connected. blockd's
    /// own answer, for the caller to judge (NOT_FOUND: there was no such volume).
    pub async fn delete_volume(
        &self,
        name: &str,
        force: bool,
    ) -> Result<DeleteVolumeResponse, Status> {
        let request = DeleteVolumeRequest {
            name: name.to_string(),
            force,
        };
        Ok(self.volumes().delete_volume(request).await?.into_inner())
    }

    /// Takes back the NBD export of `image`; `force` drops its connected clients too.
    /// blockd's own answer, for the caller to judge (NOT_FOUND: nothing was exported).
    pub async fn unexport(&self, image: &str, force: bool) -> Result<UnexportResponse, Status> {
        let request = UnexportRequest {
            image: image.to_string(),
            force,
        };
        Ok(self.exports().unexport(request).await?.into_inner())
    }
}

/// The answer of a blockd call for which NOT_FOUND is an answer too (an idempotent delete
/// or unexport that finds nothing left, a lookup that finds no such object): `Some` of the
/// reply, `None` for NOT_FOUND, and any other failure through [`upstream`] with the
/// context `context` builds.
pub fn found<T>(
    result: Result<T, Status>,
    context: impl FnOnce() -> String,
) -> Result<Option<T>, Status> {
    match result {
        Ok(reply) => Ok(Some(reply)),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(upstream(&context(), status)),
    }
}

/// Maps a failed blockd call onto the status the CSI caller gets.
///
/// blockd's codes already follow gRPC semantics (NOT_FOUND, ALREADY_EXISTS,
/// RESOURCE_EXHAUSTED for a full pool, INVALID_ARGUMENT, FAILED_PRECONDITION), so they pass
/// through with context. A transport failure (blockd down or restarting) becomes
/// `UNAVAILABLE`, which the orchestrator retries.
pub fn upstream(context: &str, status: Status) -> Status {
    let code = match status.code() {
        Code::Unknown | Code::Cancelled if status.message().contains("transport") => {
            Code::Unavailable
        }
        code => code,
    };
    Status::new(code, format!("{context}: blockd: {}", status.message()))
}
