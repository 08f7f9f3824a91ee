//! The OpenAI Batch API: the official `openai` SDK runs a batch end to
//! end; bad input files are refused line by line; files and batches are
//! invisible to other clients; a cancelled batch stops its queued requests.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use forwarder::config::{Config, MockSettings};
use serde_json::{json, Value};

use crate::common::*;

const ALICE: (&str, &str) = ("authorization", "Bearer sk-alice");
const BOB: (&str, &str) = ("authorization", "Bearer sk-bob");

fn base_config(m: &forwarder::mock_llm::MockServer, dir: &tempfile::TempDir) -> Config {
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "alice: sk-alice\nbob: sk-bob\n").unwrap();
    let mut cfg = config(vec![upstream("m", m, "mock")]);
    cfg.auth.api_keys_file = Some(keys);
    cfg
}

pub(crate) fn line(custom_id: &str, prompt: &str) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "mock", "messages": [{"role": "user", "content": prompt}]}})
}

pub(crate) fn jsonl(lines: &[Value]) -> Vec<u8> {
    lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// Uploads `data` as a multipart form, as the SDKs do.
pub(crate) async fn upload(f: &Fwd, data: &[u8], purpose: &str, who: (&str, &str)) -> Resp {
    let boundary = "----mfbatchboundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let resp = f
        .http
        .post(format!("{}/v1/files", f.base))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header(who.0, who.1)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Resp {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

pub(crate) async fn create(f: &Fwd, file_id: &str, who: (&str, &str)) -> Resp {
    let req = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    f.post("/v1/batches", &req, &[who]).await
}

async fn wait_final(f: &Fwd, id: &str) -> Value {
    for _ in 0..600 {
        let r = f.get(&format!("/v1/batches/{id}"), &[ALICE]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let s = r.body["status"].as_str().unwrap();
        if ["completed", "failed", "expired", "cancelled"].contains(&s) {
            return r.body;
        }
        tokio::time::sleep(25 * MS).await;
    }
    panic!("batch {id} did not end");
}

async fn content(f: &Fwd, file_id: &str) -> Vec<Value> {
    let r = f
        .get(&format!("/v1/files/{file_id}/content"), &[ALICE])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn the_official_openai_sdk_runs_a_batch_end_to_end() {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "this test needs the project virtualenv: run ./scripts/test.sh (it creates .venv)"
    );
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(base_config(&m, &dir)).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_batch.py");
    let base = format!("{}/v1", f.base);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(venv)
            .arg(script)
            .env("FORWARDER_BASE_URL", base)
            .env("FORWARDER_API_KEY", "sk-alice")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn bad_input_files_are_refused_with_the_line_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let mut cfg = base_config(&m, &dir);
    cfg.async_jobs.batch.max_file_lines = 3;
    cfg.async_jobs.batch.max_file_bytes = 4096;
    let f = start(cfg).await;
    let good = line("a", "hi");
    let mut get = good.clone();
    get["method"] = json!("GET");
    let mut speech = good.clone();
    speech["url"] = json!("/v1/audio/speech");
    let mut no_model = good.clone();
    no_model["body"].as_object_mut().unwrap().remove("model");
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            jsonl(&[good.clone(), line("a", "again")]),
            "batch",
            "line 2: custom_id \"a\" is used more than once",
        ),
        (
            jsonl(&[good.clone(), get]),
            "batch",
            "line 2: method must be \"POST\"",
        ),
        (
            jsonl(&[speech]),
            "batch",
            "line 1: url must be one of /v1/chat/completions, /v1/embeddings, /v1/responses, /v1/messages",
        ),
        (jsonl(&[no_model]), "batch", "line 1: body.model"),
        (
            b"{\"custom_id\": \"x\"\n".to_vec(),
            "batch",
            "line 1: not a request object",
        ),
        (
            jsonl(&[
                line("a", "1"),
                line("b", "2"),
                line("c", "3"),
                line("d", "4"),
            ]),
            "batch",
            "more than 3 requests",
        ),
        (
            jsonl(&[line("a", &"long ".repeat(1000))]),
            "batch",
            "exceeds the limit of 4096 bytes",
        ),
        (b"\n\n".to_vec(), "batch", "no requests"),
        (
            jsonl(std::slice::from_ref(&good)),
            "fine-tune",
            "purpose must be \"batch\"",
        ),
    ];
    for (data, purpose, want) in cases {
        let r = upload(&f, &data, purpose, ALICE).await;
        assert_eq!(r.status, 400, "{want}: {}", r.text);
        let msg = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "want {want:?}, got {msg:?}");
    }
    // A good file still goes through, and batch requests are checked too.
    let ok = upload(&f, &jsonl(&[good]), "batch", ALICE).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    let id = ok.body["id"].as_str().unwrap();
    let bad =
        json!({"input_file_id": id, "endpoint": "/v1/audio/speech", "completion_window": "24h"});
    let r = f.post("/v1/batches", &bad, &[ALICE]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let bad =
        json!({"input_file_id": id, "endpoint": "/v1/chat/completions", "completion_window": "1h"});
    let r = f.post("/v1/batches", &bad, &[ALICE]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = create(&f, "file-nope", ALICE).await;
    assert_eq!(r.status, 404, "{}", r.text);
}

#[tokio::test]
async fn files_and_batches_are_invisible_to_another_client() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(base_config(&m, &dir)).await;
    let file = upload(
        &f,
        &jsonl(&[line("a", "one"), line("b", "two")]),
        "batch",
        ALICE,
    )
    .await;
    assert_eq!(file.status, 200, "{}", file.text);
    let fid = file.body["id"].as_str().unwrap().to_string();
    for path in [
        format!("/v1/files/{fid}"),
        format!("/v1/files/{fid}/content"),
    ] {
        assert_eq!(f.get(&path, &[ALICE]).await.status, 200, "{path}");
        assert_eq!(f.get(&path, &[BOB]).await.status, 404, "{path}");
    }
    assert_eq!(
        create(&f, &fid, BOB).await.status,
        404,
        "bob cannot use alice's file"
    );
    let b = create(&f, &fid, ALICE).await;
    assert_eq!(b.status, 200, "{}", b.text);
    let bid = b.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        f.get(&format!("/v1/batches/{bid}"), &[BOB]).await.status,
        404
    );
    let cancel = f
        .post(&format!("/v1/batches/{bid}/cancel"), &json!({}), &[BOB])
        .await;
    assert_eq!(cancel.status, 404);
    let done = wait_final(&f, &bid).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 2, "completed": 2, "failed": 0})
    );
    assert!(done["error_file_id"].is_null(), "no errors, no error file");
    let late = f
        .post(&format!("/v1/batches/{bid}/cancel"), &json!({}), &[ALICE])
        .await;
    assert_eq!(
        late.status, 409,
        "a completed batch cannot be cancelled: {}",
        late.text
    );
    let out_id = done["output_file_id"].as_str().unwrap();
    assert_eq!(
        f.get(&format!("/v1/files/{out_id}/content"), &[BOB])
            .await
            .status,
        404
    );
    let out = content(&f, out_id).await;
    // Each request ran as a job tagged with its batch and custom_id.
    for o in &out {
        let job_id = o["response"]["request_id"].as_str().unwrap();
        let job = f.get(&format!("/v1/async/jobs/{job_id}"), &[ALICE]).await;
        assert_eq!(job.status, 200, "{}", job.text);
        assert_eq!(
            job.body["batch"],
            json!({"batch_id": bid, "custom_id": o["custom_id"]})
        );
    }
    let mut got: Vec<(String, String)> = out
        .iter()
        .map(|o| {
            (
                o["custom_id"].as_str().unwrap().to_string(),
                o["response"]["body"]["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("a".to_string(), "mock reply: one".to_string()),
            ("b".into(), "mock reply: two".into())
        ]
    );
    // Lists: bob sees none, alice sees hers, newest first, paged by `after`.
    let r = f.get("/v1/batches", &[BOB]).await;
    assert_eq!(r.body["data"], json!([]), "{}", r.text);
    let b2 = create(&f, &fid, ALICE).await;
    let bid2 = b2.body["id"].as_str().unwrap().to_string();
    let r = f.get("/v1/batches?limit=1", &[ALICE]).await;
    assert_eq!(r.body["data"][0]["id"], bid2.as_str(), "{}", r.text);
    assert_eq!(r.body["has_more"], true);
    let r = f
        .get(&format!("/v1/batches?limit=5&after={bid2}"), &[ALICE])
        .await;
    assert_eq!(r.body["data"][0]["id"], bid.as_str(), "{}", r.text);
    assert_eq!(r.body["has_more"], false);
    wait_final(&f, &bid2).await;
}

#[tokio::test]
async fn a_cancelled_batch_stops_its_queued_requests() {
    let dir = tempfile::tempdir().unwrap();
    let m = slow_mock(Duration::from_millis(200)).await;
    let mut cfg = base_config(&m, &dir);
    cfg.async_jobs.workers = 1;
    let f = start(cfg).await;
    let lines: Vec<Value> = (0..20)
        .map(|i| line(&format!("c{i}"), &format!("p{i}")))
        .collect();
    let file = upload(&f, &jsonl(&lines), "batch", ALICE).await;
    let fid = file.body["id"].as_str().unwrap();
    let b = create(&f, fid, ALICE).await;
    let bid = b.body["id"].as_str().unwrap().to_string();
    tokio::time::sleep(300 * MS).await;
    let c = f
        .post(&format!("/v1/batches/{bid}/cancel"), &json!({}), &[ALICE])
        .await;
    assert_eq!(c.status, 200, "{}", c.text);
    assert_eq!(c.body["status"], "cancelling");
    let done = wait_final(&f, &bid).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["cancelled_at"].as_u64().is_some());
    let counts = &done["request_counts"];
    let (ok, failed) = (
        counts["completed"].as_u64().unwrap(),
        counts["failed"].as_u64().unwrap(),
    );
    assert_eq!(counts["total"], 20);
    assert_eq!(ok + failed, 20, "{done}");
    assert!((1..20).contains(&ok), "some ran, the rest did not: {done}");
    let errs = content(&f, done["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errs.len() as u64, failed);
    assert!(
        errs.iter()
            .all(|e| e["error"]["code"] == "batch_cancelled" && e["response"].is_null()),
        "{errs:?}"
    );
    let out = content(&f, done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len() as u64, ok);
    let mut all: Vec<&str> = errs
        .iter()
        .chain(&out)
        .map(|o| o["custom_id"].as_str().unwrap())
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 20, "every custom_id once");
    // Cancelling again changes nothing.
    let again = f
        .post(&format!("/v1/batches/{bid}/cancel"), &json!({}), &[ALICE])
        .await;
    assert_eq!(
        again.status, 200,
        "cancelling a cancelled batch answers it as is"
    );
}

#[tokio::test]
#[cfg_attr(
    not(kafka),
    ignore = "no Kafka-protocol broker: set TANSU_BIN (scripts/test.sh does)"
)]
async fn a_batch_runs_on_the_kafka_queue() {
    let broker = crate::broker::Broker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let topic = format!("batch-{}", std::process::id());
    let mut cfg = crate::broker::kafka_config(&m, &broker, &topic);
    cfg.auth.api_keys_file = base_config(&m, &dir).auth.api_keys_file;
    let f = start(cfg).await;
    let lines: Vec<Value> = (0..10)
        .map(|i| line(&format!("k{i}"), &format!("kafka {i}")))
        .collect();
    let file = upload(&f, &jsonl(&lines), "batch", ALICE).await;
    assert_eq!(file.status, 200, "{}", file.text);
    let b = create(&f, file.body["id"].as_str().unwrap(), ALICE).await;
    let done = wait_final(&f, b.body["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 10, "completed": 10, "failed": 0})
    );
    let out = content(&f, done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len(), 10);
    for o in &out {
        let i = o["custom_id"].as_str().unwrap().trim_start_matches('k');
        assert_eq!(
            o["response"]["body"]["choices"][0]["message"]["content"],
            format!("mock reply: kafka {i}")
        );
    }
}

/// Past the store's 4 MiB chunks: lines span chunk boundaries on the way
/// in and the content comes back byte for byte.
#[tokio::test]
async fn a_file_of_several_chunks_round_trips_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(base_config(&m, &dir)).await;
    let lines: Vec<Value> = (0..10_000)
        .map(|i| line(&format!("id-{i}"), &format!("{i} {}", "x".repeat(800))))
        .collect();
    let data = jsonl(&lines);
    assert!(data.len() > 8 << 20, "spans at least two chunk boundaries");
    let r = upload(&f, &data, "batch", ALICE).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["bytes"], data.len());
    let id = r.body["id"].as_str().unwrap();
    let back = f
        .http
        .get(format!("{}/v1/files/{id}/content", f.base))
        .header(ALICE.0, ALICE.1)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(back == data, "content differs");
}

/// Lines are bounded (`async.batch.max_line_bytes`, default the request
/// body limit): an upload with a longer line is refused naming it, and a
/// file accepted under a larger bound (another replica's config, mid
/// rollout) sends the long line to the error file at once while the other
/// lines run. A line once buffered without bound and bypassed the body limit.
#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn a_line_over_the_bound_is_refused_at_upload_or_goes_to_the_error_file() {
    use crate::redis_server::{write_keys, RedisServer};
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let redis = RedisServer::start().await;
    let ring = dir.path().join("ring");
    write_keys(&ring, &[("k1", 7)]);
    let mut wide = base_config(&m, &dir);
    wide.store = redis.store_config(Some(&ring));
    let mut narrow = wide.clone();
    narrow.server.max_body_bytes = 2048;
    let (wide, narrow) = (start(wide).await, start(narrow).await);
    let long = line("long", &"x".repeat(4000));
    let data = jsonl(&[line("a", "hi"), long.clone(), line("b", "yo")]);

    let refused = upload(&narrow, &data, "batch", ALICE).await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert!(
        refused
            .text
            .contains("line 2 is longer than the limit of 2048 bytes"),
        "{}",
        refused.text
    );
    // A newline-free upload is refused once past the bound, not buffered.
    let endless = vec![b'{'; 64 * 1024];
    let r = upload(&narrow, &endless, "batch", ALICE).await;
    assert_eq!(r.status, 400, "{}", r.text);

    let file = upload(&wide, &data, "batch", ALICE).await;
    assert_eq!(file.status, 200, "{}", file.text);
    let b = create(&narrow, file.body["id"].as_str().unwrap(), ALICE).await;
    assert_eq!(b.status, 200, "{}", b.text);
    let done = wait_final(&narrow, b.body["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    let errs = content(&narrow, done["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0]["error"]["code"], "line_too_large", "{errs:?}");
    let out = content(&narrow, done["output_file_id"].as_str().unwrap()).await;
    let mut ids: Vec<_> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "b"]);
}

/// Shared limits (`rate_limit.shared`) on the async doors: a submission is
/// charged as a call is, so the client is refused at submission (429)
/// rather than its accepted job failing later; a batch line that meets its
/// client's limit when it runs waits for it. Both once failed as 429 when
/// they ran, and submissions were not limited at all.
#[tokio::test]
async fn shared_limits_refuse_at_submission_and_batch_lines_wait_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let mut cfg = base_config(&m, &dir);
    cfg.rate_limit = Some(forwarder::config::RateLimitConfig {
        requests_per_second: 1000,
        burst: 1000,
        shared: true,
        tiers: [(
            "tight".to_string(),
            forwarder::config::TierLimits {
                requests_per_second: 4,
                burst: 2,
                tokens_per_minute: None,
            },
        )]
        .into(),
        client_tiers: [
            ("alice".to_string(), "tight".to_string()),
            ("bob".to_string(), "tight".to_string()),
        ]
        .into(),
        ..Default::default()
    });
    let f = start(cfg).await;
    let mut statuses = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = f
            .post(
                "/v1/async/chat/completions",
                &chat("mock", &format!("q{i}")),
                &[BOB],
            )
            .await;
        statuses.push(r.status);
        if r.status == 202 {
            ids.push(r.body["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(statuses, [202, 202, 429]);
    // Reading a job spends the client's limit too (every route does), so
    // wait on the metrics, then read each once the limit has refilled.
    for _ in 0..400 {
        if f.metric("forwarder_jobs_total", &[("state", "succeeded")])
            .await
            >= 2.0
        {
            break;
        }
        tokio::time::sleep(25 * MS).await;
    }
    tokio::time::sleep(600 * MS).await;
    for id in &ids {
        let job = f.get(&format!("/v1/async/jobs/{id}"), &[BOB]).await;
        assert_eq!(job.body["status"], "succeeded", "{}", job.text);
    }

    let lines: Vec<Value> = (0..5).map(|i| line(&format!("c{i}"), "hi")).collect();
    let file = upload(&f, &jsonl(&lines), "batch", ALICE).await;
    assert_eq!(file.status, 200, "{}", file.text);
    let b = create(&f, file.body["id"].as_str().unwrap(), ALICE).await;
    assert_eq!(b.status, 200, "{}", b.text);
    // Polled slowly, within the limit the lines run under.
    let path = format!("/v1/batches/{}", b.body["id"].as_str().unwrap());
    let mut done = Value::Null;
    for _ in 0..60 {
        tokio::time::sleep(700 * MS).await;
        let r = f.get(&path, &[ALICE]).await;
        if r.status == 200 && r.body["status"] == "completed" {
            done = r.body;
            break;
        }
    }
    tokio::time::sleep(600 * MS).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(done["error_file_id"].is_null(), "{done}");
    let out = content(&f, done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len(), 5);
    for l in &out {
        assert_eq!(l["response"]["status_code"], 200, "{l}");
    }
}

/// Batches of embeddings, Responses and Messages requests: each line runs on its
/// API (the batch's endpoint), and a line naming another endpoint is
/// answered with a 400 in the error file.
#[tokio::test]
async fn batches_run_embeddings_responses_and_messages_lines() {
    let dir = tempfile::tempdir().unwrap();
    let m = mock(MockSettings::default()).await;
    let f = start(base_config(&m, &dir)).await;
    for (endpoint, body, check) in [
        (
            "/v1/embeddings",
            json!({"model": "mock", "input": "hello", "encoding_format": "float"}),
            "/data/0/embedding",
        ),
        (
            "/v1/responses",
            json!({"model": "mock", "input": "hello"}),
            "/output/0/content/0/text",
        ),
        (
            "/v1/messages",
            json!({"model": "mock", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hello"}]}),
            "/content/0/text",
        ),
    ] {
        let l =
            |id: &str| json!({"custom_id": id, "method": "POST", "url": endpoint, "body": body});
        let data = jsonl(&[l("a"), l("b"), line("chat", "not this batch's endpoint")]);
        let up = upload(&f, &data, "batch", ALICE).await;
        assert_eq!(up.status, 200, "{}", up.text);
        let req = json!({"input_file_id": up.body["id"], "endpoint": endpoint, "completion_window": "24h"});
        let b = f.post("/v1/batches", &req, &[ALICE]).await;
        assert_eq!(b.status, 200, "{}", b.text);
        assert_eq!(b.body["endpoint"], endpoint);
        let done = wait_final(&f, b.body["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["request_counts"]["completed"], 2, "{done}");
        assert_eq!(done["request_counts"]["failed"], 1, "{done}");
        let out = content(&f, done["output_file_id"].as_str().unwrap()).await;
        assert_eq!(out.len(), 2, "{out:?}");
        for o in &out {
            assert_eq!(o["response"]["status_code"], 200, "{o}");
            assert!(
                o["response"]["body"].pointer(check).is_some(),
                "{endpoint}: {o}"
            );
        }
        let err = content(&f, done["error_file_id"].as_str().unwrap()).await;
        assert_eq!(err[0]["custom_id"], "chat", "{err:?}");
        assert_eq!(err[0]["response"]["status_code"], 400, "{err:?}");
    }
}

/// Anthropic's Message Batches API on the same batches: a batch cancelled
/// while its requests wait ends with them `canceled` (counted apart from
/// `errored`), the rest `succeeded`; an OpenAI-created batch is not one of
/// its batches; refusals are in Anthropic's shape (401 included).
#[tokio::test]
async fn a_cancelled_message_batch_reports_its_canceled_requests() {
    let m = mock(MockSettings {
        latency: forwarder::config::LatencyDist::Fixed(Duration::from_millis(200)),
        ..MockSettings::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base_config(&m, &dir);
    cfg.async_jobs.workers = 2;
    let f = start(cfg).await;
    const N: usize = 30;
    let requests: Vec<Value> = (0..N)
        .map(|i| {
            json!({"custom_id": format!("r{i}"), "params": {"model": "mock", "max_tokens": 5,
                "messages": [{"role": "user", "content": format!("q{i}")}]}})
        })
        .collect();
    let r = f
        .post(
            "/v1/messages/batches",
            &json!({"requests": requests}),
            &[ALICE],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("msgbatch_"), "{id}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = f
        .post(
            &format!("/v1/messages/batches/{id}/cancel"),
            &json!({}),
            &[ALICE],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        matches!(
            r.body["processing_status"].as_str(),
            Some("canceling" | "ended")
        ),
        "{}",
        r.text
    );
    let mut batch = Value::Null;
    for _ in 0..400 {
        batch = f
            .get(&format!("/v1/messages/batches/{id}"), &[ALICE])
            .await
            .body;
        if batch["processing_status"] == "ended" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(batch["processing_status"], "ended", "{batch}");
    let counts = &batch["request_counts"];
    let n = |k: &str| counts[k].as_u64().unwrap();
    assert_eq!(n("processing"), 0, "{batch}");
    assert_eq!(
        n("succeeded") + n("errored") + n("canceled") + n("expired"),
        N as u64,
        "{batch}"
    );
    assert!(
        n("canceled") > 0,
        "cancelled while requests waited: {batch}"
    );

    let r = f
        .get(&format!("/v1/messages/batches/{id}/results"), &[ALICE])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let results: Vec<Value> = r
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), N, "{}", r.text);
    let of = |t: &str| results.iter().filter(|l| l["result"]["type"] == t).count() as u64;
    assert_eq!(of("canceled"), n("canceled"), "{}", r.text);
    assert_eq!(of("succeeded"), n("succeeded"), "{}", r.text);
    let ok = results.iter().find(|l| l["result"]["type"] == "succeeded");
    if let Some(ok) = ok {
        assert_eq!(ok["result"]["message"]["type"], "message", "{ok}");
    }

    // An OpenAI-created batch is not a message batch; ids of that API are
    // not this one's.
    let up = upload(&f, &jsonl(&[line("x", "hi")]), "batch", ALICE).await;
    let openai = create(&f, up.body["id"].as_str().unwrap(), ALICE).await;
    let openai_id = openai.body["id"].as_str().unwrap();
    let r = f
        .get(&format!("/v1/messages/batches/{openai_id}"), &[ALICE])
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.body["error"]["type"], "not_found_error", "{}", r.text);
    let listed = f.get("/v1/messages/batches", &[ALICE]).await;
    let ids: Vec<&str> = listed.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()], "{}", listed.text);
    // Pages of one, newest first, past the OpenAI batch between them.
    let one = json!({"requests": [{"custom_id": "a", "params": {"model": "mock",
        "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}}]});
    let newest = f.post("/v1/messages/batches", &one, &[ALICE]).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let page = f
            .get(&format!("/v1/messages/batches?limit=1{after}"), &[ALICE])
            .await;
        assert_eq!(page.status, 200, "{}", page.text);
        let data = page.body["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "{}", page.text);
        let got = data[0]["id"].as_str().unwrap().to_string();
        assert_eq!(page.body["last_id"], json!(got));
        seen.push(got.clone());
        if page.body["has_more"] == false {
            break;
        }
        after = format!("&after_id={got}");
    }
    assert_eq!(seen, [newest, id.clone()]);
    // A create request is read whole, so it is bounded (32 MiB): past it,
    // a 413 in Anthropic's shape.
    let huge = "x".repeat(33 << 20);
    let r = f
        .post(
            "/v1/messages/batches",
            &json!({"requests": [{"custom_id": "big", "params": {"model": "mock", "pad": huge}}]}),
            &[ALICE],
        )
        .await;
    assert_eq!(r.status, 413, "{}", &r.text[..r.text.len().min(300)]);
    assert_eq!(
        r.body["type"],
        "error",
        "{}",
        &r.text[..r.text.len().min(300)]
    );
    // Refusals in Anthropic's shape, the owner's 401 too.
    let r = f.get(&format!("/v1/messages/batches/{id}"), &[BOB]).await;
    assert_eq!(
        (r.status, r.body["type"].as_str()),
        (404, Some("error")),
        "{}",
        r.text
    );
    let r = f.get(&format!("/v1/messages/batches/{id}"), &[]).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(
        r.body["error"]["type"], "authentication_error",
        "{}",
        r.text
    );
}

#[tokio::test]
async fn an_ended_message_batch_is_deleted_with_its_results_and_pages_go_both_ways() {
    let m = mock(MockSettings {
        latency: forwarder::config::LatencyDist::Fixed(Duration::from_millis(100)),
        ..MockSettings::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base_config(&m, &dir);
    cfg.async_jobs.workers = 1;
    let f = start(cfg).await;
    let batch = |n: usize| {
        let requests: Vec<Value> = (0..n)
            .map(|i| {
                json!({"custom_id": format!("r{i}"), "params": {"model": "mock", "max_tokens": 5,
                    "messages": [{"role": "user", "content": format!("q{i}")}]}})
            })
            .collect();
        json!({"requests": requests})
    };
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = f.post("/v1/messages/batches", &batch(1), &[ALICE]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        ids.push(r.body["id"].as_str().unwrap().to_string());
        // An OpenAI batch between them is not on these pages.
        let up = upload(&f, &jsonl(&[line("x", "hi")]), "batch", ALICE).await;
        assert_eq!(
            create(&f, up.body["id"].as_str().unwrap(), ALICE)
                .await
                .status,
            200
        );
    }
    let page = |q: String| {
        let f = &f;
        async move {
            let r = f.get(&format!("/v1/messages/batches?{q}"), &[ALICE]).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let got: Vec<String> = r.body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["id"].as_str().unwrap().to_string())
                .collect();
            (got, r.body["has_more"].as_bool().unwrap())
        }
    };
    // Newest first; before_id pages towards the newer ones.
    let (oldest, middle, newest) = (&ids[0], &ids[1], &ids[2]);
    assert_eq!(
        page(format!("limit=1&before_id={oldest}")).await,
        (vec![middle.clone()], true)
    );
    assert_eq!(
        page(format!("limit=5&before_id={oldest}")).await,
        (vec![newest.clone(), middle.clone()], false)
    );
    assert_eq!(
        page(format!("limit=2&after_id={newest}")).await,
        (vec![middle.clone(), oldest.clone()], false)
    );
    let r = f
        .get(
            &format!("/v1/messages/batches?before_id={oldest}&after_id={newest}"),
            &[ALICE],
        )
        .await;
    assert_eq!((r.status, r.body["type"].as_str()), (400, Some("error")));
    let r = f
        .get("/v1/messages/batches?before_id=msgbatch_nosuch", &[ALICE])
        .await;
    assert_eq!(r.status, 404, "{}", r.text);

    // A batch still processing cannot be deleted.
    let running = f.post("/v1/messages/batches", &batch(40), &[ALICE]).await;
    let running = running.body["id"].as_str().unwrap().to_string();
    let r = f
        .delete(&format!("/v1/messages/batches/{running}"), &[ALICE])
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(
        r.body["error"]["type"], "invalid_request_error",
        "{}",
        r.text
    );
    // Another client cannot delete it, ended or not.
    let r = f
        .delete(&format!("/v1/messages/batches/{oldest}"), &[BOB])
        .await;
    assert_eq!(r.status, 404, "{}", r.text);

    // An ended one goes, with its results and its files.
    let internal = crate_batch_id(oldest);
    let mut openai = Value::Null;
    for _ in 0..400 {
        openai = f
            .get(&format!("/v1/batches/{internal}"), &[ALICE])
            .await
            .body;
        if openai["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(openai["status"], "completed", "{openai}");
    let output = openai["output_file_id"].as_str().unwrap().to_string();
    let input = openai["input_file_id"].as_str().unwrap().to_string();
    let r = f
        .delete(&format!("/v1/messages/batches/{oldest}"), &[ALICE])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"id": oldest, "type": "message_batch_deleted"}),
        "{}",
        r.text
    );
    for gone in [
        format!("/v1/messages/batches/{oldest}"),
        format!("/v1/messages/batches/{oldest}/results"),
        format!("/v1/files/{output}"),
        format!("/v1/files/{input}/content"),
    ] {
        let r = f.get(&gone, &[ALICE]).await;
        assert_eq!(r.status, 404, "{gone}: {}", r.text);
    }
    let (listed, _) = page("limit=100".into()).await;
    assert_eq!(listed, vec![running, newest.clone(), middle.clone()]);
    let r = f
        .delete(&format!("/v1/messages/batches/{oldest}"), &[ALICE])
        .await;
    assert_eq!(r.status, 404, "deleted once: {}", r.text);
}

/// The Batch API's id of a message batch.
fn crate_batch_id(message_batch: &str) -> String {
    forwarder::batch::anthropic::batch_id(message_batch).expect("a message batch id")
}
