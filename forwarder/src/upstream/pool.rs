//! The live upstream registry: endpoints grouped per model, each with its
//! breaker and in-flight count. Decisions are delegated to `balance` and
//! `breaker`; this module only holds the state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::balance::{least_outstanding, Candidate, SmoothWrr};
use super::breaker::Breaker;
use super::providers::{self, Provider};
use super::UpstreamError;
use crate::telemetry::Metrics;
use crate::BuildError;
use forwarder_config::{Config, Strategy};

pub struct Endpoint {
    pub name: String,
    pub weight: u32,
    /// Per-attempt timeout.
    pub timeout: Duration,
    pub provider: Arc<dyn Provider>,
    breaker: Mutex<Breaker>,
    outstanding: AtomicUsize,
}

struct ModelPool {
    endpoints: Vec<Arc<Endpoint>>,
    rr: Mutex<SmoothWrr>,
    ties: AtomicUsize,
}

pub struct Pools {
    models: HashMap<String, ModelPool>,
    strategy: Strategy,
    metrics: Arc<Metrics>,
}

/// Why no endpoint could be chosen.
#[derive(Debug)]
pub enum PickError {
    UnknownModel,
    /// Every endpoint's circuit is open; the earliest reopens after this.
    AllOpen {
        retry_in: Option<Duration>,
    },
}

impl Pools {
    pub fn from_config(cfg: &Config, metrics: Arc<Metrics>) -> Result<Self, BuildError> {
        let mut models: HashMap<String, ModelPool> = HashMap::new();
        let limits = providers::AdapterLimits::from_config(cfg);
        for u in &cfg.upstreams {
            let endpoint = Arc::new(Endpoint {
                name: u.name.clone(),
                weight: u.weight,
                timeout: u.timeout,
                provider: providers::build(u, &limits)?,
                breaker: Mutex::new(Breaker::new(
                    cfg.circuit_breaker.failure_threshold,
                    cfg.circuit_breaker.open_duration,
                )),
                outstanding: AtomicUsize::new(0),
            });
            metrics.circuit_open.with_label_values(&[&u.name]).set(0);
            for m in &u.models {
                models
                    .entry(m.clone())
                    .or_insert_with(|| ModelPool {
                        endpoints: Vec::new(),
                        rr: Mutex::new(SmoothWrr::default()),
                        ties: AtomicUsize::new(0),
                    })
                    .endpoints
                    .push(endpoint.clone());
            }
        }
        Ok(Self {
            models,
            strategy: cfg.routing.strategy,
            metrics,
        })
    }

    pub fn has_model(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self.models.keys().cloned().collect();
        m.sort();
        m
    }

    /// Whether an endpoint of `model` other than those in `tried` could take
    /// the next attempt (then a retry fails over instead of waiting).
    pub fn has_untried(&self, model: &str, tried: &[usize]) -> bool {
        let now = Instant::now();
        self.models.get(model).is_some_and(|pool| {
            pool.endpoints
                .iter()
                .enumerate()
                .any(|(i, e)| !tried.contains(&i) && e.breaker.lock().available(now))
        })
    }

    /// Chooses an endpoint for `model`, preferring ones not in `tried`
    /// (failover), and takes a lease on it.
    pub fn pick(&self, model: &str, tried: &[usize]) -> Result<Lease, PickError> {
        let pool = self.models.get(model).ok_or(PickError::UnknownModel)?;
        let now = Instant::now();
        let available: Vec<bool> = pool
            .endpoints
            .iter()
            .map(|e| e.breaker.lock().available(now))
            .collect();
        let fresh: Vec<bool> = available
            .iter()
            .enumerate()
            .map(|(i, a)| *a && !tried.contains(&i))
            .collect();
        // Fail over to an untried endpoint if any; else any available one.
        let eligible = if fresh.iter().any(|x| *x) {
            fresh
        } else {
            available
        };
        for _ in 0..pool.endpoints.len() {
            let Some(index) = self.choose(pool, &eligible) else {
                break;
            };
            let ep = &pool.endpoints[index];
            if ep.breaker.lock().try_acquire(now) {
                ep.outstanding.fetch_add(1, Ordering::Relaxed);
                return Ok(Lease {
                    endpoint: ep.clone(),
                    index,
                    settled: false,
                    metrics: self.metrics.clone(),
                });
            }
        }
        let retry_in = pool
            .endpoints
            .iter()
            .filter_map(|e| e.breaker.lock().reopens_in(now))
            .min();
        Err(PickError::AllOpen { retry_in })
    }

    fn choose(&self, pool: &ModelPool, eligible: &[bool]) -> Option<usize> {
        match self.strategy {
            Strategy::RoundRobin => {
                let weights: Vec<u32> = pool.endpoints.iter().map(|e| e.weight).collect();
                pool.rr.lock().next(&weights, eligible)
            }
            Strategy::LeastOutstanding => {
                let candidates: Vec<Candidate> = pool
                    .endpoints
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| eligible[*i])
                    .map(|(index, e)| Candidate {
                        index,
                        outstanding: e.outstanding.load(Ordering::Relaxed),
                        weight: e.weight,
                    })
                    .collect();
                least_outstanding(&candidates, pool.ties.fetch_add(1, Ordering::Relaxed))
            }
        }
    }
}

/// One request's hold on an endpoint: counts as in-flight until dropped and
/// reports the attempt's outcome to the endpoint's breaker.
pub struct Lease {
    pub endpoint: Arc<Endpoint>,
    /// Position in the model's pool, for failover bookkeeping.
    pub index: usize,
    settled: bool,
    metrics: Arc<Metrics>,
}

impl Lease {
    pub fn succeeded(mut self) {
        self.settle(|b, _| b.on_success());
    }

    pub fn failed(mut self, err: &UpstreamError) {
        if err.is_endpoint_failure() {
            self.settle(|b, now| b.on_failure(now));
        } else {
            self.settle(|b, _| b.on_neutral());
        }
    }

    fn settle(&mut self, f: impl FnOnce(&mut Breaker, Instant)) {
        self.settled = true;
        let mut b = self.endpoint.breaker.lock();
        f(&mut b, Instant::now());
        self.metrics
            .circuit_open
            .with_label_values(&[&self.endpoint.name])
            .set(i64::from(b.is_open()));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(|b, _| b.on_neutral());
        }
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}
