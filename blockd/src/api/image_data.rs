//! `blockd.v1.ImageDataService`: changed-block tracking (allocated extents, deltas between
//! snapshots) and plain streamed reads and writes of image data, the pieces backup tools
//! (`blockctl export-diff` / `import-diff`, csi-shim's SnapshotMetadata) are built from.
//!
//! Extent streams are computed page by page on the blocking pool (the engine takes its
//! state lock per window of chunks, see `engine::delta`); the first page is computed
//! before the stream is returned, so a missing image or unrelated snapshots are a status,
//! not an error in the middle of a stream. A client that goes away stops the work.
//!
//! Reads and writes here go through the same engine calls as NBD: they see and make the
//! same copy-on-write and zero tombstones. Writes are flushed (one group commit) before
//! `WriteImage` answers, so a successful reply means durable.

use blockd_proto::model::{ImageRef, SnapshotName, ValidationError, VolumeName};
use blockd_proto::v1;
use blockd_proto::v1::image_data_service_server::ImageDataService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::ApiContext;
use crate::engine::{DiffEnds, DiffTarget, Engine, ExtentPage};

/// Extents per page when the client leaves the choice to the server.
const DEFAULT_PAGE_EXTENTS: usize = 1024;
/// Most data bytes in one ReadImage message.
pub const READ_PIECE: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ImageDataApi {
    ctx: ApiContext,
}

impl ImageDataApi {
    pub fn new(ctx: ApiContext) -> Self {
        ImageDataApi { ctx }
    }
}

fn page_size(max: u32) -> usize {
    if max == 0 {
        DEFAULT_PAGE_EXTENTS
    } else {
        max as usize
    }
}

fn to_proto(page: &ExtentPage, ends: Option<&DiffEnds>) -> v1::ExtentPage {
    v1::ExtentPage {
        image_size_bytes: page.image_size,
        chunk_size_bytes: page.chunk_size,
        extents: page
            .extents
            .iter()
            .map(|x| v1::ImageExtent {
                offset: x.offset,
                length: x.len,
                zero: x.zero,
            })
            .collect(),
        ends: ends.map(|e| v1::DeltaEnds {
            base_volume: e.base_volume.clone(),
            base_size_bytes: e.base_size,
            base_epoch: e.base_epoch,
            base_created_unix: e.base_created_unix,
            target_volume: e.target_volume.clone(),
            target_size_bytes: e.target_size,
            target_epoch: e.target_epoch,
            target_created_unix: e.target_created_unix,
            base_id: e.base_id.clone(),
            base_volume_id: e.base_volume_id.clone(),
            target_id: e.target_id.clone(),
            target_volume_id: e.target_volume_id.clone(),
        }),
    }
}

/// What a delta request asks for, validated.
#[derive(Debug, Clone)]
enum Target {
    Snapshot(SnapshotName),
    Volume(VolumeName),
}

impl Target {
    fn as_diff(&self) -> DiffTarget<'_> {
        match self {
            Target::Snapshot(s) => DiffTarget::Snapshot(s.as_str()),
            Target::Volume(v) => DiffTarget::Volume(v.as_str()),
        }
    }
}

/// Streams the pages after `first`, computing each with `next(engine, offset)`.
fn stream_pages<F>(
    engine: Engine,
    first: v1::ExtentPage,
    mut next_offset: Option<u64>,
    next: F,
) -> ReceiverStream<Result<v1::ExtentPage, Status>>
where
    F: Fn(&Engine, u64) -> crate::engine::Result<ExtentPage> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        if tx.blocking_send(Ok(first)).is_err() {
            return;
        }
        while let Some(offset) = next_offset {
            let msg = match next(&engine, offset) {
                Ok(page) => {
                    next_offset = page.next_offset;
                    Ok(to_proto(&page, None))
                }
                Err(err) => {
                    next_offset = None;
                    Err(Status::from(err))
                }
            };
            if tx.blocking_send(msg).is_err() {
                // The client went away: stop computing.
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

type PageStream = ReceiverStream<Result<v1::ExtentPage, Status>>;
type ReadStream = ReceiverStream<Result<v1::ReadImageResponse, Status>>;

#[tonic::async_trait]
impl ImageDataService for ImageDataApi {
    type GetAllocatedStream = PageStream;
    type GetDeltaStream = PageStream;
    type ReadImageStream = ReadStream;

    async fn get_allocated(
        &self,
        request: Request<v1::GetAllocatedRequest>,
    ) -> Result<Response<PageStream>, Status> {
        let span = tracing::info_span!("get_allocated", image = %request.get_ref().image);
        let ctx = self.ctx.clone();
        self.ctx
            .rpc("GetAllocated", span, async move {
                let req = request.into_inner();
                let image = ImageRef::parse(&req.image)?.to_string();
                let max = page_size(req.max_extents);
                let start = req.start_offset;
                let name = image.clone();
                let page = ctx
                    .run(move |e| e.allocated_extents(&name, start, max))
                    .await?;
                let first = to_proto(&page, None);
                Ok(Response::new(stream_pages(
                    ctx.engine.clone(),
                    first,
                    page.next_offset,
                    move |e, off| e.allocated_extents(&image, off, max),
                )))
            })
            .await
    }

    async fn get_delta(
        &self,
        request: Request<v1::GetDeltaRequest>,
    ) -> Result<Response<PageStream>, Status> {
        let span = tracing::info_span!(
            "get_delta",
            snapshot = %request.get_ref().base_snapshot,
            target = ?request.get_ref().target
        );
        let ctx = self.ctx.clone();
        self.ctx
            .rpc("GetDelta", span, async move {
                let req = request.into_inner();
                let base = SnapshotName::parse("base_snapshot", req.base_snapshot)?;
                let target = match req.target {
                    Some(v1::get_delta_request::Target::TargetSnapshot(s)) => {
                        Target::Snapshot(SnapshotName::parse("target_snapshot", s)?)
                    }
                    Some(v1::get_delta_request::Target::TargetVolume(v)) => {
                        Target::Volume(VolumeName::parse("target_volume", v)?)
                    }
                    None => {
                        return Err(Status::invalid_argument(
                            "One of target_snapshot or target_volume is required",
                        ))
                    }
                };
                let max = page_size(req.max_extents);
                let start = req.start_offset;
                let (b, t) = (base.clone(), target.clone());
                let (page, ends) = ctx
                    .run(move |e| {
                        let ends = e.diff_ends(b.as_str(), t.as_diff())?;
                        let page = e.changed_extents(b.as_str(), t.as_diff(), start, max)?;
                        Ok((page, ends))
                    })
                    .await?;
                let first = to_proto(&page, Some(&ends));
                Ok(Response::new(stream_pages(
                    ctx.engine.clone(),
                    first,
                    page.next_offset,
                    move |e, off| e.changed_extents(base.as_str(), target.as_diff(), off, max),
                )))
            })
            .await
    }

    async fn read_image(
        &self,
        request: Request<v1::ReadImageRequest>,
    ) -> Result<Response<ReadStream>, Status> {
        let span = tracing::info_span!("read_image", image = %request.get_ref().image);
        let ctx = self.ctx.clone();
        self.ctx
            .rpc("ReadImage", span, async move {
                let req = request.into_inner();
                let image = ImageRef::parse(&req.image)?.to_string();
                let (offset, length) = (req.offset, req.length);
                let handle = ctx
                    .run(move |e| {
                        let h = e.open_image(&image)?;
                        let size = e.image_size(&h)?;
                        if offset.checked_add(length).is_none_or(|end| end > size) {
                            return Err(crate::engine::EngineError::OutOfRange {
                                image: image.clone(),
                                offset,
                                len: length,
                                size,
                            });
                        }
                        Ok(h)
                    })
                    .await?;
                let (tx, rx) = mpsc::channel(4);
                let engine = ctx.engine.clone();
                let span = tracing::Span::current();
                tokio::task::spawn_blocking(move || {
                    let _entered = span.enter();
                    let end = offset + length;
                    let mut at = offset;
                    while at < end {
                        let n = READ_PIECE.min(end - at);
                        let mut buf = vec![0u8; n as usize];
                        let msg = engine
                            .read(&handle, at, &mut buf)
                            .map(|()| v1::ReadImageResponse {
                                offset: at,
                                data: buf,
                            })
                            .map_err(Status::from);
                        let failed = msg.is_err();
                        if tx.blocking_send(msg).is_err() || failed {
                            return;
                        }
                        at += n;
                    }
                });
                Ok(Response::new(ReceiverStream::new(rx)))
            })
            .await
    }

    async fn write_image(
        &self,
        request: Request<Streaming<v1::WriteImageRequest>>,
    ) -> Result<Response<v1::WriteImageResponse>, Status> {
        let span = tracing::info_span!("write_image", volume = tracing::field::Empty);
        let ctx = self.ctx.clone();
        self.ctx
            .rpc("WriteImage", span, async move {
                let mut stream = request.into_inner();
                let mut handle = None;
                let mut volume = String::new();
                let (mut written, mut zeroed) = (0u64, 0u64);
                while let Some(msg) = stream.next().await {
                    let msg = msg?;
                    match &handle {
                        Some(_) => {
                            if !msg.volume.is_empty() && msg.volume != volume {
                                return Err(Status::invalid_argument(format!(
                                    "WriteImage stream for volume {volume:?} names another \
                                     volume {:?}",
                                    msg.volume
                                )));
                            }
                        }
                        None => {
                            let name = VolumeName::parse("volume", msg.volume.clone())?;
                            volume = name.as_str().to_string();
                            tracing::Span::current().record("volume", volume.as_str());
                            ctx.refuse_if_in_use(&volume, msg.force).await?;
                            let h = ctx.run(move |e| e.open_image(name.as_str())).await?;
                            handle = Some(h);
                        }
                    }
                    if !msg.data.is_empty() && msg.zero_length != 0 {
                        return Err(ValidationError::InvalidSize {
                            field: "zero_length",
                            reason: "a message carries either data or a zero range, not both",
                        }
                        .into());
                    }
                    let h = handle.clone().expect("opened by the first message");
                    let (offset, zero_len, data) = (msg.offset, msg.zero_length, msg.data);
                    if zero_len > 0 {
                        ctx.run(move |e| e.write_zeroes(&h, offset, zero_len))
                            .await?;
                        zeroed += zero_len;
                    } else if !data.is_empty() {
                        let n = data.len() as u64;
                        ctx.run(move |e| e.write(&h, offset, &data)).await?;
                        written += n;
                    }
                }
                if handle.is_none() {
                    return Err(Status::invalid_argument(
                        "WriteImage needs at least one message naming the volume",
                    ));
                }
                ctx.run(|e| e.flush()).await?;
                tracing::info!(
                    volume = %volume,
                    bytes_written = written,
                    bytes_zeroed = zeroed,
                    "wrote image data"
                );
                Ok(Response::new(v1::WriteImageResponse {
                    bytes_written: written,
                    bytes_zeroed: zeroed,
                }))
            })
            .await
    }

    async fn list_snapshot_epochs(
        &self,
        request: Request<v1::ListSnapshotEpochsRequest>,
    ) -> Result<Response<v1::ListSnapshotEpochsResponse>, Status> {
        let span = tracing::info_span!("list_snapshot_epochs", volume = %request.get_ref().volume);
        self.ctx
            .rpc("ListSnapshotEpochs", span, async {
                let name = VolumeName::parse("volume", request.into_inner().volume)?;
                let (snaps, head, size, volume_id) = self
                    .ctx
                    .run(move |e| e.snapshot_epochs(name.as_str()))
                    .await?;
                Ok(Response::new(v1::ListSnapshotEpochsResponse {
                    snapshots: snaps
                        .into_iter()
                        .map(|s| v1::SnapshotEpoch {
                            name: s.name,
                            id: s.id,
                            epoch: s.epoch,
                            size_bytes: s.size,
                            created_unix: s.created_unix,
                            replica_of: s.replica_of,
                        })
                        .collect(),
                    head_epoch: head,
                    size_bytes: size,
                    volume_id,
                }))
            })
            .await
    }
}
