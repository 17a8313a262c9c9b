//! `blockd.v1.GroupSnapshotService`: crash-consistent snapshots of several volumes at
//! one instant (`engine::group`), get, list and delete.

use blockd_proto::model::{CreateGroupSnapshot, PageRequest, SnapshotName};
use blockd_proto::v1;
use blockd_proto::v1::group_snapshot_service_server::GroupSnapshotService;
use tonic::{Request, Response, Status};

use super::convert::{self, Exported};
use super::ApiContext;
use crate::engine::GroupSnapshotInfo;

#[derive(Debug, Clone)]
pub struct GroupSnapshotApi {
    ctx: ApiContext,
}

impl GroupSnapshotApi {
    pub fn new(ctx: ApiContext) -> Self {
        GroupSnapshotApi { ctx }
    }
}

fn exported(engine: &crate::engine::Engine) -> Exported {
    Exported::of(engine)
}

fn group(g: GroupSnapshotInfo, exported: &Exported) -> v1::GroupSnapshot {
    v1::GroupSnapshot {
        name: g.name,
        snapshots: g
            .snapshots
            .into_iter()
            .map(|s| convert::snapshot(s, exported))
            .collect(),
        created_unix: g.created_unix,
    }
}

#[tonic::async_trait]
impl GroupSnapshotService for GroupSnapshotApi {
    async fn create_group_snapshot(
        &self,
        request: Request<v1::CreateGroupSnapshotRequest>,
    ) -> Result<Response<v1::CreateGroupSnapshotResponse>, Status> {
        let span = tracing::info_span!(
            "create_group_snapshot",
            group = %request.get_ref().name,
            volumes = ?request.get_ref().volumes
        );
        self.ctx
            .rpc("CreateGroupSnapshot", span, async {
                let req = CreateGroupSnapshot::try_from(request.into_inner())?;
                let volumes: Vec<String> =
                    req.volumes.into_iter().map(|v| v.into_string()).collect();
                let (info, created, exported) = self
                    .ctx
                    .run(move |e| {
                        let (info, created) =
                            e.create_group_snapshot(req.name.as_str(), &volumes)?;
                        Ok((info, created, exported(e)))
                    })
                    .await?;
                if created {
                    tracing::info!(members = info.snapshots.len(), "created group snapshot");
                }
                Ok(Response::new(v1::CreateGroupSnapshotResponse {
                    group: Some(group(info, &exported)),
                    created,
                }))
            })
            .await
    }

    async fn get_group_snapshot(
        &self,
        request: Request<v1::GetGroupSnapshotRequest>,
    ) -> Result<Response<v1::GroupSnapshot>, Status> {
        let span = tracing::info_span!("get_group_snapshot", group = %request.get_ref().name);
        self.ctx
            .rpc("GetGroupSnapshot", span, async {
                let name = SnapshotName::try_from(request.into_inner())?;
                let (info, exported) = self
                    .ctx
                    .run(move |e| Ok((e.group_snapshot(name.as_str())?, exported(e))))
                    .await?;
                Ok(Response::new(group(info, &exported)))
            })
            .await
    }

    async fn list_group_snapshots(
        &self,
        request: Request<v1::ListGroupSnapshotsRequest>,
    ) -> Result<Response<v1::ListGroupSnapshotsResponse>, Status> {
        let span = tracing::info_span!("list_group_snapshots");
        self.ctx
            .rpc("ListGroupSnapshots", span, async {
                let req = request.into_inner();
                let page = PageRequest::new(req.page_size, &req.page_token)?;
                let (groups, exported) = self
                    .ctx
                    .run(|e| Ok((e.group_snapshots(), exported(e))))
                    .await?;
                let (groups, next_page_token) = page.apply(groups, |g| g.name.as_str());
                Ok(Response::new(v1::ListGroupSnapshotsResponse {
                    groups: groups.into_iter().map(|g| group(g, &exported)).collect(),
                    next_page_token,
                }))
            })
            .await
    }

    async fn delete_group_snapshot(
        &self,
        request: Request<v1::DeleteGroupSnapshotRequest>,
    ) -> Result<Response<v1::DeleteGroupSnapshotResponse>, Status> {
        let span = tracing::info_span!("delete_group_snapshot", group = %request.get_ref().name);
        self.ctx
            .rpc("DeleteGroupSnapshot", span, async {
                let name = SnapshotName::try_from(request.into_inner())?;
                let images = self
                    .ctx
                    .run(move |e| {
                        // The members' image names, for closing exports and metrics.
                        let info = e.group_snapshot(name.as_str())?;
                        e.delete_group_snapshot(name.as_str())?;
                        Ok(info
                            .snapshots
                            .into_iter()
                            .map(|s| format!("{}@{}", s.volume, s.name))
                            .collect::<Vec<_>>())
                    })
                    .await?;
                for image in &images {
                    self.ctx.close_nbd(image).await;
                    self.ctx.metrics.forget_image(image);
                }
                tracing::info!(members = images.len(), "deleted group snapshot");
                Ok(Response::new(v1::DeleteGroupSnapshotResponse {}))
            })
            .await
    }
}
