//! The async path's metrics, registered in the forwarder's registry.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

use super::model::JobState;

/// Job waits and runs span milliseconds to hours.
const JOB_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

pub struct JobMetrics {
    /// Jobs waiting in the queue (for a broker: the consumer lag).
    pub queue_depth: IntGauge,
    /// Jobs that reached a state.
    pub jobs: IntCounterVec,
    /// Accepted → picked up by a worker.
    pub wait: Histogram,
    /// Picked up → result stored.
    pub run: Histogram,
    /// Callback delivery attempts by outcome.
    pub callbacks: IntCounterVec,
    /// A worker's store or queue calls retried in place, by call.
    pub worker_retries: IntCounterVec,
}

impl JobMetrics {
    pub fn new(registry: &Registry) -> Self {
        let queue_depth = IntGauge::new(
            "forwarder_queue_depth",
            "Async jobs waiting for a worker (consumer lag).",
        )
        .expect("valid metric");
        let jobs = IntCounterVec::new(
            Opts::new("forwarder_jobs_total", "Async jobs that entered a state."),
            &["state"],
        )
        .expect("valid metric");
        let wait = Histogram::with_opts(
            HistogramOpts::new(
                "forwarder_job_wait_seconds",
                "Async jobs: time from acceptance to a worker picking the job up.",
            )
            .buckets(JOB_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let run = Histogram::with_opts(
            HistogramOpts::new(
                "forwarder_job_run_seconds",
                "Async jobs: time from pick-up to the result being stored.",
            )
            .buckets(JOB_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let callbacks = IntCounterVec::new(
            Opts::new(
                "forwarder_callback_deliveries_total",
                "Callback delivery attempts by outcome (delivered, retried, failed).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let worker_retries = IntCounterVec::new(
            Opts::new(
                "forwarder_job_worker_retries_total",
                "A worker's store or queue calls that failed and were retried in place, by call.",
            ),
            &["call"],
        )
        .expect("valid metric");
        for c in [
            Box::new(worker_retries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(queue_depth.clone()),
            Box::new(jobs.clone()),
            Box::new(wait.clone()),
            Box::new(run.clone()),
            Box::new(callbacks.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for s in JobState::ALL {
            jobs.with_label_values(&[s.label()]);
        }
        for o in ["delivered", "retried", "failed"] {
            callbacks.with_label_values(&[o]);
        }
        Self {
            queue_depth,
            jobs,
            wait,
            run,
            callbacks,
            worker_retries,
        }
    }

    pub fn entered(&self, state: JobState) {
        self.jobs.with_label_values(&[state.label()]).inc();
    }
}
