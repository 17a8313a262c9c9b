//! CSI Identity service (placeholder: being written).

use std::sync::Arc;

use blockd_proto::csi::identity_server::Identity;

use crate::Driver;

pub struct IdentityService {
    #[allow(dead_code)]
    driver: Arc<Driver>,
}

impl IdentityService {
    pub fn new(driver: Arc<Driver>) -> Self {
        IdentityService { driver }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {}
