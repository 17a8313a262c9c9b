//! Durable records (values of the `pools`, `images`, `lineages` and `intents` column
//! families) and their encoding. JSON keeps them inspectable with `ldb`; they are few and
//! small, so the encoding cost never shows on the data path (the map CF uses fixed 8-byte
//! values, see `meta::keys`).

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
    /// Snapshots: the group snapshot this one belongs to (empty: none). See `engine::group`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
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
