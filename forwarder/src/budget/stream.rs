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
/// chunk. Events are relayed as they came otherwise.
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
            let keep = match &item {
                Ok(event) => {
                    let usage_chunk = tap.usage.event(tap.api, event);
                    !(usage_chunk && tap.strip)
                }
                Err(_) => true,
            };
            futures::future::ready(keep.then_some(item))
        })
        .boxed()
}
