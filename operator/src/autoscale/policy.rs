//! The autoscaler's decision, as a pure function of what it observed:
//! (metrics, policy, replicas, recent recommendations, now) → desired count
//! and the reason. No I/O here; `autoscale::run` feeds it and acts on it.
//!
//! The rules, in order:
//! 1. No data at all → hold (and say so); partial data never scales down.
//! 2. Capacity: enough replicas for the QPS target, ignoring changes inside a
//!    tolerance band so steady load never flaps.
//! 3. SLO: a P99 or error-rate breach adds replicas in proportion to the
//!    breach, but only when the forwarder is the bottleneck (saturated, or
//!    adding its own latency). When the upstream's latency explains the P99,
//!    more forwarders would not help: `UpstreamSlow`, no scaling.
//! 4. Up fast (bounded by the max step), but not again while replicas
//!    added earlier are not yet Ready (no 2→4→8→16 cascade).
//! 5. Down slowly: only to the highest recommendation of the whole
//!    stabilization window, by bounded steps.
//! 6. Always within [min, max].

use std::time::Duration;

/// What the spec asks for, in the policy's units.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    pub p99_slo_ms: f64,
    pub max_error_rate: f64,
    pub target_qps_per_replica: f64,
    pub stabilization: Duration,
    pub max_scale_up_step: u32,
    /// Relative band around the QPS target in which load changes are ignored.
    pub tolerance: f64,
    /// Share of the P99 budget the forwarder itself may add (P99 minus the
    /// upstream's P99) before it counts as the bottleneck.
    pub own_latency_share: f64,
    /// In-flight requests per replica beyond which a replica is saturated.
    pub max_inflight_per_replica: f64,
}

impl Policy {
    /// Defaults for the knobs the resource does not expose, with reasons:
    /// a 10% band is well above the noise of a 1-minute rate; the forwarder
    /// adds well under 1 ms, so a quarter of the budget means it is queueing;
    /// 512 in flight per replica is where a 2-core pod starts to queue.
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
            max_error_rate,
            target_qps_per_replica: target_qps,
            stabilization,
            max_scale_up_step,
            tolerance: 0.1,
            own_latency_share: 0.25,
            max_inflight_per_replica: 512.0,
        }
    }
}

/// Metrics for one resource, summed over its live pods (see `aggregate`).
/// `None` means "no data", never zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub qps: Option<f64>,
    pub p99_ms: Option<f64>,
    pub error_rate: Option<f64>,
    pub inflight: Option<f64>,
    pub upstream_p99_ms: Option<f64>,
    /// Live pods whose series were present.
    pub reporting: u32,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Nothing to change.
    Stable,
    /// More (or fewer) replicas for the QPS target.
    Capacity,
    /// A P99 breach with the forwarder as the bottleneck.
    LatencySlo,
    /// An error-rate breach with the forwarder as the bottleneck.
    ErrorSlo,
    /// Holding: replicas added earlier are not Ready yet.
    WaitingForReady,
    /// Lower load, but not for the whole stabilization window yet.
    Stabilizing,
    /// Lower load for the whole window: stepping down.
    ScaleDown,
    /// No metrics: holding the current count.
    NoData,
    /// The current count was outside [min, max].
    Bounds,
}

/// An SLO breach, with the numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Breach {
    pub p99_ms: Option<(f64, f64)>,
    pub error_rate: Option<(f64, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub reason: Reason,
    /// The recommendation before stabilization and the ready guard; the
    /// caller records it in the history.
    pub recommendation: u32,
    pub breach: Option<Breach>,
    /// The breach is explained by the upstream's own latency.
    pub upstream_slow: bool,
    pub metrics_available: bool,
}

fn clean(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite() && *x >= 0.0)
}

pub fn decide(
    p: &Policy,
    obs: &Observed,
    r: Replicas,
    history: &[Recommendation],
    now: Duration,
) -> Decision {
    let clamp = |n: u32| n.clamp(p.min, p.max.max(p.min));
    let current = r.current;
    let obs = Observed {
        qps: clean(obs.qps),
        p99_ms: clean(obs.p99_ms),
        error_rate: clean(obs.error_rate),
        inflight: clean(obs.inflight),
        upstream_p99_ms: clean(obs.upstream_p99_ms),
        reporting: obs.reporting,
    };
    let no_data = obs.qps.is_none() && obs.p99_ms.is_none() && obs.error_rate.is_none();
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
        };
    }

    // Pods without series: extrapolate the sums from those reporting, and
    // never scale down on such partial data.
    let serving = r.ready.max(1);
    let partial = obs.reporting < serving;
    let extrapolate = if partial {
        f64::from(serving) / f64::from(obs.reporting)
    } else {
        1.0
    };
    let qps = obs.qps.map(|q| q * extrapolate);
    let inflight = obs.inflight.map(|i| i * extrapolate);
    let base = current.max(1);

    // 2. Capacity, with a tolerance band.
    let capacity = qps.map(|q| {
        let ratio = q / (f64::from(base) * p.target_qps_per_replica);
        if (ratio - 1.0).abs() <= p.tolerance {
            current
        } else {
            (q / p.target_qps_per_replica).ceil() as u32
        }
    });

    // 3. SLO breaches and who causes them.
    let latency_breach = obs
        .p99_ms
        .filter(|v| *v > p.p99_slo_ms)
        .map(|v| (v, p.p99_slo_ms));
    let error_breach = obs
        .error_rate
        .filter(|v| *v > p.max_error_rate)
        .map(|v| (v, p.max_error_rate));
    let breach = (latency_breach.is_some() || error_breach.is_some()).then_some(Breach {
        p99_ms: latency_breach,
        error_rate: error_breach,
    });
    let saturated_qps = qps
        .is_some_and(|q| q / f64::from(serving) > p.target_qps_per_replica * (1.0 + p.tolerance));
    let saturated_inflight =
        inflight.is_some_and(|i| i / f64::from(serving) > p.max_inflight_per_replica);
    let own_latency = match (obs.p99_ms, obs.upstream_p99_ms) {
        (Some(total), Some(upstream)) => Some((total - upstream).max(0.0)),
        _ => None,
    };
    // Unknown upstream latency cannot clear the forwarder: assume it is the
    // bottleneck rather than ignore a breach.
    let adds_latency = own_latency.is_none_or(|own| own > p.own_latency_share * p.p99_slo_ms);
    let bottleneck = saturated_qps || saturated_inflight || adds_latency;
    let upstream_slow = latency_breach.is_some() && !bottleneck;
    let slo = breach.filter(|_| bottleneck).map(|b| {
        let factor = [
            b.p99_ms.map(|(v, slo)| v / slo),
            b.error_rate
                .map(|(v, max)| if max > 0.0 { v / max } else { 2.0 }),
        ]
        .into_iter()
        .flatten()
        .fold(1.0, f64::max);
        let step = (f64::from(base) * (factor - 1.0)).ceil().max(1.0) as u32;
        let reason = if latency_breach.is_some() {
            Reason::LatencySlo
        } else {
            Reason::ErrorSlo
        };
        (current + step.min(p.max_scale_up_step), reason)
    });

    // Combine: the highest demand wins; missing inputs only hold.
    let mut rec = capacity.unwrap_or(current);
    let mut reason = if rec == current {
        Reason::Stable
    } else {
        Reason::Capacity
    };
    if let Some((n, why)) = slo {
        if n > rec {
            rec = n;
            reason = why;
        }
    }
    let incomplete =
        partial || obs.qps.is_none() || obs.p99_ms.is_none() || obs.error_rate.is_none();
    if incomplete && rec < current {
        rec = current;
        reason = Reason::Stable;
    }
    if rec > current {
        rec = rec.min(current + p.max_scale_up_step);
    }
    let rec = clamp(rec);

    let (desired, reason) = if current < p.min || current > p.max {
        (clamp(rec.max(clamp(current))), Reason::Bounds)
    } else if rec > current {
        if r.ready < current {
            (current, Reason::WaitingForReady)
        } else {
            (rec, reason)
        }
    } else if rec < current {
        stabilize(p, rec, current, history, now)
    } else {
        (current, Reason::Stable)
    };
    Decision {
        desired: clamp(desired),
        reason,
        recommendation: rec,
        breach,
        upstream_slow,
        metrics_available: true,
    }
}

/// Scale down only to the highest recommendation seen over the whole
/// window (which must be covered by history, so a restarted operator does
/// not scale down on its first look), by at most a quarter per step.
fn stabilize(
    p: &Policy,
    rec: u32,
    current: u32,
    history: &[Recommendation],
    now: Duration,
) -> (u32, Reason) {
    let since = now.saturating_sub(p.stabilization);
    let covered = p.stabilization.is_zero() || history.iter().any(|h| h.at <= since);
    let highest = history
        .iter()
        .filter(|h| h.at >= since)
        .map(|h| h.replicas)
        .fold(rec, u32::max);
    if !covered || highest >= current {
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
            inflight: Some(qps * 0.2),
            upstream_p99_ms: Some(199.0),
            reporting: pods,
        }
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
        let long_low = [
            Recommendation {
                at: Duration::ZERO,
                replicas: 2,
            },
            Recommendation {
                at: 200 * S,
                replicas: 2,
            },
        ];
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
                name: "error breach while saturated",
                obs: Observed {
                    error_rate: Some(0.02),
                    ..healthy(240.0, 4)
                },
                r: at(4),
                history: vec![],
                desired: 8,
                reason: Reason::ErrorSlo,
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
                history: vec![
                    Recommendation {
                        at: Duration::ZERO,
                        replicas: 2,
                    },
                    Recommendation {
                        at: 250 * S,
                        replicas: 6,
                    },
                ],
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
                name: "one pod without series: extrapolated, no scale-down",
                obs: healthy(300.0, 3),
                r: at(4),
                history: vec![],
                desired: 8,
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
            let d = decide(&p, &c.obs, c.r, &c.history, 300 * S);
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
        let d = decide(&policy(), &obs, at(4), &[], Duration::ZERO);
        assert!(d.upstream_slow);
        assert_eq!(d.breach.unwrap().p99_ms, Some((1000.0, 500.0)));
        let d = decide(&policy(), &healthy(200.0, 4), at(4), &[], Duration::ZERO);
        assert!(!d.upstream_slow && d.breach.is_none() && d.metrics_available);
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
        let mut history = Vec::new();
        let mut last_dir = 0i8;
        let mut reversals = Vec::new();
        for tick in 0..(30 * 60 / 15) {
            let now = tick * 15 * S;
            let high = (now.as_secs() / 60).is_multiple_of(2);
            let qps = if high { 750.0 } else { 250.0 };
            let d = decide(&p, &healthy(qps, current), at(current), &history, now);
            history.push(Recommendation {
                at: now,
                replicas: d.recommendation,
            });
            prune(&mut history, p.stabilization, now);
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
                reporting,
            })
    }

    proptest! {
        #[test]
        fn always_within_bounds(obs in arb_obs(), current in 0u32..40, ready in 0u32..40, min in 1u32..5, extra in 0u32..20) {
            let p = Policy::new(min, min + extra, 500.0, 0.01, 50.0, 60 * S, 4);
            let d = decide(&p, &obs, Replicas { current, ready }, &[], 100 * S);
            prop_assert!(d.desired >= p.min && d.desired <= p.max);
        }

        #[test]
        fn never_down_on_missing_data(obs in arb_obs(), current in 2u32..20) {
            let p = policy();
            let missing = Observed { p99_ms: None, ..obs };
            let history = [Recommendation { at: Duration::ZERO, replicas: 2 }];
            let d = decide(&p, &missing, at(current), &history, 1000 * S);
            prop_assert!(d.desired >= current);
        }

        #[test]
        fn monotone_in_load(q1 in 0.0..3000.0f64, q2 in 0.0..3000.0f64, current in 2u32..20) {
            let p = policy();
            let (lo, hi) = if q1 <= q2 { (q1, q2) } else { (q2, q1) };
            let history = [Recommendation { at: Duration::ZERO, replicas: 2 }];
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
            let mut history = Vec::new();
            let mut moves: Vec<(Duration, i8)> = Vec::new();
            for tick in 0..120u32 {
                let now = tick * 15 * S;
                let d = decide(&p, &healthy(qps, current), at(current), &history, now);
                history.push(Recommendation { at: now, replicas: d.recommendation });
                prune(&mut history, p.stabilization, now);
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
            let d = decide(&p, &healthy(qps, r.ready.max(1)), r, &[], Duration::ZERO);
            if r.ready < current {
                prop_assert!(d.desired <= current, "{d:?}");
            } else {
                prop_assert!(d.desired <= current + p.max_scale_up_step);
            }
        }
    }
}
