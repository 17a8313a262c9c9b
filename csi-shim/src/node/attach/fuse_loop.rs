//! The fuse-loop attacher, for nodes without the kernel `nbd` module.
//!
//! ```text
//!   WORK/                         per-volume work directory (see attach/mod.rs)
//!   ├── fuse/                     FUSE mount point, served by csi-fuse-nbd (or nbdfuse)
//!   │   └── nbd                   the export as a file  ──losetup --direct-io=on──▶ /dev/loopN
//!   ├── fuse.pid, fuse.log, size  (the FUSE server; `size` is what it should grow to)
//!   └── proxy.sock, proxy.pid, proxy.log   (csi-nbd-proxy, when installed)
//! ```
//!
//! Invariants:
//! - the FUSE server (and the proxy) run in their own sessions with their output in log
//!   files, so they outlive a csi-shim restart; the FUSE server connects through the
//!   proxy when the proxy binary is installed next to csi-shim, so that it never sees
//!   blockd restart;
//! - the FUSE server is csi-fuse-nbd when installed next to csi-shim (its file grows with
//!   the export, so volumes expand online), else nbdfuse (whose file keeps its size);
//! - the loop device runs in direct-I/O mode, so no second page cache sits between the file
//!   system and blockd, and FLUSH from the file system reaches blockd;
//! - [`detach`] works from the work directory alone (loop devices are found through
//!   `/sys/block/loop*/loop/backing_file`, processes through their pid files, checked
//!   against `/proc/PID/comm` before any signal), so it undoes half-made attachments too.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use blockd_proto::nbd_uri::NbdUri;

use super::Attachment;
use crate::node::error::{NodeError, Result};
use crate::node::{exec, fs, mount};
use crate::proxy::DEFAULT_RECONNECT_TIMEOUT;

/// The file the FUSE server presents in its mount point.
const FUSE_FILE: &str = "nbd";
/// The FUSE servers, by command name.
const NBDFUSE: &str = "nbdfuse";
const FUSE_FILE_SERVER: &str = "csi-fuse-nbd";

/// Helper binaries found next to csi-shim.
#[derive(Debug, Clone, Default)]
pub struct Helpers {
    /// csi-nbd-proxy: hides blockd restarts from the FUSE server.
    pub proxy: Option<PathBuf>,
    /// csi-fuse-nbd: a FUSE file whose size follows the export (online expansion);
    /// nbdfuse is used when it is absent.
    pub fuse_file: Option<PathBuf>,
}
/// How long nbdfuse and the proxy may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a helper process may take to exit after its work is undone, and after each
/// signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a proxy whose client has gone may take to exit before it is signalled.
const PROXY_IDLE_GRACE: Duration = Duration::from_millis(200);

fn fuse_dir(dir: &Path) -> PathBuf {
    dir.join("fuse")
}

fn fuse_file(dir: &Path) -> PathBuf {
    fuse_dir(dir).join(FUSE_FILE)
}

/// Attaches `volume`, exported by blockd at `uri`, through nbdfuse and a loop device.
pub async fn attach(dir: &Path, volume: &str, uri: &str, helpers: &Helpers) -> Result<Attachment> {
    let proxy = helpers.proxy.as_deref();
    // Leftovers of an attachment that crashed half-way.
    detach(dir).await?;
    std::fs::create_dir_all(fuse_dir(dir))
        .map_err(|e| NodeError::io(format!("Creating {}", fuse_dir(dir).display()), e))?;

    let upstream = socket_of(uri).ok_or_else(|| {
        NodeError::io(
            format!("blockd returned export URI {uri:?} without a socket"),
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        )
    })?;
    let (nbd_uri, nbd_socket, proxy_pid) = match proxy {
        Some(binary) => {
            let pid = match start_proxy(dir, binary, &upstream, volume, false).await {
                Ok(pid) => pid,
                Err(err) => {
                    let _ = detach(dir).await;
                    return Err(err);
                }
            };
            let socket = dir.join("proxy.sock");
            (NbdUri::unix(volume, &socket).to_string(), socket, Some(pid))
        }
        None => (uri.to_string(), upstream, None),
    };

    let result = async {
        let (fuse_server, fuse_pid) = match &helpers.fuse_file {
            Some(binary) => (
                FUSE_FILE_SERVER.to_string(),
                start_fuse_file(dir, binary, &nbd_socket, volume).await?,
            ),
            None => (NBDFUSE.to_string(), start_nbdfuse(dir, &nbd_uri).await?),
        };
        let file = fuse_file(dir);
        let out = exec::run(
            "losetup",
            &[
                Path::new("-f"),
                Path::new("--show"),
                Path::new("--direct-io=on"),
                &file,
            ],
            exec::SHORT,
        )
        .await?;
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(Attachment::FuseLoop {
            dir: dir.to_path_buf(),
            device,
            fuse_server,
            fuse_pid,
            proxy_pid,
            uri: nbd_uri.clone(),
        })
    }
    .await;
    if result.is_err() {
        if let Err(cleanup) = detach(dir).await {
            tracing::warn!(dir = %dir.display(), error = %cleanup, "cleanup after a failed attach failed");
        }
    }
    result
}

/// Undoes everything under `dir`: loop devices on its FUSE file, the FUSE mount, nbdfuse,
/// the proxy, the directory. Idempotent.
pub async fn detach(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let file = fuse_file(dir);
    for device in loops_backed_by(&file) {
        let out = exec::run_unchecked("losetup", &[Path::new("-d"), &device], exec::SHORT).await?;
        if !out.status.success() && device_backed_by(&device, &file) {
            return Err(exec::failed("losetup", &[Path::new("-d"), &device], &out));
        }
        tracing::info!(device = %device.display(), "loop device detached");
    }
    // The loop device lets go of the FUSE file asynchronously; retry a busy unmount.
    let fuse = fuse_dir(dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match mount::unmount(&fuse).await {
            Ok(()) => break,
            Err(err) if Instant::now() < deadline => {
                tracing::debug!(mount_point = %fuse.display(), error = %err, "retrying FUSE unmount");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(err),
        }
    }
    stop_process(
        &dir.join("fuse.pid"),
        &[NBDFUSE, FUSE_FILE_SERVER],
        EXIT_TIMEOUT,
    )
    .await;
    // The proxy's only client, the FUSE server, is gone: it has nothing left to do.
    stop_proxy(dir, PROXY_IDLE_GRACE).await;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::io(format!("Removing {}", dir.display()), e)),
    }
}

/// Makes the FUSE file and the loop device follow a grown export; returns the device
/// size.
///
/// csi-fuse-nbd re-reads the size when the size file names a larger one and the file is
/// stat'ed (see [`crate::fuse`]); `losetup -c` then re-reads the file size into the loop
/// device. nbdfuse learns the export size once, at connect time, so with nbdfuse the
/// device cannot grow online.
pub async fn refresh_size(attachment: &Attachment, volume_size: u64) -> Result<u64> {
    let Attachment::FuseLoop {
        device,
        dir,
        fuse_server,
        ..
    } = attachment
    else {
        return Err(NodeError::BadCapability("not a fuse-loop attachment"));
    };
    let size_file = dir.join("size");
    std::fs::write(&size_file, format!("{volume_size}\n"))
        .map_err(|e| NodeError::io(format!("Writing {}", size_file.display()), e))?;
    let file = fuse_file(dir);
    let stat = tokio::task::spawn_blocking(move || std::fs::metadata(&file)).await;
    let context = || format!("Reading the size of {}", fuse_file(dir).display());
    match stat {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(NodeError::io(context(), e)),
        Err(e) => return Err(NodeError::io(context(), std::io::Error::other(e))),
    }
    exec::run("losetup", &[Path::new("-c"), device], exec::SHORT).await?;
    let size = fs::device_size(device)
        .map_err(|e| NodeError::io(format!("Reading the size of {}", device.display()), e))?;
    if size < volume_size {
        return Err(NodeError::OnlineGrowUnsupported {
            device: device.clone(),
            device_size: size,
            volume_size,
            detail: format!(
                "the FUSE server {fuse_server} (log {}) did not pick up the new size{}",
                dir.join("fuse.log").display(),
                if fuse_server == NBDFUSE {
                    "; nbdfuse serves the size it saw at connect time: install \
                     csi-fuse-nbd next to csi-shim"
                } else {
                    ""
                }
            ),
        });
    }
    Ok(size)
}

/// Why the attachment cannot serve I/O, if it cannot.
pub fn problem(attachment: &Attachment) -> Option<String> {
    let Attachment::FuseLoop {
        dir,
        device,
        fuse_server,
        fuse_pid,
        proxy_pid,
        ..
    } = attachment
    else {
        return None;
    };
    if !process_is(*fuse_pid, fuse_server) {
        return Some(format!(
            "the FUSE server {fuse_server} (pid {fuse_pid}) is not running, so {} has no \
             backing file; see {}",
            device.display(),
            dir.join("fuse.log").display()
        ));
    }
    if let Some(pid) = proxy_pid {
        if !process_is(*pid, "csi-nbd-proxy") {
            return Some(format!(
                "csi-nbd-proxy (pid {pid}) is not running; see {}",
                dir.join("proxy.log").display()
            ));
        }
    }
    if !device_backed_by(device, &fuse_file(dir)) {
        return Some(format!(
            "loop device {} is no longer attached to {}",
            device.display(),
            fuse_file(dir).display()
        ));
    }
    None
}

/// The socket path of an `nbd+unix:///IMAGE?socket=PATH` URI.
pub(super) fn socket_of(uri: &str) -> Option<PathBuf> {
    NbdUri::parse(uri).ok()?.socket().map(Path::to_path_buf)
}

/// A command that runs in its own session with its output appended to `log`.
fn detached(program: &Path, log: &Path) -> Result<tokio::process::Command> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| NodeError::io(format!("Opening {}", log.display()), e))?;
    let err = file
        .try_clone()
        .map_err(|e| NodeError::io(format!("Opening {}", log.display()), e))?;
    let mut std_cmd = std::process::Command::new(program);
    std_cmd.stdin(Stdio::null()).stdout(file).stderr(err);
    // SAFETY: the closure runs in the child between fork and exec and only calls setsid(2),
    // which is async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        std_cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(tokio::process::Command::from(std_cmd))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(5);
    let joined = lines[start..].join(" | ");
    if joined.is_empty() {
        "(no output)".to_string()
    } else {
        joined
    }
}

/// Starts nbdfuse on `uri` and waits until it serves the file; returns its pid.
async fn start_nbdfuse(dir: &Path, uri: &str) -> Result<u32> {
    let mut cmd = detached(Path::new(NBDFUSE), &dir.join("fuse.log"))?;
    let pidfile = dir.join("fuse.pid");
    cmd.arg("-P").arg(&pidfile).arg(fuse_dir(dir)).arg(uri);
    let rendered = format!(
        "nbdfuse -P {} {} {uri}",
        pidfile.display(),
        fuse_dir(dir).display()
    );
    wait_fuse_ready(dir, cmd, rendered).await
}

/// Starts csi-fuse-nbd on `socket`/`export` and waits until it serves the file.
async fn start_fuse_file(dir: &Path, binary: &Path, socket: &Path, export: &str) -> Result<u32> {
    let mut cmd = detached(binary, &dir.join("fuse.log"))?;
    let pidfile = dir.join("fuse.pid");
    let size_file = dir.join("size");
    cmd.arg("--mount")
        .arg(fuse_dir(dir))
        .arg("--socket")
        .arg(socket)
        .arg("--export")
        .arg(export)
        .arg("--size-file")
        .arg(&size_file)
        .arg("--pidfile")
        .arg(&pidfile);
    let rendered = format!(
        "{} --mount {} --socket {} --export {export} --size-file {} --pidfile {}",
        binary.display(),
        fuse_dir(dir).display(),
        socket.display(),
        size_file.display(),
        pidfile.display()
    );
    wait_fuse_ready(dir, cmd, rendered).await
}

/// Spawns a FUSE server command and waits for its pid file and file; returns its pid.
async fn wait_fuse_ready(
    dir: &Path,
    cmd: tokio::process::Command,
    rendered: String,
) -> Result<u32> {
    let pidfile = dir.join("fuse.pid");
    let _ = std::fs::remove_file(&pidfile);
    let pid = spawn_until_ready(cmd, &rendered, &dir.join("fuse.log"), |_| {
        read_pid(&pidfile).filter(|_| fuse_file(dir).exists())
    })
    .await?;
    // Dropping the handle leaves the server running; tokio reaps it when it exits.
    tracing::info!(pid, command = %rendered, "FUSE server serving");
    Ok(pid)
}

/// Spawns `cmd` (a detached helper logging to `log`) and polls `ready` until it yields
/// the helper's pid. Fails with the helper's log when it exits first, and kills it when it
/// is not ready within [`READY_TIMEOUT`]. `ready` gets the pid the child was spawned with.
async fn spawn_until_ready(
    mut cmd: tokio::process::Command,
    rendered: &str,
    log: &Path,
    mut ready: impl FnMut(u32) -> Option<u32>,
) -> Result<u32> {
    let mut child = cmd
        .spawn()
        .map_err(|e| NodeError::io(format!("Cannot run `{rendered}`"), e))?;
    let spawned = child.id().unwrap_or_default();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| NodeError::io(format!("Waiting for `{rendered}`"), e))?
        {
            return Err(NodeError::Command {
                command: rendered.to_string(),
                status: status.to_string(),
                stderr: tail(log),
            });
        }
        if let Some(pid) = ready(spawned) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(NodeError::CommandTimeout {
                command: format!("{rendered} (log: {})", tail(log)),
                timeout: READY_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts the reconnecting proxy for `volume` and waits for its socket; returns its pid.
/// With `exit_after_disconnect` (a kernel client) it exits once its clients disconnected
/// with `NBD_CMD_DISC`.
pub(super) async fn start_proxy(
    dir: &Path,
    binary: &Path,
    upstream: &Path,
    volume: &str,
    exit_after_disconnect: bool,
) -> Result<u32> {
    let socket = dir.join("proxy.sock");
    let pidfile = dir.join("proxy.pid");
    let log = dir.join("proxy.log");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = detached(binary, &log)?;
    cmd.arg("--listen")
        .arg(&socket)
        .arg("--upstream-socket")
        .arg(upstream)
        .arg("--export")
        .arg(volume)
        .arg("--pidfile")
        .arg(&pidfile)
        // Said explicitly: the kernel attacher's timeouts are derived from it.
        .arg("--reconnect-timeout")
        .arg(DEFAULT_RECONNECT_TIMEOUT.as_secs().to_string());
    if exit_after_disconnect {
        cmd.arg("--exit-after-disconnect");
    }
    let rendered = format!(
        "{} --listen {} --upstream-socket {} --export {volume} --pidfile {} \
         --reconnect-timeout {}{}",
        binary.display(),
        socket.display(),
        upstream.display(),
        pidfile.display(),
        DEFAULT_RECONNECT_TIMEOUT.as_secs(),
        if exit_after_disconnect {
            " --exit-after-disconnect"
        } else {
            ""
        }
    );
    let pid = spawn_until_ready(cmd, &rendered, &log, |pid| {
        std::os::unix::net::UnixStream::connect(&socket)
            .is_ok()
            .then_some(pid)
    })
    .await?;
    // The pid file is the proxy's to write; make sure detach can find it anyway.
    if read_pid(&pidfile).is_none() {
        let _ = std::fs::write(&pidfile, format!("{pid}\n"));
    }
    tracing::info!(pid, socket = %socket.display(), upstream = %upstream.display(), "csi-nbd-proxy serving");
    Ok(pid)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live (not zombie) process whose command name is `name`.
pub(super) fn process_is(pid: u32, name: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses; take the last ')'.
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let comm = stat
        .find('(')
        .map(|open| &stat[open + 1..close])
        .unwrap_or_default();
    let state = stat[close + 1..].trim_start().chars().next();
    // The kernel truncates COMM to 15 bytes.
    let expected = &name[..name.len().min(15)];
    comm == expected && !matches!(state, Some('Z') | Some('X') | None)
}

/// Stops the proxy of the work directory `dir`, if one runs: waits `grace` for it to exit
/// by itself, then signals it.
pub(super) async fn stop_proxy(dir: &Path, grace: Duration) {
    stop_process(&dir.join("proxy.pid"), &["csi-nbd-proxy"], grace).await;
}

/// Waits up to `grace` for the process in `pidfile` to exit (it should, once its mount or
/// its clients are gone); then SIGTERM, then SIGKILL, [`EXIT_TIMEOUT`] each. Signals only
/// a live process with one of `names`.
async fn stop_process(pidfile: &Path, names: &[&str], grace: Duration) {
    let Some(pid) = read_pid(pidfile) else {
        return;
    };
    let Some(name) = names.iter().copied().find(|n| process_is(pid, n)) else {
        return;
    };
    let signal_and_wait = |signal: Option<i32>, wait: Duration| async move {
        if let Some(signal) = signal {
            if process_is(pid, name) {
                if signal == libc::SIGKILL {
                    tracing::warn!(
                        pid,
                        process = name,
                        signal,
                        "killing a helper that ignored SIGTERM"
                    );
                } else {
                    tracing::info!(pid, process = name, signal, "signalling a helper to stop");
                }
                // SAFETY: kill(2) with a pid we just checked is a live `name` process.
                unsafe { libc::kill(pid as libc::pid_t, signal) };
            }
        }
        let deadline = Instant::now() + wait;
        while process_is(pid, name) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    };
    if signal_and_wait(None, grace).await {
        return;
    }
    if signal_and_wait(Some(libc::SIGTERM), EXIT_TIMEOUT).await {
        return;
    }
    signal_and_wait(Some(libc::SIGKILL), EXIT_TIMEOUT).await;
}

/// The loop devices whose backing file is `file`.
fn loops_backed_by(file: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("loop"))
        .map(|name| PathBuf::from("/dev").join(name))
        .filter(|device| device_backed_by(device, file))
        .collect()
}

/// Whether loop device `device` is attached to `file`.
fn device_backed_by(device: &Path, file: &Path) -> bool {
    let Some(name) = device.file_name() else {
        return false;
    };
    let sys = Path::new("/sys/block")
        .join(name)
        .join("loop")
        .join("backing_file");
    std::fs::read_to_string(sys).is_ok_and(|backing| {
        let backing = backing.trim_end();
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        Path::new(backing) == file
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_uris_yield_their_socket() {
        assert_eq!(
            socket_of("nbd+unix:///vol?socket=/run/blockd/nbd.sock"),
            Some(PathBuf::from("/run/blockd/nbd.sock"))
        );
        assert_eq!(
            socket_of("nbd+unix:///vol?tls=off&socket=/a%20b/nbd.sock"),
            Some(PathBuf::from("/a b/nbd.sock"))
        );
        assert_eq!(socket_of("nbd+unix:///vol"), None);
        let odd = Path::new("/state/attach/node-a%2Fv ol/proxy.sock");
        assert_eq!(
            socket_of(&NbdUri::unix("v", odd).to_string()).as_deref(),
            Some(odd)
        );
    }

    #[test]
    fn processes_are_matched_by_name_and_liveness() {
        let me = std::process::id();
        let comm = std::fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        assert!(process_is(me, comm.trim()));
        assert!(!process_is(me, "nbdfuse"));
        assert!(!process_is(u32::MAX, "nbdfuse"));
    }

    #[test]
    fn nothing_is_backed_by_a_file_that_does_not_exist() {
        assert!(loops_backed_by(Path::new("/nonexistent/fuse/nbd")).is_empty());
    }
}
