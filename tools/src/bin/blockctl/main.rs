//! `blockctl`: the command-line client of blockd's `blockd.v1` gRPC API.
//!
//! One subcommand per API call ([`cli`]); objects shown as tables or JSON ([`render`]).
//! Invariants scripts rely on: with `-o json`, stdout holds exactly one JSON value;
//! progress bars and errors go to stderr; every failure exits non-zero after printing one
//! line, `error: <what went wrong>`.

mod backup;
mod cli;
mod diff_stream;
mod pv;
mod render;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use blockd_proto::size::format_size;
use blockd_proto::v1;
use blockd_proto::v1::daemon_service_client::DaemonServiceClient;
use blockd_proto::v1::export_service_client::ExportServiceClient;
use blockd_proto::v1::group_snapshot_service_client::GroupSnapshotServiceClient;
use blockd_proto::v1::pool_service_client::PoolServiceClient;
use blockd_proto::v1::snapshot_service_client::SnapshotServiceClient;
use blockd_proto::v1::volume_service_client::VolumeServiceClient;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tonic::transport::Channel;

use cli::{Cli, Command, Output, PoolCommand, SnapshotCommand, VolumeCommand};
use render::{
    ExportView, FsckView, GcView, GroupView, PoolView, SnapshotView, StatusView, VolumeView,
};

/// Page size used to walk list calls.
const PAGE_SIZE: u32 = 500;

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`blockctl volume list | head`) instead of reporting a broken pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse_from(backup::rewrite_export_diff_args(std::env::args_os())) {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap prints them; a usage error becomes one line (clap's
/// own text without its usage block) and exit code 2.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
        _ => {
            let rendered = err.render().to_string();
            let text: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", text.join(" "));
            ExitCode::from(2)
        }
    }
}

/// The error as one line: a gRPC status shows its message (the daemon's words, naming
/// the object and the cause); anything else shows its chain of causes.
fn one_line(err: &anyhow::Error) -> String {
    let text = match err.downcast_ref::<tonic::Status>() {
        Some(status) if status.message().is_empty() => {
            format!("the daemon answered {:?}", status.code())
        }
        Some(status) => match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal => {
                format!("{} ({:?})", status.message(), status.code())
            }
            _ => status.message().to_string(),
        },
        None => {
            // Wrapped errors often repeat their cause in their own text; say each once.
            let mut parts: Vec<String> = Vec::new();
            for cause in err.chain() {
                let text = cause.to_string();
                if !parts.iter().any(|p| p.contains(&text)) {
                    parts.push(text);
                }
            }
            parts.join(": ")
        }
    };
    text.replace('\n', " ")
}

/// Clients of every service, sharing one connection.
struct Api {
    pools: PoolServiceClient<Channel>,
    volumes: VolumeServiceClient<Channel>,
    snapshots: SnapshotServiceClient<Channel>,
    exports: ExportServiceClient<Channel>,
    daemon: DaemonServiceClient<Channel>,
    groups: GroupSnapshotServiceClient<Channel>,
    /// The shared connection, for the services used by one command only.
    channel: Channel,
}

impl Api {
    async fn connect(path: &Path) -> anyhow::Result<Api> {
        let channel = blockd_proto::connect_unix(path).await.with_context(|| {
            format!(
                "cannot connect to blockd at {} (is it running? set --api or BLOCKD_API)",
                path.display()
            )
        })?;
        Ok(Api {
            pools: PoolServiceClient::new(channel.clone()),
            volumes: VolumeServiceClient::new(channel.clone()),
            snapshots: SnapshotServiceClient::new(channel.clone()),
            exports: ExportServiceClient::new(channel.clone()),
            daemon: DaemonServiceClient::new(channel.clone()),
            groups: GroupSnapshotServiceClient::new(channel.clone()),
            channel,
        })
    }
}

/// Prints `value` as pretty JSON, or the table `table` builds, on stdout.
fn show<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce(&T) -> comfy_table::Table,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, value)?;
            writeln!(out)?;
        }
        Output::Table => writeln!(out, "{}", table(value))?,
    }
    Ok(())
}

/// Says on stderr (so `-o json` stays one value on stdout) when the daemon rounded the
/// size up to its size granule, and warns when a small size had no unit (most likely a
/// forgotten one: `--size 1000` meaning 1000 GiB).
fn note_size(size: cli::SizeArg, actual: u64) {
    let requested = size.bytes;
    if actual > requested {
        eprintln!(
            "note: size {requested} B rounded up to {} (sizes are whole multiples of the size granule)",
            format_size(actual)
        );
    }
    if let Some(warning) = size.unit_warning() {
        eprintln!("{warning}");
    }
}

/// Prints a one-line confirmation for people, or the object as JSON for scripts.
fn confirm<T: Serialize>(output: Output, value: &T, line: String) -> anyhow::Result<()> {
    match output {
        Output::Json => show(output, value, |_| comfy_table::Table::new()),
        Output::Table => {
            println!("{line}");
            Ok(())
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut api = Api::connect(&cli.api).await?;
    let out = cli.output;
    match cli.command {
        Command::Status => {
            let status = api.daemon.get_status(v1::GetStatusRequest {}).await?;
            let mut view = StatusView::from(status.into_inner());
            view.ublk_devices = api
                .exports
                .list_ublk(v1::ListUblkRequest {})
                .await?
                .into_inner()
                .devices
                .into_iter()
                .map(Into::into)
                .collect();
            show(out, &view, render::status_details)
        }
        Command::Pool(cmd) => pool(&mut api, out, cmd).await,
        Command::Volume(cmd) => volume(&mut api, out, cmd).await,
        Command::Snapshot(cmd) => snapshot(&mut api, out, cmd).await,
        Command::Export { image, tls } => {
            let resp = api
                .exports
                .export(v1::ExportRequest { image })
                .await?
                .into_inner();
            if tls && resp.tls_uri.is_empty() {
                // The export itself happened (it is idempotent and harmless); say why
                // there is no URI to print.
                bail!(
                    "blockd serves no NBD over TCP: start it with --nbd-listen ADDR:PORT and its --tls-* files to get an nbds:// URI"
                );
            }
            let view = ExportView {
                image: resp.image,
                uri: if tls { resp.tls_uri.clone() } else { resp.uri },
                read_only: resp.read_only,
                tls_uri: (!resp.tls_uri.is_empty()).then_some(resp.tls_uri),
            };
            let line = view.uri.clone();
            confirm(out, &view, line)
        }
        Command::Unexport { image, force } => {
            let resp = api
                .exports
                .unexport(v1::UnexportRequest {
                    image: image.clone(),
                    force,
                })
                .await?
                .into_inner();
            let line = if resp.changed {
                format!("unexported {image:?}")
            } else {
                format!("{image:?} was not exported")
            };
            confirm(
                out,
                &serde_json::json!({ "image": image, "changed": resp.changed }),
                line,
            )
        }
        Command::Attach { image, ublk: _ } => {
            let resp = api
                .exports
                .attach_ublk(v1::AttachUblkRequest { image })
                .await?
                .into_inner();
            let device = resp
                .device
                .ok_or_else(|| anyhow::anyhow!("blockd answered an attach without a device"))?;
            let view = render::UblkView::from(device);
            let line = view.device.clone();
            confirm(out, &view, line)
        }
        Command::Detach { image } => {
            let resp = api
                .exports
                .detach_ublk(v1::DetachUblkRequest {
                    image: image.clone(),
                })
                .await?
                .into_inner();
            let line = if resp.changed {
                format!("detached {image:?}")
            } else {
                format!("{image:?} was not attached")
            };
            confirm(
                out,
                &serde_json::json!({ "image": image, "changed": resp.changed }),
                line,
            )
        }
        Command::Exports => {
            let resp = api
                .exports
                .list_exports(v1::ListExportsRequest {})
                .await?
                .into_inner();
            let views: Vec<ExportView> = resp.exports.into_iter().map(Into::into).collect();
            show(out, &views, |v| render::exports_table(v))
        }
        Command::Fsck { repair } => fsck(&mut api, out, repair).await,
        Command::Gc => {
            let spinner = spinner("collecting garbage");
            let report = api.daemon.gc(v1::GcRequest {}).await;
            spinner.finish_and_clear();
            show(out, &GcView::from(report?.into_inner()), render::gc_details)
        }
        Command::ExportDiff(args) => backup::export_diff(&api.channel, args).await,
        Command::ImportDiff(args) => backup::import_diff(&api.channel, args).await,
    }
}

async fn pool(api: &mut Api, out: Output, cmd: PoolCommand) -> anyhow::Result<()> {
    match cmd {
        PoolCommand::List => {
            let mut pools = Vec::new();
            let mut page_token = String::new();
            loop {
                let resp = api
                    .pools
                    .list_pools(v1::ListPoolsRequest {
                        page_size: PAGE_SIZE,
                        page_token,
                    })
                    .await?
                    .into_inner();
                pools.extend(resp.pools.into_iter().map(PoolView::from));
                if resp.next_page_token.is_empty() {
                    break;
                }
                page_token = resp.next_page_token;
            }
            show(out, &pools, |p| render::pools_table(p))
        }
        PoolCommand::Show { name } => {
            let pool = api.pools.get_pool(v1::GetPoolRequest { name }).await?;
            show(
                out,
                &PoolView::from(pool.into_inner()),
                render::pool_details,
            )
        }
    }
}

async fn volume(api: &mut Api, out: Output, cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Pv(args) => pv::print(api, out, args).await,
        VolumeCommand::Create(args) => {
            let source = match (args.from_snapshot, args.from_volume) {
                (Some(s), _) => Some(v1::create_volume_request::Source::SourceSnapshot(s)),
                (None, Some(v)) => Some(v1::create_volume_request::Source::SourceVolume(v)),
                (None, None) => None,
            };
            let requested = args.size;
            let resp = api
                .volumes
                .create_volume(v1::CreateVolumeRequest {
                    name: args.name,
                    size_bytes: args.size.map(|s| s.bytes),
                    pool: args.pool.unwrap_or_default(),
                    source,
                    max_iops: args.qos.max_iops,
                    max_bandwidth_bytes: args.qos.max_bandwidth,
                    iops_per_gb: args.qos.iops_per_gb,
                })
                .await?
                .into_inner();
            let view = VolumeView::from(
                resp.volume
                    .ok_or_else(|| anyhow!("the daemon answered without the volume"))?,
            );
            if let Some(requested) = requested {
                note_size(requested, view.size_bytes);
            }
            let line = if resp.created {
                format!(
                    "created volume {:?}: {} in pool {}",
                    view.name,
                    format_size(view.size_bytes),
                    view.pool
                )
            } else {
                format!(
                    "volume {:?} already exists with the same parameters: {} in pool {}",
                    view.name,
                    format_size(view.size_bytes),
                    view.pool
                )
            };
            confirm(out, &view, line)
        }
        VolumeCommand::List => {
            let mut volumes = Vec::new();
            let mut page_token = String::new();
            loop {
                let resp = api
                    .volumes
                    .list_volumes(v1::ListVolumesRequest {
                        page_size: PAGE_SIZE,
                        page_token,
                    })
                    .await?
                    .into_inner();
                volumes.extend(resp.volumes.into_iter().map(VolumeView::from));
                if resp.next_page_token.is_empty() {
                    break;
                }
                page_token = resp.next_page_token;
            }
            show(out, &volumes, |v| render::volumes_table(v))
        }
        VolumeCommand::Show { name } => {
            let volume = api
                .volumes
                .get_volume(v1::GetVolumeRequest { name })
                .await?;
            show(
                out,
                &VolumeView::from(volume.into_inner()),
                render::volume_details,
            )
        }
        VolumeCommand::Delete { name, force } => {
            api.volumes
                .delete_volume(v1::DeleteVolumeRequest {
                    name: name.clone(),
                    force,
                })
                .await?;
            confirm(
                out,
                &serde_json::json!({ "name": name, "deleted": true }),
                format!("deleted volume {name:?}"),
            )
        }
        VolumeCommand::Resize { name, size, force } => {
            let volume = api
                .volumes
                .resize_volume(v1::ResizeVolumeRequest {
                    name,
                    size_bytes: size.bytes,
                    force,
                })
                .await?;
            let view = VolumeView::from(volume.into_inner());
            note_size(size, view.size_bytes);
            let line = format!(
                "resized volume {:?} to {}",
                view.name,
                format_size(view.size_bytes)
            );
            confirm(out, &view, line)
        }
        VolumeCommand::SetQos { name, qos } => {
            let volume = if qos.iops_per_gb == 0 {
                api.volumes
                    .set_volume_qos(v1::SetVolumeQosRequest {
                        name,
                        qos: Some(v1::Qos {
                            max_iops: qos.max_iops,
                            max_bandwidth_bytes: qos.max_bandwidth,
                        }),
                    })
                    .await?
            } else {
                api.volumes
                    .set_volume_qos_policy(v1::SetVolumeQosPolicyRequest {
                        name,
                        policy: Some(v1::QosPolicy {
                            max_iops: qos.max_iops,
                            iops_per_gb: qos.iops_per_gb,
                            max_bandwidth_bytes: qos.max_bandwidth,
                        }),
                    })
                    .await?
            };
            let view = VolumeView::from(volume.into_inner());
            let line = format!("set the QoS of volume {:?}", view.name);
            confirm(out, &view, line)
        }
        VolumeCommand::Flatten { name } => flatten(api, out, name).await,
        VolumeCommand::Allocated { image } => {
            backup::volume_allocated(&api.channel, out, image).await
        }
    }
}

async fn flatten(api: &mut Api, out: Output, name: String) -> anyhow::Result<()> {
    let mut stream = api
        .volumes
        .flatten_volume(v1::FlattenVolumeRequest { name: name.clone() })
        .await?
        .into_inner();
    let bar = ProgressBar::new(0).with_message(format!("flattening {name}"));
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} chunks ({eta})")
            .map_err(|e| anyhow!("bad progress template: {e}"))?
            .progress_chars("=> "),
    );
    let mut finished = None;
    let result = loop {
        match stream.message().await {
            Ok(Some(progress)) => {
                bar.set_length(progress.total);
                bar.set_position(progress.done);
                if progress.volume.is_some() {
                    finished = progress.volume;
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    bar.finish_and_clear();
    result?;
    let view = VolumeView::from(
        finished.ok_or_else(|| anyhow!("the flatten of volume {name:?} ended without a result"))?,
    );
    let line = format!(
        "flattened volume {:?}: it no longer depends on its source",
        view.name
    );
    confirm(out, &view, line)
}

async fn snapshot(api: &mut Api, out: Output, cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create { volume, name } => {
            let resp = api
                .snapshots
                .create_snapshot(v1::CreateSnapshotRequest {
                    volume,
                    name,
                    replica_of: String::new(),
                })
                .await?
                .into_inner();
            let view = SnapshotView::from(
                resp.snapshot
                    .ok_or_else(|| anyhow!("the daemon answered without the snapshot"))?,
            );
            let line = if resp.created {
                format!(
                    "created snapshot {:?} of volume {:?}",
                    view.name, view.volume
                )
            } else {
                format!(
                    "snapshot {:?} of volume {:?} already exists",
                    view.name, view.volume
                )
            };
            confirm(out, &view, line)
        }
        SnapshotCommand::List { volume } => {
            let mut snapshots = Vec::new();
            let mut page_token = String::new();
            loop {
                let resp = api
                    .snapshots
                    .list_snapshots(v1::ListSnapshotsRequest {
                        volume: volume.clone().unwrap_or_default(),
                        page_size: PAGE_SIZE,
                        page_token,
                    })
                    .await?
                    .into_inner();
                snapshots.extend(resp.snapshots.into_iter().map(SnapshotView::from));
                if resp.next_page_token.is_empty() {
                    break;
                }
                page_token = resp.next_page_token;
            }
            show(out, &snapshots, |s| render::snapshots_table(s))
        }
        SnapshotCommand::Show { name } => {
            let snap = api
                .snapshots
                .get_snapshot(v1::GetSnapshotRequest { name })
                .await?;
            show(
                out,
                &SnapshotView::from(snap.into_inner()),
                render::snapshot_details,
            )
        }
        SnapshotCommand::Delete { name } => {
            api.snapshots
                .delete_snapshot(v1::DeleteSnapshotRequest { name: name.clone() })
                .await?;
            confirm(
                out,
                &serde_json::json!({ "name": name, "deleted": true }),
                format!("deleted snapshot {name:?}"),
            )
        }
        SnapshotCommand::CreateGroup { group, volumes } => {
            let resp = api
                .groups
                .create_group_snapshot(v1::CreateGroupSnapshotRequest {
                    name: group,
                    volumes,
                })
                .await?
                .into_inner();
            let view = GroupView::from(
                resp.group
                    .ok_or_else(|| anyhow!("the daemon answered without the group"))?,
            );
            let members: Vec<&str> = view.snapshots.iter().map(|s| s.name.as_str()).collect();
            let line = if resp.created {
                format!(
                    "created group snapshot {:?}: {}",
                    view.name,
                    members.join(", ")
                )
            } else {
                format!(
                    "group snapshot {:?} already exists: {}",
                    view.name,
                    members.join(", ")
                )
            };
            confirm(out, &view, line)
        }
        SnapshotCommand::ListGroups => {
            let mut groups = Vec::new();
            let mut page_token = String::new();
            loop {
                let resp = api
                    .groups
                    .list_group_snapshots(v1::ListGroupSnapshotsRequest {
                        page_size: PAGE_SIZE,
                        page_token,
                    })
                    .await?
                    .into_inner();
                groups.extend(resp.groups.into_iter().map(GroupView::from));
                if resp.next_page_token.is_empty() {
                    break;
                }
                page_token = resp.next_page_token;
            }
            show(out, &groups, |g| render::groups_table(g))
        }
        SnapshotCommand::ShowGroup { group } => {
            let group = api
                .groups
                .get_group_snapshot(v1::GetGroupSnapshotRequest { name: group })
                .await?;
            show(out, &GroupView::from(group.into_inner()), |g| {
                render::groups_table(std::slice::from_ref(g))
            })
        }
        SnapshotCommand::DeleteGroup { group } => {
            api.groups
                .delete_group_snapshot(v1::DeleteGroupSnapshotRequest {
                    name: group.clone(),
                })
                .await?;
            confirm(
                out,
                &serde_json::json!({ "name": group, "deleted": true }),
                format!("deleted group snapshot {group:?} and its member snapshots"),
            )
        }
        SnapshotCommand::Diff { base, target } => {
            backup::snapshot_diff(&api.channel, out, base, target).await
        }
    }
}

async fn fsck(api: &mut Api, out: Output, repair: bool) -> anyhow::Result<()> {
    let spinner = spinner(if repair {
        "checking and repairing metadata"
    } else {
        "checking metadata"
    });
    let report = api.daemon.fsck(v1::FsckRequest { repair }).await;
    spinner.finish_and_clear();
    let view = FsckView::from(report?.into_inner());
    show(out, &view, render::fsck_details)?;
    if out == Output::Table {
        for problem in &view.problems {
            println!("problem: {problem}");
        }
    }
    if !view.clean {
        bail!(
            "metadata is inconsistent: {} double-owned, {} leaked, {} bad pointers, {} bad records",
            view.double_owned,
            view.leaked,
            view.bad_pointers,
            view.bad_records
        );
    }
    Ok(())
}

fn spinner(message: &'static str) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_message(message);
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}
