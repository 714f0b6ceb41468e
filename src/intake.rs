//! Intake: how a delivery enters — its signature verified with the provider's scheme (and
//! the legacy ones its file also accepts), a secret carried in the body redacted, the body
//! decoded and its fields extracted onto the canonical event. The webhook handler,
//! `simulate`, scenario files, replay and parked events all take a delivery in through
//! `intake`, so they read it the same way.
//!
//! What this module must never do: store or log a secret, decide what an event means (the
//! rules do), or turn an unreadable field into a refusal to store: a delivery whose fields
//! cannot be read is still taken in, as a `Failure` the pipeline stores as a dead letter.

use crate::config::Config;
use crate::extract::decode::DecodeError;
use crate::extract::{Extraction, Failure, Headers};
use crate::secret::Secret;
use chrono::{DateTime, Utc};

/// One delivery as it arrived.
pub struct Delivery<'a> {
    pub tenant: &'a str,
    pub provider: &'a str,
    /// (lower-case name, value)
    pub headers: &'a Headers,
    pub body: &'a [u8],
    pub received_at: DateTime<Utc>,
}

/// Whether the signature is checked: a delivery from outside is; one already stored
/// (replay, parked) or made by the operator (`simulate`, scenario files) is not.
#[derive(Clone, Copy)]
pub enum Check<'a> {
    /// With this tenant's secret for the provider (`None`: none configured, so refused).
    Signature(Option<&'a Secret>),
    Trusted,
}

/// A delivery taken in.
pub struct Taken {
    /// The body as it may be stored and shown (a secret carried in it redacted).
    pub body: Vec<u8>,
    /// The canonical event, or what is known of a delivery whose fields could not be read.
    pub extracted: Result<Extraction, Box<Failure>>,
}

/// Why a delivery was not taken in at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no provider file for `{0}`")]
    UnknownProvider(String),
    #[error(transparent)]
    Unverified(#[from] crate::verify::Error),
    #[error(transparent)]
    Undecodable(#[from] DecodeError),
    /// An id longer than any provider's: refused whole (400), so no stored row carries it.
    #[error("the {what} is {len} bytes long; at most {MAX_ID_BYTES} are taken")]
    TooLong { what: &'static str, len: usize },
}

/// The longest event id, idempotency key or event type taken (providers' are tens of bytes).
pub const MAX_ID_BYTES: usize = 256;

/// What stands in for U+0000 in what is taken from a delivery.
const NUL_STANDS_FOR: &str = "\u{FFFD}";

/// Whether a body may carry U+0000 into a field: escaped in JSON (`\u0000`), encoded in a
/// form (`%00`), or as it is. Checked before anything is rewritten: almost no body does.
fn may_hold_nul(body: &[u8]) -> bool {
    body.contains(&0) || body.windows(6).any(|w| w == b"\\u0000") || body.windows(3).any(|w| w == b"%00")
}

/// U+0000 replaced by U+FFFD in every field taken from a delivery: PostgreSQL's text holds
/// no U+0000 (SQLite's does), and a provider's field (a customer's name) must not decide
/// which store can take the delivery; both store the same. The raw body is kept as sent.
fn without_nul(extracted: &mut Result<Extraction, Box<Failure>>) {
    let fix = |s: &mut String| {
        if s.contains('\0') {
            *s = s.replace('\0', NUL_STANDS_FOR);
        }
    };
    match extracted {
        Ok(x) => {
            fix(&mut x.idempotency_key);
            if let Some(plan) = &mut x.enrich {
                plan.vars.values_mut().for_each(fix);
            }
            let mut v = match serde_json::to_value(&x.event) {
                Ok(v) => v,
                Err(_) => return,
            };
            fn walk(v: &mut serde_json::Value) {
                match v {
                    serde_json::Value::String(s) if s.contains('\0') => *s = s.replace('\0', NUL_STANDS_FOR),
                    serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
                    serde_json::Value::Object(o) => o.values_mut().for_each(walk),
                    _ => {}
                }
            }
            walk(&mut v);
            if let Ok(event) = serde_json::from_value(v) {
                x.event = event;
            }
        }
        Err(f) => {
            fix(&mut f.idempotency_key);
            fix(&mut f.event_id);
            fix(&mut f.event_type);
        }
    }
}

/// Takes one delivery in: verify (per `check`) → redact → decode → extract.
pub fn intake(config: &Config, d: &Delivery<'_>, check: Check<'_>) -> Result<Taken, Error> {
    let unknown = || Error::UnknownProvider(d.provider.to_string());
    let extractor = config.extractors.get(d.provider).ok_or_else(unknown)?;
    let verifier = config.verifiers.get(d.provider).ok_or_else(unknown)?;
    if let Check::Signature(secret) = check {
        verifier.verify(secret, d.headers, d.body, d.received_at)?;
    }
    // A secret carried in the body never reaches storage, nor a body hash shown as an id.
    let body = verifier.scheme.redact(d.body);
    let content_type = d.headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str());
    let decoded = extractor.decode_captured(d.body, content_type)?;
    let mut extracted = extractor.extract(d.tenant, &decoded, &body, d.headers, d.received_at);
    if may_hold_nul(d.body) {
        without_nul(&mut extracted);
    }
    let ids = match &extracted {
        Ok(x) => [
            ("event id", &x.event.event_id),
            ("idempotency key", &x.idempotency_key),
            ("event type", &x.event.event_type),
        ],
        Err(f) => [("event id", &f.event_id), ("idempotency key", &f.idempotency_key), ("event type", &f.event_type)],
    };
    if let Some((what, id)) = ids.into_iter().find(|(_, id)| id.len() > MAX_ID_BYTES) {
        return Err(Error::TooLong { what, len: id.len() });
    }
    Ok(Taken { body, extracted })
}
