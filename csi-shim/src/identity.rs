//! CSI Identity service: who this plugin is, what it can do, and whether it is ready.
//!
//! Readiness follows blockd, the one dependency every Controller and Node call needs:
//!
//! ```text
//! blockd does not answer (down, restarting)  -> Probe OK, ready = false
//! blockd answers, health "ok"                 -> Probe OK, ready = true
//! blockd answers, health "failed: ..."        -> FAILED_PRECONDITION (plugin not healthy)
//! ```
//!
//! "Not answering" is treated as still initialising rather than unhealthy: blockd and
//! csi-shim start independently, and the lazy channel reconnects by itself, so nothing is
//! gained by having csi-shim restarted. A daemon that answers but reports a failed pool is
//! unhealthy in the spec's sense and gets the spec's code.

use std::sync::Arc;
use std::time::Duration;

use blockd_proto::csi::identity_server::Identity;
use blockd_proto::csi::plugin_capability::{self, service, volume_expansion};
use blockd_proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use blockd_proto::v1::GetStatusRequest;
use tonic::{Request, Response, Status};

use crate::ids::DRIVER_NAME;
use crate::Driver;

/// How long Probe waits for blockd before answering "not ready".
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct IdentityService {
    driver: Arc<Driver>,
}

impl IdentityService {
    pub fn new(driver: Arc<Driver>) -> Self {
        IdentityService { driver }
    }
}

fn service_capability(kind: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: [("node".to_string(), self.driver.args.node_id.clone())].into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = Vec::new();
        if self.driver.args.mode.controller() {
            capabilities.push(service_capability(service::Type::ControllerService));
            capabilities.push(service_capability(service::Type::GroupControllerService));
            // Served next to the controller (the sidecar runs with the controller).
            capabilities.push(service_capability(service::Type::SnapshotMetadataService));
        }
        capabilities.push(service_capability(
            service::Type::VolumeAccessibilityConstraints,
        ));
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let mut daemon = self.driver.blockd.daemon();
        let answer = tokio::time::timeout(PROBE_TIMEOUT, daemon.get_status(GetStatusRequest {}));
        let ready = match answer.await {
            Err(_elapsed) => {
                tracing::warn!(
                    blockd_api = %self.driver.blockd.socket().display(),
                    timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                    "probe: blockd did not answer in time; not ready"
                );
                false
            }
            Ok(Err(status)) => {
                tracing::warn!(
                    blockd_api = %self.driver.blockd.socket().display(),
                    code = ?status.code(),
                    error = status.message(),
                    "probe: blockd does not answer; not ready"
                );
                false
            }
            Ok(Ok(status)) => {
                let health = status.into_inner().health;
                if health != "ok" {
                    tracing::warn!(health = %health, "probe: blockd reports a problem");
                    return Err(Status::failed_precondition(format!(
                        "blockd at {} is not healthy: {health}; see `blockctl pool list` \
                         and the blockd log, a restart of blockd recovers after the cause \
                         is fixed",
                        self.driver.blockd.socket().display()
                    )));
                }
                true
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
