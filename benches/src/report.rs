//! The fio harness's results: parsing fio's JSON, `results.json`, `report.md` and the chart.
//!
//! `benches/run.sh` leaves in its output directory `fio/runs.tsv` (one line per fio run:
//! system, workload, JSON file, exact command line), `fio/skipped.tsv` (the kernel systems
//! this machine could not run, and why), `fio/stalls.tsv` (the restart-stall runs), the fio
//! JSON outputs, `machine.tsv` (`key<TAB>value`) and, unless skipped,
//! `engine-figures.json`. [`write_report`] turns them into `results.json` (the contract
//! fields plus extras), `restart-stall.json`, `report.md` (a table per workload with ratios
//! to `raw`, `loop` and `qemu-nbd`, the targets met/missed, the skipped systems with their
//! reasons, the restart stall, machine info, the fio command lines) and `chart.png`
//! (through gnuplot).
//!
//! Invariants: every system of [`SYSTEMS`] that a workload applies to is either measured
//! or, for the kernel systems ([`KERNEL_SYSTEMS`]) only, listed as skipped with a reason;
//! anything else is an incomplete run ([`check_complete`]). Every ratio compares figures
//! of one run on one machine: absolute numbers move with the machine's load, ratios much
//! less; on an emulated CPU (`emulated` in `machine.tsv`) they mean nothing, and the report
//! says so first.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every system, in report order.
pub const SYSTEMS: [&str; 8] = [
    "raw",
    "loop",
    "blockd",
    "blockd-ublk",
    "blockd-kernel-nbd",
    "qemu-nbd",
    "qemu-nbd-qcow2",
    "nbdkit",
];

/// The kernel block devices: measured where the kernel has the driver (and, for ublk,
/// blockd can attach), else listed as skipped with the reason.
pub const KERNEL_SYSTEMS: [&str; 3] = ["loop", "blockd-ublk", "blockd-kernel-nbd"];

/// The blockd devices whose restart stall run.sh measures.
pub const STALL_SYSTEMS: [&str; 2] = ["blockd-ublk", "blockd-kernel-nbd"];

/// The userspace systems: every workload that is not a snapshot's runs on them.
const USERSPACE_SYSTEMS: [&str; 5] = ["raw", "blockd", "qemu-nbd", "qemu-nbd-qcow2", "nbdkit"];

/// The longest I/O pause a blockd restart may cause (the target), in milliseconds.
pub const STALL_TARGET_MS: f64 = 2000.0;

/// Every workload, in report order.
pub const WORKLOADS: [&str; 7] = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "randwrite-4k-qd32-first-touch",
    "seqread-1m-qd8",
    "seqwrite-1m-qd8",
    "randwrite-4k-qd32-after-snapshot",
];

/// The systems a workload applies to: copy-on-write after a snapshot needs snapshots;
/// first touch needs a fresh target (the kernel devices sit on the prefilled data).
pub fn systems_for(workload: &str) -> &'static [&'static str] {
    match workload {
        "randwrite-4k-qd32-after-snapshot" => &["blockd", "qemu-nbd-qcow2"],
        "randwrite-4k-qd32-first-touch" => &USERSPACE_SYSTEMS,
        _ => &SYSTEMS,
    }
}

/// The system a workload's chart bars are relative to: `raw`, or the qcow2 peer where
/// `raw` has no such workload.
pub fn chart_baseline(workload: &str) -> &'static str {
    if systems_for(workload).contains(&"raw") {
        "raw"
    } else {
        "qemu-nbd-qcow2"
    }
}

/// One system on one workload: the contract fields, then extras.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub system: String,
    pub workload: String,
    pub iops: f64,
    pub bw_bytes: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    /// Mean completion latency.
    pub lat_mean_us: f64,
    /// I/Os completed in the measured window.
    pub ios: u64,
    /// Length of the measured window.
    pub runtime_s: f64,
    /// IOPS of every round this system ran the workload, in run order; the figures above
    /// are those of the median round. One entry for a workload run once.
    #[serde(default)]
    pub round_iops: Vec<f64>,
}

/// What one fio run measured (both directions added up; latencies from the busier one).
#[derive(Debug, Clone, PartialEq)]
pub struct FioFigures {
    pub iops: f64,
    pub bw_bytes: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_mean_us: f64,
    pub ios: u64,
    pub runtime_s: f64,
}

/// Parses fio's `--output-format=json` output. Anything before the first line that
/// starts with `{` is skipped: fio's nbd engine prints "fio: connected to NBD server" there.
pub fn parse_fio(text: &str) -> Result<FioFigures> {
    let start = if text.starts_with('{') {
        0
    } else {
        text.find("\n{")
            .map(|i| i + 1)
            .ok_or_else(|| anyhow!("no JSON object in fio's output"))?
    };
    let json: Value = serde_json::from_str(&text[start..]).context("fio's JSON output")?;
    let job = json
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| anyhow!("fio's JSON has no jobs"))?;
    if let Some(err) = job.get("error").and_then(Value::as_i64) {
        if err != 0 {
            bail!("fio reports error {err} for the job");
        }
    }
    let mut figures = FioFigures {
        iops: 0.0,
        bw_bytes: 0.0,
        lat_p50_us: 0.0,
        lat_p99_us: 0.0,
        lat_mean_us: 0.0,
        ios: 0,
        runtime_s: 0.0,
    };
    let mut busiest = 0u64;
    for dir in ["read", "write", "trim"] {
        let Some(d) = job.get(dir) else { continue };
        let ios = d.get("total_ios").and_then(Value::as_u64).unwrap_or(0);
        if ios == 0 {
            continue;
        }
        figures.iops += num(d, &["iops"])?;
        figures.bw_bytes += num(d, &["bw_bytes"])?;
        figures.ios += ios;
        figures.runtime_s = figures.runtime_s.max(num(d, &["runtime"])? / 1000.0);
        if ios > busiest {
            busiest = ios;
            figures.lat_p50_us = num(d, &["clat_ns", "percentile", "50.000000"])? / 1000.0;
            figures.lat_p99_us = num(d, &["clat_ns", "percentile", "99.000000"])? / 1000.0;
            figures.lat_mean_us = num(d, &["clat_ns", "mean"])? / 1000.0;
        }
    }
    if figures.ios == 0 {
        bail!("fio completed no I/O");
    }
    Ok(figures)
}

fn num(v: &Value, path: &[&str]) -> Result<f64> {
    let mut cur = v;
    for key in path {
        cur = cur
            .get(key)
            .ok_or_else(|| anyhow!("fio's JSON lacks {}", path.join(".")))?;
    }
    cur.as_f64()
        .ok_or_else(|| anyhow!("fio's {} is not a number", path.join(".")))
}

/// One line of `fio/runs.tsv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub system: String,
    pub workload: String,
    pub file: String,
    pub command: String,
}

/// Reads `runs.tsv`: `system<TAB>workload<TAB>json file<TAB>command line`.
pub fn parse_runs(text: &str) -> Result<Vec<Run>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.splitn(4, '\t').collect();
            if f.len() != 4 {
                bail!("runs.tsv line {}: expected 4 tab-separated fields", i + 1);
            }
            Ok(Run {
                system: f[0].into(),
                workload: f[1].into(),
                file: f[2].into(),
                command: f[3].into(),
            })
        })
        .collect()
}

/// A kernel system this run did not measure, and why (`fio/skipped.tsv`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub system: String,
    pub reason: String,
}

/// Reads `skipped.tsv`: `system<TAB>reason`. Only kernel systems may be skipped.
pub fn parse_skipped(text: &str) -> Result<Vec<Skipped>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let (system, reason) = line
                .split_once('\t')
                .ok_or_else(|| anyhow!("skipped.tsv line {}: expected system<TAB>reason", i + 1))?;
            if !KERNEL_SYSTEMS.contains(&system) {
                bail!(
                    "skipped.tsv line {}: only the kernel systems ({}) may be skipped, not {system:?}",
                    i + 1,
                    KERNEL_SYSTEMS.join(", ")
                );
            }
            if reason.trim().is_empty() {
                bail!("skipped.tsv line {}: {system} is skipped without a reason", i + 1);
            }
            Ok(Skipped {
                system: system.into(),
                reason: reason.trim().into(),
            })
        })
        .collect()
}

/// Why `system` was skipped, if it was.
pub fn skip_reason<'a>(skipped: &'a [Skipped], system: &str) -> Option<&'a str> {
    skipped
        .iter()
        .find(|s| s.system == system)
        .map(|s| s.reason.as_str())
}

/// What fio saw on a device while blockd was killed and restarted under it.
#[derive(Debug, Clone, PartialEq)]
pub struct StallFigures {
    /// The longest total latency (submission to completion) of any I/O, in µs.
    pub max_lat_us: f64,
    /// I/O errors fio counted (`total_err` with `--continue_on_error=all`; at least 1
    /// when the job reports an error).
    pub errors: u64,
    /// I/Os completed, both directions.
    pub ios: u64,
}

/// Parses the fio JSON of a restart-stall run (any text before the first `{` skipped).
pub fn parse_stall_fio(text: &str) -> Result<StallFigures> {
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("no JSON object in fio's output"))?;
    let json: Value = serde_json::from_str(&text[start..]).context("fio's JSON output")?;
    let job = json
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| anyhow!("fio's JSON has no jobs"))?;
    let job_error = job.get("error").and_then(Value::as_u64).unwrap_or(0);
    let total_err = job.get("total_err").and_then(Value::as_u64).unwrap_or(0);
    let mut figures = StallFigures {
        max_lat_us: 0.0,
        errors: total_err.max(u64::from(job_error != 0)),
        ios: 0,
    };
    for dir in ["read", "write", "trim"] {
        let Some(d) = job.get(dir) else { continue };
        let ios = d.get("total_ios").and_then(Value::as_u64).unwrap_or(0);
        if ios == 0 {
            continue;
        }
        figures.ios += ios;
        let max = num(d, &["lat_ns", "max"]).or_else(|_| num(d, &["clat_ns", "max"]))?;
        figures.max_lat_us = figures.max_lat_us.max(max / 1000.0);
    }
    Ok(figures)
}

/// One restart-stall run (`fio/stalls.tsv` and its fio JSON): `restart-stall.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stall {
    pub system: String,
    /// The longest I/O pause: the longest latency of any I/O in the run (None when fio
    /// left no figures, e.g. it hung).
    pub max_pause_ms: Option<f64>,
    /// I/O errors fio counted (None when fio left no figures).
    pub io_errors: Option<u64>,
    pub ios: u64,
    /// From the SIGKILL to blockd answering its API again.
    pub restart_ms: f64,
    /// fio's exit ("exit 0"), or why it was given up on.
    pub fio_status: String,
    pub command: String,
    /// Why the figures are missing, if they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl Stall {
    /// The target: every I/O completed, none failed, no pause of 2 s or more.
    pub fn met(&self) -> bool {
        self.fio_status == "exit 0"
            && self.io_errors == Some(0)
            && self.ios > 0
            && self.max_pause_ms.is_some_and(|p| p < STALL_TARGET_MS)
    }
}

/// Reads `stalls.tsv` (`system<TAB>json file<TAB>kill-to-ready ms<TAB>fio status<TAB>command`)
/// and each run's fio JSON. A run whose JSON is missing or unreadable still appears, with
/// the problem named, so that a hung device is a reported result rather than a crash.
pub fn stalls(text: &str, fio_dir: &Path) -> Result<Vec<Stall>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let f: Vec<&str> = line.splitn(5, '\t').collect();
        if f.len() != 5 {
            bail!("stalls.tsv line {}: expected 5 tab-separated fields", i + 1);
        }
        let restart_ms: f64 = f[2]
            .parse()
            .map_err(|_| anyhow!("stalls.tsv line {}: {:?} is not milliseconds", i + 1, f[2]))?;
        let path = fio_dir.join(f[1]);
        let parsed = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))
            .and_then(|t| parse_stall_fio(&t));
        let (max_pause_ms, io_errors, ios, problem) = match parsed {
            Ok(fig) => (
                Some(fig.max_lat_us / 1000.0),
                Some(fig.errors),
                fig.ios,
                None,
            ),
            Err(e) => (None, None, 0, Some(format!("{e:#}"))),
        };
        out.push(Stall {
            system: f[0].into(),
            max_pause_ms,
            io_errors,
            ios,
            restart_ms,
            fio_status: f[3].into(),
            command: f[4].into(),
            problem,
        });
    }
    Ok(out)
}

/// Reads `key<TAB>value` lines.
pub fn parse_tsv_pairs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Figures the `engine-figures` binary measures on the engine alone (no NBD, no disk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineFigures {
    pub chunk_size_bytes: u64,
    /// RocksDB size after writing `chunks_written` chunks, extrapolated to 1 TiB.
    pub metadata: MetadataFigure,
    /// Opening the engine over `mapped_chunks` mapped chunks.
    pub startup: StartupFigure,
    /// Process RSS with thin volumes totalling 1 TiB provisioned.
    pub rss: RssFigure,
    /// Median snapshot creation time against the number of written chunks.
    pub snapshot_create: Vec<SnapshotFigure>,
    /// Changed-block tracking: diffing and exporting a few changed chunks of large volumes.
    #[serde(default)]
    pub delta: Vec<DeltaFigure>,
    pub elapsed_s: f64,
}

/// Diffing and exporting `changed_chunks` chunks of a `volume_bytes` volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaFigure {
    pub volume_bytes: u64,
    /// Chunks mapped before the base snapshot.
    pub base_chunks: u64,
    pub changed_chunks: u64,
    /// changed_chunks × chunk size / 1 TiB.
    pub changed_fraction_of_tib: f64,
    pub extents: u64,
    /// Bytes the delta reports as changed.
    pub delta_bytes: u64,
    pub delta_ms: f64,
    /// Delta plus reading every changed byte through the engine (data I/O is free on
    /// the null device: this is the engine's own cost).
    pub export_ms: f64,
    pub export_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataFigure {
    pub chunks_written: u64,
    /// Bytes of SST files after a memtable flush (the steady-state size).
    pub sst_bytes: u64,
    /// Everything in the store directory (SSTs, WAL, manifest, logs).
    pub dir_bytes: u64,
    /// `sst_bytes` scaled to 1 TiB written.
    pub bytes_per_tib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartupFigure {
    pub mapped_chunks: u64,
    pub open_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RssFigure {
    pub volumes: u64,
    pub provisioned_bytes: u64,
    pub mapped_chunks: u64,
    /// VmRSS with the engine open and no volume.
    pub rss_empty_bytes: u64,
    /// After creating the volumes (nothing written).
    pub rss_provisioned_bytes: u64,
    /// After writing `mapped_chunks` chunks across them and committing.
    pub rss_mapped_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotFigure {
    pub written_chunks: u64,
    pub median_us: f64,
    pub samples: usize,
}

impl EngineFigures {
    /// Slowest median over fastest median: "flat" means close to 1.
    pub fn snapshot_spread(&self) -> Option<f64> {
        let medians = self.snapshot_create.iter().map(|s| s.median_us);
        let max = medians.clone().fold(f64::NAN, f64::max);
        let min = medians.fold(f64::NAN, f64::min);
        (self.snapshot_create.len() >= 2 && min > 0.0).then(|| max / min)
    }
}

/// Snapshot creation counts as flat when the slowest size's median is within this factor
/// of the fastest's (one synced metadata batch each; fsync jitter dominates).
pub const SNAPSHOT_FLAT_FACTOR: f64 = 2.0;

/// A target of issue 6, evaluated on one run.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetResult {
    pub name: String,
    /// The measured figure, e.g. "0.91× raw".
    pub measured: String,
    /// None: not measured in this run.
    pub met: Option<bool>,
}

/// The figure of `system` on `workload`, if measured.
pub fn find<'a>(records: &'a [Record], system: &str, workload: &str) -> Option<&'a Record> {
    records
        .iter()
        .find(|r| r.system == system && r.workload == workload)
}

/// `system`'s IOPS over `baseline`'s on `workload`.
pub fn ratio(records: &[Record], workload: &str, system: &str, baseline: &str) -> Option<f64> {
    let a = find(records, system, workload)?;
    let b = find(records, baseline, workload)?;
    (b.iops > 0.0).then(|| a.iops / b.iops)
}

/// Evaluates the targets: blockd against `raw`, `qemu-nbd` and qcow2, blockd's ublk
/// device against the loop device and kernel NBD, all in the same run; then the restart
/// stalls. A target whose system was skipped says so, with the reason.
pub fn targets(
    records: &[Record],
    engine: Option<&EngineFigures>,
    skipped: &[Skipped],
    stall_runs: &[Stall],
) -> Vec<TargetResult> {
    let ratio_target = |name: &str, workload: &str, system: &str, baseline: &str, min: f64| {
        let r = ratio(records, workload, system, baseline);
        let why_not = [system, baseline]
            .iter()
            .find_map(|s| skip_reason(skipped, s).map(|r| format!("{s} skipped: {r}")));
        TargetResult {
            name: format!("{name}: {system} ≥ {min}× {baseline}"),
            measured: match (r, why_not) {
                (Some(r), _) => format!("{r:.2}× {baseline}"),
                (None, Some(why)) => format!("not measured ({why})"),
                (None, None) => "not measured".into(),
            },
            met: r.map(|r| r >= min),
        }
    };
    let mut out = vec![
        ratio_target(
            "4k randread QD32",
            "randread-4k-qd32",
            "blockd",
            "raw",
            0.85,
        ),
        ratio_target(
            "4k randread QD32",
            "randread-4k-qd32",
            "blockd",
            "qemu-nbd",
            1.3,
        ),
        ratio_target("1M sequential read", "seqread-1m-qd8", "blockd", "raw", 0.9),
        ratio_target(
            "1M sequential write",
            "seqwrite-1m-qd8",
            "blockd",
            "raw",
            0.9,
        ),
        ratio_target(
            "first-touch write",
            "randwrite-4k-qd32-first-touch",
            "blockd",
            "qemu-nbd-qcow2",
            1.0,
        ),
        ratio_target(
            "post-snapshot CoW write",
            "randwrite-4k-qd32-after-snapshot",
            "blockd",
            "qemu-nbd-qcow2",
            1.0,
        ),
        ratio_target(
            "4k randread QD32",
            "randread-4k-qd32",
            "blockd-ublk",
            "loop",
            0.9,
        ),
        ratio_target(
            "4k randread QD32",
            "randread-4k-qd32",
            "blockd-ublk",
            "blockd-kernel-nbd",
            2.0,
        ),
    ];
    for system in STALL_SYSTEMS {
        let name = format!(
            "restart stall ({system}): longest I/O pause < {:.0} s, 0 I/O errors",
            STALL_TARGET_MS / 1000.0
        );
        let run = stall_runs.iter().find(|s| s.system == system);
        out.push(match run {
            Some(st) => TargetResult {
                name,
                measured: stall_summary(st),
                met: Some(st.met()),
            },
            None => TargetResult {
                name,
                measured: match skip_reason(skipped, system) {
                    Some(r) => format!("not measured ({system} skipped: {r})"),
                    None => "not measured".into(),
                },
                met: None,
            },
        });
    }
    let spread = engine.and_then(EngineFigures::snapshot_spread);
    out.push(TargetResult {
        name: format!(
            "snapshot creation flat in volume size (slowest/fastest median ≤ {SNAPSHOT_FLAT_FACTOR})"
        ),
        measured: match (engine, spread) {
            (Some(e), Some(s)) => format!(
                "{s:.2} ({})",
                e.snapshot_create
                    .iter()
                    .map(|f| format!("{}: {:.0} µs", count(f.written_chunks), f.median_us))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => "not measured (quick run; `--engine-figures`, or the criterion bench \
                  `snapshot_create`)"
                .into(),
        },
        met: spread.map(|s| s <= SNAPSHOT_FLAT_FACTOR),
    });
    out
}

/// One line on a restart-stall run: pause, errors, restart time.
pub fn stall_summary(st: &Stall) -> String {
    match (st.max_pause_ms, st.io_errors) {
        (Some(p), Some(e)) => format!(
            "{:.2} s pause, {e} I/O error{}, {} I/Os (blockd back in {:.2} s; fio {})",
            p / 1000.0,
            if e == 1 { "" } else { "s" },
            st.ios,
            st.restart_ms / 1000.0,
            st.fio_status
        ),
        _ => format!(
            "no figures: {} (fio {})",
            st.problem.as_deref().unwrap_or("fio printed nothing"),
            st.fio_status
        ),
    }
}

/// Builds the records from the runs (prefill runs are not results). A system that ran a
/// workload in several rounds gets the figures of its median round (by IOPS; of an even
/// count, the lower of the two middle ones), with every round's IOPS in `round_iops`.
pub fn records(runs: &[Run], fio_dir: &Path) -> Result<Vec<Record>> {
    let mut rounds: Vec<Record> = Vec::new();
    for run in runs.iter().filter(|r| r.workload != "prefill") {
        let path = fio_dir.join(&run.file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let f = parse_fio(&text)
            .with_context(|| format!("{} {} ({})", run.system, run.workload, path.display()))?;
        rounds.push(Record {
            system: run.system.clone(),
            workload: run.workload.clone(),
            iops: f.iops,
            bw_bytes: f.bw_bytes,
            lat_p50_us: f.lat_p50_us,
            lat_p99_us: f.lat_p99_us,
            lat_mean_us: f.lat_mean_us,
            ios: f.ios,
            runtime_s: f.runtime_s,
            round_iops: vec![f.iops],
        });
    }
    let mut out: Vec<Record> = Vec::new();
    for r in &rounds {
        if find(&out, &r.system, &r.workload).is_some() {
            continue;
        }
        let mut same: Vec<&Record> = rounds
            .iter()
            .filter(|o| o.system == r.system && o.workload == r.workload)
            .collect();
        let round_iops: Vec<f64> = same.iter().map(|o| o.iops).collect();
        same.sort_by(|a, b| a.iops.total_cmp(&b.iops));
        let mut median = same[(same.len() - 1) / 2].clone();
        median.round_iops = round_iops;
        out.push(median);
    }
    out.sort_by_key(|r| {
        (
            WORKLOADS.iter().position(|w| *w == r.workload),
            SYSTEMS.iter().position(|s| *s == r.system),
        )
    });
    Ok(out)
}

/// Checks every system ran every workload it applies to, with positive finite figures,
/// unless it is a kernel system skipped with a reason; a skipped system has no results.
pub fn check_complete(records: &[Record], skipped: &[Skipped]) -> Vec<String> {
    let mut problems = Vec::new();
    for w in WORKLOADS {
        for s in systems_for(w) {
            let skip = skip_reason(skipped, s);
            match find(records, s, w) {
                None if skip.is_some() => {}
                Some(_) if skip.is_some() => {
                    problems.push(format!("{s} is listed as skipped but has a result for {w}"))
                }
                None => problems.push(format!("{s} has no result for {w}")),
                Some(r) => {
                    for (name, v) in [
                        ("iops", r.iops),
                        ("bw_bytes", r.bw_bytes),
                        ("lat_p50_us", r.lat_p50_us),
                        ("lat_p99_us", r.lat_p99_us),
                    ] {
                        if !(v.is_finite() && v > 0.0) {
                            problems.push(format!("{s} {w}: {name} is {v}"));
                        }
                    }
                }
            }
        }
    }
    problems
}

/// Checks every blockd device that was measured also has its restart stall run.
pub fn check_stalls(records: &[Record], stall_runs: &[Stall]) -> Vec<String> {
    STALL_SYSTEMS
        .iter()
        .filter(|s| records.iter().any(|r| r.system == **s))
        .filter(|s| !stall_runs.iter().any(|st| st.system == **s))
        .map(|s| format!("{s} was measured but has no restart-stall run"))
        .collect()
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}K", n / 1_000),
        n => n.to_string(),
    }
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}

fn met_cell(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// What each workload does, for the report.
fn workload_note(workload: &str) -> &'static str {
    match workload {
        "randread-4k-qd1" => "4 KiB random reads, one at a time: per-request latency.",
        "randread-4k-qd32" => "4 KiB random reads, 32 in flight.",
        "randwrite-4k-qd32" => "4 KiB random overwrites of allocated (prefilled) data.",
        "randwrite-4k-qd32-first-touch" => {
            "4 KiB writes at random 64 KiB-aligned offsets of a fresh target (new blockd \
             volume, new qcow2, new sparse file): nearly every write is the first into its \
             64 KiB chunk/cluster, so this is the thin-allocation path. Bounded by an I/O \
             count."
        }
        "seqread-1m-qd8" => "1 MiB sequential reads, 8 in flight.",
        "seqwrite-1m-qd8" => "1 MiB sequential overwrites, 8 in flight.",
        "randwrite-4k-qd32-after-snapshot" => {
            "After `blockctl snapshot create` / `qemu-img snapshot -c` (server stopped), \
             4 KiB writes at random 64 KiB-aligned offsets of the prefilled data: nearly \
             every write copies a shared chunk/cluster (copy-on-write). Bounded by an I/O \
             count."
        }
        _ => "",
    }
}

/// Everything `report.md` is made of.
#[derive(Debug, Default)]
pub struct ReportInput<'a> {
    pub records: &'a [Record],
    pub runs: &'a [Run],
    pub machine: &'a [(String, String)],
    pub engine: Option<&'a EngineFigures>,
    pub skipped: &'a [Skipped],
    pub stalls: &'a [Stall],
}

/// Renders `report.md`.
pub fn render_markdown(input: &ReportInput<'_>) -> String {
    let ReportInput {
        records,
        runs,
        machine,
        engine,
        skipped,
        stalls: stall_runs,
    } = *input;
    let mut md = String::new();
    let get = |k: &str| {
        machine
            .iter()
            .find(|(key, _)| key == k)
            .map_or("?", |(_, v)| v.as_str())
    };
    let _ = writeln!(md, "# blockd benchmark report\n");
    if let Some((_, what)) = machine.iter().find(|(k, _)| k == "emulated") {
        let _ = writeln!(
            md,
            "> **Emulated CPU — these figures are meaningless.** This run's CPU is emulated \
             ({what}; the test guest of `tests/vm/run.sh` runs under QEMU's TCG where the \
             machine has no hardware KVM): every figure below is the cost of emulating \
             the instructions, not of the storage paths. It checks that the harness and the \
             kernel devices work; run it on a real node for figures.\n"
        );
    }
    let _ = writeln!(
        md,
        "{} run of `benches/run.sh` at {}, blockd {}, {} s per time-based run. Ratios \
         compare systems within this run (IOPS; for 1 MiB runs that is also bandwidth).\n",
        get("mode"),
        get("date"),
        get("blockd"),
        get("seconds")
    );

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | measured | |\n|---|---|---|");
    for t in targets(records, engine, skipped, stall_runs) {
        let _ = writeln!(md, "| {} | {} | {} |", t.name, t.measured, met_cell(t.met));
    }
    let _ = writeln!(md, "\n![chart](chart.png)\n");

    let _ = writeln!(md, "## Systems\n");
    for s in SYSTEMS {
        let state = match skip_reason(skipped, s) {
            Some(reason) => format!("skipped: {reason}"),
            None if records.iter().any(|r| r.system == s) => "measured".to_string(),
            None => "not measured".to_string(),
        };
        let _ = writeln!(md, "- `{s}`: {state}");
    }
    let _ = writeln!(
        md,
        "\nThe kernel devices (`loop`, `blockd-kernel-nbd`, `blockd-ublk`) run where the \
         kernel has their driver: fio io_uring with O_DIRECT on the device. `loop` sits on \
         raw's file with `--direct-io=on`; `blockd-kernel-nbd` is a blockd volume on \
         `/dev/nbdN` through `csi-nbd-proxy` (nbd-client over netlink), as csi-shim \
         attaches volumes; `blockd-ublk` is a blockd volume on `/dev/ublkbN` \
         (`blockctl attach VOL --ublk`).\n"
    );

    let _ = writeln!(md, "## Results\n");
    for w in WORKLOADS {
        let _ = writeln!(md, "### {w}\n\n{}\n", workload_note(w));
        let _ = writeln!(
            md,
            "| system | IOPS | MiB/s | p50 µs | p99 µs | × raw | × loop | × qemu-nbd |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for s in systems_for(w) {
            match find(records, s, w) {
                Some(r) => {
                    let _ = writeln!(
                        md,
                        "| {s} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                        r.iops,
                        r.bw_bytes / 1048576.0,
                        r.lat_p50_us,
                        r.lat_p99_us,
                        ratio_cell(ratio(records, w, s, "raw")),
                        ratio_cell(ratio(records, w, s, "loop")),
                        ratio_cell(ratio(records, w, s, "qemu-nbd")),
                    );
                }
                None => {
                    let why = skip_reason(skipped, s)
                        .map_or("not measured".to_string(), |r| format!("skipped: {r}"));
                    let _ = writeln!(md, "| {s} | {why} | | | | | | |");
                }
            }
        }
        if !systems_for(w).contains(&"raw") {
            let _ = writeln!(
                md,
                "\nblockd vs qemu-nbd-qcow2: {}",
                ratio_cell(ratio(records, w, "blockd", "qemu-nbd-qcow2"))
            );
        }
        let rounds: Vec<&Record> = records
            .iter()
            .filter(|r| r.workload == w && r.round_iops.len() > 1)
            .collect();
        if !rounds.is_empty() {
            let _ = writeln!(
                md,
                "\nRun in {} rounds, every system once per round; each row is the system's \
                 median round. IOPS of every round:",
                rounds[0].round_iops.len()
            );
            for r in rounds {
                let all: Vec<String> = r.round_iops.iter().map(|i| format!("{i:.0}")).collect();
                let _ = writeln!(md, "- {}: {}", r.system, all.join(", "));
            }
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(md, "## Restart stall\n");
    let _ = writeln!(
        md,
        "fio (random 4 KiB reads and writes, 70 % reads, 16 in flight, \
         `--continue_on_error=all` so that every I/O error is counted) runs on the blockd \
         device while blockd is killed with SIGKILL and started again on the same state. \
         The pause is the longest latency of any I/O in the run: the I/Os in flight at the \
         kill wait for the restart. Target: under {:.0} s, with 0 I/O errors.\n",
        STALL_TARGET_MS / 1000.0
    );
    let _ = writeln!(
        md,
        "| system | longest I/O pause | I/O errors | I/Os | blockd kill → API ready | fio | |\n\
         |---|---:|---:|---:|---:|---|---|"
    );
    for s in STALL_SYSTEMS {
        match stall_runs.iter().find(|st| st.system == s) {
            Some(st) => {
                let _ = writeln!(
                    md,
                    "| {s} | {} | {} | {} | {:.2} s | {} | {} |",
                    st.max_pause_ms
                        .map_or("–".into(), |p| format!("{:.3} s", p / 1000.0)),
                    st.io_errors.map_or("–".into(), |e| e.to_string()),
                    st.ios,
                    st.restart_ms / 1000.0,
                    st.problem
                        .as_ref()
                        .map_or(st.fio_status.clone(), |p| format!("{}: {p}", st.fio_status)),
                    met_cell(Some(st.met())),
                );
            }
            None => {
                let why = skip_reason(skipped, s)
                    .map_or("not measured".to_string(), |r| format!("skipped: {r}"));
                let _ = writeln!(md, "| {s} | {why} | | | | | |");
            }
        }
    }
    let _ = writeln!(md);

    if let Some(e) = engine {
        let _ = writeln!(md, "## Engine figures\n");
        let _ = writeln!(
            md,
            "Measured by `engine-figures` on the engine alone (RocksDB metadata on the scratch \
             filesystem, a null data device), {} KiB chunks, in {:.0} s.\n",
            e.chunk_size_bytes / 1024,
            e.elapsed_s
        );
        let m = &e.metadata;
        let _ = writeln!(
            md,
            "- **Metadata per TiB written**: {} (RocksDB SST bytes {} after writing {} \
             chunks = {} and flushing the memtables; whole store directory {}).",
            bytes(m.bytes_per_tib as f64),
            bytes(m.sst_bytes as f64),
            count(m.chunks_written),
            bytes((m.chunks_written * e.chunk_size_bytes) as f64),
            bytes(m.dir_bytes as f64)
        );
        let _ = writeln!(
            md,
            "- **Startup with {} mapped chunks**: {:.0} ms to open the engine.",
            count(e.startup.mapped_chunks),
            e.startup.open_ms
        );
        let r = &e.rss;
        let _ = writeln!(
            md,
            "- **RSS with {} of thin volumes** ({} volumes): {} with the engine open, {} \
             after creating them (+{}), {} after writing {} chunks ({}) across them (+{}).",
            bytes(r.provisioned_bytes as f64),
            r.volumes,
            bytes(r.rss_empty_bytes as f64),
            bytes(r.rss_provisioned_bytes as f64),
            bytes(r.rss_provisioned_bytes.saturating_sub(r.rss_empty_bytes) as f64),
            bytes(r.rss_mapped_bytes as f64),
            count(r.mapped_chunks),
            bytes((r.mapped_chunks * e.chunk_size_bytes) as f64),
            bytes(r.rss_mapped_bytes.saturating_sub(r.rss_provisioned_bytes) as f64),
        );
        let _ = writeln!(md, "- **Snapshot creation** (median of each size):");
        for s in &e.snapshot_create {
            let _ = writeln!(
                md,
                "  - {} written chunks: {:.0} µs ({} samples)",
                count(s.written_chunks),
                s.median_us,
                s.samples
            );
        }
        if let Some(first) = e.delta.first() {
            let _ = writeln!(
                md,
                "- **Changed-block tracking**: the delta between two snapshots (`snapshot                  diff`) and an incremental export (the delta plus reading every changed                  byte, as `export-diff` does), {} chunks written before the base snapshot.                  Time follows the change, not the volume:
",
                count(first.base_chunks)
            );
            let _ = writeln!(
                md,
                "  | volume | changed | extents | delta | export | exported |\n  |---|---:|---:|---:|---:|---:|"
            );
            for d in &e.delta {
                let _ = writeln!(
                    md,
                    "  | {} | {} chunks ({:.2} % of a TiB) | {} | {:.0} ms | {:.0} ms | {} |",
                    bytes(d.volume_bytes as f64),
                    count(d.changed_chunks),
                    d.changed_fraction_of_tib * 100.0,
                    count(d.extents),
                    d.delta_ms,
                    d.export_ms,
                    bytes(d.export_bytes as f64)
                );
            }
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(md, "## Machine\n");
    for (k, v) in machine {
        let _ = writeln!(md, "- {k}: {v}");
    }

    let _ = writeln!(md, "\n## fio command lines\n");
    let _ = writeln!(
        md,
        "Exactly as run, in order: each workload on every system back to back (`prefill` \
         writes the whole data file/volume once and is not a result). Every system gets the \
         same options; only the target differs: \
         `--ioengine=io_uring --direct=1 --filename=FILE` for raw and the kernel devices, \
         `--ioengine=nbd --uri=URI` for the NBD servers. Servers: `qemu-nbd -t -k SOCK -f \
         raw|qcow2 --cache=none --aio=io_uring FILE`, `nbdkit -f -U SOCK file file=FILE \
         cache=none`, `blockd --state-dir DIR --pool bench=FILE,size=SIZE,chunk=64K` \
         (release build); qcow2 images are created with `cluster_size=64k`. Kernel devices: \
         `losetup -f --show --direct-io=on FILE`; `csi-nbd-proxy --listen SOCK \
         --upstream-socket BLOCKD_NBD_SOCK --export VOL` with `nbd-client -u SOCK /dev/nbdN \
         -N VOL -C CONNECTIONS -b 4096 -t 180`; `blockctl attach VOL --ublk`.\n"
    );
    let _ = writeln!(md, "```");
    for r in runs {
        let _ = writeln!(md, "# {} {}\n{}", r.system, r.workload, r.command);
    }
    for st in stall_runs {
        let _ = writeln!(md, "# {} restart-stall\n{}", st.system, st.command);
    }
    let _ = writeln!(md, "```");
    md
}

/// The chart's data: one row per workload, one column per system, IOPS relative to
/// [`chart_baseline`], then p99 latencies (`-` where not measured).
pub fn chart_data(records: &[Record]) -> String {
    let mut d = String::new();
    let _ = writeln!(d, "# workload {}", SYSTEMS.join(" "));
    for w in WORKLOADS {
        let label = if chart_baseline(w) == "raw" {
            w.to_string()
        } else {
            format!("{w} (vs qcow2)")
        };
        let _ = write!(d, "\"{label}\"");
        for s in SYSTEMS {
            let _ = match ratio(records, w, s, chart_baseline(w)) {
                Some(r) => write!(d, " {r:.4}"),
                None => write!(d, " -"),
            };
        }
        for s in SYSTEMS {
            let _ = match find(records, s, w) {
                Some(r) => write!(d, " {:.2}", r.lat_p99_us),
                None => write!(d, " -"),
            };
        }
        let _ = writeln!(d);
    }
    d
}

/// The gnuplot script drawing `chart.dat` into `png`.
pub fn chart_script(data: &Path, png: &Path) -> String {
    let n = SYSTEMS.len();
    let ratio_plots: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "'{}' using {}:xtic(1) title '{}'",
                data.display(),
                i + 2,
                SYSTEMS[i]
            )
        })
        .collect();
    let lat_plots: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "'{}' using {}:xtic(1) title '{}'",
                data.display(),
                i + 2 + n,
                SYSTEMS[i]
            )
        })
        .collect();
    format!(
        "set terminal pngcairo size 1400,1000 font 'sans,10'\n\
         set output '{png}'\n\
         set datafile missing '-'\n\
         set style data histograms\n\
         set style histogram clustered gap 1\n\
         set style fill solid 0.85 border -1\n\
         set boxwidth 0.9\n\
         set key outside right top vertical\n\
         set grid ytics\n\
         set xtics rotate by -20 nomirror\n\
         set multiplot layout 2,1\n\
         set title 'IOPS relative to raw (higher is better; after-snapshot relative to qemu-nbd-qcow2)'\n\
         set ylabel 'x baseline (log)'\n\
         set logscale y 2\n\
         set format y '%g'\n\
         plot {}, 1 with lines dashtype 2 lc rgb 'black' notitle\n\
         set title 'p99 completion latency (lower is better)'\n\
         set ylabel 'microseconds (log)'\n\
         set logscale y 10\n\
         plot {}\n\
         unset multiplot\n",
        ratio_plots.join(", "),
        lat_plots.join(", "),
        png = png.display(),
    )
}

/// Reads everything `run.sh` left in `out` and writes `results.json`, `report.md`,
/// `chart.dat`, `chart.gp` and (running gnuplot) `chart.png`.
pub fn write_report(out: &Path) -> Result<Vec<Record>> {
    let fio_dir = out.join("fio");
    let runs_path = fio_dir.join("runs.tsv");
    let runs = parse_runs(
        &std::fs::read_to_string(&runs_path)
            .with_context(|| format!("reading {}", runs_path.display()))?,
    )?;
    let records = records(&runs, &fio_dir)?;
    // Older output directories have neither file: nothing skipped, no stall runs.
    let skipped = match std::fs::read_to_string(fio_dir.join("skipped.tsv")) {
        Ok(text) => parse_skipped(&text)?,
        Err(_) => Vec::new(),
    };
    let stall_runs = match std::fs::read_to_string(fio_dir.join("stalls.tsv")) {
        Ok(text) => stalls(&text, &fio_dir)?,
        Err(_) => Vec::new(),
    };
    let machine = std::fs::read_to_string(out.join("machine.tsv"))
        .map(|t| parse_tsv_pairs(&t))
        .unwrap_or_default();
    let engine_path = out.join("engine-figures.json");
    let engine: Option<EngineFigures> = match std::fs::read_to_string(&engine_path) {
        Ok(text) => Some(
            serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", engine_path.display()))?,
        ),
        Err(_) => None,
    };

    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&records)? + "\n",
    )?;
    std::fs::write(
        out.join("restart-stall.json"),
        serde_json::to_string_pretty(&stall_runs)? + "\n",
    )?;
    std::fs::write(
        out.join("report.md"),
        render_markdown(&ReportInput {
            records: &records,
            runs: &runs,
            machine: &machine,
            engine: engine.as_ref(),
            skipped: &skipped,
            stalls: &stall_runs,
        }),
    )?;
    let data = out.join("chart.dat");
    let png = out.join("chart.png");
    let script = out.join("chart.gp");
    std::fs::write(&data, chart_data(&records))?;
    std::fs::write(&script, chart_script(&data, &png))?;
    let status = std::process::Command::new("gnuplot")
        .arg(&script)
        .status()
        .context("running gnuplot (apt-get install gnuplot-nox)")?;
    if !status.success() {
        bail!("gnuplot {} failed: {status}", script.display());
    }
    let mut problems = check_complete(&records, &skipped);
    problems.extend(check_stalls(&records, &stall_runs));
    if !problems.is_empty() {
        bail!("incomplete results: {}", problems.join("; "));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIO: &str = r#"fio: connected to NBD server
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "randread-4k-qd32",
      "error" : 0,
      "read" : {
        "io_bytes" : 409600, "bw_bytes" : 204800, "iops" : 50.0, "runtime" : 2000,
        "total_ios" : 100,
        "clat_ns" : { "mean" : 1500.0,
          "percentile" : { "50.000000" : 1000, "99.000000" : 9000 } }
      },
      "write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "runtime" : 0,
        "total_ios" : 0, "clat_ns" : { "mean" : 0.0 } }
    }
  ]
}
"#;

    fn rec(system: &str, workload: &str, iops: f64) -> Record {
        Record {
            system: system.into(),
            workload: workload.into(),
            iops,
            bw_bytes: iops * 4096.0,
            lat_p50_us: 10.0,
            lat_p99_us: 20.0,
            lat_mean_us: 11.0,
            ios: 100,
            runtime_s: 1.0,
            round_iops: vec![iops],
        }
    }

    #[test]
    fn parses_fio_json_after_a_banner() {
        let f = parse_fio(FIO).unwrap();
        assert_eq!(f.iops, 50.0);
        assert_eq!(f.bw_bytes, 204800.0);
        assert_eq!(f.lat_p50_us, 1.0);
        assert_eq!(f.lat_p99_us, 9.0);
        assert_eq!(f.ios, 100);
        assert_eq!(f.runtime_s, 2.0);
        assert!(parse_fio("fio: nothing").is_err());
        assert!(parse_fio(&FIO.replace("\"total_ios\" : 100", "\"total_ios\" : 0")).is_err());
    }

    #[test]
    fn rounds_count_their_median_and_keep_every_figure() {
        let dir = tempfile::tempdir().unwrap();
        let mut tsv = String::new();
        for (i, (system, iops)) in [("blockd", 70.0), ("blockd", 30.0), ("blockd", 50.0)]
            .into_iter()
            .chain([("qemu-nbd", 40.0), ("qemu-nbd", 20.0)])
            .enumerate()
        {
            let file = format!("{system}-{i}.json");
            let text = FIO
                .replace("\"iops\" : 50.0", &format!("\"iops\" : {iops:.1}"))
                .replace("\"total_ios\" : 100", &format!("\"total_ios\" : {}", i + 1));
            std::fs::write(dir.path().join(&file), text).unwrap();
            tsv += &format!("{system}\trandread-4k-qd32\t{file}\tfio ...\n");
        }
        let recs = records(&parse_runs(&tsv).unwrap(), dir.path()).unwrap();
        assert_eq!(recs.len(), 2);
        let b = find(&recs, "blockd", "randread-4k-qd32").unwrap();
        assert_eq!(b.iops, 50.0);
        assert_eq!(b.ios, 3, "every figure comes from the median round");
        assert_eq!(b.round_iops, vec![70.0, 30.0, 50.0]);
        // Of two rounds, the lower middle one.
        let q = find(&recs, "qemu-nbd", "randread-4k-qd32").unwrap();
        assert_eq!((q.iops, q.round_iops.len()), (20.0, 2));
        assert_eq!(
            ratio(&recs, "randread-4k-qd32", "blockd", "qemu-nbd"),
            Some(2.5)
        );
    }

    #[test]
    fn targets_compare_blockd_within_the_run() {
        let rs = vec![
            rec("raw", "randread-4k-qd32", 100.0),
            rec("blockd", "randread-4k-qd32", 90.0),
            rec("qemu-nbd", "randread-4k-qd32", 80.0),
            rec("blockd", "randwrite-4k-qd32-first-touch", 10.0),
            rec("qemu-nbd-qcow2", "randwrite-4k-qd32-first-touch", 20.0),
        ];
        let t = targets(&rs, None, &[], &[]);
        assert_eq!(t[0].met, Some(true), "{:?}", t[0]); // 0.90 >= 0.85 raw
        assert_eq!(t[1].met, Some(false), "{:?}", t[1]); // 1.125 < 1.3 qemu-nbd
        assert_eq!(t[2].met, None); // no seqread
        assert_eq!(t[4].met, Some(false)); // half of qcow2
        assert_eq!(t.last().unwrap().met, None); // no engine figures
        assert_eq!(ratio(&rs, "randread-4k-qd32", "blockd", "raw"), Some(0.9));
    }

    fn target<'a>(t: &'a [TargetResult], name: &str) -> &'a TargetResult {
        t.iter()
            .find(|t| t.name.contains(name))
            .unwrap_or_else(|| panic!("no target {name} in {t:?}"))
    }

    #[test]
    fn ublk_targets_compare_with_loop_and_kernel_nbd_or_say_why_not() {
        let rs = vec![
            rec("loop", "randread-4k-qd32", 100.0),
            rec("blockd-ublk", "randread-4k-qd32", 95.0),
            rec("blockd-kernel-nbd", "randread-4k-qd32", 50.0),
        ];
        let t = targets(&rs, None, &[], &[]);
        let vs_loop = target(&t, "blockd-ublk ≥ 0.9× loop");
        assert_eq!(vs_loop.met, Some(true), "{vs_loop:?}");
        assert_eq!(vs_loop.measured, "0.95× loop");
        let vs_nbd = target(&t, "blockd-ublk ≥ 2× blockd-kernel-nbd");
        assert_eq!(vs_nbd.met, Some(false), "{vs_nbd:?}"); // 1.9 < 2

        // ublk skipped: both of its targets say why.
        let skipped = vec![Skipped {
            system: "blockd-ublk".into(),
            reason: "no /dev/ublk-control".into(),
        }];
        let t = targets(&rs[..1], None, &skipped, &[]);
        for name in ["blockd-ublk ≥ 0.9× loop", "restart stall (blockd-ublk)"] {
            let x = target(&t, name);
            assert_eq!(x.met, None, "{x:?}");
            assert_eq!(
                x.measured, "not measured (blockd-ublk skipped: no /dev/ublk-control)",
                "{x:?}"
            );
        }
    }

    const STALL_FIO: &str = r#"{
  "jobs" : [ { "jobname" : "restart-stall", "error" : 0, "total_err" : 0, "first_error" : 0,
    "read" : { "total_ios" : 700, "lat_ns" : { "max" : 1500000000 }, "clat_ns" : { "max" : 1499000000 } },
    "write" : { "total_ios" : 300, "lat_ns" : { "max" : 900000000 }, "clat_ns" : { "max" : 899000000 } } } ]
}"#;

    fn stall_dir(json: &str, status: &str) -> (tempfile::TempDir, Vec<Stall>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.json"), json).unwrap();
        let tsv = format!("blockd-kernel-nbd\ts.json\t812\t{status}\tfio --name=restart-stall\n");
        let st = stalls(&tsv, dir.path()).unwrap();
        (dir, st)
    }

    #[test]
    fn restart_stall_is_the_longest_latency_with_errors_counted() {
        let f = parse_stall_fio(&format!("fio: banner\n{STALL_FIO}")).unwrap();
        assert_eq!(f.max_lat_us, 1_500_000.0);
        assert_eq!(f.ios, 1000);
        assert_eq!(f.errors, 0);
        let errs = STALL_FIO.replace("\"total_err\" : 0", "\"total_err\" : 7");
        assert_eq!(parse_stall_fio(&errs).unwrap().errors, 7);
        // Without continue_on_error fio stops at the first error: still counted.
        let stopped = STALL_FIO
            .replace("\"error\" : 0", "\"error\" : 5")
            .replace("\"total_err\" : 0, ", "");
        assert_eq!(parse_stall_fio(&stopped).unwrap().errors, 1);

        let (_dir, st) = stall_dir(STALL_FIO, "exit 0");
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].max_pause_ms, Some(1500.0));
        assert_eq!(st[0].restart_ms, 812.0);
        assert!(st[0].met(), "{:?}", st[0]);
        let t = targets(&[], None, &[], &st);
        assert_eq!(
            target(&t, "restart stall (blockd-kernel-nbd)").met,
            Some(true)
        );
        assert_eq!(target(&t, "restart stall (blockd-ublk)").met, None);

        let (_dir, slow) = stall_dir(&STALL_FIO.replace("1500000000", "2500000000"), "exit 0");
        assert!(!slow[0].met());
        let (_dir, failed) = stall_dir(&errs, "exit 1");
        assert!(!failed[0].met());
        // A hung device leaves no JSON: reported, not a crash, and missed.
        let (_dir, hung) = stall_dir("", "hung: fio did not finish");
        assert_eq!(hung[0].max_pause_ms, None);
        assert!(hung[0].problem.is_some());
        assert!(!hung[0].met());
        assert!(stall_summary(&hung[0]).starts_with("no figures: "));
        let md = render_markdown(&ReportInput {
            stalls: &hung,
            ..Default::default()
        });
        assert!(md.contains("## Restart stall"), "{md}");
        assert!(
            md.contains("| blockd-kernel-nbd | – | – | 0 | 0.81 s | hung"),
            "{md}"
        );

        assert!(stalls("blockd-ublk\tx.json\tsoon\texit 0\tfio", Path::new("/")).is_err());
        assert!(stalls("blockd-ublk\tx.json", Path::new("/")).is_err());
    }

    #[test]
    fn skipped_systems_need_a_reason_and_must_be_kernel_systems() {
        let s = parse_skipped("blockd-ublk\tno /dev/ublk-control\nloop\tneeds root\n").unwrap();
        assert_eq!(skip_reason(&s, "loop"), Some("needs root"));
        assert_eq!(skip_reason(&s, "raw"), None);
        assert!(parse_skipped("blockd\twhatever\n").is_err());
        assert!(parse_skipped("loop\t \n").is_err());
        assert!(parse_skipped("loop\n").is_err());

        // A complete run without the kernel systems: complete only with them skipped.
        let mut rs = Vec::new();
        for w in WORKLOADS {
            for sys in systems_for(w) {
                if !KERNEL_SYSTEMS.contains(sys) {
                    rs.push(rec(sys, w, 5.0));
                }
            }
        }
        assert_eq!(
            check_complete(&rs, &s).len(),
            5,
            "blockd-kernel-nbd lacks 5 workloads"
        );
        let all: Vec<Skipped> = KERNEL_SYSTEMS
            .iter()
            .map(|k| Skipped {
                system: k.to_string(),
                reason: "no driver".into(),
            })
            .collect();
        assert!(check_complete(&rs, &all).is_empty());
        // Skipped and measured at once is a harness bug.
        rs.push(rec("loop", "randread-4k-qd1", 5.0));
        assert_eq!(check_complete(&rs, &all).len(), 1);
        // A measured blockd device needs its restart-stall run.
        assert_eq!(
            check_stalls(&[rec("blockd-ublk", "randread-4k-qd1", 5.0)], &[]).len(),
            1
        );

        let machine = vec![("emulated".to_string(), "yes (QEMU TCG CPU)".to_string())];
        let md = render_markdown(&ReportInput {
            records: &rs,
            machine: &machine,
            skipped: &all,
            ..Default::default()
        });
        assert!(md.contains("- `blockd-ublk`: skipped: no driver"), "{md}");
        assert!(md.contains("- `raw`: measured"), "{md}");
        assert!(
            md.contains("| blockd-kernel-nbd | skipped: no driver |"),
            "{md}"
        );
        assert!(
            md.contains("Emulated CPU — these figures are meaningless"),
            "{md}"
        );
        assert!(!render_markdown(&ReportInput::default()).contains("Emulated CPU"));
    }

    #[test]
    fn completeness_names_what_is_missing_or_zero() {
        let mut rs = Vec::new();
        for w in WORKLOADS {
            for s in systems_for(w) {
                rs.push(rec(s, w, 5.0));
            }
        }
        assert!(check_complete(&rs, &[]).is_empty());
        rs[0].lat_p99_us = f64::NAN;
        rs.pop();
        let p = check_complete(&rs, &[]);
        assert_eq!(p.len(), 2, "{p:?}");
        let md = render_markdown(&ReportInput {
            records: &rs,
            ..Default::default()
        });
        assert!(md.contains("### randread-4k-qd1"));
        assert!(chart_data(&rs).lines().count() == WORKLOADS.len() + 1);
    }

    #[test]
    fn snapshot_spread_is_slowest_over_fastest() {
        let e = EngineFigures {
            chunk_size_bytes: 65536,
            metadata: MetadataFigure {
                chunks_written: 1,
                sst_bytes: 1,
                dir_bytes: 1,
                bytes_per_tib: 1,
            },
            startup: StartupFigure {
                mapped_chunks: 1,
                open_ms: 1.0,
            },
            rss: RssFigure {
                volumes: 1,
                provisioned_bytes: 1,
                mapped_chunks: 1,
                rss_empty_bytes: 1,
                rss_provisioned_bytes: 1,
                rss_mapped_bytes: 1,
            },
            snapshot_create: [(1_000, 100.0), (1_000_000, 150.0)]
                .map(|(n, us)| SnapshotFigure {
                    written_chunks: n,
                    median_us: us,
                    samples: 5,
                })
                .to_vec(),
            delta: vec![DeltaFigure {
                volume_bytes: 1 << 40,
                base_chunks: 10,
                changed_chunks: 4,
                changed_fraction_of_tib: 4.0 * 65536.0 / (1u64 << 40) as f64,
                extents: 2,
                delta_bytes: 4 * 65536,
                delta_ms: 1.0,
                export_ms: 2.0,
                export_bytes: 4 * 65536,
            }],
            elapsed_s: 1.0,
        };
        assert_eq!(e.snapshot_spread(), Some(1.5));
        // Older engine-figures.json files have no delta key.
        let mut json = serde_json::to_value(&e).unwrap();
        json.as_object_mut().unwrap().remove("delta");
        let old: EngineFigures = serde_json::from_value(json).unwrap();
        assert!(old.delta.is_empty());
        let md = render_markdown(&ReportInput {
            engine: Some(&e),
            ..Default::default()
        });
        assert!(md.contains("Changed-block tracking"), "{md}");
        assert!(md.contains("| 1.0 TiB | 4 chunks"), "{md}");
        assert_eq!(
            targets(&[], Some(&e), &[], &[]).last().unwrap().met,
            Some(true)
        );
    }
}
