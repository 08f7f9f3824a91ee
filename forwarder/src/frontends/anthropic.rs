//! Anthropic's Messages API: `POST /v1/messages` and
//! `POST /v1/messages/count_tokens`, on the same envelope and pipeline as
//! every other route. `x-api-key` or `Authorization: Bearer` authenticate
//! (see [`crate::auth::credential`]); `anthropic-version` and
//! `anthropic-beta` go upstream unchanged; bodies and events pass through
//! byte for byte. What this module adds is the API's error shape:
//! `{"type": "error", "error": {"type", "message"}}` for a refused request,
//! and `event: error` carrying it for a stream that fails after it began.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::Arc;

use super::http::{api_response, forward_request, with_request_id};
use crate::api::ApiError;
use crate::mock_llm::anthropic_error_type;
use crate::pipeline::{ApiKind, Pipeline};

/// `POST /v1/messages`.
pub(super) async fn messages(State(p): State<Arc<Pipeline>>, req: Request) -> Response {
    route(&p, req, ApiKind::Messages).await
}

/// `POST /v1/messages/count_tokens`.
pub(super) async fn count_tokens(State(p): State<Arc<Pipeline>>, req: Request) -> Response {
    route(&p, req, ApiKind::CountTokens).await
}

async fn route(p: &Pipeline, req: Request, api: ApiKind) -> Response {
    let (id, answer) = forward_request(p, req, api).await;
    let resp = match answer {
        Ok(answer) => api_response(answer, api),
        Err(e) => error_response(e),
    };
    with_request_id(resp, &id.0)
}

/// An upstream's own error body, if it is already in Anthropic's shape.
fn anthropic_body(e: &ApiError) -> Option<Value> {
    let ApiError::UpstreamRejected { body, .. } = e else {
        return None;
    };
    let v: Value = serde_json::from_slice(body).ok()?;
    (v.get("type").and_then(Value::as_str) == Some("error")
        && v.get("error").is_some_and(Value::is_object))
    .then_some(v)
}

/// An error in Anthropic's shape: an Anthropic upstream's own body as it
/// came, else the error's status mapped to Anthropic's error types (an
/// OpenAI-shaped upstream body lends its message).
pub fn error_json(e: &ApiError) -> Value {
    if let Some(v) = anthropic_body(e) {
        return v;
    }
    let openai = e.body();
    let message = openai["error"]["message"]
        .as_str()
        .map_or_else(|| e.to_string(), str::to_string);
    json!({"type": "error", "error": {
        "type": anthropic_error_type(e.status().as_u16()),
        "message": message,
    }})
}

/// The HTTP response for a refused request: the status and headers
/// (`Retry-After`, `x-ratelimit-*`) every route sends, with the body in
/// Anthropic's shape.
pub fn error_response(e: ApiError) -> Response {
    if anthropic_body(&e).is_some() {
        // Byte for byte, as the upstream sent it.
        return e.into_response();
    }
    let body = error_json(&e);
    let (mut parts, _) = e.into_response().into_parts();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

/// A refusal rendered in OpenAI's shape by a route shared with the other
/// APIs (`/v1/async/messages`), in Anthropic's shape; its status and
/// headers kept. Anything else passes unchanged.
pub async fn reshape_refusal(resp: Response) -> Response {
    if !resp.status().is_client_error() && !resp.status().is_server_error() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return Response::from_parts(parts, axum::body::Body::empty());
    };
    let openai: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if openai.get("type").and_then(Value::as_str) == Some("error") {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    let message = openai["error"]["message"].as_str().unwrap_or("refused");
    let reshaped = json!({"type": "error", "error": {
        "type": anthropic_error_type(parts.status.as_u16()),
        "message": message,
    }});
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(reshaped.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn errors_map_to_anthropic_types_and_upstream_bodies_pass_as_they_came() {
        let cases = [
            (ApiError::BadRequest("x".into()), "invalid_request_error"),
            (ApiError::Unauthorized, "authentication_error"),
            (ApiError::ModelNotFound("m".into()), "not_found_error"),
            (ApiError::PayloadTooLarge(1), "request_too_large"),
            (
                ApiError::RateLimited { retry_after: None },
                "rate_limit_error",
            ),
            (ApiError::Overloaded, "overloaded_error"),
            (ApiError::BadGateway("x".into()), "api_error"),
            (ApiError::GatewayTimeout("x".into()), "timeout_error"),
        ];
        for (e, want) in cases {
            let v = error_json(&e);
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], want, "{e:?}");
            assert_eq!(v["error"]["message"], e.to_string());
        }
        let own = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long"}}"#;
        let e = ApiError::UpstreamRejected {
            status: 400,
            body: Bytes::from_static(own),
        };
        assert_eq!(
            error_json(&e),
            serde_json::from_slice::<Value>(own).unwrap()
        );
        let openai = ApiError::UpstreamRejected {
            status: 400,
            body: Bytes::from_static(br#"{"error":{"message":"too long","type":"x"}}"#),
        };
        assert_eq!(error_json(&openai)["error"]["message"], "too long");
        assert_eq!(
            error_json(&openai)["error"]["type"],
            "invalid_request_error"
        );
    }
}
