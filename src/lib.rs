//! weatherstream: daily weather reports through Kafka into exactly-once
//! per-partition month/year statistics, kept in sled and published as
//! `partition-N.json` files and a `month.svg` chart.
//!
//! Data flows one way: [`generator`] -> [`producer`] -> Kafka -> partition
//! workers ([`consumer`]) -> [`state`] (sled) -> the exporter -> files in
//! the [`Folders`], written in the [`published`] format. The stages, and
//! which module belongs to which, are in docs/design.md (Module map);
//! `tests/layout.rs` checks that imports follow them.

#![deny(unsafe_code)]

// The stages, in the order data flows through them (docs/design.md,
// Module map; tests/layout.rs checks that imports follow them).
mod commands;
pub mod config;
pub mod consumer;
#[doc(hidden)]
pub mod fuzzing;
pub mod kafka;
mod log_limit;
mod model;
pub mod producer;
mod publish;
pub mod shutdown;
mod store;
pub mod web;

// What the binaries, tests and benches use, by stage.
pub use commands::{check, dashboard, debug, demo, export, inspect, verify};
pub use model::{aggregate, generator, report};
pub use publish::chart;
pub use publish::snapshots::write_once as write_snapshot;
pub use store::folders::Folders;
pub use store::snapshot::{Counters, Fingerprint, Snapshot};
pub use store::{changelog, published, state};
