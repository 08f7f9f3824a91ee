//! The live upstream registry: endpoints grouped per model, each with its
//! breaker and in-flight count. Decisions are delegated to `balance` and
//! `breaker`; this module only holds the state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::balance::{least_outstanding, Candidate, SmoothWrr};
use super::breaker::{Admission, Breaker, Verdict};
use super::providers::{self, Provider, Support};
use super::UpstreamError;
use crate::pipeline::ApiKind;
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

    /// Re-reads every endpoint's files (see [`Provider::reload_files`]);
    /// returns whether any changed. One failing endpoint does not stop
    /// the others; the first error is returned.
    pub fn reload_files(&self) -> Result<bool, BuildError> {
        let mut seen = std::collections::HashSet::new();
        let (mut changed, mut first_err) = (false, None);
        for e in self.models.values().flat_map(|p| p.endpoints.iter()) {
            if !seen.insert(Arc::as_ptr(e)) {
                continue;
            }
            match e.provider.reload_files() {
                Ok(c) => changed |= c,
                Err(err) => {
                    first_err.get_or_insert(err);
                }
            }
        }
        first_err.map_or(Ok(changed), Err)
    }

    /// The endpoint named `name` (an upstream's name), in whichever pool.
    pub fn endpoint(&self, name: &str) -> Option<Arc<Endpoint>> {
        self.models
            .values()
            .flat_map(|p| p.endpoints.iter())
            .find(|e| e.name == name)
            .cloned()
    }

    pub fn has_model(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self.models.keys().cloned().collect();
        m.sort();
        m
    }

    /// Whether some endpoint of `model` speaks `api` (see
    /// [`Provider::supports`]).
    pub fn serves(&self, model: &str, api: ApiKind) -> bool {
        self.models
            .get(model)
            .is_some_and(|pool| pool.endpoints.iter().any(|e| e.provider.supports(api)))
    }

    /// Whether an endpoint of `model` other than those in `tried` could take
    /// the next attempt (then a retry fails over instead of waiting).
    pub fn has_untried(&self, model: &str, tried: &[usize]) -> bool {
        self.has_untried_for(model, ApiKind::ChatCompletions, tried)
    }

    /// [`Pools::has_untried`] among the endpoints that speak `api`.
    pub fn has_untried_for(&self, model: &str, api: ApiKind, tried: &[usize]) -> bool {
        let now = Instant::now();
        self.models.get(model).is_some_and(|pool| {
            pool.endpoints.iter().enumerate().any(|(i, e)| {
                !tried.contains(&i) && e.provider.supports(api) && e.breaker.lock().available(now)
            })
        })
    }

    /// [`Pools::pick_for`] a chat-completions request.
    pub fn pick(&self, model: &str, tried: &[usize]) -> Result<Lease, PickError> {
        self.pick_for(model, ApiKind::ChatCompletions, tried)
    }

    /// Chooses an endpoint for `model` among those that take `api`,
    /// preferring ones not in `tried` (failover), and among those the ones
    /// that take it natively over ones that translate it; takes a lease on
    /// it. Fails with `AllOpen` only when no such endpoint admits a
    /// request: a closed circuit always does, so a model with a healthy
    /// endpoint never gets `AllOpen`.
    pub fn pick_for(&self, model: &str, api: ApiKind, tried: &[usize]) -> Result<Lease, PickError> {
        let pool = self.models.get(model).ok_or(PickError::UnknownModel)?;
        let now = Instant::now();
        let available: Vec<bool> = pool
            .endpoints
            .iter()
            .map(|e| e.breaker.lock().available(now))
            .collect();
        // Fail over to an untried endpoint if any (native first); else any
        // available one. An endpoint that refuses (its half-open probe was
        // just taken by another request) is struck off and the choice made
        // again. Each pass is built only when the ones before found none.
        for (fresh, how) in [
            (true, Support::Native),
            (true, Support::Translated),
            (false, Support::Native),
            (false, Support::Translated),
        ] {
            let mut eligible: Vec<bool> = pool
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    available[i] && !(fresh && tried.contains(&i)) && e.provider.support(api) == how
                })
                .collect();
            let eligible = &mut eligible;
            while let Some(index) = self.choose(pool, eligible) {
                let ep = &pool.endpoints[index];
                let admitted = ep.breaker.lock().admit(now);
                match admitted {
                    Some(admission) => {
                        ep.outstanding.fetch_add(1, Ordering::Relaxed);
                        return Ok(Lease {
                            endpoint: ep.clone(),
                            index,
                            admission,
                            settled: false,
                            metrics: self.metrics.clone(),
                        });
                    }
                    None => eligible[index] = false,
                }
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
/// reports the attempt's outcome to the endpoint's breaker. The lease of a
/// half-open probe carries the probe token: its report decides the circuit.
/// A lease dropped without a report is neutral (a cancelled request says
/// nothing about the endpoint) and hands a probe token back.
pub struct Lease {
    pub endpoint: Arc<Endpoint>,
    /// Position in the model's pool, for failover bookkeeping.
    pub index: usize,
    admission: Admission,
    settled: bool,
    metrics: Arc<Metrics>,
}

impl Lease {
    pub fn succeeded(mut self) {
        self.settle(Verdict::Success);
    }

    /// An endpoint failure (connect error, timeout of the endpoint's own
    /// attempt timeout, 5xx, broken stream) counts against the breaker;
    /// anything else is neutral.
    pub fn failed(mut self, err: &UpstreamError) {
        let verdict = if err.is_endpoint_failure() {
            Verdict::Failure
        } else {
            Verdict::Neutral
        };
        self.settle(verdict);
    }

    /// No verdict on the endpoint: use it when the attempt was cut short by
    /// the request's overall deadline (not the endpoint's own timeout), or
    /// cancelled. Same as dropping the lease, said explicitly.
    pub fn neutral(mut self) {
        self.settle(Verdict::Neutral);
    }

    /// Whether this lease holds the half-open probe token.
    pub fn is_probe(&self) -> bool {
        self.admission == Admission::Probe
    }

    /// The endpoint has answered well enough to be trusted (a stream's first
    /// chunk arrived) before the attempt is over: a probe closes the circuit
    /// now rather than at the end of a long stream, and the lease goes on as
    /// a normal one (a later failure counts as any failure). No-op otherwise.
    pub fn confirm(&mut self) {
        if self.admission == Admission::Probe {
            self.record(Verdict::Success);
            self.admission = Admission::Normal;
        }
    }

    fn settle(&mut self, verdict: Verdict) {
        self.settled = true;
        self.record(verdict);
    }

    fn record(&self, verdict: Verdict) {
        let mut b = self.endpoint.breaker.lock();
        b.record(self.admission, verdict, Instant::now());
        // Set under the breaker's lock so concurrent settles cannot leave
        // the gauge showing an older state.
        self.metrics
            .circuit_open
            .with_label_values(&[&self.endpoint.name])
            .set(i64::from(b.is_open()));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(Verdict::Neutral);
        }
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forwarder_config::UpstreamConfig;

    const OPEN: Duration = Duration::from_millis(30);

    /// Two endpoints `a` (index 0) and `b` (index 1) serving model `m`;
    /// every failure opens a circuit.
    fn pools(strategy: Strategy) -> (Pools, Arc<Metrics>) {
        let mut cfg = Config {
            upstreams: ["a", "b"]
                .iter()
                .map(|n| UpstreamConfig {
                    name: (*n).into(),
                    models: vec!["m".into()],
                    ..UpstreamConfig::builtin_mock()
                })
                .collect(),
            ..Config::default()
        };
        cfg.circuit_breaker.failure_threshold = 1;
        cfg.circuit_breaker.open_duration = OPEN;
        cfg.routing.strategy = strategy;
        let metrics = Arc::new(Metrics::new());
        (Pools::from_config(&cfg, metrics.clone()).unwrap(), metrics)
    }

    /// An endpoint that speaks a request's API natively is chosen over
    /// one that would translate it; the translating one takes failover.
    #[test]
    fn native_endpoints_are_preferred_and_translating_ones_fail_over() {
        use forwarder_config::Provider as Kind;
        let at = |name: &str, provider| UpstreamConfig {
            name: name.into(),
            provider,
            base_url: Some("http://127.0.0.1:9/v1".into()),
            models: vec!["m".into()],
            ..UpstreamConfig::builtin_mock()
        };
        let cfg = Config {
            upstreams: vec![at("claude", Kind::Anthropic), at("gpt", Kind::Openai)],
            ..Config::default()
        };
        let p = Pools::from_config(&cfg, Arc::new(Metrics::new())).unwrap();
        for _ in 0..5 {
            assert_eq!(
                p.pick_for("m", ApiKind::ChatCompletions, &[])
                    .unwrap()
                    .index,
                1
            );
            assert_eq!(p.pick_for("m", ApiKind::Messages, &[]).unwrap().index, 0);
        }
        assert_eq!(
            p.pick_for("m", ApiKind::ChatCompletions, &[1])
                .unwrap()
                .index,
            0
        );
        assert_eq!(p.pick_for("m", ApiKind::Messages, &[0]).unwrap().index, 1);
        // Nothing translates embeddings: the one endpoint that takes them is retried.
        assert_eq!(p.pick_for("m", ApiKind::Embeddings, &[1]).unwrap().index, 1);
        assert!(p
            .pick_for("m", ApiKind::CountTokens, &[0])
            .is_ok_and(|l| l.index == 0));
        assert!(!p.has_untried_for("m", ApiKind::CountTokens, &[0]));
    }

    fn open_gauge(m: &Metrics, name: &str) -> i64 {
        m.circuit_open.with_label_values(&[name]).get()
    }

    /// Opens `a` and waits until it is half-open.
    fn open_a(p: &Pools) {
        let lease = p.pick("m", &[1]).unwrap();
        assert_eq!(lease.index, 0);
        lease.failed(&UpstreamError::Timeout);
        std::thread::sleep(OPEN + Duration::from_millis(5));
    }

    #[test]
    fn half_open_endpoint_takes_one_probe_and_others_go_to_the_closed_one() {
        for strategy in [Strategy::LeastOutstanding, Strategy::RoundRobin] {
            let (p, m) = pools(strategy);
            open_a(&p);
            assert_eq!(open_gauge(&m, "a"), 1);
            let probe = p.pick("m", &[1]).unwrap();
            assert!(probe.is_probe() && probe.index == 0);
            // While the probe is out, everything goes to b, even a request
            // that already tried b: never "no healthy upstream".
            let held: Vec<Lease> = (0..20)
                .map(|k| {
                    let tried: &[usize] = if k % 2 == 0 { &[] } else { &[1] };
                    let l = p.pick("m", tried).expect("b is healthy");
                    assert_eq!(l.index, 1, "{strategy:?}");
                    assert!(!l.is_probe());
                    l
                })
                .collect();
            drop(held);
            probe.succeeded();
            assert_eq!(open_gauge(&m, "a"), 0);
            assert!(!p.pick("m", &[1]).unwrap().is_probe());
        }
    }

    #[test]
    fn a_confirmed_probe_closes_the_circuit_before_its_stream_ends() {
        let (p, m) = pools(Strategy::LeastOutstanding);
        open_a(&p);
        let mut probe = p.pick("m", &[1]).unwrap();
        assert!(probe.is_probe());
        probe.confirm();
        assert!(!probe.is_probe());
        assert_eq!(open_gauge(&m, "a"), 0, "closed at the first chunk");
        let other = p.pick("m", &[1]).unwrap();
        assert_eq!(other.index, 0, "a takes normal traffic again");
        drop(other);
        drop(probe); // the stream ends without a verdict: still closed
        assert_eq!(open_gauge(&m, "a"), 0);
    }

    #[test]
    fn a_dropped_probe_lease_returns_the_token() {
        let (p, m) = pools(Strategy::LeastOutstanding);
        open_a(&p);
        let probe = p.pick("m", &[1]).unwrap();
        assert!(probe.is_probe());
        drop(probe);
        assert_eq!(open_gauge(&m, "a"), 1, "no verdict: still open");
        let again = p.pick("m", &[1]).unwrap();
        assert!(
            again.is_probe() && again.index == 0,
            "the next request probes"
        );
        again.failed(&UpstreamError::Timeout);
        assert_eq!(open_gauge(&m, "a"), 1);
        // reopened: a is not available, b takes everything
        assert_eq!(p.pick("m", &[1]).unwrap().index, 1);
    }

    #[test]
    fn neutral_attempts_do_not_open_the_circuit() {
        let (p, m) = pools(Strategy::LeastOutstanding);
        for _ in 0..5 {
            p.pick("m", &[1]).unwrap().neutral();
            let l = p.pick("m", &[1]).unwrap();
            l.failed(&UpstreamError::Status {
                status: 429,
                retry_after: None,
                body: bytes::Bytes::new(),
            });
        }
        assert_eq!(open_gauge(&m, "a"), 0);
        assert!(!p.pick("m", &[1]).unwrap().is_probe());
    }

    #[test]
    fn only_when_every_circuit_is_open_is_there_no_upstream() {
        let (p, m) = pools(Strategy::LeastOutstanding);
        p.pick("m", &[1]).unwrap().failed(&UpstreamError::Timeout);
        p.pick("m", &[0]).unwrap().failed(&UpstreamError::Timeout);
        assert_eq!((open_gauge(&m, "a"), open_gauge(&m, "b")), (1, 1));
        match p.pick("m", &[]) {
            Err(PickError::AllOpen { retry_in }) => assert!(retry_in.unwrap() <= OPEN),
            _ => panic!("every circuit is open"),
        }
    }

    #[test]
    fn concurrent_picks_never_fail_while_a_closed_endpoint_exists() {
        let (p, _) = pools(Strategy::LeastOutstanding);
        let p = Arc::new(p);
        for _ in 0..20 {
            open_a(&p);
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let p = p.clone();
                    std::thread::spawn(move || {
                        for _ in 0..200 {
                            let l = p.pick("m", &[]).expect("b is closed");
                            if l.index == 0 {
                                // keep a half-open: the probe gives no verdict
                                l.neutral();
                            }
                        }
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
        }
    }
}
