//! The autoscaler's decision, as a pure function of what it observed:
//! (metrics, policy, replicas, history, now) → desired count and the
//! reason. No I/O here; `autoscale::evaluate` feeds it and acts on it.
//!
//! The rules, in order:
//! 1. No data at all → hold (and say so); partial data never scales down.
//!    Zero requests from fresh series is data: zero load.
//! 2. Capacity: enough replicas for the QPS target, ignoring changes inside a
//!    tolerance band so steady load never flaps. The QPS is the sum over the
//!    pods that report; a pod without series counts as zero load (as HPA
//!    does when scaling up), never as an extrapolation of the others.
//! 3. SLO: a P99 (or, for streams, TTFT P99) or error-rate breach adds
//!    replicas in proportion to the breach, but only when the forwarder is
//!    the bottleneck: saturated, or its own time (measured directly,
//!    upstream attempts and backoff excluded) is a large share of the
//!    budget. A breach from fewer than `min_samples` requests is no
//!    evidence. After a scale-up, SLO steps wait `settle` (a rate window and
//!    an interval), until the new replicas show in the percentiles.
//!    Queue: with a queue SLO (`maxQueueDelaySeconds`), enough replicas
//!    that jobs arriving are absorbed and the backlog drains within it
//!    (`queue_need`); the recommendation is the highest of capacity, SLO
//!    and queue. Missing queue series, work queued with no estimate of a
//!    replica's job rate, or a rate the upstream sets, hold (never down,
//!    never up on the queue); a queue step settles like an SLO step
//!    (`queue`).
//! 4. Up fast (bounded by the max step), but not again while replicas
//!    added earlier are not yet Ready, for at most `ready_timeout`.
//! 5. Down slowly: only to the highest recommendation of the whole
//!    stabilization window, which the history must actually cover (no gap
//!    longer than `max_gap`), by bounded steps.
//! 6. Always within [min, max].

use std::time::Duration;

use super::queue::{queue_need, QueueObserved, RunFloor};
pub use super::queue::{QueueNeed, QueueSlo};

/// What the spec asks for, in the policy's units.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    pub p99_slo_ms: f64,
    /// P99 time to first token for streamed requests; when set, streams are
    /// judged by it instead of by their total duration.
    pub ttft_slo_ms: Option<f64>,
    pub max_error_rate: f64,
    pub target_qps_per_replica: f64,
    pub stabilization: Duration,
    pub max_scale_up_step: u32,
    /// Relative band around the QPS target in which load changes are ignored.
    pub tolerance: f64,
    /// Share of the P99 budget the forwarder's own time may take before it
    /// counts as the bottleneck.
    pub own_latency_share: f64,
    /// In-flight requests per replica beyond which a replica is saturated;
    /// used only when the forwarder's own time is not reported (in-flight
    /// counts also grow with a slow upstream).
    pub max_inflight_per_replica: f64,
    /// Requests a window must hold before its P99 or error rate is evidence.
    pub min_samples: f64,
    /// How long a scale-up waits for earlier replicas to become Ready.
    pub ready_timeout: Duration,
    /// After a scale-up, SLO-driven steps wait this long (the rate window
    /// and an interval).
    pub settle: Duration,
    /// Largest gap between evaluations for the history to count as
    /// covering the stabilization window.
    pub max_gap: Duration,
    /// The async queue's SLO; `None`: the queue is not a signal.
    pub queue: Option<QueueSlo>,
}

impl Policy {
    /// Defaults for the knobs the resource does not expose, with reasons:
    /// a 10% band is well above the noise of a 1-minute rate; the forwarder
    /// adds well under 1 ms, so a quarter of the budget means it is queueing;
    /// 512 in flight per replica is where a 2-core pod starts to queue; a
    /// P99 from fewer than 100 requests is just the maximum; 5 minutes is
    /// far beyond a forwarder's start time; settle (window + interval) and gap
    /// (three evaluations) match the operator's 1-minute window and 15 s interval.
    pub fn new(
        min: u32,
        max: u32,
        p99_slo_ms: f64,
        max_error_rate: f64,
        target_qps: f64,
        stabilization: Duration,
        max_scale_up_step: u32,
    ) -> Self {
        Self {
            min,
            max,
            p99_slo_ms,
            ttft_slo_ms: None,
            max_error_rate,
            target_qps_per_replica: target_qps,
            stabilization,
            max_scale_up_step,
            tolerance: 0.1,
            own_latency_share: 0.25,
            max_inflight_per_replica: 512.0,
            min_samples: 100.0,
            ready_timeout: Duration::from_secs(300),
            settle: Duration::from_secs(75),
            max_gap: Duration::from_secs(45),
            queue: None,
        }
    }
}

/// Metrics for one resource, summed over its live pods (see `metrics`).
/// `None` means "no data", never zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub qps: Option<f64>,
    /// Requests in the rate window (the P99's sample count).
    pub requests: Option<f64>,
    pub p99_ms: Option<f64>,
    /// P99 of the forwarder's own time (upstream attempts and backoff
    /// excluded).
    pub own_p99_ms: Option<f64>,
    /// Streamed requests in the rate window, and their TTFT P99.
    pub streams: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub error_rate: Option<f64>,
    pub inflight: Option<f64>,
    /// Shown in explanations; decisions use `own_p99_ms`.
    pub upstream_p99_ms: Option<f64>,
    /// Live pods whose series were present.
    pub reporting: u32,
    /// Async jobs waiting (`forwarder_queue_depth`: for Kafka the consumer
    /// lag of each pod's partitions, running jobs included), summed.
    pub backlog: Option<f64>,
    /// Runs entering the queue per second (new jobs and retries).
    pub job_arrivals: Option<f64>,
    /// Jobs finished (succeeded or failed) per second.
    pub jobs_finished: Option<f64>,
    /// Mean time from a worker picking a job up to its result being
    /// stored, in seconds; `None` when no run ended in the window.
    pub job_run_s: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    pub current: u32,
    pub ready: u32,
}

/// A past raw recommendation, kept for the stabilization window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommendation {
    /// Seconds on the caller's monotonic clock.
    pub at: Duration,
    pub replicas: u32,
}

/// What the policy remembers between evaluations (times on the caller's
/// monotonic clock). Updated by [`History::record`], pure as well.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub recommendations: Vec<Recommendation>,
    /// Since when fewer replicas than wanted are Ready; reset by each
    /// scale-up, so new pods get a full `ready_timeout`.
    pub not_ready_since: Option<Duration>,
    /// When replicas were last added, moved to when they were all Ready.
    pub last_scale_up: Option<Duration>,
    /// The shortest mean job run time over the stabilization window: the
    /// queue rule's measure of a credible job rate.
    pub run_floor: Option<RunFloor>,
}

impl From<Vec<Recommendation>> for History {
    fn from(recommendations: Vec<Recommendation>) -> Self {
        Self {
            recommendations,
            ..Self::default()
        }
    }
}

impl History {
    /// Records an evaluation's outcome.
    pub fn record(&mut self, p: &Policy, r: Replicas, d: &Decision, now: Duration) {
        self.recommendations.push(Recommendation {
            at: now,
            replicas: d.recommendation,
        });
        prune(&mut self.recommendations, p.stabilization, now);
        if d.desired > r.current {
            self.last_scale_up = Some(now);
            self.not_ready_since = Some(now);
        } else if r.ready >= r.current {
            // The added replicas serve from now: settle from here, not
            // from the decision (pods take a while to become Ready).
            if self.not_ready_since.is_some() && self.last_scale_up.is_some() {
                self.last_scale_up = Some(now);
            }
            self.not_ready_since = None;
        } else if self.not_ready_since.is_none() {
            self.not_ready_since = Some(now);
        }
    }

    /// While the recommendations have stayed below `current` (the count is
    /// held by the stabilization window): since when, and the highest of
    /// them. What a new leader needs to continue the window (pure).
    pub fn stabilizing(&self, current: u32) -> Option<(Duration, u32)> {
        let mut run = None;
        for r in self.recommendations.iter().rev() {
            if r.replicas >= current {
                break;
            }
            let peak = run.map_or(r.replicas, |(_, p): (Duration, u32)| p.max(r.replicas));
            run = Some((r.at, peak));
        }
        run
    }

    /// Continues a window another evaluator observed: recommendations of
    /// `peak` from `since` to `until`, every `step` (at most the history's
    /// gap limit), ahead of this evaluator's own.
    pub fn restore_stabilizing(
        &mut self,
        since: Duration,
        until: Duration,
        peak: u32,
        step: Duration,
    ) {
        if step.is_zero() || until < since {
            return;
        }
        let mut restored = Vec::new();
        let mut at = since;
        while at < until {
            restored.push(Recommendation { at, replicas: peak });
            at += step;
        }
        restored.push(Recommendation {
            at: until,
            replicas: peak,
        });
        restored.retain(|r| self.recommendations.first().is_none_or(|f| r.at < f.at));
        restored.append(&mut self.recommendations);
        self.recommendations = restored;
    }

    /// Records the mean job run time observed (see [`RunFloor`]).
    pub fn record_runs(&mut self, p: &Policy, run_s: Option<f64>, now: Duration) {
        self.run_floor = RunFloor::next(self.run_floor, run_s, p.stabilization, now);
    }

    /// Forgets the recommendations (while replicas are pinned by hand, the
    /// autoscaler observed nothing).
    pub fn forget(&mut self) {
        *self = Self::default();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Nothing to change.
    Stable,
    /// More (or fewer) replicas for the QPS target.
    Capacity,
    /// A P99 (or TTFT) breach with the forwarder as the bottleneck.
    LatencySlo,
    /// An error-rate breach with the forwarder as the bottleneck.
    ErrorSlo,
    /// Holding: replicas added earlier are not Ready yet.
    WaitingForReady,
    /// Replicas stayed unready beyond `ready_timeout`: scaling up beside them.
    ReadyTimeout,
    /// An SLO breach right after a scale-up: waiting for the new replicas
    /// to show in the percentiles.
    Settling,
    /// Lower load, but not for the whole stabilization window yet.
    Stabilizing,
    /// Lower load for the whole window: stepping down.
    ScaleDown,
    /// More replicas to drain the async queue within its SLO.
    QueueDelay,
    /// No metrics: holding the current count.
    NoData,
    /// The current count was outside [min, max].
    Bounds,
}

/// An SLO breach, with the numbers (observed, objective).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Breach {
    pub p99_ms: Option<(f64, f64)>,
    pub ttft_ms: Option<(f64, f64)>,
    pub error_rate: Option<(f64, f64)>,
    /// Estimated seconds to drain the backlog (infinite: it grows) and the
    /// SLO.
    pub queue_delay_s: Option<(f64, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub reason: Reason,
    /// The recommendation before stabilization and the ready guard; the
    /// caller records it in the history.
    pub recommendation: u32,
    pub breach: Option<Breach>,
    /// A breach the forwarder does not cause (the upstream is slow or
    /// failing): more replicas would not help.
    pub upstream_slow: bool,
    pub metrics_available: bool,
    /// How long some replicas have not been Ready, when they are not.
    pub not_ready_for: Option<Duration>,
    /// What the queue SLO asked for.
    pub queue: QueueNeed,
}

fn clean(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite() && *x >= 0.0)
}

/// Load and SLO inputs, cleaned, with the evidence rules applied.
struct Signals {
    qps: Option<f64>,
    /// P99, TTFT and error-rate breaches (the queue's is in `queue`).
    breach: Option<Breach>,
    queue: QueueNeed,
    bottleneck: bool,
    /// Data the scale-down rule needs is missing.
    incomplete: bool,
}

fn signals(p: &Policy, obs: &Observed, r: Replicas, h: &History) -> Signals {
    let qps = clean(obs.qps);
    let enough = |n: Option<f64>| clean(n).is_none_or(|n| n >= p.min_samples);
    let enough_requests = enough(obs.requests);
    let p99 = clean(obs.p99_ms);
    let error_rate = clean(obs.error_rate);
    // Streams judged by time to first token (their total duration is the
    // generation time, not the forwarder's): then the request P99, which
    // mixes those durations in, is not judged.
    let ttft = p.ttft_slo_ms.and_then(|slo| {
        let streams = clean(obs.streams).filter(|n| *n >= p.min_samples)?;
        (streams > 0.0)
            .then_some(())
            .and(clean(obs.ttft_p99_ms))
            .map(|v| (v, slo))
    });
    let latency = if ttft.is_some() {
        None
    } else {
        p99.filter(|_| enough_requests)
            .filter(|v| *v > p.p99_slo_ms)
            .map(|v| (v, p.p99_slo_ms))
    };
    let ttft = ttft.filter(|(v, slo)| v > slo);
    let errors = error_rate
        .filter(|_| enough_requests)
        .filter(|v| *v > p.max_error_rate)
        .map(|v| (v, p.max_error_rate));
    let breach = (latency.is_some() || ttft.is_some() || errors.is_some()).then_some(Breach {
        p99_ms: latency,
        ttft_ms: ttft,
        error_rate: errors,
        queue_delay_s: None,
    });
    // QPS above the target is the capacity rule's to size, not evidence
    // that a breach is the forwarder's: with retries, completions of a
    // failing upstream arrive in bursts above the offered rate. A
    // saturated forwarder queues, and queueing is its own time.
    let serving = f64::from(r.ready.max(1));
    let bottleneck = match clean(obs.own_p99_ms) {
        Some(own) => own > p.own_latency_share * p.p99_slo_ms,
        // No own time in the window (an older forwarder, or only failed
        // requests): in-flight saturation stands in.
        None => clean(obs.inflight).is_some_and(|i| i / serving > p.max_inflight_per_replica),
    };
    let partial = obs.reporting < r.ready;
    // A missing P99 is only expected when the window holds too few
    // requests to have one (zero traffic: no samples, P99 NaN).
    let few = clean(obs.requests).is_some_and(|n| n < p.min_samples);
    let queue = match &p.queue {
        None => QueueNeed::Off,
        Some(q) => {
            let seen = QueueObserved {
                lag: obs.backlog,
                arrivals: obs.job_arrivals,
                finished: obs.jobs_finished,
                run_s: obs.job_run_s,
                reporting: obs.reporting,
                // 429s and timeouts are errors; a breach that is not the
                // forwarder's is the upstream's.
                upstream_troubled: breach.is_some_and(|b| b.error_rate.is_some() || !bottleneck),
            };
            queue_need(q, &seen, r.current, p.tolerance, h.run_floor)
        }
    };
    let queue_unknown = queue.holds();
    let incomplete = partial
        || qps.is_none()
        || error_rate.is_none()
        || (p99.is_none() && !few)
        || queue_unknown;
    Signals {
        qps,
        breach,
        queue,
        bottleneck,
        incomplete,
    }
}

/// The raw recommendation for `current` replicas: capacity, then SLO steps.
fn recommend(p: &Policy, s: &Signals, current: u32, settling: bool) -> (u32, Reason) {
    let base = current.max(1);
    let capacity = s.qps.map(|q| {
        let ratio = q / (f64::from(base) * p.target_qps_per_replica);
        if (ratio - 1.0).abs() <= p.tolerance {
            current
        } else {
            (q / p.target_qps_per_replica).ceil() as u32
        }
    });
    let mut rec = capacity.unwrap_or(current);
    let mut reason = if rec == current {
        Reason::Stable
    } else {
        Reason::Capacity
    };
    if let Some(b) = s.breach.filter(|_| s.bottleneck) {
        let factor = [
            b.p99_ms.or(b.ttft_ms).map(|(v, slo)| v / slo),
            b.error_rate
                .map(|(v, max)| if max > 0.0 { v / max } else { 2.0 }),
        ]
        .into_iter()
        .flatten()
        .fold(1.0, f64::max);
        let step = (f64::from(base) * (factor - 1.0)).ceil().max(1.0) as u32;
        let n = current + step.min(p.max_scale_up_step);
        if settling {
            // The forwarder is the bottleneck: never down meanwhile.
            if rec <= current {
                (rec, reason) = (current, Reason::Settling);
            }
        } else if n > rec {
            rec = n;
            reason = if b.p99_ms.is_some() || b.ttft_ms.is_some() {
                Reason::LatencySlo
            } else {
                Reason::ErrorSlo
            };
        }
    }
    // The queue's need is absolute (it does not grow with `current`), but
    // a scale-up's rebalance redelivers running jobs into the lag: settle.
    if let QueueNeed::Sized { replicas, .. } = s.queue {
        if settling && replicas > current {
            if rec <= current {
                (rec, reason) = (current, Reason::Settling);
            }
        } else if replicas > rec {
            rec = replicas;
            reason = if rec > current {
                Reason::QueueDelay
            } else {
                Reason::Stable
            };
        }
    }
    if s.incomplete && rec < current {
        rec = current;
        reason = Reason::Stable;
    }
    if rec > current {
        rec = rec.min(current + p.max_scale_up_step);
    }
    (rec, reason)
}

pub fn decide(p: &Policy, obs: &Observed, r: Replicas, h: &History, now: Duration) -> Decision {
    let clamp = |n: u32| n.clamp(p.min, p.max.max(p.min));
    let current = r.current;
    let not_ready_for =
        (r.ready < current).then(|| now.saturating_sub(h.not_ready_since.unwrap_or(now)));
    let no_data =
        clean(obs.qps).is_none() && clean(obs.p99_ms).is_none() && clean(obs.error_rate).is_none();
    if no_data || obs.reporting == 0 {
        let desired = clamp(current);
        return Decision {
            desired,
            reason: if desired == current {
                Reason::NoData
            } else {
                Reason::Bounds
            },
            recommendation: desired,
            breach: None,
            upstream_slow: false,
            metrics_available: false,
            not_ready_for,
            queue: if p.queue.is_some() {
                QueueNeed::Missing
            } else {
                QueueNeed::Off
            },
        };
    }
    let s = signals(p, obs, r, h);
    let settling = h
        .last_scale_up
        .is_some_and(|t| now.saturating_sub(t) < p.settle);
    let (rec, reason) = recommend(p, &s, current, settling);
    let rec = clamp(rec);

    let (desired, reason) = if current < p.min || current > p.max {
        (clamp(rec.max(clamp(current))), Reason::Bounds)
    } else if rec > current {
        match not_ready_for {
            Some(waited) if waited < p.ready_timeout => (current, Reason::WaitingForReady),
            // Waited long enough: the unready replicas are no capacity;
            // size as if they did not exist, and keep them beside.
            Some(_) => {
                let unready = current - r.ready;
                let (need, _) = recommend(p, &s, r.ready, settling);
                let n = (need + unready).max(rec).min(current + p.max_scale_up_step);
                (clamp(n), Reason::ReadyTimeout)
            }
            None => (rec, reason),
        }
    } else if rec < current {
        stabilize(p, rec, current, h, now)
    } else {
        (current, reason)
    };
    let queue_breach = match (s.queue, p.queue) {
        (QueueNeed::Sized { delay_s, .. }, Some(q)) if delay_s > q.max_delay_s => {
            Some((delay_s, q.max_delay_s))
        }
        _ => None,
    };
    let breach = match (s.breach, queue_breach) {
        (Some(b), q) => Some(Breach {
            queue_delay_s: q,
            ..b
        }),
        (None, Some(q)) => Some(Breach {
            p99_ms: None,
            ttft_ms: None,
            error_rate: None,
            queue_delay_s: Some(q),
        }),
        (None, None) => None,
    };
    Decision {
        desired: clamp(desired),
        reason,
        recommendation: rec,
        // Only request-SLO breaches can be the upstream's; a queue that
        // outgrows the workers is for more replicas to drain.
        upstream_slow: s.breach.is_some() && !s.bottleneck,
        breach,
        metrics_available: true,
        not_ready_for,
        queue: s.queue,
    }
}

/// Whether the history covers the whole window `[now - window, now]`:
/// an entry at or before its start, and no gap between evaluations (or
/// since the last one) longer than `max_gap`.
fn covers(h: &[Recommendation], window: Duration, max_gap: Duration, now: Duration) -> bool {
    if window.is_zero() {
        return true;
    }
    let Some(since) = now.checked_sub(window) else {
        return false;
    };
    let Some(start) = h.iter().rposition(|r| r.at <= since) else {
        return false;
    };
    let mut last = h[start].at;
    for r in &h[start + 1..] {
        if r.at.saturating_sub(last) > max_gap {
            return false;
        }
        last = r.at;
    }
    now.saturating_sub(last) <= max_gap
}

/// Scale down only to the highest recommendation seen over the whole
/// window (which must be covered by history, so a restarted operator, or
/// one back from a gap, does not scale down on its first look), by at most
/// a quarter per step.
fn stabilize(p: &Policy, rec: u32, current: u32, h: &History, now: Duration) -> (u32, Reason) {
    let since = now.saturating_sub(p.stabilization);
    let recs = &h.recommendations;
    let highest = recs
        .iter()
        .filter(|r| r.at >= since)
        .map(|r| r.replicas)
        .fold(rec, u32::max);
    if !covers(recs, p.stabilization, p.max_gap, now) || highest >= current {
        return (current, Reason::Stabilizing);
    }
    let step = (current / 4).max(1);
    (highest.max(current.saturating_sub(step)), Reason::ScaleDown)
}

/// Drops history older than the window (keeping the newest older entry,
/// which proves the window is covered).
pub fn prune(history: &mut Vec<Recommendation>, window: Duration, now: Duration) {
    let since = now.saturating_sub(window);
    let keep_from = history.iter().rposition(|h| h.at <= since).unwrap_or(0);
    history.drain(..keep_from);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> Policy {
        Policy::new(2, 20, 500.0, 0.01, 50.0, 300 * S, 4)
    }

    fn healthy(qps: f64, pods: u32) -> Observed {
        Observed {
            qps: Some(qps),
            p99_ms: Some(200.0),
            error_rate: Some(0.0),
            requests: Some(qps * 60.0),
            own_p99_ms: Some(1.0),
            inflight: Some(qps * 0.2),
            upstream_p99_ms: Some(199.0),
            reporting: pods,
            ..Default::default()
        }
    }

    /// One recommendation every 15 s over [from, to) seconds.
    fn steady(replicas: u32, from: u32, to: u32) -> Vec<Recommendation> {
        (from..to)
            .step_by(15)
            .map(|t| Recommendation {
                at: t * S,
                replicas,
            })
            .collect()
    }

    fn at(current: u32) -> Replicas {
        Replicas {
            current,
            ready: current,
        }
    }

    #[test]
    fn table() {
        let p = policy();
        let long_low = steady(2, 0, 300);
        struct Case {
            name: &'static str,
            obs: Observed,
            r: Replicas,
            history: Vec<Recommendation>,
            desired: u32,
            reason: Reason,
        }
        let cases = vec![
            Case {
                name: "steady load at target",
                obs: healthy(200.0, 4),
                r: at(4),
                history: vec![],
                desired: 4,
                reason: Reason::Stable,
            },
            Case {
                name: "inside the tolerance band",
                obs: healthy(215.0, 4),
                r: at(4),
                history: vec![],
                desired: 4,
                reason: Reason::Stable,
            },
            Case {
                name: "capacity up",
                obs: healthy(400.0, 4),
                r: at(4),
                history: vec![],
                desired: 8,
                reason: Reason::Capacity,
            },
            Case {
                name: "capacity up bounded by the step",
                obs: healthy(1000.0, 4),
                r: at(4),
                history: vec![],
                desired: 8,
                reason: Reason::Capacity,
            },
            Case {
                name: "never above max",
                obs: healthy(5000.0, 18),
                r: at(18),
                history: vec![],
                desired: 20,
                reason: Reason::Capacity,
            },
            Case {
                name: "latency breach, forwarder adds latency",
                obs: Observed {
                    p99_ms: Some(1000.0),
                    own_p99_ms: Some(700.0),
                    upstream_p99_ms: Some(300.0),
                    ..healthy(200.0, 4)
                },
                r: at(4),
                history: vec![],
                desired: 8,
                reason: Reason::LatencySlo,
            },
            Case {
                name: "latency breach explained by the upstream",
                obs: Observed {
                    p99_ms: Some(1000.0),
                    upstream_p99_ms: Some(990.0),
                    ..healthy(200.0, 4)
                },
                r: at(4),
                history: vec![],
                desired: 4,
                reason: Reason::Stable,
            },
            Case {
                name: "error breach while the forwarder queues",
                obs: Observed {
                    error_rate: Some(0.02),
                    own_p99_ms: Some(200.0),
                    ..healthy(240.0, 4)
                },
                r: at(4),
                history: vec![],
                desired: 8,
                reason: Reason::ErrorSlo,
            },
            Case {
                name: "error breach with QPS above target only: capacity sizes it",
                obs: Observed {
                    error_rate: Some(0.02),
                    ..healthy(240.0, 4)
                },
                r: at(4),
                history: vec![],
                desired: 5,
                reason: Reason::Capacity,
            },
            Case {
                name: "error breach without saturation: more forwarders would not help",
                obs: Observed {
                    error_rate: Some(0.02),
                    ..healthy(200.0, 4)
                },
                r: at(4),
                history: vec![],
                desired: 4,
                reason: Reason::Stable,
            },
            Case {
                name: "no data holds",
                obs: Observed::default(),
                r: at(6),
                history: vec![],
                desired: 6,
                reason: Reason::NoData,
            },
            Case {
                name: "pending replicas block a further step",
                obs: healthy(800.0, 4),
                r: Replicas {
                    current: 8,
                    ready: 4,
                },
                history: vec![],
                desired: 8,
                reason: Reason::WaitingForReady,
            },
            Case {
                name: "low load, window not covered",
                obs: healthy(50.0, 6),
                r: at(6),
                history: vec![],
                desired: 6,
                reason: Reason::Stabilizing,
            },
            Case {
                name: "low load for the whole window",
                obs: healthy(50.0, 6),
                r: at(6),
                history: long_low.to_vec(),
                desired: 5,
                reason: Reason::ScaleDown,
            },
            Case {
                name: "a peak inside the window holds",
                obs: healthy(50.0, 6),
                r: at(6),
                history: steady(2, 0, 300)
                    .into_iter()
                    .map(|r| Recommendation {
                        replicas: if r.at == 255 * S { 6 } else { 2 },
                        ..r
                    })
                    .collect(),
                desired: 6,
                reason: Reason::Stabilizing,
            },
            Case {
                name: "missing p99 never scales down",
                obs: Observed {
                    p99_ms: None,
                    ..healthy(50.0, 6)
                },
                r: at(6),
                history: long_low.to_vec(),
                desired: 6,
                reason: Reason::Stable,
            },
            Case {
                name: "missing p99 does not block scaling up",
                obs: Observed {
                    p99_ms: None,
                    ..healthy(400.0, 4)
                },
                r: at(4),
                history: vec![],
                desired: 8,
                reason: Reason::Capacity,
            },
            Case {
                name: "one pod without series counts as zero load, no scale-down",
                obs: healthy(300.0, 3),
                r: at(4),
                history: vec![],
                desired: 6,
                reason: Reason::Capacity,
            },
            Case {
                name: "below min is raised",
                obs: healthy(10.0, 1),
                r: at(1),
                history: vec![],
                desired: 2,
                reason: Reason::Bounds,
            },
            Case {
                name: "NaN is no data",
                obs: Observed {
                    qps: Some(f64::NAN),
                    p99_ms: Some(f64::NAN),
                    error_rate: None,
                    ..Default::default()
                },
                r: at(5),
                history: vec![],
                desired: 5,
                reason: Reason::NoData,
            },
        ];
        for c in cases {
            let h = History::from(c.history.clone());
            let d = decide(&p, &c.obs, c.r, &h, 300 * S);
            assert_eq!(
                (d.desired, d.reason),
                (c.desired, c.reason),
                "{}: {d:?}",
                c.name
            );
        }
    }

    #[test]
    fn upstream_slow_is_flagged_and_breaches_carry_numbers() {
        let obs = Observed {
            p99_ms: Some(1000.0),
            upstream_p99_ms: Some(990.0),
            ..healthy(200.0, 4)
        };
        let none = History::default();
        let d = decide(&policy(), &obs, at(4), &none, Duration::ZERO);
        assert!(d.upstream_slow);
        assert_eq!(d.breach.unwrap().p99_ms, Some((1000.0, 500.0)));
        let d = decide(&policy(), &healthy(200.0, 4), at(4), &none, Duration::ZERO);
        assert!(!d.upstream_slow && d.breach.is_none() && d.metrics_available);
    }

    /// Runs the loop with 15 s evaluations and a fixed observation per
    /// tick; returns the replica count after each tick.
    fn run(
        p: &Policy,
        mut current: u32,
        ticks: u32,
        mut obs: impl FnMut(u32, u32) -> Observed,
    ) -> Vec<u32> {
        let mut h = History::default();
        (0..ticks)
            .map(|tick| {
                let now = tick * 15 * S;
                let d = decide(p, &obs(tick, current), at(current), &h, now);
                h.record(p, at(current), &d, now);
                current = d.desired;
                current
            })
            .collect()
    }

    /// Issue 14: `6 → 6 (Stable): qps=0.0 p99=n/a` for minutes.
    #[test]
    fn zero_traffic_with_fresh_series_scales_down_to_min_after_the_window() {
        let p = policy();
        let idle = |_, pods| Observed {
            qps: Some(0.0),
            requests: Some(0.0),
            p99_ms: None,
            own_p99_ms: None,
            error_rate: Some(0.0),
            inflight: Some(0.0),
            reporting: pods,
            ..Default::default()
        };
        let replicas = run(&p, 6, 60, idle);
        // Ticks 0..=19 are inside the first 300 s window.
        assert!(replicas[..20].iter().all(|r| *r == 6), "{replicas:?}");
        assert_eq!(*replicas.last().unwrap(), p.min, "{replicas:?}");
    }

    /// Issue 14: needed 5, reached 14 (1→3→7→11→14), new pods without
    /// series made the old pods' rate count for them too.
    #[test]
    fn new_pods_without_series_count_as_zero_load_no_cascade() {
        let p = Policy {
            max_scale_up_step: 2,
            ..policy()
        };
        // 250 requests/s need 5 replicas. Pods added by a step report no
        // series for one evaluation.
        let mut reporting_until = 1;
        let replicas = run(&p, 1, 12, |_, pods| {
            let r = reporting_until.min(pods);
            reporting_until = pods;
            Observed {
                reporting: r,
                ..healthy(250.0, r)
            }
        });
        let peak = *replicas.iter().max().unwrap();
        assert_eq!(peak, 5, "{replicas:?}");
        assert_eq!(*replicas.last().unwrap(), 5);
        // The exact case of the issue: 3 pods, 1 reporting.
        let d = decide(
            &policy(),
            &healthy(250.0, 1),
            at(3),
            &History::default(),
            Duration::ZERO,
        );
        assert_eq!((d.desired, d.reason), (5, Reason::Capacity));
    }

    /// After a scale-up the P99 of the window still holds the breach; no
    /// second SLO step until the window has passed.
    #[test]
    fn slo_steps_wait_one_rate_window_after_a_scale_up() {
        let p = policy();
        let breach = Observed {
            p99_ms: Some(900.0),
            own_p99_ms: Some(600.0),
            ..healthy(200.0, 4)
        };
        let mut h = History::default();
        let d = decide(&p, &breach, at(4), &h, 100 * S);
        assert_eq!((d.desired, d.reason), (8, Reason::LatencySlo));
        h.record(&p, at(4), &d, 100 * S);
        let d = decide(
            &p,
            &Observed {
                reporting: 8,
                ..breach.clone()
            },
            at(8),
            &h,
            115 * S,
        );
        assert_eq!((d.desired, d.reason), (8, Reason::Settling));
        // All 8 Ready at 115 s: the settle time runs from there.
        h.record(&p, at(8), &d, 115 * S);
        assert_eq!(h.last_scale_up, Some(115 * S));
        let still = Observed {
            reporting: 8,
            ..breach
        };
        let d = decide(&p, &still, at(8), &h, 185 * S);
        assert_eq!(d.reason, Reason::Settling, "70 s after Ready");
        let d = decide(&p, &still, at(8), &h, 195 * S);
        assert_eq!(d.reason, Reason::LatencySlo, "the window has passed");
    }

    /// Issue 14: a failing upstream scaled the forwarders to max (retries
    /// and backoff landed in "P99 minus upstream P99").
    #[test]
    fn a_failing_upstream_does_not_scale_up() {
        let p = policy();
        let failing = Observed {
            qps: Some(200.0),
            requests: Some(12000.0),
            p99_ms: Some(7000.0),
            upstream_p99_ms: Some(5.0),
            own_p99_ms: Some(2.0),
            error_rate: Some(1.0),
            // Requests sleeping in backoff are in flight.
            inflight: Some(4000.0),
            reporting: 4,
            ..Default::default()
        };
        let d = decide(&p, &failing, at(4), &History::default(), Duration::ZERO);
        assert_eq!((d.desired, d.reason), (4, Reason::Stable), "{d:?}");
        assert!(d.upstream_slow && d.breach.is_some());
        // Seen on the real API server: retried failures complete in bursts
        // above the offered rate (28/s for 20/s offered on one replica),
        // with no own time in the window (every request failed).
        let burst = Observed {
            qps: Some(27.9),
            requests: Some(110.0),
            p99_ms: Some(225.0),
            own_p99_ms: None,
            error_rate: Some(1.0),
            inflight: Some(0.0),
            reporting: 1,
            ..Default::default()
        };
        let small = Policy {
            min: 1,
            target_qps_per_replica: 25.0,
            min_samples: 20.0,
            ..policy()
        };
        let d = decide(&small, &burst, at(1), &History::default(), Duration::ZERO);
        assert_eq!(d.desired, 2, "capacity only, no SLO step: {d:?}");
        assert!(d.upstream_slow);
        // Without the own-time histogram (an older forwarder), in-flight
        // saturation still counts.
        let old = Observed {
            own_p99_ms: None,
            ..failing
        };
        let d = decide(&p, &old, at(4), &History::default(), Duration::ZERO);
        assert_eq!(d.reason, Reason::LatencySlo);
    }

    #[test]
    fn one_slow_request_at_low_qps_is_no_breach() {
        let p = policy();
        let sparse = Observed {
            qps: Some(0.5),
            requests: Some(30.0),
            p99_ms: Some(3000.0),
            own_p99_ms: Some(2900.0),
            ..healthy(0.5, 2)
        };
        let d = decide(&p, &sparse, at(2), &History::default(), Duration::ZERO);
        assert!(d.breach.is_none(), "{d:?}");
        assert_eq!(d.desired, 2);
        let dense = Observed {
            requests: Some(150.0),
            ..sparse
        };
        let d = decide(&p, &dense, at(2), &History::default(), Duration::ZERO);
        assert_eq!(d.reason, Reason::LatencySlo);
    }

    /// Issue 14: one pod that never gets ready blocked scale-up forever.
    #[test]
    fn the_ready_guard_is_bounded_in_time() {
        let p = policy();
        let r = Replicas {
            current: 3,
            ready: 2,
        };
        let h = History {
            not_ready_since: Some(10 * S),
            ..History::default()
        };
        let busy = healthy(300.0, 2);
        let d = decide(&p, &busy, r, &h, 200 * S);
        assert_eq!((d.desired, d.reason), (3, Reason::WaitingForReady));
        assert_eq!(d.not_ready_for, Some(190 * S));
        let d = decide(&p, &busy, r, &h, 311 * S);
        // 300 requests/s need 6 ready replicas; one is stuck beside them
        // (bounded by the step of 4).
        assert_eq!((d.desired, d.reason), (7, Reason::ReadyTimeout), "{d:?}");
        // A scale-up restarts the clock for the new pods.
        let mut h = h;
        h.record(&p, r, &d, 311 * S);
        assert_eq!(h.not_ready_since, Some(311 * S));
    }

    /// Issue 14: after a gap in evaluations (or a `kubectl scale` pin) the
    /// stabilization window was treated as covered.
    #[test]
    fn a_gap_in_the_history_does_not_cover_the_window() {
        let p = policy();
        let low = healthy(50.0, 6);
        let mut gap = steady(2, 0, 120);
        gap.extend(steady(2, 390, 400));
        let d = decide(&p, &low, at(6), &History::from(gap), 400 * S);
        assert_eq!(d.reason, Reason::Stabilizing, "{d:?}");
        // Younger than the window: not covered either.
        let young = History::from(steady(2, 0, 105));
        let d = decide(&p, &low, at(6), &young, 105 * S);
        assert_eq!(d.reason, Reason::Stabilizing, "{d:?}");
        // Dense and long enough: down.
        let d = decide(&p, &low, at(6), &History::from(steady(2, 90, 400)), 400 * S);
        assert_eq!(d.reason, Reason::ScaleDown);
        // A pin removed: the history is forgotten.
        let mut h = History::from(steady(2, 0, 400));
        h.forget();
        assert_eq!(h, History::default());
    }

    #[test]
    fn streams_are_judged_by_time_to_first_token_when_set() {
        let mut p = policy();
        // Streams last seconds (generation): request P99 far above 500 ms.
        let streaming = Observed {
            p99_ms: Some(9000.0),
            streams: Some(5000.0),
            ttft_p99_ms: Some(300.0),
            ..healthy(200.0, 4)
        };
        let d = decide(&p, &streaming, at(4), &History::default(), Duration::ZERO);
        assert!(
            d.breach.is_some_and(|b| b.p99_ms.is_some()),
            "no TTFT SLO: P99 judged"
        );
        p.ttft_slo_ms = Some(1000.0);
        let d = decide(&p, &streaming, at(4), &History::default(), Duration::ZERO);
        assert!(d.breach.is_none(), "TTFT within its SLO: {d:?}");
        let slow_first_token = Observed {
            ttft_p99_ms: Some(2500.0),
            own_p99_ms: Some(400.0),
            ..streaming
        };
        let d = decide(
            &p,
            &slow_first_token,
            at(4),
            &History::default(),
            Duration::ZERO,
        );
        assert_eq!(d.breach.unwrap().ttft_ms, Some((2500.0, 1000.0)));
        assert_eq!((d.desired, d.reason), (8, Reason::LatencySlo));
    }

    /// 10 workers per replica, jobs may wait 60 s.
    fn queue_policy() -> Policy {
        Policy {
            queue: Some(QueueSlo {
                max_delay_s: 60.0,
                workers_per_replica: 10.0,
                lag_includes_running: true,
            }),
            ..policy()
        }
    }

    /// Light request traffic (capacity alone wants 1 replica) with a queue:
    /// `backlog` jobs waiting, `arrivals` per second, runs of `run_s`; the
    /// lag also counts the jobs running (arrivals × run time, at most the
    /// pods' 10 workers each).
    fn jobs(backlog: f64, arrivals: f64, run_s: Option<f64>, pods: u32) -> Observed {
        let running = run_s.map_or(0.0, |t| (arrivals * t).min(10.0 * f64::from(pods)));
        Observed {
            backlog: Some(backlog + running),
            job_arrivals: Some(arrivals),
            jobs_finished: Some(arrivals),
            job_run_s: run_s,
            ..healthy(20.0, pods)
        }
    }

    #[test]
    fn queue_table() {
        let p = queue_policy();
        let long_low = steady(2, 0, 300);
        struct Case {
            name: &'static str,
            obs: Observed,
            r: Replicas,
            history: Vec<Recommendation>,
            desired: u32,
            reason: Reason,
            /// The queue breach's (estimated delay, SLO).
            breach: Option<(f64, f64)>,
        }
        let cases = vec![
            Case {
                // 20 jobs/s per replica (10 workers, 0.5 s runs): 4 run
                // 80/s, 50 arrive, 600 waiting drain in 20 s.
                name: "backlog drains within the SLO: no scale-up",
                obs: jobs(600.0, 50.0, Some(0.5), 4),
                r: at(4),
                history: vec![],
                desired: 4,
                reason: Reason::Stabilizing,
                breach: None,
            },
            Case {
                // 6000 waiting: (50 + 6000/60) / 20 = 7.5 → 8 replicas;
                // now they drain in 6000 / (80 - 50) = 200 s.
                name: "backlog beyond the SLO scales up, not QPS or P99",
                obs: jobs(6000.0, 50.0, Some(0.5), 4),
                r: at(4),
                history: vec![],
                desired: 8,
                reason: Reason::QueueDelay,
                breach: Some((200.0, 60.0)),
            },
            Case {
                name: "the step bounds a queue scale-up",
                obs: jobs(60000.0, 50.0, Some(0.5), 4),
                r: at(4),
                history: vec![],
                desired: 8,
                reason: Reason::QueueDelay,
                breach: Some((2000.0, 60.0)),
            },
            Case {
                name: "never above max",
                obs: jobs(1e12, 50.0, Some(0.5), 18),
                r: at(18),
                history: vec![],
                desired: 20,
                reason: Reason::QueueDelay,
                breach: Some((1e12 / 310.0, 60.0)),
            },
            Case {
                name: "arrivals beyond the workers' rate, empty queue: ahead of the backlog",
                obs: jobs(0.0, 120.0, Some(0.5), 4),
                r: at(4),
                history: vec![],
                desired: 6,
                reason: Reason::QueueDelay,
                breach: None,
            },
            Case {
                name: "inside the tolerance band the count stands",
                obs: jobs(0.0, 84.0, Some(0.5), 4),
                r: at(4),
                history: long_low.clone(),
                desired: 4,
                reason: Reason::Stable,
                breach: None,
            },
            Case {
                name: "a queue that outgrows the replicas is a breach",
                obs: jobs(100.0, 90.0, Some(0.5), 4),
                r: at(4),
                history: vec![],
                desired: 5,
                reason: Reason::QueueDelay,
                breach: Some((f64::INFINITY, 60.0)),
            },
            Case {
                name: "no run ended in the window: a replica's rate is unknown, hold",
                obs: Observed {
                    jobs_finished: Some(0.0),
                    ..jobs(5000.0, 10.0, None, 4)
                },
                r: at(4),
                history: long_low.clone(),
                desired: 4,
                reason: Reason::Stable,
                breach: None,
            },
            Case {
                // 40 finished/s over 4 pods: 10/s each; (40 + 1200/60) / 10.
                name: "without run times, the jobs finished per pod size a replica",
                obs: Observed {
                    jobs_finished: Some(40.0),
                    ..jobs(1200.0, 40.0, None, 4)
                },
                r: at(4),
                history: vec![],
                desired: 6,
                reason: Reason::QueueDelay,
                breach: Some((f64::INFINITY, 60.0)),
            },
            Case {
                name: "missing backlog series: hold, never down",
                obs: Observed {
                    backlog: None,
                    ..jobs(0.0, 0.0, Some(0.5), 4)
                },
                r: at(4),
                history: long_low.clone(),
                desired: 4,
                reason: Reason::Stable,
                breach: None,
            },
            Case {
                name: "NaN backlog is missing",
                obs: Observed {
                    backlog: Some(f64::NAN),
                    ..jobs(0.0, 0.0, Some(0.5), 4)
                },
                r: at(4),
                history: long_low.clone(),
                desired: 4,
                reason: Reason::Stable,
                breach: None,
            },
            Case {
                name: "an idle queue does not hold replicas",
                obs: Observed {
                    jobs_finished: Some(0.0),
                    ..jobs(0.0, 0.0, None, 4)
                },
                r: at(4),
                history: long_low.clone(),
                desired: 3,
                reason: Reason::ScaleDown,
                breach: None,
            },
            Case {
                name: "the queue keeps replicas capacity alone would remove",
                obs: jobs(0.0, 75.0, Some(0.5), 4),
                r: at(4),
                history: long_low.clone(),
                desired: 4,
                reason: Reason::Stable,
                breach: None,
            },
            Case {
                name: "QPS wanting more than the queue: capacity decides",
                obs: jobs(0.0, 50.0, Some(0.5), 4).with_qps(400.0),
                r: at(4),
                history: vec![],
                desired: 8,
                reason: Reason::Capacity,
                breach: None,
            },
        ];
        for c in cases {
            let h = History::from(c.history.clone());
            let d = decide(&p, &c.obs, c.r, &h, 300 * S);
            assert_eq!(
                (d.desired, d.reason),
                (c.desired, c.reason),
                "{}: {d:?}",
                c.name
            );
            assert_eq!(
                d.breach.and_then(|b| b.queue_delay_s),
                c.breach,
                "{}: {d:?}",
                c.name
            );
            assert!(!d.upstream_slow, "{}", c.name);
        }
    }

    impl Observed {
        fn with_qps(self, qps: f64) -> Self {
            Observed {
                qps: Some(qps),
                requests: Some(qps * 60.0),
                ..self
            }
        }
    }

    #[test]
    fn without_a_queue_slo_the_backlog_is_ignored() {
        let d = decide(
            &policy(),
            &jobs(1e6, 500.0, Some(0.5), 4),
            at(4),
            &History::default(),
            Duration::ZERO,
        );
        assert_eq!((d.desired, d.queue), (4, QueueNeed::Off));
        assert!(d.breach.is_none());
        let d = decide(
            &queue_policy(),
            &Observed::default(),
            at(4),
            &History::default(),
            Duration::ZERO,
        );
        assert_eq!((d.reason, d.queue), (Reason::NoData, QueueNeed::Missing));
    }

    /// The numbers at steady state: 10 workers, 40 s runs, jobs may
    /// wait 30 s, 3 replicas all busy, 0.75 jobs/s arriving; the lag is the
    /// 30 running jobs. The need is 3 and nothing is breached (it asked 7
    /// and reported a breach when the lag counted as waiting).
    #[test]
    fn a_busy_queue_with_nothing_waiting_keeps_its_replicas() {
        let p = Policy {
            queue: Some(QueueSlo {
                max_delay_s: 30.0,
                workers_per_replica: 10.0,
                lag_includes_running: true,
            }),
            ..policy()
        };
        let obs = Observed {
            backlog: Some(30.0),
            job_arrivals: Some(0.75),
            jobs_finished: Some(0.75),
            job_run_s: Some(40.0),
            ..healthy(20.0, 3)
        };
        let h = History::from(steady(3, 0, 300));
        let d = decide(&p, &obs, at(3), &h, 300 * S);
        assert_eq!((d.desired, d.reason), (3, Reason::Stable), "{d:?}");
        assert!(d.breach.is_none(), "{d:?}");
        assert!(
            matches!(d.queue, QueueNeed::Sized { replicas: 3, .. }),
            "{d:?}"
        );
    }

    /// Upstream 429s (an error-rate breach the forwarder does not cause)
    /// slow the runs to 120 s: workers / run time would ask for 3× the
    /// replicas; the queue holds instead, and never scales down either.
    #[test]
    fn a_queue_slowed_by_the_upstream_holds() {
        let p = Policy {
            queue: Some(QueueSlo {
                max_delay_s: 30.0,
                workers_per_replica: 10.0,
                lag_includes_running: true,
            }),
            ..policy()
        };
        let slowed = Observed {
            backlog: Some(300.0),
            job_arrivals: Some(0.75),
            jobs_finished: Some(0.25),
            job_run_s: Some(120.0),
            error_rate: Some(0.2),
            own_p99_ms: Some(1.0),
            ..healthy(20.0, 3)
        };
        let h = History::from(steady(3, 0, 300));
        let d = decide(&p, &slowed, at(3), &h, 300 * S);
        assert_eq!(d.desired, 3, "{d:?}");
        assert!(matches!(d.queue, QueueNeed::NotCredible { .. }), "{d:?}");
        // No errors, but runs three times the window's shortest.
        let mut h = History::from(steady(3, 0, 300));
        h.record_runs(&p, Some(40.0), 200 * S);
        let d = decide(
            &p,
            &Observed {
                error_rate: Some(0.0),
                ..slowed
            },
            at(3),
            &h,
            300 * S,
        );
        assert_eq!(d.desired, 3, "{d:?}");
        assert!(matches!(d.queue, QueueNeed::NotCredible { .. }), "{d:?}");
    }

    /// After a queue scale-up the lag is inflated by the rebalance's
    /// redeliveries: no second queue step until the settle time passed.
    #[test]
    fn a_queue_scale_up_settles_before_the_next() {
        let p = Policy {
            queue: Some(QueueSlo {
                max_delay_s: 30.0,
                workers_per_replica: 10.0,
                lag_includes_running: true,
            }),
            ..policy()
        };
        // 3 replicas, 90 waiting beyond the 30 running: 0.75 + 3 = 3.75
        // jobs/s → 15, bounded to 3 + 4 = 7.
        let surge = Observed {
            backlog: Some(120.0),
            job_arrivals: Some(0.75),
            jobs_finished: Some(0.75),
            job_run_s: Some(40.0),
            ..healthy(20.0, 3)
        };
        let mut h = History::default();
        let d = decide(&p, &surge, at(3), &h, 100 * S);
        assert_eq!((d.desired, d.reason), (7, Reason::QueueDelay), "{d:?}");
        h.record(&p, at(3), &d, 100 * S);
        h.record(&p, at(7), &decide(&p, &surge, at(7), &h, 115 * S), 115 * S);
        // All 7 Ready at 115 s; the lag still shows redelivered jobs.
        let inflated = Observed {
            reporting: 7,
            ..surge.clone()
        };
        let d = decide(&p, &inflated, at(7), &h, 150 * S);
        assert_eq!((d.desired, d.reason), (7, Reason::Settling), "{d:?}");
        // Settled (75 s after the replicas were Ready): the need counts.
        let d = decide(&p, &inflated, at(7), &h, 200 * S);
        assert_eq!((d.desired, d.reason), (11, Reason::QueueDelay), "{d:?}");
    }

    /// A fluid model of the queue: 100 jobs/s arrive, a replica runs 10/s
    /// (10 workers, 1 s runs), jobs may wait 60 s. From 2 replicas and an
    /// empty queue the loop reaches the need (10) without overshooting by
    /// more than a step, the backlog drains, and the count does not flap.
    #[test]
    fn a_job_surge_is_absorbed_and_drained_without_flapping() {
        let p = Policy {
            queue: Some(QueueSlo {
                max_delay_s: 60.0,
                workers_per_replica: 10.0,
                lag_includes_running: true,
            }),
            ..Policy::new(2, 30, 500.0, 0.01, 50.0, 300 * S, 4)
        };
        let (arrivals, rate) = (100.0, 10.0);
        let mut backlog: f64 = 0.0;
        let mut current = 2u32;
        let mut h = History::default();
        let mut counts = Vec::new();
        let mut peak_backlog: f64 = 0.0;
        for tick in 0..80u32 {
            let now = tick * 15 * S;
            let finished = (f64::from(current) * rate).min(arrivals + backlog / 15.0);
            let obs = Observed {
                // The lag: waiting and running (finished/s × 1 s runs).
                backlog: Some(backlog.round() + finished),
                job_arrivals: Some(arrivals),
                jobs_finished: Some(finished),
                job_run_s: Some(1.0),
                ..healthy(5.0, current)
            };
            let d = decide(&p, &obs, at(current), &h, now);
            h.record(&p, at(current), &d, now);
            current = d.desired;
            counts.push(current);
            backlog = (backlog + (arrivals - f64::from(current) * rate) * 15.0).max(0.0);
            peak_backlog = peak_backlog.max(backlog);
        }
        let peak = *counts.iter().max().unwrap();
        assert!((10..=14).contains(&peak), "{counts:?}");
        assert!(
            (10..=11).contains(counts.last().unwrap()),
            "settles at the need: {counts:?}"
        );
        assert_eq!(backlog, 0.0, "drained: {counts:?}");
        // Up only until the need is met, then at most a slow way down.
        let first_down = counts.windows(2).position(|w| w[1] < w[0]);
        if let Some(i) = first_down {
            assert!(
                counts[i + 1..].windows(2).all(|w| w[1] <= w[0]),
                "no reversal after coming down: {counts:?}"
            );
        }
        assert!(peak_backlog < 60.0 * arrivals, "{peak_backlog}");
    }

    #[test]
    fn prune_keeps_the_entry_that_covers_the_window() {
        let mut h: Vec<Recommendation> = (0..10)
            .map(|i| Recommendation {
                at: i * 100 * S,
                replicas: 3,
            })
            .collect();
        prune(&mut h, 300 * S, 900 * S);
        assert_eq!(h.first().unwrap().at, 600 * S);
        assert_eq!(h.len(), 4);
    }

    /// The bar users' autoscalers miss: a ±50% square wave with a 2-minute
    /// period must not make replicas reverse direction more than once per
    /// 10 minutes (15 s evaluations, the default 300 s stabilization).
    #[test]
    fn square_wave_load_reverses_at_most_once_per_ten_minutes() {
        let p = Policy::new(1, 50, 500.0, 0.01, 50.0, 300 * S, 4);
        let mut current = 10;
        let mut history = History::default();
        let mut last_dir = 0i8;
        let mut reversals = Vec::new();
        for tick in 0..(30 * 60 / 15) {
            let now = tick * 15 * S;
            let high = (now.as_secs() / 60).is_multiple_of(2);
            let qps = if high { 750.0 } else { 250.0 };
            let d = decide(&p, &healthy(qps, current), at(current), &history, now);
            history.record(&p, at(current), &d, now);
            if d.desired != current {
                let dir = if d.desired > current { 1 } else { -1 };
                if last_dir != 0 && dir != last_dir {
                    reversals.push(now);
                }
                last_dir = dir;
                current = d.desired;
            }
        }
        for w in reversals.windows(2) {
            assert!(w[1] - w[0] >= 600 * S, "reversals at {reversals:?}");
        }
        // Sized for the peaks, within the tolerance band.
        assert!(
            f64::from(current) * 50.0 * 1.1 >= 750.0,
            "{current} replicas"
        );
    }

    fn arb_obs() -> impl Strategy<Value = Observed> {
        (
            proptest::option::of(0.0..5000.0f64),
            proptest::option::of(1.0..5000.0f64),
            proptest::option::of(0.0..0.2f64),
            proptest::option::of(0.0..2000.0f64),
            1u32..30,
        )
            .prop_map(|(qps, p99, err, up, reporting)| Observed {
                qps,
                p99_ms: p99,
                error_rate: err,
                inflight: qps.map(|q| q * 0.1),
                upstream_p99_ms: up.zip(p99).map(|(u, p)| u.min(p)),
                own_p99_ms: up.zip(p99).map(|(u, p)| (p - u).max(0.0)),
                requests: qps.map(|q| q * 60.0),
                reporting,
                ..Default::default()
            })
    }

    /// The case issue 22 suspected `never_down_on_missing_data` rarely
    /// reaches: a trickle of traffic (0 < qps < 1.67/s, under the 100
    /// requests a P99 needs in a 60 s window), no P99, an error rate, every
    /// replica reporting (current ≥ 3). It does scale down, and is meant
    /// to: with fewer than `min_samples` requests a missing P99 is "too few
    /// samples", not missing data (rule 1: zero requests from fresh series
    /// is zero load). The property holds once the window has enough
    /// requests for a P99, or when a replica does not report.
    #[test]
    fn a_missing_p99_at_a_trickle_of_traffic_is_few_samples_not_missing_data() {
        let p = policy();
        let history = History::from(steady(2, 700, 1000));
        for qps in [0.01, 0.5, 1.0, 1.6, 1.66] {
            for error_rate in [0.0, 0.005] {
                for current in [3u32, 4, 7, 12, 20] {
                    let obs = Observed {
                        qps: Some(qps),
                        p99_ms: None,
                        error_rate: Some(error_rate),
                        inflight: Some(qps * 0.1),
                        requests: Some(qps * 60.0),
                        reporting: current,
                        ..Default::default()
                    };
                    let case = format!("qps {qps} error rate {error_rate} current {current}");
                    let d = decide(&p, &obs, at(current), &history, 1000 * S);
                    assert!(d.metrics_available, "{case}: {d:?}");
                    assert!(d.desired < current, "{case}: trickle scales down: {d:?}");
                    // The same P99 missing with enough requests: held.
                    let many = Observed {
                        requests: Some(p.min_samples),
                        ..obs.clone()
                    };
                    let d = decide(&p, &many, at(current), &history, 1000 * S);
                    assert!(d.desired >= current, "{case}, 100 requests: {d:?}");
                    // A replica not reporting: held.
                    let partial = Observed {
                        reporting: current - 1,
                        ..obs
                    };
                    let d = decide(&p, &partial, at(current), &history, 1000 * S);
                    assert!(d.desired >= current, "{case}, partial: {d:?}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn always_within_bounds(obs in arb_obs(), current in 0u32..40, ready in 0u32..40, min in 1u32..5, extra in 0u32..20) {
            let p = Policy::new(min, min + extra, 500.0, 0.01, 50.0, 60 * S, 4);
            let d = decide(&p, &obs, Replicas { current, ready }, &History::default(), 100 * S);
            prop_assert!(d.desired >= p.min && d.desired <= p.max);
        }

        #[test]
        fn never_down_on_missing_data(obs in arb_obs(), current in 2u32..20) {
            let p = policy();
            // Fewer requests than a P99 needs is "too few samples", not
            // missing data (see the trickle test above).
            prop_assume!(obs.requests.is_none_or(|n| n >= p.min_samples));
            let missing = Observed { p99_ms: None, ..obs };
            let history = History::from(steady(2, 700, 1000));
            let d = decide(&p, &missing, at(current), &history, 1000 * S);
            prop_assert!(d.desired >= current);
        }

        #[test]
        fn the_queue_never_scales_down_on_missing_queue_data(
            obs in arb_obs(),
            backlog in proptest::option::of(0.0..1e6f64),
            arrivals in proptest::option::of(0.0..1e4f64),
            current in 2u32..20,
        ) {
            let p = queue_policy();
            let missing = Observed {
                backlog: backlog.filter(|_| arrivals.is_none()),
                job_arrivals: arrivals.filter(|_| backlog.is_none()),
                job_run_s: Some(0.5),
                reporting: current,
                ..obs
            };
            let history = History::from(steady(2, 700, 1000));
            let d = decide(&p, &missing, at(current), &history, 1000 * S);
            prop_assert!(d.desired >= current.min(p.max), "{d:?}");
            prop_assert!(d.reason != Reason::QueueDelay, "{d:?}");
        }

        #[test]
        fn queue_need_is_monotone_in_backlog(b1 in 0.0..1e6f64, b2 in 0.0..1e6f64, arrivals in 0.0..500.0f64, current in 1u32..20) {
            let p = queue_policy();
            let (lo, hi) = if b1 <= b2 { (b1, b2) } else { (b2, b1) };
            let q = p.queue.unwrap();
            let need = |b| match crate::autoscale::queue::queue_need(&q, &crate::autoscale::queue::QueueObserved {
                lag: Some(b),
                arrivals: Some(arrivals),
                finished: Some(arrivals),
                run_s: Some(0.5),
                reporting: current,
                upstream_troubled: false,
            }, current, p.tolerance, None) {
                QueueNeed::Sized { replicas, .. } => replicas,
                other => panic!("{other:?}"),
            };
            prop_assert!(need(lo) <= need(hi));
        }

        #[test]
        fn monotone_in_load(q1 in 0.0..3000.0f64, q2 in 0.0..3000.0f64, current in 2u32..20) {
            let p = policy();
            let (lo, hi) = if q1 <= q2 { (q1, q2) } else { (q2, q1) };
            let history = History::from(steady(2, 700, 1000));
            let a = decide(&p, &healthy(lo, current), at(current), &history, 1000 * S);
            let b = decide(&p, &healthy(hi, current), at(current), &history, 1000 * S);
            prop_assert!(a.desired <= b.desired, "{a:?} vs {b:?}");
        }

        #[test]
        fn no_reversal_within_the_window_under_constant_input(qps in 0.0..2000.0f64, start in 2u32..20) {
            // Run the loop with constant metrics: once it moved one way, it
            // must not move the other way within the stabilization window.
            let p = policy();
            let mut current = start;
            let mut history = History::default();
            let mut moves: Vec<(Duration, i8)> = Vec::new();
            for tick in 0..120u32 {
                let now = tick * 15 * S;
                let d = decide(&p, &healthy(qps, current), at(current), &history, now);
                history.record(&p, at(current), &d, now);
                if d.desired != current {
                    moves.push((now, if d.desired > current { 1 } else { -1 }));
                    current = d.desired;
                }
            }
            for pair in moves.windows(2) {
                if pair[0].1 != pair[1].1 {
                    prop_assert!(pair[1].0 - pair[0].0 >= p.stabilization, "{moves:?}");
                }
            }
        }

        #[test]
        fn at_most_one_step_of_overshoot_while_pending(qps in 0.0..5000.0f64, current in 2u32..16, ready in 0u32..16) {
            let p = policy();
            let r = Replicas { current, ready: ready.min(current) };
            let d = decide(&p, &healthy(qps, r.ready.max(1)), r, &History::default(), Duration::ZERO);
            if r.ready < current {
                prop_assert!(d.desired <= current, "{d:?}");
            } else {
                prop_assert!(d.desired <= current + p.max_scale_up_step);
            }
        }
    }
}
