//! Time and money conversions for extracted values. Form providers send every scalar as
//! a string, so numbers in strings are read as numbers.
//!
//! What this module must never do: read a value of the wrong kind as something else (a
//! boolean as a time, say); that is an error.

use crate::spec::{AmountUnit, TimeUnit};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;

/// Reads a time in the given unit. `auto` reads numbers (and numbers in strings) as unix
/// seconds, or milliseconds from 1e11 on (after 1973 in milliseconds, after 5138 in
/// seconds), fractions allowed, and strings as RFC 3339 / ISO 8601 with or without an
/// offset (`2023-01-04 02:28:57 +0200` as Whop writes it, `…T…+0000`, `…Z`, fractions of a
/// second), or a bare date.
pub fn to_time(v: &Value, unit: TimeUnit) -> Result<DateTime<Utc>, String> {
    let num = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    };
    match (unit, num) {
        (TimeUnit::UnixSeconds, Some(n)) => from_millis_f(n * 1000.0),
        (TimeUnit::UnixMillis, Some(n)) => from_millis_f(n),
        (TimeUnit::Auto, Some(n)) if n.abs() >= 1e11 => from_millis_f(n),
        (TimeUnit::Auto, Some(n)) => from_millis_f(n * 1000.0),
        (TimeUnit::Iso8601 | TimeUnit::Auto, None) => match v {
            Value::String(s) => parse_iso(s),
            other => Err(format!("expected a time, got {}", brief(other))),
        },
        (TimeUnit::Iso8601, Some(_)) => Err(format!("expected an ISO 8601 time, got {}", brief(v))),
        (_, None) => Err(format!("expected a unix time, got {}", brief(v))),
    }
}

/// Milliseconds (rounded to the nearest) as a time; out of range is an error.
fn from_millis_f(ms: f64) -> Result<DateTime<Utc>, String> {
    if !ms.is_finite() || ms.abs() > 8.2e15 {
        return Err(format!("time {ms} ms is out of range"));
    }
    let ms = ms.round() as i64;
    Utc.timestamp_millis_opt(ms).single().ok_or_else(|| format!("time {ms} ms is out of range"))
}

fn parse_iso(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // With an offset: `2023-01-04 02:28:57 +0200`, `2023-01-04T02:28:57+0200`, `… +02:00`.
    for fmt in ["%Y-%m-%d %H:%M:%S%.f %z", "%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    // Without one: UTC.
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(Utc.from_utc_datetime(&t));
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN)));
    }
    Err(format!("`{}` is not an ISO 8601 time", brief_text(s)))
}

/// How an error names a value it could not read: as JSON, at most [`BRIEF_CHARS`]
/// characters of it, the rest cut with `…`. Whoever sent the value chose it: an error is
/// stored, listed and shown to operators and assistants, so it repeats no more than this.
pub fn brief(v: &Value) -> String {
    brief_text(&v.to_string())
}

/// Text as an error repeats it: on one line, at most [`BRIEF_CHARS`] characters, the rest
/// cut with `…` (see `logging::one_line`).
pub fn brief_text(s: &str) -> String {
    crate::logging::one_line(s, BRIEF_CHARS)
}

/// How much of a value an error repeats (see [`brief`]).
pub const BRIEF_CHARS: usize = 64;

/// Reads an amount as integer cents.
pub fn to_cents(v: &Value, unit: AmountUnit) -> Result<i64, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("expected an amount, got {}", brief(v)))?;
    let cents = match unit {
        AmountUnit::Cents => n,
        AmountUnit::Major => n * 100.0,
    };
    if !cents.is_finite() || cents.abs() > 1e15 {
        return Err(format!("amount {} is out of range", brief(v)));
    }
    Ok(cents.round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_in_each_unit_agree() {
        let want = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(to_time(&json!(1767225600), TimeUnit::UnixSeconds).unwrap(), want);
        assert_eq!(to_time(&json!("1767225600"), TimeUnit::UnixSeconds).unwrap(), want);
        assert_eq!(to_time(&json!(1767225600000i64), TimeUnit::UnixMillis).unwrap(), want);
        assert_eq!(to_time(&json!("2026-01-01T00:00:00Z"), TimeUnit::Iso8601).unwrap(), want);
        assert_eq!(to_time(&json!("2026-01-01T01:00:00+01:00"), TimeUnit::Iso8601).unwrap(), want);
        assert_eq!(to_time(&json!("2026-01-01 00:00:00"), TimeUnit::Iso8601).unwrap(), want);
        assert_eq!(to_time(&json!("2026-01-01"), TimeUnit::Iso8601).unwrap(), want);
        assert_eq!(to_time(&json!(1767225600000i64), TimeUnit::Auto).unwrap(), want);
        assert_eq!(to_time(&json!(1767225600), TimeUnit::Auto).unwrap(), want);
        assert!(to_time(&json!(true), TimeUnit::Auto).is_err());
        assert!(to_time(&json!("yesterday"), TimeUnit::Iso8601).is_err());
    }

    proptest::proptest! {
        /// Every format a provider documents reads back as the same instant: RFC 3339 (Z
        /// and offsets), `YYYY-MM-DD HH:MM:SS ±ZZZZ`, without an offset (UTC), unix seconds
        /// and milliseconds as numbers and strings, with and without fractions.
        #[test]
        fn every_documented_time_format_reads_back_the_same_instant(
            secs in 100_000_000i64..4_102_444_800, // 1973..2100: `auto` tells ms from s at 1e11
            millis in 0i64..1000,
            offset_min in -840i32..=840,
        ) {
            let t = Utc.timestamp_millis_opt(secs * 1000 + millis).unwrap();
            let whole = Utc.timestamp_opt(secs, 0).unwrap();
            let tz = chrono::FixedOffset::east_opt(offset_min * 60).unwrap();
            let local = t.with_timezone(&tz);
            let local_whole = whole.with_timezone(&tz);
            let cases: Vec<(Value, DateTime<Utc>)> = vec![
                (json!(t.to_rfc3339()), t),
                (json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)), t),
                (json!(local.to_rfc3339()), t),
                (json!(local_whole.format("%Y-%m-%d %H:%M:%S %z").to_string()), whole),
                (json!(local.format("%Y-%m-%d %H:%M:%S%.3f %z").to_string()), t),
                (json!(local_whole.format("%Y-%m-%dT%H:%M:%S%z").to_string()), whole),
                (json!(t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()), t),
                (json!(whole.format("%Y-%m-%dT%H:%M:%S").to_string()), whole),
                (json!(secs), whole),
                (json!(secs.to_string()), whole),
                (json!(secs as f64 + millis as f64 / 1000.0), t),
                (json!(format!("{secs}.{millis:03}")), t),
                (json!(secs * 1000 + millis), t),
                (json!((secs * 1000 + millis).to_string()), t),
            ];
            for (v, want) in cases {
                proptest::prop_assert_eq!(to_time(&v, TimeUnit::Auto), Ok(want), "{}", v);
            }
            proptest::prop_assert_eq!(to_time(&json!(secs * 1000 + millis), TimeUnit::UnixMillis), Ok(t));
            proptest::prop_assert_eq!(to_time(&json!(format!("{secs}.{millis:03}")), TimeUnit::UnixSeconds), Ok(t));
        }
    }

    #[test]
    fn no_time_from_what_is_not_one() {
        for v in
            [json!("NaN"), json!("inf"), json!("1e300"), json!(1e300), json!("2023-13-45 99:00:00 +0200"), json!(null)]
        {
            assert!(to_time(&v, TimeUnit::Auto).is_err(), "{v}");
        }
    }

    #[test]
    fn amounts_become_cents() {
        assert_eq!(to_cents(&json!(2900), AmountUnit::Cents).unwrap(), 2900);
        assert_eq!(to_cents(&json!("6900"), AmountUnit::Cents).unwrap(), 6900);
        assert_eq!(to_cents(&json!(2.5), AmountUnit::Major).unwrap(), 250);
        assert_eq!(to_cents(&json!("14.99"), AmountUnit::Major).unwrap(), 1499);
        assert!(to_cents(&json!("abc"), AmountUnit::Cents).is_err());
    }
}
