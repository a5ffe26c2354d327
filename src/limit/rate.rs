//! Bandwidth values as operators write them (`500K`, `2MiB/s`, `unlimited`).
//!
//! In scope: parsing and printing. Out of scope: enforcing a rate (see bucket.rs).
//! Decimal units (`K`, `M`, `G`, optionally followed by `B`) multiply by 1000, binary units
//! (`KiB`, `MiB`, `GiB`) by 1024, an optional `/s` suffix is accepted, and the suffixes are
//! case-insensitive. A bare number is bytes per second.

use std::fmt;
use std::str::FromStr;

/// A bandwidth in bytes per second, or unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bandwidth(Option<u64>);

/// Why a bandwidth string was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// Nothing but whitespace was given.
    Empty,
    /// The numeric part is not a number.
    BadNumber(String),
    /// The unit is not one we know.
    BadUnit(String),
    /// Zero bytes per second would block the user entirely; `user del` does that.
    Zero,
    /// The value does not fit in 64 bits.
    TooLarge,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Empty => write!(f, "empty bandwidth"),
            Error::BadNumber(s) => write!(f, "bad bandwidth number {s:?}"),
            Error::BadUnit(s) => write!(
                f,
                "unknown bandwidth unit {s:?} (use K, M, G, KiB, MiB, GiB, optional /s, or unlimited)"
            ),
            Error::Zero => write!(f, "bandwidth must be above zero (or 'unlimited')"),
            Error::TooLarge => write!(f, "bandwidth too large"),
        }
    }
}

impl std::error::Error for Error {}

impl Bandwidth {
    /// No limit at all.
    pub const UNLIMITED: Bandwidth = Bandwidth(None);

    /// A limit of `bytes_per_sec` bytes per second (0 is treated as 1).
    pub const fn bytes_per_sec(bytes_per_sec: u64) -> Bandwidth {
        Bandwidth(Some(if bytes_per_sec == 0 { 1 } else { bytes_per_sec }))
    }

    /// Builds from the database form: `None` (NULL) means unlimited.
    pub fn from_db(value: Option<i64>) -> Bandwidth {
        match value {
            Some(v) if v > 0 => Bandwidth(Some(v as u64)),
            Some(_) => Bandwidth(Some(1)),
            None => Bandwidth(None),
        }
    }

    /// The database form: bytes per second, or `None` for unlimited.
    pub fn to_db(self) -> Option<i64> {
        self.0.map(|v| v.min(i64::MAX as u64) as i64)
    }

    /// Bytes per second, or `None` when unlimited.
    pub fn limit(self) -> Option<u64> {
        self.0
    }

    /// True when there is no limit.
    pub fn is_unlimited(self) -> bool {
        self.0.is_none()
    }
}

const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1_000),
    ("kb", 1_000),
    ("m", 1_000_000),
    ("mb", 1_000_000),
    ("g", 1_000_000_000),
    ("gb", 1_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
];

impl FromStr for Bandwidth {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::Empty);
        }
        let lower = s.to_ascii_lowercase();
        if lower == "unlimited" {
            return Ok(Bandwidth::UNLIMITED);
        }
        let body = lower.strip_suffix("/s").unwrap_or(&lower).trim_end();
        parse_amount(body).map(|n| Bandwidth(Some(n)))
    }
}

/// Parses an amount of bytes with the units of this module (`10GB`, `1.5MiB`, `500`), above
/// zero; shared by bandwidths and volume quotas so both read the same way.
///
/// # Errors
/// `Empty`, `BadNumber`, `BadUnit`, `Zero` or `TooLarge`.
pub fn parse_amount(s: &str) -> Result<u64, Error> {
    let body = s.trim().to_ascii_lowercase();
    if body.is_empty() {
        return Err(Error::Empty);
    }
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, unit) = body.split_at(split);
    let unit = unit.trim();
    let mult = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, m)| *m)
        .ok_or_else(|| Error::BadUnit(unit.to_string()))?;
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return Err(Error::BadNumber(num.to_string()));
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    let int: u64 = int_part.parse().map_err(|_| Error::TooLarge)?;
    let mut total = int.checked_mul(mult).ok_or(Error::TooLarge)?;
    // Fractions are computed exactly in integers: "1.5M" is 1_500_000, not 1_499_999.
    if !frac_part.is_empty() {
        let digits = frac_part.len().min(18) as u32;
        let frac: u64 = frac_part[..digits as usize]
            .parse()
            .map_err(|_| Error::BadNumber(num.to_string()))?;
        let scaled = (frac as u128 * mult as u128) / 10u128.pow(digits);
        total = total.checked_add(scaled as u64).ok_or(Error::TooLarge)?;
    }
    if total == 0 {
        return Err(Error::Zero);
    }
    Ok(total)
}

/// The shortest exact form of `v` bytes that [`parse_amount`] reads back (`2MiB`, `500K`).
pub fn format_amount(v: u64) -> String {
    for (unit, mult) in [
        ("GiB", 1u64 << 30),
        ("G", 1_000_000_000),
        ("MiB", 1 << 20),
        ("M", 1_000_000),
        ("KiB", 1 << 10),
        ("K", 1_000),
    ] {
        if v >= mult && v % mult == 0 {
            return format!("{}{unit}", v / mult);
        }
    }
    v.to_string()
}

impl fmt::Display for Bandwidth {
    /// Prints the shortest exact form that parses back to the same value (`2MiB/s`, `500K/s`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => write!(f, "unlimited"),
            Some(v) => write!(f, "{}/s", format_amount(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(s: &str) -> Result<Option<u64>, Error> {
        s.parse::<Bandwidth>().map(|b| b.limit())
    }

    #[test]
    fn parses_the_units_operators_write() {
        assert_eq!(bw("500"), Ok(Some(500)));
        assert_eq!(bw("500K"), Ok(Some(500_000)));
        assert_eq!(bw("500k/s"), Ok(Some(500_000)));
        assert_eq!(bw("2M"), Ok(Some(2_000_000)));
        assert_eq!(bw("2MB/s"), Ok(Some(2_000_000)));
        assert_eq!(bw("1G"), Ok(Some(1_000_000_000)));
        assert_eq!(bw("1KiB"), Ok(Some(1024)));
        assert_eq!(bw("2MiB/s"), Ok(Some(2 << 20)));
        assert_eq!(bw("1GiB"), Ok(Some(1 << 30)));
        assert_eq!(bw("1.5M"), Ok(Some(1_500_000)));
        assert_eq!(bw(" 10 K "), Ok(Some(10_000)));
        assert_eq!(bw("unlimited"), Ok(None));
        assert_eq!(bw("Unlimited"), Ok(None));
    }

    #[test]
    fn rejects_bad_rates_with_their_own_error() {
        assert_eq!(bw(""), Err(Error::Empty));
        assert_eq!(bw("K"), Err(Error::BadNumber(String::new())));
        assert_eq!(bw("1.2.3M"), Err(Error::BadNumber("1.2.3".into())));
        assert_eq!(bw("5X"), Err(Error::BadUnit("x".into())));
        assert_eq!(bw("5 per second"), Err(Error::BadUnit("per second".into())));
        assert_eq!(bw("-5K"), Err(Error::BadUnit("-5k".into())));
        assert_eq!(bw("0"), Err(Error::Zero));
        assert_eq!(bw("0K"), Err(Error::Zero));
        assert_eq!(bw("99999999999999999999"), Err(Error::TooLarge));
        assert_eq!(bw("99999999999G"), Err(Error::TooLarge));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "1",
            "999",
            "500K",
            "2MiB",
            "1.5M",
            "1GiB",
            "1234567",
            "unlimited",
            "3G",
        ] {
            let b: Bandwidth = s.parse().unwrap();
            let again: Bandwidth = b.to_string().parse().unwrap();
            assert_eq!(b, again, "{s} -> {b}");
        }
        assert_eq!("2MiB".parse::<Bandwidth>().unwrap().to_string(), "2MiB/s");
        assert_eq!("500K".parse::<Bandwidth>().unwrap().to_string(), "500K/s");
    }
}

/// A request rate as Django REST framework writes it: `N/s`, `N/m`, `N/h`, `N/d`, or with the
/// unit spelled out (`sec`, `second`, `min`, `minute`, `hour`, `day`, and plurals). Unlike
/// DRF, which reads only the first letter, anything else is refused: `3/month` and `3/ms`
/// must not quietly mean 3 per minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestRate {
    /// Requests allowed in each window.
    pub count: u32,
    /// The window.
    pub per: std::time::Duration,
}

/// Why a request rate string was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestRateError {
    /// Not `N/unit`.
    Syntax(String),
    /// N is zero or not a number.
    BadCount(String),
    /// The unit is not s, m, h or d.
    BadUnit(String),
}

impl fmt::Display for RequestRateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestRateError::Syntax(s) => {
                write!(f, "bad request rate {s:?} (use N/s, N/m, N/h or N/d)")
            }
            RequestRateError::BadCount(s) => {
                write!(f, "bad request count {s:?} (a whole number above 0)")
            }
            RequestRateError::BadUnit(s) => write!(
                f,
                "bad request rate unit {s:?} (use s, m, h or d, or second, minute, hour, day)"
            ),
        }
    }
}

impl std::error::Error for RequestRateError {}

impl FromStr for RequestRate {
    type Err = RequestRateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (n, unit) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| RequestRateError::Syntax(s.to_string()))?;
        let count: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| RequestRateError::BadCount(n.to_string()))?;
        let secs = match unit.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86400,
            _ => return Err(RequestRateError::BadUnit(unit.to_string())),
        };
        Ok(RequestRate {
            count,
            per: std::time::Duration::from_secs(secs),
        })
    }
}

impl fmt::Display for RequestRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            3600 => "h",
            86400 => "d",
            other => return write!(f, "{}/{}s", self.count, other),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

#[cfg(test)]
mod request_rate_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_drf_rates() {
        let r: RequestRate = "3/m".parse().unwrap();
        assert_eq!((r.count, r.per), (3, Duration::from_secs(60)));
        assert_eq!(
            "100/s".parse::<RequestRate>().unwrap().per,
            Duration::from_secs(1)
        );
        assert_eq!(
            "5/hour".parse::<RequestRate>().unwrap().per,
            Duration::from_secs(3600)
        );
        assert_eq!("1/day".parse::<RequestRate>().unwrap().to_string(), "1/d");
        assert_eq!("10/min".parse::<RequestRate>().unwrap().to_string(), "10/m");
    }

    #[test]
    fn rejects_bad_request_rates() {
        assert!(matches!(
            "3".parse::<RequestRate>(),
            Err(RequestRateError::Syntax(_))
        ));
        assert!(matches!(
            "0/m".parse::<RequestRate>(),
            Err(RequestRateError::BadCount(_))
        ));
        assert!(matches!(
            "x/m".parse::<RequestRate>(),
            Err(RequestRateError::BadCount(_))
        ));
        assert!(matches!(
            "3/w".parse::<RequestRate>(),
            Err(RequestRateError::BadUnit(_))
        ));
        assert!(matches!(
            "3/".parse::<RequestRate>(),
            Err(RequestRateError::BadUnit(_))
        ));
        // Regression: only the first letter used to count.
        for bad in ["3/month", "3/ms", "3/mx", "3/sunday", "3/dozen", "3/hz"] {
            assert!(
                matches!(
                    bad.parse::<RequestRate>(),
                    Err(RequestRateError::BadUnit(_))
                ),
                "{bad} was accepted"
            );
        }
        assert_eq!(
            "3/minutes".parse::<RequestRate>().unwrap().to_string(),
            "3/m"
        );
        assert_eq!(
            "3/Seconds".parse::<RequestRate>().unwrap().to_string(),
            "3/s"
        );
    }
}
