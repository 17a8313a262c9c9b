//! Durable records (values of the `pools`, `images`, `lineages` and `intents` column
//! families) and their encoding. JSON keeps them inspectable with `ldb`; they are few and
//! small, so the encoding cost never shows on the data path (the map CF uses fixed 8-byte
//! values, see `meta::keys`).
//!
//! # Identities
//! Names are what people type; they can be reused after a delete. What an image *is*
//! is its `uuid`: a UUID v4 made at creation, never reused, persisted in the record. The
//! links between images are kept by id, so a name reused later never inherits them:
//! a snapshot's `origin_id` is the volume it was taken of, a clone's `source_id` the
//! snapshot or volume it was made from. The names next to them (`origin`, `source`) are
//! the names as they were then, kept for display and for `VOL@SNAP` export names.
//!
//! Records written before ids existed have none. `Engine::open` gives them theirs in
//! one synced batch, once, and they keep them from then on (`assign_legacy_ids`):
//! - a volume's id is derived from its lineage (one volume per lineage, for ever), so a
//!   snapshot whose volume is long gone can still name it: its `origin_id` is derived
//!   from the same lineage and matches no live volume;
//! - a snapshot's id is derived from its internal image id;
//! - a clone's `source_id` is the live image its parent pointer (lineage, epoch) names,
//!   or the derived id of the parent lineage's volume; a flattened clone (no parent any
//!   more) takes the live image of its source's name only if that image is older than
//!   the clone, else a fresh id that matches nothing (its source is gone).
//!
//! Derived ids are UUID v8 (RFC 9562 "custom"): bytes 0–5 from the pool's UUID, a kind
//! tag, then the 64-bit internal id: they never collide with each other, and never equal
//! a generated v4 id (the version nibble differs).

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::types::{Qos, QosPolicy, Source};
use crate::meta::{Cf, MetaError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub name: String,
    pub uuid: String,
    pub chunk_size: u64,
    pub size: u64,
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Volume,
    Snapshot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub kind: ImageKind,
    pub lineage: u64,
    /// For snapshots: the epoch it reads at. Unused for volumes (they read at the head).
    pub epoch: u64,
    pub size: u64,
    #[serde(default)]
    pub qos: Qos,
    /// Volumes: what `qos` is derived from (recomputed on resize). None: `qos` is fixed
    /// (records written before policies existed, and `set_qos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_policy: Option<QosPolicy>,
    #[serde(default)]
    pub source: Option<Source>,
    /// For snapshots: the volume it was taken from.
    #[serde(default)]
    pub origin: String,
    pub created_unix: u64,
    #[serde(default)]
    pub exported: bool,
    /// The ublk device (`/dev/ublkbN`, N) the image is attached as, kept so that blockd
    /// recovers the device after a restart (see `crate::ublk`). None: not attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ublk_device: Option<u32>,
    /// Snapshots: the group snapshot this one belongs to (empty: none). See `engine::group`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// The image's stable identity (see the module docs). Empty only in records written
    /// before ids existed, until `Engine::open` fills it in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    /// For snapshots: the `uuid` of the volume it was taken of (its lineage).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub origin_id: String,
    /// For clones: the `uuid` of the snapshot or volume named by `source`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_id: String,
    /// For snapshots taken by `import-diff`: the `uuid` of the snapshot (usually on
    /// another daemon) whose content this one reproduces, so that the next incremental
    /// stream, whose base is that snapshot, is known to apply here.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica_of: String,
}

/// Kind tags of derived (legacy) ids, byte 7 of the UUID.
const DERIVED_VOLUME: u8 = b'v';
const DERIVED_SNAPSHOT: u8 = b's';

fn derived_id(pool_uuid: &str, tag: u8, id: u64) -> String {
    let pool = uuid::Uuid::parse_str(pool_uuid).unwrap_or_default();
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&pool.as_bytes()[..6]);
    bytes[7] = tag;
    bytes[8..].copy_from_slice(&id.to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// The id of the volume of lineage `lineage` when its record predates ids.
pub fn derived_volume_id(pool_uuid: &str, lineage: u64) -> String {
    derived_id(pool_uuid, DERIVED_VOLUME, lineage)
}

/// The id of a snapshot whose record (internal id `image`) predates ids.
pub fn derived_snapshot_id(pool_uuid: &str, image: u64) -> String {
    derived_id(pool_uuid, DERIVED_SNAPSHOT, image)
}

/// A fresh identity for a new image.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Where a clone reads what it has not written itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub lineage: u64,
    pub epoch: u64,
    /// Bytes at and beyond this offset never fall through to the parent (the parent's size
    /// when the clone was made, lowered by a forced shrink).
    pub limit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageRecord {
    pub pool: u64,
    pub e_head: u64,
    pub parent: Option<ParentRef>,
    /// The volume writing at the head, None once it is deleted.
    pub head: Option<u64>,
}

/// A long operation's progress, resumed after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Copy every chunk a clone sees through its parent into the clone (at epoch 0),
    /// then drop the parent pointer. `cursor` is the next chunk to examine.
    Flatten { lineage: u64, cursor: u64 },
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialise")
}

pub fn decode<T: DeserializeOwned>(cf: Cf, bytes: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(bytes).map_err(|e| MetaError::Corrupt {
        cf,
        what: format!("record does not decode: {e}"),
    })
}
