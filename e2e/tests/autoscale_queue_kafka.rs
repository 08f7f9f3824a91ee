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
    // A rebalance redelivers what a moved partition had not committed, so
    // the lag can rise again after the jobs stop: the drain gets longer
    // here than on the embedded queue (14 s once ended with 6 jobs left,
    // on a loaded machine).
    if let Some(stop) = s.phases.iter_mut().find(|p| p.name == "jobs-stop") {
        stop.duration = Duration::from_secs(24);
    }
    let (policy, interval) = (s.policy.clone(), s.interval);
    let samples = scenario::run(s, |s| e2e::say(&format_sample(s)))
        .await
        .expect("scenario runs");
    // The lag gauge is read every 2 s whether or not a pod fetches, so the
    // drain shows as on the embedded queue.
    checks::queue_phases(&samples, &policy, interval, true);
}
