//! Generates the Rust code of the vendored protos with tonic-prost-build (needs
//! `protoc`: Debian `protobuf-compiler`, or set PROTOC). The google.protobuf
//! declarations under proto/google are only there so protoc needs no system include
//! files; the generated code uses prost-types for them.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: &[&str] = &[
        "proto/containerd/types/mount.proto",
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/dedup/daemon/v1/daemon.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(PROTOS, &["proto"])?;
    Ok(())
}
