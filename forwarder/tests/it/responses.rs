//! `GET`/`DELETE /v1/responses/{id}` for a response created by a stream:
//! the id is read from the stream's events and the request routed to the
//! upstream that streamed it.

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
