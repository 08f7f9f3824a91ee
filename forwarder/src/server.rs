//! Runs the forwarder: binds the listeners, serves the front ends, and shuts
//! down gracefully (not ready → drain delay → stop accepting → let in-flight
//! requests, streams and WebSocket sessions included, finish within the
//! grace period).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::frontends::conn::{ConnTimeouts, CountedListener, ReadTimeouts};
use crate::frontends::grpc::{pb, GrpcFrontend};
use crate::frontends::tls::{self, TlsConn, TlsFiles};
use crate::frontends::{http, serve, Lifecycle};
use crate::jobs::Jobs;
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
    jobs: Option<Arc<Jobs>>,
    /// Async job workers: stop fetching at shutdown, finish what they run.
    workers: Vec<JoinHandle<()>>,
}

async fn bind(
    addr: SocketAddr,
    metrics: &Metrics,
    protocol: &str,
    cfg: &Config,
) -> Result<CountedListener, StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let s = &cfg.server;
    let timeouts = ConnTimeouts {
        write: s.write_timeout,
        // gRPC streams are long-lived and tonic has no hook to tell the
        // connection which are in flight: there only the opening is timed
        // (HTTP/2 keep-alive pings find dead peers later).
        read: Some(ReadTimeouts {
            header: s.header_timeout,
            idle: s.idle_timeout,
            opening_only: protocol == "grpc",
        }),
    };
    Ok(CountedListener::new(
        listener,
        metrics.connections.with_label_values(&[protocol]),
        s.max_connections,
        timeouts,
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

        let tls = match &cfg.server.tls {
            Some(t) => {
                Some(TlsFiles::load(t).map_err(|e| BuildError::new(format!("server.tls: {e}")))?)
            }
            None => None,
        };
        let http_listener = bind(cfg.server.listen, &metrics, "http", &cfg).await?;
        let addr = http_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: cfg.server.listen,
                source,
            })?;
        let jobs = if cfg.async_jobs.enabled {
            Some(Jobs::new(pipeline.clone()).await?)
        } else {
            None
        };
        let app = http::router(pipeline.clone(), lifecycle.clone(), jobs.clone());
        let server_cfg = cfg.server.clone();
        let stop_http = when_stopped();
        let http_tls = tls.clone();
        let http_task = tokio::spawn(async move {
            serve::serve_http(http_listener, app, &server_cfg, http_tls, stop_http).await;
        });
        let mut listeners = vec![http_task];

        let (mut grpc_addr, mut health) = (None, None);
        if cfg.grpc.enabled {
            let listener = bind(cfg.grpc.listen, &metrics, "grpc", &cfg).await?;
            grpc_addr = Some(listener.local_addr().map_err(|source| StartError::Bind {
                addr: cfg.grpc.listen,
                source,
            })?);
            let (reporter, health_service) = tonic_health::server::health_reporter();
            reporter
                .set_serving::<pb::forwarder_server::ForwarderServer<GrpcFrontend>>()
                .await;
            health = Some(reporter);
            // Reflection for both protocol versions (grpcurl and older
            // clients still speak v1alpha), listing health as well.
            let reflection = || {
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            };
            let reflection_v1alpha = reflection()
                .build_v1alpha()
                .map_err(|e| BuildError::new(format!("grpc reflection: {e}")))?;
            let reflection = reflection()
                .build_v1()
                .map_err(|e| BuildError::new(format!("grpc reflection: {e}")))?;
            let s = &cfg.server;
            let router = tonic::transport::Server::builder()
                // Unary calls and the head of streamed ones.
                .timeout(s.request_timeout)
                .max_concurrent_streams(s.http2_max_concurrent_streams)
                .concurrency_limit_per_connection(s.http2_max_concurrent_streams as usize)
                .http2_max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
                // Pings find dead peers of idle connections.
                .http2_keepalive_interval(Some(s.idle_timeout))
                .http2_keepalive_timeout(Some(s.write_timeout))
                .add_service(health_service)
                .add_service(reflection)
                .add_service(reflection_v1alpha)
                .add_service(GrpcFrontend::service(pipeline.clone()));
            let task = match &tls {
                None => {
                    let incoming = futures::stream::unfold(listener, |mut listener| async move {
                        let (io, _) = listener.accept_counted().await;
                        Some((Ok::<_, std::io::Error>(io), listener))
                    });
                    tokio::spawn(logged(
                        "grpc",
                        router.serve_with_incoming_shutdown(incoming, when_stopped()),
                    ))
                }
                Some(tls) => {
                    let incoming =
                        tls_incoming(listener, tls.clone(), s.header_timeout, when_stopped());
                    tokio::spawn(logged(
                        "grpc",
                        router.serve_with_incoming_shutdown(incoming, when_stopped()),
                    ))
                }
            };
            listeners.push(task);
        }

        let workers = jobs.as_ref().map(Jobs::start).unwrap_or_default();
        let mut background = Vec::new();
        if let Some(keys) = pipeline.api_keys() {
            background.push(crate::reload::poll(keys.clone(), cfg.auth.reload_interval));
        }
        if let Some(tls) = &tls {
            background.push(tls.clone().watch());
        }
        if let (Some(jwt), Some(jwt_cfg)) = (pipeline.jwt(), &cfg.auth.jwt) {
            background.push(jwt.keys().clone().watch(jwt_cfg));
        }
        let upstream_tls = cfg.upstreams.iter().filter_map(|u| u.tls.as_ref());
        if let Some(every) = upstream_tls
            .filter(|t| t.ca_file.is_some() || t.cert_file.is_some())
            .map(|t| t.reload_interval.max(std::time::Duration::from_millis(100)))
            .min()
        {
            let files = Arc::new(UpstreamFiles(pipeline.clone()));
            background.push(crate::reload::poll(files, every));
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
            jobs,
            workers,
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
        if let Some(jobs) = &self.jobs {
            jobs.stop();
        }
        let aborts: Vec<_> = aborts
            .into_iter()
            .chain(self.workers.iter().map(JoinHandle::abort_handle))
            .collect();
        let sessions = self.lifecycle.sessions.clone();
        let workers = self.workers;
        let everything = async move {
            for listener in self.listeners {
                let _ = listener.await;
            }
            sessions.wait().await;
            for worker in workers {
                let _ = worker.await;
            }
        };
        if tokio::time::timeout(shutdown.grace_period, everything)
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing the remaining connections");
            aborts.iter().for_each(|a| a.abort());
        }
        if let Some(jobs) = &self.jobs {
            jobs.close().await;
        }
        for task in self.background {
            task.abort();
        }
        // The spans of the requests just drained.
        self.pipeline.flush_traces().await;
        tracing::info!("stopped");
    }
}

/// TLS connections for the gRPC server: accepts until `stop`, handshakes
/// each connection in its own task (a slow client holds up no other), and
/// yields those that complete.
fn tls_incoming(
    mut listener: CountedListener,
    tls: Arc<TlsFiles>,
    handshake_timeout: std::time::Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) -> impl futures::Stream<Item = Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                (io, _) = listener.accept_counted() => {
                    let (tx, acceptor) = (tx.clone(), tls.acceptor());
                    tokio::spawn(async move {
                        if let Some(conn) = tls::handshake(acceptor, io, handshake_timeout).await {
                            let _ = tx.send(Ok(conn)).await;
                        }
                    });
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
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

/// The upstreams' TLS files, polled as one source.
struct UpstreamFiles(Arc<Pipeline>);

impl crate::reload::Reload for UpstreamFiles {
    type Error = crate::BuildError;
    const WHAT: &'static str = "upstream TLS files";

    fn reload(&self) -> Result<bool, crate::BuildError> {
        self.0.reload_upstream_files()
    }
}
