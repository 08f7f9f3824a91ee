//! Runs the forwarder: binds the listener, serves the front ends, and shuts
//! down gracefully (not ready → drain delay → stop accepting → let in-flight
//! requests, streams included, finish within the grace period).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::frontends;
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
    pub addr: SocketAddr,
    pub pipeline: Arc<Pipeline>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Server {
    pub async fn start(cfg: Config) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let listen = cfg.server.listen;
        let grace = cfg.server.shutdown.grace_period;
        let reload = cfg.auth.reload_interval;
        let pipeline = Arc::new(Pipeline::new(cfg, metrics)?);
        let mut background = Vec::new();
        if let Some(keys) = pipeline.api_keys() {
            background.push(keys.clone().watch(reload));
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = frontends::http::router(pipeline.clone());
        let (stop, stopped) = watch::channel(false);
        let mut stopped_too = stopped.clone();
        let task = tokio::spawn(async move {
            let mut stopped = stopped;
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            let deadline = async move {
                let _ = stopped_too.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            };
            tokio::select! {
                result = serve => {
                    if let Err(e) = result {
                        tracing::error!(error = %e, "server failed");
                    }
                }
                _ = deadline => tracing::warn!("grace period over; closing the remaining connections"),
            }
        });
        Ok(Self {
            addr,
            pipeline,
            stop,
            task,
            background,
        })
    }

    /// Drains and stops; returns once every connection has closed or the
    /// grace period has passed.
    pub async fn shutdown(self) {
        let drain = self.pipeline.config().server.shutdown.drain_delay;
        self.pipeline.set_draining();
        tracing::info!(drain_delay = ?drain, "shutting down: not ready, draining");
        tokio::time::sleep(drain).await;
        let _ = self.stop.send(true);
        let _ = self.task.await;
        for task in self.background {
            task.abort();
        }
        tracing::info!("stopped");
    }
}
