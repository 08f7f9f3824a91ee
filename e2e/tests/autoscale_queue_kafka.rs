//! The queue signal on the Kafka queue (issue 12): the same surge as
//! `autoscale_queue`, but the forwarders share one consumer group on a
//! real Kafka-protocol broker (tansu), each pod a static member under its
//! own name as the operator renders it; `forwarder_queue_depth` is then the
//! consumer lag of each pod's partitions. Needs tansu (`TANSU_BIN`, set by
//! scripts/test.sh) and the Debian `prometheus` package; without tansu it
//! is reported as ignored.

use std::time::Duration;

use e2e::local::broker::Broker;
use e2e::local::scenario::{self, format_sample};
use e2e::local::{checks, presets};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kafka),
    ignore = "no Kafka-protocol broker: set TANSU_BIN (scripts/test.sh does)"
)]
async fn a_job_surge_on_kafka_scales_up_on_the_consumer_lag() {
    let Some(bin) = option_env!("TANSU_PATH") else {
        panic!("no broker: this test runs only when built with cfg(kafka)");
    };
    let broker = Broker::start(bin).await.expect("tansu starts");
    let mut s = presets::queue();
    s.kafka = Some(broker.addr.clone());
    // The first pod joins the consumer group (topic creation, the join)
    // before jobs arrive; otherwise the baseline's jobs pile up meanwhile.
    let mut join = s.phases[0].clone();
    (join.name, join.rps, join.duration) = ("kafka-join", 0.0, Duration::from_secs(8));
    s.phases.insert(0, join);
    // Every scale-up is a rebalance, and a rebalance stops the group's
    // consumption for a few seconds (4-6 s measured here): the drain gets
    // longer than on the embedded queue (24 s once ended with 34 jobs left
    // after two scale-ups during the drain, on the 2-core CI machine).
    if let Some(stop) = s.phases.iter_mut().find(|p| p.name == "jobs-stop") {
        stop.duration = Duration::from_secs(40);
    }
    let (policy, interval) = (s.policy.clone(), s.interval);
    let samples = scenario::run(s, |s| e2e::say(&format_sample(s)))
        .await
        .expect("scenario runs");
    // The lag gauge is read every 2 s whether or not a pod fetches, so the
    // drain shows as on the embedded queue.
    checks::queue_phases(&samples, &policy, interval, true);
    // With no arrivals the group's lag only falls. It once read 0 while a
    // rebalance had emptied each pod's assignment, then rose again: the
    // autoscaler saw an empty queue while the jobs waited. (From 4 s in:
    // the gauge and the scrape are up to 4 s behind the last arrival.)
    let stop: Vec<_> = samples.iter().filter(|s| s.phase == "jobs-stop").collect();
    let from = stop.first().map_or(0.0, |s| s.t) + 4.0;
    let stop: Vec<_> = stop.into_iter().filter(|s| s.t >= from).collect();
    if let Some(first_zero) = stop.iter().position(|s| s.backlog == Some(0.0)) {
        for s in &stop[first_zero..] {
            assert_eq!(
                s.backlog,
                Some(0.0),
                "the lag rose after it read 0: {stop:?}"
            );
        }
    }
}
