//! CSI Identity and Controller conformance: every RPC csi-shim serves, its spec error
//! cases, idempotency of every mutating call, pagination, capacity, snapshots, restores
//! and clones, other-node ids, concurrency and Probe across a blockd restart.
//!
//! Each test runs its own blockd and csi-shim (real processes over their unix sockets)
//! on private temporary directories, so tests run in parallel and leave nothing behind.
//! The blockd side of every answer is checked through blockd's own API.
//!
//! Modules: `identity`, `volumes`, `snapshots`, `expand`, `capacity` (the tests), and
//! `failed_blockd` (a stand-in daemon whose pool has failed). The harness (`Env`, request
//! builders) is `blockd_tests::csi_controller`, shared with the other CSI Controller tests.

mod capacity;
mod expand;
mod failed_blockd;
mod identity;
mod snapshots;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};
use blockd_proto::csi;
use blockd_proto::csi::controller_client::ControllerClient;
use blockd_proto::csi::controller_service_capability::rpc;
use blockd_proto::csi::identity_client::IdentityClient;
use blockd_proto::csi::plugin_capability::{service, volume_expansion};
use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use blockd_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use blockd_proto::v1;
use blockd_tests::expect_status as expect_code;
use blockd_tests::{have_tool, runtime, skip, CsiShim, Daemon};
use tonic::transport::Channel;
use tonic::Code;
use blockd_tests::csi_controller::*;
