//! Requests under an idempotency key: replayed from the stored answer,
//! joined to this process's flight, or led (the key claimed in the shared
//! store, or another replica's answer awaited), and their answers recorded.

use futures::{FutureExt, StreamExt};
use http::HeaderMap;

use super::claims::Begin;
use super::envelope::{Envelope, Reply, ReplyBody};
use super::idempotency::{fingerprint, Fingerprint, StoredReply};
use super::observe::Observer;
use super::stream_end;
use super::{Answer, ApiKind, Pipeline};
use crate::api::ApiError;
use crate::store::StoreKey;

impl Pipeline {
    /// Forwards under an idempotency key: replay, join (this process's
    /// flight) or lead (claim the key in the shared store, or wait for
    /// another replica's answer).
    pub(super) async fn keyed(
        &self,
        mut obs: Observer,
        key: String,
        skey: StoreKey,
        env: Envelope,
    ) -> Result<Answer, ApiError> {
        let fp = fingerprint(&fingerprint_scope(env.api, &env.model), &env.body);
        if let Some(answer) = self
            .claims
            .lookup(&skey, &fp)
            .await
            .map_err(|e| obs.fail(e))?
        {
            obs.replay = Some("stored");
            return Ok(self.replay(obs, answer));
        }
        if env.stream {
            return self.keyed_stream(obs, key, skey, fp, env).await;
        }
        let (claims, forwarder) = (self.claims.clone(), self.forwarder.clone());
        let max_record = self.cfg.idempotency.max_record_bytes;
        let ttl = self.cfg.idempotency.ttl;
        let deadline = env.ctx.deadline;
        let (env_api, env_owner) = (env.api, env.ctx.principal.0.clone());
        let new_trace = obs.new_trace();
        let (flight, leader) = self
            .flights
            .lead_or_join(&key, fp, move |claim| {
                async move {
                    let mut trace = new_trace;
                    let result = match claims.begin(&skey, fp, false, deadline).await {
                        Err(e) => Err(e),
                        Ok(Begin::Replay(StoredReply::Complete(body))) => {
                            Ok((HeaderMap::new(), body, true))
                        }
                        // The fingerprint covers `stream`: never a stream here.
                        Ok(Begin::Replay(StoredReply::Stream(_))) => {
                            Err(ApiError::IdempotencyMismatch)
                        }
                        Ok(Begin::Lead(lease)) => {
                            match forwarder.complete(&env, &mut trace).await {
                                Ok(Reply {
                                    headers,
                                    body: ReplyBody::Complete(body),
                                }) => {
                                    // A lease dropped unused abandons the claim.
                                    if let Some(lease) = lease.filter(|_| body.len() <= max_record)
                                    {
                                        lease
                                            .complete(&StoredReply::Complete(body.clone()), ttl)
                                            .await;
                                    }
                                    Ok((headers, body, false))
                                }
                                Ok(_) => Err(ApiError::BadGateway("unexpected stream".into())),
                                Err(e) => Err(e),
                            }
                        }
                    };
                    drop(claim);
                    (result, trace)
                }
                .boxed()
            })
            .map_err(|e| obs.fail(e))?;
        let (result, trace) = flight.await;
        if let (true, Ok((_, body, false))) = (leader, &result) {
            if env_api == ApiKind::Responses {
                self.remember_body(&env_owner, &trace, body);
            }
        }
        if leader {
            obs.trace(&trace);
        } else {
            obs.replay = Some("coalesced");
            self.metrics.idempotent_replays.inc();
        }
        match result {
            Ok((headers, body, stored)) => {
                if leader && stored {
                    obs.replay = Some("stored");
                    self.metrics.idempotent_replays.inc();
                }
                Ok(Answer {
                    reply: obs.watch(Reply {
                        headers,
                        body: ReplyBody::Complete(body),
                    }),
                    replayed: !leader || stored,
                })
            }
            Err(e) => Err(obs.fail(e)),
        }
    }

    pub(super) async fn keyed_stream(
        &self,
        mut obs: Observer,
        key: String,
        skey: StoreKey,
        fp: Fingerprint,
        env: Envelope,
    ) -> Result<Answer, ApiError> {
        // Held until the stream is stored or abandoned; a client that goes
        // away before the first event drops it with this future.
        let claim = self
            .flights
            .claim_stream(&key, fp)
            .map_err(|e| obs.fail(e))?;
        let lease = match self
            .claims
            .begin(&skey, fp, true, env.ctx.deadline)
            .await
            .map_err(|e| obs.fail(e))?
        {
            Begin::Replay(answer) => {
                obs.replay = Some("stored");
                return Ok(self.replay(obs, answer));
            }
            Begin::Lead(lease) => lease,
        };
        let mut trace = obs.new_trace();
        let result = self.forwarder.stream(&env, &mut trace).await;
        obs.trace(&trace);
        let reply = result.map_err(|e| obs.fail(e))?;
        let reply = self.remember_response(&env, &trace, reply);
        let ReplyBody::Stream(stream) = reply.body else {
            return Err(obs.fail(ApiError::BadGateway("unexpected completion".into())));
        };
        // Record the events; store them only if the stream completes within
        // the record bound. The claims are released either way.
        let max_record = self.cfg.idempotency.max_record_bytes;
        let ttl = self.cfg.idempotency.ttl;
        let recorded = stream_end::record(stream, max_record, move |events| {
            let Some(lease) = lease else { return };
            tokio::spawn(async move {
                lease.complete(&StoredReply::Stream(events), ttl).await;
                drop(claim);
            });
        });
        Ok(Answer {
            reply: obs.watch(Reply {
                headers: reply.headers,
                body: ReplyBody::Stream(recorded),
            }),
            replayed: false,
        })
    }

    pub(super) fn replay(&self, obs: Observer, stored: StoredReply) -> Answer {
        self.metrics.idempotent_replays.inc();
        let body = match stored {
            StoredReply::Complete(body) => ReplyBody::Complete(body),
            // The recording is whole events: one run, one write.
            StoredReply::Stream(events) => {
                ReplyBody::Stream(futures::stream::once(async move { Ok(events) }).boxed())
            }
        };
        Answer {
            reply: obs.watch(Reply {
                headers: HeaderMap::new(),
                body,
            }),
            replayed: true,
        }
    }
}

/// What an idempotency fingerprint covers besides the body: the model,
/// and for APIs other than chat completions the API too (two APIs'
/// bodies may be byte-identical). Chat keeps the fingerprint it had, so
/// records stored by an older replica still match.
fn fingerprint_scope(api: ApiKind, model: &str) -> std::borrow::Cow<'_, str> {
    match api {
        ApiKind::ChatCompletions => std::borrow::Cow::Borrowed(model),
        _ => std::borrow::Cow::Owned(format!("{}\u{1f}{model}", api.label())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_body_on_two_apis_is_two_requests_to_idempotency() {
        let body = br#"{"model":"m","input":"x"}"#;
        let e = fingerprint(&fingerprint_scope(ApiKind::Embeddings, "m"), body);
        let r = fingerprint(&fingerprint_scope(ApiKind::Responses, "m"), body);
        let c = fingerprint(&fingerprint_scope(ApiKind::ChatCompletions, "m"), body);
        assert_ne!(e, r);
        assert_eq!(c, fingerprint("m", body));
    }
}
