//! Forwarder processes as a scale target: the local stand-in for a
//! Deployment plus its Service endpoints.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use operator::autoscale::{ScaleError, ScaleTarget, TargetState};
use tokio::sync::Mutex;

use super::procs::{free_port, Proc};

pub struct FleetConfig {
    pub forwarder: PathBuf,
    pub dir: PathBuf,
    /// OpenAI base URL of the upstream (mock-llm).
    pub upstream: String,
    /// `server.max_concurrency` per replica: its capacity.
    pub max_concurrency: usize,
    /// Labels Prometheus attaches, as the Kubernetes scrape config would.
    pub namespace: String,
    pub instance: String,
    /// `async.workers` per replica (the embedded queue); `None`: the
    /// forwarder's default.
    pub async_workers: Option<usize>,
    /// Bootstrap address of a Kafka-protocol broker: the async queue is
    /// Kafka (one consumer group, each pod a static member under its
    /// name, as the operator renders it) instead of the embedded one.
    pub kafka: Option<String>,
}

struct Pod {
    name: String,
    url: String,
    ready: Arc<AtomicBool>,
    proc: Proc,
}

pub struct Fleet {
    cfg: FleetConfig,
    pods: Mutex<Vec<Pod>>,
    next: std::sync::atomic::AtomicU32,
    /// Pods still to start that will never become ready (the "replica
    /// that never gets ready" fault).
    stuck: std::sync::atomic::AtomicU32,
    /// Ready endpoints, as a Service would route to.
    endpoints: Arc<parking_lot::RwLock<Vec<String>>>,
}

impl Fleet {
    pub fn new(cfg: FleetConfig) -> Self {
        Self {
            cfg,
            pods: Mutex::new(Vec::new()),
            next: Default::default(),
            stuck: Default::default(),
            endpoints: Default::default(),
        }
    }

    pub fn targets_file(&self) -> PathBuf {
        self.cfg.dir.join("targets.json")
    }

    /// The next `n` pods started never become ready: they run and are
    /// scraped, but the readiness probe never passes.
    pub fn make_next_stuck(&self, n: u32) {
        self.stuck.store(n, Ordering::Relaxed);
    }

    /// The endpoint list the load generator routes over.
    pub fn endpoints(&self) -> Arc<parking_lot::RwLock<Vec<String>>> {
        self.endpoints.clone()
    }

    fn start_pod(&self) -> anyhow::Result<Pod> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.start_named(format!("{}-{id}", self.cfg.instance))
    }

    fn start_named(&self, name: String) -> anyhow::Result<Pod> {
        let port = free_port()?;
        let config = self.cfg.dir.join(format!("{name}.yaml"));
        let jobs = match (self.cfg.async_workers, &self.cfg.kafka) {
            (None, _) => String::new(),
            (Some(w), None) => format!("async: {{workers: {w}}}\n"),
            (Some(w), Some(broker)) => format!(
                "async:\n  workers: {w}\n  queue: kafka\n  kafka: {{bootstrap_servers: '{broker}', topic: fleet-jobs, \
                 dead_letter_topic: fleet-jobs-dead, consumer_group: fleet, partitions: 6, group_instance_id: '{name}'}}\n"
            ),
        };
        std::fs::write(
            &config,
            jobs + &format!(
                "server:\n  listen: 127.0.0.1:{port}\n  max_concurrency: {}\n  request_timeout: 10s\n  \
                 shutdown: {{drain_delay: 0s, grace_period: 5s}}\n\
                 logging: {{access_log: false}}\n\
                 upstreams:\n  - {{name: mock, provider: openai, base_url: '{}', models: [mock], timeout: 10s}}\n",
                self.cfg.max_concurrency, self.cfg.upstream
            ),
        )?;
        let proc = Proc::spawn(
            &name,
            Command::new(&self.cfg.forwarder)
                .arg("serve")
                .arg("--config")
                .arg(&config),
        )?;
        let url = format!("http://127.0.0.1:{port}");
        let ready = Arc::new(AtomicBool::new(false));
        // Readiness, as the kubelet would probe it; the pod joins the
        // endpoints only once ready.
        let (probe_url, flag, endpoints) = (
            format!("{url}/readyz"),
            ready.clone(),
            self.endpoints.clone(),
        );
        let endpoint = url.clone();
        let stuck = self
            .stuck
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        tokio::spawn(async move {
            if stuck {
                return;
            }
            let client = reqwest::Client::new();
            for _ in 0..200 {
                if let Ok(r) = client.get(&probe_url).send().await {
                    if r.status().is_success() {
                        flag.store(true, Ordering::Relaxed);
                        endpoints.write().push(endpoint);
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(Pod {
            name,
            url,
            ready,
            proc,
        })
    }

    /// Rewrites the Prometheus file-discovery targets (atomically).
    fn write_targets(&self, pods: &[Pod]) -> anyhow::Result<()> {
        let groups: Vec<serde_json::Value> = pods
            .iter()
            .map(|p| {
                serde_json::json!({
                    "targets": [p.url.trim_start_matches("http://")],
                    "labels": {"pod": p.name, "namespace": self.cfg.namespace,
                               "app_kubernetes_io_instance": self.cfg.instance}
                })
            })
            .collect();
        let tmp = self.cfg.dir.join("targets.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&groups)?)?;
        std::fs::rename(&tmp, self.targets_file())?;
        Ok(())
    }

    /// Runs one forwarder per name (pods that a real ReplicaSet created),
    /// stopping those whose pod is gone; returns the names whose forwarder
    /// is ready. For a fleet driven by a real API server.
    pub async fn adopt(
        &self,
        names: &std::collections::BTreeSet<String>,
    ) -> anyhow::Result<Vec<String>> {
        let mut pods = self.pods.lock().await;
        let mut changed = false;
        while let Some(i) = pods.iter().position(|p| !names.contains(&p.name)) {
            let pod = pods.remove(i);
            self.endpoints.write().retain(|u| *u != pod.url);
            pod.proc.terminate();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(6)).await;
                drop(pod);
            });
            changed = true;
        }
        for name in names {
            if !pods.iter().any(|p| p.name == *name) {
                pods.push(self.start_named(name.clone())?);
                changed = true;
            }
        }
        if changed {
            self.write_targets(&pods)?;
        }
        Ok(pods
            .iter()
            .filter(|p| p.ready.load(Ordering::Relaxed))
            .map(|p| p.name.clone())
            .collect())
    }

    /// Writes an empty target list (before Prometheus starts).
    pub fn init(&self) -> anyhow::Result<()> {
        self.write_targets(&[])
    }
}

#[async_trait]
impl ScaleTarget for Fleet {
    async fn state(&self) -> Result<TargetState, ScaleError> {
        let pods = self.pods.lock().await;
        Ok(TargetState {
            current: pods.len() as u32,
            ready: pods
                .iter()
                .filter(|p| p.ready.load(Ordering::Relaxed))
                .count() as u32,
            live_pods: pods.iter().map(|p| p.name.clone()).collect(),
            foreign_managers: vec![],
        })
    }

    async fn scale(&self, replicas: u32) -> Result<(), ScaleError> {
        let mut pods = self.pods.lock().await;
        let err = |e: anyhow::Error| ScaleError(e.to_string());
        while pods.len() < replicas as usize {
            let pod = self.start_pod().map_err(err)?;
            pods.push(pod);
        }
        while pods.len() > replicas as usize {
            // As a ReplicaSet does: unready pods go first, then the newest.
            let i = pods
                .iter()
                .rposition(|p| !p.ready.load(Ordering::Relaxed))
                .unwrap_or(pods.len() - 1);
            let pod = pods.remove(i);
            // Out of the endpoints first, then SIGTERM: the forwarder drains.
            self.endpoints.write().retain(|u| *u != pod.url);
            pod.proc.terminate();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(6)).await;
                drop(pod);
            });
        }
        self.write_targets(&pods).map_err(err)
    }
}
