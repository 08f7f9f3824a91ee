//! The response cache's place in the pipeline: a hit is answered before a
//! concurrency slot is taken; a miss's answer is stored once complete
//! (a stream only if it ended with `[DONE]`, never an error).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue};

use super::envelope::{Reply, ReplyBody};
use super::observe::Observer;
use super::stream_end;
use super::{Answer, EventStream};
use crate::api::ApiError;
use crate::cache::{convert, Decision, Plan, ResponseCache};
use crate::store::{HeldClaim, Record};

/// The response header saying how the cache answered.
pub const X_CACHE: &str = "x-cache";

pub struct Hit {
    age: Duration,
    body: ReplyBody,
}

/// A stored answer in the shape the client asked for; counted as a hit.
pub async fn lookup(cache: &ResponseCache, plan: &Plan, stream: bool) -> Option<Hit> {
    let rec = cache.lookup(plan).await?;
    served(cache, plan, &rec, stream)
}

/// After a miss: lead (hold the key's claim while forwarding) or wait for
/// an identical request's answer; see [`ResponseCache::lead_or_wait`].
pub async fn lead_or_wait(
    cache: &ResponseCache,
    plan: &Plan,
    stream: bool,
    until: tokio::time::Instant,
) -> Result<Option<HeldClaim>, Hit> {
    match cache.lead_or_wait(plan, until).await {
        Ok(lead) => Ok(lead),
        Err(rec) => match served(cache, plan, &rec, stream) {
            Some(hit) => Err(hit),
            None => Ok(None),
        },
    }
}

fn served(cache: &ResponseCache, plan: &Plan, rec: &Record, stream: bool) -> Option<Hit> {
    let body = if stream {
        // Whole events, as one run: one write.
        let events: Bytes = convert::to_events(&rec.value)?.concat().into();
        ReplyBody::Stream(futures::stream::once(async move { Ok(events) }).boxed())
    } else {
        ReplyBody::Complete(rec.value.clone())
    };
    cache.count(plan, "hit");
    Some(Hit {
        age: rec.age(),
        body,
    })
}

pub fn hit(mut obs: Observer, hit: Hit) -> Answer {
    obs.replay = Some("cache");
    let mut headers = HeaderMap::new();
    headers.insert(X_CACHE, HeaderValue::from_static("HIT"));
    headers.insert(http::header::AGE, HeaderValue::from(hit.age.as_secs()));
    Answer {
        reply: obs.watch(Reply {
            headers,
            body: hit.body,
        }),
        replayed: false,
    }
}

/// Counts a forwarded request, marks its answer and stores it if allowed.
pub fn fill(
    cache: &Arc<ResponseCache>,
    plan: Plan,
    lead: Option<HeldClaim>,
    answer: Result<Answer, ApiError>,
) -> Result<Answer, ApiError> {
    let miss = plan.decision == Decision::Lookup;
    cache.count(&plan, if miss { "miss" } else { "bypass" });
    let mut answer = answer?;
    answer.reply.headers.insert(
        X_CACHE,
        HeaderValue::from_static(if miss { "MISS" } else { "BYPASS" }),
    );
    if !plan.writes() {
        return Ok(answer);
    }
    let body = std::mem::replace(
        &mut answer.reply.body,
        ReplyBody::Complete(Default::default()),
    );
    answer.reply.body = match body {
        ReplyBody::Complete(bytes) => {
            cache.store(&plan, lead, bytes.clone());
            ReplyBody::Complete(bytes)
        }
        ReplyBody::Stream(events) => ReplyBody::Stream(record(cache.clone(), plan, lead, events)),
    };
    Ok(answer)
}

/// Records a stream's events (bounded) and stores the assembled
/// completion when, and only when, the stream completed.
fn record(
    cache: Arc<ResponseCache>,
    plan: Plan,
    lead: Option<HeldClaim>,
    events: EventStream,
) -> EventStream {
    // Events carry framing around the text: allow some headroom.
    let max = plan.max_entry().saturating_mul(4);
    stream_end::record(events, max, move |events| {
        if let Some(completion) = convert::from_events(events) {
            cache.store(&plan, lead, completion);
        }
    })
}
