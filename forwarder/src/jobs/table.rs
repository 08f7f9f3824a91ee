//! The job records. In process (a replica's own jobs; they do not survive a
//! restart, like the embedded queue). Everything that touches a record goes
//! through here, so moving records to the shared store is local to this file.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;

use super::model::{Job, JobResponse, JobState, NotAllowed};
use crate::auth::Identity;

#[derive(Debug)]
pub enum Start {
    /// Run this job.
    Run(Box<Job>),
    /// It expired while queued (now marked so).
    Expired,
    /// Gone, cancelled or already run: nothing to do.
    Skip,
}

pub struct JobTable {
    max_jobs: usize,
    /// Ids by age, for eviction.
    inner: Mutex<(HashMap<String, Job>, VecDeque<String>)>,
}

impl JobTable {
    pub fn new(max_jobs: usize) -> Self {
        Self {
            max_jobs,
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Adds a job; when full, the oldest finished or expired jobs make room.
    /// Refused when every kept job is still pending.
    pub fn insert(&self, job: Job, now_ms: u64) -> Result<(), ()> {
        let mut guard = self.inner.lock();
        let (jobs, order) = &mut *guard;
        while jobs.len() >= self.max_jobs {
            let Some(oldest) = order.front() else { break };
            match jobs.get(oldest) {
                None => {
                    order.pop_front();
                }
                Some(j) if j.visible_state(now_ms).is_terminal() => {
                    let id = order.pop_front().unwrap_or_default();
                    jobs.remove(&id);
                }
                Some(_) => return Err(()),
            }
        }
        order.push_back(job.id.clone());
        jobs.insert(job.id.clone(), job);
        Ok(())
    }

    /// Takes in a job accepted elsewhere (another replica, or before a
    /// restart) unless it is known already. False when there is no room.
    pub fn adopt(&self, job: &Job, now_ms: u64) -> bool {
        if self.inner.lock().0.contains_key(&job.id) {
            return true;
        }
        self.insert(job.clone(), now_ms).is_ok()
    }

    /// A run that failed transiently goes back to `queued` for its next try.
    pub fn requeue(&self, id: &str) {
        if let Some(job) = self.inner.lock().0.get_mut(id) {
            let _ = job.requeue();
        }
    }

    /// The job, if `owner` owns it: another client's job reads as absent.
    pub fn get(&self, id: &str, owner: &Identity) -> Option<Job> {
        self.inner
            .lock()
            .0
            .get(id)
            .filter(|j| &j.owner == owner)
            .cloned()
    }

    pub fn start(&self, id: &str, now_ms: u64) -> Start {
        let mut guard = self.inner.lock();
        let Some(job) = guard.0.get_mut(id) else {
            return Start::Skip;
        };
        match job.start(now_ms) {
            Ok(true) => Start::Run(Box::new(job.clone())),
            Ok(false) => Start::Expired,
            Err(_) => Start::Skip,
        }
    }

    pub fn finish(&self, id: &str, response: JobResponse, now_ms: u64) -> Result<Job, NotAllowed> {
        let mut guard = self.inner.lock();
        let job = guard.0.get_mut(id).ok_or(NotAllowed(JobState::Expired))?;
        job.finish(response, now_ms)?;
        Ok(job.clone())
    }

    pub fn cancel(
        &self,
        id: &str,
        owner: &Identity,
        now_ms: u64,
    ) -> Option<Result<Job, NotAllowed>> {
        let mut guard = self.inner.lock();
        let job = guard.0.get_mut(id).filter(|j| &j.owner == owner)?;
        Some(job.cancel(now_ms).map(|()| job.clone()))
    }

    /// Applies `f` to a job's record (callback bookkeeping); the result.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Job)) -> Option<Job> {
        let mut guard = self.inner.lock();
        let job = guard.0.get_mut(id)?;
        f(job);
        Some(job.clone())
    }

    /// Drops records a full `ttl` past their expiry (they read `expired`
    /// until then).
    pub fn sweep(&self, now_ms: u64, ttl_ms: u64) -> usize {
        let mut guard = self.inner.lock();
        let (jobs, order) = &mut *guard;
        let before = jobs.len();
        jobs.retain(|_, j| now_ms < j.expires_at_ms.saturating_add(ttl_ms));
        order.retain(|id| jobs.contains_key(id));
        before - jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, owner: &str) -> Job {
        crate::jobs::model::test_job(id, owner, 1000)
    }

    #[test]
    fn another_owner_cannot_see_or_cancel_a_job() {
        let t = JobTable::new(10);
        t.insert(job("j", "alice"), 0).unwrap();
        assert!(t.get("j", &Identity("bob".into())).is_none());
        assert!(t.cancel("j", &Identity("bob".into()), 1).is_none());
        assert!(t.get("j", &Identity("alice".into())).is_some());
    }

    #[test]
    fn a_full_table_evicts_finished_jobs_but_never_pending_ones() {
        let t = JobTable::new(1);
        t.insert(job("a", "x"), 0).unwrap();
        assert_eq!(t.insert(job("b", "x"), 0), Err(()), "a is still queued");
        t.cancel("a", &Identity("x".into()), 1).unwrap().unwrap();
        t.insert(job("b", "x"), 2).unwrap();
        assert!(t.get("a", &Identity("x".into())).is_none());
    }

    #[test]
    fn sweep_drops_records_a_ttl_past_expiry() {
        let t = JobTable::new(10);
        t.insert(job("a", "x"), 0).unwrap();
        assert_eq!(t.sweep(1500, 1000), 0);
        assert_eq!(t.sweep(2000, 1000), 1);
    }
}
