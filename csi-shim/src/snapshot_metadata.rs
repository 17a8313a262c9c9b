//! CSI `SnapshotMetadata` (changed-block tracking, ALPHA in the spec): the allocated
//! ranges of a snapshot and the ranges changed between two snapshots of one volume,
//! answered from blockd's `ImageDataService` (which reads them from its chunk map in
//! O(changed chunks)).
//!
//! Choices, per the spec's latitude:
//! - `VARIABLE_LENGTH` block metadata: blockd merges adjacent changed chunks into one
//!   extent, so a large sequential change is one tuple, not thousands. Every tuple starts
//!   and ends on a chunk boundary (the pool's chunk size) except the last one of the
//!   volume, which ends at its size.
//! - `starting_offset` is honoured at chunk granularity: the first tuple starts at the
//!   chunk holding it, so it always ends after `starting_offset`, as the spec demands;
//!   a resumed call never repeats a tuple wholly before its offset.
//! - `max_results` (0: 1024) bounds every message; blockd pages map one to one onto
//!   messages.
//! - Delta tuples include ranges the target reads as zeros (discarded or zeroed since the
//!   base): their content changed. A backup application reads the target there and gets
//!   zeros.
//! - Authentication: the spec's request messages carry no token. The
//!   `external-snapshot-metadata` sidecar authenticates and authorises every Kubernetes
//!   client (TokenReview + SubjectAccessReview on the security token the client sends it,
//!   over TLS) and reaches this service over the unix socket it shares with csi-shim in
//!   the pod, so this side validates ids and arguments only; `secrets` are not needed.
//! - Errors: a missing id or a negative `max_results` is `INVALID_ARGUMENT`; an id that
//!   names no snapshot here (malformed, on another node, or gone) is `NOT_FOUND`; a
//!   negative `starting_offset` or one past the snapshot's size is `OUT_OF_RANGE`;
//!   snapshots of different volumes, or a base taken after the target, are
//!   `FAILED_PRECONDITION`.

use std::sync::Arc;

use blockd_proto::csi::snapshot_metadata_server::SnapshotMetadata;
use blockd_proto::csi::{
    BlockMetadata, BlockMetadataType, GetMetadataAllocatedRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, GetMetadataDeltaResponse,
};
use blockd_proto::v1;
use blockd_proto::v1::image_data_service_client::ImageDataServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::blockd::upstream;
use crate::ids::SnapshotId;
use crate::Driver;

/// The stream type csi.v1's generated server trait expects (its default-stub style).
type MetadataStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Tuples per message when the CO leaves the choice to the plugin.
pub const DEFAULT_MAX_RESULTS: u32 = 1024;

#[derive(Debug, Clone)]
pub struct SnapshotMetadataService {
    driver: Arc<Driver>,
}

impl SnapshotMetadataService {
    pub fn new(driver: Arc<Driver>) -> Self {
        SnapshotMetadataService { driver }
    }

    /// The local snapshot an id names, or the status the spec asks for.
    fn local(&self, field: &str, id: &str) -> Result<SnapshotId, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(format!("{field} is required")));
        }
        let sid = SnapshotId::parse(id)
            .map_err(|e| Status::not_found(format!("{field}: no such snapshot: {e}")))?;
        if sid.node != self.driver.args.node_id {
            return Err(Status::not_found(format!(
                "{field} {id:?} is a snapshot on node {:?}; this is node {:?}",
                sid.node, self.driver.args.node_id
            )));
        }
        Ok(sid)
    }

    /// The snapshot's size, NOT_FOUND when blockd does not know it.
    async fn size_of(&self, field: &str, sid: &SnapshotId) -> Result<u64, Status> {
        let snap = self
            .driver
            .blockd
            .get_snapshot(&sid.snapshot)
            .await
            .map_err(|s| upstream(&format!("{field} {sid}"), s))?;
        if snap.volume != sid.volume {
            return Err(Status::not_found(format!(
                "{field} {sid}: snapshot {:?} belongs to volume {:?}, not {:?}",
                sid.snapshot, snap.volume, sid.volume
            )));
        }
        Ok(snap.size_bytes)
    }

    fn data(&self) -> ImageDataServiceClient<tonic::transport::Channel> {
        self.driver.blockd.image_data()
    }
}

/// Checks `starting_offset` and `max_results`; returns them as blockd takes them.
fn range_args(start: i64, max: i32, size: u64) -> Result<(u64, u32), Status> {
    if max < 0 {
        return Err(Status::invalid_argument(format!(
            "max_results must not be negative (got {max})"
        )));
    }
    if start < 0 || start as u64 > size {
        return Err(Status::out_of_range(format!(
            "starting_offset {start} is outside the snapshot (size {size} bytes)"
        )));
    }
    let max = if max == 0 {
        DEFAULT_MAX_RESULTS
    } else {
        max as u32
    };
    Ok((start as u64, max))
}

fn tuples(page: &v1::ExtentPage) -> Vec<BlockMetadata> {
    page.extents
        .iter()
        .map(|x| BlockMetadata {
            byte_offset: x.offset as i64,
            size_bytes: x.length as i64,
        })
        .collect()
}

/// A CSI message that carries one page of block metadata.
trait MetadataMessage: Send + 'static {
    /// The message for a volume of `size` bytes carrying `tuples` (variable length).
    fn page(size: u64, tuples: Vec<BlockMetadata>) -> Self;
}

macro_rules! metadata_message {
    ($($message:ty),+) => {$(
        impl MetadataMessage for $message {
            fn page(size: u64, tuples: Vec<BlockMetadata>) -> Self {
                Self {
                    block_metadata_type: BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: size as i64,
                    block_metadata: tuples,
                }
            }
        }
    )+};
}

metadata_message!(GetMetadataAllocatedResponse, GetMetadataDeltaResponse);

/// Forwards the pages of blockd's `answer` (`context` names it in errors) as CSI messages
/// about a volume of `size` bytes, mapping a failure mid-stream to a status (the CO then
/// resumes from the next offset it needs).
fn forward<T: MetadataMessage>(
    answer: Result<Response<tonic::Streaming<v1::ExtentPage>>, Status>,
    context: String,
    size: u64,
) -> Result<Response<MetadataStream<T>>, Status> {
    let mut pages = answer.map_err(|s| upstream(&context, s))?.into_inner();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let msg = match pages.message().await {
                Ok(Some(page)) => Ok(T::page(size, tuples(&page))),
                Ok(None) => return,
                Err(status) => Err(upstream(&context, status)),
            };
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataService {
    async fn get_metadata_allocated(
        &self,
        request: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<MetadataStream<GetMetadataAllocatedResponse>>, Status> {
        let req = request.into_inner();
        let sid = self.local("snapshot_id", &req.snapshot_id)?;
        let size = self.size_of("snapshot_id", &sid).await?;
        let (start, max) = range_args(req.starting_offset, req.max_results, size)?;
        tracing::info!(snapshot = %sid, start, max, "GetMetadataAllocated");
        let context = format!("allocated ranges of snapshot {sid}");
        let answer = self
            .data()
            .get_allocated(v1::GetAllocatedRequest {
                image: sid.image(),
                start_offset: start,
                max_extents: max,
            })
            .await;
        forward(answer, context, size)
    }

    async fn get_metadata_delta(
        &self,
        request: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<MetadataStream<GetMetadataDeltaResponse>>, Status> {
        let req = request.into_inner();
        let base = self.local("base_snapshot_id", &req.base_snapshot_id)?;
        let target = self.local("target_snapshot_id", &req.target_snapshot_id)?;
        if base.volume != target.volume {
            return Err(Status::failed_precondition(format!(
                "base_snapshot_id {base} and target_snapshot_id {target} are snapshots of \
                 different volumes ({:?} and {:?}); a delta needs two snapshots of one volume",
                base.volume, target.volume
            )));
        }
        self.size_of("base_snapshot_id", &base).await?;
        let size = self.size_of("target_snapshot_id", &target).await?;
        let (start, max) = range_args(req.starting_offset, req.max_results, size)?;
        tracing::info!(base = %base, target = %target, start, max, "GetMetadataDelta");
        let context = format!("changes from snapshot {base} to {target}");
        let answer = self
            .data()
            .get_delta(v1::GetDeltaRequest {
                base_snapshot: base.snapshot.clone(),
                target: Some(v1::get_delta_request::Target::TargetSnapshot(
                    target.snapshot.clone(),
                )),
                start_offset: start,
                max_extents: max,
            })
            .await;
        forward(answer, context, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_arguments_follow_the_spec() {
        assert_eq!(range_args(0, 0, 100).unwrap(), (0, DEFAULT_MAX_RESULTS));
        assert_eq!(range_args(100, 5, 100).unwrap(), (100, 5));
        assert_eq!(
            range_args(-1, 0, 100).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            range_args(101, 0, 100).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            range_args(0, -1, 100).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
