//! Structured logs through `tracing`. Requests are logged by the pipeline's
//! access log (target `access`) with ids, model, upstream, status and timing:
//! never prompts, replies, keys or tokens.

use forwarder_config::{LogFormat, LoggingConfig};
use tracing_subscriber::EnvFilter;

/// Crates whose debug and trace output can carry headers or payloads
/// (credentials, prompts, replies): held at `info` whatever the level asked
/// for, so no log level exposes what the forwarder carries.
const PAYLOAD_LOGGING_CRATES: &[&str] = &[
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "tonic",
    "tower",
    "tower_http",
    "axum",
    "tungstenite",
    "tokio_tungstenite",
    "rustls",
    "want",
    "mio",
];

/// The filter for a level (or `RUST_LOG`), with payload logging capped.
pub fn filter(level: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    for krate in PAYLOAD_LOGGING_CRATES {
        if let Ok(d) = format!("{krate}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

/// Installs the global subscriber. `RUST_LOG` overrides the configured level.
pub fn init_logging(cfg: &LoggingConfig) {
    let filter = filter(&cfg.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` so a second call (tests, mock-llm inside serve) is harmless.
    let _ = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
