//! Backoff between attempts: exponential with full jitter, pure.

use std::time::Duration;

/// The wait before retry number `retry` (1 for the first retry): uniform in
/// [0, min(cap, base·2^(retry-1))]. `unit` is a uniform sample from [0, 1).
pub fn full_jitter(retry: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exp = 2u32.saturating_pow(retry.saturating_sub(1).min(31));
    let ceiling = base.saturating_mul(exp).min(cap);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

/// The wait before the next attempt: the jittered backoff, but never less
/// than what the upstream asked for with `Retry-After` when the next attempt
/// goes back to that same endpoint.
pub fn next_delay(
    jitter: Duration,
    retry_after: Option<Duration>,
    same_endpoint: bool,
) -> Duration {
    match retry_after {
        Some(ra) if same_endpoint => jitter.max(ra),
        _ => jitter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let (base, cap) = (100 * MS, 1000 * MS);
        let top = |n| full_jitter(n, base, cap, 1.0);
        assert_eq!(top(1), 100 * MS);
        assert_eq!(top(2), 200 * MS);
        assert_eq!(top(3), 400 * MS);
        assert_eq!(top(5), 1000 * MS);
        assert_eq!(top(400), 1000 * MS, "no overflow on huge attempt numbers");
    }

    #[test]
    fn jitter_spans_zero_to_the_ceiling() {
        assert_eq!(full_jitter(3, 100 * MS, Duration::MAX, 0.0), Duration::ZERO);
        assert_eq!(full_jitter(3, 100 * MS, Duration::MAX, 0.5), 200 * MS);
    }

    #[test]
    fn retry_after_is_a_floor_only_for_the_same_endpoint() {
        let ra = Some(Duration::from_secs(2));
        assert_eq!(next_delay(10 * MS, ra, true), Duration::from_secs(2));
        assert_eq!(next_delay(10 * MS, ra, false), 10 * MS);
        assert_eq!(next_delay(10 * MS, None, true), 10 * MS);
    }
}
