//! The daemon's configuration: one [`Config`] built from command-line flags ([`Args`])
//! and an optional TOML file (`--config FILE.toml`, kebab-case keys, every key optional).
//!
//! Precedence: built-in defaults, then the file, then flags. `--pool` flags replace the
//! file's pool list as a whole (pools are an ordered list whose first entry is the
//! default pool, so merging them entry by entry would be surprising).
//!
//! Invariants after [`Config::validate`]: at least one pool; pool names are valid and
//! unique; chunk sizes are powers of two within the engine's limits; pool sizes and the
//! commit interval are positive; the over-provisioning limit is a positive finite ratio
//! or unlimited; NBD over TCP (`nbd-listen`) comes with all three TLS files (server
//! certificate, key, client CA: mutual TLS, never plain text), TLS files never come
//! without a listener, and some NBD listener (unix or TCP) exists.
//!
//! ```toml
//! state-dir = "/var/lib/blockd"
//! metrics-addr = "127.0.0.1:9571"
//! io-engine = "auto"
//! log-format = "json"
//! nbd-busy-poll-us = 100     # 0: NBD connections never busy-poll
//! ublk-zero-copy = "auto"    # "off": ublk devices always copy request data
//! max-overprovision = 20.0   # or 0 / "none": unlimited
//!
//! [[pool]]
//! name = "default"
//! path = "/var/lib/blockd/pool.img"
//! size = "100G"
//! chunk = "64K"
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use blockd_proto::model::{validate_name, NameKind};
use blockd_proto::size::parse_size;
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Deserializer};

use crate::device::EngineChoice;
use crate::engine::{
    DEFAULT_CHUNK_SIZE, DEFAULT_MAX_OVERPROVISION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};

/// Size of the default pool's file when it is created: 10 GiB, sparse.
pub const DEFAULT_POOL_SIZE: u64 = 10 << 30;
/// Name of the pool made when none is configured.
pub const DEFAULT_POOL_NAME: &str = "default";
/// The state directory when none is given.
pub const DEFAULT_STATE_DIR: &str = "./blockd-data";
/// Group commit interval when none is given (dm-thin commits about once a second too).
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 1000;
/// NBD busy-poll budget; see [`crate::nbd::ServerConfig::busy_poll`].
pub const DEFAULT_NBD_BUSY_POLL_US: u64 = crate::nbd::DEFAULT_BUSY_POLL.as_micros() as u64;
/// Beyond this, polling is a core spinning for nothing between requests, not a shortcut
/// past a wakeup.
const MAX_NBD_BUSY_POLL_US: u64 = 10_000;
/// `--nbd-socket none`: no unix socket, NBD over TCP (with TLS) only.
pub const NBD_SOCKET_NONE: &str = "none";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("Invalid pool {spec:?}: {reason}")]
    Pool { spec: String, reason: String },
    #[error("Invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// blockd: a block-storage daemon serving thin-provisioned volumes over NBD.
///
/// Runs in the foreground, logs to stderr, and exits cleanly on SIGTERM/SIGINT.
#[derive(Debug, Default, Parser)]
#[command(
    name = "blockd",
    version,
    after_help = "Examples:
  blockd                                   # ./blockd-data, a 10 GiB sparse pool
  blockd --state-dir /var/lib/blockd --metrics-addr 127.0.0.1:9571
  blockd --state-dir /srv/b --pool fast=/dev/nvme0n1 --pool bulk=/srv/b/bulk.img,size=1T,chunk=256K
  blockd --config /etc/blockd/blockd.toml"
)]
pub struct Args {
    /// TOML file with the same settings (kebab-case keys); flags override it.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,

    /// Where metadata (DIR/meta), sockets and the default pool live [default: ./blockd-data].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// A pool: NAME=PATH[,size=SIZE][,chunk=SIZE]. PATH is a file (created sparse, 10G by
    /// default) or a block device. Repeatable; the first is the default pool.
    #[arg(long = "pool", value_name = "NAME=PATH[,size=SIZE][,chunk=SIZE]")]
    pub pools: Vec<PoolConfig>,

    /// The gRPC API socket [default: DIR/api.sock].
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// The NBD unix socket [default: DIR/nbd.sock]; `none` serves NBD over TCP only.
    #[arg(long, value_name = "PATH|none")]
    pub nbd_socket: Option<PathBuf>,

    /// Also serve NBD over TCP on ADDR:PORT, for clients on other machines. Always with
    /// mutual TLS: needs --tls-cert, --tls-key and --tls-client-ca (plain TCP is refused).
    #[arg(long, value_name = "ADDR:PORT")]
    pub nbd_listen: Option<SocketAddr>,

    /// PEM certificate chain the TCP listener presents (with --nbd-listen).
    #[arg(long, value_name = "FILE.pem")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE.pem")]
    pub tls_key: Option<PathBuf>,

    /// PEM bundle of the CAs that client certificates must chain to; every TCP client
    /// must present one.
    #[arg(long, value_name = "FILE.pem")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// I/O engine: io_uring, the pread/pwrite fallback, or auto (io_uring when available).
    #[arg(long, value_enum)]
    pub io_engine: Option<IoEngineChoice>,

    /// Log format on stderr.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,

    /// Group commit interval in milliseconds.
    #[arg(long, value_name = "MS")]
    pub commit_interval_ms: Option<u64>,

    /// Microseconds an NBD connection on the unix socket keeps polling for its next
    /// request or completion before it sleeps (ten times that while its device I/O is in
    /// flight): spends CPU while a volume is busy, up to a core per busy connection, to
    /// save two wakeups per request (small-block latency and IOPS). 0 never polls
    /// [default: 100].
    #[arg(long, value_name = "US")]
    pub nbd_busy_poll_us: Option<u64>,

    /// Whether new ublk devices move request data without copying it (automatic buffer
    /// registration, Linux 6.16+): "auto" uses it where the kernel offers it, "off"
    /// always copies. A device keeps the data path it was created with across restarts
    /// [default: auto].
    #[arg(long, value_enum, value_name = "MODE")]
    pub ublk_zero_copy: Option<UblkZeroCopy>,

    /// Over-provisioning limit of every pool: creating, cloning or growing a volume is
    /// refused (RESOURCE_EXHAUSTED) when the sizes of the pool's volumes would add up to
    /// more than RATIO times its capacity. 0 or "none" means unlimited [default: 20].
    #[arg(long, value_name = "RATIO")]
    pub max_overprovision: Option<MaxOverprovision>,
}

/// The pools' over-provisioning limit: a positive ratio, or unlimited (`None`).
///
/// Given as a number (`20`, `2.5`) or, for unlimited, `0`, `none` or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaxOverprovision(pub Option<f64>);

// Only finite, non-negative ratios are ever built (see `FromStr`), so equality is total.
impl Eq for MaxOverprovision {}

impl Default for MaxOverprovision {
    fn default() -> Self {
        MaxOverprovision(Some(DEFAULT_MAX_OVERPROVISION))
    }
}

impl MaxOverprovision {
    fn from_ratio(ratio: f64) -> Result<Self, String> {
        if !ratio.is_finite() || ratio < 0.0 {
            return Err(format!(
                "{ratio} is not a ratio: give a positive number such as 20, or 0 or \"none\" for unlimited"
            ));
        }
        Ok(MaxOverprovision((ratio > 0.0).then_some(ratio)))
    }
}

impl FromStr for MaxOverprovision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "unlimited" => Ok(MaxOverprovision(None)),
            text => {
                let ratio: f64 = text.parse().map_err(|_| {
                    format!(
                        "{s:?} is not a ratio: give a positive number such as 20, or 0 or \"none\" for unlimited"
                    )
                })?;
                Self::from_ratio(ratio)
            }
        }
    }
}

impl fmt::Display for MaxOverprovision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{r}"),
            None => f.write_str("none"),
        }
    }
}

impl<'de> Deserialize<'de> for MaxOverprovision {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Self::from_ratio(n as f64),
            Raw::Float(r) => Self::from_ratio(r),
            Raw::Text(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// The ublk data path new devices ask for ([`Args::ublk_zero_copy`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UblkZeroCopy {
    /// Zero copy where the kernel offers automatic buffer registration.
    #[default]
    Auto,
    /// Always copy.
    Off,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoEngineChoice {
    #[default]
    Auto,
    Uring,
    Sync,
}

impl From<IoEngineChoice> for EngineChoice {
    fn from(c: IoEngineChoice) -> Self {
        match c {
            IoEngineChoice::Auto => EngineChoice::Auto,
            IoEngineChoice::Uring => EngineChoice::Uring,
            IoEngineChoice::Sync => EngineChoice::Sync,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A byte size read from TOML as an integer (`4096`) or a string (`"64K"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// One pool: `--pool NAME=PATH[,size=SIZE][,chunk=SIZE]` or a `[[pool]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub path: PathBuf,
    /// Size of the file when it is created (ignored for block devices and existing files).
    #[serde(default)]
    pub size: Option<ByteSize>,
    /// Chunk size when the pool is created (an existing pool keeps its own).
    #[serde(default)]
    pub chunk: Option<ByteSize>,
}

impl PoolConfig {
    pub fn size_bytes(&self) -> u64 {
        self.size.map_or(DEFAULT_POOL_SIZE, |s| s.0)
    }

    pub fn chunk_size_bytes(&self) -> u64 {
        self.chunk.map_or(DEFAULT_CHUNK_SIZE, |s| s.0)
    }
}

impl FromStr for PoolConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::Pool {
            spec: spec.to_string(),
            reason,
        };
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default();
        let (name, path) = head
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=PATH[,size=SIZE][,chunk=SIZE]".into()))?;
        if path.is_empty() {
            return Err(bad("the path is empty".into()));
        }
        let mut pool = PoolConfig {
            name: name.to_string(),
            path: PathBuf::from(path),
            size: None,
            chunk: None,
        };
        for option in parts {
            let (key, value) = option
                .split_once('=')
                .ok_or_else(|| bad(format!("expected KEY=VALUE, got {option:?}")))?;
            let size = parse_size(value).map_err(|e| bad(e.to_string()))?;
            match key {
                "size" => pool.size = Some(ByteSize(size)),
                "chunk" | "chunk-size" => pool.chunk = Some(ByteSize(size)),
                other => {
                    return Err(bad(format!(
                        "unknown option {other:?} (expected size or chunk)"
                    )))
                }
            }
        }
        Ok(pool)
    }
}

impl fmt::Display for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.path.display())?;
        if let Some(size) = self.size {
            write!(f, ",size={}", size.0)?;
        }
        if let Some(chunk) = self.chunk {
            write!(f, ",chunk={}", chunk.0)?;
        }
        Ok(())
    }
}

/// Everything the daemon needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    pub state_dir: PathBuf,
    /// Pools in order; the first is the default. Empty: one pool `default` at
    /// `STATE_DIR/pool.img`.
    #[serde(rename = "pool")]
    pub pools: Vec<PoolConfig>,
    pub api_socket: Option<PathBuf>,
    pub nbd_socket: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub io_engine: IoEngineChoice,
    pub log_format: LogFormat,
    pub commit_interval_ms: u64,
    pub nbd_busy_poll_us: u64,
    pub ublk_zero_copy: UblkZeroCopy,
    pub nbd_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub max_overprovision: MaxOverprovision,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            pools: Vec::new(),
            api_socket: None,
            nbd_socket: None,
            metrics_addr: None,
            io_engine: IoEngineChoice::Auto,
            log_format: LogFormat::Text,
            commit_interval_ms: DEFAULT_COMMIT_INTERVAL_MS,
            nbd_busy_poll_us: DEFAULT_NBD_BUSY_POLL_US,
            ublk_zero_copy: UblkZeroCopy::Auto,
            nbd_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_overprovision: MaxOverprovision::default(),
        }
    }
}

impl Config {
    /// Parses a TOML configuration.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            // toml's message spans several lines (a source excerpt); keep it on one.
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })
    }

    /// Reads the file named by `--config` (if any), applies the flags over it, and
    /// validates the result.
    pub fn load(args: Args) -> Result<Config, ConfigError> {
        let mut config = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Config::from_toml(path, &text)?
            }
            None => Config::default(),
        };
        config.apply(args);
        config.validate()?;
        Ok(config)
    }

    /// Overrides this configuration with every flag that was given.
    pub fn apply(&mut self, args: Args) {
        if let Some(dir) = args.state_dir {
            self.state_dir = dir;
        }
        if !args.pools.is_empty() {
            self.pools = args.pools;
        }
        if args.api_socket.is_some() {
            self.api_socket = args.api_socket;
        }
        if args.nbd_socket.is_some() {
            self.nbd_socket = args.nbd_socket;
        }
        if args.metrics_addr.is_some() {
            self.metrics_addr = args.metrics_addr;
        }
        if let Some(engine) = args.io_engine {
            self.io_engine = engine;
        }
        if let Some(format) = args.log_format {
            self.log_format = format;
        }
        if let Some(ms) = args.commit_interval_ms {
            self.commit_interval_ms = ms;
        }
        if let Some(us) = args.nbd_busy_poll_us {
            self.nbd_busy_poll_us = us;
        }
        if let Some(zc) = args.ublk_zero_copy {
            self.ublk_zero_copy = zc;
        }
        if args.nbd_listen.is_some() {
            self.nbd_listen = args.nbd_listen;
        }
        if args.tls_cert.is_some() {
            self.tls_cert = args.tls_cert;
        }
        if args.tls_key.is_some() {
            self.tls_key = args.tls_key;
        }
        if args.tls_client_ca.is_some() {
            self.tls_client_ca = args.tls_client_ca;
        }
        if let Some(limit) = args.max_overprovision {
            self.max_overprovision = limit;
        }
    }

    /// Checks the invariants listed in the module docs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                field: "state-dir",
                reason: "must not be empty".into(),
            });
        }
        if self.commit_interval_ms == 0 {
            return Err(ConfigError::Invalid {
                field: "commit-interval-ms",
                reason: "must be greater than 0".into(),
            });
        }
        if self.nbd_busy_poll_us > MAX_NBD_BUSY_POLL_US {
            return Err(ConfigError::Invalid {
                field: "nbd-busy-poll-us",
                reason: format!(
                    "{} µs is longer than the {MAX_NBD_BUSY_POLL_US} µs maximum (0 turns polling off)",
                    self.nbd_busy_poll_us
                ),
            });
        }
        self.validate_nbd_listeners()?;
        let pools = self.pools();
        for (i, pool) in pools.iter().enumerate() {
            let bad = |reason: String| ConfigError::Pool {
                spec: pool.to_string(),
                reason,
            };
            validate_name(NameKind::Pool, "name", &pool.name).map_err(|e| bad(e.to_string()))?;
            if pools[..i].iter().any(|p| p.name == pool.name) {
                return Err(bad(format!("pool name {:?} is used twice", pool.name)));
            }
            if pools[..i].iter().any(|p| p.path == pool.path) {
                return Err(bad(format!(
                    "path {} is used by two pools",
                    pool.path.display()
                )));
            }
            if pool.size_bytes() == 0 {
                return Err(bad("size must be greater than 0".into()));
            }
            let chunk = pool.chunk_size_bytes();
            if !chunk.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk) {
                return Err(bad(format!(
                    "chunk size {chunk} must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes"
                )));
            }
            if pool.size_bytes() < 2 * chunk {
                return Err(bad(format!(
                    "size {} is too small for chunk size {chunk} (at least two chunks)",
                    pool.size_bytes()
                )));
            }
        }
        Ok(())
    }

    /// NBD over TCP only with mutual TLS: a listener without all three TLS files, or TLS
    /// files without a listener, is a mistake the daemon refuses at start rather than
    /// serving volumes in plain text or silently ignoring the certificates.
    fn validate_nbd_listeners(&self) -> Result<(), ConfigError> {
        let tls = [
            ("tls-cert", &self.tls_cert),
            ("tls-key", &self.tls_key),
            ("tls-client-ca", &self.tls_client_ca),
        ];
        match self.nbd_listen {
            Some(addr) => {
                let missing: Vec<String> = tls
                    .iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(k, _)| format!("--{k}"))
                    .collect();
                if !missing.is_empty() {
                    return Err(ConfigError::Invalid {
                        field: "nbd-listen",
                        reason: format!(
                            "NBD over TCP ({addr}) is served only with mutual TLS, never in plain text: also give {}",
                            missing.join(", ")
                        ),
                    });
                }
            }
            None => {
                if let Some((k, _)) = tls.iter().find(|(_, v)| v.is_some()) {
                    return Err(ConfigError::Invalid {
                        field: "nbd-listen",
                        reason: format!(
                            "--{k} is only used by the TCP listener: add --nbd-listen ADDR:PORT"
                        ),
                    });
                }
                if self.nbd_socket().is_none() {
                    return Err(ConfigError::Invalid {
                        field: "nbd-socket",
                        reason:
                            "`none` leaves no way to reach the volumes: add --nbd-listen ADDR:PORT"
                                .into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The configured pools, or the default one.
    pub fn pools(&self) -> Vec<PoolConfig> {
        if self.pools.is_empty() {
            vec![PoolConfig {
                name: DEFAULT_POOL_NAME.to_string(),
                path: self.state_dir.join("pool.img"),
                size: Some(ByteSize(DEFAULT_POOL_SIZE)),
                chunk: Some(ByteSize(DEFAULT_CHUNK_SIZE)),
            }]
        } else {
            self.pools.clone()
        }
    }

    pub fn api_socket(&self) -> PathBuf {
        self.api_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("api.sock"))
    }

    /// The NBD unix socket, or None when it is configured as `none` (TCP only).
    pub fn nbd_socket(&self) -> Option<PathBuf> {
        match &self.nbd_socket {
            Some(p) if p.as_os_str() == NBD_SOCKET_NONE => None,
            Some(p) => Some(p.clone()),
            None => Some(self.state_dir.join("nbd.sock")),
        }
    }

    pub fn meta_dir(&self) -> PathBuf {
        self.state_dir.join("meta")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join("lock")
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }

    pub fn nbd_busy_poll(&self) -> Duration {
        Duration::from_micros(self.nbd_busy_poll_us)
    }

    /// Makes every path absolute (relative to the current directory), so that NBD URIs
    /// and log lines name real locations.
    pub fn absolutize(&mut self) -> std::io::Result<()> {
        self.state_dir = std::path::absolute(&self.state_dir)?;
        for pool in &mut self.pools {
            pool.path = std::path::absolute(&pool.path)?;
        }
        if let Some(p) = &mut self.api_socket {
            *p = std::path::absolute(&*p)?;
        }
        if let Some(p) = &mut self.nbd_socket {
            if p.as_os_str() != NBD_SOCKET_NONE {
                *p = std::path::absolute(&*p)?;
            }
        }
        for p in [
            &mut self.tls_cert,
            &mut self.tls_key,
            &mut self.tls_client_ca,
        ]
        .into_iter()
        .flatten()
        {
            *p = std::path::absolute(&*p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("blockd").chain(list.iter().copied())).unwrap()
    }

    #[test]
    fn tcp_is_mutual_tls_or_nothing() {
        let tls = [
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
            "--tls-client-ca",
            "/ca.pem",
        ];
        let mut full = vec!["--nbd-listen", "127.0.0.1:10809"];
        full.extend(tls);
        let c = Config::load(args(&full)).unwrap();
        assert_eq!(c.nbd_listen, Some("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(c.tls_client_ca, Some(PathBuf::from("/ca.pem")));

        // A listener without every TLS file: refused, naming what is missing.
        let err = Config::load(args(&["--nbd-listen", "0.0.0.0:10809", "--tls-cert", "/c"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-key, --tls-client-ca"), "{err}");
        assert!(err.contains("plain text"), "{err}");
        // TLS files without a listener: refused rather than ignored.
        let err = Config::load(args(&["--tls-key", "/k"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--nbd-listen"), "{err}");
        // No unix socket and no TCP: nothing could reach a volume.
        let err = Config::load(args(&["--nbd-socket", "none"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--nbd-listen"), "{err}");
        // TCP only.
        let mut tcp_only = full.clone();
        tcp_only.extend(["--nbd-socket", "none"]);
        let c = Config::load(args(&tcp_only)).unwrap();
        assert_eq!(c.nbd_socket(), None);
        // The same keys in TOML.
        let c = Config::from_toml(
            Path::new("t.toml"),
            "nbd-listen = \"[::1]:10809\"\ntls-cert = \"/c\"\ntls-key = \"/k\"\ntls-client-ca = \"/ca\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.nbd_listen, Some("[::1]:10809".parse().unwrap()));
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load(args(&[])).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("./blockd-data"));
        let pools = c.pools();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].name, "default");
        assert_eq!(pools[0].path, PathBuf::from("./blockd-data/pool.img"));
        assert_eq!(pools[0].size_bytes(), 10 << 30);
        assert_eq!(pools[0].chunk_size_bytes(), 64 << 10);
        assert_eq!(c.api_socket(), PathBuf::from("./blockd-data/api.sock"));
        assert_eq!(
            c.nbd_socket(),
            Some(PathBuf::from("./blockd-data/nbd.sock"))
        );
        assert_eq!(c.meta_dir(), PathBuf::from("./blockd-data/meta"));
        assert_eq!(c.io_engine, IoEngineChoice::Auto);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.max_overprovision, MaxOverprovision(Some(20.0)));
    }

    #[test]
    fn max_overprovision_is_a_ratio_or_unlimited() {
        let limit =
            |v: &str| Config::load(args(&["--max-overprovision", v])).map(|c| c.max_overprovision);
        assert_eq!(limit("2.5").unwrap(), MaxOverprovision(Some(2.5)));
        assert_eq!(limit("100").unwrap(), MaxOverprovision(Some(100.0)));
        for unlimited in ["0", "none", "unlimited", "NONE"] {
            assert_eq!(
                limit(unlimited).unwrap(),
                MaxOverprovision(None),
                "{unlimited}"
            );
        }
        for bad in ["-1", "lots", "NaN", "inf", ""] {
            assert!(
                Args::try_parse_from(["blockd", "--max-overprovision", bad]).is_err(),
                "{bad}"
            );
        }
        let toml =
            |text: &str| Config::from_toml(Path::new("b.toml"), text).map(|c| c.max_overprovision);
        assert_eq!(
            toml("max-overprovision = 4").unwrap(),
            MaxOverprovision(Some(4.0))
        );
        assert_eq!(
            toml("max-overprovision = 1.5").unwrap(),
            MaxOverprovision(Some(1.5))
        );
        assert_eq!(
            toml("max-overprovision = 0").unwrap(),
            MaxOverprovision(None)
        );
        assert_eq!(
            toml("max-overprovision = \"none\"").unwrap(),
            MaxOverprovision(None)
        );
        let err = toml("max-overprovision = -3").unwrap_err();
        assert!(err.to_string().contains("not a ratio"), "{err}");
        // Flags override the file.
        let mut c = Config::from_toml(Path::new("b.toml"), "max-overprovision = 4").unwrap();
        c.apply(args(&["--max-overprovision", "none"]));
        assert_eq!(c.max_overprovision, MaxOverprovision(None));
    }

    #[test]
    fn flags_parse() {
        let c = Config::load(args(&[
            "--state-dir",
            "/s",
            "--pool",
            "fast=/dev/nvme0n1",
            "--pool",
            "bulk=/s/bulk.img,size=1T,chunk=256K",
            "--api-socket",
            "/run/a.sock",
            "--nbd-socket",
            "/run/n.sock",
            "--metrics-addr",
            "127.0.0.1:9571",
            "--io-engine",
            "sync",
            "--log-format",
            "json",
        ]))
        .unwrap();
        let pools = c.pools();
        assert_eq!(pools[0].name, "fast");
        assert_eq!(pools[0].size, None);
        assert_eq!(pools[1].size_bytes(), 1 << 40);
        assert_eq!(pools[1].chunk_size_bytes(), 256 << 10);
        assert_eq!(c.api_socket(), PathBuf::from("/run/a.sock"));
        assert_eq!(c.nbd_socket(), Some(PathBuf::from("/run/n.sock")));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9571".parse().unwrap()));
        assert_eq!(c.io_engine, IoEngineChoice::Sync);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn bad_pools_are_refused() {
        for spec in [
            "nopath",
            "p=",
            "p=/x,size=1Q",
            "p=/x,colour=red",
            "p=/x,size",
        ] {
            assert!(spec.parse::<PoolConfig>().is_err(), "{spec}");
        }
        for list in [
            vec!["--pool", "Bad=/x"],
            vec!["--pool", "p=/x,chunk=3K"],
            vec!["--pool", "p=/x,chunk=8M"],
            vec!["--pool", "p=/x,size=0"],
            vec!["--pool", "p=/x,size=64K"],
            vec!["--pool", "p=/x", "--pool", "p=/y"],
            vec!["--pool", "p=/x", "--pool", "q=/x"],
        ] {
            let err = Config::load(args(&list)).expect_err(&list.join(" "));
            assert!(err.to_string().starts_with("Invalid pool"), "{err}");
        }
    }

    #[test]
    fn toml_file_uses_kebab_case_and_flags_override_it() {
        let text = r#"
            state-dir = "/var/lib/blockd"
            metrics-addr = "127.0.0.1:9571"
            io-engine = "uring"
            log-format = "json"
            commit-interval-ms = 500

            [[pool]]
            name = "default"
            path = "/var/lib/blockd/pool.img"
            size = "100G"
            chunk = 65536
        "#;
        let mut c = Config::from_toml(Path::new("b.toml"), text).unwrap();
        assert_eq!(c.pools[0].size_bytes(), 100 << 30);
        assert_eq!(c.pools[0].chunk_size_bytes(), 65536);
        assert_eq!(c.commit_interval(), Duration::from_millis(500));
        assert_eq!(c.io_engine, IoEngineChoice::Uring);
        c.apply(args(&["--state-dir", "/other", "--io-engine", "sync"]));
        assert_eq!(c.state_dir, PathBuf::from("/other"));
        assert_eq!(c.io_engine, IoEngineChoice::Sync);
        assert_eq!(c.log_format, LogFormat::Json);
        c.validate().unwrap();
    }

    #[test]
    fn ublk_zero_copy_defaults_to_auto_and_can_be_turned_off() {
        assert_eq!(
            Config::load(args(&[])).unwrap().ublk_zero_copy,
            UblkZeroCopy::Auto
        );
        let c = Config::load(args(&["--ublk-zero-copy", "off"])).unwrap();
        assert_eq!(c.ublk_zero_copy, UblkZeroCopy::Off);
        let c = Config::from_toml(Path::new("b.toml"), "ublk-zero-copy = \"off\"").unwrap();
        assert_eq!(c.ublk_zero_copy, UblkZeroCopy::Off);
        let err = Config::from_toml(Path::new("b.toml"), "ublk-zero-copy = \"always\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ublk-zero-copy") || err.contains("always"),
            "{err}"
        );
        let err = Args::try_parse_from(["blockd", "--ublk-zero-copy", "on"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("'on'") && err.contains("auto"), "{err}");
    }

    #[test]
    fn nbd_busy_poll_is_bounded_and_can_be_turned_off() {
        let c = Config::load(args(&[])).unwrap();
        assert_eq!(c.nbd_busy_poll(), crate::nbd::DEFAULT_BUSY_POLL);
        let c = Config::load(args(&["--nbd-busy-poll-us", "0"])).unwrap();
        assert!(c.nbd_busy_poll().is_zero());
        let c = Config::from_toml(Path::new("b.toml"), "nbd-busy-poll-us = 200").unwrap();
        c.validate().unwrap();
        assert_eq!(c.nbd_busy_poll(), Duration::from_micros(200));
        let err = Config::load(args(&["--nbd-busy-poll-us", "20000"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nbd-busy-poll-us"), "{err}");
        assert!(err.contains("0 turns polling off"), "{err}");
    }

    #[test]
    fn toml_errors_are_one_line() {
        for text in [
            "state_dir = \"/x\"",
            "io-engine = \"fast\"",
            "[[pool]]\nname = \"p\"",
            "x =",
        ] {
            let err = Config::from_toml(Path::new("b.toml"), text).expect_err(text);
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn the_sample_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/blockd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        Config::from_toml(&path, &text).unwrap().validate().unwrap();
    }
}
