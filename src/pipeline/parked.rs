//! Parked events: an event that arrived before the one starting its membership is stored
//! with a park key (the membership key it waits for; `pay:<ref>` for the payment it names,
//! when it names no membership; or empty for "a membership of the member it names") and
//! run again once that membership exists or that payment is tied to one; replay reads
//! stored events back into the pipeline's input the same way.
//!
//! What this module must never do: run an event (the pipeline does) or release one that
//! waits for another member.

use super::outcome::{Incoming, Raw};
use crate::canonical::Source;
use crate::config::Config;
use crate::extract::Failure;
use crate::intake::{intake, Check, Delivery};
use crate::store::{self, EventRow, MemberRow, MembershipRow, Tx};

/// The park key of an event whose enrichment could not be made (tried again by the
/// reconcile schedule), and the flag its member carries.
pub const ENRICH_KEY: &str = "enrich:";
pub const ENRICH_FLAG: &str = "line items unknown";

/// The park key of a payment reference (`invoice:…`, `payment:…`, `charge:…`).
pub(super) fn payment_key(r: &str) -> String {
    format!("pay:{r}")
}

/// What an event that found no membership waits for: the membership it names, else a
/// membership of the member it names, else the payment it names (its bill first, which
/// every provider event about that payment names).
pub(super) fn park_key(mkey: Option<&str>, ev: &crate::canonical::CanonicalEvent) -> String {
    let names_member = ev.member.provider_customer_id.is_some() || ev.member.email.is_some();
    match (mkey, ev.payment.refs().first()) {
        (Some(k), _) => k.to_string(),
        (None, Some(r)) if !names_member => payment_key(r),
        _ => String::new(),
    }
}

/// Whether the parked event `e` waits for `ms`, which now exists: it waits for its key, or
/// for a membership of `mem` (by its provider customer id or email).
pub(super) fn waits_for(tx: &mut dyn Tx, e: &EventRow, ms: &MembershipRow, mem: &MemberRow) -> store::Result<bool> {
    if e.park_key.as_deref() != Some("") {
        return Ok(true); // `tx.parked` found it by the membership's key
    }
    let canonical = e.canonical.as_deref().map(store::json_of);
    let who = canonical.as_ref().map(|c| &c["member"]);
    let cid = who.and_then(|w| w["provider_customer_id"].as_str());
    let email = who.and_then(|w| w["email"].as_str());
    let by_customer = match cid {
        Some(c) => tx.member_by_customer(&ms.tenant, &ms.provider, c)?.is_some_and(|m| m.id == mem.id),
        None => false,
    };
    let by_email = email.is_some_and(|e| mem.email.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(e)));
    Ok(by_customer || by_email)
}

/// A stored event as the pipeline's input again (replay, release of parked events):
/// decoded and extracted from its raw body under the current provider YAML, keeping its
/// idempotency key. `None` if its provider has no YAML any more.
/// An event whose body retention dropped, to run again from what was stored of it: its
/// canonical form and the mapping that produced it (so the rules in force decide again;
/// an edited provider file cannot re-read it). One stored without a canonical form (its
/// fields could not be read) is unreadable again, saying why.
fn from_canonical(
    e: &EventRow,
    pruned_at: chrono::DateTime<chrono::Utc>,
    enrichment: Option<Result<crate::enrich::Enriched, String>>,
) -> (Incoming, Raw) {
    let raw = Raw { body: vec![], headers: vec![], source: Source::Replay, delivery: false, enrichment };
    let event =
        e.canonical.as_ref().and_then(|c| serde_json::from_str::<crate::canonical::CanonicalEvent>(c.get()).ok());
    let incoming = match event {
        Some(event) => {
            let outcome = store::json_of(&e.outcome);
            let mapping =
                outcome.get("mapping").and_then(|m| serde_json::from_value(m.clone()).ok()).unwrap_or_else(|| {
                    crate::extract::Mapping::new(format!("{}.yaml", e.provider), Some(e.event_type.clone()))
                });
            Incoming::Extracted(Box::new(crate::extract::Extraction {
                event,
                idempotency_key: e.idempotency_key.clone(),
                mapping,
                enrich: None,
            }))
        }
        None => unreadable(
            e,
            format!(
                "its raw body was pruned at {} and its fields were never read",
                pruned_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        ),
    };
    (incoming, raw)
}

/// Stored event `e` as one whose fields cannot be read, for `error`.
fn unreadable(e: &EventRow, error: String) -> Incoming {
    Incoming::Unreadable {
        provider: e.provider.clone(),
        tenant: e.tenant.clone(),
        failure: Box::new(Failure {
            idempotency_key: e.idempotency_key.clone(),
            event_id: e.event_id.clone(),
            event_type: e.event_type.clone(),
            occurred_at: e.occurred_at,
            error: crate::extract::Error::Undecodable(error),
        }),
    }
}

pub fn incoming_from_row(config: &Config, e: &EventRow) -> Option<(Incoming, Raw)> {
    if e.provider == crate::manual::PROVIDER {
        return crate::manual::incoming_from_row(e);
    }
    config.extractors.get(&e.provider)?;
    let headers: Vec<(String, String)> = serde_json::from_str(e.headers.get()).unwrap_or_default();
    let enrichment = e.enrichment.as_deref().and_then(|j| serde_json::from_str(j).ok()).map(Ok);
    if let Some(pruned_at) = e.body_pruned_at {
        return Some(from_canonical(e, pruned_at, enrichment));
    }
    let raw =
        Raw { body: e.raw.clone(), headers: headers.clone(), source: Source::Replay, delivery: false, enrichment };
    let delivery = Delivery {
        tenant: &e.tenant,
        provider: &e.provider,
        headers: &headers,
        body: &e.raw,
        received_at: e.received_at,
    };
    let incoming = match intake(config, &delivery, Check::Trusted) {
        Err(err) => unreadable(e, err.to_string()),
        Ok(taken) => match taken.extracted {
            Ok(mut ex) => {
                ex.idempotency_key = e.idempotency_key.clone();
                Incoming::Extracted(Box::new(ex))
            }
            Err(failure) => Incoming::Unreadable { provider: e.provider.clone(), tenant: e.tenant.clone(), failure },
        },
    };
    Some((incoming, raw))
}
