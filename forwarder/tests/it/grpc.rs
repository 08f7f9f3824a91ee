//! The gRPC front end with a real tonic client: both calls, status codes
//! with their HTTP mapping, health and reflection.

use std::time::Duration;

use forwarder::config::{Config, MockSettings};
use forwarder::frontends::grpc::pb::{ChatMessage, ForwardRequest};
use forwarder::mock_llm::Fault;
use futures::StreamExt;
use tonic::{Code, Request};

use crate::common::*;

fn req(model: &str, prompt: &str) -> ForwardRequest {
    ForwardRequest {
        model_id: model.into(),
        prompt: prompt.into(),
        ..Default::default()
    }
}

fn http_status(s: &tonic::Status) -> String {
    s.metadata()
        .get("x-http-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

#[tokio::test]
async fn unary_and_streaming_calls_answer() {
    let m = mock(MockSettings::default()).await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let mut client = grpc_client(&fwd).await;

    let resp = client.forward(req("m", "hello grpc")).await.unwrap();
    assert!(resp.metadata().get("x-request-id").is_some());
    let r = resp.into_inner();
    assert_eq!(r.reply, "mock reply: hello grpc");
    assert_eq!(r.finish_reason, "stop");
    assert_eq!(r.usage.unwrap().completion_tokens, 4);

    let chat = ForwardRequest {
        model_id: "m".into(),
        messages: vec![
            ChatMessage {
                role: "system".into(),
                content: "be brief".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "one two".into(),
            },
        ],
        ..Default::default()
    };
    let mut stream = client.forward_stream(chat).await.unwrap().into_inner();
    let mut chunks = Vec::new();
    while let Some(c) = stream.next().await {
        chunks.push(c.unwrap());
    }
    let text: String = chunks.iter().map(|c| c.delta.as_str()).collect();
    assert_eq!(text, "mock reply: one two");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, "stop");
    assert_eq!(last.usage.unwrap().completion_tokens, 4);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.finish_reason.is_empty()));
}

#[tokio::test]
async fn errors_are_status_codes_carrying_the_http_status() {
    let m = mock(MockSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "g: sk-grpc\n").unwrap();
    let mut u = upstream("a", &m, "m");
    u.timeout = Duration::from_millis(200);
    let mut cfg = config(vec![u]);
    cfg.auth.api_keys_file = Some(keys);
    cfg.retry.max_attempts = 1;
    cfg.server.max_body_bytes = 2048;
    let fwd = start(cfg).await;
    let mut client = grpc_client(&fwd).await;
    let authed = |r: ForwardRequest| {
        let mut r = Request::new(r);
        r.metadata_mut()
            .insert("authorization", "Bearer sk-grpc".parse().unwrap());
        r
    };

    let e = client.forward(req("m", "x")).await.unwrap_err();
    assert_eq!(
        (e.code(), http_status(&e).as_str()),
        (Code::Unauthenticated, "401")
    );
    let mut bad = Request::new(req("m", "x"));
    bad.metadata_mut()
        .insert("x-api-key", "wrong".parse().unwrap());
    assert_eq!(
        client.forward(bad).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let cases: Vec<(ForwardRequest, Option<Fault>, Code, &str, &str)> = vec![
        (
            req("nope", "x"),
            None,
            Code::NotFound,
            "404",
            "model_not_found",
        ),
        (
            req("m", ""),
            None,
            Code::InvalidArgument,
            "400",
            "invalid_request",
        ),
        (
            req("m", "x"),
            Some(Fault::Error {
                status: 500,
                retry_after: None,
            }),
            Code::Unavailable,
            "502",
            "bad_gateway",
        ),
        (
            req("m", "x"),
            Some(Fault::Hang),
            Code::DeadlineExceeded,
            "504",
            "upstream_timeout",
        ),
        (
            req("m", "x"),
            Some(Fault::Error {
                status: 429,
                retry_after: Some(Duration::from_secs(3)),
            }),
            Code::ResourceExhausted,
            "429",
            "rate_limit_exceeded",
        ),
    ];
    for (r, fault, code, http, error_code) in cases {
        if let Some(f) = fault {
            m.model.fail_next(1, f);
        }
        let e = client.forward(authed(r)).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert_eq!(http_status(&e), http, "{e:?}");
        assert_eq!(
            e.metadata().get("x-error-code").unwrap().to_str().unwrap(),
            error_code
        );
    }
    // Oversized messages are refused by the decoder.
    let e = client
        .forward(authed(req("m", &"x".repeat(4096))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // A streaming call fails with the same mapping.
    let e = client
        .forward_stream(authed(req("nope", "x")))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), http_status(&e).as_str()),
        (Code::NotFound, "404")
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let mut cfg = Config::default();
    cfg.server.listen = loopback();
    cfg.grpc.enabled = true;
    cfg.grpc.listen = loopback();
    cfg.server.shutdown.drain_delay = Duration::from_millis(400);
    let fwd = start(cfg).await;
    let channel = tonic::transport::Endpoint::from_shared(fwd.grpc.clone().unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "modelforwarder.v1.Forwarder".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["modelforwarder.v1.Forwarder", "grpc.health.v1.Health"] {
        assert!(names.contains(&service.to_string()), "{names:?}");
    }

    // Clients of the older reflection protocol are answered too.
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let channel = tonic::transport::Endpoint::from_shared(fwd.grpc.clone().unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let reply = ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner()
            .next()
            .await
            .unwrap()
            .unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected v1alpha reflection answer");
        };
        assert!(list
            .service
            .iter()
            .any(|s| s.name == "modelforwarder.v1.Forwarder"));
    }

    // Shutting down flips health to NOT_SERVING during the drain delay.
    let Fwd { server, .. } = fwd;
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "modelforwarder.v1.Forwarder".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    stopping.await.unwrap();
}

/// A client deadline (`grpc-timeout`) bounds the whole call, retries
/// included, and is answered as DEADLINE_EXCEEDED with its HTTP mapping.
#[tokio::test]
async fn grpc_timeout_is_honoured_as_deadline_exceeded() {
    let m = mock(MockSettings {
        latency: forwarder::config::LatencyDist::Fixed(Duration::from_secs(3)),
        ..Default::default()
    })
    .await;
    let fwd = start(config(vec![upstream("a", &m, "m")])).await;
    let mut client = grpc_client(&fwd).await;
    let mut request = Request::new(req("m", "slow"));
    request.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let err = client.forward(request).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(http_status(&err), "504");
}
