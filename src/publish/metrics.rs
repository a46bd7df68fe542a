//! The consumer's Prometheus metrics: this module owns the registry, the
//! metric families (names prefixed `weatherstream_`, counters ending in
//! `_total`, units in the name) and the `/metrics` endpoint, served by
//! [`crate::web`] when `--metrics-addr` is given. Workers and the exporter
//! update per-partition handles; encoding is the `prometheus` crate's text
//! format.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::kafka::{Offset, PartitionId};
use crate::publish::health::Health;
use crate::web::{Page, Pages, WebConfig, WebServer};

/// Buckets of the commit and publish durations: 100 µs to 2.5 s. A commit
/// (sled transaction and flush) takes a few ms on a local disk, a publish
/// (render, fsync, rename, fsync) about as long; a stalling disk shows in
/// the upper buckets.
const DURATION_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Every metric of one process.
pub(crate) struct Metrics {
    registry: Registry,
    partitions_owned: IntGauge,
    rebalances: IntCounterVec,
    published_fenced: IntCounterVec,
    next_offset: IntGaugeVec,
    lag: IntGaugeVec,
    counted: IntCounterVec,
    duplicates: IntCounterVec,
    malformed: IntCounterVec,
    recreations: IntCounterVec,
    batches: IntCounterVec,
    commit_seconds: HistogramVec,
    publish_seconds: HistogramVec,
    last_publish: GaugeVec,
    storage_stalled: IntGaugeVec,
    running: IntGaugeVec,
    progress_stalled: IntGaugeVec,
    fetch_requests: IntCounterVec,
    fsyncs: IntCounter,
    snapshots_written: IntCounterVec,
    snapshots_failed: IntCounterVec,
    snapshot_bytes: IntCounterVec,
    snapshot_offset: IntGaugeVec,
    restore_seconds: GaugeVec,
    replayed: IntCounterVec,
    handoff_seconds: GaugeVec,
}

/// One partition's snapshot-topic handles.
#[derive(Clone)]
pub(crate) struct SnapshotMetrics {
    written: IntCounter,
    failed: IntCounter,
    bytes: IntCounter,
    offset: IntGauge,
}

impl SnapshotMetrics {
    /// A snapshot of `bytes` at `next_offset` was written (acknowledged).
    pub(crate) fn written(&self, bytes: usize, next_offset: Offset) {
        self.written.inc();
        self.bytes.inc_by(bytes as u64);
        self.offset.set(next_offset);
    }

    pub(crate) fn failed(&self) {
        self.failed.inc();
    }
}

/// One partition's handles: updating them takes no lookup.
#[derive(Clone)]
pub(crate) struct PartitionMetrics {
    partition: String,
    next_offset: IntGauge,
    lag_family: IntGaugeVec,
    counted: IntCounter,
    duplicates: IntCounter,
    malformed: IntCounter,
    recreations: IntCounter,
    batches: IntCounter,
    commit_seconds: Histogram,
    publish_seconds: Histogram,
    last_publish: Gauge,
    storage_stalled: IntGauge,
    running: IntGauge,
    progress_stalled: IntGauge,
}

/// Registers a metric family and returns it (the registry keeps a clone).
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, family: M) -> M {
    registry
        .register(Box::new(family.clone()))
        .expect("each family is registered once, with a valid name");
    family
}

impl Metrics {
    pub(crate) fn new() -> Arc<Self> {
        let registry = Registry::new();
        // The standard process_* series (CPU, memory, open files, start
        // time), as every Prometheus client exports them.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("the process collector is registered once");
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "weatherstream_build_info",
                    "1, labelled with this build's version and the librdkafka inside",
                ),
                &["version", "librdkafka"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                &rdkafka::util::get_rdkafka_version().1,
            ])
            .set(1);
        let labels = &["partition"];
        let int_gauge = |name: &str, help: &str| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let next_offset = int_gauge(
            "weatherstream_next_offset",
            "Offset of the next record to read, as committed",
        );
        let running = int_gauge(
            "weatherstream_partition_running",
            "1 from the partition's first publish after its start (its state opened, \
             reconciled and restored) until it stops, else 0: not ready before",
        );
        let storage_stalled = int_gauge(
            "weatherstream_storage_stalled",
            "1 while the partition's commits fail (a full or failing disk), else 0",
        );
        let progress_stalled = int_gauge(
            "weatherstream_progress_stalled",
            "1 while the partition is behind its log and has read nothing for 30 s, else 0",
        );
        let lag = int_gauge(
            "weatherstream_lag_records",
            "High watermark minus next offset, as the client last heard it (absent while unknown)",
        );
        let counter = |name: &str, help: &str| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counted = counter(
            "weatherstream_reports_counted_total",
            "Reports counted into the statistics by this process",
        );
        let duplicates = counter(
            "weatherstream_duplicates_dropped_total",
            "Reports dropped as repeats of a recorded date by this process",
        );
        let malformed = counter(
            "weatherstream_malformed_skipped_total",
            "Messages skipped as malformed by this process",
        );
        let recreations = counter(
            "weatherstream_recreations_detected_total",
            "Topic re-creations detected (statistics reset to offset 0)",
        );
        let fetch_requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "weatherstream_fetch_requests_total",
                    "Fetch requests sent, by client: shared (partitions at the end of their log), \
                     partition-N (catching up, reading again), verify-N (checks); librdkafka \
                     statistics, every second",
                ),
                &["client"],
            )
            .expect("valid metric"),
        );
        let batches = counter(
            "weatherstream_batches_committed_total",
            "Batches committed (one sled transaction each)",
        );
        let histogram = |name: &str, help: &str| {
            register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
                    labels,
                )
                .expect("valid metric"),
            )
        };
        let commit_seconds = histogram(
            "weatherstream_commit_duration_seconds",
            "Time of one batch commit: sled transaction, flush and fsync",
        );
        let publish_seconds = histogram(
            "weatherstream_publish_duration_seconds",
            "Time of one partition file publish: render, fsync, rename, fsync of the folder",
        );
        let last_publish = register(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "weatherstream_last_publish_timestamp_seconds",
                    "When the partition file was last published, Unix time",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let fsyncs = register(
            &registry,
            IntCounter::new(
                "weatherstream_fsyncs_total",
                "fsyncs of files and folders by this process: commits, proofs, publishes",
            )
            .expect("valid metric"),
        );
        let snapshots_written = counter(
            "weatherstream_snapshots_written_total",
            "Snapshots written to the snapshot topic and acknowledged",
        );
        let snapshots_failed = counter(
            "weatherstream_snapshots_failed_total",
            "Snapshots the snapshot topic refused or did not acknowledge in time (retried later)",
        );
        let snapshot_bytes = counter(
            "weatherstream_snapshot_bytes_total",
            "Bytes of the snapshot records written (values), acknowledged",
        );
        let snapshot_offset = int_gauge(
            "weatherstream_snapshot_offset",
            "Next offset of the partition's last snapshot written",
        );
        let restore_seconds = register(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "weatherstream_restore_duration_seconds",
                    "Time the partition's last start spent reading and checking its snapshots",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let replayed = counter(
            "weatherstream_records_replayed_total",
            "Records a start counts again: the newest offset the partition file or the snapshot \
             topic showed for the partition, less the offset the start resumed from",
        );
        let handoff_seconds = register(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "weatherstream_handoff_seconds",
                    "A group member's last take-over of the partition: from the previous \
                     owner's last publish or snapshot to this member's first publish",
                ),
                labels,
            )
            .expect("valid metric"),
        );
        let partitions_owned = register(
            &registry,
            IntGauge::new(
                "weatherstream_partitions_owned",
                "Partitions this process runs now (a group member's share)",
            )
            .expect("valid metric"),
        );
        let rebalances = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "weatherstream_rebalances_total",
                    "Group rebalances seen by this member, by kind: assigned, revoked (a clean \
                     hand-off), lost (the session expired)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        );
        // At zero from the start: a dashboard's rate() needs the series.
        for kind in ["assigned", "revoked", "lost"] {
            rebalances.with_label_values(&[kind]);
        }
        let published_fenced = counter(
            "weatherstream_publishes_fenced_total",
            "Publishes not written because the partition file was already newer \
             (another group member's)",
        );
        Arc::new(Metrics {
            partitions_owned,
            rebalances,
            published_fenced,
            snapshots_written,
            snapshots_failed,
            snapshot_bytes,
            snapshot_offset,
            restore_seconds,
            replayed,
            handoff_seconds,
            registry,
            next_offset,
            lag,
            counted,
            duplicates,
            malformed,
            recreations,
            batches,
            commit_seconds,
            publish_seconds,
            last_publish,
            storage_stalled,
            running,
            progress_stalled,
            fetch_requests,
            fsyncs,
        })
    }

    /// The handles of one partition (its series appear at once, at zero).
    pub(crate) fn partition(&self, partition: PartitionId) -> PartitionMetrics {
        let label = partition.to_string();
        let values = [label.as_str()];
        // At zero from the start, as the other partition series.
        self.replayed.with_label_values(&values);
        self.published_fenced.with_label_values(&values);
        PartitionMetrics {
            next_offset: self.next_offset.with_label_values(&values),
            lag_family: self.lag.clone(),
            counted: self.counted.with_label_values(&values),
            duplicates: self.duplicates.with_label_values(&values),
            malformed: self.malformed.with_label_values(&values),
            recreations: self.recreations.with_label_values(&values),
            batches: self.batches.with_label_values(&values),
            commit_seconds: self.commit_seconds.with_label_values(&values),
            publish_seconds: self.publish_seconds.with_label_values(&values),
            last_publish: self.last_publish.with_label_values(&values),
            storage_stalled: self.storage_stalled.with_label_values(&values),
            running: self.running.with_label_values(&values),
            progress_stalled: self.progress_stalled.with_label_values(&values),
            partition: label,
        }
    }

    /// The snapshot-topic handles of one partition.
    pub(crate) fn snapshots(&self, partition: PartitionId) -> SnapshotMetrics {
        let label = partition.to_string();
        let values = [label.as_str()];
        SnapshotMetrics {
            written: self.snapshots_written.with_label_values(&values),
            failed: self.snapshots_failed.with_label_values(&values),
            bytes: self.snapshot_bytes.with_label_values(&values),
            offset: self.snapshot_offset.with_label_values(&values),
        }
    }

    /// How long the start of `partition` spent on its snapshots.
    pub(crate) fn restored(&self, partition: PartitionId, took: Duration) {
        self.restore_seconds
            .with_label_values(&[partition.to_string().as_str()])
            .set(took.as_secs_f64());
    }

    /// A start of `partition` resumed `records` behind what had been
    /// published of it.
    pub(crate) fn replayed(&self, partition: PartitionId, records: u64) {
        self.replayed
            .with_label_values(&[partition.to_string().as_str()])
            .inc_by(records);
    }

    /// A group member took `partition` over and published it `took` after
    /// its previous owner last did.
    pub(crate) fn handed_over(&self, partition: PartitionId, took: Duration) {
        self.handoff_seconds
            .with_label_values(&[partition.to_string().as_str()])
            .set(took.as_secs_f64());
    }

    pub(crate) fn set_partitions_owned(&self, count: usize) {
        self.partitions_owned.set(count as i64);
    }

    pub(crate) fn rebalanced(&self, kind: &str) {
        self.rebalances.with_label_values(&[kind]).inc();
    }

    /// A publish of `partition` found its file newer and wrote nothing.
    pub(crate) fn fenced(&self, partition: PartitionId) {
        self.published_fenced
            .with_label_values(&[partition.to_string().as_str()])
            .inc();
    }

    /// The fetch request counter of one Kafka client.
    pub(crate) fn fetch_requests(&self, client: &str) -> IntCounter {
        self.fetch_requests.with_label_values(&[client])
    }

    /// The text exposition of every metric.
    pub(crate) fn encode(&self) -> String {
        // Counted where the fsyncs are made (atomic_file), brought up to
        // date here: no handle to pass into the state.
        self.fsyncs
            .inc_by(crate::store::atomic_file::fsyncs_total().saturating_sub(self.fsyncs.get()));
        let mut buffer = Vec::new();
        // Encoding into memory fails only on a broken metric, never on I/O.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            log::error!("cannot encode metrics: {error}");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

/// What one committed batch did.
pub(crate) struct BatchCounts {
    pub(crate) counted: u64,
    pub(crate) duplicates: u64,
    pub(crate) malformed: u64,
}

impl PartitionMetrics {
    pub(crate) fn committed(&self, counts: &BatchCounts, next_offset: Offset, took: Duration) {
        self.counted.inc_by(counts.counted);
        self.duplicates.inc_by(counts.duplicates);
        self.malformed.inc_by(counts.malformed);
        self.batches.inc();
        self.commit_seconds.observe(took.as_secs_f64());
        self.next_offset.set(next_offset);
    }

    pub(crate) fn reset(&self) {
        self.recreations.inc();
        self.next_offset.set(0);
    }

    pub(crate) fn set_running(&self, running: bool) {
        self.running.set(i64::from(running));
    }

    pub(crate) fn set_storage_stalled(&self, stalled: bool) {
        self.storage_stalled.set(i64::from(stalled));
    }

    pub(crate) fn set_progress_stalled(&self, stalled: bool) {
        self.progress_stalled.set(i64::from(stalled));
    }

    pub(crate) fn set_next_offset(&self, next_offset: Offset) {
        self.next_offset.set(next_offset);
    }

    pub(crate) fn set_lag(&self, lag: Offset) {
        self.lag_family
            .with_label_values(&[self.partition.as_str()])
            .set(lag);
    }

    pub(crate) fn published(&self, took: Duration) {
        self.publish_seconds.observe(took.as_secs_f64());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_publish.set(now);
    }
}

/// Prometheus' text exposition format.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics`, `/healthz` and `/readyz` on [`crate::web`]'s server
/// (a named thread of its own, stopped and joined when the server is
/// dropped). Binds `address` at once, so a bad address is an error before
/// any partition is touched.
pub(crate) fn serve(
    address: &str,
    web: Option<Arc<WebConfig>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<WebServer> {
    let pages: Pages = Arc::new(move |path| match path {
        "/metrics" => Page::ok(EXPOSITION, metrics.encode()),
        "/healthz" => health.liveness_page(),
        "/readyz" => health.readiness_page(),
        _ => Page::not_found(),
    });
    let server = WebServer::start("metrics-http", address, web, pages)
        .with_context(|| format!("cannot serve metrics on {address}"))?;
    log::info!("metrics at {}/metrics", server.url());
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_series_follow_the_naming_conventions() {
        let metrics = Metrics::new();
        let p = metrics.partition(2);
        p.committed(
            &BatchCounts {
                counted: 5,
                duplicates: 1,
                malformed: 2,
            },
            8,
            Duration::from_millis(3),
        );
        p.published(Duration::from_millis(1));
        let text = metrics.encode();
        for line in [
            "weatherstream_next_offset{partition=\"2\"} 8",
            "weatherstream_reports_counted_total{partition=\"2\"} 5",
            "weatherstream_duplicates_dropped_total{partition=\"2\"} 1",
            "weatherstream_malformed_skipped_total{partition=\"2\"} 2",
            "weatherstream_batches_committed_total{partition=\"2\"} 1",
            "weatherstream_recreations_detected_total{partition=\"2\"} 0",
            "weatherstream_commit_duration_seconds_count{partition=\"2\"} 1",
            "weatherstream_publish_duration_seconds_count{partition=\"2\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains("weatherstream_lag_records{"),
            "lag unknown yet"
        );
        p.set_lag(7);
        assert!(metrics
            .encode()
            .contains("weatherstream_lag_records{partition=\"2\"} 7"));
    }
}
