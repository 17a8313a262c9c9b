//! The harness of the CSI Node tests on real mounts (`tests/csi_node.rs`,
//! `tests/csi_static_ephemeral.rs`): a real blockd, a real csi-shim with the attacher under
//! test, CSI Node calls, and a guard that removes every mount, loop device and helper
//! process under the test's directories, even when the test fails.
//!
//! The attacher under test is `BLOCKD_TEST_ATTACH`: `fuse-loop` (the default: csi-fuse-nbd
//! and loop devices, as on nodes without the kernel `nbd` module), `nbd` (the kernel's
//! `/dev/nbdN` over netlink, in the guest kernel of `tests/vm/run.sh`) or `ublk`
//! (`/dev/ublkbN` served by blockd itself, in the same guest).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use blockd_proto::csi;
use blockd_proto::csi::controller_client::ControllerClient;
use blockd_proto::csi::node_client::NodeClient;
use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;
use tonic::Code;

use crate::{have_tool, CsiShim, Daemon};

pub const NODE: &str = "node-a";
pub const MIB: u64 = 1 << 20;

/// The directory of the helper binaries the node service starts (csi-nbd-proxy,
/// csi-fuse-nbd), next to csi-shim. [`crate::binary`] builds every workspace binary
/// once per test process; with `CSI_SHIM_BIN` set, the helpers are expected next to it.
pub fn build_helpers() -> &'static Result<PathBuf, String> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let shim = crate::binary("csi-shim");
        let dir = shim
            .parent()
            .expect("csi-shim lives in a directory")
            .to_path_buf();
        for helper in ["csi-nbd-proxy", "csi-fuse-nbd"] {
            if !dir.join(helper).exists() {
                return Err(format!("{} does not exist", dir.join(helper).display()));
            }
        }
        Ok(dir)
    })
}

/// The attacher under test (`BLOCKD_TEST_ATTACH`): `fuse-loop`, `nbd` or `ublk`.
pub fn attach_mode() -> &'static str {
    static MODE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    MODE.get_or_init(|| match std::env::var("BLOCKD_TEST_ATTACH").as_deref() {
        Err(_) | Ok("") | Ok("fuse-loop") => "fuse-loop",
        Ok("nbd") => "nbd",
        Ok("ublk") => "ublk",
        Ok(other) => panic!("BLOCKD_TEST_ATTACH={other:?}: expected fuse-loop, nbd or ublk"),
    })
}

pub fn kernel_nbd() -> bool {
    attach_mode() == "nbd"
}

/// Whether the attacher under test is ublk (blockd serves `/dev/ublkbN` itself).
pub fn ublk() -> bool {
    attach_mode() == "ublk"
}

/// Whether the device under test is a real kernel block driver (nbd or ublk), whose
/// errors the kernel log must not show.
pub fn kernel_device() -> bool {
    kernel_nbd() || ublk()
}

/// The device-node prefix of the attacher under test.
pub fn device_prefix() -> &'static str {
    if kernel_nbd() {
        "/dev/nbd"
    } else if ublk() {
        "/dev/ublkb"
    } else {
        "/dev/loop"
    }
}

/// Why these tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root for mounts and loop devices".into());
    }
    if ublk() {
        if !Path::new("/dev/ublk-control").exists() {
            return Some(
                "BLOCKD_TEST_ATTACH=ublk needs the kernel ublk_drv module (run it in tests/vm/run.sh)"
                    .into(),
            );
        }
    } else if kernel_nbd() {
        if !Path::new("/sys/module/nbd").exists() {
            return Some(
                "BLOCKD_TEST_ATTACH=nbd needs the kernel nbd module (run it in tests/vm/run.sh)"
                    .into(),
            );
        }
    } else if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    for tool in [
        "nbdcopy",
        "e2fsck",
        "fio",
        "losetup",
        "mkfs.ext4",
        "mkfs.xfs",
        "resize2fs",
        "xfs_growfs",
        "blkid",
        "mount",
    ] {
        if !have_tool(tool) {
            return Some(format!(
                "{tool} is not installed (tools/test.sh installs it)"
            ));
        }
    }
    None
}

/// Returns from the calling test (after [`crate::skip`]) when [`skip_reason`] says the
/// node tests cannot run here.
#[macro_export]
macro_rules! require_root_and_tools {
    () => {
        if let Some(reason) = $crate::csi_node::skip_reason() {
            $crate::skip(&reason);
            return;
        }
    };
}

/// Mount points under `root`, deepest first.
pub fn mounts_under(root: &Path) -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<(PathBuf, String)> = text
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?.replace("\\040", " ");
            let fs_type = right.split(' ').next()?.to_string();
            Some((PathBuf::from(point), fs_type))
        })
        .filter(|(p, _)| p.starts_with(root))
        .collect();
    out.sort_by_key(|(p, _)| std::cmp::Reverse(p.as_os_str().len()));
    out
}

/// Loop devices whose backing file lies under `root`.
pub fn loops_under(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim_end()).starts_with(root))
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect()
}

/// Unmounts everything under `root` and detaches loop devices backed by files under it,
/// when dropped (declared after the shim so that it runs before the shim's directory is
/// removed): file systems and binds first, then loops, then the FUSE mounts.
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (point, fs_type) in mounts_under(&self.0) {
            if !fs_type.starts_with("fuse") {
                let _ = Command::new("umount").arg("-l").arg(&point).status();
            }
        }
        for device in loops_under(&self.0) {
            let _ = Command::new("losetup").arg("-d").arg(&device).status();
        }
        for (point, _) in mounts_under(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&point).status();
        }
        // Helpers (FUSE server, proxy) of volumes a failed test left staged.
        let root = self.0.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let helper = ["csi-nbd-proxy", "csi-fuse-nbd", "nbdfuse"]
                .iter()
                .any(|h| cmdline.split(' ').next().is_some_and(|p| p.ends_with(h)));
            if helper && cmdline.contains(&root) {
                // SAFETY: kill(2) on a helper process started for this test's directories.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A daemon, a node-mode csi-shim on it, a client, and the cleanup guard.
pub struct Env {
    // Field order is drop order: the guard unmounts before the shim's directory goes.
    pub _cleanup: Cleanup,
    pub shim: CsiShim,
    pub daemon: Daemon,
    pub node: NodeClient<Channel>,
    pub root: PathBuf,
}

impl Env {
    /// A daemon and a csi-shim with the attacher under test and `shim_args`.
    pub async fn start(shim_args: &[&str]) -> Env {
        let mut args = vec!["--attach", attach_mode()];
        args.extend_from_slice(shim_args);
        Env::start_exactly(&args).await
    }

    /// A daemon and a csi-shim with exactly `shim_args`.
    pub async fn start_exactly(shim_args: &[&str]) -> Env {
        Env::start_with_env(shim_args, &[]).await
    }

    /// A daemon and a csi-shim with exactly `shim_args` and extra environment `env`.
    pub async fn start_with_env(shim_args: &[&str], env: &[(&str, &str)]) -> Env {
        if let Err(err) = build_helpers() {
            panic!("{err}");
        }
        let daemon = Daemon::start();
        let shim = CsiShim::start_with_env(&daemon, NODE, shim_args, env);
        let root = shim.scratch().to_path_buf();
        let node = NodeClient::new(shim.channel().await);
        Env {
            _cleanup: Cleanup(root.clone()),
            shim,
            daemon,
            node,
            root,
        }
    }

    /// Creates blockd volume `name` of `size` and returns its CSI id.
    pub fn volume(&self, name: &str, size: &str) -> String {
        self.daemon
            .ctl_ok(&["volume", "create", name, "--size", size]);
        format!("{NODE}/{name}")
    }

    pub fn staging(&self, name: &str) -> PathBuf {
        let p = self.root.join("staging").join(name);
        std::fs::create_dir_all(&p).expect("staging dir");
        p
    }

    pub fn target(&self, name: &str) -> PathBuf {
        let dir = self.root.join("pods").join(name);
        std::fs::create_dir_all(&dir).expect("pod dir");
        dir.join("volume")
    }

    pub async fn reconnect(&mut self) {
        self.node = NodeClient::new(self.shim.channel().await);
    }

    pub async fn stage(
        &mut self,
        id: &str,
        staging: &Path,
        cap: csi::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn unstage(&mut self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .map(|_| ())
    }

    pub async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(|_| ())
    }

    pub async fn stats(
        &mut self,
        id: &str,
        path: &Path,
    ) -> Result<csi::NodeGetVolumeStatsResponse, tonic::Status> {
        self.node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn expand(
        &mut self,
        id: &str,
        path: &Path,
        required: u64,
    ) -> Result<csi::NodeExpandVolumeResponse, tonic::Status> {
        self.node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: required as i64,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// ControllerExpandVolume to `bytes`, as external-resizer calls it.
    pub async fn controller_expand(
        &mut self,
        id: &str,
        bytes: u64,
    ) -> csi::ControllerExpandVolumeResponse {
        let mut controller = ControllerClient::new(self.shim.channel().await);
        controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes as i64,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("ControllerExpandVolume {id}: {s}"))
            .into_inner()
    }

    /// Stage and publish (each twice: both are idempotent).
    pub async fn mount(
        &mut self,
        id: &str,
        name: &str,
        cap: csi::VolumeCapability,
    ) -> (PathBuf, PathBuf) {
        let staging = self.staging(name);
        let target = self.target(name);
        for round in 0..2 {
            self.stage(id, &staging, cap.clone())
                .await
                .unwrap_or_else(|s| {
                    panic!("NodeStageVolume #{round} {id}: {s}\n{}", self.shim.log())
                });
        }
        for round in 0..2 {
            self.publish(id, &staging, &target, cap.clone(), false)
                .await
                .unwrap_or_else(|s| {
                    panic!("NodePublishVolume #{round} {id}: {s}\n{}", self.shim.log())
                });
        }
        (staging, target)
    }

    /// Unpublish and unstage (each twice), then check nothing is left.
    pub async fn umount(&mut self, id: &str, staging: &Path, target: &Path) {
        for round in 0..2 {
            self.unpublish(id, target)
                .await
                .unwrap_or_else(|s| panic!("NodeUnpublishVolume #{round} {id}: {s}"));
        }
        assert!(!target.exists(), "unpublish removes {}", target.display());
        for round in 0..2 {
            self.unstage(id, staging).await.unwrap_or_else(|s| {
                panic!("NodeUnstageVolume #{round} {id}: {s}\n{}", self.shim.log())
            });
        }
    }

    /// The block devices attached for this node's volumes: loop devices under its
    /// directories, the `/dev/nbdN` its attachments name, or the ublk devices (tests run
    /// one at a time, so every `/dev/ublkbN` there is is this test's).
    pub fn attached_devices(&self) -> Vec<PathBuf> {
        let mut devices = loops_under(&self.root);
        for entry in std::fs::read_dir("/dev").into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("ublkb") {
                devices.push(entry.path());
            }
        }
        let attach = self.shim.state_dir().join("attach");
        for dir in std::fs::read_dir(&attach).into_iter().flatten().flatten() {
            if let Ok(index) = std::fs::read_to_string(dir.path().join("nbd.index")) {
                devices.push(PathBuf::from(format!("/dev/nbd{}", index.trim())));
            }
        }
        devices
    }

    /// Asserts that no mount, loop device, helper process or export of this node is left.
    pub async fn assert_clean(&self) {
        let mounts = mounts_under(&self.root);
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        let loops = loops_under(&self.root);
        assert!(loops.is_empty(), "loop devices left behind: {loops:?}");
        let attach = self.shim.state_dir().join("attach");
        let left: Vec<_> = std::fs::read_dir(&attach)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "attach work directories left behind: {left:?}"
        );
        let exports = self
            .daemon
            .grpc()
            .await
            .exports
            .list_exports(blockd_proto::v1::ListExportsRequest {})
            .await
            .expect("ListExports")
            .into_inner()
            .exports;
        assert!(exports.is_empty(), "exports left behind: {exports:?}");
        let ublk = self
            .daemon
            .grpc()
            .await
            .exports
            .list_ublk(blockd_proto::v1::ListUblkRequest {})
            .await
            .expect("ListUblk")
            .into_inner()
            .devices;
        assert!(ublk.is_empty(), "ublk devices left behind: {ublk:?}");
    }
}

pub fn cap(mode: Mode, access: AccessType) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(access),
    }
}

pub fn mount_cap(fs: &str) -> csi::VolumeCapability {
    mount_cap_mode(fs, Mode::SingleNodeWriter)
}

pub fn mount_cap_mode(fs: &str, mode: Mode) -> csi::VolumeCapability {
    cap(
        mode,
        AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: String::new(),
        }),
    )
}

pub fn block_cap() -> csi::VolumeCapability {
    cap(Mode::SingleNodeWriter, AccessType::Block(BlockVolume {}))
}

/// Deterministic bytes, different per `seed`.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn write_synced(path: &Path, data: &[u8]) {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write file");
    f.sync_all().expect("fsync file");
}

/// FNV-1a, enough to compare file contents.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub fn statvfs(path: &Path) -> libc::statvfs {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: an all-zero statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs to fill.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {}", path.display());
    st
}

/// What `df` reports as the size of the file system at `path`.
pub fn df_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=size"])
        .arg(path)
        .output()
        .expect("run df");
    assert!(out.status.success(), "df {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df prints a size")
}

pub fn usage(
    stats: &csi::NodeGetVolumeStatsResponse,
    unit: csi::volume_usage::Unit,
) -> csi::VolumeUsage {
    *stats
        .usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .unwrap_or_else(|| panic!("no {unit:?} usage in {stats:?}"))
}

pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    what: &str,
) -> String {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, got OK {v:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {}", status.message());
            status.message().to_string()
        }
    }
}

/// The mount at exactly `path`, as (source, options).
pub fn mount_of(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        (Path::new(fields.get(4)?) == path).then(|| {
            (
                right.split(' ').nth(1).unwrap_or_default().to_string(),
                fields.get(5).copied().unwrap_or_default().to_string(),
            )
        })
    })
}
