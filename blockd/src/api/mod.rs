//! The gRPC control plane: tonic services of `blockd.v1` on top of the engine.
//!
//! This module owns the edge between clients and the engine:
//! - every request is validated into a `blockd_proto::model` type first, so bad input is
//!   `INVALID_ARGUMENT` before the engine sees it;
//! - engine calls are blocking, so each runs on tokio's blocking pool ([`ApiContext::run`]),
//!   never on a runtime worker, inside the RPC's tracing span;
//! - engine errors become gRPC statuses in one place ([`error`]), every variant matched;
//! - every RPC runs in a `tracing` span named after it, carrying `volume`/`snapshot`/
//!   `image`/`pool` fields, and is counted in `/metrics` by method and code.
//!
//! It owns no state of its own beyond [`ApiContext`]: the engine is the single source of
//! truth (idempotency, export bookkeeping, naming rules all live there).
//!
//! ```text
//!  blockctl / csi-shim ──unix socket──▶ tonic ──▶ PoolApi | VolumeApi | SnapshotApi
//!                                              │   ExportApi | DaemonApi | GroupSnapshotApi
//!                                              ▼
//!                           validate (model::TryFrom) ─▶ spawn_blocking(engine.op)
//! ```

mod convert;
mod daemon;
pub mod error;
mod exports;
mod groups;
mod image_data;
mod pools;
mod snapshots;
mod volumes;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use blockd_proto::v1::daemon_service_server::DaemonServiceServer;
use blockd_proto::v1::export_service_server::ExportServiceServer;
use blockd_proto::v1::group_snapshot_service_server::GroupSnapshotServiceServer;
use blockd_proto::v1::image_data_service_server::ImageDataServiceServer;
use blockd_proto::v1::pool_service_server::PoolServiceServer;
use blockd_proto::v1::snapshot_service_server::SnapshotServiceServer;
use blockd_proto::v1::volume_service_server::VolumeServiceServer;
use tonic::service::Routes;
use tonic::Status;
use tracing::Instrument;

use crate::engine::{self, Engine};
use crate::metrics::Metrics;

pub use daemon::DaemonApi;
pub use exports::ExportApi;
pub use groups::GroupSnapshotApi;
pub use image_data::ImageDataApi;
pub use pools::PoolApi;
pub use snapshots::SnapshotApi;
pub use volumes::VolumeApi;

/// The NBD-over-TLS listener, as URIs and `GetStatus` describe it.
#[derive(Debug, Clone)]
pub struct NbdTcp {
    pub addr: std::net::SocketAddr,
    /// What `nbds://` URIs name: the listen IP, or this machine's host name when the
    /// listener is on every address (0.0.0.0 or [::]), which no remote client can dial.
    pub host: String,
}

impl NbdTcp {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        let host = if addr.ip().is_unspecified() {
            hostname().unwrap_or_else(|| "localhost".to_string())
        } else {
            addr.ip().to_string()
        };
        NbdTcp { addr, host }
    }
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// How long a delete or unexport waits for connections that are closing (their client
/// has hung up) before it counts them as connected clients.
pub const CLOSING_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Facts about the running daemon that `GetStatus` reports.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    /// Absolute: it goes into NBD URIs. None when NBD is served over TCP only.
    pub nbd_socket: Option<PathBuf>,
    /// The bound TCP address of the TLS listener, and the host name URIs give for it.
    pub nbd_tcp: Option<NbdTcp>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub started: Instant,
}

/// What every service shares. Cheap to clone.
#[derive(Clone)]
pub struct ApiContext {
    pub engine: Engine,
    pub metrics: Metrics,
    pub info: Arc<DaemonInfo>,
    /// The NBD server, told to close the connections of an image that stops being
    /// exported. None when the daemon serves no NBD (tests of the API alone).
    pub nbd: Option<crate::nbd::Server>,
    /// The ublk devices blockd serves. None when the daemon serves none (tests of the
    /// API alone); AttachUblk is then FAILED_PRECONDITION.
    pub ublk: Option<crate::ublk::UblkFrontend>,
}

impl std::fmt::Debug for ApiContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiContext")
            .field("engine", &self.engine)
            .field("info", &self.info)
            .field("nbd", &self.nbd.is_some())
            .finish()
    }
}

impl ApiContext {
    pub fn new(engine: Engine, metrics: Metrics, info: DaemonInfo) -> Self {
        ApiContext {
            engine,
            metrics,
            info: Arc::new(info),
            nbd: None,
            ublk: None,
        }
    }

    /// Lets the API attach images as ublk devices.
    pub fn with_ublk(mut self, ublk: crate::ublk::UblkFrontend) -> Self {
        self.ublk = Some(ublk);
        self
    }

    /// The ublk device `image` is attached as, if any.
    pub(crate) fn ublk_device(&self, image: &str) -> Option<String> {
        self.ublk.as_ref().and_then(|u| u.device_of(image))
    }

    /// Refuses `action` on `image` with FAILED_PRECONDITION while it is attached as a
    /// ublk device, unless `force` (then the device is detached first, which still
    /// refuses while it is mounted).
    pub(crate) async fn refuse_if_ublk(
        &self,
        image: &str,
        force: bool,
        action: &str,
    ) -> Result<(), Status> {
        let Some(device) = self.ublk_device(image) else {
            return Ok(());
        };
        if !force {
            return Err(Status::failed_precondition(format!(
                "Cannot {action} {image:?}: it is attached as ublk device {device}; \
                 detach it first (`blockctl detach {image}`; with csi-shim, unstage the \
                 volume)"
            )));
        }
        let name = image.to_string();
        tracing::warn!(image, device = %device, "forced: detaching the ublk device");
        self.run_ublk(move |u| u.detach(&name).map(|_| ())).await?;
        Ok(())
    }

    /// Runs a blocking ublk frontend call on the blocking pool, inside the current span.
    pub(crate) async fn run_ublk<T, F>(&self, f: F) -> Result<T, Status>
    where
        F: FnOnce(&crate::ublk::UblkFrontend) -> Result<T, crate::ublk::UblkError> + Send + 'static,
        T: Send + 'static,
    {
        let Some(ublk) = self.ublk.clone() else {
            return Err(Status::failed_precondition(
                "This blockd serves no ublk devices",
            ));
        };
        let span = tracing::Span::current();
        match tokio::task::spawn_blocking(move || span.in_scope(|| f(&ublk))).await {
            Ok(result) => result.map_err(Status::from),
            Err(join) => Err(error::join_error(join)),
        }
    }

    /// Lets unexport close the image's open NBD connections.
    pub fn with_nbd(mut self, server: crate::nbd::Server) -> Self {
        self.nbd = Some(server);
        self
    }

    /// Closes the open NBD connections to `image` (after an unexport or a delete), letting
    /// their in-flight requests finish. New connections are already refused: the engine
    /// no longer lists the image as exported.
    pub(crate) async fn close_nbd(&self, image: &str) {
        if let Some(nbd) = &self.nbd {
            // The NBD server logs how many it closed.
            nbd.close_export(image).await;
        }
    }

    /// NBD clients connected to `image` now.
    pub(crate) fn nbd_clients(&self, image: &str) -> usize {
        self.nbd
            .as_ref()
            .map_or(0, |nbd| nbd.connection_count(Some(image)))
    }

    /// Refuses `action` on `image` with FAILED_PRECONDITION while NBD clients are
    /// connected to it, unless `force`; the message gives the count and both ways on
    /// (`forced` is the command that forces it).
    ///
    /// A client that has just hung up (`qemu-io -c ...` returned, a detached device)
    /// can still hold its slot for a moment while the server finishes its last request:
    /// connections are given [`CLOSING_GRACE`] to go before they count. A client that is
    /// really there (a mounted file system) stays, and is counted.
    ///
    /// This is a check, not a lock: a client connecting right after it is closed by the
    /// action itself (delete and unexport close every connection once the image is no
    /// longer exported), exactly as with force. What the check prevents is the common
    /// mistake of pulling a volume from under a mounted file system.
    pub(crate) async fn refuse_if_connected(
        &self,
        image: &str,
        force: bool,
        action: &str,
        forced: impl FnOnce() -> String,
    ) -> Result<(), Status> {
        let clients = self.nbd_clients(image);
        if clients == 0 {
            return Ok(());
        }
        if force {
            tracing::warn!(image, clients, "forced: closing connected NBD clients");
            return Ok(());
        }
        let clients = self.nbd_clients_after_grace(image).await;
        if clients == 0 {
            return Ok(());
        }
        let (noun, them) = if clients == 1 {
            ("client is", "it")
        } else {
            ("clients are", "them")
        };
        Err(Status::failed_precondition(format!(
            "Cannot {action} {image:?}: {clients} NBD {noun} connected to it; \
             disconnect {them} first (unmount and detach the device; with csi-shim, \
             unstage the volume), or close the connections with `{}` (a file system \
             mounted on {them} then fails)",
            forced()
        )))
    }

    /// The NBD clients connected to `image` once those that have just hung up are gone:
    /// each connection is given [`CLOSING_GRACE`] to close.
    async fn nbd_clients_after_grace(&self, image: &str) -> usize {
        let mut clients = self.nbd_clients(image);
        let deadline = Instant::now() + CLOSING_GRACE;
        while clients > 0 && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            clients = self.nbd_clients(image);
        }
        clients
    }

    /// Refuses to write `volume`'s data behind its users' backs (WriteImage) while it is
    /// attached as a ublk device or NBD clients are connected to it, unless `force`: a
    /// file system mounted on it caches what it read and would be corrupted by data
    /// changing under it.
    pub(crate) async fn refuse_if_in_use(&self, volume: &str, force: bool) -> Result<(), Status> {
        if force {
            return Ok(());
        }
        // The engine's record, not the frontend's live devices: an attachment still being
        // recovered after a restart has a kernel device (and perhaps a mount) already.
        let name = volume.to_string();
        let ublk = self
            .run(move |e| {
                Ok(e.ublk_devices()
                    .into_iter()
                    .find(|(image, _)| *image == name)
                    .map(|(_, id)| id))
            })
            .await?;
        if let Some(id) = ublk {
            return Err(Status::failed_precondition(format!(
                "volume {volume:?} is attached as /dev/ublkb{id}: writing its data under it \
                 would change what its users (a mounted file system) already read; detach \
                 it first (`blockctl detach {volume}`), or force the write (a file system \
                 mounted on it may then be corrupted)"
            )));
        }
        let clients = self.nbd_clients_after_grace(volume).await;
        if clients > 0 {
            return Err(Status::failed_precondition(format!(
                "volume {volume:?} has {clients} NBD client(s) connected: writing its data \
                 under them would change what they already read (a mounted file system); \
                 disconnect them first (unmount and detach the device; with csi-shim, \
                 unstage the volume), or force the write (a file system mounted on it may \
                 then be corrupted)"
            )));
        }
        Ok(())
    }

    /// Runs a blocking engine call on the blocking pool, inside the current span.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, Status>
    where
        F: FnOnce(&Engine) -> engine::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let engine = self.engine.clone();
        let span = tracing::Span::current();
        match tokio::task::spawn_blocking(move || span.in_scope(|| f(&engine))).await {
            Ok(result) => result.map_err(Status::from),
            Err(join) => Err(error::join_error(join)),
        }
    }

    /// Runs one RPC: in `span`, timed, counted by method and code, its failure logged
    /// once here (where the error is handled by turning it into a status).
    pub(crate) async fn rpc<T>(
        &self,
        method: &'static str,
        span: tracing::Span,
        body: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        async {
            let start = Instant::now();
            let result = body.await;
            let code = match &result {
                Ok(_) => tonic::Code::Ok,
                Err(status) => status.code(),
            };
            self.metrics.record_rpc(method, code, start.elapsed());
            if let Err(status) = &result {
                if error::is_server_fault(status.code()) {
                    tracing::error!(code = ?status.code(), error = status.message(), "request failed");
                } else {
                    tracing::info!(code = ?status.code(), error = status.message(), "request refused");
                }
            }
            result
        }
        .instrument(span)
        .await
    }
}

/// Every `blockd.v1` service, ready to add to a tonic server.
pub fn routes(ctx: &ApiContext) -> Routes {
    Routes::new(PoolServiceServer::new(PoolApi::new(ctx.clone())))
        .add_service(VolumeServiceServer::new(VolumeApi::new(ctx.clone())))
        .add_service(SnapshotServiceServer::new(SnapshotApi::new(ctx.clone())))
        .add_service(ExportServiceServer::new(ExportApi::new(ctx.clone())))
        .add_service(DaemonServiceServer::new(DaemonApi::new(ctx.clone())))
        .add_service(GroupSnapshotServiceServer::new(GroupSnapshotApi::new(
            ctx.clone(),
        )))
        .add_service(ImageDataServiceServer::new(ImageDataApi::new(ctx.clone())))
}

/// The fully qualified names of the services [`routes`] serves (for health and logs).
pub const SERVICE_NAMES: &[&str] = &[
    "blockd.v1.PoolService",
    "blockd.v1.VolumeService",
    "blockd.v1.SnapshotService",
    "blockd.v1.ExportService",
    "blockd.v1.DaemonService",
    "blockd.v1.GroupSnapshotService",
    "blockd.v1.ImageDataService",
];
