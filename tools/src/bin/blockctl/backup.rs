//! Changed-block tracking and backups on the command line: `snapshot diff`,
//! `volume allocated`, `export-diff` and `import-diff`.
//!
//! Data moves through `blockd.v1.ImageDataService` (`ReadImage` / `WriteImage` on the
//! same unix socket as every other call) rather than an NBD client: no export has to be
//! created and cleaned up, nothing else can connect in between, and the stream's records
//! map one to one onto the RPC's messages.
//!
//! `import-diff` never changes anything before the whole stream has been read and every
//! checksum verified (stdin is first spooled to an unlinked temporary file). It then
//! checks the base (the volume's newest snapshot must be the stream's base snapshot, by
//! stable id, or a replica of it that an earlier import took; and the volume must hold no
//! changes since that snapshot other than a previous, interrupted apply of this same
//! stream), applies the records, and snapshots the volume, recording that the snapshot
//! is a replica of the stream's target so that the next incremental applies on top.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use blockd_proto::size::format_size;
use blockd_proto::v1;
use blockd_proto::v1::image_data_service_client::ImageDataServiceClient;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, Table};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tonic::transport::Channel;

use crate::cli::{ExportDiffArgs, ImportDiffArgs, Output};
use crate::diff_stream::{self, Header, Identity, Reader, Record, Writer};

/// Extents asked per page.
const PAGE_EXTENTS: u32 = 4096;
/// Most bytes read per ReadImage call (the daemon streams them in 1 MiB pieces).
const READ_SPAN: u64 = 64 * 1024 * 1024;

/// Makes `blockctl export-diff ... -o FILE` mean `--file FILE`: `-o` is the global output
/// format everywhere else, and a stream has no table to show.
pub fn rewrite_export_diff_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    // The subcommand is the first argument that is neither a global option nor its value.
    let mut at = None;
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--api" || a == "-o" || a == "--output" {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            if a == "export-diff" {
                at = Some(i);
            }
            break;
        }
    }
    let Some(at) = at else {
        return args;
    };
    for a in args.iter_mut().skip(at + 1) {
        if a == "-o" || a == "--output" {
            *a = "--file".into();
        } else if let Some(s) = a.to_str() {
            if let Some(rest) = s.strip_prefix("--output=") {
                *a = format!("--file={rest}").into();
            } else if let Some(rest) = s.strip_prefix("-o").filter(|r| !r.is_empty()) {
                *a = format!("--file={}", rest.strip_prefix('=').unwrap_or(rest)).into();
            }
        }
    }
    args
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ExtentView {
    pub offset: u64,
    pub length: u64,
    pub zero: bool,
}

#[derive(Debug, Serialize)]
pub struct ExtentsView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    pub image: String,
    pub image_size_bytes: u64,
    pub chunk_size_bytes: u64,
    pub extents: Vec<ExtentView>,
    pub extent_count: u64,
    pub total_bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

impl ExtentsView {
    fn new(base: Option<String>, image: String, size: u64, chunk: u64, x: Vec<ExtentView>) -> Self {
        let data_bytes = x.iter().filter(|e| !e.zero).map(|e| e.length).sum();
        let zero_bytes = x.iter().filter(|e| e.zero).map(|e| e.length).sum();
        ExtentsView {
            base,
            image,
            image_size_bytes: size,
            chunk_size_bytes: chunk,
            extent_count: x.len() as u64,
            extents: x,
            total_bytes: data_bytes + zero_bytes,
            data_bytes,
            zero_bytes,
        }
    }

    fn print(&self, out: Output) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        match out {
            Output::Json => {
                serde_json::to_writer_pretty(&mut stdout, self)?;
                writeln!(stdout)?;
            }
            Output::Table => {
                let mut t = Table::new();
                t.load_preset(UTF8_FULL_CONDENSED);
                t.set_header(vec!["OFFSET", "LENGTH", "END", "KIND"]);
                for x in &self.extents {
                    t.add_row(vec![
                        Cell::new(format!("{} ({})", x.offset, format_size(x.offset)))
                            .set_alignment(CellAlignment::Right),
                        Cell::new(format_size(x.length)).set_alignment(CellAlignment::Right),
                        Cell::new(x.offset + x.length).set_alignment(CellAlignment::Right),
                        Cell::new(if x.zero { "zero" } else { "data" }),
                    ]);
                }
                if !self.extents.is_empty() {
                    writeln!(stdout, "{t}")?;
                }
                let pct = if self.image_size_bytes == 0 {
                    0.0
                } else {
                    100.0 * self.total_bytes as f64 / self.image_size_bytes as f64
                };
                let what = match &self.base {
                    Some(b) => format!("changed from {b:?} to {:?}", self.image),
                    None => format!("allocated in {:?}", self.image),
                };
                writeln!(
                    stdout,
                    "{} extent(s), {} {what} ({pct:.2}% of {}; {} data, {} zeroed; chunk {})",
                    self.extent_count,
                    format_size(self.total_bytes),
                    format_size(self.image_size_bytes),
                    format_size(self.data_bytes),
                    format_size(self.zero_bytes),
                    format_size(self.chunk_size_bytes),
                )?;
            }
        }
        Ok(())
    }
}

/// Every page of an extent stream, flattened; the first page's header facts.
async fn collect(
    mut stream: tonic::Streaming<v1::ExtentPage>,
) -> anyhow::Result<(Vec<ExtentView>, u64, u64, Option<v1::DeltaEnds>)> {
    let mut out = Vec::new();
    let (mut size, mut chunk, mut ends) = (0, 0, None);
    while let Some(page) = stream.message().await? {
        if ends.is_none() && page.ends.is_some() {
            ends = page.ends;
        }
        size = page.image_size_bytes;
        chunk = page.chunk_size_bytes;
        out.extend(page.extents.into_iter().map(|x| ExtentView {
            offset: x.offset,
            length: x.length,
            zero: x.zero,
        }));
    }
    Ok((out, size, chunk, ends))
}

fn delta_request(base: &str, target: DiffEnd, start: u64) -> v1::GetDeltaRequest {
    v1::GetDeltaRequest {
        base_snapshot: base.to_string(),
        target: Some(match target {
            DiffEnd::Snapshot(s) => v1::get_delta_request::Target::TargetSnapshot(s),
            DiffEnd::Volume(v) => v1::get_delta_request::Target::TargetVolume(v),
        }),
        start_offset: start,
        max_extents: PAGE_EXTENTS,
    }
}

#[derive(Debug, Clone)]
enum DiffEnd {
    Snapshot(String),
    Volume(String),
}

/// `VOL@SNAP` or `SNAP` names a snapshot (checked to belong to VOL); otherwise a
/// snapshot of that name if one exists, else the live volume of that name.
async fn resolve_target(channel: &Channel, target: &str) -> anyhow::Result<DiffEnd> {
    use blockd_proto::v1::snapshot_service_client::SnapshotServiceClient;
    let mut snaps = SnapshotServiceClient::new(channel.clone());
    if let Some((vol, snap)) = target.split_once('@') {
        let s = snaps
            .get_snapshot(v1::GetSnapshotRequest { name: snap.into() })
            .await?
            .into_inner();
        if s.volume != vol {
            bail!(
                "snapshot {snap:?} belongs to volume {:?}, not {vol:?}",
                s.volume
            );
        }
        return Ok(DiffEnd::Snapshot(snap.into()));
    }
    match snaps
        .get_snapshot(v1::GetSnapshotRequest {
            name: target.into(),
        })
        .await
    {
        Ok(_) => Ok(DiffEnd::Snapshot(target.into())),
        Err(s) if s.code() == tonic::Code::NotFound || s.code() == tonic::Code::InvalidArgument => {
            Ok(DiffEnd::Volume(target.into()))
        }
        Err(s) => Err(s.into()),
    }
}

pub async fn snapshot_diff(
    channel: &Channel,
    out: Output,
    base: String,
    target: String,
) -> anyhow::Result<()> {
    let end = resolve_target(channel, &target).await?;
    let mut data = ImageDataServiceClient::new(channel.clone());
    let stream = data
        .get_delta(delta_request(&base, end, 0))
        .await?
        .into_inner();
    let (extents, size, chunk, _) = collect(stream).await?;
    ExtentsView::new(Some(base), target, size, chunk, extents).print(out)
}

pub async fn volume_allocated(channel: &Channel, out: Output, image: String) -> anyhow::Result<()> {
    let mut data = ImageDataServiceClient::new(channel.clone());
    let stream = data
        .get_allocated(v1::GetAllocatedRequest {
            image: image.clone(),
            start_offset: 0,
            max_extents: PAGE_EXTENTS,
        })
        .await?
        .into_inner();
    let (extents, size, chunk, _) = collect(stream).await?;
    ExtentsView::new(None, image, size, chunk, extents).print(out)
}

/// blockd's answer, `None` when it is NOT_FOUND; any other failure as it is.
fn unless_not_found<T>(
    answer: Result<tonic::Response<T>, tonic::Status>,
) -> Result<Option<T>, tonic::Status> {
    match answer {
        Ok(reply) => Ok(Some(reply.into_inner())),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

fn bytes_bar(len: u64, message: String) -> anyhow::Result<ProgressBar> {
    // indicatif draws on stderr and hides itself when stderr is not a terminal.
    let bar = ProgressBar::new(len).with_message(message);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta})",
        )
        .map_err(|e| anyhow!("bad progress template: {e}"))?
        .progress_chars("=> "),
    );
    Ok(bar)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where export-diff writes: stdout or a device or pipe, written directly, or a regular file
/// written as a temporary file renamed into place at the end (a failed export never leaves a
/// plausible-looking half stream behind).
enum Sink {
    Direct(BufWriter<Box<dyn Write>>),
    File {
        tmp: BufWriter<File>,
        tmp_path: std::path::PathBuf,
        path: std::path::PathBuf,
    },
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Direct(w) => w.write(buf),
            Sink::File { tmp, .. } => tmp.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Direct(w) => w.flush(),
            Sink::File { tmp, .. } => tmp.flush(),
        }
    }
}

pub async fn export_diff(channel: &Channel, args: ExportDiffArgs) -> anyhow::Result<()> {
    let (volume, snap) = args.image.split_once('@').ok_or_else(|| {
        anyhow!(
            "export-diff exports a snapshot: give VOLUME@SNAP, not {:?}",
            args.image
        )
    })?;
    let (volume, snap) = (volume.to_string(), snap.to_string());
    if let DiffEnd::Volume(_) = resolve_target(channel, &args.image).await? {
        bail!("{:?} is not a snapshot", args.image);
    }
    let mut data = ImageDataServiceClient::new(channel.clone());
    // The snapshot's place in its volume; a snapshot whose volume was deleted is still
    // exported (its epoch is then known only from a delta's ends, 0 in a full stream).
    let answer = data
        .list_snapshot_epochs(v1::ListSnapshotEpochsRequest {
            volume: volume.clone(),
        })
        .await;
    let listed = unless_not_found(answer)
        .with_context(|| format!("listing the snapshots of volume {volume:?}"))?;
    let found = listed.as_ref().and_then(|e| {
        e.snapshots
            .iter()
            .find(|s| s.name == snap)
            .map(|s| (s.clone(), e.volume_id.clone()))
    });
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let mut target = match found {
        Some((s, volume_id)) => Identity {
            volume: volume.clone(),
            snapshot: snap.clone(),
            size_bytes: s.size_bytes,
            created_unix: s.created_unix,
            epoch: s.epoch,
            uuid: non_empty(&s.id),
            volume_uuid: non_empty(&volume_id),
        },
        None => {
            use blockd_proto::v1::snapshot_service_client::SnapshotServiceClient;
            let s = SnapshotServiceClient::new(channel.clone())
                .get_snapshot(v1::GetSnapshotRequest { name: snap.clone() })
                .await?
                .into_inner();
            Identity {
                volume: volume.clone(),
                snapshot: snap.clone(),
                size_bytes: s.size_bytes,
                created_unix: s.created_unix,
                epoch: 0,
                uuid: non_empty(&s.id),
                volume_uuid: non_empty(&s.volume_id),
            }
        }
    };
    let (extents, size, chunk, base) = match &args.from {
        Some(base) => {
            let stream = data
                .get_delta(delta_request(base, DiffEnd::Snapshot(snap.clone()), 0))
                .await?
                .into_inner();
            let (x, size, chunk, ends) = collect(stream).await?;
            let ends = ends.ok_or_else(|| anyhow!("the daemon sent a delta without its ends"))?;
            target.epoch = ends.target_epoch;
            let base_id = Identity {
                volume: ends.base_volume,
                snapshot: base.clone(),
                size_bytes: ends.base_size_bytes,
                created_unix: ends.base_created_unix,
                epoch: ends.base_epoch,
                uuid: non_empty(&ends.base_id),
                volume_uuid: non_empty(&ends.base_volume_id),
            };
            (x, size, chunk, Some(base_id))
        }
        None => {
            let stream = data
                .get_allocated(v1::GetAllocatedRequest {
                    image: args.image.clone(),
                    start_offset: 0,
                    max_extents: PAGE_EXTENTS,
                })
                .await?
                .into_inner();
            let (x, size, chunk, _) = collect(stream).await?;
            (x, size, chunk, None)
        }
    };
    let header = Header {
        format: "blockd-diff".into(),
        version: diff_stream::VERSION,
        chunk_size: chunk,
        target_size: size,
        base,
        target,
        created_unix: now_unix(),
        tool: format!("blockctl {}", env!("CARGO_PKG_VERSION")),
    };
    let special = std::fs::metadata(&args.file).is_ok_and(|m| !m.is_file() && !m.is_dir());
    let sink = if args.file == Path::new("-") {
        Sink::Direct(BufWriter::with_capacity(
            1 << 20,
            Box::new(std::io::stdout()),
        ))
    } else if special {
        // A device or a pipe (/dev/null, a FIFO): never renamed over.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?;
        Sink::Direct(BufWriter::with_capacity(1 << 20, Box::new(f)))
    } else {
        let name = args
            .file
            .file_name()
            .ok_or_else(|| anyhow!("{} is not a file name", args.file.display()))?;
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.partial", std::process::id()));
        let tmp_path = args.file.with_file_name(tmp_name);
        let f = File::create(&tmp_path)
            .with_context(|| format!("cannot create {}", tmp_path.display()))?;
        Sink::File {
            tmp: BufWriter::with_capacity(1 << 20, f),
            tmp_path,
            path: args.file.clone(),
        }
    };
    let total: u64 = extents.iter().filter(|x| !x.zero).map(|x| x.length).sum();
    let bar = bytes_bar(total, format!("exporting {}", args.image))?;
    let result = write_stream(&mut data, &args.image, &header, &extents, sink, &bar).await;
    bar.finish_and_clear();
    let (sink, totals) = match result {
        Ok(v) => v,
        Err((err, tmp)) => {
            if let Some(tmp) = tmp {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(err);
        }
    };
    if let Sink::File {
        tmp,
        tmp_path,
        path,
    } = sink
    {
        let f = tmp.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp_path, &path).with_context(|| {
            format!("cannot rename {} to {}", tmp_path.display(), path.display())
        })?;
    }
    eprintln!(
        "exported {} ({}): {} record(s), {} data, {} zeroed, image {}",
        args.image,
        match &args.from {
            Some(b) => format!("changes since {b:?}"),
            None => "full".into(),
        },
        totals.records,
        format_size(totals.data_bytes),
        format_size(totals.zero_bytes),
        format_size(size)
    );
    Ok(())
}

type ExportResult =
    Result<(Sink, diff_stream::Totals), (anyhow::Error, Option<std::path::PathBuf>)>;

async fn write_stream(
    data: &mut ImageDataServiceClient<Channel>,
    image: &str,
    header: &Header,
    extents: &[ExtentView],
    sink: Sink,
    bar: &ProgressBar,
) -> ExportResult {
    let tmp = match &sink {
        Sink::File { tmp_path, .. } => Some(tmp_path.clone()),
        Sink::Direct(_) => None,
    };
    let fail = |e: anyhow::Error| (e, tmp.clone());
    let mut w = Writer::new(sink, header).map_err(fail)?;
    for x in extents {
        if x.zero {
            w.zero(x.offset, x.length).map_err(fail)?;
            continue;
        }
        let mut at = x.offset;
        let end = x.offset + x.length;
        while at < end {
            let n = READ_SPAN.min(end - at);
            let mut stream = data
                .read_image(v1::ReadImageRequest {
                    image: image.to_string(),
                    offset: at,
                    length: n,
                })
                .await
                .map_err(|e| fail(e.into()))?
                .into_inner();
            let mut expect = at;
            while let Some(piece) = stream.message().await.map_err(|e| fail(e.into()))? {
                if piece.offset != expect || piece.data.is_empty() {
                    return Err(fail(anyhow!(
                        "the daemon sent data for offset {} where {expect} was expected",
                        piece.offset
                    )));
                }
                w.data(piece.offset, &piece.data).map_err(fail)?;
                expect += piece.data.len() as u64;
                bar.inc(piece.data.len() as u64);
            }
            if expect != at + n {
                return Err(fail(anyhow!(
                    "the daemon's read of {image} ended at {expect}, short of {}",
                    at + n
                )));
            }
            at += n;
        }
    }
    w.finish().map_err(fail)
}

/// Reads and verifies a whole stream; returns its header and record ranges.
fn verify(input: &mut File, bar: &ProgressBar) -> anyhow::Result<(Header, Vec<(u64, u64)>)> {
    input.seek(SeekFrom::Start(0))?;
    let mut reader = Reader::new(BufReader::with_capacity(1 << 20, &mut *input))?;
    let mut ranges = Vec::new();
    while let Some(rec) = reader.next_record()? {
        ranges.push(rec.range());
        bar.set_position(reader.position);
    }
    Ok((reader.header.clone(), ranges))
}

/// The input as a seekable file: the named file, or stdin spooled to an unlinked
/// temporary file (so it can be verified completely before anything is applied).
fn open_input(path: &Path) -> anyhow::Result<File> {
    if path == Path::new("-") {
        let mut tmp =
            tempfile::tempfile().context("cannot create a temporary file to spool stdin")?;
        std::io::copy(&mut std::io::stdin().lock(), &mut tmp).context("reading stdin")?;
        Ok(tmp)
    } else {
        File::open(path).with_context(|| format!("cannot open {}", path.display()))
    }
}

pub async fn import_diff(channel: &Channel, args: ImportDiffArgs) -> anyhow::Result<()> {
    use blockd_proto::v1::snapshot_service_client::SnapshotServiceClient;
    use blockd_proto::v1::volume_service_client::VolumeServiceClient;
    let mut input = open_input(&args.file)?;
    let len = input.metadata()?.len();
    let bar = bytes_bar(len, "verifying stream".into())?;
    let verified = verify(&mut input, &bar);
    bar.finish_and_clear();
    let (header, ranges) = verified.with_context(|| {
        format!(
            "refusing to import {}: nothing was changed",
            args.file.display()
        )
    })?;
    let volume = args.volume.clone();
    let snap_name = args
        .snapshot
        .clone()
        .unwrap_or_else(|| header.target.snapshot.clone());
    let mut data = ImageDataServiceClient::new(channel.clone());
    let mut volumes = VolumeServiceClient::new(channel.clone());
    let mut snaps = SnapshotServiceClient::new(channel.clone());

    let answer = snaps
        .get_snapshot(v1::GetSnapshotRequest {
            name: snap_name.clone(),
        })
        .await;
    if let Some(s) = unless_not_found(answer)? {
        bail!(
            "snapshot {snap_name:?} already exists (of volume {:?}); nothing was changed (choose another name with --snapshot)",
            s.volume
        );
    }
    let answer = volumes
        .get_volume(v1::GetVolumeRequest {
            name: volume.clone(),
        })
        .await;
    let existing = unless_not_found(answer)?;
    match (&header.base, &existing) {
        (None, Some(_)) => bail!(
            "volume {volume:?} already exists: a full stream (of {}@{}) only creates a new volume; nothing was changed",
            header.target.volume,
            header.target.snapshot
        ),
        (Some(base), None) => bail!(
            "volume {volume:?} does not exist: the stream is incremental from snapshot {:?} (of {:?}); import the full stream first",
            base.snapshot,
            base.volume
        ),
        (Some(base), Some(vol)) => {
            check_not_in_use(&mut data, &volume, args.force).await?;
            let epochs = data
                .list_snapshot_epochs(v1::ListSnapshotEpochsRequest {
                    volume: volume.clone(),
                })
                .await?
                .into_inner();
            let Some(newest) = epochs.snapshots.last() else {
                bail!(
                    "volume {volume:?} has no snapshot, but the stream applies on top of snapshot {:?} of {:?}; nothing was changed",
                    base.snapshot,
                    base.volume
                );
            };
            // The stream names its base by stable id: the newest snapshot here must be
            // that very snapshot (importing back into its own volume) or a replica of it
            // (taken by an earlier import). A snapshot that merely has the same name and
            // size may hold other data: applying a delta on top of it would silently
            // make a volume that matches no snapshot anywhere. Streams without ids (from
            // a blockd before ids) can only be matched by name and size.
            let same_size = newest.size_bytes == base.size_bytes;
            let same = match &base.uuid {
                Some(id) => same_size && (newest.id == *id || newest.replica_of == *id),
                None => same_size && newest.name == base.snapshot,
            };
            if !same {
                let id_of = |id: &str| if id.is_empty() { String::new() } else { format!(", id {id}") };
                bail!(
                    "volume {volume:?}'s newest snapshot is {:?} ({}{}{}), but the stream applies on top of snapshot {:?} ({}{}) of {:?}; nothing was changed",
                    newest.name,
                    format_size(newest.size_bytes),
                    id_of(&newest.id),
                    if newest.replica_of.is_empty() {
                        String::new()
                    } else {
                        format!(", a replica of {}", newest.replica_of)
                    },
                    base.snapshot,
                    format_size(base.size_bytes),
                    id_of(base.uuid.as_deref().unwrap_or("")),
                    base.volume
                );
            }
            // Changes since the base must come from an interrupted apply of this stream.
            let stream = data
                .get_delta(delta_request(&newest.name, DiffEnd::Volume(volume.clone()), 0))
                .await?
                .into_inner();
            let (local, _, chunk, _) = collect(stream).await?;
            for x in &local {
                let inside = x.offset >= header.target_size
                    || covered(&ranges, x.offset, x.length, chunk.max(1));
                if !inside {
                    bail!(
                        "volume {volume:?} was written since its snapshot {:?} (at offset {}, {}); applying the stream would mix its data with those writes; nothing was changed",
                        newest.name,
                        x.offset,
                        format_size(x.length)
                    );
                }
            }
            if vol.size_bytes != header.target_size {
                volumes
                    .resize_volume(v1::ResizeVolumeRequest {
                        name: volume.clone(),
                        size_bytes: header.target_size,
                        force: header.target_size < vol.size_bytes,
                    })
                    .await?;
            }
        }
        (None, None) => {
            volumes
                .create_volume(v1::CreateVolumeRequest {
                    name: volume.clone(),
                    size_bytes: Some(header.target_size),
                    pool: String::new(),
                    source: None,
                    max_iops: 0,
                    max_bandwidth_bytes: 0,
                    iops_per_gb: 0,
                })
                .await?;
        }
    }

    // Apply: a second pass over the verified file, checking every CRC again.
    input.seek(SeekFrom::Start(0))?;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let bar = bytes_bar(total, format!("applying to {volume}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::WriteImageRequest>(4);
    let reader_volume = volume.clone();
    let reader_bar = bar.clone();
    let force = args.force;
    let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut reader = Reader::new(BufReader::with_capacity(1 << 20, input))?;
        let mut first = true;
        while let Some(rec) = reader.next_record()? {
            let vol = if first {
                reader_volume.clone()
            } else {
                String::new()
            };
            first = false;
            let msg = match rec {
                Record::Data { offset, data } => {
                    reader_bar.inc(data.len() as u64);
                    v1::WriteImageRequest {
                        volume: vol,
                        offset,
                        data,
                        zero_length: 0,
                        force,
                    }
                }
                Record::Zero { offset, len } => {
                    reader_bar.inc(len);
                    v1::WriteImageRequest {
                        volume: vol,
                        offset,
                        data: Vec::new(),
                        zero_length: len,
                        force,
                    }
                }
            };
            if tx.blocking_send(msg).is_err() {
                bail!("the daemon stopped taking data");
            }
        }
        if first {
            // No record at all: still name the volume so the write is a no-op flush.
            let _ = tx.blocking_send(v1::WriteImageRequest {
                volume: reader_volume,
                offset: 0,
                data: Vec::new(),
                zero_length: 0,
                force,
            });
        }
        Ok(())
    });
    let written = data
        .write_image(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let produced = producer
        .await
        .map_err(|e| anyhow!("the stream reader failed: {e}"))?;
    bar.finish_and_clear();
    // The daemon's refusal says more than the reader's "stopped taking data".
    let written = written?.into_inner();
    produced.context(
        "the stream changed while it was applied; the volume holds part of it and its newest \
         snapshot is still the base (re-run the import)",
    )?;
    snaps
        .create_snapshot(v1::CreateSnapshotRequest {
            volume: volume.clone(),
            name: snap_name.clone(),
            // The next incremental stream names this target as its base, by id.
            replica_of: header.target.uuid.clone().unwrap_or_default(),
        })
        .await?;
    eprintln!(
        "imported {}@{} into {volume:?}{}: {} written, {} zeroed; snapshot {snap_name:?} taken",
        header.target.volume,
        header.target.snapshot,
        match &header.base {
            Some(b) => format!(" (on top of {:?})", b.snapshot),
            None => " (full)".into(),
        },
        format_size(written.bytes_written),
        format_size(written.bytes_zeroed),
    );
    Ok(())
}

/// Asks the daemon whether `volume` may be written now, before anything is changed: an
/// empty WriteImage stream writes nothing, and the daemon refuses it, as it would the
/// real one, while the volume is in use (a ublk device, connected NBD clients).
async fn check_not_in_use(
    data: &mut ImageDataServiceClient<Channel>,
    volume: &str,
    force: bool,
) -> anyhow::Result<()> {
    let probe = v1::WriteImageRequest {
        volume: volume.to_string(),
        offset: 0,
        data: Vec::new(),
        zero_length: 0,
        force,
    };
    data.write_image(tokio_stream::iter([probe]))
        .await
        .map_err(|status| {
            anyhow!(
                "{}; nothing was changed (--force applies the stream anyway)",
                status.message()
            )
        })?;
    Ok(())
}

/// Whether `[offset, offset+len)` (chunk-granular) overlaps the records' ranges in
/// every chunk it spans.
fn covered(ranges: &[(u64, u64)], offset: u64, len: u64, chunk: u64) -> bool {
    let mut c = offset / chunk;
    let end = (offset + len).div_ceil(chunk);
    while c < end {
        let (lo, hi) = (c * chunk, (c + 1) * chunk);
        // Ranges ascend: find the first one ending after lo.
        let i = ranges.partition_point(|r| r.0 + r.1 <= lo);
        if ranges.get(i).is_none_or(|r| r.0 >= hi) {
            return false;
        }
        c += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dash_o_means_file_for_export_diff_only() {
        let args = |s: &str| s.split_whitespace().map(OsString::from).collect::<Vec<_>>();
        // (command line, what it is rewritten to)
        for (given, rewritten) in [
            (
                "blockctl export-diff v@s -o out.bdiff",
                "blockctl export-diff v@s --file out.bdiff",
            ),
            (
                "blockctl export-diff v@s -o-",
                "blockctl export-diff v@s --file=-",
            ),
            (
                "blockctl volume list -o json",
                "blockctl volume list -o json",
            ),
            // A volume named export-diff is not the subcommand.
            (
                "blockctl -o json volume show export-diff -o json",
                "blockctl -o json volume show export-diff -o json",
            ),
            (
                "blockctl --api /s export-diff v@s -o f",
                "blockctl --api /s export-diff v@s --file f",
            ),
        ] {
            assert_eq!(
                rewrite_export_diff_args(args(given)),
                args(rewritten),
                "{given}"
            );
        }
    }

    #[test]
    fn coverage_is_checked_per_chunk() {
        let ranges = [(0, 10), (8192, 100)];
        assert!(covered(&ranges, 0, 4096, 4096));
        assert!(covered(&ranges, 8192, 4096, 4096));
        assert!(!covered(&ranges, 0, 8192, 4096));
        assert!(!covered(&ranges, 12288, 4096, 4096));
    }
}
