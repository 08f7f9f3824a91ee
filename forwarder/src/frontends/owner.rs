//! The client behind a request to a stored object (an async job, a batch, a
//! file): every such route authenticates the same way, by credential or, on
//! an mTLS connection whose certificate names the principal, by
//! certificate, and is rate-limited as a chat request is
//! ([`Pipeline::admit_route`]). The principal keeps its grants (models,
//! tier), so what it creates (a batch) runs under them.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use crate::auth::{self, Principal};
use crate::frontends::tls::PeerSubject;
use crate::pipeline::Pipeline;

/// An extractor: the authenticated and admitted owner, or the pipeline's
/// 401 or 429 (counted and logged with its reason as every other refusal).
pub(super) struct Owner(pub Principal);

impl<S> FromRequestParts<S> for Owner
where
    Arc<Pipeline>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let pipeline = Arc::<Pipeline>::from_ref(state);
        let peer = parts.extensions.get::<PeerSubject>().map(|p| p.0.clone());
        pipeline
            .admit_route(auth::credential(&parts.headers), peer.as_deref())
            .await
            .map(Owner)
            .map_err(IntoResponse::into_response)
    }
}
