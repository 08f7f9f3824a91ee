use std::time::Duration;

use bytes::Bytes;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Every way a request can fail, as the client sees it. Each maps to one
/// HTTP status and an OpenAI-shaped body `{"error": {message, type, code}}`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid or missing API key")]
    Unauthorized,
    #[error("model {0:?} does not exist")]
    ModelNotFound(String),
    #[error("request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("a request with this idempotency key is still in progress")]
    IdempotencyInProgress,
    #[error("this idempotency key was already used for a different request")]
    IdempotencyMismatch,
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Option<Duration> },
    /// The upstream rejected the request itself (4xx other than 429/401/403).
    /// Its body is passed on as it came when it is an OpenAI-shaped error,
    /// so clients keep `type`, `code` and `param` (`context_length_exceeded`).
    #[error("the upstream rejected the request ({status})")]
    UpstreamRejected { status: u16, body: Bytes },
    #[error("upstream error: {0}")]
    BadGateway(String),
    #[error("no healthy upstream for model {model:?}")]
    NoHealthyUpstream {
        model: String,
        retry_after: Option<Duration>,
    },
    #[error("upstream timed out: {0}")]
    GatewayTimeout(String),
    #[error("the request body was not received in time")]
    RequestTimeout,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Every `server.max_concurrency` slot stayed busy until the deadline.
    #[error("the forwarder is overloaded; retry later")]
    Overloaded,
    /// A WebSocket connection already has this many requests in flight.
    #[error("too many requests in flight on this connection (limit {0})")]
    TooManyInFlight(usize),
    /// A shared rate limit (requests or tokens) refused the request; the
    /// `x-ratelimit-*` headers say which and when it resets.
    #[error("rate limit exceeded")]
    QuotaExceeded {
        retry_after: Duration,
        limits: Vec<(&'static str, String)>,
    },
    /// A client's budget (`budgets`) for the day or month is spent: the
    /// message names it, what was used and when it resets.
    #[error("the {budget} budget is spent ({used} of {limit} used); it resets at {resets_at}")]
    BudgetExceeded {
        /// `daily token`, `monthly spend`, …
        budget: String,
        used: String,
        limit: String,
        resets_at: String,
        retry_after: Duration,
    },
    /// The shared store (idempotency) failed and the policy is fail_closed.
    #[error("the {0} store is unavailable; retry later")]
    StoreUnavailable(&'static str),
    /// A WebSocket request reused the id of one still in flight.
    #[error("request id {0:?} is already in flight on this connection")]
    DuplicateId(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::IdempotencyInProgress | Self::DuplicateId(_) => StatusCode::CONFLICT,
            Self::TooManyInFlight(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } | Self::QuotaExceeded { .. } | Self::BudgetExceeded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::UpstreamRejected { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
            }
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::NoHealthyUpstream { .. }
            | Self::ShuttingDown
            | Self::Overloaded
            | Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// OpenAI's `type` and `code` fields.
    pub fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadRequest(_) => ("invalid_request_error", "invalid_request"),
            Self::Unauthorized => ("authentication_error", "invalid_api_key"),
            Self::ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            Self::PayloadTooLarge(_) => ("invalid_request_error", "request_too_large"),
            Self::IdempotencyInProgress => ("invalid_request_error", "idempotency_in_progress"),
            Self::IdempotencyMismatch => ("invalid_request_error", "idempotency_key_reused"),
            Self::RateLimited { .. } | Self::QuotaExceeded { .. } => {
                ("rate_limit_error", "rate_limit_exceeded")
            }
            Self::BudgetExceeded { .. } => ("insufficient_quota", "budget_exceeded"),
            Self::UpstreamRejected { .. } => ("invalid_request_error", "upstream_rejected"),
            Self::BadGateway(_) => ("upstream_error", "bad_gateway"),
            Self::NoHealthyUpstream { .. } => ("upstream_error", "no_healthy_upstream"),
            Self::GatewayTimeout(_) => ("upstream_error", "upstream_timeout"),
            Self::ShuttingDown => ("server_error", "shutting_down"),
            Self::Overloaded => ("server_error", "overloaded"),
            Self::StoreUnavailable(_) => ("server_error", "store_unavailable"),
            Self::TooManyInFlight(_) => ("rate_limit_error", "too_many_in_flight"),
            Self::DuplicateId(_) => ("invalid_request_error", "duplicate_request_id"),
            Self::RequestTimeout => ("invalid_request_error", "request_timeout"),
            Self::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } | Self::NoHealthyUpstream { retry_after, .. } => {
                *retry_after
            }
            Self::QuotaExceeded { retry_after, .. } | Self::BudgetExceeded { retry_after, .. } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    /// The JSON error body, shared by HTTP responses and stream error events.
    pub fn body(&self) -> serde_json::Value {
        if let Some(v) = self.upstream_error_object() {
            return v;
        }
        let (kind, code) = self.kind();
        json!({"error": {"message": self.to_string(), "type": kind, "code": code}})
    }
}

impl ApiError {
    /// An upstream 4xx body that is an OpenAI-shaped error object.
    fn upstream_error_object(&self) -> Option<serde_json::Value> {
        let Self::UpstreamRejected { body, .. } = self else {
            return None;
        };
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        v.get("error")
            .is_some_and(serde_json::Value::is_object)
            .then_some(v)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::UpstreamRejected { status, body } = &self {
            if self.upstream_error_object().is_some() {
                // Byte for byte, as the upstream sent it.
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST);
                return (
                    status,
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body.clone(),
                )
                    .into_response();
            }
        }
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after() {
            // Retry-After is whole seconds; round up so clients never come back early.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if let Self::QuotaExceeded { limits, .. } = &self {
            for (name, value) in limits {
                if let Ok(v) = HeaderValue::from_str(value) {
                    resp.headers_mut().insert(*name, v);
                }
            }
        }
        resp
    }
}
