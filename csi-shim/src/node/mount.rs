//! Mounts: what is mounted where (from `/proc/self/mountinfo`), and the mount, bind and
//! unmount steps of stage and publish.
//!
//! Invariants: the kernel's mount table is the truth, never our record of it (a restart,
//! a reboot or an operator may have changed it); `unmount` is idempotent (a path that is
//! not a mount point is already unmounted) and unmounts every layer stacked on a path.

use std::path::{Path, PathBuf};

use super::error::{NodeError, Result};
use super::exec;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The path inside the source file system that is mounted (`/` for a whole fs, the
    /// device node's name for a bind-mounted device).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            if left.len() < 6 || right.len() < 2 {
                return None;
            }
            Some(MountEntry {
                root: PathBuf::from(unescape(left[3])),
                mount_point: PathBuf::from(unescape(left[4])),
                options: left[5].to_string(),
                fs_type: right[0].to_string(),
                source: unescape(right[1]),
            })
        })
        .collect()
}

/// The current mount table.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| NodeError::io("Reading /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// The top-most mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    let wanted = normalize(path);
    Ok(mounts()?.into_iter().rfind(|m| m.mount_point == wanted))
}

/// `path` with symlinks resolved when it exists (mountinfo shows resolved paths).
pub fn normalize(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `mount -t FSTYPE -o OPTIONS SOURCE TARGET`.
pub async fn mount(source: &Path, target: &Path, fs_type: &str, options: &[String]) -> Result<()> {
    let mut args: Vec<String> = vec!["-t".into(), fs_type.into()];
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.join(","));
    }
    args.push(source.display().to_string());
    args.push(target.display().to_string());
    exec::run("mount", &args, exec::SHORT).await?;
    Ok(())
}

/// Bind-mounts `source` onto `target`, then remounts it read-only when asked (a bind mount
/// ignores `ro` on the first call).
pub async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    exec::run("mount", &[Path::new("--bind"), source, target], exec::SHORT).await?;
    if read_only {
        let remount = exec::run(
            "mount",
            &[Path::new("-o"), Path::new("remount,bind,ro"), target],
            exec::SHORT,
        )
        .await;
        if let Err(err) = remount {
            // Never leave a writable mount behind a read-only request.
            let _ = unmount(target).await;
            return Err(err);
        }
    }
    Ok(())
}

/// Unmounts every mount stacked at `path`; `Ok` when nothing is mounted there.
pub async fn unmount(path: &Path) -> Result<()> {
    for _ in 0..16 {
        if mount_at(path)?.is_none() {
            return Ok(());
        }
        exec::run("umount", &[path], exec::SHORT).await?;
    }
    Err(NodeError::io(
        format!("{} still has mounts after 16 unmounts", path.display()),
        std::io::Error::other("mount stack too deep"),
    ))
}

/// `statvfs(2)` of a mounted path.
pub fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut out = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `out` points to writable
    // memory of the right size; statvfs fills it completely when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), out.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so `out` is initialised.
    Ok(unsafe { out.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines_with_escapes() {
        let text = "\
36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw,errors=continue
41 30 0:40 / /var/lib/x/staging rw,relatime shared:5 - ext4 /dev/loop3 rw
42 30 0:5 /loop3 /var/lib/x/target ro,nosuid - devtmpfs udev rw
garbage";
        let entries = parse_mountinfo(text);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].mount_point, PathBuf::from("/mnt two"));
        assert_eq!(entries[0].root, PathBuf::from("/mnt1"));
        assert_eq!(entries[1].source, "/dev/loop3");
        assert_eq!(entries[1].fs_type, "ext4");
        assert!(!entries[1].read_only());
        assert!(entries[2].read_only());
        assert_eq!(entries[2].root, PathBuf::from("/loop3"));
    }

    #[test]
    fn unescape_leaves_plain_text_and_trailing_backslashes() {
        assert_eq!(unescape("/a/b"), "/a/b");
        assert_eq!(unescape("/a\\011b"), "/a\tb");
        assert_eq!(unescape("/a\\"), "/a\\");
        assert_eq!(unescape("/a\\09"), "/a\\09");
    }

    #[test]
    fn the_root_is_mounted() {
        assert!(mount_at(Path::new("/")).unwrap().is_some());
        assert!(statvfs(Path::new("/")).unwrap().f_blocks > 0);
    }
}
