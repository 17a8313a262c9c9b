//! `blockd.v1.ExportService`: export bookkeeping and NBD URIs.
//!
//! Whether an image is exported is engine state (persisted, so exports survive a
//! restart); the NBD server asks the engine before it opens an image. This service only
//! flips that state and tells the client where to connect.

use blockd_proto::model::{nbd_uri, ImageRef};
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

    fn uri(&self, image: &str) -> String {
        nbd_uri(image, &self.ctx.info.nbd_socket)
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
                if changed {
                    tracing::info!(%uri, read_only = image.read_only(), "exported image");
                }
                Ok(Response::new(v1::ExportResponse {
                    read_only: image.read_only(),
                    image: name,
                    uri,
                    changed,
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
                        read_only: image.contains('@'),
                        image,
                    })
                    .collect();
                Ok(Response::new(v1::ListExportsResponse { exports }))
            })
            .await
    }
}
