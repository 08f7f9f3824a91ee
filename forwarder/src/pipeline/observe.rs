//! Wraps every request: the in-flight gauge, the request counter and
//! duration histogram, and one access-log line, recorded exactly once
//! whether the request succeeds, fails, or the client goes away.

use std::sync::Arc;
use std::time::Instant;

use crate::api::ApiError;
use crate::telemetry::{Metrics, Protocol};

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
    pub upstream: Option<String>,
    pub attempts: u32,
    /// `stored` or `coalesced` when answered through idempotency.
    pub replay: Option<&'static str>,
    pub stream: bool,
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
            upstream: None,
            attempts: 0,
            replay: None,
            stream: false,
            done: false,
        }
    }

    /// Sets the model label; `known` says whether the model is served.
    pub fn set_model(&mut self, name: &str, known: bool) {
        if known {
            self.model = Some(name.to_string());
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
        let model = self.model.as_deref().unwrap_or("unknown");
        let elapsed = self.started.elapsed();
        let proto = self.protocol.label();
        self.metrics.inflight.dec();
        self.metrics
            .requests
            .with_label_values(&[proto, model, &code.to_string()])
            .inc();
        self.metrics
            .request_duration
            .with_label_values(&[proto, model])
            .observe(elapsed.as_secs_f64());
        if self.access_log {
            tracing::info!(
                target: "access",
                request_id = %self.request_id,
                protocol = proto,
                model,
                upstream = self.upstream.as_deref().unwrap_or("-"),
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

impl Drop for Observer {
    fn drop(&mut self) {
        self.finish(CLIENT_CLOSED);
    }
}
