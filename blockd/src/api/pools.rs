//! `blockd.v1.PoolService`: pool listing and usage.

use blockd_proto::model::{PageRequest, PoolName};
use blockd_proto::v1;
use blockd_proto::v1::pool_service_server::PoolService;
use tonic::{Request, Response, Status};

use super::{convert, ApiContext};

#[derive(Debug, Clone)]
pub struct PoolApi {
    ctx: ApiContext,
}

impl PoolApi {
    pub fn new(ctx: ApiContext) -> Self {
        PoolApi { ctx }
    }
}

#[tonic::async_trait]
impl PoolService for PoolApi {
    async fn list_pools(
        &self,
        request: Request<v1::ListPoolsRequest>,
    ) -> Result<Response<v1::ListPoolsResponse>, Status> {
        let span = tracing::debug_span!("list_pools");
        self.ctx
            .rpc("ListPools", span, async {
                let req = request.into_inner();
                let page = PageRequest::new(req.page_size, &req.page_token)?;
                let pools = self.ctx.run(|e| Ok(e.pools())).await?;
                let (pools, next_page_token) = page.apply(pools, |p| p.name.as_str());
                Ok(Response::new(v1::ListPoolsResponse {
                    pools: pools.into_iter().map(convert::pool).collect(),
                    next_page_token,
                }))
            })
            .await
    }

    async fn get_pool(
        &self,
        request: Request<v1::GetPoolRequest>,
    ) -> Result<Response<v1::Pool>, Status> {
        let span = tracing::debug_span!("get_pool", pool = %request.get_ref().name);
        self.ctx
            .rpc("GetPool", span, async {
                let name = PoolName::try_from(request.into_inner())?;
                let pool = self.ctx.run(move |e| e.pool(name.as_str())).await?;
                Ok(Response::new(convert::pool(pool)))
            })
            .await
    }
}
