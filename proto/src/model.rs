//! Validated domain types for incoming `blockd.v1` requests.
//!
//! Every request the daemon acts on first goes through a `TryFrom<v1::…Request>` here.
//! What comes out is known to be well formed: names follow the naming rule, sizes are
//! positive, page tokens are ones this server hands out. What goes wrong becomes a
//! [`ValidationError`], which converts into `INVALID_ARGUMENT` naming the field and the
//! cause. Whether the named objects exist is the engine's business, not this module's.
//!
//! The naming rule is [`crate::rules`]' (the engine enforces the same one). An image is
//! `VOLUME` or `VOLUME@SNAPSHOT`.

use std::fmt;

use crate::{rules, v1};

pub use crate::rules::MAX_NAME_LEN;
/// Most entries one list page returns (a larger `page_size` is capped to it).
pub const MAX_PAGE_SIZE: usize = 1000;

/// What kind of object a name belongs to, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Pool,
    Volume,
    Snapshot,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Pool => "pool",
            NameKind::Volume => "volume",
            NameKind::Snapshot => "snapshot",
        })
    }
}

/// A request field that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("Invalid {kind} name {name:?} in field {field}: {reason}")]
    InvalidName {
        kind: NameKind,
        field: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("Invalid image name {image:?}: {reason}")]
    InvalidImage { image: String, reason: String },
    #[error("Invalid size in field {field}: {reason}")]
    InvalidSize {
        field: &'static str,
        reason: &'static str,
    },
    #[error("Invalid page_token {token:?}: not a token this server handed out")]
    InvalidPageToken { token: String },
    #[error("Invalid field {field}: {reason}")]
    InvalidField {
        field: &'static str,
        reason: &'static str,
    },
}

impl From<ValidationError> for tonic::Status {
    fn from(err: ValidationError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

type Result<T> = std::result::Result<T, ValidationError>;

/// Checks `name` against the naming rule ([`crate::rules::check_name`]).
pub fn validate_name(kind: NameKind, field: &'static str, name: &str) -> Result<()> {
    rules::check_name(name).map_err(|why| ValidationError::InvalidName {
        kind,
        field,
        name: name.to_string(),
        reason: why.reason(),
    })
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(String);

        impl $ty {
            /// Validates `name` read from request field `field`.
            pub fn parse(field: &'static str, name: impl Into<String>) -> Result<Self> {
                let name = name.into();
                validate_name($kind, field, &name)?;
                Ok($ty(name))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A well-formed pool name.
    PoolName,
    NameKind::Pool
);
name_type!(
    /// A well-formed volume name.
    VolumeName,
    NameKind::Volume
);
name_type!(
    /// A well-formed snapshot name.
    SnapshotName,
    NameKind::Snapshot
);

/// An NBD image: a volume's read-write head or a read-only snapshot of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageRef {
    pub volume: VolumeName,
    pub snapshot: Option<SnapshotName>,
}

impl ImageRef {
    /// Parses `VOLUME` or `VOLUME@SNAPSHOT`.
    pub fn parse(image: &str) -> Result<Self> {
        let invalid = |err: ValidationError| ValidationError::InvalidImage {
            image: image.to_string(),
            reason: match err {
                ValidationError::InvalidName {
                    kind, name, reason, ..
                } => format!("{kind} name {name:?} {reason}"),
                other => other.to_string(),
            },
        };
        match image.split_once('@') {
            None => Ok(ImageRef {
                volume: VolumeName::parse("image", image).map_err(invalid)?,
                snapshot: None,
            }),
            Some((volume, snapshot)) => Ok(ImageRef {
                volume: VolumeName::parse("image", volume).map_err(invalid)?,
                snapshot: Some(SnapshotName::parse("image", snapshot).map_err(invalid)?),
            }),
        }
    }

    /// Snapshot images are read-only.
    pub fn read_only(&self) -> bool {
        self.snapshot.is_some()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.snapshot {
            None => write!(f, "{}", self.volume),
            Some(snap) => write!(f, "{}@{}", self.volume, snap),
        }
    }
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    Snapshot(SnapshotName),
    Volume(VolumeName),
}

/// QoS limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosLimits {
    pub max_iops: u64,
    pub max_bandwidth_bytes: u64,
}

impl From<v1::Qos> for QosLimits {
    fn from(q: v1::Qos) -> Self {
        QosLimits {
            max_iops: q.max_iops,
            max_bandwidth_bytes: q.max_bandwidth_bytes,
        }
    }
}

impl From<QosLimits> for v1::Qos {
    fn from(q: QosLimits) -> Self {
        v1::Qos {
            max_iops: q.max_iops,
            max_bandwidth_bytes: q.max_bandwidth_bytes,
        }
    }
}

/// A validated `CreateVolumeRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    pub name: VolumeName,
    /// Positive when given; None only for clones ("the source's size").
    pub size_bytes: Option<u64>,
    /// None: the default pool (or the source's pool for a clone).
    pub pool: Option<PoolName>,
    pub source: Option<VolumeSource>,
    pub qos: QosLimits,
    /// IOPS per GiB of size; when non-zero, `qos.max_iops` caps the scaled limit.
    pub iops_per_gb: u64,
}

impl TryFrom<v1::CreateVolumeRequest> for CreateVolume {
    type Error = ValidationError;

    fn try_from(req: v1::CreateVolumeRequest) -> Result<Self> {
        let name = VolumeName::parse("name", req.name)?;
        let source = match req.source {
            None => None,
            Some(v1::create_volume_request::Source::SourceSnapshot(s)) => Some(
                VolumeSource::Snapshot(SnapshotName::parse("source_snapshot", s)?),
            ),
            Some(v1::create_volume_request::Source::SourceVolume(v)) => {
                Some(VolumeSource::Volume(VolumeName::parse("source_volume", v)?))
            }
        };
        match (req.size_bytes, &source) {
            (Some(0), _) => {
                return Err(ValidationError::InvalidSize {
                    field: "size_bytes",
                    reason: "must be greater than 0",
                })
            }
            (None, None) => {
                return Err(ValidationError::InvalidSize {
                    field: "size_bytes",
                    reason: "is required for a volume without a content source",
                })
            }
            _ => {}
        }
        let pool = if req.pool.is_empty() {
            None
        } else {
            Some(PoolName::parse("pool", req.pool)?)
        };
        Ok(CreateVolume {
            name,
            size_bytes: req.size_bytes,
            pool,
            source,
            qos: QosLimits {
                max_iops: req.max_iops,
                max_bandwidth_bytes: req.max_bandwidth_bytes,
            },
            iops_per_gb: req.iops_per_gb,
        })
    }
}

/// A volume's QoS policy (see `blockd.v1.QosPolicy`); 0 = no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosPolicy {
    /// The IOPS limit, or with `iops_per_gb` the cap on the scaled limit.
    pub max_iops: u64,
    pub iops_per_gb: u64,
    pub max_bandwidth_bytes: u64,
}

impl From<v1::QosPolicy> for QosPolicy {
    fn from(p: v1::QosPolicy) -> Self {
        QosPolicy {
            max_iops: p.max_iops,
            iops_per_gb: p.iops_per_gb,
            max_bandwidth_bytes: p.max_bandwidth_bytes,
        }
    }
}

impl From<QosPolicy> for v1::QosPolicy {
    fn from(p: QosPolicy) -> Self {
        v1::QosPolicy {
            max_iops: p.max_iops,
            iops_per_gb: p.iops_per_gb,
            max_bandwidth_bytes: p.max_bandwidth_bytes,
        }
    }
}

/// A validated `SetVolumeQosPolicyRequest` (a missing `policy` means "unlimited").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetVolumeQosPolicy {
    pub name: VolumeName,
    pub policy: QosPolicy,
}

impl TryFrom<v1::SetVolumeQosPolicyRequest> for SetVolumeQosPolicy {
    type Error = ValidationError;

    fn try_from(req: v1::SetVolumeQosPolicyRequest) -> Result<Self> {
        Ok(SetVolumeQosPolicy {
            name: VolumeName::parse("name", req.name)?,
            policy: req.policy.map(QosPolicy::from).unwrap_or_default(),
        })
    }
}

/// A validated `ResizeVolumeRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeVolume {
    pub name: VolumeName,
    /// Positive.
    pub size_bytes: u64,
    pub force: bool,
}

impl TryFrom<v1::ResizeVolumeRequest> for ResizeVolume {
    type Error = ValidationError;

    fn try_from(req: v1::ResizeVolumeRequest) -> Result<Self> {
        let name = VolumeName::parse("name", req.name)?;
        if req.size_bytes == 0 {
            return Err(ValidationError::InvalidSize {
                field: "size_bytes",
                reason: "must be greater than 0",
            });
        }
        Ok(ResizeVolume {
            name,
            size_bytes: req.size_bytes,
            force: req.force,
        })
    }
}

/// A validated `SetVolumeQosRequest` (a missing `qos` means "unlimited").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetVolumeQos {
    pub name: VolumeName,
    pub qos: QosLimits,
}

impl TryFrom<v1::SetVolumeQosRequest> for SetVolumeQos {
    type Error = ValidationError;

    fn try_from(req: v1::SetVolumeQosRequest) -> Result<Self> {
        Ok(SetVolumeQos {
            name: VolumeName::parse("name", req.name)?,
            qos: req.qos.map(QosLimits::from).unwrap_or_default(),
        })
    }
}

/// A validated `CreateSnapshotRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSnapshot {
    pub volume: VolumeName,
    pub name: SnapshotName,
    /// A canonical (lower-case, hyphenated) UUID, when given.
    pub replica_of: Option<String>,
}

impl TryFrom<v1::CreateSnapshotRequest> for CreateSnapshot {
    type Error = ValidationError;

    fn try_from(req: v1::CreateSnapshotRequest) -> Result<Self> {
        let replica_of = match req.replica_of.as_str() {
            "" => None,
            id if is_canonical_uuid(id) => Some(id.to_string()),
            _ => {
                return Err(ValidationError::InvalidField {
                    field: "replica_of",
                    reason: "not a snapshot id (a lower-case UUID like 0f6a4c1e-7d3b-4a57-9a0e-2b1c3d4e5f60)",
                })
            }
        };
        Ok(CreateSnapshot {
            volume: VolumeName::parse("volume", req.volume)?,
            name: SnapshotName::parse("name", req.name)?,
            replica_of,
        })
    }
}

/// `8-4-4-4-12` lower-case hexadecimal digits, as blockd writes ids.
fn is_canonical_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// A validated `ListSnapshotsRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSnapshots {
    pub volume: Option<VolumeName>,
    pub page: PageRequest,
}

impl TryFrom<v1::ListSnapshotsRequest> for ListSnapshots {
    type Error = ValidationError;

    fn try_from(req: v1::ListSnapshotsRequest) -> Result<Self> {
        let volume = if req.volume.is_empty() {
            None
        } else {
            Some(VolumeName::parse("volume", req.volume)?)
        };
        Ok(ListSnapshots {
            volume,
            page: PageRequest::new(req.page_size, &req.page_token)?,
        })
    }
}

macro_rules! name_request {
    ($req:ty => $ty:ident . $field:ident) => {
        impl TryFrom<$req> for $ty {
            type Error = ValidationError;

            fn try_from(req: $req) -> Result<Self> {
                $ty::parse(stringify!($field), req.$field)
            }
        }
    };
}

name_request!(v1::GetPoolRequest => PoolName.name);
name_request!(v1::GetVolumeRequest => VolumeName.name);
name_request!(v1::DeleteVolumeRequest => VolumeName.name);
name_request!(v1::FlattenVolumeRequest => VolumeName.name);
name_request!(v1::GetSnapshotRequest => SnapshotName.name);
name_request!(v1::DeleteSnapshotRequest => SnapshotName.name);
name_request!(v1::GetGroupSnapshotRequest => SnapshotName.name);
name_request!(v1::DeleteGroupSnapshotRequest => SnapshotName.name);

/// A validated `CreateGroupSnapshotRequest`: a group name (the snapshot naming rule) and
/// at least one volume, each named once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateGroupSnapshot {
    pub name: SnapshotName,
    pub volumes: Vec<VolumeName>,
}

impl TryFrom<v1::CreateGroupSnapshotRequest> for CreateGroupSnapshot {
    type Error = ValidationError;

    fn try_from(req: v1::CreateGroupSnapshotRequest) -> Result<Self> {
        let name = SnapshotName::parse("name", req.name)?;
        if req.volumes.is_empty() {
            return Err(ValidationError::InvalidField {
                field: "volumes",
                reason: "a group snapshot needs at least one volume",
            });
        }
        let volumes = req
            .volumes
            .into_iter()
            .map(|v| VolumeName::parse("volumes", v))
            .collect::<Result<Vec<_>>>()?;
        let distinct: std::collections::BTreeSet<&VolumeName> = volumes.iter().collect();
        if distinct.len() != volumes.len() {
            return Err(ValidationError::InvalidField {
                field: "volumes",
                reason: "each volume may be listed once",
            });
        }
        Ok(CreateGroupSnapshot { name, volumes })
    }
}

impl TryFrom<v1::ExportRequest> for ImageRef {
    type Error = ValidationError;

    fn try_from(req: v1::ExportRequest) -> Result<Self> {
        ImageRef::parse(&req.image)
    }
}

impl TryFrom<v1::AttachUblkRequest> for ImageRef {
    type Error = ValidationError;

    fn try_from(req: v1::AttachUblkRequest) -> Result<Self> {
        ImageRef::parse(&req.image)
    }
}

impl TryFrom<v1::DetachUblkRequest> for ImageRef {
    type Error = ValidationError;

    fn try_from(req: v1::DetachUblkRequest) -> Result<Self> {
        ImageRef::parse(&req.image)
    }
}

impl TryFrom<v1::UnexportRequest> for ImageRef {
    type Error = ValidationError;

    fn try_from(req: v1::UnexportRequest) -> Result<Self> {
        ImageRef::parse(&req.image)
    }
}

/// One page of a list call: at most `size` entries whose key sorts after `after`.
///
/// Page tokens are opaque to clients; this server writes the last key of a page into
/// them (hex, behind a version tag), so that a page stays correct when objects are
/// created or deleted between calls. A token that does not decode is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub size: usize,
    pub after: Option<String>,
}

const TOKEN_TAG: &[u8] = b"blockd.v1/after/";

impl PageRequest {
    /// `page_size` 0 means "all" (capped at [`MAX_PAGE_SIZE`] like any other size).
    pub fn new(page_size: u32, page_token: &str) -> Result<Self> {
        let size = match page_size as usize {
            0 => MAX_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(
                decode_token(page_token).ok_or_else(|| ValidationError::InvalidPageToken {
                    token: page_token.to_string(),
                })?,
            )
        };
        Ok(PageRequest { size, after })
    }

    /// Takes this page out of `items` (any order); returns it sorted by `key` and the
    /// token of the next page (empty when this is the last one).
    pub fn apply<T>(&self, mut items: Vec<T>, key: impl Fn(&T) -> &str) -> (Vec<T>, String) {
        items.sort_by(|a, b| key(a).cmp(key(b)));
        let start = match &self.after {
            None => 0,
            Some(after) => items.partition_point(|item| key(item) <= after.as_str()),
        };
        let mut page: Vec<T> = items.into_iter().skip(start).collect();
        let next = if page.len() > self.size {
            page.truncate(self.size);
            page.last()
                .map(|last| encode_token(key(last)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        (page, next)
    }
}

/// The token of the page after the one ending with `last_key`.
pub fn encode_token(last_key: &str) -> String {
    let mut out = String::with_capacity(2 * (TOKEN_TAG.len() + last_key.len()));
    for b in TOKEN_TAG.iter().chain(last_key.as_bytes()) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn decode_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return None;
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let key = bytes.strip_prefix(TOKEN_TAG)?;
    let key = String::from_utf8(key.to_vec()).ok()?;
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, size: Option<u64>) -> v1::CreateVolumeRequest {
        v1::CreateVolumeRequest {
            name: name.into(),
            size_bytes: size,
            ..Default::default()
        }
    }

    #[test]
    fn names_follow_the_rule() {
        for good in ["a", "0", "vol-1", "a.b_c-d", &"x".repeat(128)] {
            validate_name(NameKind::Volume, "name", good).expect(good);
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "A",
            "a/b",
            "a b",
            "a@b",
            "a..b",
            "é",
            &"x".repeat(129),
        ] {
            let err = validate_name(NameKind::Volume, "name", bad).expect_err(bad);
            assert!(err.to_string().starts_with("Invalid volume name"), "{err}");
        }
    }

    #[test]
    fn create_volume_validates_every_field() {
        let ok = CreateVolume::try_from(create("v", Some(4096))).unwrap();
        assert_eq!(ok.size_bytes, Some(4096));
        assert_eq!(ok.pool, None);

        let err = CreateVolume::try_from(create("", Some(1))).unwrap_err();
        assert!(matches!(
            err,
            ValidationError::InvalidName { field: "name", .. }
        ));
        let err = CreateVolume::try_from(create("v", Some(0))).unwrap_err();
        assert!(err.to_string().contains("greater than 0"), "{err}");
        let err = CreateVolume::try_from(create("v", None)).unwrap_err();
        assert!(err.to_string().contains("required"), "{err}");

        let mut req = create("v", None);
        req.source = Some(v1::create_volume_request::Source::SourceSnapshot(
            "s1".into(),
        ));
        let clone = CreateVolume::try_from(req).unwrap();
        assert_eq!(clone.size_bytes, None);

        let mut req = create("v", Some(1));
        req.pool = "Bad".into();
        let err = CreateVolume::try_from(req).unwrap_err();
        assert!(matches!(
            err,
            ValidationError::InvalidName { field: "pool", .. }
        ));

        let status: tonic::Status = CreateVolume::try_from(create("a b", Some(1)))
            .unwrap_err()
            .into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("\"a b\""), "{}", status.message());
    }

    #[test]
    fn images_parse() {
        let vol = ImageRef::parse("vol").unwrap();
        assert!(!vol.read_only());
        assert_eq!(vol.to_string(), "vol");
        let snap = ImageRef::parse("vol@s1").unwrap();
        assert!(snap.read_only());
        assert_eq!(snap.to_string(), "vol@s1");
        for bad in ["", "@s", "v@", "v@s@t", "V", "v/s"] {
            ImageRef::parse(bad).expect_err(bad);
        }
    }

    #[test]
    fn pages_walk_every_item_once() {
        let items: Vec<String> = (0..25).map(|i| format!("v{i:02}")).collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = PageRequest::new(10, &token).unwrap();
            let (got, next) = page.apply(items.clone(), |s| s.as_str());
            assert!(got.len() <= 10);
            seen.extend(got);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, items);

        let (all, next) = PageRequest::new(0, "").unwrap().apply(items.clone(), |s| s);
        assert_eq!(all.len(), 25);
        assert!(next.is_empty());
    }

    #[test]
    fn pages_survive_deletions_between_calls() {
        let items: Vec<String> = (0..6).map(|i| format!("v{i}")).collect();
        let (first, next) = PageRequest::new(3, "").unwrap().apply(items.clone(), |s| s);
        assert_eq!(first, ["v0", "v1", "v2"]);
        let rest: Vec<String> = items.into_iter().filter(|s| s != "v2").collect();
        let (second, next) = PageRequest::new(3, &next).unwrap().apply(rest, |s| s);
        assert_eq!(second, ["v3", "v4", "v5"]);
        assert!(next.is_empty());
    }

    #[test]
    fn bad_page_tokens_are_refused() {
        for bad in [
            "x",
            "zz",
            "abc",
            "00",
            &encode_token("v")[2..],
            "ff".repeat(20).as_str(),
        ] {
            let err = PageRequest::new(10, bad).expect_err(bad);
            assert!(matches!(err, ValidationError::InvalidPageToken { .. }));
        }
        assert!(PageRequest::new(10, &encode_token("v")).is_ok());
    }

    #[test]
    fn group_snapshot_requests_are_validated() {
        let req = |name: &str, volumes: &[&str]| v1::CreateGroupSnapshotRequest {
            name: name.into(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
        };
        let ok = CreateGroupSnapshot::try_from(req("nightly", &["db", "wal"])).unwrap();
        assert_eq!(ok.name.as_str(), "nightly");
        assert_eq!(ok.volumes.len(), 2);
        for (bad, field) in [
            (req("", &["db"]), "name"),
            (req("Nightly", &["db"]), "name"),
            (req("g", &[]), "volumes"),
            (req("g", &["db", "db"]), "volumes"),
            (req("g", &["db", "Bad"]), "volumes"),
        ] {
            let err = CreateGroupSnapshot::try_from(bad.clone()).expect_err(&format!("{bad:?}"));
            assert!(err.to_string().contains(field), "{bad:?}: {err}");
        }
    }
}
