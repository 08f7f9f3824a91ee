//! Where accepted jobs wait for a worker. A delivery carries the job as
//! accepted; its progress is in the shared records. A backend with durable
//! deliveries (a broker) is acknowledged only after the job's result is
//! stored.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio::sync::{mpsc, Mutex};

use super::model::Job;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("the job queue is full")]
    Full,
    #[error("the job queue is closed")]
    Closed,
    #[error("the job queue is unavailable")]
    Unavailable,
    /// The job is larger than the queue takes (a broker's message size):
    /// not back-pressure, so retrying it cannot help.
    #[error("the job is larger than the queue accepts")]
    TooLarge,
}

/// One job handed to a worker.
pub struct Delivery {
    pub job_id: String,
    /// The job as accepted (it may have been accepted by another replica).
    pub job: Option<Box<Job>>,
    /// Runs of this job so far, this one included.
    pub attempt: u32,
    /// Where the message is, for the acknowledgement.
    pub token: Option<(i32, i64)>,
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Enqueues a job; refused when the queue is full or unreachable.
    async fn push(&self, job: &Job) -> Result<(), QueueError>;
    /// The next job; `None` once the queue is closed and drained.
    async fn next(&self) -> Option<Delivery>;
    /// The job is done with (its result stored, or it will never run).
    async fn ack(&self, delivery: Delivery);
    /// Whether a job that failed transiently on run `attempt` runs again.
    fn can_retry(&self, attempt: u32) -> bool;
    /// Enqueues the job's run number `attempt` (a transient failure's
    /// retry); the caller then acknowledges the failed delivery.
    async fn requeue(&self, job: &Job, attempt: u32) -> Result<(), QueueError>;
    /// Out of attempts: parks the job where operators look, acknowledges.
    async fn dead_letter(&self, delivery: Delivery, job: &Job, reason: &str);
    /// Jobs waiting (a broker: the consumer lag).
    fn depth(&self) -> usize;
    /// Stops fetching; jobs fetched and not started stay unacknowledged
    /// (a broker redelivers them; the embedded queue loses them).
    fn stop(&self);
    /// After the workers finished: commits what finished.
    async fn close(&self);
}

/// In process and bounded: `cargo run` needs nothing else. Jobs waiting
/// here are lost when the process stops.
pub struct EmbeddedQueue {
    tx: mpsc::Sender<Box<Job>>,
    rx: Mutex<mpsc::Receiver<Box<Job>>>,
    depth: AtomicUsize,
}

impl EmbeddedQueue {
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            tx,
            rx: Mutex::new(rx),
            depth: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn push(&self, job: &Job) -> Result<(), QueueError> {
        self.tx
            .try_send(Box::new(job.clone()))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => QueueError::Full,
                mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
            })?;
        self.depth.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn next(&self) -> Option<Delivery> {
        let job = self.rx.lock().await.recv().await?;
        self.depth.fetch_sub(1, Ordering::Relaxed);
        Some(Delivery {
            job_id: job.id.clone(),
            job: Some(job),
            attempt: 1,
            token: None,
        })
    }

    async fn ack(&self, _delivery: Delivery) {}

    /// No redelivery in process: a transient failure fails the job.
    fn can_retry(&self, _attempt: u32) -> bool {
        false
    }

    async fn requeue(&self, _job: &Job, _attempt: u32) -> Result<(), QueueError> {
        Err(QueueError::Unavailable)
    }

    async fn dead_letter(&self, _delivery: Delivery, _job: &Job, _reason: &str) {}

    fn stop(&self) {}

    async fn close(&self) {}

    fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> Job {
        let mut j = crate::jobs::wire::decode(br#"{"v":1,"id":"x","owner":"o","model":"m","body":"{}","headers":[],"created_at":0,"expires_at_ms":0}"#).unwrap();
        j.id = id.into();
        j
    }

    #[tokio::test]
    async fn the_embedded_queue_is_bounded_and_fifo() {
        let q = EmbeddedQueue::new(2);
        q.push(&job("a")).await.unwrap();
        q.push(&job("b")).await.unwrap();
        assert_eq!(q.push(&job("c")).await, Err(QueueError::Full));
        assert_eq!(q.depth(), 2);
        assert_eq!(q.next().await.unwrap().job_id, "a");
        assert_eq!(q.next().await.unwrap().job_id, "b");
        assert_eq!(q.depth(), 0);
    }
}
