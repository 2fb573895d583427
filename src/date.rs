//! The civil (proleptic Gregorian, UTC) date of a day count since 1970-01-01, without a date
//! crate: capsule timestamps (`bench::rfc3339_utc`) and chat templates' `strftime_now`
//! (`chat`) both need it, and nothing more of a calendar.

/// `(year, month 1..=12, day 1..=31)` of `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`; negative days are before 1970).
pub fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_dates() {
        assert_eq!(super::civil_date(0), (1970, 1, 1));
        assert_eq!(super::civil_date(11_016), (2000, 2, 29));
        assert_eq!(super::civil_date(-1), (1969, 12, 31));
    }
}
