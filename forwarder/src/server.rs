//! Runs the forwarder: binds the listeners, serves the front ends, and shuts
//! down gracefully (not ready → drain delay → stop accepting → let in-flight
//! requests, streams and WebSocket sessions included, finish within the
//! grace period).

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::frontends::conn::CountedListener;
use crate::frontends::grpc::{pb, GrpcFrontend};
use crate::frontends::{http, Lifecycle};
use crate::pipeline::Pipeline;
use crate::telemetry::Metrics;
use crate::BuildError;
use forwarder_config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running forwarder.
pub struct Server {
    /// The HTTP (and WebSocket) listener's address.
    pub addr: SocketAddr,
    /// The gRPC listener's address, when enabled.
    pub grpc_addr: Option<SocketAddr>,
    pub pipeline: Arc<Pipeline>,
    lifecycle: Lifecycle,
    stop: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    health: Option<tonic_health::server::HealthReporter>,
    background: Vec<JoinHandle<()>>,
}

async fn bind(
    addr: SocketAddr,
    metrics: &Metrics,
    protocol: &str,
) -> Result<CountedListener, StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok(CountedListener::new(
        listener,
        metrics.connections.with_label_values(&[protocol]),
    ))
}

impl Server {
    pub async fn start(cfg: Config) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let pipeline = Arc::new(Pipeline::new(cfg.clone(), metrics.clone())?);
        let lifecycle = Lifecycle::default();
        let (stop, stopped) = watch::channel(false);
        let when_stopped = move || {
            let mut rx = stopped.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };

        let http_listener = bind(cfg.server.listen, &metrics, "http").await?;
        let addr = axum::serve::Listener::local_addr(&http_listener).map_err(|source| {
            StartError::Bind {
                addr: cfg.server.listen,
                source,
            }
        })?;
        let app = http::router(pipeline.clone(), lifecycle.clone());
        let http_task = tokio::spawn(logged(
            "http",
            axum::serve(http_listener, app)
                .with_graceful_shutdown(when_stopped())
                .into_future(),
        ));
        let mut listeners = vec![http_task];

        let (mut grpc_addr, mut health) = (None, None);
        if cfg.grpc.enabled {
            let listener = bind(cfg.grpc.listen, &metrics, "grpc").await?;
            grpc_addr = Some(
                axum::serve::Listener::local_addr(&listener).map_err(|source| {
                    StartError::Bind {
                        addr: cfg.grpc.listen,
                        source,
                    }
                })?,
            );
            let (reporter, health_service) = tonic_health::server::health_reporter();
            reporter
                .set_serving::<pb::forwarder_server::ForwarderServer<GrpcFrontend>>()
                .await;
            health = Some(reporter);
            let reflection = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .build_v1()
                .map_err(|e| BuildError::new(format!("grpc reflection: {e}")))?;
            let incoming = futures::stream::unfold(listener, |mut listener| async move {
                let (io, _) = listener.accept_counted().await;
                Some((Ok::<_, std::io::Error>(io), listener))
            });
            let router = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(GrpcFrontend::service(pipeline.clone()));
            listeners.push(tokio::spawn(logged(
                "grpc",
                router.serve_with_incoming_shutdown(incoming, when_stopped()),
            )));
        }

        let mut background = Vec::new();
        if let Some(keys) = pipeline.api_keys() {
            background.push(keys.clone().watch(cfg.auth.reload_interval));
        }
        Ok(Self {
            addr,
            grpc_addr,
            pipeline,
            lifecycle,
            stop,
            listeners,
            health,
            background,
        })
    }
}

impl Server {
    /// Drains and stops; returns once every connection and session has
    /// finished or the grace period has passed.
    pub async fn shutdown(self) {
        let shutdown = &self.pipeline.config().server.shutdown;
        self.pipeline.set_draining();
        if let Some(health) = &self.health {
            health
                .set_not_serving::<pb::forwarder_server::ForwarderServer<GrpcFrontend>>()
                .await;
        }
        tracing::info!(drain_delay = ?shutdown.drain_delay, "shutting down: not ready, draining");
        tokio::time::sleep(shutdown.drain_delay).await;
        let _ = self.stop.send(true);
        self.lifecycle.stop.cancel();
        self.lifecycle.sessions.close();
        let aborts: Vec<_> = self
            .listeners
            .iter()
            .map(JoinHandle::abort_handle)
            .collect();
        let sessions = self.lifecycle.sessions.clone();
        let everything = async move {
            for listener in self.listeners {
                let _ = listener.await;
            }
            sessions.wait().await;
        };
        if tokio::time::timeout(shutdown.grace_period, everything)
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing the remaining connections");
            aborts.iter().for_each(|a| a.abort());
        }
        for task in self.background {
            task.abort();
        }
        tracing::info!("stopped");
    }
}

/// Runs a server future, logging how it failed.
async fn logged<E: std::fmt::Display>(
    name: &'static str,
    server: impl Future<Output = Result<(), E>>,
) {
    if let Err(e) = server.await {
        tracing::error!(server = name, error = %e, "server failed");
    }
}
