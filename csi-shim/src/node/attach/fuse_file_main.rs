//! `csi-fuse-nbd`: the FUSE file server the node service starts (detached, one per staged
//! volume) under a loop device; see [`csi_shim::node::attach::fuse_file`].
//!
//! ```text
//! csi-fuse-nbd --mount DIR --socket NBD_SOCK --export NAME --size-file FILE
//!              [--pidfile FILE] [--reconnect-timeout SECS]
//! ```

use std::process::ExitCode;

use csi_shim::node::attach::fuse_file;

fn main() -> ExitCode {
    let cfg = match fuse_file::parse_args(std::env::args().skip(1)) {
        Ok(cfg) => cfg,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    // It serves the file a loop device writes back to: see `csi_shim::io_flusher`.
    if let Err(err) = csi_shim::io_flusher::set() {
        eprintln!(
            "csi-fuse-nbd: cannot set PR_SET_IO_FLUSHER ({err}; it needs CAP_SYS_RESOURCE); \
             continuing"
        );
    }
    let mount = cfg.mount_point.display().to_string();
    match fuse_file::serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: serving {mount}: {err}");
            ExitCode::FAILURE
        }
    }
}
