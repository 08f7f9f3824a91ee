//! An open-loop load generator: requests at a set rate, round robin over
//! the fleet's ready endpoints, with client-side latency and errors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

#[derive(Clone, Copy)]
struct Outcome {
    at: Instant,
    latency: Duration,
    ok: bool,
}

pub struct Load {
    /// Requests per second, in thousandths.
    rate_milli: Arc<AtomicU64>,
    /// Submit async jobs (`/v1/async/chat/completions`, answered 202)
    /// instead of synchronous requests.
    jobs: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    pub fn start(endpoints: Arc<RwLock<Vec<String>>>) -> Self {
        let rate_milli = Arc::new(AtomicU64::new(0));
        let jobs = Arc::new(AtomicBool::new(false));
        let outcomes: Arc<Mutex<Vec<Outcome>>> = Default::default();
        let (rate, sink, async_jobs) = (rate_milli.clone(), outcomes.clone(), jobs.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client");
            let body = serde_json::to_vec(&serde_json::json!({
                "model": "mock", "messages": [{"role": "user", "content": "load"}]
            }))
            .expect("json");
            let mut next = Instant::now();
            let mut rr = 0usize;
            loop {
                let milli = rate.load(Ordering::Relaxed);
                if milli == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    next = Instant::now();
                    continue;
                }
                next += Duration::from_secs_f64(1000.0 / milli as f64);
                tokio::time::sleep_until(next.into()).await;
                let url = {
                    let eps = endpoints.read();
                    if eps.is_empty() {
                        None
                    } else {
                        rr = rr.wrapping_add(1);
                        let path = if async_jobs.load(Ordering::Relaxed) {
                            "/v1/async/chat/completions"
                        } else {
                            "/v1/chat/completions"
                        };
                        Some(format!("{}{path}", eps[rr % eps.len()]))
                    }
                };
                let (client, body, sink) = (client.clone(), body.clone(), sink.clone());
                tokio::spawn(async move {
                    let at = Instant::now();
                    let ok = match url {
                        Some(url) => matches!(
                            client.post(url).header("content-type", "application/json").body(body).send().await,
                            Ok(r) if r.status().is_success()
                        ),
                        None => false,
                    };
                    sink.lock().push(Outcome {
                        at,
                        latency: at.elapsed(),
                        ok,
                    });
                });
            }
        });
        Self {
            rate_milli,
            jobs,
            outcomes,
            task,
        }
    }

    /// Async jobs (true) or synchronous requests from now on.
    pub fn set_jobs(&self, jobs: bool) {
        self.jobs.store(jobs, Ordering::Relaxed);
    }

    pub fn set_rate(&self, rps: f64) {
        self.rate_milli
            .store((rps * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Client-side P99 (ms) and error count over requests started in the
    /// last `window`.
    pub fn recent(&self, window: Duration) -> (Option<f64>, u64, u64) {
        let since = Instant::now()
            .checked_sub(window)
            .unwrap_or_else(Instant::now);
        let mut all = self.outcomes.lock();
        // Keep memory bounded: nothing older than a minute is ever asked for.
        if let Some(cut) = Instant::now().checked_sub(Duration::from_secs(60)) {
            all.retain(|o| o.at >= cut);
        }
        let recent: Vec<&Outcome> = all.iter().filter(|o| o.at >= since).collect();
        let errors = recent.iter().filter(|o| !o.ok).count() as u64;
        let mut ok: Vec<f64> = recent
            .iter()
            .filter(|o| o.ok)
            .map(|o| o.latency.as_secs_f64() * 1000.0)
            .collect();
        ok.sort_by(f64::total_cmp);
        let p99 = (!ok.is_empty())
            .then(|| ok[((ok.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)]);
        (p99, errors, recent.len() as u64)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.task.abort();
    }
}
