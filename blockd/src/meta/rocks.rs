//! The RocksDB metadata store: the only module of blockd that imports `rocksdb`.
//!
//! [`RocksStore`] opens one RocksDB database with one column family per [`Cf`] (created
//! when missing) and implements [`MetaStore`] on it. Options follow BlueStore's and
//! docs/design.md's notes:
//!
//! | CF             | compression | filter                     | write buffer | notes                          |
//! |----------------|-------------|----------------------------|--------------|--------------------------------|
//! | map            | none        | bloom (whole key + prefix) | 64 MiB × 4   | 8-byte prefix = lineage id     |
//! | all the others | LZ4         | bloom, `optimize_filters_for_hits` | 16 MiB | small JSON records, point gets |
//!
//! Invariants:
//! - the WAL is always on, so a batch is atomic across column families and
//!   `write(batch, sync = true)` is durable when it returns (`WriteOptions::set_sync`);
//! - every iterator is opened with `total_order_seek`: the map CF's prefix extractor must
//!   never change a result. Without it, a seek in prefix mode may skip keys of another
//!   lineage, and `seek_for_prev(L|c|e)` on a lineage with no key `<= L|c|e` would miss
//!   the previous lineage's last key. The prefix extractor therefore only feeds the
//!   bloom filters (point gets and, should the engine ever ask, prefix-mode seeks);
//! - a second open of the same directory fails on RocksDB's `LOCK` file, in this process
//!   or another, with [`MetaError::Open`].
//!
//! The store closes on drop, syncing the WAL first so that a clean shutdown keeps even
//! the `sync = false` writes (memtables need no flush: the WAL replays them on open).
//!
//! # Resuming after a full file system
//! When a WAL append fails for lack of space, RocksDB sets a "hard" background error and
//! refuses every later write, even once space is freed: its own recovery
//! (`SstFileManager` polling) covers flushes and compactions, not the WAL, and the C API
//! has no `DB::Resume`. So the store resumes itself by *reopening* the database:
//! - after a failed write the store is marked stuck; the next write first checks the
//!   file system's free space ([`MIN_FREE_TO_REOPEN`]) and, when there is room, reopens;
//! - the reopen never leaves the store without a database to read from: a read-only
//!   instance (which takes no `LOCK`) is opened *before* the stuck one is closed, and
//!   serves reads until the writable one is open again (if that fails, the store stays
//!   read-only and stuck, and the next write tries again);
//! - nothing acknowledged is lost: every write RocksDB accepted is in the WAL (synced or
//!   in the page cache of this live process), and opening replays the WAL; a batch whose
//!   append failed is either absent or whole after replay (RocksDB's point-in-time WAL
//!   recovery drops a torn tail record), and the engine writes it again anyway.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{RwLock, RwLockReadGuard};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, ErrorKind,
    Options, ReadOptions, SliceTransform, WriteOptions, DB,
};

use super::{BatchOp, Cf, Kv, MetaError, MetaStore, Result, WriteBatch};

/// Length of the map CF's prefix: the big-endian lineage id that starts every map key.
const MAP_PREFIX_LEN: usize = 8;
/// Block cache shared by every column family (index and filter blocks live in it too).
const BLOCK_CACHE_BYTES: usize = 128 << 20;
/// The map takes most writes (one key per remapped chunk): a large memtable absorbs a
/// burst of remaps without a flush, and more of them let a flush run while writes go on.
const MAP_WRITE_BUFFER_BYTES: usize = 64 << 20;
const MAP_WRITE_BUFFERS: i32 = 4;
/// The other column families hold a few records per pool, image or operation.
const SMALL_WRITE_BUFFER_BYTES: usize = 16 << 20;
/// With several column families, one rarely written CF pins old WAL files until it
/// flushes; past this size RocksDB flushes it so the WAL cannot grow without bound.
const MAX_TOTAL_WAL_BYTES: u64 = 512 << 20;
/// Bloom filter bits per key (about 1% false positives).
const BLOOM_BITS_PER_KEY: f64 = 10.0;
/// A stuck store reopens only when its file system has at least this much free: opening
/// writes a new MANIFEST, OPTIONS file and WAL, and replaying the WAL may flush memtables.
pub const MIN_FREE_TO_REOPEN: u64 = 4 << 20;

/// The RocksDB [`MetaStore`].
pub struct RocksStore {
    /// Replaced only by [`RocksStore::reopen`], under the write lock.
    db: RwLock<DB>,
    path: PathBuf,
    /// A write failed: RocksDB may be refusing writes until it is reopened (module docs).
    stuck: AtomicBool,
}

impl RocksStore {
    /// Opens (creating if needed) the metadata store in `dir`.
    pub fn open(dir: &Path) -> Result<RocksStore> {
        Ok(RocksStore {
            db: RwLock::new(open_db(dir, Access::ReadWrite)?),
            path: dir.to_path_buf(),
            stuck: AtomicBool::new(false),
        })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a write failed and the store has not been reopened since.
    pub fn is_stuck(&self) -> bool {
        self.stuck.load(Ordering::SeqCst)
    }

    /// The open database, for reading (see [`RocksStore::reopen`]).
    fn db(&self) -> RwLockReadGuard<'_, DB> {
        self.db.read()
    }

    /// Closes and opens the database again, so that a RocksDB stopped by a background
    /// error (a full file system) takes writes again. Reads are served throughout by a
    /// read-only instance (module docs).
    pub fn reopen(&self) -> Result<()> {
        let mut db = self.db.write();
        // Whatever the WAL buffer holds: best effort, the file system may still be full.
        let _ = db.flush_wal(true);
        let read_only = open_db(&self.path, Access::ReadOnly)?;
        // Dropping the stuck instance releases the LOCK for the writable one.
        drop(std::mem::replace(&mut *db, read_only));
        let writable = open_db(&self.path, Access::ReadWrite)?;
        *db = writable;
        self.stuck.store(false, Ordering::SeqCst);
        tracing::info!(path = %self.path.display(), "metadata store reopened after a failed write");
        Ok(())
    }

    /// Before a write of a stuck store: reopens it when its file system has room again.
    fn unstick(&self) {
        if !self.is_stuck() {
            return;
        }
        match free_bytes(&self.path) {
            Ok(free) if free >= MIN_FREE_TO_REOPEN => {
                if let Err(e) = self.reopen() {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot reopen the metadata store yet");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the metadata file system's free space")
            }
        }
    }

    /// Flushes every column family's memtable to SST files. Not needed for durability
    /// (the WAL covers it); useful before a backup and to test the on-disk read path.
    pub fn flush(&self) -> Result<()> {
        let db = self.db();
        for cf in Cf::ALL {
            db.flush_cf(handle(&db, cf, "flush")?)
                .map_err(store_err("flush"))?;
        }
        Ok(())
    }

    /// Compacts every column family down to its last level (tests of the SST read path,
    /// where `optimize_filters_for_hits` drops the last level's filters).
    #[cfg(test)]
    fn compact(&self) -> Result<()> {
        let db = self.db();
        for cf in Cf::ALL {
            db.compact_range_cf(handle(&db, cf, "compact")?, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Read options for iterators: total order, whatever the CF's prefix extractor.
    fn iter_options() -> ReadOptions {
        let mut opts = ReadOptions::default();
        opts.set_total_order_seek(true);
        opts
    }

    /// Reads one integer property, DB-wide (`cf = None`) or of one column family.
    fn property(&self, cf: Option<Cf>, name: &str) -> Option<u64> {
        let db = self.db();
        let value = match cf {
            None => db.property_int_value(name),
            Some(cf) => {
                let handle = db.cf_handle(cf.name())?;
                db.property_int_value_cf(handle, name)
            }
        };
        // Statistics are best effort: a property this RocksDB does not know is skipped.
        value.ok().flatten()
    }
}

/// How [`open_db`] opens the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Creating what is missing; takes the `LOCK`.
    ReadWrite,
    /// An existing database, no writes, no `LOCK` (serves reads during a reopen).
    ReadOnly,
}

/// Opens the database in `dir` with every column family.
fn open_db(dir: &Path, access: Access) -> Result<DB> {
    let open_err = |message: String| MetaError::Open {
        path: dir.display().to_string(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;

    let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES);
    // RocksDB's info LOG files otherwise accumulate forever in the store directory.
    db_opts.set_keep_log_file_num(4);
    db_opts.set_max_log_file_size(16 << 20);

    let cfs: Vec<ColumnFamilyDescriptor> = Cf::ALL
        .iter()
        .map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(*cf, &cache)))
        .collect();
    let opened = match access {
        Access::ReadWrite => DB::open_cf_descriptors(&db_opts, dir, cfs),
        Access::ReadOnly => DB::open_cf_descriptors_read_only(&db_opts, dir, cfs, false),
    };
    let db = opened.map_err(|e| {
        let message = e.into_string();
        // RocksDB says "While lock file: <dir>/LOCK: Resource temporarily unavailable"
        // (another process) or "lock hold by current process"; say what it means.
        if message.contains("/LOCK:") || message.contains("lock hold by current process") {
            open_err(format!(
                "the store is already open (another blockd, or a second open in this \
                     process): {message}"
            ))
        } else {
            open_err(message)
        }
    })?;
    for cf in Cf::ALL {
        if db.cf_handle(cf.name()).is_none() {
            return Err(open_err(format!("column family {} is missing", cf.name())));
        }
    }
    Ok(db)
}

/// The handle of `cf`; [`open_db`] checked that every one exists.
fn handle<'a>(db: &'a DB, cf: Cf, op: &'static str) -> Result<&'a ColumnFamily> {
    db.cf_handle(cf.name()).ok_or_else(|| MetaError::Store {
        op,
        message: format!("column family {} is missing", cf.name()),
    })
}

/// Free bytes for an unprivileged writer on the file system holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a pointer to a statvfs the call fills in.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The options of one column family (see the table in the module docs).
fn cf_options(cf: Cf, cache: &Cache) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Full (not block-based) filters; with a prefix extractor they also hold prefixes.
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
    // Keep index and filter blocks in the bounded cache rather than in unaccounted heap,
    // but pin L0's: they are read by every lookup.
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);

    let mut opts = Options::default();
    opts.set_block_based_table_factory(&table);
    match cf {
        Cf::Map => {
            // Map values are 8-byte physical chunk numbers and keys are big-endian ids:
            // nothing for a compressor to win, and it would cost CPU on every flush and
            // compaction of the hottest CF.
            opts.set_compression_type(DBCompressionType::None);
            opts.set_prefix_extractor(SliceTransform::create_fixed_prefix(MAP_PREFIX_LEN));
            opts.set_write_buffer_size(MAP_WRITE_BUFFER_BYTES);
            opts.set_max_write_buffer_number(MAP_WRITE_BUFFERS);
        }
        Cf::Meta | Cf::Pools | Cf::Images | Cf::Lineages | Cf::Intents => {
            // Point lookups of keys that exist: the last level's filters would only say
            // "maybe" for them, so skip building them (BlueStore does the same).
            opts.set_optimize_filters_for_hits(true);
            opts.set_compression_type(DBCompressionType::Lz4);
            opts.set_write_buffer_size(SMALL_WRITE_BUFFER_BYTES);
        }
    }
    opts
}

/// Maps a RocksDB error of operation `op` to [`MetaError::NoSpace`] when its file system
/// is full, else to [`MetaError::Store`].
///
/// RocksDB reports a full file system as an `IOError` with sub-code `NoSpace`, whose text
/// is "No space left on device"; the C API passes only the text. After such an error on
/// a write RocksDB stops writes (a "hard" background error) until the store is reopened
/// (module docs).
fn store_err(op: &'static str) -> impl Fn(rocksdb::Error) -> MetaError {
    move |e| {
        if is_no_space(e.as_ref()) {
            return MetaError::NoSpace {
                op,
                message: e.into_string(),
            };
        }
        MetaError::Store {
            op,
            message: if e.kind() == ErrorKind::Corruption {
                format!("RocksDB reports corruption: {e}")
            } else {
                e.into_string()
            },
        }
    }
}

/// Whether a RocksDB error text says the file system is full.
fn is_no_space(message: &str) -> bool {
    message.contains("No space left on device") || message.contains("NoSpace")
}

impl fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        // Make the `sync = false` tail durable on a clean shutdown; RocksDB's own close
        // (dropping `db`) waits for running flushes and compactions.
        if let Err(e) = self.db.get_mut().flush_wal(true) {
            tracing::warn!(path = %self.path.display(), error = %e, "Cannot sync the metadata WAL on close");
        }
    }
}

impl MetaStore for RocksStore {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let db = self.db();
        db.get_pinned_cf(handle(&db, cf, "get")?, key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(store_err("get"))
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        self.unstick();
        let db = self.db();
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        let result = if batch.is_empty() {
            // An empty batch is a barrier: with `sync` it must still make every earlier
            // write durable.
            if sync {
                db.flush_wal(true).map_err(store_err("write"))
            } else {
                Ok(())
            }
        } else {
            let mut rocks = rocksdb::WriteBatch::default();
            for op in &batch.ops {
                match op {
                    BatchOp::Put { cf, key, value } => {
                        rocks.put_cf(handle(&db, *cf, "write")?, key, value)
                    }
                    BatchOp::Delete { cf, key } => rocks.delete_cf(handle(&db, *cf, "write")?, key),
                }
            }
            db.write_opt(rocks, &opts).map_err(store_err("write"))
        };
        if result.is_err() {
            self.stuck.store(true, Ordering::SeqCst);
        }
        result
    }

    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Kv>> {
        if limit == 0 || (!end.is_empty() && start >= end) {
            return Ok(Vec::new());
        }
        let db = self.db();
        let handle = handle(&db, cf, "scan")?;
        let mut opts = Self::iter_options();
        if !end.is_empty() {
            // The bound lets RocksDB stop at the end instead of reading past it (and
            // skip the tombstones beyond it).
            opts.set_iterate_upper_bound(end);
        }
        let mut iter = db.raw_iterator_cf_opt(handle, opts);
        iter.seek(start);
        let mut out = Vec::new();
        while out.len() < limit {
            match iter.item() {
                Some((k, v)) => out.push((k.to_vec(), v.to_vec())),
                None => break,
            }
            iter.next();
        }
        iter.status().map_err(store_err("scan"))?;
        Ok(out)
    }

    fn seek_for_prev(&self, cf: Cf, key: &[u8]) -> Result<Option<Kv>> {
        let db = self.db();
        let mut iter =
            db.raw_iterator_cf_opt(handle(&db, cf, "seek_for_prev")?, Self::iter_options());
        iter.seek_for_prev(key);
        if let Some((k, v)) = iter.item() {
            return Ok(Some((k.to_vec(), v.to_vec())));
        }
        iter.status().map_err(store_err("seek_for_prev"))?;
        Ok(None)
    }

    /// DB-wide RocksDB properties under their own names (write stalls, running
    /// background jobs), and a few per-CF ones as `"<property>:<cf>"`.
    fn stats(&self) -> Vec<(String, u64)> {
        const DB_WIDE: [&str; 5] = [
            "rocksdb.num-running-compactions",
            "rocksdb.num-running-flushes",
            "rocksdb.is-write-stopped",
            "rocksdb.actual-delayed-write-rate",
            "rocksdb.background-errors",
        ];
        const PER_CF: [&str; 3] = [
            "rocksdb.estimate-num-keys",
            "rocksdb.estimate-pending-compaction-bytes",
            "rocksdb.cur-size-all-mem-tables",
        ];
        let mut out: Vec<(String, u64)> = DB_WIDE
            .iter()
            .filter_map(|name| Some((name.to_string(), self.property(None, name)?)))
            .collect();
        for cf in Cf::ALL {
            for name in PER_CF {
                if let Some(v) = self.property(Some(cf), name) {
                    out.push((format!("{name}:{}", cf.name()), v));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    //! RocksDB-specific behaviour: persistence across reopen, the LOCK, the prefix
    //! extractor on the SST read path, statistics. Shared behaviour is in
    //! `meta::conformance`.

    use std::collections::BTreeMap;

    use super::*;
    use crate::meta::conformance;
    use crate::meta::keys::{map_key, map_value};

    #[test]
    fn reopen_keeps_synced_and_cleanly_closed_data() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RocksStore::open(dir.path()).unwrap();
            let mut b = WriteBatch::new();
            for cf in Cf::ALL {
                b.put_cf(cf, b"k".to_vec(), cf.name().as_bytes().to_vec());
                b.put_cf(cf, b"gone".to_vec(), b"x".to_vec());
            }
            store.write(b, true).unwrap();
            let mut b = WriteBatch::new();
            b.delete_cf(Cf::Images, b"gone".to_vec());
            b.put_cf(Cf::Map, map_key(1, 2, 3), map_value(4));
            store.write(b, false).unwrap();
        }
        let store = RocksStore::open(dir.path()).unwrap();
        for cf in Cf::ALL {
            assert_eq!(
                store.get(cf, b"k").unwrap().as_deref(),
                Some(cf.name().as_bytes())
            );
        }
        assert_eq!(store.get(Cf::Images, b"gone").unwrap(), None);
        assert_eq!(
            store.get(Cf::Pools, b"gone").unwrap().as_deref(),
            Some(&b"x"[..])
        );
        assert_eq!(
            store.get(Cf::Map, &map_key(1, 2, 3)).unwrap().as_deref(),
            Some(&map_value(4)[..])
        );
    }

    /// What `reopen` does after a full file system: everything written (synced or not)
    /// is there afterwards, and writes are taken again.
    #[test]
    fn reopen_keeps_every_write_and_takes_writes_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let mut b = WriteBatch::new();
        b.put_cf(Cf::Images, b"synced".to_vec(), b"1".to_vec());
        store.write(b, true).unwrap();
        let mut b = WriteBatch::new();
        b.put_cf(Cf::Map, map_key(1, 2, 3), map_value(4));
        store.write(b, false).unwrap();
        store.stuck.store(true, Ordering::SeqCst);
        store.reopen().unwrap();
        assert!(!store.is_stuck());
        assert_eq!(
            store.get(Cf::Images, b"synced").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(
            store.get(Cf::Map, &map_key(1, 2, 3)).unwrap().as_deref(),
            Some(&map_value(4)[..])
        );
        let mut b = WriteBatch::new();
        b.put_cf(Cf::Images, b"after".to_vec(), b"2".to_vec());
        store.write(b, true).unwrap();
        drop(store);
        let store = RocksStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get(Cf::Images, b"after").unwrap().as_deref(),
            Some(&b"2"[..])
        );
    }

    #[test]
    fn second_open_fails_on_the_lock_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let first = RocksStore::open(dir.path()).unwrap();
        let err = RocksStore::open(dir.path()).unwrap_err();
        match &err {
            MetaError::Open { path, message } => {
                assert_eq!(path, &dir.path().display().to_string());
                assert!(message.contains("already open"), "{err}");
            }
            other => panic!("expected MetaError::Open, got {other:?}"),
        }
        drop(first);
        RocksStore::open(dir.path()).unwrap();
    }

    #[test]
    fn open_fails_cleanly_on_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            RocksStore::open(&file),
            Err(MetaError::Open { .. })
        ));
    }

    #[test]
    fn reopened_store_still_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance::conformance(&RocksStore::open(dir.path()).unwrap());
        // The second run starts from a reopened store whose WAL replays the first run.
        conformance::conformance(&RocksStore::open(dir.path()).unwrap());
    }

    /// The map CF's prefix extractor must not change scan or seek results once keys
    /// sit in SST files (where the prefix bloom filters live) rather than the memtable.
    #[test]
    fn prefix_extractor_keeps_total_order_on_ssts() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let mut model = BTreeMap::new();
        let mut put = |lineages: &[u64], salt: u64| {
            let mut b = WriteBatch::new();
            for &l in lineages {
                for c in (0..40).step_by(3) {
                    let (k, v) = (map_key(l, c, salt), map_value(l ^ c ^ salt));
                    model.insert(k.to_vec(), v.to_vec());
                    b.put_cf(Cf::Map, k, v);
                }
            }
            store.write(b, true).unwrap();
        };
        // Gaps between lineages (no lineage 2, 4..9) are where a prefix seek goes wrong.
        put(&[1, 3, 10], 5);
        store.flush().unwrap();
        store.compact().unwrap();
        put(&[0, 3, u64::MAX], 7);
        store.flush().unwrap();
        put(&[10, 11], 9); // in the memtable
        conformance::check_against_model(&store, Cf::Map, &model);
        store.compact().unwrap();
        conformance::check_against_model(&store, Cf::Map, &model);

        // seek_for_prev from an absent lineage lands on the previous lineage's last key.
        let (k, _) = store
            .seek_for_prev(Cf::Map, &map_key(5, 0, 0))
            .unwrap()
            .unwrap();
        assert_eq!(k, map_key(3, 39, 7));
        let (k, _) = store
            .seek_for_prev(Cf::Map, &map_key(2, u64::MAX, u64::MAX))
            .unwrap()
            .unwrap();
        assert_eq!(k, map_key(1, 39, 5));
        // A full scan crosses every prefix.
        assert_eq!(
            store.scan(Cf::Map, b"", b"", usize::MAX).unwrap().len(),
            model.len()
        );
    }

    #[test]
    fn a_full_file_system_is_told_apart_from_other_errors() {
        // RocksDB's texts for a failed WAL append, and for a write refused afterwards
        // while its background error stands.
        assert!(is_no_space(
            "IO error: No space left on device: While appending to file: /m/000004.log: No space left on device"
        ));
        assert!(is_no_space("IO error: No space left on device"));
        assert!(!is_no_space("Corruption: block checksum mismatch"));
        assert!(!is_no_space(
            "IO error: Input/output error: While fsync: /m/000004.log"
        ));
    }

    #[test]
    fn stats_report_background_and_key_counters() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let mut b = WriteBatch::new();
        for c in 0..10 {
            b.put_cf(Cf::Map, map_key(1, c, 0), map_value(c));
        }
        store.write(b, false).unwrap();
        let stats: BTreeMap<String, u64> = store.stats().into_iter().collect();
        for name in [
            "rocksdb.num-running-compactions",
            "rocksdb.is-write-stopped",
            "rocksdb.actual-delayed-write-rate",
        ] {
            assert!(stats.contains_key(name), "{name} missing from {stats:?}");
        }
        assert_eq!(stats["rocksdb.is-write-stopped"], 0);
        assert!(stats["rocksdb.estimate-num-keys:map"] >= 1, "{stats:?}");
    }
}
