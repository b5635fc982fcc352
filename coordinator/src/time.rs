//! UTC timestamps for checkpoint ids and listings, without a date library:
//! the coordinator needs only formatting, in UTC, of its own clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian;
/// Howard Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn parts(unix_ms: u64) -> (i64, u32, u32, u64, u64, u64) {
    let secs = unix_ms / 1000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    (y, mo, d, s / 3600, s / 60 % 60, s % 60)
}

/// `YYYYmmddTHHMMSS` (UTC), the time part of a checkpoint id.
pub fn compact_utc(unix_ms: u64) -> String {
    let (y, mo, d, h, mi, s) = parts(unix_ms);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}")
}

/// `YYYY-mm-ddTHH:MM:SSZ` (RFC 3339, UTC), for listings.
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let (y, mo, d, h, mi, s) = parts(unix_ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(compact_utc(0), "19700101T000000");
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day in a year divisible by 400) 12:34:56.789
        assert_eq!(compact_utc(951_827_696_789), "20000229T123456");
        // 2026-11-29T11:53:24Z (checked with date -u)
        assert_eq!(rfc3339_utc(1_795_953_204_000), "2026-11-29T11:53:24Z");
        // 2100-03-01: 2100 is not a leap year
        assert_eq!(compact_utc(4_107_542_400_000), "21000301T000000");
    }
}
