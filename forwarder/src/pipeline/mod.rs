//! The one request pipeline every front end calls:
//! authenticate → rate-limit → validate → idempotency (replay or coalesce)
//! → route → retry/backoff/breaker → provider, wrapped by metrics and the
//! access log. Front ends only translate their wire format to a
//! [`RequestMeta`] plus a parse closure, and the [`Answer`] back.

mod forward;
pub mod idempotency;
mod observe;
mod rate_limit;
mod stream_end;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use stream_end::{on_end, StreamEnd};
use tokio::time::Instant;

use crate::api::{ApiError, ChatChunk, ChatRequest, ChatResponse};
use crate::auth::{ApiKeys, Identity};
use crate::telemetry::{Metrics, Protocol};
use crate::upstream::Pools;
use crate::BuildError;
use forward::{Forwarder, Trace};
use forwarder_config::Config;
use idempotency::{
    fingerprint, scoped_key, Flights, IdempotencyStore, MemoryStore, StoredAnswer, StoredReply,
};
use observe::Observer;
use rate_limit::RateLimit;

pub use forward::{to_api_error, ReplyStream};

/// What a front end knows about a request before its body is parsed.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub protocol: Protocol,
    pub request_id: String,
    /// The presented API key, if any.
    pub credential: Option<String>,
    /// From a header (`Idempotency-Key`); wins over a key in the body.
    pub idempotency_key: Option<String>,
}

/// A parsed request: the chat call and a body-level idempotency key
/// (the simple API's `request_id`).
pub struct Call {
    pub chat: ChatRequest,
    pub idempotency_key: Option<String>,
}

pub enum Reply {
    Complete(ChatResponse),
    Stream(ReplyStream),
}

pub struct Answer {
    pub reply: Reply,
    /// Answered from an earlier request with the same idempotency key.
    pub replayed: bool,
}

/// Longest accepted idempotency key.
const MAX_KEY_LEN: usize = 256;

pub struct Pipeline {
    cfg: Config,
    keys: Option<Arc<ApiKeys>>,
    limit: Option<RateLimit>,
    store: Arc<dyn IdempotencyStore>,
    flights: Arc<Flights>,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    /// `server.max_concurrency` slots, when bounded, and how many wait.
    slots: Option<Arc<tokio::sync::Semaphore>>,
    waiting: std::sync::atomic::AtomicUsize,
}

/// Counts a request in the slot queue for as long as it waits (also when
/// its client goes away while waiting).
struct Waiting<'a> {
    count: &'a std::sync::atomic::AtomicUsize,
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn join(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        let ahead = count.fetch_add(1, Ordering::Relaxed);
        Self { count, ahead }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pipeline {
    pub fn new(cfg: Config, metrics: Arc<Metrics>) -> Result<Self, BuildError> {
        let keys = match &cfg.auth.api_keys_file {
            Some(path) => {
                Some(Arc::new(ApiKeys::load(path).map_err(|e| {
                    BuildError::new(format!("auth.api_keys_file: {e}"))
                })?))
            }
            None => None,
        };
        let pools = Pools::from_config(&cfg, metrics.clone())?;
        Ok(Self {
            keys,
            limit: cfg.rate_limit.as_ref().map(RateLimit::new),
            store: Arc::new(MemoryStore::new(
                cfg.idempotency.ttl,
                cfg.idempotency.max_entries,
            )),
            flights: Arc::new(Flights::default()),
            forwarder: Arc::new(Forwarder {
                pools,
                retry: cfg.retry.clone(),
                metrics: metrics.clone(),
            }),
            metrics,
            ready: AtomicBool::new(true),
            slots: cfg
                .server
                .max_concurrency
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            waiting: Default::default(),
            cfg,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn api_keys(&self) -> Option<&Arc<ApiKeys>> {
        self.keys.as_ref()
    }

    pub fn models(&self) -> Vec<String> {
        self.forwarder.pools.models()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Marks the forwarder as draining: `/readyz` fails from now on.
    pub fn set_draining(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Checks a credential on its own (WebSocket upgrades, gRPC metadata).
    pub fn authenticate(&self, credential: Option<&str>) -> Result<Identity, ApiError> {
        match &self.keys {
            None => Ok(Identity::anonymous()),
            Some(keys) => credential
                .filter(|c| !c.is_empty())
                .and_then(|c| keys.verify(c))
                .ok_or(ApiError::Unauthorized),
        }
    }

    /// Counts a request refused by a front end before it reached `run`
    /// (a failed WebSocket upgrade, a connection's in-flight limit), so
    /// metrics and the access log see every refusal.
    pub fn reject(&self, protocol: Protocol, request_id: &str, err: ApiError) -> ApiError {
        Observer::new(
            self.metrics.clone(),
            self.cfg.logging.access_log,
            protocol,
            request_id,
        )
        .fail(err)
    }

    /// Runs one request through every stage. `parse` runs after
    /// authentication, so an unauthenticated client learns nothing about
    /// what the server would accept.
    pub async fn run(
        &self,
        meta: RequestMeta,
        parse: impl FnOnce() -> Result<Call, ApiError>,
    ) -> Result<Answer, ApiError> {
        let mut obs = Observer::new(
            self.metrics.clone(),
            self.cfg.logging.access_log,
            meta.protocol,
            &meta.request_id,
        );
        let identity = self
            .authenticate(meta.credential.as_deref())
            .map_err(|e| obs.fail(e))?;
        if let Some(limit) = &self.limit {
            limit.check(&identity).map_err(|e| obs.fail(e))?;
        }
        let call = parse().map_err(|e| obs.fail(e))?;
        let chat = call.chat;
        let known = self.forwarder.pools.has_model(&chat.model);
        obs.set_model(&chat.model, known);
        obs.stream = chat.stream;
        if !known {
            return Err(obs.fail(ApiError::ModelNotFound(chat.model)));
        }
        if chat.messages.is_empty() {
            return Err(obs.fail(ApiError::BadRequest("messages must not be empty".into())));
        }
        let deadline = Instant::now() + self.cfg.server.request_timeout;
        let key = meta.idempotency_key.or(call.idempotency_key);
        if key.as_ref().is_some_and(|k| k.len() > MAX_KEY_LEN) {
            return Err(obs.fail(ApiError::BadRequest(format!(
                "idempotency key longer than {MAX_KEY_LEN} characters"
            ))));
        }
        let slot = match &self.slots {
            Some(slots) => Some(
                self.take_slot(slots, deadline)
                    .await
                    .map_err(|e| obs.fail(e))?,
            ),
            None => None,
        };
        let answer = match key {
            Some(k) => {
                self.keyed(obs, scoped_key(&identity, &k), chat, deadline)
                    .await
            }
            None => self.dispatch(obs, chat, deadline).await,
        };
        // A stream holds its slot until it ends.
        match (answer, slot) {
            (
                Ok(Answer {
                    reply: Reply::Stream(s),
                    replayed,
                }),
                Some(slot),
            ) => Ok(Answer {
                reply: Reply::Stream(on_end(s, move |_| drop(slot))),
                replayed,
            }),
            (answer, _) => answer,
        }
    }

    /// A `server.max_concurrency` slot. As many requests may wait as run;
    /// beyond that, or past the deadline, the request is shed with 503 at
    /// once rather than queued without bound. Queueing counts as the
    /// forwarder's own latency, which is what the autoscaler watches.
    async fn take_slot(
        &self,
        slots: &Arc<tokio::sync::Semaphore>,
        deadline: Instant,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let limit = self.cfg.server.max_concurrency.unwrap_or(usize::MAX);
        let waiting = Waiting::join(&self.waiting);
        if waiting.ahead >= limit {
            return Err(ApiError::Overloaded);
        }
        match tokio::time::timeout_at(deadline, slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::Overloaded),
        }
    }

    /// Forwards without idempotency.
    async fn dispatch(
        &self,
        mut obs: Observer,
        chat: ChatRequest,
        deadline: Instant,
    ) -> Result<Answer, ApiError> {
        let mut trace = Trace::default();
        let result = if chat.stream {
            self.forwarder
                .stream(&chat, deadline, &mut trace)
                .await
                .map(Reply::Stream)
        } else {
            self.forwarder
                .complete(&chat, deadline, &mut trace)
                .await
                .map(Reply::Complete)
        };
        obs.upstream = trace.upstream;
        obs.attempts = trace.attempts;
        match result {
            Ok(reply) => Ok(Answer {
                reply: finish_on_success(obs, reply),
                replayed: false,
            }),
            Err(e) => Err(obs.fail(e)),
        }
    }

    /// Forwards under an idempotency key: replay, join or lead.
    async fn keyed(
        &self,
        mut obs: Observer,
        key: String,
        chat: ChatRequest,
        deadline: Instant,
    ) -> Result<Answer, ApiError> {
        let fp = fingerprint(&chat);
        if let Some(answer) = self.lookup(&key, &fp).await.map_err(|e| obs.fail(e))? {
            obs.replay = Some("stored");
            return Ok(answer.into_answer(obs, &self.metrics));
        }
        if chat.stream {
            return self.keyed_stream(obs, key, fp, chat, deadline).await;
        }
        let (store, flights, forwarder) = (
            self.store.clone(),
            self.flights.clone(),
            self.forwarder.clone(),
        );
        let (task_key, task_fp) = (key.clone(), fp.clone());
        let (flight, leader) = self
            .flights
            .lead_or_join(&key, &fp, move || {
                async move {
                    let mut trace = Trace::default();
                    // Re-check under the claim: an earlier leader may have
                    // stored its answer between our lookup and our claim.
                    let stored = match store.get(&task_key).await {
                        Ok(Some(StoredAnswer {
                            reply: StoredReply::Complete(r),
                            ..
                        })) => Some(r),
                        _ => None,
                    };
                    let result = match stored {
                        Some(r) => Ok(r),
                        None => forwarder.complete(&chat, deadline, &mut trace).await,
                    };
                    if let Ok(resp) = &result {
                        let answer = StoredAnswer {
                            fingerprint: task_fp,
                            reply: StoredReply::Complete(resp.clone()),
                        };
                        if let Err(e) = store.put(&task_key, answer).await {
                            tracing::warn!(error = %e, "could not store an idempotent answer");
                        }
                    }
                    flights.release(&task_key);
                    (result, trace)
                }
                .boxed()
            })
            .map_err(|e| obs.fail(e))?;
        let (result, trace) = flight.await;
        if leader {
            obs.upstream = trace.upstream;
            obs.attempts = trace.attempts;
        } else {
            obs.replay = Some("coalesced");
            self.metrics.idempotent_replays.inc();
        }
        match result {
            Ok(resp) => {
                obs.finish(200);
                Ok(Answer {
                    reply: Reply::Complete(resp),
                    replayed: !leader,
                })
            }
            Err(e) => Err(obs.fail(e)),
        }
    }

    async fn keyed_stream(
        &self,
        mut obs: Observer,
        key: String,
        fp: String,
        chat: ChatRequest,
        deadline: Instant,
    ) -> Result<Answer, ApiError> {
        self.flights
            .claim_stream(&key, &fp)
            .map_err(|e| obs.fail(e))?;
        // Re-check under the claim (see `keyed`).
        match self.lookup(&key, &fp).await {
            Ok(Some(answer)) => {
                self.flights.release(&key);
                obs.replay = Some("stored");
                return Ok(answer.into_answer(obs, &self.metrics));
            }
            Ok(None) => {}
            Err(e) => {
                self.flights.release(&key);
                return Err(obs.fail(e));
            }
        }
        let mut trace = Trace::default();
        let result = self.forwarder.stream(&chat, deadline, &mut trace).await;
        obs.upstream = trace.upstream;
        obs.attempts = trace.attempts;
        let stream = match result {
            Ok(s) => s,
            Err(e) => {
                self.flights.release(&key);
                return Err(obs.fail(e));
            }
        };
        // Record the chunks; store them only if the stream completes, and
        // release the key either way.
        let chunks = Arc::new(parking_lot::Mutex::new(Vec::<ChatChunk>::new()));
        let recording = chunks.clone();
        let recorded = stream.inspect(move |item| {
            if let Ok(chunk) = item {
                recording.lock().push(chunk.clone());
            }
        });
        let (store, flights) = (self.store.clone(), self.flights.clone());
        let recorded = on_end(recorded.boxed(), move |end| {
            if end != StreamEnd::Completed {
                flights.release(&key);
                return;
            }
            let reply = StoredReply::Stream(std::mem::take(&mut *chunks.lock()));
            tokio::spawn(async move {
                let answer = StoredAnswer {
                    fingerprint: fp,
                    reply,
                };
                if let Err(e) = store.put(&key, answer).await {
                    tracing::warn!(error = %e, "could not store an idempotent answer");
                }
                flights.release(&key);
            });
        });
        Ok(Answer {
            reply: finish_on_success(obs, Reply::Stream(recorded)),
            replayed: false,
        })
    }

    /// A stored answer for `key`, if its fingerprint matches.
    async fn lookup(&self, key: &str, fp: &str) -> Result<Option<Stored>, ApiError> {
        match self.store.get(key).await {
            Ok(Some(a)) if a.fingerprint != fp => Err(ApiError::IdempotencyMismatch),
            Ok(Some(a)) => Ok(Some(Stored(a.reply))),
            Ok(None) => Ok(None),
            Err(e) => {
                // An unavailable store must not fail the request: forward it.
                tracing::warn!(error = %e, "idempotency store lookup failed");
                Ok(None)
            }
        }
    }
}

/// A stored answer found for a repeated key.
struct Stored(StoredReply);

impl Stored {
    fn into_answer(self, obs: Observer, metrics: &Metrics) -> Answer {
        metrics.idempotent_replays.inc();
        let reply = match self.0 {
            StoredReply::Complete(r) => Reply::Complete(r),
            StoredReply::Stream(chunks) => {
                Reply::Stream(futures::stream::iter(chunks.into_iter().map(Ok)).boxed())
            }
        };
        Answer {
            reply: finish_on_success(obs, reply),
            replayed: true,
        }
    }
}

/// Closes the observer: now for a completion, at the stream's end for a stream.
fn finish_on_success(mut obs: Observer, reply: Reply) -> Reply {
    match reply {
        Reply::Complete(r) => {
            obs.finish(200);
            Reply::Complete(r)
        }
        Reply::Stream(s) => Reply::Stream(on_end(s, move |end| {
            obs.finish(match end {
                StreamEnd::Completed => 200,
                StreamEnd::Failed(code) => code,
                StreamEnd::Dropped => observe::CLIENT_CLOSED,
            })
        })),
    }
}
