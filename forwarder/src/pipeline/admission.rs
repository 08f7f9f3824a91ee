//! The front of the pipeline: what a front end knows about a request
//! ([`RequestMeta`]), and the stages before the body is read or spent:
//! authenticate, rate-limit, then charge shared limits and check budgets
//! for work that runs later.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

use super::observe::Observer;
use super::{rate_limit, shared_limit, ApiKind, Pipeline};
use crate::api::ApiError;
use crate::auth::{Authenticators, Identity, Principal};
use crate::telemetry::Protocol;

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

/// A request that passed authentication and the rate limit; its body has
/// not been read yet. Dropping it counts the request as abandoned.
pub struct Admission {
    pub(super) obs: Observer,
    pub(super) principal: Identity,
    /// Models a token restricts the client to.
    pub(super) models: Option<Arc<[String]>>,
    /// The rate-limit tier in force, if any.
    pub(super) tier: Option<Arc<str>>,
    pub(super) meta: RequestMeta,
    pub(super) started: Instant,
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

impl Pipeline {
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

    pub(super) fn observer(&self, protocol: Protocol, request_id: &str) -> Observer {
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

    /// Refuses work of unknown size (a batch at creation) for `who` when
    /// a budget of theirs is already spent. Charges nothing.
    pub async fn check_budget_room(&self, who: &Principal) -> Result<(), ApiError> {
        match &self.budgets {
            Some(b) => b.check_room(&who.identity, who.tier.as_deref()).await,
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
    pub(super) fn tier(&self, who: &Identity, claimed: Option<&str>) -> Option<Arc<str>> {
        let cfg = self.cfg.rate_limit.as_ref()?;
        rate_limit::tier(cfg, who, claimed).map(Arc::from)
    }
}
