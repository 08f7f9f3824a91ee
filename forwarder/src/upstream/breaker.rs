//! A per-endpoint circuit breaker as a pure state machine: callers pass the
//! time in, so tests need no clock.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe may run; `probe_started` is when it was let through.
    HalfOpen {
        probe_started: Option<Instant>,
    },
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
            State::HalfOpen { probe_started } => self.probe_lost(probe_started, now),
        }
    }

    /// Takes the slot for one request; in half-open state, only one probe.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen {
                    probe_started: Some(now),
                };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { probe_started } if self.probe_lost(probe_started, now) => {
                self.state = State::HalfOpen {
                    probe_started: Some(now),
                };
                true
            }
            State::HalfOpen { .. } => false,
        }
    }

    /// A probe whose outcome never came back (its caller was cancelled)
    /// must not wedge the breaker half-open forever.
    fn probe_lost(&self, probe_started: Option<Instant>, now: Instant) -> bool {
        probe_started.is_none_or(|t| now.duration_since(t) >= self.open_for)
    }

    pub fn on_success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.state = match self.state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: now + self.open_for,
            },
        };
    }

    /// A request that ended without a verdict (cancelled, or a 4xx).
    pub fn on_neutral(&mut self) {
        if let State::HalfOpen { .. } = self.state {
            self.state = State::HalfOpen {
                probe_started: None,
            };
        }
    }

    /// Open or half-open: the endpoint is not trusted with normal traffic.
    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
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

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let t = Instant::now();
        let mut b = Breaker::new(3, OPEN);
        b.on_failure(t);
        b.on_failure(t);
        assert!(b.try_acquire(t), "still closed after 2 of 3");
        b.on_failure(t);
        assert!(b.is_open());
        assert!(!b.try_acquire(t + Duration::from_secs(9)));
        assert_eq!(
            b.reopens_in(t + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
    }

    #[test]
    fn success_resets_the_failure_count() {
        let t = Instant::now();
        let mut b = Breaker::new(2, OPEN);
        b.on_failure(t);
        b.on_success();
        b.on_failure(t);
        assert!(!b.is_open());
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.on_failure(t);
        let later = t + OPEN;
        assert!(b.available(later));
        assert!(b.try_acquire(later), "the probe");
        assert!(!b.try_acquire(later), "a second request while probing");
        assert!(!b.available(later));
        b.on_success();
        assert!(!b.is_open());
        assert!(b.try_acquire(later));
    }

    #[test]
    fn failed_probe_reopens() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.on_failure(t);
        let later = t + OPEN;
        assert!(b.try_acquire(later));
        b.on_failure(later);
        assert!(!b.try_acquire(later + Duration::from_secs(1)));
        assert!(b.try_acquire(later + OPEN));
    }

    #[test]
    fn a_lost_probe_does_not_wedge_the_breaker() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.on_failure(t);
        assert!(b.try_acquire(t + OPEN));
        // the probe's caller vanished: after another open period, probe again
        assert!(!b.try_acquire(t + OPEN + Duration::from_secs(1)));
        assert!(b.try_acquire(t + OPEN * 2));
        b.on_neutral();
        assert!(b.try_acquire(t + OPEN * 2));
    }
}
