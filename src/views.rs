//! The JSON views of stored rows — a member with memberships, sync detail and activity, a
//! membership, an activity-log line, a stored event with its raw body — shared by the admin
//! API, `explain` and scenario files, so each shows a member the same way (the member JSON
//! the README documents).
//!
//! What this module must never do: read the store or show a secret; it shapes what it is
//! handed.

use crate::store::{EventRow, MemberDetail, MembershipRow};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// A time as the API shows it (RFC 3339, seconds, `Z`), or null.
pub fn rfc(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))).unwrap_or(Value::Null)
}

/// One membership as the API shows it.
pub fn membership_json(m: &MembershipRow, now: DateTime<Utc>, timers: &[crate::store::TimerRow]) -> Value {
    let has_access = m.has_access(now);
    json!({
        "id": m.id,
        "provider": m.provider,
        "subscription_id": m.subscription_id,
        "product_id": m.product_id,
        "plan_id": m.plan_id,
        "provider_status": m.status,
        "state": m.state,
        "has_access": has_access,
        "access_levels": if has_access { m.access_levels.clone() } else { vec![] },
        "period_end": rfc(m.period_end),
        "grace_until": rfc(m.grace_until),
        "access_until": rfc(m.access_until),
        "cancel_at_period_end": m.cancel_at_period_end,
        "last_event_at": rfc(m.last_event_at),
        "last_event_id": m.last_event_id,
        "last_reconciled_at": rfc(m.last_reconciled_at),
        "sync_status": m.sync_status,
        "flags": m.flags,
        "timers": timers.iter().filter(|t| t.membership_id == m.id)
            .map(|t| json!({"name": t.name, "due_at": rfc(Some(t.due_at)), "set_by_event": t.set_by_event}))
            .collect::<Vec<_>>(),
    })
}

/// The reconciliation detail next to `sync_status`: what the last comparison found, the
/// last drift corrected (what and when), the last provider error (what and when), and the
/// last webhook and last attempt times.
fn add_sync_json(j: &mut Value, s: Option<&crate::store::SyncRow>) {
    let d = crate::store::SyncRow::default();
    let s = s.unwrap_or(&d);
    if let Value::Object(o) = j {
        o.insert("last_webhook_at".into(), rfc(s.last_webhook_at));
        o.insert("last_reconcile_attempt_at".into(), rfc(s.attempted_at));
        o.insert("sync_detail".into(), json!(s.detail));
        o.insert("last_drift".into(), json!({ "at": rfc(s.drift_at), "what": s.drift }));
        o.insert("last_error".into(), json!({ "at": rfc(s.last_error_at), "error": s.last_error }));
    }
}

/// One activity-log line: the event, its outcome, the rule and transition, its source.
pub fn activity_json(e: &EventRow) -> Value {
    activity_json_with(e, &crate::store::json_of(&e.outcome))
}

/// `activity_json` with the event's outcome already parsed (`o`).
pub fn activity_json_with(e: &EventRow, o: &Value) -> Value {
    json!({
        "event_id": e.event_id,
        "provider": e.provider,
        "event_type": e.event_type,
        "kind": e.kind,
        "source": e.source,
        "status": e.status,
        "reason": e.reason,
        "occurred_at": rfc(e.occurred_at),
        "received_at": rfc(Some(e.received_at)),
        "membership_id": e.membership_id,
        "from": o.get("from").cloned().unwrap_or(Value::Null),
        "to": o.get("to").cloned().unwrap_or(Value::Null),
        "input": o.get("input").cloned().unwrap_or(Value::Null),
        "rule": o.get("rule").cloned().unwrap_or(Value::Null),
        "effects": o.get("effects").cloned().unwrap_or(Value::Null),
    })
}

/// The member JSON (the README's "HTTP API").
pub fn member_json(d: &MemberDetail, now: DateTime<Utc>) -> Value {
    let levels: BTreeSet<String> =
        d.memberships.iter().filter(|m| m.has_access(now)).flat_map(|m| m.access_levels.iter().cloned()).collect();
    json!({
        "id": d.member.id,
        "tenant": d.member.tenant,
        "email": d.member.email,
        "name": d.member.name,
        "has_access": !levels.is_empty() || d.memberships.iter().any(|m| m.has_access(now)),
        "access_levels": levels,
        "flags": d.member.flags,
        "memberships": d.memberships.iter().map(|m| {
            let mut j = membership_json(m, now, &d.timers);
            add_sync_json(&mut j, d.sync.iter().find(|s| s.membership_id == m.id));
            j
        }).collect::<Vec<_>>(),
        "recent_events": d.recent_events.iter().map(activity_json).collect::<Vec<_>>(),
        "erasures": d.erasures.iter().map(erasure_json).collect::<Vec<_>>(),
    })
}

/// One erasure of a member's personal data: who, when, what.
pub fn erasure_json(e: &crate::store::ErasureRow) -> Value {
    json!({ "erased_by": e.erased_by, "erased_at": rfc(Some(e.erased_at)), "detail": e.detail })
}

/// One stored event as `GET /events/{event_id}` shows it: the raw body (UTF-8, else
/// base64), headers, canonical event and outcome. A body retention dropped is
/// `{"encoding": "pruned", "body": null}`, and `body_pruned_at` says when.
pub fn event_json(e: &EventRow) -> Value {
    let raw = match std::str::from_utf8(&e.raw) {
        _ if e.body_pruned_at.is_some() => json!({ "encoding": "pruned", "body": null }),
        Ok(s) => json!({ "encoding": "utf-8", "body": s }),
        Err(_) => {
            json!({ "encoding": "base64", "body": base64::engine::general_purpose::STANDARD.encode(&e.raw) })
        }
    };
    json!({
        "seq": e.seq,
        "tenant": e.tenant,
        "provider": e.provider,
        "event_id": e.event_id,
        "idempotency_key": e.idempotency_key,
        "event_type": e.event_type,
        "kind": e.kind,
        "source": e.source,
        "status": e.status,
        "reason": e.reason,
        "received_at": rfc(Some(e.received_at)),
        "occurred_at": rfc(e.occurred_at),
        "member_id": e.member_id,
        "membership_id": e.membership_id,
        "raw": raw,
        "headers": e.headers,
        "canonical": e.canonical,
        "outcome": e.outcome,
        "deliveries": e.deliveries,
        "body_pruned_at": rfc(e.body_pruned_at),
    })
}
