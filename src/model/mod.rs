//! The model, pure logic without I/O: the wire format of a report
//! ([`report`]), the month/year fold ([`aggregate`]) and the weather model
//! that generates reports ([`generator`]).

pub mod aggregate;
pub mod generator;
pub mod report;
