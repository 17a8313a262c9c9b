//! `csi-nbd-proxy` against a real blockd: real clients (qemu-io, nbdinfo, nbdcopy, fio,
//! nbdfuse) read and write through the proxy while blockd is killed and restarted, and a
//! small hand-written NBD client checks the protocol corners.
//!
//! Every test cleans up after itself: the proxy and blockd are killed on drop, the FUSE
//! mount is unmounted by a guard.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockd_tests::nbd::NbdClient;
use blockd_tests::{bin_dir, binary, have_tool, skip, wait_timeout, Daemon};
use nbd_wire::codec::Command as NbdCommand;

const MIB: u64 = 1 << 20;

/// A running `csi-nbd-proxy`; killed on drop.
struct Proxy {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(daemon: &Daemon, export: &str, reconnect_timeout_s: u64) -> Proxy {
        Self::start_with(daemon, export, reconnect_timeout_s, &[])
    }

    fn start_with(
        daemon: &Daemon,
        export: &str,
        reconnect_timeout_s: u64,
        extra: &[&str],
    ) -> Proxy {
        // Builds the workspace binaries (including the proxy) once.
        let _ = binary("blockd");
        let dir = tempfile::Builder::new()
            .prefix("nbd-proxy-test-")
            .tempdir()
            .expect("temporary directory");
        let socket = dir.path().join("proxy.sock");
        let log = dir.path().join("proxy.log");
        let child = Command::new(bin_dir().join("csi-nbd-proxy"))
            .arg("--listen")
            .arg(&socket)
            .arg("--upstream-socket")
            .arg(daemon.nbd_socket())
            .arg("--export")
            .arg(export)
            .arg("--reconnect-timeout")
            .arg(reconnect_timeout_s.to_string())
            .arg("--pidfile")
            .arg(dir.path().join("proxy.pid"))
            .args(extra)
            .env("CSI_NBD_PROXY_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("proxy log"))
            .spawn()
            .expect("spawn csi-nbd-proxy");
        let mut proxy = Proxy {
            child: Some(child),
            socket,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&proxy.socket).is_err() {
            if let Some(status) = proxy
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("proxy exited with {status}; log:\n{}", proxy.log());
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not start; log:\n{}",
                proxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    }

    /// A URI for the proxy; the export name is deliberately not the volume's: the proxy
    /// maps every name to its export.
    fn uri(&self) -> String {
        format!("nbd+unix:///any?socket={}", self.socket.display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("wait proxy").is_none())
    }

    /// SIGTERM; returns whether it exited cleanly within 10 s.
    fn terminate(&mut self) -> bool {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        wait_timeout(&mut child, Duration::from_secs(10)).is_some_and(|status| status.success())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- proxy log ---\n{}--- end ---", self.log());
        }
    }
}

/// Whether every tool in `names` is installed; if not, [`skip`]s naming the first missing.
fn tools(names: &[&str]) -> bool {
    for t in names {
        if !have_tool(t) {
            skip(&format!("{t} is not installed (tools/test.sh installs it)"));
            return false;
        }
    }
    true
}

fn volume(daemon: &Daemon, name: &str, size: &str) -> String {
    daemon.ctl_ok(&["volume", "create", name, "--size", size]);
    daemon.ctl_ok(&["export", name]).trim().to_string()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(uri: &str, command: &str) -> String {
    run_ok(Command::new("timeout").args(["30", "qemu-io", "-f", "raw", "-c", command, uri]))
}

#[test]
fn qemu_io_nbdinfo_and_nbdcopy_through_the_proxy() {
    if !tools(&["qemu-io", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let daemon = Daemon::start();
    let direct = volume(&daemon, "v1", "64M");
    let proxy = Proxy::start(&daemon, "v1", 30);

    let size = run_ok(Command::new("nbdinfo").args(["--size", &proxy.uri()]));
    assert_eq!(size.trim(), (64 * MIB).to_string());

    // Through the proxy, read back directly from blockd ...
    qemu_io(&proxy.uri(), "write -P 0xa5 0 4M");
    let out = qemu_io(&direct, "read -P 0xa5 0 4M");
    assert!(!out.contains("verification failed"), "{out}");
    // ... and the other way round.
    qemu_io(&direct, "write -P 0x5a 8M 1M");
    let out = qemu_io(&proxy.uri(), "read -P 0x5a 8M 1M");
    assert!(!out.contains("verification failed"), "{out}");
    // FUA, write-zeroes and flush pass through.
    qemu_io(&proxy.uri(), "write -f -P 0x11 12M 64k");
    qemu_io(&proxy.uri(), "write -z 12M 4k");
    let out = qemu_io(&direct, "read -P 0 12M 4k");
    assert!(!out.contains("verification failed"), "{out}");
    let out = qemu_io(&direct, "read -P 0x11 12587008 60k");
    assert!(!out.contains("verification failed"), "{out}");

    // nbdcopy (several connections when multi-conn is offered) both ways.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..16 * MIB as usize)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).expect("write source");
    run_ok(Command::new("nbdcopy").arg(&src).arg(proxy.uri()));
    let back = dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").arg(&direct).arg(&back));
    let copied = std::fs::read(&back).expect("read copy");
    assert_eq!(copied.len() as u64, 64 * MIB);
    assert!(
        copied[..data.len()] == data[..],
        "data copied through the proxy differs"
    );
}

/// fio through the proxy; blockd is SIGKILLed and restarted while fio writes, and again
/// (if fio still runs) while it verifies. fio must finish with no errors.
#[test]
fn fio_verify_survives_blockd_kill_and_restart() {
    if !tools(&["fio"]) {
        return;
    }
    let mut daemon = Daemon::start();
    volume(&daemon, "v1", "64M");
    let proxy = Proxy::start(&daemon, "v1", 45);
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("fio.json");
    let mut fio = Command::new("timeout")
        .arg("50")
        .arg("fio")
        .args([
            "--name=restart",
            "--ioengine=nbd",
            &format!("--uri={}", proxy.uri()),
            "--rw=randwrite",
            "--bs=4k",
            "--size=48M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--rate_iops=5000",
            "--output-format=json",
        ])
        .arg(format!("--output={}", out_path.display()))
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");

    let mut kills = 0;
    for delay in [Duration::from_millis(1200), Duration::from_millis(1500)] {
        std::thread::sleep(delay);
        if fio.try_wait().expect("wait fio").is_some() {
            break;
        }
        daemon.kill();
        std::thread::sleep(Duration::from_millis(300));
        daemon.restart();
        kills += 1;
    }
    assert!(kills >= 1, "fio finished before blockd could be killed");
    let status = fio.wait().expect("wait fio");
    let mut stderr = String::new();
    if let Some(mut e) = fio.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let report = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        status.success(),
        "fio failed ({status}) after {kills} blockd kill(s): {stderr}\n{report}\nproxy log:\n{}",
        proxy.log()
    );
    let json: serde_json::Value = serde_json::from_str(&report[report.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("fio JSON ({e}): {report}"));
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{report}");
    // Every block was written and read back verified.
    assert_eq!(job["write"]["io_bytes"], 48 * MIB, "{report}");
    assert_eq!(job["read"]["io_bytes"], 48 * MIB, "{report}");
    let log = proxy.log();
    assert!(
        log.contains("reconnected"),
        "proxy never reconnected:\n{log}"
    );
}

/// Unmounts a FUSE mount point and stops nbdfuse on drop.
struct FuseMount {
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn block(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i as usize * 31 + j * 7 + (j >> 9)) as u8)
        .collect()
}

/// nbdfuse (several connections) through the proxy: a writer keeps writing and syncing
/// while blockd is killed and restarted; nothing fails and every block reads back from
/// blockd directly.
#[test]
fn nbdfuse_survives_blockd_kill_and_restart() {
    if !tools(&["nbdfuse", "nbdcopy", "umount"]) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        skip("/dev/fuse is missing (nbdfuse needs FUSE)");
        return;
    }
    let mut daemon = Daemon::start();
    let direct = volume(&daemon, "v1", "64M");
    let proxy = Proxy::start(&daemon, "v1", 45);
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mount point");
    let file = mnt.join("disk");
    let child = Command::new("nbdfuse")
        .arg(&file)
        .arg(proxy.uri())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nbdfuse");
    let mut mount = FuseMount {
        dir: mnt.clone(),
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != 64 * MIB {
        if let Some(status) = mount
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("nbdfuse exited with {status}");
        }
        assert!(Instant::now() < deadline, "nbdfuse did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }

    const BLOCK: usize = 64 << 10;
    const BLOCKS: u64 = 256; // 16 MiB
    let writer_file = file.clone();
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&writer_file)
            .map_err(|e| format!("open: {e}"))?;
        for i in 0..BLOCKS {
            let data = block(i, BLOCK);
            f.write_all_at(&data, i * BLOCK as u64)
                .map_err(|e| format!("write block {i}: {e}"))?;
            if i % 8 == 7 {
                f.sync_data().map_err(|e| format!("sync after {i}: {e}"))?;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        f.sync_all().map_err(|e| format!("final sync: {e}"))?;
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(800));
    assert!(!writer.is_finished(), "the writer finished before the kill");
    daemon.kill();
    std::thread::sleep(Duration::from_millis(300));
    daemon.restart();
    writer.join().expect("writer thread").unwrap_or_else(|e| {
        panic!(
            "I/O through nbdfuse failed: {e}\nproxy log:\n{}",
            proxy.log()
        )
    });
    // Reads through FUSE still work after the restart.
    let mut first = vec![0u8; BLOCK];
    std::fs::File::open(&file)
        .and_then(|mut f| f.read_exact(&mut first))
        .expect("read through nbdfuse");
    assert!(first == block(0, BLOCK));
    drop(mount);

    // Everything reached blockd.
    let back = dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").arg(&direct).arg(&back));
    let image = std::fs::read(&back).expect("read copy");
    for i in 0..BLOCKS {
        let at = (i * BLOCK as u64) as usize;
        assert!(
            image[at..at + BLOCK] == block(i, BLOCK),
            "block {i} differs in blockd after the restart"
        );
    }
    assert!(proxy.log().contains("reconnected"), "{}", proxy.log());
}

/// A raw NBD client of the proxy, for the protocol checks.
fn raw_client(socket: &Path) -> NbdClient {
    NbdClient::connect(socket, Duration::from_secs(30))
}

#[test]
fn protocol_unknown_options_and_vanishing_clients() {
    let daemon = Daemon::start();
    volume(&daemon, "v1", "16M");
    let mut proxy = Proxy::start(&daemon, "v1", 30);

    let mut c = raw_client(&proxy.socket);
    // Structured replies are not offered; an unknown option is unsupported.
    for option in [8u32, 9, 10, 99] {
        c.option(option, &[]);
        let (o, reply, _) = c.option_reply();
        assert_eq!((o, reply), (option, 0x8000_0001), "option {option}");
    }
    // NBD_OPT_LIST names the one export.
    c.option(3, &[]);
    let (_, reply, data) = c.option_reply();
    assert_eq!(reply, 2);
    assert_eq!(&data[4..], b"v1");
    assert_eq!(c.option_reply().1, 1);
    // NBD_OPT_LIST with data is invalid.
    c.option(3, b"x");
    assert_eq!(c.option_reply().1, 0x8000_0003);
    let (size, flags) = c.go("any").expect("NBD_OPT_GO");
    assert_eq!(size, 16 * MIB);
    assert_eq!(flags & 1, 1, "NBD_FLAG_HAS_FLAGS");
    assert_eq!(
        flags & (1 << 7),
        0,
        "NBD_FLAG_SEND_DF needs structured replies"
    );
    c.write(1, 4096, &[0x42; 4096]);
    assert_eq!(c.read(2, 4096, 4096), vec![0x42; 4096]);
    // Out of range: blockd's error passes through unchanged.
    c.request(NbdCommand::Read, 3, 16 * MIB, 4096, &[]);
    assert_eq!(c.reply().unwrap(), (22, 3));
    // NBD_CMD_DISC: the proxy closes the connection.
    c.request(NbdCommand::Disc, 4, 0, 0, &[]);
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).expect("EOF after NBD_CMD_DISC");
    assert!(rest.is_empty());

    // NBD_OPT_ABORT is acknowledged.
    let mut c = raw_client(&proxy.socket);
    c.option(2, &[]);
    assert_eq!(c.option_reply().1, 1);
    drop(c);

    // A client that hangs up in the middle of a write payload ...
    let mut c = raw_client(&proxy.socket);
    c.go("any").expect("go");
    c.request(NbdCommand::Write, 9, 0, 65536, &[0x17; 100]);
    drop(c);
    // ... one that leaves a read unanswered, and one that vanishes mid-handshake.
    let mut c = raw_client(&proxy.socket);
    c.go("any").expect("go");
    c.request(NbdCommand::Read, 10, 0, 1 << 20, &[]);
    drop(c);
    let c = raw_client(&proxy.socket);
    drop(c);

    // The proxy still serves, and nothing of the torn write landed.
    std::thread::sleep(Duration::from_millis(200));
    assert!(proxy.is_running(), "proxy died:\n{}", proxy.log());
    let mut c = raw_client(&proxy.socket);
    c.go("any").expect("go after vanishing clients");
    assert_eq!(c.read(1, 0, 4096), vec![0; 4096]);
    assert_eq!(c.read(2, 4096, 4096), vec![0x42; 4096]);
    drop(c);

    // SIGTERM: clean exit, socket removed.
    let socket = proxy.socket.clone();
    assert!(proxy.terminate(), "proxy did not exit cleanly on SIGTERM");
    assert!(!socket.exists(), "proxy left its socket behind");
}

#[test]
fn proxy_gives_up_after_the_reconnect_timeout() {
    let mut daemon = Daemon::start();
    volume(&daemon, "v1", "16M");
    let mut proxy = Proxy::start(&daemon, "v1", 2);
    let mut c = raw_client(&proxy.socket);
    c.go("any").expect("go");
    // Not flushed: only the proxy's journal guarantees it across the kill.
    c.write(1, 0, &[0x33; 4096]);

    daemon.kill();
    let started = Instant::now();
    c.request(NbdCommand::Read, 2, 0, 4096, &[]);
    let reply = c.reply().expect("an error reply, not a hang");
    assert_eq!(reply, (5, 2), "NBD_EIO for the request in flight");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(15),
        "gave up after {waited:?}"
    );
    // Then the connection is closed.
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    let log = proxy.log();
    assert!(log.contains("giving up"), "{log}");

    // A new client is refused with an error, not left hanging.
    let mut c = raw_client(&proxy.socket);
    assert_eq!(c.go("any"), Err(0x8000_0007), "NBD_REP_ERR_SHUTDOWN");
    assert!(proxy.is_running(), "the proxy must outlive a blockd outage");

    // blockd comes back: new clients work, and the unflushed write was replayed.
    daemon.restart();
    let mut c = raw_client(&proxy.socket);
    c.go("any").expect("go after blockd returned");
    assert_eq!(c.read(3, 0, 4096), vec![0x33; 4096]);
}

/// The proxy's own flushes (sent once the replay journal passes its limit) against a real
/// blockd: with a tiny limit nearly every write triggers one while qemu-io keeps writes
/// and flushes in flight; every round finishes and the data reads back. (The exact reply
/// interleaving that once stalled a client is forced deterministically by
/// `csi-shim/tests/proxy_internal_flush.rs`.)
#[test]
fn internal_flushes_never_hold_back_client_replies() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let daemon = Daemon::start();
    volume(&daemon, "jv", "64M");
    let proxy = Proxy::start_with(&daemon, "jv", 30, &["--journal-limit", "4096"]);
    let mut commands = Vec::new();
    for round in 0..40u64 {
        let base = (round % 8) * (1 << 20);
        for i in 0..4u64 {
            commands.push(format!(
                "aio_write -P {} {} 64k",
                (round + i) % 250 + 1,
                base + i * 65536
            ));
        }
        commands.push("aio_flush".to_string());
    }
    let mut cmd = Command::new("timeout");
    cmd.args(["60", "qemu-io", "-f", "raw"]);
    for c in &commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(proxy.uri());
    run_ok(&mut cmd);
    // The last round (39, base 7 MiB) wrote patterns 40..43 at 7 MiB + i * 64 KiB.
    for i in 0..4u64 {
        let out = qemu_io(
            &proxy.uri(),
            &format!(
                "read -P {} {} 64k",
                (39 + i) % 250 + 1,
                7 * (1 << 20) + i * 65536
            ),
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

/// With `--exit-after-disconnect` (how the kernel attacher starts its proxies) the proxy
/// exits as soon as its clients have sent `NBD_CMD_DISC`, as the kernel does on every
/// connection of a device it disconnects: unstaging then waits milliseconds, not a signal
/// escalation. A client that only hangs up (or a probe) does not end it, and while any
/// client is still in transmission it keeps serving.
#[test]
fn exit_after_disconnect_ends_the_proxy_with_its_last_client() {
    let daemon = Daemon::start();
    volume(&daemon, "v1", "16M");
    let mut proxy = Proxy::start_with(&daemon, "v1", 30, &["--exit-after-disconnect"]);
    let socket = proxy.socket.clone();

    // A liveness probe, and a client that hangs up without NBD_CMD_DISC.
    drop(raw_client(&socket));
    let mut c = raw_client(&socket);
    c.go("any").expect("go");
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    assert!(proxy.is_running(), "proxy exited:\n{}", proxy.log());

    // Two connections, as the kernel makes for a multi-conn device.
    let mut a = raw_client(&socket);
    a.go("any").expect("go a");
    let mut b = raw_client(&socket);
    b.go("any").expect("go b");
    a.write(1, 0, &[0x5a; 4096]);
    a.request(NbdCommand::Disc, 2, 0, 0, &[]);
    let mut rest = Vec::new();
    a.s.read_to_end(&mut rest).expect("EOF after NBD_CMD_DISC");
    assert!(rest.is_empty());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        proxy.is_running(),
        "exited with a client still in transmission:\n{}",
        proxy.log()
    );
    assert_eq!(b.read(3, 0, 4096), vec![0x5a; 4096]);

    let started = Instant::now();
    b.request(NbdCommand::Disc, 4, 0, 0, &[]);
    let status = loop {
        if let Some(status) = proxy
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("wait proxy"))
        {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the proxy did not exit after the last NBD_CMD_DISC:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let waited = started.elapsed();
    assert!(status.success(), "{status}:\n{}", proxy.log());
    assert!(waited < Duration::from_secs(1), "exit took {waited:?}");
    assert!(!socket.exists(), "the proxy left its socket behind");
    assert!(proxy.log().contains("NBD_CMD_DISC"), "{}", proxy.log());
}
