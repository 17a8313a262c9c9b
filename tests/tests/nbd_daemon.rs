//! End to end through the real daemon: blockctl exports images, third-party NBD clients
//! (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) read and write them, and the engine's
//! semantics (snapshots, clones, discard, a full pool) show through the protocol.

use std::process::Command;

use blockd_tests::Daemon;

macro_rules! require {
    ($($tool:expr),+) => {
        $(if !blockd_tests::have_tool($tool) {
            blockd_tests::skip(&format!(
                "{} is not installed (tools/test.sh installs it)",
                $tool
            ));
            return;
        })+
    };
}

/// Runs a client; returns (success, stdout + stderr).
fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn qemu_io(uri: &str, read_only: bool, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    args.push(uri);
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let (ok, out) = run("qemu-io", &args);
    // qemu-io exits 0 even when a pattern check fails; it prints "Pattern verification failed".
    (ok && !out.contains("failed") && !out.contains("error"), out)
}

/// A new daemon with volume `name` of `size`, exported; the daemon and the export's URI.
fn exported_volume(name: &str, size: &str) -> (Daemon, String) {
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", name, "--size", size]);
    let uri = d.ctl_ok(&["export", name]).trim().to_string();
    (d, uri)
}

fn allocated(d: &Daemon, vol: &str) -> u64 {
    d.ctl_json(&["volume", "show", vol])["allocated_bytes"]
        .as_u64()
        .expect("allocated_bytes")
}

#[test]
fn snapshot_semantics_through_nbd() {
    require!("qemu-io");
    let (d, uri) = exported_volume("vol", "64M");
    assert!(uri.starts_with("nbd+unix:///vol?socket="), "{uri}");
    assert_eq!(
        d.ctl_ok(&["export", "vol"]).trim(),
        uri,
        "export is idempotent"
    );
    // Unaligned, across a 64 KiB chunk boundary.
    let (ok, out) = qemu_io(&uri, false, &["write -P 0xa1 65000 70000", "flush"]);
    assert!(ok, "{out}");
    d.ctl_ok(&["snapshot", "create", "vol", "snap-a"]);
    let (ok, out) = qemu_io(&uri, false, &["write -P 0xb2 65000 70000"]);
    assert!(ok, "{out}");
    let snap_uri = d.ctl_ok(&["export", "vol@snap-a"]).trim().to_string();
    let (ok, out) = qemu_io(&snap_uri, true, &["read -P 0xa1 65000 70000"]);
    assert!(ok, "snapshot reads A: {out}");
    let (ok, out) = qemu_io(&uri, true, &["read -P 0xb2 65000 70000"]);
    assert!(ok, "head reads B: {out}");
    // Writes to a snapshot export are refused.
    let (ok, _) = qemu_io(&snap_uri, false, &["write -P 0x01 0 512"]);
    assert!(!ok, "a snapshot export is read-only");
    // A clone reads A and diverges independently.
    d.ctl_ok(&[
        "volume",
        "create",
        "clone",
        "--size",
        "128M",
        "--from-snapshot",
        "snap-a",
    ]);
    let clone_uri = d.ctl_ok(&["export", "clone"]).trim().to_string();
    let (ok, out) = qemu_io(
        &clone_uri,
        false,
        &[
            "read -P 0xa1 65000 70000",
            "write -P 0xc3 65000 512",
            "read -P 0 100000000 4096",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&uri, true, &["read -P 0xb2 65000 512"]);
    assert!(ok, "the origin does not see the clone's write: {out}");
    // write -z reads zeros; discard frees space.
    let before = allocated(&d, "vol");
    let (ok, out) = qemu_io(
        &uri,
        false,
        &[
            "write -z 65536 65536",
            "read -P 0 65536 65536",
            "discard 0 64M",
            "flush",
        ],
    );
    assert!(ok, "{out}");
    assert!(allocated(&d, "vol") < before, "discard frees space");
    // An image that is not exported cannot be opened.
    d.ctl_ok(&["unexport", "clone"]);
    let (ok, _) = qemu_io(&clone_uri, true, &["read 0 512"]);
    assert!(!ok, "unexported images cannot be opened");
}

#[test]
fn qemu_img_convert_compare_map_and_nbdcopy() {
    require!("qemu-img", "nbdinfo", "nbdcopy");
    let d = Daemon::start();
    let src = d.dir().join("random.img");
    {
        // 64 MiB: 48 MiB of random data, then 16 MiB never written (a hole).
        let mut data = vec![0u8; 64 << 20];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for b in data[..48 << 20].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&src, &data).unwrap();
    }
    d.ctl_ok(&["volume", "create", "img", "--size", "64M"]);
    let uri = d.ctl_ok(&["export", "img"]).trim().to_string();
    let src_s = src.to_str().unwrap();
    let (ok, out) = run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    assert!(ok, "{out}");
    let (ok, out) = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert!(ok, "images differ: {out}");
    let (ok, map) = run("nbdinfo", &["--map", &uri]);
    assert!(ok, "{map}");
    assert!(
        map.contains("hole"),
        "the unwritten tail is reported as a hole: {map}"
    );
    let (ok, out) = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    assert!(ok && out.contains("\"data\": false"), "{out}");
    // nbdcopy both ways.
    let back = d.dir().join("back.img");
    let (ok, out) = run("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());
    d.ctl_ok(&["volume", "create", "img2", "--size", "64M"]);
    let uri2 = d.ctl_ok(&["export", "img2"]).trim().to_string();
    let (ok, out) = run("nbdcopy", &[back.to_str().unwrap(), &uri2]);
    assert!(ok, "{out}");
    let (ok, out) = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri2],
    );
    assert!(ok, "{out}");
}

#[test]
fn fio_verified_random_writes_on_two_connections() {
    require!("fio");
    let (d, uri) = exported_volume("fio", "256M");
    let (ok, out) = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bssplit=4k/50:16k/30:64k/15:256k/5",
            "--iodepth=32",
            "--numjobs=2",
            "--size=32M",
            "--offset_increment=64M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            &format!("--directory={}", d.dir().display()),
            "--output-format=json",
        ],
    );
    assert!(ok, "{out}");
    let json = &out[out.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json parses");
    for job in v["jobs"].as_array().unwrap() {
        assert_eq!(job["error"].as_i64(), Some(0), "{job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0);
    }
    assert_eq!(d.ctl(&["fsck"]).status.code(), Some(0));
}

#[test]
fn pool_full_through_nbd_gives_enospc_and_recovers() {
    require!("qemu-io");
    let pool_dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "small={},size=8M,chunk=64K",
        pool_dir.path().join("small.img").display()
    );
    let d = Daemon::start_with(&["--pool", &spec]);
    let pool = "small";
    d.ctl_ok(&["volume", "create", "keep", "--size", "1M", "--pool", pool]);
    d.ctl_ok(&["volume", "create", "fill", "--size", "64M", "--pool", pool]);
    let keep = d.ctl_ok(&["export", "keep"]).trim().to_string();
    let fill = d.ctl_ok(&["export", "fill"]).trim().to_string();
    let (ok, out) = qemu_io(&keep, false, &["write -P 0x77 0 1M", "flush"]);
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&fill, false, &["write -P 0x55 0 16M"]);
    assert!(!ok, "filling past the pool fails");
    assert!(
        out.contains("No space left on device"),
        "the client sees ENOSPC: {out}"
    );
    let (ok, out) = qemu_io(&keep, true, &["read -P 0x77 0 1M"]);
    assert!(ok, "earlier data intact: {out}");
    d.ctl_ok(&["unexport", "fill"]);
    d.ctl_ok(&["volume", "delete", "fill"]);
    // GC runs in the background; give it a moment, then writes resume.
    let mut resumed = false;
    for _ in 0..50 {
        let (ok, _) = qemu_io(&keep, false, &["write -P 0x78 0 1M", "flush"]);
        if ok {
            resumed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(resumed, "writes continue after deleting a volume");
    d.ctl_ok(&["volume", "create", "again", "--size", "4M", "--pool", pool]);
    let again = d.ctl_ok(&["export", "again"]).trim().to_string();
    let (ok, out) = qemu_io(&again, false, &["write -P 0x33 0 4M", "read -P 0x33 0 4M"]);
    assert!(ok, "{out}");
}

#[test]
fn exports_survive_a_restart() {
    require!("qemu-io");
    let mut d = Daemon::start();
    d.ctl_ok(&["volume", "create", "persist", "--size", "8M"]);
    let uri = d.ctl_ok(&["export", "persist"]).trim().to_string();
    let (ok, out) = qemu_io(&uri, false, &["write -P 0x42 4096 8192", "flush"]);
    assert!(ok, "{out}");
    assert!(d.stop().success(), "clean exit on SIGTERM");
    d.restart();
    let (ok, out) = qemu_io(&uri, true, &["read -P 0x42 4096 8192"]);
    assert!(ok, "the same URI works after a restart: {out}");
}

/// 4 KiB random reads for `runtime` seconds (after a 1 s ramp); returns the IOPS fio saw.
fn fio_randread_iops(uri: &str, iodepth: u32, runtime: u32) -> f64 {
    let (ok, out) = run(
        "fio",
        &[
            "--name=qos",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=4k",
            &format!("--iodepth={iodepth}"),
            "--time_based=1",
            &format!("--runtime={runtime}"),
            "--ramp_time=1",
            "--output-format=json",
        ],
    );
    assert!(ok, "{out}");
    let json = &out[out.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json parses");
    v["jobs"][0]["read"]["iops"].as_f64().expect("iops")
}

#[test]
fn qos_max_iops_is_enforced_on_a_volume() {
    require!("fio");
    let d = Daemon::start();
    d.ctl_ok(&[
        "volume",
        "create",
        "slow",
        "--size",
        "64M",
        "--max-iops",
        "500",
    ]);
    let uri = d.ctl_ok(&["export", "slow"]).trim().to_string();
    let iops = fio_randread_iops(&uri, 32, 3);
    assert!(
        (450.0..=550.0).contains(&iops),
        "500 IOPS ± 10%, measured {iops:.0}"
    );
}

#[test]
fn qos_set_qos_changes_the_enforced_limit() {
    require!("fio");
    let d = Daemon::start();
    d.ctl_ok(&[
        "volume",
        "create",
        "tuned",
        "--size",
        "64M",
        "--max-iops",
        "200",
    ]);
    let uri = d.ctl_ok(&["export", "tuned"]).trim().to_string();
    d.ctl_ok(&["volume", "set-qos", "tuned", "--max-iops", "1000"]);
    let iops = fio_randread_iops(&uri, 16, 2);
    assert!(
        (900.0..=1100.0).contains(&iops),
        "the new limit of 1000 IOPS applies, measured {iops:.0}"
    );
}

/// Makes a CA, a server certificate for 127.0.0.1 and client directories in `dir` with
/// `tools/make-test-certs.sh` (see its header for the layout).
fn make_certs(dir: &std::path::Path) {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/make-test-certs.sh");
    let (ok, out) = run("sh", &[script.to_str().unwrap(), dir.to_str().unwrap()]);
    assert!(ok, "make-test-certs.sh failed: {out}");
}

fn tls_flags(certs: &std::path::Path) -> Vec<String> {
    let f = |name: &str| certs.join(name).display().to_string();
    vec![
        "--tls-cert".into(),
        f("server-cert.pem"),
        "--tls-key".into(),
        f("server-key.pem"),
        "--tls-client-ca".into(),
        f("ca-cert.pem"),
    ]
}

#[test]
fn nbd_over_tcp_is_mutual_tls_for_remote_clients() {
    require!("openssl", "nbdinfo", "nbdcopy", "qemu-io");
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let mut flags = vec!["--nbd-listen".to_string(), "127.0.0.1:0".to_string()];
    flags.extend(tls_flags(certs.path()));
    let d = Daemon::start_with(&flags.iter().map(String::as_str).collect::<Vec<_>>());

    // The bound port is reported (0 was asked for).
    let status = d.ctl_json(&["status"]);
    let listen = status["nbd_listen"]
        .as_str()
        .expect("nbd_listen")
        .to_string();
    let port: u16 = listen
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("nbd_listen {listen}"));
    assert_ne!(port, 0);

    d.ctl_ok(&["volume", "create", "vol", "--size", "64M"]);
    let unix_uri = d.ctl_ok(&["export", "vol"]).trim().to_string();
    assert!(
        unix_uri.starts_with("nbd+unix:///vol?socket="),
        "{unix_uri}"
    );
    let tls_uri = d.ctl_ok(&["export", "vol", "--tls"]).trim().to_string();
    assert_eq!(tls_uri, format!("nbds://127.0.0.1:{port}/vol"));
    let listed = d.ctl_json(&["exports"]);
    assert_eq!(listed[0]["tls_uri"], tls_uri.as_str(), "{listed}");

    let client = certs.path().join("client");
    let anon = certs.path().join("anon");
    // A client with a certificate signed by the CA: served, over TLS.
    let with_cert = format!("{tls_uri}?tls-certificates={}", client.display());
    let (ok, json) = run("nbdinfo", &["--json", &with_cert]);
    assert!(ok, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo json");
    assert_eq!(v["TLS"], true, "{json}");
    assert_eq!(v["exports"][0]["export-size"], 64 << 20, "{json}");
    // Without a client certificate, and in plain text: refused.
    let (ok, out) = run(
        "nbdinfo",
        &[
            "--size",
            &format!("{tls_uri}?tls-certificates={}", anon.display()),
        ],
    );
    assert!(!ok, "a client without a certificate was served: {out}");
    let (ok, out) = run(
        "nbdinfo",
        &["--size", &format!("nbd://127.0.0.1:{port}/vol")],
    );
    assert!(!ok, "plain text over TCP was served: {out}");

    // qemu writes through TLS; the unix socket reads the same bytes back.
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        client.display()
    );
    let (ok, out) = run(
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={port},export=vol,tls-creds=tls0"),
            "-c",
            "write -P 0x5a 1M 1M",
            "-c",
            "flush",
        ],
    );
    assert!(ok && !out.contains("failed"), "{out}");
    let (ok, out) = qemu_io(&unix_uri, true, &["read -P 0x5a 1M 1M"]);
    assert!(ok, "{out}");

    // A bulk copy through TLS with nbdcopy (fio's nbd engine cannot be used here: libnbd
    // refuses certificate files named in a URI unless the program allows it, and fio
    // does not), read back byte for byte through the unix socket.
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = d.dir().join("random.bin");
    std::fs::write(&src, &data).unwrap();
    let (ok, out) = run("nbdcopy", &[src.to_str().unwrap(), &with_cert]);
    assert!(ok, "nbdcopy over TLS: {out}");
    let back = d.dir().join("back.bin");
    let (ok, out) = run("nbdcopy", &[&unix_uri, back.to_str().unwrap()]);
    assert!(ok, "{out}");
    let back = std::fs::read(&back).unwrap();
    assert!(
        back[..data.len()] == data[..],
        "the bytes written over TLS read back"
    );
    assert_eq!(d.ctl(&["fsck"]).status.code(), Some(0));
}

#[test]
fn tcp_only_daemon_prints_nbds_uris_and_bad_tls_setups_refuse_to_start() {
    require!("openssl", "nbdinfo");
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let mut flags = vec![
        "--nbd-listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--nbd-socket".to_string(),
        "none".to_string(),
    ];
    flags.extend(tls_flags(certs.path()));
    let d = Daemon::start_with(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    let status = d.ctl_json(&["status"]);
    assert_eq!(status["nbd_socket"], "", "{status}");
    assert!(!d.nbd_socket().exists(), "no unix NBD socket");
    d.ctl_ok(&["volume", "create", "vol", "--size", "16M"]);
    let uri = d.ctl_ok(&["export", "vol"]).trim().to_string();
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");
    let with_cert = format!(
        "{uri}?tls-certificates={}",
        certs.path().join("client").display()
    );
    let (ok, out) = run("nbdinfo", &["--size", &with_cert]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), (16u64 << 20).to_string());

    // Refused starts, each with one line naming the problem.
    let refuse = |args: &[String], needle: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(blockd_tests::binary("blockd"))
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--pool")
            .arg(format!(
                "default={},size=64M",
                dir.path().join("p.img").display()
            ))
            .args(args)
            .output()
            .expect("run blockd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "blockd started with {args:?}: {stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    refuse(&s(&["--nbd-listen", "127.0.0.1:0"]), "mutual TLS");
    let mut bad_key = s(&["--nbd-listen", "127.0.0.1:0"]);
    bad_key.extend(tls_flags(certs.path()));
    bad_key[5] = certs.path().join("missing-key.pem").display().to_string();
    refuse(&bad_key, "cannot load the NBD TLS files");
    // The server's key is not a certificate chain.
    let mut swapped = s(&["--nbd-listen", "127.0.0.1:0"]);
    swapped.extend(tls_flags(certs.path()));
    swapped[3] = certs.path().join("server-key.pem").display().to_string();
    refuse(&swapped, "cannot load the NBD TLS files");
    refuse(&s(&["--nbd-socket", "none"]), "--nbd-listen");
}
