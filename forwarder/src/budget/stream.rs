//! A budgeted stream: reads the usage from its events as they pass, holds
//! back the usage chunk the forwarder asked for on the client's behalf,
//! and settles the reservation when the stream ends, however it ends.

use futures::StreamExt;

use super::usage::StreamUsage;
use super::Reservation;
use crate::pipeline::{ApiKind, EventStream};

struct Tap {
    api: ApiKind,
    /// The client did not ask for the usage chunk: it is not relayed.
    strip: bool,
    usage: StreamUsage,
    reservation: Option<Reservation>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            r.settle(self.usage.seen);
        }
    }
}

/// `stream` with its usage charged to `reservation` (none: a replayed
/// answer, charged nothing) and, when `strip`, without the chat usage
/// chunk. Runs of events are relayed as they came otherwise.
pub fn tap(
    stream: EventStream,
    api: ApiKind,
    strip: bool,
    reservation: Option<Reservation>,
) -> EventStream {
    let mut tap = Tap {
        api,
        strip,
        usage: StreamUsage::default(),
        reservation,
    };
    stream
        .filter_map(move |item| {
            // An item is a run of whole events (with their blank lines):
            // each is read, and the run is rebuilt only when a usage chunk
            // is held back.
            let item = match item {
                Ok(run) => {
                    let mut dropped = false;
                    let mut kept = bytes::BytesMut::new();
                    for event in crate::sse::events(&run) {
                        let usage_chunk = tap.usage.event(tap.api, event);
                        if usage_chunk && tap.strip {
                            dropped = true;
                        } else {
                            kept.extend_from_slice(event);
                        }
                    }
                    match (dropped, kept.is_empty()) {
                        (false, _) => Some(Ok(run)),
                        (true, true) => None,
                        (true, false) => Some(Ok(kept.freeze())),
                    }
                }
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(item)
        })
        .boxed()
}
