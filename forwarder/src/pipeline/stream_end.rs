//! Runs a callback exactly once when a reply stream ends, however it ends:
//! the hook that closes metrics, logs and idempotency records for streams.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use std::sync::Arc;

use super::EventStream as ReplyStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Every item was delivered and none was an error.
    Completed,
    /// An error item (with its HTTP status) ended the stream.
    Failed(u16),
    /// The consumer dropped the stream before its end (client gone).
    Dropped,
}

/// Records a stream's bytes, at most `max` of them (past it the recording
/// is dropped), and hands them to `done` when, and only when, the stream
/// completed (the idempotency record and the cache both keep only whole
/// answers). `done` is dropped unrun otherwise, with what it holds.
pub fn record(
    inner: ReplyStream,
    max: usize,
    done: impl FnOnce(bytes::Bytes) + Send + 'static,
) -> ReplyStream {
    let recording = Arc::new(Mutex::new(Some(BytesMut::new())));
    let rec = recording.clone();
    let recorded = inner.inspect(move |item| {
        let mut rec = rec.lock();
        if let (Ok(run), Some(buf)) = (item, rec.as_mut()) {
            if buf.len() + run.len() > max {
                *rec = None;
            } else {
                buf.extend_from_slice(run);
            }
        }
    });
    on_end(recorded.boxed(), move |end| {
        let events = recording.lock().take();
        if let (StreamEnd::Completed, Some(events)) = (end, events) {
            done(events.freeze());
        }
    })
}

pub fn on_end(inner: ReplyStream, f: impl FnOnce(StreamEnd) + Send + 'static) -> ReplyStream {
    OnEnd {
        inner,
        callback: Some(Box::new(f)),
        failed: None,
    }
    .boxed()
}

struct OnEnd {
    inner: ReplyStream,
    callback: Option<Box<dyn FnOnce(StreamEnd) + Send>>,
    failed: Option<u16>,
}

impl OnEnd {
    fn fire(&mut self, end: StreamEnd) {
        if let Some(f) = self.callback.take() {
            f(end);
        }
    }
}

impl Stream for OnEnd {
    type Item = <ReplyStream as Stream>::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = futures::ready!(this.inner.poll_next_unpin(cx));
        match &item {
            Some(Ok(_)) => {}
            Some(Err(e)) => this.failed = Some(e.status().as_u16()),
            None => {
                let end = this.failed.map_or(StreamEnd::Completed, StreamEnd::Failed);
                this.fire(end);
            }
        }
        Poll::Ready(item)
    }
}

impl Drop for OnEnd {
    fn drop(&mut self) {
        let end = self.failed.map_or(StreamEnd::Dropped, StreamEnd::Failed);
        self.fire(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiError;
    use std::sync::{Arc, Mutex};

    fn run(items: Vec<Result<bytes::Bytes, ApiError>>, take: usize) -> Option<StreamEnd> {
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        let mut stream = on_end(futures::stream::iter(items).boxed(), move |e| {
            *s.lock().unwrap() = Some(e)
        });
        futures::executor::block_on(async {
            for _ in 0..take {
                stream.next().await;
            }
        });
        drop(stream);
        let end = *seen.lock().unwrap();
        end
    }

    #[test]
    fn reports_completion_failure_and_drop() {
        assert_eq!(run(vec![], 1), Some(StreamEnd::Completed));
        assert_eq!(
            run(vec![Err(ApiError::GatewayTimeout("t".into()))], 2),
            Some(StreamEnd::Failed(504))
        );
        assert_eq!(
            run(vec![Err(ApiError::GatewayTimeout("t".into()))], 0),
            Some(StreamEnd::Dropped)
        );
    }
}
