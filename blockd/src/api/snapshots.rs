//! `blockd.v1.SnapshotService`: create, get, list (all or one volume's), delete.

use blockd_proto::model::{CreateSnapshot, ListSnapshots, SnapshotName};
use blockd_proto::v1;
use blockd_proto::v1::snapshot_service_server::SnapshotService;
use tonic::{Request, Response, Status};

use super::convert::{self, Exported};
use super::ApiContext;

#[derive(Debug, Clone)]
pub struct SnapshotApi {
    ctx: ApiContext,
}

impl SnapshotApi {
    pub fn new(ctx: ApiContext) -> Self {
        SnapshotApi { ctx }
    }
}

fn exported(engine: &crate::engine::Engine) -> Exported {
    Exported::of(engine)
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    async fn create_snapshot(
        &self,
        request: Request<v1::CreateSnapshotRequest>,
    ) -> Result<Response<v1::CreateSnapshotResponse>, Status> {
        let span = tracing::info_span!(
            "create_snapshot",
            volume = %request.get_ref().volume,
            snapshot = %request.get_ref().name
        );
        self.ctx
            .rpc("CreateSnapshot", span, async {
                let req = CreateSnapshot::try_from(request.into_inner())?;
                let (info, created, exported) = self
                    .ctx
                    .run(move |e| {
                        let (info, created) = e.create_snapshot_replica(
                            req.volume.as_str(),
                            req.name.as_str(),
                            req.replica_of.as_deref(),
                        )?;
                        Ok((info, created, exported(e)))
                    })
                    .await?;
                Ok(Response::new(v1::CreateSnapshotResponse {
                    snapshot: Some(convert::snapshot(info, &exported)),
                    created,
                }))
            })
            .await
    }

    async fn get_snapshot(
        &self,
        request: Request<v1::GetSnapshotRequest>,
    ) -> Result<Response<v1::Snapshot>, Status> {
        let span = tracing::info_span!("get_snapshot", snapshot = %request.get_ref().name);
        self.ctx
            .rpc("GetSnapshot", span, async {
                let name = SnapshotName::try_from(request.into_inner())?;
                let (info, exported) = self
                    .ctx
                    .run(move |e| Ok((e.snapshot(name.as_str())?, exported(e))))
                    .await?;
                Ok(Response::new(convert::snapshot(info, &exported)))
            })
            .await
    }

    async fn list_snapshots(
        &self,
        request: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        let span = tracing::info_span!("list_snapshots", volume = %request.get_ref().volume);
        self.ctx
            .rpc("ListSnapshots", span, async {
                let req = ListSnapshots::try_from(request.into_inner())?;
                let volume = req.volume.clone();
                let (snapshots, exported) = self
                    .ctx
                    .run(move |e| {
                        let snapshots = e.snapshots(volume.as_ref().map(|v| v.as_str()))?;
                        Ok((snapshots, exported(e)))
                    })
                    .await?;
                let (snapshots, next_page_token) = req.page.apply(snapshots, |s| s.name.as_str());
                Ok(Response::new(v1::ListSnapshotsResponse {
                    snapshots: snapshots
                        .into_iter()
                        .map(|s| convert::snapshot(s, &exported))
                        .collect(),
                    next_page_token,
                }))
            })
            .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<v1::DeleteSnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        let span = tracing::info_span!("delete_snapshot", snapshot = %request.get_ref().name);
        self.ctx
            .rpc("DeleteSnapshot", span, async {
                let name = SnapshotName::try_from(request.into_inner())?;
                let probe = name.clone();
                let attached = self
                    .ctx
                    .run(move |e| {
                        let info = e.snapshot(probe.as_str())?;
                        Ok(format!("{}@{}", info.volume, info.name))
                    })
                    .await?;
                self.ctx
                    .refuse_if_ublk(&attached, false, "delete snapshot")
                    .await?;
                let image = self
                    .ctx
                    .run(move |e| {
                        // The image name of the snapshot, for forgetting its metrics.
                        let info = e.snapshot(name.as_str())?;
                        e.delete_snapshot(name.as_str())?;
                        Ok(format!("{}@{}", info.volume, info.name))
                    })
                    .await?;
                // The engine logged the delete.
                self.ctx.close_nbd(&image).await;
                self.ctx.metrics.forget_image(&image);
                Ok(Response::new(v1::DeleteSnapshotResponse {}))
            })
            .await
    }
}
