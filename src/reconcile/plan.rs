//! A provider's `reconcile:` section compiled: the request to send (URL, headers and body
//! templates filled with the membership's ids, path segments percent-encoded) and the
//! reader of the provider's answer into a status snapshot.
//!
//! What this module must never do: send a request (the reconciler does, through its rate
//! limiter) or put the API key anywhere but the header templates that name it.

use super::error::{MissingValue, Unreachable};
use crate::extract::path::Path;
use crate::extract::FieldReader;
use crate::spec::{ReconcileMethod, ReconcileSpec};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// What the provider says about one membership, on the rules' vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    pub status: String,
    pub period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: Option<bool>,
    pub product_id: Option<String>,
}

/// A provider's compiled `reconcile:` section.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) file: String,
    pub(super) unsupported: Option<String>,
    pub(super) method: ReconcileMethod,
    pub(super) url: String,
    pub(super) api_base: Option<String>,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Option<Value>,
    pub(super) select: Option<(Path, Path, String)>,
    pub(super) status: Option<FieldReader>,
    pub(super) period_end: Option<FieldReader>,
    pub(super) cancel_at_period_end: Option<FieldReader>,
    pub(super) product_id: Option<FieldReader>,
}

impl Plan {
    /// `check` has validated the section; what still fails to compile here makes the
    /// provider unsupported with the reason, rather than a panic.
    pub(super) fn compile(file: String, spec: &ReconcileSpec, env_base: Option<&String>) -> Plan {
        let field = |f: &Option<crate::spec::FieldSpec>| f.as_ref().and_then(|f| FieldReader::compile(f).ok());
        let select = spec.select.as_ref().and_then(|s| {
            Some((
                Path::parse(&s.list).ok()?,
                Path::parse(&s.key).ok()?,
                s.equals.clone().unwrap_or_else(|| "{subscription_id}".into()),
            ))
        });
        let status = field(&spec.fields.status);
        let unsupported = spec.unsupported.clone().or_else(|| match (&spec.url, &status) {
            (None, _) => Some("the `reconcile:` section has no `url`".into()),
            (_, None) => Some("the `reconcile:` section has no `fields.status`".into()),
            _ => None,
        });
        Plan {
            file,
            unsupported,
            method: spec.method,
            url: spec.url.clone().unwrap_or_default(),
            api_base: env_base.cloned().or_else(|| spec.api_base.clone()),
            headers: spec.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            body: spec.body.clone(),
            select,
            status,
            period_end: field(&spec.fields.period_end),
            cancel_at_period_end: field(&spec.fields.cancel_at_period_end),
            product_id: field(&spec.fields.product_id),
        }
    }

    /// Whether any of the request's templates names `{var}`.
    pub(super) fn names(&self, var: &str) -> bool {
        let needle = format!("{{{var}}}");
        self.url.contains(&needle)
            || self.headers.iter().any(|(_, v)| v.contains(&needle))
            || self.body.as_ref().is_some_and(|b| b.to_string().contains(&needle))
            || self.select.as_ref().is_some_and(|(_, _, equals)| equals.contains(&needle))
    }

    /// Reads the snapshot out of a provider's answer.
    pub(super) fn snapshot(&self, body: &[u8], vars: &Vars) -> Result<Snapshot, Unreachable> {
        let root: Value = serde_json::from_slice(body).map_err(|e| Unreachable::NotJson(e.to_string()))?;
        let item = match &self.select {
            None => &root,
            Some((list, key, equals)) => {
                let want = fill(equals, vars, false).map_err(|MissingValue(v)| Unreachable::NothingToSelectWith(v))?;
                let items = list
                    .lookup(&root)
                    .and_then(Value::as_array)
                    .ok_or_else(|| Unreachable::NoList(list.as_str().to_string()))?;
                items
                    .iter()
                    .find(|it| key.lookup(it).and_then(scalar_text).as_deref() == Some(want.as_str()))
                    .ok_or_else(|| Unreachable::NoItem {
                        list: list.as_str().to_string(),
                        key: key.as_str().to_string(),
                        want: want.clone(),
                    })?
            }
        };
        let status_field = self.status.as_ref().ok_or(Unreachable::NoStatusReader)?;
        let status = status_field
            .string(item)
            .map_err(field("status"))?
            .ok_or_else(|| Unreachable::NoStatus(status_field.describe()))?;
        let read_time = |f: &Option<FieldReader>| f.as_ref().map(|f| f.time(item)).transpose().map(Option::flatten);
        let period_end = read_time(&self.period_end).map_err(field("period_end"))?;
        let cancel_at_period_end = self
            .cancel_at_period_end
            .as_ref()
            .map(|f| f.bool(item))
            .transpose()
            .map_err(field("cancel_at_period_end"))?
            .flatten();
        let product_id =
            self.product_id.as_ref().map(|f| f.string(item)).transpose().map_err(field("product_id"))?.flatten();
        Ok(Snapshot { status, period_end, cancel_at_period_end, product_id })
    }
}

fn field(field: &'static str) -> impl Fn(String) -> Unreachable {
    move |problem| Unreachable::Field { field, problem }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Values a template may name.
#[derive(Debug, Default, Clone)]
pub(super) struct Vars {
    pub(super) api_base: Option<String>,
    pub(super) subscription_id: Option<String>,
    pub(super) customer_id: Option<String>,
    pub(super) product_id: Option<String>,
}

/// Fills `{name}` placeholders; `Err(name)` when one has no value. `encode` percent-encodes
/// values (URL path segments). Braces around anything else (GraphQL) are left alone.
pub(super) fn fill(template: &str, vars: &Vars, encode: bool) -> Result<String, MissingValue> {
    fill_with(template, vars, None, encode)
}

pub(super) fn fill_with(
    template: &str,
    vars: &Vars,
    api_key: Option<&str>,
    encode: bool,
) -> Result<String, MissingValue> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let name = after.find('}').map(|j| &after[..j]);
        let value = match name {
            Some("api_base") => Some(vars.api_base.as_deref().map(str::to_string)),
            Some("subscription_id") => Some(vars.subscription_id.clone()),
            Some("customer_id") => Some(vars.customer_id.clone()),
            Some("product_id") => Some(vars.product_id.clone()),
            Some("api_key") => Some(api_key.map(str::to_string)),
            _ => None,
        };
        match (name, value) {
            (Some(n), Some(v)) => {
                let v = v.ok_or_else(|| MissingValue(format!("{{{n}}}")))?;
                let raw = n == "api_base" || n == "api_key" || !encode;
                if !raw && (v.is_empty() || v == "." || v == "..") {
                    // A dot segment would change the path (`/v1/subscriptions/..` is `/v1/`).
                    return Err(MissingValue(format!("{{{n}}} (`{v}` is not an id)")));
                }
                out.push_str(&if raw { v } else { encode_segment(&v) });
                rest = &after[n.len() + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A value as one URL path segment: everything but RFC 3986's unreserved characters
/// percent-encoded (so `/`, `?` and `#` in an id cannot change the request).
fn encode_segment(s: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Fills the string values of a JSON body template.
pub(super) fn fill_json(v: &Value, vars: &Vars) -> Result<Value, MissingValue> {
    Ok(match v {
        Value::String(s) => Value::String(fill(s, vars, false)?),
        Value::Array(a) => Value::Array(a.iter().map(|x| fill_json(x, vars)).collect::<Result<_, _>>()?),
        Value::Object(m) => Value::Object(
            m.iter().map(|(k, x)| Ok((k.clone(), fill_json(x, vars)?))).collect::<Result<_, MissingValue>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_known_names_and_keep_other_braces() {
        let v = Vars {
            api_base: Some("http://127.0.0.1:9".into()),
            subscription_id: Some("sub 1/x".into()),
            ..Default::default()
        };
        assert_eq!(
            fill("{api_base}/v1/subscriptions/{subscription_id}", &v, true).unwrap(),
            "http://127.0.0.1:9/v1/subscriptions/sub%201%2Fx"
        );
        assert_eq!(
            fill("query { subscription(id: $id) { active } }", &v, false).unwrap(),
            "query { subscription(id: $id) { active } }"
        );
        assert_eq!(fill("/members/{customer_id}", &v, true), Err(MissingValue("{customer_id}".into())));
        assert_eq!(fill_with("Bearer {api_key}", &v, Some("sk_test"), false).unwrap(), "Bearer sk_test");
        assert_eq!(encode_segment("a?b#c é~-_."), "a%3Fb%23c%20%C3%A9~-_.");
        // A dot segment or nothing would change the path: refused (issue 20: an id `..` made
        // the request `GET {base}/v1/` with the key attached).
        for bad in ["", ".", ".."] {
            let v = Vars { subscription_id: Some(bad.into()), ..v.clone() };
            assert!(fill("{api_base}/v1/subscriptions/{subscription_id}", &v, true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_plan_knows_which_values_its_request_names() {
        let spec = |url: &str| ReconcileSpec { url: Some(url.into()), ..Default::default() };
        let by_customer = Plan::compile("f".into(), &spec("{api_base}/members/{customer_id}"), None);
        let by_subscription = Plan::compile("f".into(), &spec("{api_base}/v1/subscriptions/{subscription_id}"), None);
        assert!(by_customer.names("customer_id") && !by_customer.names("subscription_id"));
        assert!(by_subscription.names("subscription_id") && !by_subscription.names("customer_id"));
    }
}
