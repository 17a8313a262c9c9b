//! `bench-report`: the Rust half of `benches/run.sh`.
//!
//! - `bench-report summary FILE`: one line (IOPS, bandwidth, p50/p99) for a fio JSON
//!   output, for run.sh's progress lines;
//! - `bench-report stall FILE`: the same for a restart-stall run (longest pause, errors);
//! - `bench-report report --out DIR`: `results.json`, `report.md` and `chart.png` from what
//!   run.sh left in DIR (see [`blockd_bench::report`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// Turns the fio outputs of benches/run.sh into results.json, report.md and chart.png.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints one line summarising a fio JSON output.
    Summary { file: PathBuf },
    /// Prints one line (longest I/O pause, I/O errors) for a restart-stall fio JSON output.
    Stall { file: PathBuf },
    /// Writes results.json, report.md and chart.png into DIR (fio/, machine.tsv inside).
    Report {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("bench-report: error: {err:#}");
        std::process::exit(1);
    }
}

/// Reads `file` and parses it with `parse`, naming the file in either error.
fn parse_file<T>(file: &Path, parse: impl FnOnce(&str) -> Result<T>) -> Result<T> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    parse(&text).with_context(|| format!("parsing {}", file.display()))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Summary { file } => {
            let f = parse_file(&file, blockd_bench::report::parse_fio)?;
            println!(
                "{:.0} IOPS, {:.1} MiB/s, p50 {:.1} µs, p99 {:.1} µs ({} I/Os in {:.1} s)",
                f.iops,
                f.bw_bytes / 1048576.0,
                f.lat_p50_us,
                f.lat_p99_us,
                f.ios,
                f.runtime_s
            );
        }
        Command::Stall { file } => {
            let f = parse_file(&file, blockd_bench::report::parse_stall_fio)?;
            println!(
                "longest I/O pause {:.3} s, {} I/O errors, {} I/Os",
                f.max_lat_us / 1e6,
                f.errors,
                f.ios
            );
        }
        Command::Report { out } => {
            let records = blockd_bench::report::write_report(&out)?;
            eprintln!(
                "bench-report: {} results in {}",
                records.len(),
                out.join("results.json").display()
            );
        }
    }
    Ok(())
}
