//! Generates the client of etcd's v3 API from `proto/etcd.proto` (the part the
//! etcd backend calls). `protoc` comes from the `protoc-bin-vendored` crate, so
//! a fresh machine needs nothing from apt to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(config, &["proto/etcd.proto"], &["proto"])?;
    Ok(())
}
