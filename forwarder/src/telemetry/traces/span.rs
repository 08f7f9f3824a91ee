//! The spans: one per request (kind server), one per upstream attempt
//! (kind client, its child), with the GenAI semantic conventions'
//! attributes. Content (prompts, replies) is never recorded.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};

use super::{Answered, Traces};
use crate::pipeline::ApiKind;
use crate::telemetry::Protocol;

/// `gen_ai.operation.name` for an API.
pub fn operation(api: ApiKind) -> &'static str {
    match api {
        ApiKind::ChatCompletions | ApiKind::Messages | ApiKind::Responses => "chat",
        ApiKind::Embeddings => "embeddings",
        ApiKind::CountTokens => "count_tokens",
    }
}

/// What an attempt span needs: the request span's context and the tracer.
#[derive(Clone)]
pub struct Parent {
    cx: Context,
    traces: Arc<Traces>,
}

/// A request's span, from admission to the end of its answer.
pub struct RequestSpan {
    traces: Arc<Traces>,
    /// Holds the span (ended by [`RequestSpan::finish`]).
    cx: Context,
    api: ApiKind,
    answered: Answered,
    ended: bool,
}

impl RequestSpan {
    /// Starts the span of a request whose headers may carry a W3C
    /// `traceparent` (then it continues the client's trace).
    pub fn start(
        traces: &Arc<Traces>,
        headers: &http::HeaderMap,
        protocol: Protocol,
        api: ApiKind,
        request_id: &str,
        link: Option<&str>,
    ) -> Self {
        let parent = traces.extract(headers);
        let op = operation(api);
        let links = link
            .and_then(|tp| traces.span_context_of(tp))
            .map(|sc| vec![opentelemetry::trace::Link::with_context(sc)])
            .unwrap_or_default();
        let span = traces
            .tracer
            .span_builder(op)
            .with_kind(SpanKind::Server)
            .with_links(links)
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", op),
                KeyValue::new("forwarder.api", api.label()),
                KeyValue::new("forwarder.protocol", protocol.label()),
                KeyValue::new("forwarder.request_id", request_id.to_string()),
            ])
            .start_with_context(&traces.tracer, &parent);
        Self {
            traces: traces.clone(),
            cx: parent.with_span(span),
            api,
            answered: Answered::default(),
            ended: false,
        }
    }

    /// The API is known once the body is read (the front end's guess
    /// before it may differ only for routes that serve several).
    pub fn set_api(&mut self, api: ApiKind) {
        if api != self.api {
            self.api = api;
            let span = self.cx.span();
            span.set_attribute(KeyValue::new("gen_ai.operation.name", operation(api)));
            span.set_attribute(KeyValue::new("forwarder.api", api.label()));
        }
    }

    pub fn set_model(&self, model: &str, stream: bool) {
        let span = self.cx.span();
        span.update_name(format!("{} {model}", operation(self.api)));
        span.set_attribute(KeyValue::new("gen_ai.request.model", model.to_string()));
        span.set_attribute(KeyValue::new("forwarder.stream", stream));
    }

    /// The parent of this request's attempt spans.
    pub fn parent(&self) -> Parent {
        Parent {
            cx: self.cx.clone(),
            traces: self.traces.clone(),
        }
    }

    /// This span's W3C `traceparent`.
    pub fn traceparent(&self) -> Option<String> {
        let mut h = http::HeaderMap::new();
        self.traces.inject(&self.cx, &mut h);
        h.get("traceparent")?.to_str().ok().map(str::to_string)
    }

    /// Sets `traceparent` (and `tracestate`) for the upstream: the
    /// client's trace, with this request's span as the parent.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        self.traces.inject(&self.cx, headers);
    }

    /// Where the request went (the last attempt's upstream, an alias's
    /// target).
    pub fn routed(&self, upstream: Option<&str>, served_model: Option<&str>, attempts: u32) {
        let span = self.cx.span();
        if let Some(name) = upstream {
            span.set_attribute(KeyValue::new("forwarder.upstream", name.to_string()));
            if let Some(u) = self.traces.upstream(name) {
                span.set_attribute(KeyValue::new("gen_ai.provider.name", u.provider));
                if let Some(host) = &u.host {
                    span.set_attribute(KeyValue::new("server.address", host.clone()));
                }
                if let Some(port) = u.port {
                    span.set_attribute(KeyValue::new("server.port", i64::from(port)));
                }
            }
        }
        if let Some(m) = served_model {
            span.set_attribute(KeyValue::new("forwarder.served_model", m.to_string()));
        }
        span.set_attribute(KeyValue::new("forwarder.attempts", i64::from(attempts)));
    }

    /// A stream's first event: the time to first token.
    pub fn first_token(&self, after: Duration) {
        self.cx.span().set_attribute(KeyValue::new(
            "gen_ai.server.time_to_first_token",
            after.as_secs_f64(),
        ));
    }

    /// A whole answer.
    pub fn body(&mut self, body: &[u8]) {
        self.answered = Answered::from_body(self.api, body);
    }

    /// One streamed item: a run of whole events.
    pub fn event(&mut self, run: &[u8]) {
        for event in crate::sse::events(run) {
            if let Some(data) = crate::sse::data(event) {
                self.answered.read_event(self.api, &data);
            }
        }
    }

    /// Ends the span with the request's status (499: the client left).
    pub fn finish(&mut self, code: u16) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let span = self.cx.span();
        let a = &self.answered;
        if let Some(m) = &a.model {
            span.set_attribute(KeyValue::new("gen_ai.response.model", m.clone()));
        }
        if let Some(id) = &a.id {
            span.set_attribute(KeyValue::new("gen_ai.response.id", id.clone()));
        }
        if let Some(n) = a.input_tokens {
            span.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", tokens(n)));
        }
        if let Some(n) = a.output_tokens {
            span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", tokens(n)));
        }
        span.set_attribute(KeyValue::new("forwarder.status", i64::from(code)));
        if code >= 400 {
            span.set_attribute(KeyValue::new("error.type", code.to_string()));
            span.set_status(Status::error(status_text(code)));
        }
        span.end();
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        // A safety net: the observer ends it with the real status first.
        self.finish(499);
    }
}

fn tokens(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn status_text(code: u16) -> &'static str {
    match code {
        499 => "the client went away",
        400..=499 => "refused",
        _ => "failed",
    }
}

/// One upstream attempt's span, ended when the attempt has its answer
/// (a stream's first event) or failed.
pub struct AttemptSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl AttemptSpan {
    pub fn start(parent: &Parent, upstream: &str, model: &str, api: ApiKind, attempt: u32) -> Self {
        let traces = &parent.traces;
        let op = operation(api);
        let mut attrs = vec![
            KeyValue::new("gen_ai.operation.name", op),
            KeyValue::new("gen_ai.request.model", model.to_string()),
            KeyValue::new("forwarder.upstream", upstream.to_string()),
            KeyValue::new("forwarder.attempt", i64::from(attempt)),
        ];
        if let Some(u) = traces.upstream(upstream) {
            attrs.push(KeyValue::new("gen_ai.provider.name", u.provider));
            if let Some(host) = &u.host {
                attrs.push(KeyValue::new("server.address", host.clone()));
            }
            if let Some(port) = u.port {
                attrs.push(KeyValue::new("server.port", i64::from(port)));
            }
        }
        let span = traces
            .tracer
            .span_builder(format!("{op} {model}"))
            .with_kind(SpanKind::Client)
            .with_attributes(attrs)
            .start_with_context(&traces.tracer, &parent.cx);
        Self { span }
    }

    pub fn succeeded(mut self) {
        self.span.end();
    }

    /// `error` is the upstream error's label (`timeout`, `connect`, `5xx`…);
    /// `status` the upstream's HTTP status when it answered.
    pub fn failed(mut self, error: &'static str, status: Option<u16>) {
        self.span.set_attribute(KeyValue::new("error.type", error));
        if let Some(s) = status {
            self.span
                .set_attribute(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        self.span
            .set_status(Status::error("upstream attempt failed"));
        self.span.end();
    }
}
