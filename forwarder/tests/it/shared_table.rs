//! One table of behaviours run against all three front ends: the proof that
//! HTTP, WebSocket and gRPC share one pipeline (auth, routing, retries,
//! idempotency, error mapping).

use std::time::Duration;

use forwarder::config::MockSettings;
use forwarder::frontends::grpc::pb::ForwardRequest;
use forwarder::mock_llm::{Fault, MockServer};
use serde_json::json;
use tokio_tungstenite::tungstenite;

use crate::common::*;

#[derive(Debug, Clone, Copy)]
enum Front {
    Http,
    WebSocket,
    Grpc,
}

#[derive(Debug, PartialEq)]
struct Outcome {
    status: u16,
    reply: Option<String>,
    replayed: bool,
}

struct Call<'a> {
    model: &'a str,
    prompt: &'a str,
    key: Option<&'a str>,
    api_key: &'a str,
}

impl Front {
    async fn send(self, fwd: &Fwd, c: &Call<'_>) -> Outcome {
        match self {
            Front::Http => {
                let mut body = json!({"model_id": c.model, "prompt": c.prompt});
                if let Some(k) = c.key {
                    body["request_id"] = json!(k);
                }
                let r = fwd
                    .post("/api/v1/message", &body, &[("x-api-key", c.api_key)])
                    .await;
                Outcome {
                    status: r.status,
                    reply: r.body["reply"].as_str().map(str::to_string),
                    replayed: r.header("idempotent-replayed").is_some(),
                }
            }
            Front::WebSocket => {
                let mut ws = match ws_connect(&fwd.ws, &[("x-api-key", c.api_key)]).await {
                    Ok(ws) => ws,
                    Err(tungstenite::Error::Http(resp)) => {
                        return Outcome {
                            status: resp.status().as_u16(),
                            reply: None,
                            replayed: false,
                        }
                    }
                    Err(e) => panic!("{e}"),
                };
                let mut frame =
                    json!({"type": "request", "id": "t", "model": c.model, "prompt": c.prompt});
                if let Some(k) = c.key {
                    frame["idempotency_key"] = json!(k);
                }
                ws_send(&mut ws, frame).await;
                let last = ws_collect(&mut ws, "t").await.pop().unwrap();
                Outcome {
                    status: last["status"].as_u64().unwrap_or(200) as u16,
                    reply: last["reply"].as_str().map(str::to_string),
                    replayed: last["replayed"] == true,
                }
            }
            Front::Grpc => {
                let mut client = grpc_client(fwd).await;
                let mut req = tonic::Request::new(ForwardRequest {
                    model_id: c.model.into(),
                    prompt: c.prompt.into(),
                    request_id: c.key.unwrap_or_default().into(),
                    ..Default::default()
                });
                req.metadata_mut()
                    .insert("x-api-key", c.api_key.parse().unwrap());
                match client.forward(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        Outcome {
                            status: 200,
                            reply: Some(r.reply),
                            replayed: r.replayed,
                        }
                    }
                    Err(s) => Outcome {
                        status: s
                            .metadata()
                            .get("x-http-status")
                            .unwrap()
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap(),
                        reply: None,
                        replayed: false,
                    },
                }
            }
        }
    }
}

struct Case {
    name: &'static str,
    model: &'static str,
    api_key: &'static str,
    faults: Option<(usize, Fault)>,
    /// Send twice with an idempotency key.
    repeat_with_key: bool,
    status: u16,
    upstream_calls: u64,
}

fn table() -> Vec<Case> {
    let err = |status| Fault::Error {
        status,
        retry_after: None,
    };
    let case = |name, status, upstream_calls| Case {
        name,
        model: "m",
        api_key: "sk-table",
        faults: None,
        repeat_with_key: false,
        status,
        upstream_calls,
    };
    vec![
        case("plain success", 200, 1),
        Case {
            model: "unknown",
            ..case("unknown model", 404, 0)
        },
        Case {
            api_key: "sk-wrong",
            ..case("bad key", 401, 0)
        },
        Case {
            faults: Some((2, err(503))),
            ..case("retried until success", 200, 3)
        },
        Case {
            faults: Some((3, err(503))),
            ..case("retries exhausted", 502, 3)
        },
        Case {
            faults: Some((1, err(400))),
            ..case("client error not retried", 400, 1)
        },
        Case {
            faults: Some((2, Fault::Reset)),
            ..case("resets retried", 200, 3)
        },
        Case {
            faults: Some((1, Fault::Hang)),
            ..case("a hung attempt is retried", 200, 2)
        },
        Case {
            faults: Some((3, Fault::Hang)),
            ..case("hangs time out", 504, 3)
        },
        Case {
            repeat_with_key: true,
            ..case("idempotent repeat", 200, 1)
        },
    ]
}

async fn run_table(front: Front) {
    let m: MockServer = mock(MockSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "table: sk-table\n").unwrap();
    let mut u = upstream("a", &m, "m");
    u.timeout = Duration::from_millis(300);
    let mut cfg = config(vec![u]);
    cfg.auth.api_keys_file = Some(keys);
    cfg.retry.max_attempts = 3;
    cfg.circuit_breaker.failure_threshold = 100;
    let fwd = start(cfg).await;
    for (i, case) in table().into_iter().enumerate() {
        if let Some((n, fault)) = case.faults {
            m.model.fail_next(n, fault);
        }
        let before = m.model.requests();
        let key = format!("key-{i}");
        let call = Call {
            model: case.model,
            prompt: "table prompt",
            key: case.repeat_with_key.then_some(key.as_str()),
            api_key: case.api_key,
        };
        let first = front.send(&fwd, &call).await;
        let what = format!("{front:?} / {}", case.name);
        assert_eq!(first.status, case.status, "{what}: {first:?}");
        if case.status == 200 {
            assert_eq!(
                first.reply.as_deref(),
                Some("mock reply: table prompt"),
                "{what}"
            );
            assert!(!first.replayed, "{what}");
        }
        if case.repeat_with_key {
            let second = front.send(&fwd, &call).await;
            assert_eq!(second.status, 200, "{what}");
            assert_eq!(second.reply, first.reply, "{what}");
            assert!(second.replayed, "{what}: the repeat is a replay");
        }
        assert_eq!(
            m.model.requests() - before,
            case.upstream_calls,
            "{what}: upstream calls"
        );
    }
    let protocol = match front {
        Front::Http => "http",
        Front::WebSocket => "websocket",
        Front::Grpc => "grpc",
    };
    // Metrics carry the front end's protocol label: six successes (a replay counts).
    assert_eq!(
        fwd.metric(
            "forwarder_requests_total",
            &[
                ("protocol", protocol),
                ("api", "chat_completions"),
                ("model", "m"),
                ("code", "200")
            ]
        )
        .await,
        6.0,
        "{front:?}"
    );
}

#[tokio::test]
async fn http_follows_the_table() {
    run_table(Front::Http).await;
}

#[tokio::test]
async fn websocket_follows_the_table() {
    run_table(Front::WebSocket).await;
}

#[tokio::test]
async fn grpc_follows_the_table() {
    run_table(Front::Grpc).await;
}
