//! `csi-fuse-nbd`: the FUSE file server the node service starts (detached, one per staged
//! volume) under a loop device. Parses flags, sets up logs, marks itself an I/O flusher
//! ([`csi_shim::io_flusher`]), and runs [`csi_shim::fuse::serve`] until its mount goes
//! away; see that module for what it serves and its invariants.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::NonEmptyStringValueParser;
use clap::Parser;
use csi_shim::config::LogFormat;
use csi_shim::fuse;

/// FUSE file server for one NBD export: mounts DIR with the export as the file DIR/nbd,
/// whose size follows the export (so a loop device on it can grow online), and serves it
/// until DIR is unmounted. Runs as root (it mounts with mount(2); no fusermount needed).
#[derive(Debug, Parser)]
#[command(name = "csi-fuse-nbd", version)]
struct Args {
    /// Directory to mount on (it must exist); the export appears as DIR/nbd.
    #[arg(long = "mount", value_name = "DIR")]
    mount_point: PathBuf,
    /// NBD unix socket to connect to (csi-nbd-proxy's, or blockd's).
    #[arg(long, value_name = "SOCK")]
    socket: PathBuf,
    /// The NBD export (image) to serve.
    #[arg(long, value_name = "NAME", value_parser = NonEmptyStringValueParser::new())]
    export: String,
    /// File holding the size the export should have (decimal bytes), written by csi-shim
    /// when it expands the volume: when it names a larger size than the file has, the
    /// next stat of the file reconnects to learn the export's new size. Without it the
    /// file keeps the size seen at connect time.
    #[arg(long, value_name = "FILE")]
    size_file: Option<PathBuf>,
    /// Write the process id to this file once the mount serves.
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Seconds to keep reconnecting to the NBD socket (at start, and after a transport
    /// error) before failing I/O with EIO.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    reconnect_timeout: u64,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

impl Args {
    fn config(self) -> fuse::Config {
        fuse::Config {
            mount_point: self.mount_point,
            socket: self.socket,
            export: self.export,
            size_file: self.size_file,
            pidfile: self.pidfile,
            reconnect_timeout: Duration::from_secs(self.reconnect_timeout),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    csi_shim::init_logging(args.log_format, "CSI_FUSE_NBD_LOG");
    // It serves the file a loop device writes back to; before fuser starts its threads:
    // they inherit the flag.
    csi_shim::io_flusher::become_io_flusher("csi-fuse-nbd");
    match fuse::serve(args.config()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let error = format!("{:#}", anyhow::Error::from(err));
            tracing::error!(error = %error, "csi-fuse-nbd failed");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    /// A command line with every required argument (`--export` naming `export`), then
    /// `extra`.
    fn command_line<'a>(export: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut line = vec![
            "csi-fuse-nbd",
            "--mount",
            "/m",
            "--socket",
            "/s",
            "--export",
            export,
        ];
        line.extend_from_slice(extra);
        line
    }

    #[test]
    fn arguments_are_parsed_and_checked() {
        let args = Args::try_parse_from(command_line(
            "v",
            &[
                "--size-file",
                "/z",
                "--pidfile",
                "/p",
                "--reconnect-timeout",
                "5",
            ],
        ))
        .unwrap();
        let cfg = args.config();
        assert_eq!(cfg.mount_point, PathBuf::from("/m"));
        assert_eq!(cfg.socket, PathBuf::from("/s"));
        assert_eq!(cfg.export, "v");
        assert_eq!(cfg.size_file, Some(PathBuf::from("/z")));
        assert_eq!(cfg.pidfile, Some(PathBuf::from("/p")));
        assert_eq!(cfg.reconnect_timeout, Duration::from_secs(5));
        let minimal = Args::try_parse_from(command_line("v", &[]))
            .unwrap()
            .config();
        assert_eq!(minimal.size_file, None);
        assert_eq!(minimal.reconnect_timeout, Duration::from_secs(60));
        for bad in [
            vec!["csi-fuse-nbd", "--mount", "/m"],
            vec!["csi-fuse-nbd", "--bogus"],
            vec!["csi-fuse-nbd", "--export"],
            command_line("", &[]),
            command_line("v", &["--reconnect-timeout", "soon"]),
        ] {
            assert!(Args::try_parse_from(&bad).is_err(), "{bad:?} was accepted");
        }
    }
}
