//! The ublk frontend end to end: `blockctl attach --ublk` / `detach`, a real file system
//! on `/dev/ublkbN`, read-only snapshots, discard and write-zeroes, and recovery of a
//! mounted, written device after blockd is killed (SIGKILL) or stopped (SIGTERM).
//!
//! These need the kernel's ublk driver, which the guest of `tests/vm/run.sh` has
//! (`tests/vm/kernel-suite.sh` runs this file there). Where `/dev/ublk-control` is absent
//! (the host), each test checks instead that blockd refuses to attach with the reason and
//! the way out, unless `BLOCKD_TEST_UBLK=1` says ublk must be there (the guest suite sets
//! it): then its absence fails the test.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockd_tests::csi_node::{checksum, content, write_synced, MIB};
use blockd_tests::{have_tool, is_root, Daemon};

/// Whether this kernel serves ublk; panics when the suite demands it and it is missing.
fn ublk_here() -> bool {
    let here = Path::new("/dev/ublk-control").exists() && is_root();
    if !here && std::env::var("BLOCKD_TEST_UBLK").as_deref() == Ok("1") {
        panic!("BLOCKD_TEST_UBLK=1 but /dev/ublk-control is missing (or not root)");
    }
    here
}

/// Without ublk: attach refuses with FAILED_PRECONDITION's message naming the fix, and
/// `blockctl status` says ublk is unavailable.
fn assert_refused_without_ublk(daemon: &Daemon, image: &str) {
    let err = daemon.ctl_err(&["attach", image, "--ublk"]);
    assert!(
        err.contains("ublk") && err.contains("modprobe ublk_drv"),
        "{err}"
    );
    let status = daemon.ctl_json(&["status"]);
    let ublk = status["ublk"].as_str().expect("status.ublk");
    assert!(ublk.starts_with("unavailable"), "{status}");
    assert_eq!(status["ublk_devices"], serde_json::json!([]), "{status}");
}

/// Attaches `image`, checks the one-line output, returns the device.
fn attach(daemon: &Daemon, image: &str) -> PathBuf {
    let out = daemon.ctl_ok(&["attach", image, "--ublk"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "attach prints one line: {out:?}");
    assert!(lines[0].starts_with("/dev/ublkb"), "{out:?}");
    let device = PathBuf::from(lines[0]);
    wait_for(&device);
    device
}

fn wait_for(device: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !device.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            device.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Unmounts everything this test mounted, even when it fails.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount(device: &Path, dir: &Path) -> Mounted {
    std::fs::create_dir_all(dir).expect("mount point");
    run(
        "mount",
        &[&device.display().to_string(), &dir.display().to_string()],
    );
    Mounted(dir.to_path_buf())
}

fn read_direct(device: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .unwrap_or_else(|e| panic!("open {}: {e}", device.display()));
    // O_DIRECT wants an aligned buffer: take an aligned window of a larger one.
    let mut raw = vec![0u8; len + 4096];
    let pad = (4096 - (raw.as_ptr() as usize % 4096)) % 4096;
    let buf = &mut raw[pad..pad + len];
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.read_exact(buf).expect("read");
    buf.to_vec()
}

fn write_direct(device: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)?;
    let mut raw = vec![0u8; data.len() + 4096];
    let pad = (4096 - (raw.as_ptr() as usize % 4096)) % 4096;
    raw[pad..pad + data.len()].copy_from_slice(data);
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(&raw[pad..pad + data.len()])?;
    f.sync_all()
}

fn allocated(daemon: &Daemon, volume: &str) -> u64 {
    daemon.ctl_json(&["volume", "show", volume])["allocated_bytes"]
        .as_u64()
        .expect("allocated_bytes")
}

#[test]
fn attach_serves_a_file_system_and_detach_removes_the_device() {
    let daemon = Daemon::start();
    daemon.ctl_ok(&["volume", "create", "fs", "--size", "256M"]);
    if !ublk_here() {
        assert_refused_without_ublk(&daemon, "fs");
        return;
    }
    for tool in ["mkfs.ext4", "fio", "blkdiscard"] {
        assert!(have_tool(tool), "{tool} is not installed");
    }
    let device = attach(&daemon, "fs");
    // Idempotent: the same device, one line again.
    assert_eq!(attach(&daemon, "fs"), device);
    let json = daemon.ctl_json(&["attach", "fs", "--ublk"]);
    assert_eq!(json["device"], device.display().to_string(), "{json}");
    assert_eq!(json["read_only"], false, "{json}");
    // Listed by status and volume show.
    let status = daemon.ctl_json(&["status"]);
    assert_eq!(status["ublk_devices"][0]["image"], "fs", "{status}");
    assert_eq!(status["ublk_devices"][0]["state"], "live", "{status}");
    assert!(
        status["ublk"]
            .as_str()
            .unwrap_or("")
            .starts_with("available"),
        "{status}"
    );
    let show = daemon.ctl_json(&["volume", "show", "fs"]);
    assert_eq!(show["ublk_device"], device.display().to_string(), "{show}");
    // Deleting an attached volume is refused, naming the way out.
    let err = daemon.ctl_err(&["volume", "delete", "fs"]);
    assert!(err.contains("blockctl detach fs"), "{err}");
    // So is writing its data behind the device's back (import-diff, WriteImage).
    daemon.ctl_ok(&["snapshot", "create", "fs", "fs-a"]);
    daemon.ctl_ok(&["snapshot", "create", "fs", "fs-b"]);
    let stream = daemon.dir().join("inc.bdiff");
    let stream = stream.to_str().expect("utf-8 path");
    daemon.ctl_ok(&["export-diff", "fs@fs-b", "--from", "fs-a", "-o", stream]);
    let err = daemon.ctl_err(&["import-diff", stream, "fs", "--snapshot", "fs-c"]);
    assert!(
        err.contains(&format!("attached as {}", device.display()))
            && err.contains("nothing was changed"),
        "{err}"
    );

    // A raw fio verify pass on the device itself (O_DIRECT, queue depth 16).
    run(
        "fio",
        &[
            "--name=raw",
            &format!("--filename={}", device.display()),
            "--size=64M",
            "--bs=16k",
            "--rw=randwrite",
            "--ioengine=libaio",
            "--iodepth=16",
            "--direct=1",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );

    run("mkfs.ext4", &["-q", "-F", &device.display().to_string()]);
    let dir = daemon.dir().join("mnt");
    let mounted = mount(&device, &dir);
    let data = content(3, 16 * MIB as usize);
    write_synced(&dir.join("file"), &data);
    // Mounted: detach is refused.
    let err = daemon.ctl_err(&["detach", "fs"]);
    assert!(err.contains("in use"), "{err}");
    drop(mounted);
    // Read back through a fresh mount (nothing from the page cache).
    run("sh", &["-c", "echo 3 > /proc/sys/vm/drop_caches"]);
    let mounted = mount(&device, &dir);
    let back = std::fs::read(dir.join("file")).expect("read back");
    assert_eq!(checksum(&back), checksum(&data));
    // fstrim reaches the engine as discards: the volume holds less.
    let before = allocated(&daemon, "fs");
    std::fs::remove_file(dir.join("file")).expect("rm");
    run("sync", &[]);
    run("fstrim", &[&dir.display().to_string()]);
    let after = allocated(&daemon, "fs");
    assert!(after < before, "fstrim freed nothing: {before} -> {after}");
    drop(mounted);

    let out = daemon.ctl_ok(&["detach", "fs"]);
    assert!(out.contains("detached"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while device.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!device.exists(), "{} still exists", device.display());
    assert!(daemon
        .ctl_ok(&["detach", "fs"])
        .contains("was not attached"));
    let show = daemon.ctl_json(&["volume", "show", "fs"]);
    assert!(show["ublk_device"].is_null(), "{show}");
    daemon.ctl_ok(&["volume", "delete", "fs"]);
}

#[test]
fn snapshots_attach_read_only_and_zeroes_reach_the_engine() {
    let daemon = Daemon::start();
    daemon.ctl_ok(&["volume", "create", "v", "--size", "64M"]);
    if !ublk_here() {
        assert_refused_without_ublk(&daemon, "v");
        return;
    }
    let device = attach(&daemon, "v");
    let data = content(7, MIB as usize);
    write_direct(&device, 0, &data).expect("write");
    write_direct(&device, 8 * MIB, &data).expect("write");
    daemon.ctl_ok(&["snapshot", "create", "v", "s1"]);
    // Changes after the snapshot do not show in it.
    write_direct(&device, 0, &content(8, MIB as usize)).expect("write");

    let snap = attach(&daemon, "v@s1");
    assert_ne!(snap, device);
    let name = snap.file_name().unwrap().to_string_lossy().into_owned();
    let ro = std::fs::read_to_string(format!("/sys/block/{name}/ro")).expect("ro attribute");
    assert_eq!(ro.trim(), "1", "the snapshot's device is read-only");
    assert_eq!(
        checksum(&read_direct(&snap, 0, MIB as usize)),
        checksum(&data)
    );
    let refused = write_direct(&snap, 0, &data);
    assert!(
        refused.is_err(),
        "a write to the snapshot's device succeeded"
    );
    let show = daemon.ctl_json(&["snapshot", "show", "s1"]);
    assert_eq!(show["ublk_device"], snap.display().to_string(), "{show}");
    // An attached snapshot cannot be deleted.
    let err = daemon.ctl_err(&["snapshot", "delete", "s1"]);
    assert!(err.contains("detach"), "{err}");
    daemon.ctl_ok(&["detach", "v@s1"]);

    // Write-zeroes (blkdiscard -z) and discard on the volume: zeros read back.
    run(
        "blkdiscard",
        &["-z", "-o", "0", "-l", "1M", &device.display().to_string()],
    );
    assert!(read_direct(&device, 0, MIB as usize)
        .iter()
        .all(|&b| b == 0));
    run(
        "blkdiscard",
        &[
            "-o",
            &(8 * MIB).to_string(),
            "-l",
            "1M",
            &device.display().to_string(),
        ],
    );
    assert!(read_direct(&device, 8 * MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0));
    daemon.ctl_ok(&["detach", "v"]);
}

/// A fio job writing `dir/fio.dat` with crc32c headers for `seconds`, verifying as it
/// goes and at the end; O_DIRECT, an fsync every 8 writes.
fn spawn_fio(dir: &Path, seconds: u32) -> std::process::Child {
    Command::new("fio")
        .arg("--name=verify")
        .arg(format!("--filename={}", dir.join("fio.dat").display()))
        .args([
            "--size=32M",
            "--bs=64k",
            "--rw=randwrite",
            "--ioengine=psync",
            "--direct=1",
            "--fsync=8",
            "--verify=crc32c",
            "--verify_backlog=16",
            "--verify_fatal=1",
            "--time_based",
        ])
        .arg(format!("--runtime={seconds}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fio")
}

fn kernel_log_len() -> usize {
    let out = Command::new("dmesg").output().expect("dmesg");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn kernel_errors_since(mark: usize, device: &Path) -> Vec<String> {
    let out = Command::new("dmesg").output().expect("dmesg");
    let name = device.file_name().unwrap().to_string_lossy().into_owned();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(mark)
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains(&name) && (l.contains("error") || l.contains("i/o"))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn a_mounted_device_survives_sigkill_and_sigterm_of_blockd() {
    let mut daemon = Daemon::start();
    daemon.ctl_ok(&["volume", "create", "steady", "--size", "256M"]);
    if !ublk_here() {
        assert_refused_without_ublk(&daemon, "steady");
        return;
    }
    let device = attach(&daemon, "steady");
    run("mkfs.ext4", &["-q", "-F", &device.display().to_string()]);
    let dir = daemon.dir().join("mnt");
    let mounted = mount(&device, &dir);
    let before = content(11, 8 * MIB as usize);
    write_synced(&dir.join("before"), &before);
    let mark = kernel_log_len();

    let fio = spawn_fio(&dir, 20);
    std::thread::sleep(Duration::from_secs(3));
    daemon.kill();
    std::thread::sleep(Duration::from_millis(500));
    daemon.restart();
    std::thread::sleep(Duration::from_secs(3));
    // SIGTERM: the frontend freezes, the engine flushes, the next blockd recovers.
    daemon.stop();
    daemon.restart();
    let out = fio.wait_with_output().expect("fio");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("err= 0"),
        "fio verify failed across the restarts ({}):\n{text}\n{}",
        out.status,
        daemon.log()
    );
    let errors = kernel_errors_since(mark, &device);
    assert!(errors.is_empty(), "kernel errors: {errors:#?}");
    // The same device, live again, with what was written before.
    let status = daemon.ctl_json(&["status"]);
    assert_eq!(
        status["ublk_devices"][0]["device"],
        device.display().to_string()
    );
    assert_eq!(status["ublk_devices"][0]["state"], "live", "{status}");
    let back = std::fs::read(dir.join("before")).expect("read back");
    assert_eq!(checksum(&back), checksum(&before));
    write_synced(&dir.join("after"), &content(12, MIB as usize));
    drop(mounted);
    run("e2fsck", &["-fn", &device.display().to_string()]);
    daemon.ctl_ok(&["detach", "steady"]);
}

/// A small xorshift generator: the model test's operations, reproducible from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An O_DIRECT handle on a device with an aligned bounce buffer, for I/O at any
/// 512-byte multiple (the devices' logical block size).
struct Direct {
    file: std::fs::File,
    raw: Vec<u8>,
    pad: usize,
}

impl Direct {
    fn open(device: &Path, flags: i32) -> Direct {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(flags & libc::O_ACCMODE != libc::O_RDONLY)
            .custom_flags(libc::O_DIRECT | (flags & !libc::O_ACCMODE))
            .open(device)
            .unwrap_or_else(|e| panic!("open {}: {e}", device.display()));
        let raw = vec![0u8; 4 * MIB as usize + 4096];
        let pad = (4096 - (raw.as_ptr() as usize % 4096)) % 4096;
        Direct { file, raw, pad }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let buf = &mut self.raw[self.pad..self.pad + data.len()];
        buf.copy_from_slice(data);
        self.file
            .write_all_at(buf, offset)
            .unwrap_or_else(|e| panic!("write of {} bytes at {offset}: {e}", data.len()));
    }

    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let buf = &mut self.raw[self.pad..self.pad + len];
        self.file
            .read_exact_at(buf, offset)
            .unwrap_or_else(|e| panic!("read of {len} bytes at {offset}: {e}"));
        buf.to_vec()
    }
}

/// Where two images first differ, for a readable failure.
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// The zero-copy data path (and the copy path where the kernel lacks it) against a
/// model of the volume's bytes: random reads and writes at 512-byte granularity that
/// cross chunk boundaries and holes, writes into fresh chunks and over owned ones, FUA
/// writes, write-zeroes and discards, a snapshot (after it, overwrites copy on write and the snapshot's
/// own device reads the shared chunks), then SIGKILL of blockd with writes acknowledged
/// but never flushed: the recovered device still reads exactly the model.
///
/// `BLOCKD_TEST_UBLK_ZERO_COPY=1` (the guest suite's boot with a 6.16+ kernel) demands
/// that the devices serve with zero copy.
#[test]
fn the_data_path_matches_a_model_across_snapshots_and_sigkill() {
    const SIZE: u64 = 16 * MIB;
    let mut daemon = Daemon::start();
    daemon.ctl_ok(&["volume", "create", "zc", "--size", "16M"]);
    if !ublk_here() {
        assert_refused_without_ublk(&daemon, "zc");
        return;
    }
    let device = attach(&daemon, "zc");
    let status = daemon.ctl_json(&["status"]);
    let offered = status["ublk"]
        .as_str()
        .expect("status.ublk")
        .contains("data path zero-copy");
    let demanded = std::env::var("BLOCKD_TEST_UBLK_ZERO_COPY").as_deref() == Ok("1");
    assert!(
        offered || !demanded,
        "BLOCKD_TEST_UBLK_ZERO_COPY=1 but blockd does not offer zero copy: {status}"
    );
    let path = if offered { "zero-copy" } else { "copy" };
    assert_eq!(status["ublk_devices"][0]["data_path"], path, "{status}");
    println!("ublk data path: {path} ({})", status["ublk"]);

    let seed = 0x5eed_0000_0000_0001u64 ^ std::process::id() as u64;
    println!("model seed {seed:#x}");
    let mut rng = Rng(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut snapshot: Option<Vec<u8>> = None;
    let mut dev = Direct::open(&device, libc::O_RDWR);
    let mut fua = Direct::open(&device, libc::O_RDWR | libc::O_DSYNC);
    let sectors = SIZE / 512;
    for step in 0..400u64 {
        if step == 150 {
            dev.file.sync_all().expect("fsync before the snapshot");
            daemon.ctl_ok(&["snapshot", "create", "zc", "zs"]);
            snapshot = Some(model.clone());
        }
        let offset = rng.below(sectors) * 512;
        // Up to 256 KiB, mostly small: whole chunks, partial ones, and spans across them.
        let max = (SIZE - offset).min(if rng.below(4) == 0 {
            256 << 10
        } else {
            16 << 10
        });
        let len = (1 + rng.below(max / 512)) * 512;
        let range = offset as usize..(offset + len) as usize;
        match rng.below(10) {
            0..=3 => {
                let data = content(step, len as usize);
                let handle = if rng.below(5) == 0 {
                    &mut fua
                } else {
                    &mut dev
                };
                handle.write(offset, &data);
                model[range].copy_from_slice(&data);
            }
            4 => {
                // Write-zeroes reads back zeros exactly; a discard only where it covers
                // whole chunks (on partial ones it is advisory and changes nothing).
                const CHUNK: u64 = 64 << 10;
                let (start, end, zeroes) = if rng.below(2) == 0 {
                    (offset, offset + len, true)
                } else {
                    let start = offset.div_ceil(CHUNK) * CHUNK;
                    (start, ((offset + len) / CHUNK * CHUNK).max(start), false)
                };
                if end > start {
                    let mut args = vec![
                        "-o".to_string(),
                        start.to_string(),
                        "-l".to_string(),
                        (end - start).to_string(),
                        device.display().to_string(),
                    ];
                    if zeroes {
                        args.insert(0, "-z".into());
                    }
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    run("blkdiscard", &args);
                    model[start as usize..end as usize].fill(0);
                }
            }
            _ => {
                let got = dev.read(offset, len as usize);
                if let Some(at) = first_difference(&got, &model[range.clone()]) {
                    panic!(
                        "step {step}: read of {len} bytes at {offset} differs from the model at byte {} (seed {seed:#x})",
                        offset as usize + at
                    );
                }
            }
        }
    }
    // Everything, in 1 MiB reads.
    let whole = |d: &mut Direct| -> Vec<u8> {
        (0..SIZE / MIB)
            .flat_map(|i| d.read(i * MIB, MIB as usize))
            .collect()
    };
    let all = whole(&mut dev);
    assert_eq!(
        first_difference(&all, &model),
        None,
        "the volume differs from the model"
    );
    let snap_device = attach(&daemon, "zc@zs");
    let snap = whole(&mut Direct::open(&snap_device, libc::O_RDONLY));
    assert_eq!(
        first_difference(&snap, snapshot.as_ref().expect("the snapshot was taken")),
        None,
        "the snapshot's device differs from the volume at the snapshot"
    );

    // Acknowledged writes, no flush, then SIGKILL: nothing acknowledged may be lost.
    for step in 0..64u64 {
        let offset = rng.below(sectors - 128) * 512;
        let data = content(1000 + step, 64 << 10);
        dev.write(offset, &data);
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    drop((dev, fua));
    daemon.kill();
    daemon.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = daemon.ctl_json(&["status"]);
        let live = status["ublk_devices"]
            .as_array()
            .is_some_and(|d| d.iter().all(|d| d["state"] == "live"));
        if live {
            for d in status["ublk_devices"].as_array().unwrap() {
                assert_eq!(
                    d["data_path"], path,
                    "a recovered device keeps its data path: {status}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the devices did not recover: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = whole(&mut Direct::open(&device, libc::O_RDONLY));
    assert_eq!(
        first_difference(&after, &model),
        None,
        "after SIGKILL the volume differs from the model"
    );
    daemon.ctl_ok(&["detach", "zc@zs"]);
    daemon.ctl_ok(&["detach", "zc"]);
}

/// `n` single 4 KiB O_DIRECT reads at scattered offsets (no two adjacent, so the block
/// layer merges none); how long they took.
fn timed_reads(device: &Path, n: u64) -> Duration {
    let mut dev = Direct::open(device, libc::O_RDONLY);
    let start = Instant::now();
    for i in 0..n {
        dev.read((i * 37 % 1000) * 8192, 4096);
    }
    start.elapsed()
}

/// The volume's QoS holds on its ublk device, on both data paths, and a change applies
/// to the attached device at once. Only lower bounds are checked: a slow machine can
/// only make the reads take longer.
#[test]
fn qos_limits_hold_on_the_device_and_change_live() {
    let daemon = Daemon::start();
    daemon.ctl_ok(&["volume", "create", "q", "--size", "64M", "--max-iops", "40"]);
    if !ublk_here() {
        assert_refused_without_ublk(&daemon, "q");
        return;
    }
    let device = attach(&daemon, "q");
    // 60 reads at 40 IOPS, less the 100 ms burst (4 requests): at least 1.4 s.
    let took = timed_reads(&device, 60);
    assert!(
        took >= Duration::from_millis(1300),
        "60 reads at 40 IOPS took {took:?}"
    );
    daemon.ctl_ok(&["volume", "set-qos", "q", "--max-iops", "20"]);
    // 40 reads at 20 IOPS, less a 2-request burst: at least 1.9 s.
    let took = timed_reads(&device, 40);
    assert!(
        took >= Duration::from_millis(1800),
        "40 reads at 20 IOPS took {took:?}"
    );
    daemon.ctl_ok(&["detach", "q"]);
}
