//! `blockd`: the block-storage daemon.
//!
//! Owns the process: configuration ([`blockd::config`]), the state-directory lock, logs,
//! the engine's lifetime, the gRPC API on a unix socket (with grpc health and reflection),
//! `/metrics`, the NBD server, and an orderly shutdown.
//!
//! Start-up order (each step only once the previous one worked, so a client that can
//! connect finds a working daemon):
//! 1. create the state directory and take its lock (`flock` on `DIR/lock`: the kernel
//!    drops it when the process dies, so a crash never needs manual cleanup);
//! 2. open the metadata store (`DIR/meta`) and the pools, then the engine, and start its
//!    background work (group commit timer, GC, resumed flattens);
//! 3. bind the API socket (a stale one is replaced, a live one refuses the start; mode
//!    0600), the NBD socket, the NBD TLS listener (`--nbd-listen`; its certificates are
//!    loaded before step 2, so a bad file fails the start at once) and the metrics
//!    listener; serve.
//!
//! Shutdown on SIGTERM/SIGINT: stop accepting, let in-flight RPCs and NBD requests
//! finish (bounded by [`GRACE`]), then `engine.shutdown()` (final commit, background work
//! stopped), remove the sockets, release the lock. A second signal exits at once: the
//! commit protocol makes that as safe as a crash.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use blockd::api::{self, ApiContext, DaemonInfo, NbdTcp};
use blockd::config::{Args, Config, LogFormat};
use blockd::device;
use blockd::engine::{Engine, PoolSpec};
use blockd::meta::rocks::RocksStore;
use blockd::meta::MetaStore;
use blockd::metrics::{self, Metrics};
use blockd::nbd::TlsConfig;
use blockd_proto::unix_socket;
use clap::Parser;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic_health::ServingStatus;

/// How long in-flight requests may take to finish after a shutdown signal.
const GRACE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => return usage_error(err),
    };
    let config = match Config::load(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {}", one_line(&anyhow::Error::new(err)));
            return ExitCode::FAILURE;
        }
    };
    init_logging(config.log_format);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let message = one_line(&err);
            match config_log_format() {
                // A JSON log stays one JSON object per line.
                LogFormat::Json => tracing::error!(error = %message, "blockd failed"),
                LogFormat::Text => eprintln!("error: {message}"),
            }
            ExitCode::FAILURE
        }
    }
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

fn config_log_format() -> LogFormat {
    LOG_FORMAT.get().copied().unwrap_or_default()
}

/// Help and version as clap prints them; a usage error on one line, exit code 2.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
        _ => {
            let rendered = err.render().to_string();
            let text: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", text.join(" "));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, each said once.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}

/// `PR_SET_IO_FLUSHER` from `linux/prctl.h` (the libc crate defines it for Android only).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks the process an I/O flusher (`prctl(PR_SET_IO_FLUSHER)`, Linux 5.6+): blockd
/// completes the writes that memory reclaim issues to `/dev/nbdX` and to loop devices on
/// its exports, so its own allocations must not wait on that reclaim (the flag sets
/// `PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE`). Per thread and inherited by new threads,
/// hence called before any thread starts. It needs `CAP_SYS_RESOURCE`: without it blockd
/// warns and runs on (with that deadlock risk under memory pressure).
///
/// No `mlockall`: it would pin the RocksDB block cache, every I/O buffer and every mapping
/// the process makes, and turn allocation failures into crashes, only to keep our own
/// code resident; that code pages in from the root file system, never from a device
/// blockd serves. (The same helper, for csi-shim's binaries, is `csi_shim::io_flusher`;
/// the crates do not share code.)
fn become_io_flusher() {
    // SAFETY: prctl(2) with integer arguments only; no memory is passed or retained.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        tracing::info!("running as an I/O flusher (PR_SET_IO_FLUSHER)");
        return;
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        tracing::warn!(
            "cannot set PR_SET_IO_FLUSHER without CAP_SYS_RESOURCE; continuing: under memory \
             pressure, reclaim may wait on write-back that blockd itself must serve"
        );
    } else {
        tracing::warn!(error = %err, "cannot set PR_SET_IO_FLUSHER (Linux 5.6 or later has it); continuing");
    }
}

/// Logs go to stderr; `RUST_LOG` (or `BLOCKD_LOG`) filters them, `info` by default.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let _ = LOG_FORMAT.set(format);
    let filter = EnvFilter::try_from_env("BLOCKD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn run(mut config: Config) -> anyhow::Result<()> {
    config
        .absolutize()
        .context("cannot resolve the configured paths")?;
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create the state directory {}",
            config.state_dir.display()
        )
    })?;
    let lock = StateLock::acquire(&config.lock_path(), &config.state_dir)?;
    // Before any thread exists (runtimes, RocksDB): threads inherit the flag. After the
    // lock, so that a refused start prints its one error line and nothing else.
    become_io_flusher();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        state_dir = %config.state_dir.display(),
        "starting blockd"
    );

    let tls = load_tls(&config)?;
    let meta_dir = config.meta_dir();
    let meta: Arc<dyn MetaStore> = Arc::new(
        RocksStore::open(&meta_dir)
            .with_context(|| format!("cannot open the metadata store {}", meta_dir.display()))?,
    );
    let mut specs = Vec::new();
    for pool in config.pools() {
        let device =
            device::open_path(&pool.path, Some(pool.size_bytes()), config.io_engine.into())
                .with_context(|| {
                    format!(
                        "cannot open pool {:?} at {}",
                        pool.name,
                        pool.path.display()
                    )
                })?;
        specs.push(PoolSpec {
            name: pool.name.clone(),
            device,
            chunk_size: pool.chunk_size_bytes(),
            path: pool.path.display().to_string(),
        });
    }
    let engine = Engine::open(meta.clone(), specs).context("cannot open the storage engine")?;
    engine.set_max_overprovision(config.max_overprovision.0);
    tracing::info!(max_overprovision = %config.max_overprovision, "pool over-provisioning limit");
    for pool in engine.pools() {
        tracing::info!(
            pool = %pool.name,
            path = %pool.path,
            io_engine = %pool.io_engine,
            capacity_bytes = pool.capacity_bytes,
            chunk_size_bytes = pool.chunk_size_bytes,
            health = %pool.health,
            "pool ready"
        );
    }
    engine.start_background(config.commit_interval());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockd")
        .build()
        .context("cannot start the async runtime")?;
    let metrics = Metrics::new();
    let ublk = blockd::ublk::UblkFrontend::new(
        engine.clone(),
        metrics.clone(),
        runtime.handle().clone(),
        config.ublk_zero_copy == blockd::config::UblkZeroCopy::Auto,
    );
    let served = runtime.block_on(serve(
        &config,
        engine.clone(),
        meta,
        tls,
        metrics,
        ublk.clone(),
    ));
    // ublk devices stay with the kernel: nothing in flight is answered from now on, so
    // it is reissued to the next blockd, which recovers the devices (see `blockd::ublk`).
    ublk.freeze();
    // Blocking engine calls still running (a long flatten) get a moment to finish; the
    // engine's shutdown below is safe with them in flight either way.
    runtime.shutdown_timeout(Duration::from_secs(5));

    let stopped = engine.shutdown().context("engine shutdown failed");
    drop(engine);
    drop(lock);
    served?;
    stopped?;
    tracing::info!("blockd stopped");
    Ok(())
}

fn info_listen(ctx: &ApiContext) -> String {
    ctx.info
        .nbd_tcp
        .as_ref()
        .map(|t| t.addr.to_string())
        .unwrap_or_default()
}

/// The TLS identity of the NBD TCP listener, when one is configured (the configuration
/// guarantees all three files are then given).
fn load_tls(config: &Config) -> anyhow::Result<Option<TlsConfig>> {
    let (Some(_), Some(cert), Some(key), Some(ca)) = (
        config.nbd_listen,
        &config.tls_cert,
        &config.tls_key,
        &config.tls_client_ca,
    ) else {
        return Ok(None);
    };
    let tls = TlsConfig::from_pem_files(cert, key, Some(ca)).with_context(|| {
        format!(
            "cannot load the NBD TLS files (--tls-cert {}, --tls-key {}, --tls-client-ca {})",
            cert.display(),
            key.display(),
            ca.display()
        )
    })?;
    Ok(Some(tls))
}

/// Serves the API, NBD and metrics until a shutdown signal, then drains them.
async fn serve(
    config: &Config,
    engine: Engine,
    meta: Arc<dyn MetaStore>,
    tls: Option<TlsConfig>,
    metrics: Metrics,
    ublk: blockd::ublk::UblkFrontend,
) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown.on_signals()?;

    metrics.attach(engine.clone(), meta);

    let api_socket = config.api_socket();
    let nbd_socket = config.nbd_socket();
    let nbd_tcp = match (config.nbd_listen, tls) {
        (Some(addr), Some(tls)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for NBD over TLS on {addr}"))?;
            let bound = listener
                .local_addr()
                .context("cannot read the NBD TCP address")?;
            Some((listener, tls, NbdTcp::new(bound)))
        }
        _ => None,
    };
    let info = DaemonInfo {
        state_dir: config.state_dir.clone(),
        api_socket: api_socket.clone(),
        nbd_socket: nbd_socket.clone(),
        nbd_tcp: nbd_tcp.as_ref().map(|(_, _, t)| t.clone()),
        metrics_addr: config.metrics_addr,
        started: Instant::now(),
    };
    let mut ctx = ApiContext::new(engine.clone(), metrics.clone(), info).with_ublk(ublk.clone());
    // Devices a previous blockd served resume as soon as each is taken over.
    ublk.recover_all();
    let mut tasks = tokio::task::JoinSet::new();

    // The NBD server: exported images only (the registry asks the engine), unexport
    // closes open connections through `ctx`.
    {
        let registry = Arc::new(blockd::exports::EngineExports::new(
            engine.clone(),
            metrics.clone(),
        ));
        let nbd = blockd::nbd::Server::with_config(
            registry,
            blockd::nbd::ServerConfig {
                busy_poll: config.nbd_busy_poll(),
                ..Default::default()
            },
        );
        ctx = ctx.with_nbd(nbd.clone());
        if let Some(path) = nbd_socket.clone() {
            let stop = shutdown.wait();
            let nbd = nbd.clone();
            tracing::info!(nbd_socket = %path.display(), "serving NBD");
            tasks.spawn(async move {
                nbd.serve_unix(&path, stop)
                    .await
                    .map_err(|e| anyhow!(e).context("NBD server failed"))
            });
        }
        if let Some((listener, tls, tcp)) = nbd_tcp {
            let stop = shutdown.wait();
            tracing::info!(addr = %tcp.addr, uri_host = %tcp.host, "serving NBD over TCP with mutual TLS");
            tasks.spawn(async move {
                nbd.serve_tls(listener, tls, stop)
                    .await
                    .map_err(|e| anyhow!(e).context("NBD TLS server failed"))
            });
        }
    }

    if let Some(addr) = config.metrics_addr {
        let listener = metrics::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!(%addr, "serving metrics at /metrics");
        let stop = shutdown.wait();
        let metrics = metrics.clone();
        tasks.spawn(async move {
            metrics::serve(listener, metrics, stop)
                .await
                .context("metrics server failed")
        });
    }

    let listener = bind_api_socket(&api_socket)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    for name in api::SERVICE_NAMES {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(blockd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the gRPC reflection service")?;
    let routes = api::routes(&ctx)
        .add_service(health_service)
        .add_service(reflection);
    let stop = {
        let wait = shutdown.wait();
        let health = health.clone();
        async move {
            wait.await;
            // Probes see the daemon going away before connections are refused.
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
        }
    };
    let grpc = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop);
    let mut grpc = tokio::spawn(grpc);
    tracing::info!(
        api_socket = %api_socket.display(),
        nbd_socket = %nbd_socket.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
        nbd_listen = %info_listen(&ctx),
        "blockd ready"
    );

    // Run until a signal, or until a server fails on its own (then shut down too).
    let mut failure: Option<anyhow::Error> = None;
    let mut grpc_done = false;
    tokio::select! {
        _ = shutdown.wait() => {}
        res = &mut grpc => {
            grpc_done = true;
            failure = match res {
                Ok(Ok(())) if shutdown.triggered() => None,
                Ok(Ok(())) => Some(anyhow!("the gRPC server stopped unexpectedly")),
                Ok(Err(err)) => Some(anyhow!(err).context("gRPC server failed")),
                Err(join) => Some(anyhow!(join).context("gRPC server task failed")),
            };
        }
        Some(res) = tasks.join_next() => {
            failure = match res {
                // Servers stop on their own when the shutdown they watch fires first.
                Ok(Ok(())) if shutdown.triggered() => None,
                Ok(Ok(())) => Some(anyhow!("a server stopped unexpectedly")),
                Ok(Err(err)) => Some(err),
                Err(join) => Some(anyhow!(join).context("server task failed")),
            };
        }
    }
    if let Some(err) = &failure {
        tracing::error!(error = %one_line(err), "shutting down after a failure");
    }
    shutdown.trigger();

    let drain = async {
        if !grpc_done {
            match (&mut grpc).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(error = %err, "gRPC server stopped with an error"),
                Err(join) if join.is_cancelled() => {}
                Err(join) => tracing::warn!(error = %join, "gRPC server task failed"),
            }
        }
        while let Some(res) = tasks.join_next().await {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %one_line(&err), "server stopped with an error")
                }
                Err(join) => tracing::warn!(error = %join, "server task failed"),
            }
        }
    };
    if tokio::time::timeout(GRACE, drain).await.is_err() {
        tracing::warn!(
            grace_seconds = GRACE.as_secs(),
            "in-flight requests did not finish in time; stopping anyway"
        );
        grpc.abort();
        tasks.abort_all();
    }
    remove_socket(&api_socket);
    match failure {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// A shutdown flag that many tasks wait on.
#[derive(Clone)]
struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Shutdown {
    fn new() -> Self {
        Shutdown {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the shutdown has been triggered (servers then stop on purpose).
    fn triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the shutdown is triggered.
    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// SIGTERM or SIGINT trigger the shutdown; a second one exits at once.
    fn on_signals(&self) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let this = self.clone();
        tokio::spawn(async move {
            let mut received = 0;
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                received += 1;
                if received == 1 {
                    tracing::info!(signal = name, "shutting down: finishing in-flight work");
                    this.trigger();
                } else {
                    tracing::warn!(signal = name, "second signal: exiting now");
                    std::process::exit(130);
                }
            }
        });
        Ok(())
    }
}

/// Binds the API socket (mode 0600): a stale socket file (nobody answering) is replaced,
/// a live one means another process serves there, anything else is refused.
fn bind_api_socket(path: &Path) -> anyhow::Result<UnixListener> {
    let (listener, previous) = unix_socket::bind_tokio(path, unix_socket::PRIVATE_SOCKET_MODE)
        .context("cannot listen on the API socket")?;
    if previous == unix_socket::Previous::StaleSocket {
        tracing::info!(path = %path.display(), "replaced a stale socket");
    }
    Ok(listener)
}

fn remove_socket(path: &Path) {
    if let Err(err) = std::fs::remove_file(path) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %err, "cannot remove socket");
        }
    }
}

/// The exclusive lock on a state directory: `flock(LOCK_EX)` on `DIR/lock`, held for the
/// life of the process and released by the kernel if it dies. The file holds the
/// holder's pid, for the message a second daemon prints (never trusted for locking).
struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    fn acquire(path: &Path, state_dir: &Path) -> anyhow::Result<StateLock> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                };
                bail!(
                    "state directory {} is in use by another blockd{who}",
                    state_dir.display()
                );
            }
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_data()?;
        Ok(StateLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Leave the file (removing it would race with a daemon that just opened it);
        // clear the pid so the next message does not name a dead process.
        if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&self.path) {
            let _ = file.set_len(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = StateLock::acquire(&path, dir.path()).unwrap();
        let err = StateLock::acquire(&path, dir.path()).err().unwrap();
        let text = one_line(&err);
        assert!(text.contains("in use by another blockd"), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        StateLock::acquire(&path, dir.path()).unwrap();
    }

    #[tokio::test]
    async fn the_api_socket_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/api.sock");
        let _listener = bind_api_socket(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
