//! A full metadata file system seen through the real daemon: blockd's RocksDB directory
//! on a small tmpfs that a filler file fills up, the pool file elsewhere. qemu-io (a real
//! NBD client) sees `No space left on device` (NBD_ENOSPC) for a flush and for a write
//! into unallocated space, while reads and overwrites of allocated data keep working;
//! blockctl sees the degraded health and RESOURCE_EXHAUSTED with the daemon's message;
//! once the filler is removed, writes resume without a restart, and everything
//! acknowledged by a flush is still there after one.
//!
//! Needs root (the mount) and qemu-io: skipped with a reason elsewhere, a failure under
//! `CI=true`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockd_tests::Daemon;

const CHUNK: u64 = 64 * 1024;
/// A liveness bound for the engine to resume (RocksDB re-checks free space every 5 s),
/// not a speed check: the wait ends as soon as a write gets through.
const RESUME_DEADLINE: Duration = Duration::from_secs(90);

/// A tmpfs mounted on a directory of its own; unmounted when dropped, even on a panic.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        if !blockd_tests::is_root() {
            blockd_tests::skip("mounting a tmpfs for blockd's metadata needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if !out.status.success() {
            blockd_tests::skip(&format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Runs qemu-io on `uri`; returns its output (stdout and stderr).
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = cmd.output().expect("run qemu-io");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: &str) -> bool {
    !out.contains("failed") && !out.contains("error")
}

fn write_cmd(chunk: u64, byte: u8) -> String {
    format!("write -P {byte:#x} {} {CHUNK}", chunk * CHUNK)
}

fn read_cmd(chunk: u64, byte: u8) -> String {
    format!("read -P {byte:#x} {} {CHUNK}", chunk * CHUNK)
}

/// Writes a file until the file system says ENOSPC.
fn fill_file_system(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler");
    let block = vec![0xf1u8; 64 * 1024];
    for n in [block.len(), 4096, 512, 1] {
        loop {
            match f.write(&block[..n]) {
                Ok(w) if w > 0 => {}
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the metadata file system: {e}"),
            }
        }
    }
    path
}

#[test]
fn a_full_metadata_file_system_gives_enospc_to_nbd_clients_and_resumes() {
    if !blockd_tests::have_tool("qemu-io") {
        blockd_tests::skip("qemu-io is not installed (tools/test.sh installs it)");
        return;
    }
    // Smaller than RocksDB's WAL preallocation (1.1 × its 64 MiB map write buffer), so no
    // preallocated WAL space hides the full file system. Declared before the daemon: the
    // daemon goes first, then the mount.
    let Some(tmpfs) = Tmpfs::mount("24m") else {
        return;
    };
    let mut d = Daemon::start();
    d.ctl_ok(&["volume", "create", "vol", "--size", "64M"]);
    let uri = d.ctl_ok(&["export", "vol"]).trim().to_string();
    let out = qemu_io(&uri, &[&write_cmd(0, 0x10), &write_cmd(1, 0x11), "flush"]);
    assert!(ok(&out), "{out}");

    // Move the metadata onto the tmpfs; the pool file stays where it is.
    d.stop();
    let meta = d.dir().join("meta");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&meta)
        .arg(tmpfs.path())
        .status()
        .expect("run cp");
    assert!(status.success(), "copy the metadata onto the tmpfs");
    std::fs::remove_dir_all(&meta).expect("remove the original metadata");
    std::os::unix::fs::symlink(tmpfs.path().join("meta"), &meta).expect("link the metadata");
    d.restart();

    let filler = fill_file_system(tmpfs.path());
    // Fresh chunks are acknowledged into the engine's overlay; the flush that has to
    // commit them finds the file system full (RocksDB may first use the slack of its
    // last WAL page, so try a few).
    let mut model = vec![(0u64, 0x10u8), (1, 0x11)];
    let mut next = 2;
    loop {
        assert!(next < 200, "the metadata never filled up");
        let byte = 0x10 + next as u8;
        let out = qemu_io(&uri, &[&write_cmd(next, byte), "flush"]);
        next += 1;
        if ok(&out) {
            model.push((next - 1, byte));
            continue;
        }
        assert!(
            out.contains("flush failed: No space left on device"),
            "the flush fails with ENOSPC: {out}"
        );
        // Acknowledged, not yet durable: it reads back and is committed later.
        model.push((next - 1, byte));
        break;
    }
    let out = qemu_io(&uri, &[&write_cmd(next, 0xee)]);
    assert!(
        out.contains("write failed: No space left on device"),
        "a write into unallocated space fails with ENOSPC: {out}"
    );
    let out = qemu_io(&uri, &[&write_cmd(0, 0x70), &read_cmd(0, 0x70)]);
    assert!(ok(&out), "an overwrite of an allocated chunk works: {out}");
    model[0] = (0, 0x70);
    let reads: Vec<String> = model.iter().map(|&(c, b)| read_cmd(c, b)).collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    let out = qemu_io(&uri, &reads);
    assert!(ok(&out), "everything acknowledged reads back: {out}");

    let pool = d.ctl_json(&["pool", "show", "default"]);
    let health = pool["health"].as_str().unwrap_or_default();
    assert!(health.contains("metadata file system full"), "{pool}");
    let err = d.ctl_err(&["snapshot", "create", "vol", "s1"]);
    assert!(
        err.contains("metadata file system is full") && err.contains("--state-dir"),
        "{err}"
    );

    std::fs::remove_file(&filler).expect("free the metadata file system");
    let deadline = Instant::now() + RESUME_DEADLINE;
    loop {
        let out = qemu_io(&uri, &[&write_cmd(next, 0xee)]);
        if ok(&out) {
            break;
        }
        assert!(
            out.contains("No space left on device") && Instant::now() < deadline,
            "writes did not resume after space was freed: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    model.push((next, 0xee));
    let out = qemu_io(&uri, &["flush"]);
    assert!(ok(&out), "{out}");
    d.ctl_ok(&["snapshot", "create", "vol", "s1"]);
    let pool = d.ctl_json(&["pool", "show", "default"]);
    assert_eq!(pool["health"], "ok", "{pool}");
    let report = d.ctl_json(&["fsck"]);
    assert_eq!(report["clean"], true, "{report}");

    d.stop();
    d.restart();
    let reads: Vec<String> = model.iter().map(|&(c, b)| read_cmd(c, b)).collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    let out = qemu_io(&uri, &reads);
    assert!(ok(&out), "everything survives a restart: {out}");
    let report = d.ctl_json(&["fsck"]);
    assert_eq!(report["clean"], true, "{report}");
    d.stop();
}
