//! fsck: cross-checks the durable metadata, the in-memory mirror and the allocators.
//!
//! Checks: every pool's superblock matches its record; every map key and value decodes,
//! names an existing lineage and points inside its pool (never at the superblock); no
//! physical chunk is owned twice; every image names an existing lineage and a snapshot
//! epoch below its lineage's head epoch; every lineage names an existing pool, parent and
//! head; every intent decodes and names an existing lineage; the durable map equals the
//! in-memory mirror; and no chunk is allocated that nothing owns (a leak). With `repair`,
//! leaks are given back and orphan map entries deleted; double ownership is only reported.

use std::collections::{BTreeMap, HashMap};

use crate::meta::keys::{self, ZERO};
use crate::meta::{Cf, WriteBatch};

use super::error::Result;
use super::records::{self, ImageKind, ImageRecord, Intent, LineageRecord};
use super::superblock::Superblock;
use super::types::FsckReport;
use super::Engine;

impl Engine {
    /// Checks (and with `repair`, repairs) the metadata. Commits pending changes first.
    pub fn fsck(&self, repair: bool) -> Result<FsckReport> {
        // Pending changes first, so the durable and the in-memory state agree.
        let _ = self.commit();
        let inner = self.inner();
        let _ctl = inner.control.lock();
        let mut r = FsckReport {
            pools: inner.pools.len() as u64,
            ..FsckReport::default()
        };
        let problem = |r: &mut FsckReport, msg: String| {
            tracing::warn!(problem = %msg, "fsck");
            r.problems.push(msg);
        };

        for p in &inner.pools {
            match Superblock::read(&p.name, p.device.as_ref()) {
                Ok(Some(sb)) if sb.uuid_string() == p.uuid && sb.chunk_size == p.chunk_size => {}
                Ok(Some(_)) => {
                    r.bad_records += 1;
                    problem(
                        &mut r,
                        format!("pool {:?}: superblock does not match the metadata", p.name),
                    );
                }
                Ok(None) => {
                    r.bad_records += 1;
                    problem(&mut r, format!("pool {:?}: superblock missing", p.name));
                }
                Err(e) => {
                    r.bad_records += 1;
                    problem(&mut r, format!("pool {:?}: {e}", p.name));
                }
            }
        }

        let pool_by_id: HashMap<u64, usize> = inner.pools.iter().map(|p| (p.id, p.idx)).collect();
        let mut lineages: HashMap<u64, LineageRecord> = HashMap::new();
        for (k, v) in inner.meta.scan(Cf::Lineages, &[], &[], usize::MAX)? {
            match (
                keys::decode_id(Cf::Lineages, &k),
                records::decode::<LineageRecord>(Cf::Lineages, &v),
            ) {
                (Ok(id), Ok(rec)) => {
                    lineages.insert(id, rec);
                }
                _ => {
                    r.bad_records += 1;
                    problem(&mut r, "undecodable lineage record".into());
                }
            }
        }
        r.lineages = lineages.len() as u64;
        let mut images: HashMap<u64, ImageRecord> = HashMap::new();
        for (k, v) in inner.meta.scan(Cf::Images, &[], &[], usize::MAX)? {
            match (
                keys::decode_id(Cf::Images, &k),
                records::decode::<ImageRecord>(Cf::Images, &v),
            ) {
                (Ok(id), Ok(rec)) => {
                    images.insert(id, rec);
                }
                _ => {
                    r.bad_records += 1;
                    problem(&mut r, "undecodable image record".into());
                }
            }
        }
        r.images = images.len() as u64;
        for (id, img) in &images {
            match lineages.get(&img.lineage) {
                None => {
                    r.bad_records += 1;
                    problem(
                        &mut r,
                        format!("image {:?} names missing lineage {}", img.name, img.lineage),
                    );
                }
                Some(l) => {
                    if img.kind == ImageKind::Snapshot && img.epoch >= l.e_head {
                        r.bad_records += 1;
                        problem(
                            &mut r,
                            format!(
                                "snapshot {:?} epoch {} is not below its head epoch {}",
                                img.name, img.epoch, l.e_head
                            ),
                        );
                    }
                    if img.kind == ImageKind::Volume && l.head != Some(*id) {
                        r.bad_records += 1;
                        problem(
                            &mut r,
                            format!("volume {:?} is not the head of its lineage", img.name),
                        );
                    }
                }
            }
        }
        for (id, l) in &lineages {
            if !pool_by_id.contains_key(&l.pool) {
                r.bad_records += 1;
                problem(
                    &mut r,
                    format!("lineage {id} names unknown pool {}", l.pool),
                );
            }
            if let Some(p) = l.parent {
                if !lineages.contains_key(&p.lineage) {
                    r.bad_records += 1;
                    problem(
                        &mut r,
                        format!("lineage {id} names missing parent {}", p.lineage),
                    );
                }
            }
            if let Some(h) = l.head {
                if images.get(&h).is_none_or(|i| i.kind != ImageKind::Volume) {
                    r.bad_records += 1;
                    problem(&mut r, format!("lineage {id} names missing head image {h}"));
                }
            }
        }
        for (_, v) in inner.meta.scan(Cf::Intents, &[], &[], usize::MAX)? {
            match records::decode::<Intent>(Cf::Intents, &v) {
                Ok(Intent::Flatten { lineage, .. }) if !lineages.contains_key(&lineage) => {
                    // Harmless (flatten finishes it) but worth showing.
                    problem(
                        &mut r,
                        format!("flatten intent for missing lineage {lineage}"),
                    );
                }
                Ok(_) => {}
                Err(_) => {
                    r.bad_records += 1;
                    problem(&mut r, "undecodable intent".into());
                }
            }
        }

        // The map: ownership and pointers.
        let mut owner: Vec<HashMap<u64, (u64, u64, u64)>> = vec![HashMap::new(); inner.pools.len()];
        let mut durable: BTreeMap<(u64, u64, u64), u64> = BTreeMap::new();
        let mut orphans = WriteBatch::new();
        let mut start: Vec<u8> = Vec::new();
        loop {
            let page = inner.meta.scan(Cf::Map, &start, &[], 65536)?;
            let Some((last, _)) = page.last() else { break };
            start = last.clone();
            start.push(0);
            for (k, v) in &page {
                let (Ok((l, c, e)), Ok(phys)) =
                    (keys::decode_map_key(k), keys::decode_map_value(v))
                else {
                    r.bad_records += 1;
                    problem(&mut r, format!("undecodable map entry {k:?}"));
                    continue;
                };
                r.mapped_chunks += 1;
                let Some(lin) = lineages.get(&l) else {
                    r.bad_records += 1;
                    problem(
                        &mut r,
                        format!("map entry ({l},{c},{e}) names missing lineage"),
                    );
                    orphans.delete_cf(Cf::Map, k.clone());
                    continue;
                };
                durable.insert((l, c, e), phys);
                if phys == ZERO {
                    continue;
                }
                let Some(&pidx) = pool_by_id.get(&lin.pool) else {
                    continue;
                };
                let pool = &inner.pools[pidx];
                if phys == 0 || phys >= pool.chunks {
                    r.bad_pointers += 1;
                    problem(
                        &mut r,
                        format!(
                            "map entry ({l},{c},{e}) points at chunk {phys}, outside pool {:?}",
                            pool.name
                        ),
                    );
                    continue;
                }
                if let Some(prev) = owner[pidx].insert(phys, (l, c, e)) {
                    r.double_owned += 1;
                    problem(
                        &mut r,
                        format!(
                            "chunk {phys} of pool {:?} owned by {prev:?} and ({l},{c},{e})",
                            pool.name
                        ),
                    );
                }
            }
        }

        // Memory against disk, and leaks.
        let mut st = inner.state.lock();
        // Writes in flight may have added overlay entries since the commit above: keys
        // touched by the pending batch are not compared.
        let in_flight: std::collections::HashSet<Vec<u8>> = st
            .pending
            .ops
            .iter()
            .filter_map(|op| match op {
                crate::meta::BatchOp::Put {
                    cf: Cf::Map, key, ..
                }
                | crate::meta::BatchOp::Delete { cf: Cf::Map, key } => Some(key.clone()),
                _ => None,
            })
            .collect();
        for lin in st.lineages.values() {
            for (&(c, e), &p) in lin.map() {
                let key = keys::map_key(lin.id, c, e);
                if durable.get(&(lin.id, c, e)) != Some(&p) && !in_flight.contains(key.as_slice()) {
                    r.bad_records += 1;
                    problem(
                        &mut r,
                        format!(
                            "in-memory entry ({},{c},{e}) -> {p} differs from the durable map",
                            lin.id
                        ),
                    );
                }
            }
        }
        for (&(l, c, e), &p) in &durable {
            let key = keys::map_key(l, c, e);
            let known = st.lineages.get(&l).and_then(|lin| lin.map().get(&(c, e)));
            if known.is_none() && !in_flight.contains(key.as_slice()) {
                r.bad_records += 1;
                problem(
                    &mut r,
                    format!("durable entry ({l},{c},{e}) -> {p} is unknown in memory"),
                );
            }
        }
        let mut leaks = Vec::new();
        for p in &inner.pools {
            let alloc = &st.allocators[p.idx];
            let mut mem_owned: HashMap<u64, ()> = HashMap::new();
            for lin in st.lineages.values().filter(|l| l.pool == p.idx) {
                for &phys in lin.map().values() {
                    if phys != ZERO {
                        mem_owned.insert(phys, ());
                    }
                }
            }
            for c in 1..p.chunks {
                if alloc.is_used(c)
                    && !mem_owned.contains_key(&c)
                    && !st.reserved.contains(&(p.idx, c))
                    && !st.pending_frees.contains(&(p.idx, c))
                {
                    leaks.push((p.idx, c));
                }
            }
        }
        r.leaked = leaks.len() as u64;
        for &(pidx, c) in &leaks {
            problem(
                &mut r,
                format!(
                    "chunk {c} of pool {:?} is allocated but owned by nothing (leak)",
                    inner.pools[pidx].name
                ),
            );
        }
        if repair && (!leaks.is_empty() || !orphans.is_empty()) {
            let orphan_count = orphans.len() as u64;
            r.repaired = leaks.len() as u64 + orphan_count;
            st.pending_frees.extend(leaks);
            st.pending.extend(orphans);
            if r.double_owned == 0 && r.bad_pointers == 0 {
                st.open_problems.clear();
            }
            drop(st);
            drop(_ctl);
            self.commit()?;
            r.leaked = 0;
            r.bad_records -= r.bad_records.min(orphan_count);
        }
        Ok(r)
    }
}
