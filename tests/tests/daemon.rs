//! The daemon as a process: locking, sockets, signals, crash recovery, configuration,
//! metrics, health.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockd_proto::v1;
use blockd_tests::{binary, free_local_port, http_get, runtime, snapshot_request, Daemon};

#[test]
fn a_second_daemon_on_the_same_state_dir_refuses_to_start() {
    let d = Daemon::start();
    let second = d.run_second(Duration::from_secs(60));
    assert!(!second.status.success(), "the second blockd started");
    let lines: Vec<&str> = second.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {:?}", second.stderr);
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("in use by another blockd"),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(&format!("pid {}", d.pid())),
        "{}",
        lines[0]
    );
    // The first one is unharmed and still owns its socket.
    d.ctl_ok(&["status"]);
}

#[test]
fn the_api_socket_is_private() {
    let d = Daemon::start();
    let mode = std::fs::metadata(d.api_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn sigterm_exits_cleanly_and_removes_the_socket() {
    let mut d = Daemon::start();
    d.ctl_ok(&["volume", "create", "v", "--size", "1M"]);
    let status = d.stop();
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
    assert!(!d.api_socket().exists());
    let log = d.log();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("blockd stopped"), "{log}");
}

#[test]
fn sigint_exits_cleanly() {
    let mut d = Daemon::start();
    d.signal(libc::SIGINT);
    let status = d.wait_exit(blockd_tests::STOP_TIMEOUT);
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
}

/// SIGTERM while clients hammer the API: the daemon exits 0, and after a restart every
/// create it acknowledged is there and the metadata is consistent.
#[test]
fn sigterm_during_load_exits_cleanly() {
    let mut d = Daemon::start();
    let rt = runtime();
    let acked = Arc::new(parking_lot_free::AckLog::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));

    let mut workers = Vec::new();
    for worker in 0..8 {
        let api = d.api_socket();
        let acked = acked.clone();
        let stop = stop.clone();
        let started = started.clone();
        workers.push(rt.spawn(async move {
            let Ok(channel) = blockd_proto::connect_unix(api).await else {
                return;
            };
            let mut volumes = v1::volume_service_client::VolumeServiceClient::new(channel.clone());
            let mut snapshots = v1::snapshot_service_client::SnapshotServiceClient::new(channel);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{worker}-v{i}");
                started.fetch_add(1, Ordering::Relaxed);
                let created = volumes
                    .create_volume(v1::CreateVolumeRequest {
                        name: name.clone(),
                        size_bytes: Some(1 << 20),
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(_) => acked.push(name.clone()),
                    Err(_) => break, // the daemon is going away
                }
                if i % 3 == 0 {
                    let snap = format!("{name}-s");
                    if snapshots
                        .create_snapshot(snapshot_request(&name, &snap))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                i += 1;
            }
        }));
    }
    // Let the load build up, then terminate mid-flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while started.load(Ordering::Relaxed) < 40 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(blockd_tests::STOP_TIMEOUT);
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for w in workers {
            let _ = w.await;
        }
    });
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
    let acked = acked.take();
    assert!(
        acked.len() >= 10,
        "only {} creates went through",
        acked.len()
    );

    d.restart();
    let list = d.ctl_json(&["volume", "list"]);
    let present: std::collections::HashSet<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    for name in &acked {
        assert!(
            present.contains(name),
            "acknowledged volume {name} was lost"
        );
    }
    let fsck = d.ctl(&["fsck"]);
    assert!(
        fsck.success(),
        "fsck after SIGTERM under load: {}",
        fsck.stdout
    );
}

/// SIGTERM while an NBD client writes: the daemon closes the connection gracefully and
/// exits 0; after a restart the metadata is consistent and nothing acknowledged before
/// the signal is missing (a clean shutdown commits every acknowledged write).
#[test]
fn sigterm_during_nbd_writes_exits_cleanly() {
    if !blockd_tests::have_tool("qemu-io") {
        blockd_tests::skip("qemu-io is not installed (tools/test.sh installs it)");
        return;
    }
    let mut d = Daemon::start();
    d.ctl_ok(&["volume", "create", "busy", "--size", "256M"]);
    let uri = d.ctl_ok(&["export", "busy"]).trim().to_string();
    let commands: Vec<String> = (0..256u64)
        .map(|i| format!("write -P 0x5a {} 1M", i << 20))
        .collect();
    let mut args = vec!["-f".to_string(), "raw".to_string(), uri];
    for c in &commands {
        args.push("-c".into());
        args.push(c.clone());
    }
    let mut writer = std::process::Command::new("qemu-io")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn qemu-io");
    let allocated = |d: &Daemon| {
        d.ctl_json(&["volume", "show", "busy"])["allocated_bytes"]
            .as_u64()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut before = 0;
    while before < (4 << 20) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        before = allocated(&d);
    }
    assert!(
        before > 0,
        "the NBD writer made no progress; log:\n{}",
        d.log()
    );
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(blockd_tests::STOP_TIMEOUT);
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());

    d.restart();
    assert!(
        allocated(&d) >= before,
        "acknowledged writes were lost: {} < {before}",
        allocated(&d)
    );
    let fsck = d.ctl(&["fsck"]);
    assert!(fsck.success(), "fsck: {}", fsck.stdout);
}

/// Unexport refuses new NBD connections and, forced, closes the open ones; without
/// --force it refuses while a client is connected (delete too: see `cli_safety.rs`).
#[test]
fn unexport_closes_open_nbd_connections() {
    if !blockd_tests::have_tool("qemu-io") {
        blockd_tests::skip("qemu-io is not installed (tools/test.sh installs it)");
        return;
    }
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "shared", "--size", "16M"]);
    let uri = d.ctl_ok(&["export", "shared"]).trim().to_string();
    // An interactive client: one read while exported, one after the unexport.
    let mut client = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn qemu-io");
    let mut stdin = client.stdin.take().unwrap();
    writeln!(stdin, "read 0 64k").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let err = d.ctl_err(&["unexport", "shared"]);
    assert!(
        err.contains("1 NBD client is connected") && err.contains("--force"),
        "{err}"
    );
    d.ctl_ok(&["unexport", "shared", "--force"]);
    writeln!(stdin, "read 0 64k").unwrap();
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    let out = client.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        text.matches("read 65536/65536 bytes").count(),
        1,
        "the first read works, the one after unexport does not: {text}"
    );
    let refused = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read 0 4k"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&refused.stderr).to_string()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(
        !refused.status.success() || text.contains("error") || text.contains("failed"),
        "an unexported image opened: {text}"
    );
}

/// A `kill -9` leaves a stale socket and a lock file: the next start needs no cleanup.
#[test]
fn restart_after_kill_9_needs_no_cleanup() {
    let mut d = Daemon::start();
    d.ctl_ok(&["volume", "create", "survivor", "--size", "4M"]);
    d.ctl_ok(&["export", "survivor"]);
    d.kill();
    assert!(
        d.api_socket().exists(),
        "the killed daemon leaves its socket behind"
    );
    d.restart();
    assert_eq!(
        d.ctl_json(&["volume", "show", "survivor"])["size_bytes"],
        4 << 20
    );
    assert_eq!(d.ctl_json(&["exports"])[0]["image"], "survivor");
    assert!(d.ctl(&["fsck"]).success());
}

#[test]
fn metrics_are_served() {
    let port = free_local_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--metrics-addr", &addr]);
    d.ctl_ok(&["volume", "create", "m1", "--size", "8M"]);
    d.ctl_ok(&["snapshot", "create", "m1", "m1-s"]);
    let response = http_get(port, "/metrics");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    for needle in [
        "text/plain; version=0.0.4",
        "blockd_pool_capacity_bytes{pool=\"default\"}",
        "blockd_pool_allocated_bytes{pool=\"default\"}",
        "blockd_pool_provisioned_bytes{pool=\"default\"} 8388608",
        "blockd_pool_io_engine_info{pool=\"default\",io_engine=",
        "blockd_snapshots 1",
        "blockd_volumes 1",
        "blockd_volume_size_bytes{volume=\"m1\"} 8388608",
        "blockd_api_requests_total{method=\"CreateVolume\",code=\"Ok\"} 1",
        "blockd_api_request_duration_seconds_bucket",
        "blockd_engine_commits_total",
    ] {
        assert!(response.contains(needle), "missing {needle}:\n{response}");
    }
    let status = d.ctl_json(&["status"]);
    assert_eq!(status["metrics_addr"], addr.as_str());
}

#[test]
fn a_config_file_sets_the_same_settings() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path();
    let config = files.join("blockd.toml");
    let port = free_local_port();
    std::fs::write(
        &config,
        format!(
            r#"
# Overridden by the --state-dir flag the test harness passes.
state-dir = "{files}/unused-state"
metrics-addr = "127.0.0.1:{port}"
io-engine = "sync"
log-format = "json"

[[pool]]
name = "fast"
path = "{files}/fast.img"
size = "1G"
chunk = "128K"

[[pool]]
name = "bulk"
path = "{files}/bulk.img"
size = 536870912
"#,
            files = files.display()
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", config.to_str().unwrap()]);
    assert!(
        !files.join("unused-state").exists(),
        "flags override the file"
    );
    assert!(d.dir().join("meta").exists());
    let pools = d.ctl_json(&["pool", "list"]);
    let pools = pools.as_array().unwrap();
    assert_eq!(pools.len(), 2);
    let fast = pools.iter().find(|p| p["name"] == "fast").unwrap();
    assert_eq!(fast["chunk_size_bytes"], 128 * 1024);
    assert_eq!(fast["io_engine"], "sync");
    assert_eq!(fast["is_default"], true);
    let bulk = pools.iter().find(|p| p["name"] == "bulk").unwrap();
    assert_eq!(bulk["is_default"], false);

    let v = d.ctl_json(&[
        "volume", "create", "on-bulk", "--size", "1M", "--pool", "bulk",
    ]);
    assert_eq!(v["pool"], "bulk");
    let v = d.ctl_json(&["volume", "create", "on-default", "--size", "1M"]);
    assert_eq!(v["pool"], "fast");

    // JSON logs: every line is one JSON object.
    let log = d.log();
    assert!(!log.is_empty());
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(http_get(port, "/metrics").contains("blockd_pool_capacity_bytes{pool=\"bulk\"}"));
}

#[test]
fn bad_flags_and_configs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--io-engine".into(), "fast".into()], "invalid value"),
        (vec!["--pool".into(), "nopath".into()], "Invalid pool"),
        (
            vec!["--pool".into(), format!("p={state}/p.img,chunk=3K")],
            "chunk size",
        ),
        (
            vec!["--config".into(), format!("{state}/missing.toml")],
            "Cannot read config file",
        ),
        (
            vec!["--metrics-addr".into(), "not-an-addr".into()],
            "invalid value",
        ),
    ];
    for (args, expected) in cases {
        let out = std::process::Command::new(binary("blockd"))
            .arg("--state-dir")
            .arg(&state)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "state_dir = 1\n").unwrap();
    let out = std::process::Command::new(binary("blockd"))
        .arg("--config")
        .arg(&bad_toml)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("Invalid config file"), "{stderr}");
}

#[test]
fn grpc_health_and_reflection_are_served() {
    let d = Daemon::start();
    let rt = runtime();
    rt.block_on(async {
        let grpc = d.grpc().await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(grpc.channel.clone());
        for service in ["", "blockd.v1.VolumeService", "blockd.v1.ExportService"] {
            let resp = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.to_string(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                resp.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{service}"
            );
        }
        // Reflection lists every blockd.v1 service (grpcurl and friends rely on it).
        use tonic_reflection::pb::v1 as refl;
        let mut reflection =
            refl::server_reflection_client::ServerReflectionClient::new(grpc.channel.clone());
        let request = refl::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                refl::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut stream = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let response = stream
            .message()
            .await
            .unwrap()
            .expect("a reflection answer");
        let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            response.message_response
        else {
            panic!("unexpected reflection answer: {response:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in [
            "blockd.v1.PoolService",
            "blockd.v1.VolumeService",
            "blockd.v1.SnapshotService",
            "blockd.v1.ExportService",
            "blockd.v1.DaemonService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == service),
                "{service} not in {names:?}"
            );
        }
    });
}

/// A tiny thread-safe list, so this test needs no extra dependency.
mod parking_lot_free {
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct AckLog(Mutex<Vec<String>>);

    impl AckLog {
        pub fn push(&self, name: String) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(name);
        }

        pub fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
        }
    }
}

/// Logs written to a file (stderr not a terminal) carry no ANSI colour codes, from blockd
/// and csi-shim alike: log collectors store them verbatim.
#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let mut d = Daemon::start();
    d.ctl_ok(&["volume", "create", "v", "--size", "1M"]);
    let mut shim = blockd_tests::CsiShim::start(&d, "node-a", &[]);
    let shim_status = shim.stop_with(libc::SIGTERM);
    let status = d.stop();
    assert!(status.success() && shim_status.success());
    for (who, log) in [("blockd", d.log()), ("csi-shim", shim.log())] {
        assert!(log.lines().count() >= 2, "{who} logged nothing:\n{log}");
        assert!(
            !log.contains('\x1b'),
            "{who}'s log has escape codes:\n{log}"
        );
    }
}
