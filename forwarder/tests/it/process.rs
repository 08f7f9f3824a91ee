//! Forwarder replicas as real processes (children of the `forwarder`
//! binary), each on its own loopback port with its config and log in a
//! directory: what two pods behind one Service are.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::client;

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

    #[allow(dead_code)] // used by tests/chaos.rs
    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
    }

    #[allow(dead_code)] // used by tests/chaos.rs
    /// SIGTERM, as a rolling update sends it; waits for the process to
    /// drain and exit (at most 30 s, then SIGKILL).
    pub async fn stop(&mut self) {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe { libc::kill(c.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.0.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(c);
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_forwarder"))
}

/// Kills the child if a test fails half-way.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = crate::common::client()
            .get(format!("{base}/readyz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{base} never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
