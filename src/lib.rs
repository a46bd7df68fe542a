//! weatherstream: daily weather reports through Kafka into exactly-once
//! per-partition month/year statistics, kept in sled and published as
//! `partition-N.json` files and a `month.svg` chart.
//!
//! Data flows one way: [`generator`] -> [`producer`] -> Kafka -> partition
//! workers ([`consumer`]) -> [`state`] (sled) -> [`exporter`] -> files written
//! by [`atomic_file`] in the [`published`] format.

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
pub(crate) mod exporter;
pub mod folders;
#[doc(hidden)]
pub mod fuzzing;
pub mod generator;
pub mod kafka;
mod log_limit;
mod metrics;
pub mod producer;
pub mod proof;
pub mod published;
mod pyfmt;
pub mod recount;
pub mod report;
pub mod resume;
pub mod shutdown;
pub mod snapshot;
pub mod state;
pub mod tools;
pub mod web;
