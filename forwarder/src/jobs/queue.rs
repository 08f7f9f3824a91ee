//! Where accepted jobs wait for a worker. A queue carries job ids only; the
//! job itself is in the job table. A backend with durable deliveries (a
//! broker) acknowledges a delivery only after the job's result is stored.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio::sync::{mpsc, Mutex};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("the job queue is full")]
    Full,
    #[error("the job queue is closed")]
    Closed,
}

/// One job id handed to a worker.
pub struct Delivery {
    pub job_id: String,
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Enqueues a job; refused when the queue is full.
    async fn push(&self, job_id: String) -> Result<(), QueueError>;
    /// The next job; `None` once the queue is closed and drained.
    async fn next(&self) -> Option<Delivery>;
    /// The job is done with (its result stored, or it will never run).
    async fn ack(&self, delivery: Delivery);
    /// Jobs waiting.
    fn depth(&self) -> usize;
}

/// In process and bounded: `cargo run` needs nothing else. Jobs waiting
/// here are lost when the process stops.
pub struct EmbeddedQueue {
    tx: mpsc::Sender<String>,
    rx: Mutex<mpsc::Receiver<String>>,
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
    async fn push(&self, job_id: String) -> Result<(), QueueError> {
        self.tx.try_send(job_id).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => QueueError::Full,
            mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
        })?;
        self.depth.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn next(&self) -> Option<Delivery> {
        let job_id = self.rx.lock().await.recv().await?;
        self.depth.fetch_sub(1, Ordering::Relaxed);
        Some(Delivery { job_id })
    }

    async fn ack(&self, _delivery: Delivery) {}

    fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_embedded_queue_is_bounded_and_fifo() {
        let q = EmbeddedQueue::new(2);
        q.push("a".into()).await.unwrap();
        q.push("b".into()).await.unwrap();
        assert_eq!(q.push("c".into()).await, Err(QueueError::Full));
        assert_eq!(q.depth(), 2);
        assert_eq!(q.next().await.unwrap().job_id, "a");
        assert_eq!(q.next().await.unwrap().job_id, "b");
        assert_eq!(q.depth(), 0);
    }
}
