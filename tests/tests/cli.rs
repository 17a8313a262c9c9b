//! The CLI contract, end to end: the real `blockd` driven by the real `blockctl`.

use blockd_tests::Daemon;
use serde_json::Value;

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn status_and_pools() {
    let d = Daemon::start();
    let status = d.ctl_json(&["status"]);
    assert_eq!(status["pool_count"], 1);
    assert_eq!(status["health"], "ok");
    assert_eq!(
        status["nbd_socket"].as_str().unwrap(),
        d.nbd_socket().display().to_string()
    );

    let pools = d.ctl_json(&["pool", "list"]);
    assert_eq!(names(&pools), ["default"]);
    let pool = &pools[0];
    for field in [
        "name",
        "capacity_bytes",
        "allocated_bytes",
        "chunk_size_bytes",
        "io_engine",
        "free_bytes",
        "provisioned_bytes",
        "overprovisioning_ratio",
        "health",
    ] {
        assert!(pool.get(field).is_some(), "pool JSON lacks {field}: {pool}");
    }
    assert_eq!(pool["chunk_size_bytes"], 64 * 1024);
    let engine = pool["io_engine"].as_str().unwrap();
    assert!(engine == "uring" || engine == "sync", "{engine}");
    let capacity = pool["capacity_bytes"].as_u64().unwrap();
    assert!(capacity > 0 && capacity <= 2 << 30, "{capacity}");

    let shown = d.ctl_json(&["pool", "show", "default"]);
    assert_eq!(shown["name"], "default");
    assert_eq!(shown["is_default"], true);

    let table = d.ctl_ok(&["pool", "list"]);
    assert!(
        table.contains("default") && table.contains("KiB"),
        "{table}"
    );

    let err = d.ctl_err(&["pool", "show", "nope"]);
    assert!(err.contains("pool") && err.contains("\"nope\""), "{err}");
}

#[test]
fn volume_lifecycle() {
    let d = Daemon::start();
    assert_eq!(d.ctl_json(&["volume", "list"]), Value::Array(vec![]));

    let out = d.ctl_ok(&["volume", "create", "vol1", "--size", "1G"]);
    assert!(out.contains("created volume \"vol1\""), "{out}");
    // Sizes are rounded up to 4 KiB, and the answer says so.
    let v = d.ctl_json(&["volume", "create", "odd", "--size", "1000"]);
    assert_eq!(v["size_bytes"], 4096);
    let v = d.ctl_json(&[
        "volume",
        "create",
        "qos",
        "--size",
        "64MiB",
        "--max-iops",
        "500",
        "--max-bandwidth",
        "10M",
    ]);
    assert_eq!(v["max_iops"], 500);
    assert_eq!(v["max_bandwidth_bytes"], 10 << 20);

    // Idempotent: the same parameters succeed and change nothing ...
    let again = d.ctl_ok(&["volume", "create", "vol1", "--size", "1G"]);
    assert!(again.contains("already exists"), "{again}");
    // ... different ones fail, naming the volume.
    let err = d.ctl_err(&["volume", "create", "vol1", "--size", "2G"]);
    assert!(
        err.contains("\"vol1\"") && err.contains("already exists"),
        "{err}"
    );

    let list = d.ctl_json(&["volume", "list"]);
    assert_eq!(names(&list), ["odd", "qos", "vol1"]);
    let vol1 = &list[2];
    assert_eq!(vol1["size_bytes"], 1u64 << 30);
    assert_eq!(vol1["pool"], "default");
    assert_eq!(vol1["allocated_bytes"], 0);

    let shown = d.ctl_json(&["volume", "show", "vol1"]);
    assert_eq!(shown["name"], "vol1");
    assert_eq!(shown["size_bytes"], 1u64 << 30);
    let table = d.ctl_ok(&["volume", "show", "vol1"]);
    assert!(table.contains("1 GiB"), "{table}");

    let grown = d.ctl_json(&["volume", "resize", "vol1", "--size", "2G"]);
    assert_eq!(grown["size_bytes"], 2u64 << 30);
    let err = d.ctl_err(&["volume", "resize", "vol1", "--size", "1G"]);
    assert!(err.contains("shrink") && err.contains("\"vol1\""), "{err}");
    let shrunk = d.ctl_json(&["volume", "resize", "vol1", "--size", "1G", "--force"]);
    assert_eq!(shrunk["size_bytes"], 1u64 << 30);

    let pool = d.ctl_json(&["pool", "show", "default"]);
    assert_eq!(
        pool["provisioned_bytes"].as_u64().unwrap(),
        (1u64 << 30) + 4096 + (64 << 20)
    );

    let out = d.ctl_ok(&["volume", "delete", "odd"]);
    assert!(out.contains("deleted volume \"odd\""), "{out}");
    assert_eq!(names(&d.ctl_json(&["volume", "list"])), ["qos", "vol1"]);
    let err = d.ctl_err(&["volume", "show", "odd"]);
    assert_eq!(err, "error: volume \"odd\" not found");
    let err = d.ctl_err(&["volume", "delete", "odd"]);
    assert_eq!(err, "error: volume \"odd\" not found");
}

#[test]
fn snapshots_and_clones() {
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "base", "--size", "256M"]);
    let s = d.ctl_json(&["snapshot", "create", "base", "s1"]);
    assert_eq!(s["name"], "s1");
    assert_eq!(s["volume"], "base");
    assert_eq!(s["size_bytes"], 256u64 << 20);
    // Idempotent for the same volume; the name is taken daemon-wide.
    d.ctl_ok(&["snapshot", "create", "base", "s1"]);
    d.ctl_ok(&["volume", "create", "other", "--size", "1M"]);
    let err = d.ctl_err(&["snapshot", "create", "other", "s1"]);
    assert!(err.contains("\"s1\""), "{err}");
    d.ctl_ok(&["snapshot", "create", "other", "o1"]);

    assert_eq!(names(&d.ctl_json(&["snapshot", "list"])), ["o1", "s1"]);
    assert_eq!(names(&d.ctl_json(&["snapshot", "list", "base"])), ["s1"]);
    assert_eq!(d.ctl_json(&["snapshot", "show", "s1"])["volume"], "base");

    // Clones: from a snapshot (default size: the snapshot's; larger is allowed) and
    // from a volume.
    let c1 = d.ctl_json(&["volume", "create", "c1", "--from-snapshot", "s1"]);
    assert_eq!(c1["size_bytes"], 256u64 << 20);
    assert_eq!(c1["source_snapshot"], "s1");
    let big = d.ctl_json(&[
        "volume",
        "create",
        "big",
        "--from-snapshot",
        "s1",
        "--size",
        "1G",
    ]);
    assert_eq!(big["size_bytes"], 1u64 << 30);
    let c2 = d.ctl_json(&["volume", "create", "c2", "--from-volume", "base"]);
    assert_eq!(c2["source_volume"], "base");
    assert_eq!(c2["size_bytes"], 256u64 << 20);
    let err = d.ctl_err(&["volume", "create", "c3", "--from-snapshot", "nope"]);
    assert!(
        err.contains("snapshot") && err.contains("\"nope\""),
        "{err}"
    );

    // Flatten detaches a clone from its parent.
    let flat = d.ctl_json(&["volume", "flatten", "c1"]);
    assert_eq!(flat["has_parent"], false);
    let out = d.ctl_ok(&["volume", "flatten", "big"]);
    assert!(out.contains("flattened volume \"big\""), "{out}");

    // Deleting a volume keeps its snapshots usable.
    d.ctl_ok(&["volume", "delete", "base"]);
    assert_eq!(d.ctl_json(&["snapshot", "show", "s1"])["volume"], "base");
    d.ctl_ok(&["volume", "create", "c4", "--from-snapshot", "s1"]);

    d.ctl_ok(&["snapshot", "delete", "o1"]);
    assert_eq!(names(&d.ctl_json(&["snapshot", "list"])), ["s1"]);
    let err = d.ctl_err(&["snapshot", "delete", "o1"]);
    assert_eq!(err, "error: snapshot \"o1\" not found");

    let out = d.ctl(&["fsck"]);
    assert!(out.success(), "fsck: {} {}", out.stdout, out.stderr);
}

#[test]
fn exports_print_nbd_uris() {
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "vol1", "--size", "16M"]);
    d.ctl_ok(&["snapshot", "create", "vol1", "snap1"]);
    let socket = d.nbd_socket().display().to_string();

    let uri = d.ctl_ok(&["export", "vol1"]);
    assert_eq!(uri, format!("nbd+unix:///vol1?socket={socket}\n"));
    // Idempotent: the same URI again.
    assert_eq!(d.ctl_ok(&["export", "vol1"]), uri);
    let snap_uri = d.ctl_ok(&["export", "vol1@snap1"]);
    assert_eq!(
        snap_uri,
        format!("nbd+unix:///vol1@snap1?socket={socket}\n")
    );

    let exports = d.ctl_json(&["exports"]);
    let list = exports.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["image"], "vol1");
    assert_eq!(list[0]["read_only"], false);
    assert_eq!(list[1]["image"], "vol1@snap1");
    assert_eq!(list[1]["read_only"], true);
    assert_eq!(d.ctl_json(&["volume", "show", "vol1"])["exported"], true);
    assert_eq!(d.ctl_json(&["snapshot", "show", "snap1"])["exported"], true);

    let err = d.ctl_err(&["export", "nope"]);
    assert!(
        err.contains("\"nope\"") && err.contains("not found"),
        "{err}"
    );
    let err = d.ctl_err(&["export", "vol1@nope"]);
    assert!(err.contains("not found"), "{err}");
    let err = d.ctl_err(&["export", "Bad Name"]);
    assert!(err.contains("Invalid image name"), "{err}");

    d.ctl_ok(&["unexport", "vol1@snap1"]);
    let out = d.ctl_ok(&["unexport", "vol1@snap1"]);
    assert!(out.contains("was not exported"), "{out}");
    assert_eq!(d.ctl_json(&["exports"]).as_array().unwrap().len(), 1);
    assert_eq!(
        d.ctl_json(&["snapshot", "show", "snap1"])["exported"],
        false
    );
}

#[test]
fn restart_finds_everything_as_it_was() {
    let mut d = Daemon::start();
    d.ctl_ok(&[
        "volume",
        "create",
        "a",
        "--size",
        "64M",
        "--max-iops",
        "100",
    ]);
    d.ctl_ok(&["volume", "create", "b", "--size", "1G"]);
    d.ctl_ok(&["snapshot", "create", "a", "a-snap"]);
    d.ctl_ok(&["volume", "create", "a-clone", "--from-snapshot", "a-snap"]);
    d.ctl_ok(&["volume", "resize", "b", "--size", "3G"]);
    d.ctl_ok(&["export", "a"]);
    d.ctl_ok(&["export", "a@a-snap"]);
    d.ctl_ok(&["volume", "delete", "b"]);

    let volumes = d.ctl_json(&["volume", "list"]);
    let snapshots = d.ctl_json(&["snapshot", "list"]);
    let exports = d.ctl_json(&["exports"]);
    let pool = d.ctl_json(&["pool", "show", "default"]);

    let status = d.stop();
    assert!(
        status.success(),
        "blockd exited with {status}; log:\n{}",
        d.log()
    );
    assert!(
        !d.api_socket().exists(),
        "the API socket is removed on exit"
    );
    d.restart();

    assert_eq!(d.ctl_json(&["volume", "list"]), volumes);
    assert_eq!(d.ctl_json(&["snapshot", "list"]), snapshots);
    assert_eq!(d.ctl_json(&["exports"]), exports);
    let after = d.ctl_json(&["pool", "show", "default"]);
    assert_eq!(after["uuid"], pool["uuid"]);
    assert_eq!(after["provisioned_bytes"], pool["provisioned_bytes"]);
    // The same URI as before the restart.
    assert_eq!(
        d.ctl_ok(&["export", "a"]),
        format!("nbd+unix:///a?socket={}\n", d.nbd_socket().display())
    );
    assert!(d.ctl(&["fsck"]).success());
}

#[test]
fn fsck_reports_a_consistent_pool() {
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "v", "--size", "8M"]);
    let report = d.ctl_json(&["fsck"]);
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["double_owned"], 0);
    let out = d.ctl_ok(&["fsck", "--repair"]);
    assert!(out.contains("consistent"), "{out}");
    let gc = d.ctl_json(&["gc"]);
    assert!(gc.get("chunks_freed").is_some(), "{gc}");
}

#[test]
fn failures_are_one_line_and_non_zero() {
    let d = Daemon::start();
    d.ctl_err(&["volume", "show", "missing"]);
    d.ctl_err(&["volume", "create", "UPPER", "--size", "1M"]);
    d.ctl_err(&["volume", "create", "v", "--size", "0"]);
    d.ctl_err(&["volume", "create", "v", "--size", "1M", "--pool", "nope"]);
    d.ctl_err(&["snapshot", "create", "missing", "s"]);
    d.ctl_err(&["snapshot", "list", "missing"]);

    // Usage errors: exit code 2, one line.
    let out = d.ctl(&["volume", "create", "v"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    let out = d.ctl(&["volume", "create", "v", "--size", "10GB"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("Invalid size"), "{}", out.stderr);

    // No daemon at the given socket.
    let out = blockd_tests::ctl_command(&d.dir().join("nothing.sock"))
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot connect to blockd"), "{stderr}");

    // BLOCKD_API is honoured.
    let out = std::process::Command::new(blockd_tests::binary("blockctl"))
        .arg("status")
        .env("BLOCKD_API", d.api_socket())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The RFC 3339 UTC stamp (`YYYY-MM-DDTHH:MM:SSZ`) on the `created` row of a details table.
fn created_stamp(table: &str) -> String {
    let row = table
        .lines()
        .find(|l| l.contains("created"))
        .unwrap_or_else(|| panic!("no created row: {table}"));
    row.split(|c: char| c.is_whitespace() || c == '│' || c == '|')
        .find(|w| w.len() == 20 && w.ends_with('Z') && w.as_bytes()[10] == b'T')
        .unwrap_or_else(|| panic!("no RFC 3339 time in {row:?}"))
        .to_string()
}

#[test]
fn tables_show_times_in_rfc3339_and_json_keeps_unix_seconds() {
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "v", "--size", "1M"]);
    d.ctl_ok(&["snapshot", "create", "v", "s"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (kind, name) in [("volume", "v"), ("snapshot", "s")] {
        let created = d.ctl_json(&[kind, "show", name])["created_unix"]
            .as_u64()
            .unwrap_or_else(|| panic!("{kind} JSON keeps created_unix as a number"));
        assert!(created > 0 && created <= now, "{created}");
        let table = d.ctl_ok(&[kind, "show", name]);
        assert!(!table.contains(&created.to_string()), "{table}");
        let stamp = created_stamp(&table);
        let secs = created % 86_400;
        let time = format!(
            "T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        );
        assert!(stamp.ends_with(&time), "{stamp} vs {created}");
    }
}

#[test]
fn rounded_sizes_get_a_note_on_stderr() {
    let d = Daemon::start();
    let out = d.ctl(&["volume", "create", "odd", "--size", "1000"]);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("created volume \"odd\""),
        "{}",
        out.stdout
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines[0],
        "note: size 1000 B rounded up to 4 KiB (sizes are whole multiples of the size granule)"
    );
    // A number without a unit that small is most likely a forgotten unit: said too.
    assert_eq!(lines.len(), 2, "{}", out.stderr);
    assert!(
        lines[1].starts_with("warning: --size 1000 has no unit"),
        "{}",
        out.stderr
    );

    // JSON stays one value on stdout; the note still goes to stderr.
    let out = d.ctl(&["volume", "create", "odd2", "--size", "5000", "-o", "json"]);
    assert!(out.success(), "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["size_bytes"], 8192);
    assert!(
        out.stderr.contains("size 5000 B rounded up to 8 KiB"),
        "{}",
        out.stderr
    );

    // Exact sizes say nothing.
    let out = d.ctl(&["volume", "create", "even", "--size", "4K"]);
    assert!(out.success() && out.stderr.is_empty(), "{}", out.stderr);

    // Resize rounds the same way and says so.
    let out = d.ctl(&["volume", "resize", "even", "--size", "10000"]);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("resized volume \"even\" to 12 KiB"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("size 10000 B rounded up to 12 KiB"),
        "{}",
        out.stderr
    );
    let out = d.ctl(&["volume", "resize", "even", "--size", "16K"]);
    assert!(out.success() && out.stderr.is_empty(), "{}", out.stderr);
}

#[test]
fn blockd_demo_uses_a_private_directory_and_fails_in_one_line() {
    let scratch = tempfile::tempdir().expect("scratch directory");
    let tmp = scratch.path().join("tmp");
    let cwd = scratch.path().join("cwd");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    let demo = || {
        let mut cmd = std::process::Command::new(blockd_tests::binary("blockd-demo"));
        cmd.current_dir(&cwd)
            .env("TMPDIR", &tmp)
            .env("RUST_BACKTRACE", "1")
            .arg("--io-engine")
            .arg("sync");
        cmd
    };

    // By default: a private temporary directory, removed at exit; nothing in the cwd.
    let out = demo().output().expect("run blockd-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("fsck: clean"), "{stdout}");
    assert!(stdout.contains(&tmp.display().to_string()), "{stdout}");
    assert_eq!(std::fs::read_dir(&cwd).unwrap().count(), 0, "cwd was used");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "not removed");

    // An explicit --state-dir is used and kept.
    let kept = scratch.path().join("kept");
    let out = demo().arg("--state-dir").arg(&kept).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(kept.join("pool.img").exists() && kept.join("meta").is_dir());

    // A daemon's state directory is refused in one line, without a backtrace.
    let d = Daemon::start();
    let out = demo().arg("--state-dir").arg(d.dir()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("metadata store"),
        "{stderr}"
    );
    // The daemon is unharmed.
    d.ctl_ok(&["volume", "create", "after-demo", "--size", "1M"]);
}
