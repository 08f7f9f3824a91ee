//! Per-client budgets (issue 21): one budget shared by two forwarder
//! processes on a real Redis under concurrent requests, streams charged
//! from a usage chunk the client never sees, a second client unaffected,
//! `GET /v1/budget` showing only the caller's figures, a Redis restart
//! mid-traffic under each failure policy, and the memory store.

use std::time::Duration;

use forwarder::config::{BudgetLimits, BudgetsConfig, Config, FailurePolicy, ModelPrice, Provider};
use serde_json::{json, Value};

use crate::common::*;
use crate::redis_server::{write_keys, RedisServer};

const ALICE: (&str, &str) = ("authorization", "Bearer sk-alice");
const BOB: (&str, &str) = ("authorization", "Bearer sk-bob");
const CAROL: (&str, &str) = ("authorization", "Bearer sk-carol");

fn budgets(clients: &[(&str, BudgetLimits)]) -> BudgetsConfig {
    BudgetsConfig {
        default: None,
        tiers: Default::default(),
        clients: clients
            .iter()
            .map(|(c, l)| (c.to_string(), l.clone()))
            .collect(),
        prices: Default::default(),
        on_store_error: FailurePolicy::FailOpen,
        metric_clients: 50,
    }
}

fn tokens_per_day(n: u64) -> BudgetLimits {
    BudgetLimits {
        daily_tokens: Some(n),
        ..Default::default()
    }
}

fn keyed(dir: &std::path::Path, cfg: &mut Config) {
    let keys = dir.join("keys");
    std::fs::write(&keys, "alice: sk-alice\nbob: sk-bob\ncarol: sk-carol\n").unwrap();
    cfg.auth.api_keys_file = Some(keys);
}

fn ask(prompt: &str, max_tokens: u64) -> Value {
    let mut b = chat("m", prompt);
    b["max_tokens"] = json!(max_tokens);
    b
}

fn used_tokens(r: &Resp) -> u64 {
    r.body["usage"]["total_tokens"].as_u64().expect("usage")
}

async fn budget_of(base: &str, who: (&str, &str)) -> Value {
    let r = client()
        .get(format!("{base}/v1/budget"))
        .header(who.0, who.1)
        .send()
        .await
        .unwrap();
    let r = into_resp(r).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

/// Polls until the caller's daily token count reads `want` (corrections
/// are written just after the answer).
async fn daily_tokens_settle(base: &str, who: (&str, &str), want: u64) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = budget_of(base, who).await;
        if last["daily"]["tokens"]["used"] == json!(want) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("daily tokens never read {want}: {last}");
}

#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_budget_without_overspending() {
    use crate::process::Replica;
    let m = slow_mock(Duration::from_millis(50)).await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("ring");
    write_keys(&ring, &[("k1", 7)]);
    let mut cfg = config(vec![upstream("a", &m, "m")]);
    cfg.store = redis.store_config(Some(&ring));
    cfg.store.redis.as_mut().unwrap().timeout = Duration::from_secs(1);
    keyed(dir.path(), &mut cfg);
    const LIMIT: u64 = 300;
    cfg.budgets = Some(budgets(&[
        ("alice", tokens_per_day(LIMIT)),
        ("key:bob", tokens_per_day(100_000)),
    ]));
    let mut a = Replica::new("a", dir.path(), &cfg);
    let mut b = Replica::new("b", dir.path(), &cfg);
    a.start().await;
    b.start().await;

    // 60 concurrent requests from alice, half through each replica.
    let sends = (0..60).map(|i| {
        let base = if i % 2 == 0 { a.base() } else { b.base() };
        async move {
            let r = client()
                .post(format!("{base}/v1/chat/completions"))
                .header(ALICE.0, ALICE.1)
                .json(&ask("hello there", 8))
                .send()
                .await
                .unwrap();
            into_resp(r).await
        }
    });
    let answers = futures::future::join_all(sends).await;
    let ok: Vec<&Resp> = answers.iter().filter(|r| r.status == 200).collect();
    let refused: Vec<&Resp> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok.len() + refused.len(), 60, "only 200s and 429s");
    assert!(!ok.is_empty() && !refused.is_empty());
    let spent: u64 = ok.iter().map(|r| used_tokens(r)).sum();
    let one = ok.iter().map(|r| used_tokens(r)).max().unwrap();
    assert!(
        spent <= LIMIT + one,
        "{spent} tokens answered on a budget of {LIMIT} (one request is {one})"
    );
    let e = refused[0];
    assert_eq!(e.error_code(), "budget_exceeded", "{}", e.text);
    assert_eq!(e.body["error"]["type"], "insufficient_quota");
    let msg = e.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("daily token budget"), "{msg}");
    assert!(e.header("retry-after").is_some());

    // Both replicas read the one budget: what was answered, exactly.
    let seen = daily_tokens_settle(&a.base(), ALICE, spent).await;
    assert_eq!(seen["client"], "key:alice");
    assert_eq!(seen["daily"]["tokens"]["limit"], LIMIT);
    daily_tokens_settle(&b.base(), ALICE, spent).await;

    // A second client is unaffected, and sees only its own figures.
    let r = b.post("/v1/chat/completions", &ask("hi", 4), &[BOB]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let bob_used = used_tokens(&r);
    let bob = daily_tokens_settle(&a.base(), BOB, bob_used).await;
    assert_eq!(bob["client"], "key:bob");
    assert_eq!(bob["daily"]["tokens"]["limit"], 100_000);
    assert!(!bob.to_string().contains("alice"), "{bob}");

    // A stream asking for usage gets its usage chunk, and is charged it.
    let stream = |base: String, opts: Option<Value>| {
        let mut s = ask("stream me", 5);
        s["stream"] = json!(true);
        if let Some(o) = opts {
            s["stream_options"] = o;
        }
        async move {
            let r = client()
                .post(format!("{base}/v1/chat/completions"))
                .header(BOB.0, BOB.1)
                .json(&s)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            sse_events(r).await
        }
    };
    let events = stream(b.base(), Some(json!({"include_usage": true}))).await;
    let usage: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v["usage"].is_object())
        .collect();
    assert_eq!(usage.len(), 1, "{events:?}");
    let per_stream = usage[0]["usage"]["total_tokens"].as_u64().unwrap();
    daily_tokens_settle(&a.base(), BOB, bob_used + per_stream).await;
    // The same stream from a client that did not ask: charged from the
    // usage chunk the forwarder asked for, which the client never receives.
    let events = stream(a.base(), None).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "the client got a usage chunk it did not ask for: {events:?}"
    );
    assert!(stream_text(&events).starts_with("mock reply: stream me"));
    daily_tokens_settle(&b.base(), BOB, bob_used + 2 * per_stream).await;

    // What the burst's refunds left is spent one request at a time; then
    // both replicas refuse alice, and the total never passed the budget.
    let mut spent = spent;
    for i in 0..50 {
        let r = if i % 2 == 0 { &a } else { &b }
            .post("/v1/chat/completions", &ask("hello there", 8), &[ALICE])
            .await;
        if r.status == 429 {
            break;
        }
        spent += used_tokens(&r);
    }
    assert!(
        spent <= LIMIT,
        "{spent} tokens answered on a budget of {LIMIT}"
    );
    daily_tokens_settle(&b.base(), ALICE, spent).await;
    for r in [&a, &b] {
        let r = r
            .post("/v1/chat/completions", &ask("hello there", 8), &[ALICE])
            .await;
        assert_eq!(r.status, 429, "{}", r.text);
    }
    let carol = budget_of(&a.base(), CAROL).await;
    assert_eq!(carol["limited"], false);
    assert_eq!(carol["daily"]["tokens"]["used"], 0);
}

/// Redis killed mid-traffic: a `fail_open` replica admits budgeted
/// requests uncounted, a `fail_closed` one refuses them with 503; a client
/// without a budget is served by both (it costs no store call). After the
/// restart both count and enforce again.
#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn a_redis_restart_mid_traffic_follows_the_budget_policy() {
    let m = mock(forwarder::config::MockSettings::default()).await;
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("ring");
    write_keys(&ring, &[("k1", 7)]);
    let mk = |policy| {
        let mut cfg = config(vec![upstream("a", &m, "m")]);
        cfg.store = redis.store_config(Some(&ring));
        keyed(dir.path(), &mut cfg);
        let mut b = budgets(&[("alice", tokens_per_day(1_000_000))]);
        b.on_store_error = policy;
        cfg.budgets = Some(b);
        cfg
    };
    let open = start(mk(FailurePolicy::FailOpen)).await;
    let closed = start(mk(FailurePolicy::FailClosed)).await;
    crate::replicas::connected(&open).await;
    crate::replicas::connected(&closed).await;
    let r = open
        .post("/v1/chat/completions", &ask("a", 3), &[ALICE])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let before = used_tokens(&r);
    daily_tokens_settle(&closed.base, ALICE, before).await;

    redis.kill();
    for _ in 0..3 {
        let r = open
            .post("/v1/chat/completions", &ask("b", 3), &[ALICE])
            .await;
        assert_eq!(r.status, 200, "fail_open admits: {}", r.text);
        let r = closed
            .post("/v1/chat/completions", &ask("b", 3), &[ALICE])
            .await;
        assert_eq!(r.status, 503, "fail_closed refuses: {}", r.text);
        assert_eq!(r.error_code(), "store_unavailable");
        let r = closed
            .post("/v1/chat/completions", &ask("c", 3), &[BOB])
            .await;
        assert_eq!(r.status, 200, "no budget, no store call: {}", r.text);
    }
    let r = open.get("/v1/budget", &[ALICE]).await;
    assert_eq!(r.status, 503, "{}", r.text);

    redis.restart().await;
    crate::replicas::connected(&open).await;
    crate::replicas::connected(&closed).await;
    // Redis restarted without persistence: the day's count starts afresh.
    let r = closed
        .post("/v1/chat/completions", &ask("d", 3), &[ALICE])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    daily_tokens_settle(&open.base, ALICE, used_tokens(&r)).await;
}

/// One replica on the memory store: a spend budget at a model's prices,
/// refused in OpenAI's shape on chat and in Anthropic's on /v1/messages,
/// another client unaffected, and the per-client metrics capped.
#[tokio::test]
async fn the_memory_store_keeps_a_spend_budget_for_one_replica() {
    let m = mock(forwarder::config::MockSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut anthropic = upstream("an", &m, "claude");
    anthropic.provider = Provider::Anthropic;
    let mut cfg = config(vec![upstream("a", &m, "m"), anthropic]);
    keyed(dir.path(), &mut cfg);
    let mut b = budgets(&[]);
    // Every client: $0.0001 a day; at $1 / $2 per million tokens in / out.
    b.default = Some(BudgetLimits {
        daily_spend: Some(0.0001),
        ..Default::default()
    });
    for model in ["m", "claude"] {
        b.prices.insert(
            model.into(),
            ModelPrice {
                input: 1.0,
                output: 2.0,
            },
        );
    }
    b.metric_clients = 1;
    cfg.budgets = Some(b);
    let f = start(cfg).await;

    let mut spent_micros = 0.0;
    let mut refused = None;
    for _ in 0..100 {
        let r = f
            .post("/v1/chat/completions", &ask("x", 10), &[ALICE])
            .await;
        if r.status != 200 {
            refused = Some(r);
            break;
        }
        let u = &r.body["usage"];
        spent_micros +=
            u["prompt_tokens"].as_f64().unwrap() + 2.0 * u["completion_tokens"].as_f64().unwrap();
    }
    let r = refused.expect("the budget ran out");
    assert_eq!(
        (r.status, r.error_code()),
        (429, "budget_exceeded"),
        "{}",
        r.text
    );
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("daily spend budget"));
    assert!(
        spent_micros <= 100.0,
        "{spent_micros} micro-dollars on a 100 budget"
    );
    let seen = budget_of(&f.base, ALICE).await;
    let used = seen["daily"]["spend_usd"]["used"].as_f64().unwrap();
    assert!((used - spent_micros / 1e6).abs() < 1e-9, "{seen}");
    assert_eq!(seen["daily"]["spend_usd"]["limit"], 0.0001);

    // The Anthropic front end refuses in its own shape.
    let msg = json!({"model": "claude", "max_tokens": 10,
        "messages": [{"role": "user", "content": "x"}]});
    let r = f.post("/v1/messages", &msg, &[ALICE]).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.body["type"], "error");
    assert_eq!(r.body["error"]["type"], "rate_limit_error");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("daily spend budget"));

    // Bob has a budget of his own, charged from Anthropic's usage.
    let r = f.post("/v1/messages", &msg, &[BOB]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let u = &r.body["usage"];
    let bob_micros =
        u["input_tokens"].as_f64().unwrap() + 2.0 * u["output_tokens"].as_f64().unwrap();
    let bob = budget_of(&f.base, BOB).await;
    assert!(
        (bob["daily"]["spend_usd"]["used"].as_f64().unwrap() - bob_micros / 1e6).abs() < 1e-9,
        "{bob}"
    );

    // An async job is charged to its creator's budget when it runs.
    let r = f
        .post("/v1/async/chat/completions", &ask("x", 10), &[BOB])
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = wait_job(&f, r.body["id"].as_str().unwrap(), &[BOB]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let u = &job["response"]["body"]["usage"];
    let job_micros =
        u["prompt_tokens"].as_f64().unwrap() + 2.0 * u["completion_tokens"].as_f64().unwrap();
    let bob = budget_of(&f.base, BOB).await;
    let bob_used = bob["daily"]["spend_usd"]["used"].as_f64().unwrap();
    assert!(
        (bob_used - (bob_micros + job_micros) / 1e6).abs() < 1e-9,
        "{bob}"
    );
    // A client whose budget is spent is refused at submission, with the
    // same 429 a call gets, and no job is made.
    let r = f
        .post("/v1/async/chat/completions", &ask("x", 10), &[ALICE])
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (429, "budget_exceeded"),
        "{}",
        r.text
    );
    assert!(r.headers.get("retry-after").is_some(), "{:?}", r.headers);

    // One client has series of its own (the cap is 1); the rest are "other".
    let alice_tokens = f
        .metric("forwarder_budget_tokens_total", &[("client", "key:alice")])
        .await;
    assert!(alice_tokens > 0.0);
    assert!(
        f.metric("forwarder_budget_tokens_total", &[("client", "other")])
            .await
            > 0.0
    );
    assert_eq!(
        f.metric("forwarder_budget_tokens_total", &[("client", "key:bob")])
            .await,
        0.0
    );
    assert_eq!(
        f.metric(
            "forwarder_budget_refusals_total",
            &[("client", "key:alice"), ("budget", "daily spend")]
        )
        .await,
        3.0
    );
}

/// A Batch API batch spends its creator's budget line by line: the lines
/// that fit are answered, the rest land in the error file with the 429
/// body, and another client is unaffected.
#[tokio::test]
async fn batch_lines_spend_their_creators_budget() {
    let m = mock(forwarder::config::MockSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![upstream("a", &m, "mock")]);
    keyed(dir.path(), &mut cfg);
    const LIMIT: u64 = 120;
    cfg.budgets = Some(budgets(&[
        ("carol", tokens_per_day(LIMIT)),
        ("bob", tokens_per_day(LIMIT)),
    ]));
    let f = start(cfg).await;
    let lines: Vec<Value> = (0..12)
        .map(|i| {
            let mut l = crate::batch::line(&format!("l{i}"), "spend some tokens");
            l["body"]["max_tokens"] = json!(6);
            l
        })
        .collect();
    let r = crate::batch::upload(&f, &crate::batch::jsonl(&lines), "batch", CAROL).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = crate::batch::create(&f, r.body["id"].as_str().unwrap(), CAROL).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let mut batch = Value::Null;
    for _ in 0..400 {
        batch = f.get(&format!("/v1/batches/{id}"), &[CAROL]).await.body;
        if batch["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(batch["status"], "completed", "{batch}");
    let file = |key: &str| {
        let id = batch[key].as_str().map(str::to_string);
        let f = &f;
        async move {
            let Some(id) = id else { return Vec::new() };
            let r = f.get(&format!("/v1/files/{id}/content"), &[CAROL]).await;
            assert_eq!(r.status, 200, "{}", r.text);
            r.text
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect()
        }
    };
    let out = file("output_file_id").await;
    let errors = file("error_file_id").await;
    assert_eq!(out.len() + errors.len(), 12, "{batch}");
    assert!(!out.is_empty() && !errors.is_empty(), "{batch}");
    let spent: u64 = out
        .iter()
        .map(|l| {
            l["response"]["body"]["usage"]["total_tokens"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(spent <= LIMIT, "{spent} tokens on a budget of {LIMIT}");
    let e = &errors[0]["response"];
    assert_eq!(e["status_code"], 429, "{e}");
    assert_eq!(e["body"]["error"]["code"], "budget_exceeded", "{e}");
    daily_tokens_settle(&f.base, CAROL, spent).await;
    // Bob's budget is his own.
    let mut body = ask("x", 6);
    body["model"] = json!("mock");
    let r = f.post("/v1/chat/completions", &body, &[BOB]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    daily_tokens_settle(&f.base, BOB, used_tokens(&r)).await;
}

/// A batch is refused at creation, with the 429 a call gets and no batch
/// made, once its creator's budget has no room left at all; before that
/// it is created (its lines are then checked as they run).
#[tokio::test]
async fn a_batch_is_refused_at_creation_once_its_creators_budget_is_spent() {
    // Answers of 40 words and more: far past a short request's estimate.
    let m = mock(forwarder::config::MockSettings {
        reply_words: 40,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(vec![upstream("a", &m, "mock")]);
    keyed(dir.path(), &mut cfg);
    // Room for one short request's estimate (its body's bytes / 4, with no
    // max_tokens), and far less than what the mock's answer uses.
    const LIMIT: u64 = 16;
    cfg.budgets = Some(budgets(&[("carol", tokens_per_day(LIMIT))]));
    let f = start(cfg).await;
    let lines = [crate::batch::line("only", "hello")];
    let upload = crate::batch::upload(&f, &crate::batch::jsonl(&lines), "batch", CAROL).await;
    assert_eq!(upload.status, 200, "{}", upload.text);
    let file = upload.body["id"].as_str().unwrap().to_string();
    let r = crate::batch::create(&f, &file, CAROL).await;
    assert_eq!(r.status, 200, "with room left: {}", r.text);
    let batches_before = f.get("/v1/batches", &[CAROL]).await.body["data"]
        .as_array()
        .map(Vec::len);

    // The batch's line, and requests like it, are estimated from their
    // prompt only, so the answers' real usage carries the count past the
    // limit.
    let body = chat("mock", "x");
    let mut report = Value::Null;
    for _ in 0..50 {
        report = budget_of(&f.base, CAROL).await;
        if report["daily"]["tokens"]["used"].as_u64().unwrap() >= LIMIT {
            break;
        }
        let r = f.post("/v1/chat/completions", &body, &[CAROL]).await;
        assert!(matches!(r.status, 200 | 429), "{}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        report["daily"]["tokens"]["used"].as_u64().unwrap() >= LIMIT,
        "the budget never ran out: {report}"
    );

    let r = crate::batch::create(&f, &file, CAROL).await;
    assert_eq!(
        (r.status, r.error_code()),
        (429, "budget_exceeded"),
        "{}",
        r.text
    );
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("daily token budget"));
    assert_eq!(
        f.get("/v1/batches", &[CAROL]).await.body["data"]
            .as_array()
            .map(Vec::len),
        batches_before,
        "a refused batch is not made"
    );
    // Bob has no budget: his batches are not checked.
    let upload = crate::batch::upload(&f, &crate::batch::jsonl(&lines), "batch", BOB).await;
    let bob_file = upload.body["id"].as_str().unwrap().to_string();
    let r = crate::batch::create(&f, &bob_file, BOB).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// The official openai and anthropic SDKs against a budgeted client
/// (`forwarder/tests/budget_sdks.py`).
#[tokio::test]
async fn the_openai_and_anthropic_sdks_see_budgets_as_they_expect() {
    let python = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.exists(),
        "this test needs the project virtualenv: run ./scripts/test.sh (it creates .venv)"
    );
    let m = mock(forwarder::config::MockSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut anthropic = upstream("an", &m, "claude");
    anthropic.provider = Provider::Anthropic;
    let mut cfg = config(vec![upstream("a", &m, "m"), anthropic]);
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "sdk: sk-sdk\n").unwrap();
    cfg.auth.api_keys_file = Some(keys);
    cfg.budgets = Some(budgets(&[("sdk", tokens_per_day(200))]));
    let f = start(cfg).await;
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/budget_sdks.py");
    let base = f.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("FORWARDER_BASE", base)
            .env("FORWARDER_API_KEY", "sk-sdk")
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

/// The store's increment-then-check on its own: 40 concurrent checked
/// charges of 10 against a limit of 100, from two store clients (two
/// connections, as two replicas have) on one Redis, and on the memory
/// store: exactly 10 stand, and the counter ends at the limit.
#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counter_charge_is_atomic_across_clients() {
    use forwarder::store::{Counter, CounterOp, Space, Store, StoreKey};
    use std::sync::Arc;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("ring");
    write_keys(&ring, &[("k1", 7)]);
    let build = || {
        let cfg = Config {
            store: redis.store_config(Some(&ring)),
            ..Default::default()
        };
        let metrics = forwarder::telemetry::Metrics::new();
        forwarder::store::build(&cfg, &metrics).expect("store builds")
    };
    let (one, two) = (build(), build());
    let key = StoreKey::new(Space::Budget, "key:alice", b"day:2026-12-07:tokens");
    let charge = |check| {
        vec![Counter {
            key: key.clone(),
            op: CounterOp {
                delta: if check { 10 } else { 0 },
                limit: Some(100),
                ttl: Duration::from_secs(60),
            },
        }]
    };
    for s in [&one, &two] {
        for _ in 0..100 {
            if s.add(&charge(false), false).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let memory = forwarder::store::memory(1 << 20);
    let cases: [(&str, [Arc<dyn Store>; 2]); 2] = [
        ("redis", [one.clone(), two.clone()]),
        ("memory", [memory.clone(), memory.clone()]),
    ];
    for (name, stores) in cases {
        let tries = (0..40).map(|i| {
            let s = stores[i % 2].clone();
            let c = charge(true);
            tokio::spawn(async move { s.add(&c, true).await.expect("store answers").0 })
        });
        let stood = futures::future::join_all(tries)
            .await
            .into_iter()
            .filter(|r| *r.as_ref().unwrap())
            .count();
        assert_eq!(stood, 10, "{name}");
        let (_, values) = stores[0].add(&charge(false), false).await.unwrap();
        assert_eq!(values, [100], "{name}");
    }
    // The counter expires with its period (its TTL is set at first use).
    let mut conn = redis.conn().await;
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("*budget:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&names[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
}
