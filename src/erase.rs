//! Erasure: a member's personal data removed on request, their access history kept.
//!
//! The member's email and name are blanked; every stored event naming them (under their
//! id, or under none but naming their email: a parked event, a failed one, an abandoned
//! checkout, a dead letter whose body holds it) has its raw body, headers, canonical form, outcome, reason and enrichment
//! rewritten without them; their leads are deleted. What stays: the member id, its
//! memberships, states, access, timers and customer links (so the provider's later
//! events still find the member), and every event's ids, kinds, outcome, rule and
//! transition, so `explain` still tells the story. The erasure itself is recorded: who,
//! when, and what was removed. From then on the member takes no email or name again and
//! matches no email (see `Tx::erase_member_row`).
//!
//! What counts as personal in a raw body: any value that is the member's email (or holds
//! it), their name, a word of it as the value of a field named for a name (`first_name`;
//! elsewhere a word such as `unpaid` may be the payload's own), and the value of any field named in
//! `erasure.personal_fields` of `membersync.yaml` (a phone number, an address line); the
//! email or the full name inside a longer text is replaced by `[erased]`. "The member's
//! email" and "name" are every one its events gave (a billing email, a fuller name), not
//! only those its row kept. The member's flags lose them too.
//!
//! What this module must never do: change what a membership grants, or leave the
//! member's email in an event it rewrote.

use crate::store::{self, ErasureRow, EventRow, StoredJson, Tx};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// What one erasure removed, as recorded and answered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detail {
    pub member_id: String,
    pub tenant: String,
    pub erased_by: String,
    pub erased_at: DateTime<Utc>,
    /// The member's own fields blanked (`email`, `name`: those it had).
    pub member_fields: Vec<String>,
    /// Events that named the member, and of those, how many held personal data and were
    /// rewritten.
    pub events_examined: usize,
    pub events_rewritten: usize,
    /// Leads (abandoned checkouts) of the member's email deleted.
    pub leads_deleted: u64,
}

/// What is personal for one member.
struct Personal {
    /// Lowercased: the emails and the names.
    values: Vec<String>,
    /// Lowercased: each word of a name (two letters or more), personal only as the value
    /// of a field whose key names a name (`first_name`, `last_name`): as any value it
    /// would also blank a payload's own words (`paid`, `unpaid`) when a name holds one.
    words: Vec<String>,
    /// Lowercased: the email and the full name, removed wherever they appear in text.
    phrases: Vec<String>,
    /// Field names (lowercased) whose values are removed whatever they hold.
    fields: Vec<String>,
}

/// The customer id an erased guest's membership is keyed by (followed by the member id).
pub const ERASED_CUSTOMER: &str = "erased-";

/// What replaces a personal phrase inside text (a reason, a note).
const ERASED: &str = "[erased]";

impl Personal {
    /// From every email and name the member was known by (its own, and each one its
    /// events gave: a provider may send a billing email or a fuller name for the same
    /// customer).
    fn of<'a>(
        emails: impl IntoIterator<Item = &'a str>,
        names: impl IntoIterator<Item = &'a str>,
        fields: &[String],
    ) -> Personal {
        let mut values = Vec::new();
        let mut phrases = Vec::new();
        let names: Vec<&str> = names.into_iter().collect();
        for v in emails.into_iter().chain(names.iter().copied()) {
            let v = v.trim().to_lowercase();
            if !v.is_empty() && !values.contains(&v) {
                values.push(v.clone());
                phrases.push(v);
            }
        }
        let words = names
            .iter()
            .flat_map(|n| n.split_whitespace().map(str::to_lowercase).filter(|w| w.chars().count() >= 2))
            .collect();
        // Longest first, so that a full name goes before a word of it.
        phrases.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Personal { values, words, phrases, fields: fields.to_vec() }
    }

    /// Whether `s`, the value of field `key` (none: an array's item at the top), is personal.
    fn is_personal(&self, key: Option<&str>, s: &str) -> bool {
        let l = s.trim().to_lowercase();
        !l.is_empty()
            && (self.values.contains(&l)
                || self.phrases.iter().any(|p| p.contains('@') && l.contains(p))
                || (self.words.contains(&l) && key.is_some_and(|k| last_key(k).contains("name"))))
    }

    fn is_personal_field(&self, key: &str) -> bool {
        self.fields.contains(&last_key(key))
    }

    /// Removes personal values from JSON: a personal string, or any value of a personal
    /// field, becomes `null`; returns whether anything changed.
    fn scrub_json(&self, v: &mut Value) -> bool {
        self.scrub_json_under(None, v)
    }

    /// `scrub_json` of the value of field `key` (an array's items keep their field's key).
    fn scrub_json_under(&self, key: Option<&str>, v: &mut Value) -> bool {
        match v {
            Value::String(s) if self.is_personal(key, s) => {
                *v = Value::Null;
                true
            }
            Value::Array(items) => items.iter_mut().fold(false, |c, x| self.scrub_json_under(key, x) | c),
            Value::Object(map) => {
                let mut changed = false;
                for (k, x) in map.iter_mut() {
                    if self.is_personal_field(k) && !x.is_null() {
                        *x = Value::Null;
                        changed = true;
                    } else {
                        changed |= self.scrub_json_under(Some(k), x);
                    }
                }
                changed
            }
            _ => false,
        }
    }

    /// Text with every personal phrase (any case) replaced by `[erased]`.
    fn scrub_text(&self, s: &str) -> String {
        let mut out = s.to_string();
        for p in &self.phrases {
            out = replace_ignoring_case(&out, p, ERASED);
        }
        out
    }

    /// A raw body without personal data: JSON scrubbed as JSON, a form field by field,
    /// anything else as text (a body that is not UTF-8 is kept as is: no provider sends one).
    fn scrub_body(&self, raw: &[u8]) -> Vec<u8> {
        if raw.is_empty() {
            return vec![];
        }
        if let Ok(mut v) = serde_json::from_slice::<Value>(raw) {
            // A value that is personal goes; the email or full name inside a longer text
            // (a description, a note) is replaced.
            let changed = self.scrub_json(&mut v) | self.scrub_strings(&mut v);
            return match changed {
                true => serde_json::to_vec(&v).unwrap_or_else(|_| raw.to_vec()),
                false => raw.to_vec(),
            };
        }
        let Ok(text) = std::str::from_utf8(raw) else { return raw.to_vec() };
        let looks_like_form = !text.trim().is_empty() && text.contains('=') && !text.contains(char::is_whitespace);
        if looks_like_form {
            let mut changed = false;
            let mut out = form_urlencoded::Serializer::new(String::new());
            for (k, v) in form_urlencoded::parse(raw) {
                if (self.is_personal_field(&k) || self.is_personal(Some(&k), &v)) && !v.is_empty() {
                    out.append_pair(&k, "");
                    changed = true;
                } else {
                    out.append_pair(&k, &v);
                }
            }
            return if changed { out.finish().into_bytes() } else { raw.to_vec() };
        }
        self.scrub_text(text).into_bytes()
    }

    /// Stored JSON without personal data (strings scrubbed as values and as text).
    fn scrub_stored(&self, j: &StoredJson) -> Option<StoredJson> {
        let mut v: Value = store::json_of(j);
        let mut changed = self.scrub_json(&mut v);
        changed |= self.scrub_strings(&mut v);
        changed.then(|| store::stored_json(&v))
    }

    /// Replaces personal phrases inside every string of `v`.
    fn scrub_strings(&self, v: &mut Value) -> bool {
        match v {
            Value::String(s) => {
                let t = self.scrub_text(s);
                let changed = t != *s;
                *s = t;
                changed
            }
            Value::Array(items) => items.iter_mut().fold(false, |c, x| self.scrub_strings(x) | c),
            Value::Object(map) => map.values_mut().fold(false, |c, x| self.scrub_strings(x) | c),
            _ => false,
        }
    }

    /// The event without personal data, if it held any.
    fn scrub_event(&self, e: &EventRow) -> Option<EventRow> {
        let mut out = e.clone();
        let mut changed = false;
        let raw = self.scrub_body(&e.raw);
        if raw != e.raw {
            out.raw = raw;
            changed = true;
        }
        if let Some(h) = self.scrub_stored(&e.headers) {
            out.headers = h;
            changed = true;
        }
        if let Some(c) = &e.canonical {
            let mut v = store::json_of(c);
            let mut c_changed = false;
            if let Some(m) = v.get_mut("member").and_then(Value::as_object_mut) {
                for f in ["email", "name"] {
                    if m.get(f).is_some_and(|x| !x.is_null()) {
                        m.insert(f.into(), Value::Null);
                        c_changed = true;
                    }
                }
            }
            c_changed |= self.scrub_json(&mut v);
            c_changed |= self.scrub_strings(&mut v);
            if c_changed {
                out.canonical = Some(store::stored_json(&v));
                changed = true;
            }
        }
        if let Some(o) = self.scrub_stored(&e.outcome) {
            out.outcome = o;
            changed = true;
        }
        if let Some(r) = &e.reason {
            let s = self.scrub_text(r);
            if s != *r {
                out.reason = Some(s);
                changed = true;
            }
        }
        if let Some(en) = &e.enrichment {
            let s = self.scrub_text(en);
            if s != *en {
                out.enrichment = Some(s);
                changed = true;
            }
        }
        changed.then_some(out)
    }
}

/// A field's own key, lowercased: `customer[first_name]` (a form's key) is `first_name`.
fn last_key(key: &str) -> String {
    key.trim_end_matches(']').rsplit('[').next().unwrap_or(key).to_lowercase()
}

/// `s` with every occurrence of `lower_needle` (already lowercased), in any case, replaced.
fn replace_ignoring_case(s: &str, lower_needle: &str, with: &str) -> String {
    if lower_needle.is_empty() {
        return s.to_string();
    }
    let lower = s.to_lowercase();
    // Lowercasing may change byte lengths (rare letters): then match on the text as is.
    if lower.len() != s.len() {
        return s.replace(lower_needle, with);
    }
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    while let Some(i) = lower[at..].find(lower_needle) {
        out.push_str(&s[at..at + i]);
        out.push_str(with);
        at += i + lower_needle.len();
    }
    out.push_str(&s[at..]);
    out
}

/// Erases member `member_id`'s personal data (one write: all of it or none) and records
/// who asked; `None` if there is no such member.
pub async fn erase_member(ctx: &crate::pipeline::Ctx, member_id: &str, by: &str) -> store::Result<Option<Detail>> {
    let fields = ctx.config().personal_fields.clone();
    let (id, by, now) = (member_id.to_string(), by.to_string(), ctx.clock.now());
    ctx.store.write(move |tx| erase(tx, &fields, &id, &by, now)).await
}

/// Erases member `member_id`'s personal data inside the writer's transaction and records
/// it; `None` if there is no such member. `personal_fields`: `erasure.personal_fields`.
pub fn erase(
    tx: &mut dyn Tx,
    personal_fields: &[String],
    member_id: &str,
    by: &str,
    now: DateTime<Utc>,
) -> store::Result<Option<Detail>> {
    let Some(m) = tx.member(member_id)? else { return Ok(None) };
    let email_lc = m.email.as_deref().map(str::to_lowercase);
    let events = tx.events_naming(&m.tenant, &m.id, email_lc.as_deref())?;
    // Every email and name the member's events gave, not only the ones its row kept.
    let given = |field: &str| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| e.canonical.as_ref())
            .filter_map(|c| store::json_of(c)["member"][field].as_str().map(str::to_string))
            .collect()
    };
    let (emails, names) = (given("email"), given("name"));
    let personal = Personal::of(
        m.email.as_deref().into_iter().chain(emails.iter().map(String::as_str)),
        m.name.as_deref().into_iter().chain(names.iter().map(String::as_str)),
        personal_fields,
    );
    let mut rewritten = 0;
    for e in &events {
        if let Some(clean) = personal.scrub_event(e) {
            tx.rewrite_event(&clean)?;
            rewritten += 1;
        }
    }
    let leads_deleted = tx.delete_leads(&m.tenant, email_lc.as_deref(), &m.id)?;
    // Flags name an email now and then ("merged member … both had the email …").
    let flags: Vec<String> = m.flags.iter().map(|f| personal.scrub_text(f)).collect();
    tx.erase_member_row(&m.id, &flags, now)?;
    for mut ms in tx.memberships_of(&m.id)? {
        let scrubbed: Vec<String> = ms.flags.iter().map(|f| personal.scrub_text(f)).collect();
        if scrubbed != ms.flags {
            ms.flags = scrubbed;
            tx.save_membership(&ms)?;
        }
        // A guest's one-time purchase (no provider customer id) is keyed by the buyer's
        // email: re-keyed by a customer id no provider sends, linked to this member, so
        // that its timers still find it and a later purchase with that email (someone new
        // to us) does not.
        if let Some(i) = ms.key.find("@email:") {
            let cid = format!("{ERASED_CUSTOMER}{}", m.id);
            let new_key = format!("{}@cid:{cid}", &ms.key[..i]);
            tx.link_customer(&m.tenant, &ms.provider, &cid, &m.id)?;
            tx.rekey_membership(&ms.id, &ms.key, &new_key)?;
        }
    }
    let member_fields: Vec<String> = [("email", m.email.is_some()), ("name", m.name.is_some())]
        .into_iter()
        .filter(|(_, had)| *had)
        .map(|(f, _)| f.to_string())
        .collect();
    let detail = Detail {
        member_id: m.id.clone(),
        tenant: m.tenant.clone(),
        erased_by: by.to_string(),
        erased_at: now,
        member_fields,
        events_examined: events.len(),
        events_rewritten: rewritten,
        leads_deleted,
    };
    tx.record_erasure(&ErasureRow {
        tenant: m.tenant,
        member_id: m.id,
        erased_by: by.to_string(),
        erased_at: now,
        detail: serde_json::json!({
            "member_fields": detail.member_fields,
            "events_examined": detail.events_examined,
            "events_rewritten": detail.events_rewritten,
            "leads_deleted": detail.leads_deleted,
            "personal_fields": personal_fields,
        }),
    })?;
    Ok(Some(detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ada() -> Personal {
        Personal::of(["Ada@Example.com"], ["Ada Lovelace"], &["phone".into(), "line1".into()])
    }

    #[test]
    fn a_json_body_loses_the_email_the_name_its_words_and_personal_fields_and_keeps_the_rest() {
        let body = br#"{"id":"evt_1","data":{"customer":"cus_1","email":"ada@example.com","name":"Ada Lovelace",
            "first_name":"Ada","phone":"+44 20 7946 0000","address":{"line1":"12 Analytical St"},
            "product":"prod_Pro001","note":"Contact: ADA@EXAMPLE.COM"}}"#;
        let out: Value = serde_json::from_slice(&ada().scrub_body(body)).unwrap();
        let d = &out["data"];
        assert_eq!(d["customer"], "cus_1");
        assert_eq!(d["product"], "prod_Pro001");
        for f in ["email", "name", "first_name", "phone", "note"] {
            assert_eq!(d[f], Value::Null, "{f}");
        }
        assert_eq!(d["address"]["line1"], Value::Null);
        assert!(!String::from_utf8_lossy(&ada().scrub_body(body)).to_lowercase().contains("ada"));
    }

    #[test]
    fn a_word_of_the_name_goes_only_as_a_name_fields_value() {
        let p = Personal::of(["ada@example.com"], ["Ada Unpaid"], &[]);
        let body = br#"{"payment_status":"unpaid","customer":{"last_name":"Unpaid","names":["Ada"]}}"#;
        let out: Value = serde_json::from_slice(&p.scrub_body(body)).unwrap();
        assert_eq!(out["payment_status"], "unpaid");
        assert_eq!(out["customer"]["last_name"], Value::Null);
        assert_eq!(out["customer"]["names"][0], Value::Null);
    }

    #[test]
    fn a_form_body_is_scrubbed_field_by_field() {
        let body = b"event=order.success&customer%5Bemail%5D=ada%40example.com&customer%5Bname%5D=Ada+Lovelace&customer%5Bphone%5D=123&product_id=7";
        let out = String::from_utf8(ada().scrub_body(body)).unwrap();
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(out.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        let get = |k: &str| pairs.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        assert_eq!(get("event"), Some("order.success"));
        assert_eq!(get("product_id"), Some("7"));
        assert_eq!(get("customer[email]"), Some(""));
        assert_eq!(get("customer[name]"), Some(""));
        assert_eq!(get("customer[phone]"), Some(""));
    }

    #[test]
    fn text_loses_each_phrase_in_any_case() {
        assert_eq!(
            ada().scrub_text("no member with email ADA@example.COM (Ada Lovelace)"),
            "no member with email [erased] ([erased])"
        );
        assert_eq!(ada().scrub_text("nothing personal"), "nothing personal");
    }

    #[test]
    fn a_body_without_personal_data_is_kept_byte_for_byte() {
        let body = b"{ \"id\": \"evt_2\",  \"customer\": \"cus_9\" }";
        assert_eq!(ada().scrub_body(body), body.to_vec());
    }
}
