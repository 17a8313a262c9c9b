//! Smoke test of the benchmark harness: `benches/run.sh --quick --profile dev` runs every
//! system and workload (2 s each through `BLOCKD_BENCH_SECONDS`) and the engine figures,
//! and leaves a complete `results.json`, a `report.md` and a `chart.png`, and no process
//! behind. Debug binaries: this checks the harness, not the figures, and the test suite
//! never has to compile RocksDB a second time, in release.
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

const SYSTEMS: [&str; 5] = ["raw", "blockd", "qemu-nbd", "qemu-nbd-qcow2", "nbdkit"];
const WORKLOADS: [&str; 7] = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "randwrite-4k-qd32-first-touch",
    "seqread-1m-qd8",
    "seqwrite-1m-qd8",
    "randwrite-4k-qd32-after-snapshot",
];

/// The systems a workload applies to (only blockd and qcow2 take snapshots).
fn systems_for(workload: &str) -> &'static [&'static str] {
    if workload == "randwrite-4k-qd32-after-snapshot" {
        &["blockd", "qemu-nbd-qcow2"]
    } else {
        &SYSTEMS
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
    for tool in ["fio", "qemu-nbd", "qemu-img", "nbdkit", "gnuplot"] {
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
    let mut command = Command::new("bash");
    // run.sh runs cargo: with the environment a shell has, not this test's.
    blockd_tests::without_cargo_test_env(&mut command);
    let child = command
        .arg(run_sh())
        .args(["--quick", "--profile", "dev", "--out"])
        .arg(out.path())
        .env("BLOCKD_BENCH_SECONDS", "2")
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

    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("results.json")).expect("results.json"),
    )
    .expect("results.json parses");
    let results = results.as_array().expect("results.json is an array");
    for workload in WORKLOADS {
        for system in systems_for(workload) {
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
    let expected: usize = WORKLOADS.iter().map(|w| systems_for(w).len()).sum();
    assert_eq!(results.len(), expected, "unexpected extra results");

    let report = std::fs::read_to_string(out.path().join("report.md")).expect("report.md");
    assert!(!report.trim().is_empty(), "report.md is empty");
    for w in WORKLOADS {
        assert!(report.contains(w), "report.md does not mention {w}");
    }
    assert!(report.contains("met") || report.contains("missed"));
    assert!(
        report.contains("debug binaries"),
        "the report says it ran debug binaries"
    );
    assert!(
        report.contains("## Engine figures") && report.contains("Changed-block tracking"),
        "report.md has the engine and changed-block-tracking figures"
    );
    let png = std::fs::read(out.path().join("chart.png")).expect("chart.png");
    assert!(
        png.len() > 1000 && png.starts_with(b"\x89PNG"),
        "chart.png is not a PNG ({} bytes)",
        png.len()
    );
}
