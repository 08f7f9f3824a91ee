//! The CEL rules of the committed CRD, evaluated client-side (kube-cel,
//! defaults applied first, as the API server does): what the schema alone
//! cannot reject is rejected here, and valid resources pass.

use kube::core::cel::Validator;
use serde_json::{json, Value};

fn schema() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/modelforwarder.yaml");
    let text = std::fs::read_to_string(&path).expect("committed CRD");
    let crd: Value = serde_yaml::from_str(&text).expect("CRD YAML");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn resource(spec_extra: Value) -> Value {
    named("bot", spec_extra)
}

fn named(name: &str, spec_extra: Value) -> Value {
    let mut spec = json!({
        "upstreams": [{"name": "local", "provider": "mock", "models": ["mock"]}]
    });
    if let (Value::Object(s), Value::Object(extra)) = (&mut spec, spec_extra) {
        s.extend(extra);
    }
    json!({
        "apiVersion": "llm.forwarder.dev/v1alpha1",
        "kind": "ModelForwarder",
        "metadata": {"name": name, "namespace": "ai"},
        "spec": spec
    })
}

/// `Ok` or every failure message.
fn check(spec_extra: Value) -> Result<(), String> {
    Validator::new()
        .validate(&schema(), &resource(spec_extra), None)
        .map_err(|e| e.to_string())
}

#[test]
fn defaults_alone_are_valid() {
    check(json!({})).expect("a minimal resource is valid");
}

#[test]
fn replica_bounds() {
    check(json!({"replicas": {"min": 2, "max": 20}})).expect("min < max");
    check(json!({"replicas": {"min": 3, "max": 3, "desired": 3}})).expect("all equal");
    let e = check(json!({"replicas": {"min": 9, "max": 5}})).unwrap_err();
    assert!(e.contains("min must not exceed max"), "{e}");
    let e = check(json!({"replicas": {"min": 2, "max": 5, "desired": 7}})).unwrap_err();
    assert!(e.contains("desired must lie within [min, max]"), "{e}");
    // `max` defaults to 10, so a lone large `min` is caught too.
    let e = check(json!({"replicas": {"min": 12}})).unwrap_err();
    assert!(e.contains("min must not exceed max"), "{e}");
}

#[test]
fn retry_delays_are_ordered() {
    check(json!({"retry": {"baseDelay": "500ms", "maxDelay": "1s"}})).expect("ordered");
    check(json!({"retry": {"baseDelay": "1s", "maxDelay": "1m30s"}})).expect("compound");
    let e = check(json!({"retry": {"baseDelay": "10s", "maxDelay": "2s"}})).unwrap_err();
    assert!(e.contains("baseDelay must not exceed maxDelay"), "{e}");
    // maxDelay defaults to 4s.
    let e = check(json!({"retry": {"baseDelay": "5s"}})).unwrap_err();
    assert!(e.contains("baseDelay must not exceed maxDelay"), "{e}");
}

#[test]
fn openai_upstreams_need_a_base_url() {
    let e = check(json!({"upstreams": [{"name": "p", "provider": "openai", "models": ["m"]}]}))
        .unwrap_err();
    assert!(e.contains("baseUrl is required for provider openai"), "{e}");
    check(json!({"upstreams": [{"name": "p", "provider": "openai", "baseUrl": "https://x/v1", "models": ["m"]}]}))
        .expect("with a base URL");
    let e = check(json!({"upstreams": [{"name": "p", "provider": "anthropic", "models": ["m"]}]}))
        .unwrap_err();
    assert!(
        e.contains("baseUrl is required for provider openai or anthropic"),
        "{e}"
    );
    check(json!({"upstreams": [{"name": "p", "provider": "anthropic", "baseUrl": "https://x/v1", "models": ["m"]}]}))
        .expect("with a base URL");
    check(json!({"upstreams": [{"name": "p", "provider": "mock", "models": ["m"]}]}))
        .expect("the mock needs none");
}

#[test]
fn the_name_must_make_a_valid_service_name() {
    let check_name = |name: &str| {
        Validator::new()
            .validate(&schema(), &named(name, json!({})), None)
            .map_err(|e| e.to_string())
    };
    check_name("support-bot").expect("a DNS-1035 label");
    for bad in ["1bot", &"a".repeat(64)] {
        let e = check_name(bad).unwrap_err();
        assert!(e.contains("DNS-1035"), "{bad}: {e}");
    }
}

/// The selector goes inside PromQL braces: label matchers only.
#[test]
fn metrics_selector_is_label_matchers_only() {
    for ok in [
        r#"job="llm""#,
        r#"job="llm", pod=~"bot-.*",env!="dev",x!~"a\"b""#,
    ] {
        check(json!({"scaling": {"metricsSelector": ok}})).expect(ok);
    }
    for bad in [
        r#"job="llm"}) or vector(1000"#,
        r#"job=llm"#,
        r#"job='llm'"#,
        r#"job="llm" pod="x""#,
    ] {
        let e = check(json!({"scaling": {"metricsSelector": bad}})).expect_err(bad);
        assert!(
            e.contains("metricsSelector must be PromQL label matchers only"),
            "{e}"
        );
    }
}

#[test]
fn jwt_needs_exactly_one_key_source() {
    let jwks = json!({"name": "jwks", "key": "jwks.json"});
    check(json!({"auth": {"jwt": {"issuer": "https://id", "jwksSecretRef": jwks}}}))
        .expect("one source");
    check(json!({"auth": {"jwt": {"jwksUrl": "https://id/jwks", "algorithms": ["ES256"]}}}))
        .expect("a URL");
    check(
        json!({"auth": {"jwt": {"secretRef": {"name": "s", "key": "k"}, "algorithms": ["HS256"]}}}),
    )
    .expect("an HMAC secret");
    let e = check(json!({"auth": {"jwt": {"issuer": "https://id"}}})).unwrap_err();
    assert!(
        e.contains("exactly one of jwksSecretRef, jwksUrl and secretRef"),
        "{e}"
    );
    let e = check(json!({"auth": {"jwt": {"jwksSecretRef": jwks, "jwksUrl": "https://id/jwks"}}}))
        .unwrap_err();
    assert!(e.contains("exactly one of"), "{e}");
    // The default algorithm (RS256) cannot use a shared secret.
    let e = check(json!({"auth": {"jwt": {"secretRef": {"name": "s", "key": "k"}}}})).unwrap_err();
    assert!(
        e.contains("secretRef verifies HS256/HS384/HS512 only"),
        "{e}"
    );
}

#[test]
fn client_cert_principal_needs_a_client_ca() {
    check(json!({"tls": {"secretRef": {"name": "mf-tls"}}})).expect("server TLS");
    check(json!({"tls": {"secretRef": {"name": "mf-tls"},
                         "clientCaSecretRef": {"name": "ca", "key": "ca.crt"},
                         "clientCertPrincipal": true}}))
    .expect("mTLS naming clients");
    let e = check(json!({"tls": {"secretRef": {"name": "mf-tls"}, "clientCertPrincipal": true}}))
        .unwrap_err();
    assert!(
        e.contains("clientCertPrincipal needs clientCaSecretRef"),
        "{e}"
    );
}

#[test]
fn a_store_needs_encryption_or_an_explicit_plaintext_opt_in() {
    check(json!({
        "store": {"address": "redis.ai:6379"},
        "encryption": {"keySecretRef": {"name": "store-keys"}}
    }))
    .expect("sealed");
    check(json!({"store": {"address": "redis.ai:6379", "allowPlaintext": true}}))
        .expect("explicit plaintext");
    let e = check(json!({"store": {"address": "redis.ai:6379"}})).unwrap_err();
    assert!(e.contains("store needs encryption.keySecretRef"), "{e}");
    check(json!({
        "cache": {"models": [{"model": "mock", "ttl": "5m", "shared": true}]},
        "rateLimits": {"requestsPerSecond": 5, "tokensPerMinute": 10000}
    }))
    .expect("cache and limits without a store: per pod");
    let tls = |tls: bool| {
        json!({"store": {"address": "redis.ai:6380", "allowPlaintext": true, "tls": tls,
                         "caSecretRef": {"name": "redis-ca", "key": "ca.crt"},
                         "clientCertSecretRef": {"name": "redis-client"}}})
    };
    check(tls(true)).expect("a CA and client certificate over TLS");
    let e = check(tls(false)).unwrap_err();
    assert!(e.contains("need tls: true"), "{e}");
}

#[test]
fn async_needs_paired_sasl_settings_and_tls_for_a_ca() {
    check(json!({"async": {"bootstrapServers": ["kafka:9092"]}})).expect("brokers only");
    check(
        json!({"async": {"bootstrapServers": ["kafka:9093"], "tls": true,
                           "caSecretRef": {"name": "ca", "key": "ca.crt"},
                           "saslMechanism": "SCRAM-SHA-256", "saslSecretRef": {"name": "u"}}}),
    )
    .expect("TLS and SASL");
    let e = check(json!({"async": {"bootstrapServers": ["kafka:9092"], "saslMechanism": "PLAIN"}}))
        .unwrap_err();
    assert!(
        e.contains("saslMechanism and saslSecretRef go together"),
        "{e}"
    );
    let e = check(json!({"async": {"bootstrapServers": ["kafka:9092"],
                                   "caSecretRef": {"name": "ca", "key": "ca.crt"}}}))
    .unwrap_err();
    assert!(e.contains("caSecretRef needs tls: true"), "{e}");
}

#[test]
fn a_queue_delay_slo_needs_the_kafka_queue() {
    check(json!({"async": {"bootstrapServers": ["kafka:9092"]},
                 "slo": {"maxQueueDelaySeconds": 60}}))
    .expect("with spec.async");
    check(json!({"slo": {"p99LatencyMs": 300}})).expect("no queue SLO, no async");
    let e = check(json!({"slo": {"maxQueueDelaySeconds": 60}})).unwrap_err();
    assert!(
        e.contains("slo.maxQueueDelaySeconds needs spec.async"),
        "{e}"
    );
}

#[test]
fn budgets_need_a_limit_and_aliases_a_weighted_target() {
    check(json!({
        "budgets": {"default": {"dailyTokens": 1000}, "clients": {"key:a": {"monthlySpend": 5.5}}},
        "models": {"fast": {"targets": [{"model": "mock", "weight": 0}, {"model": "mock"}]}}
    }))
    .expect("valid budgets and aliases");
    let e = check(json!({"budgets": {"clients": {"key:a": {}}}})).unwrap_err();
    assert!(e.contains("a budget must set at least one of"), "{e}");
    let e = check(json!({"models": {"fast": {"targets": [{"model": "mock", "weight": 0}]}}}))
        .unwrap_err();
    assert!(
        e.contains("at least one target needs a weight above 0"),
        "{e}"
    );
}
