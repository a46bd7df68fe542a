//! Benchmarks (issue: catch-up, producer, freshness); see README.
fn main() {
    println!("benchmarks are not written yet");
}
