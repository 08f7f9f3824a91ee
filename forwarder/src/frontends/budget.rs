//! `GET /v1/budget`: the caller's own budget usage and limits. Only the
//! authenticated caller's figures are ever read: the identity comes from
//! its credential, never from the request.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use crate::auth;
use crate::frontends::tls::PeerSubject;
use crate::pipeline::Pipeline;

pub async fn get_budget(
    State(p): State<Arc<Pipeline>>,
    peer: Option<Extension<PeerSubject>>,
    headers: HeaderMap,
) -> Response {
    let peer = peer.as_ref().map(|Extension(s)| &*s.0);
    // Authenticated and rate-limited like a job or file route.
    let principal = match p.admit_route(auth::credential(&headers), peer).await {
        Ok(principal) => principal,
        Err(e) => return e.into_response(),
    };
    let Some(budgets) = p.budgets() else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {
                "message": "no budgets are configured on this forwarder",
                "type": "invalid_request_error",
                "code": "not_found",
            }})),
        )
            .into_response();
    };
    match budgets
        .report(&principal.identity, principal.tier.as_deref())
        .await
    {
        Ok(report) => Json(report).into_response(),
        Err(e) => e.into_response(),
    }
}
