//! The kbench example's scripts (`deploy/kubernetes/examples/kbench/`), run for real
//! without a cluster: `kbench-run.sh` runs `kbench.fio` on each volume directory and
//! `kbench-table.py` prints the table, first on plain files (what the table script is
//! tested against: fio's JSON of the very job file the Job runs), then on a volume staged
//! and published by csi-shim beside a plain directory as the hostPath baseline — the Job's
//! layout, with the attacher under test (`BLOCKD_TEST_ATTACH`: fuse-loop on the host,
//! `/dev/nbdN` in the guest of `tests/vm/kernel-suite.sh`).
//!
//! fio runs 1 s per profile on small files: these tests check that the job file, the run
//! script and the table work together, not the figures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blockd_tests::csi_node::{mount_cap, Env};
use blockd_tests::{have_tool, require_root_and_tools, runtime, skip};

/// The table's rows, one per profile of kbench.fio.
const ROWS: [&str; 6] = [
    "4k rand read QD1 latency (us)",
    "4k rand write QD1 latency (us)",
    "4k rand read QD64 (IOPS)",
    "4k rand write QD64 (IOPS)",
    "128k seq read QD16 (MiB/s)",
    "128k seq write QD16 (MiB/s)",
];

fn kbench_dir() -> PathBuf {
    blockd_tests::manifests::repo().join("deploy/kubernetes/examples/kbench")
}

/// Why the scripts cannot run here, if they cannot.
fn missing_tool() -> Option<String> {
    ["fio", "python3"]
        .into_iter()
        .find(|t| !have_tool(t))
        .map(|t| format!("{t} is not installed (tools/test.sh installs it)"))
}

/// Runs kbench-run.sh on the volume directories under `volumes` (small and short).
fn run_kbench(volumes: &Path, results: &Path, baseline: &str) -> Output {
    Command::new("sh")
        .arg(kbench_dir().join("kbench-run.sh"))
        .env("KBENCH_VOLUMES", volumes)
        .env("KBENCH_RESULTS", results)
        .env("KBENCH_BASELINE", baseline)
        .env("KBENCH_SIZE", "32M")
        .env("KBENCH_RUNTIME", "1")
        .env("KBENCH_RAMP", "0")
        .output()
        .expect("run kbench-run.sh")
}

/// The table's cells: `rows[row][column]`, header first (the separator line dropped).
fn parse_table(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .filter(|l| l.starts_with("| "))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// Checks the table has every profile for every volume, the baseline first at 1.00x and
/// every other cell a positive figure with its ratio.
fn check_table(out: &Output, baseline: &str, others: &[&str]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kbench-run.sh failed ({}):\n{stdout}{stderr}",
        out.status
    );
    let table = parse_table(&stdout);
    assert_eq!(table.len(), 1 + ROWS.len(), "header and 6 rows:\n{stdout}");
    let mut header = vec!["profile".to_string(), format!("{baseline} (baseline)")];
    header.extend(others.iter().map(|o| o.to_string()));
    assert_eq!(table[0], header, "{stdout}");
    for (row, label) in table[1..].iter().zip(ROWS) {
        assert_eq!(row[0], label, "{stdout}");
        assert!(row[1].ends_with("(1.00x)"), "baseline ratio: {row:?}");
        for cell in &row[1..] {
            let (value, ratio) = cell
                .split_once(" (")
                .unwrap_or_else(|| panic!("cell {cell:?} has no ratio"));
            let value: f64 = value.parse().expect("a number");
            let ratio: f64 = ratio
                .trim_end_matches("x)")
                .parse()
                .expect("a ratio like 1.23x");
            assert!(value > 0.0 && ratio > 0.0, "{label}: {cell}");
        }
    }
}

#[test]
fn job_file_and_table_on_plain_files() {
    if let Some(reason) = missing_tool() {
        skip(&reason);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let volumes = dir.path().join("volumes");
    for v in ["hostpath", "plain"] {
        std::fs::create_dir_all(volumes.join(v)).expect("volume dir");
    }
    let results = dir.path().join("results");
    let out = run_kbench(&volumes, &results, "hostpath");
    check_table(&out, "hostpath", &["plain"]);
    // The test files are removed; the fio JSON stays for the table.
    assert!(!volumes.join("plain/kbench.data").exists());
    for v in ["hostpath", "plain"] {
        let json = std::fs::read_to_string(results.join(format!("{v}.json"))).expect("fio JSON");
        let doc: serde_json::Value = serde_json::from_str(&json).expect("fio JSON parses");
        assert_eq!(doc["jobs"].as_array().map(Vec::len), Some(6), "six jobs");
    }

    // The table script alone: another baseline, and bad input with one clear error line.
    let table = |args: &[&Path]| {
        Command::new("python3")
            .arg(kbench_dir().join("kbench-table.py"))
            .args(args)
            .output()
            .expect("run kbench-table.py")
    };
    let plain = results.join("plain.json");
    let host = results.join("hostpath.json");
    let swapped = table(&[
        Path::new("--baseline"),
        Path::new("plain"),
        host.as_path(),
        plain.as_path(),
    ]);
    check_table(&swapped, "plain", &["hostpath"]);
    let bad_error = |out: Output, needle: &str| {
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
        assert!(
            stderr.starts_with("kbench-table: error: ") && stderr.contains(needle),
            "{stderr}"
        );
    };
    bad_error(
        table(&[plain.as_path()]),
        "no result for the baseline volume hostpath",
    );
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "not json").unwrap();
    bad_error(
        table(&[host.as_path(), junk.as_path()]),
        "holds no fio JSON output",
    );
    let partial = dir.path().join("partial.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plain).unwrap()).unwrap();
    doc["jobs"].as_array_mut().unwrap().pop();
    std::fs::write(&partial, doc.to_string()).unwrap();
    bad_error(
        table(&[host.as_path(), partial.as_path()]),
        "no result for job seq-write-128k-qd16",
    );
    bad_error(
        table(&[host.as_path(), dir.path().join("gone.json").as_path()]),
        "cannot read",
    );

    // The run script names a missing baseline before running anything.
    let out = run_kbench(&volumes, &results, "nothere");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no baseline volume"));
}

#[test]
fn job_file_on_a_volume_staged_by_csi_shim() {
    require_root_and_tools!();
    if let Some(reason) = missing_tool() {
        skip(&reason);
        return;
    }
    runtime().block_on(async {
        let mut env = Env::start(&[]).await;
        let id = env.volume("kbench", "256M");
        let (staging, target) = env.mount(&id, "kbench", mount_cap("ext4")).await;
        // The Job's layout: /volumes/NAME per volume, the hostPath baseline beside them
        // (here a plain directory on the test's file system).
        let volumes = env.root.join("volumes");
        let hostpath = env.root.join("hostpath");
        std::fs::create_dir_all(&volumes).expect("volumes dir");
        std::fs::create_dir_all(&hostpath).expect("hostpath dir");
        std::os::unix::fs::symlink(&hostpath, volumes.join("hostpath")).expect("symlink");
        std::os::unix::fs::symlink(&target, volumes.join("blockd")).expect("symlink");
        let results = env.root.join("results");
        let out = run_kbench(&volumes, &results, "hostpath");
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        check_table(&out, "hostpath", &["blockd"]);
        env.umount(&id, &staging, &target).await;
        env.assert_clean().await;
    });
}
