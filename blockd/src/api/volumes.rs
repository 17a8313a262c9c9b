//! `blockd.v1.VolumeService`: create (blank or clone), get, list, delete, resize, QoS,
//! and flatten with streamed progress.

use std::time::{Duration, Instant};

use blockd_proto::model::{
    CreateVolume, PageRequest, ResizeVolume, SetVolumeQos, SetVolumeQosPolicy, VolumeName,
};
use blockd_proto::v1;
use blockd_proto::v1::volume_service_server::VolumeService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{self, Exported};
use super::ApiContext;

/// How often flatten reports progress at most (the last report is always sent).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct VolumeApi {
    ctx: ApiContext,
}

impl VolumeApi {
    pub fn new(ctx: ApiContext) -> Self {
        VolumeApi { ctx }
    }
}

fn exported(engine: &crate::engine::Engine) -> Exported {
    Exported::of(engine)
}

#[tonic::async_trait]
impl VolumeService for VolumeApi {
    async fn create_volume(
        &self,
        request: Request<v1::CreateVolumeRequest>,
    ) -> Result<Response<v1::CreateVolumeResponse>, Status> {
        let span = tracing::info_span!("create_volume", volume = %request.get_ref().name);
        self.ctx
            .rpc("CreateVolume", span, async {
                let req = CreateVolume::try_from(request.into_inner())?;
                let policy = convert::create_policy(&req);
                let spec = convert::volume_spec(req);
                let (info, created, exported) = self
                    .ctx
                    .run(move |e| {
                        let (info, created) = e.create_volume_with_policy(&spec, policy)?;
                        Ok((info, created, exported(e)))
                    })
                    .await?;
                // The engine logs the creation (once, with the ids).
                Ok(Response::new(v1::CreateVolumeResponse {
                    volume: Some(convert::volume(info, &exported)),
                    created,
                }))
            })
            .await
    }

    async fn get_volume(
        &self,
        request: Request<v1::GetVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let span = tracing::info_span!("get_volume", volume = %request.get_ref().name);
        self.ctx
            .rpc("GetVolume", span, async {
                let name = VolumeName::try_from(request.into_inner())?;
                let (info, exported) = self
                    .ctx
                    .run(move |e| Ok((e.volume(name.as_str())?, exported(e))))
                    .await?;
                Ok(Response::new(convert::volume(info, &exported)))
            })
            .await
    }

    async fn list_volumes(
        &self,
        request: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        let span = tracing::info_span!("list_volumes");
        self.ctx
            .rpc("ListVolumes", span, async {
                let req = request.into_inner();
                let page = PageRequest::new(req.page_size, &req.page_token)?;
                let (volumes, exported) = self.ctx.run(|e| Ok((e.volumes(), exported(e)))).await?;
                let (volumes, next_page_token) = page.apply(volumes, |v| v.name.as_str());
                Ok(Response::new(v1::ListVolumesResponse {
                    volumes: volumes
                        .into_iter()
                        .map(|v| convert::volume(v, &exported))
                        .collect(),
                    next_page_token,
                }))
            })
            .await
    }

    async fn delete_volume(
        &self,
        request: Request<v1::DeleteVolumeRequest>,
    ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
        let span = tracing::info_span!(
            "delete_volume",
            volume = %request.get_ref().name,
            force = request.get_ref().force
        );
        self.ctx
            .rpc("DeleteVolume", span, async {
                let force = request.get_ref().force;
                let name = VolumeName::try_from(request.into_inner())?;
                let probe = name.clone();
                // NOT_FOUND first: a missing volume has no clients to count.
                self.ctx.run(move |e| e.volume(probe.as_str())).await?;
                self.ctx
                    .refuse_if_connected(name.as_str(), force, "delete volume", || {
                        format!("blockctl volume delete {} --force", name.as_str())
                    })
                    .await?;
                self.ctx
                    .refuse_if_ublk(name.as_str(), force, "delete volume")
                    .await?;
                let deleted = name.clone();
                self.ctx
                    .run(move |e| e.delete_volume(deleted.as_str()))
                    .await?;
                // The engine logged the delete; connections that got in since the check
                // (or all of them, with force) are closed now.
                self.ctx.close_nbd(name.as_str()).await;
                self.ctx.metrics.forget_image(name.as_str());
                Ok(Response::new(v1::DeleteVolumeResponse {}))
            })
            .await
    }

    async fn resize_volume(
        &self,
        request: Request<v1::ResizeVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let span = tracing::info_span!(
            "resize_volume",
            volume = %request.get_ref().name,
            size_bytes = request.get_ref().size_bytes,
            force = request.get_ref().force
        );
        self.ctx
            .rpc("ResizeVolume", span, async {
                let req = ResizeVolume::try_from(request.into_inner())?;
                let (info, exported) = self
                    .ctx
                    .run(move |e| {
                        let info = e.resize_volume(req.name.as_str(), req.size_bytes, req.force)?;
                        Ok((info, exported(e)))
                    })
                    .await?;
                if let Some(ublk) = self.ctx.ublk.clone() {
                    // An attached device follows the new size where the kernel can.
                    let (name, size) = (info.name.clone(), info.size_bytes);
                    let _ = tokio::task::spawn_blocking(move || ublk.resized(&name, size)).await;
                }
                Ok(Response::new(convert::volume(info, &exported)))
            })
            .await
    }

    async fn set_volume_qos(
        &self,
        request: Request<v1::SetVolumeQosRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let span = tracing::info_span!("set_volume_qos", volume = %request.get_ref().name);
        self.ctx
            .rpc("SetVolumeQos", span, async {
                let req = SetVolumeQos::try_from(request.into_inner())?;
                let qos = convert::engine_qos(req.qos);
                let (info, exported) = self
                    .ctx
                    .run(move |e| Ok((e.set_qos(req.name.as_str(), qos)?, exported(e))))
                    .await?;
                tracing::info!(
                    max_iops = qos.max_iops,
                    max_bandwidth_bytes = qos.max_bandwidth_bytes,
                    "set volume qos"
                );
                Ok(Response::new(convert::volume(info, &exported)))
            })
            .await
    }

    async fn set_volume_qos_policy(
        &self,
        request: Request<v1::SetVolumeQosPolicyRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let span = tracing::info_span!("set_volume_qos_policy", volume = %request.get_ref().name);
        self.ctx
            .rpc("SetVolumeQosPolicy", span, async {
                let req = SetVolumeQosPolicy::try_from(request.into_inner())?;
                let policy = convert::engine_qos_policy(req.policy);
                let (info, exported) = self
                    .ctx
                    .run(move |e| Ok((e.set_qos_policy(req.name.as_str(), policy)?, exported(e))))
                    .await?;
                Ok(Response::new(convert::volume(info, &exported)))
            })
            .await
    }

    type FlattenVolumeStream = ReceiverStream<Result<v1::FlattenProgress, Status>>;

    /// Runs the flatten on the blocking pool and streams its progress. The flatten goes
    /// on if the client goes away: it is an engine operation with its own intent record,
    /// and abandoning it half-way would only leave work for the next attempt.
    async fn flatten_volume(
        &self,
        request: Request<v1::FlattenVolumeRequest>,
    ) -> Result<Response<Self::FlattenVolumeStream>, Status> {
        let span = tracing::info_span!("flatten_volume", volume = %request.get_ref().name);
        let ctx = self.ctx.clone();
        self.ctx
            .rpc("FlattenVolume", span, async move {
                let name = VolumeName::try_from(request.into_inner())?;
                // Fail early (NOT_FOUND) rather than in the middle of the stream.
                let probe = name.clone();
                ctx.run(move |e| e.volume(probe.as_str())).await?;

                let (tx, rx) = mpsc::channel(16);
                let engine = ctx.engine.clone();
                let span = tracing::Span::current();
                tokio::task::spawn_blocking(move || {
                    let _entered = span.enter();
                    let started = Instant::now();
                    let mut last_sent = Instant::now() - PROGRESS_INTERVAL;
                    let (mut done, mut total) = (0, 0);
                    let result = engine.flatten_volume(name.as_str(), &mut |d, t| {
                        (done, total) = (d, t);
                        if last_sent.elapsed() >= PROGRESS_INTERVAL {
                            last_sent = Instant::now();
                            // A full channel only means the client reads slowly: skip.
                            let _ = tx.try_send(Ok(v1::FlattenProgress {
                                done: d,
                                total: t,
                                volume: None,
                            }));
                        }
                    });
                    let last = match result {
                        Ok(info) => {
                            tracing::info!(
                                chunks = total,
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "flattened volume"
                            );
                            let exported = exported(&engine);
                            Ok(v1::FlattenProgress {
                                done: total.max(done),
                                total,
                                volume: Some(convert::volume(info, &exported)),
                            })
                        }
                        Err(err) => {
                            let status = Status::from(err);
                            tracing::warn!(code = ?status.code(), error = status.message(), "flatten failed");
                            Err(status)
                        }
                    };
                    let _ = tx.blocking_send(last);
                });
                Ok(Response::new(ReceiverStream::new(rx)))
            })
            .await
    }
}
