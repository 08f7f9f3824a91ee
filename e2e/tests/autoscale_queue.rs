//! The async queue as a scaling signal (issue 12), closed for real except
//! for the Kubernetes API: a real Prometheus scrapes real forwarder
//! processes whose embedded queues take a surge of async jobs; the
//! operator's autoscaler reads the backlog, the arrivals and the run
//! times and scales on the queue alone (QPS and P99 stay within their
//! SLO). Needs the Debian `prometheus` package (installed by
//! scripts/test.sh). Its own test binary, so it never shares the machine
//! with the other loop tests.

use e2e::local::scenario::{self, format_sample};
use e2e::local::{checks, presets};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_surge_scales_up_on_the_queue_not_on_qps_or_p99_and_drains() {
    let s = presets::queue();
    let (policy, interval) = (s.policy.clone(), s.interval);
    let samples = scenario::run(s, |s| e2e::say(&format_sample(s)))
        .await
        .expect("scenario runs");
    checks::queue_phases(&samples, &policy, interval, true);
}
