//! The behaviour every [`MetaStore`] shares, written once and run against every backend
//! (the pattern of cloud-hypervisor's `formats/raw/tests.rs`).
//!
//! Each check takes any store, expects it empty, and leaves it empty, so the checks can
//! run one per fresh store (the generated `mem_store::*` and `rocks_store::*` tests, run
//! in parallel) or all in a row on one store with history ([`conformance`]).
//! [`check_against_model`] compares every read of one column family with a `BTreeMap`;
//! backend-specific tests (e.g. RocksDB with its keys in SST files) reuse it.

use std::collections::BTreeMap;
use std::ops::Bound;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::keys::{decode_map_key, map_key, map_lineage_end, map_lineage_start, map_value};
use super::{Cf, Kv, MetaStore, WriteBatch};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// Generates [`conformance`], which runs every check on one store, and one test per
/// check and backend, each on a fresh store.
macro_rules! checks {
    ($($check:ident),* $(,)?) => {
        /// Runs every conformance check, in turn, on `store` (which must be empty).
        pub(crate) fn conformance(store: &dyn MetaStore) {
            $({
                let _name = CheckName(stringify!($check));
                $check(store);
            })*
        }

        mod mem_store {
            $(
                #[test]
                fn $check() {
                    super::$check(&crate::meta::mem::MemStore::new());
                }
            )*
        }

        mod rocks_store {
            $(
                #[test]
                fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$check(&crate::meta::rocks::RocksStore::open(dir.path()).unwrap());
                }
            )*
        }
    };
}

checks!(
    point_ops_are_isolated_per_cf,
    batches_are_atomic_and_ordered,
    scans_respect_bounds_and_limits,
    seek_for_prev_finds_the_greatest_key_at_or_before,
    scans_and_seeks_match_a_model,
);

/// Names the failing check when [`conformance`] runs them in a row.
struct CheckName(&'static str);

impl Drop for CheckName {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("metadata store conformance check `{}` failed", self.0);
        }
    }
}

/// Deletes every key of every column family.
fn clear(store: &dyn MetaStore) {
    let mut batch = WriteBatch::new();
    for cf in Cf::ALL {
        for (k, _) in store.scan(cf, b"", b"", usize::MAX).unwrap() {
            batch.delete_cf(cf, k);
        }
    }
    store.write(batch, false).unwrap();
}

fn assert_empty(store: &dyn MetaStore) {
    for cf in Cf::ALL {
        assert_eq!(
            store.scan(cf, b"", b"", usize::MAX).unwrap(),
            Vec::<Kv>::new(),
            "{cf:?}"
        );
    }
}

fn keys(kvs: &[Kv]) -> Vec<&[u8]> {
    kvs.iter().map(|(k, _)| k.as_slice()).collect()
}

fn point_ops_are_isolated_per_cf(store: &dyn MetaStore) {
    assert_empty(store);
    let mut batch = WriteBatch::new();
    for cf in Cf::ALL {
        batch.put_cf(cf, b"key".to_vec(), cf.name().as_bytes().to_vec());
    }
    store.write(batch, true).unwrap();
    for cf in Cf::ALL {
        assert_eq!(
            store.get(cf, b"key").unwrap().as_deref(),
            Some(cf.name().as_bytes())
        );
        assert_eq!(
            store.get(cf, b"ke").unwrap(),
            None,
            "a prefix is another key"
        );
        assert_eq!(
            store.get(cf, b"key\0").unwrap(),
            None,
            "an extension is another key"
        );
    }

    // Overwrite and delete in one CF; the others keep their own value.
    let mut batch = WriteBatch::new();
    batch.put_cf(Cf::Images, b"key".to_vec(), b"new".to_vec());
    batch.delete_cf(Cf::Map, b"key".to_vec());
    store.write(batch, false).unwrap();
    assert_eq!(
        store.get(Cf::Images, b"key").unwrap().as_deref(),
        Some(&b"new"[..])
    );
    assert_eq!(store.get(Cf::Map, b"key").unwrap(), None);
    for cf in [Cf::Meta, Cf::Pools, Cf::Lineages, Cf::Intents] {
        assert_eq!(
            store.get(cf, b"key").unwrap().as_deref(),
            Some(cf.name().as_bytes())
        );
    }

    // An empty value is a present key, distinct from an absent one; deleting an absent
    // key is not an error.
    let mut batch = WriteBatch::new();
    batch.put_cf(Cf::Pools, b"empty".to_vec(), Vec::new());
    batch.delete_cf(Cf::Pools, b"never-written".to_vec());
    store.write(batch, true).unwrap();
    assert_eq!(store.get(Cf::Pools, b"empty").unwrap(), Some(Vec::new()));
    assert_eq!(store.get(Cf::Meta, b"empty").unwrap(), None);

    clear(store);
    assert_empty(store);
}

fn batches_are_atomic_and_ordered(store: &dyn MetaStore) {
    assert_empty(store);
    let mut batch = WriteBatch::new();
    // put then delete: nothing; delete then put: present; put twice: the last wins.
    batch.put_cf(Cf::Lineages, b"a".to_vec(), b"1".to_vec());
    batch.delete_cf(Cf::Lineages, b"a".to_vec());
    batch.delete_cf(Cf::Lineages, b"b".to_vec());
    batch.put_cf(Cf::Lineages, b"b".to_vec(), b"2".to_vec());
    batch.put_cf(Cf::Lineages, b"c".to_vec(), b"3".to_vec());
    batch.put_cf(Cf::Lineages, b"c".to_vec(), b"4".to_vec());
    // The same key in another CF is another key.
    batch.put_cf(Cf::Intents, b"a".to_vec(), b"5".to_vec());
    store.write(batch, true).unwrap();
    assert_eq!(store.get(Cf::Lineages, b"a").unwrap(), None);
    assert_eq!(
        store.get(Cf::Lineages, b"b").unwrap().as_deref(),
        Some(&b"2"[..])
    );
    assert_eq!(
        store.get(Cf::Lineages, b"c").unwrap().as_deref(),
        Some(&b"4"[..])
    );
    assert_eq!(
        store.get(Cf::Intents, b"a").unwrap().as_deref(),
        Some(&b"5"[..])
    );
    assert_eq!(
        keys(&store.scan(Cf::Lineages, b"", b"", usize::MAX).unwrap()),
        [b"b", b"c"]
    );

    // Empty batches are accepted, synced or not, and change nothing.
    store.write(WriteBatch::new(), false).unwrap();
    store.write(WriteBatch::new(), true).unwrap();
    assert_eq!(
        store
            .scan(Cf::Lineages, b"", b"", usize::MAX)
            .unwrap()
            .len(),
        2
    );

    // A later batch sees the earlier one: delete b, re-put a.
    let mut batch = WriteBatch::new();
    batch.delete_cf(Cf::Lineages, b"b".to_vec());
    batch.put_cf(Cf::Lineages, b"a".to_vec(), b"6".to_vec());
    store.write(batch, false).unwrap();
    let all = store.scan(Cf::Lineages, b"", b"", usize::MAX).unwrap();
    assert_eq!(
        all,
        vec![
            (b"a".to_vec(), b"6".to_vec()),
            (b"c".to_vec(), b"4".to_vec())
        ]
    );

    clear(store);
    assert_empty(store);
}

fn scans_respect_bounds_and_limits(store: &dyn MetaStore) {
    assert_empty(store);
    let all: [&[u8]; 6] = [b"", b"a", b"ab", b"b", b"b\xff", b"c"];
    let mut batch = WriteBatch::new();
    for k in all {
        batch.put_cf(Cf::Images, k.to_vec(), [k, b"!"].concat());
    }
    batch.put_cf(Cf::Pools, b"aa".to_vec(), b"other cf".to_vec());
    store.write(batch, true).unwrap();

    let scan = |start: &[u8], end: &[u8], limit| store.scan(Cf::Images, start, end, limit).unwrap();
    assert_eq!(
        keys(&scan(b"", b"", usize::MAX)),
        all,
        "full scan, byte order"
    );
    assert_eq!(
        scan(b"ab", b"", 1),
        vec![(b"ab".to_vec(), b"ab!".to_vec())],
        "values"
    );
    assert_eq!(
        keys(&scan(b"ab", b"c", usize::MAX)),
        [&b"ab"[..], b"b", b"b\xff"],
        "start in"
    );
    assert_eq!(
        keys(&scan(b"aa", b"b\xff", usize::MAX)),
        [&b"ab"[..], b"b"],
        "end out"
    );
    assert_eq!(keys(&scan(b"a", b"", 2)), [&b"a"[..], b"ab"], "limit");
    assert_eq!(keys(&scan(b"b\0", b"", usize::MAX)), [&b"b\xff"[..], b"c"]);
    assert_eq!(
        keys(&scan(b"c\0", b"", usize::MAX)),
        Vec::<&[u8]>::new(),
        "past the end"
    );
    assert!(scan(b"a", b"", 0).is_empty(), "limit 0");
    assert!(scan(b"b", b"b", usize::MAX).is_empty(), "empty range");
    assert!(scan(b"c", b"a", usize::MAX).is_empty(), "inverted range");
    assert_eq!(
        keys(&scan(b"", b"a", usize::MAX)),
        [&b""[..]],
        "the empty key"
    );
    assert_eq!(
        keys(&store.scan(Cf::Pools, b"", b"", usize::MAX).unwrap()),
        [b"aa"]
    );
    assert!(store
        .scan(Cf::Map, b"", b"", usize::MAX)
        .unwrap()
        .is_empty());

    clear(store);
    assert_empty(store);
}

fn seek_for_prev_finds_the_greatest_key_at_or_before(store: &dyn MetaStore) {
    assert_empty(store);
    let seek = |key: &[u8]| {
        store
            .seek_for_prev(Cf::Map, key)
            .unwrap()
            .map(|(k, _)| decode_map_key(&k).unwrap())
    };
    assert_eq!(seek(&map_key(5, 5, 5)), None, "empty CF");

    let present = [
        (1, 0, 0),
        (1, 7, 2),
        (1, 7, 9),
        (4, 0, 3),
        (4, 2, 0),
        (9, 1, 1),
    ];
    let mut batch = WriteBatch::new();
    for (l, c, e) in present {
        batch.put_cf(Cf::Map, map_key(l, c, e), map_value(l + c + e));
    }
    // Keys in another CF never show through.
    batch.put_cf(Cf::Images, map_key(0, 0, 0), b"x".to_vec());
    batch.put_cf(Cf::Images, map_key(3, 0, 0), b"x".to_vec());
    store.write(batch, true).unwrap();

    // Exact hits, with the value.
    for (l, c, e) in present {
        let (k, v) = store
            .seek_for_prev(Cf::Map, &map_key(l, c, e))
            .unwrap()
            .unwrap();
        assert_eq!(
            (k, v),
            (map_key(l, c, e).to_vec(), map_value(l + c + e).to_vec())
        );
    }
    // Between keys of one chunk, of one lineage, after the last key.
    assert_eq!(seek(&map_key(1, 7, 5)), Some((1, 7, 2)));
    assert_eq!(seek(&map_key(1, 7, u64::MAX)), Some((1, 7, 9)));
    assert_eq!(seek(&map_key(4, 1, 0)), Some((4, 0, 3)));
    assert_eq!(
        seek(&map_key(u64::MAX, u64::MAX, u64::MAX)),
        Some((9, 1, 1))
    );
    // Before the first key: of the CF, and with keys shorter than a map key.
    assert_eq!(seek(&map_key(0, 9, 9)), None);
    assert_eq!(seek(&map_key(1, 0, 0)[..23]), None);
    assert_eq!(seek(b""), None);
    // Across lineage boundaries: from a lineage without keys, and from the first key of a
    // lineage's range, back to the previous lineage's last key.
    assert_eq!(seek(&map_key(3, 0, 0)), Some((1, 7, 9)));
    assert_eq!(seek(&map_key(4, 0, 2)), Some((1, 7, 9)));
    assert_eq!(seek(&map_lineage_start(4)), Some((1, 7, 9)));
    assert_eq!(seek(&map_lineage_end(4)), Some((4, 2, 0)));
    assert_eq!(seek(&map_key(8, u64::MAX, u64::MAX)), Some((4, 2, 0)));

    clear(store);
    assert_empty(store);
}

fn scans_and_seeks_match_a_model(store: &dyn MetaStore) {
    assert_empty(store);
    // A small id space so that keys share lineages and chunks, plus the extreme lineages
    // whose range ends are special (`map_lineage_end(u64::MAX)` is empty).
    let lineage = prop_oneof![0u64..6, Just(u64::MAX), Just(u64::MAX - 1)];
    let op = (lineage, 0u64..8, 0u64..4, any::<u64>(), any::<bool>());
    let strategy = (proptest::collection::vec(op, 1..160), 1usize..20);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(ops, batch_len)| {
        clear(store);
        let mut model = Model::new();
        for (i, chunk) in ops.chunks(batch_len).enumerate() {
            let mut batch = WriteBatch::new();
            for &(l, c, e, phys, delete) in chunk {
                let key = map_key(l, c, e);
                if delete {
                    model.remove(key.as_slice());
                    batch.delete_cf(Cf::Map, key);
                } else {
                    model.insert(key.to_vec(), map_value(phys).to_vec());
                    batch.put_cf(Cf::Map, key, map_value(phys));
                }
            }
            store.write(batch, i % 2 == 0).unwrap();
        }
        check_against_model(store, Cf::Map, &model);
        for cf in Cf::ALL.into_iter().filter(|cf| *cf != Cf::Map) {
            prop_assert!(store.scan(cf, b"", b"", usize::MAX).unwrap().is_empty());
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    clear(store);
    assert_empty(store);
}

/// The model's answer to `scan`.
fn model_scan(model: &Model, start: &[u8], end: &[u8], limit: usize) -> Vec<Kv> {
    if !end.is_empty() && start >= end {
        return Vec::new();
    }
    let upper = if end.is_empty() {
        Bound::Unbounded
    } else {
        Bound::Excluded(end)
    };
    model
        .range::<[u8], _>((Bound::Included(start), upper))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The model's answer to `seek_for_prev`.
fn model_seek_for_prev(model: &Model, key: &[u8]) -> Option<Kv> {
    model
        .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
        .next_back()
        .map(|(k, v)| (k.clone(), v.clone()))
}

/// Probe keys around `key`: itself, just after, just before, and for a map key the
/// neighbouring epochs and chunks and its lineage's range ends.
fn probes_around(key: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![
        key.to_vec(),
        [key, &[0]].concat(),
        key[..key.len().saturating_sub(1)].to_vec(),
    ];
    if let Ok((l, c, e)) = decode_map_key(key) {
        out.push(map_key(l, c, e.wrapping_sub(1)).to_vec());
        out.push(map_key(l, c, e.wrapping_add(1)).to_vec());
        out.push(map_key(l, c.wrapping_add(1), 0).to_vec());
        out.push(map_lineage_start(l).to_vec());
        out.push(map_lineage_end(l));
        out.push(map_key(l.wrapping_add(1), 0, 0).to_vec());
        out.push(map_key(l.wrapping_sub(1), u64::MAX, u64::MAX).to_vec());
    }
    out
}

/// Checks every read of `cf` against `model`, its exact content: the full scan, scans
/// between many pairs of probe keys with several limits, per-lineage scans, and
/// `seek_for_prev` at every probe (exact hits, between keys, across lineage boundaries).
pub(crate) fn check_against_model(store: &dyn MetaStore, cf: Cf, model: &Model) {
    let full = store.scan(cf, b"", b"", usize::MAX).unwrap();
    assert_eq!(
        full,
        model_scan(model, b"", b"", usize::MAX),
        "full scan of {cf:?}"
    );
    assert!(
        full.windows(2).all(|w| w[0].0 < w[1].0),
        "scan not in ascending byte order"
    );

    let mut probes: Vec<Vec<u8>> = vec![Vec::new(), vec![0xff; 30]];
    for key in model.keys() {
        probes.extend(probes_around(key));
    }
    probes.sort();
    probes.dedup();

    for (i, start) in probes.iter().enumerate() {
        assert_eq!(
            store.seek_for_prev(cf, start).unwrap(),
            model_seek_for_prev(model, start),
            "seek_for_prev({start:02x?}) in {cf:?}"
        );
        // A spread of (start, end) pairs, forward and inverted, and of limits.
        let end = &probes[(i * 7 + 3) % probes.len()];
        let limit = [usize::MAX, 1, 5][i % 3];
        assert_eq!(
            store.scan(cf, start, end, limit).unwrap(),
            model_scan(model, start, end, limit),
            "scan({start:02x?}, {end:02x?}, {limit}) in {cf:?}"
        );
        assert_eq!(
            store.scan(cf, start, b"", 4).unwrap(),
            model_scan(model, start, b"", 4),
            "scan({start:02x?}, unbounded, 4) in {cf:?}"
        );
    }

    // Every lineage's own range, as the engine scans one volume.
    let lineages: std::collections::BTreeSet<u64> = model
        .keys()
        .filter_map(|k| decode_map_key(k).ok())
        .map(|(l, _, _)| l)
        .collect();
    for l in lineages {
        let (start, end) = (map_lineage_start(l), map_lineage_end(l));
        assert_eq!(
            store.scan(cf, &start, &end, usize::MAX).unwrap(),
            model_scan(model, &start, &end, usize::MAX),
            "scan of lineage {l} in {cf:?}"
        );
    }
}
