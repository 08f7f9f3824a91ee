//! Which upstream created a stored response (`POST /v1/responses`), so that
//! `GET` and `DELETE /v1/responses/{id}` reach the upstream that holds it,
//! and only for the client that created it. Kept in a bounded local cache
//! and in the shared store (Redis when configured, so every replica knows).
//! Only ids, upstream names and client ids are kept: never content.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::store::{Space, Store, StoreKey};

use super::envelope::{Envelope, Reply, ReplyBody};
use super::forward::{to_api_error, Trace};
use super::ApiKind;
use crate::api::ApiError;
use crate::auth::Identity;
use crate::upstream::providers::{ObjectBody, RawEvents};
use futures::StreamExt;
use http::HeaderMap;

/// Ids remembered by this replica at most (the store keeps the rest).
const LOCAL_CAPACITY: u64 = 100_000;
/// How long an id is remembered: OpenAI keeps stored responses 30 days.
const TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Tries of the background write that shares an id with other replicas,
/// the n-th after n × `PUT_RETRY`.
const PUT_TRIES: u32 = 5;
const PUT_RETRY: Duration = Duration::from_millis(200);
/// The store's scope for these records.
const SCOPE: &str = "responses";

/// Where under a stored response a request goes: `/responses/{id}`, then
/// `tail` (`""`, `/cancel`, `/input_items`), then the client's query.
#[derive(Debug, Clone, Copy)]
pub struct ResponsePath<'a> {
    pub id: &'a str,
    pub tail: &'static str,
    pub query: Option<&'a str>,
}

impl<'a> ResponsePath<'a> {
    pub fn new(id: &'a str) -> Self {
        Self {
            id,
            tail: "",
            query: None,
        }
    }

    /// The path under the upstream's base URL. The id is one the index
    /// knows (this forwarder saw the upstream make it), so it names no
    /// other path.
    pub fn upstream_path(&self) -> String {
        match self.query.filter(|q| !q.is_empty()) {
            Some(q) => format!("/responses/{}{}?{q}", self.id, self.tail),
            None => format!("/responses/{}{}", self.id, self.tail),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The upstream (endpoint) name that created the response.
    pub upstream: String,
    /// The client that created it.
    pub owner: String,
}

pub struct ResponseIndex {
    local: moka::sync::Cache<String, Origin>,
    store: Arc<dyn Store>,
}

impl ResponseIndex {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            local: moka::sync::Cache::builder()
                .max_capacity(LOCAL_CAPACITY)
                .time_to_live(TTL)
                .build(),
            store,
        }
    }

    fn key(id: &str) -> StoreKey {
        StoreKey::new(Space::Job, SCOPE, id.as_bytes())
    }

    /// Records `id` here at once (this replica answers a `GET` that
    /// follows), and in the store in the background.
    pub fn remember(self: &Arc<Self>, id: String, origin: Origin) {
        if id.is_empty() || id.len() > 256 {
            return;
        }
        let value = serde_json::to_vec(&origin).unwrap_or_default();
        self.local.insert(id.clone(), origin);
        let this = self.clone();
        tokio::spawn(async move {
            // A store still connecting or briefly away: a few tries, then
            // only this replica knows the id.
            let value = Bytes::from(value);
            for attempt in 1..=PUT_TRIES {
                match this
                    .store
                    .put(&Self::key(&id), [0; 32], value.clone(), TTL)
                    .await
                {
                    Ok(()) => return,
                    Err(e) if attempt == PUT_TRIES => {
                        tracing::warn!(error = %e, "could not record a response's upstream in the store");
                    }
                    Err(_) => tokio::time::sleep(PUT_RETRY * attempt).await,
                }
            }
        });
    }

    /// Where `id` was created; `None` when this forwarder did not create it
    /// (or forgot it).
    pub async fn lookup(&self, id: &str) -> Option<Origin> {
        if let Some(o) = self.local.get(id) {
            return Some(o);
        }
        let record = self.store.get(&Self::key(id)).await.ok()??;
        let origin: Origin = serde_json::from_slice(&record.value).ok()?;
        self.local.insert(id.to_string(), origin.clone());
        Some(origin)
    }

    pub async fn forget(&self, id: &str) {
        self.local.invalidate(id);
        let _ = self.store.delete(&Self::key(id)).await;
    }
}

/// The `id` of a Responses answer: a whole body, or a stream event
/// (`response.created` and the rest carry `{"response": {"id"}}`).
pub fn response_id(json: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Inner {
        id: Option<String>,
    }
    #[derive(Deserialize)]
    struct Outer {
        id: Option<String>,
        response: Option<Inner>,
    }
    let o: Outer = serde_json::from_slice(json).ok()?;
    o.response.and_then(|r| r.id).or(o.id)
}

impl super::Pipeline {
    /// Notes which upstream created a Responses answer, from its body or
    /// its stream's first event carrying an id.
    pub(super) fn remember_response(&self, env: &Envelope, trace: &Trace, reply: Reply) -> Reply {
        if env.api != ApiKind::Responses {
            return reply;
        }
        let owner = env.ctx.principal.0.clone();
        match reply.body {
            ReplyBody::Complete(body) => {
                self.remember_body(&owner, trace, &body);
                Reply {
                    headers: reply.headers,
                    body: ReplyBody::Complete(body),
                }
            }
            ReplyBody::Stream(s) => {
                let Some(upstream) = trace.upstream.clone() else {
                    return Reply {
                        headers: reply.headers,
                        body: ReplyBody::Stream(s),
                    };
                };
                let index = self.responses.clone();
                let mut pending = Some((upstream, owner));
                let s = s.inspect(move |item| {
                    let (Some(_), Ok(event)) = (&pending, item) else {
                        return;
                    };
                    // An item is a run of whole events: the id is in the first.
                    let id = crate::sse::events(event)
                        .find_map(|e| crate::sse::data(e).and_then(|d| response_id(&d)));
                    if let (Some(id), Some((upstream, owner))) = (id, pending.take()) {
                        index.remember(id, Origin { upstream, owner });
                    }
                });
                Reply {
                    headers: reply.headers,
                    body: ReplyBody::Stream(s.boxed()),
                }
            }
        }
    }

    pub(super) fn remember_body(&self, owner: &str, trace: &Trace, body: &[u8]) {
        if let (Some(upstream), Some(id)) = (&trace.upstream, response_id(body)) {
            self.responses.remember(
                id,
                Origin {
                    upstream: upstream.clone(),
                    owner: owner.to_string(),
                },
            );
        }
    }

    /// A request on `/v1/responses/{id}` (`GET`, `DELETE`, `/cancel`,
    /// `/input_items`) for `owner`: sent to the upstream that created the
    /// response. `None`: a response this forwarder did not create, or
    /// another client's (not found). A retrieve with `stream=true` answers
    /// events: the upstream's timeout bounds the wait for its answer and
    /// then each gap between events.
    pub async fn response_object(
        &self,
        owner: &Identity,
        method: http::Method,
        at: ResponsePath<'_>,
    ) -> Result<Option<(HeaderMap, ObjectBody)>, ApiError> {
        let id = at.id;
        let Some(origin) = self.responses.lookup(id).await else {
            return Ok(None);
        };
        let endpoint = match self.forwarder.pools.endpoint(&origin.upstream) {
            Some(e) if origin.owner == owner.0 => e,
            _ => return Ok(None),
        };
        let path = at.upstream_path();
        let is_delete = method == http::Method::DELETE && at.tail.is_empty();
        let done =
            match tokio::time::timeout(endpoint.timeout, endpoint.provider.object(method, &path))
                .await
            {
                Ok(r) => r.map_err(|e| to_api_error(&e))?,
                Err(_) => return Err(to_api_error(&crate::upstream::UpstreamError::Timeout)),
            };
        if is_delete {
            self.responses.forget(id).await;
        }
        let body = match done.body {
            ObjectBody::Events(events) => {
                ObjectBody::Events(gaps_bounded(events, endpoint.timeout))
            }
            whole => whole,
        };
        Ok(Some((done.headers, body)))
    }
}

/// `events`, ended with a timeout error when the next one takes longer
/// than `gap`.
fn gaps_bounded(events: RawEvents, gap: Duration) -> RawEvents {
    futures::stream::unfold(Some(events), move |events| async move {
        let mut events = events?;
        match tokio::time::timeout(gap, events.next()).await {
            Ok(Some(item)) => Some((item, Some(events))),
            Ok(None) => None,
            Err(_) => Some((Err(crate::upstream::UpstreamError::Timeout), None)),
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_from_bodies_and_events() {
        assert_eq!(
            response_id(br#"{"id":"resp_1","object":"response","output":[]}"#).as_deref(),
            Some("resp_1")
        );
        assert_eq!(
            response_id(
                br#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_2"}}"#
            )
            .as_deref(),
            Some("resp_2")
        );
        assert_eq!(response_id(b"[DONE]"), None);
    }
}
