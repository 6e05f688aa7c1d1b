//! Generates the gRPC messages and service stubs from `proto/turnstile.proto`.
//! `protoc` comes from the `protoc-bin-vendored` crate, so a fresh machine needs
//! nothing from apt to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/turnstile.proto"],
        &["proto"],
    )?;
    Ok(())
}
