//! Wraps every request: the in-flight gauge, the request counter and
//! duration histogram, the forwarder's own time and a stream's time to
//! first token, and one access-log line, recorded exactly once whether the
//! request succeeds, fails, or the client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::envelope::{EventStream, Reply, ReplyBody};
use super::forward::Trace;
use crate::api::ApiError;
use crate::telemetry::traces::{Parent, RequestSpan};
use crate::telemetry::{Metrics, ModelSeries, Protocol};

/// Status recorded when the client disconnects before the answer ends
/// (nginx's convention; no HTTP status fits).
pub const CLIENT_CLOSED: u16 = 499;

pub struct Observer {
    metrics: Arc<Metrics>,
    access_log: bool,
    protocol: Protocol,
    request_id: String,
    started: Instant,
    /// The `model` label: the requested model if served, else `unknown`, so
    /// clients cannot grow the label set without bound.
    model: Option<String>,
    /// The model's series, bound at start.
    series: Option<Arc<ModelSeries>>,
    pub upstream: Option<String>,
    /// The model that answered an alias.
    pub served_model: Option<String>,
    pub attempts: u32,
    /// `stored` or `coalesced` when answered through idempotency.
    pub replay: Option<&'static str>,
    pub stream: bool,
    /// The request's API: the metrics' `api` label and the access log's.
    pub api: super::ApiKind,
    /// Time spent upstream (attempts and backoff) before the answer began.
    upstream_time: Duration,
    /// The request's span, when traces are on (`None`: no span work).
    pub span: Option<RequestSpan>,
    own_recorded: bool,
    done: bool,
}

impl Observer {
    pub fn new(
        metrics: Arc<Metrics>,
        access_log: bool,
        protocol: Protocol,
        request_id: &str,
    ) -> Self {
        metrics.inflight.inc();
        Self {
            metrics,
            access_log,
            protocol,
            request_id: request_id.to_string(),
            started: Instant::now(),
            model: None,
            series: None,
            upstream: None,
            served_model: None,
            attempts: 0,
            replay: None,
            stream: false,
            api: super::ApiKind::default(),
            upstream_time: Duration::ZERO,
            span: None,
            own_recorded: false,
            done: false,
        }
    }

    /// Sets the model label; `known` says whether the model is served.
    pub fn set_model(&mut self, name: &str, known: bool) {
        if known {
            self.series = self.metrics.series(self.protocol, self.api, name);
            self.model = Some(name.to_string());
        }
    }

    /// A new record of where the request goes, under this request's span.
    pub fn new_trace(&self) -> Trace {
        Trace {
            otel: self.parent(),
            ..Trace::default()
        }
    }

    /// The parent of the request's attempt spans, when traces are on.
    pub fn parent(&self) -> Option<Parent> {
        self.span.as_ref().map(RequestSpan::parent)
    }

    /// Notes where the request went.
    pub fn trace(&mut self, trace: &Trace) {
        if let Some(span) = &self.span {
            span.routed(
                trace.upstream.as_deref(),
                trace.served_model.as_deref(),
                trace.attempts,
            );
        }
        self.upstream.clone_from(&trace.upstream);
        self.served_model.clone_from(&trace.served_model);
        self.attempts = trace.attempts;
        self.upstream_time = trace.upstream_time;
    }

    /// Closes the observation when the answer ends: now for a completion,
    /// at the last event for a stream (whose first event also marks the
    /// time to first token).
    pub fn watch(mut self, reply: Reply) -> Reply {
        let body = match reply.body {
            ReplyBody::Complete(body) => {
                if let Some(span) = &mut self.span {
                    span.body(&body);
                }
                self.answer_began();
                self.finish(200);
                ReplyBody::Complete(body)
            }
            ReplyBody::Stream(inner) => ReplyBody::Stream(
                Observed {
                    inner,
                    obs: self,
                    began: false,
                    failed: None,
                }
                .boxed(),
            ),
        };
        Reply {
            headers: reply.headers,
            body,
        }
    }

    /// The answer's first byte is ready: the forwarder's own share of the
    /// time so far is what the upstream and backoff did not take.
    fn answer_began(&mut self) {
        self.record_own();
        if let (Some(series), true) = (&self.series, self.stream) {
            series.ttft.observe(self.started.elapsed().as_secs_f64());
        }
        if let (Some(span), true) = (&self.span, self.stream) {
            span.first_token(self.started.elapsed());
        }
    }

    /// The forwarder's own time, once per request, when its answer began.
    /// A failed request adds no sample: it failed upstream (its slot held
    /// by the upstream meanwhile) or was shed after queueing behind such
    /// requests, and neither must read as the forwarder's own latency (the
    /// autoscaler would add replicas for a failing upstream).
    fn record_own(&mut self) {
        if self.own_recorded {
            return;
        }
        self.own_recorded = true;
        if let Some(series) = &self.series {
            let own = self.started.elapsed().saturating_sub(self.upstream_time);
            series.own.observe(own.as_secs_f64());
        }
    }

    /// Records a failure and hands the error back.
    pub fn fail(&mut self, err: ApiError) -> ApiError {
        self.finish(err.status().as_u16());
        err
    }

    pub fn finish(&mut self, code: u16) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(span) = &mut self.span {
            span.finish(code);
        }

        let model = self.model.as_deref().unwrap_or("unknown");
        let elapsed = self.started.elapsed();
        let proto = self.protocol.label();
        self.metrics.inflight.dec();
        match &self.series {
            Some(series) => {
                if code == 200 {
                    series.ok.inc();
                } else {
                    self.count(proto, model, code);
                }
                series.duration.observe(elapsed.as_secs_f64());
            }
            None => {
                self.count(proto, model, code);
                self.metrics
                    .request_duration
                    .with_label_values(&[proto, self.api.label(), model])
                    .observe(elapsed.as_secs_f64());
            }
        }
        if self.access_log {
            tracing::info!(
                target: "access",
                request_id = %self.request_id,
                protocol = proto,
                api = self.api.label(),
                model,
                upstream = self.upstream.as_deref().unwrap_or("-"),
                served_model = self.served_model.as_deref().unwrap_or("-"),
                status = code,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                attempts = self.attempts,
                stream = self.stream,
                replay = self.replay.unwrap_or("-"),
                "request"
            );
        }
    }
}

impl Observer {
    fn count(&self, proto: &str, model: &str, code: u16) {
        let mut buf = itoa::Buffer::new();
        self.metrics
            .requests
            .with_label_values(&[proto, self.api.label(), model, buf.format(code)])
            .inc();
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.finish(CLIENT_CLOSED);
    }
}

/// A stream under observation: the first event marks the time to first
/// token; the end (or the client's going away) closes the observation.
struct Observed {
    inner: EventStream,
    obs: Observer,
    began: bool,
    failed: Option<u16>,
}

impl Stream for Observed {
    type Item = Result<Bytes, ApiError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = futures::ready!(this.inner.poll_next_unpin(cx));
        if let (Some(span), Some(Ok(event))) = (&mut this.obs.span, &item) {
            span.event(event);
        }
        match &item {
            Some(Ok(_)) if !this.began => {
                this.began = true;
                this.obs.answer_began();
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => this.failed = Some(e.status().as_u16()),
            None => this.obs.finish(this.failed.unwrap_or(200)),
        }
        Poll::Ready(item)
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.obs.finish(self.failed.unwrap_or(CLIENT_CLOSED));
    }
}
