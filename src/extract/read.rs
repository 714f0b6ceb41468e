//! Reading values out of a decoded body with compiled fields: first non-null path,
//! constants, `map:`, string and boolean coercion, conditions; and `FieldReader`, the same
//! language for reconciliation's reading of a provider's API answer.
//!
//! What this module must never do: decide an event's kind (the extractor does) or accept
//! a value of the wrong type silently: it is an error the caller reports.

use super::compiled::{Cond, Field, Fields, F};
use super::path::Path;
use super::{decode, time};
use crate::spec::{FieldSpec, TimeUnit};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Request headers as (lower-case name, value) pairs.
pub type Headers = [(String, String)];

/// One field extractor used outside the event mapping: reconciliation reads a provider's
/// API answer with the same language (paths, first-non-null, `const`, `map:`, time units).
#[derive(Debug, Clone)]
pub struct FieldReader(Field);

impl FieldReader {
    /// Compiles a field spec; the error names what is wrong with it.
    pub fn compile(spec: &FieldSpec) -> Result<FieldReader, String> {
        let detail = spec.detail();
        if detail.paths.is_empty() && detail.constant.is_none() {
            return Err("a field needs `paths` or `const`".into());
        }
        let paths = detail.paths.iter().map(|p| Path::parse(p)).collect::<Result<Vec<_>, _>>()?;
        Ok(FieldReader(Field {
            paths,
            constant: detail.constant,
            time: detail.time,
            amount: detail.amount,
            map: detail.map,
        }))
    }

    /// The paths read, for messages (`a.b | c`).
    pub fn describe(&self) -> String {
        let p: Vec<&str> = self.0.paths.iter().map(Path::as_str).collect();
        if p.is_empty() {
            "const".into()
        } else {
            p.join(" | ")
        }
    }

    /// The value (after `map:`), `None` when no path resolves and there is no constant.
    pub fn value(&self, body: &Value) -> Result<Option<Value>, String> {
        read(&self.0, body)
    }

    pub fn string(&self, body: &Value) -> Result<Option<String>, String> {
        Ok(self.value(body)?.and_then(|v| as_string(&v)))
    }

    /// A time in the field's unit (`auto` when none is given).
    pub fn time(&self, body: &Value) -> Result<Option<DateTime<Utc>>, String> {
        self.value(body)?.map(|v| time::to_time(&v, self.0.time.unwrap_or(TimeUnit::Auto))).transpose()
    }

    pub fn bool(&self, body: &Value) -> Result<Option<bool>, String> {
        self.value(body)?
            .map(|v| as_bool(&v).ok_or_else(|| format!("expected a boolean, got {}", time::brief(&v))))
            .transpose()
    }
}

pub(super) fn field_in<'a>(layers: &[&'a Fields], f: F) -> Option<&'a Field> {
    layers.iter().find_map(|l| l[f as usize].as_ref())
}

/// Hex SHA-256 of the raw body: the idempotency key of providers that send no id.
pub(super) fn body_hash(raw: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(raw)))
}

pub(super) fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Literal strings "null" (form bodies) and "" read as absent.
pub(super) fn is_nullish(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => {
            let t = s.trim();
            t.is_empty() || t == "null"
        }
        _ => false,
    }
}

pub(super) fn first<'a, B: decode::Lookup + ?Sized>(paths: &[Path], body: &'a B) -> Option<&'a Value> {
    paths.iter().filter_map(|p| body.at(p)).find(|v| !is_nullish(v))
}

/// Reads a field: first non-null path, else the constant; then the value map.
pub(super) fn read<B: decode::Lookup + ?Sized>(field: &Field, body: &B) -> Result<Option<Value>, String> {
    let v = first(&field.paths, body).cloned().or_else(|| field.constant.clone());
    let Some(v) = v else { return Ok(None) };
    if field.map.is_empty() {
        return Ok(Some(v));
    }
    let key = as_string(&v).unwrap_or_default();
    Ok(Some(field.map.get(&key).cloned().unwrap_or(v)))
}

pub(super) fn as_string(v: &Value) -> Option<String> {
    match v {
        // Form bodies pad values (`customer[name]=" "`); surrounding blanks carry nothing.
        Value::String(s) if !is_nullish(v) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" | "" | "null" => Some(false),
            _ => None,
        },
        Value::Null => Some(false),
        _ => None,
    }
}

/// Equality that reads `"true"` as `true` and `"6900"` as `6900` (form bodies).
pub(super) fn loose_eq(a: &Value, b: &Value) -> bool {
    if a == b {
        return true;
    }
    match (as_string(a), as_string(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// Whether `cond` holds for `v`; `other` looks up the other path of a two-path condition.
pub(super) fn holds<'b>(
    cond: &Cond,
    v: Option<&Value>,
    other: impl Fn(&super::path::Path) -> Option<&'b Value>,
) -> bool {
    match cond {
        Cond::SameAs(p) => match (v.filter(|v| !is_nullish(v)), other(p).filter(|v| !is_nullish(v))) {
            (None, None) => true,
            (Some(a), Some(b)) => loose_eq(a, b),
            _ => false,
        },
        Cond::DiffersFrom(p) => !holds(&Cond::SameAs(p.clone()), v, other),
        Cond::Present(want) => v.is_some() == *want,
        Cond::Null(want) => v.is_none_or(is_nullish) == *want,
        Cond::Equals(x) => v.is_some_and(|v| loose_eq(v, x)),
        Cond::NotEquals(x) => !v.is_some_and(|v| loose_eq(v, x)),
        Cond::OneOf(xs) => v.is_some_and(|v| xs.iter().any(|x| loose_eq(v, x))),
    }
}
