//! Where and how spans are exported: the `tracing` config section over the
//! standard `OTEL_*` variables (pure; the environment is passed in).

use forwarder_config::TracingConfig;

/// The OTLP transports the exporter is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    HttpProtobuf,
}

/// A resolved export configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub transport: Transport,
    /// Set from the config; `None` leaves the endpoint to the exporter,
    /// which reads `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` and
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (adding `/v1/traces` for HTTP).
    pub endpoint: Option<String>,
    /// The endpoint in use (the config's, else a variable's) is `https://`.
    pub https: bool,
    /// One export's bound: `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`
    /// (milliseconds), else 10 s (used by the TLS client; the exporter
    /// reads the variables itself otherwise).
    pub timeout: std::time::Duration,
    /// A parent-based ratio sampler; `None` leaves the sampler to the SDK
    /// (`OTEL_TRACES_SAMPLER`, else parent-based always-on).
    pub sample_ratio: Option<f64>,
    pub service_name: String,
}

const PROTOCOL_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
];
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Whether traces are on, and how they are exported. On when the config
/// says so or an OTLP endpoint variable is set; `OTEL_SDK_DISABLED=true`
/// wins over both. An unknown protocol is an error naming where it was set.
pub fn resolve(
    cfg: &TracingConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Export>, String> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    if !cfg.enabled && ENDPOINT_VARS.iter().all(|v| set(v).is_none()) {
        return Ok(None);
    }
    let (protocol, from) = match &cfg.protocol {
        Some(p) => (p.clone(), "tracing.protocol"),
        None => PROTOCOL_VARS
            .iter()
            .find_map(|v| set(v).map(|p| (p, *v)))
            .unwrap_or_else(|| ("http/protobuf".into(), "the default")),
    };
    let transport = match protocol.trim() {
        "grpc" => Transport::Grpc,
        "http/protobuf" => Transport::HttpProtobuf,
        other => {
            return Err(format!(
                "{from}: OTLP protocol {other:?} is not supported (grpc or http/protobuf)"
            ))
        }
    };
    let endpoint = cfg.endpoint.as_ref().map(|e| match transport {
        Transport::Grpc => e.clone(),
        Transport::HttpProtobuf => format!("{}/v1/traces", e.trim_end_matches('/')),
    });
    let https = cfg
        .endpoint
        .clone()
        .or_else(|| ENDPOINT_VARS.iter().find_map(|v| set(v)))
        .is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("https:"));
    if transport == Transport::Grpc && (https || cfg.tls.is_some()) {
        return Err("TLS to a grpc collector is not built: use protocol http/protobuf                     for an https:// collector"
            .into());
    }
    let timeout = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|v| set(v).and_then(|t| t.trim().parse::<u64>().ok()))
    .map_or(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis,
    );
    Ok(Some(Export {
        transport,
        endpoint,
        https,
        timeout,
        sample_ratio: cfg.sample_ratio,
        service_name: cfg
            .service_name
            .clone()
            .or_else(|| set("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "forwarder".into()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn off_unless_configured_or_an_endpoint_variable_is_set() {
        let off = TracingConfig::default();
        assert_eq!(resolve(&off, env(&[])), Ok(None));
        assert_eq!(
            resolve(&off, env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])),
            Ok(None)
        );
        let on = resolve(
            &off,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_SERVICE_NAME", "edge"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(on.transport, Transport::Grpc);
        assert_eq!(on.endpoint, None, "the exporter reads the variable itself");
        assert_eq!(on.service_name, "edge");
        assert_eq!(
            resolve(
                &off,
                env(&[
                    (
                        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                        "http://c:4318/v1/traces"
                    ),
                    ("OTEL_SDK_DISABLED", "TRUE"),
                ])
            ),
            Ok(None)
        );
    }

    #[test]
    fn an_https_collector_is_seen_in_the_variables_and_refused_over_grpc() {
        let on = TracingConfig::default();
        let e = resolve(
            &on,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(e.https);
        assert_eq!(e.timeout, std::time::Duration::from_millis(2500));
        let grpc = TracingConfig {
            protocol: Some("grpc".into()),
            ..on
        };
        let refused = resolve(
            &grpc,
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "HTTPS://collector:4317")]),
        );
        assert!(refused.unwrap_err().contains("http/protobuf"));
    }

    #[test]
    fn the_config_wins_over_the_variables_and_http_gets_its_path() {
        let cfg = TracingConfig {
            enabled: true,
            endpoint: Some("http://127.0.0.1:4318/".into()),
            protocol: None,
            sample_ratio: Some(0.5),
            service_name: None,
            tls: None,
        };
        let e = resolve(&cfg, env(&[])).unwrap().unwrap();
        assert_eq!(e.transport, Transport::HttpProtobuf);
        assert_eq!(
            e.endpoint.as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(e.sample_ratio, Some(0.5));
        assert_eq!(e.service_name, "forwarder");
        let grpc = TracingConfig {
            protocol: Some("grpc".into()),
            endpoint: Some("http://127.0.0.1:4317".into()),
            ..cfg.clone()
        };
        let e = resolve(
            &grpc,
            env(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.transport, e.endpoint.as_deref()),
            (Transport::Grpc, Some("http://127.0.0.1:4317"))
        );
        let err = resolve(
            &cfg,
            env(&[
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]),
        )
        .unwrap_err();
        assert!(err.contains("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"), "{err}");
    }
}
