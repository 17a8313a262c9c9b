//! The NBD protocol without I/O, shared by blockd's server, csi-shim's proxy and attachers,
//! the tests' hand-made peers and the fuzz targets.
//!
//! This crate owns:
//! - [`codec`]: every byte layout of fixed-newstyle NBD (the NBD project's `doc/proto.md`)
//!   as pure encoders and decoders, with the protocol's constants;
//! - [`client`]: the client side of the handshake (`NBD_OPT_GO`) as a state machine;
//! - [`server`]: the framing of the server side of the handshake (greeting, client flags,
//!   option requests) as a state machine; what to answer stays the server's policy.
//!
//! Invariant: nothing here reads or writes a socket. A state machine says how many bytes it
//! wants next ([`client::ClientHandshake::wants`]); its caller reads exactly that many,
//! feeds them in and sends what comes back. So blocking code, async code and fuzzers drive
//! the same logic, and no decoder can block or allocate more than its input.
//!
//! ```text
//!   caller                         state machine
//!   read_exact(hs.wants())  ──▶    feed(bytes) ──▶ Send(bytes) / Continue / Ready(..)
//!   write_all(bytes)        ◀──
//! ```

pub mod client;
pub mod codec;
pub mod server;
