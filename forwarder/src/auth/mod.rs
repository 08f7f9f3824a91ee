//! Client authentication: API keys, JWTs and verified client certificates.
//! The [`Identity`] it yields is what rate limits and idempotency keys are
//! scoped by.

mod api_keys;
mod failure;
pub mod jwks;
mod jwt;
pub mod token;

pub use api_keys::{parse_keys, ApiKeys, KeyError, ParseError};
pub use failure::AuthFailure;
pub use jwt::JwtVerifier;

use std::sync::Arc;

use http::HeaderMap;

/// Who is calling, namespaced by how the client authenticated, so that one
/// name presented through two methods is two clients: `key:<name>` (an API
/// key's name in the key file), `jwt:<issuer>:<subject>` (the token's
/// principal claim under its issuer, `:` and `%` in the issuer
/// percent-encoded), `cert:<subject CN>` (a verified client certificate),
/// or `anonymous` when authentication is off. Everything scoped by client
/// (idempotency records, the answer cache, jobs, files, batches, rate and
/// token limits, logs) is scoped by this string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity(pub String);

impl Identity {
    pub fn anonymous() -> Self {
        Self("anonymous".into())
    }

    /// The client of an API key named `name`.
    pub fn api_key(name: &str) -> Self {
        Self(format!("key:{name}"))
    }

    /// The client a JWT from `issuer` (empty when the token names none)
    /// calls `subject`.
    pub fn jwt(issuer: &str, subject: &str) -> Self {
        let issuer = issuer.replace('%', "%25").replace(':', "%3A");
        Self(format!("jwt:{issuer}:{subject}"))
    }

    /// The client a verified client certificate's subject CN names.
    pub fn cert(subject: &str) -> Self {
        Self(format!("cert:{subject}"))
    }

    /// The API key's name, for an API-key client.
    pub fn key_name(&self) -> Option<&str> {
        self.0.strip_prefix("key:")
    }
}

/// An authenticated client: its identity and what its token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub identity: Identity,
    /// Models the client may use; `None`: every model.
    pub models: Option<Arc<[String]>>,
    /// Rate-limit tier, from a JWT claim.
    pub tier: Option<Arc<str>>,
}

impl Principal {
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            models: None,
            tier: None,
        }
    }

    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// The configured ways to authenticate.
#[derive(Default)]
pub struct Authenticators<'a> {
    pub keys: Option<&'a ApiKeys>,
    pub jwt: Option<&'a JwtVerifier>,
    /// The verified client certificate's subject names the client.
    pub client_cert: bool,
}

impl Authenticators<'_> {
    fn any(&self) -> bool {
        self.keys.is_some() || self.jwt.is_some() || self.client_cert
    }

    /// Who presents `credential` (over a connection whose verified client
    /// certificate names `peer`). A credential is tried as an API key, then,
    /// if it looks like one, as a JWT; without one, a verified client
    /// certificate names the client when so configured.
    pub fn authenticate(
        &self,
        credential: Option<&str>,
        peer: Option<&str>,
    ) -> Result<Principal, AuthFailure> {
        if !self.any() {
            return Ok(Principal::new(Identity::anonymous()));
        }
        match credential.filter(|c| !c.is_empty()) {
            Some(c) => {
                if let Some(id) = self.keys.and_then(|k| k.verify(c)) {
                    return Ok(Principal::new(id));
                }
                match self.jwt {
                    Some(jwt) if token::looks_like_jwt(c) => jwt.verify(c),
                    Some(_) if self.keys.is_none() => Err(AuthFailure::Malformed),
                    _ => Err(AuthFailure::UnknownKey),
                }
            }
            None => match peer {
                Some(p) if self.client_cert => Ok(Principal::new(Identity::cert(p))),
                _ => Err(AuthFailure::Missing),
            },
        }
    }
}

/// The credential a request presents: `Authorization: Bearer <key>` or
/// `x-api-key: <key>`.
pub fn credential(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_name_through_two_methods_is_two_clients() {
        let ids = [
            Identity::api_key("alice"),
            Identity::jwt("", "alice"),
            Identity::jwt("https://id.example", "alice"),
            Identity::cert("alice"),
            Identity::anonymous(),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // An issuer's `:` cannot pass for the separator.
        assert_ne!(Identity::jwt("a:b", "c"), Identity::jwt("a", "b:c"));
        assert_eq!(Identity::api_key("alice").key_name(), Some("alice"));
        assert_eq!(Identity::jwt("", "key:alice").key_name(), None);
    }

    #[test]
    fn a_certificate_naming_an_api_key_client_is_another_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "alice: sk-alice\n").unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        let auth = Authenticators {
            keys: Some(&keys),
            jwt: None,
            client_cert: true,
        };
        let by_key = auth.authenticate(Some("sk-alice"), None).unwrap();
        let by_cert = auth.authenticate(None, Some("alice")).unwrap();
        assert_eq!(by_key.identity, Identity::api_key("alice"));
        assert_eq!(by_cert.identity, Identity::cert("alice"));
        assert_ne!(by_key.identity, by_cert.identity);
    }

    #[test]
    fn bearer_and_x_api_key_are_both_accepted() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h), None);
        h.insert("x-api-key", "k1".parse().unwrap());
        assert_eq!(credential(&h), Some("k1"));
        h.insert("authorization", "bearer  k2".parse().unwrap());
        assert_eq!(credential(&h), Some("k2"), "Bearer wins, case-insensitive");
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(credential(&h), Some("k1"));
    }
}
