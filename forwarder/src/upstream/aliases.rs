//! Model aliases (`models:` in the config): a name clients send, served by
//! one of several models. The decisions are pure functions here: the order
//! in which targets are tried, which failures move on to the next target,
//! and the one-field edit of the body (its top-level `model`).

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::api::ApiError;
use forwarder_config::Config;

/// One alias: its targets (model, weight) in their listed order.
#[derive(Debug, Clone)]
pub struct Alias {
    pub targets: Vec<(String, u32)>,
    pub rewrite_model: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Aliases(HashMap<String, Alias>);

impl Aliases {
    pub fn from_config(cfg: &Config) -> Self {
        Self(
            cfg.models
                .iter()
                .map(|(name, a)| {
                    let targets = a
                        .targets
                        .iter()
                        .map(|t| (t.model.clone(), t.weight))
                        .collect();
                    let alias = Alias {
                        targets,
                        rewrite_model: a.rewrite_model,
                    };
                    (name.clone(), alias)
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&Alias> {
        self.0.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

/// The order in which targets with `weights` are tried: the first chosen
/// by weight (`roll` uniform in `[0, 1)`) among those weighing more than
/// 0, then every other target in its listed order.
pub fn order(weights: &[u32], roll: f64) -> Vec<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let mut first = None;
    if total > 0 {
        let mut point = (roll.clamp(0.0, 1.0) * total as f64) as u64;
        point = point.min(total - 1);
        for (i, w) in weights.iter().enumerate() {
            let w = u64::from(*w);
            if point < w {
                first = Some(i);
                break;
            }
            point -= w;
        }
    }
    let mut out: Vec<usize> = first.into_iter().collect();
    out.extend((0..weights.len()).filter(|i| Some(*i) != first));
    out
}

/// Whether a target's failure (after its own retries) means the next
/// target should be tried: the upstream failed (5xx, reset, malformed
/// answer), was busy (429), slow (timeout) or unavailable (every circuit
/// open), or refused a prompt too long for it (OpenAI's
/// `context_length_exceeded`, Anthropic's "prompt is too long"). A request
/// the client got wrong fails the same everywhere, and is answered.
pub fn falls_back(e: &ApiError) -> bool {
    match e {
        ApiError::BadGateway(_)
        | ApiError::GatewayTimeout(_)
        | ApiError::RateLimited { .. }
        | ApiError::NoHealthyUpstream { .. } => true,
        ApiError::UpstreamRejected { body, .. } => {
            let has = |needle: &[u8]| memchr::memmem::find(body, needle).is_some();
            has(b"context_length_exceeded") || has(b"prompt is too long")
        }
        _ => false,
    }
}

/// `body` with the value of its top-level `model` replaced by `model` (as
/// a JSON string); every other byte stays as it came.
pub fn with_model(body: &[u8], model: &str) -> Result<Bytes, ApiError> {
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(borrow)]
        model: &'a RawValue,
    }
    let top: Top = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    let raw = top.model.get().as_bytes();
    let start = raw.as_ptr() as usize - body.as_ptr() as usize;
    let end = start + raw.len();
    let value = serde_json::to_string(model).unwrap_or_default();
    let mut out = BytesMut::with_capacity(body.len() + value.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(&body[end..]);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_target_is_weighted_and_the_rest_follow_in_order() {
        assert_eq!(order(&[1, 1, 1], 0.0), [0, 1, 2]);
        assert_eq!(order(&[1, 1, 1], 0.5), [1, 0, 2]);
        assert_eq!(order(&[1, 1, 1], 0.99), [2, 0, 1]);
        // Weight 0: a fallback only.
        assert_eq!(order(&[0, 3], 0.0), [1, 0]);
        assert_eq!(order(&[5, 0, 0], 0.99), [0, 1, 2]);
        assert_eq!(order(&[1], 1.0), [0]);
        // Shares follow the weights.
        let firsts: Vec<usize> = (0..100)
            .map(|i| order(&[3, 1], f64::from(i) / 100.0)[0])
            .collect();
        assert_eq!(firsts.iter().filter(|f| **f == 0).count(), 75);
    }

    #[test]
    fn only_failures_that_mean_elsewhere_fall_back() {
        let rejected = |body: &'static str| ApiError::UpstreamRejected {
            status: 400,
            body: Bytes::from_static(body.as_bytes()),
        };
        for e in [
            ApiError::BadGateway("x".into()),
            ApiError::GatewayTimeout("x".into()),
            ApiError::RateLimited { retry_after: None },
            ApiError::NoHealthyUpstream {
                model: "m".into(),
                retry_after: None,
            },
            rejected(r#"{"error":{"code":"context_length_exceeded"}}"#),
            rejected(r#"{"type":"error","error":{"message":"prompt is too long: 9 > 8"}}"#),
        ] {
            assert!(falls_back(&e), "{e:?}");
        }
        for e in [
            ApiError::BadRequest("x".into()),
            ApiError::Unauthorized,
            ApiError::PayloadTooLarge(1),
            rejected(r#"{"error":{"code":"invalid_value"}}"#),
        ] {
            assert!(!falls_back(&e), "{e:?}");
        }
    }

    #[test]
    fn only_the_top_level_model_is_rewritten() {
        let body = br#"{ "messages":[{"model":"inner"}], "model" : "fast" ,"x":1.50}"#;
        let out = with_model(body, "qwen-\"max\"").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "messages":[{"model":"inner"}], "model" : "qwen-\"max\"" ,"x":1.50}"#
        );
        assert!(with_model(br#"{"model":"a","model":"b"}"#, "c").is_err());
        assert!(with_model(b"{", "c").is_err());
    }
}
