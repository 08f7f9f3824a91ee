//! OpenTelemetry traces over OTLP, off unless configured: a span per
//! request and a child span per upstream attempt, with the GenAI semantic
//! conventions' attributes (never prompt or reply content), and W3C
//! `traceparent` taken from the client and passed upstream. When off,
//! nothing here is built and the request path does no span work (the
//! pipeline holds `None`).
//!
//! Spans go through this forwarder's own tracer provider (not a global
//! one), so each `Server` exports to its own collector and the process's
//! log subscriber is untouched.

mod settings;
mod span;
mod usage;

use std::collections::HashMap;
use std::sync::Arc;

use forwarder_config::{Config, Provider};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    span_processor_with_async_runtime::BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

use crate::BuildError;
pub use settings::{resolve, Export, Transport};
pub use span::{AttemptSpan, Parent, RequestSpan};
pub use usage::Answered;

/// An HTTP client for an `https://` collector: the `tracing.tls` files, or
/// the system roots (plain `http://` still works through it).
fn collector_client(
    tls: Option<&forwarder_config::CollectorTlsConfig>,
    timeout: std::time::Duration,
) -> Result<opentelemetry_http::hyper::HyperClient<CollectorConnector>, BuildError> {
    use crate::upstream::tls::{client_config_at, server_name_at};
    const AT: &str = "tracing.tls";
    let system = || crate::upstream::tls::system_roots().clone();
    let tls = tls.map(forwarder_config::CollectorTlsConfig::as_client);
    let (config, name) = match &tls {
        Some(t) => (client_config_at(AT, t, system)?, server_name_at(AT, t)?),
        None => (system(), None),
    };
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let builder = match name {
        Some(n) => builder
            .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(n))
            .enable_http1(),
        None => builder.enable_http1(),
    };
    Ok(opentelemetry_http::hyper::HyperClient::new(
        builder.wrap_connector(http),
        timeout,
        None,
    ))
}

type CollectorConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// Where an upstream is, for `server.address`/`server.port` and
/// `gen_ai.provider.name`.
#[derive(Debug, Clone)]
struct Upstream {
    provider: &'static str,
    host: Option<String>,
    port: Option<u16>,
}

/// The forwarder's tracer and what spans need to know about upstreams.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    upstreams: HashMap<String, Upstream>,
}

impl Traces {
    /// Builds the exporter and tracer when traces are configured (in the
    /// config or by the `OTEL_*` variables); `None` when they are not.
    /// Must run inside the tokio runtime (the exporter's batches run on it).
    pub fn from_config(cfg: &Config) -> Result<Option<Arc<Self>>, BuildError> {
        let export = resolve(&cfg.tracing, |name| std::env::var(name).ok())
            .map_err(|e| BuildError::new(format!("tracing: {e}")))?;
        let Some(export) = export else {
            return Ok(None);
        };
        let exporter = match export.transport {
            Transport::Grpc => {
                let b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                match &export.endpoint {
                    Some(e) => b.with_endpoint(e.clone()).build(),
                    None => b.build(),
                }
            }
            Transport::HttpProtobuf => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                let tls = cfg.tracing.tls.as_ref();
                if export.https || tls.is_some() {
                    b = b.with_http_client(collector_client(tls, export.timeout)?);
                }
                match &export.endpoint {
                    Some(e) => b.with_endpoint(e.clone()).build(),
                    None => b.build(),
                }
            }
        }
        .map_err(|e| BuildError::new(format!("tracing: the OTLP exporter: {e}")))?;
        let processor =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        let mut builder = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name(export.service_name.clone())
                    .build(),
            );
        if let Some(ratio) = export.sample_ratio {
            builder = builder.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(ratio),
            )));
        }
        let provider = builder.build();
        let tracer = provider.tracer("forwarder");
        tracing::info!(
            transport = ?export.transport,
            endpoint = export.endpoint.as_deref().unwrap_or("(from OTEL_* variables)"),
            "OpenTelemetry traces on"
        );
        Ok(Some(Arc::new(Self {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            upstreams: upstreams(cfg),
        })))
    }

    /// Exports what is buffered (at shutdown, and for tests).
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        // The processor's flush blocks on a reply from its task on this
        // runtime: wait from a blocking thread.
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }

    fn extract(&self, headers: &http::HeaderMap) -> opentelemetry::Context {
        self.propagator.extract(&HeaderExtractor(headers))
    }

    fn inject(&self, cx: &opentelemetry::Context, headers: &mut http::HeaderMap) {
        self.propagator
            .inject_context(cx, &mut HeaderInjector(headers));
    }

    /// The span a `traceparent` names, if it is well-formed.
    fn span_context_of(&self, traceparent: &str) -> Option<opentelemetry::trace::SpanContext> {
        use opentelemetry::trace::TraceContextExt;
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            http::HeaderValue::from_str(traceparent).ok()?,
        );
        let cx = self.extract(&h);
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.get(name)
    }
}

impl Drop for Traces {
    fn drop(&mut self) {
        // Ends the export task; buffered spans were flushed at shutdown.
        let provider = self.provider.clone();
        std::thread::spawn(move || provider.shutdown());
    }
}

fn upstreams(cfg: &Config) -> HashMap<String, Upstream> {
    cfg.upstreams
        .iter()
        .map(|u| {
            let uri = u
                .base_url
                .as_deref()
                .and_then(|b| b.parse::<http::Uri>().ok());
            let port = uri.as_ref().and_then(|u| {
                u.port_u16().or(match u.scheme_str() {
                    Some("https") => Some(443),
                    Some("http") => Some(80),
                    _ => None,
                })
            });
            let provider = match u.provider {
                Provider::Openai => "openai",
                Provider::Anthropic => "anthropic",
                Provider::Mock => "mock",
            };
            (
                u.name.clone(),
                Upstream {
                    provider,
                    host: uri.as_ref().and_then(|u| u.host()).map(str::to_string),
                    port,
                },
            )
        })
        .collect()
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
