//! The pipeline's budget stage: reserve before forwarding (asking a chat
//! stream for its usage), charge the answer after.

use bytes::Bytes;

use super::reservation::Reservation;
use super::{tap, usage, Budgets};
use crate::api::ApiError;
use crate::auth::Identity;
use crate::pipeline::envelope::ReplyBody;
use crate::pipeline::{Answer, ApiKind};

/// A budgeted request on its way: its reservation, and whether its stream
/// carries a usage chunk the client did not ask for.
pub struct Held {
    reservation: Reservation,
    api: ApiKind,
    strip: bool,
}

impl Budgets {
    /// The pipeline's budget stage: reserves the request's estimate and,
    /// for a chat stream whose client did not ask for usage, asks for it
    /// (the body returned is the one to forward). `None`: no budget work
    /// for this request.
    pub async fn admit(
        &self,
        who: &Identity,
        tier: Option<&str>,
        model: &str,
        api: ApiKind,
        stream: bool,
        body: Bytes,
    ) -> Result<(Option<Held>, Bytes), ApiError> {
        let Some(reservation) = self.reserve(who, tier, model, &body).await? else {
            return Ok((None, body));
        };
        let injected = (stream && api == ApiKind::ChatCompletions && !usage::asks_usage(&body))
            .then(|| usage::with_usage(&body))
            .flatten();
        let strip = injected.is_some();
        let body = injected.map_or(body, Bytes::from);
        Ok((
            Some(Held {
                reservation,
                api,
                strip,
            }),
            body,
        ))
    }
}

/// Charges an answer to its reservation: a completion at once, a stream
/// when it ends (without the usage chunk the client did not ask for). A
/// replayed answer costs nothing; a failed request is refunded (its
/// reservation dropped).
pub fn charge(held: Option<Held>, answer: Result<Answer, ApiError>) -> Result<Answer, ApiError> {
    let Some(held) = held else {
        return answer;
    };
    let mut answer = answer?;
    let Held {
        reservation,
        api,
        strip,
    } = held;
    let reservation = (!answer.replayed).then_some(reservation);
    answer.reply.body = match answer.reply.body {
        ReplyBody::Complete(body) => {
            if let Some(r) = reservation {
                r.settle(usage::of_body(api, &body));
            }
            ReplyBody::Complete(body)
        }
        ReplyBody::Stream(s) => ReplyBody::Stream(tap(s, api, strip, reservation)),
    };
    Ok(answer)
}
