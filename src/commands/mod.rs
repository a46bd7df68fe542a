//! The commands beside the pipeline: `consumer verify` ([`verify`]),
//! `consumer check` and `producer check` ([`check`]),
//! `consumer export` ([`export`]), `consumer inspect-state` ([`inspect`]),
//! `debug` ([`debug`], printing with [`python_repr`]), `demo` ([`demo`])
//! and `dashboard` ([`dashboard`]).

pub mod check;
pub mod dashboard;
pub mod debug;
pub mod demo;
pub mod export;
pub mod inspect;
mod python_repr;
pub mod verify;
