//! `blockd.v1.DaemonService`: status, fsck and an on-demand GC pass.

use blockd_proto::v1;
use blockd_proto::v1::daemon_service_server::DaemonService;
use tonic::{Request, Response, Status};

use super::{convert, ApiContext};

#[derive(Debug, Clone)]
pub struct DaemonApi {
    ctx: ApiContext,
}

impl DaemonApi {
    pub fn new(ctx: ApiContext) -> Self {
        DaemonApi { ctx }
    }
}

#[tonic::async_trait]
impl DaemonService for DaemonApi {
    async fn get_status(
        &self,
        _request: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::DaemonStatus>, Status> {
        let span = tracing::info_span!("get_status");
        self.ctx
            .rpc("GetStatus", span, async {
                let (pools, volumes, snapshots, exports) = self
                    .ctx
                    .run(|e| {
                        Ok((
                            e.pools(),
                            e.volumes().len(),
                            e.snapshots(None)?.len(),
                            e.exported_images().len(),
                        ))
                    })
                    .await?;
                let health = pools
                    .iter()
                    .find(|p| p.health != "ok")
                    .map(|p| format!("pool {}: {}", p.name, p.health))
                    .unwrap_or_else(|| "ok".to_string());
                let info = &self.ctx.info;
                Ok(Response::new(v1::DaemonStatus {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    pid: std::process::id(),
                    uptime_seconds: info.started.elapsed().as_secs(),
                    state_dir: info.state_dir.display().to_string(),
                    api_socket: info.api_socket.display().to_string(),
                    nbd_socket: info
                        .nbd_socket
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    nbd_listen: info
                        .nbd_tcp
                        .as_ref()
                        .map(|t| t.addr.to_string())
                        .unwrap_or_default(),
                    metrics_addr: info.metrics_addr.map(|a| a.to_string()).unwrap_or_default(),
                    pool_count: pools.len() as u64,
                    volume_count: volumes as u64,
                    snapshot_count: snapshots as u64,
                    export_count: exports as u64,
                    ublk_count: self.ctx.ublk.as_ref().map_or(0, |u| u.list().len() as u64),
                    ublk: self
                        .ctx
                        .ublk
                        .as_ref()
                        .map(|u| u.describe())
                        .unwrap_or_else(|| "unavailable: not served by this daemon".into()),
                    health,
                }))
            })
            .await
    }

    async fn fsck(
        &self,
        request: Request<v1::FsckRequest>,
    ) -> Result<Response<v1::FsckReport>, Status> {
        let repair = request.get_ref().repair;
        let span = tracing::info_span!("fsck", repair);
        self.ctx
            .rpc("Fsck", span, async {
                let report = self.ctx.run(move |e| e.fsck(repair)).await?;
                let report = convert::fsck(report, repair);
                if report.clean {
                    tracing::info!(
                        mapped_chunks = report.mapped_chunks,
                        repaired = report.repaired,
                        "fsck: metadata is consistent"
                    );
                } else {
                    tracing::warn!(
                        double_owned = report.double_owned,
                        leaked = report.leaked,
                        bad_pointers = report.bad_pointers,
                        bad_records = report.bad_records,
                        "fsck: metadata is inconsistent"
                    );
                }
                Ok(Response::new(report))
            })
            .await
    }

    async fn gc(&self, _request: Request<v1::GcRequest>) -> Result<Response<v1::GcReport>, Status> {
        let span = tracing::info_span!("gc");
        self.ctx
            .rpc("Gc", span, async {
                let stats = self.ctx.run(|e| e.gc()).await?;
                self.ctx.metrics.record_gc(&stats);
                tracing::info!(
                    chunks_freed = stats.chunks_freed,
                    backlog = stats.backlog,
                    "gc pass done"
                );
                Ok(Response::new(convert::gc(stats)))
            })
            .await
    }
}
