//! Delivers a finished job's result to its `callback_url`, signed per
//! Standard Webhooks, retried with exponential backoff and jitter; the
//! outcome is recorded in the job.
//!
//! The connection goes through [`Guarded`]: it resolves the host itself,
//! checks every address ([`super::webhook::checked_addresses`]), and
//! connects to a checked address by IP, so no second lookup can lead
//! elsewhere. Redirects are not followed (the client is hyper's, which
//! never follows them): a 3xx is an answer like any other non-2xx.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use forwarder_config::{CallbackConfig, CallbackNetwork};
use http::Uri;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::ServiceExt;

use super::metrics::JobMetrics;
use super::model::{DeliveryState, Job};
use super::records::Records;
use super::table::JobTable;
use super::webhook::{backoff, check_url, checked_addresses, host_port, Secrets, UrlError};
use crate::auth::Principal;
use crate::BuildError;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type HttpsClient = Client<hyper_rustls::HttpsConnector<Guarded>, Full<Bytes>>;

/// A connector that reaches only allowed addresses: the host is resolved
/// here, every address it resolves to is checked, and the TCP connection is
/// made to a checked address (an IP, so the inner connector looks nothing
/// up). A refusal is a [`UrlError::Target`] in the error's source chain.
#[derive(Clone)]
pub struct Guarded {
    inner: HttpConnector,
    networks: Arc<[CallbackNetwork]>,
}

impl Guarded {
    pub fn new(networks: &[CallbackNetwork], connect_timeout: Duration) -> Self {
        let mut inner = HttpConnector::new();
        inner.enforce_http(false);
        inner.set_connect_timeout(Some(connect_timeout));
        Self {
            inner,
            networks: networks.into(),
        }
    }
}

/// The addresses `uri`'s host stands for (an IP literal is its own).
async fn resolve(uri: &Uri) -> Result<Vec<SocketAddr>, BoxError> {
    let (host, port) = host_port(uri).ok_or("callback URL without a host")?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let found = tokio::net::lookup_host((host.as_str(), port)).await?;
    Ok(found.collect())
}

impl tower::Service<Uri> for Guarded {
    type Response = <HttpConnector as tower::Service<Uri>>::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (inner, networks) = (self.inner.clone(), self.networks.clone());
        Box::pin(async move {
            let resolved = resolve(&uri).await?;
            let checked = checked_addresses(&resolved, &networks)?;
            let mut last: BoxError = "no address to connect to".into();
            for addr in checked {
                let direct: Uri = format!("http://{addr}/").parse()?;
                match inner.clone().oneshot(direct).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => last = e.into(),
                }
            }
            Err(last)
        })
    }
}

/// Whether an error (or one of its sources) is a refused target.
fn is_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<UrlError>() == Some(&UrlError::Target) {
            return true;
        }
        cur = err.source();
    }
    false
}

pub struct Callbacks {
    cfg: CallbackConfig,
    secrets: Secrets,
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
        let secrets = Secrets::parse(&text, cfg.shared_secret_fallback)
            .map_err(|e| BuildError::new(format!("async.callbacks.secrets_file: {e}")))?;
        let http = Guarded::new(&cfg.allowed_networks, cfg.timeout);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::upstream::tls::system_roots().clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(Some(Self {
            cfg: cfg.clone(),
            secrets,
            client,
        }))
    }

    /// Whether `url` may be a job's callback (an allowed host, port and
    /// scheme; an IP literal an allowed address). A host name's addresses
    /// are checked at each delivery.
    pub fn check(&self, url: &str) -> Result<(), UrlError> {
        check_url(url, &self.cfg.allowed_hosts, &self.cfg.allowed_networks).map(|_| ())
    }

    /// Whether a callback for `client` can be signed: it (or its tier) has
    /// secrets of its own, or the shared ones stand in
    /// (`shared_secret_fallback`).
    pub fn signs_for(&self, client: &Principal) -> bool {
        self.secrets
            .for_client(&client.identity.0, client.tier.as_deref())
            .is_some()
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
            let outcome = self.attempt(&job, &url, &msg_id, &payload).await;
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
            if state != DeliveryState::Pending {
                // The settled state must be stored before the message is
                // acknowledged: acknowledged with the record still saying
                // `pending`, no replica would ever settle it.
                return save_settled(&records, &job, &stop).await;
            }
            if let Err(e) = records.save(&job).await {
                tracing::warn!(error = %e, "could not store a callback's progress");
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
    async fn attempt(
        &self,
        job: &Job,
        url: &str,
        msg_id: &str,
        payload: &Bytes,
    ) -> Result<(), String> {
        // Signed with the job owner's secrets only: another client's
        // receiver cannot be sent events it would verify.
        let signer = self
            .secrets
            .for_client(&job.owner.0, job.grants.tier.as_deref())
            .ok_or("no signing secret for this client")?;
        let uri = match check_url(url, &self.cfg.allowed_hosts, &self.cfg.allowed_networks) {
            Ok(t) => t.uri,
            Err(UrlError::Target) => return Err(UrlError::Target.to_string()),
            Err(e) => return Err(e.to_string()),
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let req = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signer.sign(msg_id, ts, payload))
            .body(Full::new(payload.clone()))
            .map_err(|e| format!("could not build the request: {e}"))?;
        match tokio::time::timeout(self.cfg.timeout, self.client.request(req)).await {
            Err(_) => Err("timed out".into()),
            // A refused target says only that, whatever the lookup found.
            Ok(Err(e)) if is_refused(&e) => Err(UrlError::Target.to_string()),
            Ok(Err(e)) => Err(format!("could not connect: {e}")),
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("receiver answered {}", resp.status().as_u16())),
        }
    }
}

/// Stores a settled callback's record, retrying with backoff until it is
/// stored (`true`) or the replica stops (`false`: the message stays
/// unacknowledged and the delivery is resumed elsewhere, at least once).
async fn save_settled(records: &Records, job: &Job, stop: &CancellationToken) -> bool {
    for attempt in 1u32.. {
        match records.save(job).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "could not store a settled callback; retrying")
            }
        }
        let wait = backoff(
            attempt,
            Duration::from_millis(100),
            Duration::from_secs(5),
            rand::random::<f64>(),
        );
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(wait) => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(networks: &[CallbackNetwork]) -> HttpsClient {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::upstream::tls::system_roots().clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(Guarded::new(networks, Duration::from_secs(2)));
        Client::builder(TokioExecutor::new()).build(https)
    }

    async fn post(c: &HttpsClient, url: &str) -> Result<u16, hyper_util::client::legacy::Error> {
        let req = http::Request::post(url)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), c.request(req))
            .await
            .expect("bounded")
            .map(|r| r.status().as_u16())
    }

    /// A receiver on loopback that counts what reaches it.
    async fn receiver() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new().fallback(move || {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { "ok" }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (port, hits)
    }

    #[tokio::test]
    async fn loopback_by_any_spelling_is_refused_at_connect_time() {
        let (port, hits) = receiver().await;
        let c = client(&[]);
        for host in [
            "localhost",
            "127.1",
            "2130706433",
            "0x7f000001",
            "127.0.0.1",
            "[::ffff:127.0.0.1]",
            "0.0.0.0",
        ] {
            let err = post(&c, &format!("http://{host}:{port}/hook"))
                .await
                .expect_err(host);
            assert!(is_refused(&err), "{host}: {err:?}");
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_allowed_network_and_port_is_reached() {
        let (port, hits) = receiver().await;
        // `localhost` may resolve to ::1 too: a name is refused unless every
        // address it resolves to is allowed.
        let allowed = ["127.0.0.0/8", "::1/128"].map(|n| CallbackNetwork {
            cidr: n.parse().unwrap(),
            ports: vec![port],
        });
        let c = client(&allowed);
        assert_eq!(
            post(&c, &format!("http://localhost:{port}/"))
                .await
                .unwrap(),
            200
        );
        assert_eq!(
            post(&c, &format!("http://127.0.0.1:{port}/"))
                .await
                .unwrap(),
            200
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Another port on the same address is not allowed.
        let (other, other_hits) = receiver().await;
        let err = post(&c, &format!("http://127.0.0.1:{other}/"))
            .await
            .unwrap_err();
        assert!(is_refused(&err), "{err:?}");
        assert_eq!(other_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
