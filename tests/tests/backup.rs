//! Changed-block tracking and backups end to end, through the real binaries:
//! `blockctl snapshot diff`, `volume allocated`, the `ImageDataService` RPCs, and
//! `export-diff` / `import-diff` chains replayed on a second daemon, compared byte for byte
//! with `qemu-img compare` on both daemons' NBD exports. Bad streams (corrupt, truncated,
//! reordered, wrong base, local writes) are refused and leave the volume as it was.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blockd_proto::v1;
use blockd_proto::v1::image_data_service_client::ImageDataServiceClient;
use blockd_tests::{
    ctl_command, expect_status, have_tool, runtime, skip, snapshot_request, Daemon,
};
use serde_json::Value;
use tonic::Code;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

macro_rules! require {
    ($($tool:expr),+) => {
        $(if !have_tool($tool) {
            skip(&format!("{} is not installed (tools/test.sh installs it)", $tool));
            return;
        })+
    };
}

fn export(d: &Daemon, image: &str) -> String {
    d.ctl_ok(&["export", image]).trim().to_string()
}

/// Runs qemu-io commands on an image of `d` (exported on the way).
fn qemu_io(d: &Daemon, image: &str, cmds: &[&str]) {
    blockd_tests::qemu_io(&export(d, image), cmds);
}

/// `qemu-img compare` of two images (each on its daemon): true when identical.
fn same(a: (&Daemon, &str), b: (&Daemon, &str)) -> bool {
    let (ua, ub) = (export(a.0, a.1), export(b.0, b.1));
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &ua, &ub])
        .output()
        .expect("qemu-img compare");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {} {} failed: {}",
            a.1,
            b.1,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn extents(v: &Value) -> Vec<(u64, u64, bool)> {
    v["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .map(|x| {
            (
                x["offset"].as_u64().unwrap(),
                x["length"].as_u64().unwrap(),
                x["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn snapshot_diff_and_volume_allocated() {
    require!("qemu-io");
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "v", "--size", "4M"]);
    qemu_io(&d, "v", &["write -P 0x11 0 64k", "write -P 0x22 1M 100k"]);
    d.ctl_ok(&["snapshot", "create", "v", "s1"]);
    qemu_io(&d, "v", &["write -P 0x33 128k 4k", "discard 1M 64k"]);
    d.ctl_ok(&["snapshot", "create", "v", "s2"]);
    qemu_io(&d, "v", &["write -P 0x44 3M 64k"]);

    let s1_s2 = d.ctl_json(&["snapshot", "diff", "s1", "s2"]);
    assert_eq!(
        extents(&s1_s2),
        vec![(128 * K, 64 * K, false), (M, 64 * K, true)],
        "{s1_s2}"
    );
    assert_eq!(s1_s2["chunk_size_bytes"], 64 * K);
    assert_eq!(s1_s2["image_size_bytes"], 4 * M);
    assert_eq!(s1_s2["total_bytes"], 128 * K);
    // VOL@SNAP works as a target too, and a volume name means its live content.
    assert_eq!(
        extents(&d.ctl_json(&["snapshot", "diff", "s1", "v@s2"])),
        extents(&s1_s2)
    );
    assert_eq!(
        extents(&d.ctl_json(&["snapshot", "diff", "s1", "v"])),
        vec![
            (128 * K, 64 * K, false),
            (M, 64 * K, true),
            (3 * M, 64 * K, false)
        ]
    );
    assert_eq!(
        extents(&d.ctl_json(&["snapshot", "diff", "s2", "s2"])),
        vec![]
    );

    let alloc = d.ctl_json(&["volume", "allocated", "v@s1"]);
    assert_eq!(
        extents(&alloc),
        vec![(0, 64 * K, false), (M, 128 * K, false)],
        "{alloc}"
    );
    assert_eq!(alloc["data_bytes"], 192 * K);
    let live = extents(&d.ctl_json(&["volume", "allocated", "v"]));
    assert_eq!(
        live,
        vec![
            (0, 64 * K, false),
            (128 * K, 64 * K, false),
            (M + 64 * K, 64 * K, false),
            (3 * M, 64 * K, false)
        ]
    );

    let table = d.ctl_ok(&["snapshot", "diff", "s1", "s2"]);
    assert!(
        table.contains("OFFSET") && table.contains("zero") && table.contains("128 KiB"),
        "{table}"
    );
    assert!(table.contains("2 extent(s)"), "{table}");

    // A base newer than the target, and snapshots of different volumes, name both.
    let err = d.ctl_err(&["snapshot", "diff", "s2", "s1"]);
    assert!(err.contains("\"s2\"") && err.contains("\"s1\""), "{err}");
    d.ctl_ok(&["volume", "create", "w", "--size", "4M"]);
    d.ctl_ok(&["snapshot", "create", "w", "w1"]);
    let err = d.ctl_err(&["snapshot", "diff", "s1", "w1"]);
    assert!(err.contains("\"s1\"") && err.contains("\"w1\""), "{err}");
    let err = d.ctl_err(&["snapshot", "diff", "nope", "s1"]);
    assert!(err.contains("\"nope\""), "{err}");
    let err = d.ctl_err(&["volume", "allocated", "v@nope"]);
    assert!(err.contains("nope"), "{err}");
    // export-diff exports snapshots; import-diff needs a readable stream.
    let err = d.ctl_err(&["export-diff", "v", "-o", "/dev/null"]);
    assert!(err.contains("VOLUME@SNAP"), "{err}");
    let err = d.ctl_err(&["export-diff", "w@s1", "-o", "/dev/null"]);
    assert!(err.contains("\"s1\"") && err.contains("\"w\""), "{err}");
    // A device is written directly, never replaced by a renamed temporary file.
    d.ctl_ok(&["export-diff", "v@s2", "--from", "s1", "-o", "/dev/null"]);
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    let err = d.ctl_err(&["import-diff", "/nonexistent/stream", "x"]);
    assert!(err.contains("/nonexistent/stream"), "{err}");

    // The delta reaches across a clone: a clone of s1 and its own snapshot.
    d.ctl_ok(&["volume", "create", "c", "--from-snapshot", "s1"]);
    qemu_io(&d, "c", &["write -P 0x55 2M 4k"]);
    d.ctl_ok(&["snapshot", "create", "c", "c1"]);
    assert_eq!(
        extents(&d.ctl_json(&["snapshot", "diff", "s1", "c1"])),
        vec![(2 * M, 64 * K, false)]
    );
    let err = d.ctl_err(&["snapshot", "diff", "s2", "c1"]);
    assert!(err.contains("\"s2\"") && err.contains("\"c1\""), "{err}");
}

#[test]
fn extent_rpcs_page_and_check_their_arguments() {
    let d = Daemon::start();
    d.ctl_ok(&["volume", "create", "v", "--size", "2M"]);
    d.ctl_ok(&["snapshot", "create", "v", "s0"]);
    let rt = runtime();
    rt.block_on(async {
        let grpc = d.grpc().await;
        let mut data = ImageDataServiceClient::new(grpc.channel.clone());
        // Write every other chunk through WriteImage, one zero range, then snapshot.
        let mut msgs = Vec::new();
        for i in (0..32u64).step_by(2) {
            msgs.push(v1::WriteImageRequest {
                volume: if i == 0 { "v".into() } else { String::new() },
                offset: i * 64 * K,
                data: vec![i as u8 + 1; 64 * K as usize],
                zero_length: 0,
                force: false,
            });
        }
        let resp = data
            .write_image(tokio_stream::iter(msgs))
            .await
            .expect("WriteImage")
            .into_inner();
        assert_eq!(resp.bytes_written, 16 * 64 * K);
        let mut grpc = d.grpc().await;
        grpc.snapshots
            .create_snapshot(snapshot_request("v", "s1"))
            .await
            .expect("snapshot");

        // Pages of 3 extents; every page but the last is full; they tile the result.
        let mut pages = data
            .get_delta(v1::GetDeltaRequest {
                base_snapshot: "s0".into(),
                target: Some(v1::get_delta_request::Target::TargetSnapshot("s1".into())),
                start_offset: 5 * 64 * K + 100,
                max_extents: 3,
            })
            .await
            .expect("GetDelta")
            .into_inner();
        let mut got = Vec::new();
        let mut first = true;
        while let Some(page) = pages.message().await.expect("page") {
            assert!(page.extents.len() <= 3);
            assert_eq!(page.ends.is_some(), first, "ends only in the first page");
            if first {
                let ends = page.ends.as_ref().unwrap();
                assert_eq!(ends.base_volume, "v");
                assert!(ends.target_epoch > ends.base_epoch);
            }
            first = false;
            got.extend(page.extents.iter().map(|x| x.offset / (64 * K)));
        }
        // Chunks 6, 8, ..., 30 (the chunk holding the start offset, 5, was not written).
        assert_eq!(got, (6..32).step_by(2).collect::<Vec<u64>>());

        // ReadImage returns what WriteImage wrote.
        let mut read = data
            .read_image(v1::ReadImageRequest {
                image: "v@s1".into(),
                offset: 64 * K - 10,
                length: 64 * K + 20,
            })
            .await
            .expect("ReadImage")
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(piece) = read.message().await.expect("piece") {
            bytes.extend(piece.data);
        }
        assert_eq!(&bytes[..10], &[1u8; 10]);
        assert_eq!(
            &bytes[10..10 + 64 * K as usize],
            &vec![0u8; 64 * K as usize][..]
        );
        assert_eq!(&bytes[10 + 64 * K as usize..], &[3u8; 10]);

        // Bad arguments are statuses, not broken streams.
        expect_status(
            "ReadImage past the end",
            data.read_image(v1::ReadImageRequest {
                image: "v".into(),
                offset: 2 * M - 1,
                length: 2,
            })
            .await,
            Code::InvalidArgument,
            "",
        );
        expect_status(
            "GetAllocated past the end",
            data.get_allocated(v1::GetAllocatedRequest {
                image: "v@s1".into(),
                start_offset: 2 * M + 1,
                max_extents: 0,
            })
            .await,
            Code::InvalidArgument,
            "",
        );
        expect_status(
            "GetDelta without a target",
            data.get_delta(v1::GetDeltaRequest {
                base_snapshot: "s1".into(),
                target: None,
                start_offset: 0,
                max_extents: 0,
            })
            .await,
            Code::InvalidArgument,
            "",
        );
        expect_status(
            "GetDelta to an older snapshot",
            data.get_delta(v1::GetDeltaRequest {
                base_snapshot: "s1".into(),
                target: Some(v1::get_delta_request::Target::TargetSnapshot("s0".into())),
                start_offset: 0,
                max_extents: 0,
            })
            .await,
            Code::FailedPrecondition,
            "",
        );
        expect_status(
            "WriteImage to a snapshot",
            data.write_image(tokio_stream::iter(vec![v1::WriteImageRequest {
                volume: "v@s1".into(),
                offset: 0,
                data: vec![1],
                zero_length: 0,
                force: false,
            }]))
            .await,
            Code::InvalidArgument,
            "",
        );
        let epochs = data
            .list_snapshot_epochs(v1::ListSnapshotEpochsRequest { volume: "v".into() })
            .await
            .expect("epochs")
            .into_inner();
        let names: Vec<&str> = epochs.snapshots.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["s0", "s1"]);
        assert!(epochs.head_epoch > epochs.snapshots[1].epoch);
    });
}

/// `blockctl ARGS` with stdout into `out` (binary-safe), stdin from `input`.
fn ctl_io(d: &Daemon, args: &[&str], input: Option<&Path>, out: Option<&Path>) -> (bool, String) {
    let mut cmd = ctl_command(&d.api_socket());
    cmd.args(args);
    cmd.stdin(match input {
        Some(p) => Stdio::from(File::open(p).expect("input")),
        None => Stdio::null(),
    });
    cmd.stdout(match out {
        Some(p) => Stdio::from(File::create(p).expect("output")),
        None => Stdio::piped(),
    });
    let o = cmd.output().expect("run blockctl");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// `blockctl export-diff IMAGE --from BASE -o OUT` on `d`, which must succeed.
fn export_incremental(d: &Daemon, image: &str, base: &str, out: &Path) {
    d.ctl_ok(&[
        "export-diff",
        image,
        "--from",
        base,
        "-o",
        out.to_str().unwrap(),
    ]);
}

/// A source daemon with volume `v` of `size`, an empty target daemon, and a scratch
/// directory for the streams between them.
fn source_and_target(size: &str) -> (Daemon, Daemon, tempfile::TempDir) {
    let src = Daemon::start();
    let dst = Daemon::start();
    let tmp = tempfile::tempdir().unwrap();
    src.ctl_ok(&["volume", "create", "v", "--size", size]);
    (src, dst, tmp)
}

#[test]
fn export_diff_chain_replays_byte_for_byte() {
    require!("qemu-io", "qemu-img");
    let (src, dst, tmp) = source_and_target("8M");
    qemu_io(
        &src,
        "v",
        &[
            "write -P 0x11 0 300k",
            "write -P 0x22 5M 64k",
            "write -P 0x23 8188k 4k",
        ],
    );
    src.ctl_ok(&["snapshot", "create", "v", "s1"]);
    qemu_io(
        &src,
        "v",
        &[
            "write -P 0x33 100k 8k",
            "discard 5M 64k",
            "write -z 128k 64k",
            "write -P 0x34 7M 1k",
        ],
    );
    src.ctl_ok(&["snapshot", "create", "v", "s2"]);
    src.ctl_ok(&["volume", "resize", "v", "--size", "12M"]);
    qemu_io(&src, "v", &["write -P 0x55 10M 70k", "write -P 0x56 0 4k"]);
    src.ctl_ok(&["snapshot", "create", "v", "s3"]);

    let (f1, f2, f3) = (
        file(tmp.path(), "s1.bdiff"),
        file(tmp.path(), "s2.bdiff"),
        file(tmp.path(), "s3.bdiff"),
    );
    src.ctl_ok(&["export-diff", "v@s1", "-o", f1.to_str().unwrap()]);
    // To stdout, as `-o -`.
    let (ok, err) = ctl_io(
        &src,
        &["export-diff", "v@s2", "--from", "s1", "-o", "-"],
        None,
        Some(&f2),
    );
    assert!(ok, "export-diff to stdout: {err}");
    src.ctl_ok(&[
        "export-diff",
        "v@s3",
        "--from",
        "s2",
        "--file",
        f3.to_str().unwrap(),
    ]);
    // An incremental stream holds the changes, not the volume.
    let len2 = std::fs::metadata(&f2).unwrap().len();
    assert!(len2 < 200 * K, "incremental stream of {len2} bytes");
    let bytes = std::fs::read(&f2).unwrap();
    assert!(bytes.starts_with(b"BLKDDIFF"));
    // The header names both ends by their stable ids.
    let json_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[16..16 + json_len]).unwrap();
    let id = |snap: &str| src.ctl_json(&["snapshot", "show", snap])["id"].clone();
    assert_eq!(header["target"]["uuid"], id("s2"), "{header}");
    assert_eq!(header["base"]["uuid"], id("s1"), "{header}");
    assert_eq!(
        header["target"]["volume_uuid"],
        src.ctl_json(&["volume", "show", "v"])["id"],
        "{header}"
    );
    assert_eq!(header["base"]["snapshot"], "s1");
    assert_eq!(header["target_size"], 8 * M);

    dst.ctl_ok(&["import-diff", f1.to_str().unwrap(), "r"]);
    let (ok, err) = ctl_io(&dst, &["import-diff", "-", "r"], Some(&f2), None);
    assert!(ok, "import-diff from stdin: {err}");
    dst.ctl_ok(&["import-diff", f3.to_str().unwrap(), "r"]);

    for s in ["s1", "s2", "s3"] {
        assert!(
            same((&src, &format!("v@{s}")), (&dst, &format!("r@{s}"))),
            "snapshot {s} differs after the replay"
        );
    }
    assert!(same((&src, "v@s3"), (&dst, "r")));
    let snaps: Vec<String> = dst
        .ctl_json(&["snapshot", "list", "r"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(snaps, ["s1", "s2", "s3"]);
    assert_eq!(dst.ctl_json(&["volume", "show", "r"])["size_bytes"], 12 * M);
    dst.ctl_ok(&["fsck"]);

    // A snapshot outlives its volume, and so does its export.
    src.ctl_ok(&["volume", "delete", "v", "--force"]);
    let again = file(tmp.path(), "again.bdiff");
    export_incremental(&src, "v@s3", "s2", &again);
    let (a, b) = (std::fs::read(&again).unwrap(), std::fs::read(&f3).unwrap());
    let (_, recs_a, _) = split_stream(&a);
    let (_, recs_b, _) = split_stream(&b);
    assert_eq!(recs_a, recs_b, "the same records after the volume is gone");
}

/// The stream's pieces: (header bytes, records as byte strings, end marker bytes).
fn split_stream(bytes: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>, Vec<u8>) {
    let json_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let hdr = 16 + json_len + 4;
    let mut at = hdr;
    let mut recs = Vec::new();
    while bytes[at] != b'E' {
        let len = u64::from_le_bytes(bytes[at + 9..at + 17].try_into().unwrap()) as usize;
        let size = 17 + if bytes[at] == b'D' { len } else { 0 } + 4;
        recs.push(bytes[at..at + size].to_vec());
        at += size;
    }
    (bytes[..hdr].to_vec(), recs, bytes[at..].to_vec())
}

#[test]
fn bad_streams_are_refused_and_change_nothing() {
    require!("qemu-io", "qemu-img");
    let (src, dst, tmp) = source_and_target("4M");
    qemu_io(&src, "v", &["write -P 0x11 0 1M"]);
    src.ctl_ok(&["snapshot", "create", "v", "s1"]);
    qemu_io(
        &src,
        "v",
        &[
            "write -P 0x22 64k 64k",
            "write -P 0x23 2M 64k",
            "discard 512k 64k",
        ],
    );
    src.ctl_ok(&["snapshot", "create", "v", "s2"]);
    qemu_io(&src, "v", &["write -P 0x33 3M 4k"]);
    src.ctl_ok(&["snapshot", "create", "v", "s3"]);
    let path = |n: &str| file(tmp.path(), n);
    let p = |b: &PathBuf| b.to_str().unwrap().to_string();
    src.ctl_ok(&["export-diff", "v@s1", "-o", &p(&path("full"))]);
    export_incremental(&src, "v@s2", "s1", &path("inc"));
    export_incremental(&src, "v@s3", "s2", &path("next"));
    dst.ctl_ok(&["import-diff", &p(&path("full")), "r"]);

    let good = std::fs::read(path("inc")).unwrap();
    let (hdr, recs, end) = split_stream(&good);
    assert!(recs.len() >= 3, "{} records", recs.len());

    let mut corrupt = good.clone();
    let mid = hdr.len() + 17 + 100;
    corrupt[mid] ^= 0xff;
    std::fs::write(path("corrupt"), &corrupt).unwrap();
    std::fs::write(path("truncated"), &good[..good.len() - 9]).unwrap();
    let mut reordered = hdr.clone();
    reordered.extend_from_slice(&recs[1]);
    reordered.extend_from_slice(&recs[0]);
    for r in &recs[2..] {
        reordered.extend_from_slice(r);
    }
    reordered.extend_from_slice(&end);
    std::fs::write(path("reordered"), &reordered).unwrap();
    let mut dropped = hdr.clone();
    for r in &recs[1..] {
        dropped.extend_from_slice(r);
    }
    dropped.extend_from_slice(&end);
    std::fs::write(path("dropped"), &dropped).unwrap();
    std::fs::write(path("garbage"), b"not a stream at all").unwrap();

    for (name, needle) in [
        ("corrupt", "checksum"),
        ("truncated", "truncated"),
        ("reordered", "out of order"),
        ("dropped", "missing"),
        ("garbage", "not a blockd diff stream"),
        ("next", "\"s2\""),
        ("full", "already exists"),
    ] {
        let err = dst.ctl_err(&["import-diff", &p(&path(name)), "r"]);
        assert!(err.contains(needle), "{name}: {err}");
        assert!(err.contains("nothing was changed"), "{name}: {err}");
        // The volume is still exactly its snapshot s1, with no new snapshot.
        assert!(
            same((&dst, "r"), (&src, "v@s1")),
            "{name} changed the volume"
        );
        let snaps = dst.ctl_json(&["snapshot", "list", "r"]);
        assert_eq!(snaps.as_array().unwrap().len(), 1, "{name}: {snaps}");
    }
    // The wrong-base refusal names both snapshots.
    let err = dst.ctl_err(&["import-diff", &p(&path("next")), "r"]);
    assert!(err.contains("\"s1\"") && err.contains("\"s2\""), "{err}");
    // An incremental stream into a volume that does not exist.
    let err = dst.ctl_err(&["import-diff", &p(&path("inc")), "other"]);
    assert!(
        err.contains("\"other\"") && err.contains("does not exist"),
        "{err}"
    );

    // Writes since the base (outside the stream's records) are refused too.
    qemu_io(&dst, "r", &["write -P 0x77 3584k 4k"]);
    let err = dst.ctl_err(&["import-diff", &p(&path("inc")), "r"]);
    assert!(err.contains("written since"), "{err}");
    // Discarding the whole chunk again leaves no change since the base.
    qemu_io(&dst, "r", &["discard 3584k 64k"]);

    // A write inside the stream's records (an interrupted import) does not block it;
    // the real stream then applies and the next one on top.
    qemu_io(&dst, "r", &["write -P 0x99 64k 4k"]);
    dst.ctl_ok(&["import-diff", &p(&path("inc")), "r"]);
    assert!(same((&dst, "r@s2"), (&src, "v@s2")));
    dst.ctl_ok(&["import-diff", &p(&path("next")), "r", "--snapshot", "third"]);
    assert!(same((&dst, "r@third"), (&src, "v@s3")));

    // A namesake is not the base. A snapshot named s1, of s1's size and even holding
    // s1's bytes, but taken by hand rather than by importing s1, is refused by id: its
    // name and size prove nothing about what it holds.
    dst.ctl_ok(&["snapshot", "delete", "s1"]);
    dst.ctl_ok(&["volume", "create", "n", "--size", "4M"]);
    qemu_io(&dst, "n", &["write -P 0x11 0 1M"]);
    dst.ctl_ok(&["snapshot", "create", "n", "s1"]);
    let err = dst.ctl_err(&["import-diff", &p(&path("inc")), "n", "--snapshot", "n2"]);
    assert!(err.contains("nothing was changed"), "{err}");
    let base_id = src.ctl_json(&["snapshot", "show", "s1"])["id"]
        .as_str()
        .expect("snapshot id")
        .to_string();
    assert!(
        err.contains(&base_id),
        "the refusal names the base's id: {err}"
    );
    assert_eq!(
        dst.ctl_json(&["snapshot", "list", "n"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Back into the volume it came from, the stream's base is the snapshot itself.
    src.ctl_ok(&["import-diff", &p(&path("full")), "back", "--snapshot", "b1"]);
    let b1 = src.ctl_json(&["snapshot", "show", "b1"]);
    assert_eq!(b1["replica_of"], base_id.as_str(), "{b1}");
}
