//! What the consumer shows: the exporter thread that publishes committed
//! snapshots ([`exporter`]), the chart ([`chart`]) and the Prometheus
//! metrics ([`metrics`]).

pub mod chart;
pub(crate) mod exporter;
pub(crate) mod metrics;
