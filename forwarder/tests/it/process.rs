//! Forwarder replicas as real processes (children of the `forwarder`
//! binary), each on its own loopback port with its config and log in a
//! directory: what two pods behind one Service are.

use crate::common::client;
use crate::shutdown::{binary, free_port, wait_ready, Child};

/// A forwarder process on a fixed port, its config and log in `dir`.
pub struct Replica {
    port: u16,
    config: std::path::PathBuf,
    pub log: std::path::PathBuf,
    child: Option<Child>,
}

impl Replica {
    pub fn new(name: &str, dir: &std::path::Path, cfg: &forwarder::config::Config) -> Self {
        let port = free_port();
        let mut cfg = cfg.clone();
        cfg.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, serde_yaml::to_string(&cfg).unwrap()).unwrap();
        Self {
            port,
            config,
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = binary()
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("forwarder starts");
        self.child = Some(Child(child));
        wait_ready(&self.base()).await;
    }

    /// Jobs this process started and has not finished (from its metrics).
    pub async fn in_flight(&self) -> f64 {
        let Ok(r) = client()
            .get(format!("{}/metrics", self.base()))
            .send()
            .await
        else {
            return 0.0;
        };
        let text = r.text().await.unwrap_or_default();
        let count = |state: &str| {
            let series = format!("forwarder_jobs_total{{state=\"{state}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&series))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        count("running") - count("succeeded") - count("failed") - count("queued")
    }

    /// SIGKILL: no shutdown, no commit, sockets reset by the kernel.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.0.kill().expect("SIGKILL");
        c.0.wait().expect("reaped");
    }
}

impl Replica {
    /// A request to this process, as the tests' `Fwd` helpers make them.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> crate::common::Resp {
        let mut req = client().post(format!("{}{path}", self.base())).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        crate::common::into_resp(req.send().await.expect("replica answers")).await
    }

    /// One sample of a metric from this process's `/metrics`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = client()
            .get(format!("{}/metrics", self.base()))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap();
        crate::common::metric_value(&text, name, labels).unwrap_or(0.0)
    }
}
