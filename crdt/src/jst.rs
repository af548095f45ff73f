//! Japan Standard Time for what people read: family mail, exports,
//! eligibility dates.
//!
//! Japan has used UTC+9 without daylight saving since 1951, so the
//! conversion is arithmetic on the wall time the driver passes in; no
//! time-zone database and no clock is involved (the crate stays sans-IO).

use crate::model::days_from_civil;

/// UTC+9 in milliseconds.
pub const OFFSET_MS: i64 = 9 * 3_600_000;

/// A calendar instant in Japan time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JstTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// The civil date of a day count since 1970-01-01 (inverse of
/// [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Japan time of a wall time in ms since the Unix epoch.
pub fn from_wall_ms(wall_ms: u64) -> JstTime {
    let ms = wall_ms as i64 + OFFSET_MS;
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000) / 1000;
    let (year, month, day) = civil_from_days(days);
    JstTime {
        year,
        month,
        day,
        hour: (in_day / 3600) as u32,
        minute: (in_day / 60 % 60) as u32,
        second: (in_day % 60) as u32,
    }
}

/// `2026年12月5日 23時50分`, as a family member reads it.
pub fn format_ja(wall_ms: u64) -> String {
    let t = from_wall_ms(wall_ms);
    format!(
        "{}年{}月{}日 {}時{:02}分",
        t.year, t.month, t.day, t.hour, t.minute
    )
}

/// `2026-12-05 23:50 JST`.
pub fn format_en(wall_ms: u64) -> String {
    let t = from_wall_ms(wall_ms);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} JST",
        t.year, t.month, t.day, t.hour, t.minute
    )
}

/// `2026-12-05T23:50:24+09:00` (ISO 8601 with the offset).
pub fn format_iso(wall_ms: u64) -> String {
    let t = from_wall_ms(wall_ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+09:00",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// The Japan calendar date `YYYY-MM-DD`.
pub fn date(wall_ms: u64) -> String {
    let t = from_wall_ms(wall_ms);
    format!("{:04}-{:02}-{:02}", t.year, t.month, t.day)
}

/// Whole years between a birth date `YYYY-MM-DD` and the Japan date of
/// `wall_ms` (a birthday counts on its day); `None` for a malformed date.
pub fn age_on(birth_date: &str, wall_ms: u64) -> Option<u32> {
    let (y, m, d) = crate::model::check_date("birth_date", birth_date).ok()?;
    let t = from_wall_ms(wall_ms);
    let mut age = t.year - y as i64;
    if (t.month, t.day) < (m, d) {
        age -= 1;
    }
    u32::try_from(age).ok()
}

/// ms since the epoch of midnight Japan time starting a date.
pub fn start_of_day_ms(y: u32, m: u32, d: u32) -> i64 {
    days_from_civil(y, m, d) * 86_400_000 - OFFSET_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example() {
        // 1796482224840 ms is 2026-12-05 14:50:24.840 UTC.
        assert_eq!(format_ja(1_796_482_224_840), "2026年12月5日 23時50分");
        assert_eq!(format_en(1_796_482_224_840), "2026-12-05 23:50 JST");
        assert_eq!(format_iso(1_796_482_224_840), "2026-12-05T23:50:24+09:00");
    }

    #[test]
    fn date_line_is_at_15_utc() {
        // 2026-12-31 15:00 UTC is already 2027-01-01 in Japan.
        let ms = (start_of_day_ms(2027, 1, 1)) as u64;
        assert_eq!(date(ms), "2027-01-01");
        assert_eq!(date(ms - 1), "2026-12-31");
        assert_eq!(format_ja(ms), "2027年1月1日 0時00分");
    }

    #[test]
    fn civil_round_trip() {
        for days in [-100_000i64, -1, 0, 1, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y as u32, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
    }

    #[test]
    fn ages() {
        let ms = start_of_day_ms(2026, 4, 1) as u64;
        assert_eq!(age_on("1950-04-01", ms), Some(76));
        assert_eq!(age_on("1950-04-02", ms), Some(75));
        assert_eq!(age_on("2026-04-02", ms), None);
    }
}
