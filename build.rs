//! Compiles proto/report.proto and proto/snapshot.proto with prost. protox parses the .proto file in
//! pure Rust, so the build needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/report.proto");
    println!("cargo:rerun-if-changed=proto/snapshot.proto");
    let descriptors = protox::compile(["proto/report.proto", "proto/snapshot.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
