//! Command-line configuration of `csi-shim` (`csi-shim --help` lists every flag).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Which CSI services this process serves. Identity is always served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity, Controller and Node (one process per node, node-deployment mode).
    All,
    /// Identity and Controller only.
    Controller,
    /// Identity and Node only.
    Node,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::All | Mode::Controller)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::All | Mode::Node)
    }
}

/// How a staged volume becomes a block device on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachMode {
    /// ublk when the kernel has it (`/dev/ublk-control`), else kernel NBD when the `nbd`
    /// module is available, else fuse-loop; the log says which and why.
    Auto,
    /// ublk: blockd serves the volume as /dev/ublkbN itself (Linux 6.0+, ublk_drv), and
    /// recovers the device in place after a blockd restart.
    Ublk,
    /// Kernel NBD configured over generic netlink.
    Nbd,
    /// The NBD export presented as a file through FUSE (csi-fuse-nbd, or nbdfuse when that
    /// is not installed), attached to a loop device in direct-I/O mode.
    FuseLoop,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// CSI driver for blockd: serves the CSI Identity, Controller and Node services on a unix
/// socket and turns every call into blockd API calls, NBD attachments and mounts.
///
/// Example (one process per node, as the DaemonSet runs it):
///
///   csi-shim --endpoint unix:///var/lib/kubelet/plugins/blockd.csi.io/csi.sock \
///            --blockd-api /var/lib/blockd/api.sock --node-id "$NODE_NAME"
#[derive(Debug, Clone, Parser)]
#[command(name = "csi-shim", version, verbatim_doc_comment)]
pub struct Args {
    /// CSI endpoint to serve on: `unix:///path/csi.sock` or a plain socket path. The
    /// socket is created with mode 0600; a stale socket there is replaced, a live one or
    /// any other file is refused.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,

    /// Path of blockd's gRPC API unix socket.
    #[arg(long, value_name = "PATH")]
    pub blockd_api: PathBuf,

    /// This node's id (the Kubernetes node name). Volume and snapshot ids carry it, and it
    /// is the value of the topology key `topology.blockd.io/node`.
    #[arg(long, env = "NODE_ID")]
    pub node_id: String,

    /// Which services to serve.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    pub mode: Mode,

    /// How to attach volumes on this node.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,

    /// Where the node service keeps its record of staged volumes (rebuilt on start, so a
    /// restart of csi-shim keeps mounted volumes working).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/blockd-csi")]
    pub state_dir: PathBuf,

    /// Connections per kernel NBD device (one kernel queue and receive worker each) when
    /// blockd allows several (it advertises NBD_FLAG_CAN_MULTI_CONN); default: the
    /// number of CPUs, at most 4.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub nbd_connections: Option<u16>,

    /// Largest number of volumes this node publishes (reported by NodeGetInfo).
    #[arg(long, default_value_t = 256)]
    pub max_volumes: i64,

    /// Thin-provisioning limit: CreateVolume is refused (RESOURCE_EXHAUSTED) and
    /// GetCapacity reports no room once the sizes of all volumes in a pool would exceed
    /// this multiple of the pool's capacity. 1.0 means no over-provisioning.
    #[arg(long, value_name = "RATIO", default_value_t = 4.0, value_parser = parse_ratio)]
    pub overprovisioning_ratio: f64,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Args {
    /// `--nbd-connections`, or its default: the CPUs, 1 to 4. More connections than CPUs
    /// only add context switches; past 4 the proxy and blockd, not the kernel queue,
    /// limit a single volume.
    pub fn nbd_connections(&self) -> usize {
        match self.nbd_connections {
            Some(n) => n.into(),
            None => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, 4),
        }
    }

    /// The socket path named by `--endpoint`.
    pub fn endpoint_path(&self) -> Result<PathBuf, String> {
        let raw = self.endpoint.as_str();
        let path = if let Some(rest) = raw.strip_prefix("unix://") {
            rest
        } else if raw.contains("://") {
            return Err(format!(
                "--endpoint {raw:?}: only unix sockets are supported (unix:///path/csi.sock)"
            ));
        } else {
            raw
        };
        if path.is_empty() || !path.starts_with('/') {
            return Err(format!(
                "--endpoint {raw:?}: the socket path must be absolute (unix:///path/csi.sock)"
            ));
        }
        Ok(PathBuf::from(path))
    }
}

fn parse_ratio(raw: &str) -> Result<f64, String> {
    let ratio: f64 = raw
        .parse()
        .map_err(|_| format!("{raw:?} is not a number (e.g. 1.0, 4, 10)"))?;
    if !ratio.is_finite() || ratio < 1.0 {
        return Err(format!("{raw:?} must be a finite number >= 1.0"));
    }
    Ok(ratio)
}
