//! Time and money conversions for extracted values. Form providers send every scalar as
//! a string, so numbers in strings are read as numbers.
//!
//! What this module must never do: read a value of the wrong kind as something else (a
//! boolean as a time, say); that is an error.

use crate::spec::{AmountUnit, TimeUnit};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;

/// Reads a time in the given unit.
pub fn to_time(v: &Value, unit: TimeUnit) -> Result<DateTime<Utc>, String> {
    let num = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match (unit, num) {
        (TimeUnit::UnixSeconds, Some(n)) => from_millis((n * 1000.0) as i64),
        (TimeUnit::UnixMillis, Some(n)) => from_millis(n as i64),
        (TimeUnit::Auto, Some(n)) if n.abs() >= 1e11 => from_millis(n as i64),
        (TimeUnit::Auto, Some(n)) => from_millis((n * 1000.0) as i64),
        (TimeUnit::Iso8601 | TimeUnit::Auto, None) => match v {
            Value::String(s) => parse_iso(s),
            other => Err(format!("expected a time, got {other}")),
        },
        (TimeUnit::Iso8601, Some(_)) => Err(format!("expected an ISO 8601 time, got {v}")),
        (_, None) => Err(format!("expected a unix time, got {v}")),
    }
}

fn from_millis(ms: i64) -> Result<DateTime<Utc>, String> {
    Utc.timestamp_millis_opt(ms).single().ok_or_else(|| format!("time {ms} ms is out of range"))
}

fn parse_iso(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(Utc.from_utc_datetime(&t));
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN)));
    }
    Err(format!("`{s}` is not an ISO 8601 time"))
}

/// Reads an amount as integer cents.
pub fn to_cents(v: &Value, unit: AmountUnit) -> Result<i64, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("expected an amount, got {v}"))?;
    let cents = match unit {
        AmountUnit::Cents => n,
        AmountUnit::Major => n * 100.0,
    };
    if !cents.is_finite() || cents.abs() > 1e15 {
        return Err(format!("amount {v} is out of range"));
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

    #[test]
    fn amounts_become_cents() {
        assert_eq!(to_cents(&json!(2900), AmountUnit::Cents).unwrap(), 2900);
        assert_eq!(to_cents(&json!("6900"), AmountUnit::Cents).unwrap(), 6900);
        assert_eq!(to_cents(&json!(2.5), AmountUnit::Major).unwrap(), 250);
        assert_eq!(to_cents(&json!("14.99"), AmountUnit::Major).unwrap(), 1499);
        assert!(to_cents(&json!("abc"), AmountUnit::Cents).is_err());
    }
}
