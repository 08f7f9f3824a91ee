//! The scripted API server shared by the mocked-API tests: each test lists
//! the exact requests it expects, in order, with the answers; the verifier
//! fails on any other request or a missing one.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected request and its answer.
pub struct Step {
    pub method: &'static str,
    pub path: String,
    /// Substrings the query must contain (e.g. the field manager).
    pub query: Vec<&'static str>,
    pub reply: Reply,
}

pub enum Reply {
    Json(Value),
    NotFound,
    /// 422 Invalid with this message.
    Invalid(&'static str),
    /// Answer with the request body (what a server-side apply returns,
    /// near enough), optionally merged with extra fields.
    Echo(Value),
}

pub fn step(method: &'static str, path: impl Into<String>, reply: Reply) -> Step {
    Step {
        method,
        path: path.into(),
        query: Vec::new(),
        reply,
    }
}

pub fn apply(path: impl Into<String>, manager: &'static str, extra: Value) -> Step {
    Step {
        method: "PATCH",
        path: path.into(),
        query: vec![manager, "force=true"],
        reply: Reply::Echo(extra),
    }
}

/// A recorded request: method, path, decoded body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    #[allow(dead_code)] // shown by Debug when an assertion fails
    pub path: String,
    pub body: Value,
}

pub fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
}

pub async fn verify(mut handle: Handle, steps: Vec<Step>) -> Vec<Seen> {
    let mut seen = Vec::new();
    for (i, s) in steps.into_iter().enumerate() {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .unwrap_or_else(|_| {
                panic!("step {i}: expected {} {}, got no request", s.method, s.path)
            })
            .unwrap_or_else(|| panic!("step {i}: client gone before {} {}", s.method, s.path));
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        assert_eq!(
            (method.as_str(), path.as_str()),
            (s.method, s.path.as_str()),
            "step {i}: unexpected request (query {query})"
        );
        for q in &s.query {
            assert!(
                query.contains(q),
                "step {i}: {method} {path}: query {query:?} lacks {q:?}"
            );
        }
        let bytes = req.into_body().collect_bytes().await.expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON request body")
        };
        let (status, answer) = match s.reply {
            Reply::Json(v) => (StatusCode::OK, v),
            Reply::NotFound => (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "NotFound", "code": 404, "message": "not found"}),
            ),
            Reply::Invalid(message) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "Invalid", "code": 422, "message": message}),
            ),
            Reply::Echo(extra) => {
                let mut v = body.clone();
                merge(&mut v, &extra);
                (StatusCode::OK, v)
            }
        };
        let bytes = serde_json::to_vec(&answer).expect("encode answer");
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(bytes))
                .expect("response"),
        );
        seen.push(Seen { method, path, body });
    }
    // Nothing else may follow.
    if let Ok(Some((req, _))) =
        tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await
    {
        panic!("unexpected extra request: {} {}", req.method(), req.uri());
    }
    seen
}
