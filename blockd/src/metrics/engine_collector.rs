//! Metrics read from the engine at scrape time: pools, objects, engine counters and the
//! metadata store's statistics.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::engine::{Engine, PoolInfo, VolumeInfo};
use crate::meta::MetaStore;

/// What the collector reads.
pub(super) struct Source {
    pub engine: Engine,
    pub meta: Arc<dyn MetaStore>,
}

#[derive(Debug)]
pub(super) struct EngineCollector {
    source: Arc<OnceLock<Source>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").finish_non_exhaustive()
    }
}

impl EngineCollector {
    pub(super) fn new(source: Arc<OnceLock<Source>>) -> Self {
        EngineCollector { source }
    }
}

/// Writes one gauge family: one sample per item, labelled by `label`.
fn gauge_family<T>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    items: &[T],
    label: &'static str,
    key: fn(&T) -> &str,
    value: impl Fn(&T) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for item in items {
        let labels = [(label, key(item))];
        ConstGauge::new(value(item)).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// `name` gets `_total` appended by the encoder.
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(Source { engine, meta }) = self.source.get() else {
            return Ok(());
        };
        let pools: Vec<PoolInfo> = engine.pools();
        let volumes: Vec<VolumeInfo> = engine.volumes();
        let snapshots = engine.snapshots(None).map(|s| s.len()).unwrap_or(0);
        let exports = engine.exported_images().len();
        let e = &mut encoder;
        let name: fn(&PoolInfo) -> &str = |p| &p.name;

        gauge_family(
            e,
            "blockd_pool_capacity_bytes",
            "Usable data capacity of the pool",
            &pools,
            "pool",
            name,
            |p| p.capacity_bytes,
        )?;
        gauge_family(
            e,
            "blockd_pool_allocated_bytes",
            "Bytes of pool chunks holding data",
            &pools,
            "pool",
            name,
            |p| p.allocated_bytes,
        )?;
        gauge_family(
            e,
            "blockd_pool_free_bytes",
            "Bytes of free pool chunks",
            &pools,
            "pool",
            name,
            |p| p.free_bytes,
        )?;
        gauge_family(
            e,
            "blockd_pool_provisioned_bytes",
            "Sum of the sizes of the pool's volumes",
            &pools,
            "pool",
            name,
            |p| p.provisioned_bytes,
        )?;
        gauge_family(
            e,
            "blockd_pool_chunk_size_bytes",
            "Allocation unit of the pool",
            &pools,
            "pool",
            name,
            |p| p.chunk_size_bytes,
        )?;
        gauge_family(
            e,
            "blockd_pool_volumes",
            "Volumes in the pool",
            &pools,
            "pool",
            name,
            |p| p.volumes,
        )?;
        gauge_family(
            e,
            "blockd_pool_snapshots",
            "Snapshots in the pool",
            &pools,
            "pool",
            name,
            |p| p.snapshots,
        )?;
        gauge_family(
            e,
            "blockd_pool_healthy",
            "1 when the pool is healthy, 0 after a fatal I/O error or while degraded (metadata file system full)",
            &pools,
            "pool",
            name,
            |p| u64::from(p.health == "ok"),
        )?;
        {
            let mut metric = e.encode_descriptor(
                "blockd_pool_io_engine_info",
                "The I/O engine serving the pool (uring, or the sync fallback)",
                None,
                MetricType::Gauge,
            )?;
            for p in &pools {
                let engine_name = p.io_engine.to_string();
                let labels = [
                    ("pool", p.name.as_str()),
                    ("io_engine", engine_name.as_str()),
                ];
                ConstGauge::new(1u64).encode(metric.encode_family(&labels)?)?;
            }
        }

        gauge(
            e,
            "blockd_volumes",
            "Volumes in the daemon",
            volumes.len() as u64,
        )?;
        gauge(
            e,
            "blockd_snapshots",
            "Snapshots in the daemon",
            snapshots as u64,
        )?;
        gauge(
            e,
            "blockd_exports",
            "Images exported over NBD",
            exports as u64,
        )?;
        let vname: fn(&VolumeInfo) -> &str = |v| &v.name;
        gauge_family(
            e,
            "blockd_volume_size_bytes",
            "Provisioned size of the volume",
            &volumes,
            "volume",
            vname,
            |v| v.size_bytes,
        )?;
        gauge_family(
            e,
            "blockd_volume_allocated_bytes",
            "Bytes of chunks the volume holds in its own lineage",
            &volumes,
            "volume",
            vname,
            |v| v.allocated_bytes,
        )?;

        let stats = engine.stats();
        counter(
            e,
            "blockd_engine_commits",
            "Group commits of the chunk map",
            stats.commits.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "blockd_engine_cow_copies",
            "Chunks copied on write because a snapshot or clone still saw them",
            stats.cow_copies.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "blockd_gc_freed_chunks",
            "Chunks given back by garbage collection",
            stats.gc_freed_chunks.load(Ordering::Relaxed),
        )?;

        let meta_stats = meta.stats();
        if !meta_stats.is_empty() {
            let mut metric = e.encode_descriptor(
                "blockd_meta_property",
                "Metadata store (RocksDB) statistics, e.g. write stalls and pending compaction bytes",
                None,
                MetricType::Gauge,
            )?;
            for (name, value) in &meta_stats {
                let labels = [("name", name.as_str())];
                ConstGauge::new(*value).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
