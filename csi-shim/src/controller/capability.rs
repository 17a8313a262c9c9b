//! Volume capabilities: which access modes and access types a blockd volume serves.
//!
//! A blockd volume lives on one node and is attached there once, so every `SINGLE_NODE_*`
//! mode is supported and every `MULTI_NODE_*` mode is not. Both access types are: raw
//! block, and mount with ext4, xfs or the default (empty `fs_type`, which the node service
//! turns into ext4).
//!
//! [`check`] answers with the first problem as a sentence; callers decide whether that is
//! `INVALID_ARGUMENT` (CreateVolume, GetCapacity) or an unconfirmed answer
//! (ValidateVolumeCapabilities). It checks every capability's required fields
//! ([`CapabilityError::is_missing_field`]) before whether any is supported, so that a
//! missing field is reported whichever capability lacks it.

use blockd_proto::csi::volume_capability::access_mode::Mode;
use blockd_proto::csi::volume_capability::AccessType;
use blockd_proto::csi::VolumeCapability;

use crate::params::FsType;

/// Why a set of capabilities cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("volume_capabilities is required and must not be empty")]
    Missing,
    #[error("volume_capabilities[{index}]: access_mode is required")]
    NoAccessMode { index: usize },
    #[error("volume_capabilities[{index}]: access_type (block or mount) is required")]
    NoAccessType { index: usize },
    #[error(
        "volume_capabilities[{index}]: access mode {mode} is not supported: a blockd volume \
         is attached to one node at a time (use SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY, \
         SINGLE_NODE_SINGLE_WRITER or SINGLE_NODE_MULTI_WRITER)"
    )]
    UnsupportedMode { index: usize, mode: String },
    #[error(
        "volume_capabilities[{index}]: file system {fs_type:?} is not supported (use ext4, \
         xfs, or leave fs_type empty for ext4)"
    )]
    UnsupportedFs { index: usize, fs_type: String },
}

impl CapabilityError {
    /// Whether this is a required field that is missing (the request is malformed), as
    /// opposed to a well-formed capability blockd does not support.
    pub fn is_missing_field(&self) -> bool {
        match self {
            CapabilityError::Missing
            | CapabilityError::NoAccessMode { .. }
            | CapabilityError::NoAccessType { .. } => true,
            CapabilityError::UnsupportedMode { .. } | CapabilityError::UnsupportedFs { .. } => {
                false
            }
        }
    }
}

impl From<CapabilityError> for tonic::Status {
    fn from(err: CapabilityError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

/// What a valid set of capabilities asks of the volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// Some capability uses the mount access type.
    pub mount: bool,
    /// Some capability uses the block access type.
    pub block: bool,
    /// The one file system named by mount capabilities, if any.
    pub fs_type: Option<FsType>,
}

/// Checks every capability (see the module docs).
pub fn check(capabilities: &[VolumeCapability]) -> Result<Access, CapabilityError> {
    if capabilities.is_empty() {
        return Err(CapabilityError::Missing);
    }
    // Required fields of every capability first, then what each one asks for.
    for (index, cap) in capabilities.iter().enumerate() {
        match &cap.access_mode {
            None => return Err(CapabilityError::NoAccessMode { index }),
            Some(mode) if mode.mode == Mode::Unknown as i32 => {
                return Err(CapabilityError::NoAccessMode { index })
            }
            Some(_) => {}
        }
        if cap.access_type.is_none() {
            return Err(CapabilityError::NoAccessType { index });
        }
    }
    let mut access = Access::default();
    for (index, cap) in capabilities.iter().enumerate() {
        let mode = cap
            .access_mode
            .as_ref()
            .ok_or(CapabilityError::NoAccessMode { index })?;
        match Mode::try_from(mode.mode) {
            Ok(
                Mode::SingleNodeWriter
                | Mode::SingleNodeReaderOnly
                | Mode::SingleNodeSingleWriter
                | Mode::SingleNodeMultiWriter,
            ) => {}
            Ok(Mode::Unknown) => return Err(CapabilityError::NoAccessMode { index }),
            Ok(other) => {
                return Err(CapabilityError::UnsupportedMode {
                    index,
                    mode: other.as_str_name().to_string(),
                })
            }
            Err(_) => {
                return Err(CapabilityError::UnsupportedMode {
                    index,
                    mode: format!("#{}", mode.mode),
                })
            }
        }
        match cap
            .access_type
            .as_ref()
            .ok_or(CapabilityError::NoAccessType { index })?
        {
            AccessType::Block(_) => access.block = true,
            AccessType::Mount(mount) => {
                access.mount = true;
                if !mount.fs_type.is_empty() {
                    let fs = FsType::parse(&mount.fs_type).ok_or_else(|| {
                        CapabilityError::UnsupportedFs {
                            index,
                            fs_type: mount.fs_type.clone(),
                        }
                    })?;
                    if access.fs_type.is_some_and(|seen| seen != fs) {
                        return Err(CapabilityError::UnsupportedFs {
                            index,
                            fs_type: format!(
                                "{} (another capability asks for {})",
                                fs,
                                access.fs_type.map(FsType::as_str).unwrap_or_default()
                            ),
                        });
                    }
                    access.fs_type = Some(fs);
                }
            }
        }
    }
    Ok(access)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockd_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: access,
        }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn single_node_modes_with_block_or_mount_pass() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            let a = check(&[cap(mode, Some(AccessType::Block(BlockVolume {})))]).unwrap();
            assert!(a.block && !a.mount);
            let a = check(&[cap(mode, mount("xfs"))]).unwrap();
            assert_eq!(a.fs_type, Some(FsType::Xfs));
            let a = check(&[cap(mode, mount(""))]).unwrap();
            assert_eq!(a.fs_type, None);
        }
    }

    #[test]
    fn bad_capabilities_are_named() {
        assert_eq!(check(&[]), Err(CapabilityError::Missing));
        for mode in [
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            let err = check(&[cap(mode, mount("ext4"))]).unwrap_err();
            assert!(err.to_string().contains(mode.as_str_name()), "{err}");
        }
        assert_eq!(
            check(&[cap(Mode::Unknown, mount(""))]),
            Err(CapabilityError::NoAccessMode { index: 0 })
        );
        let no_mode = VolumeCapability {
            access_mode: None,
            access_type: mount(""),
        };
        assert!(check(&[no_mode]).is_err());
        assert_eq!(
            check(&[cap(Mode::SingleNodeWriter, None)]),
            Err(CapabilityError::NoAccessType { index: 0 })
        );
        let err = check(&[cap(Mode::SingleNodeWriter, mount("btrfs"))]).unwrap_err();
        assert!(err.to_string().contains("btrfs"));
        let weird = VolumeCapability {
            access_mode: Some(AccessMode { mode: 99 }),
            access_type: mount(""),
        };
        assert!(check(&[weird]).is_err());
        let mixed = [
            cap(Mode::SingleNodeWriter, mount("ext4")),
            cap(Mode::SingleNodeWriter, mount("xfs")),
        ];
        assert!(check(&mixed).is_err());
    }

    #[test]
    fn missing_fields_come_before_unsupported_values() {
        // One capability both unsupported and incomplete: the missing field.
        let err = check(&[cap(Mode::MultiNodeMultiWriter, None)]).unwrap_err();
        assert_eq!(err, CapabilityError::NoAccessType { index: 0 });
        assert!(err.is_missing_field());
        // An unsupported capability before an incomplete one: still the missing field.
        let err = check(&[
            cap(Mode::SingleNodeWriter, mount("btrfs")),
            cap(Mode::SingleNodeWriter, None),
        ])
        .unwrap_err();
        assert_eq!(err, CapabilityError::NoAccessType { index: 1 });
        let err = check(&[cap(Mode::MultiNodeReaderOnly, mount(""))]).unwrap_err();
        assert!(!err.is_missing_field(), "{err}");
    }
}
