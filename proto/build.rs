//! Compiles `proto/blockd/v1/*.proto` with protox (a pure-Rust protobuf compiler, so no
//! system `protoc` is needed), writes the encoded file descriptor set for gRPC reflection,
//! and generates prost messages plus tonic clients and servers from it.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &["blockd/v1/blockd.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(out_dir.join("blockd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
