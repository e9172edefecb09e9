//! UTC calendar days: the granularity every analytics aggregate is kept at. A day is written in
//! keys as `YYYY-MM-DD`, which sorts in time order.

use std::fmt;

/// Milliseconds in a day.
pub const DAY_MS: u64 = 86_400_000;

/// A UTC calendar day, as the number of days since 1970-01-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub i64);

impl Day {
    /// The day the instant `ms` (since the Unix epoch) falls in.
    pub fn from_ms(ms: u64) -> Self {
        Self((ms / DAY_MS) as i64)
    }

    /// Parses `YYYY-MM-DD` (a real calendar date from year 1970 to 9999).
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return None;
        }
        let number = |range: std::ops::Range<usize>| -> Option<i64> {
            let part = text.get(range)?;
            part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse().ok())?
        };
        let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
        if year < 1970 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month)
        {
            return None;
        }
        Some(Self(days_from_civil(year, month, day)))
    }

    /// The first millisecond of the day.
    pub fn start_ms(self) -> u64 {
        (self.0.max(0) as u64) * DAY_MS
    }

    /// The day `n` days later (earlier for negative `n`).
    pub fn plus(self, n: i64) -> Self {
        Self(self.0 + n)
    }

    /// The day as the key prefix it is stored under.
    pub fn key(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day) = civil_from_days(self.0);
        write!(f, "{year:04}-{month:02}-{day:02}")
    }
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day number since 1970-01-01: `(year, month, day)`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip_through_dates() {
        assert_eq!(Day(0).to_string(), "1970-01-01");
        assert_eq!(Day::parse("2024-02-29").map(|d| d.to_string()).as_deref(), Some("2024-02-29"));
        assert_eq!(Day::from_ms(1_764_028_800_000).to_string(), "2025-11-25");
        for n in [0, 59, 365, 10_956, 20_000, 2_932_896] {
            assert_eq!(Day::parse(&Day(n).to_string()), Some(Day(n)));
        }
        for bad in ["2023-02-29", "2024-13-01", "2024-1-01", "1969-12-31", "2024-01-0x", ""] {
            assert_eq!(Day::parse(bad), None, "{bad}");
        }
    }
}
