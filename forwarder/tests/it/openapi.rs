//! The OpenAPI document (`docs/openapi.json`) against the code: routes both
//! ways, error codes and statuses, references, version, and how it is served.
//!
//! To document a new route, add its path and method under `paths` in
//! docs/openapi.json (reuse `#/components/responses/*` for errors); this
//! file then needs no change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use forwarder::api::ApiError;
use forwarder::config::MockSettings;
use forwarder::openapi::{operations, DOCUMENT};
use serde_json::Value;

use crate::common::{config, mock, start, upstream};
use crate::process::binary;

fn doc() -> Value {
    serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON")
}

/// Source folders whose routes are not the forwarder's interface.
const NOT_THE_FORWARDER: &[&str] = &["mock_llm"];

/// Method-router constructors, with what they register.
const METHOD_FNS: &[(&str, &str)] = &[
    ("get", "GET"),
    ("post", "POST"),
    ("put", "PUT"),
    ("delete", "DELETE"),
    ("patch", "PATCH"),
    ("head", "HEAD"),
    ("options", "OPTIONS"),
    ("post_only", "POST"),
];

/// A route found in the sources: (METHOD, path) and where.
type Found = BTreeMap<(String, String), String>;

/// Finds `.route("/path", get(h).post(h2))` calls in Rust source. Paths
/// must be string literals and method routers plain constructor chains;
/// anything else (`.nest`, `route_service`, `any`, a path in a constant) is
/// an error naming the line, so a route cannot slip past the check.
fn routes_in(src: &str, file: &str) -> Result<Vec<(String, String, String)>, String> {
    // Comments cannot hold routes.
    let code: String = src
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    for unsupported in [
        ".nest(",
        ".nest_service(",
        ".route_service(",
        ".fallback_service(",
    ] {
        if let Some(at) = code.find(unsupported) {
            return Err(format!(
                "{file}:{}: `{unsupported}` is not understood by the OpenAPI route check; \
                 register routes with `.route(\"/literal/path\", get(..).post(..))`",
                line_of(at)
            ));
        }
    }
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find(".route(") {
        let start = from + i + ".route(".len();
        let here = format!("{file}:{}", line_of(start));
        let rest = code[start..].trim_start();
        let Some(lit) = rest.strip_prefix('"') else {
            return Err(format!(
                "{here}: the route's path is not a string literal; the OpenAPI route check needs one"
            ));
        };
        let end = lit
            .find('"')
            .ok_or_else(|| format!("{here}: unterminated path"))?;
        let path = &lit[..end];
        let args = lit[end + 1..]
            .trim_start()
            .strip_prefix(',')
            .ok_or_else(|| format!("{here}: expected `,` after the path"))?;
        // The method router: up to the `)` closing `.route(`.
        let mut depth = 0i32;
        let mut top = String::new();
        let mut len = args.len();
        for (k, c) in args.char_indices() {
            match c {
                '(' | '{' | '[' => depth += 1,
                ')' | '}' | ']' if depth == 0 => {
                    len = k;
                    break;
                }
                ')' | '}' | ']' => depth -= 1,
                _ => {}
            }
            // Only what is outside every bracket names methods.
            top.push(if depth == 0 || (depth == 1 && c == '(') {
                c
            } else {
                ' '
            });
        }
        let mut methods = Vec::new();
        for token in top.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '(')) {
            let Some(name) = token.strip_suffix('(') else {
                continue;
            };
            match METHOD_FNS.iter().find(|(f, _)| *f == name) {
                Some((_, m)) => methods.push(*m),
                None if ["fallback", "with_state", "layer", "route_layer"].contains(&name) => {}
                None => {
                    return Err(format!(
                        "{here}: `{name}(` on route {path} is not understood by the OpenAPI \
                         route check (known: {:?})",
                        METHOD_FNS.iter().map(|(f, _)| f).collect::<Vec<_>>()
                    ))
                }
            }
        }
        if methods.is_empty() {
            return Err(format!("{here}: no HTTP method found for route {path}"));
        }
        for m in methods {
            out.push((m.to_string(), path.to_string(), here.clone()));
        }
        from = (args.as_ptr() as usize - code.as_ptr() as usize) + len;
    }
    Ok(out)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if !NOT_THE_FORWARDER.contains(&path.file_name().unwrap().to_str().unwrap()) {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn routes_in_sources() -> Found {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut found = Found::new();
    for f in files {
        let name = f.strip_prefix(root).unwrap().display().to_string();
        let src = std::fs::read_to_string(&f).unwrap();
        for (m, p, at) in routes_in(&src, &name).unwrap_or_else(|e| panic!("{e}")) {
            found.insert((m, p), at);
        }
    }
    found
}

#[test]
fn the_route_scanner_reads_chains_and_refuses_what_it_cannot() {
    let src = r#"
        // .route("/commented", get(x))
        let r = Router::new()
            .route("/a", post_only(h))
            .route("/b/{id}", get(|| async { headers.get("x"); "ok" }).delete(d))
            .route(
                "/c",
                post(h).fallback(|| async { ApiError::MethodNotAllowed.into_response() }),
            );
    "#;
    let got: Vec<_> = routes_in(src, "f.rs")
        .unwrap()
        .into_iter()
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect();
    assert_eq!(got, ["POST /a", "GET /b/{id}", "DELETE /b/{id}", "POST /c"]);
    let err = routes_in("r.route(FILES, get(h))", "g.rs").unwrap_err();
    assert!(
        err.contains("g.rs:1") && err.contains("string literal"),
        "{err}"
    );
    let err = routes_in("r.route(\"/x\", any(h))", "g.rs").unwrap_err();
    assert!(err.contains("`any(`"), "{err}");
    let err = routes_in("r.nest(\"/v1/async\", jobs)", "g.rs").unwrap_err();
    assert!(err.contains(".nest("), "{err}");
}

#[test]
fn every_route_is_documented_and_every_operation_is_routed() {
    let found = routes_in_sources();
    let documented = operations(&doc());
    let undocumented: Vec<String> = found
        .iter()
        .filter(|(op, _)| !documented.contains(op))
        .map(|((m, p), at)| format!("{m} {p} (routed at {at})"))
        .collect();
    assert!(
        undocumented.is_empty(),
        "routes without an operation in docs/openapi.json: {undocumented:?}.\n\
         Add each under `paths` (how: docs/api-contract.md, \"Adding an operation\")."
    );
    let unrouted: Vec<String> = documented
        .iter()
        .filter(|op| !found.contains_key(*op))
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert!(
        unrouted.is_empty(),
        "operations in docs/openapi.json that no `.route(..)` in forwarder/src serves: {unrouted:?}"
    );
}

/// One value of every variant: the match below stops compiling when a
/// variant is added, so the document's error list cannot fall behind.
fn every_api_error() -> Vec<ApiError> {
    let all = vec![
        ApiError::BadRequest("x".into()),
        ApiError::Unauthorized,
        ApiError::ModelNotFound("m".into()),
        ApiError::PayloadTooLarge(1),
        ApiError::IdempotencyInProgress,
        ApiError::IdempotencyMismatch,
        ApiError::RateLimited { retry_after: None },
        ApiError::UpstreamRejected {
            status: 400,
            body: bytes::Bytes::new(),
        },
        ApiError::BadGateway("x".into()),
        ApiError::NoHealthyUpstream {
            model: "m".into(),
            retry_after: None,
        },
        ApiError::GatewayTimeout("x".into()),
        ApiError::RequestTimeout,
        ApiError::MethodNotAllowed,
        ApiError::ShuttingDown,
        ApiError::Overloaded,
        ApiError::TooManyInFlight(1),
        ApiError::DuplicateId("x".into()),
        ApiError::StoreUnavailable("x"),
        ApiError::QuotaExceeded {
            retry_after: std::time::Duration::from_secs(1),
            limits: Vec::new(),
        },
        ApiError::BudgetExceeded {
            budget: "daily token".into(),
            used: "1 tokens".into(),
            limit: "1 tokens".into(),
            resets_at: "2026-12-08T00:00:00Z".into(),
            retry_after: std::time::Duration::from_secs(1),
        },
    ];
    for e in &all {
        match e {
            ApiError::BadRequest(_)
            | ApiError::Unauthorized
            | ApiError::ModelNotFound(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::IdempotencyInProgress
            | ApiError::IdempotencyMismatch
            | ApiError::RateLimited { .. }
            | ApiError::UpstreamRejected { .. }
            | ApiError::BadGateway(_)
            | ApiError::NoHealthyUpstream { .. }
            | ApiError::GatewayTimeout(_)
            | ApiError::RequestTimeout
            | ApiError::MethodNotAllowed
            | ApiError::ShuttingDown
            | ApiError::Overloaded
            | ApiError::TooManyInFlight(_)
            | ApiError::DuplicateId(_)
            | ApiError::StoreUnavailable(_)
            | ApiError::QuotaExceeded { .. }
            | ApiError::BudgetExceeded { .. } => {}
        }
    }
    all
}

#[test]
fn error_codes_and_statuses_match_the_code() {
    let doc = doc();
    let listed: BTreeSet<&str> = doc["components"]["schemas"]["ForwarderErrorCode"]["enum"]
        .as_array()
        .expect("ForwarderErrorCode.enum")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let errors = every_api_error();
    let codes: BTreeSet<&str> = errors.iter().map(|e| e.kind().1).collect();
    assert_eq!(
        listed, codes,
        "ForwarderErrorCode.enum in docs/openapi.json"
    );
    // Both forwarding operations declare every status the pipeline can
    // answer with over HTTP, each with the OpenAI-shaped body.
    for (path, method, body) in [
        ("/api/v1/message", "post", "ErrorBody"),
        ("/v1/chat/completions", "post", "ErrorBody"),
        ("/v1/embeddings", "post", "ErrorBody"),
        ("/v1/responses", "post", "ErrorBody"),
        ("/v1/messages", "post", "AnthropicErrorBody"),
        ("/v1/messages/count_tokens", "post", "AnthropicErrorBody"),
    ] {
        let responses = &doc["paths"][path][method]["responses"];
        for e in &errors {
            let status = e.status().as_u16().to_string();
            let entry = &responses[&status];
            assert!(
                entry.is_object(),
                "{method} {path}: no {status} response ({e:?})"
            );
            let r = resolve(&doc, entry);
            // A 405 comes from the router, before any route's own shape.
            let want = if status == "405" { "ErrorBody" } else { body };
            assert_eq!(
                r["content"]["application/json"]["schema"]["$ref"],
                format!("#/components/schemas/{want}"),
                "{method} {path} {status}"
            );
        }
        assert!(
            responses["4XX"].is_object(),
            "{path}: upstream 4xx pass-through"
        );
        let headers: Vec<String> = doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| resolve(&doc, p)["name"].as_str().unwrap().to_string())
            .collect();
        assert!(headers.contains(&"Idempotency-Key".to_string()), "{path}");
    }
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("unresolved $ref {r}")),
        None => v,
    }
}

fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r);
            }
            m.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn the_document_is_openapi_3_1_with_resolvable_refs_and_the_crate_version() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["info"]["version"],
        env!("CARGO_PKG_VERSION"),
        "info.version"
    );
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 20);
    for r in all {
        assert!(
            r.starts_with("#/") && doc.pointer(&r[1..]).is_some(),
            "unresolved $ref {r}"
        );
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(schemes["ApiKeyHeader"]["name"], "x-api-key");
    assert_eq!(schemes["BearerJwt"]["bearerFormat"], "JWT");
    // Every operation says how it authenticates and what 200 looks like
    // (the WebSocket's success is its 101, an async submission's its 202).
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["operationId"].is_string(),
                "{method} {path}: operationId"
            );
            assert!(op["security"].is_array(), "{method} {path}: security");
            let r = &op["responses"];
            assert!(
                r["200"].is_object() || r["101"].is_object() || r["202"].is_object(),
                "{method} {path}"
            );
        }
    }
    // The committed file is what the binary embeds.
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"))
            .unwrap();
    assert_eq!(committed, DOCUMENT);
}

#[test]
fn forwarder_openapi_prints_the_document() {
    let out = binary().arg("openapi").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), DOCUMENT);
}

/// Doc → running router: every documented operation reaches a handler
/// (neither the 404 fallback nor a 405), and the document is served.
#[tokio::test]
async fn every_documented_operation_reaches_a_handler_and_the_document_is_served() {
    let m = mock(MockSettings::default()).await;
    let mut cfg = config(vec![upstream("u", &m, "mock")]);
    cfg.websocket.enabled = true;
    let fwd = start(cfg).await;
    let served = fwd.get("/openapi.json", &[]).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.header("content-type"), Some("application/json"));
    assert_eq!(served.text, DOCUMENT);

    for (method, path) in operations(&doc()) {
        let url = format!("{}{}", fwd.base, path.replace("{id}", "mock"));
        let req = fwd
            .http
            .request(method.parse().unwrap(), &url)
            .timeout(Duration::from_secs(10));
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}: {text}");
        assert!(
            !(status == 404 && text.contains("no such endpoint")),
            "{method} {path} is documented but not routed"
        );
    }
}

/// What schemathesis found (e2e/contract/schemathesis.sh), kept as
/// regressions: an empty `request_id` was used as an idempotency key shared
/// by every such request (a second, different one got 422), and a whole
/// `max_tokens` spelled `331.0` (a JSON Schema integer) got 400.
#[tokio::test]
async fn simple_api_empty_request_id_is_no_key_and_whole_float_max_tokens_is_accepted() {
    let m = mock(MockSettings::default()).await;
    let fwd = start(config(vec![upstream("u", &m, "mock")])).await;
    for prompt in ["one", "two"] {
        let body = serde_json::json!({"model_id": "mock", "prompt": prompt, "request_id": ""});
        let r = fwd.post("/api/v1/message", &body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(
            !r.body["request_id"].as_str().unwrap().is_empty(),
            "a generated id is echoed"
        );
        assert_eq!(r.header("idempotent-replayed"), None);
    }
    let body = serde_json::json!({"model_id": "mock", "prompt": "p", "max_tokens": 331.0});
    let r = fwd.post("/api/v1/message", &body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let body = serde_json::json!({"model_id": "mock", "prompt": "p", "max_tokens": 1.5});
    let r = fwd.post("/api/v1/message", &body, &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "invalid_request");
}
