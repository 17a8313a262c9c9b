//! Shared helpers for the integration tests in `tests/tests/`: they run the real `blockd`
//! and `blockctl` binaries, as a user would.
//!
//! - [`binary`] finds (and first builds, once per test process) the workspace binaries;
//! - [`Daemon`] runs `blockd` on a private temporary state directory and kills it when
//!   dropped, so a failing test leaves no process and no directory behind;
//! - [`Daemon::ctl`] runs `blockctl` against that daemon; [`Daemon::grpc`] opens tonic
//!   clients for tests that check gRPC codes;
//! - [`csi_controller::Env`] is a daemon with a csi-shim on it, for the CSI Controller
//!   tests; [`qemu_io`] checks data through an NBD URI;
//! - [`nbd::NbdClient`] speaks raw NBD (from `nbd-wire`) for protocol checks.
//!
//! Binaries: integration tests of this crate cannot use `CARGO_BIN_EXE_*` (that only
//! names binaries of the same package), so the helpers look next to the test executable
//! (`<target>/<profile>/deps/..`) and run `cargo build` for `blockd` and `blockctl` once
//! per process, which is a no-op when they are fresh. `BLOCKD_BIN` / `BLOCKCTL_BIN`
//! override the paths (and skip the build).

pub mod csi_controller;
pub mod csi_node;
pub mod manifests;
pub mod nbd;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use blockd_proto::v1::daemon_service_client::DaemonServiceClient;
use blockd_proto::v1::export_service_client::ExportServiceClient;
use blockd_proto::v1::pool_service_client::PoolServiceClient;
use blockd_proto::v1::snapshot_service_client::SnapshotServiceClient;
use blockd_proto::v1::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;

/// How long a daemon may take to come up or go down.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(45);

/// Size of the pool file tests use (sparse; only written chunks take space).
pub const TEST_POOL_SIZE: &str = "2G";

/// `<target>/<profile>`: where cargo puts the workspace binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // <target>/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in <target>/<profile>/deps")
        .to_path_buf()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

/// Builds `blockd` and `blockctl` once per test process (cargo makes this a no-op when
/// they are up to date, and waits for any other build holding the target directory).
fn build_binaries() -> &'static Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        if ["BLOCKD_BIN", "BLOCKCTL_BIN", "CSI_SHIM_BIN"]
            .iter()
            .all(|var| std::env::var_os(var).is_some())
        {
            return Ok(());
        }
        let profile_dir = bin_dir();
        let target_dir = profile_dir.parent().expect("<target>/<profile>");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        without_cargo_test_env(&mut cmd);
        cmd.current_dir(workspace_root())
            .env("CARGO_TARGET_DIR", target_dir)
            // The same package set and dev-dependency features as `cargo test --workspace`:
            // a narrower `cargo build -p ...` resolves bindgen's dependencies with other
            // features and compiles RocksDB's C++ all over again.
            .args(["build", "--quiet", "--workspace", "--bins", "--tests"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run cargo build: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "cargo build of blockd, blockctl and csi-shim failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
}

/// Removes from `cmd`'s environment what cargo set for this test process
/// (CARGO_MANIFEST_DIR, CARGO_PKG_* and the like), for a command that runs cargo again.
///
/// Some build scripts (ring's) re-run when those change, so a build started from a test
/// with them set and one from a shell without them would rebuild each other's TLS stack
/// in turn. A user's own CARGO_PROFILE_* or CARGO_BUILD_* settings stay: they shape the
/// outer build too.
pub fn without_cargo_test_env(cmd: &mut Command) {
    const SET_FOR_TESTS: [&str; 8] = [
        "CARGO_MANIFEST_",
        "CARGO_PKG_",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    for (var, _) in std::env::vars_os() {
        if SET_FOR_TESTS
            .iter()
            .any(|p| var.to_string_lossy().starts_with(p))
        {
            cmd.env_remove(&var);
        }
    }
}

/// The path of workspace binary `name` (`blockd`, `blockctl` or `csi-shim`), built if
/// needed.
pub fn binary(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return PathBuf::from(path);
    }
    if let Err(err) = build_binaries() {
        panic!("{err}");
    }
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// What a `blockctl` run printed and how it exited.
#[derive(Debug)]
pub struct CtlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    fn from(out: Output) -> Self {
        CtlOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Clients of every `blockd.v1` service over one connection.
pub struct Grpc {
    pub pools: PoolServiceClient<Channel>,
    pub volumes: VolumeServiceClient<Channel>,
    pub snapshots: SnapshotServiceClient<Channel>,
    pub exports: ExportServiceClient<Channel>,
    pub daemon: DaemonServiceClient<Channel>,
    pub channel: Channel,
}

/// A `blockd` process on a temporary state directory. Dropping it kills the process
/// (SIGKILL if still running) and then removes the directory.
pub struct Daemon {
    child: Option<Child>,
    extra_args: Vec<String>,
    log_path: PathBuf,
    // Declared last: dropped after the process is gone.
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts a daemon with a small sparse pool and waits until its API answers.
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Like [`Daemon::start`], with extra flags for `blockd`.
    pub fn start_with(extra_args: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("blockd-test-")
            .tempdir()
            .expect("temporary state directory");
        let mut daemon = Daemon {
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            log_path: dir.path().join("blockd.log"),
            dir,
        };
        daemon.spawn();
        daemon.wait_ready();
        daemon
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn api_socket(&self) -> PathBuf {
        self.dir().join("api.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.dir().join("nbd.sock")
    }

    /// The flags this daemon runs with (for starting a second one on the same dir):
    /// `--state-dir` (always the temporary directory, overriding any config file), a
    /// small default pool unless the test gives `--pool` or `--config`, then the test's.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--state-dir".to_string(), self.dir().display().to_string()];
        // A test that configures pools itself (flags or a config file) gets no default.
        if !self
            .extra_args
            .iter()
            .any(|a| a == "--pool" || a == "--config")
        {
            args.push("--pool".into());
            args.push(format!(
                "default={},size={TEST_POOL_SIZE}",
                self.dir().join("pool.img").display()
            ));
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    fn spawn(&mut self) {
        let log = append_log(&self.log_path);
        let child = Command::new(binary("blockd"))
            .args(self.args())
            .env("RUST_LOG", "info")
            .env_remove("BLOCKD_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn blockd");
        self.child = Some(child);
    }

    /// The pid of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon is running").id()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until `blockctl status` succeeds; panics with the daemon's log if it exits
    /// or takes too long.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "blockd exited during start-up with {status}; log:\n{}",
                    self.log()
                );
            }
            if self.api_socket().exists() && self.ctl(&["status"]).success() {
                return;
            }
            if Instant::now() > deadline {
                panic!("blockd did not become ready in time; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits for the daemon to exit and returns its status (panics after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("daemon is running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait for blockd") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "blockd did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait: returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(STOP_TIMEOUT)
    }

    /// SIGKILL and wait (a crash).
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let status = self.wait_exit(STOP_TIMEOUT);
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    /// Starts the daemon again on the same state directory with the same flags.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
        self.wait_ready();
    }

    /// Runs another `blockd` with this daemon's flags and returns its output (for the
    /// second-daemon test); it is killed if it does not exit within the timeout.
    pub fn run_second(&self, timeout: Duration) -> CtlOutput {
        let mut child = Command::new(binary("blockd"))
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a second blockd");
        if wait_timeout(&mut child, timeout).is_none() {
            panic!("the second blockd did not exit within {timeout:?}");
        }
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut stdout);
        }
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut stderr);
        }
        CtlOutput {
            status: child.wait().expect("wait"),
            stdout,
            stderr,
        }
    }

    /// Runs `blockctl --api <this daemon> ARGS...`.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        let out = ctl_command(&self.api_socket())
            .args(args)
            .output()
            .expect("run blockctl");
        CtlOutput::from(out)
    }

    /// Runs blockctl and panics (with its stderr and the daemon's log) unless it succeeds;
    /// returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.success(),
            "blockctl {} failed ({}): {}\ndaemon log:\n{}",
            args.join(" "),
            out.status,
            out.stderr,
            self.log()
        );
        out.stdout
    }

    /// Runs blockctl with `-o json` and parses stdout, which must be one JSON value.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let stdout = self.ctl_ok(&all);
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "blockctl {} printed non-JSON ({e}): {stdout:?}",
                all.join(" ")
            )
        })
    }

    /// Runs blockctl expecting failure: checks the exit code is non-zero and stderr is
    /// exactly one line starting with `error:`; returns that line.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            !out.success(),
            "blockctl {} should have failed; stdout: {}",
            args.join(" "),
            out.stdout
        );
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "blockctl {} should print one line on stderr, got: {:?}",
            args.join(" "),
            out.stderr
        );
        assert!(lines[0].starts_with("error: "), "{:?}", lines[0]);
        lines[0].to_string()
    }

    /// tonic clients connected to this daemon.
    pub async fn grpc(&self) -> Grpc {
        let channel = blockd_proto::connect_unix(self.api_socket())
            .await
            .expect("connect to the daemon's API socket");
        Grpc {
            pools: PoolServiceClient::new(channel.clone()),
            volumes: VolumeServiceClient::new(channel.clone()),
            snapshots: SnapshotServiceClient::new(channel.clone()),
            exports: ExportServiceClient::new(channel.clone()),
            daemon: DaemonServiceClient::new(channel.clone()),
            channel,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("--- blockd log ---\n{}--- end ---", self.log());
            }
        }
    }
}

/// Opens (creating) a process log for appending, so restarts add to one file.
fn append_log(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("log file {}: {e}", path.display()))
}

/// A `blockctl` command aimed at `api` and isolated from the caller's environment.
pub fn ctl_command(api: &Path) -> Command {
    let mut cmd = Command::new(binary("blockctl"));
    cmd.arg("--api")
        .arg(api)
        .env_remove("BLOCKD_API")
        .stdin(Stdio::null());
    cmd
}

/// A free TCP port on 127.0.0.1 (bound, then released for the daemon to take).
pub fn free_local_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// A blocking `GET path` on 127.0.0.1:port; returns the response (status line, headers
/// and body).
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("read response");
    response
}

/// A tokio runtime for tests that use the gRPC clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Whether `tool` is on PATH. Tests that need a missing tool call [`skip`] and return
/// (tools/test.sh installs every tool they use).
pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the environment variable `CI` says this is a CI run (`true` or `1`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Waits up to `timeout` for `child` to exit and reaps it: its exit status, or `None` when
/// it did not exit in time (it is then killed and reaped).
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child process") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reports that a test cannot run here (no root, no `/dev/fuse`, a missing tool): prints
/// `skipping: {reason}`, after which the caller returns. Under `CI=true` (or `CI=1`) it
/// panics instead, so that a test cannot pass in CI by not running.
pub fn skip(reason: &str) {
    if in_ci() {
        panic!("CI=true: this test cannot be skipped: {reason}");
    }
    eprintln!("skipping: {reason}");
}

/// Whether this process runs as root (mounts, loop devices and NBD devices need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A `csi-shim` process serving on a socket in its own temporary directory, talking to a
/// [`Daemon`]'s API. Dropping it kills the process.
pub struct CsiShim {
    child: Option<Child>,
    args: Vec<String>,
    /// Extra environment of the process (e.g. csi-shim's crash points).
    env: Vec<(String, String)>,
    log_path: PathBuf,
    socket: PathBuf,
    state_dir: PathBuf,
    // Declared last: dropped after the process is gone.
    dir: tempfile::TempDir,
}

impl CsiShim {
    /// Starts `csi-shim --mode all` for node `node_id` against `daemon`, with `extra_args`
    /// (e.g. `["--attach", "fuse-loop"]`), and waits until its socket answers.
    pub fn start(daemon: &Daemon, node_id: &str, extra_args: &[&str]) -> CsiShim {
        CsiShim::start_with_env(daemon, node_id, extra_args, &[])
    }

    /// [`CsiShim::start`] with extra environment variables for the process.
    pub fn start_with_env(
        daemon: &Daemon,
        node_id: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> CsiShim {
        let dir = tempfile::Builder::new()
            .prefix("csi-shim-test-")
            .tempdir()
            .expect("temporary directory for csi-shim");
        let socket = dir.path().join("csi.sock");
        let state_dir = dir.path().join("state");
        let mut args = vec![
            "--endpoint".to_string(),
            format!("unix://{}", socket.display()),
            "--blockd-api".to_string(),
            daemon.api_socket().display().to_string(),
            "--node-id".to_string(),
            node_id.to_string(),
            "--state-dir".to_string(),
            state_dir.display().to_string(),
        ];
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let mut shim = CsiShim {
            child: None,
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log_path: dir.path().join("csi-shim.log"),
            socket,
            state_dir,
            dir,
        };
        shim.spawn();
        shim
    }

    fn spawn(&mut self) {
        let log = append_log(&self.log_path);
        let child = Command::new(binary("csi-shim"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("CSI_SHIM_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn csi-shim");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "csi-shim exited during start-up with {status}; log:\n{}",
                    self.log()
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!("csi-shim did not start in time; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The CSI endpoint socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `--state-dir` given to csi-shim.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A scratch directory that lives as long as this shim (for staging and target paths).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Everything csi-shim logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A gRPC channel to the CSI endpoint.
    pub async fn channel(&self) -> Channel {
        blockd_proto::connect_unix(&self.socket)
            .await
            .expect("connect to the csi-shim socket")
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(&mut self, signal: i32) -> ExitStatus {
        let mut child = self.child.take().expect("csi-shim is running");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill csi-shim");
        wait_timeout(&mut child, STOP_TIMEOUT)
            .unwrap_or_else(|| panic!("csi-shim did not exit in time; log:\n{}", self.log()))
    }

    /// Starts csi-shim again with the same flags and state directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop csi-shim first");
        self.spawn();
    }

    /// Starts csi-shim again with the same flags and state directory and with `env` as
    /// its extra environment (replacing the one it was started with).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart();
    }

    /// Waits for a csi-shim that ends by itself (say, at a crash point) and reaps it.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("csi-shim was started");
        wait_timeout(&mut child, STOP_TIMEOUT)
            .unwrap_or_else(|| panic!("csi-shim did not exit; log:\n{}", self.log()))
    }
}

impl Drop for CsiShim {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("--- csi-shim log ---\n{}--- end ---", self.log());
            }
        }
        sweep(self.dir.path());
    }
}

/// Removes everything a test's csi-shim may have left under `root` (a failed test must
/// not leak into the next one or the machine): the detached helpers it started (proxies,
/// FUSE servers) are killed, loop devices backed by files under `root` are detached, and
/// mounts under `root` are unmounted, deepest first.
pub fn sweep(root: &Path) {
    let root_text = root.display().to_string();
    // Loop devices first: their backing files live on FUSE mounts under `root`.
    if let Ok(out) = Command::new("losetup")
        .args(["-n", "-O", "NAME,BACK-FILE", "-l"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut fields = line.split_whitespace();
            if let (Some(dev), Some(back)) = (fields.next(), fields.next()) {
                if back.starts_with(&root_text) {
                    let _ = Command::new("losetup").args(["-d", dev]).status();
                }
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&root_text))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").arg("-l").arg(point).status();
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&root_text) {
                // SAFETY: kill(2) with a pid read from /proc; at worst the process is gone.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// blockd's CreateSnapshot of `volume` as `name` (a plain snapshot, not a replica).
pub fn snapshot_request(volume: &str, name: &str) -> blockd_proto::v1::CreateSnapshotRequest {
    blockd_proto::v1::CreateSnapshotRequest {
        volume: volume.into(),
        name: name.into(),
        replica_of: String::new(),
    }
}

/// Asserts that a gRPC call failed with `code` and a message that mentions `needle` (the
/// field at fault, for `INVALID_ARGUMENT`); `what` names the call in the failure.
pub fn expect_status<T: std::fmt::Debug>(
    what: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    match result {
        Ok(answer) => panic!(
            "{what}: expected {code:?}, got OK {:?}",
            answer.into_inner()
        ),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            assert!(
                status.message().contains(needle),
                "{what}: message {:?} should mention {needle:?}",
                status.message()
            );
        }
    }
}

/// Runs qemu-io commands on the NBD `uri`; panics when one fails (a pattern mismatch
/// included).
pub fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} on {uri}: {text}"
    );
}
