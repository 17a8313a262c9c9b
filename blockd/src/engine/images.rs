//! Image operations: create (blank, clone, restore), delete, snapshot, QoS, export flags,
//! open for the data path, resize.

use blockd_proto::size::format_size;

use crate::meta::keys;
use crate::meta::Cf;

use super::records::{self, ImageKind, ImageRecord, LineageRecord, ParentRef};
use super::state::{Lineage, State};
use super::types::{Qos, QosPolicy, SnapshotInfo, Source, VolumeInfo, VolumeSpec};
use super::{
    image_put, lineage_put, next_id_put, now_unix, round_size, validate_name, Engine, EngineError,
    ImageHandle, ObjectKind, Result,
};

impl Engine {
    /// Creates a volume, empty or cloned from a snapshot or a volume (O(1) either way).
    /// Idempotent: the same name with the same parameters returns the existing volume
    /// and `false`.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<(VolumeInfo, bool)> {
        self.create_volume_with_policy(spec, None)
    }

    /// [`Self::create_volume`] with a QoS policy: when given, it replaces `spec.qos`, the
    /// volume's limits are derived from it at the final size and follow later resizes.
    /// Idempotency compares policies (fixed limits compare as their fixed policy).
    pub fn create_volume_with_policy(
        &self,
        spec: &VolumeSpec,
        policy: Option<QosPolicy>,
    ) -> Result<(VolumeInfo, bool)> {
        validate_name(ObjectKind::Volume, &spec.name)?;
        // A fixed policy is stored as plain limits, exactly as before policies existed.
        let policy = policy.filter(|p| p.iops_per_gb != 0);
        let size = match spec.size {
            Some(s) => Some(round_size(&spec.name, s)?),
            None if spec.source.is_none() => {
                return Err(EngineError::InvalidSize {
                    name: spec.name.clone(),
                    reason: "a size is required for a new empty volume".into(),
                })
            }
            None => None,
        };
        if let Some(p) = &spec.pool {
            self.pool_by_name(p)?;
        }
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;

        // Resolve the source first: it fixes the pool and the minimum size.
        let (parent, src_pool, src_size, quiesce, src_id) = match &spec.source {
            None => (None, None, None, None, String::new()),
            Some(Source::Snapshot(s)) => {
                let sid = Self::snapshot_id(&st, s)?;
                let img = &st.images[&sid];
                let pool = st.lineages[&img.lineage].pool;
                let pr = ParentRef {
                    lineage: img.lineage,
                    epoch: img.epoch,
                    limit: img.size,
                };
                (Some(pr), Some(pool), Some(img.size), None, img.uuid.clone())
            }
            Some(Source::Volume(v)) => {
                let vid = Self::volume_id(&st, v)?;
                let img = &st.images[&vid];
                let lin = &st.lineages[&img.lineage];
                (
                    None,
                    Some(lin.pool),
                    Some(img.size),
                    Some((img.lineage, img.size)),
                    img.uuid.clone(),
                )
            }
        };
        let pool_idx = match (&spec.pool, src_pool) {
            (Some(p), Some(sp)) => {
                let pi = self.pool_by_name(p)?.idx;
                if pi != sp {
                    return Err(EngineError::InvalidSize {
                        name: spec.name.clone(),
                        reason: format!(
                            "a clone lives in its source's pool {:?}, not {p:?}",
                            self.inner.pools[sp].name
                        ),
                    });
                }
                pi
            }
            (Some(p), None) => self.pool_by_name(p)?.idx,
            (None, Some(sp)) => sp,
            (None, None) => 0,
        };
        let size = match (size, src_size) {
            (Some(s), Some(ss)) if s < ss => {
                return Err(EngineError::InvalidSize {
                    name: spec.name.clone(),
                    reason: format!(
                        "a clone must be at least as large as its source ({ss} bytes), not {s}"
                    ),
                })
            }
            (Some(s), _) => s,
            (None, Some(ss)) => ss,
            (None, None) => unreachable!("size checked above"),
        };

        // Idempotency by name.
        if let Some(&id) = st.volumes_by_name.get(&spec.name) {
            let img = &st.images[&id];
            let wanted = policy.unwrap_or(QosPolicy::fixed(spec.qos));
            // The same source means the same object, not only the same name: a clone of
            // a deleted snapshot is no clone of a new snapshot that took its name.
            let same = img.size == size
                && img.source == spec.source
                && img.source_id == src_id
                && Self::policy_of(img) == wanted
                && st.lineages[&img.lineage].pool == pool_idx;
            return if same {
                Ok((self.volume_info(&st, id), false))
            } else {
                Err(EngineError::AlreadyExists {
                    kind: ObjectKind::Volume,
                    name: spec.name.clone(),
                    detail: format!(
                        "with different parameters (size {} bytes, pool {:?})",
                        img.size, self.inner.pools[st.lineages[&img.lineage].pool].name
                    ),
                })
            };
        }

        self.check_provision(&st, pool_idx, size, || {
            format!("creating volume {:?} of {}", spec.name, format_size(size))
        })?;

        // Clone from a live volume: freeze its current epoch like a hidden snapshot.
        let mut _quiesced = None;
        let parent = match quiesce {
            None => parent,
            Some((src_lineage, src_size)) => {
                let gate = st.lineages[&src_lineage].gate.clone();
                drop(st);
                let guard = gate.write_arc();
                st = self.inner.state.lock();
                Self::check_writable(&st)?;
                let src = st
                    .lineages
                    .get_mut(&src_lineage)
                    .expect("source lineage exists under control lock");
                let epoch = src.rec.e_head;
                src.rec.e_head += 1;
                let rec = src.rec.clone();
                lineage_put(&mut st.pending, src_lineage, &rec);
                _quiesced = Some(guard);
                Some(ParentRef {
                    lineage: src_lineage,
                    epoch,
                    limit: src_size,
                })
            }
        };

        let lineage_id = st.alloc_id();
        let image_id = st.alloc_id();
        let lrec = LineageRecord {
            pool: self.inner.pools[pool_idx].id,
            e_head: 1,
            parent,
            head: Some(image_id),
        };
        let irec = ImageRecord {
            name: spec.name.clone(),
            kind: ImageKind::Volume,
            lineage: lineage_id,
            epoch: 0,
            size,
            qos: policy.map_or(spec.qos, |p| p.effective(size)),
            qos_policy: policy,
            source: spec.source.clone(),
            origin: String::new(),
            created_unix: now_unix(),
            exported: false,
            ublk_device: None,
            group: String::new(),
            uuid: records::new_id(),
            origin_id: String::new(),
            source_id: src_id,
            replica_of: String::new(),
        };
        if let Some(p) = parent {
            st.lineages
                .get_mut(&p.lineage)
                .expect("parent exists")
                .add_reader(p.epoch);
        }
        let next = st.next_id;
        lineage_put(&mut st.pending, lineage_id, &lrec);
        image_put(&mut st.pending, image_id, &irec);
        next_id_put(&mut st.pending, next);
        st.lineages
            .insert(lineage_id, Lineage::new(lineage_id, lrec, pool_idx));
        let uuid = irec.uuid.clone();
        st.by_uuid.insert(irec.uuid.clone(), image_id);
        st.images.insert(image_id, irec);
        st.volumes_by_name.insert(spec.name.clone(), image_id);
        let info = self.volume_info(&st, image_id);
        drop(st);
        self.commit()?;
        tracing::info!(
            volume = %spec.name,
            volume_id = %uuid,
            pool = %info.pool,
            size_bytes = size,
            source = ?spec.source,
            source_id = info.source_id.as_deref().unwrap_or(""),
            "created volume"
        );
        Ok((info, true))
    }

    /// Deletes a volume. Its snapshots and clones stay usable; GC reclaims what nothing
    /// reads any more.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::volume_id(&st, name)?;
        let img = st.images.remove(&id).expect("indexed image exists");
        st.volumes_by_name.remove(name);
        st.by_uuid.remove(&img.uuid);
        let lin = st
            .lineages
            .get_mut(&img.lineage)
            .expect("image lineage exists");
        lin.rec.head = None;
        lin.gc_dirty = true;
        let rec = lin.rec.clone();
        st.pending.delete_cf(Cf::Images, keys::id_key(id));
        lineage_put(&mut st.pending, img.lineage, &rec);
        drop(st);
        self.commit()?;
        tracing::info!(volume = %name, volume_id = %img.uuid, "deleted volume");
        Ok(())
    }

    /// Takes a snapshot in O(1): quiesce writers, record `e_S = e_head`, bump the epoch,
    /// commit. Idempotent for the same volume and name.
    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<(SnapshotInfo, bool)> {
        self.create_snapshot_replica(volume, name, None)
    }

    /// [`Engine::create_snapshot`], recording that the snapshot reproduces the snapshot
    /// with stable id `replica_of` (what `import-diff` takes after applying a stream).
    pub fn create_snapshot_replica(
        &self,
        volume: &str,
        name: &str,
        replica_of: Option<&str>,
    ) -> Result<(SnapshotInfo, bool)> {
        validate_name(ObjectKind::Snapshot, name)?;
        let _ctl = self.inner.control.lock();
        let st = self.inner.state.lock();
        Self::check_writable(&st)?;
        if let Some(&sid) = st.snapshots_by_name.get(name) {
            let img = &st.images[&sid];
            // The same volume by id; or, when no volume has that name any more, the
            // deleted one that had it (a retry after the volume went away).
            let same = match st.volumes_by_name.get(volume) {
                Some(vid) => st.images[vid].uuid == img.origin_id,
                None => img.origin == volume && !st.is_live(&img.origin_id),
            };
            return if same {
                Ok((self.snapshot_info(&st, sid), false))
            } else {
                let deleted = if st.is_live(&img.origin_id) {
                    ""
                } else {
                    " (deleted)"
                };
                Err(EngineError::AlreadyExists {
                    kind: ObjectKind::Snapshot,
                    name: name.to_string(),
                    detail: format!("of volume {:?}{deleted}", img.origin),
                })
            };
        }
        let vid = Self::volume_id(&st, volume)?;
        let lineage = st.images[&vid].lineage;
        let gate = st.lineages[&lineage].gate.clone();
        drop(st);
        let _quiesce = gate.write();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let size = st.images[&vid].size;
        let origin_id = st.images[&vid].uuid.clone();
        let id = st.alloc_id();
        let lin = st.lineages.get_mut(&lineage).expect("lineage exists");
        let epoch = lin.rec.e_head;
        lin.rec.e_head += 1;
        lin.add_reader(epoch);
        let lrec = lin.rec.clone();
        let irec = ImageRecord {
            name: name.to_string(),
            kind: ImageKind::Snapshot,
            lineage,
            epoch,
            size,
            qos: Qos::default(),
            qos_policy: None,
            source: None,
            origin: volume.to_string(),
            created_unix: now_unix(),
            exported: false,
            ublk_device: None,
            group: String::new(),
            uuid: records::new_id(),
            origin_id,
            source_id: String::new(),
            replica_of: replica_of.unwrap_or_default().to_string(),
        };
        let next = st.next_id;
        lineage_put(&mut st.pending, lineage, &lrec);
        image_put(&mut st.pending, id, &irec);
        next_id_put(&mut st.pending, next);
        st.by_uuid.insert(irec.uuid.clone(), id);
        st.images.insert(id, irec);
        st.snapshots_by_name.insert(name.to_string(), id);
        let info = self.snapshot_info(&st, id);
        drop(st);
        self.commit()?;
        tracing::info!(
            volume = %volume,
            volume_id = %info.volume_id,
            snapshot = %name,
            snapshot_id = %info.id,
            size_bytes = size,
            epoch,
            "created snapshot"
        );
        Ok((info, true))
    }

    /// Deletes a snapshot. If clones still read it, it disappears from listings now and
    /// its chunks are reclaimed when the last clone is deleted or flattened.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::snapshot_id(&st, name)?;
        Self::check_not_group_member(&st.images[&id])?;
        let img = st.images.remove(&id).expect("indexed image exists");
        st.snapshots_by_name.remove(name);
        st.by_uuid.remove(&img.uuid);
        if let Some(lin) = st.lineages.get_mut(&img.lineage) {
            lin.remove_reader(img.epoch);
        }
        st.pending.delete_cf(Cf::Images, keys::id_key(id));
        drop(st);
        self.commit()?;
        tracing::info!(
            snapshot = %name,
            snapshot_id = %img.uuid,
            volume = %img.origin,
            "deleted snapshot"
        );
        Ok(())
    }

    /// Changes a volume's QoS limits (0 = unlimited).
    pub fn set_qos(&self, name: &str, qos: Qos) -> Result<VolumeInfo> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::volume_id(&st, name)?;
        let img = st.images.get_mut(&id).expect("indexed");
        img.qos = qos;
        img.qos_policy = None;
        let rec = img.clone();
        image_put(&mut st.pending, id, &rec);
        let info = self.volume_info(&st, id);
        drop(st);
        self.commit()?;
        Ok(info)
    }

    /// Replaces a volume's QoS policy and applies the limits it gives at the current size.
    /// Open exports read the limits on every request, so running I/O sees the change at
    /// its next request.
    pub fn set_qos_policy(&self, name: &str, policy: QosPolicy) -> Result<VolumeInfo> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::volume_id(&st, name)?;
        let img = st.images.get_mut(&id).expect("indexed");
        img.qos = policy.effective(img.size);
        img.qos_policy = (policy.iops_per_gb != 0).then_some(policy);
        let rec = img.clone();
        image_put(&mut st.pending, id, &rec);
        let info = self.volume_info(&st, id);
        drop(st);
        self.commit()?;
        tracing::info!(
            volume = %name,
            max_iops = info.qos.max_iops,
            iops_per_gb = policy.iops_per_gb,
            max_bandwidth_bytes = info.qos.max_bandwidth_bytes,
            "set volume qos policy"
        );
        Ok(info)
    }

    /// The policy a volume record's limits come from.
    pub(super) fn policy_of(img: &ImageRecord) -> QosPolicy {
        img.qos_policy.unwrap_or(QosPolicy::fixed(img.qos))
    }

    /// Marks an image ("VOL" or "VOL@SNAP") exported or not; persisted. Returns whether
    /// anything changed.
    pub fn set_exported(&self, image: &str, exported: bool) -> Result<bool> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::image_id(&st, image)?;
        let img = st.images.get_mut(&id).expect("indexed");
        if img.exported == exported {
            return Ok(false);
        }
        img.exported = exported;
        let rec = img.clone();
        image_put(&mut st.pending, id, &rec);
        drop(st);
        self.commit()?;
        Ok(true)
    }

    /// Exported images, as "VOL" or "VOL@SNAP", sorted.
    pub fn exported_images(&self) -> Vec<String> {
        let st = self.inner.state.lock();
        let mut v: Vec<String> = st
            .images
            .values()
            .filter(|i| i.exported)
            .map(|i| match i.kind {
                ImageKind::Volume => i.name.clone(),
                ImageKind::Snapshot => format!("{}@{}", i.origin, i.name),
            })
            .collect();
        v.sort();
        v
    }

    /// Records that an image ("VOL" or "VOL@SNAP") is attached as ublk device `device`
    /// (None: detached); persisted, so the attachment is recovered after a restart.
    /// Returns whether anything changed.
    pub fn set_ublk_device(&self, image: &str, device: Option<u32>) -> Result<bool> {
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::image_id(&st, image)?;
        let img = st.images.get_mut(&id).expect("indexed");
        if img.ublk_device == device {
            return Ok(false);
        }
        img.ublk_device = device;
        let rec = img.clone();
        image_put(&mut st.pending, id, &rec);
        drop(st);
        self.commit()?;
        Ok(true)
    }

    /// Images attached as ublk devices, as ("VOL" or "VOL@SNAP", device id), sorted by
    /// image.
    pub fn ublk_devices(&self) -> Vec<(String, u32)> {
        let st = self.inner.state.lock();
        let mut v: Vec<(String, u32)> = st
            .images
            .values()
            .filter_map(|i| {
                let dev = i.ublk_device?;
                Some(match i.kind {
                    ImageKind::Volume => (i.name.clone(), dev),
                    ImageKind::Snapshot => (format!("{}@{}", i.origin, i.name), dev),
                })
            })
            .collect();
        v.sort();
        v
    }

    pub(super) fn image_id(st: &State, image: &str) -> Result<u64> {
        match image.split_once('@') {
            None => Self::volume_id(st, image),
            Some((vol, snap)) => {
                let id = Self::snapshot_id(st, snap)?;
                if st.images[&id].origin != vol {
                    return Err(EngineError::NotFound {
                        kind: ObjectKind::Image,
                        name: image.to_string(),
                    });
                }
                Ok(id)
            }
        }
    }

    /// Opens "VOL" (read-write head) or "VOL@SNAP" (read-only snapshot) for I/O.
    pub fn open_image(&self, image: &str) -> Result<ImageHandle> {
        let st = self.inner.state.lock();
        let id = Self::image_id(&st, image)?;
        let img = &st.images[&id];
        let lin = &st.lineages[&img.lineage];
        Ok(ImageHandle {
            id,
            name: image.into(),
            volume: match img.kind {
                ImageKind::Volume => img.name.as_str().into(),
                ImageKind::Snapshot => img.origin.as_str().into(),
            },
            lineage: img.lineage,
            epoch: match img.kind {
                ImageKind::Volume => None,
                ImageKind::Snapshot => Some(img.epoch),
            },
            pool: lin.pool,
        })
    }

    /// The image's current size (a volume may be resized while open).
    pub fn image_size(&self, h: &ImageHandle) -> Result<u64> {
        let st = self.inner.state.lock();
        Ok(Self::live_image(&st, h)?.size)
    }

    /// The image's QoS limits (snapshots are unlimited).
    pub fn image_qos(&self, h: &ImageHandle) -> Qos {
        let st = self.inner.state.lock();
        Self::live_image(&st, h).map(|i| i.qos).unwrap_or_default()
    }

    pub(super) fn live_image<'s>(st: &'s State, h: &ImageHandle) -> Result<&'s ImageRecord> {
        st.images.get(&h.id).ok_or_else(|| EngineError::NotFound {
            kind: ObjectKind::Image,
            name: h.name.to_string(),
        })
    }

    /// Resizes a volume. Growing is metadata only; shrinking needs `force` and zeroes what
    /// lies beyond the new end so that a later grow reads zeros there.
    pub fn resize_volume(&self, name: &str, new_size: u64, force: bool) -> Result<VolumeInfo> {
        let new_size = round_size(name, new_size)?;
        let _ctl = self.inner.control.lock();
        let mut st = self.inner.state.lock();
        Self::check_writable(&st)?;
        let id = Self::volume_id(&st, name)?;
        let old = st.images[&id].size;
        if new_size < old && !force {
            return Err(EngineError::ShrinkRefused {
                name: name.to_string(),
                size: old,
                new_size,
            });
        }
        if new_size > old {
            let pool = st.lineages[&st.images[&id].lineage].pool;
            self.check_provision(&st, pool, new_size - old, || {
                format!(
                    "growing volume {name:?} from {} to {}",
                    format_size(old),
                    format_size(new_size)
                )
            })?;
        }
        if new_size < old {
            let lineage = st.images[&id].lineage;
            let gate = st.lineages[&lineage].gate.clone();
            drop(st);
            let h = self.open_image(name)?;
            {
                let _quiesce = gate.write();
                self.zero_range_quiesced(&h, new_size, old - new_size)?;
            }
            // Every chunk past the new end that read data now has an own entry at the
            // head (a zero tombstone or zeroed copy), so a later grow reads zeros there
            // while snapshots, which share the parent pointer, still read their data.
            st = self.inner.state.lock();
        }
        let img = st.images.get_mut(&id).expect("indexed");
        img.size = new_size;
        if let Some(policy) = img.qos_policy {
            // The IOPS limit follows the size (iopsPerGB); open exports read it per request.
            img.qos = policy.effective(new_size);
        }
        let rec = img.clone();
        image_put(&mut st.pending, id, &rec);
        let info = self.volume_info(&st, id);
        drop(st);
        self.commit()?;
        tracing::info!(
            volume = %name,
            old_size_bytes = old,
            new_size_bytes = new_size,
            "resized volume"
        );
        Ok(info)
    }
}
