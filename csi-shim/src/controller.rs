//! CSI Controller service (placeholder: being written).

use std::sync::Arc;

use blockd_proto::csi::controller_server::Controller;

use crate::Driver;

pub struct ControllerService {
    #[allow(dead_code)]
    driver: Arc<Driver>,
}

impl ControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { driver }
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {}
