//! The metric → decision → scale loop, closed for real except for the
//! Kubernetes API: real Prometheus, real forwarder processes, real load.
//! Needs the Debian `prometheus` package (installed by scripts/test.sh).
//! Where a real API server is available (envtest), `autoscale_fleet` runs
//! the same phases through it instead, within the same time budget.
//!
//! Phases (issue 14): a load step (no overshoot beyond one step of the
//! true need), zero load (back to min after the window), an upstream
//! answering 100% 5xx (no scale-up), a replica that never gets ready
//! (bounded hold), a hung Prometheus (held, condition within one interval).

use e2e::local::scenario::{self, format_sample};
use e2e::local::{checks, presets};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    envtest,
    ignore = "the same phases run through a real API server in autoscale_fleet"
)]
async fn the_loop_scales_on_load_not_on_a_failing_upstream_and_holds_bounded() {
    let s = presets::standard(1);
    let (policy, interval) = (s.policy.clone(), s.interval);
    let samples = scenario::run(s, |s| e2e::say(&format_sample(s)))
        .await
        .expect("scenario runs");
    checks::issue14_phases(&samples, &policy, interval);
}
