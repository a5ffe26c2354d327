//! UTC calendar dates from Unix seconds and back, without a date crate: quotas reset and
//! usage is reported by calendar day, ISO week and month in UTC, and the arithmetic is a
//! few lines (Howard Hinnant's `days_from_civil` / `civil_from_days`).

use std::fmt;
use std::str::FromStr;

const DAY: i64 = 86_400;

/// A calendar date in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    /// Year, e.g. 2026.
    pub year: i64,
    /// Month, 1..=12.
    pub month: u32,
    /// Day of the month, 1..=31.
    pub day: u32,
}

impl Date {
    /// The date `secs` seconds after the Unix epoch falls on.
    pub fn of(secs: i64) -> Date {
        let z = secs.div_euclid(DAY) + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Date { year, month, day }
    }

    /// Seconds since the epoch at this date's midnight UTC.
    pub fn start(self) -> i64 {
        let y = self.year - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        (era * 146_097 + doe - 719_468) * DAY
    }

    /// The first day of this date's month.
    pub fn first_of_month(self) -> Date {
        Date { day: 1, ..self }
    }

    /// The first day of the next month.
    pub fn next_month(self) -> Date {
        match self.month {
            12 => Date {
                year: self.year + 1,
                month: 1,
                day: 1,
            },
            m => Date {
                month: m + 1,
                day: 1,
                ..self
            },
        }
    }

    /// Days since Monday (Monday 0 .. Sunday 6).
    pub fn weekday_from_monday(self) -> i64 {
        // 1970-01-01 was a Thursday (3 days after a Monday).
        (self.start().div_euclid(DAY) + 3).rem_euclid(7)
    }
}

impl fmt::Display for Date {
    /// `2026-12-01`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl FromStr for Date {
    type Err = String;

    /// Reads `YYYY-MM-DD`, or `YYYY-MM` for the first of that month.
    fn from_str(s: &str) -> Result<Date, String> {
        let bad = || format!("bad date {s:?}: use YYYY-MM-DD or YYYY-MM");
        let mut parts = s.trim().split('-');
        let year: i64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let month: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let day: u32 = match parts.next() {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => 1,
        };
        if parts.next().is_some() || !(1..=12).contains(&month) || !(1970..=9999).contains(&year) {
            return Err(bad());
        }
        let date = Date { year, month, day };
        // A day past the month's end would roll over into the next month: refuse it.
        if day == 0 || Date::of(date.start()) != date {
            return Err(bad());
        }
        Ok(date)
    }
}

/// `2026-12-01 13:05:09`, in UTC.
pub fn timestamp(secs: i64) -> String {
    let rem = secs.rem_euclid(DAY);
    format!(
        "{} {:02}:{:02}:{:02}",
        Date::of(secs),
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Seconds since the Unix epoch now (0 if the clock is before it).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_through_seconds() {
        for secs in [
            0,
            86_399,
            951_782_400,   // 2000-02-29
            1_798_761_600, // 2027-01-01
            -86_400,
        ] {
            let d = Date::of(secs);
            assert_eq!(Date::of(d.start()), d);
            assert!(d.start() <= secs && secs < d.start() + DAY);
        }
        assert_eq!(Date::of(0).to_string(), "1970-01-01");
        assert_eq!(Date::of(951_782_400).to_string(), "2000-02-29");
        assert_eq!(timestamp(1_796_085_909), "2026-12-01 00:45:09");
    }

    #[test]
    fn months_and_weeks() {
        let d: Date = "2026-12-17".parse().unwrap();
        assert_eq!(d.first_of_month().to_string(), "2026-12-01");
        assert_eq!(d.next_month().to_string(), "2027-01-01");
        assert_eq!("2027-02-03".parse::<Date>().unwrap().next_month().month, 3);
        // 2026-12-01 is a Tuesday.
        assert_eq!(
            "2026-12-01".parse::<Date>().unwrap().weekday_from_monday(),
            1
        );
        assert_eq!(
            "2026-12-06".parse::<Date>().unwrap().weekday_from_monday(),
            6
        );
    }

    #[test]
    fn dates_are_parsed_strictly() {
        assert_eq!("2026-12".parse::<Date>().unwrap().to_string(), "2026-12-01");
        for bad in [
            "",
            "2026",
            "2026-13-01",
            "2026-02-30",
            "2026-1-1-1",
            "26-12-01x",
            "x",
        ] {
            assert!(bad.parse::<Date>().is_err(), "{bad:?}");
        }
        assert_eq!("2028-02-29".parse::<Date>().unwrap().day, 29);
    }
}
