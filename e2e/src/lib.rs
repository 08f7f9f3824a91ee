//! Cluster test helpers: find the cluster, wait for conditions.
//!
//! The suite runs against the cluster named by `KUBECONFIG` (kind in
//! practice). Its tests are gated by `cfg(cluster)`, which the build script
//! sets when `KUBECONFIG` is set at build time; without it they are
//! reported as ignored. Run anyway (`--ignored`) without `KUBECONFIG`, or
//! with the cluster unreachable, they fail.

pub mod local;

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context as _};
use kube::Client;

/// Why the cluster tests are ignored in a build without `KUBECONFIG`.
pub const NOT_RUN: &str = "needs a cluster: KUBECONFIG";

/// Writes a line to the real stderr, which `cargo test` does not capture.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A client for the cluster in `KUBECONFIG`. `KUBECONFIG` unset and
/// connection failures are errors: the suite never passes vacuously.
pub async fn cluster(test: &str) -> anyhow::Result<Client> {
    if std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) {
        bail!("{test}: {NOT_RUN} (KUBECONFIG is not set)");
    }
    let client = Client::try_default()
        .await
        .context("KUBECONFIG is set but no client could be built")?;
    let version = tokio::time::timeout(Duration::from_secs(15), client.apiserver_version())
        .await
        .context("KUBECONFIG is set but the API server did not answer in 15s")?
        .context("KUBECONFIG is set but the API server is unreachable")?;
    say(&format!(
        "{test}: running against Kubernetes {}",
        version.git_version
    ));
    Ok(client)
}

/// Polls `check` every 500 ms until it yields `Some`, or fails after
/// `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A namespace name unique to this run.
pub fn unique_namespace(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}
