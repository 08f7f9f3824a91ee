//! The `forwarder` binary: `serve` (default), `mock-llm`, `check-config`,
//! `openapi`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use forwarder::config::{self, LatencyDist, LoggingConfig, MockSettings};
use forwarder::server::Server;
use forwarder::telemetry::init_logging;

#[derive(Parser)]
#[command(
    name = "forwarder",
    version,
    about = "ModelForwarder: a fast, safe LLM message forwarder"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ConfigArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the forwarder (the default). Without --config it runs on the
    /// embedded defaults: 127.0.0.1:8080, one model `mock`.
    Serve(ConfigArgs),
    /// Run the mock model as a standalone OpenAI-compatible server.
    MockLlm(MockArgs),
    /// Load and validate a configuration, then exit (non-zero if invalid).
    CheckConfig(ConfigArgs),
    /// Print the OpenAPI 3.1 document of the HTTP interface (JSON).
    Openapi,
}

#[derive(Args, Clone, Default)]
struct ConfigArgs {
    /// YAML config file; `FORWARDER_*` environment variables override it
    /// (e.g. FORWARDER_SERVER__LISTEN=0.0.0.0:8080).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct MockArgs {
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Time to the answer or first token: `200ms`, `uniform:100ms..300ms`
    /// or `normal:200ms,50ms`.
    #[arg(long, default_value = "0ms")]
    latency: LatencyDist,
    /// Stream pacing; unset sends all tokens at once.
    #[arg(long)]
    tokens_per_second: Option<f64>,
    /// Filler words added to every reply.
    #[arg(long, default_value_t = 0)]
    reply_words: u32,
    /// Fraction of requests answered with --error-status.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    #[arg(long, default_value_t = 503)]
    error_status: u16,
    /// Retry-After seconds sent with injected errors.
    #[arg(long)]
    retry_after: Option<u64>,
    /// Fraction of requests never answered.
    #[arg(long, default_value_t = 0.0)]
    hang_rate: f64,
    /// Fraction of requests whose connection is reset.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve(cli.serve)) {
        Command::Serve(args) => serve(args),
        Command::MockLlm(args) => mock_llm(args),
        Command::CheckConfig(args) => check_config(args),
        Command::Openapi => {
            print!("{}", forwarder::openapi::DOCUMENT);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn load(args: &ConfigArgs) -> anyhow::Result<config::Config> {
    config::load(args.config.as_deref()).context("invalid configuration")
}

fn serve(args: ConfigArgs) -> anyhow::Result<()> {
    let cfg = load(&args)?;
    init_logging(&cfg.logging);
    memory::bound_and_return();
    runtime()?.block_on(async {
        let server = Server::start(cfg).await?;
        tracing::info!(addr = %server.addr, grpc = ?server.grpc_addr, models = ?server.pipeline.models(), "forwarder listening");
        shutdown_signal().await;
        server.shutdown().await;
        Ok(())
    })
}

fn check_config(args: ConfigArgs) -> anyhow::Result<()> {
    let cfg = load(&args)?;
    // The TLS files and the key files load as `serve` would load them.
    if let Some(tls) = &cfg.server.tls {
        forwarder::frontends::tls::TlsFiles::load(tls).context("server.tls")?;
    }
    for w in config::warnings(&cfg) {
        eprintln!("warning: {w}");
    }
    // Building the pipeline also reads key files, as `serve` would.
    let rt = runtime()?;
    let _guard = rt.enter();
    let pipeline = forwarder::pipeline::Pipeline::new(cfg, Default::default())?;
    println!(
        "configuration OK: {} upstream(s), models: {}",
        pipeline.config().upstreams.len(),
        pipeline.models().join(", ")
    );
    Ok(())
}

fn mock_llm(args: MockArgs) -> anyhow::Result<()> {
    let settings = MockSettings {
        latency: args.latency,
        tokens_per_second: args.tokens_per_second,
        reply_words: args.reply_words,
        error_rate: args.error_rate,
        error_status: args.error_status,
        retry_after_secs: args.retry_after,
        hang_rate: args.hang_rate,
        reset_rate: args.reset_rate,
    };
    if let Err(errors) = settings.validate("mock-llm") {
        let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::bail!("invalid mock settings: {}", msgs.join("; "));
    }
    init_logging(&LoggingConfig::default());
    runtime()?.block_on(async {
        let server = forwarder::mock_llm::MockServer::start(args.listen, settings)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(addr = %server.addr, "mock-llm listening");
        shutdown_signal().await;
        Ok(())
    })
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// glibc's allocator keeps freed memory in per-thread arenas and rarely
/// gives it back, so a burst would leave RSS high for good: fewer arenas,
/// and a trim every few seconds, return it.
mod memory {
    #[cfg(target_env = "gnu")]
    pub fn bound_and_return() {
        // SAFETY: mallopt and malloc_trim only tune and trim the allocator;
        // both are thread-safe and take plain integers.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
        let spawned = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the memory trimmer");
        }
    }

    #[cfg(not(target_env = "gnu"))]
    pub fn bound_and_return() {}
}
