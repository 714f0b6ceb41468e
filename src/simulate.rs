//! `simulate`: one payload run as a dry run — taken in as ingest takes it (without the
//! signature), optionally against a membership seeded in a given state, through the
//! pipeline into the store it is given (in memory unless `--apply`) — and the JSON it
//! prints. And `expand_time`, the `${now…}` placeholders of example payloads, which
//! `simulate` and `send` fill the same way.
//!
//! What this module must never do: write to the configured database unless handed it.

use crate::canonical::Source;
use crate::clock::FixedClock;
use crate::config::Config;
use crate::intake::{intake, Check, Delivery};
use crate::machine::MState;
use crate::pipeline::{self, Ctx, Incoming, Raw};
use crate::rules::RuleSet;
use crate::store::{self, Store};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::sync::Arc;

/// Why a payload could not be simulated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An unknown provider or tenant, named with the known ones.
    #[error("{0}")]
    Unknown(String),
    /// The payload could not be taken in; the cause is its source.
    #[error("Failed to decode the payload")]
    Intake(#[from] crate::intake::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A `${now…}` placeholder that cannot be read.
    #[error("{0}")]
    Template(String),
}

/// What `simulate` runs.
pub struct SimulateInput {
    pub provider: String,
    pub tenant: String,
    pub headers: Vec<(String, String)>,
    pub now: Option<DateTime<Utc>>,
    /// Seed the membership in this state first.
    pub state: Option<MState>,
    pub body: Vec<u8>,
    pub content_type: String,
}

/// The JSON `simulate` prints for one payload.
pub async fn simulate_json(
    config: Config,
    rules: RuleSet,
    store: Arc<dyn Store>,
    input: SimulateInput,
) -> Result<serde_json::Value, Error> {
    let SimulateInput { provider, tenant, headers, now, state, body, content_type } = input;
    let (provider, tenant, content_type) = (provider.as_str(), tenant.as_str(), content_type.as_str());
    if !config.extractors.contains_key(provider) {
        let known: Vec<&str> = config.extractors.keys().map(String::as_str).collect();
        return Err(Error::Unknown(crate::diagnostic::unknown("provider", provider, &known)));
    }
    if !config.tenants.contains_key(tenant) {
        let known: Vec<&str> = config.tenants.keys().map(String::as_str).collect();
        return Err(Error::Unknown(crate::diagnostic::unknown("tenant", tenant, &known)));
    }
    let mut with_type = headers.clone();
    if !with_type.iter().any(|(k, _)| k == "content-type") {
        with_type.push(("content-type".into(), content_type.into()));
    }
    let received_at = now.unwrap_or_else(Utc::now);
    let delivery = Delivery { tenant, provider, headers: &with_type, body: &body, received_at };
    // As ingest takes it in (a secret carried in the body redacted), without the signature.
    let taken = intake(&config, &delivery, Check::Trusted)?;
    let (body, extracted) = (taken.body, taken.extracted);
    let at = now.unwrap_or_else(|| match &extracted {
        Ok(x) => x.event.occurred_at,
        Err(f) => f.occurred_at.unwrap_or_else(Utc::now),
    });
    let event = extracted.as_ref().ok().map(|x| x.event.clone());
    if let (Some(state), Some(ev)) = (state, event.clone()) {
        let seed_config = config.clone();
        store.write(move |tx| pipeline::seed_membership(tx, &seed_config, &ev, state)).await?;
    }
    // What the delivery leaves out is fetched as `serve` would (a read-only request, with
    // the tenant's API key), so the dry run shows what the delivery would grant.
    let enrichment = match extracted.as_ref().ok().and_then(|x| x.enrich.as_ref()) {
        Some(plan) => Some(crate::enrich::fetch(&config, tenant, provider, plan).await.map_err(|e| e.to_string())),
        None => None,
    };
    let incoming = Incoming::of(tenant, provider, extracted);
    let ctx = Arc::new(Ctx::new(config, rules, store, Arc::new(FixedClock::new(at))));
    let raw = Raw { body, headers, source: Source::Simulate, delivery: false, enrichment };
    let ack = pipeline::process(&ctx, incoming, raw).await?;
    let o = ack.outcome;
    let mut out = json!({
        "event": event,
        "outcome": {
            "status": o.status,
            "from": o.from,
            "to": o.to,
            "input": o.input,
            "effects": o.effects,
            "reason": o.reason,
            "mapping": o.mapping,
            "rule": o.rule,
        }
    });
    if let Some(s) = state {
        out["seeded_state"] = json!(s);
    }
    Ok(out)
}

/// Replaces `"${now}"`, `"${now+30d}"`, `"${now-90s}"` (units s, m, h, d; quoted or not)
/// with unix seconds, so example payloads can describe a story that starts when sent.
/// Bodies without placeholders pass through unchanged.
pub fn expand_time(body: &[u8], now: i64) -> Result<Vec<u8>, Error> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Ok(body.to_vec());
    };
    if !text.contains("${now") {
        return Ok(body.to_vec());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${now") {
        let quoted = rest[..i].ends_with('"');
        out.push_str(&rest[..if quoted { i - 1 } else { i }]);
        let after = &rest[i + 5..];
        let close = after.find('}').ok_or_else(|| Error::Template("unclosed ${now…} placeholder".into()))?;
        let spec = &after[..close];
        let offset = if spec.is_empty() {
            0
        } else {
            let (sign, num) = spec.split_at(1);
            let (digits, unit) = num.split_at(num.len().saturating_sub(1));
            let n: i64 = digits.parse().map_err(|_| Error::Template(format!("bad placeholder ${{now{spec}}}")))?;
            let secs = match unit {
                "s" => n,
                "m" => n * 60,
                "h" => n * 3600,
                "d" => n * 86_400,
                _ => return Err(Error::Template(format!("bad unit in ${{now{spec}}}: use s, m, h or d"))),
            };
            match sign {
                "+" => secs,
                "-" => -secs,
                _ => return Err(Error::Template(format!("bad placeholder ${{now{spec}}}: use +N or -N"))),
            }
        };
        out.push_str(&(now + offset).to_string());
        rest = &after[close + 1..];
        if quoted && rest.starts_with('"') {
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_time_replaces_quoted_and_bare_placeholders() {
        let got = expand_time(br#"{"a": "${now}", "b": ${now+2m}, "c": "${now-1d}", "d": "x"}"#, 1000).unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), r#"{"a": 1000, "b": 1120, "c": -85400, "d": "x"}"#);
        assert_eq!(expand_time(b"{}", 5).unwrap(), b"{}");
        assert!(expand_time(b"${now+3y}", 5).is_err());
        assert!(expand_time(b"${now", 5).is_err());
    }
}
