//! The operator's client bounds every request's wait for an answer, and a
//! watch (whose answer starts at once) outlives that bound.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use operator::telemetry::Metrics;

type Events =
    tokio::sync::mpsc::UnboundedReceiver<Result<watcher::Event<ConfigMap>, watcher::Error>>;

/// The next watch event within 10 s; a failed watch fails the test.
async fn next(events: &mut Events) -> watcher::Event<ConfigMap> {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event in time")
        .expect("stream open")
        .unwrap_or_else(|e| panic!("the watch failed: {e}"))
}

/// An "API server" on loopback that accepts connections and never answers.
#[tokio::test]
async fn a_request_to_an_api_server_that_never_answers_fails_within_the_bound() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let metrics = Metrics::new().unwrap();
    let client = operator::client::build(config, &metrics, Duration::from_secs(1)).unwrap();
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(20), client.apiserver_version())
        .await
        .expect("the client's own bound fires, not the test's");
    assert!(answer.is_err(), "{answer:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    held.abort();
}

#[tokio::test]
#[cfg_attr(
    not(envtest),
    ignore = "set KUBEBUILDER_ASSETS: needs a real kube-apiserver"
)]
async fn a_watch_outlives_the_request_bound() {
    let cp = envtest::control_plane();
    let admin = cp.client().await;
    let ns = cp.namespace(&admin, "client-timeout").await;
    let metrics = Metrics::new().unwrap();
    let client = operator::client::build(cp.config().await, &metrics, Duration::from_secs(1))
        .expect("client");
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    // The stream is polled all along (by its own task), so its watch is
    // open through 3 s (three bounds) of nothing before a change.
    let (tx, mut events): (_, Events) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        let mut stream = watcher(cms, watcher::Config::default()).boxed();
        while let Some(ev) = stream.next().await {
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    while !matches!(next(&mut events).await, watcher::Event::InitDone) {}
    tokio::time::sleep(Duration::from_secs(3)).await;
    let admin_cms: Api<ConfigMap> = Api::namespaced(admin, &ns);
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "late"},
        "data": {"k": "v"},
    }))
    .unwrap();
    admin_cms.create(&PostParams::default(), &cm).await.unwrap();
    loop {
        if let watcher::Event::Apply(cm) = next(&mut events).await {
            if cm.metadata.name.as_deref() == Some("late") {
                break;
            }
        }
    }
    pump.abort();
    // One watch served it: not cut and reopened in between.
    let text = metrics.render();
    let watches: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("api_requests") && l.contains(r#"method="watch""#))
        .collect();
    assert_eq!(watches.len(), 1, "{text}");
    assert!(watches[0].ends_with(" 1"), "{watches:?}");
}
