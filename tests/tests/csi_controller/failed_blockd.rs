//! A stand-in for blockd whose only pool has failed, for what a real daemon cannot be
//! made to do on demand: report a failed pool. It serves the three services the
//! controller's read paths use; everything else is UNIMPLEMENTED.

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
    async fn fsck(&self, _: Request<v1::FsckRequest>) -> Result<Response<v1::FsckReport>, Status> {
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
    async fn get_pool(&self, _: Request<v1::GetPoolRequest>) -> Result<Response<v1::Pool>, Status> {
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
