//! `operator`: reconciles ModelForwarder resources into running forwarders.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use kube::runtime::events::{Recorder, Reporter};
use operator::autoscale::alerts;
use operator::autoscale::run::Autoscaler;
use operator::autoscale::Prometheus;
use operator::leader::{Election, LeaderConfig};
use operator::reconcile::Context;
use operator::telemetry::{self, Metrics};
use tracing_subscriber::EnvFilter;

/// The ModelForwarder operator. Uses the current kubeconfig context, or the
/// in-cluster service account.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Watch only these namespaces (comma-separated, or the flag
    /// repeated); default: all namespaces.
    #[arg(long = "namespace", env = "WATCH_NAMESPACE", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Forwarder image for resources without `spec.pod.image`.
    #[arg(long, env = "FORWARDER_IMAGE", default_value = operator::DEFAULT_FORWARDER_IMAGE)]
    forwarder_image: String,
    /// Prometheus base URL; setting it turns the SLO autoscaler on.
    #[arg(long, env = "PROMETHEUS_URL")]
    prometheus_url: Option<String>,
    /// How often each resource is evaluated (an alert on `POST /alerts`
    /// evaluates at once). Default: one typical 15 s scrape interval.
    #[arg(long, env = "AUTOSCALE_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    autoscale_interval: std::time::Duration,
    /// PromQL rate window: four scrapes, so one missed scrape never empties it.
    #[arg(long, env = "AUTOSCALE_RATE_WINDOW", default_value = "1m", value_parser = humantime::parse_duration)]
    rate_window: std::time::Duration,
    /// Bound on each Prometheus query: a Prometheus that accepts and never
    /// answers then reads as unavailable within one interval.
    #[arg(long, env = "PROMETHEUS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    prometheus_timeout: std::time::Duration,
    /// Series older than this are stale: three scrapes.
    #[arg(long, env = "AUTOSCALE_MAX_SAMPLE_AGE", default_value = "45s", value_parser = humantime::parse_duration)]
    max_sample_age: std::time::Duration,
    /// Create a PrometheusRule with each resource's SLO alerts (needs the
    /// prometheus-operator CRDs and RBAC on prometheusrules).
    #[arg(long, env = "PROMETHEUS_RULES", default_value_t = false, action = clap::ArgAction::Set)]
    prometheus_rules: bool,
    /// File holding the bearer token callers of `POST /alerts` must send
    /// (mount it from a Secret; Alertmanager:
    /// `http_config.authorization.credentials_file`). Read at each call.
    /// Unset: the webhook refuses every call.
    #[arg(long, env = "ALERT_TOKEN_FILE")]
    alert_token_file: Option<std::path::PathBuf>,
    /// Address of `/metrics`, `/healthz` and the alert webhook `/alerts`.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Compete for a Lease before acting (disable only for a single replica).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "modelforwarder-operator")]
    lease_name: String,
    /// Namespace of the Lease; default: the client's namespace (in-cluster:
    /// the operator's own).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the election and in Events; default: the
    /// host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Bound on the wait for each API server answer (a watch's answer
    /// starts at once, so watches are not cut).
    #[arg(long, env = "API_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    api_timeout: std::time::Duration,
    /// Log as JSON lines (default) or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_format == "text" {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    }

    let metrics = Metrics::new().context("creating metrics")?;
    // Alerts queue evaluations; a small bound, since one per resource suffices.
    let (trigger, triggered) = tokio::sync::mpsc::channel(64);
    let shared = Arc::new(metrics.clone());
    let auth = match &args.alert_token_file {
        Some(path) => alerts::Auth::TokenFile(path.clone()),
        None => {
            tracing::warn!("no --alert-token-file: POST /alerts refuses every call");
            alerts::Auth::Disabled
        }
    };
    let app = telemetry::router(shared.clone()).merge(alerts::router(trigger, shared, auth));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("listening on {}", args.metrics_addr))?;
    tracing::info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /alerts");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let config = kube::Config::infer()
        .await
        .context("reading the Kubernetes configuration (kubeconfig or in-cluster)")?;
    let client = operator::client::build(config, &metrics, args.api_timeout)
        .context("building the Kubernetes client")?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("operator-{}", std::process::id()));
    let prometheus = match &args.prometheus_url {
        Some(url) => Some(
            prometheus_http_query::Client::try_from(url.as_str())
                .with_context(|| format!("--prometheus-url {url}"))?,
        ),
        None => {
            tracing::warn!(
                "no --prometheus-url: the autoscaler is off; replicas stay within [min, max]"
            );
            None
        }
    };

    let mut election = None;
    if args.leader_election {
        let cfg = LeaderConfig::new(
            args.lease_name.clone(),
            args.lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string()),
            identity.clone(),
        );
        tracing::info!(lease = %cfg.lease_name, namespace = %cfg.namespace, %identity, "waiting for the leader lease");
        let mut e = Election::start(client.clone(), &cfg)
            .await
            .context("starting leader election")?;
        e.acquired().await.context("acquiring the leader lease")?;
        tracing::info!("acquired the leader lease");
        election = Some(e);
    }
    metrics.leader.set(1);

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "modelforwarder-operator".into(),
            instance: Some(identity),
        },
    );
    let ctx = Context::new(
        client.clone(),
        recorder.clone(),
        args.forwarder_image.clone(),
        metrics.clone(),
    );
    // Only the leader autoscales, like it reconciles.
    let autoscaler = prometheus.map(|p| {
        let scaler = Autoscaler {
            client: client.clone(),
            namespaces: args.namespaces.clone(),
            recorder,
            metrics: metrics.clone(),
            // Two query rounds (freshness, then the rest at once) must fit
            // in one interval.
            source: Arc::new(Prometheus::new(
                p,
                args.prometheus_timeout.min(args.autoscale_interval / 3),
            )),
            interval: args.autoscale_interval,
            window: args.rate_window,
            max_age: args.max_sample_age,
            prometheus_rules: args.prometheus_rules,
            handover: election.as_ref().and_then(Election::handover),
        };
        tracing::info!(interval = ?args.autoscale_interval, "starting the autoscaler");
        tokio::spawn(scaler.run(triggered))
    });
    tracing::info!(namespaces = ?args.namespaces, image = %args.forwarder_image, "starting the controller");
    let controller = operator::controller::run_all(client, args.namespaces.clone(), ctx);

    match election {
        Some(mut e) => {
            tokio::select! {
                () = controller => {
                    // Stop acting first, then let the standby lead at once.
                    if let Some(a) = &autoscaler {
                        a.abort();
                    }
                    metrics.leader.set(0);
                    tracing::info!("controller stopped; releasing the lease");
                    e.release().await.context("releasing the leader lease")?;
                }
                lost = e.lost() => {
                    // Exit at once: a new leader may be acting as soon as
                    // the lease expires.
                    tracing::error!(error = %lost, "leadership lost; exiting");
                    std::process::exit(1);
                }
            }
        }
        None => controller.await,
    }
    server.abort();
    if let Some(a) = autoscaler {
        a.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let a = Args::try_parse_from(["operator"]).expect("defaults parse");
        assert!(a.namespaces.is_empty(), "all namespaces by default");
        assert_eq!(a.forwarder_image, operator::DEFAULT_FORWARDER_IMAGE);
        assert!(a.leader_election);
        assert_eq!(a.metrics_addr.to_string(), "0.0.0.0:8080");

        let a = Args::try_parse_from([
            "operator",
            "--namespace",
            "ai",
            "--forwarder-image",
            "registry.local/fwd:dev",
            "--prometheus-url",
            "http://prometheus:9090",
            "--leader-election",
            "false",
        ])
        .expect("flags parse");
        assert_eq!(a.namespaces, ["ai"]);
        assert_eq!(a.forwarder_image, "registry.local/fwd:dev");
        assert_eq!(a.prometheus_url.as_deref(), Some("http://prometheus:9090"));
        assert!(!a.leader_election);

        let a = Args::try_parse_from(["operator", "--namespace=ai,ml", "--namespace", "ops"])
            .expect("a list");
        assert_eq!(a.namespaces, ["ai", "ml", "ops"]);
    }

    #[test]
    fn default_image_is_versioned() {
        assert!(operator::DEFAULT_FORWARDER_IMAGE.starts_with("ghcr.io/modelforwarder/forwarder:"));
        assert!(operator::DEFAULT_FORWARDER_IMAGE.ends_with(env!("CARGO_PKG_VERSION")));
    }
}
