//! The TCP edge shared by the HTTP and gRPC servers: a listener that caps
//! and counts open connections (`forwarder_connections`), and a connection
//! wrapper that enforces the server-side timeouts no HTTP library offers
//! together:
//!
//! - **write timeout**: a write that stays pending (the client stopped
//!   reading) longer than `server.write_timeout` fails, so the HTTP server
//!   drops the connection and, with it, the in-flight request and its
//!   upstream call;
//! - **header timeout**: a request head must arrive within
//!   `server.header_timeout` of its first byte (of the accept for a new
//!   connection), which also covers hyper's protocol sniffing; on the gRPC
//!   listener only the connection's opening is timed so;
//! - **idle timeout** (HTTP listener only): a connection with no request in
//!   flight is closed after `server.idle_timeout` without a byte.
//!
//! Which requests are in flight is told by the HTTP service through
//! [`Activity`]; the wrapper only watches bytes and clocks.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Timeouts applied to each accepted connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnTimeouts {
    pub write: Duration,
    /// Header and idle timeouts; `None` for listeners whose server tracks
    /// requests itself (gRPC), where only the write timeout applies.
    pub read: Option<ReadTimeouts>,
}

#[derive(Debug, Clone, Copy)]
pub struct ReadTimeouts {
    pub header: Duration,
    pub idle: Duration,
    /// Only the connection's first bytes are timed (against `header`): for
    /// servers that do not report their requests (gRPC), where a quiet
    /// connection may be a stream in flight.
    pub opening_only: bool,
}

pub struct CountedListener {
    inner: TcpListener,
    gauge: IntGauge,
    permits: Arc<Semaphore>,
    timeouts: ConnTimeouts,
}

/// Longest pause after a failed `accept` (out of file descriptors, …).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

impl CountedListener {
    pub fn new(
        inner: TcpListener,
        gauge: IntGauge,
        max_connections: usize,
        timeouts: ConnTimeouts,
    ) -> Self {
        Self {
            inner,
            gauge,
            permits: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
            timeouts,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Accepts the next connection once fewer than the cap are open: until
    /// then new connections wait in the kernel's backlog, costing nothing
    /// here. Transient errors (such as running out of file descriptors) are
    /// logged and retried after a growing pause instead of ending the server
    /// or spinning. Cancel-safe.
    pub async fn accept_counted(&mut self) -> (Counted, SocketAddr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (Counted::new(stream, self, permit), addr);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    }
}

/// What the HTTP service tells a connection about its requests.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests whose answer is not yet fully written.
    in_flight: AtomicUsize,
    /// Upgraded to WebSocket: the session has its own idle handling.
    upgraded: AtomicBool,
    /// The connection's reader, woken when the last request ends so its
    /// idle timer starts even if the HTTP server does not read again.
    reader: AtomicWaker,
}

impl Activity {
    /// Marks a request in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }
}

/// One request in flight on a connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

/// What a connection waits for, seen from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// A request head has begun (or the connection is new).
    Head { since: Instant },
    /// Nothing in flight, nothing begun.
    Idle { since: Instant },
    /// A request is in flight: its own deadline governs.
    Busy,
}

/// The HTTP/2 connection preface's first bytes: enough to tell it apart.
const H2_PREFACE: &[u8; SNIFF_LEN] = b"PRI ";
const SNIFF_LEN: usize = 4;

struct ReadGuard {
    timeouts: ReadTimeouts,
    activity: Arc<Activity>,
    waiting: Waiting,
    /// HTTP/2 multiplexes frames: any frame while idle (a PING) only renews
    /// the idle period; there is no "head" to time.
    h2: bool,
    /// The first bytes, until there are enough to tell HTTP/2 from HTTP/1
    /// (`PRI ` versus `POST`, `PUT`, …): a client trickling `P` must not
    /// pass for HTTP/2 and escape the header timeout.
    sniff: Option<([u8; SNIFF_LEN], usize)>,
    timer: Option<Pin<Box<Sleep>>>,
}

/// The state after bytes arrived at `now`: on HTTP/1 the first byte after
/// an idle spell begins a head, timed from then. On HTTP/2 frames without
/// a request (PING, SETTINGS) do not end idleness: a connection kept open
/// by pings alone is still idle.
fn after_bytes(waiting: Waiting, h2: bool, now: Instant) -> Waiting {
    match waiting {
        Waiting::Idle { .. } if !h2 => Waiting::Head { since: now },
        other => other,
    }
}

/// A read is pending: the state, and the instant the read must have
/// completed by (`None`: no limit, or one beyond the clock's range).
/// `now` is called only when an idle spell begins.
fn when_pending(
    waiting: Waiting,
    busy: bool,
    h2: bool,
    t: &ReadTimeouts,
    now: impl FnOnce() -> Instant,
) -> (Waiting, Option<Instant>) {
    if busy {
        return (Waiting::Busy, None);
    }
    let waiting = match waiting {
        Waiting::Busy => Waiting::Idle { since: now() },
        other => other,
    };
    let (since, limit) = match waiting {
        Waiting::Head { since } if !h2 => (since, t.header),
        Waiting::Head { since } | Waiting::Idle { since } => (since, t.idle),
        Waiting::Busy => return (waiting, None),
    };
    (waiting, since.checked_add(limit))
}

impl ReadGuard {
    fn busy(&self) -> bool {
        self.activity.in_flight.load(Ordering::Acquire) > 0
    }

    /// Bytes arrived.
    fn on_bytes(&mut self, bytes: &[u8]) {
        if let Some((buf, len)) = &mut self.sniff {
            let n = bytes.len().min(SNIFF_LEN - *len);
            buf[*len..*len + n].copy_from_slice(&bytes[..n]);
            *len += n;
            if *len == SNIFF_LEN {
                self.h2 = buf == H2_PREFACE;
                self.sniff = None;
            }
        }
        if let Waiting::Idle { .. } = self.waiting {
            self.waiting = after_bytes(self.waiting, self.h2, Instant::now());
        }
    }

    /// The read is pending: when must it have completed?
    fn deadline(&mut self, cx: &Context<'_>) -> Option<Instant> {
        let mut busy = self.busy();
        if busy {
            self.activity.reader.register(cx.waker());
            // Re-check: the last request may have ended meanwhile.
            busy = self.busy();
        }
        let (waiting, deadline) =
            when_pending(self.waiting, busy, self.h2, &self.timeouts, Instant::now);
        self.waiting = waiting;
        deadline
    }
}

/// Polls `timer` armed for `deadline`: whether it has passed.
fn expired(timer: &mut Option<Pin<Box<Sleep>>>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    match timer {
        Some(t) => {
            if t.deadline() != deadline {
                t.as_mut().reset(deadline);
            }
        }
        None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
    }
    timer
        .as_mut()
        .is_some_and(|t| t.as_mut().poll(cx).is_ready())
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// A connection: leaves the gauge and frees its slot under the cap when
/// dropped, and enforces the timeouts above.
pub struct Counted {
    stream: TcpStream,
    gauge: IntGauge,
    _permit: OwnedSemaphorePermit,
    write_timeout: Duration,
    /// When the pending write must have progressed; `None` while writes flow.
    write_deadline: Option<Instant>,
    write_timer: Option<Pin<Box<Sleep>>>,
    read: Option<ReadGuard>,
}

impl Counted {
    fn new(stream: TcpStream, listener: &CountedListener, permit: OwnedSemaphorePermit) -> Self {
        listener.gauge.inc();
        let t = listener.timeouts;
        Self {
            stream,
            gauge: listener.gauge.clone(),
            _permit: permit,
            write_timeout: t.write,
            write_deadline: None,
            write_timer: None,
            read: t.read.map(|timeouts| ReadGuard {
                timeouts,
                activity: Arc::default(),
                // The first request head is due within the header timeout
                // of the accept.
                waiting: Waiting::Head {
                    since: Instant::now(),
                },
                h2: false,
                sniff: Some(([0; SNIFF_LEN], 0)),
                timer: None,
            }),
        }
    }

    /// The request tracker the HTTP service reports to (a fresh, unused one
    /// when this listener has no read timeouts).
    pub fn activity(&self) -> Arc<Activity> {
        self.read
            .as_ref()
            .map_or_else(Arc::default, |r| r.activity.clone())
    }

    /// A write could not proceed: fail it once it has waited too long.
    fn write_stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let deadline = match self.write_deadline {
            Some(d) => d,
            None => match Instant::now().checked_add(self.write_timeout) {
                Some(d) => {
                    self.write_deadline = Some(d);
                    d
                }
                None => return Poll::Pending,
            },
        };
        if expired(&mut self.write_timer, deadline, cx) {
            return Poll::Ready(Err(timed_out("the client stopped reading")));
        }
        Poll::Pending
    }

    fn write_progressed<T>(
        &mut self,
        r: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.write_stalled(cx),
            ready => {
                self.write_deadline = None;
                ready
            }
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some(guard) = &mut this.read else {
            return res;
        };
        if guard.activity.upgraded.load(Ordering::Relaxed) {
            // A WebSocket session now owns the connection and its timers.
            this.read = None;
            return res;
        }
        match res {
            Poll::Ready(Ok(())) => {
                guard.on_bytes(&buf.filled()[before..]);
                if guard.timeouts.opening_only && guard.sniff.is_none() {
                    this.read = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match guard.deadline(cx) {
                Some(deadline) if expired(&mut guard.timer, deadline, cx) => {
                    let what = match guard.waiting {
                        Waiting::Head { .. } if !guard.h2 => "request head not received in time",
                        _ => "idle connection timed out",
                    };
                    Poll::Ready(Err(timed_out(what)))
                }
                _ => Poll::Pending,
            },
            err => err,
        }
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.write_progressed(r, cx)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_flush(cx);
        this.write_progressed(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.write_progressed(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.write_progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ReadTimeouts = ReadTimeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(75),
        opening_only: false,
    };
    const S: Duration = Duration::from_secs(1);

    fn never() -> Instant {
        panic!("no idle spell begins here")
    }

    #[test]
    fn a_new_connection_owes_its_head_within_the_header_timeout() {
        let t0 = Instant::now();
        let w = Waiting::Head { since: t0 };
        assert_eq!(
            when_pending(w, false, false, &T, never),
            (w, Some(t0 + 10 * S))
        );
        // bytes of the head do not extend it
        let w = after_bytes(w, false, t0 + 5 * S);
        assert_eq!(
            when_pending(w, false, false, &T, never).1,
            Some(t0 + 10 * S)
        );
    }

    #[test]
    fn http1_idle_then_a_new_head_is_timed_from_its_first_byte() {
        let t0 = Instant::now();
        let (w, d) = when_pending(Waiting::Busy, true, false, &T, never);
        assert_eq!((w, d), (Waiting::Busy, None), "in flight: no read limit");
        let (w, d) = when_pending(w, false, false, &T, || t0);
        assert_eq!((w, d), (Waiting::Idle { since: t0 }, Some(t0 + 75 * S)));
        let w = after_bytes(w, false, t0 + 60 * S);
        assert_eq!(w, Waiting::Head { since: t0 + 60 * S });
        assert_eq!(
            when_pending(w, false, false, &T, never).1,
            Some(t0 + 70 * S)
        );
    }

    #[test]
    fn http2_pings_do_not_end_idleness() {
        let t0 = Instant::now();
        let (w, _) = when_pending(Waiting::Busy, false, true, &T, || t0);
        let w = after_bytes(w, true, t0 + 70 * S);
        assert_eq!(w, Waiting::Idle { since: t0 });
        assert_eq!(when_pending(w, false, true, &T, never).1, Some(t0 + 75 * S));
        // an HTTP/2 connection past its preface is timed as idle, not as a head
        let w = Waiting::Head { since: t0 };
        assert_eq!(when_pending(w, false, true, &T, never).1, Some(t0 + 75 * S));
    }

    #[test]
    fn limits_beyond_the_clock_mean_no_limit_not_a_panic() {
        let huge = ReadTimeouts {
            header: Duration::MAX,
            idle: Duration::MAX,
            opening_only: false,
        };
        let w = Waiting::Head {
            since: Instant::now(),
        };
        assert_eq!(when_pending(w, false, false, &huge, never).1, None);
    }
}
