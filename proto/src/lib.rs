//! The blockd.v1 API: the one contract between the daemon and its clients (blockctl, the
//! CSI shim, the tests).
//!
//! This crate owns:
//! - [`v1`]: prost messages and tonic clients/servers generated at build time from
//!   `proto/blockd/v1/*.proto` (compiled by protox, so no system `protoc`);
//! - [`csi`]: the same for the Container Storage Interface `csi.v1`, extracted verbatim from
//!   the spec's protobuf blocks so that names and field numbers match the wire;
//! - [`FILE_DESCRIPTOR_SET`], [`CSI_FILE_DESCRIPTOR_SET`]: encoded descriptors, for gRPC
//!   server reflection;
//! - [`model`]: hand-written domain types that validate incoming messages with `TryFrom`,
//!   turning bad input into `INVALID_ARGUMENT` at the edge, plus page tokens;
//! - [`rules`]: the naming rule and the size granule, which the daemon and its clients
//!   hold alike;
//! - [`nbd_uri`]: the NBD URIs of exports (`nbd+unix://`, `nbds://`), built and parsed;
//! - [`size`]: parsing and printing of byte sizes (`64K`, `10GiB`), shared by the daemon's
//!   configuration and the CLI so that both read sizes exactly alike;
//! - [`unix_socket`]: binding a listening unix socket (stale ones replaced, anything else
//!   refused, mode 0600), shared by every program that listens on one;
//! - [`connect_unix`]: a tonic channel over the daemon's unix socket.
//!
//! Invariant: nothing here knows about the engine. The daemon maps the domain types onto
//! engine calls; clients never link the engine.

pub mod model;
pub mod nbd_uri;
pub mod rules;
pub mod size;
pub mod unix_socket;

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Generated messages, clients (`*_client`) and servers (`*_server`) of `blockd.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("blockd.v1");
}

/// The encoded `FileDescriptorSet` of `blockd.v1`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/blockd_descriptor.bin"));

/// Generated messages, clients and servers of the Container Storage Interface `csi.v1`
/// (spec v1.13), used by `csi-shim` and by the CSI conformance tests.
pub mod csi {
    #![allow(clippy::all, missing_docs, rustdoc::all)]
    tonic::include_proto!("csi.v1");
}

/// The encoded `FileDescriptorSet` of `csi.v1`, for `tonic-reflection` in `csi-shim`.
pub const CSI_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/csi_descriptor.bin"));

/// Opens a gRPC channel to a daemon listening on the unix socket at `path`.
///
/// Connects eagerly, so a missing or dead socket is reported here rather than on the first
/// call.
pub async fn connect_unix(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    // The authority is never used for a unix socket; tonic only needs a well-formed URI.
    Endpoint::from_static("http://blockd.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}
