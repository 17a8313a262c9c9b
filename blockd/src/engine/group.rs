//! Group snapshots: one crash-consistent instant across several volumes.
//!
//! A group snapshot of volumes `V1..Vn` named `G` is n ordinary snapshots, each tagged
//! with the group name (`ImageRecord::group`), taken at one instant:
//!
//! ```text
//! control lock ─▶ gates of every member lineage, exclusive (sorted by lineage id)
//!              ─▶ state: e_S(Vi) = e_head(Vi), e_head(Vi) += 1 for all i; n snapshot records
//!              ─▶ ONE commit (device flush, then one synced batch) ─▶ release the gates
//! ```
//!
//! Why this is write-order consistent: every write holds its lineage's gate shared from
//! before it reads its epoch until its remap is recorded, so once all the gates are held
//! no member write is in flight. A write a client issued after another completed (vol A
//! then vol B) is either wholly before the instant (both in the snapshot: the later one
//! cannot have started before the gates, or it would have finished before them too) or
//! after it (the earlier one finished before, but then the later one started after the
//! gate was released). So a member never contains a write whose predecessor on another
//! member is missing. The epochs and records reach RocksDB in one batch: after a crash
//! either the whole group exists or none of it.
//!
//! Invariants:
//! - A group exists iff some snapshot carries its name; its members are exactly those.
//! - Member snapshots are named by [`member_name`] (`GROUP-VOLUME`), a pure function, so
//!   a retry finds what the first call made. Snapshot names stay unique daemon-wide.
//! - Creating a group is idempotent for the same set of volumes; another set under the same
//!   name is `AlreadyExists`. A member cannot be deleted alone (it would break the group's
//!   instant for whoever restores "the group"); deleting the group deletes all members in
//!   one batch.

use std::collections::BTreeSet;

use crate::meta::keys;
use crate::meta::Cf;

use super::error::{EngineError, ObjectKind, Result};
use super::records::{ImageKind, ImageRecord};
use super::state::State;
use super::types::{Qos, SnapshotInfo, MAX_NAME_LEN};
use super::{image_put, lineage_put, next_id_put, now_unix, records, validate_name, Engine};

/// A group snapshot: its members, sorted by volume name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupSnapshotInfo {
    pub name: String,
    pub snapshots: Vec<SnapshotInfo>,
    pub created_unix: u64,
}

/// The name of the member snapshot of `volume` in group `group`: `GROUP-VOLUME`, or when
/// that is longer than a name may be, its first 111 characters, `-`, and 16 hex digits of a
/// hash of the whole (so distinct members stay distinct and the name stays valid).
pub fn member_name(group: &str, volume: &str) -> String {
    let full = format!("{group}-{volume}");
    if full.len() <= MAX_NAME_LEN {
        return full;
    }
    // FNV-1a: stable across builds and platforms (std's hasher is not).
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let keep = MAX_NAME_LEN - 17;
    let mut prefix = full[..keep].to_string();
    // A name must not contain ".." nor end the prefix with a '.' next to the '-'.
    while prefix.ends_with('.') {
        prefix.pop();
    }
    format!("{prefix}-{hash:016x}")
}

impl Engine {
    /// Snapshots every volume of `volumes` at one instant (see the module docs), naming
    /// the members [`member_name`]. Idempotent for the same set of volumes; answers the
    /// group and whether it was created now.
    pub fn create_group_snapshot(
        &self,
        group: &str,
        volumes: &[String],
    ) -> Result<(GroupSnapshotInfo, bool)> {
        validate_name(ObjectKind::Snapshot, group)?;
        let wanted: BTreeSet<&str> = volumes.iter().map(String::as_str).collect();
        if wanted.is_empty() {
            return Err(EngineError::InvalidSize {
                name: group.to_string(),
                reason: "a group snapshot needs at least one volume".into(),
            });
        }
        if wanted.len() != volumes.len() {
            return Err(EngineError::InvalidSize {
                name: group.to_string(),
                reason: "a volume is listed twice".into(),
            });
        }
        let _ctl = self.inner.control.lock();
        let st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let existing = Self::group_members(&st, group);
        if !existing.is_empty() {
            let have: BTreeSet<&str> = existing
                .iter()
                .map(|id| st.images[id].origin.as_str())
                .collect();
            return if have == wanted {
                Ok((self.group_info(&st, group, &existing), false))
            } else {
                Err(EngineError::AlreadyExists {
                    kind: ObjectKind::GroupSnapshot,
                    name: group.to_string(),
                    detail: format!(
                        "of other volumes ({})",
                        have.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                })
            };
        }
        // Resolve every member before anything changes.
        let mut members = Vec::with_capacity(wanted.len());
        for &volume in &wanted {
            let vid = Self::volume_id(&st, volume)?;
            let name = member_name(group, volume);
            if st.snapshots_by_name.contains_key(&name) {
                return Err(EngineError::AlreadyExists {
                    kind: ObjectKind::Snapshot,
                    name,
                    detail: format!(
                        "outside group {group:?}; the group's snapshot of volume {volume:?} \
                         needs that name: use another group name"
                    ),
                });
            }
            validate_name(ObjectKind::Snapshot, &name)?;
            members.push((volume.to_string(), vid, st.images[&vid].lineage, name));
        }
        // Gates in lineage order: one fixed order, whatever order the caller named them.
        members.sort_by_key(|m| m.2);
        let gates: Vec<_> = members
            .iter()
            .map(|m| st.lineages[&m.2].gate.clone())
            .collect();
        drop(st);
        let _quiesced: Vec<_> = gates.iter().map(|g| g.write()).collect();

        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let created = now_unix();
        let mut ids = Vec::with_capacity(members.len());
        for (volume, vid, lineage, name) in &members {
            // The volume cannot have gone: deletes take the control lock we hold.
            let size = st.images[vid].size;
            let id = st.alloc_id();
            let lin = st.lineages.get_mut(lineage).expect("lineage exists");
            let epoch = lin.rec.e_head;
            lin.rec.e_head += 1;
            lin.add_reader(epoch);
            let lrec = lin.rec.clone();
            let irec = ImageRecord {
                name: name.clone(),
                kind: ImageKind::Snapshot,
                lineage: *lineage,
                epoch,
                size,
                qos: Qos::default(),
                qos_policy: None,
                source: None,
                origin: volume.clone(),
                created_unix: created,
                exported: false,
                ublk_device: None,
                group: group.to_string(),
                uuid: records::new_id(),
                origin_id: st.images[vid].uuid.clone(),
                source_id: String::new(),
                replica_of: String::new(),
            };
            lineage_put(&mut st.pending, *lineage, &lrec);
            image_put(&mut st.pending, id, &irec);
            st.by_uuid.insert(irec.uuid.clone(), id);
            st.images.insert(id, irec);
            st.snapshots_by_name.insert(name.clone(), id);
            ids.push(id);
            tracing::debug!(volume = %volume, snapshot = %name, epoch, "group member");
        }
        let next = st.next_id;
        next_id_put(&mut st.pending, next);
        let info = self.group_info(&st, group, &ids);
        drop(st);
        // One commit for every member: the whole group is durable, or none of it.
        self.commit()?;
        tracing::info!(group = %group, members = ids.len(), "created group snapshot");
        Ok((info, true))
    }

    /// One group snapshot.
    pub fn group_snapshot(&self, group: &str) -> Result<GroupSnapshotInfo> {
        let st = self.inner.state.lock();
        let ids = Self::group_members(&st, group);
        if ids.is_empty() {
            return Err(Self::group_not_found(group));
        }
        Ok(self.group_info(&st, group, &ids))
    }

    /// Every group snapshot, sorted by name.
    pub fn group_snapshots(&self) -> Vec<GroupSnapshotInfo> {
        let st = self.inner.state.lock();
        let names: BTreeSet<&str> = st
            .snapshots_by_name
            .values()
            .map(|id| st.images[id].group.as_str())
            .filter(|g| !g.is_empty())
            .collect();
        names
            .into_iter()
            .map(|g| self.group_info(&st, g, &Self::group_members(&st, g)))
            .collect()
    }

    /// Deletes a group snapshot: every member, in one batch. Clones of members keep
    /// reading them (as after `delete_snapshot`).
    pub fn delete_group_snapshot(&self, group: &str) -> Result<()> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let ids = Self::group_members(&st, group);
        if ids.is_empty() {
            return Err(Self::group_not_found(group));
        }
        for id in &ids {
            let img = st.images.remove(id).expect("indexed image exists");
            st.snapshots_by_name.remove(&img.name);
            st.by_uuid.remove(&img.uuid);
            if let Some(lin) = st.lineages.get_mut(&img.lineage) {
                lin.remove_reader(img.epoch);
            }
            st.pending.delete_cf(Cf::Images, keys::id_key(*id));
        }
        drop(st);
        self.commit()?;
        tracing::info!(group = %group, members = ids.len(), "deleted group snapshot");
        Ok(())
    }

    /// `FailedPrecondition` when snapshot `id` belongs to a group (members are deleted
    /// with their group only).
    pub(super) fn check_not_group_member(img: &ImageRecord) -> Result<()> {
        if img.group.is_empty() {
            return Ok(());
        }
        Err(EngineError::FailedPrecondition {
            kind: ObjectKind::Snapshot,
            name: img.name.clone(),
            reason: format!(
                "it belongs to group snapshot {:?}; delete the whole group \
                 (blockctl snapshot delete-group {})",
                img.group, img.group
            ),
        })
    }

    fn group_members(st: &State, group: &str) -> Vec<u64> {
        st.snapshots_by_name
            .values()
            .copied()
            .filter(|id| st.images[id].group == group)
            .collect()
    }

    fn group_info(&self, st: &State, group: &str, ids: &[u64]) -> GroupSnapshotInfo {
        let mut snapshots: Vec<SnapshotInfo> =
            ids.iter().map(|&id| self.snapshot_info(st, id)).collect();
        snapshots.sort_by(|a, b| a.volume.cmp(&b.volume));
        GroupSnapshotInfo {
            name: group.to_string(),
            created_unix: snapshots.iter().map(|s| s.created_unix).min().unwrap_or(0),
            snapshots,
        }
    }

    fn group_not_found(group: &str) -> EngineError {
        EngineError::NotFound {
            kind: ObjectKind::GroupSnapshot,
            name: group.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_valid_and_distinct() {
        assert_eq!(member_name("g", "vol"), "g-vol");
        let long_group = "g".repeat(100);
        let a = member_name(&long_group, &"a".repeat(60));
        let b = member_name(&long_group, &format!("{}b", "a".repeat(59)));
        assert_ne!(a, b);
        for n in [&a, &b] {
            assert_eq!(n.len(), MAX_NAME_LEN);
            validate_name(ObjectKind::Snapshot, n).unwrap();
        }
        // Stable: the same inputs give the same name.
        assert_eq!(a, member_name(&long_group, &"a".repeat(60)));
        let dotted = member_name(&format!("{}.", "g".repeat(110)), &"v".repeat(40));
        validate_name(ObjectKind::Snapshot, &dotted).unwrap();
    }
}
