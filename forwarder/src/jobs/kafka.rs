//! The Kafka queue: jobs are messages on a partitioned topic read by a
//! consumer group. One fetch loop per replica hands messages to the
//! workers; an offset is committed only once every message before it in its
//! partition is done (its result stored), so a crash redelivers, never
//! skips. A job that keeps failing, or a message that is not a job, goes to
//! the dead-letter topic.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use forwarder_config::KafkaConfig;
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::model::Job;
use super::offsets::OffsetTracker;
use super::queue::{Delivery, Queue, QueueError};
use super::wire;
use crate::BuildError;

/// The message header counting runs of a job.
const ATTEMPT: &str = "forwarder-attempt";
/// Why a message was dead-lettered.
const REASON: &str = "forwarder-dead-letter-reason";
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KafkaQueue {
    cfg: KafkaConfig,
    producer: FutureProducer,
    consumer: Arc<StreamConsumer<Rebalances>>,
    /// The lag's broker queries, on connections of their own: on the
    /// consumer's they waited behind its fetches and took seconds.
    lag_reader: Arc<BaseConsumer>,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Deliveries with the rebalance epoch they were fetched in.
    rx: tokio::sync::Mutex<mpsc::Receiver<(u64, Delivery)>>,
    rebalance: Arc<RebalanceState>,
    lag: Arc<AtomicI64>,
    stop: CancellationToken,
}

/// librdkafka settings shared by the producer, consumer and admin client.
fn client_config(cfg: &KafkaConfig) -> Result<ClientConfig, BuildError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("security.protocol", &cfg.security_protocol);
    let read = |field: &str, path: &std::path::PathBuf| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| BuildError::new(format!("async.kafka.{field} {}: {e}", path.display())))
    };
    if let Some(m) = &cfg.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(p) = &cfg.sasl_username_file {
        c.set("sasl.username", read("sasl_username_file", p)?);
    }
    if let Some(p) = &cfg.sasl_password_file {
        c.set("sasl.password", read("sasl_password_file", p)?);
    }
    for (key, path) in [
        ("ssl.ca.location", &cfg.ssl_ca_file),
        ("ssl.certificate.location", &cfg.ssl_cert_file),
        ("ssl.key.location", &cfg.ssl_key_file),
    ] {
        if let Some(p) = path {
            c.set(key, p.display().to_string());
        }
    }
    Ok(c)
}

/// Forgets a revoked partition's offsets (see [`OffsetTracker::forget`]),
/// marks the deliveries fetched before a revocation stale, holds the lag
/// gauge while partitions are between owners, and logs every assignment
/// and revocation (the partitions only, never a message): which replica
/// reads which partition is the first question when a lag stops falling.
pub struct Rebalances {
    tracker: Arc<Mutex<OffsetTracker>>,
    state: Arc<RebalanceState>,
}

#[derive(Default)]
struct RebalanceState {
    /// Counts revocations. A delivery fetched in an earlier epoch is not
    /// run: whoever holds its partition now reads it again from the
    /// committed offset (it was not done, so it is not committed), and two
    /// replicas running one job is a wait on its claim for one of them.
    epoch: AtomicU64,
    /// Revoked and not assigned yet: this consumer's assignment is empty
    /// for a moment, and a lag read then would say 0 while the jobs wait.
    between: AtomicBool,
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let parts = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| e.partition().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.state.between.store(false, Ordering::Release);
                tracing::info!(partitions = %parts(tpl), "Kafka partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                self.tracker.lock().forget(&revoked);
                self.state.epoch.fetch_add(1, Ordering::AcqRel);
                self.state.between.store(true, Ordering::Release);
                tracing::info!(partitions = %parts(tpl), "Kafka partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Kafka rebalance failed"),
        }
    }
}

impl KafkaQueue {
    /// Connects, creates the topics if missing, joins the consumer group
    /// and starts fetching (at most `prefetch` messages ahead of the workers).
    pub async fn start(cfg: &KafkaConfig, prefetch: usize) -> Result<Arc<Self>, BuildError> {
        let base = client_config(cfg)?;
        let err = |what: &str, e: rdkafka::error::KafkaError| {
            BuildError::new(format!("async.kafka: {what}: {e}"))
        };
        let admin: AdminClient<DefaultClientContext> =
            base.create().map_err(|e| err("admin client", e))?;
        let topics = [
            NewTopic::new(&cfg.topic, cfg.partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&cfg.dead_letter_topic, 1, TopicReplication::Fixed(1)),
        ];
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match admin.create_topics(&topics, &opts).await {
            Ok(results) => {
                for r in results {
                    if let Err((topic, code)) = r {
                        if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                            tracing::warn!(%topic, ?code, "could not create a Kafka topic");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not create the Kafka topics"),
        }
        let producer: FutureProducer = base
            .clone()
            .set("message.timeout.ms", "10000")
            .set("enable.idempotence", "false")
            .create()
            .map_err(|e| err("producer", e))?;
        let mut consumer_cfg = base.clone();
        if let Some(id) = &cfg.group_instance_id {
            consumer_cfg.set("group.instance.id", id);
        }
        let tracker: Arc<Mutex<OffsetTracker>> = Arc::default();
        let rebalance: Arc<RebalanceState> = Arc::default();
        let consumer: StreamConsumer<Rebalances> = consumer_cfg
            .set("group.id", &cfg.consumer_group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .create_with_context(Rebalances {
                tracker: tracker.clone(),
                state: rebalance.clone(),
            })
            .map_err(|e| err("consumer", e))?;
        consumer
            .subscribe(&[&cfg.topic])
            .map_err(|e| err("subscribe", e))?;
        // Reads the group's committed offsets; never subscribes (joins nothing).
        let lag_reader: BaseConsumer = base
            .clone()
            .set("group.id", &cfg.consumer_group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| err("lag reader", e))?;
        let (tx, rx) = mpsc::channel(prefetch.max(1));
        let q = Arc::new(Self {
            cfg: cfg.clone(),
            producer,
            consumer: Arc::new(consumer),
            lag_reader: Arc::new(lag_reader),
            tracker,
            rx: tokio::sync::Mutex::new(rx),
            rebalance,
            lag: Arc::default(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(q.clone().fetch(tx));
        tokio::spawn(q.clone().watch_lag());
        Ok(q)
    }

    /// Reads messages and hands them to the workers until stopped. A
    /// message fetched but not yet done holds back its partition's commit,
    /// so messages left in the hand-off at shutdown are redelivered.
    async fn fetch(self: Arc<Self>, tx: mpsc::Sender<(u64, Delivery)>) {
        loop {
            let msg = tokio::select! {
                () = self.stop.cancelled() => return,
                m = self.consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka fetch failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (partition, offset) = (msg.partition(), msg.offset());
            // Read after the message: a revocation runs inside `recv`, so
            // a message it returned was fetched in the epoch now current.
            let epoch = self.rebalance.epoch.load(Ordering::Acquire);
            self.tracker.lock().fetched(partition, offset);
            let attempt = msg
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|x| x.key == ATTEMPT)
                        .and_then(|x| std::str::from_utf8(x.value?).ok()?.parse().ok())
                })
                .unwrap_or(1);
            let payload = msg.payload().unwrap_or_default();
            let delivery = match wire::decode(payload) {
                Ok(job) => Delivery {
                    job_id: job.id.clone(),
                    job: Some(Box::new(job)),
                    attempt,
                    token: Some((partition, offset)),
                },
                Err(e) => {
                    // Not a job: park it where an operator can look, and move on.
                    tracing::warn!(partition, offset, error = %e, "dead-lettering a message that is not a job");
                    self.send_dead_letter(msg.key(), payload, &e.to_string())
                        .await;
                    self.done(partition, offset);
                    continue;
                }
            };
            tokio::select! {
                () = self.stop.cancelled() => return,
                r = tx.send((epoch, delivery)) => if r.is_err() { return },
            }
        }
    }

    /// Marks a message done and commits its partition's offset if it moved.
    fn done(&self, partition: i32, offset: i64) {
        let Some(next) = self.tracker.lock().done(partition, offset) else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&self.cfg.topic, partition, Offset::Offset(next))
            .is_ok()
        {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::warn!(error = %e, partition, "Kafka offset commit failed");
            }
        }
    }

    async fn send_dead_letter(&self, key: Option<&[u8]>, payload: &[u8], reason: &str) {
        let key = key.unwrap_or_default();
        let record = FutureRecord::to(&self.cfg.dead_letter_topic)
            .key(key)
            .payload(payload)
            .headers(OwnedHeaders::new().insert(Header {
                key: REASON,
                value: Some(reason),
            }));
        if let Err((e, _)) = self.producer.send(record, SEND_TIMEOUT).await {
            tracing::error!(error = %e, "could not dead-letter a message");
        }
    }

    async fn produce(&self, job: &Job, attempt: u32) -> Result<(), QueueError> {
        let payload = wire::encode(job);
        let attempt = attempt.to_string();
        let record = FutureRecord::to(&self.cfg.topic)
            .key(job.id.as_bytes())
            .payload(&payload)
            .headers(OwnedHeaders::new().insert(Header {
                key: ATTEMPT,
                value: Some(&attempt),
            }));
        self.producer
            .send(record, SEND_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(e, _)| {
                tracing::warn!(error = %e, "could not enqueue a job");
                match e.rdkafka_error_code() {
                    Some(
                        rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge
                        | rdkafka::types::RDKafkaErrorCode::InvalidMessageSize,
                    ) => QueueError::TooLarge,
                    _ => QueueError::Unavailable,
                }
            })
    }

    /// Consumer lag (high watermark − committed offset, over the assigned
    /// partitions), every two seconds. The offsets and watermarks are read
    /// on the lag reader's own connections, one right after the other, so
    /// the difference is not inflated by the time a slow read took.
    async fn watch_lag(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            if self.rebalance.between.load(Ordering::Acquire) {
                // Keep the last reading: the jobs did not go anywhere.
                continue;
            }
            let consumer = self.consumer.clone();
            let reader = self.lag_reader.clone();
            let topic = self.cfg.topic.clone();
            let lag = tokio::task::spawn_blocking(move || -> Option<i64> {
                let timeout = Duration::from_secs(1);
                let assigned = consumer.assignment().ok()?;
                let committed = reader.committed_offsets(assigned, timeout).ok()?;
                let mut lag = 0;
                for e in committed.elements_for_topic(&topic) {
                    let (low, high) = reader
                        .fetch_watermarks(&topic, e.partition(), timeout)
                        .ok()?;
                    let from = match e.offset() {
                        Offset::Offset(o) => o,
                        _ => low,
                    };
                    lag += (high - from).max(0);
                }
                Some(lag)
            })
            .await;
            if let Ok(Some(lag)) = lag {
                self.lag.store(lag, Ordering::Relaxed);
            }
        }
    }
}

#[async_trait]
impl Queue for KafkaQueue {
    async fn push(&self, job: &Job) -> Result<(), QueueError> {
        self.produce(job, 1).await
    }

    async fn next(&self) -> Option<Delivery> {
        let mut rx = self.rx.lock().await;
        loop {
            let (epoch, delivery) = rx.recv().await?;
            if epoch == self.rebalance.epoch.load(Ordering::Acquire) {
                return Some(delivery);
            }
            tracing::debug!(
                job = %delivery.job_id,
                "dropping a delivery fetched before its partition was revoked"
            );
        }
    }

    async fn ack(&self, delivery: Delivery) {
        if let Some((partition, offset)) = delivery.token {
            self.done(partition, offset);
        }
    }

    fn can_retry(&self, attempt: u32) -> bool {
        attempt < self.cfg.max_attempts
    }

    async fn requeue(&self, job: &Job, attempt: u32) -> Result<(), QueueError> {
        self.produce(job, attempt).await
    }

    async fn dead_letter(&self, delivery: Delivery, job: &Job, reason: &str) {
        self.send_dead_letter(Some(job.id.as_bytes()), &wire::encode(job), reason)
            .await;
        self.ack(delivery).await;
    }

    fn depth(&self) -> usize {
        usize::try_from(self.lag.load(Ordering::Relaxed)).unwrap_or(0)
    }

    fn stop(&self) {
        self.stop.cancel();
    }

    async fn close(&self) {
        self.stop.cancel();
        // What finished is committed now; what did not is redelivered.
        let committed = self.tracker.lock().committed();
        if committed.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in committed {
            let _ = tpl.add_partition_offset(&self.cfg.topic, p, Offset::Offset(o));
        }
        let consumer = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await;
    }
}
