//! A per-endpoint circuit breaker as a pure state machine: callers pass the
//! time in, so tests need no clock.
//!
//! Closed: every request goes through; `threshold` consecutive failures
//! open it. Open: nothing goes through until `open_for` has passed. Then
//! half-open: exactly one request, the probe, goes through; its lease holds
//! the probe token and reports the verdict (success closes, failure reopens,
//! no verdict hands the token back for the next request). Results of
//! requests admitted before the circuit opened do not decide anything while
//! it is open or half-open: only the probe does.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_out: bool },
}

/// How a request was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The circuit is closed.
    Normal,
    /// The one half-open probe: its outcome decides the circuit.
    Probe,
}

/// What an attempt says about the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure,
    /// No verdict: cancelled, cut short by the request's own deadline, or
    /// refused for the request's sake (4xx, 429).
    Neutral,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    threshold: u32,
    open_for: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            state: State::Closed { failures: 0 },
            threshold: threshold.max(1),
            open_for,
        }
    }

    /// Whether a request could be let through now, without taking the slot.
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            State::HalfOpen { probe_out } => !probe_out,
        }
    }

    /// Closed: trusted with normal traffic.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// Lets one request through if the state allows; in half-open state
    /// only one at a time, the probe.
    pub fn admit(&mut self, now: Instant) -> Option<Admission> {
        match self.state {
            State::Closed { .. } => Some(Admission::Normal),
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { probe_out: true };
                Some(Admission::Probe)
            }
            State::HalfOpen { probe_out: false } => {
                self.state = State::HalfOpen { probe_out: true };
                Some(Admission::Probe)
            }
            State::Open { .. } | State::HalfOpen { probe_out: true } => None,
        }
    }

    /// Records how a request admitted as `admission` ended.
    pub fn record(&mut self, admission: Admission, verdict: Verdict, now: Instant) {
        self.state = match (self.state, admission, verdict) {
            (State::HalfOpen { .. }, Admission::Probe, Verdict::Success) => {
                State::Closed { failures: 0 }
            }
            (State::HalfOpen { .. }, Admission::Probe, Verdict::Failure) => self.open(now),
            (State::HalfOpen { .. }, Admission::Probe, Verdict::Neutral) => {
                State::HalfOpen { probe_out: false }
            }
            (State::Closed { .. }, _, Verdict::Success) => State::Closed { failures: 0 },
            (State::Closed { failures }, _, Verdict::Failure) => {
                if failures.saturating_add(1) >= self.threshold {
                    self.open(now)
                } else {
                    State::Closed {
                        failures: failures + 1,
                    }
                }
            }
            // Neutral outcomes, and late results of requests admitted before
            // the circuit opened, change nothing.
            (state, _, _) => state,
        };
    }

    fn open(&self, now: Instant) -> State {
        // Validation bounds `open_for`; saturate anyway rather than panic.
        let until = now
            .checked_add(self.open_for)
            .unwrap_or(now + Duration::from_secs(3600));
        State::Open { until }
    }

    /// Open or half-open: the endpoint is not trusted with normal traffic.
    pub fn is_open(&self) -> bool {
        !self.is_closed()
    }

    /// When an open circuit will let a probe through.
    pub fn reopens_in(&self, now: Instant) -> Option<Duration> {
        match self.state {
            State::Open { until } => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Duration = Duration::from_secs(10);
    use Admission::{Normal, Probe};
    use Verdict::{Failure, Neutral, Success};

    fn opened(t: Instant) -> Breaker {
        let mut b = Breaker::new(1, OPEN);
        b.record(Normal, Failure, t);
        assert!(b.is_open());
        b
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let t = Instant::now();
        let mut b = Breaker::new(3, OPEN);
        b.record(Normal, Failure, t);
        b.record(Normal, Failure, t);
        assert_eq!(b.admit(t), Some(Normal), "still closed after 2 of 3");
        b.record(Normal, Failure, t);
        assert!(b.is_open());
        assert_eq!(b.admit(t + Duration::from_secs(9)), None);
        assert_eq!(
            b.reopens_in(t + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
    }

    #[test]
    fn success_resets_the_failure_count_and_neutral_does_not_count() {
        let t = Instant::now();
        let mut b = Breaker::new(2, OPEN);
        b.record(Normal, Failure, t);
        b.record(Normal, Success, t);
        b.record(Normal, Failure, t);
        assert!(b.is_closed());
        b.record(Normal, Neutral, t);
        assert!(b.is_closed(), "a neutral outcome is no failure");
    }

    #[test]
    fn half_open_admits_exactly_one_probe() {
        let t = Instant::now();
        let mut b = opened(t);
        let later = t + OPEN;
        assert!(b.available(later));
        assert_eq!(b.admit(later), Some(Probe));
        for k in 0..100 {
            // however long the probe takes, nobody else gets through
            assert_eq!(b.admit(later + OPEN * k), None);
            assert!(!b.available(later + OPEN * k));
        }
        b.record(Probe, Success, later);
        assert!(b.is_closed());
        assert_eq!(b.admit(later), Some(Normal));
    }

    #[test]
    fn failed_probe_reopens() {
        let t = Instant::now();
        let mut b = opened(t);
        let later = t + OPEN;
        assert_eq!(b.admit(later), Some(Probe));
        b.record(Probe, Failure, later);
        assert_eq!(b.admit(later + Duration::from_secs(1)), None);
        assert_eq!(b.admit(later + OPEN), Some(Probe));
    }

    #[test]
    fn a_probe_without_verdict_hands_the_token_back() {
        let t = Instant::now();
        let mut b = opened(t);
        assert_eq!(b.admit(t + OPEN), Some(Probe));
        b.record(Probe, Neutral, t + OPEN);
        assert!(b.is_open(), "still not trusted");
        assert_eq!(b.admit(t + OPEN), Some(Probe), "the next request probes");
        assert_eq!(b.admit(t + OPEN), None);
    }

    #[test]
    fn late_results_of_normal_requests_do_not_decide_a_half_open_circuit() {
        let t = Instant::now();
        let mut b = opened(t);
        assert_eq!(b.admit(t + OPEN), Some(Probe));
        // a request admitted before the circuit opened ends now
        b.record(Normal, Success, t + OPEN);
        assert!(b.is_open());
        assert_eq!(b.admit(t + OPEN), None, "the probe is still out");
        b.record(Normal, Failure, t + OPEN);
        assert!(!b.available(t + OPEN * 5), "still waiting for the probe");
        b.record(Probe, Success, t + OPEN);
        assert!(b.is_closed());
    }

    #[test]
    fn a_huge_open_duration_does_not_panic() {
        let t = Instant::now();
        let mut b = Breaker::new(1, Duration::MAX);
        b.record(Normal, Failure, t);
        assert!(b.is_open());
        assert_eq!(b.admit(t), None);
    }
}
