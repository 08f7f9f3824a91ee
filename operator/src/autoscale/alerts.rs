//! An Alertmanager-compatible webhook receiver (`POST /alerts`): a firing
//! alert naming a ModelForwarder makes its evaluation happen at once
//! instead of at the next interval.

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

#[derive(Clone)]
struct Hook {
    trigger: mpsc::Sender<Key>,
    metrics: Arc<Metrics>,
}

/// `POST /alerts`, to merge into the operator's HTTP server. Answers 503
/// until this replica leads (`metrics.leader`).
pub fn router(trigger: mpsc::Sender<Key>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/alerts", post(receive))
        .with_state(Hook { trigger, metrics })
}

async fn receive(
    State(h): State<Hook>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<serde_json::Value>) {
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

    /// Posts `body` to `/alerts` on a fresh server; returns the raw answer.
    async fn post(app: Router, body: &str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /alerts HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
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
        let answer = post(router(tx, metrics.clone()), body).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(rx.try_recv().is_err(), "nothing queued");
    }

    #[tokio::test]
    async fn the_webhook_triggers_an_evaluation_at_once() {
        let (tx, mut rx) = mpsc::channel(8);
        let metrics = Arc::new(Metrics::new().unwrap());
        metrics.leader.set(1);
        let app = router(tx, metrics.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let started = std::time::Instant::now();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = r#"{"alerts":[{"status":"firing","labels":{"namespace":"ai","modelforwarder":"bot"}}]}"#;
        let req = format!(
            "POST /alerts HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
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
