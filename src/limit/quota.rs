//! Volume quotas as operators write them (`10GB/month`, `500MiB/day`, `none`) and the
//! calendar periods they are counted over.
//!
//! Periods are calendar periods in UTC: a day starts at 00:00 UTC, a week on Monday 00:00
//! UTC (ISO weeks), a month on its first day. Both directions count, as for the bandwidth.
//! Out of scope: counting bytes (meter.rs) and storing them (users/).

use super::calendar::Date;
use super::rate::{format_amount, parse_amount};
use std::fmt;
use std::str::FromStr;

/// The calendar period a quota is counted over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Period {
    /// 00:00 UTC to 00:00 UTC.
    Day,
    /// Monday 00:00 UTC to the next Monday.
    Week,
    /// The first of the month 00:00 UTC to the first of the next.
    Month,
}

impl Period {
    /// The name stored in the database and written after the `/`.
    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// Reads the stored name.
    pub fn from_name(s: &str) -> Option<Period> {
        match s {
            "day" | "d" => Some(Period::Day),
            "week" | "w" => Some(Period::Week),
            "month" | "mo" => Some(Period::Month),
            _ => None,
        }
    }

    /// The start of the period `now` (Unix seconds) falls in.
    pub fn start(self, now: i64) -> i64 {
        let today = Date::of(now);
        match self {
            Period::Day => today.start(),
            Period::Week => today.start() - today.weekday_from_monday() * 86_400,
            Period::Month => today.first_of_month().start(),
        }
    }

    /// The start of the next period: when a quota used up at `now` lets the user in again.
    pub fn next(self, now: i64) -> i64 {
        match self {
            Period::Day => self.start(now) + 86_400,
            Period::Week => self.start(now) + 7 * 86_400,
            Period::Month => Date::of(now).next_month().start(),
        }
    }
}

/// At most `bytes` moved (up plus down) per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    /// The allowance per period, in bytes.
    pub bytes: u64,
    /// The calendar period it is counted over.
    pub period: Period,
}

/// A quota's bytes left in its period, given what has been used in it; never below zero.
pub fn left(quota: Quota, used: u64) -> u64 {
    quota.bytes.saturating_sub(used)
}

/// `user add/set --quota`: a quota, or `none` to clear it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaybeQuota(pub Option<Quota>);

impl FromStr for Quota {
    type Err = String;

    fn from_str(s: &str) -> Result<Quota, String> {
        let (amount, period) = s.trim().rsplit_once('/').ok_or_else(|| {
            format!("bad quota {s:?}: write an amount and a period, like 10GB/month")
        })?;
        let period = Period::from_name(&period.trim().to_ascii_lowercase()).ok_or_else(|| {
            format!("bad quota period {period:?} in {s:?}: use /day, /week or /month")
        })?;
        let bytes = parse_amount(amount).map_err(|e| {
            format!("bad quota amount {amount:?} in {s:?} ({e}); units: K, M, G (10^3, 10^6, 10^9), KiB, MiB, GiB")
        })?;
        Ok(Quota { bytes, period })
    }
}

impl FromStr for MaybeQuota {
    type Err = String;

    fn from_str(s: &str) -> Result<MaybeQuota, String> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(MaybeQuota(None));
        }
        s.parse().map(|q| MaybeQuota(Some(q)))
    }
}

impl fmt::Display for Quota {
    /// The exact form that parses back (`10G/month`, `500MiB/day`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", format_amount(self.bytes), self.period.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(date: &str) -> i64 {
        date.parse::<Date>().unwrap().start()
    }

    #[test]
    fn quotas_parse_with_the_bandwidth_units_and_print_back() {
        let q: Quota = "10GB/month".parse().unwrap();
        assert_eq!(q.bytes, 10_000_000_000);
        assert_eq!(q.period, Period::Month);
        assert_eq!("1MiB/day".parse::<Quota>().unwrap().bytes, 1 << 20);
        assert_eq!("1.5M/week".parse::<Quota>().unwrap().bytes, 1_500_000);
        for s in ["10G/month", "1MiB/day", "1500K/week", "7/day"] {
            assert_eq!(s.parse::<Quota>().unwrap().to_string(), s);
        }
        assert_eq!("none".parse::<MaybeQuota>().unwrap(), MaybeQuota(None));
        for bad in ["10GB", "10GB/year", "0/day", "x/day", "/month", "10XB/day"] {
            assert!(bad.parse::<Quota>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn periods_are_calendar_periods_in_utc() {
        let now = at("2026-12-17") + 13 * 3600;
        assert_eq!(Period::Day.start(now), at("2026-12-17"));
        assert_eq!(Period::Day.next(now), at("2026-12-18"));
        // 2026-12-17 is a Thursday: its week began on Monday the 14th.
        assert_eq!(Period::Week.start(now), at("2026-12-14"));
        assert_eq!(Period::Week.next(now), at("2026-12-21"));
        assert_eq!(Period::Month.start(now), at("2026-12-01"));
        assert_eq!(Period::Month.next(now), at("2027-01-01"));
        // The last second of a period still belongs to it.
        assert_eq!(Period::Month.start(at("2027-01-01") - 1), at("2026-12-01"));
    }

    #[test]
    fn what_is_left_never_goes_below_zero() {
        let q: Quota = "1M/day".parse().unwrap();
        assert_eq!(left(q, 400_000), 600_000);
        assert_eq!(left(q, 2_000_000), 0);
    }
}
