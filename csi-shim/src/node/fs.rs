//! File systems on attached volumes: probing, creating, growing, and device sizes.
//!
//! Invariant: a volume is formatted only when low-level probing (`blkid -p`, which reads
//! the device rather than a cache) finds no file system *and* no partition table on it.
//! A volume that holds anything is never reformatted (and `mkfs.xfs` runs without `-f`,
//! so it refuses on its own if it sees a signature; `mke2fs` has no such mode when not
//! on a terminal, so the probe is the guard).
//! mkfs skips discards and eager table initialisation: a fresh thin volume already reads
//! zeros, so those would only allocate space.

use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::error::{NodeError, Result};
use super::exec;

/// File systems the node creates and grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// From a capability's `fs_type`: empty means the default, ext4.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "" | "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(NodeError::UnsupportedFsType(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

/// What `blkid -p` finds on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// No file system and no partition table.
    Blank,
    /// A file system (`TYPE`).
    Fs(String),
    /// A partition table or another non-file-system signature.
    Other(String),
}

/// Parses `blkid -p -o export` output.
fn parse_blkid(stdout: &str) -> Content {
    let mut kind = None;
    let mut other = None;
    for line in stdout.lines() {
        if let Some(t) = line.strip_prefix("TYPE=") {
            kind = Some(t.to_string());
        } else if let Some(t) = line.strip_prefix("PTTYPE=") {
            other = Some(format!("partition table {t}"));
        }
    }
    match (kind, other) {
        (Some(t), _) => Content::Fs(t),
        (None, Some(o)) => Content::Other(o),
        (None, None) if stdout.trim().is_empty() => Content::Blank,
        (None, None) => Content::Other(stdout.trim().replace('\n', " ")),
    }
}

/// Probes `device` for signatures.
pub async fn probe(device: &Path) -> Result<Content> {
    let args = [
        Path::new("-p"),
        Path::new("-o"),
        Path::new("export"),
        device,
    ];
    let output = exec::run_unchecked("blkid", &args, exec::SHORT).await?;
    match output.status.code() {
        Some(0) => Ok(parse_blkid(&String::from_utf8_lossy(&output.stdout))),
        // blkid exits 2 when it finds nothing to report.
        Some(2) if output.stdout.is_empty() => Ok(Content::Blank),
        _ => Err(exec::failed("blkid", &args, &output)),
    }
}

/// Creates `fs` on a blank `device`.
pub async fn mkfs(device: &Path, fs: FsType) -> Result<()> {
    let dev = device.display().to_string();
    match fs {
        FsType::Ext4 => {
            let args = [
                "-q",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                &dev,
            ];
            exec::run("mkfs.ext4", &args, exec::LONG).await?;
        }
        FsType::Xfs => {
            exec::run("mkfs.xfs", &["-q", "-K", &dev], exec::LONG).await?;
        }
    }
    Ok(())
}

/// A file system this much smaller than its device is grown at stage time (a volume
/// restored or cloned into a larger size); xfs keeps its internal log and ext4 its
/// metadata inside the device, so small differences are normal.
pub const GROW_SLACK: u64 = 64 << 20;

/// Grows an unmounted ext4 file system to fill `device` when the device is larger by
/// more than [`GROW_SLACK`]: `e2fsck -f -p` (resize2fs requires a checked file system),
/// then `resize2fs`. Offline resizing needs no kernel capability.
pub async fn grow_ext4_offline(device: &Path) -> Result<()> {
    let out = exec::run("dumpe2fs", &[Path::new("-h"), device], exec::SHORT).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let (Some(blocks), Some(block_size)) = (field("Block count:"), field("Block size:")) else {
        return Ok(());
    };
    let fs_bytes = blocks.saturating_mul(block_size);
    let device_bytes = device_size(device)
        .map_err(|e| NodeError::io(format!("Reading the size of {}", device.display()), e))?;
    if device_bytes <= fs_bytes.saturating_add(GROW_SLACK) {
        return Ok(());
    }
    tracing::info!(device = %device.display(), fs_bytes, device_bytes, "growing ext4 to fill its volume");
    let check = [Path::new("-f"), Path::new("-p"), device];
    let out = exec::run_unchecked("e2fsck", &check, exec::LONG).await?;
    // 0: clean, 1: errors corrected; anything else needs a person.
    if !matches!(out.status.code(), Some(0) | Some(1)) {
        return Err(exec::failed("e2fsck", &check, &out));
    }
    exec::run("resize2fs", &[device], exec::LONG).await?;
    Ok(())
}

/// `CAP_SYS_RESOURCE`, which the kernel requires for online ext4 resizing.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process holds capability `cap` (from `/proc/self/status`).
fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << cap) != 0)
}

/// Grows a mounted file system to fill its device.
pub async fn grow(device: &Path, mount_point: &Path, fs: &str) -> Result<()> {
    match fs {
        "ext4" | "ext3" | "ext2" => {
            if !has_capability(CAP_SYS_RESOURCE) {
                // The kernel answers EPERM; say why instead of relaying resize2fs's
                // "Permission denied".
                return Err(NodeError::MissingCapability {
                    capability: "CAP_SYS_RESOURCE",
                    action: format!("grow the ext4 file system on {} online", device.display()),
                });
            }
            exec::run("resize2fs", &[device], exec::LONG).await?;
        }
        "xfs" => {
            exec::run("xfs_growfs", &[mount_point], exec::LONG).await?;
        }
        other => return Err(NodeError::UnsupportedFsType(other.to_string())),
    }
    Ok(())
}

/// `_IOR(0x12, 114, size_t)` from `linux/fs.h`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// The size in bytes of a block device (or of whatever `path` bind-mounts one).
pub fn device_size(path: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live,
        // aligned u64; the fd is open for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_proc() {
        // CAP_CHOWN (0) is held by root in every environment these tests run in as root;
        // the call must at least not panic elsewhere.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(has_capability(0));
        }
        assert!(!has_capability(63));
    }

    #[test]
    fn fs_types_default_to_ext4_and_reject_others() {
        assert_eq!(FsType::parse("").unwrap(), FsType::Ext4);
        assert_eq!(FsType::parse("xfs").unwrap(), FsType::Xfs);
        assert!(matches!(
            FsType::parse("ntfs"),
            Err(NodeError::UnsupportedFsType(_))
        ));
    }

    #[test]
    fn blkid_output_is_classified() {
        assert_eq!(parse_blkid(""), Content::Blank);
        assert_eq!(
            parse_blkid("DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"),
            Content::Fs("ext4".into())
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/loop0\nPTUUID=x\nPTTYPE=gpt\n"),
            Content::Other("partition table gpt".into())
        );
    }

    #[tokio::test]
    async fn probing_a_zero_file_finds_nothing_and_mkfs_then_finds_ext4() {
        if !std::path::Path::new("/usr/sbin/mkfs.ext4").exists() {
            eprintln!("skipping: mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        assert_eq!(probe(&img).await.unwrap(), Content::Blank);
        assert_eq!(device_size(&img).unwrap(), 32 << 20);
        mkfs(&img, FsType::Ext4).await.unwrap();
        assert_eq!(probe(&img).await.unwrap(), Content::Fs("ext4".into()));
    }
}
