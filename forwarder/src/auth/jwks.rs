//! Verification keys, each pinned to the algorithms it may verify: an HMAC
//! secret verifies HS* only, an RSA key RS*/PS*, a P-256 key ES256, a P-384
//! key ES384, an Ed25519 key EdDSA; a JWK's own `alg` narrows that further,
//! and only configured algorithms count. So `alg: none` and an HS256 token
//! "signed" with an RSA public key find no key.
//!
//! Sources: a secret file, a JWKS file (polled for changes) or a JWKS URL
//! (fetched at start, every `refresh_interval`, and on an unknown `kid` at
//! most every `min_refresh_interval`). A failed reload keeps the keys in
//! force; errors never quote key material.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::AuthFailure;
use crate::reload::{self, Reload, SourceDigest, Swap};
use forwarder_config::JwtConfig;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secret in {0} is empty")]
    EmptySecret(PathBuf),
    #[error("not a JWKS document (expected {{\"keys\": [...]}}): {0}")]
    Jwks(String),
    #[error("fetching the JWKS: {0}")]
    Fetch(String),
    #[error("unknown algorithm {0:?}")]
    Algorithm(String),
}

pub struct VerifyKey {
    pub kid: Option<String>,
    pub algs: Vec<Algorithm>,
    pub key: DecodingKey,
}

/// A loaded set of keys; replaced whole on reload.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

pub fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, KeysError> {
    names
        .iter()
        .map(|n| n.parse().map_err(|_| KeysError::Algorithm(n.clone())))
        .collect()
}

const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The algorithms a JWK may verify: its type's, narrowed by its `alg`.
fn jwk_algorithms(jwk: &Jwk) -> Vec<Algorithm> {
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA.to_vec(),
        AlgorithmParameters::OctetKey(_) => HMAC.to_vec(),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => vec![],
        },
    };
    match jwk
        .common
        .key_algorithm
        .map(|a| a.to_string().parse::<Algorithm>())
    {
        None => family,
        Some(Ok(alg)) if family.contains(&alg) => vec![alg],
        Some(_) => vec![],
    }
}

impl KeySet {
    pub fn from_secret(secret: &[u8], allowed: &[Algorithm]) -> Self {
        Self {
            keys: vec![VerifyKey {
                kid: None,
                algs: HMAC
                    .iter()
                    .copied()
                    .filter(|a| allowed.contains(a))
                    .collect(),
                key: DecodingKey::from_secret(secret),
            }],
        }
    }

    /// Reads a JWKS; keys that are for encryption, of unsupported types or
    /// for no allowed algorithm are skipped (and logged by count).
    pub fn from_jwks(json: &[u8], allowed: &[Algorithm]) -> Result<Self, KeysError> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| {
            // serde's message may quote input; give the position only.
            KeysError::Jwks(format!("line {} column {}", e.line(), e.column()))
        })?;
        let mut keys = Vec::new();
        let mut skipped = 0;
        for jwk in &set.keys {
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                skipped += 1;
                continue;
            }
            let algs: Vec<Algorithm> = jwk_algorithms(jwk)
                .into_iter()
                .filter(|a| allowed.contains(a))
                .collect();
            match DecodingKey::from_jwk(jwk) {
                Ok(key) if !algs.is_empty() => keys.push(VerifyKey {
                    kid: jwk.common.key_id.clone(),
                    algs,
                    key,
                }),
                _ => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                loaded = keys.len(),
                "JWKS keys skipped (encryption keys, unsupported types, or no allowed algorithm)"
            );
        }
        Ok(Self { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys that may verify a token with this header, best first.
    pub fn candidates(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Vec<&VerifyKey>, AuthFailure> {
        if self.keys.is_empty() {
            return Err(AuthFailure::KeysUnavailable);
        }
        let by_alg = |k: &&VerifyKey| k.algs.contains(&alg);
        let found: Vec<&VerifyKey> = match kid {
            Some(kid) if self.keys.iter().any(|k| k.kid.is_some()) => {
                let with_kid: Vec<&VerifyKey> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .collect();
                if with_kid.is_empty() {
                    return Err(AuthFailure::UnknownKid);
                }
                with_kid.into_iter().filter(by_alg).collect()
            }
            // No kids to match (a lone secret): every key of the algorithm.
            _ => self.keys.iter().filter(by_alg).collect(),
        };
        if found.is_empty() {
            return Err(AuthFailure::AlgNotAllowed);
        }
        Ok(found)
    }
}

enum Source {
    Secret(PathBuf),
    File(PathBuf),
    Url(String),
}

/// The current keys and how to renew them.
pub struct KeyStore {
    source: Source,
    allowed: Vec<Algorithm>,
    keys: Swap<KeySet>,
    /// Bumped whenever the keys change (verified-token cache entries of an
    /// older generation are void: a removed key revokes its tokens at once).
    generation: AtomicU64,
    /// Asks the URL refresher for an early fetch (unknown `kid`).
    refresh_now: Notify,
}

fn read(path: &Path) -> Result<Vec<u8>, KeysError> {
    std::fs::read(path).map_err(|source| KeysError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Reload for KeyStore {
    type Error = KeysError;
    const WHAT: &'static str = "JWT keys";

    /// Re-reads a file source; returns whether the keys changed.
    fn reload(&self) -> Result<bool, KeysError> {
        match &self.source {
            Source::Secret(p) | Source::File(p) => self.install(&read(p)?),
            Source::Url(_) => Ok(false),
        }
    }
}

impl KeyStore {
    /// Loads file-based keys (failing the start if they cannot be read);
    /// a URL source starts empty and is filled by [`KeyStore::watch`].
    pub fn load(cfg: &JwtConfig) -> Result<Self, KeysError> {
        let allowed = parse_algorithms(&cfg.algorithms)?;
        let source = match (&cfg.secret_file, &cfg.jwks_file, &cfg.jwks_url) {
            (Some(p), _, _) => Source::Secret(p.clone()),
            (_, Some(p), _) => Source::File(p.clone()),
            (_, _, Some(u)) => Source::Url(u.clone()),
            _ => return Err(KeysError::Jwks("no key source configured".into())),
        };
        let store = Self {
            source,
            allowed,
            keys: Swap::new(KeySet::default(), [0; 32]),
            generation: AtomicU64::new(0),
            refresh_now: Notify::new(),
        };
        if !matches!(store.source, Source::Url(_)) {
            store.reload()?;
        }
        Ok(store)
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.keys.get()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn parse(&self, bytes: &[u8]) -> Result<KeySet, KeysError> {
        match &self.source {
            Source::Secret(path) => {
                let secret = trim_ascii(bytes);
                if secret.is_empty() {
                    return Err(KeysError::EmptySecret(path.clone()));
                }
                Ok(KeySet::from_secret(secret, &self.allowed))
            }
            Source::File(_) | Source::Url(_) => KeySet::from_jwks(bytes, &self.allowed),
        }
    }

    /// Installs keys from source bytes; returns whether they changed.
    fn install(&self, bytes: &[u8]) -> Result<bool, KeysError> {
        let fp: SourceDigest = Sha256::digest(bytes).into();
        if self.keys.is_current(&fp) {
            return Ok(false);
        }
        let set = self.parse(bytes)?;
        if set.is_empty() {
            tracing::warn!("the JWT key source holds no usable key: every token will be rejected");
        }
        let changed = self.keys.install(set, fp);
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(changed)
    }

    /// A token named a `kid` we do not have: ask for an early fetch.
    pub fn unknown_kid(&self) {
        if matches!(self.source, Source::Url(_)) {
            self.refresh_now.notify_one();
        }
    }

    /// Keeps the keys fresh until the task is aborted: polls a file source
    /// every `refresh_interval`; fetches a URL source at once, then every
    /// `refresh_interval` and on an unknown `kid` no more often than
    /// `min_refresh_interval` (failures retried after that interval).
    pub fn watch(self: Arc<Self>, cfg: &JwtConfig) -> tokio::task::JoinHandle<()> {
        let (every, min) = (cfg.refresh_interval, cfg.min_refresh_interval);
        match &self.source {
            Source::Url(url) => {
                let url = url.clone();
                tokio::spawn(async move { self.refresh_url(url, every, min).await })
            }
            _ => reload::poll(self, every.min(Duration::from_secs(5))),
        }
    }

    async fn refresh_url(&self, url: String, every: Duration, min: Duration) {
        let client = fetch::Client::new();
        loop {
            let started = Instant::now();
            let ok = match client.get(&url).await {
                Ok(body) => match self.install(&body) {
                    Ok(changed) => {
                        if changed {
                            tracing::info!(keys = self.current().len(), "JWKS fetched");
                        }
                        true
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "JWKS refresh failed; keeping the previous keys");
                        false
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS fetch failed; keeping the previous keys");
                    false
                }
            };
            let next = if ok {
                every
            } else {
                min.max(Duration::from_secs(1))
            };
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = self.refresh_now.notified() => {
                    // Rate-limit fetches caused by unknown kids.
                    tokio::time::sleep_until(started + min).await;
                }
            }
        }
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

mod fetch {
    //! A small HTTPS GET for JWKS documents (system roots), bounded in
    //! size and time.

    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Limited};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    use super::KeysError;

    const MAX_JWKS_BYTES: usize = 1024 * 1024;
    const TIMEOUT: Duration = Duration::from_secs(10);

    pub struct Client(
        hyper_util::client::legacy::Client<
            hyper_rustls::HttpsConnector<HttpConnector>,
            Empty<Bytes>,
        >,
    );

    impl Client {
        pub fn new() -> Self {
            crate::install_crypto_provider();
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            let tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .build();
            Self(hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https))
        }

        pub async fn get(&self, url: &str) -> Result<Bytes, KeysError> {
            let err = |e: &dyn std::fmt::Display| KeysError::Fetch(e.to_string());
            let uri: http::Uri = url.parse().map_err(|e| err(&e))?;
            let work = async {
                let resp = self.0.get(uri).await.map_err(|e| err(&e))?;
                if !resp.status().is_success() {
                    return Err(KeysError::Fetch(format!("status {}", resp.status())));
                }
                Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .map_err(|e| err(&e))
            };
            tokio::time::timeout(TIMEOUT, work)
                .await
                .map_err(|_| KeysError::Fetch("timed out".into()))?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RSA JWK (a real 2048-bit modulus is not needed to pick keys).
    const JWKS: &str = r#"{"keys": [
        {"kty": "RSA", "kid": "rs", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"},
        {"kty": "oct", "kid": "oct", "alg": "HS256", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"},
        {"kty": "oct", "kid": "enc", "use": "enc", "k": "c2VjcmV0"}
    ]}"#;

    #[test]
    fn keys_verify_only_their_own_pinned_algorithms() {
        let allowed = [Algorithm::RS256, Algorithm::HS256, Algorithm::ES256];
        let set = KeySet::from_jwks(JWKS.as_bytes(), &allowed).unwrap();
        assert_eq!(set.len(), 2, "the encryption key is skipped");
        let n = |alg, kid| set.candidates(alg, kid).map(|c| c.len());
        assert_eq!(n(Algorithm::RS256, Some("rs")), Ok(1));
        // Algorithm confusion: HS256 named with the RSA key's kid.
        assert_eq!(
            n(Algorithm::HS256, Some("rs")),
            Err(AuthFailure::AlgNotAllowed)
        );
        assert_eq!(n(Algorithm::HS256, Some("oct")), Ok(1));
        assert_eq!(
            n(Algorithm::RS256, Some("oct")),
            Err(AuthFailure::AlgNotAllowed)
        );
        assert_eq!(
            n(Algorithm::RS256, Some("gone")),
            Err(AuthFailure::UnknownKid)
        );
        assert_eq!(n(Algorithm::ES256, None), Err(AuthFailure::AlgNotAllowed));
        // Not allowed by configuration: PS256 although the key is RSA.
        assert_eq!(
            n(Algorithm::PS256, Some("rs")),
            Err(AuthFailure::AlgNotAllowed)
        );

        let secret = KeySet::from_secret(b"s3cret", &allowed);
        assert_eq!(
            secret.candidates(Algorithm::HS256, None).map(|c| c.len()),
            Ok(1)
        );
        assert_eq!(
            secret.candidates(Algorithm::RS256, None).map(|c| c.len()),
            Err(AuthFailure::AlgNotAllowed)
        );
        assert_eq!(
            KeySet::default()
                .candidates(Algorithm::RS256, None)
                .map(|c| c.len()),
            Err(AuthFailure::KeysUnavailable)
        );
        assert!(KeySet::from_jwks(b"{not json", &allowed).is_err());
    }
}
