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

/// Who is calling: the client's name from the key file, or `anonymous`
/// when authentication is off.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity(pub String);

impl Identity {
    pub fn anonymous() -> Self {
        Self("anonymous".into())
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
                Some(p) if self.client_cert => Ok(Principal::new(Identity(p.to_string()))),
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
