//! Compiles proto/report.proto with prost. protox parses the .proto file in
//! pure Rust, so the build needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/report.proto");
    let descriptors = protox::compile(["proto/report.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
