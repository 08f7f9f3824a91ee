//! The operator's Kubernetes client: every request counted
//! ([`CountRequests`]) and bounded in time.
//!
//! The bound is on the wait for the answer's head, not its body: a watch
//! answers its head at once and then streams for minutes, so watches are
//! unaffected, while a request to an API server that accepted the
//! connection and never answers fails after `request_timeout` (kube's own
//! default read timeout is 295 s, sized for watches). Every API call of the
//! reconciler, the autoscaler, the election and the Events is bounded this
//! way, on top of each operation's own bound.

use std::time::Duration;

use kube::Client;

use crate::telemetry::{CountRequests, Metrics};

/// Default bound on the wait for an API server's answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the client from a configuration (kubeconfig or in-cluster).
pub fn build(
    config: kube::Config,
    metrics: &Metrics,
    request_timeout: Duration,
) -> Result<Client, kube::Error> {
    let counter = metrics.api_requests.clone();
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::timeout::TimeoutLayer::new(request_timeout))
        .with_layer(&tower::layer::layer_fn(move |inner| CountRequests {
            inner,
            counter: counter.clone(),
        }))
        .build())
}
