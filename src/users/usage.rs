//! Usage reports: the stored hourly rows summed per user and calendar day or month (UTC),
//! for `user list`, `user show` and `usage`.

use super::UsageRow;
use crate::limit::calendar::Date;
use std::collections::BTreeMap;

/// One user's bytes in one day or month.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodUsage {
    /// The user.
    pub user: String,
    /// `2026-12-01` for a day, `2026-12` for a month.
    pub period: String,
    /// Bytes from the app towards the target.
    pub up: u64,
    /// Bytes from the target towards the app.
    pub down: u64,
}

/// The label of the day or month an hour falls in.
pub fn period_of(hour: i64, by_month: bool) -> String {
    let d = Date::of(hour);
    if by_month {
        format!("{:04}-{:02}", d.year, d.month)
    } else {
        d.to_string()
    }
}

/// Sums hourly rows per period and user, ordered by period, then user.
pub fn by_period(rows: &[UsageRow], by_month: bool) -> Vec<PeriodUsage> {
    let mut sums: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for r in rows {
        let e = sums
            .entry((period_of(r.hour, by_month), r.user.clone()))
            .or_default();
        e.0 = e.0.saturating_add(r.up);
        e.1 = e.1.saturating_add(r.down);
    }
    sums.into_iter()
        .map(|((period, user), (up, down))| PeriodUsage {
            user,
            period,
            up,
            down,
        })
        .collect()
}

/// Bytes (up, down) per user in rows from `since` on.
pub fn totals_since(rows: &[UsageRow], since: i64) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.hour >= since) {
        let e = out.entry(r.user.clone()).or_default();
        e.0 = e.0.saturating_add(r.up);
        e.1 = e.1.saturating_add(r.down);
    }
    out
}

/// The rows as a JSON array of `{"user", "period", "up_bytes", "down_bytes"}`.
pub fn to_json(rows: &[PeriodUsage]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"user\":{},\"period\":\"{}\",\"up_bytes\":{},\"down_bytes\":{}}}",
                json_string(&r.user),
                r.period,
                r.up,
                r.down
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// A JSON string literal. User names are restricted to `[A-Za-z0-9._@-]`, but a database
/// written by something else may hold anything.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: &str, date: &str, hour: i64, up: u64, down: u64) -> UsageRow {
        UsageRow {
            user: user.into(),
            hour: date.parse::<Date>().unwrap().start() + hour * 3600,
            up,
            down,
        }
    }

    #[test]
    fn hours_add_up_per_day_and_month() {
        let rows = [
            row("bob", "2026-11-30", 23, 1, 2),
            row("alice", "2026-12-01", 0, 10, 20),
            row("alice", "2026-12-01", 23, 1, 1),
            row("alice", "2026-12-02", 5, 100, 0),
        ];
        let days = by_period(&rows, false);
        assert_eq!(
            days.iter()
                .map(|p| (p.period.as_str(), p.user.as_str(), p.up, p.down))
                .collect::<Vec<_>>(),
            [
                ("2026-11-30", "bob", 1, 2),
                ("2026-12-01", "alice", 11, 21),
                ("2026-12-02", "alice", 100, 0)
            ]
        );
        let months = by_period(&rows, true);
        assert_eq!(months.len(), 2);
        assert_eq!((months[1].up, months[1].down), (111, 21));
        assert_eq!(months[1].period, "2026-12");
        let since = "2026-12-01".parse::<Date>().unwrap().start();
        assert_eq!(totals_since(&rows, since).get("alice"), Some(&(111, 21)));
        assert_eq!(totals_since(&rows, since).get("bob"), None);
    }

    #[test]
    fn json_has_the_fields_a_billing_script_reads() {
        let j = to_json(&by_period(&[row("a\"b", "2026-12-01", 1, 5, 6)], true));
        assert_eq!(
            j,
            r#"[{"user":"a\"b","period":"2026-12","up_bytes":5,"down_bytes":6}]"#
        );
        assert_eq!(to_json(&[]), "[]");
    }
}
