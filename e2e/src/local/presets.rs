//! The scenario the loop test asserts on and the demo plots (longer).

use std::time::Duration;

use operator::autoscale::policy::{Policy, QueueSlo};

use super::scenario::{Phase, PromState, Scenario};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

/// Each replica runs at most 4 requests at once against a 100 ms upstream:
/// about 40 requests/s of capacity. The SLO: P99 under 300 ms, 25
/// requests/s per replica (80 requests/s need 4 replicas), 12 s
/// stabilization; the policy's time knobs scaled to a 2 s interval and a
/// 4 s rate window (20 requests make a P99, 6 s ready timeout).
pub fn standard(stretch: u32) -> Scenario {
    let phase = |name, secs: u32, rps| Phase {
        name,
        duration: S * secs * stretch,
        rps,
        upstream_latency: MS * 100,
        upstream_errors: 0.0,
        prometheus: PromState::Up,
        stuck_pods: 0,
        jobs: false,
    };
    let mut policy = Policy::new(1, 6, 300.0, 0.05, 25.0, S * 12 * stretch, 2);
    policy.min_samples = 20.0;
    policy.ready_timeout = S * 6 * stretch;
    // The rate window plus an interval: requests that queued before a
    // scale-up still complete, slowly, a little after it.
    policy.settle = S * 6;
    policy.max_gap = S * 6;
    Scenario {
        policy,
        interval: S * 2,
        scrape: S,
        window: S * 4,
        max_concurrency: 4,
        async_workers: None,
        kafka: None,
        phases: vec![
            phase("baseline", 6, 10.0),
            phase("step-up", 24, 80.0),
            phase("idle", 26, 0.0),
            Phase {
                upstream_errors: 1.0,
                // Retried failures complete in bursts up to ~1.4× the
                // offered rate: 15/s stays under one replica's 27.5/s.
                ..phase("upstream-5xx", 10, 15.0)
            },
            // The first step's two new pods never get ready; the load wants
            // more than that step.
            Phase {
                stuck_pods: 2,
                ..phase("never-ready", 16, 100.0)
            },
            Phase {
                prometheus: PromState::Hung,
                ..phase("prometheus-hung", 6, 40.0)
            },
        ],
    }
}

/// The async queue as the signal (issue 12): each replica runs 2 jobs at
/// once against a 200 ms upstream, about 10 jobs/s; jobs may wait 4 s.
/// Submissions are cheap (a 202) and a job's run counts as a request of
/// the upstream's duration, so QPS (a target of 200 per replica) and P99
/// (1.5 s, far above the upstream's 200 ms even on a busy machine) never
/// ask for a second replica: only the queue does. 30 jobs/s need 3
/// replicas plus what drains the backlog.
pub fn queue() -> Scenario {
    let phase = |name, secs: u32, rps| Phase {
        name,
        duration: S * secs,
        rps,
        upstream_latency: MS * 200,
        upstream_errors: 0.0,
        prometheus: PromState::Up,
        stuck_pods: 0,
        jobs: true,
    };
    let mut policy = Policy::new(1, 6, 1500.0, 0.05, 200.0, S * 12, 2);
    policy.min_samples = 20.0;
    policy.ready_timeout = S * 6;
    policy.settle = S * 6;
    policy.max_gap = S * 6;
    policy.queue = Some(QueueSlo {
        max_delay_s: 4.0,
        workers_per_replica: 2.0,
        // The embedded queue's depth is its waiting jobs only.
        lag_includes_running: false,
    });
    Scenario {
        policy,
        interval: S * 2,
        scrape: S,
        window: S * 4,
        max_concurrency: 16,
        async_workers: Some(2),
        kafka: None,
        phases: vec![
            phase("jobs-baseline", 8, 4.0),
            phase("jobs-surge", 16, 30.0),
            phase("jobs-stop", 14, 0.0),
        ],
    }
}
