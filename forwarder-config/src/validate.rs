use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use crate::{Config, LatencyDist, MockSettings, Provider, TracingConfig, UpstreamConfig};

/// One semantic problem in a config, with the dotted path of its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The longest duration any setting may hold. Durations are added to
/// clocks (`Instant + d` panics on overflow), so none may be near the
/// clock's range; a week is far above any sensible timeout or TTL.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn check(&mut self, ok: bool, field: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.0.push(FieldError {
                field: field.into(),
                message: message.into(),
            });
        }
    }

    /// A duration that may be zero only if `zero_ok`, and never above
    /// [`MAX_DURATION`].
    fn duration(&mut self, d: Duration, zero_ok: bool, field: impl Into<String>) {
        let field = field.into();
        if !zero_ok && d.is_zero() {
            self.check(false, field, "must be greater than zero");
        } else {
            self.check(
                d <= MAX_DURATION,
                field,
                format!(
                    "must be at most {}",
                    humantime::format_duration(MAX_DURATION)
                ),
            );
        }
    }
}

/// Checks what the types alone cannot: ranges, references, uniqueness.
/// Returns every problem found, not just the first.
pub fn validate(config: &Config) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();

    let s = &config.server;
    e.check(
        s.max_body_bytes >= 1024,
        "server.max_body_bytes",
        "must be at least 1024",
    );
    e.duration(s.request_timeout, false, "server.request_timeout");
    e.duration(s.header_timeout, false, "server.header_timeout");
    e.duration(s.body_timeout, false, "server.body_timeout");
    e.duration(s.idle_timeout, false, "server.idle_timeout");
    e.duration(s.write_timeout, false, "server.write_timeout");
    e.duration(s.shutdown.drain_delay, true, "server.shutdown.drain_delay");
    e.duration(
        s.shutdown.grace_period,
        true,
        "server.shutdown.grace_period",
    );
    e.check(
        s.max_connections >= 1,
        "server.max_connections",
        "must be at least 1",
    );
    // hyper's HTTP/1 buffer must hold at least 8 KiB.
    e.check(
        (8192..=1024 * 1024).contains(&s.max_header_bytes),
        "server.max_header_bytes",
        "must be within 8192..1048576",
    );
    e.check(
        s.http2_max_concurrent_streams >= 1,
        "server.http2_max_concurrent_streams",
        "must be at least 1",
    );

    e.check(
        s.max_concurrency != Some(0),
        "server.max_concurrency",
        "must be at least 1 (omit it for no limit)",
    );

    let ws = &config.websocket;
    e.check(
        ws.max_in_flight >= 1,
        "websocket.max_in_flight",
        "must be at least 1",
    );
    e.check(
        ws.max_frame_bytes >= 1024,
        "websocket.max_frame_bytes",
        "must be at least 1024",
    );
    e.check(
        ws.send_buffer >= 1,
        "websocket.send_buffer",
        "must be at least 1",
    );
    e.duration(ws.ping_interval, false, "websocket.ping_interval");
    e.duration(ws.idle_timeout, false, "websocket.idle_timeout");
    e.check(
        ws.idle_timeout > ws.ping_interval,
        "websocket.idle_timeout",
        "must be longer than websocket.ping_interval",
    );
    let g = &config.grpc;
    e.check(
        !g.enabled || g.listen.port() == 0 || g.listen.port() != s.listen.port(),
        "grpc.listen",
        "must use a different port than server.listen",
    );

    let r = &config.retry;
    e.check(
        r.max_attempts >= 1,
        "retry.max_attempts",
        "must be at least 1",
    );
    e.check(
        r.max_attempts <= 10,
        "retry.max_attempts",
        "must be at most 10",
    );
    e.check(
        r.base_delay <= r.max_delay,
        "retry.base_delay",
        "must not exceed retry.max_delay",
    );
    e.duration(r.base_delay, true, "retry.base_delay");
    e.duration(r.max_delay, true, "retry.max_delay");

    let b = &config.circuit_breaker;
    e.check(
        b.failure_threshold >= 1,
        "circuit_breaker.failure_threshold",
        "must be at least 1",
    );
    e.duration(b.open_duration, false, "circuit_breaker.open_duration");
    e.duration(config.idempotency.ttl, false, "idempotency.ttl");
    e.duration(config.idempotency.lease, false, "idempotency.lease");
    e.duration(config.idempotency.wait, true, "idempotency.wait");

    e.check(
        config.idempotency.max_bytes >= 1024,
        "idempotency.max_bytes",
        "must be at least 1024",
    );
    e.check(
        config.idempotency.max_record_bytes >= 1
            && config.idempotency.max_record_bytes as u64 <= config.idempotency.max_bytes,
        "idempotency.max_record_bytes",
        "must be between 1 and idempotency.max_bytes",
    );
    e.check(
        config.limits.max_upstream_body_bytes >= 1024,
        "limits.max_upstream_body_bytes",
        "must be at least 1024",
    );
    e.check(
        config.limits.max_event_bytes >= 1024,
        "limits.max_event_bytes",
        "must be at least 1024",
    );
    for (field, names) in [
        ("headers.to_upstream", &config.headers.to_upstream),
        ("headers.to_client", &config.headers.to_client),
    ] {
        for name in names {
            let bare = name.strip_suffix('*').unwrap_or(name);
            e.check(
                !bare.is_empty()
                    && bare
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                field,
                "entries must be header names (letters, digits, - _ .), optionally ending in *",
            );
        }
    }
    e.duration(config.auth.reload_interval, false, "auth.reload_interval");
    if let Some(jwt) = &config.auth.jwt {
        validate_jwt(&mut e, jwt);
    }
    if let Some(tls) = &config.server.tls {
        e.duration(tls.reload_interval, false, "server.tls.reload_interval");
        e.check(
            !tls.client_cert_principal || tls.client_ca_file.is_some(),
            "server.tls.client_cert_principal",
            "needs server.tls.client_ca_file (only verified certificates name a client)",
        );
    }
    validate_async(&config.async_jobs, &mut e);
    validate_aliases(config, &mut e);
    validate_tracing(&config.tracing, &mut e);

    if let Some(rl) = &config.rate_limit {
        e.check(
            rl.requests_per_second >= 1,
            "rate_limit.requests_per_second",
            "must be at least 1",
        );
        e.check(rl.burst >= 1, "rate_limit.burst", "must be at least 1");
        e.check(
            rl.tokens_per_minute.is_none_or(|t| t >= 1),
            "rate_limit.tokens_per_minute",
            "must be at least 1",
        );
        e.check(
            rl.shared || rl.tokens_per_minute.is_none(),
            "rate_limit.tokens_per_minute",
            "needs rate_limit.shared: true",
        );
        for (name, t) in &rl.tiers {
            let at = |f: &str| format!("rate_limit.tiers.{name}.{f}");
            e.check(
                t.requests_per_second >= 1,
                at("requests_per_second"),
                "must be at least 1",
            );
            e.check(t.burst >= 1, at("burst"), "must be at least 1");
            e.check(
                t.tokens_per_minute.is_none_or(|v| v >= 1),
                at("tokens_per_minute"),
                "must be at least 1",
            );
            e.check(
                rl.shared || t.tokens_per_minute.is_none(),
                at("tokens_per_minute"),
                "needs rate_limit.shared: true",
            );
        }
        for (client, tier) in &rl.client_tiers {
            e.check(
                rl.tiers.contains_key(tier),
                format!("rate_limit.client_tiers.{client}"),
                "names a tier not in rate_limit.tiers",
            );
        }
    }

    if let Some(b) = &config.budgets {
        validate_budgets(config, b, &mut e);
    }

    e.check(
        !config.logging.level.trim().is_empty(),
        "logging.level",
        "must not be empty",
    );

    e.check(
        !config.upstreams.is_empty(),
        "upstreams",
        "at least one upstream is required",
    );
    validate_store(&mut e, &config.store);
    for (model, c) in &config.cache.models {
        let at = format!("cache.models.{model}");
        e.duration(c.ttl, false, format!("{at}.ttl"));
        e.check(
            c.max_entry_bytes >= 1,
            format!("{at}.max_entry_bytes"),
            "must be at least 1",
        );
    }

    let mut names = HashSet::new();
    for (i, u) in config.upstreams.iter().enumerate() {
        let at = format!("upstreams[{i}]");
        e.check(
            names.insert(u.name.as_str()),
            format!("{at}.name"),
            format!("duplicate upstream name {:?}", u.name),
        );
        validate_upstream(&mut e, &at, u);
    }
    if e.0.is_empty() {
        Ok(())
    } else {
        Err(e.0)
    }
}

fn validate_jwt(e: &mut Errors, jwt: &crate::JwtConfig) {
    let sources = [
        jwt.secret_file.is_some(),
        jwt.jwks_file.is_some(),
        jwt.jwks_url.is_some(),
    ];
    e.check(
        sources.iter().filter(|s| **s).count() == 1,
        "auth.jwt",
        "exactly one of secret_file, jwks_file and jwks_url is required",
    );
    e.check(
        !jwt.algorithms.is_empty(),
        "auth.jwt.algorithms",
        "name at least one algorithm",
    );
    for a in &jwt.algorithms {
        e.check(
            crate::JWT_ALGORITHMS.contains(&a.as_str()),
            "auth.jwt.algorithms",
            format!(
                "unknown algorithm {a:?} (one of {})",
                crate::JWT_ALGORITHMS.join(", ")
            ),
        );
    }
    if jwt.secret_file.is_some() {
        e.check(
            jwt.algorithms.iter().all(|a| a.starts_with("HS")),
            "auth.jwt.algorithms",
            "a secret_file verifies HS256/HS384/HS512 only",
        );
    }
    if let Some(url) = &jwt.jwks_url {
        e.check(
            url.starts_with("https://") || url.starts_with("http://"),
            "auth.jwt.jwks_url",
            "must be an http(s) URL",
        );
    }
    e.check(
        jwt.max_token_bytes >= 64,
        "auth.jwt.max_token_bytes",
        "must be at least 64",
    );
    e.check(
        !jwt.principal_claim.is_empty(),
        "auth.jwt.principal_claim",
        "must not be empty",
    );
    e.duration(jwt.leeway, true, "auth.jwt.leeway");
    e.duration(jwt.refresh_interval, false, "auth.jwt.refresh_interval");
    e.duration(
        jwt.min_refresh_interval,
        true,
        "auth.jwt.min_refresh_interval",
    );
    if let Some(age) = jwt.max_age {
        e.duration(age, false, "auth.jwt.max_age");
    }
}

fn validate_store(e: &mut Errors, s: &crate::StoreConfig) {
    e.check(
        s.max_bytes >= 1024,
        "store.max_bytes",
        "must be at least 1024",
    );
    e.check(
        s.max_state_bytes >= 1024,
        "store.max_state_bytes",
        "must be at least 1024",
    );
    if let Some(enc) = &s.encryption {
        e.check(
            !enc.key_file.as_os_str().is_empty(),
            "store.encryption.key_file",
            "must be set",
        );
        e.duration(
            enc.reload_interval,
            false,
            "store.encryption.reload_interval",
        );
    }
    match (&s.backend, &s.redis) {
        (crate::StoreBackend::Redis, None) => {
            e.check(false, "store.redis", "required when store.backend is redis")
        }
        (crate::StoreBackend::Redis, Some(r)) => {
            e.check(
                r.url.starts_with("redis://") || r.url.starts_with("rediss://"),
                "store.redis.url",
                "must start with redis:// or rediss://",
            );
            e.check(r.db >= 0, "store.redis.db", "must not be negative");
            let tls_files = r.ca_file.is_some() || r.client_cert_file.is_some();
            e.check(
                !tls_files || r.url.starts_with("rediss://"),
                "store.redis.ca_file",
                "CA and client certificate files need a rediss:// url",
            );
            e.check(
                r.client_cert_file.is_some() == r.client_key_file.is_some(),
                "store.redis.client_cert_file",
                "client_cert_file and client_key_file go together",
            );
            e.duration(r.timeout, false, "store.redis.timeout");
            e.duration(r.connect_timeout, false, "store.redis.connect_timeout");
            e.check(
                !r.key_prefix.is_empty() && !r.key_prefix.contains(char::is_whitespace),
                "store.redis.key_prefix",
                "must be non-empty, without spaces",
            );
            e.check(
                s.encryption.is_some() || r.allow_plaintext,
                "store.encryption",
                "required with the redis backend (or set store.redis.allow_plaintext: true)",
            );
        }
        _ => {}
    }
}

fn validate_upstream(e: &mut Errors, at: &str, u: &UpstreamConfig) {
    let name_ok = !u.name.is_empty()
        && u.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    e.check(
        name_ok,
        format!("{at}.name"),
        "must be non-empty letters, digits, '-', '_' or '.'",
    );
    e.check(
        !u.models.is_empty(),
        format!("{at}.models"),
        "must list at least one model",
    );
    for (j, m) in u.models.iter().enumerate() {
        e.check(
            !m.trim().is_empty(),
            format!("{at}.models[{j}]"),
            "must not be empty",
        );
    }
    e.check(u.weight >= 1, format!("{at}.weight"), "must be at least 1");
    e.check(
        u.weight <= 1000,
        format!("{at}.weight"),
        "must be at most 1000",
    );
    e.duration(u.timeout, false, format!("{at}.timeout"));
    e.duration(u.connect_timeout, false, format!("{at}.connect_timeout"));
    e.check(
        !(u.api_key_file.is_some() && u.api_key_env.is_some()),
        format!("{at}.api_key_file"),
        "set api_key_file or api_key_env, not both",
    );
    match u.provider {
        Provider::Openai | Provider::Anthropic => match &u.base_url {
            None => e.check(
                false,
                format!("{at}.base_url"),
                format!(
                    "is required for provider {}",
                    if u.provider == Provider::Openai {
                        "openai"
                    } else {
                        "anthropic"
                    }
                ),
            ),
            Some(url) => e.check(
                (url.starts_with("http://") || url.starts_with("https://"))
                    && url.len() > "https://".len(),
                format!("{at}.base_url"),
                format!("{url:?} is not an http(s) URL"),
            ),
        },
        Provider::Mock => {
            if let Some(m) = &u.mock {
                validate_mock(e, &format!("{at}.mock"), m);
            }
        }
    }
}

/// Validates mock settings; also used for the `mock-llm` command's flags.
fn validate_mock(e: &mut Errors, at: &str, m: &MockSettings) {
    for (name, rate) in [
        ("error_rate", m.error_rate),
        ("hang_rate", m.hang_rate),
        ("reset_rate", m.reset_rate),
    ] {
        e.check(
            (0.0..=1.0).contains(&rate),
            format!("{at}.{name}"),
            "must be within 0..1",
        );
    }
    e.check(
        (400..=599).contains(&m.error_status),
        format!("{at}.error_status"),
        "must be an HTTP error status (400-599)",
    );
    let latencies: &[Duration] = match &m.latency {
        LatencyDist::Fixed(d) => &[*d],
        LatencyDist::Uniform { min, max } => &[*min, *max],
        LatencyDist::Normal { mean, std_dev } => &[*mean, *std_dev],
    };
    for d in latencies {
        e.duration(*d, true, format!("{at}.latency"));
    }
    if let Some(secs) = m.retry_after_secs {
        e.check(
            secs <= MAX_DURATION.as_secs(),
            format!("{at}.retry_after_secs"),
            format!("must be at most {}", MAX_DURATION.as_secs()),
        );
    }
    if let Some(tps) = m.tokens_per_second {
        e.check(
            tps > 0.0 && tps.is_finite(),
            format!("{at}.tokens_per_second"),
            "must be positive",
        );
    }
}

impl MockSettings {
    /// Validates these settings on their own, with field paths under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), Vec<FieldError>> {
        let mut e = Errors::default();
        validate_mock(&mut e, prefix, self);
        if e.0.is_empty() {
            Ok(())
        } else {
            Err(e.0)
        }
    }
}

/// `tracing`: a protocol the exporter speaks, a ratio, an endpoint URL.
fn validate_tracing(t: &TracingConfig, e: &mut Errors) {
    if let Some(p) = &t.protocol {
        e.check(
            TRACING_PROTOCOLS.contains(&p.as_str()),
            "tracing.protocol",
            "must be grpc or http/protobuf",
        );
    }
    if let Some(r) = t.sample_ratio {
        e.check(
            (0.0..=1.0).contains(&r),
            "tracing.sample_ratio",
            "must be within 0..=1",
        );
    }
    if let Some(u) = &t.endpoint {
        e.check(
            u.starts_with("http://") || u.starts_with("https://"),
            "tracing.endpoint",
            "must be an http:// or https:// URL",
        );
    }
}

/// The OTLP protocols the forwarder's exporter speaks.
pub const TRACING_PROTOCOLS: &[&str] = &["grpc", "http/protobuf"];

/// `models`: each alias names served models (no alias of an alias, no
/// alias shadowing a served model), at least one with a weight.
fn validate_aliases(config: &Config, e: &mut Errors) {
    let served = |m: &str| {
        config
            .upstreams
            .iter()
            .any(|u| u.models.iter().any(|x| x == m))
    };
    for (alias, a) in &config.models {
        let at = format!("models.{alias}");
        e.check(!alias.is_empty(), &at, "an alias needs a name");
        e.check(
            !served(alias),
            &at,
            "is also a model an upstream serves; an alias must be a name of its own",
        );
        e.check(
            !a.targets.is_empty(),
            format!("{at}.targets"),
            "must list at least one model",
        );
        e.check(
            a.targets.is_empty() || a.targets.iter().any(|t| t.weight > 0),
            format!("{at}.targets"),
            "at least one target needs a weight above 0",
        );
        for (i, t) in a.targets.iter().enumerate() {
            let at = format!("{at}.targets[{i}]");
            e.check(
                served(&t.model),
                format!("{at}.model"),
                format!("{:?} is served by no upstream", t.model),
            );
            e.check(
                t.weight <= 1000,
                format!("{at}.weight"),
                "must be at most 1000",
            );
        }
    }
}

/// `async`: bounds, and callbacks that can be signed when hosts are allowed.
fn validate_async(a: &crate::AsyncConfig, e: &mut Errors) {
    e.check(a.capacity >= 1, "async.capacity", "must be at least 1");
    e.check(a.workers >= 1, "async.workers", "must be at least 1");
    e.check(a.max_jobs >= 1, "async.max_jobs", "must be at least 1");
    e.duration(a.job_ttl, false, "async.job_ttl");
    if a.queue == crate::QueueKind::Kafka {
        let k = &a.kafka;
        e.check(
            !k.bootstrap_servers.trim().is_empty(),
            "async.kafka.bootstrap_servers",
            "is required with queue: kafka",
        );
        for (field, name) in [
            ("async.kafka.topic", &k.topic),
            ("async.kafka.dead_letter_topic", &k.dead_letter_topic),
            ("async.kafka.consumer_group", &k.consumer_group),
        ] {
            e.check(
                !name.is_empty()
                    && name.len() <= 249
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                field,
                "must be 1-249 characters of letters, digits, . _ -",
            );
        }
        e.check(
            k.topic != k.dead_letter_topic,
            "async.kafka.dead_letter_topic",
            "must differ from topic",
        );
        e.check(
            k.partitions >= 1,
            "async.kafka.partitions",
            "must be at least 1",
        );
        e.check(
            k.max_attempts >= 1,
            "async.kafka.max_attempts",
            "must be at least 1",
        );
        let sasl = matches!(k.security_protocol.as_str(), "sasl_plaintext" | "sasl_ssl");
        e.check(
            matches!(
                k.security_protocol.as_str(),
                "plaintext" | "ssl" | "sasl_plaintext" | "sasl_ssl"
            ),
            "async.kafka.security_protocol",
            "must be plaintext, ssl, sasl_plaintext or sasl_ssl",
        );
        e.check(
            !sasl
                || (k.sasl_mechanism.is_some()
                    && k.sasl_username_file.is_some()
                    && k.sasl_password_file.is_some()),
            "async.kafka.sasl_mechanism",
            "SASL needs sasl_mechanism, sasl_username_file and sasl_password_file",
        );
        e.check(
            k.ssl_cert_file.is_some() == k.ssl_key_file.is_some(),
            "async.kafka.ssl_key_file",
            "ssl_cert_file and ssl_key_file go together",
        );
        e.check(
            k.group_instance_id
                .as_ref()
                .is_none_or(|id| !id.trim().is_empty() && id.len() <= 249),
            "async.kafka.group_instance_id",
            "must be 1 to 249 characters when set",
        );
    }
    let c = &a.callbacks;
    e.check(
        c.max_attempts >= 1,
        "async.callbacks.max_attempts",
        "must be at least 1",
    );
    e.duration(c.base_delay, true, "async.callbacks.base_delay");
    e.duration(c.max_delay, true, "async.callbacks.max_delay");
    e.duration(c.timeout, false, "async.callbacks.timeout");
    e.check(
        c.allowed_hosts.is_empty() || c.secrets_file.is_some(),
        "async.callbacks.secrets_file",
        "is required when allowed_hosts is set (callbacks are always signed)",
    );
    for h in &c.allowed_hosts {
        e.check(
            !h.host.is_empty()
                && h.host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)),
            "async.callbacks.allowed_hosts",
            "entries must be host names or IP literals",
        );
        e.check(
            !h.ports.contains(&0),
            "async.callbacks.allowed_hosts",
            "ports must be 1 to 65535",
        );
    }
    for n in &c.allowed_networks {
        e.check(
            !n.ports.contains(&0),
            "async.callbacks.allowed_networks",
            "ports must be 1 to 65535",
        );
    }
}

/// Settings that are valid but do not do all they seem to: a header
/// pattern that names (or, with `*`, covers) a header in
/// [`crate::NEVER_FORWARDED`], which never passes whatever it says.
pub fn warnings(config: &Config) -> Vec<FieldError> {
    let mut out = Vec::new();
    for (field, names) in [
        ("headers.to_upstream", &config.headers.to_upstream),
        ("headers.to_client", &config.headers.to_client),
    ] {
        for name in names {
            let lower = name.to_ascii_lowercase();
            let blocked: Vec<&str> = crate::NEVER_FORWARDED
                .iter()
                .copied()
                .filter(|h| match lower.strip_suffix('*') {
                    Some(prefix) => h.starts_with(prefix),
                    None => *h == lower,
                })
                .collect();
            if !blocked.is_empty() {
                out.push(FieldError {
                    field: field.into(),
                    message: format!(
                        "{name:?} covers {}, which never pass (credentials and hop-by-hop headers)",
                        blocked.join(", ")
                    ),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fields(c: &Config) -> Vec<String> {
        validate(c)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn budgets_are_validated_naming_the_field() {
        let c = Config {
            budgets: Some(
                serde_yaml::from_str(
                    r#"
default: {daily_tokens: 0}
tiers: {gold: {monthly_spend: -1}}
clients: {alice: {}, "key:bob": {daily_tokens: 10}}
prices: {mock: {input: 1, output: 2}, nope: {input: -1}}
"#,
                )
                .unwrap(),
            ),
            ..Config::default()
        };
        let f = fields(&c);
        for want in [
            "budgets.default.daily_tokens",
            "budgets.tiers.gold",
            "budgets.tiers.gold.monthly_spend",
            "budgets.clients.alice",
            "budgets.prices.nope",
        ] {
            assert_eq!(
                f.iter().filter(|x| *x == want).count(),
                1 + usize::from(want == "budgets.prices.nope"),
                "{want}: {f:?}"
            );
        }
        assert!(
            !f.iter()
                .any(|x| x.contains("key:bob") || x == "budgets.prices.mock"),
            "{f:?}"
        );
    }

    #[test]
    fn defaults_are_valid() {
        validate(&Config::default()).unwrap();
        assert!(warnings(&Config::default()).is_empty());
    }

    #[test]
    fn tracing_settings_are_validated() {
        let mut c = Config::default();
        c.tracing.protocol = Some("http/json".into());
        c.tracing.sample_ratio = Some(1.5);
        c.tracing.endpoint = Some("collector:4317".into());
        assert_eq!(
            fields(&c),
            [
                "tracing.protocol",
                "tracing.sample_ratio",
                "tracing.endpoint"
            ]
        );
        c.tracing = TracingConfig {
            enabled: true,
            endpoint: Some("http://127.0.0.1:4317".into()),
            protocol: Some("grpc".into()),
            sample_ratio: Some(0.25),
            service_name: Some("edge".into()),
            tls: None,
        };
        validate(&c).unwrap();
    }

    #[test]
    fn header_patterns_covering_credentials_are_warned_about() {
        let mut c = Config::default();
        c.headers.to_upstream = vec!["x-*".into(), "Authorization".into(), "openai-beta".into()];
        let w = warnings(&c);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].message.contains("x-api-key"), "{}", w[0]);
        assert!(w[1].message.contains("authorization"), "{}", w[1]);
        assert!(w.iter().all(|f| f.field == "headers.to_upstream"));
    }

    #[test]
    fn async_kafka_and_callbacks_are_validated() {
        let mut c = Config::default();
        c.async_jobs.workers = 0;
        c.async_jobs.queue = crate::QueueKind::Kafka;
        c.async_jobs.kafka.topic = "bad topic".into();
        c.async_jobs.kafka.security_protocol = "sasl_ssl".into();
        c.async_jobs.callbacks.allowed_hosts = vec![crate::CallbackHost {
            host: "hooks.example".into(),
            allow_http: false,
            ports: vec![0],
        }];
        let f = fields(&c);
        for want in [
            "async.workers",
            "async.kafka.bootstrap_servers",
            "async.kafka.topic",
            "async.kafka.sasl_mechanism",
            "async.callbacks.secrets_file",
            "async.callbacks.allowed_hosts",
        ] {
            assert!(f.contains(&want.to_string()), "{want}: {f:?}");
        }
        let mut ok = Config::default();
        ok.async_jobs.queue = crate::QueueKind::Kafka;
        ok.async_jobs.kafka.bootstrap_servers = "127.0.0.1:9092".into();
        validate(&ok).unwrap();
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mut c = Config::default();
        c.retry.max_attempts = 0;
        c.retry.base_delay = Duration::from_secs(10);
        let mut u = UpstreamConfig::builtin_mock();
        u.provider = Provider::Openai;
        u.models.clear();
        c.upstreams.push(u);
        let f = fields(&c);
        assert!(f.contains(&"retry.max_attempts".to_string()), "{f:?}");
        assert!(f.contains(&"retry.base_delay".to_string()), "{f:?}");
        assert!(f.contains(&"upstreams[1].name".to_string()), "{f:?}");
        assert!(f.contains(&"upstreams[1].models".to_string()), "{f:?}");
        assert!(f.contains(&"upstreams[1].base_url".to_string()), "{f:?}");
    }

    #[test]
    fn mock_rates_are_bounded() {
        let m = MockSettings {
            error_rate: 1.5,
            error_status: 200,
            ..Default::default()
        };
        let f: Vec<_> = m
            .validate("mock")
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(f, vec!["mock.error_rate", "mock.error_status"]);
        let m = MockSettings {
            latency: LatencyDist::Uniform {
                min: Duration::ZERO,
                max: Duration::from_secs(u64::MAX),
            },
            retry_after_secs: Some(u64::MAX),
            ..Default::default()
        };
        let f: Vec<_> = m
            .validate("mock")
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(f, vec!["mock.latency", "mock.retry_after_secs"]);
    }

    #[test]
    fn durations_are_bounded_so_no_clock_overflows() {
        let huge = Duration::from_secs(u64::MAX);
        let mut c = Config::default();
        c.server.write_timeout = huge;
        c.server.header_timeout = Duration::ZERO;
        c.server.shutdown.grace_period = huge;
        c.retry.max_delay = huge;
        c.retry.base_delay = huge;
        c.circuit_breaker.open_duration = huge;
        c.idempotency.ttl = huge;
        c.upstreams[0].timeout = huge;
        let f = fields(&c);
        for want in [
            "server.write_timeout",
            "server.header_timeout",
            "server.shutdown.grace_period",
            "retry.max_delay",
            "retry.base_delay",
            "circuit_breaker.open_duration",
            "idempotency.ttl",
            "upstreams[0].timeout",
        ] {
            assert!(f.contains(&want.to_string()), "{want} missing in {f:?}");
        }
        c = Config::default();
        c.server.idle_timeout = MAX_DURATION;
        validate(&c).expect("the ceiling itself is allowed");
    }

    #[test]
    fn connection_limits_are_validated() {
        let mut c = Config::default();
        c.server.max_connections = 0;
        c.server.max_header_bytes = 100;
        c.server.http2_max_concurrent_streams = 0;
        assert_eq!(
            fields(&c),
            vec![
                "server.max_connections",
                "server.max_header_bytes",
                "server.http2_max_concurrent_streams"
            ]
        );
    }

    #[test]
    fn no_upstreams_is_invalid() {
        let c = Config {
            upstreams: vec![],
            ..Default::default()
        };
        assert_eq!(fields(&c), vec!["upstreams"]);
    }
    #[test]
    fn jwt_needs_exactly_one_key_source_and_known_algorithms() {
        let mut c = Config::default();
        c.auth.jwt = Some(crate::JwtConfig {
            algorithms: vec!["HS256".into()],
            ..Default::default()
        });
        assert_eq!(fields(&c), vec!["auth.jwt"]);
        let jwt = c.auth.jwt.as_mut().unwrap();
        jwt.secret_file = Some("s".into());
        jwt.jwks_url = Some("https://idp/jwks".into());
        assert_eq!(fields(&c), vec!["auth.jwt"]);
        let jwt = c.auth.jwt.as_mut().unwrap();
        jwt.jwks_url = None;
        jwt.algorithms = vec!["RS256".into(), "none".into()];
        assert_eq!(
            fields(&c),
            vec!["auth.jwt.algorithms", "auth.jwt.algorithms"],
            "none is unknown, RS256 cannot use a secret"
        );
        let jwt = c.auth.jwt.as_mut().unwrap();
        jwt.algorithms = vec!["HS512".into()];
        assert!(validate(&c).is_ok());
    }
}

#[cfg(test)]
mod protocol_tests {
    use crate::Config;

    #[test]
    fn protocol_switches_are_validated() {
        let mut c = Config::default();
        c.grpc.enabled = true;
        c.grpc.listen = c.server.listen;
        c.websocket.max_in_flight = 0;
        let errors = super::validate(&c).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"grpc.listen"), "{fields:?}");
        assert!(fields.contains(&"websocket.max_in_flight"), "{fields:?}");
        c.grpc.listen.set_port(9091);
        c.websocket.max_in_flight = 8;
        assert!(super::validate(&c).is_ok());
    }
}

#[cfg(test)]
mod alias_tests {
    use super::*;
    use crate::{AliasConfig, AliasTarget};

    #[test]
    fn aliases_must_name_served_models_and_not_shadow_them() {
        let target = |m: &str, weight| AliasTarget {
            model: m.into(),
            weight,
        };
        let with = |name: &str, targets: Vec<AliasTarget>| {
            let mut c = Config::default();
            c.models.insert(
                name.into(),
                AliasConfig {
                    targets,
                    rewrite_model: true,
                },
            );
            validate(&c)
        };
        assert!(with("fast", vec![target("mock", 1)]).is_ok());
        assert!(with("fast", vec![target("mock", 0), target("mock", 2)]).is_ok());
        for (name, targets, field) in [
            ("mock", vec![target("mock", 1)], "models.mock"),
            ("fast", vec![], "models.fast.targets"),
            ("fast", vec![target("mock", 0)], "models.fast.targets"),
            (
                "fast",
                vec![target("nope", 1)],
                "models.fast.targets[0].model",
            ),
            (
                "fast",
                vec![target("mock", 1001)],
                "models.fast.targets[0].weight",
            ),
        ] {
            let errors = with(name, targets).unwrap_err();
            assert!(
                errors.iter().any(|e| e.field == field),
                "{field}: {errors:?}"
            );
        }
    }
}

/// `budgets`: limits positive and finite, prices finite and not negative,
/// tiers named in `rate_limit.tiers`, prices for served models or aliases.
fn validate_budgets(config: &Config, b: &crate::BudgetsConfig, e: &mut Errors) {
    let mut limits: Vec<(String, &crate::BudgetLimits)> = Vec::new();
    if let Some(d) = &b.default {
        limits.push(("budgets.default".into(), d));
    }
    for (name, l) in &b.tiers {
        limits.push((format!("budgets.tiers.{name}"), l));
        e.check(
            config
                .rate_limit
                .as_ref()
                .is_some_and(|r| r.tiers.contains_key(name)),
            format!("budgets.tiers.{name}"),
            "names a tier not in rate_limit.tiers",
        );
    }
    for (client, l) in &b.clients {
        limits.push((format!("budgets.clients.{client}"), l));
    }
    for (at, l) in limits {
        e.check(!l.is_empty(), &at, "sets no limit");
        for (f, v) in [
            ("daily_tokens", l.daily_tokens),
            ("monthly_tokens", l.monthly_tokens),
        ] {
            e.check(
                v.is_none_or(|v| v >= 1),
                format!("{at}.{f}"),
                "must be at least 1",
            );
        }
        for (f, v) in [
            ("daily_spend", l.daily_spend),
            ("monthly_spend", l.monthly_spend),
        ] {
            e.check(
                v.is_none_or(|v| v.is_finite() && v > 0.0 && v < 1e9),
                format!("{at}.{f}"),
                "must be a positive number of dollars below 1e9",
            );
        }
    }
    let served = config.models();
    for (model, p) in &b.prices {
        let at = format!("budgets.prices.{model}");
        e.check(
            served.contains(model) || config.models.contains_key(model),
            &at,
            "names no served model or alias",
        );
        e.check(
            [p.input, p.output]
                .iter()
                .all(|v| v.is_finite() && *v >= 0.0 && *v < 1e6),
            at,
            "prices must be dollars per million tokens, 0 to 1e6",
        );
    }
}
