//! Prometheus metrics: every `blockd_*` metric is declared here, and `/metrics` serves
//! them in the Prometheus text format (0.0.4).
//!
//! Two kinds of metrics, kept apart on purpose:
//! - **recorded** as things happen, by the layer that sees them: per-image I/O (ops,
//!   bytes, errors, latency histograms — the NBD layer records them through an
//!   [`ImageIoMetrics`] handle taken once per connection, so the hot path costs a few
//!   atomic adds and no label lookup), and API requests (the `api` layer);
//! - **read at scrape time** from the engine by a collector ([`Metrics::attach`]): pool
//!   capacity/usage, object counts, per-volume size and allocation, engine counters and
//!   metadata-store statistics. Reading them on demand means they can never go stale
//!   or leak series for deleted objects.
//!
//! Invariant: names follow Prometheus conventions (`_total` for counters, `_bytes`,
//! `_seconds`); labels are `pool`, `volume` (an image: `VOL` or `VOL@SNAP`), `op`,
//! `method`, `code`.

mod engine_collector;
mod http;

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::engine::{Engine, GcStats};
use crate::meta::MetaStore;

pub use http::{bind, serve, CONTENT_TYPE};

/// A data-path operation, as recorded per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
    BlockStatus,
}

impl IoOp {
    pub const ALL: [IoOp; 6] = [
        IoOp::Read,
        IoOp::Write,
        IoOp::WriteZeroes,
        IoOp::Trim,
        IoOp::Flush,
        IoOp::BlockStatus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::WriteZeroes => "write_zeroes",
            IoOp::Trim => "trim",
            IoOp::Flush => "flush",
            IoOp::BlockStatus => "block_status",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for IoOp {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IoLabels {
    volume: String,
    op: IoOp,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UblkLabels {
    image: String,
    device: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn io_latency_histogram() -> Histogram {
    // 10 µs .. ~10 s: a cached read to a stalled device.
    Histogram::new(exponential_buckets(10e-6, 2.0, 21))
}

fn rpc_latency_histogram() -> Histogram {
    // 100 µs .. ~26 s: a lookup to a flatten or fsck of a big pool.
    Histogram::new(exponential_buckets(100e-6, 4.0, 10))
}

struct Inner {
    registry: Registry,
    io_ops: Family<IoLabels, Counter>,
    io_bytes: Family<IoLabels, Counter>,
    io_errors: Family<IoLabels, Counter>,
    io_latency: HistogramFamily<IoLabels>,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_latency: HistogramFamily<MethodLabels>,
    gc_backlog: Gauge,
    ublk_devices: Family<UblkLabels, Gauge>,
    source: Arc<OnceLock<engine_collector::Source>>,
}

/// The daemon's metrics. Cheap to clone; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("engine_attached", &self.inner.source.get().is_some())
            .finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let io_ops = Family::<IoLabels, Counter>::default();
        let io_bytes = Family::<IoLabels, Counter>::default();
        let io_errors = Family::<IoLabels, Counter>::default();
        let io_latency: HistogramFamily<IoLabels> =
            Family::new_with_constructor(io_latency_histogram);
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_latency: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(rpc_latency_histogram);
        let gc_backlog = Gauge::default();
        let ublk_devices = Family::<UblkLabels, Gauge>::default();
        registry.register(
            "blockd_volume_ops",
            "I/O operations completed (NBD and ublk), by image and operation",
            io_ops.clone(),
        );
        registry.register(
            "blockd_volume_bytes",
            "Bytes read, written, zeroed or trimmed, by image and operation",
            io_bytes.clone(),
        );
        registry.register(
            "blockd_volume_errors",
            "I/O operations that failed (NBD and ublk), by image and operation",
            io_errors.clone(),
        );
        registry.register(
            "blockd_volume_op_duration_seconds",
            "Latency of I/O operations (NBD and ublk), by image and operation",
            io_latency.clone(),
        );
        registry.register(
            "blockd_api_requests",
            "gRPC API requests, by method and status code",
            rpc_requests.clone(),
        );
        registry.register(
            "blockd_api_request_duration_seconds",
            "Latency of gRPC API requests, by method",
            rpc_latency.clone(),
        );
        registry.register(
            "blockd_gc_backlog_entries",
            "Map entries the last garbage-collection pass left to examine",
            gc_backlog.clone(),
        );
        registry.register(
            "blockd_ublk_device",
            "Images attached as ublk devices: 1 while the device serves I/O, 0 while it is being recovered or has failed",
            ublk_devices.clone(),
        );
        let source = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(engine_collector::EngineCollector::new(
            source.clone(),
        )));
        Metrics {
            inner: Arc::new(Inner {
                registry,
                io_ops,
                io_bytes,
                io_errors,
                io_latency,
                rpc_requests,
                rpc_latency,
                gc_backlog,
                ublk_devices,
                source,
            }),
        }
    }

    /// Records the state of the ublk device of `image`: serving I/O (`live`) or not.
    pub fn set_ublk_device(&self, image: &str, device: &str, live: bool) {
        self.inner
            .ublk_devices
            .get_or_create(&UblkLabels {
                image: image.to_string(),
                device: device.to_string(),
            })
            .set(i64::from(live));
    }

    /// Forgets the ublk device of `image` (detached).
    pub fn forget_ublk_device(&self, image: &str, device: &str) {
        self.inner.ublk_devices.remove(&UblkLabels {
            image: image.to_string(),
            device: device.to_string(),
        });
    }

    /// Makes scrapes report the engine's pools, volumes and counters, and the metadata
    /// store's statistics. Only the first call has an effect.
    pub fn attach(&self, engine: Engine, meta: Arc<dyn MetaStore>) {
        let _ = self
            .inner
            .source
            .set(engine_collector::Source { engine, meta });
    }

    /// The handle through which the data path records the I/O of one image ("VOL" or
    /// "VOL@SNAP"). Take it once (e.g. per connection) and record through it.
    pub fn image_io(&self, image: &str) -> ImageIoMetrics {
        let handles = |op: IoOp| {
            let labels = IoLabels {
                volume: image.to_string(),
                op,
            };
            (
                self.inner.io_ops.get_or_create_owned(&labels),
                self.inner.io_bytes.get_or_create_owned(&labels),
                self.inner.io_errors.get_or_create_owned(&labels),
                self.inner.io_latency.get_or_create_owned(&labels),
            )
        };
        let all = IoOp::ALL.map(handles);
        ImageIoMetrics {
            ops: all.clone().map(|h| h.0),
            bytes: all.clone().map(|h| h.1),
            errors: all.clone().map(|h| h.2),
            latency: all.map(|h| h.3),
        }
    }

    /// Drops the I/O series of a deleted image, so that they stop being exported.
    pub fn forget_image(&self, image: &str) {
        for op in IoOp::ALL {
            let labels = IoLabels {
                volume: image.to_string(),
                op,
            };
            self.inner.io_ops.remove(&labels);
            self.inner.io_bytes.remove(&labels);
            self.inner.io_errors.remove(&labels);
            self.inner.io_latency.remove(&labels);
        }
    }

    /// Counts one API request.
    pub fn record_rpc(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        let code = format!("{code:?}");
        self.inner
            .rpc_requests
            .get_or_create(&RpcLabels { method, code })
            .inc();
        self.inner
            .rpc_latency
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Records the outcome of a garbage-collection pass.
    pub fn record_gc(&self, stats: &GcStats) {
        self.inner
            .gc_backlog
            .set(i64::try_from(stats.backlog).unwrap_or(i64::MAX));
    }

    /// Everything, in the Prometheus text format. Reads the engine when one is attached,
    /// so call it from a blocking thread.
    pub fn encode(&self) -> String {
        // The background GC reports its backlog through the engine's counters.
        if let Some(src) = self.inner.source.get() {
            let backlog = src
                .engine
                .stats()
                .gc_backlog
                .load(std::sync::atomic::Ordering::Relaxed);
            self.inner
                .gc_backlog
                .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(err) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry)
        {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        out
    }
}

/// Per-image I/O recorders, one set per [`IoOp`]. Cheap to clone; recording is a few
/// atomic operations.
#[derive(Debug, Clone)]
pub struct ImageIoMetrics {
    ops: [Counter; 6],
    bytes: [Counter; 6],
    errors: [Counter; 6],
    latency: [Histogram; 6],
}

impl ImageIoMetrics {
    /// Records one completed operation of `bytes` bytes that took `latency`.
    pub fn record(&self, op: IoOp, bytes: u64, latency: Duration) {
        let i = op.index();
        self.ops[i].inc();
        if bytes > 0 {
            self.bytes[i].inc_by(bytes);
        }
        self.latency[i].observe(latency.as_secs_f64());
    }

    /// Records one failed operation.
    pub fn record_error(&self, op: IoOp) {
        self.errors[op.index()].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_is_recorded_per_image_and_op() {
        let m = Metrics::new();
        let io = m.image_io("vol1");
        io.record(IoOp::Read, 4096, Duration::from_micros(50));
        io.record(IoOp::Read, 4096, Duration::from_micros(70));
        io.record(IoOp::Write, 512, Duration::from_millis(2));
        io.record_error(IoOp::Flush);
        m.image_io("vol1@s1")
            .record(IoOp::Read, 1, Duration::from_micros(1));
        let text = m.encode();
        assert!(
            text.contains("blockd_volume_ops_total{volume=\"vol1\",op=\"read\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("blockd_volume_bytes_total{volume=\"vol1\",op=\"read\"} 8192"),
            "{text}"
        );
        assert!(
            text.contains("blockd_volume_errors_total{volume=\"vol1\",op=\"flush\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "blockd_volume_op_duration_seconds_count{volume=\"vol1\",op=\"write\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("volume=\"vol1@s1\""), "{text}");

        m.forget_image("vol1");
        let text = m.encode();
        assert!(!text.contains("volume=\"vol1\""), "{text}");
        assert!(text.contains("volume=\"vol1@s1\""), "{text}");
    }

    #[test]
    fn rpcs_and_gc_are_recorded() {
        let m = Metrics::new();
        m.record_rpc("CreateVolume", tonic::Code::Ok, Duration::from_millis(3));
        m.record_rpc(
            "CreateVolume",
            tonic::Code::AlreadyExists,
            Duration::from_millis(1),
        );
        m.record_gc(&GcStats {
            backlog: 17,
            ..GcStats::default()
        });
        let text = m.encode();
        assert!(
            text.contains(
                "blockd_api_requests_total{method=\"CreateVolume\",code=\"AlreadyExists\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("blockd_gc_backlog_entries 17"), "{text}");
        assert!(
            text.contains("blockd_api_request_duration_seconds_count{method=\"CreateVolume\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn without_an_engine_only_recorded_metrics_appear() {
        let text = Metrics::new().encode();
        assert!(!text.contains("blockd_pool_capacity_bytes"), "{text}");
    }
}
