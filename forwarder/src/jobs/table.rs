//! This replica's copy of the jobs it has seen: a bounded cache of the
//! shared records (`records.rs`), which are the truth. It answers a job's
//! owner when the store cannot, and never refuses room: when full, the
//! oldest entries go, whatever their state, since their records remain.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;

use super::model::Job;
use crate::auth::Identity;

pub struct JobTable {
    max_jobs: usize,
    /// Ids by first insertion, for eviction.
    inner: Mutex<(HashMap<String, Job>, VecDeque<String>)>,
}

impl JobTable {
    pub fn new(max_jobs: usize) -> Self {
        Self {
            max_jobs: max_jobs.max(1),
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Keeps `job` as the latest copy, evicting the oldest entries when full.
    pub fn put(&self, job: &Job) {
        let mut guard = self.inner.lock();
        let (jobs, order) = &mut *guard;
        if let Some(kept) = jobs.get_mut(&job.id) {
            kept.clone_from(job);
            return;
        }
        while jobs.len() >= self.max_jobs {
            let Some(oldest) = order.pop_front() else {
                break;
            };
            jobs.remove(&oldest);
        }
        order.push_back(job.id.clone());
        jobs.insert(job.id.clone(), job.clone());
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

    /// The job whoever owns it (a worker's view).
    pub fn get_any(&self, id: &str) -> Option<Job> {
        self.inner.lock().0.get(id).cloned()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().0.len()
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
    use crate::jobs::model::JobState;

    fn job(id: &str, owner: &str) -> Job {
        crate::jobs::model::test_job(id, owner, 1000)
    }

    #[test]
    fn another_owner_cannot_see_a_job() {
        let t = JobTable::new(10);
        t.put(&job("j", "alice"));
        assert!(t.get("j", &Identity("bob".into())).is_none());
        assert!(t.get("j", &Identity("alice".into())).is_some());
    }

    /// Two replicas' worth of jobs that another replica ran stay `queued`
    /// here: a full table still takes new ones (it once answered 503).
    #[test]
    fn a_full_table_of_pending_jobs_still_takes_new_ones() {
        let t = JobTable::new(2);
        for id in ["a", "b", "c", "d"] {
            t.put(&job(id, "x"));
        }
        assert_eq!(t.len(), 2);
        let x = Identity("x".into());
        assert!(t.get("a", &x).is_none() && t.get("b", &x).is_none());
        assert!(t.get("d", &x).is_some());
        let mut done = job("c", "x");
        done.state = JobState::Succeeded;
        t.put(&done);
        assert_eq!(
            t.get("c", &x).unwrap().state,
            JobState::Succeeded,
            "refreshed"
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn sweep_drops_records_a_ttl_past_expiry() {
        let t = JobTable::new(10);
        t.put(&job("a", "x"));
        assert_eq!(t.sweep(1500, 1000), 0);
        assert_eq!(t.sweep(2000, 1000), 1);
    }
}
