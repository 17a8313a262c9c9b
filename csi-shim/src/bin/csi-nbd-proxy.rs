//! `csi-nbd-proxy`: the reconnecting NBD proxy the CSI node service starts (detached, one
//! per staged volume) between an attacher and blockd. Parses flags, sets up logs, marks
//! itself an I/O flusher ([`csi_shim::io_flusher`]), writes the pid file, and runs
//! [`csi_shim::proxy`] until SIGTERM/SIGINT (or, with `--exit-after-disconnect`, until its
//! last client disconnected); see that module for the protocol and the replay rules.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use csi_shim::config::LogFormat;
use csi_shim::proxy::{self, Config, Shared};

/// Reconnecting NBD proxy: serves one blockd export on a unix socket and survives blockd
/// restarts (reconnects, replays unacknowledged and unflushed writes, clients never see
/// an error).
#[derive(Debug, Parser)]
#[command(name = "csi-nbd-proxy", version)]
struct Args {
    /// Unix socket to serve NBD on, created with mode 0600 (a stale socket is replaced; a
    /// live one or any other file is refused).
    #[arg(long, value_name = "SOCK")]
    listen: PathBuf,
    /// blockd's NBD unix socket.
    #[arg(long, value_name = "BLOCKD_NBD_SOCK")]
    upstream_socket: PathBuf,
    /// The export (image) to forward to; any name a client asks for maps to it.
    #[arg(long, value_name = "IMAGE")]
    export: String,
    /// Seconds to keep reconnecting after blockd went away before failing I/O.
    #[arg(long, value_name = "SECS", default_value_t = proxy::DEFAULT_RECONNECT_TIMEOUT.as_secs())]
    reconnect_timeout: u64,
    /// Bytes of acknowledged, unflushed writes kept for replay before the proxy sends a
    /// flush of its own (tests set it small to exercise that path).
    #[arg(long, value_name = "BYTES", default_value_t = proxy::DEFAULT_JOURNAL_LIMIT, hide = true)]
    journal_limit: usize,
    /// Exit once a client has sent NBD_CMD_DISC and no client is left (the kernel NBD
    /// client disconnects every connection when its device is disconnected).
    #[arg(long)]
    exit_after_disconnect: bool,
    /// Write the process id to this file (removed on exit).
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    csi_shim::init_logging(args.log_format, "CSI_NBD_PROXY_LOG");
    // Before the runtime starts its threads: they inherit the flag.
    csi_shim::io_flusher::become_io_flusher("csi-nbd-proxy");
    let runtime = match csi_shim::runtime(Some(2)) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "csi-nbd-proxy failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    use anyhow::Context;
    let cfg = Config {
        listen: args.listen.clone(),
        upstream_socket: args.upstream_socket,
        export: args.export,
        reconnect_timeout: Duration::from_secs(args.reconnect_timeout),
        journal_limit: args.journal_limit,
        exit_after_disconnect: args.exit_after_disconnect,
    };
    let listener = proxy::bind(&cfg.listen)?;
    if let Some(pidfile) = &args.pidfile {
        std::fs::write(pidfile, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", pidfile.display()))?;
    }
    tracing::info!(
        listen = %cfg.listen.display(),
        upstream = %cfg.upstream_socket.display(),
        export = %cfg.export,
        reconnect_timeout_s = cfg.reconnect_timeout.as_secs(),
        exit_after_disconnect = cfg.exit_after_disconnect,
        "csi-nbd-proxy serving"
    );
    let shared = Shared::new(cfg);
    proxy::serve(shared, listener, csi_shim::shutdown_signal()).await;
    let _ = std::fs::remove_file(&args.listen);
    if let Some(pidfile) = &args.pidfile {
        let _ = std::fs::remove_file(pidfile);
    }
    tracing::info!("csi-nbd-proxy stopped");
    Ok(())
}
