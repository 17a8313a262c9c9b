//! CSI Node service (placeholder: being written).

use std::sync::Arc;

use blockd_proto::csi::node_server::Node;

use crate::Driver;

pub struct NodeService {
    #[allow(dead_code)]
    driver: Arc<Driver>,
}

impl NodeService {
    /// Rebuilds the record of staged volumes from `--state-dir` and reattaches them.
    pub async fn start(driver: Arc<Driver>) -> anyhow::Result<Self> {
        Ok(NodeService { driver })
    }
}

#[tonic::async_trait]
impl Node for NodeService {}
