//! The command line of `blockctl`: every `blockd.v1` call as a subcommand.
//!
//! Doc comments here are the `--help` text. Sizes accept bytes or a suffix (`512`, `64K`,
//! `10GiB`; all powers of two, as qemu-img reads them). A size without a unit is bytes;
//! below 4096 that is almost always a forgotten unit, so blockctl warns ([`SizeArg`]).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// blockctl: manage a blockd daemon (pools, volumes, snapshots, NBD exports).
///
/// Every command exits 0 on success and 1 with a one-line message on stderr when it
/// fails (2 for a usage error); `fsck` exits 0 only when the metadata is consistent.
#[derive(Debug, Parser)]
#[command(
    name = "blockctl",
    version,
    after_help = "Examples:
  blockctl volume create vol1 --size 10G
  blockctl snapshot create vol1 snap1
  blockctl volume create clone1 --from-snapshot snap1
  blockctl export vol1              # prints nbd+unix:///vol1?socket=...
  blockctl volume list -o json"
)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(
        long,
        global = true,
        env = "BLOCKD_API",
        default_value = "./blockd-data/api.sock",
        value_name = "PATH"
    )]
    pub api: PathBuf,

    /// Output format of list, show and create commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables for people, sizes in binary units.
    Table,
    /// One JSON array or object on stdout and nothing else; sizes in bytes.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Shows the daemon's state: version, sockets, object counts, health.
    #[command(after_help = "Example:\n  blockctl status -o json")]
    Status,

    /// Pools: where volumes are carved from.
    #[command(subcommand)]
    Pool(PoolCommand),

    /// Volumes: thin-provisioned block devices.
    #[command(subcommand)]
    Volume(VolumeCommand),

    /// Snapshots: read-only, copy-on-write points in time of a volume.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),

    /// Exports VOLUME (read-write) or VOLUME@SNAP (read-only) over NBD and prints its URI.
    ///
    /// Idempotent: exporting an exported image prints the same URI. Exports survive a
    /// daemon restart. The URI is the unix socket's (nbd+unix://) unless blockd serves
    /// NBD over TCP only, or --tls asks for the TCP one (nbds://HOST:PORT/IMAGE, mutual
    /// TLS: the client needs a certificate signed by blockd's --tls-client-ca).
    #[command(after_help = "Examples:
  blockctl export vol1
  blockctl export vol1@snap1
  qemu-img info \"$(blockctl export vol1)\"
  nbdinfo \"$(blockctl export vol1 --tls)?tls-certificates=/etc/nbd-client/tls\"")]
    Export {
        /// VOLUME or VOLUME@SNAP.
        image: String,
        /// Print the nbds:// URI of blockd's TCP listener (an error when it has none).
        #[arg(long)]
        tls: bool,
    },

    /// Stops exporting an image; new NBD connections to it are refused.
    ///
    /// Refused while NBD clients are connected to it (the message says how many):
    /// disconnect them first, or pass --force to close their connections.
    #[command(
        after_help = "Examples:\n  blockctl unexport vol1@snap1\n  blockctl unexport vol1 --force"
    )]
    Unexport {
        /// VOLUME or VOLUME@SNAP.
        image: String,
        /// Unexport even with connected clients: their connections are closed (in-flight
        /// requests finish; a file system mounted on them fails).
        #[arg(long)]
        force: bool,
    },

    /// Lists the exported images with their NBD URIs.
    Exports,

    /// Attaches VOLUME (read-write) or VOLUME@SNAP (read-only) as a local block device
    /// that blockd serves itself, and prints its path (one line, e.g. /dev/ublkb0).
    ///
    /// ublk needs Linux 6.0 or later with the ublk_drv module loaded. Idempotent:
    /// attaching an attached image prints the same device. Attachments survive a blockd
    /// restart, SIGKILL included: the next blockd (same state directory) takes the device
    /// over, and I/O that was in flight is reissued, so a mounted file system sees no
    /// error. `-o json` prints the device as JSON.
    #[command(after_help = "Examples:
  blockctl attach vol1 --ublk                 # prints /dev/ublkb0
  mkfs.ext4 \"$(blockctl attach vol1 --ublk)\"
  blockctl attach vol1@snap1 --ublk           # a read-only device
  blockctl attach vol1 --ublk -o json")]
    Attach {
        /// VOLUME or VOLUME@SNAP.
        image: String,
        /// Attach through ublk (the only kind blockd serves itself; kernel NBD and
        /// fuse-loop attachments are csi-shim's, over `blockctl export`).
        #[arg(long, required = true)]
        ublk: bool,
    },

    /// Removes the image's ublk device. Refused while it is mounted or open.
    #[command(after_help = "Examples:\n  umount /mnt/vol1 && blockctl detach vol1")]
    Detach {
        /// VOLUME or VOLUME@SNAP.
        image: String,
    },

    /// Checks the metadata (chunk map, allocator, intents); exits 0 only when consistent.
    #[command(after_help = "Examples:\n  blockctl fsck\n  blockctl fsck --repair")]
    Fsck {
        /// Give leaked chunks back to the pool.
        #[arg(long)]
        repair: bool,
    },

    /// Runs one garbage-collection pass now (it also runs in the background).
    Gc,

    /// Writes a snapshot, or what changed since an older one, as a self-checking stream.
    ///
    /// Without --from the stream is full (every allocated extent); with --from it holds
    /// only the extents that changed since BASE (data, and zero records for discarded
    /// ranges). The format is versioned and documented in docs/diff-stream.md. `-o FILE`
    /// is accepted as `--file FILE`.
    #[command(after_help = "Examples:
  blockctl export-diff vol1@mon -o vol1-mon.bdiff
  blockctl export-diff vol1@tue --from mon -o vol1-tue.bdiff
  blockctl export-diff vol1@tue --from mon -o - | ssh backup 'cat > vol1-tue.bdiff'")]
    ExportDiff(ExportDiffArgs),

    /// Applies a stream written by export-diff to VOLUME, then snapshots it.
    ///
    /// An incremental stream applies only when VOLUME's newest snapshot is the stream's
    /// base (by name); a full stream creates VOLUME, which must not exist. Every checksum
    /// is verified before anything changes: a corrupt or truncated stream leaves the
    /// volume as it was. The snapshot taken at the end is named as the stream's target
    /// (or --snapshot), so the next incremental applies on top.
    #[command(after_help = "Examples:
  blockctl import-diff vol1-mon.bdiff restored
  blockctl import-diff vol1-tue.bdiff restored
  ssh backup 'cat vol1-tue.bdiff' | blockctl import-diff - restored

A volume in use (attached with `blockctl attach --ublk`, or with NBD clients connected,
e.g. staged by csi-shim) is refused: unmount and detach it first.")]
    ImportDiff(ImportDiffArgs),
}

#[derive(Debug, Args)]
pub struct ExportDiffArgs {
    /// The snapshot to export, as VOLUME@SNAP.
    pub image: String,
    /// Export only what changed since this older snapshot (of the same volume, or of the
    /// volume a clone was cut from).
    #[arg(long, value_name = "BASE")]
    pub from: Option<String>,
    /// Where to write the stream; `-` for stdout. (`-o FILE` also works.)
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ImportDiffArgs {
    /// The stream to read; `-` for stdin.
    pub file: PathBuf,
    /// The volume to apply it to.
    pub volume: String,
    /// Name of the snapshot taken after applying (default: the stream's target snapshot).
    #[arg(long, value_name = "NAME")]
    pub snapshot: Option<String>,
    /// Apply even while VOLUME is attached as a ublk device or NBD clients are connected
    /// to it. They see its data change under them, and a file system mounted on it may be
    /// corrupted. Without it, such a volume is refused and nothing is changed.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Lists pools with capacity and usage.
    ///
    /// RATIO is provisioned / capacity (the sizes of the pool's volumes over what it
    /// holds) against its limit (blockd --max-overprovision): creates, clones and grows
    /// past the limit are refused.
    #[command(after_help = "Example:\n  blockctl pool list -o json")]
    List,
    /// Shows one pool, with its over-provisioning ratio and limit.
    #[command(after_help = "Example:\n  blockctl pool show default")]
    Show { name: String },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Creates a volume: empty, or a copy-on-write clone of a snapshot or a volume.
    ///
    /// Idempotent by name: creating an existing volume with the same parameters succeeds
    /// and changes nothing; with different parameters it fails.
    #[command(after_help = "Examples:
  blockctl volume create vol1 --size 10G
  blockctl volume create fast --size 1TiB --pool nvme --max-iops 5000 --max-bandwidth 200M
  blockctl volume create restored --from-snapshot snap1 --size 600G
  blockctl volume create copy --from-volume vol1")]
    Create(CreateVolumeArgs),
    /// Lists volumes.
    #[command(after_help = "Example:\n  blockctl volume list -o json")]
    List,
    /// Shows one volume.
    Show { name: String },
    /// Deletes a volume. Its snapshots stay usable.
    ///
    /// Refused while NBD clients are connected to it (the message says how many):
    /// disconnect them first (unmount, detach), or pass --force.
    #[command(
        after_help = "Examples:\n  blockctl volume delete vol1\n  blockctl volume delete vol1 --force"
    )]
    Delete {
        name: String,
        /// Delete even with connected clients: their connections are closed (in-flight
        /// requests finish; a file system mounted on them fails).
        #[arg(long)]
        force: bool,
    },
    /// Grows a volume (shrinking needs --force and loses the data past the new end).
    #[command(after_help = "Example:\n  blockctl volume resize vol1 --size 20G")]
    Resize {
        name: String,
        /// The new size, e.g. 20G (a number without a unit is bytes).
        #[arg(long, value_parser = parse_size_arg)]
        size: SizeArg,
        /// Allow shrinking.
        #[arg(long)]
        force: bool,
    },
    /// Sets a volume's QoS limits (omitted or 0 = unlimited). Open NBD connections get the
    /// new limits at their next request.
    #[command(
        after_help = "Examples:\n  blockctl volume set-qos vol1 --max-iops 1000\n  blockctl volume set-qos vol1 --iops-per-gb 20 --max-iops 5000"
    )]
    SetQos {
        name: String,
        #[command(flatten)]
        qos: QosArgs,
    },
    /// Copies what a clone still reads from its parent, so it no longer depends on it.
    #[command(after_help = "Example:\n  blockctl volume flatten clone1")]
    Flatten { name: String },
    /// Prints a Kubernetes PersistentVolume for an existing volume (static provisioning).
    ///
    /// The PV names the volume as csi-shim does (driver blockd.csi.io, volume handle
    /// NODE/VOLUME) and pins pods to NODE, the node whose blockd holds it.
    #[command(after_help = "Examples:
  blockctl volume pv vol1 --node worker-1 | kubectl apply -f -
  blockctl volume pv db --node worker-1 --fs-type xfs --name db-pv --reclaim Delete
  blockctl volume pv raw --node worker-1 --block")]
    Pv(crate::pv::PvArgs),
    /// Lists the extents of VOLUME or VOLUME@SNAP that hold data (chunk granularity).
    #[command(
        after_help = "Examples:\n  blockctl volume allocated vol1\n  blockctl volume allocated vol1@snap1 -o json"
    )]
    Allocated {
        /// VOLUME or VOLUME@SNAP.
        image: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateVolumeArgs {
    pub name: String,
    /// Size, e.g. 10G or 512M (a number without a unit is bytes); required unless the
    /// volume is a clone (then it defaults to the source's).
    #[arg(long, value_parser = parse_size_arg, required_unless_present_any = ["from_snapshot", "from_volume"])]
    pub size: Option<SizeArg>,
    /// Pool to carve it from (default: the daemon's default pool, or the source's).
    #[arg(long)]
    pub pool: Option<String>,
    /// Start with the content of this snapshot.
    #[arg(long, value_name = "SNAP", conflicts_with = "from_volume")]
    pub from_snapshot: Option<String>,
    /// Start with the current content of this volume.
    #[arg(long, value_name = "VOL")]
    pub from_volume: Option<String>,
    #[command(flatten)]
    pub qos: QosArgs,
}

#[derive(Debug, Args)]
pub struct QosArgs {
    /// Most I/O operations per second (0 = unlimited).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_iops: u64,
    /// Most bytes per second, e.g. 100M (0 = unlimited).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
    pub max_bandwidth: u64,
    /// IOPS per GiB of size: the IOPS limit follows the volume through resizes, capped by
    /// --max-iops when that is given (0 = none).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub iops_per_gb: u64,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Takes a snapshot of VOLUME named SNAP (names are unique across the daemon).
    #[command(after_help = "Example:\n  blockctl snapshot create vol1 snap1")]
    Create { volume: String, name: String },
    /// Lists snapshots, of one volume or of all.
    ///
    /// VOLUME shows "vol1 (deleted)" once the volume a snapshot was taken of is gone,
    /// also when a new volume has its name since (`-o json`: volume_id, volume_deleted).
    #[command(
        after_help = "Examples:\n  blockctl snapshot list\n  blockctl snapshot list vol1 -o json"
    )]
    List { volume: Option<String> },
    /// Shows one snapshot.
    Show { name: String },
    /// Deletes a snapshot (its space is reclaimed once no clone needs it). A member of a
    /// group snapshot goes with its group only (`snapshot delete-group`).
    Delete { name: String },
    /// Snapshots several volumes at one instant (crash-consistent across them).
    ///
    /// Every volume is quiesced, then all snapshots are recorded in one metadata commit.
    /// The member snapshots are named GROUP-VOLUME (shortened with a hash past 128
    /// characters). Idempotent for the same volumes.
    #[command(
        after_help = "Example:\n  blockctl snapshot create-group nightly db wal\n  # makes snapshots nightly-db and nightly-wal"
    )]
    CreateGroup {
        /// The group's name.
        group: String,
        /// The volumes to snapshot together.
        #[arg(required = true, num_args = 1..)]
        volumes: Vec<String>,
    },
    /// Lists group snapshots with their members.
    #[command(after_help = "Example:\n  blockctl snapshot list-groups -o json")]
    ListGroups,
    /// Shows one group snapshot.
    ShowGroup { group: String },
    /// Deletes a group snapshot: every member at once.
    DeleteGroup { group: String },
    /// Lists the extents that changed from snapshot BASE to TARGET.
    ///
    /// TARGET is a later snapshot (SNAP or VOLUME@SNAP) of the same volume, or of a clone
    /// cut from it, or a volume name meaning its live content. Extents are at the pool's
    /// chunk granularity; "zero" extents read zeros in TARGET (discarded or zeroed).
    #[command(after_help = "Examples:
  blockctl snapshot diff mon tue
  blockctl snapshot diff mon vol1 -o json     # since mon, up to now")]
    Diff { base: String, target: String },
}

fn parse_size(s: &str) -> Result<u64, String> {
    blockd_proto::size::parse_size(s).map_err(|e| e.to_string())
}

/// A volume size as given: bytes, and whether it had no unit at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeArg {
    pub bytes: u64,
    /// Digits only (`1000`), not `1000B` or `1000G`.
    pub unitless: bool,
}

impl SizeArg {
    /// The warning for a unitless size below 4096 bytes: someone who typed `--size 1000`
    /// meant 1000 GiB far more often than a 4 KiB volume.
    pub fn unit_warning(&self) -> Option<String> {
        (self.unitless && self.bytes < 4096).then(|| {
            format!(
                "warning: --size {n} has no unit, so it means {n} bytes (the volume gets 4 KiB); \
                 for gibibytes write {n}G, and write {n}B to say bytes and silence this warning",
                n = self.bytes
            )
        })
    }
}

fn parse_size_arg(s: &str) -> Result<SizeArg, String> {
    Ok(SizeArg {
        bytes: parse_size(s)?,
        unitless: s.trim().bytes().all(|b| b.is_ascii_digit() || b == b'.'),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn contract_commands_parse() {
        let parse = |args: &str| {
            Cli::try_parse_from(std::iter::once("blockctl").chain(args.split_whitespace()))
        };
        for ok in [
            "status",
            "pool list",
            "pool show default -o json",
            "volume create v --size 10G",
            "volume create v --size 10G --pool p --from-snapshot s --max-iops 5 --max-bandwidth 1M",
            "volume create v --from-volume w",
            "volume list -o json",
            "volume show v",
            "volume delete v",
            "volume delete v --force",
            "unexport v --force",
            "volume resize v --size 20GiB",
            "volume flatten v",
            "volume pv v --node n1",
            "volume pv v --node n1 --fs-type xfs --reclaim Delete --name p --storage-class s",
            "volume pv v --node n1 --block -o json",
            "snapshot create v s",
            "snapshot list",
            "snapshot list v",
            "snapshot show s",
            "snapshot delete s",
            "snapshot create-group g v w",
            "snapshot list-groups",
            "snapshot show-group g",
            "snapshot delete-group g",
            "volume set-qos v --iops-per-gb 20 --max-iops 100",
            "export v",
            "export v@s",
            "unexport v@s",
            "fsck",
            "--api /tmp/x.sock status",
            "snapshot diff a b -o json",
            "volume allocated v@s",
            "export-diff v@s --from a --file /tmp/x",
            "import-diff - v --snapshot s2",
        ] {
            parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "volume create v",
            "volume create v --size 10X",
            "volume create v --size 1G --from-snapshot s --from-volume w",
            "volume resize v",
            "snapshot create v",
            "snapshot create-group g",
            "volume pv v",
            "volume pv v --node n1 --fs-type btrfs",
            "volume pv v --node n1 --reclaim retain",
            "volume pv v --node n1 --block --fs-type xfs",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let cli = parse("volume create v --size 64K").unwrap();
        match cli.command {
            Command::Volume(VolumeCommand::Create(args)) => assert_eq!(
                args.size,
                Some(SizeArg {
                    bytes: 65536,
                    unitless: false
                })
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_small_size_without_a_unit_warns() {
        let size = |s: &str| parse_size_arg(s).unwrap();
        let warning = size("1000").unit_warning().expect("1000 warns");
        assert!(
            warning.contains("1000 bytes") && warning.contains("1000G"),
            "{warning}"
        );
        assert!(size("4095").unit_warning().is_some());
        for quiet in ["1000B", "1000b", "1000G", "4096", "1048576", "64K", "1.5G"] {
            assert_eq!(size(quiet).unit_warning(), None, "{quiet}");
        }
    }
}
