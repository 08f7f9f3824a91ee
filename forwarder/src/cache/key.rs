//! The canonical form of a request, the cache key's input.
//!
//! Normalised away (they do not change the answer): JSON whitespace and
//! object key order, and the fields `stream`, `stream_options`, `user`,
//! `metadata` and `store`. Everything else counts as written: `0` and
//! `0.0` are different requests, as are reordered messages.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Fields dropped from the canonical request.
pub const IGNORED: [&str; 5] = ["stream", "stream_options", "user", "metadata", "store"];

pub struct Canonical {
    /// Sorted-key JSON of the request without the ignored fields.
    pub bytes: Vec<u8>,
    pub digest: [u8; 32],
    /// `temperature` is present and zero.
    pub deterministic: bool,
}

/// `None` if the body is not a JSON object (the pipeline has already
/// refused those; the cache just stays out of the way).
pub fn canonical(body: &[u8]) -> Option<Canonical> {
    let Value::Object(mut map) = serde_json::from_slice::<Value>(body).ok()? else {
        return None;
    };
    for f in IGNORED {
        map.remove(f);
    }
    let deterministic = map
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let mut bytes = Vec::with_capacity(body.len());
    write_sorted(&Value::Object(map), &mut bytes);
    let digest = Sha256::digest(&bytes).into();
    Some(Canonical {
        bytes,
        digest,
        deterministic,
    })
}

/// The canonical form of a request of `api`. Chat completions keep the
/// key they always had; another API's key is prefixed with its name (an
/// embeddings and a Responses body may be byte-identical), and embeddings
/// are deterministic whatever their fields.
pub fn canonical_for(api: crate::pipeline::ApiKind, body: &[u8]) -> Option<Canonical> {
    let mut c = canonical(body)?;
    if api != crate::pipeline::ApiKind::ChatCompletions {
        let mut bytes = Vec::with_capacity(c.bytes.len() + 16);
        bytes.extend_from_slice(api.label().as_bytes());
        bytes.push(0x1f);
        bytes.extend_from_slice(&c.bytes);
        c.digest = Sha256::digest(&bytes).into();
        c.bytes = bytes;
        c.deterministic |= api.deterministic();
    }
    Some(c)
}

/// Serialises with object keys sorted at every level, whatever map order
/// serde_json was built with.
fn write_sorted(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                write_sorted(&m[k], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(x, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::ApiKind;

    #[test]
    fn the_api_is_part_of_the_key_and_embeddings_are_deterministic() {
        let body = br#"{"model":"m","input":"hi"}"#;
        let chat = canonical_for(ApiKind::ChatCompletions, body).unwrap();
        let emb = canonical_for(ApiKind::Embeddings, body).unwrap();
        let resp = canonical_for(ApiKind::Responses, body).unwrap();
        assert_eq!(chat.digest, canonical(body).unwrap().digest);
        assert_ne!(emb.digest, chat.digest);
        assert_ne!(emb.digest, resp.digest);
        assert!(emb.deterministic && !chat.deterministic && !resp.deterministic);
    }

    #[test]
    fn non_semantic_differences_share_a_key_semantic_ones_do_not() {
        let a = canonical(
            br#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let b = canonical(
            br#"{ "messages":[{"content":"hi","role":"user"}], "stream":true, "stream_options":{"include_usage":true},
                 "user":"u-1","metadata":{"x":"y"},"store":true, "temperature":0, "model":"m" }"#,
        )
        .unwrap();
        assert_eq!(a.digest, b.digest);
        assert!(a.deterministic && b.deterministic);
        let c = canonical(
            br#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi!"}]}"#,
        )
        .unwrap();
        assert_ne!(a.digest, c.digest);
        let d = canonical(
            br#"{"model":"n","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_ne!(a.digest, d.digest, "the model is part of the key");
        let e = canonical(br#"{"model":"m","temperature":0.7,"messages":[]}"#).unwrap();
        assert!(!e.deterministic);
        assert!(
            !canonical(br#"{"model":"m","messages":[]}"#)
                .unwrap()
                .deterministic
        );
        assert!(canonical(b"[1]").is_none());
    }
}
