//! The node's record of staged volumes: one JSON file per volume under
//! `--state-dir/volumes/`, so that a restarted csi-shim (even after SIGKILL) knows what it
//! attached, where it mounted it and where it published it.
//!
//! Invariants:
//! - a record is replaced atomically (write a temporary file, fsync it, rename it over the
//!   old one, fsync the directory): a crash leaves the old record or the new one, never a
//!   torn one;
//! - a record is written as soon as resources exist that unstage must undo (after attach,
//!   before mkfs and mount), and removed only after they are all gone;
//! - the kernel (mount table, loop devices, processes) is the truth about what exists; a
//!   record says what we made and must clean up.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::attach::Attachment;
use super::error::{NodeError, Result};

/// How a volume is accessed, as staged or published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Access {
    /// A mounted file system of type `fs_type` (resolved: never empty).
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
    },
    /// The raw block device.
    Block,
}

impl Access {
    pub fn kind(&self) -> &'static str {
        match self {
            Access::Mount { .. } => "a file system",
            Access::Block => "a block device",
        }
    }
}

/// A capability in the form the node compares: access type and CSI access mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access: Access,
    /// The CSI access mode, by name (e.g. `SINGLE_NODE_WRITER`).
    pub mode: String,
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.access {
            Access::Mount {
                fs_type,
                mount_flags,
            } => write!(
                f,
                "mount fs_type={fs_type} mount_flags={mount_flags:?} mode={}",
                self.mode
            ),
            Access::Block => write!(f, "block mode={}", self.mode),
        }
    }
}

/// One publication of a staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub capability: Capability,
    pub readonly: bool,
}

/// How far staging got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Exported and attached; the file system may not exist or be mounted yet.
    Attached,
    /// Ready: mounted at the staging path (or, for block, the device recorded).
    Staged,
}

/// Everything the node made for one staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedVolume {
    pub volume_id: String,
    /// The blockd volume name.
    pub volume: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
    pub attachment: Attachment,
    pub phase: Phase,
    /// Target path → how it is published.
    #[serde(default)]
    pub published: BTreeMap<PathBuf, Publication>,
}

/// The directory of records.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
}

/// A file name for a volume id: letters, digits, `-`, `_` and `.` are kept, every other
/// byte becomes `%XX`, so ids map one-to-one onto names.
pub fn file_key(volume_id: &str) -> String {
    let mut out = String::with_capacity(volume_id.len());
    for b in volume_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl StateStore {
    /// Opens (creating) `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| NodeError::io(format!("Creating state directory {}", dir.display()), e))?;
        Ok(StateStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_key(volume_id)))
    }

    /// Every record in the directory. Unreadable files are reported and skipped, so one
    /// bad record does not stop the node from serving the others.
    pub fn load_all(&self) -> Result<Vec<StagedVolume>> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| NodeError::io(format!("Listing {}", self.dir.display()), e))?;
        let mut records = Vec::new();
        for entry in entries {
            let path = match entry {
                Ok(entry) => entry.path(),
                Err(err) => {
                    tracing::warn!(dir = %self.dir.display(), error = %err, "cannot list a state file");
                    continue;
                }
            };
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<StagedVolume>(&bytes).map_err(|e| e.to_string())
                }) {
                Ok(record) => records.push(record),
                Err(err) => {
                    tracing::error!(path = %path.display(), error = %err, "skipping unreadable state record")
                }
            }
        }
        Ok(records)
    }

    /// Writes `record` atomically and durably.
    pub fn save(&self, record: &StagedVolume) -> Result<()> {
        self.put(&record.volume_id, record)
    }

    /// The record stored under `key`, if any (a store of other record types than
    /// [`StagedVolume`], such as the node's inline ephemeral volumes).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let path = self.path(key);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(NodeError::io(
                    format!("Reading state record {}", path.display()),
                    e,
                ))
            }
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            NodeError::io(
                format!("Decoding state record {}", path.display()),
                std::io::Error::other(e),
            )
        })
    }

    /// Writes `value` under `key` atomically and durably.
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let path = self.path(key);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| NodeError::io("Encoding a state record", std::io::Error::other(e)))?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| NodeError::io(format!("Writing state record {}", path.display()), e))
    }

    /// Removes the record of `volume_id` (absent is fine).
    pub fn remove(&self, volume_id: &str) -> Result<()> {
        let path = self.path(volume_id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(NodeError::io(
                    format!("Removing state record {}", path.display()),
                    e,
                ))
            }
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| NodeError::io(format!("Syncing {}", self.dir.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::attach::Attachment;

    fn record(id: &str) -> StagedVolume {
        StagedVolume {
            volume_id: id.to_string(),
            volume: "vol".into(),
            staging_path: "/staging".into(),
            capability: Capability {
                access: Access::Mount {
                    fs_type: "ext4".into(),
                    mount_flags: vec!["noatime".into()],
                },
                mode: "SINGLE_NODE_WRITER".into(),
            },
            attachment: Attachment::FuseLoop {
                dir: "/state/attach/x".into(),
                device: "/dev/loop7".into(),
                fuse_server: "csi-fuse-nbd".into(),
                fuse_pid: 42,
                proxy_pid: None,
                uri: "nbd+unix:///vol?socket=/s".into(),
            },
            phase: Phase::Staged,
            published: BTreeMap::from([(
                PathBuf::from("/target"),
                Publication {
                    capability: Capability {
                        access: Access::Block,
                        mode: "SINGLE_NODE_WRITER".into(),
                    },
                    readonly: true,
                },
            )]),
        }
    }

    #[test]
    fn records_round_trip_and_are_replaced_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("volumes")).unwrap();
        let mut a = record("node-a/vol-1");
        store.save(&a).unwrap();
        store.save(&record("node-a/vol-2")).unwrap();
        a.phase = Phase::Attached;
        store.save(&a).unwrap();
        let mut all = store.load_all().unwrap();
        all.sort_by(|x, y| x.volume_id.cmp(&y.volume_id));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], a);
        store.remove("node-a/vol-1").unwrap();
        store.remove("node-a/vol-1").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
    }

    #[test]
    fn a_torn_record_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.save(&record("n/v")).unwrap();
        std::fs::write(dir.path().join("bad.json"), b"{\"volume_id\":").unwrap();
        std::fs::write(dir.path().join("x.json.tmp"), b"junk").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
    }

    #[test]
    fn file_keys_are_safe_and_distinct() {
        assert_eq!(file_key("node-a/vol-1"), "node-a%2Fvol-1");
        assert_eq!(file_key("../x"), "%2E.%2Fx");
        assert_ne!(file_key("a/b"), file_key("a%2Fb"));
    }
}
