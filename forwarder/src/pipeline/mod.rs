//! The one request pipeline every front end calls:
//! admit (authenticate → rate-limit) → validate → claim (idempotency replay
//! or join) → dispatch → route → retry/backoff/breaker → provider, wrapped
//! by metrics and the access log. Front ends translate their wire format to
//! an [`envelope::Envelope`]'s parts and the [`Answer`] back; no stage sees
//! a wire format.

mod cached;
mod claims;
pub mod envelope;
mod forward;
pub mod idempotency;
mod kind;
mod observe;
mod rate_limit;
pub mod responses;
mod shared_limit;
mod stream_end;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use http::HeaderMap;
use parking_lot::Mutex;
use stream_end::{on_end, StreamEnd};
use tokio::time::Instant;

use crate::api::{ApiError, HeaderAllow};
use crate::auth::{ApiKeys, AuthFailure, Authenticators, Identity, JwtVerifier, Principal};
use crate::store::{Space, StoreKey};
use crate::telemetry::{Metrics, Protocol};
use crate::upstream::Pools;
use crate::BuildError;
use claims::{Begin, Claims};
use envelope::{peek_as, Context, Envelope, Reply, ReplyBody};
use forward::{Forwarder, Trace};
use forwarder_config::Config;
use idempotency::{fingerprint, scoped_key, Fingerprint, Flights, StoredReply};
use observe::Observer;
use rate_limit::RateLimit;

pub use envelope::EventStream;
pub use forward::to_api_error;
pub use kind::{ApiKind, Family, Terminal};

/// What a front end knows about a request before its body is read.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub protocol: Protocol,
    /// The API the body is written in (chat completions unless the front
    /// end says otherwise).
    pub api: ApiKind,
    pub request_id: String,
    /// The presented API key, if any.
    pub credential: Option<String>,
    /// From a header (`Idempotency-Key`); wins over a key in the body.
    pub idempotency_key: Option<String>,
    /// The client's headers; those on `headers.to_upstream` are passed on.
    pub headers: HeaderMap,
    /// A deadline the client asked for (gRPC's `grpc-timeout`); the
    /// configured `server.request_timeout` still caps it.
    pub timeout: Option<Duration>,
    /// The subject of the connection's verified client certificate (mTLS).
    pub peer: Option<String>,
    /// Headers the forwarder itself sends upstream (an async job's
    /// `Idempotency-Key`), added after the allow-list.
    pub upstream_headers: HeaderMap,
    /// The shared limits were charged for this request already (an async
    /// job, at submission): the run spends nothing more up front; the
    /// answer's tokens beyond the estimate are still charged.
    pub prepaid: bool,
    /// A W3C `traceparent` the request's span links to (an async job's
    /// run: its submission's span), when traces are on.
    pub trace_link: Option<String>,
}

impl RequestMeta {
    pub fn new(protocol: Protocol, request_id: String) -> Self {
        Self {
            protocol,
            api: ApiKind::ChatCompletions,
            request_id,
            credential: None,
            idempotency_key: None,
            headers: HeaderMap::new(),
            timeout: None,
            peer: None,
            upstream_headers: HeaderMap::new(),
            prepaid: false,
            trace_link: None,
        }
    }
}

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

/// A request that passed authentication and the rate limit; its body has
/// not been read yet. Dropping it counts the request as abandoned.
pub struct Admission {
    obs: Observer,
    principal: Identity,
    /// Models a token restricts the client to.
    models: Option<Arc<[String]>>,
    /// The rate-limit tier in force, if any.
    tier: Option<Arc<str>>,
    meta: RequestMeta,
    started: Instant,
}

impl Admission {
    pub fn principal(&self) -> &Identity {
        &self.principal
    }

    /// The client with its grants (for what it leaves to run later: a job).
    pub fn client(&self) -> Principal {
        Principal {
            identity: self.principal.clone(),
            models: self.models.clone(),
            tier: self.tier.clone(),
        }
    }

    /// Whether the client's credential grants `model` (a JWT may name the
    /// models it may use; API keys grant every model).
    pub fn grants(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|g| g == model))
    }

    /// The W3C `traceparent` of this request's span, when traces are on
    /// (what a job it leaves links its run to).
    pub fn traceparent(&self) -> Option<String> {
        self.obs.span.as_ref().and_then(|s| s.traceparent())
    }

    /// The idempotency key the client sent in a header, if any.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.meta.idempotency_key.as_deref()
    }

    /// Ends a request for `model` (a served one) answered without running
    /// it (an accepted async job): counted under that model.
    pub fn answered(mut self, model: &str, code: u16) {
        self.obs.set_model(model, true);
        self.obs.finish(code);
    }

    /// Ends a request refused by its front end after admission.
    pub fn refuse(mut self, err: ApiError) -> ApiError {
        self.obs.fail(err)
    }
}

/// Longest accepted idempotency key.
const MAX_KEY_LEN: usize = 256;

/// Refuses an idempotency key longer than [`MAX_KEY_LEN`] (the async
/// front ends check it too, though a job is keyed by its own id).
pub fn check_key_len(key: Option<&str>) -> Result<(), ApiError> {
    match key {
        Some(k) if k.len() > MAX_KEY_LEN => Err(ApiError::BadRequest(format!(
            "idempotency key longer than {MAX_KEY_LEN} characters"
        ))),
        _ => Ok(()),
    }
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

    /// Checks a credential on its own (`/v1/models`).
    pub fn authenticate(&self, credential: Option<&str>) -> Result<Identity, ApiError> {
        self.authenticate_peer(credential, None).map(|p| p.identity)
    }

    /// Checks a credential presented over a connection whose verified
    /// client certificate names `peer` (WebSocket upgrades, every request
    /// through [`Pipeline::admit`]). The client learns only "401"; the
    /// reason goes to the log and `forwarder_auth_failures_total`.
    pub fn authenticate_peer(
        &self,
        credential: Option<&str>,
        peer: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let auth = Authenticators {
            keys: self.keys.as_deref(),
            jwt: self.jwt.as_deref(),
            client_cert: self
                .cfg
                .server
                .tls
                .as_ref()
                .is_some_and(|t| t.client_cert_principal),
        };
        auth.authenticate(credential, peer).map_err(|reason| {
            self.metrics
                .auth_failures
                .with_label_values(&[reason.label()])
                .inc();
            tracing::info!(reason = reason.label(), "authentication failed");
            ApiError::Unauthorized
        })
    }

    /// Counts a request refused by a front end before it reached the
    /// pipeline (a failed WebSocket upgrade, a connection's in-flight
    /// limit), so metrics and the access log see every refusal.
    pub fn reject(&self, protocol: Protocol, request_id: &str, err: ApiError) -> ApiError {
        self.observer(protocol, request_id).fail(err)
    }

    fn observer(&self, protocol: Protocol, request_id: &str) -> Observer {
        Observer::new(
            self.metrics.clone(),
            self.cfg.logging.access_log,
            protocol,
            request_id,
        )
    }

    /// The first stage, from headers alone: authenticate and rate-limit.
    /// Front ends call it before reading a body, so an unauthenticated
    /// client costs no body buffering and learns nothing about what the
    /// server would accept.
    pub fn admit(&self, meta: RequestMeta) -> Result<Admission, ApiError> {
        let mut obs = self.observer(meta.protocol, &meta.request_id);
        obs.api = meta.api;
        obs.span = self.span(&meta);
        let Principal {
            identity: principal,
            models,
            tier,
        } = self
            .authenticate_peer(meta.credential.as_deref(), meta.peer.as_deref())
            .map_err(|e| obs.fail(e))?;
        let tier = self.tier(&principal, tier.as_deref());
        if let Some(limit) = &self.limit {
            limit
                .check(&principal, tier.as_deref())
                .map_err(|e| obs.fail(e))?;
        }
        Ok(Admission {
            obs,
            principal,
            models,
            tier,
            meta,
            started: Instant::now(),
        })
    }

    /// Charges an admitted request's shared limits now, for a request that
    /// runs later (an async job: the client learns of a refusal at
    /// submission, and the run is [`RequestMeta::prepaid`]). Without shared
    /// limits nothing is charged here: the per-process limiter ran in
    /// [`Self::admit`].
    pub async fn charge(&self, adm: &Admission, body: &[u8]) -> Result<(), ApiError> {
        match &self.shared_limit {
            Some(l) => l
                .check(
                    &adm.principal,
                    adm.tier.as_deref(),
                    shared_limit::estimate(body),
                )
                .await
                .map(drop),
            None => Ok(()),
        }
    }

    /// Refuses a request that runs later (an async job) when its client's
    /// budget has no room for its estimate now. Charges nothing: the run
    /// is charged (see [`crate::budget::Budgets::check`]).
    pub async fn check_budget(
        &self,
        adm: &Admission,
        model: &str,
        body: &[u8],
    ) -> Result<(), ApiError> {
        match &self.budgets {
            Some(b) => {
                b.check(&adm.principal, adm.tier.as_deref(), model, body)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Admits a request for a principal authenticated and rate-limited
    /// earlier (an async job or a batch line, run by a worker after it was
    /// accepted), held to the grants its credential had then: its models
    /// and its tier (the token's claim, else the client's configured one).
    pub fn admit_as(&self, principal: Principal, meta: RequestMeta) -> Admission {
        let mut obs = self.observer(meta.protocol, &meta.request_id);
        obs.api = meta.api;
        obs.span = self.span(&meta);
        Admission {
            obs,
            tier: self.tier(&principal.identity, principal.tier.as_deref()),
            principal: principal.identity,
            models: principal.models,
            meta,
            started: Instant::now(),
        }
    }

    /// Admits a request to a stored object's route (a job, a file, a
    /// batch): authenticated as a chat request is, and rate-limited as one
    /// (the per-process limit, or the shared one counting a request and no
    /// tokens). An authentication failure is logged and counted as for
    /// any other request.
    pub async fn admit_route(
        &self,
        credential: Option<&str>,
        peer: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let mut p = self.authenticate_peer(credential, peer)?;
        // The tier in force (claimed and listed, else configured), kept
        // with what this client leaves to run later.
        p.tier = self.tier(&p.identity, p.tier.as_deref());
        self.spend(&p).await?;
        if let Some(l) = &self.shared_limit {
            let tier = self.tier(&p.identity, p.tier.as_deref());
            l.check(&p.identity, tier.as_deref(), 0).await?;
        }
        Ok(p)
    }

    /// Spends one request of `p`'s per-process rate limit (its tier's),
    /// as [`Pipeline::admit`] does; shared limits are spent when a request
    /// runs. Nothing to spend when no per-process limit is configured.
    pub async fn spend(&self, p: &Principal) -> Result<(), ApiError> {
        if let Some(limit) = &self.limit {
            let tier = self.tier(&p.identity, p.tier.as_deref());
            limit.check(&p.identity, tier.as_deref())?;
        }
        Ok(())
    }

    /// The rate-limit tier in force for a client (see [`rate_limit::tier`]).
    fn tier(&self, who: &Identity, claimed: Option<&str>) -> Option<Arc<str>> {
        let cfg = self.cfg.rate_limit.as_ref()?;
        rate_limit::tier(cfg, who, claimed).map(Arc::from)
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
        // A stream holds its slot until it ends.
        match (answer, slot) {
            (Ok(mut answer), Some(slot)) => {
                if let ReplyBody::Stream(s) = answer.reply.body {
                    answer.reply.body = ReplyBody::Stream(on_end(s, move |_| drop(slot)));
                }
                Ok(answer)
            }
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

    /// Forwards under an idempotency key: replay, join (this process's
    /// flight) or lead (claim the key in the shared store, or wait for
    /// another replica's answer).
    async fn keyed(
        &self,
        mut obs: Observer,
        key: String,
        skey: StoreKey,
        env: Envelope,
    ) -> Result<Answer, ApiError> {
        let fp = fingerprint(&fingerprint_scope(env.api, &env.model), &env.body);
        if let Some(answer) = self
            .claims
            .lookup(&skey, &fp)
            .await
            .map_err(|e| obs.fail(e))?
        {
            obs.replay = Some("stored");
            return Ok(self.replay(obs, answer));
        }
        if env.stream {
            return self.keyed_stream(obs, key, skey, fp, env).await;
        }
        let (claims, forwarder) = (self.claims.clone(), self.forwarder.clone());
        let max_record = self.cfg.idempotency.max_record_bytes;
        let ttl = self.cfg.idempotency.ttl;
        let deadline = env.ctx.deadline;
        let (env_api, env_owner) = (env.api, env.ctx.principal.0.clone());
        let new_trace = obs.new_trace();
        let (flight, leader) = self
            .flights
            .lead_or_join(&key, fp, move |claim| {
                async move {
                    let mut trace = new_trace;
                    let result = match claims.begin(&skey, fp, false, deadline).await {
                        Err(e) => Err(e),
                        Ok(Begin::Replay(StoredReply::Complete(body))) => {
                            Ok((HeaderMap::new(), body, true))
                        }
                        // The fingerprint covers `stream`: never a stream here.
                        Ok(Begin::Replay(StoredReply::Stream(_))) => {
                            Err(ApiError::IdempotencyMismatch)
                        }
                        Ok(Begin::Lead(lease)) => {
                            match forwarder.complete(&env, &mut trace).await {
                                Ok(Reply {
                                    headers,
                                    body: ReplyBody::Complete(body),
                                }) => {
                                    // A lease dropped unused abandons the claim.
                                    if let Some(lease) = lease.filter(|_| body.len() <= max_record)
                                    {
                                        lease
                                            .complete(&StoredReply::Complete(body.clone()), ttl)
                                            .await;
                                    }
                                    Ok((headers, body, false))
                                }
                                Ok(_) => Err(ApiError::BadGateway("unexpected stream".into())),
                                Err(e) => Err(e),
                            }
                        }
                    };
                    drop(claim);
                    (result, trace)
                }
                .boxed()
            })
            .map_err(|e| obs.fail(e))?;
        let (result, trace) = flight.await;
        if let (true, Ok((_, body, false))) = (leader, &result) {
            if env_api == ApiKind::Responses {
                self.remember_body(&env_owner, &trace, body);
            }
        }
        if leader {
            obs.trace(&trace);
        } else {
            obs.replay = Some("coalesced");
            self.metrics.idempotent_replays.inc();
        }
        match result {
            Ok((headers, body, stored)) => {
                if leader && stored {
                    obs.replay = Some("stored");
                    self.metrics.idempotent_replays.inc();
                }
                Ok(Answer {
                    reply: obs.watch(Reply {
                        headers,
                        body: ReplyBody::Complete(body),
                    }),
                    replayed: !leader || stored,
                })
            }
            Err(e) => Err(obs.fail(e)),
        }
    }

    async fn keyed_stream(
        &self,
        mut obs: Observer,
        key: String,
        skey: StoreKey,
        fp: Fingerprint,
        env: Envelope,
    ) -> Result<Answer, ApiError> {
        // Held until the stream is stored or abandoned; a client that goes
        // away before the first event drops it with this future.
        let claim = self
            .flights
            .claim_stream(&key, fp)
            .map_err(|e| obs.fail(e))?;
        let lease = match self
            .claims
            .begin(&skey, fp, true, env.ctx.deadline)
            .await
            .map_err(|e| obs.fail(e))?
        {
            Begin::Replay(answer) => {
                obs.replay = Some("stored");
                return Ok(self.replay(obs, answer));
            }
            Begin::Lead(lease) => lease,
        };
        let mut trace = obs.new_trace();
        let result = self.forwarder.stream(&env, &mut trace).await;
        obs.trace(&trace);
        let reply = result.map_err(|e| obs.fail(e))?;
        let reply = self.remember_response(&env, &trace, reply);
        let ReplyBody::Stream(stream) = reply.body else {
            return Err(obs.fail(ApiError::BadGateway("unexpected completion".into())));
        };
        // Record the events; store them only if the stream completes within
        // the record bound. The claims are released either way.
        let max_record = self.cfg.idempotency.max_record_bytes;
        let ttl = self.cfg.idempotency.ttl;
        let recording = Arc::new(Mutex::new(Some(BytesMut::new())));
        let rec = recording.clone();
        let recorded = stream.inspect(move |item| {
            let mut rec = rec.lock();
            if let (Ok(event), Some(buf)) = (item, rec.as_mut()) {
                if buf.len() + event.len() > max_record {
                    *rec = None;
                } else {
                    buf.extend_from_slice(event);
                }
            }
        });
        let recorded = on_end(recorded.boxed(), move |end| {
            let events = recording.lock().take();
            let (StreamEnd::Completed, Some(events), Some(lease)) = (end, events, lease) else {
                return;
            };
            tokio::spawn(async move {
                lease
                    .complete(&StoredReply::Stream(events.freeze()), ttl)
                    .await;
                drop(claim);
            });
        });
        Ok(Answer {
            reply: obs.watch(Reply {
                headers: reply.headers,
                body: ReplyBody::Stream(recorded),
            }),
            replayed: false,
        })
    }

    /// Notes which upstream created a Responses answer, from its body or
    /// its stream's first event carrying an id.
    fn remember_response(&self, env: &Envelope, trace: &Trace, reply: Reply) -> Reply {
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
                        .find_map(|e| crate::sse::data(e).and_then(|d| responses::response_id(&d)));
                    if let (Some(id), Some((upstream, owner))) = (id, pending.take()) {
                        index.remember(id, responses::Origin { upstream, owner });
                    }
                });
                Reply {
                    headers: reply.headers,
                    body: ReplyBody::Stream(s.boxed()),
                }
            }
        }
    }

    fn remember_body(&self, owner: &str, trace: &Trace, body: &[u8]) {
        if let (Some(upstream), Some(id)) = (&trace.upstream, responses::response_id(body)) {
            self.responses.remember(
                id,
                responses::Origin {
                    upstream: upstream.clone(),
                    owner: owner.to_string(),
                },
            );
        }
    }

    /// A request on `/v1/responses/{id}` (`GET`, `DELETE`, `/cancel`,
    /// `/input_items`) for `owner`: sent to the upstream that created the
    /// response. `None`: a response this forwarder did not create, or
    /// another client's (not found).
    pub async fn response_object(
        &self,
        owner: &Identity,
        method: http::Method,
        at: responses::ResponsePath<'_>,
    ) -> Result<Option<(HeaderMap, Bytes)>, ApiError> {
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
        Ok(Some((done.headers, done.body)))
    }

    fn replay(&self, obs: Observer, stored: StoredReply) -> Answer {
        self.metrics.idempotent_replays.inc();
        let body = match stored {
            StoredReply::Complete(body) => ReplyBody::Complete(body),
            // The recording is whole events: one run, one write.
            StoredReply::Stream(events) => {
                ReplyBody::Stream(futures::stream::once(async move { Ok(events) }).boxed())
            }
        };
        Answer {
            reply: obs.watch(Reply {
                headers: HeaderMap::new(),
                body,
            }),
            replayed: true,
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

/// What an idempotency fingerprint covers besides the body: the model,
/// and for APIs other than chat completions the API too (two APIs'
/// bodies may be byte-identical). Chat keeps the fingerprint it had, so
/// records stored by an older replica still match.
fn fingerprint_scope(api: ApiKind, model: &str) -> std::borrow::Cow<'_, str> {
    match api {
        ApiKind::ChatCompletions => std::borrow::Cow::Borrowed(model),
        _ => std::borrow::Cow::Owned(format!("{}\u{1f}{model}", api.label())),
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

    #[test]
    fn the_same_body_on_two_apis_is_two_requests_to_idempotency() {
        let body = br#"{"model":"m","input":"x"}"#;
        let e = fingerprint(&fingerprint_scope(ApiKind::Embeddings, "m"), body);
        let r = fingerprint(&fingerprint_scope(ApiKind::Responses, "m"), body);
        let c = fingerprint(&fingerprint_scope(ApiKind::ChatCompletions, "m"), body);
        assert_ne!(e, r);
        assert_eq!(c, fingerprint("m", body));
    }
}
