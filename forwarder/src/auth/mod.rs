//! Client authentication. API keys today; the [`Identity`] it yields is what
//! rate limits and idempotency keys are scoped by.

mod api_keys;

pub use api_keys::{parse_keys, ApiKeys, KeyError, ParseError};

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
