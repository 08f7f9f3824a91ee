//! Backoff between attempts: exponential with full jitter, and the
//! upstream's `Retry-After`; pure functions. No duration here can overflow:
//! products saturate, and upstream-supplied waits are capped.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// The longest wait an upstream's `Retry-After` is taken at (larger values
/// are read as this). The retry loop caps it further at `retry.max_delay`
/// and the request's deadline; this bound keeps it from any clock overflow
/// and bounds what is passed on to clients.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How long an upstream asks to wait before the next request, from
/// `retry-after-ms` (milliseconds, OpenAI's precise form, preferred) or
/// `retry-after` (delay-seconds, or an HTTP-date), capped at
/// [`MAX_RETRY_AFTER`]. `None` when absent or unreadable; a date in the past
/// is zero.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    parse_retry_after_at(headers, SystemTime::now())
}

/// [`parse_retry_after`] with the current time given.
pub fn parse_retry_after_at(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let from_ms = header("retry-after-ms")
        .and_then(|v| non_negative(v).map(|ms| ms / 1000.0))
        .and_then(secs);
    from_ms
        .or_else(|| {
            let v = header("retry-after")?;
            match non_negative(v) {
                Some(s) => secs(s),
                None => {
                    let at = httpdate::parse_http_date(v).ok()?;
                    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
                }
            }
        })
        .map(|d| d.min(MAX_RETRY_AFTER))
}

/// A finite, non-negative number (integers and decimals, as sent in the wild).
fn non_negative(v: &str) -> Option<f64> {
    v.parse::<f64>().ok().filter(|n| n.is_finite() && *n >= 0.0)
}

fn secs(s: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(s.min(MAX_RETRY_AFTER.as_secs_f64())).ok()
}

/// The wait before retry number `retry` (1 for the first retry): uniform in
/// [0, min(cap, base·2^(retry-1))]. `unit` is a uniform sample from [0, 1).
pub fn full_jitter(retry: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exp = 2u32.saturating_pow(retry.saturating_sub(1).min(31));
    let ceiling = base.saturating_mul(exp).min(cap);
    // `mul_f64` panics when rounding pushes a huge ceiling past the range.
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    Duration::try_from_secs_f64(ceiling.as_secs_f64() * unit)
        .unwrap_or(ceiling)
        .min(ceiling)
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

/// The wait before the next attempt, as [`next_delay`], with the upstream's
/// `Retry-After` capped at `max_delay` (so one upstream cannot park a request
/// longer than configured).
pub fn next_delay_capped(
    jitter: Duration,
    retry_after: Option<Duration>,
    same_endpoint: bool,
    max_delay: Duration,
) -> Duration {
    next_delay(
        jitter,
        retry_after.map(|ra| ra.min(max_delay)),
        same_endpoint,
    )
}

/// How long one attempt may run: the endpoint's own timeout, or less when
/// the request's deadline comes first. When `by_deadline`, a timeout says
/// nothing about the endpoint: settle the lease with `Lease::neutral()`,
/// not as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptBudget {
    pub limit: Duration,
    pub by_deadline: bool,
}

pub fn attempt_budget(endpoint_timeout: Duration, remaining: Duration) -> AttemptBudget {
    AttemptBudget {
        limit: endpoint_timeout.min(remaining),
        by_deadline: remaining < endpoint_timeout,
    }
}

/// Whether waiting `delay` from `now` still ends before `deadline`; a
/// delay that would overflow the clock does not.
pub fn fits_before<I>(now: I, delay: Duration, deadline: I) -> bool
where
    I: Copy + PartialOrd + CheckedAdd,
{
    now.checked_add_duration(delay)
        .is_some_and(|end| end < deadline)
}

/// `checked_add` for both clocks the forwarder uses.
pub trait CheckedAdd: Sized {
    fn checked_add_duration(self, d: Duration) -> Option<Self>;
}

impl CheckedAdd for std::time::Instant {
    fn checked_add_duration(self, d: Duration) -> Option<Self> {
        self.checked_add(d)
    }
}

impl CheckedAdd for tokio::time::Instant {
    fn checked_add_duration(self, d: Duration) -> Option<Self> {
        self.checked_add(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_seconds_ms_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let at = |pairs: &[(&'static str, &str)]| parse_retry_after_at(&headers(pairs), now);
        assert_eq!(at(&[]), None);
        assert_eq!(at(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(at(&[("retry-after", " 1.5 ")]), Some(1500 * MS));
        assert_eq!(at(&[("retry-after-ms", "250")]), Some(250 * MS));
        assert_eq!(
            at(&[("retry-after-ms", "250"), ("retry-after", "9")]),
            Some(250 * MS),
            "the precise form wins"
        );
        assert_eq!(
            at(&[("retry-after", "Sun, 06 Nov 1994 08:49:47 GMT")]),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            at(&[("retry-after", "Sun, 06 Nov 1994 08:00:00 GMT")]),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(at(&[("retry-after", "soon")]), None);
        assert_eq!(at(&[("retry-after", "-3")]), None);
        assert_eq!(
            at(&[("retry-after-ms", "NaN"), ("retry-after", "2")]),
            Some(2000 * MS)
        );
    }

    #[test]
    fn retry_after_is_capped_and_never_overflows() {
        let now = SystemTime::UNIX_EPOCH;
        for v in [
            "18446744073709551615",
            "1e300",
            "99999999999999999999999999",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            let d = parse_retry_after_at(&headers(&[("retry-after", v)]), now);
            assert_eq!(d, Some(MAX_RETRY_AFTER), "{v}");
            // adding it to a clock is safe
            assert!(std::time::Instant::now().checked_add(d.unwrap()).is_some());
        }
        let d = parse_retry_after_at(&headers(&[("retry-after-ms", "1e308")]), now);
        assert_eq!(d, Some(MAX_RETRY_AFTER));
        assert_eq!(
            next_delay_capped(MS, d, true, Duration::from_secs(4)),
            Duration::from_secs(4)
        );
        assert_eq!(
            full_jitter(u32::MAX, Duration::MAX, Duration::MAX, 1.0),
            Duration::MAX
        );
    }

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
    fn an_attempt_cut_by_the_request_deadline_is_marked_so() {
        let s = Duration::from_secs(1);
        assert_eq!(
            attempt_budget(10 * s, 30 * s),
            AttemptBudget {
                limit: 10 * s,
                by_deadline: false
            }
        );
        assert_eq!(
            attempt_budget(10 * s, 3 * s),
            AttemptBudget {
                limit: 3 * s,
                by_deadline: true
            }
        );
    }

    #[test]
    fn waits_that_would_overflow_the_clock_do_not_fit() {
        let now = tokio::time::Instant::now();
        let deadline = now + Duration::from_secs(5);
        assert!(fits_before(now, Duration::from_secs(1), deadline));
        assert!(!fits_before(now, Duration::from_secs(5), deadline));
        assert!(!fits_before(now, Duration::MAX, deadline));
        let std_now = std::time::Instant::now();
        assert!(!fits_before(std_now, Duration::MAX, std_now));
    }

    #[test]
    fn retry_after_is_a_floor_only_for_the_same_endpoint() {
        let ra = Some(Duration::from_secs(2));
        assert_eq!(next_delay(10 * MS, ra, true), Duration::from_secs(2));
        assert_eq!(next_delay(10 * MS, ra, false), 10 * MS);
        assert_eq!(next_delay(10 * MS, None, true), 10 * MS);
    }
}
