//! The node layer's errors and the one place they become CSI status codes.
//!
//! Every variant names what went wrong in terms an operator can act on: the volume, the
//! path, the command that failed and what it printed. The mapping onto gRPC codes follows
//! the per-RPC error tables of the CSI spec (v1.13): missing fields are
//! `INVALID_ARGUMENT`, a volume that does not exist (or lives on another node, or is not
//! at the `volume_path` asked about) is `NOT_FOUND`, a staged or published volume asked
//! for with an incompatible capability is `ALREADY_EXISTS`, publishing before staging is
//! `FAILED_PRECONDITION`.
//!
//! Which error a request gets when it has several problems is the handlers' order, not
//! this mapping: every field variant (`MissingField`, `RelativePath`, `BadCapability`,
//! `UnsupportedFsType`) is raised before any variant that needs the volume id looked up
//! (`MalformedId`, `OtherNode`, `VolumeNotFound`, `UnknownPath`, ...).

use std::path::PathBuf;
use std::time::Duration;

use tonic::Status;

use crate::ids::IdError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0} is required")]
    MissingField(&'static str),

    #[error("{field} must be an absolute path, got {path:?}")]
    RelativePath { field: &'static str, path: PathBuf },

    #[error("Volume capability: {0}")]
    BadCapability(&'static str),

    #[error("File system type {0:?} is not supported; use ext4 or xfs")]
    UnsupportedFsType(String),

    #[error(
        "Access mode {0} is not supported: blockd volumes live on one node \
         (use SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER \
         or SINGLE_NODE_READER_ONLY)"
    )]
    UnsupportedAccessMode(String),

    #[error("{0}")]
    MalformedId(#[from] IdError),

    #[error("Volume {volume_id} lives on node {owner:?}, not on this node ({here:?})")]
    OtherNode {
        volume_id: String,
        owner: String,
        here: String,
    },

    #[error("Volume {volume_id} does not exist in blockd")]
    VolumeNotFound { volume_id: String },

    #[error("Volume {volume_id} is not staged on this node; call NodeStageVolume first")]
    NotStaged { volume_id: String },

    #[error(
        "Volume {volume_id} is staged at {staged:?}, not at {requested:?}; \
         a volume has one staging path per node"
    )]
    StagedElsewhere {
        volume_id: String,
        staged: PathBuf,
        requested: PathBuf,
    },

    #[error(
        "Volume {volume_id} is already staged at {path:?} with an incompatible capability \
         ({staged}); requested {requested}"
    )]
    IncompatibleStage {
        volume_id: String,
        path: PathBuf,
        staged: String,
        requested: String,
    },

    #[error(
        "Volume {volume_id} is already published at {target:?} with different arguments \
         ({published}); requested {requested}"
    )]
    IncompatiblePublish {
        volume_id: String,
        target: PathBuf,
        published: String,
        requested: String,
    },

    #[error(
        "Volume {volume_id} was staged with {staged}; it cannot be published with {requested}"
    )]
    CapabilityMismatch {
        volume_id: String,
        staged: String,
        requested: String,
    },

    #[error(
        "Volume {volume_id} is already published at {other:?} and its access mode {mode} \
         allows one publication on a node"
    )]
    SingleWriter {
        volume_id: String,
        other: PathBuf,
        mode: String,
    },

    #[error("Volume {volume_id} is still published at {targets:?}; unpublish it first")]
    StillPublished {
        volume_id: String,
        targets: Vec<PathBuf>,
    },

    #[error("Volume {volume_id} is neither staged nor published at {path:?}")]
    UnknownPath { volume_id: String, path: PathBuf },

    #[error(
        "Volume {volume_id} holds a {found} file system but {requested} was requested; \
         a volume with data is never reformatted"
    )]
    FsMismatch {
        volume_id: String,
        found: String,
        requested: String,
    },

    #[error(
        "Volume {volume_id} is {available} bytes in blockd but {required} bytes were \
         requested; expand it through the controller first"
    )]
    CapacityOutOfRange {
        volume_id: String,
        required: u64,
        available: u64,
    },

    #[error(
        "Cannot grow {device:?} online: it is {device_size} bytes while the volume is \
         {volume_size} bytes ({detail})"
    )]
    OnlineGrowUnsupported {
        device: PathBuf,
        device_size: u64,
        volume_size: u64,
        detail: String,
    },

    #[error(
        "Cannot {action}: the kernel requires {capability}, which csi-shim does not hold \
         (grant it to the container, or expand the volume while it is unstaged)"
    )]
    MissingCapability {
        capability: &'static str,
        action: String,
    },

    #[error("Cannot attach with {mode}: {reason}")]
    AttachUnavailable { mode: &'static str, reason: String },

    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("`{command}` did not finish within {timeout:?}")]
    CommandTimeout { command: String, timeout: Duration },

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("Blockd: {0}")]
    Blockd(Status),
}

impl NodeError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        NodeError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<NodeError> for Status {
    fn from(err: NodeError) -> Status {
        // `Display` skips the `#[source]`; the status carries the whole chain.
        let message = match &err {
            NodeError::Io { context, source } => format!("{context}: {source}"),
            NodeError::Blockd(status) => return status.clone(),
            other => other.to_string(),
        };
        match err {
            NodeError::MissingField(_)
            | NodeError::RelativePath { .. }
            | NodeError::BadCapability(_)
            | NodeError::UnsupportedFsType(_) => Status::invalid_argument(message),
            NodeError::MalformedId(_)
            | NodeError::OtherNode { .. }
            | NodeError::VolumeNotFound { .. }
            | NodeError::UnknownPath { .. } => Status::not_found(message),
            NodeError::IncompatibleStage { .. }
            | NodeError::IncompatiblePublish { .. }
            | NodeError::StagedElsewhere { .. } => Status::already_exists(message),
            NodeError::UnsupportedAccessMode(_)
            | NodeError::NotStaged { .. }
            | NodeError::CapabilityMismatch { .. }
            | NodeError::SingleWriter { .. }
            | NodeError::StillPublished { .. }
            | NodeError::FsMismatch { .. }
            | NodeError::OnlineGrowUnsupported { .. }
            | NodeError::MissingCapability { .. }
            | NodeError::AttachUnavailable { .. } => Status::failed_precondition(message),
            NodeError::CapacityOutOfRange { .. } => Status::out_of_range(message),
            NodeError::CommandTimeout { .. } => Status::deadline_exceeded(message),
            NodeError::Command { .. } | NodeError::Io { .. } => Status::internal(message),
            NodeError::Blockd(status) => status,
        }
    }
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;
