//! csi-shim: the CSI driver for blockd.
//!
//! Honest placeholder: the CSI services land with the CSI issue. Until then this binary
//! only explains that it is not built yet and exits non-zero, so nobody deploys it by
//! mistake.

fn main() {
    eprintln!(
        "csi-shim: the CSI driver is not implemented yet (see the CSI issue); nothing to run"
    );
    std::process::exit(2);
}
