//! The scenario the loop test asserts on and the demo plots (longer).

use std::time::Duration;

use operator::autoscale::policy::Policy;

use super::scenario::{Phase, Scenario};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

/// Each replica runs at most 4 requests at once against a 100 ms upstream:
/// about 40 requests/s of capacity. The SLO: P99 under 300 ms, 25
/// requests/s per replica, 12 s stabilization.
pub fn standard(stretch: u32) -> Scenario {
    let phase = |name, secs: u32, rps, latency_ms: u64, up| Phase {
        name,
        duration: S * secs * stretch,
        rps,
        upstream_latency: MS * latency_ms as u32,
        prometheus_up: up,
    };
    Scenario {
        policy: Policy::new(1, 4, 300.0, 0.05, 25.0, S * 12 * stretch, 2),
        interval: S * 2,
        scrape: S,
        window: S * 4,
        max_concurrency: 4,
        phases: vec![
            phase("baseline", 10, 10.0, 100, true),
            phase("step-up", 30, 80.0, 100, true),
            phase("step-down", 28, 10.0, 100, true),
            phase("upstream-slow", 14, 4.0, 600, true),
            phase("prometheus-down", 8, 4.0, 100, false),
        ],
    }
}
