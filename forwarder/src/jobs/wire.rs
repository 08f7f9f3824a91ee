//! A job as a queue message: everything a worker on any replica needs to
//! run it and to answer its owner.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::model::{BatchTag, Callback, DeliveryState, Grants, Job, JobKind, JobState};
use crate::auth::Identity;

#[derive(Serialize, Deserialize)]
struct WireJob {
    v: u32,
    id: String,
    owner: String,
    /// The simple API's client `request_id` (`null` when it sent none);
    /// absent for a chat job.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    simple: Option<Option<String>>,
    model: String,
    /// The chat-completions body (JSON, so UTF-8), byte for byte.
    body: String,
    headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    callback_url: Option<String>,
    created_at: u64,
    #[serde(default)]
    created_ms: u64,
    expires_at_ms: u64,
    /// A Batch API request's batch and `custom_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch: Option<BatchTag>,
    /// The models the client's credential grants (absent: every model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    models: Option<Vec<String>>,
    /// The tier its token claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tier: Option<String>,
    /// Shared limits charged at submission (absent from older forwarders:
    /// charged when run).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    charged: bool,
    /// The API of a job other than chat completions (`embeddings`,
    /// `responses`; absent: chat, as older forwarders wrote every job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api: Option<String>,
    /// The submission span's `traceparent`, when traces are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trace: Option<String>,
}

/// A field that is present, even as `null` (plain serde reads a `null`
/// double option as absent: a simple job without a `request_id` came back
/// as a chat job).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Debug, thiserror::Error)]
#[error("not a job message: {0}")]
pub struct DecodeError(String);

pub fn encode(job: &Job) -> Vec<u8> {
    let wire = WireJob {
        v: 1,
        id: job.id.clone(),
        owner: job.owner.0.clone(),
        simple: match &job.kind {
            JobKind::Simple { request_id } => Some(request_id.clone()),
            _ => None,
        },
        trace: job.submission_trace.clone(),
        api: match &job.kind {
            JobKind::Embeddings | JobKind::Responses | JobKind::Messages => {
                Some(job.kind.api().label().to_string())
            }
            _ => None,
        },
        model: job.model.clone(),
        body: String::from_utf8_lossy(&job.body).into_owned(),
        // Credentials never go into a message, whatever the job holds.
        headers: job
            .headers
            .iter()
            .filter(|(k, _)| !crate::api::headers::never_forwarded(k))
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        callback_url: job.callback.as_ref().map(|c| c.url.clone()),
        created_at: job.created_at,
        created_ms: job.created_ms,
        expires_at_ms: job.expires_at_ms,
        batch: job.batch.clone(),
        charged: job.charged,
        models: job.grants.models.as_ref().map(|m| m.to_vec()),
        tier: job.grants.tier.as_deref().map(String::from),
    };
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// The job a message carries, as it was accepted (`queued`).
pub fn decode(bytes: &[u8]) -> Result<Job, DecodeError> {
    let w: WireJob = serde_json::from_slice(bytes).map_err(|e| DecodeError(e.to_string()))?;
    if w.v != 1 || w.id.is_empty() {
        return Err(DecodeError(format!("unknown version {} or no id", w.v)));
    }
    let mut headers = http::HeaderMap::new();
    for (k, v) in w.headers {
        let (Ok(k), Ok(v)) = (
            http::HeaderName::try_from(k.as_str()),
            http::HeaderValue::try_from(v.as_str()),
        ) else {
            return Err(DecodeError("bad header".into()));
        };
        headers.append(k, v);
    }
    Ok(Job {
        run_lease_expired: false,
        id: w.id,
        owner: Identity(w.owner),
        submission_trace: w.trace,
        kind: match (w.simple, w.api.as_deref()) {
            (Some(request_id), None) => JobKind::Simple { request_id },
            (None, None) => JobKind::Chat,
            (None, Some("embeddings")) => JobKind::Embeddings,
            (None, Some("responses")) => JobKind::Responses,
            (None, Some("messages")) => JobKind::Messages,
            (_, Some(other)) => return Err(DecodeError(format!("unknown job API {other:?}"))),
        },
        model: w.model,
        body: Bytes::from(w.body),
        headers,
        state: JobState::Queued,
        created_at: w.created_at,
        created_ms: w.created_ms,
        started_at: None,
        finished_at: None,
        expires_at_ms: w.expires_at_ms,
        response: None,
        callback: w.callback_url.map(|url| Callback {
            url,
            state: DeliveryState::Pending,
            attempts: 0,
            last_error: None,
        }),
        batch: w.batch,
        charged: w.charged,
        grants: Grants {
            models: w.models.map(Arc::from),
            tier: w.tier.map(Arc::from),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_survives_the_round_trip() {
        let mut headers = http::HeaderMap::new();
        headers.insert("openai-organization", "org".parse().unwrap());
        let job = Job {
            run_lease_expired: false,
            submission_trace: Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            ),
            id: "job_1".into(),
            owner: Identity("alice".into()),
            kind: JobKind::Simple {
                request_id: Some("r".into()),
            },
            model: "m".into(),
            body: Bytes::from_static(br#"{"model":"m","messages":[{"content":"\u00e9"}]}"#),
            headers,
            state: JobState::Queued,
            created_at: 5,
            created_ms: 5_432,
            started_at: None,
            finished_at: None,
            expires_at_ms: 9000,
            response: None,
            callback: None,
            batch: None,
            charged: true,
            grants: Grants {
                models: Some(Arc::from(vec!["cheap".to_string()])),
                tier: Some(Arc::from("bronze")),
            },
        };
        let back = decode(&encode(&job)).unwrap();
        assert_eq!(back.grants, job.grants, "the run is held to the grants");
        assert_eq!(back.id, job.id);
        assert_eq!(back.owner, job.owner);
        assert_eq!(back.kind, job.kind);
        assert_eq!(back.submission_trace, job.submission_trace);
        assert!(back.charged);
        assert_eq!(back.body, job.body, "byte for byte");
        assert_eq!(back.headers, job.headers);
        assert_eq!(back.expires_at_ms, 9000);
        assert_eq!(back.created_ms(), 5_432, "to the millisecond");
        // A simple job without a request_id stays a simple job.
        let mut anonymous = job.clone();
        anonymous.kind = JobKind::Simple { request_id: None };
        assert_eq!(decode(&encode(&anonymous)).unwrap().kind, anonymous.kind);
        let mut chat = job.clone();
        chat.kind = JobKind::Chat;
        assert_eq!(decode(&encode(&chat)).unwrap().kind, JobKind::Chat);
        for kind in [JobKind::Embeddings, JobKind::Responses, JobKind::Messages] {
            chat.kind = kind.clone();
            let bytes = encode(&chat);
            assert_eq!(decode(&bytes).unwrap().kind, kind);
        }
        // A job of an API this forwarder does not know is not run as chat.
        let unknown = String::from_utf8(encode(&chat))
            .unwrap()
            .replace(r#""api":"messages""#, r#""api":"audio""#);
        assert!(decode(unknown.as_bytes()).is_err());
        // A message from a forwarder that sent seconds only.
        let old = br#"{"v":1,"id":"x","owner":"o","model":"m","body":"{}","headers":[],"created_at":7,"expires_at_ms":0}"#;
        assert_eq!(decode(old).unwrap().created_ms(), 7_000);
    }

    #[test]
    fn no_credential_is_written_into_a_message() {
        let mut job = crate::jobs::model::test_job("job_c", "key:alice", 9000);
        for (k, v) in [
            ("authorization", "Bearer sk-secret-1"),
            ("x-api-key", "sk-secret-2"),
            ("cookie", "session=sk-secret-3"),
            ("x-trace", "kept"),
        ] {
            job.headers.insert(
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            );
        }
        let bytes = encode(&job);
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("sk-secret"), "{text}");
        assert_eq!(decode(&bytes).unwrap().headers.len(), 1);
    }

    #[test]
    fn garbage_is_not_a_job() {
        assert!(decode(b"\xff\x00").is_err());
        assert!(decode(br#"{"v":2,"id":"x"}"#).is_err());
    }
}
