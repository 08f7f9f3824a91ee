//! JWT verification: header → pinned key → `jsonwebtoken` (signature, `exp`,
//! `nbf`, `iss`, `aud`) → our own `iat`/max-age check → the principal from
//! the claims. A bounded cache remembers verified tokens (by SHA-256, never
//! the token itself) until they expire or the keys change.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::jwks::{parse_algorithms, KeyStore, KeysError};
use super::token::parse_header;
use super::{AuthFailure, Identity, Principal};
use forwarder_config::JwtConfig;

pub struct JwtVerifier {
    cfg: JwtConfig,
    keys: Arc<KeyStore>,
    /// One validation per configured algorithm, pinned to it alone.
    validations: Vec<(Algorithm, Validation)>,
    cache: Option<moka::sync::Cache<[u8; 32], Cached>>,
}

#[derive(Clone)]
struct Cached {
    principal: Principal,
    /// Unix seconds after which the token no longer verifies.
    valid_until: Option<u64>,
    generation: u64,
}

/// How long an entry without an expiry stays cached (a bound on how late a
/// changed claim mapping is seen; key changes void entries at once).
const CACHE_TTL: Duration = Duration::from_secs(300);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn failure(kind: &ErrorKind) -> AuthFailure {
    match kind {
        ErrorKind::InvalidSignature => AuthFailure::BadSignature,
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
        ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
        ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
            AuthFailure::MissingClaim
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthFailure::AlgNotAllowed,
        // Keys that do not fit the algorithm are excluded before we get
        // here; a signature that does not parse as one is a bad signature.
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => {
            AuthFailure::BadSignature
        }
        _ => AuthFailure::Malformed,
    }
}

impl JwtVerifier {
    pub fn new(cfg: &JwtConfig) -> Result<Self, KeysError> {
        let algs = parse_algorithms(&cfg.algorithms)?;
        let validations = algs
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = cfg.leeway.as_secs();
                v.validate_exp = true;
                v.validate_nbf = true;
                let mut required = Vec::new();
                if cfg.require_exp {
                    required.push("exp");
                }
                if let Some(iss) = &cfg.issuer {
                    v.set_issuer(&[iss]);
                    required.push("iss");
                }
                if cfg.audiences.is_empty() {
                    v.validate_aud = false;
                } else {
                    v.set_audience(&cfg.audiences);
                    required.push("aud");
                }
                v.set_required_spec_claims(&required);
                (alg, v)
            })
            .collect();
        let cache = (cfg.cache_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(cfg.cache_entries)
                .time_to_live(CACHE_TTL)
                .build()
        });
        Ok(Self {
            cfg: cfg.clone(),
            keys: Arc::new(KeyStore::load(cfg)?),
            validations,
            cache,
        })
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthFailure> {
        if token.len() > self.cfg.max_token_bytes {
            return Err(AuthFailure::Oversize);
        }
        let generation = self.keys.generation();
        let digest: Option<[u8; 32]> = self.cache.as_ref().map(|_| Sha256::digest(token).into());
        if let (Some(cache), Some(d)) = (&self.cache, &digest) {
            if let Some(hit) = cache.get(d) {
                if hit.generation == generation
                    && hit.valid_until.is_none_or(|until| now_secs() <= until)
                {
                    return Ok(hit.principal);
                }
                cache.invalidate(d);
            }
        }
        let (principal, valid_until) = self.verify_uncached(token)?;
        if let (Some(cache), Some(d)) = (&self.cache, digest) {
            cache.insert(
                d,
                Cached {
                    principal: principal.clone(),
                    valid_until,
                    generation,
                },
            );
        }
        Ok(principal)
    }

    fn verify_uncached(&self, token: &str) -> Result<(Principal, Option<u64>), AuthFailure> {
        let header = parse_header(token, self.cfg.max_token_bytes)?;
        let alg: Algorithm = header.alg.parse().map_err(|_| AuthFailure::AlgNotAllowed)?;
        let validation = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
            .ok_or(AuthFailure::AlgNotAllowed)?;
        let keys = self.keys.current();
        let candidates = match keys.candidates(alg, header.kid.as_deref()) {
            Err(AuthFailure::UnknownKid) => {
                self.keys.unknown_kid();
                return Err(AuthFailure::UnknownKid);
            }
            other => other?,
        };
        let mut last = AuthFailure::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return self.principal(&data.claims),
                Err(e) => {
                    last = failure(e.kind());
                    // Only a wrong signature is worth another key.
                    if last != AuthFailure::BadSignature {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// Checks `iat` against the maximum age and maps the claims.
    fn principal(
        &self,
        claims: &Map<String, Value>,
    ) -> Result<(Principal, Option<u64>), AuthFailure> {
        let now = now_secs();
        let leeway = self.cfg.leeway.as_secs();
        let mut valid_until = claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|exp| exp.saturating_add(leeway));
        if let Some(max_age) = self.cfg.max_age {
            let iat = claims
                .get("iat")
                .and_then(Value::as_u64)
                .ok_or(AuthFailure::MissingClaim)?;
            if iat > now.saturating_add(leeway) {
                return Err(AuthFailure::NotYetValid);
            }
            let until = iat.saturating_add(max_age.as_secs()).saturating_add(leeway);
            if now > until {
                return Err(AuthFailure::TooOld);
            }
            valid_until = Some(valid_until.map_or(until, |v| v.min(until)));
        }
        let name = match claims.get(&self.cfg.principal_claim) {
            Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 256 => s.clone(),
            _ => return Err(AuthFailure::NoPrincipal),
        };
        // The configured issuer (every accepted token carries it), else the
        // token's own `iss`, if any.
        let issuer = match &self.cfg.issuer {
            Some(i) => i.as_str(),
            None => claims.get("iss").and_then(Value::as_str).unwrap_or(""),
        };
        let models = self
            .cfg
            .models_claim
            .as_ref()
            .and_then(|c| claims.get(c))
            .map(|v| match v {
                Value::Array(items) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect(),
                // OAuth-style space-separated list.
                Value::String(s) => s.split_whitespace().map(String::from).collect(),
                _ => Vec::new(),
            })
            .map(Arc::from);
        let tier = self
            .cfg
            .tier_claim
            .as_ref()
            .and_then(|c| claims.get(c))
            .and_then(Value::as_str)
            .map(Arc::from);
        Ok((
            Principal {
                identity: Identity::jwt(issuer, &name),
                models,
                tier,
            },
            valid_until,
        ))
    }
}
