//! Compiles the gRPC proto with protox (pure Rust), so building needs no
//! `protoc` on the machine; also writes the descriptor set that gRPC server
//! reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    kafka_broker();
    redis_server_cfg();
    let proto = "proto/modelforwarder/v1/forwarder.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("forwarder_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}

/// `cfg(kafka)`: a Kafka-protocol broker (tansu) is on this machine, named
/// by `TANSU_BIN` or found on `PATH`, so the tests against a real broker
/// run; without one they are reported as ignored (never as passed). The
/// tests read its path from `TANSU_PATH`.
fn kafka_broker() {
    println!("cargo::rustc-check-cfg=cfg(kafka)");
    println!("cargo:rerun-if-env-changed=TANSU_BIN");
    println!("cargo:rerun-if-env-changed=PATH");
    let from_env = std::env::var_os("TANSU_BIN").map(PathBuf::from);
    let on_path = || {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    };
    if let Some(bin) = from_env.filter(|p| p.is_file()).or_else(on_path) {
        println!("cargo:rerun-if-changed={}", bin.display());
        println!("cargo:rustc-cfg=kafka");
        println!("cargo:rustc-env=TANSU_PATH={}", bin.display());
    }
}

/// `cfg(redis_server)`: a `redis-server` binary is on PATH, so the tests
/// that need a real Redis run; without it they are reported as ignored
/// (never as passed).
fn redis_server_cfg() {
    println!("cargo::rustc-check-cfg=cfg(redis_server)");
    println!("cargo:rerun-if-env-changed=PATH");
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())
    });
    if let Some(bin) = found {
        println!("cargo:rerun-if-changed={}", bin.display());
        println!("cargo:rustc-cfg=redis_server");
    }
}
