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
