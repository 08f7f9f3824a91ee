//! Job records in the shared store (memory, or Redis shared by every
//! replica; sealed with AES-256-GCM when a key ring is configured), so any
//! replica answers `GET` for a job another one accepted or ran, and a
//! redelivered job that already finished is not run again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::model::{Callback, DeliveryState, Job, JobResponse, JobState};
use super::wire;
use crate::store::{Claimed, HeldClaim, Space, Store, StoreError, StoreKey};

/// A queued job leaves `queued` once, by one of two moves that may race
/// on different replicas: a worker starting it, or its client cancelling
/// it. The first to take the job's turn in the store wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    Start,
    Cancel,
}

impl Move {
    fn marker(self) -> &'static [u8] {
        match self {
            Self::Start => b"started",
            Self::Cancel => b"cancelled",
        }
    }
}

/// Who holds a job's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// This move took it.
    Taken,
    /// The other move took it first.
    Lost(Move),
    /// The store could not say (down, or the turn is sealed under a key
    /// not loaded here): the caller waits and asks again, or refuses.
    Unknown,
}

fn turn_key(id: &str) -> StoreKey {
    StoreKey::new(Space::Job, "turn", id.as_bytes())
}

fn result_key(id: &str) -> StoreKey {
    StoreKey::new(Space::Job, "result", id.as_bytes())
}

fn run_key(id: &str) -> StoreKey {
    StoreKey::new(Space::Job, "run", id.as_bytes())
}

pub struct Records {
    store: Arc<dyn Store>,
    ttl: Duration,
    /// How long a run's lease holds without renewal (`idempotency.lease`).
    run_lease: Duration,
}

/// What the queue message does not carry: the job's progress.
#[derive(Serialize, Deserialize)]
struct Progress {
    state: JobState,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    response: Option<(u16, String)>,
    callback: Option<(DeliveryState, u32, Option<String>)>,
}

#[derive(Serialize, Deserialize)]
struct StoredJob {
    /// The job as accepted (the queue message's encoding).
    job: Box<serde_json::value::RawValue>,
    progress: Progress,
}

fn key(id: &str) -> StoreKey {
    StoreKey::new(Space::Job, "job", id.as_bytes())
}

pub fn encode(job: &Job) -> Option<Bytes> {
    let accepted = String::from_utf8(wire::encode(job)).ok()?;
    let stored = StoredJob {
        job: serde_json::value::RawValue::from_string(accepted).ok()?,
        progress: Progress {
            state: job.state,
            started_at: job.started_at,
            finished_at: job.finished_at,
            response: job
                .response
                .as_ref()
                .map(|r| (r.status_code, String::from_utf8_lossy(&r.body).into_owned())),
            callback: job
                .callback
                .as_ref()
                .map(|c| (c.state, c.attempts, c.last_error.clone())),
        },
    };
    serde_json::to_vec(&stored).ok().map(Bytes::from)
}

pub fn decode(bytes: &[u8]) -> Option<Job> {
    let stored: StoredJob = serde_json::from_slice(bytes).ok()?;
    let mut job = wire::decode(stored.job.get().as_bytes()).ok()?;
    let p = stored.progress;
    job.state = p.state;
    job.started_at = p.started_at;
    job.finished_at = p.finished_at;
    job.response = p.response.map(|(status_code, body)| JobResponse {
        status_code,
        body: Bytes::from(body),
    });
    if let (Some(cb), Some((state, attempts, last_error))) = (job.callback.as_mut(), p.callback) {
        *cb = Callback {
            url: std::mem::take(&mut cb.url),
            state,
            attempts,
            last_error,
        };
    }
    Some(job)
}

impl Records {
    pub fn new(store: Arc<dyn Store>, ttl: Duration, run_lease: Duration) -> Self {
        Self {
            store,
            ttl,
            run_lease,
        }
    }

    /// Takes the job's run lease, renewed in the background until the
    /// returned claim is dropped, so any replica can tell a run in
    /// progress from one whose worker died ([`Self::run_is_live`]).
    /// `None` when another run holds it (a redelivery while the first
    /// runs: that one shows the job is live) or the store failed.
    pub async fn hold_run(&self, id: &str) -> Option<HeldClaim> {
        match self
            .store
            .claim(&run_key(id), [0; 32], self.run_lease)
            .await
        {
            Ok(Claimed::Won(guard)) => Some(HeldClaim::hold(guard, self.run_lease, "job run")),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "could not take a job's run lease");
                None
            }
        }
    }

    /// The job's result, written once: the first run to finish stores
    /// `mine` and gets it back; a later run (a redelivery that ran while
    /// the first did, its claim lapsed) gets the first one's instead, so a
    /// job never shows two answers. Atomic on the store (a claim completed
    /// at once), not a read then a write.
    pub async fn first_result(
        &self,
        id: &str,
        mine: &JobResponse,
    ) -> Result<JobResponse, StoreError> {
        let key = result_key(id);
        // Busy is the instant between a claim and its completion.
        for _ in 0..50 {
            match self
                .store
                .claim(&key, [0; 32], Duration::from_secs(5))
                .await?
            {
                Claimed::Won(guard) => {
                    let value = serde_json::to_vec(&(
                        mine.status_code,
                        String::from_utf8_lossy(&mine.body),
                    ))
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    guard.complete(value.into(), self.ttl).await?;
                    return Ok(mine.clone());
                }
                Claimed::Done(r) => {
                    let (status_code, body): (u16, String) = serde_json::from_slice(&r.value)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    return Ok(JobResponse {
                        status_code,
                        body: Bytes::from(body),
                    });
                }
                Claimed::Busy { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        Err(StoreError::Unavailable(
            "a job's result stayed claimed and never completed".into(),
        ))
    }

    /// Whether a worker is running the job now (its run lease is held).
    pub async fn run_is_live(&self, id: &str) -> Result<bool, StoreError> {
        self.store.claimed(&run_key(id)).await
    }

    /// Stores the job's record (the truth every replica reads).
    pub async fn save(&self, job: &Job) -> Result<(), StoreError> {
        let value = encode(job).ok_or_else(|| StoreError::Corrupt("unencodable job".into()))?;
        self.store
            .put(&key(&job.id), [0; 32], value, self.ttl)
            .await
    }

    /// Takes the job's turn for `what`, or says which move holds it. A
    /// start after a start (a redelivery) also counts as taken: the job
    /// id's idempotency claim makes the re-run replay or join.
    pub async fn take_turn(&self, id: &str, what: Move) -> Turn {
        let key = turn_key(id);
        // A claim is completed at once; Busy is that instant, so retry briefly.
        for _ in 0..50 {
            match self
                .store
                .claim(&key, [0; 32], Duration::from_secs(5))
                .await
            {
                Ok(Claimed::Won(guard)) => {
                    let marker = Bytes::from_static(what.marker());
                    return match guard.complete(marker, self.ttl).await {
                        Ok(()) => Turn::Taken,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not store a job's turn");
                            Turn::Unknown
                        }
                    };
                }
                Ok(Claimed::Done(r)) => {
                    let held = if &r.value[..] == Move::Cancel.marker() {
                        Move::Cancel
                    } else {
                        Move::Start
                    };
                    return match (held, what) {
                        (Move::Start, Move::Start) => Turn::Taken,
                        (held, _) => Turn::Lost(held),
                    };
                }
                Ok(Claimed::Busy { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => {
                    tracing::warn!(error = %e, "job turn unavailable");
                    return Turn::Unknown;
                }
            }
        }
        Turn::Unknown
    }

    /// The stored job; `Ok(None)` when there is none (or it cannot be
    /// decoded), an error when the store cannot say.
    pub async fn load(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self
            .store
            .get(&key(id))
            .await?
            .and_then(|record| decode(&record.value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;
    use crate::jobs::model::JobKind;

    #[tokio::test]
    async fn the_first_move_out_of_queued_wins_the_turn() {
        let r = Records::new(
            crate::store::memory(1 << 20),
            Duration::from_secs(60),
            Duration::from_secs(30),
        );
        assert_eq!(r.take_turn("a", Move::Start).await, Turn::Taken);
        assert_eq!(
            r.take_turn("a", Move::Cancel).await,
            Turn::Lost(Move::Start)
        );
        assert_eq!(
            r.take_turn("a", Move::Start).await,
            Turn::Taken,
            "a redelivery runs"
        );
        assert_eq!(r.take_turn("b", Move::Cancel).await, Turn::Taken);
        assert_eq!(
            r.take_turn("b", Move::Start).await,
            Turn::Lost(Move::Cancel)
        );
        assert_eq!(
            r.take_turn("b", Move::Cancel).await,
            Turn::Lost(Move::Cancel)
        );
    }

    #[tokio::test]
    async fn the_first_run_to_finish_decides_the_result() {
        let r = Records::new(
            crate::store::memory(1 << 20),
            Duration::from_secs(60),
            Duration::from_secs(30),
        );
        let answer = |status_code, body: &'static str| JobResponse {
            status_code,
            body: Bytes::from_static(body.as_bytes()),
        };
        let first = answer(200, r#"{"id":"first"}"#);
        assert_eq!(r.first_result("j", &first).await.unwrap(), first);
        // A second run, with another answer or an error, gets the first.
        for later in [answer(200, r#"{"id":"second"}"#), answer(502, "{}")] {
            assert_eq!(r.first_result("j", &later).await.unwrap(), first);
        }
        // Other jobs are their own.
        let other = answer(200, r#"{"id":"other"}"#);
        assert_eq!(r.first_result("k", &other).await.unwrap(), other);
    }

    /// During a key rotation, a replica that has not loaded the new key
    /// neither replaces a result sealed under it nor mistakes its run lease
    /// for a dead worker's.
    #[tokio::test]
    async fn a_result_under_a_key_not_loaded_here_is_unavailable_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (new, old) = crate::store::two_replicas_mid_rotation(dir.path());
        let (ttl, lease) = (Duration::from_secs(60), Duration::from_secs(30));
        let (a, b) = (Records::new(new, ttl, lease), Records::new(old, ttl, lease));
        let answer = |body: &'static str| JobResponse {
            status_code: 200,
            body: Bytes::from_static(body.as_bytes()),
        };
        let first = answer(r#"{"id":"first"}"#);
        assert_eq!(a.first_result("j", &first).await.unwrap(), first);
        let mine = answer(r#"{"id":"second"}"#);
        for _ in 0..2 {
            assert!(
                matches!(
                    b.first_result("j", &mine).await,
                    Err(StoreError::UnknownKey(id)) if id == "k2"
                ),
                "unavailable here, not replaced"
            );
        }
        assert_eq!(a.first_result("j", &mine).await.unwrap(), first);
        // A run held under k2 is live to the replica without it.
        let _run = a.hold_run("r").await.expect("run lease");
        assert!(b.run_is_live("r").await.unwrap());
        assert!(!b.run_is_live("nobody-runs-this").await.unwrap());
    }

    #[test]
    fn a_finished_job_with_its_callback_survives_the_round_trip() {
        let mut job = wire::decode(br#"{"v":1,"id":"job_9","owner":"alice","model":"m","body":"{}","headers":[],"callback_url":"https://h/x","created_at":1,"expires_at_ms":99000}"#).unwrap();
        job.start(2000).unwrap();
        job.finish(
            JobResponse {
                status_code: 200,
                body: Bytes::from_static(b"{\"ok\":true}"),
            },
            3000,
        )
        .unwrap();
        job.callback.as_mut().unwrap().attempts = 2;
        let back = decode(&encode(&job).unwrap()).unwrap();
        assert_eq!(back.owner, Identity("alice".into()));
        assert_eq!(back.kind, JobKind::Chat);
        assert_eq!(back.state, JobState::Succeeded);
        assert_eq!(back.response, job.response);
        assert_eq!(back.callback, job.callback);
        assert_eq!(back.finished_at, Some(3));
    }
}
