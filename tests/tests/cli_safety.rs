//! What blockd refuses or makes plain so that nobody loses data by surprise, driven
//! through the real `blockd` and `blockctl`:
//! - volumes and snapshots have ids, and a name reused after a delete never inherits
//!   another object's history (`vol1 (deleted)`, `snapshot snap1 (deleted)`);
//! - deleting or unexporting an image with connected NBD clients needs --force, and so
//!   does writing its data behind their backs (`import-diff`, WriteImage);
//! - pools refuse volume sizes past `--max-overprovision`;
//! - a size without a unit below 4096 bytes draws a warning;
//! - every creation and deletion is logged once.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};

use blockd_proto::v1;
use blockd_tests::{expect_status, runtime, Daemon};
use serde_json::Value;
use tonic::Code;

fn by_name<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}"))
}

/// A UUID in its usual text form: 8-4-4-4-12 lowercase hex digits.
fn is_uuid(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| {
            g.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

#[test]
fn a_snapshot_of_a_deleted_volume_says_so_even_after_the_name_is_reused() {
    let mut d = Daemon::start();
    let old = d.ctl_json(&["volume", "create", "vol1", "--size", "1M"]);
    assert!(is_uuid(&old["id"]), "{old}");
    let snap = d.ctl_json(&["snapshot", "create", "vol1", "snap1"]);
    assert!(is_uuid(&snap["id"]), "{snap}");
    assert_eq!(snap["volume_id"], old["id"]);
    assert_eq!(snap["volume_deleted"], false);

    d.ctl_ok(&["volume", "delete", "vol1"]);
    let new = d.ctl_json(&["volume", "create", "vol1", "--size", "1M"]);
    assert_ne!(new["id"], old["id"]);

    let list = d.ctl_json(&["snapshot", "list"]);
    let snap = by_name(&list, "snap1");
    assert_eq!(snap["volume"], "vol1");
    assert_eq!(snap["volume_deleted"], true);
    assert_eq!(snap["volume_id"], old["id"]);
    let table = d.ctl_ok(&["snapshot", "list"]);
    assert!(table.contains("vol1 (deleted)"), "{table}");
    let shown = d.ctl_ok(&["snapshot", "show", "snap1"]);
    assert!(
        shown.contains("vol1 (deleted)") && shown.contains(old["id"].as_str().unwrap()),
        "{shown}"
    );
    // The new vol1 has no snapshots.
    assert_eq!(
        d.ctl_json(&["snapshot", "list", "vol1"]),
        Value::Array(vec![])
    );
    let err = d.ctl_err(&["snapshot", "create", "vol1", "snap1"]);
    assert!(
        err.contains("already exists") && err.contains("(deleted)"),
        "{err}"
    );

    // Ids and what they resolve to survive a restart.
    let before = d.ctl_json(&["snapshot", "show", "snap1"]);
    d.stop();
    d.restart();
    assert_eq!(d.ctl_json(&["snapshot", "show", "snap1"]), before);
    assert_eq!(d.ctl_json(&["volume", "show", "vol1"])["id"], new["id"]);
}

#[test]
fn a_clone_of_a_deleted_snapshot_says_so_even_after_the_name_is_reused() {
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "vol1", "--size", "1M"]);
    let snap = d.ctl_json(&["snapshot", "create", "vol1", "snap1"]);
    let clone = d.ctl_json(&["volume", "create", "c", "--from-snapshot", "snap1"]);
    assert_eq!(clone["source_snapshot"], "snap1");
    assert_eq!(clone["source_id"], snap["id"]);
    assert_eq!(clone["source_deleted"], false);

    d.ctl_ok(&["snapshot", "delete", "snap1"]);
    let shown = d.ctl_ok(&["volume", "show", "c"]);
    assert!(shown.contains("snapshot snap1 (deleted)"), "{shown}");

    d.ctl_ok(&["volume", "create", "vol2", "--size", "1M"]);
    let new_snap = d.ctl_json(&["snapshot", "create", "vol2", "snap1"]);
    assert_ne!(new_snap["id"], snap["id"]);
    let list = d.ctl_json(&["volume", "list"]);
    let c = by_name(&list, "c");
    assert_eq!(c["source_deleted"], true, "{c}");
    assert_eq!(c["source_id"], snap["id"]);
    // vol2 is no clone of its own snapshot.
    let vol2 = by_name(&list, "vol2");
    assert_eq!(vol2["source_snapshot"], Value::Null, "{vol2}");
    assert_eq!(vol2["source_id"], Value::Null, "{vol2}");
    let table = d.ctl_ok(&["volume", "list"]);
    let c_row = table
        .lines()
        .find(|l| l.contains(" c "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(c_row.contains("snapshot snap1 (deleted)"), "{table}");
    // "c from snap1" is no idempotent retry now: snap1 is another snapshot.
    let err = d.ctl_err(&["volume", "create", "c", "--from-snapshot", "snap1"]);
    assert!(err.contains("already exists"), "{err}");
}

/// A `qemu-io` session that stays connected until told to quit.
struct Client {
    child: Child,
    /// None once closed (qemu-io ends at the end of its input).
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Client {
    /// Connects and reads once, so the connection is certainly up when this returns.
    fn connect(uri: &str) -> Client {
        // qemu-io reports failures on stderr: one stream, so a failed read is seen; and
        // line-buffered, so each answer arrives while it keeps running.
        let mut child = Command::new("sh")
            .args(["-c", "exec stdbuf -oL qemu-io -f raw \"$0\" 2>&1", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut client = Client {
            child,
            stdin: Some(stdin),
            lines,
        };
        assert!(client.read(), "the first read works");
        client
    }

    /// Reads the answer to one command: true for a successful 4 KiB read.
    fn answer_ok(&mut self) -> bool {
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            if line.contains("read 4096/4096 bytes") {
                return true;
            }
            if line.contains("error") || line.contains("failed") {
                return false;
            }
        }
        false
    }

    /// Reads 4 KiB while staying connected; true when it worked.
    fn read(&mut self) -> bool {
        writeln!(self.stdin.as_ref().unwrap(), "read 0 4k").unwrap();
        self.answer_ok()
    }

    /// Reads 4 KiB one last time and quits; returns everything it said.
    fn read_and_quit(mut self) -> String {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "read 0 4k");
            let _ = writeln!(stdin, "quit");
        }
        let rest: Vec<String> = self.lines.by_ref().map_while(Result::ok).collect();
        let _ = self.child.wait();
        rest.join("\n")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn delete_and_unexport_refuse_while_clients_are_connected() {
    if !blockd_tests::have_tool("qemu-io") {
        blockd_tests::skip("qemu-io is not installed (tools/test.sh installs it)");
        return;
    }
    let d = Daemon::start();
    let rt = runtime();
    d.ctl_ok(&["volume", "create", "busy", "--size", "16M"]);
    let uri = d.ctl_ok(&["export", "busy"]).trim().to_string();
    let client = Client::connect(&uri);

    let err = d.ctl_err(&["volume", "delete", "busy"]);
    assert!(
        err.contains("1 NBD client is connected")
            && err.contains("blockctl volume delete busy --force"),
        "{err}"
    );
    rt.block_on(async {
        let mut api = d.grpc().await;
        expect_status(
            "delete with a connected client",
            api.volumes
                .delete_volume(v1::DeleteVolumeRequest {
                    name: "busy".into(),
                    force: false,
                })
                .await,
            Code::FailedPrecondition,
            "1 NBD client",
        );
        expect_status(
            "unexport with a connected client",
            api.exports
                .unexport(v1::UnexportRequest {
                    image: "busy".into(),
                    force: false,
                })
                .await,
            Code::FailedPrecondition,
            "--force",
        );
    });
    // Nothing happened: still there, still exported, the client still reads.
    assert_eq!(d.ctl_json(&["volume", "show", "busy"])["exported"], true);
    let mut client = client;
    assert!(client.read(), "the refused delete left the client alone");

    // A client that went away does not count (a plain unexport right after it).
    let said = client.read_and_quit();
    assert!(said.contains("read 4096/4096 bytes"), "{said}");
    d.ctl_ok(&["unexport", "busy"]);
    d.ctl_ok(&["export", "busy"]);

    // --force closes the connections and deletes.
    let client = Client::connect(&uri);
    d.ctl_ok(&["volume", "delete", "busy", "--force"]);
    let said = client.read_and_quit();
    assert!(
        !said.contains("read 4096/4096 bytes"),
        "the forced delete closed the connection: {said}"
    );
    d.ctl_err(&["volume", "show", "busy"]);
}

#[test]
fn import_diff_refuses_a_volume_with_connected_clients_and_changes_nothing() {
    if !blockd_tests::have_tool("qemu-io") {
        blockd_tests::skip("qemu-io is not installed (tools/test.sh installs it)");
        return;
    }
    let d = Daemon::start();
    let path = |name: &str| d.dir().join(name).to_str().unwrap().to_string();
    d.ctl_ok(&["volume", "create", "v", "--size", "4M"]);
    let v = d.ctl_ok(&["export", "v"]).trim().to_string();
    blockd_tests::qemu_io(&v, &["write -P 0x11 0 1M"]);
    d.ctl_ok(&["snapshot", "create", "v", "s1"]);
    blockd_tests::qemu_io(&v, &["write -P 0x22 0 64k"]);
    d.ctl_ok(&["snapshot", "create", "v", "s2"]);
    d.ctl_ok(&["export-diff", "v@s1", "-o", &path("full")]);
    d.ctl_ok(&["export-diff", "v@s2", "--from", "s1", "-o", &path("inc")]);
    // Snapshot names are the daemon's: the copies take their own.
    d.ctl_ok(&["import-diff", &path("full"), "r", "--snapshot", "r1"]);
    let uri = d.ctl_ok(&["export", "r"]).trim().to_string();
    let mut client = Client::connect(&uri);

    let err = d.ctl_err(&["import-diff", &path("inc"), "r", "--snapshot", "r2"]);
    assert!(
        err.contains("1 NBD client")
            && err.contains("nothing was changed")
            && err.contains("--force"),
        "{err}"
    );
    let snaps = d.ctl_json(&["snapshot", "list", "r"]);
    assert_eq!(
        snaps.as_array().map(Vec::len),
        Some(1),
        "no snapshot taken: {snaps}"
    );
    // The daemon refuses the raw API too, not only blockctl.
    runtime().block_on(async {
        let api = d.grpc().await;
        let mut data =
            v1::image_data_service_client::ImageDataServiceClient::new(api.channel.clone());
        expect_status(
            "WriteImage under a connected client",
            data.write_image(tokio_stream::iter(vec![v1::WriteImageRequest {
                volume: "r".into(),
                offset: 0,
                data: vec![0x33; 4096],
                zero_length: 0,
                force: false,
            }]))
            .await,
            Code::FailedPrecondition,
            "NBD client",
        );
    });
    assert!(client.read(), "the client is left alone");

    // --force applies it anyway, under the client.
    d.ctl_ok(&[
        "import-diff",
        &path("inc"),
        "r",
        "--snapshot",
        "r2",
        "--force",
    ]);
    let said = client.read_and_quit();
    assert!(said.contains("read 4096/4096 bytes"), "{said}");
    let snaps = d.ctl_json(&["snapshot", "list", "r"]);
    assert_eq!(snaps.as_array().map(Vec::len), Some(2), "{snaps}");
    // The stream's data is there: s2's bytes over s1's.
    blockd_tests::qemu_io(&uri, &["read -P 0x22 0 64k", "read -P 0x11 64k 960k"]);
}

#[test]
fn pools_refuse_sizes_past_the_overprovisioning_limit() {
    let d = Daemon::start_with(&["--max-overprovision", "2"]);
    let pool = d.ctl_json(&["pool", "show", "default"]);
    assert_eq!(pool["max_overprovisioning_ratio"], 2.0);
    let capacity = pool["capacity_bytes"].as_u64().unwrap();
    let table = d.ctl_ok(&["pool", "show", "default"]);
    assert!(table.contains("limit 2"), "{table}");

    let half = (capacity / 2 / 4096 * 4096).to_string();
    let three_halves = (capacity / 2 * 3 / 4096 * 4096).to_string();
    d.ctl_ok(&[
        "volume",
        "create",
        "a",
        "--size",
        &format!("{three_halves}B"),
    ]);
    let err = d.ctl_err(&[
        "volume",
        "create",
        "b",
        "--size",
        &format!("{three_halves}B"),
    ]);
    assert!(
        err.contains("over-provisioned")
            && err.contains("--max-overprovision")
            && err.contains("\"default\""),
        "{err}"
    );
    let err = d.ctl_err(&[
        "volume",
        "resize",
        "a",
        "--size",
        &format!("{}B", capacity * 3),
    ]);
    assert!(err.contains("growing volume \"a\""), "{err}");
    d.ctl_err(&["volume", "create", "copy", "--from-volume", "a"]);
    d.ctl_ok(&["volume", "create", "b", "--size", &format!("{half}B")]);
    let pools = d.ctl_json(&["pool", "list"]);
    let ratio = pools[0]["overprovisioning_ratio"].as_f64().unwrap();
    assert!(ratio > 1.9 && ratio <= 2.0, "{ratio}");
    let table = d.ctl_ok(&["pool", "list"]);
    assert!(table.contains(" / 2"), "{table}");
    let rt = runtime();
    rt.block_on(async {
        let mut api = d.grpc().await;
        expect_status(
            "create past the limit",
            api.volumes
                .create_volume(v1::CreateVolumeRequest {
                    name: "c".into(),
                    size_bytes: Some(1 << 30),
                    ..Default::default()
                })
                .await,
            Code::ResourceExhausted,
            "over-provisioned",
        );
    });

    // The default is 20: a 2G test pool takes at most 40G of volumes.
    let d = Daemon::start();
    assert_eq!(
        d.ctl_json(&["pool", "show", "default"])["max_overprovisioning_ratio"],
        20.0
    );
    d.ctl_ok(&["volume", "create", "a", "--size", "30G"]);
    let err = d.ctl_err(&["volume", "create", "b", "--size", "30G"]);
    assert!(err.contains("past the limit of 20x"), "{err}");

    let d = Daemon::start_with(&["--max-overprovision", "none"]);
    assert_eq!(
        d.ctl_json(&["pool", "show", "default"])["max_overprovisioning_ratio"],
        Value::Null
    );
    d.ctl_ok(&["volume", "create", "huge", "--size", "1P"]);
    assert!(d.ctl_ok(&["pool", "show", "default"]).contains("no limit"));
}

#[test]
fn a_small_size_without_a_unit_draws_a_warning() {
    let d = Daemon::start();
    let out = d.ctl(&["volume", "create", "tiny", "--size", "1000"]);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("--size 1000 has no unit") && out.stderr.contains("1000G"),
        "{}",
        out.stderr
    );
    // Said in bytes on purpose: only the rounding is noted.
    let out = d.ctl(&["volume", "create", "bytes", "--size", "1000B"]);
    assert!(out.success(), "{}", out.stderr);
    assert!(!out.stderr.contains("no unit"), "{}", out.stderr);
    assert!(out.stderr.contains("rounded up"), "{}", out.stderr);
    let out = d.ctl(&["volume", "resize", "bytes", "--size", "8192"]);
    assert!(out.success() && out.stderr.is_empty(), "{}", out.stderr);
}

#[test]
fn creations_and_deletions_are_logged_once() {
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "logged", "--size", "1M"]);
    d.ctl_ok(&["snapshot", "create", "logged", "s1"]);
    d.ctl_ok(&["volume", "resize", "logged", "--size", "2M"]);
    d.ctl_ok(&["snapshot", "delete", "s1"]);
    d.ctl_ok(&["volume", "delete", "logged"]);
    let log = d.log();
    for event in [
        "created volume",
        "created snapshot",
        "resized volume",
        "deleted snapshot",
        "deleted volume",
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(event)).collect();
        assert_eq!(
            lines.len(),
            1,
            "{event:?} logged {} times: {lines:#?}",
            lines.len()
        );
        assert!(
            lines[0].contains("logged") || lines[0].contains("s1"),
            "{}",
            lines[0]
        );
    }
    let created = log.lines().find(|l| l.contains("created volume")).unwrap();
    assert!(
        created.contains("volume_id=") && created.contains("size_bytes="),
        "{created}"
    );
}
