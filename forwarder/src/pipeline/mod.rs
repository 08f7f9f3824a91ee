//! The one request pipeline every front end calls:
//! admit (authenticate → rate-limit) → validate → claim (idempotency replay
//! or join) → dispatch → route → retry/backoff/breaker → provider, wrapped
//! by metrics and the access log. Front ends translate their wire format to
//! an [`envelope::Envelope`]'s parts and the [`Answer`] back; no stage sees
//! a wire format.

mod admission;
mod cached;
mod claims;
pub mod envelope;
mod forward;
pub mod idempotency;
mod keyed;
mod kind;
mod observe;
mod rate_limit;
pub mod responses;
mod shared_limit;
mod stream_end;
mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use stream_end::on_end;
use tokio::time::Instant;

use crate::api::{ApiError, HeaderAllow};
use crate::auth::{ApiKeys, AuthFailure, JwtVerifier};
use crate::store::{Space, StoreKey};
use crate::telemetry::{Metrics, Protocol};
use crate::upstream::Pools;
use crate::BuildError;
use claims::Claims;
use envelope::{peek_as, Context, Envelope, Reply, ReplyBody};
use forward::Forwarder;
use forwarder_config::Config;
use idempotency::{scoped_key, Flights};
use observe::Observer;
use rate_limit::RateLimit;

pub use admission::{check_key_len, Admission, RequestMeta};
pub use envelope::EventStream;
pub use forward::to_api_error;
pub use kind::{ApiKind, Family, Terminal};

/// A request's body in the format of its [`RequestMeta::api`], and a
/// body-level idempotency key (the simple API's `request_id`).
pub struct Call {
    pub body: Bytes,
    pub idempotency_key: Option<String>,
}

pub struct Answer {
    pub reply: Reply,
    /// Answered from an earlier request with the same idempotency key.
    pub replayed: bool,
}

pub struct Pipeline {
    cfg: Config,
    keys: Option<Arc<ApiKeys>>,
    jwt: Option<Arc<JwtVerifier>>,
    limit: Option<RateLimit>,
    /// Limits kept in the store (`rate_limit.shared`).
    shared_limit: Option<shared_limit::SharedLimit>,
    /// Per-client day and month budgets (`budgets`).
    budgets: Option<crate::budget::Budgets>,
    /// The response cache, when some model has one.
    cache: Option<Arc<crate::cache::ResponseCache>>,
    /// Idempotency claims and answers, on the shared store.
    claims: Arc<Claims>,
    /// The process's shared store (idempotency, cache, jobs).
    shared: Arc<dyn crate::store::Store>,
    flights: Arc<Flights>,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    to_upstream: HeaderAllow,
    ready: AtomicBool,
    /// `server.max_concurrency` slots, when bounded, and how many wait.
    slots: Option<Arc<tokio::sync::Semaphore>>,
    waiting: AtomicUsize,
    /// OpenTelemetry traces, when configured; `None` costs nothing.
    traces: Option<Arc<crate::telemetry::traces::Traces>>,
    /// Which upstream created each stored response.
    responses: Arc<responses::ResponseIndex>,
}

/// Counts a request in the slot queue for as long as it waits (also when
/// its client goes away while waiting).
struct Waiting<'a> {
    count: &'a AtomicUsize,
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn join(count: &'a AtomicUsize) -> Self {
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
        let jwt = match &cfg.auth.jwt {
            Some(j) => Some(Arc::new(
                JwtVerifier::new(j).map_err(|e| BuildError::new(format!("auth.jwt: {e}")))?,
            )),
            None => None,
        };
        for w in forwarder_config::warnings(&cfg) {
            tracing::warn!(field = %w.field, "config: {}", w.message);
        }
        for reason in AuthFailure::ALL {
            metrics.auth_failures.with_label_values(&[reason.label()]);
        }
        let pools = Pools::from_config(&cfg, metrics.clone())?;
        let aliases = crate::upstream::aliases::Aliases::from_config(&cfg);
        let mut named = pools.models();
        named.extend(aliases.names().cloned());
        metrics.init_series(&enabled_protocols(&cfg), &named);
        metrics.init_upstream_series(
            cfg.upstreams
                .iter()
                .flat_map(|u| u.models.iter().map(move |m| (u.name.as_str(), m.as_str()))),
        );
        let shared = crate::store::build(&cfg, &metrics)?;
        let traces = crate::telemetry::traces::Traces::from_config(&cfg)?;
        let cache =
            crate::cache::ResponseCache::new(&cfg.cache, shared.clone(), &metrics).map(Arc::new);
        Ok(Self {
            keys,
            jwt,
            cache,
            limit: cfg
                .rate_limit
                .as_ref()
                .filter(|r| !r.shared)
                .map(RateLimit::new),
            shared_limit: cfg
                .rate_limit
                .as_ref()
                .filter(|r| r.shared)
                .map(|r| shared_limit::SharedLimit::new(r, shared.clone())),
            budgets: cfg
                .budgets
                .as_ref()
                .map(|b| crate::budget::Budgets::new(b, shared.clone(), &metrics)),
            claims: Arc::new(Claims {
                store: shared.clone(),
                cfg: cfg.idempotency.clone(),
            }),
            flights: Arc::new(Flights::default()),
            forwarder: Arc::new(Forwarder {
                pools,
                aliases,
                retry: cfg.retry.clone(),
                metrics: metrics.clone(),
            }),
            metrics,
            to_upstream: HeaderAllow::new(&cfg.headers.to_upstream),
            ready: AtomicBool::new(true),
            slots: cfg
                .server
                .max_concurrency
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            waiting: Default::default(),
            traces,
            responses: Arc::new(responses::ResponseIndex::new(shared.clone())),
            shared,
            cfg,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The process's shared store, for every subsystem that keeps state.
    pub fn store(&self) -> &Arc<dyn crate::store::Store> {
        &self.shared
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn api_keys(&self) -> Option<&Arc<ApiKeys>> {
        self.keys.as_ref()
    }

    /// Served models and aliases.
    pub fn models(&self) -> Vec<String> {
        self.forwarder.models()
    }

    /// Whether `model` is served or an alias.
    pub fn has_model(&self, model: &str) -> bool {
        self.forwarder.knows(model)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Marks the forwarder as draining: `/readyz` fails from now on.
    pub fn set_draining(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Re-reads the upstreams' TLS files; see [`crate::upstream::pool::Pools::reload_files`].
    pub fn reload_upstream_files(&self) -> Result<bool, crate::BuildError> {
        self.forwarder.pools.reload_files()
    }

    pub fn budgets(&self) -> Option<&crate::budget::Budgets> {
        self.budgets.as_ref()
    }

    /// Exports the spans still buffered (at shutdown; tests).
    pub async fn flush_traces(&self) {
        if let Some(t) = &self.traces {
            t.flush().await;
        }
    }

    /// The request's span, when traces are on.
    fn span(&self, meta: &RequestMeta) -> Option<crate::telemetry::traces::RequestSpan> {
        self.traces.as_ref().map(|t| {
            crate::telemetry::traces::RequestSpan::start(
                t,
                &meta.headers,
                meta.protocol,
                meta.api,
                &meta.request_id,
                meta.trace_link.as_deref(),
            )
        })
    }

    pub fn jwt(&self) -> Option<&Arc<JwtVerifier>> {
        self.jwt.as_ref()
    }

    /// Runs an admitted request through the remaining stages. `call` is
    /// the front end's reading of the body, or why it could not be read.
    pub async fn run(
        &self,
        adm: Admission,
        call: Result<Call, ApiError>,
    ) -> Result<Answer, ApiError> {
        let Admission {
            mut obs,
            principal,
            models,
            tier,
            meta,
            started,
        } = adm;
        let mut call = call.map_err(|e| obs.fail(e))?;
        let api = meta.api;
        obs.api = api;
        let (model, stream) = match peek_as(api, &call.body) {
            Ok(p) => (p.model.into_owned(), p.stream),
            Err(e) => return Err(obs.fail(e)),
        };
        let known = self.forwarder.knows(&model);
        obs.set_model(&model, known);
        obs.stream = stream;
        if let Some(span) = &mut obs.span {
            span.set_api(api);
            span.set_model(&model, stream);
        }
        // A model the client's token does not grant is, to it, one that
        // does not exist (as OpenAI answers).
        if !known || models.is_some_and(|m| !m.contains(&model)) {
            return Err(obs.fail(ApiError::ModelNotFound(model)));
        }
        if !self.forwarder.serves(&model, api) {
            return Err(obs.fail(ApiError::BadRequest(format!(
                "model {model:?} is not served over the {} API: its upstreams speak \
                 another API, and translation between these APIs is not built",
                api.label()
            ))));
        }
        let timeout = meta.timeout.map_or(self.cfg.server.request_timeout, |t| {
            t.min(self.cfg.server.request_timeout)
        });
        let deadline = started.checked_add(timeout).unwrap_or(started);
        let key = meta.idempotency_key.or(call.idempotency_key);
        check_key_len(key.as_deref()).map_err(|e| obs.fail(e))?;
        // Shared limits need the store (async) and the body (tokens): they
        // apply here, to cache hits too.
        // The token estimate, the principal's copy and the cache directives
        // are made only for the features that read them.
        let estimated = match &self.shared_limit {
            Some(_) => shared_limit::estimate(&call.body),
            None => 0,
        };
        let limit_headers = match &self.shared_limit {
            Some(_) if meta.prepaid => Vec::new(),
            Some(l) => l
                .check(&principal, tier.as_deref(), estimated)
                .await
                .map_err(|e| obs.fail(e))?,
            None => Vec::new(),
        };
        let limited_principal = self.shared_limit.as_ref().map(|_| principal.clone());
        // Budgets: only a client that has one costs a store call.
        let budget = match &self.budgets {
            Some(b) => {
                let body = std::mem::take(&mut call.body);
                let (held, body) = b
                    .admit(&principal, tier.as_deref(), &model, api, stream, body)
                    .await
                    .map_err(|e| obs.fail(e))?;
                call.body = body;
                held
            }
            None => None,
        };
        // The cache answers before a concurrency slot is taken: a hit
        // costs no upstream capacity.
        let plan = self.cache.as_ref().and_then(|c| {
            let directives = crate::cache::Directives::from_headers(&meta.headers);
            c.plan(&model, api, &principal.0, &call.body, directives)
        });
        let mut lead = None;
        if let (Some(cache), Some(plan)) = (&self.cache, &plan) {
            let found = match cached::lookup(cache, plan, stream).await {
                Some(hit) => Err(hit),
                None => cached::lead_or_wait(cache, plan, stream, deadline).await,
            };
            match found {
                Ok(claim) => lead = claim,
                Err(hit) => {
                    let mut answer = cached::hit(obs, hit);
                    add_headers(&mut answer, &limit_headers);
                    return Ok(answer);
                }
            }
        }
        let slot = match &self.slots {
            Some(slots) => Some(
                self.take_slot(slots, deadline)
                    .await
                    .map_err(|e| obs.fail(e))?,
            ),
            None => None,
        };
        let env = Envelope {
            ctx: Context {
                principal,
                request_id: meta.request_id,
                deadline,
                protocol: meta.protocol,
            },
            api,
            model,
            stream,
            idempotency_key: key,
            headers: {
                let mut h = self.to_upstream.filter(&meta.headers);
                for name in api.protocol_headers() {
                    if !h.contains_key(*name) {
                        for v in meta.headers.get_all(*name) {
                            h.append(*name, v.clone());
                        }
                    }
                }
                h.extend(meta.upstream_headers);
                if let Some(span) = &obs.span {
                    span.inject(&mut h);
                }
                h
            },
            body: call.body,
        };
        let answer = match env.idempotency_key.clone() {
            Some(k) => {
                let key = scoped_key(&env.ctx.principal, &k);
                let skey = StoreKey::new(Space::Idempotency, &env.ctx.principal.0, k.as_bytes());
                self.keyed(obs, key, skey, env).await
            }
            None => self.dispatch(obs, env).await,
        };
        let answer = match (&self.cache, plan) {
            (Some(cache), Some(plan)) => cached::fill(cache, plan, lead, answer),
            _ => answer,
        };
        let answer = answer.map(|mut a| {
            add_headers(&mut a, &limit_headers);
            a
        });
        let answer = crate::budget::charge(budget, answer);
        if let (
            Some(l),
            Some(limited_principal),
            Ok(Answer {
                reply:
                    Reply {
                        body: ReplyBody::Complete(body),
                        ..
                    },
                ..
            }),
        ) = (&self.shared_limit, &limited_principal, &answer)
        {
            if l.counts_tokens(tier.as_deref()) {
                if let Some(used) = total_tokens(api, body) {
                    l.correct(limited_principal, tier.as_deref(), estimated, used)
                        .await;
                }
            }
        }
        // A stream holds its slot until it ends, and is watched: a client
        // that stops reading it does not hold the upstream call.
        let mut answer = answer?;
        if let ReplyBody::Stream(s) = answer.reply.body {
            let s = match slot {
                Some(slot) => on_end(s, move |_| drop(slot)),
                None => s,
            };
            let stall = self.cfg.server.write_timeout;
            answer.reply.body = ReplyBody::Stream(Box::pin(watchdog::watch(s, deadline, stall)));
        }
        Ok(answer)
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
    async fn dispatch(&self, mut obs: Observer, env: Envelope) -> Result<Answer, ApiError> {
        let mut trace = obs.new_trace();
        let result = if env.stream {
            self.forwarder.stream(&env, &mut trace).await
        } else {
            self.forwarder.complete(&env, &mut trace).await
        };
        obs.trace(&trace);
        match result {
            Ok(reply) => Ok(Answer {
                reply: obs.watch(self.remember_response(&env, &trace, reply)),
                replayed: false,
            }),
            Err(e) => Err(obs.fail(e)),
        }
    }
}

fn add_headers(answer: &mut Answer, headers: &shared_limit::LimitHeaders) {
    for (name, value) in headers {
        if let Ok(v) = http::HeaderValue::from_str(value) {
            answer.reply.headers.insert(*name, v);
        }
    }
}

/// The tokens an answer of `api` used: `usage.total_tokens` (chat
/// completions, embeddings, Responses), or for Anthropic Messages, which
/// reports no total, input + output + cache creation + cache reads.
/// Count_tokens answers use none.
fn total_tokens(api: ApiKind, body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Usage {
        total_tokens: Option<u64>,
        #[serde(default)]
        input_tokens: u64,
        #[serde(default)]
        output_tokens: u64,
        #[serde(default)]
        cache_creation_input_tokens: Option<u64>,
        #[serde(default)]
        cache_read_input_tokens: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        usage: Usage,
    }
    if api == ApiKind::CountTokens {
        return None;
    }
    let u = serde_json::from_slice::<Body>(body).ok()?.usage;
    match api.family() {
        Family::OpenAi => u.total_tokens,
        Family::Anthropic => Some(
            u.input_tokens
                + u.output_tokens
                + u.cache_creation_input_tokens.unwrap_or(0)
                + u.cache_read_input_tokens.unwrap_or(0),
        ),
    }
}

/// The front ends this config serves, for the zero-valued series.
fn enabled_protocols(cfg: &Config) -> Vec<Protocol> {
    let mut p = vec![Protocol::Http];
    if cfg.websocket.enabled {
        p.push(Protocol::WebSocket);
    }
    if cfg.grpc.enabled {
        p.push(Protocol::Grpc);
    }
    p
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    #[test]
    fn usage_is_read_in_each_api_shape() {
        let openai = br#"{"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}"#;
        assert_eq!(total_tokens(ApiKind::ChatCompletions, openai), Some(5));
        let emb = br#"{"data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        assert_eq!(total_tokens(ApiKind::Embeddings, emb), Some(4));
        let resp = br#"{"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}"#;
        assert_eq!(total_tokens(ApiKind::Responses, resp), Some(7));
        let msg = br#"{"usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":10,"cache_creation_input_tokens":null}}"#;
        assert_eq!(total_tokens(ApiKind::Messages, msg), Some(17));
        assert_eq!(
            total_tokens(ApiKind::CountTokens, br#"{"input_tokens":3}"#),
            None
        );
        assert_eq!(total_tokens(ApiKind::Messages, b"{}"), None);
    }
}
