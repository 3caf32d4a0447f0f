//! Dates for the date policies: the civil-date arithmetic (H. Hinnant's algorithms), shifting a
//! DA/DT value, the interval between two dates, and reduction to the year.

use dicom::core::VR;

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub(super) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `days` days after 1970-01-01.
pub(super) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Parses the leading `YYYYMMDD` of a DA or DT value.
fn parse_ymd(v: &str) -> Option<(i64, i64, i64)> {
    let b = v.as_bytes();
    if b.len() < 8 || !b[..8].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let y: i64 = v[0..4].parse().ok()?;
    let m: i64 = v[4..6].parse().ok()?;
    let d: i64 = v[6..8].parse().ok()?;
    let max_day = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    (1..=max_day).contains(&d).then_some((y, m, d))
}

/// A DA or DT value moved by `days`; the time part of a DT is kept. None when unreadable.
pub fn shift_date(v: &str, days: i64) -> Option<String> {
    let (y, m, d) = parse_ymd(v)?;
    let (y, m, d) = civil_from_days(days_from_civil(y, m, d) + days);
    if !(0..=9999).contains(&y) {
        return None;
    }
    Some(format!("{y:04}{m:02}{d:02}{}", &v[8..]))
}

/// The number of days between two DA values (b − a), for tests and reports.
pub fn days_between(a: &str, b: &str) -> Option<i64> {
    let (ya, ma, da) = parse_ymd(a)?;
    let (yb, mb, db) = parse_ymd(b)?;
    Some(days_from_civil(yb, mb, db) - days_from_civil(ya, ma, da))
}

pub(super) fn year_only(v: &str, vr: VR) -> Option<String> {
    let (y, _, _) = parse_ymd(v)?;
    Some(if vr == VR::DT {
        format!("{y:04}0101000000")
    } else {
        format!("{y:04}0101")
    })
}
