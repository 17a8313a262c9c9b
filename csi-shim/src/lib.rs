//! csi-shim: the Container Storage Interface driver (`blockd.csi.io`) for blockd.
//!
//! It talks to blockd only through blockd's gRPC API (never linking the engine) and serves
//! the CSI services on a unix socket:
//! - [`identity`]: plugin info, capabilities, Probe (ready only when blockd answers);
//! - [`controller`]: volumes, snapshots, clones, expansion, capacity, listings, QoS
//!   changes (ControllerModifyVolume), and the GroupController (crash-consistent
//!   VolumeGroupSnapshots, [`controller::groups`]);
//! - [`snapshot_metadata`]: changed-block tracking (allocated and changed ranges of
//!   snapshots) for backup applications, through the external-snapshot-metadata sidecar;
//! - [`node`]: stage (export + attach + mkfs + mount), publish (bind mounts), stats,
//!   expansion, and the record of staged volumes that survives restarts.
//!
//! The helper binaries' logic lives here too: [`proxy`] (`csi-nbd-proxy`) and [`fuse`]
//! (`csi-fuse-nbd`). Every binary's `main` is in `src/bin/`.
//!
//! Shared pieces: [`ids`] (how CSI ids name blockd objects and the node holding them),
//! [`locks`] (one operation per volume at a time, `ABORTED` for the next),
//! [`blockd`] (the lazy, self-reconnecting API channel), [`config`] (flags),
//! [`io_flusher`] (`PR_SET_IO_FLUSHER` for the helpers in the write-back path), [`socket`]
//! (socket options on raw descriptors).

pub mod blockd;
pub mod config;
pub mod controller;
pub mod fuse;
pub mod identity;
pub mod ids;
pub mod io_flusher;
pub mod locks;
pub mod node;
pub mod params;
pub mod proxy;
pub mod snapshot_metadata;
pub mod socket;
#[cfg(test)]
mod testing;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use blockd_proto::csi::controller_server::ControllerServer;
use blockd_proto::csi::group_controller_server::GroupControllerServer;
use blockd_proto::csi::identity_server::IdentityServer;
use blockd_proto::csi::node_server::NodeServer;
use blockd_proto::csi::snapshot_metadata_server::SnapshotMetadataServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::blockd::Blockd;
use crate::config::Args;
use crate::locks::OpLocks;

/// What every service shares: the configuration, the blockd handle and the op locks.
#[derive(Debug)]
pub struct Driver {
    pub args: Args,
    pub blockd: Blockd,
    pub locks: OpLocks,
}

impl Driver {
    pub fn new(args: Args) -> Arc<Self> {
        let blockd = Blockd::lazy(&args.blockd_api);
        Arc::new(Driver {
            args,
            blockd,
            locks: OpLocks::default(),
        })
    }
}

/// Serves until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let socket = args.endpoint_path().map_err(anyhow::Error::msg)?;
    if args.node_id.trim().is_empty() {
        anyhow::bail!("--node-id must not be empty");
    }
    let mode = args.mode;
    let driver = Driver::new(args);

    let node = if mode.node() {
        Some(
            node::NodeService::start(Arc::clone(&driver))
                .await
                .context("starting the node service")?,
        )
    } else {
        None
    };

    let listener = bind(&socket)?;
    tracing::info!(
        endpoint = %socket.display(),
        node_id = %driver.args.node_id,
        mode = ?mode,
        blockd_api = %driver.args.blockd_api.display(),
        "csi-shim serving"
    );

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(blockd_proto::CSI_FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity::IdentityService::new(
            Arc::clone(&driver),
        )))
        .add_service(reflection)
        .add_optional_service(mode.controller().then(|| {
            ControllerServer::new(controller::ControllerService::new(Arc::clone(&driver)))
        }))
        .add_optional_service(mode.controller().then(|| {
            GroupControllerServer::new(controller::GroupControllerService::new(Arc::clone(&driver)))
        }))
        .add_optional_service(node.map(NodeServer::new))
        .add_optional_service(mode.controller().then(|| {
            SnapshotMetadataServer::new(snapshot_metadata::SnapshotMetadataService::new(
                Arc::clone(&driver),
            ))
        }));
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await
        .context("serving the CSI endpoint")?;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("csi-shim stopped");
    Ok(())
}

/// Binds the endpoint (mode 0600), replacing a stale socket left by a killed predecessor;
/// a live socket or any other file at the path is refused.
fn bind(socket: &std::path::Path) -> anyhow::Result<UnixListener> {
    use blockd_proto::unix_socket;
    let (listener, previous) = unix_socket::bind_tokio(socket, unix_socket::PRIVATE_SOCKET_MODE)
        .context("binding the CSI endpoint (is another csi-shim running?)")?;
    if previous == unix_socket::Previous::StaleSocket {
        tracing::info!(endpoint = %socket.display(), "replaced a stale socket");
    }
    Ok(listener)
}

/// Resolves on SIGTERM or SIGINT (the binaries of this crate stop on either).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown signal received");
}

/// The multi-threaded tokio runtime a binary of this crate runs on, with `workers` worker
/// threads (`None`: one per core). On failure it says why on stderr and gives the exit code
/// for `main` to return.
pub fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    builder.enable_all().build().map_err(|err| {
        eprintln!("error: cannot start the async runtime: {err}");
        ExitCode::FAILURE
    })
}

/// Logs to stderr as text or JSON, filtered by the environment variable `env_var` (then
/// `RUST_LOG`, default `info`). Shared by the binaries of this crate.
pub fn init_logging(format: config::LogFormat, env_var: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env(env_var)
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        config::LogFormat::Text => builder.with_target(false).init(),
        config::LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}
