//! Explain: "why does this member (not) have access?" — the access in force now and, for
//! every change, the stored evidence: the raw event id, the YAML mapping that read it, the
//! rule (file:line, rule-set version) that decided, the transition and until when access
//! holds. Read-only; everything comes from what was stored when the event was processed.
//!
//! What this module must never do: recompute a decision under today's rules: it tells what
//! was decided then.

use crate::store::{EventFilter, EventRow, MemberDetail, Store};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::fmt::Write as _;

/// A member named by id or email.
pub enum Found {
    Member(Box<MemberDetail>),
    NotFound,
    /// An email more than one member has (in different tenants): (tenant, member id) each.
    Several(Vec<(String, String)>),
}

impl Found {
    /// The member, or what to tell the operator.
    pub fn one(self, who: &str) -> Result<MemberDetail, String> {
        match self {
            Found::Member(d) => Ok(*d),
            Found::NotFound => Err(format!("no member `{who}` (by id or email)")),
            Found::Several(ms) => Err(format!(
                "`{who}` is the email of {} members: {}; name one by its id",
                ms.len(),
                ms.iter().map(|(t, id)| format!("{id} (tenant {t})")).collect::<Vec<_>>().join(", ")
            )),
        }
    }
}

/// Finds a member by id or email; an email several members have is not guessed at.
pub fn find(store: &dyn Store, who: &str) -> crate::store::Result<Found> {
    if let Some(d) = store.member_detail(who, 0)? {
        return Ok(Found::Member(Box::new(d)));
    }
    let mut by_email = store.members_by_email(who)?;
    match by_email.len() {
        0 => Ok(Found::NotFound),
        1 => {
            Ok(store.member_detail(&by_email.remove(0).id, 0)?.map_or(Found::NotFound, |d| Found::Member(Box::new(d))))
        }
        _ => Ok(Found::Several(by_email.into_iter().map(|m| (m.tenant, m.id)).collect())),
    }
}

fn t(v: Option<DateTime<Utc>>) -> String {
    v.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap_or_else(|| "—".into())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

/// The member's story as JSON: access now, memberships, and every stored event with the
/// evidence of its decision.
pub fn explain_json(store: &dyn Store, d: &MemberDetail, now: DateTime<Utc>) -> crate::store::Result<Value> {
    let events = store.events_where(&EventFilter { member_id: Some(d.member.id.clone()), ..Default::default() })?;
    let mut out = crate::views::member_json(d, now);
    out["history"] = Value::Array(events.iter().map(history_entry).collect());
    out["as_of"] = json!(t(Some(now)));
    Ok(out)
}

/// An activity-log line plus what explain adds: the sequence number and the mapping.
fn history_entry(e: &EventRow) -> Value {
    let outcome = crate::store::json_of(&e.outcome);
    let mut v = crate::views::activity_json_with(e, &outcome);
    v["seq"] = json!(e.seq);
    v["mapping"] = outcome.get("mapping").cloned().unwrap_or(Value::Null);
    v["body_pruned_at"] = json!(e.body_pruned_at.map(|at| t(Some(at))));
    v
}

/// The same, as text for a terminal.
pub fn explain_text(j: &Value) -> String {
    let mut out = String::new();
    let name = j["name"].as_str().map(|n| format!("{n} ")).unwrap_or_default();
    let _ = writeln!(out, "{name}<{}>  ({})  tenant {}", s(&j["email"]), s(&j["id"]), s(&j["tenant"]));
    let levels: Vec<String> = j["access_levels"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
    let _ = writeln!(
        out,
        "Access as of {}: {}",
        s(&j["as_of"]),
        if levels.is_empty() { "NONE".to_string() } else { levels.join(", ") }
    );
    for flag in j["flags"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  ! {}", s(flag));
    }
    for e in j["erasures"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  Personal data erased at {} by {}", s(&e["erased_at"]), s(&e["erased_by"]));
    }
    let _ = writeln!(out, "\nMemberships:");
    for m in j["memberships"].as_array().into_iter().flatten() {
        let until = [("access_until", "access until"), ("grace_until", "grace until"), ("period_end", "period end")]
            .iter()
            .find(|(k, _)| !m[*k].is_null())
            .map(|(k, label)| format!(", {label} {}", s(&m[*k])))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {} {} (product {}): {} — {}{}",
            s(&m["provider"]),
            s(&m["subscription_id"]),
            s(&m["product_id"]),
            s(&m["state"]),
            if m["has_access"] == true {
                format!(
                    "access [{}]",
                    m["access_levels"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                )
            } else {
                "no access".into()
            },
            until
        );
        for flag in m["flags"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "      ! {}", s(flag));
        }
        for timer in m["timers"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "      timer {} due {}", s(&timer["name"]), s(&timer["due_at"]));
        }
    }
    let _ = writeln!(out, "\nHistory (oldest first):");
    for e in j["history"].as_array().into_iter().flatten() {
        let transition = match (&e["from"], &e["to"]) {
            (Value::String(f), Value::String(t)) => format!("{f} → {t}"),
            (Value::String(f), _) => format!("{f} (unchanged)"),
            _ => "no membership change".into(),
        };
        let _ = writeln!(
            out,
            "  {}  [{}] {} {} {} → {}: {} — {}",
            s(&e["occurred_at"]),
            s(&e["source"]),
            s(&e["provider"]),
            s(&e["event_id"]),
            s(&e["event_type"]),
            s(&e["kind"]),
            s(&e["status"]).to_uppercase(),
            transition
        );
        if !e["mapping"].is_null() {
            let m = &e["mapping"];
            let case = if m["case"].is_null() { String::new() } else { format!(", case \"{}\"", s(&m["case"])) };
            let _ = writeln!(out, "      mapping: {} events.{}{}", s(&m["file"]), s(&m["event"]), case);
            if let Some(by) = m["enriched_by"].as_str() {
                let _ = writeln!(out, "      fetched: {by}");
            }
        }
        if !e["rule"].is_null() {
            let r = &e["rule"];
            let _ = writeln!(
                out,
                "      rule:    {}:{} {} (rules {}) → input {}",
                s(&r["file"]),
                s(&r["line"]),
                s(&r["function"]),
                s(&r["version"]),
                s(&e["input"])
            );
        }
        for eff in e["effects"].as_array().into_iter().flatten() {
            let kind = s(&eff["type"]);
            let detail = match kind.as_str() {
                "grant_access" => format!(
                    "[{}] until {}",
                    eff["levels"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
                        .unwrap_or_default(),
                    s(&eff["until"])
                ),
                "revoke_access" => format!("({})", s(&eff["reason"])),
                "set_grace" | "set_access_until" => s(&eff["until"]),
                "schedule_timer" => format!("{} at {}", s(&eff["timer"]), s(&eff["at"])),
                "cancel_timer" => s(&eff["timer"]),
                "flag" => s(&eff["reason"]),
                _ => eff.get("email").map(s).unwrap_or_default(),
            };
            let _ = writeln!(out, "      effect:  {kind} {detail}");
        }
        if !e["reason"].is_null() {
            let _ = writeln!(out, "      why:     {}", s(&e["reason"]));
        }
        if !e["body_pruned_at"].is_null() {
            let _ = writeln!(
                out,
                "      body:    pruned at {} (the canonical form above is kept)",
                s(&e["body_pruned_at"])
            );
        }
    }
    out
}
