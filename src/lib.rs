//! weatherstream: daily weather reports through Kafka into exactly-once
//! per-partition month/year statistics, kept in sled and published as
//! `partition-N.json` files and a `month.svg` chart.
//!
//! Data flows one way: [`generator`] -> [`producer`] -> Kafka -> partition
//! workers ([`consumer`]) -> [`state`] (sled) -> the exporter -> files in
//! the [`folders`], written in the [`published`] format. The stages, and
//! which module belongs to which, are in docs/design.md (Module map);
//! `tests/layout.rs` checks that imports follow them.

#![deny(unsafe_code)]

pub mod aggregate;
pub mod atomic_file;
mod broker_link;
pub mod chart;
pub mod cli;
pub mod client_settings;
pub mod consumer;
pub mod dashboard;
pub mod debug;
pub mod demo;
pub mod export;
pub(crate) mod exporter;
pub mod folders;
#[doc(hidden)]
pub mod fuzzing;
pub mod generator;
pub mod inspect;
pub mod kafka;
mod log_limit;
mod metrics;
pub mod producer;
pub mod proof;
pub mod published;
mod python_repr;
pub mod report;
pub mod resume;
pub mod shutdown;
pub mod snapshot;
pub mod state;
pub mod verify;
pub mod web;
