//! Delivers a finished job's result to its `callback_url`, signed per
//! Standard Webhooks, retried with exponential backoff and jitter; the
//! outcome is recorded in the job.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use forwarder_config::CallbackConfig;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::metrics::JobMetrics;
use super::model::{DeliveryState, Job};
use super::records::Records;
use super::table::JobTable;
use super::webhook::{backoff, check_url, Signer};
use crate::BuildError;
use tokio_util::sync::CancellationToken;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct Callbacks {
    cfg: CallbackConfig,
    signer: Signer,
    client: HttpsClient,
}

impl Callbacks {
    /// `None` when no callback host is allowed (callbacks refused).
    pub fn from_config(cfg: &CallbackConfig) -> Result<Option<Self>, BuildError> {
        if cfg.allowed_hosts.is_empty() {
            return Ok(None);
        }
        let path = cfg
            .secrets_file
            .as_ref()
            .ok_or_else(|| BuildError::new("async.callbacks.secrets_file is required"))?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            BuildError::new(format!(
                "async.callbacks.secrets_file {}: {e}",
                path.display()
            ))
        })?;
        let signer = Signer::parse(&text)
            .map_err(|e| BuildError::new(format!("async.callbacks.secrets_file: {e}")))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::upstream::tls_config().clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(Some(Self {
            cfg: cfg.clone(),
            signer,
            client,
        }))
    }

    pub fn check(&self, url: &str) -> Result<(), String> {
        check_url(url, &self.cfg.allowed_hosts).map(|_| ())
    }

    /// Delivers `payload` for `job`, retrying until delivered or out of
    /// attempts, and records each attempt in the job's record. A delivery
    /// resumed elsewhere (after a crash) goes on from the attempts its
    /// record counts. `false`: stopped (the replica is shutting down)
    /// before the delivery settled.
    pub async fn deliver(
        self: Arc<Self>,
        mut job: Job,
        payload: Bytes,
        table: Arc<JobTable>,
        records: Arc<Records>,
        metrics: Arc<JobMetrics>,
        stop: CancellationToken,
    ) -> bool {
        let Some((url, done)) = job.callback.as_ref().map(|c| (c.url.clone(), c.attempts)) else {
            return true;
        };
        // One message id for every attempt, so receivers can de-duplicate.
        let msg_id = format!("msg_{}", job.id);
        for attempt in done.saturating_add(1)..=self.cfg.max_attempts {
            let outcome = self.attempt(&url, &msg_id, &payload).await;
            let last = attempt == self.cfg.max_attempts;
            let (state, label) = match &outcome {
                Ok(()) => (DeliveryState::Delivered, "delivered"),
                Err(_) if last => (DeliveryState::Failed, "failed"),
                Err(_) => (DeliveryState::Pending, "retried"),
            };
            metrics.callbacks.with_label_values(&[label]).inc();
            if let Some(c) = job.callback.as_mut() {
                c.attempts = attempt;
                c.state = state;
                c.last_error = outcome.as_ref().err().cloned();
            }
            table.put(&job);
            if let Err(e) = records.save(&job).await {
                tracing::warn!(error = %e, "could not store a callback's progress");
            }
            if state != DeliveryState::Pending {
                return true;
            }
            let wait = backoff(
                attempt,
                self.cfg.base_delay,
                self.cfg.max_delay,
                rand::random::<f64>(),
            );
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(wait) => {}
            }
        }
        true
    }

    /// One signed POST; a 2xx answer is a delivery.
    async fn attempt(&self, url: &str, msg_id: &str, payload: &Bytes) -> Result<(), String> {
        let uri = check_url(url, &self.cfg.allowed_hosts)?;
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let req = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", self.signer.sign(msg_id, ts, payload))
            .body(Full::new(payload.clone()))
            .map_err(|e| format!("could not build the request: {e}"))?;
        match tokio::time::timeout(self.cfg.timeout, self.client.request(req)).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(e)) => Err(format!("could not connect: {e}")),
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("receiver answered {}", resp.status().as_u16())),
        }
    }
}
