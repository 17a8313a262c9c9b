//! Compiles the `.proto` files under `proto/` with protox (a pure-Rust protobuf compiler, so
//! no system `protoc` is needed), writes each package's encoded file descriptor set for gRPC
//! reflection, and generates prost messages plus tonic clients and servers from them.
//!
//! `blockd.v1` and `csi.v1` are compiled separately so that each server reflects only the
//! services it actually serves.

use std::path::PathBuf;

use prost::Message;

/// (proto file, descriptor output name, default server stubs)
///
/// `csi.v1` servers get default method bodies answering `UNIMPLEMENTED`: the spec asks
/// exactly that of an RPC whose capability a plugin does not advertise (e.g.
/// ControllerPublishVolume), and it keeps optional services out of the driver's code.
const PACKAGES: &[(&str, &str, bool)] = &[
    ("blockd/v1/blockd.proto", "blockd_descriptor.bin", false),
    ("csi/v1/csi.proto", "csi_descriptor.bin", true),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    for &(file, descriptor, default_stubs) in PACKAGES {
        let fds = protox::compile([file], ["proto"])?;
        std::fs::write(out_dir.join(descriptor), fds.encode_to_vec())?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .generate_default_stubs(default_stubs)
            .compile_fds(fds)?;
    }
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
