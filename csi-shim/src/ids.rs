//! Names and ids: how CSI objects map onto blockd objects.
//!
//! - A CSI volume id is `NODE/VOLUME`, a snapshot id `NODE/VOLUME@SNAPSHOT`, where `NODE`
//!   is the node whose blockd holds the data (volumes live on one node) and `VOLUME`,
//!   `SNAPSHOT` are blockd names. Carrying the node lets every call tell "not here" (a
//!   volume or snapshot on another node: `RESOURCE_EXHAUSTED` for CreateVolume from it, so
//!   the provisioner reschedules) from "does not exist" (`NOT_FOUND`).
//! - A CSI name (the orchestrator's idempotency key, e.g. `pvc-<uuid>`) becomes the blockd
//!   name unchanged when it is a valid blockd name; otherwise a deterministic, collision-
//!   resistant name derived from it (`csi-` + 40 hex digits of its SHA-256). The mapping is a
//!   pure function, so a retried CreateVolume finds the volume it made before.

use std::fmt;

use blockd_proto::model::{validate_name, NameKind};
use sha2::{Digest, Sha256};

/// The driver name registered with Kubernetes.
pub const DRIVER_NAME: &str = "blockd.csi.io";

/// The topology key whose value is the node holding a volume.
pub const TOPOLOGY_KEY: &str = "topology.blockd.io/node";

/// Why an id could not be parsed. Its `Display` is a sentence for an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id {id:?} is malformed: expected {expected}")]
    Malformed {
        kind: &'static str,
        id: String,
        expected: &'static str,
    },
}

/// A parsed CSI volume id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeId {
    pub node: String,
    pub volume: String,
}

impl IdError {
    fn malformed(kind: &'static str, id: &str, expected: &'static str) -> Self {
        IdError::Malformed {
            kind,
            id: id.to_string(),
            expected,
        }
    }
}

/// Parses an id `NODE/NAME` of a `kind` object (`expected` spells that form in the error):
/// NAME has no `/` or `@` and is a valid blockd name of `name_kind` (checked as `field`).
pub(crate) fn parse_node_name<'a>(
    id: &'a str,
    kind: &'static str,
    expected: &'static str,
    name_kind: NameKind,
    field: &'static str,
) -> Result<(&'a str, &'a str), IdError> {
    let malformed = || IdError::malformed(kind, id, expected);
    let (node, name) = id.split_once('/').ok_or_else(malformed)?;
    if node.is_empty() || name.contains('/') || name.contains('@') {
        return Err(malformed());
    }
    validate_name(name_kind, field, name).map_err(|_| malformed())?;
    Ok((node, name))
}

impl VolumeId {
    pub fn new(node: impl Into<String>, volume: impl Into<String>) -> Self {
        VolumeId {
            node: node.into(),
            volume: volume.into(),
        }
    }

    pub fn parse(id: &str) -> Result<Self, IdError> {
        let (node, volume) =
            parse_node_name(id, "volume", "NODE/VOLUME", NameKind::Volume, "volume_id")?;
        Ok(VolumeId::new(node, volume))
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.volume)
    }
}

/// A parsed CSI snapshot id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    pub node: String,
    pub volume: String,
    pub snapshot: String,
}

impl SnapshotId {
    pub fn new(
        node: impl Into<String>,
        volume: impl Into<String>,
        snapshot: impl Into<String>,
    ) -> Self {
        SnapshotId {
            node: node.into(),
            volume: volume.into(),
            snapshot: snapshot.into(),
        }
    }

    pub fn parse(id: &str) -> Result<Self, IdError> {
        let malformed = || IdError::malformed("snapshot", id, "NODE/VOLUME@SNAPSHOT");
        let (node, image) = id.split_once('/').ok_or_else(malformed)?;
        let (volume, snapshot) = image.split_once('@').ok_or_else(malformed)?;
        if node.is_empty() || image.contains('/') || snapshot.contains('@') {
            return Err(malformed());
        }
        validate_name(NameKind::Volume, "snapshot_id", volume).map_err(|_| malformed())?;
        validate_name(NameKind::Snapshot, "snapshot_id", snapshot).map_err(|_| malformed())?;
        Ok(SnapshotId::new(node, volume, snapshot))
    }

    /// The blockd image name, `VOLUME@SNAPSHOT`.
    pub fn image(&self) -> String {
        format!("{}@{}", self.volume, self.snapshot)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.node, self.volume, self.snapshot)
    }
}

/// The blockd name for a CSI volume or snapshot name (see the module docs).
pub fn blockd_name(kind: NameKind, csi_name: &str) -> String {
    if validate_name(kind, "name", csi_name).is_ok() {
        return csi_name.to_string();
    }
    let digest = Sha256::digest(csi_name.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("csi-{hex}")
}

/// The volume context key the orchestrator sets to `"true"` on NodePublishVolume of a CSI
/// inline ephemeral volume (one declared in the pod, created and deleted by the node).
pub const EPHEMERAL_CONTEXT_KEY: &str = "csi.storage.k8s.io/ephemeral";

/// The blockd name of the inline ephemeral volume kubelet publishes as `volume_id`:
/// `eph-` + 32 hex digits (128 bits) of the id's SHA-256. A pure function, so a retried
/// NodePublishVolume (after a crash, too) finds the volume it created before; the prefix
/// tells these volumes apart in `blockctl volume list`. Short on purpose: the name is part
/// of the attachment's unix socket paths, which must stay under `SUN_LEN` (no longer
/// than the `pvc-<uuid>` names of provisioned volumes).
pub fn ephemeral_volume_name(volume_id: &str) -> String {
    let digest = Sha256::digest(volume_id.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("eph-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_round_trip_and_reject_garbage() {
        let id = VolumeId::new("node-a", "pvc-1");
        assert_eq!(id.to_string(), "node-a/pvc-1");
        assert_eq!(VolumeId::parse("node-a/pvc-1").unwrap(), id);
        for bad in [
            "", "pvc-1", "/pvc-1", "node/", "node/a/b", "node/a@s", "node/UP",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn snapshot_ids_round_trip_and_reject_garbage() {
        let id = SnapshotId::new("n1", "vol", "snap-1");
        assert_eq!(id.to_string(), "n1/vol@snap-1");
        assert_eq!(id.image(), "vol@snap-1");
        assert_eq!(SnapshotId::parse("n1/vol@snap-1").unwrap(), id);
        for bad in ["", "n1/vol", "n1/vol@", "/vol@s", "n1/v/x@s", "n1/vol@s@t"] {
            assert!(SnapshotId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn csi_names_map_deterministically() {
        assert_eq!(blockd_name(NameKind::Volume, "pvc-0a1b"), "pvc-0a1b");
        let odd = blockd_name(NameKind::Volume, "My Volume/1");
        assert_eq!(odd, blockd_name(NameKind::Volume, "My Volume/1"));
        assert!(odd.starts_with("csi-") && odd.len() == 44);
        assert_ne!(odd, blockd_name(NameKind::Volume, "My Volume/2"));
        assert!(validate_name(NameKind::Volume, "name", &odd).is_ok());
    }

    #[test]
    fn ephemeral_names_are_deterministic_valid_blockd_names() {
        let id = "csi-8f2e0c0b5d7a4f0f9b1e2d3c4b5a69788f2e0c0b5d7a4f0f9b1e2d3c4b5a6978";
        let name = ephemeral_volume_name(id);
        assert_eq!(name, ephemeral_volume_name(id));
        assert_ne!(name, ephemeral_volume_name("csi-other"));
        assert!(name.starts_with("eph-") && name.len() == 36);
        assert!(validate_name(NameKind::Volume, "name", &name).is_ok());
        // It is a volume id's volume part too, so the node can stage it like any volume.
        assert!(VolumeId::parse(&format!("node-a/{name}")).is_ok());
    }
}
