//! Volume capabilities as the node sees them: validation of the request's field, the
//! access modes blockd serves, and whether a repeated stage or a publish fits what is
//! staged.

use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_proto::csi::volume_capability::AccessType;
use blockd_proto::csi::VolumeCapability;

use super::error::{NodeError, Result};
use super::fs;
use super::state::{Access, Capability};

/// Whether a repeated NodeStageVolume matches what is staged. An empty requested fs type
/// means "whatever the volume holds".
pub(super) fn stage_compatible(staged: &Capability, requested: &Capability) -> bool {
    access_compatible(&staged.access, &requested.access) && staged.mode == requested.mode
}

/// Whether a publication's capability fits the staged volume (mode may differ: publish
/// decides read-only and single/multi writer per target).
pub(super) fn publish_compatible(staged: &Capability, requested: &Capability) -> bool {
    match (&staged.access, &requested.access) {
        (Access::Block, Access::Block) => true,
        (Access::Mount { fs_type: a, .. }, Access::Mount { fs_type: b, .. }) => {
            b.is_empty() || a == b
        }
        _ => false,
    }
}

fn access_compatible(staged: &Access, requested: &Access) -> bool {
    match (staged, requested) {
        (Access::Block, Access::Block) => true,
        (
            Access::Mount {
                fs_type: a,
                mount_flags: fa,
            },
            Access::Mount {
                fs_type: b,
                mount_flags: fb,
            },
        ) => {
            let mut fa = fa.clone();
            let mut fb = fb.clone();
            fa.sort();
            fb.sort();
            (b.is_empty() || a == b) && fa == fb
        }
        _ => false,
    }
}

/// Validates a capability's fields (`INVALID_ARGUMENT`) and turns it into the node's
/// form. Whether blockd supports its access mode is [`supported`]'s question, asked after
/// every field of the request is checked.
pub(super) fn capability(cap: Option<&VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or(NodeError::MissingField("volume_capability"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or(NodeError::BadCapability("access_mode is required"))?;
    let mode = Mode::try_from(mode.mode)
        .map_err(|_| NodeError::BadCapability("access_mode has an unknown value"))?;
    if mode == Mode::Unknown {
        return Err(NodeError::BadCapability("access_mode is required"));
    }
    let access = match cap.access_type.as_ref().ok_or(NodeError::BadCapability(
        "access_type (mount or block) is required",
    ))? {
        AccessType::Block(_) => Access::Block,
        AccessType::Mount(m) => {
            if !m.fs_type.is_empty() {
                fs::FsType::parse(&m.fs_type)?;
            }
            Access::Mount {
                fs_type: m.fs_type.clone(),
                mount_flags: m.mount_flags.clone(),
            }
        }
    };
    Ok(Capability {
        access,
        mode: mode.as_str_name().to_string(),
    })
}

/// Checks that blockd serves a (validated) capability's access mode: every
/// `SINGLE_NODE_*` mode, no `MULTI_NODE_*` one (a blockd volume lives on one node).
pub(super) fn supported(cap: &Capability) -> Result<()> {
    match Mode::from_str_name(&cap.mode) {
        Some(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => Ok(()),
        _ => Err(NodeError::UnsupportedAccessMode(cap.mode.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockd_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            })),
        }
    }

    #[test]
    fn capabilities_are_validated() {
        assert!(matches!(
            capability(None),
            Err(NodeError::MissingField("volume_capability"))
        ));
        let mut no_type = mount_cap("", Mode::SingleNodeWriter);
        no_type.access_type = None;
        assert!(matches!(
            capability(Some(&no_type)),
            Err(NodeError::BadCapability(_))
        ));
        assert!(matches!(
            capability(Some(&mount_cap("btrfs", Mode::SingleNodeWriter))),
            Err(NodeError::UnsupportedFsType(_))
        ));
        // A multi-node mode is a well-formed field that blockd does not support.
        let multi = capability(Some(&mount_cap("", Mode::MultiNodeMultiWriter))).unwrap();
        assert!(matches!(
            supported(&multi),
            Err(NodeError::UnsupportedAccessMode(_))
        ));
        let single = capability(Some(&mount_cap("", Mode::SingleNodeMultiWriter))).unwrap();
        assert!(supported(&single).is_ok());
        assert!(matches!(
            capability(Some(&mount_cap("", Mode::Unknown))),
            Err(NodeError::BadCapability(_))
        ));
        let block = VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        };
        assert_eq!(capability(Some(&block)).unwrap().access, Access::Block);
    }

    #[test]
    fn stage_compatibility_treats_an_empty_fs_type_as_any() {
        let staged = capability(Some(&mount_cap("xfs", Mode::SingleNodeWriter))).unwrap();
        let any = capability(Some(&mount_cap("", Mode::SingleNodeWriter))).unwrap();
        let ext4 = capability(Some(&mount_cap("ext4", Mode::SingleNodeWriter))).unwrap();
        let other_mode = capability(Some(&mount_cap("xfs", Mode::SingleNodeReaderOnly))).unwrap();
        assert!(stage_compatible(&staged, &any));
        assert!(!stage_compatible(&staged, &ext4));
        assert!(!stage_compatible(&staged, &other_mode));
        assert!(publish_compatible(&staged, &other_mode));
    }
}
