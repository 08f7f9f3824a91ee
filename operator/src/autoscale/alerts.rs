//! An Alertmanager-compatible webhook receiver (`POST /alerts`): a firing
//! alert naming a ModelForwarder moves its next evaluation to now (the
//! scheduler coalesces alerts per resource and lets them advance at most
//! one evaluation per interval).
//!
//! Callers must send `Authorization: Bearer <token>`, the token being the
//! content of a file mounted from a Secret (`--alert-token-file`; in
//! Alertmanager, `http_config.authorization.credentials_file`). Without a
//! token file the webhook refuses every call.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::telemetry::Metrics;

/// Which resource an alert is about: `namespace` plus `modelforwarder` or
/// the scraped pod label `app_kubernetes_io_instance`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    alerts: Vec<Alert>,
}

#[derive(Deserialize)]
struct Alert {
    #[serde(default)]
    status: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

/// The resources named by the firing alerts of a payload (pure).
pub fn firing(body: &[u8]) -> Result<Vec<Key>, serde_json::Error> {
    let p: Payload = serde_json::from_slice(body)?;
    let mut keys: Vec<Key> = p
        .alerts
        .into_iter()
        .filter(|a| a.status.is_empty() || a.status == "firing")
        .filter_map(|a| {
            let name = a
                .labels
                .get("modelforwarder")
                .or_else(|| a.labels.get("app_kubernetes_io_instance"))?;
            Some(Key {
                namespace: a.labels.get("namespace")?.clone(),
                name: name.clone(),
            })
        })
        .collect();
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// Who may call the webhook.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No token configured: every call is refused.
    Disabled,
    /// A bearer token, read from this file at each call (so a rotated
    /// Secret applies without a restart); surrounding whitespace ignored.
    TokenFile(PathBuf),
}

/// Why a call is refused, before its body is read.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Disabled,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// The token file cannot be read (or is empty).
    NoToken,
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    // Hashing first makes the comparison length-independent too.
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Checks an `Authorization` header value against the configured token.
pub fn authorize(auth: &Auth, header: Option<&[u8]>) -> Result<(), Refusal> {
    let path = match auth {
        Auth::Disabled => return Err(Refusal::Disabled),
        Auth::TokenFile(p) => p,
    };
    let expected = std::fs::read(path).map_err(|_| Refusal::NoToken)?;
    let expected = expected.trim_ascii();
    if expected.is_empty() {
        return Err(Refusal::NoToken);
    }
    let given = header
        .and_then(|h| h.strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii)
        .ok_or(Refusal::Unauthorized)?;
    if constant_time_eq(given, expected) {
        Ok(())
    } else {
        Err(Refusal::Unauthorized)
    }
}

#[derive(Clone)]
struct Hook {
    trigger: mpsc::Sender<Key>,
    metrics: Arc<Metrics>,
    auth: Auth,
}

/// `POST /alerts`, to merge into the operator's HTTP server. Answers 401
/// without the bearer token (403 when none is configured), 503 until this
/// replica leads (`metrics.leader`).
pub fn router(trigger: mpsc::Sender<Key>, metrics: Arc<Metrics>, auth: Auth) -> Router {
    Router::new()
        .route("/alerts", post(receive))
        .with_state(Hook {
            trigger,
            metrics,
            auth,
        })
}

async fn receive(
    State(h): State<Hook>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, Json<serde_json::Value>) {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if let Err(refusal) = authorize(&h.auth, header) {
        let (code, result, error) = match refusal {
            Refusal::Disabled => (
                StatusCode::FORBIDDEN,
                "disabled",
                "the alert webhook is off: start the operator with --alert-token-file",
            ),
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a bearer token is required",
            ),
            Refusal::NoToken => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_token",
                "the operator cannot read its alert token file",
            ),
        };
        h.metrics.alerts.with_label_values(&[result]).inc();
        return (code, Json(serde_json::json!({ "error": error })));
    }
    // Only the leader evaluates: a standby answers 503 so Alertmanager
    // retries (and, behind a Service, may reach the leader).
    if h.metrics.leader.get() != 1 {
        h.metrics.alerts.with_label_values(&["not_leader"]).inc();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": "this operator replica is not the leader"})),
        );
    }
    let keys = match firing(&body) {
        Ok(k) => k,
        Err(e) => {
            h.metrics.alerts.with_label_values(&["invalid"]).inc();
            return (
                StatusCode::BAD_REQUEST,
                Json(
                    serde_json::json!({"error": format!("not an Alertmanager webhook payload: {e}")}),
                ),
            );
        }
    };
    let mut accepted = 0;
    for k in keys {
        // A full queue means evaluations are already pending: drop, don't block.
        if h.trigger.try_send(k).is_ok() {
            accepted += 1;
        }
    }
    let result = if accepted > 0 { "accepted" } else { "ignored" };
    h.metrics.alerts.with_label_values(&[result]).inc();
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"evaluating": accepted})),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_firing_alerts_that_name_a_resource() {
        let body = br#"{"version":"4","status":"firing","alerts":[
            {"status":"firing","labels":{"alertname":"P99High","namespace":"ai","modelforwarder":"bot"}},
            {"status":"firing","labels":{"alertname":"P99High","namespace":"ai","app_kubernetes_io_instance":"bot"}},
            {"status":"resolved","labels":{"namespace":"ai","modelforwarder":"old"}},
            {"status":"firing","labels":{"alertname":"Unrelated"}}
        ]}"#;
        let keys = firing(body).unwrap();
        assert_eq!(
            keys,
            vec![Key {
                namespace: "ai".into(),
                name: "bot".into()
            }]
        );
        assert!(firing(b"not json").is_err());
    }

    /// A token file with `token` in it, unique to the test.
    fn token_file(token: &str) -> Auth {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mf-alert-token-{}-{n}", std::process::id()));
        std::fs::write(&path, format!("{token}\n")).unwrap();
        Auth::TokenFile(path)
    }

    #[test]
    fn only_the_configured_bearer_token_is_accepted() {
        let auth = token_file("s3cret-token");
        assert_eq!(authorize(&auth, Some(b"Bearer s3cret-token")), Ok(()));
        for bad in [
            None,
            Some(&b"Bearer wrong"[..]),
            Some(b"Bearer s3cret-toke"),
            Some(b"Basic s3cret-token"),
            Some(b"s3cret-token"),
            Some(b"Bearer "),
        ] {
            assert_eq!(authorize(&auth, bad), Err(Refusal::Unauthorized), "{bad:?}");
        }
        assert_eq!(
            authorize(&Auth::Disabled, Some(b"Bearer s3cret-token")),
            Err(Refusal::Disabled)
        );
        let empty = token_file("  ");
        assert_eq!(authorize(&empty, Some(b"Bearer ")), Err(Refusal::NoToken));
        let missing = Auth::TokenFile("/nonexistent/mf-token".into());
        assert_eq!(
            authorize(&missing, Some(b"Bearer x")),
            Err(Refusal::NoToken)
        );
    }

    #[tokio::test]
    async fn without_the_token_nothing_is_queued() {
        let (tx, mut rx) = mpsc::channel(8);
        let metrics = Arc::new(Metrics::new().unwrap());
        metrics.leader.set(1);
        let body = r#"{"alerts":[{"status":"firing","labels":{"namespace":"ai","modelforwarder":"bot"}}]}"#;
        let auth = token_file("s3cret-token");
        let answer = post_with(
            router(tx.clone(), metrics.clone(), auth.clone()),
            body,
            None,
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        let answer = post_with(
            router(tx.clone(), metrics.clone(), auth),
            body,
            Some("Bearer nope"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        let answer = post_with(
            router(tx, metrics.clone(), Auth::Disabled),
            body,
            Some("Bearer s3cret-token"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        assert!(rx.try_recv().is_err(), "nothing queued");
        let text = metrics.render();
        assert!(
            text.contains(r#"modelforwarder_operator_alerts_total{result="unauthorized"} 2"#),
            "{text}"
        );
    }

    /// Posts `body` to `/alerts` on a fresh server with the right token.
    async fn post(app: Router, body: &str) -> String {
        post_with(app, body, Some("Bearer s3cret-token")).await
    }

    /// Posts `body` to `/alerts` on a fresh server; returns the raw answer.
    async fn post_with(app: Router, body: &str, authorization: Option<&str>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = authorization.map_or(String::new(), |a| format!("authorization: {a}\r\n"));
        let req = format!(
            "POST /alerts HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, req.as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
            .await
            .unwrap();
        answer
    }

    #[tokio::test]
    async fn a_standby_replica_answers_503_so_alertmanager_retries() {
        let (tx, mut rx) = mpsc::channel(8);
        let metrics = Arc::new(Metrics::new().unwrap());
        let body = r#"{"alerts":[{"status":"firing","labels":{"namespace":"ai","modelforwarder":"bot"}}]}"#;
        let answer = post(
            router(tx, metrics.clone(), token_file("s3cret-token")),
            body,
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(rx.try_recv().is_err(), "nothing queued");
    }

    #[tokio::test]
    async fn the_webhook_triggers_an_evaluation_at_once() {
        let (tx, mut rx) = mpsc::channel(8);
        let metrics = Arc::new(Metrics::new().unwrap());
        metrics.leader.set(1);
        let app = router(tx, metrics.clone(), token_file("s3cret-token"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let started = std::time::Instant::now();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = r#"{"alerts":[{"status":"firing","labels":{"namespace":"ai","modelforwarder":"bot"}}]}"#;
        let req = format!(
            "POST /alerts HTTP/1.1\r\nhost: x\r\nauthorization: Bearer s3cret-token\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, req.as_bytes())
            .await
            .unwrap();
        let key = tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(key.name, "bot");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
        assert!(metrics
            .render()
            .contains(r#"modelforwarder_operator_alerts_total{result="accepted"} 1"#));
    }
}
