//! The compact JWS form (`header.payload.signature`), read only as far as
//! choosing a key needs: the size, the shape, and the header's `alg` and
//! `kid`. Pure functions; the signature and claims are `jsonwebtoken`'s.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

use super::AuthFailure;

/// What the header says about the key to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHeader {
    pub alg: String,
    pub kid: Option<String>,
}

/// Whether a credential is meant as a JWT rather than an API key: three
/// dot-separated segments, the first a base64url JSON object (`eyJ` is
/// `{"` encoded). API keys never look like this.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.bytes().filter(|b| *b == b'.').count() == 2
}

/// Longest header segment accepted (a header holds a few short fields).
const MAX_HEADER_SEGMENT: usize = 2048;

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<serde_json::Value>,
    kid: Option<serde_json::Value>,
    /// Extensions the verifier must understand; we understand none.
    crit: Option<serde_json::Value>,
}

fn is_b64url(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks the token's size and shape and reads its header.
pub fn parse_header(token: &str, max_bytes: usize) -> Result<TokenHeader, AuthFailure> {
    if token.len() > max_bytes {
        return Err(AuthFailure::Oversize);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthFailure::Malformed);
    };
    if header.is_empty()
        || header.len() > MAX_HEADER_SEGMENT
        || payload.is_empty()
        || !is_b64url(header)
        || !is_b64url(payload)
        || !is_b64url(signature)
    {
        return Err(AuthFailure::Malformed);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthFailure::Malformed)?;
    let raw: RawHeader = serde_json::from_slice(&raw).map_err(|_| AuthFailure::Malformed)?;
    let alg = match raw.alg {
        Some(serde_json::Value::String(a)) => a,
        _ => return Err(AuthFailure::Malformed),
    };
    if alg.eq_ignore_ascii_case("none") {
        return Err(AuthFailure::AlgNone);
    }
    if raw.crit.is_some() {
        return Err(AuthFailure::Malformed);
    }
    let kid = match raw.kid {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(k)) => Some(k),
        Some(_) => return Err(AuthFailure::Malformed),
    };
    // `alg: none` tokens carry an empty signature; every other one a
    // non-empty one.
    if signature.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    Ok(TokenHeader { alg, kid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn reads_alg_and_kid() {
        let t = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"ES256","kid":"k1"}"#),
            b64("{}")
        );
        assert!(looks_like_jwt(&t));
        assert_eq!(
            parse_header(&t, 4096),
            Ok(TokenHeader {
                alg: "ES256".into(),
                kid: Some("k1".into())
            })
        );
    }

    #[test]
    fn refuses_none_oversize_and_bad_shapes() {
        let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64("{}"));
        assert_eq!(parse_header(&none, 4096), Err(AuthFailure::AlgNone));
        let none_upper = format!("{}.{}.", b64(r#"{"alg":"NONE"}"#), b64("{}"));
        assert_eq!(parse_header(&none_upper, 4096), Err(AuthFailure::AlgNone));
        let ok = format!("{}.{}.c2ln", b64(r#"{"alg":"HS256"}"#), b64("{}"));
        assert_eq!(parse_header(&ok, 10), Err(AuthFailure::Oversize));
        for bad in [
            "a.b",
            "a.b.c.d",
            "!!!.e30.c2ln",
            &format!("{}.e30.c2ln", b64("not json")),
            &format!("{}.e30.c2ln", b64(r#"{"alg":5}"#)),
            &format!("{}.e30.c2ln", b64(r#"{"alg":"HS256","crit":["x"]}"#)),
            &format!("{}.e30.", b64(r#"{"alg":"HS256"}"#)),
            &format!("{}.e3=0.c2ln", b64(r#"{"alg":"HS256"}"#)),
        ] {
            assert_eq!(
                parse_header(bad, 4096),
                Err(AuthFailure::Malformed),
                "{bad}"
            );
        }
        assert!(!looks_like_jwt("sk-plain-api-key"));
    }

    proptest! {
        /// Any string: an answer, never a panic; an accepted token is
        /// within the size bound, has three segments and a signed alg.
        #[test]
        fn never_panics_and_accepts_only_well_formed(s in ".{0,300}", max in 0usize..400) {
            if let Ok(h) = parse_header(&s, max) {
                prop_assert!(s.len() <= max);
                prop_assert_eq!(s.split('.').count(), 3);
                prop_assert!(!h.alg.eq_ignore_ascii_case("none"));
            }
        }

        /// Well-formed headers with arbitrary alg and kid strings round-trip.
        #[test]
        fn round_trips_header_fields(alg in "[A-Za-z0-9]{1,10}", kid in proptest::option::of(".{0,40}"), sig in "[A-Za-z0-9_-]{1,50}") {
            let header = serde_json::json!({"alg": alg, "kid": kid});
            let t = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), b64("{}"), sig);
            let r = parse_header(&t, 8192);
            if alg.eq_ignore_ascii_case("none") {
                prop_assert_eq!(r, Err(AuthFailure::AlgNone));
            } else {
                prop_assert_eq!(r, Ok(TokenHeader { alg, kid }));
            }
        }

        /// Bytes flipped anywhere in a valid token never panic the parser.
        #[test]
        fn mutated_tokens_never_panic(pos in 0usize..64, byte in any::<u8>()) {
            let t = format!("{}.{}.c2lnbmF0dXJl", b64(r#"{"alg":"RS256","kid":"a"}"#), b64(r#"{"sub":"x"}"#));
            let mut bytes = t.into_bytes();
            let i = pos % bytes.len();
            bytes[i] = byte;
            if let Ok(s) = String::from_utf8(bytes) {
                let _ = parse_header(&s, 8192);
            }
        }
    }
}
