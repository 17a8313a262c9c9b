//! Smoke test of the benchmark harness: `benches/run.sh --quick --profile dev` runs every
//! system and workload (2 s each through `BLOCKD_BENCH_SECONDS`, 128 MiB of data through
//! `BLOCKD_BENCH_DATA_MIB`) and the engine figures, and leaves a complete `results.json`,
//! a `report.md` and a `chart.png`, and no process or device behind. Debug binaries: this
//! checks the harness, not the figures, and the test suite never has to compile RocksDB a
//! second time, in release.
//!
//! The kernel systems (`loop`, `blockd-kernel-nbd`, `blockd-ublk`) are measured where the
//! kernel has their drivers and listed as skipped with the reason elsewhere; the test
//! checks which, from what this machine has. On the host that is "skipped" for kernel NBD
//! and ublk; in the test guest (`tests/vm/kernel-suite.sh` runs this test there, with the
//! binaries the host built through `BLOCKD_BIN`), loop, kernel NBD and ublk are
//! measured, with the restart stalls of kernel NBD and ublk (0 I/O errors). The guest's CPU is emulated: the report must say its figures mean nothing,
//! and the guest run leaves out the engine figures (the host run has them).
//!
//! run.sh runs in its own process group; if the test fails or times out, the guard sends
//! the group SIGTERM (run.sh's trap stops its servers and removes its scratch directory),
//! then SIGKILL.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockd_tests::{have_tool, skip};

/// Generous: run.sh first builds the (debug) binaries, usually a no-op here.
const TIMEOUT: Duration = Duration::from_secs(20 * 60);

const SYSTEMS: [&str; 8] = [
    "raw",
    "loop",
    "blockd",
    "blockd-ublk",
    "blockd-kernel-nbd",
    "qemu-nbd",
    "qemu-nbd-qcow2",
    "nbdkit",
];
const USERSPACE: [&str; 5] = ["raw", "blockd", "qemu-nbd", "qemu-nbd-qcow2", "nbdkit"];
const WORKLOADS: [&str; 7] = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "randwrite-4k-qd32-first-touch",
    "seqread-1m-qd8",
    "seqwrite-1m-qd8",
    "randwrite-4k-qd32-after-snapshot",
];

/// The systems a workload applies to (only blockd and qcow2 take snapshots; the kernel
/// devices sit on prefilled data, so they have no first-touch run).
fn systems_for(workload: &str) -> &'static [&'static str] {
    match workload {
        "randwrite-4k-qd32-after-snapshot" => &["blockd", "qemu-nbd-qcow2"],
        "randwrite-4k-qd32-first-touch" => &USERSPACE,
        _ => &SYSTEMS,
    }
}

/// What this machine offers each kernel system: `Some(reason)` when it must be skipped
/// (the reason must mention `hint`), `None` when it must be measured.
fn kernel_expectation(system: &str) -> Option<&'static str> {
    let root = blockd_tests::is_root();
    match system {
        "loop" => {
            if !root {
                Some("root")
            } else if !Path::new("/dev/loop-control").exists() {
                Some("/dev/loop-control")
            } else {
                None
            }
        }
        "blockd-kernel-nbd" => {
            if !has_nbd_devices() {
                Some("/dev/nbd")
            } else if !root {
                Some("root")
            } else {
                // nbd-client is installed by tools/test.sh: no excuse left.
                None
            }
        }
        "blockd-ublk" => {
            if !Path::new("/dev/ublk-control").exists() {
                Some("/dev/ublk-control")
            } else if !root {
                Some("root")
            } else {
                None
            }
        }
        _ => unreachable!("{system} is not a kernel system"),
    }
}

fn has_nbd_devices() -> bool {
    std::fs::read_dir("/dev").is_ok_and(|d| {
        d.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("nbd")
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
    })
}

/// Whether this machine's CPU is emulated (QEMU TCG), as run.sh decides it.
fn emulated_cpu() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .is_some_and(|l| l.contains("TCG"))
    })
}

/// `Some(reason)` if report.md's "## Systems" list says `system` was skipped, `None` if it
/// says measured; panics otherwise.
fn reported_state(report: &str, system: &str) -> Option<String> {
    let prefix = format!("- `{system}`: ");
    let line = report
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("report.md does not list {system}:\n{report}"));
    let state = &line[prefix.len()..];
    if state == "measured" {
        None
    } else if let Some(reason) = state.strip_prefix("skipped: ") {
        assert!(
            !reason.trim().is_empty(),
            "{system} skipped without a reason"
        );
        Some(reason.to_string())
    } else {
        panic!("{system}: neither measured nor skipped: {line}")
    }
}

/// run.sh's process group: terminated when dropped.
struct Harness {
    child: Child,
}

impl Harness {
    /// Sends `signal` to run.sh and everything it started.
    fn signal_group(&self, signal: i32) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group that run.sh leads (spawned with
        // process_group(0)); a live group's id is not reused by the kernel, and a gone
        // group only makes kill fail with ESRCH.
        unsafe { libc::kill(-pgid, signal) };
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal_group(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Whatever of the group is left (servers, if run.sh itself had to be killed).
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Pids of processes whose command line mentions `needle` (servers serving files there).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push((pid, cmdline));
            }
        }
    }
    found
}

fn run_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("benches/run.sh")
}

#[test]
fn quick_run_reports_every_system_and_workload() {
    let mut tools = vec!["fio", "qemu-nbd", "qemu-img", "nbdkit", "gnuplot"];
    if has_nbd_devices() {
        tools.push("nbd-client");
    }
    for tool in tools {
        if !have_tool(tool) {
            skip(&format!(
                "{tool} is not installed (tools/test.sh installs it)"
            ));
            return;
        }
    }
    let out = tempfile::Builder::new()
        .prefix("bench-smoke-")
        .tempdir()
        .expect("temporary output directory");
    let log_path = out.path().join("run.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let started = Instant::now();
    // Where the kernel has the block drivers (the test guest, emulated), the engine
    // figures are left out: they take minutes there, and the host run checks them.
    let kernel_run = has_nbd_devices() || Path::new("/dev/ublk-control").exists();
    let mut command = Command::new("bash");
    // run.sh runs cargo: with the environment a shell has, not this test's.
    blockd_tests::without_cargo_test_env(&mut command);
    command.arg(run_sh()).arg("--quick");
    match std::env::var_os("BLOCKD_BIN") {
        // Binaries built elsewhere (the guest runs what the host built): no cargo.
        Some(blockd) => {
            let dir = Path::new(&blockd)
                .parent()
                .expect("BLOCKD_BIN has a directory");
            command.arg("--bin-dir").arg(dir);
        }
        None => {
            command.args(["--profile", "dev"]);
        }
    }
    if kernel_run {
        command.arg("--no-engine-figures");
    }
    let child = command
        .arg("--out")
        .arg(out.path())
        .env("BLOCKD_BENCH_SECONDS", "2")
        .env("BLOCKD_BENCH_DATA_MIB", "128")
        .env_remove("BLOCKD_BENCH_SCRATCH")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("spawn benches/run.sh");
    let mut harness = Harness { child };
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = loop {
        if let Some(status) = harness.child.try_wait().expect("wait for run.sh") {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            drop(harness);
            panic!("run.sh --quick took over {TIMEOUT:?}; log:\n{}", log_text());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed = started.elapsed();
    assert!(
        status.success(),
        "run.sh failed ({status}); log:\n{}",
        log_text()
    );
    eprintln!("run.sh --quick (2 s runs) took {elapsed:?}");

    // No server outlives the run: each one names a file or socket in the output directory.
    let out_str = out.path().to_string_lossy().into_owned();
    let left = processes_mentioning(&out_str);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let scratch_left: Vec<_> = std::fs::read_dir(out.path())
        .expect("list output directory")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("scratch."))
        .collect();
    assert!(
        scratch_left.is_empty(),
        "scratch directory left behind: {scratch_left:?}"
    );

    // No device left attached to the scratch directory's files.
    let loops = blockd_tests::csi_node::loops_under(out.path());
    assert!(loops.is_empty(), "loop devices left behind: {loops:?}");

    let report = std::fs::read_to_string(out.path().join("report.md")).expect("report.md");
    // Each kernel system: measured, or skipped with a reason, as this machine allows.
    let mut skipped = Vec::new();
    for system in ["loop", "blockd-kernel-nbd", "blockd-ublk"] {
        let state = reported_state(&report, system);
        match (kernel_expectation(system), &state) {
            (Some(hint), Some(reason)) => assert!(
                reason.contains(hint),
                "{system} skipped for '{reason}', expected a reason naming {hint}"
            ),
            (Some(hint), None) => panic!("{system} measured, but this machine lacks {hint}"),
            (None, Some(reason)) => panic!(
                "{system} skipped ({reason}) where it can run; log:\n{}",
                log_text()
            ),
            (None, None) => {}
        }
        eprintln!(
            "{system}: {}",
            state
                .as_deref()
                .map_or("measured".into(), |r| format!("skipped: {r}"))
        );
        if state.is_some() {
            skipped.push(system);
        }
    }
    let measured = |s: &&str| !skipped.contains(s);

    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("results.json")).expect("results.json"),
    )
    .expect("results.json parses");
    let results = results.as_array().expect("results.json is an array");
    for workload in WORKLOADS {
        for system in systems_for(workload).iter().filter(|s| measured(s)) {
            let found: Vec<_> = results
                .iter()
                .filter(|r| r["system"] == *system && r["workload"] == workload)
                .collect();
            assert_eq!(
                found.len(),
                1,
                "expected one result for {system} {workload}, got {found:?}"
            );
            for field in ["iops", "bw_bytes", "lat_p50_us", "lat_p99_us"] {
                let v = found[0][field].as_f64().unwrap_or(f64::NAN);
                assert!(
                    v.is_finite() && v > 0.0,
                    "{system} {workload}: {field} is {:?}",
                    found[0][field]
                );
            }
        }
    }
    let expected: usize = WORKLOADS
        .iter()
        .map(|w| systems_for(w).iter().filter(|s| measured(s)).count())
        .sum();
    assert_eq!(results.len(), expected, "unexpected extra results");

    // The restart stall: one run per measured blockd device, every I/O completed without
    // an error (how long the pause was is a figure, not a pass/fail here).
    let stalls: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("restart-stall.json"))
            .expect("restart-stall.json"),
    )
    .expect("restart-stall.json parses");
    let stalls = stalls.as_array().expect("restart-stall.json is an array");
    for system in ["blockd-kernel-nbd", "blockd-ublk"] {
        let runs: Vec<_> = stalls.iter().filter(|s| s["system"] == system).collect();
        if skipped.contains(&system) {
            assert!(runs.is_empty(), "{system} skipped but has a stall run");
            continue;
        }
        assert_eq!(runs.len(), 1, "{system}: one restart-stall run: {stalls:?}");
        let run = runs[0];
        assert_eq!(run["fio_status"], "exit 0", "{system}: {run}");
        assert_eq!(
            run["io_errors"], 0,
            "{system}: I/O errors across the restart: {run}"
        );
        assert!(run["ios"].as_u64().unwrap_or(0) > 0, "{system}: {run}");
        assert!(run["max_pause_ms"].as_f64().is_some(), "{system}: {run}");
        eprintln!("{system} restart stall: {run}");
    }
    assert!(
        report.contains("## Restart stall"),
        "report.md has the restart stall"
    );

    assert!(!report.trim().is_empty(), "report.md is empty");
    for w in WORKLOADS {
        assert!(report.contains(w), "report.md does not mention {w}");
    }
    assert!(report.contains("met") || report.contains("missed"));
    if std::env::var_os("BLOCKD_BIN").is_none() {
        assert!(
            report.contains("debug binaries"),
            "the report says it ran debug binaries"
        );
    }
    if emulated_cpu() {
        assert!(
            report.contains("Emulated CPU — these figures are meaningless"),
            "the report says its figures come from an emulated CPU"
        );
    }
    if !kernel_run {
        assert!(
            report.contains("## Engine figures") && report.contains("Changed-block tracking"),
            "report.md has the engine and changed-block-tracking figures"
        );
    }
    let png = std::fs::read(out.path().join("chart.png")).expect("chart.png");
    assert!(
        png.len() > 1000 && png.starts_with(b"\x89PNG"),
        "chart.png is not a PNG ({} bytes)",
        png.len()
    );
}
