// `cfg(envtest)`: KUBEBUILDER_ASSETS names a folder with a kube-apiserver,
// so the tests that need a real API server run; without it they are
// reported as ignored (never as passed).
fn main() {
    kafka_broker();
    kube_cluster();
    println!("cargo::rustc-check-cfg=cfg(envtest)");
    println!("cargo:rerun-if-env-changed=KUBEBUILDER_ASSETS");
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS") {
        let bin = std::path::Path::new(&dir).join("kube-apiserver");
        println!("cargo:rerun-if-changed={}", bin.display());
        if bin.is_file() {
            println!("cargo:rustc-cfg=envtest");
        }
    }
}

/// `cfg(kafka)`: a Kafka-protocol broker (tansu) named by `TANSU_BIN` or on
/// `PATH` (as the forwarder's build script finds it); the tests read its
/// path from `TANSU_PATH`. Without one they are reported as ignored.
fn kafka_broker() {
    println!("cargo::rustc-check-cfg=cfg(kafka)");
    println!("cargo:rerun-if-env-changed=TANSU_BIN");
    println!("cargo:rerun-if-env-changed=PATH");
    let from_env = std::env::var_os("TANSU_BIN").map(std::path::PathBuf::from);
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

/// `cfg(cluster)`: `KUBECONFIG` is set when the tests are built, so the
/// cluster suite (`tests/cluster.rs`, the kind scenarios) runs; without it
/// those tests are reported as ignored (never as passed). `make e2e` sets it.
fn kube_cluster() {
    println!("cargo::rustc-check-cfg=cfg(cluster)");
    println!("cargo:rerun-if-env-changed=KUBECONFIG");
    if std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        println!("cargo:rustc-cfg=cluster");
    }
}
