//! Erasure: a member's personal data removed on request (`DELETE
//! /members/{id}/personal-data`, `membersync erase`), their access and its history kept.
//! Tried as a careless operator and a provider would: erase, then look for the email
//! anywhere it was stored; erase, then explain and re-derive; erase, then let the
//! provider send the member again.

use crate::support::*;
use membersync::clock::{Clock, SystemClock};
use membersync::store::{EventFilter, EventRow};
use serde_json::Value;
use std::path::Path;

const EMAIL: &str = "ada@example.com";

async fn post_edited(server: &Server, name: &str, edit: impl FnOnce(&mut Value)) -> (u16, Value) {
    let mut v: Value = serde_json::from_slice(&fixture("stripe", name)).unwrap();
    edit(&mut v);
    let body = serde_json::to_vec(&v).unwrap();
    let headers = signed_headers(&server.ctx, "stripe", &body, SystemClock.now());
    server.post("/webhooks/demo/stripe", &headers, body).await
}

/// Ada: an abandoned checkout (a lead, with her phone), then the purchase, the
/// subscription and a paid invoice.
async fn ada(server: &Server) -> String {
    let (status, body) = post_edited(server, "checkout_session_expired", |v| {
        let d = &mut v["data"]["object"]["customer_details"];
        d["email"] = EMAIL.into();
        d["name"] = "Ada Lovelace".into();
        d["phone"] = "+44 20 7946 0018".into();
        v["id"] = "evt_ada_abandoned".into();
    })
    .await;
    assert_eq!(status, 200, "{body}");
    for f in ["checkout_session_completed", "customer_subscription_created", "invoice_paid"] {
        let (status, body) = server.post_signed(f).await;
        assert_eq!(status, 200, "{f}: {body}");
    }
    let (status, found) = server.get(&format!("/members?email={EMAIL}"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{found}");
    found["members"][0]["id"].as_str().expect("ada is a member").to_string()
}

fn stored_of(server: &Server, member_id: &str) -> Vec<EventRow> {
    let mut all = server
        .ctx
        .store
        .events_where(&EventFilter { member_id: Some(member_id.into()), ..Default::default() })
        .unwrap();
    all.extend(server.ctx.store.events_by_event_id("evt_ada_abandoned").unwrap());
    all
}

/// Every stored trace of an event, as text, lowercased.
fn text_of(e: &EventRow) -> String {
    format!(
        "{} {} {} {} {} {}",
        String::from_utf8_lossy(&e.raw),
        e.headers.get(),
        e.canonical.as_ref().map(|c| c.get()).unwrap_or_default(),
        e.outcome.get(),
        e.reason.clone().unwrap_or_default(),
        e.enrichment.clone().unwrap_or_default()
    )
    .to_lowercase()
}

/// What explain says happened, without the member's own fields.
fn history(server: &Server, id: &str) -> Value {
    let d = server.ctx.store.member_detail(id, 100).unwrap().unwrap();
    let j = membersync::explain::explain_json(&*server.ctx.store, &d, SystemClock.now()).unwrap();
    serde_json::json!({ "history": j["history"], "memberships": j["memberships"], "access_levels": j["access_levels"] })
}

#[tokio::test]
async fn erasure_removes_every_stored_trace_and_keeps_access_and_its_story() {
    let server = Server::start().await;
    let id = ada(&server).await;
    let before = history(&server, &id);
    let stored = stored_of(&server, &id);
    assert!(stored.iter().any(|e| text_of(e).contains(EMAIL)), "the fixtures hold the email");
    let (_, leads) = server.get("/leads", Some(TOKEN)).await;
    assert!(leads.to_string().contains(EMAIL), "{leads}");

    let url = format!("{}/members/{id}/personal-data", server.url);
    let resp = reqwest::Client::new().delete(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "erased without a token");
    let (status, done) = server.delete(&format!("/members/{id}/personal-data"), TOKEN).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["member_id"], id.as_str());
    assert_eq!(done["member_fields"], serde_json::json!(["email", "name"]));
    assert_eq!(done["leads_deleted"], 1);
    assert!(done["events_rewritten"].as_u64().unwrap() >= 3, "{done}");
    assert_eq!(done["erased_by"], "the global admin token");

    // No trace of her email, name, or phone anywhere it was stored.
    for e in stored_of(&server, &id) {
        let t = text_of(&e);
        for gone in [EMAIL, "lovelace", "7946 0018"] {
            assert!(!t.contains(gone), "{gone} kept in {} #{}: {t}", e.event_id, e.seq);
        }
    }
    let (_, leads) = server.get("/leads", Some(TOKEN)).await;
    assert!(!leads.to_string().to_lowercase().contains(EMAIL), "{leads}");
    let (_, found) = server.get(&format!("/members?email={EMAIL}"), Some(TOKEN)).await;
    assert_eq!(found["members"], serde_json::json!([]), "an erased member matched by email");

    // The member, its access and its history stay, with the erasure recorded.
    let (status, m) = server.get(&format!("/members/{id}"), Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!((m["email"].clone(), m["name"].clone()), (Value::Null, Value::Null));
    assert_eq!(m["has_access"], true, "{m}");
    assert_eq!(m["erasures"][0]["erased_by"], "the global admin token", "{m}");
    assert_eq!(m["erasures"][0]["detail"]["leads_deleted"], 1, "{m}");
    // The same story, with her email gone from it (the lead conversion's effect named it).
    let without: Value = serde_json::from_str(&before.to_string().replace(&format!("\"{EMAIL}\""), "null")).unwrap();
    assert_ne!(without, before);
    assert_eq!(history(&server, &id), without, "explain's story changed");

    // Re-derivation from the rewritten bodies finds the state as stored.
    let run = membersync::replay::dry_run(&server.ctx, &EventFilter::default(), SystemClock.now()).await.unwrap();
    assert!(run.differences.is_empty(), "{:?}", run.differences);

    // A purchase naming her email under another customer is someone new to us.
    let (status, body) = post_edited(&server, "checkout_session_completed", |v| {
        v["id"] = "evt_new_ada".into();
        v["data"]["object"]["customer"] = "cus_NewAda".into();
        v["data"]["object"]["subscription"] = "sub_NewAda".into();
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, found) = server.get(&format!("/members?email={EMAIL}"), Some(TOKEN)).await;
    let ids: Vec<&str> = found["members"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "{found}");
    let newcomer = ids[0].to_string();
    assert_ne!(newcomer, id, "the erased member matched by email");
    // The provider then sends the erased member's invoice again, naming her email: it
    // reaches the erased member by customer id, which learns no email and merges with no one.
    let (status, body) = post_edited(&server, "invoice_paid", |v| {
        v["id"] = "evt_after_erasure".into();
        v["data"]["object"]["id"] = "in_AfterErasure".into();
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, m) = server.get(&format!("/members/{id}"), Some(TOKEN)).await;
    assert_eq!(m["email"], Value::Null, "an erased member took its email again: {m}");
    assert!(m["recent_events"].to_string().contains("evt_after_erasure"), "{m}");
    assert!(!m.to_string().to_lowercase().contains(EMAIL), "{m}");
    let (status, other) = server.get(&format!("/members/{newcomer}"), Some(TOKEN)).await;
    assert_eq!(status, 200, "the newcomer was merged away: {other}");
    assert_eq!(other["email"], EMAIL);

    let (status, _) = server.delete("/members/mbr_nobody/personal-data", TOKEN).await;
    assert_eq!(status, 404);
    server.stop().await;
}

fn run(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_membersync")).args(args).current_dir(dir).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test]
async fn erase_on_the_command_line_takes_an_email_and_records_who() {
    let (dir, mut config) = editable_config();
    config.database = dir.path().join("membersync.db").display().to_string();
    let clock = std::sync::Arc::new(membersync::clock::FixedClock::new(at(1_767_225_600)));
    let ctx = ctx_with(config, clock);
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    let id = member(&ctx, EMAIL).member.id;
    drop(ctx);
    let (code, _, err) = run(dir.path(), &["erase", "--member", "nobody@example.com"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no member `nobody@example.com`"), "{err}");
    let (code, out, err) = run(dir.path(), &["erase", "--member", EMAIL, "--by", "dpo@platform", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let d: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["member_id"], id.as_str());
    assert_eq!(d["erased_by"], "dpo@platform");
    assert!(d["events_rewritten"].as_u64().unwrap() >= 1, "{out}");
    // By email it is gone; by id, explain still tells the story, and says who erased.
    let (code, _, err) = run(dir.path(), &["explain", EMAIL]);
    assert_eq!(code, Some(1), "found by its erased email");
    assert!(err.contains("no member"), "{err}");
    let (code, out, err) = run(dir.path(), &["explain", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("Personal data erased at") && out.contains("by dpo@platform"), "{out}");
    assert!(out.contains("customer.subscription.created"), "{out}");
    assert!(!out.to_lowercase().contains(EMAIL) && !out.contains("Lovelace"), "{out}");
}
