//! Arbitrary bytes, cut into records, through decode, dedup, fold, the
//! published JSON and the chart (weatherstream::fuzzing::bytes_to_files
//! asserts finite statistics and a strict-JSON round trip); here the SVG
//! must also be XML. docs/testing.md says how to run it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weatherstream::fuzzing::{bytes_to_files, records_from_bytes};

fuzz_target!(|data: &[u8]| {
    let published = bytes_to_files(&records_from_bytes(data));
    if let Err(error) = roxmltree::Document::parse(&published.svg) {
        panic!("month.svg is not XML: {error}");
    }
});
