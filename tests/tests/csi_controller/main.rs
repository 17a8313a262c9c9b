//! CSI Identity and Controller conformance: every RPC csi-shim serves, its spec error
//! cases, idempotency of every mutating call, pagination, capacity, snapshots, restores
//! and clones, other-node ids, concurrency and Probe across a blockd restart.
//!
//! Each test runs its own blockd and csi-shim (real processes over their unix sockets)
//! on private temporary directories, so tests run in parallel and leave nothing behind.
//! The blockd side of every answer is checked through blockd's own API.
//!
//! Modules: `identity`, `volumes`, `snapshots`, `expand`, `get_capacity` (the tests), and
//! `failed_blockd` (a stand-in daemon whose pool has failed). The harness (`Env`, request
//! builders) is `blockd_tests::csi_controller`, shared with the other CSI Controller tests.

mod expand;
mod failed_blockd;
mod get_capacity;
mod identity;
mod snapshots;
mod volumes;

use blockd_proto::csi;
use blockd_proto::csi::controller_client::ControllerClient;
use blockd_proto::csi::controller_service_capability::rpc;
use blockd_proto::csi::identity_client::IdentityClient;
use blockd_proto::csi::plugin_capability::{service, volume_expansion};
use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_proto::csi::volume_capability::AccessMode;
use blockd_proto::v1;
use blockd_tests::csi_controller::*;
use blockd_tests::expect_status as expect_code;
use blockd_tests::{have_tool, qemu_io, runtime, skip, CsiShim, Daemon};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// GetCapacity with `parameters`, which must succeed.
async fn capacity(
    c: &mut ControllerClient<Channel>,
    parameters: HashMap<String, String>,
) -> csi::GetCapacityResponse {
    c.get_capacity(csi::GetCapacityRequest {
        parameters,
        ..Default::default()
    })
    .await
    .expect("GetCapacity")
    .into_inner()
}
