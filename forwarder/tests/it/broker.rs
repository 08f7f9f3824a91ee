//! A real Kafka-protocol broker (tansu, SQLite storage) on an ephemeral
//! loopback port for one test, and a forwarder config that queues on it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use forwarder::config::{Config, QueueKind};

use crate::common::*;

pub struct Broker {
    child: Option<Child>,
    pub addr: String,
    dir: tempfile::TempDir,
}

impl Broker {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut b = Self {
            child: None,
            addr: format!("127.0.0.1:{port}"),
            dir: tempfile::tempdir().unwrap(),
        };
        b.spawn().await;
        b
    }

    async fn spawn(&mut self) {
        let Some(bin) = option_env!("TANSU_PATH") else {
            panic!("no broker: these tests run only when built with cfg(kafka)");
        };
        let url = format!("tcp://{}", self.addr);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .unwrap();
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://broker.db"])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(&self.addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(50 * MS).await;
        }
        self.kill();
        panic!("tansu did not listen on {}", self.addr);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[allow(dead_code)] // used by tests/chaos.rs
    /// An outage: SIGKILL, then the same broker (port, storage) again.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn kafka_config(m: &forwarder::mock_llm::MockServer, broker: &Broker, topic: &str) -> Config {
    let mut cfg = config(vec![upstream("m", m, "mock")]);
    cfg.grpc.enabled = false;
    let a = &mut cfg.async_jobs;
    a.queue = QueueKind::Kafka;
    a.kafka.bootstrap_servers = broker.addr.clone();
    a.kafka.topic = topic.into();
    a.kafka.dead_letter_topic = format!("{topic}-dead");
    a.kafka.consumer_group = format!("{topic}-group");
    a.kafka.partitions = 4;
    cfg
}

/// (partition, committed offset of the group, high watermark), for a
/// failure's message.
pub async fn group_offsets(broker: &str, topic: &str) -> Vec<(i32, i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (broker, topic) = (broker.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &broker)
            .set("group.id", format!("{topic}-group"))
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..4 {
            tpl.add_partition(&topic, p);
        }
        let t = Duration::from_secs(5);
        let committed = c.committed_offsets(tpl, t).unwrap();
        committed
            .elements()
            .iter()
            .map(|e| {
                let high = c
                    .fetch_watermarks(&topic, e.partition(), t)
                    .map_or(-1, |w| w.1);
                (e.partition(), e.offset().to_raw().unwrap_or(-1), high)
            })
            .collect()
    })
    .await
    .unwrap()
}
