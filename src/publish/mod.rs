//! What the consumer shows: the exporter thread that publishes committed
//! snapshots ([`exporter`]), the chart ([`chart`]), the Prometheus
//! metrics ([`metrics`]), liveness and readiness ([`health`]), and the
//! writer of the snapshot topic ([`snapshots`]).

pub mod chart;
pub(crate) mod exporter;
pub(crate) mod health;
pub(crate) mod metrics;
pub mod snapshots;
