//! The metric → decision → scale loop, closed for real except for the
//! Kubernetes API: real Prometheus, real forwarder processes, real load.
//! Needs the Debian `prometheus` package (installed by scripts/test.sh).

use e2e::local::presets;
use e2e::local::scenario::{self, format_sample, Sample};
use operator::autoscale::policy::Reason;

fn phase<'a>(samples: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    samples.iter().filter(|s| s.phase == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_scales_on_saturation_not_on_a_slow_upstream_and_holds_without_metrics() {
    let s = presets::standard(1);
    let interval = s.interval.as_secs_f64();
    let stabilization = s.policy.stabilization.as_secs_f64();
    let samples = scenario::run(s, |s| e2e::say(&format_sample(s)))
        .await
        .expect("scenario runs");

    let baseline = phase(&samples, "baseline");
    assert!(
        baseline.iter().all(|s| s.replicas == 1),
        "no scaling at baseline"
    );

    // Step up: replicas rise quickly, then P99 returns under the SLO.
    let step = phase(&samples, "step-up");
    let step_start = baseline.last().unwrap().t;
    let first_up = step.iter().find(|s| s.replicas > 1).expect("replicas rose");
    let reaction = first_up.t - step_start;
    e2e::say(&format!(
        "reaction: first scale-up {reaction:.1}s after the load step"
    ));
    // The breach reaches Prometheus within a scrape plus the rate window;
    // the decision must follow within two evaluation intervals of that.
    assert!(
        reaction <= 1.0 + 4.0 + 2.0 * interval + 1.0,
        "reaction {reaction:.1}s"
    );
    assert!(
        step.last().unwrap().replicas >= 3,
        "enough replicas for 80 requests/s"
    );
    // Recovered: three evaluations in a row with P99 under the SLO and no
    // errors once the new replicas were ready (a single later blip from a
    // busy machine does not undo that).
    let healthy = |s: &&Sample| {
        s.ready >= 3 && s.client_errors == 0 && s.client_p99_ms.is_some_and(|p| p < 300.0)
    };
    let recovered = step.windows(3).position(|w| w.iter().all(healthy));
    let recovered_at = recovered.map(|i| step[i].t - step_start);
    e2e::say(&format!(
        "recovery: P99 under the SLO {recovered_at:?}s after the load step"
    ));
    assert!(
        recovered_at.is_some_and(|t| t < 20.0),
        "P99 never returned under the SLO: {step:?}"
    );
    let peak = step.iter().map(|s| s.replicas).max().unwrap();

    // Step down: nothing before the stabilization window, then down.
    let down = phase(&samples, "step-down");
    let drop_at = step.last().unwrap().t;
    let early: Vec<&&Sample> = down
        .iter()
        .filter(|s| s.t - drop_at < stabilization)
        .collect();
    assert!(
        early.iter().all(|s| s.replicas >= peak),
        "scaled down inside the window: {early:?}"
    );
    assert!(
        down.last().unwrap().replicas < peak,
        "replicas fell after the window"
    );

    // The upstream alone gets slow: no scale-up, UpstreamSlow raised.
    let slow = phase(&samples, "upstream-slow");
    let before = down.last().unwrap().replicas;
    assert!(
        slow.iter().all(|s| s.replicas <= before),
        "scaled up for a slow upstream"
    );
    assert!(
        slow.iter().any(|s| s.upstream_slow && s.slo_breached),
        "UpstreamSlow was raised"
    );

    // Prometheus stops: replicas held, metrics unavailable.
    let dark = phase(&samples, "prometheus-down");
    let held = slow.last().unwrap().replicas;
    assert!(dark
        .iter()
        .all(|s| s.replicas == held && !s.metrics_available && s.reason == Reason::NoData));
}
