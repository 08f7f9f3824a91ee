//! A streamed answer the client must keep taking.
//!
//! The stream's own timers (the upstream's idle limit, the request
//! deadline) run only while the front end polls it, and a client that
//! stops reading stops the polling: over HTTP/2 (gRPC included) hyper does
//! not poll a stream whose flow-control window is closed, and the
//! connection's write timeout never sees it, since other streams still
//! flow. Such a client would hold its upstream call for as long as it
//! liked. So a small task watches each stream from outside and, when the
//! client has taken nothing for `server.write_timeout` (the stream was not
//! polled while it had something to give) or the request's deadline has
//! passed, drops the stream: the upstream call ends and the endpoint's
//! lease is settled. The next poll, if one ever comes, reads an error.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::task::ArcWake;
use futures::Stream;
use parking_lot::Mutex;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::api::ApiError;

/// Past the request deadline, how long the stream's own deadline handling
/// has to end a stream the client is reading (with the API's error event)
/// before the watchdog drops it.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// Why the watchdog ended a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Deadline = 1,
    Stalled = 2,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Polls so far: the watchdog compares it between its ticks.
    polls: AtomicU64,
    source: Arc<Source>,
    /// 0, or the [`Cut`] that ended the stream.
    cut: AtomicU8,
}

struct Inner {
    /// `None` once ended or cut.
    stream: Option<BoxStream<'static, Result<Bytes, ApiError>>>,
    /// The waker last handed to [`Source`], so an unchanged one costs no
    /// second lock.
    registered: Option<Waker>,
}

/// Whether the stream waits on its source (the upstream) rather than on
/// the client: set by a poll that found nothing to give, cleared when the
/// source wakes the stream (then only the client's polling is missing).
/// The stream's own timers govern a wait on the source. Apart from
/// [`Shared`], so the waker the source keeps does not own the stream.
struct Source {
    waiting: AtomicBool,
    /// The front end's waker, woken in turn. Kept, not taken, when woken:
    /// a stream is woken once per upstream read, and the same waker then
    /// needs no clone at the next poll.
    client: Mutex<Option<Waker>>,
}

impl ArcWake for Source {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.waiting.store(false, Ordering::Release);
        if let Some(w) = arc_self.client.lock().as_ref() {
            w.wake_by_ref();
        }
    }
}

impl Shared {
    fn cut(&self, why: Cut) {
        self.cut.store(why as u8, Ordering::Release);
        // Dropped outside the lock.
        let stream = self.inner.lock().stream.take();
        drop(stream);
    }
}

/// A stream watched by its own task (see the module doc).
pub struct Watched {
    shared: Arc<Shared>,
    watchdog: AbortHandle,
}

/// Watches `stream`: `deadline` is the request's, `stall` how long the
/// client may take nothing.
pub fn watch(
    stream: BoxStream<'static, Result<Bytes, ApiError>>,
    deadline: Instant,
    stall: Duration,
) -> Watched {
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            stream: Some(stream),
            registered: None,
        }),
        polls: AtomicU64::new(0),
        source: Arc::new(Source {
            waiting: AtomicBool::new(false),
            client: Mutex::new(None),
        }),
        cut: AtomicU8::new(0),
    });
    let deadline = deadline.checked_add(DEADLINE_GRACE).unwrap_or(deadline);
    let watchdog = tokio::spawn(run(Arc::downgrade(&shared), deadline, stall)).abort_handle();
    Watched { shared, watchdog }
}

/// Whether the watchdog must end the stream at this tick (pure): `polls`
/// unchanged since the last tick while the stream had something to give.
fn verdict(now: Instant, deadline: Instant, polled: bool, waiting_on_source: bool) -> Option<Cut> {
    if now >= deadline {
        Some(Cut::Deadline)
    } else if !polled && !waiting_on_source {
        Some(Cut::Stalled)
    } else {
        None
    }
}

async fn run(shared: Weak<Shared>, deadline: Instant, stall: Duration) {
    // A stream never polled in its first `stall` (a window never opened)
    // is stalled too.
    let mut seen = 0;
    loop {
        let tick = Instant::now()
            .checked_add(stall)
            .map_or(deadline, |t| t.min(deadline));
        tokio::time::sleep_until(tick).await;
        let Some(s) = shared.upgrade() else { return };
        let polls = s.polls.load(Ordering::Acquire);
        let waiting = s.source.waiting.load(Ordering::Acquire);
        if let Some(why) = verdict(Instant::now(), deadline, polls != seen, waiting) {
            tracing::debug!(reason = ?why, "streamed answer ended by its watchdog");
            s.cut(why);
            return;
        }
        seen = polls;
    }
}

impl Stream for Watched {
    type Item = Result<Bytes, ApiError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let s = &self.shared;
        s.polls.fetch_add(1, Ordering::Release);
        let mut guard = s.inner.lock();
        let inner = &mut *guard;
        let Some(stream) = inner.stream.as_mut() else {
            return Poll::Ready(match s.cut.swap(0, Ordering::AcqRel) {
                x if x == Cut::Deadline as u8 => Some(Err(ApiError::GatewayTimeout(
                    "the request deadline passed while the client was not reading".into(),
                ))),
                x if x == Cut::Stalled as u8 => Some(Err(ApiError::GatewayTimeout(
                    "the client stopped reading the stream".into(),
                ))),
                // The error was given once; then the stream ends.
                _ => None,
            });
        };
        if !inner
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            inner.registered = Some(cx.waker().clone());
            *s.source.client.lock() = Some(cx.waker().clone());
        }
        // Set before the poll: a wake during it clears it again.
        s.source.waiting.store(true, Ordering::Release);
        let waker = futures::task::waker_ref(&s.source);
        let r = stream.as_mut().poll_next(&mut Context::from_waker(&waker));
        if r.is_ready() {
            s.source.waiting.store(false, Ordering::Release);
        }
        if let Poll::Ready(None) = r {
            inner.stream = None;
        }
        r
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn the_verdict_cuts_a_stream_not_taken_and_one_past_its_deadline() {
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        assert_eq!(verdict(now, later, true, false), None, "taken");
        assert_eq!(
            verdict(now, later, false, true),
            None,
            "the upstream is slow"
        );
        assert_eq!(verdict(now, later, false, false), Some(Cut::Stalled));
        assert_eq!(verdict(later, later, true, true), Some(Cut::Deadline));
    }

    /// A source that never ends: it holds `alive` while not dropped.
    fn endless(alive: Arc<()>) -> BoxStream<'static, Result<Bytes, ApiError>> {
        futures::stream::repeat_with(move || {
            let _ = &alive;
            Ok(Bytes::from_static(b"data: {}\n\n"))
        })
        .boxed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_nobody_polls_is_dropped_after_the_stall_time() {
        let alive = Arc::new(());
        let far = Instant::now() + Duration::from_secs(3600);
        let mut w = watch(endless(alive.clone()), far, Duration::from_secs(5));
        assert!(w.next().await.is_some_and(|r| r.is_ok()));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(Arc::strong_count(&alive), 2, "within the stall time");
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(Arc::strong_count(&alive), 1, "the source was dropped");
        assert!(matches!(
            w.next().await,
            Some(Err(ApiError::GatewayTimeout(_)))
        ));
        assert!(w.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_read_steadily_lives_until_its_deadline() {
        let alive = Arc::new(());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut w = watch(endless(alive.clone()), deadline, Duration::from_secs(5));
        for _ in 0..18 {
            assert!(w.next().await.is_some_and(|r| r.is_ok()));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(Arc::strong_count(&alive), 2, "read: not stalled");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(Arc::strong_count(&alive), 1, "past the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_whose_source_has_data_nobody_takes_is_stalled() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, ApiError>>();
        let far = Instant::now() + Duration::from_secs(3600);
        let mut w = watch(rx.boxed(), far, Duration::from_secs(5));
        // Polled once: nothing yet, so it waits on its source.
        assert!(futures::poll!(w.next()).is_pending());
        // The source gets data and wakes the stream; nobody polls it.
        tx.unbounded_send(Ok(Bytes::from_static(b"data: {}\n\n")))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(tx.is_closed(), "the source was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_on_its_upstream_is_not_the_clients_stall() {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut w = watch(
            futures::stream::pending().boxed(),
            far,
            Duration::from_secs(5),
        );
        let polled = tokio::time::timeout(Duration::from_secs(30), w.next()).await;
        assert!(polled.is_err(), "still waiting on the source, not cut");
        assert_eq!(w.shared.cut.load(Ordering::Acquire), 0);
    }
}
