//! The attempt loop: pick an endpoint, call it under a timeout, and on a
//! safe failure back off and try again (failing over to another endpoint
//! when there is one), all within the request's deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use tokio::time::{Instant, Sleep};

use crate::api::{ApiError, ChatChunk, ChatRequest, ChatResponse};
use crate::telemetry::Metrics;
use crate::upstream::providers::ChunkStream;
use crate::upstream::retry::{full_jitter, next_delay};
use crate::upstream::{Endpoint, Lease, PickError, Pools, UpstreamError};
use forwarder_config::RetryConfig;

/// Where a request went: for the access log.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub upstream: Option<String>,
    pub attempts: u32,
}

/// A stream of answer chunks as the client sees it; an `Err` is the last item.
pub type ReplyStream = futures::stream::BoxStream<'static, Result<ChatChunk, ApiError>>;

pub struct Forwarder {
    pub pools: Pools,
    pub retry: RetryConfig,
    pub metrics: Arc<Metrics>,
}

impl Forwarder {
    pub async fn complete(
        &self,
        chat: &ChatRequest,
        deadline: Instant,
        trace: &mut Trace,
    ) -> Result<ChatResponse, ApiError> {
        let (resp, lease, started) = self
            .attempts(chat, deadline, trace, |ep| async move {
                ep.provider.complete(chat).await
            })
            .await?;
        self.record(&lease.endpoint.name, &chat.model, "success", started);
        lease.succeeded();
        Ok(resp)
    }

    /// Opens a stream. Retries happen only until the first chunk has arrived:
    /// after that, bytes have reached the client and a retry could duplicate them.
    pub async fn stream(
        &self,
        chat: &ChatRequest,
        deadline: Instant,
        trace: &mut Trace,
    ) -> Result<ReplyStream, ApiError> {
        let ((first, rest), lease, started) = self
            .attempts(chat, deadline, trace, |ep| async move {
                let mut s = ep.provider.stream(chat).await?;
                match s.next().await {
                    Some(Ok(first)) => Ok((first, s)),
                    Some(Err(e)) => Err(e),
                    None => Err(UpstreamError::Protocol(
                        "stream ended before any chunk".into(),
                    )),
                }
            })
            .await?;
        let idle = lease.endpoint.timeout;
        Ok(UpstreamStream {
            first: Some(first),
            inner: rest,
            lease: Some(lease),
            idle,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            started,
            model: chat.model.clone(),
            metrics: self.metrics.clone(),
        }
        .boxed())
    }

    async fn attempts<'a, T, F, Fut>(
        &self,
        chat: &'a ChatRequest,
        deadline: Instant,
        trace: &mut Trace,
        mut call: F,
    ) -> Result<(T, Lease, Instant), ApiError>
    where
        F: FnMut(Arc<Endpoint>) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>> + 'a,
    {
        let model = &chat.model;
        let mut tried: Vec<usize> = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let lease = match self.pools.pick(model, &tried) {
                Ok(lease) => lease,
                Err(PickError::UnknownModel) => return Err(ApiError::ModelNotFound(model.clone())),
                Err(PickError::AllOpen { retry_in }) => {
                    return Err(ApiError::NoHealthyUpstream {
                        model: model.clone(),
                        retry_after: retry_in,
                    })
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(ApiError::GatewayTimeout(
                    "the request deadline passed".into(),
                ));
            }
            let limit = lease.endpoint.timeout.min(deadline - now);
            trace.attempts = attempt;
            trace.upstream = Some(lease.endpoint.name.clone());
            let err = match tokio::time::timeout(limit, call(lease.endpoint.clone())).await {
                Ok(Ok(value)) => return Ok((value, lease, now)),
                Ok(Err(e)) => e,
                Err(_) => UpstreamError::Timeout,
            };
            let name = lease.endpoint.name.clone();
            self.record(&name, model, err.label(), now);
            tracing::debug!(upstream = %name, attempt, error = %err, "upstream attempt failed");
            tried.push(lease.index);
            lease.failed(&err);
            if !err.retryable() || attempt >= self.retry.max_attempts {
                return Err(to_api_error(&err));
            }
            let failover = self.pools.has_untried(model, &tried);
            let jitter = full_jitter(
                attempt,
                self.retry.base_delay,
                self.retry.max_delay,
                rand::random::<f64>(),
            );
            let delay = next_delay(jitter, err.retry_after(), !failover);
            if Instant::now() + delay >= deadline {
                // Waiting would outlive the request: answer with what we know.
                return Err(to_api_error(&err));
            }
            self.metrics
                .retries
                .with_label_values(&[&name, err.label()])
                .inc();
            tokio::time::sleep(delay).await;
        }
    }

    fn record(&self, upstream: &str, model: &str, outcome: &str, started: Instant) {
        record(&self.metrics, upstream, model, outcome, started);
    }
}

fn record(metrics: &Metrics, upstream: &str, model: &str, outcome: &str, started: Instant) {
    metrics
        .upstream_requests
        .with_label_values(&[upstream, model, outcome])
        .inc();
    metrics
        .upstream_duration
        .with_label_values(&[upstream, model])
        .observe(started.elapsed().as_secs_f64());
}

/// What the client is told when the upstream failed for good. Upstream
/// internals (addresses, bodies of 5xx) are not passed on.
pub fn to_api_error(err: &UpstreamError) -> ApiError {
    match err {
        UpstreamError::Timeout => {
            ApiError::GatewayTimeout("the upstream did not answer in time".into())
        }
        UpstreamError::Connect(_) => {
            ApiError::BadGateway("could not connect to the upstream".into())
        }
        UpstreamError::Protocol(_) => {
            ApiError::BadGateway("the upstream connection failed or sent malformed data".into())
        }
        UpstreamError::Status {
            status: 429,
            retry_after,
            ..
        } => ApiError::RateLimited {
            retry_after: *retry_after,
        },
        UpstreamError::Status {
            status: 401 | 403, ..
        } => ApiError::BadGateway("the upstream rejected the forwarder's credentials".into()),
        UpstreamError::Status { status, .. } if *status >= 500 => {
            ApiError::BadGateway(format!("the upstream answered {status}"))
        }
        UpstreamError::Status {
            status, message, ..
        } => ApiError::UpstreamRejected {
            status: *status,
            message: message.clone(),
        },
    }
}

/// An upstream stream after its first chunk: enforces the idle timeout
/// between chunks and the overall deadline, and settles the endpoint's lease
/// (breaker, in-flight count, metrics) when it ends, fails or is dropped.
struct UpstreamStream {
    first: Option<ChatChunk>,
    inner: ChunkStream,
    lease: Option<Lease>,
    idle: Duration,
    deadline: Instant,
    timer: Pin<Box<Sleep>>,
    started: Instant,
    model: String,
    metrics: Arc<Metrics>,
}

impl UpstreamStream {
    fn rearm(&mut self) {
        let at = (Instant::now() + self.idle).min(self.deadline);
        self.timer.as_mut().reset(at);
    }

    fn settle(&mut self, outcome: Result<(), &UpstreamError>) {
        if let Some(lease) = self.lease.take() {
            let label = outcome.err().map_or("success", UpstreamError::label);
            record(
                &self.metrics,
                &lease.endpoint.name,
                &self.model,
                label,
                self.started,
            );
            match outcome {
                Ok(()) => lease.succeeded(),
                Err(e) => lease.failed(e),
            }
        }
    }
}

impl Stream for UpstreamStream {
    type Item = Result<ChatChunk, ApiError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            this.rearm();
            return Poll::Ready(Some(Ok(first)));
        }
        if this.lease.is_none() {
            return Poll::Ready(None);
        }
        match this.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.rearm();
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(None) => {
                this.settle(Ok(()));
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.settle(Err(&e));
                Poll::Ready(Some(Err(ApiError::BadGateway(
                    "the upstream stream broke off".into(),
                ))))
            }
            Poll::Pending => {
                if this.timer.poll_unpin(cx).is_ready() {
                    this.settle(Err(&UpstreamError::Timeout));
                    return Poll::Ready(Some(Err(ApiError::GatewayTimeout(
                        "the upstream stream stalled".into(),
                    ))));
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        // The client went away mid-stream: not the endpoint's fault.
        if let Some(lease) = self.lease.take() {
            record(
                &self.metrics,
                &lease.endpoint.name,
                &self.model,
                "cancelled",
                self.started,
            );
        }
    }
}
