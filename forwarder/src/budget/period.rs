//! Budget periods: the UTC day and the UTC month a moment falls in, named
//! for store keys (`day:2026-12-07`, `month:2026-12`), with when each ends.
//! Pure.

use std::time::Duration;

use time::{Date, Month, OffsetDateTime, Time};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Day,
    Month,
}

impl Span {
    pub const ALL: [Span; 2] = [Span::Day, Span::Month];

    pub fn label(self) -> &'static str {
        match self {
            Self::Day => "daily",
            Self::Month => "monthly",
        }
    }
}

/// One period: its name and when it ends (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub span: Span,
    pub name: String,
    pub ends: i64,
}

impl Period {
    /// The period of `span` holding `now` (Unix seconds, UTC).
    pub fn at(span: Span, now: i64) -> Period {
        let date = OffsetDateTime::from_unix_timestamp(now)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
            .date();
        let (name, end) = match span {
            Span::Day => (
                format!(
                    "day:{:04}-{:02}-{:02}",
                    date.year(),
                    date.month() as u8,
                    date.day()
                ),
                date.next_day().unwrap_or(date),
            ),
            Span::Month => {
                let (y, m) = match date.month() {
                    Month::December => (date.year() + 1, Month::January),
                    m => (date.year(), m.next()),
                };
                (
                    format!("month:{:04}-{:02}", date.year(), date.month() as u8),
                    Date::from_calendar_date(y, m, 1).unwrap_or(date),
                )
            }
        };
        Period {
            span,
            name,
            ends: end.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp(),
        }
    }

    /// How long from `now` until the period ends.
    pub fn left(&self, now: i64) -> Duration {
        Duration::from_secs(u64::try_from(self.ends - now).unwrap_or(0).max(1))
    }

    /// How long a counter for this period is kept: past its end by a day,
    /// so a replica whose clock lags still finds it.
    pub fn ttl(&self, now: i64) -> Duration {
        self.left(now) + Duration::from_secs(86_400)
    }

    /// The end as RFC 3339 (`2026-12-08T00:00:00Z`).
    pub fn ends_rfc3339(&self) -> String {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(self.ends).unwrap_or(0));
        humantime::format_rfc3339_seconds(t).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_months_are_named_and_end_at_utc_midnight() {
        // 2026-12-31T23:59:59Z
        let now = 1_798_761_599;
        let d = Period::at(Span::Day, now);
        assert_eq!(d.name, "day:2026-12-31");
        assert_eq!(d.ends, now + 1);
        assert_eq!(d.ends_rfc3339(), "2027-01-01T00:00:00Z");
        let m = Period::at(Span::Month, now);
        assert_eq!(m.name, "month:2026-12");
        assert_eq!(m.ends, now + 1);
        assert_eq!(m.left(now), Duration::from_secs(1));
        // 2028-02-29T12:00:00Z, a leap day.
        let leap = 1_835_438_400;
        assert_eq!(Period::at(Span::Day, leap).name, "day:2028-02-29");
        let m = Period::at(Span::Month, leap);
        assert_eq!(m.name, "month:2028-02");
        assert_eq!(m.ends_rfc3339(), "2028-03-01T00:00:00Z");
        assert_eq!(m.ttl(leap), Duration::from_secs(12 * 3600 + 86_400));
    }
}
