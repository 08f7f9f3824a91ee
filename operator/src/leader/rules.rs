//! The election's pure rules: when a lease may be taken, and when a leader
//! must stop acting. Time is this replica's monotonic clock throughout, never
//! a wall-clock time read from the lease, so a skewed clock (ours or the
//! holder's) cannot make a held lease look expired (client-go's rule).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::LeaseSpec;

/// What to do on a lock-state observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not leader yet: keep waiting.
    Wait,
    /// Just became leader: start the controller.
    Lead,
    /// Still leader: carry on.
    Continue,
    /// Was leader and no longer is: stop acting at once (exit).
    Exit,
}

/// The pure decision: from "was I leading" and "do I hold the lock now".
pub fn decide(leading: bool, holds_lock: bool) -> Step {
    match (leading, holds_lock) {
        (false, false) => Step::Wait,
        (false, true) => Step::Lead,
        (true, true) => Step::Continue,
        (true, false) => Step::Exit,
    }
}

/// The lease record as this replica last saw it change, and when (on its
/// own monotonic clock). A holder's lease runs for its duration from that
/// moment: the time the standby saw the renewal, not the `renewTime` the
/// holder wrote with its own clock.
#[derive(Debug, Clone)]
pub struct Observed {
    record: LeaseSpec,
    at: Instant,
}

impl Observed {
    /// Records a read of the lease at `at`: the observation time moves only
    /// when the record changed since the last read.
    pub fn update(last: Option<Observed>, record: &LeaseSpec, at: Instant) -> Observed {
        match last {
            Some(last) if last.record == *record => last,
            _ => Observed {
                record: record.clone(),
                at,
            },
        }
    }

    /// When this replica last saw another replica's hold on the lease
    /// change (a renewal, or its release): the last sign of life of the
    /// leader it takes over from. `None` when the record was its own.
    pub fn predecessor_seen(&self, identity: &str) -> Option<Instant> {
        let holder = self.record.holder_identity.as_deref().unwrap_or_default();
        (holder != identity).then_some(self.at)
    }

    /// Whether the lease is free for `identity` at `now`: unheld, held by
    /// it, or unchanged for longer than its duration since this replica
    /// first saw the current record.
    pub fn available(&self, identity: &str, now: Instant) -> bool {
        let holder = self.record.holder_identity.as_deref().unwrap_or_default();
        if holder.is_empty() || holder == identity {
            return true;
        }
        let Some(secs) = self.record.lease_duration_seconds else {
            return true;
        };
        let duration = Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        now.saturating_duration_since(self.at) > duration
    }
}

/// How long a leader may still act, given when its last successful renewal
/// was **sent** (not answered): a renewal that took seconds in flight must
/// not extend the leader's time, since the lease the standby sees counts
/// from its arrival at the latest. `None`: the deadline has passed.
pub fn time_left(renew_sent: Instant, renew_deadline: Duration, now: Instant) -> Option<Duration> {
    renew_deadline
        .checked_sub(now.saturating_duration_since(renew_sent))
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    #[test]
    fn waits_leads_continues_and_exits_on_loss() {
        assert_eq!(decide(false, false), Step::Wait);
        assert_eq!(decide(false, true), Step::Lead);
        assert_eq!(decide(true, true), Step::Continue);
        assert_eq!(decide(true, false), Step::Exit);
    }

    fn held(holder: Option<&str>, renewed: jiff::Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_is_available_when_unheld_own_or_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let wall = jiff::Timestamp::now();
        let seen = |spec: &LeaseSpec| Observed::update(None, spec, t0);
        assert!(seen(&held(None, wall)).available("a", t0));
        assert!(seen(&held(Some(""), wall)).available("a", t0));
        assert!(seen(&held(Some("a"), wall)).available("a", t0));
        let b = seen(&held(Some("b"), wall));
        assert!(!b.available("a", t0 + Duration::from_secs(5)));
        assert!(!b.available("a", t0 + Duration::from_secs(15)));
        assert!(b.available("a", t0 + Duration::from_secs(16)));
    }

    #[test]
    fn expiry_counts_from_when_the_record_was_seen_to_change_not_its_renew_time() {
        let t0 = Instant::now();
        // The holder's clock is an hour slow (or ours an hour fast): its
        // renewTime reads as long expired, yet it renews all the time.
        let wall = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
        let first = Observed::update(None, &held(Some("b"), wall), t0);
        assert!(!first.available("a", t0 + Duration::from_secs(1)));
        // A renewal seen 10 s later restarts the count from then.
        let renewed = held(Some("b"), wall + jiff::SignedDuration::from_secs(10));
        let later = Observed::update(Some(first), &renewed, t0 + Duration::from_secs(10));
        assert!(!later.available("a", t0 + Duration::from_secs(24)));
        // The same record read again does not: it expires 15 s after it
        // was first seen.
        let again = Observed::update(Some(later), &renewed, t0 + Duration::from_secs(20));
        assert!(!again.available("a", t0 + Duration::from_secs(25)));
        assert!(again.available("a", t0 + Duration::from_secs(26)));
    }

    #[test]
    fn the_renew_deadline_counts_from_when_the_renewal_was_sent() {
        let sent = Instant::now();
        let deadline = Duration::from_secs(10);
        assert_eq!(time_left(sent, deadline, sent), Some(deadline));
        // Answered after 8 s: 2 s left, not 10.
        assert_eq!(
            time_left(sent, deadline, sent + Duration::from_secs(8)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(time_left(sent, deadline, sent + deadline), None);
        assert_eq!(
            time_left(sent, deadline, sent + Duration::from_secs(11)),
            None
        );
    }
}
