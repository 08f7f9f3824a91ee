use std::collections::HashSet;
use std::fmt;

use crate::{Config, MockSettings, Provider, UpstreamConfig};

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
    e.check(
        !s.request_timeout.is_zero(),
        "server.request_timeout",
        "must be greater than zero",
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
    e.check(
        !ws.ping_interval.is_zero(),
        "websocket.ping_interval",
        "must be greater than zero",
    );
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

    let b = &config.circuit_breaker;
    e.check(
        b.failure_threshold >= 1,
        "circuit_breaker.failure_threshold",
        "must be at least 1",
    );
    e.check(
        !b.open_duration.is_zero(),
        "circuit_breaker.open_duration",
        "must be greater than zero",
    );

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
    e.check(
        !config.auth.reload_interval.is_zero(),
        "auth.reload_interval",
        "must be greater than zero",
    );

    if let Some(rl) = &config.rate_limit {
        e.check(
            rl.requests_per_second >= 1,
            "rate_limit.requests_per_second",
            "must be at least 1",
        );
        e.check(rl.burst >= 1, "rate_limit.burst", "must be at least 1");
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
    e.check(
        !u.timeout.is_zero(),
        format!("{at}.timeout"),
        "must be greater than zero",
    );
    e.check(
        !u.connect_timeout.is_zero(),
        format!("{at}.connect_timeout"),
        "must be greater than zero",
    );
    e.check(
        !(u.api_key_file.is_some() && u.api_key_env.is_some()),
        format!("{at}.api_key_file"),
        "set api_key_file or api_key_env, not both",
    );
    match u.provider {
        Provider::Openai => match &u.base_url {
            None => e.check(
                false,
                format!("{at}.base_url"),
                "is required for provider openai",
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
    fn defaults_are_valid() {
        validate(&Config::default()).unwrap();
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
    }

    #[test]
    fn no_upstreams_is_invalid() {
        let c = Config {
            upstreams: vec![],
            ..Default::default()
        };
        assert_eq!(fields(&c), vec!["upstreams"]);
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
