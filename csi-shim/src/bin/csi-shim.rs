//! `csi-shim`: the CSI driver binary. Parses flags, sets up logs, and hands over to
//! [`csi_shim::run`]; everything else lives in the library so tests can reach it.

use std::process::ExitCode;

use clap::Parser;
use csi_shim::config::{Args, LogFormat};

fn main() -> ExitCode {
    let args = Args::parse();
    let log_format = args.log_format;
    csi_shim::init_logging(log_format, "CSI_SHIM_LOG");
    let runtime = match csi_shim::runtime(None) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(csi_shim::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let message = format!("{err:#}");
            match log_format {
                // A JSON log stays one JSON object per line.
                LogFormat::Json => tracing::error!(error = %message, "csi-shim failed"),
                LogFormat::Text => eprintln!("error: {message}"),
            }
            ExitCode::FAILURE
        }
    }
}
