//! nbd-memserver: the blockd NBD server over sparse in-memory exports, for trying NBD
//! clients by hand and for tests that want the server in another process.
//!
//! ```text
//! nbd-memserver --socket /tmp/nbd.sock --export vol=64M --export vol@snap=64M:ro \
//!               --export slow=1G:iops=500:bw=8M
//! nbdinfo --list 'nbd+unix:///?socket=/tmp/nbd.sock'
//! ```
//!
//! Stops gracefully (in-flight requests finish, exports are flushed) on SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use blockd::nbd::mem::{MemExport, MemRegistry};
use blockd::nbd::{Server, TlsConfig};
use blockd::qos::Qos;
use clap::Parser;

/// Serve in-memory NBD exports.
#[derive(Debug, Parser)]
struct Args {
    /// Unix socket to listen on (a stale socket file is replaced).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// TCP address to listen on; requires --tls-cert and --tls-key (no plain-text TCP).
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// PEM certificate chain for TLS.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle; when given, clients must present a certificate signed by it.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Let the server call the exports inline instead of on the blocking pool (the
    /// memory store never blocks; the engine's exports always use the pool).
    #[arg(long)]
    inline: bool,
    /// An export: NAME=SIZE[:ro][:iops=N][:bw=BYTES][:desc=TEXT]; sizes take K/M/G.
    #[arg(long = "export", required = true)]
    exports: Vec<String>,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .with_context(|| format!("size {s:?} overflows"))
}

fn parse_export(spec: &str, inline: bool) -> anyhow::Result<(String, MemExport)> {
    let Some((name, rest)) = spec.split_once('=') else {
        bail!("export {spec:?} is not NAME=SIZE[:options]");
    };
    let mut parts = rest.split(':');
    let size = parse_size(parts.next().unwrap_or_default())?;
    let mut export = MemExport::new(size).with_inline_calls(inline);
    let mut qos = Qos::UNLIMITED;
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => export = export.read_only(true),
            Some(("iops", v)) => qos.max_iops = v.parse().context("bad iops")?,
            Some(("bw", v)) => qos.max_bandwidth_bytes = parse_size(v)?,
            Some(("desc", v)) => export = export.with_description(v),
            _ => bail!("unknown export option {opt:?}"),
        }
    }
    export.set_qos(qos);
    Ok((name.to_owned(), export))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let registry = Arc::new(MemRegistry::new());
    for spec in &args.exports {
        let (name, export) = parse_export(spec, args.inline)?;
        registry.insert(name, export);
    }
    let server = Server::new(registry);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = args.socket.clone() {
        let server = server.clone();
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            server
                .serve_unix(&path, stopped(rx))
                .await
                .context("unix listener")
        });
    }
    if let Some(addr) = args.tcp {
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
            bail!("--tcp needs --tls-cert and --tls-key: NBD over TCP is only served with TLS");
        };
        let tls = TlsConfig::from_pem_files(cert, key, args.tls_client_ca.as_deref())?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let server = server.clone();
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            server
                .serve_tls(listener, tls, stopped(rx))
                .await
                .context("TLS listener")
        });
    }
    if tasks.is_empty() {
        bail!("nothing to listen on: give --socket and/or --tcp");
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        Some(res) = tasks.join_next() => res??,
    }
    let _ = stop_tx.send(true);
    while let Some(res) = tasks.join_next().await {
        res??;
    }
    Ok(())
}
