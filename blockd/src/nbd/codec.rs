//! The NBD wire format, from the I/O-free [`nbd_wire`] crate that blockd shares with
//! csi-shim and the fuzz targets. Re-exported here so that the server keeps naming it
//! `nbd::codec`.

pub use nbd_wire::codec::*;
