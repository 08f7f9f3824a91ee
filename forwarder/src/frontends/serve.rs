//! The HTTP server loop: accepts connections under the cap, serves the
//! axum router over HTTP/1 and HTTP/2 (WebSocket upgrades included) with
//! the configured limits, answers a request whose body does not arrive in
//! time with 408, and on shutdown stops accepting and lets every in-flight
//! request finish.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::task::JoinSet;
use tower::Service;

use super::conn::{Activity, CountedListener, InFlight};
use super::tls::{PeerSubject, TlsFiles};
use forwarder_config::ServerConfig;

/// Serves `router` on `listener` until `stop` resolves, then waits for the
/// open connections to finish their requests (the caller bounds that wait
/// with the grace period by aborting this future's task; that drops the
/// connections too).
pub async fn serve_http(
    mut listener: CountedListener,
    router: Router,
    cfg: &ServerConfig,
    tls: Option<Arc<TlsFiles>>,
    stop: impl Future<Output = ()>,
) {
    let builder = Arc::new(builder(cfg));
    let body_timeout = cfg.body_timeout;
    let handshake_timeout = cfg.header_timeout;
    let graceful = GracefulShutdown::new();
    // Owning the connection tasks here means aborting this task (grace
    // period over) closes them all.
    let mut conns = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            (io, _) = listener.accept_counted() => {
                let service = ConnService {
                    router: router.clone(),
                    activity: io.activity(),
                    body_timeout,
                    peer: None,
                };
                let builder = builder.clone();
                let watcher = graceful.watcher();
                // The handshake runs in the connection's task, never in
                // this loop: a slow client must not hold up accepting.
                let acceptor = tls.as_ref().map(|t| t.acceptor());
                conns.spawn(async move {
                    let result = match acceptor {
                        None => {
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(io), service)
                                .into_owned();
                            watcher.watch(conn).await
                        }
                        Some(acceptor) => {
                            let Some(tls) = super::tls::handshake(acceptor, io, handshake_timeout).await else {
                                return;
                            };
                            let service = ConnService {
                                peer: tls.peer.clone(),
                                ..service
                            };
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                                .into_owned();
                            watcher.watch(conn).await
                        }
                    };
                    if let Err(e) = result {
                        // Timeouts and resets: the client's doing, not ours.
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Refuse new connections from now on.
    drop(listener);
    tokio::join!(graceful.shutdown(), async {
        while conns.join_next().await.is_some() {}
    });
}

/// HTTP/2's default stream window (RFC 9113 §6.9.2).
const H2_STREAM_WINDOW: u32 = 65_535;

fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        // The connection wrapper times heads and idle periods itself:
        // hyper's header timer also runs while a kept-alive connection is
        // idle, which would make the two one setting.
        .header_read_timeout(None)
        // Bounds the head: hyper answers 431 beyond it.
        .max_buf_size(cfg.max_header_bytes.max(8192));
    b.http2()
        .max_concurrent_streams(cfg.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        // Flow-control windows bound what a client can make us buffer
        // unread (hyper's defaults are 1 MiB each): per stream the
        // protocol's default, per connection four streams' worth.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(4 * H2_STREAM_WINDOW)
        // What one stream may hold unsent for a client that stopped reading
        // it (hyper's default is ~400 KiB). Such a stream stalls without
        // stalling the connection, so the write timeout does not see it:
        // the pipeline's watchdog ends it (`pipeline/watchdog.rs`).
        .max_send_buf_size(64 * 1024);
    b
}

/// The per-connection service: the router, plus the bookkeeping the
/// connection's timeouts need and the body deadline.
#[derive(Clone)]
struct ConnService {
    router: Router,
    activity: Arc<Activity>,
    body_timeout: Duration,
    /// The verified client certificate's subject (mTLS connections).
    peer: Option<PeerSubject>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send + 'static>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        let activity = self.activity.clone();
        let mut router = self.router.clone();
        let (mut parts, body) = req.into_parts();
        if let Some(peer) = &self.peer {
            parts.extensions.insert(peer.clone());
        }
        if hyper::body::Body::is_end_stream(&body) {
            // No body to wait for (GET, upgrades, empty POST).
            let fut = router.call(Request::from_parts(parts, Body::new(body)));
            return Box::pin(async move {
                let resp = match fut.await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                Ok(track(resp, in_flight, &activity))
            });
        }
        let received = Arc::new(AtomicBool::new(false));
        let body = TimedBody {
            inner: body,
            received: received.clone(),
        };
        let deadline = tokio::time::Instant::now().checked_add(self.body_timeout);
        let fut = router.call(Request::from_parts(parts, Body::new(body)));
        Box::pin(async move {
            let resp = match deadline {
                Some(deadline) => with_body_deadline(fut, deadline, &received).await,
                None => fut.await.unwrap_or_else(|never| match never {}),
            };
            Ok(track(resp, in_flight, &activity))
        })
    }
}

/// Runs the handler; if its request body has not fully arrived by
/// `deadline`, drops it (nothing upstream was started without a body) and
/// answers 408. A handler that has its body keeps running past the deadline:
/// the request deadline governs it from then on.
async fn with_body_deadline(
    fut: impl Future<Output = Result<Response<Body>, Infallible>>,
    deadline: tokio::time::Instant,
    received: &AtomicBool,
) -> Response<Body> {
    tokio::pin!(fut);
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(sleep);
    tokio::select! {
        biased;
        r = &mut fut => return r.unwrap_or_else(|never| match never {}),
        () = &mut sleep => {}
    }
    if received.load(Ordering::Acquire) {
        return fut.await.unwrap_or_else(|never| match never {});
    }
    tracing::debug!("request body not received in time");
    body_timeout_response()
}

/// 408 in the OpenAI error shape; the connection is closed after it, as the
/// rest of the body may still be on its way.
pub fn body_timeout_response() -> Response<Body> {
    let body = r#"{"error":{"message":"the request body was not received in time","type":"invalid_request_error","code":"request_timeout"}}"#;
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::REQUEST_TIMEOUT;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn track(resp: Response<Body>, in_flight: InFlight, activity: &Activity) -> Response<Tracked> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        activity.set_upgraded();
    }
    resp.map(|inner| Tracked {
        inner,
        _in_flight: in_flight,
    })
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight (so the
    /// connection is not idle) until it is fully written or dropped.
    pub struct Tracked {
        #[pin]
        inner: Body,
        _in_flight: InFlight,
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that records when it has been received in full.
    struct TimedBody {
        #[pin]
        inner: Incoming,
        received: Arc<AtomicBool>,
    }
}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.received.store(true, Ordering::Release);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
