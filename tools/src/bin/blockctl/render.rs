//! How `blockctl` shows API objects: JSON views (stable field names, sizes in bytes) for
//! scripts and comfy-table tables (sizes in binary units) for people.
//!
//! The JSON views are separate from the generated messages on purpose: the field names
//! that scripts read (see the CLI contract) must not change when the proto evolves.

use blockd_proto::size::format_size;
use blockd_proto::v1;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct PoolView {
    pub name: String,
    pub path: String,
    pub uuid: String,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub free_bytes: u64,
    pub provisioned_bytes: u64,
    pub overprovisioning_ratio: f64,
    /// The limit on `overprovisioning_ratio`; null when unlimited.
    pub max_overprovisioning_ratio: Option<f64>,
    pub chunk_size_bytes: u64,
    pub io_engine: String,
    pub volume_count: u64,
    pub snapshot_count: u64,
    pub health: String,
    pub is_default: bool,
}

impl From<v1::Pool> for PoolView {
    fn from(p: v1::Pool) -> Self {
        PoolView {
            name: p.name,
            path: p.path,
            uuid: p.uuid,
            capacity_bytes: p.capacity_bytes,
            allocated_bytes: p.allocated_bytes,
            free_bytes: p.free_bytes,
            provisioned_bytes: p.provisioned_bytes,
            overprovisioning_ratio: p.overprovisioning_ratio,
            max_overprovisioning_ratio: (p.max_overprovisioning_ratio > 0.0)
                .then_some(p.max_overprovisioning_ratio),
            chunk_size_bytes: p.chunk_size_bytes,
            io_engine: p.io_engine,
            volume_count: p.volume_count,
            snapshot_count: p.snapshot_count,
            health: p.health,
            is_default: p.is_default,
        }
    }
}

impl PoolView {
    /// "0.52 / 20" (current ratio / limit), or "0.52 / none".
    fn ratio_text(&self) -> String {
        match self.max_overprovisioning_ratio {
            Some(max) => format!("{:.2} / {max}", self.overprovisioning_ratio),
            None => format!("{:.2} / none", self.overprovisioning_ratio),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VolumeView {
    pub name: String,
    /// The volume's stable id.
    pub id: String,
    pub pool: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub max_iops: u64,
    pub max_bandwidth_bytes: u64,
    /// IOPS per GiB of size (0: none); `max_iops` is then the limit at the current size.
    pub iops_per_gb: u64,
    pub source_snapshot: Option<String>,
    pub source_volume: Option<String>,
    /// The id of the source snapshot or volume.
    pub source_id: Option<String>,
    /// True when that source is gone (even if its name now belongs to another object).
    pub source_deleted: bool,
    pub has_parent: bool,
    pub snapshot_count: u64,
    pub created_unix: u64,
    pub exported: bool,
    /// The ublk device it is attached as (`/dev/ublkbN`), if any.
    pub ublk_device: Option<String>,
}

impl From<v1::Volume> for VolumeView {
    fn from(v: v1::Volume) -> Self {
        let (source_snapshot, source_volume) = match v.source {
            Some(v1::volume::Source::SourceSnapshot(s)) => (Some(s), None),
            Some(v1::volume::Source::SourceVolume(s)) => (None, Some(s)),
            None => (None, None),
        };
        let qos = v.qos.unwrap_or_default();
        VolumeView {
            name: v.name,
            id: v.id,
            pool: v.pool,
            size_bytes: v.size_bytes,
            allocated_bytes: v.allocated_bytes,
            max_iops: qos.max_iops,
            max_bandwidth_bytes: qos.max_bandwidth_bytes,
            iops_per_gb: v.qos_policy.map_or(0, |p| p.iops_per_gb),
            source_snapshot,
            source_volume,
            source_id: (!v.source_id.is_empty()).then_some(v.source_id),
            source_deleted: v.source_deleted,
            has_parent: v.has_parent,
            snapshot_count: v.snapshot_count,
            created_unix: v.created_unix,
            exported: v.exported,
            ublk_device: (!v.ublk_device.is_empty()).then_some(v.ublk_device),
        }
    }
}

impl VolumeView {
    fn source_text(&self) -> String {
        let deleted = if self.source_deleted {
            " (deleted)"
        } else {
            ""
        };
        match (&self.source_snapshot, &self.source_volume) {
            (Some(s), _) => format!("snapshot {s}{deleted}"),
            (None, Some(v)) => format!("volume {v}{deleted}"),
            (None, None) => "-".to_string(),
        }
    }

    fn qos_text(&self) -> String {
        let iops = match (self.max_iops, self.iops_per_gb) {
            (0, _) => None,
            (n, 0) => Some(format!("{n} IOPS")),
            (n, per_gb) => Some(format!("{n} IOPS ({per_gb}/GiB)")),
        };
        let bw = match self.max_bandwidth_bytes {
            0 => None,
            n => Some(format!("{}/s", format_size(n))),
        };
        match (iops, bw) {
            (None, None) => "unlimited".to_string(),
            (Some(i), None) => i,
            (None, Some(b)) => b,
            (Some(i), Some(b)) => format!("{i}, {b}"),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SnapshotView {
    pub name: String,
    /// The snapshot's stable id.
    pub id: String,
    /// The volume it was taken of, by the name it had then.
    pub volume: String,
    /// That volume's id.
    pub volume_id: String,
    /// True when that volume is gone (even if a new volume has its name).
    pub volume_deleted: bool,
    pub pool: String,
    pub size_bytes: u64,
    pub created_unix: u64,
    pub exported: bool,
    /// The read-only ublk device VOLUME@SNAP is attached as, if any.
    pub ublk_device: Option<String>,
    /// The group snapshot it belongs to, if any.
    pub group: Option<String>,
    /// The id of the snapshot this one reproduces (taken by `import-diff`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<String>,
}

impl From<v1::Snapshot> for SnapshotView {
    fn from(s: v1::Snapshot) -> Self {
        SnapshotView {
            group: (!s.group.is_empty()).then(|| s.group.clone()),
            replica_of: (!s.replica_of.is_empty()).then(|| s.replica_of.clone()),
            name: s.name,
            id: s.id,
            volume: s.volume,
            volume_id: s.volume_id,
            volume_deleted: s.volume_deleted,
            pool: s.pool,
            size_bytes: s.size_bytes,
            created_unix: s.created_unix,
            exported: s.exported,
            ublk_device: (!s.ublk_device.is_empty()).then_some(s.ublk_device),
        }
    }
}

impl SnapshotView {
    /// "vol1", or "vol1 (deleted)" once that volume is gone.
    fn volume_text(&self) -> String {
        if self.volume_deleted {
            format!("{} (deleted)", self.volume)
        } else {
            self.volume.clone()
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ExportView {
    pub image: String,
    pub uri: String,
    pub read_only: bool,
    /// The nbds:// URI when blockd also serves NBD over TCP with TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_uri: Option<String>,
}

impl From<v1::ExportInfo> for ExportView {
    fn from(e: v1::ExportInfo) -> Self {
        ExportView {
            image: e.image,
            uri: e.uri,
            read_only: e.read_only,
            tls_uri: (!e.tls_uri.is_empty()).then_some(e.tls_uri),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub state_dir: String,
    pub api_socket: String,
    pub nbd_socket: String,
    /// The NBD-over-TLS TCP address, when served.
    pub nbd_listen: Option<String>,
    pub metrics_addr: Option<String>,
    pub pool_count: u64,
    pub volume_count: u64,
    pub snapshot_count: u64,
    pub export_count: u64,
    pub health: String,
    /// What the kernel's ublk driver offers ("unavailable: ..." or "available: ...").
    pub ublk: String,
    /// The images attached as ublk devices.
    pub ublk_devices: Vec<UblkView>,
}

/// One ublk device (`blockctl attach`, `blockctl status`).
#[derive(Debug, Serialize)]
pub struct UblkView {
    pub image: String,
    pub device: String,
    pub read_only: bool,
    /// "live", "recovering", "starting" or "failed: <reason>".
    pub state: String,
    /// "copy" or "zero-copy".
    pub data_path: String,
}

impl From<v1::UblkDevice> for UblkView {
    fn from(d: v1::UblkDevice) -> Self {
        UblkView {
            image: d.image,
            device: d.device,
            read_only: d.read_only,
            state: d.state,
            data_path: d.data_path,
        }
    }
}

impl From<v1::DaemonStatus> for StatusView {
    fn from(s: v1::DaemonStatus) -> Self {
        StatusView {
            version: s.version,
            pid: s.pid,
            uptime_seconds: s.uptime_seconds,
            state_dir: s.state_dir,
            api_socket: s.api_socket,
            nbd_socket: s.nbd_socket,
            nbd_listen: (!s.nbd_listen.is_empty()).then_some(s.nbd_listen),
            metrics_addr: (!s.metrics_addr.is_empty()).then_some(s.metrics_addr),
            pool_count: s.pool_count,
            volume_count: s.volume_count,
            snapshot_count: s.snapshot_count,
            export_count: s.export_count,
            health: s.health,
            ublk: s.ublk,
            ublk_devices: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct FsckView {
    pub clean: bool,
    pub pools: u64,
    pub images: u64,
    pub lineages: u64,
    pub mapped_chunks: u64,
    pub double_owned: u64,
    pub leaked: u64,
    pub bad_pointers: u64,
    pub bad_records: u64,
    pub repaired: u64,
    pub problems: Vec<String>,
}

impl From<v1::FsckReport> for FsckView {
    fn from(r: v1::FsckReport) -> Self {
        FsckView {
            clean: r.clean,
            pools: r.pools,
            images: r.images,
            lineages: r.lineages,
            mapped_chunks: r.mapped_chunks,
            double_owned: r.double_owned,
            leaked: r.leaked,
            bad_pointers: r.bad_pointers,
            bad_records: r.bad_records,
            repaired: r.repaired,
            problems: r.problems,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct GcView {
    pub entries_removed: u64,
    pub chunks_freed: u64,
    pub lineages_removed: u64,
    pub backlog: u64,
}

impl From<v1::GcReport> for GcView {
    fn from(r: v1::GcReport) -> Self {
        GcView {
            entries_removed: r.entries_removed,
            chunks_freed: r.chunks_freed,
            lineages_removed: r.lineages_removed,
            backlog: r.backlog,
        }
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().map(Cell::new));
    t
}

fn right(text: impl ToString) -> Cell {
    Cell::new(text.to_string()).set_alignment(CellAlignment::Right)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A two-column key/value table for `show` commands.
fn details(rows: Vec<(&str, String)>) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    for (k, v) in rows {
        t.add_row(vec![Cell::new(k), Cell::new(v)]);
    }
    t
}

/// A Unix time for people: RFC 3339 in UTC to the second (`2026-12-02T03:55:00Z`);
/// `-` when the daemon did not record one (0). JSON keeps the Unix seconds.
pub fn format_time(unix: u64) -> String {
    if unix == 0 {
        return "-".to_string();
    }
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn size_with_bytes(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_size(bytes))
}

pub fn pools_table(pools: &[PoolView]) -> Table {
    let mut t = table(&[
        "NAME",
        "CAPACITY",
        "ALLOCATED",
        "FREE",
        "PROVISIONED",
        "RATIO",
        "CHUNK",
        "ENGINE",
        "VOLUMES",
        "HEALTH",
    ]);
    for p in pools {
        let name = if p.is_default {
            format!("{} (default)", p.name)
        } else {
            p.name.clone()
        };
        t.add_row(vec![
            Cell::new(name),
            right(format_size(p.capacity_bytes)),
            right(format_size(p.allocated_bytes)),
            right(format_size(p.free_bytes)),
            right(format_size(p.provisioned_bytes)),
            right(p.ratio_text()),
            right(format_size(p.chunk_size_bytes)),
            Cell::new(&p.io_engine),
            right(p.volume_count),
            Cell::new(&p.health),
        ]);
    }
    t
}

pub fn pool_details(p: &PoolView) -> Table {
    details(vec![
        ("name", p.name.clone()),
        ("default", yes_no(p.is_default).to_string()),
        ("path", p.path.clone()),
        ("uuid", p.uuid.clone()),
        ("capacity", size_with_bytes(p.capacity_bytes)),
        ("allocated", size_with_bytes(p.allocated_bytes)),
        ("free", size_with_bytes(p.free_bytes)),
        ("provisioned", size_with_bytes(p.provisioned_bytes)),
        (
            "over-provisioning",
            match p.max_overprovisioning_ratio {
                Some(max) => format!(
                    "{:.2} (limit {max}: volumes may add up to {})",
                    p.overprovisioning_ratio,
                    format_size((p.capacity_bytes as f64 * max) as u64)
                ),
                None => format!("{:.2} (no limit)", p.overprovisioning_ratio),
            },
        ),
        ("chunk size", format_size(p.chunk_size_bytes)),
        ("io engine", p.io_engine.clone()),
        ("volumes", p.volume_count.to_string()),
        ("snapshots", p.snapshot_count.to_string()),
        ("health", p.health.clone()),
    ])
}

pub fn volumes_table(volumes: &[VolumeView]) -> Table {
    let mut t = table(&[
        "NAME",
        "POOL",
        "SIZE",
        "ALLOCATED",
        "SOURCE",
        "QOS",
        "SNAPSHOTS",
        "EXPORTED",
    ]);
    for v in volumes {
        t.add_row(vec![
            Cell::new(&v.name),
            Cell::new(&v.pool),
            right(format_size(v.size_bytes)),
            right(format_size(v.allocated_bytes)),
            Cell::new(v.source_text()),
            Cell::new(v.qos_text()),
            right(v.snapshot_count),
            Cell::new(yes_no(v.exported)),
        ]);
    }
    t
}

pub fn volume_details(v: &VolumeView) -> Table {
    let mut rows = vec![
        ("name", v.name.clone()),
        ("id", v.id.clone()),
        ("pool", v.pool.clone()),
        ("size", size_with_bytes(v.size_bytes)),
        ("allocated", size_with_bytes(v.allocated_bytes)),
        ("source", v.source_text()),
    ];
    if let Some(id) = &v.source_id {
        rows.push(("source id", id.clone()));
    }
    rows.extend([
        ("reads through parent", yes_no(v.has_parent).to_string()),
        ("qos", v.qos_text()),
        ("snapshots", v.snapshot_count.to_string()),
        ("exported", yes_no(v.exported).to_string()),
        (
            "ublk device",
            v.ublk_device.clone().unwrap_or_else(|| "-".into()),
        ),
        ("created", format_time(v.created_unix)),
    ]);
    details(rows)
}

pub fn snapshots_table(snapshots: &[SnapshotView]) -> Table {
    let mut t = table(&["NAME", "VOLUME", "POOL", "SIZE", "EXPORTED", "GROUP"]);
    for s in snapshots {
        t.add_row(vec![
            Cell::new(&s.name),
            Cell::new(s.volume_text()),
            Cell::new(&s.pool),
            right(format_size(s.size_bytes)),
            Cell::new(yes_no(s.exported)),
            Cell::new(s.group.as_deref().unwrap_or("-")),
        ]);
    }
    t
}

/// A group snapshot: its members were taken at one instant.
#[derive(Debug, Serialize)]
pub struct GroupView {
    pub name: String,
    pub created_unix: u64,
    pub snapshots: Vec<SnapshotView>,
}

impl From<v1::GroupSnapshot> for GroupView {
    fn from(g: v1::GroupSnapshot) -> Self {
        GroupView {
            name: g.name,
            created_unix: g.created_unix,
            snapshots: g.snapshots.into_iter().map(SnapshotView::from).collect(),
        }
    }
}

pub fn groups_table(groups: &[GroupView]) -> Table {
    let mut t = table(&["GROUP", "VOLUMES", "SNAPSHOTS", "CREATED"]);
    for g in groups {
        let volumes: Vec<&str> = g.snapshots.iter().map(|s| s.volume.as_str()).collect();
        let names: Vec<&str> = g.snapshots.iter().map(|s| s.name.as_str()).collect();
        t.add_row(vec![
            Cell::new(&g.name),
            Cell::new(volumes.join(", ")),
            Cell::new(names.join(", ")),
            Cell::new(format_time(g.created_unix)),
        ]);
    }
    t
}

pub fn snapshot_details(s: &SnapshotView) -> Table {
    details(vec![
        ("name", s.name.clone()),
        ("id", s.id.clone()),
        ("volume", s.volume_text()),
        ("volume id", s.volume_id.clone()),
        ("pool", s.pool.clone()),
        ("size", size_with_bytes(s.size_bytes)),
        ("exported", yes_no(s.exported).to_string()),
        (
            "ublk device",
            s.ublk_device.clone().unwrap_or_else(|| "-".into()),
        ),
        ("created", format_time(s.created_unix)),
        ("group", s.group.clone().unwrap_or_else(|| "-".into())),
        (
            "replica of",
            s.replica_of.clone().unwrap_or_else(|| "-".into()),
        ),
    ])
}

pub fn exports_table(exports: &[ExportView]) -> Table {
    let tls = exports.iter().any(|e| e.tls_uri.is_some());
    let mut headers = vec!["IMAGE", "MODE", "URI"];
    if tls {
        headers.push("TLS URI");
    }
    let mut t = table(&headers);
    for e in exports {
        let mut row = vec![
            Cell::new(&e.image),
            Cell::new(if e.read_only { "ro" } else { "rw" }),
            Cell::new(&e.uri),
        ];
        if tls {
            row.push(Cell::new(e.tls_uri.as_deref().unwrap_or("")));
        }
        t.add_row(row);
    }
    t
}

pub fn status_details(s: &StatusView) -> Table {
    details(vec![
        ("version", s.version.clone()),
        ("pid", s.pid.to_string()),
        ("uptime", format!("{} s", s.uptime_seconds)),
        ("state dir", s.state_dir.clone()),
        ("api socket", s.api_socket.clone()),
        (
            "nbd socket",
            if s.nbd_socket.is_empty() {
                "off".to_string()
            } else {
                s.nbd_socket.clone()
            },
        ),
        (
            "nbd over tls",
            s.nbd_listen.clone().unwrap_or_else(|| "off".to_string()),
        ),
        (
            "metrics",
            s.metrics_addr
                .as_ref()
                .map(|a| format!("http://{a}/metrics"))
                .unwrap_or_else(|| "off".to_string()),
        ),
        ("pools", s.pool_count.to_string()),
        ("volumes", s.volume_count.to_string()),
        ("snapshots", s.snapshot_count.to_string()),
        ("exports", s.export_count.to_string()),
        ("ublk", s.ublk.clone()),
        (
            "ublk devices",
            if s.ublk_devices.is_empty() {
                "-".to_string()
            } else {
                s.ublk_devices
                    .iter()
                    .map(|d| format!("{} {} ({})", d.device, d.image, d.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("health", s.health.clone()),
    ])
}

pub fn fsck_details(r: &FsckView) -> Table {
    details(vec![
        (
            "result",
            if r.clean {
                "consistent".to_string()
            } else {
                "INCONSISTENT".to_string()
            },
        ),
        ("pools", r.pools.to_string()),
        ("images", r.images.to_string()),
        ("lineages", r.lineages.to_string()),
        ("mapped chunks", r.mapped_chunks.to_string()),
        ("double-owned chunks", r.double_owned.to_string()),
        ("leaked chunks", r.leaked.to_string()),
        ("bad pointers", r.bad_pointers.to_string()),
        ("bad records", r.bad_records.to_string()),
        ("repaired", r.repaired.to_string()),
    ])
}

pub fn gc_details(g: &GcView) -> Table {
    details(vec![
        ("map entries removed", g.entries_removed.to_string()),
        ("chunks freed", g.chunks_freed.to_string()),
        ("lineages removed", g.lineages_removed.to_string()),
        ("backlog", g.backlog.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_json_has_the_contract_fields() {
        let v = VolumeView::from(v1::Volume {
            name: "v".into(),
            pool: "default".into(),
            size_bytes: 4096,
            allocated_bytes: 0,
            source: Some(v1::volume::Source::SourceSnapshot("s".into())),
            ..Default::default()
        });
        let json = serde_json::to_value(&v).unwrap();
        for field in ["name", "size_bytes", "allocated_bytes", "pool"] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert_eq!(json["source_snapshot"], "s");
        assert_eq!(json["size_bytes"], 4096);
    }

    #[test]
    fn gone_sources_and_volumes_say_deleted() {
        let v = VolumeView::from(v1::Volume {
            name: "c".into(),
            id: "c-id".into(),
            source: Some(v1::volume::Source::SourceSnapshot("snap1".into())),
            source_id: "s-id".into(),
            source_deleted: true,
            ..Default::default()
        });
        assert_eq!(v.source_text(), "snapshot snap1 (deleted)");
        let text = volume_details(&v).to_string();
        assert!(text.contains("c-id") && text.contains("s-id"), "{text}");
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["id"], "c-id");
        assert_eq!(json["source_id"], "s-id");
        assert_eq!(json["source_deleted"], true);

        let s = SnapshotView::from(v1::Snapshot {
            name: "snap1".into(),
            id: "s-id".into(),
            volume: "vol1".into(),
            volume_id: "v-id".into(),
            volume_deleted: true,
            ..Default::default()
        });
        let text = snapshots_table(&[s]).to_string();
        assert!(text.contains("vol1 (deleted)"), "{text}");
    }

    #[test]
    fn pools_show_the_overprovisioning_limit() {
        let p = PoolView::from(v1::Pool {
            name: "default".into(),
            capacity_bytes: 2 << 30,
            provisioned_bytes: 1 << 30,
            overprovisioning_ratio: 0.5,
            max_overprovisioning_ratio: 20.0,
            ..Default::default()
        });
        assert!(pools_table(&[p]).to_string().contains("0.50 / 20"));
        let p = PoolView::from(v1::Pool {
            capacity_bytes: 2 << 30,
            max_overprovisioning_ratio: 20.0,
            ..Default::default()
        });
        let text = pool_details(&p).to_string();
        assert!(
            text.contains("limit 20") && text.contains("40 GiB"),
            "{text}"
        );
        let unlimited = PoolView::from(v1::Pool::default());
        assert_eq!(unlimited.max_overprovisioning_ratio, None);
        assert!(pool_details(&unlimited).to_string().contains("no limit"));
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(format_time(0), "-");
        assert_eq!(format_time(1), "1970-01-01T00:00:01Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(format_time(1_798_761_600), "2027-01-01T00:00:00Z");
        assert_eq!(format_time(4_107_542_400), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn tables_show_human_sizes() {
        let v = VolumeView::from(v1::Volume {
            name: "v".into(),
            size_bytes: 10 << 30,
            ..Default::default()
        });
        let text = volumes_table(&[v]).to_string();
        assert!(text.contains("10 GiB"), "{text}");
    }
}
