//! `blockd.v1.ExportService`: export bookkeeping and NBD URIs.
//!
//! Whether an image is exported is engine state (persisted, so exports survive a
//! restart); the NBD server asks the engine before it opens an image. This service only
//! flips that state and tells the client where to connect.
//!
//! It also attaches images as ublk devices that blockd serves itself (`crate::ublk`),
//! the other way a volume leaves blockd.

use blockd_proto::model::ImageRef;
use blockd_proto::nbd_uri::NbdUri;
use blockd_proto::v1;
use blockd_proto::v1::export_service_server::ExportService;
use tonic::{Request, Response, Status};

use super::ApiContext;

#[derive(Debug, Clone)]
pub struct ExportApi {
    ctx: ApiContext,
}

impl ExportApi {
    pub fn new(ctx: ApiContext) -> Self {
        ExportApi { ctx }
    }

    /// The unix-socket URI, or the TLS one when there is no unix socket.
    fn uri(&self, image: &str) -> String {
        match &self.ctx.info.nbd_socket {
            Some(socket) => NbdUri::unix(image, socket).to_string(),
            None => self.tls_uri(image),
        }
    }

    /// `nbds://HOST:PORT/IMAGE`, or empty when NBD is not served over TCP.
    fn tls_uri(&self, image: &str) -> String {
        self.ctx
            .info
            .nbd_tcp
            .as_ref()
            .map(|t| NbdUri::tls(image, &t.host, t.addr.port()).to_string())
            .unwrap_or_default()
    }
}

#[tonic::async_trait]
impl ExportService for ExportApi {
    async fn export(
        &self,
        request: Request<v1::ExportRequest>,
    ) -> Result<Response<v1::ExportResponse>, Status> {
        let span = tracing::info_span!("export", image = %request.get_ref().image);
        self.ctx
            .rpc("Export", span, async {
                let image = ImageRef::try_from(request.into_inner())?;
                let name = image.to_string();
                let key = name.clone();
                let changed = self.ctx.run(move |e| e.set_exported(&key, true)).await?;
                let uri = self.uri(&name);
                let tls_uri = self.tls_uri(&name);
                if changed {
                    tracing::info!(%uri, read_only = image.read_only(), "exported image");
                }
                Ok(Response::new(v1::ExportResponse {
                    read_only: image.read_only(),
                    image: name,
                    uri,
                    changed,
                    tls_uri,
                }))
            })
            .await
    }

    async fn unexport(
        &self,
        request: Request<v1::UnexportRequest>,
    ) -> Result<Response<v1::UnexportResponse>, Status> {
        let span = tracing::info_span!(
            "unexport",
            image = %request.get_ref().image,
            force = request.get_ref().force
        );
        self.ctx
            .rpc("Unexport", span, async {
                let force = request.get_ref().force;
                let image = ImageRef::try_from(request.into_inner())?;
                let name = image.to_string();
                self.ctx
                    .refuse_if_connected(&name, force, "unexport", || {
                        format!("blockctl unexport {name} --force")
                    })
                    .await?;
                let key = name.clone();
                let changed = self.ctx.run(move |e| e.set_exported(&key, false)).await?;
                if changed {
                    tracing::info!("unexported image");
                }
                // New connections are refused from now on (the engine says the image is
                // not exported); close the ones already open, letting in-flight requests
                // finish and flushing. Also when nothing changed, in case an earlier
                // unexport was interrupted before it got here.
                self.ctx.close_nbd(&name).await;
                Ok(Response::new(v1::UnexportResponse { changed }))
            })
            .await
    }

    async fn attach_ublk(
        &self,
        request: Request<v1::AttachUblkRequest>,
    ) -> Result<Response<v1::AttachUblkResponse>, Status> {
        let span = tracing::info_span!("attach_ublk", image = %request.get_ref().image);
        self.ctx
            .rpc("AttachUblk", span, async {
                let image = ImageRef::try_from(request.into_inner())?;
                let name = image.to_string();
                let (device, changed) = self.ctx.run_ublk(move |u| u.attach(&name)).await?;
                Ok(Response::new(v1::AttachUblkResponse {
                    device: Some(ublk_device(device)),
                    changed,
                }))
            })
            .await
    }

    async fn detach_ublk(
        &self,
        request: Request<v1::DetachUblkRequest>,
    ) -> Result<Response<v1::DetachUblkResponse>, Status> {
        let span = tracing::info_span!("detach_ublk", image = %request.get_ref().image);
        self.ctx
            .rpc("DetachUblk", span, async {
                let image = ImageRef::try_from(request.into_inner())?;
                let name = image.to_string();
                if self.ctx.ublk.is_none() {
                    return Ok(Response::new(v1::DetachUblkResponse { changed: false }));
                }
                let changed = self.ctx.run_ublk(move |u| u.detach(&name)).await?;
                Ok(Response::new(v1::DetachUblkResponse { changed }))
            })
            .await
    }

    async fn list_ublk(
        &self,
        _request: Request<v1::ListUblkRequest>,
    ) -> Result<Response<v1::ListUblkResponse>, Status> {
        let span = tracing::info_span!("list_ublk");
        self.ctx
            .rpc("ListUblk", span, async {
                let devices = self
                    .ctx
                    .ublk
                    .as_ref()
                    .map(|u| u.list())
                    .unwrap_or_default()
                    .into_iter()
                    .map(ublk_device)
                    .collect();
                Ok(Response::new(v1::ListUblkResponse { devices }))
            })
            .await
    }

    async fn list_exports(
        &self,
        _request: Request<v1::ListExportsRequest>,
    ) -> Result<Response<v1::ListExportsResponse>, Status> {
        let span = tracing::info_span!("list_exports");
        self.ctx
            .rpc("ListExports", span, async {
                let images = self.ctx.run(|e| Ok(e.exported_images())).await?;
                let exports = images
                    .into_iter()
                    .map(|image| v1::ExportInfo {
                        uri: self.uri(&image),
                        tls_uri: self.tls_uri(&image),
                        read_only: image.contains('@'),
                        image,
                    })
                    .collect();
                Ok(Response::new(v1::ListExportsResponse { exports }))
            })
            .await
    }
}

fn ublk_device(d: crate::ublk::UblkDeviceInfo) -> v1::UblkDevice {
    v1::UblkDevice {
        image: d.image,
        device: d.device,
        dev_id: d.dev_id,
        read_only: d.read_only,
        state: d.state,
        data_path: d.data_path,
    }
}
