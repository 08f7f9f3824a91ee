//! A real Prometheus (the Debian package) scraping file-discovered targets.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::procs::{free_port, wait_http_ok, Proc};

pub const INSTALL_HINT: &str = "prometheus is not installed: run ./scripts/test.sh (it installs the Debian package `prometheus`)";

pub struct Prometheus {
    pub url: String,
    proc: Option<Proc>,
}

impl Prometheus {
    /// Starts Prometheus scraping the targets listed in `targets_file`
    /// every `scrape` interval, with its data under `dir`.
    pub async fn start(dir: &Path, targets_file: &Path, scrape: Duration) -> anyhow::Result<Self> {
        let bin = which("prometheus").context(INSTALL_HINT)?;
        let port = free_port()?;
        let config = dir.join("prometheus.yml");
        let secs = scrape.as_secs().max(1);
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\n\
                 scrape_configs:\n  - job_name: forwarders\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n",
                targets_file.display()
            ),
        )?;
        let proc = Proc::spawn(
            "prometheus",
            Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--web.enable-lifecycle"),
        )?;
        let url = format!("http://127.0.0.1:{port}");
        wait_http_ok(&format!("{url}/-/ready"), Duration::from_secs(30)).await?;
        Ok(Self {
            url,
            proc: Some(proc),
        })
    }

    /// Stops it (the "Prometheus is down" fault).
    pub fn stop(&mut self) {
        self.proc = None;
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}
