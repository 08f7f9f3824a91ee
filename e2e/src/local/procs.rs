//! Child processes and the binaries the harness runs.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            child,
            name: name.to_string(),
        })
    }

    /// SIGTERM, as Kubernetes would send: the forwarder drains.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// reqwest's rustls (enabled elsewhere in the workspace) needs a process-wide
/// crypto provider even for plain HTTP clients.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The `forwarder` binary: `$FORWARDER_BIN`, else beside this executable
/// (target/<profile>/), else built with cargo.
pub fn forwarder_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FORWARDER_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let candidate = dir.join("forwarder");
    if !candidate.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "forwarder", "--bin", "forwarder"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .context("cannot run cargo to build forwarder")?;
        if !status.success() || !candidate.exists() {
            bail!(
                "could not build the forwarder binary at {}",
                candidate.display()
            );
        }
    }
    Ok(candidate)
}

/// Polls `url` until it answers 200.
pub async fn wait_http_ok(url: &str, within: Duration) -> anyhow::Result<()> {
    install_crypto_provider();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} did not become ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
