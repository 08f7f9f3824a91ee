//! `GET`/`DELETE /v1/responses/{id}` for a response created by a stream:
//! the id is read from the stream's events and the request routed to the
//! upstream that streamed it; a retrieve with `stream=true` relays the
//! upstream's events.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn a_streamed_responses_id_is_routed_to_its_upstream() {
    let m = mock(Default::default()).await;
    let fwd = start(config(vec![upstream("one", &m, "gpt")])).await;
    let r = fwd
        .post(
            "/v1/responses",
            &json!({"model": "gpt", "input": "hi", "stream": true}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let created = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find_map(|d| {
            let v: serde_json::Value = serde_json::from_str(d).ok()?;
            v["response"]["id"].as_str().map(str::to_string)
        })
        .expect("a response id in the stream");
    // The mock keeps only whole answers: its own 404 (its wording) proves
    // the request reached it, where an unknown id gets the forwarder's.
    let got = fwd.get(&format!("/v1/responses/{created}"), &[]).await;
    assert_eq!(got.status, 404, "{}", got.text);
    assert!(
        got.text
            .contains(&format!("Response with id '{created}' not found")),
        "{}",
        got.text
    );
    let unknown = fwd.get("/v1/responses/resp_unknown", &[]).await;
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.text.contains("no response with id"),
        "{}",
        unknown.text
    );

    // A whole answer: retrieved and deleted at the upstream.
    let r = fwd
        .post(
            "/v1/responses",
            &json!({"model": "gpt", "input": "hi"}),
            &[],
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    let got = fwd.get(&format!("/v1/responses/{id}"), &[]).await;
    assert_eq!((got.status, &got.body), (200, &r.body));

    // Retrieved as a stream (`stream=true`, the query passed as sent):
    // the upstream's events relayed, from after `starting_after` if given.
    let events = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    };
    let got = fwd
        .get(&format!("/v1/responses/{id}?stream=true"), &[])
        .await;
    assert_eq!(got.status, 200, "{}", got.text);
    assert_eq!(
        got.headers.get("content-type").unwrap(),
        "text/event-stream"
    );
    let all = events(&got.text);
    assert!(all.len() >= 3, "{}", got.text);
    assert_eq!(all[0]["type"], "response.created", "{}", got.text);
    let last = all.last().unwrap();
    assert_eq!(last["type"], "response.completed", "{}", got.text);
    assert_eq!(last["response"], r.body);
    let text: String = all
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(
        json!(text),
        r.body["output"][0]["content"][0]["text"],
        "the deltas make the answer's text"
    );
    let got = fwd
        .get(
            &format!("/v1/responses/{id}?stream=true&starting_after=1"),
            &[],
        )
        .await;
    let rest = events(&got.text);
    assert_eq!(rest.len(), all.len() - 2, "{}", got.text);
    assert_eq!(rest[0]["sequence_number"], 2, "{}", got.text);

    let del = fwd.delete(&format!("/v1/responses/{id}"), &[]).await;
    assert_eq!(del.status, 200, "{}", del.text);
    assert_eq!(del.body["deleted"], true);
    let gone = fwd.get(&format!("/v1/responses/{id}"), &[]).await;
    assert_eq!(gone.status, 404);
}

/// Replicas that share a store share what they know: a response created
/// through one is retrieved and deleted through another.
#[cfg_attr(not(redis_server), ignore = "redis-server not installed")]
#[tokio::test]
async fn another_replica_finds_the_upstream_through_the_store() {
    use crate::redis_server::{write_keys, RedisServer};
    let dir = tempfile::tempdir().unwrap();
    let (m1, m2) = (
        mock(Default::default()).await,
        mock(Default::default()).await,
    );
    let redis = RedisServer::start().await;
    let ring = dir.path().join("ring");
    write_keys(&ring, &[("k1", 7)]);
    let mut cfg = config(vec![
        upstream("one", &m1, "gpt"),
        upstream("two", &m2, "gpt"),
    ]);
    cfg.store = redis.store_config(Some(&ring));
    let (a, b) = (start(cfg.clone()).await, start(cfg).await);
    crate::replicas::connected(&a).await;
    crate::replicas::connected(&b).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let r = a
            .post(
                "/v1/responses",
                &json!({"model": "gpt", "input": format!("q{i}")}),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        ids.push((r.body["id"].as_str().unwrap().to_string(), r.body.clone()));
    }
    // The store write is in the background: allow it up to 5 s.
    for (id, body) in &ids {
        let mut got = b.get(&format!("/v1/responses/{id}"), &[]).await;
        for _ in 0..100 {
            if got.status == 200 {
                break;
            }
            tokio::time::sleep(50 * MS).await;
            got = b.get(&format!("/v1/responses/{id}"), &[]).await;
        }
        assert_eq!((got.status, &got.body), (200, body), "{id}");
    }
    let del = b.delete(&format!("/v1/responses/{}", ids[0].0), &[]).await;
    assert_eq!(del.status, 200, "{}", del.text);
    let gone = a.get(&format!("/v1/responses/{}", ids[0].0), &[]).await;
    assert_eq!(gone.status, 404, "{}", gone.text);
}

/// A streamed retrieve from an upstream that breaks its stream, or stops
/// sending: the client gets the events that came, then an `error` event
/// (never a bare cut, never a wait without end).
#[tokio::test]
async fn a_streamed_retrieve_the_upstream_breaks_ends_with_an_error_event() {
    use axum::body::Body;
    use axum::extract::Path;
    use axum::routing::{get, post};
    use futures::StreamExt;

    let first =
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0}\n\n";
    let app = axum::Router::new()
        .route(
            "/v1/responses",
            post(|axum::Json(req): axum::Json<serde_json::Value>| async move {
                let id = format!("resp_{}", req["input"].as_str().unwrap_or_default());
                axum::Json(json!({"id": id, "object": "response", "status": "completed", "output": []}))
            }),
        )
        .route(
            "/v1/responses/{id}",
            get(move |Path(id): Path<String>| async move {
                let head = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(first))]);
                let body = if id == "resp_broken" {
                    // One event, then the connection is cut mid-body.
                    Body::from_stream(head.chain(futures::stream::once(async {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        Err(std::io::Error::other("cut"))
                    })))
                } else {
                    // One event, then nothing, for good.
                    Body::from_stream(head.chain(futures::stream::pending()))
                };
                ([("content-type", "text/event-stream")], body)
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let m = mock(Default::default()).await;
    let mut up = upstream("odd", &m, "gpt");
    up.base_url = Some(base);
    up.timeout = std::time::Duration::from_millis(500);
    let fwd = start(config(vec![up])).await;
    for (input, what) in [
        ("broken", "cut mid-body"),
        ("hang", "silent after one event"),
    ] {
        let r = fwd
            .post(
                "/v1/responses",
                &json!({"model": "gpt", "input": input}),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let started = std::time::Instant::now();
        let got = fwd
            .get(&format!("/v1/responses/resp_{input}?stream=true"), &[])
            .await;
        assert_eq!(got.status, 200, "{what}: {}", got.text);
        assert!(got.text.starts_with(first), "{what}: {}", got.text);
        assert!(
            got.text.ends_with("\n\n") && got.text.contains("event: error\ndata: {"),
            "{what}: {}",
            got.text
        );
        assert!(
            got.text.contains("\"type\":\"error\""),
            "{what}: {}",
            got.text
        );
        // The silent one is cut by the upstream's timeout (500 ms) between
        // events.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{what}: {:?}",
            started.elapsed()
        );
    }
}
