//! The attempt loop: pick an endpoint, call it under a timeout, and on a
//! safe failure back off and try again (failing over to another endpoint
//! when there is one), all within the request's deadline. Streams are
//! relayed event by event and judged complete only by their terminal event.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use tokio::time::{Instant, Sleep};

use super::envelope::{Envelope, Reply, ReplyBody};
use super::kind::{ApiKind, Terminal};
use crate::api::ApiError;
use crate::sse;
use crate::telemetry::traces::{AttemptSpan, Parent};
use crate::telemetry::Metrics;
use crate::upstream::aliases::{falls_back, order, with_model, Alias, Aliases};
use crate::upstream::providers::RawEvents;
use crate::upstream::retry::{attempt_budget, fits_before, full_jitter, next_delay_capped};
use crate::upstream::{Endpoint, Lease, PickError, Pools, UpstreamError};
use forwarder_config::RetryConfig;

/// Where a request went: for the access log and the forwarder's own-time metric.
#[derive(Clone, Default)]
pub struct Trace {
    /// The request's span, when traces are on: each attempt gets a child.
    pub otel: Option<Parent>,
    pub upstream: Option<String>,
    pub attempts: u32,
    /// Time spent in upstream attempts and backoff until the answer began
    /// (the whole answer for a completion, the first event for a stream).
    pub upstream_time: Duration,
    /// The model that answered, when the client named an alias.
    pub served_model: Option<String>,
}

pub struct Forwarder {
    pub pools: Pools,
    pub aliases: Aliases,
    pub retry: RetryConfig,
    pub metrics: Arc<Metrics>,
}

/// The response header naming the model that answered an alias.
pub const FORWARDED_MODEL: &str = "x-forwarded-model";

impl Forwarder {
    /// Whether `model` is served, or an alias of served models.
    pub fn knows(&self, model: &str) -> bool {
        self.pools.has_model(model) || self.aliases.get(model).is_some()
    }

    /// Whether some upstream of `model` (of one of its targets, for an
    /// alias) speaks `api`.
    pub fn serves(&self, model: &str, api: ApiKind) -> bool {
        match self.aliases.get(model) {
            Some(a) => a.targets.iter().any(|(t, _)| self.pools.serves(t, api)),
            None => self.pools.serves(model, api),
        }
    }

    /// Served models and aliases, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut m = self.pools.models();
        m.extend(self.aliases.names().cloned());
        m.sort();
        m
    }

    pub async fn complete(&self, env: &Envelope, trace: &mut Trace) -> Result<Reply, ApiError> {
        let Some(alias) = self.aliases.get(&env.model) else {
            return self.complete_one(env, trace).await;
        };
        let mut last = None;
        for target in self.targets(alias, env) {
            let one = target_envelope(alias, env, &target)?;
            match self.complete_one(&one, trace).await {
                Ok(reply) => return Ok(served(reply, trace, target)),
                Err(e) if falls_back(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ApiError::ModelNotFound(env.model.clone())))
    }

    /// As [`Forwarder::complete`]; a target's stream that fails before its
    /// first event falls back, one that has begun never does.
    pub async fn stream(&self, env: &Envelope, trace: &mut Trace) -> Result<Reply, ApiError> {
        let Some(alias) = self.aliases.get(&env.model) else {
            return self.stream_one(env, trace).await;
        };
        let mut last = None;
        for target in self.targets(alias, env) {
            let one = target_envelope(alias, env, &target)?;
            match self.stream_one(&one, trace).await {
                Ok(reply) => return Ok(served(reply, trace, target)),
                Err(e) if falls_back(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ApiError::ModelNotFound(env.model.clone())))
    }

    /// An alias's targets that speak the request's API, in the order they
    /// are tried.
    fn targets(&self, alias: &Alias, env: &Envelope) -> Vec<String> {
        let weights: Vec<u32> = alias.targets.iter().map(|(_, w)| *w).collect();
        order(&weights, rand::random::<f64>())
            .into_iter()
            .map(|i| &alias.targets[i].0)
            .filter(|t| self.pools.serves(t, env.api))
            .cloned()
            .collect()
    }

    async fn complete_one(&self, env: &Envelope, trace: &mut Trace) -> Result<Reply, ApiError> {
        let (done, lease, started) = self
            .attempts(env, trace, |ep, limit| async move {
                match tokio::time::timeout(limit, ep.provider.complete(env)).await {
                    Ok(result) => result,
                    Err(_) => Err(UpstreamError::Timeout),
                }
            })
            .await?;
        self.record(&lease.endpoint.name, &env.model, "success", started);
        lease.succeeded();
        Ok(Reply {
            headers: done.headers,
            body: ReplyBody::Complete(done.body),
        })
    }

    /// Opens a stream. Retries happen only until its first data event has
    /// arrived: after that, bytes reach the client and a retry could
    /// duplicate them. Keep-alive comments before it count as liveness.
    async fn stream_one(&self, env: &Envelope, trace: &mut Trace) -> Result<Reply, ApiError> {
        let ((headers, first, rest), lease, started) = self
            .attempts(env, trace, |ep, limit| async move {
                let opened = match tokio::time::timeout(limit, ep.provider.stream(env)).await {
                    Ok(opened) => opened?,
                    Err(_) => return Err(UpstreamError::Timeout),
                };
                let mut events = opened.events;
                let first = first_data_event(&mut events, ep.timeout, env.ctx.deadline).await?;
                Ok((opened.headers, first, events))
            })
            .await?;
        // A half-open probe whose stream has begun has proved the endpoint.
        let mut lease = lease;
        lease.confirm();
        let idle = lease.endpoint.timeout;
        let deadline = env.ctx.deadline;
        let stream = UpstreamStream {
            first: Some(first),
            inner: rest,
            lease: Some(lease),
            finished: false,
            idle,
            deadline,
            last_event: Instant::now(),
            timer: Box::pin(tokio::time::sleep_until(
                Instant::now()
                    .checked_add(idle)
                    .map_or(deadline, |t| t.min(deadline)),
            )),
            timer_waker: None,
            started,
            model: env.model.clone(),
            api: env.api,
            metrics: self.metrics.clone(),
        };
        Ok(Reply {
            headers,
            body: ReplyBody::Stream(stream.boxed()),
        })
    }

    async fn attempts<'a, T, F, Fut>(
        &self,
        env: &'a Envelope,
        trace: &mut Trace,
        mut call: F,
    ) -> Result<(T, Lease, Instant), ApiError>
    where
        F: FnMut(Arc<Endpoint>, Duration) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>> + 'a,
    {
        let model = &env.model;
        let deadline = env.ctx.deadline;
        let began = Instant::now();
        let mut tried: Vec<usize> = Vec::new();
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let lease = match self.pools.pick_for(model, env.api, &tried) {
                Ok(lease) => lease,
                Err(PickError::UnknownModel) => {
                    break Err(ApiError::ModelNotFound(model.clone()));
                }
                Err(PickError::AllOpen { retry_in }) => {
                    break Err(ApiError::NoHealthyUpstream {
                        model: model.clone(),
                        retry_after: retry_in,
                    })
                }
            };
            let now = Instant::now();
            if now >= deadline {
                break Err(ApiError::GatewayTimeout(
                    "the request deadline passed".into(),
                ));
            }
            let budget = attempt_budget(lease.endpoint.timeout, deadline - now);
            trace.attempts = attempt;
            trace.upstream = Some(lease.endpoint.name.clone());
            let span = trace
                .otel
                .as_ref()
                .map(|p| AttemptSpan::start(p, &lease.endpoint.name, model, env.api, attempt));
            let err = match call(lease.endpoint.clone(), budget.limit).await {
                Ok(value) => {
                    if let Some(span) = span {
                        span.succeeded();
                    }
                    break Ok((value, lease, now));
                }
                Err(e) => e,
            };
            if let Some(span) = span {
                let status = match &err {
                    UpstreamError::Status { status, .. } => Some(*status),
                    _ => None,
                };
                span.failed(err.label(), status);
            }
            let name = lease.endpoint.name.clone();
            self.record(&name, model, err.label(), now);
            tracing::debug!(upstream = %name, attempt, error = %err, "upstream attempt failed");
            tried.push(lease.index);
            if matches!(err, UpstreamError::Timeout) && budget.by_deadline {
                // Cut short by the request's own deadline, not the endpoint's
                // fault: neutral for the breaker.
                lease.neutral();
            } else {
                lease.failed(&err);
            }
            let retryable = err.retryable()
                || (self.retry.after_answer_began && matches!(err, UpstreamError::Answered(_)));
            if !retryable || attempt >= self.retry.max_attempts {
                break Err(to_api_error(&err));
            }
            let failover = self.pools.has_untried_for(model, env.api, &tried);
            let jitter = full_jitter(
                attempt,
                self.retry.base_delay,
                self.retry.max_delay,
                rand::random::<f64>(),
            );
            let delay =
                next_delay_capped(jitter, err.retry_after(), !failover, self.retry.max_delay);
            if !fits_before(Instant::now(), delay, deadline) {
                // Waiting would outlive the request: answer with what we know.
                break Err(to_api_error(&err));
            }
            self.metrics
                .retries
                .with_label_values(&[&name, err.label()])
                .inc();
            tokio::time::sleep(delay).await;
        };
        trace.upstream_time = began.elapsed();
        result
    }

    fn record(&self, upstream: &str, model: &str, outcome: &str, started: Instant) {
        record(&self.metrics, upstream, model, outcome, started);
    }
}

/// The request as sent to one target of an alias: its model, and the
/// body's `model` rewritten when the alias says so.
fn target_envelope(alias: &Alias, env: &Envelope, target: &str) -> Result<Envelope, ApiError> {
    let mut one = env.clone();
    one.model = target.to_string();
    if alias.rewrite_model {
        one.body = with_model(&env.body, target)?;
    }
    Ok(one)
}

/// Marks an answer with the model that served it.
fn served(mut reply: Reply, trace: &mut Trace, target: String) -> Reply {
    if let Ok(v) = http::HeaderValue::from_str(&target) {
        reply.headers.insert(FORWARDED_MODEL, v);
    }
    trace.served_model = Some(target);
    reply
}

/// Reads runs of events until one carries data; comments before it are
/// keep-alives that restart the idle timer.
async fn first_data_event(
    events: &mut RawEvents,
    idle: Duration,
    deadline: Instant,
) -> Result<Bytes, UpstreamError> {
    loop {
        let until = Instant::now()
            .checked_add(idle)
            .map_or(deadline, |t| t.min(deadline));
        match tokio::time::timeout_at(until, events.next()).await {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(None) => {
                return Err(UpstreamError::Protocol(
                    "stream ended before any event".into(),
                ))
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(Some(Ok(event))) if !sse::has_data(&event) => continue,
            Ok(Some(Ok(event))) => return Ok(event),
        }
    }
}

fn record(metrics: &Metrics, upstream: &str, model: &str, outcome: &str, started: Instant) {
    if outcome == "success" {
        if let Some(series) = metrics.upstream_series(upstream, model) {
            series.success.inc();
            series.duration.observe(started.elapsed().as_secs_f64());
            return;
        }
    }
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
/// internals (addresses, bodies of 5xx) are not passed on; a 4xx body is,
/// as the upstream sent it.
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
        UpstreamError::Answered(_) => {
            ApiError::BadGateway("the upstream's answer was cut off or malformed".into())
        }
        UpstreamError::TooLarge(limit) => ApiError::BadGateway(format!(
            "the upstream's answer exceeds the limit of {limit} bytes"
        )),
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
        UpstreamError::Status { status, .. } if *status >= 500 || *status < 400 => {
            ApiError::BadGateway(format!("the upstream answered {status}"))
        }
        UpstreamError::Status { status, body, .. } => ApiError::UpstreamRejected {
            status: *status,
            body: body.clone(),
        },
    }
}

/// An upstream stream after its first data event: relays runs of whole
/// events verbatim, as the adapter yields them,
/// enforces the idle timeout between events and the overall deadline,
/// judges the end by the API's terminal event (chat completions: `[DONE]`,
/// or a `finish_reason` from an upstream that sends no `[DONE]`; Messages:
/// `message_stop`; Responses: `response.completed`, `.incomplete` or
/// `.failed`), and settles the endpoint's lease
/// (breaker, in-flight count, metrics) when it ends, fails or is dropped.
struct UpstreamStream {
    first: Option<Bytes>,
    inner: RawEvents,
    lease: Option<Lease>,
    /// A choice has finished: an end without `[DONE]` is still complete.
    finished: bool,
    idle: Duration,
    deadline: Instant,
    last_event: Instant,
    timer: Pin<Box<Sleep>>,
    /// The waker the timer was last polled with: while it is the task's,
    /// the timer need not be polled again until it has fired.
    timer_waker: Option<std::task::Waker>,
    started: Instant,
    model: String,
    api: ApiKind,
    metrics: Arc<Metrics>,
}

/// Whether `event` ends a complete stream of `api` (pure).
pub(super) fn is_terminal(api: ApiKind, event: &[u8], info: &sse::EventInfo) -> bool {
    match api.terminal() {
        Terminal::Done => info.done,
        Terminal::Named(names) => {
            sse::event_type(event).is_some_and(|t| names.iter().any(|n| n.as_bytes() == t))
        }
    }
}

/// Whether a run of whole events holds the terminal event of `api`, and
/// whether a choice finished in it (pure). Chat completions are read with
/// one scan over the raw bytes; APIs with named terminal events are read
/// event by event (as slices, nothing copied).
pub(super) fn chunk_ends(api: ApiKind, chunk: &[u8]) -> (bool, bool) {
    match api.terminal() {
        Terminal::Done => sse::chunk_ends(chunk),
        Terminal::Named(_) => {
            let ends = sse::events(chunk).any(|e| is_terminal(api, e, &sse::EventInfo::default()));
            (ends, false)
        }
    }
}

impl UpstreamStream {
    /// Notes an event. The timer is not moved per event (that costs a
    /// timer-wheel update per token); when it fires, it is pushed to the
    /// idle limit after the last event instead, if that is still ahead.
    fn rearm(&mut self) {
        self.last_event = Instant::now();
    }

    /// Whether the stream has really stalled (or passed its deadline) now
    /// that the timer fired; otherwise re-arms it.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        // Polling the timer once per event costs a timer-wheel look-up per
        // token: only when it fired or the task's waker changed.
        let registered = self
            .timer_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if registered && !self.timer.is_elapsed() {
            return false;
        }
        self.timer_waker = Some(cx.waker().clone());
        loop {
            if self.timer.poll_unpin(cx).is_pending() {
                return false;
            }
            let at = self
                .last_event
                .checked_add(self.idle)
                .map_or(self.deadline, |t| t.min(self.deadline));
            if at <= Instant::now() {
                return true;
            }
            self.timer.as_mut().reset(at);
        }
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
                // The request's deadline is not the endpoint's fault.
                Err(UpstreamError::Timeout) if Instant::now() >= self.deadline => lease.neutral(),
                Err(e) => lease.failed(e),
            }
        }
    }

    /// Passes a run of upstream events on, noting what it says.
    fn relay(&mut self, events: Bytes) -> Poll<Option<Result<Bytes, ApiError>>> {
        self.rearm();
        let (ends, finished) = chunk_ends(self.api, &events);
        if ends {
            self.settle(Ok(()));
        }
        // Only chat completions have a terminal event a server may omit.
        self.finished |= finished;
        Poll::Ready(Some(Ok(events)))
    }
}

impl Stream for UpstreamStream {
    type Item = Result<Bytes, ApiError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return this.relay(first);
        }
        if this.lease.is_none() {
            return Poll::Ready(None);
        }
        match this.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(event))) => this.relay(event),
            Poll::Ready(None) if this.finished => {
                // Every choice finished but the upstream sends no `[DONE]`:
                // complete; clients still get the terminal event they expect.
                this.settle(Ok(()));
                Poll::Ready(Some(Ok(Bytes::from_static(sse::DONE_EVENT))))
            }
            Poll::Ready(None) => {
                this.settle(Err(&UpstreamError::Protocol(
                    "stream ended before its terminal event".into(),
                )));
                Poll::Ready(Some(Err(ApiError::BadGateway(
                    "the upstream stream ended before it was complete".into(),
                ))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.settle(Err(&e));
                Poll::Ready(Some(Err(match e {
                    UpstreamError::TooLarge(_) => to_api_error(&e),
                    _ => ApiError::BadGateway("the upstream stream broke off".into()),
                })))
            }
            Poll::Pending => {
                if this.stalled(cx) {
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

#[cfg(test)]
mod terminal_tests {
    use super::*;

    #[test]
    fn each_api_ends_on_its_own_terminal_event() {
        let cases: &[(ApiKind, &[u8], bool)] = &[
            (ApiKind::ChatCompletions, b"data: [DONE]\n\n", true),
            (
                ApiKind::ChatCompletions,
                b"event: message_stop\ndata: {}\n\n",
                false,
            ),
            (
                ApiKind::Messages,
                b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
                true,
            ),
            (
                ApiKind::Messages,
                b"event: message_delta\ndata: {\"type\":\"message_delta\"}\n\n",
                false,
            ),
            (ApiKind::Messages, b"data: [DONE]\n\n", false),
            (
                ApiKind::Messages,
                b"event: error\ndata: {\"type\":\"error\"}\n\n",
                false,
            ),
            (
                ApiKind::Responses,
                b"event: response.completed\ndata: {}\n\n",
                true,
            ),
            (
                ApiKind::Responses,
                b"event: response.incomplete\ndata: {}\n\n",
                true,
            ),
            (
                ApiKind::Responses,
                b"event: response.output_text.done\ndata: {}\n\n",
                false,
            ),
        ];
        for (api, event, want) in cases {
            let info = sse::scan(event);
            assert_eq!(
                is_terminal(*api, event, &info),
                *want,
                "{api:?} {}",
                String::from_utf8_lossy(event)
            );
            // The same event inside a run of events.
            let mut run = b"data: {\"x\":1}\n\n".to_vec();
            run.extend_from_slice(event);
            assert_eq!(chunk_ends(*api, &run).0, *want, "{api:?} in a run");
        }
    }
}
