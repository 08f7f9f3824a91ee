// `cfg(envtest)`: KUBEBUILDER_ASSETS names a folder with a kube-apiserver,
// so the tests that need a real API server run; without it they are
// reported as ignored (never as passed).
fn main() {
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
