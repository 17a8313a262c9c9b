//! `proxy::spawn_detached` runs the real `csi-nbd-proxy` binary in a session of its own
//! (so a csi-shim restart or a signal to csi-shim's process group does not reach it),
//! writes its pid file, replaces a stale socket, and exits cleanly on SIGTERM.

use std::path::Path;
use std::time::{Duration, Instant};

use csi_shim::proxy::{spawn_detached, Config, DEFAULT_JOURNAL_LIMIT};

#[test]
fn detached_proxy_runs_in_its_own_session_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = dir.path().join("proxy.sock");
    // A stale socket file from a killed predecessor.
    drop(std::os::unix::net::UnixListener::bind(&listen).expect("stale socket"));
    let cfg = Config {
        listen: listen.clone(),
        upstream_socket: dir.path().join("no-blockd.sock"),
        export: "v1".into(),
        reconnect_timeout: Duration::from_secs(5),
        journal_limit: DEFAULT_JOURNAL_LIMIT,
        exit_after_disconnect: false,
    };
    let pidfile = dir.path().join("proxy.pid");
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = spawn_detached(
        Path::new(env!("CARGO_BIN_EXE_csi-nbd-proxy")),
        &cfg,
        Some(&pidfile),
        Some(log),
    )
    .expect("spawn the proxy");
    let pid = child.id() as libc::pid_t;
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&listen).is_err() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "proxy exited: {}",
            log()
        );
        assert!(Instant::now() < deadline, "proxy did not listen: {}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: getsid(2) on a pid we spawned and have not reaped; no memory involved.
    let (sid, ours) = unsafe { (libc::getsid(pid), libc::getsid(0)) };
    assert_eq!(sid, pid, "the proxy leads its own session");
    assert_ne!(sid, ours);
    let written = std::fs::read_to_string(&pidfile).expect("pid file");
    assert_eq!(written.trim(), pid.to_string());
    // JSON logs with structured fields.
    assert!(log().contains("\"listen\""), "{}", log());

    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit on SIGTERM: {}", log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", log());
    assert!(!listen.exists(), "socket left behind");
    assert!(!pidfile.exists(), "pid file left behind");
}
