//! The assertions on a scenario's timeline, shared by the loop test on
//! local processes and the one through a real API server.

use operator::autoscale::policy::{Policy, Reason};

use super::scenario::Sample;

fn phase<'a>(samples: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    samples.iter().filter(|s| s.phase == name).collect()
}

/// Asserts the phases of `presets::standard` (issue 14): a load step
/// without overshoot, zero load back to min after the window, no scale-up
/// for a failing upstream, a bounded hold for a replica that never gets
/// ready, a hung Prometheus held and reported at once. Prints the figures.
pub fn issue14_phases(samples: &[Sample], policy: &Policy, interval: std::time::Duration) {
    let interval = interval.as_secs_f64();
    let stabilization = policy.stabilization.as_secs_f64();
    let ready_timeout = policy.ready_timeout.as_secs_f64();
    let per_replica = policy.target_qps_per_replica;
    let tolerance = policy.tolerance;
    let baseline = phase(samples, "baseline");
    assert!(
        baseline.iter().all(|s| s.replicas == 1),
        "no scaling at baseline"
    );

    // Load step: replicas rise quickly, no further than one replica past
    // the true need (new pods count as zero load, never extrapolated).
    let step = phase(samples, "step-up");
    let step_start = baseline.last().unwrap().t;
    // The fewest replicas the policy accepts for this load (its tolerance
    // band included).
    let need = (step[0].offered_rps / (per_replica * (1.0 + tolerance))).ceil() as u32;
    let first_up = step.iter().find(|s| s.replicas > 1).expect("replicas rose");
    let reaction = first_up.t - step_start;
    let peak = step.iter().map(|s| s.replicas).max().unwrap();
    crate::say(&format!(
        "reaction: first scale-up {reaction:.1}s after the load step; peak {peak} replicas for a need of {need}"
    ));
    // The step reaches Prometheus within a scrape plus the rate window;
    // the decision must follow within two evaluation intervals of that.
    assert!(
        reaction <= 1.0 + 4.0 + 2.0 * interval + 1.0,
        "reaction {reaction:.1}s"
    );
    assert!(peak <= need + 1, "overshoot: peak {peak}, need {need}");
    assert!(step.last().unwrap().replicas >= need, "sized for the load");
    // Recovered: three evaluations in a row with P99 under the SLO and no
    // errors once the new replicas were ready.
    let healthy = |s: &&Sample| {
        s.ready >= 3 && s.client_errors == 0 && s.client_p99_ms.is_some_and(|p| p < 300.0)
    };
    let recovered = step.windows(3).position(|w| w.iter().all(healthy));
    let recovered_at = recovered.map(|i| step[i].t - step_start);
    crate::say(&format!(
        "recovery: P99 under the SLO {recovered_at:?}s after the load step"
    ));
    assert!(
        recovered_at.is_some_and(|t| t < 20.0),
        "P99 never returned under the SLO: {step:?}"
    );

    // Zero load: nothing before the stabilization window, then down to
    // min (zero QPS from fresh series is data, not missing data).
    let idle = phase(samples, "idle");
    let drop_at = step.last().unwrap().t;
    let held = step.last().unwrap().replicas;
    let early: Vec<&&Sample> = idle
        .iter()
        .filter(|s| s.t - drop_at < stabilization)
        .collect();
    assert!(
        early.iter().all(|s| s.replicas >= held),
        "scaled down inside the window: {early:?}"
    );
    let at_min = idle.iter().find(|s| s.replicas == 1).map(|s| s.t - drop_at);
    crate::say(&format!(
        "scale-down: at min {at_min:?}s after the load stopped (stabilization {stabilization}s)"
    ));
    assert!(at_min.is_some(), "never back to min at zero load: {idle:?}");

    // The upstream answers 5xx only: an SLO breach, but not the
    // forwarder's; no scale-up.
    let failing = phase(samples, "upstream-5xx");
    assert!(
        failing.iter().all(|s| s.replicas <= 1),
        "scaled up for a failing upstream: {failing:?}"
    );
    assert!(
        failing.iter().any(|s| s.slo_breached && s.upstream_slow),
        "the breach was attributed to the upstream: {failing:?}"
    );

    // A replica that never gets ready holds scale-ups, for a bounded time.
    let stuck = phase(samples, "never-ready");
    let held_from = stuck
        .iter()
        .find(|s| s.reason == Reason::WaitingForReady)
        .expect("a scale-up was held for the unready replica")
        .t;
    let released = stuck
        .iter()
        .find(|s| s.reason == Reason::ReadyTimeout)
        .expect("the hold ended")
        .t;
    crate::say(&format!(
        "ready guard: held {:.1}s (timeout {ready_timeout}s)",
        released - held_from
    ));
    assert!(
        released - held_from <= ready_timeout + 2.0 * interval,
        "held {:.1}s",
        released - held_from
    );
    assert!(stuck.last().unwrap().ready >= 3, "{stuck:?}");

    // Prometheus accepts and never answers: every evaluation still ends
    // within the interval, says so from the first one, and holds.
    let hung = phase(samples, "prometheus-hung");
    let before = stuck.last().unwrap().replicas;
    assert!(!hung.is_empty());
    for s in &hung {
        assert!(
            s.replicas == before
                && !s.metrics_available
                && s.reason == Reason::NoData
                && s.metrics_error == Some("QueryTimeout")
                && s.eval_secs < interval,
            "{s:?}"
        );
    }
}

/// Asserts the phases of `presets::queue` (issue 12): no scaling at a
/// job rate one replica runs; a surge of jobs scales up on the queue
/// alone (reason `QueueDelay`, while QPS and P99 are within their SLO);
/// the backlog drains once the surge ends. Prints the figures.
pub fn queue_phases(
    samples: &[Sample],
    policy: &Policy,
    interval: std::time::Duration,
    expect_drained: bool,
) {
    let interval = interval.as_secs_f64();
    let baseline = phase(samples, "jobs-baseline");
    assert!(
        baseline.iter().all(|s| s.replicas == 1),
        "no scaling at a job rate one replica runs: {baseline:?}"
    );
    assert!(
        baseline.iter().any(|s| s.backlog.is_some()),
        "the backlog was read: {baseline:?}"
    );
    let surge = phase(samples, "jobs-surge");
    let start = baseline.last().unwrap().t;
    let first_up = surge
        .iter()
        .find(|s| s.replicas > 1)
        .unwrap_or_else(|| panic!("the queue scaled nothing up: {surge:?}"));
    let peak = surge.iter().map(|s| s.replicas).max().unwrap();
    let peak_backlog = samples.iter().filter_map(|s| s.backlog).fold(0.0, f64::max);
    crate::say(&format!(
        "queue: first scale-up {:.1}s after the surge ({}), peak {peak} replicas, peak backlog {peak_backlog:.0} jobs",
        first_up.t - start,
        first_up.explanation
    ));
    // Within a scrape, the rate window and two evaluations.
    assert!(
        first_up.t - start <= 1.0 + 4.0 + 2.0 * interval + 1.0,
        "reaction {:.1}s",
        first_up.t - start
    );
    assert!(peak >= 3, "30 jobs/s need 3 replicas of 10/s: {surge:?}");
    let mut before = 1;
    for s in samples {
        // Every scale-up came from the queue; QPS and P99 never asked.
        // (`Capacity` with an unchanged count is the capacity rule asking
        // for less than `min`.)
        if s.replicas > before {
            assert_eq!(s.reason, Reason::QueueDelay, "{s:?}");
        }
        before = s.replicas;
        assert!(
            !matches!(s.reason, Reason::LatencySlo | Reason::ErrorSlo),
            "{s:?}"
        );
        if s.request_slo_breached {
            crate::say(&format!(
                "note: a request SLO breach (not acted on: {:?}) at t={:.1}s",
                s.reason, s.t
            ));
        }
        let capacity = s.qps.unwrap_or(0.0) / policy.target_qps_per_replica;
        assert!(capacity <= 1.0, "QPS alone would need more: {s:?}");
    }
    assert!(
        surge
            .iter()
            .any(|s| s.reason == Reason::QueueDelay && s.queue_breached),
        "a QueueDelay scale-up on a breached queue SLO: {surge:?}"
    );
    // Jobs stop: the backlog drains (the replicas stay for the window).
    let stop = phase(samples, "jobs-stop");
    let last = stop.last().and_then(|s| s.backlog);
    crate::say(&format!("queue: backlog {last:?} at the end"));
    if expect_drained {
        assert_eq!(last, Some(0.0), "the backlog drained: {stop:?}");
    }
}
