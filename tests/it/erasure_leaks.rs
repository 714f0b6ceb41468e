//! Erasure, tried as a hostile provider and a careless operator would: the member's personal
//! data where the first erasure tests did not look for it (a second email the provider sent
//! for the same customer, the name inside a longer text, a dead letter whose fields could
//! not be read, the member's flags), and a returning customer whose new member must not be
//! swallowed by the erased one. Each on SQLite and on PostgreSQL.

use crate::support::*;
use membersync::clock::FixedClock;
use membersync::pipeline::Ctx;
use membersync::store::{self, EventFilter, EventRow, MemberDetail, MemberRow};
use serde_json::Value;
use std::sync::Arc;

const EMAIL: &str = "ada@example.com";

/// 2026-01-01: the fixtures' time.
const T0: i64 = 1_767_225_600;

/// A pipeline on a fresh database: an SQLite file, or a PostgreSQL database of the test cluster.
fn ctx(postgres: bool) -> (tempfile::TempDir, Arc<Ctx>) {
    let (dir, mut config) = editable_config();
    config.database = match postgres {
        true => crate::pg_cluster::fresh_database(),
        false => dir.path().join("membersync.db").display().to_string(),
    };
    (dir, ctx_with(config, Arc::new(FixedClock::new(at(T0)))))
}

/// Store reads off the runtime's threads (PostgreSQL's client blocks).
async fn by_email(ctx: &Ctx, email: &str) -> Vec<MemberRow> {
    let email = email.to_string();
    store::read(&ctx.store, move |s| s.members_by_email(&email)).await.unwrap()
}

async fn detail(ctx: &Ctx, id: &str) -> MemberDetail {
    let id = id.to_string();
    store::read(&ctx.store, move |s| s.member_detail(&id, 100)).await.unwrap().expect("member exists")
}

async fn ada(ctx: &Ctx) -> MemberDetail {
    let m = by_email(ctx, EMAIL).await.into_iter().next().expect("ada is a member");
    detail(ctx, &m.id).await
}

/// Every stored trace of every event, as text, lowercased.
async fn stored_text(ctx: &Ctx) -> Vec<(String, String)> {
    let text = |e: &EventRow| {
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
    };
    let filter = EventFilter { limit: Some(1000), ..Default::default() };
    let all = store::read(&ctx.store, move |s| s.events_where(&filter)).await.unwrap();
    all.iter().map(|e| (format!("{} #{}", e.event_id, e.seq), text(e))).collect()
}

async fn assert_gone(ctx: &Ctx, gone: &[&str]) {
    for (which, t) in stored_text(ctx).await {
        for g in gone {
            assert!(!t.contains(&g.to_lowercase()), "`{g}` kept in {which}: {t}");
        }
    }
}

async fn erase(ctx: &Arc<Ctx>, id: &str) {
    let d = membersync::erase::erase_member(ctx, id, "dpo@platform").await.unwrap();
    assert!(d.is_some(), "no member {id}");
}

async fn ada_subscribes(ctx: &Arc<Ctx>) -> String {
    for f in ["checkout_session_completed", "customer_subscription_created"] {
        deliver(ctx, "stripe", f).await;
    }
    ada(ctx).await.member.id
}

/// Stripe sends the same customer's invoice under the billing email and the full name she
/// gave her accountant; her member keeps its first email. Erasure must remove both.
async fn a_second_email_of_the_same_customer(postgres: bool) {
    let (_dir, ctx) = ctx(postgres);
    let id = ada_subscribes(&ctx).await;
    deliver_edited(&ctx, "stripe", "invoice_paid", |v| {
        v["data"]["object"]["customer_email"] = "ada.accounts@example.com".into();
        v["data"]["object"]["customer_name"] = "Augusta Ada King".into();
    })
    .await;
    let d = ada(&ctx).await;
    assert_eq!(d.member.id, id);
    assert!(d.recent_events.iter().any(|e| e.event_type == "invoice.paid"), "the invoice is hers");
    erase(&ctx, &id).await;
    assert_gone(&ctx, &[EMAIL, "ada.accounts@example.com", "Augusta", "Lovelace"]).await;
}

#[tokio::test]
async fn an_email_the_provider_sent_besides_the_members_own_is_erased_sqlite() {
    a_second_email_of_the_same_customer(false).await;
}

#[tokio::test]
async fn an_email_the_provider_sent_besides_the_members_own_is_erased_postgres() {
    a_second_email_of_the_same_customer(true).await;
}

/// The name inside a longer text of a JSON body (an invoice's description, a note).
async fn the_name_inside_a_text(postgres: bool) {
    let (_dir, ctx) = ctx(postgres);
    let id = ada_subscribes(&ctx).await;
    deliver_edited(&ctx, "stripe", "invoice_paid", |v| {
        v["data"]["object"]["description"] = "Pro membership for Ada Lovelace, thank you!".into();
    })
    .await;
    erase(&ctx, &id).await;
    assert_gone(&ctx, &[EMAIL, "Lovelace"]).await;
}

#[tokio::test]
async fn the_full_name_inside_a_longer_text_of_a_body_is_erased_sqlite() {
    the_name_inside_a_text(false).await;
}

#[tokio::test]
async fn the_full_name_inside_a_longer_text_of_a_body_is_erased_postgres() {
    the_name_inside_a_text(true).await;
}

/// A delivery whose fields could not be read (a dead letter: no canonical form, no member)
/// still holds her email in its body.
async fn a_dead_letter(postgres: bool) {
    let (_dir, ctx) = ctx(postgres);
    let id = ada_subscribes(&ctx).await;
    let body = serde_json::to_vec(&serde_json::json!({
        "id": "evt_unreadable_ada", "type": "invoice.paid", "created": "yesterday",
        "data": {"object": {"customer": "cus_QxDemo001", "customer_email": "Ada@Example.com",
                            "customer_name": "Ada Lovelace"}}
    }))
    .unwrap();
    let headers = signed_headers(&ctx, "stripe", &body, ctx.clock.now());
    let ack = membersync::ingest::accept(&ctx, "demo", "stripe", headers, body).await.unwrap();
    assert_eq!(ack.status.as_str(), "failed", "a dead letter");
    erase(&ctx, &id).await;
    assert_gone(&ctx, &[EMAIL, "Lovelace"]).await;
}

#[tokio::test]
async fn a_dead_letter_naming_the_member_is_erased_sqlite() {
    a_dead_letter(false).await;
}

#[tokio::test]
async fn a_dead_letter_naming_the_member_is_erased_postgres() {
    a_dead_letter(true).await;
}

/// Two members became one because both had her email; the merge flag names the email.
async fn a_merge_flag(postgres: bool) {
    let (_dir, ctx) = ctx(postgres);
    // A purchase whose checkout held no email (a member by customer id only), another
    // customer's purchase with her email (a second member), then the first customer's
    // invoice naming her email: one member, flagged "both had the email ...".
    deliver_edited(&ctx, "stripe", "checkout_session_completed", |v| {
        v["data"]["object"]["customer_details"]["email"] = Value::Null;
        v["data"]["object"]["customer_details"]["name"] = Value::Null;
    })
    .await;
    deliver_edited(&ctx, "stripe", "checkout_session_completed", |v| {
        v["id"] = "evt_other_customer".into();
        v["data"]["object"]["customer"] = "cus_Other".into();
        v["data"]["object"]["subscription"] = "sub_Other".into();
    })
    .await;
    deliver(&ctx, "stripe", "invoice_paid").await;
    let d = ada(&ctx).await;
    assert!(d.member.flags.iter().any(|f| f.contains(EMAIL)), "no merge flag: {:?}", d.member.flags);
    erase(&ctx, &d.member.id).await;
    let after = detail(&ctx, &d.member.id).await;
    assert!(
        !serde_json::to_string(&after.member).unwrap().to_lowercase().contains(EMAIL),
        "the member row keeps the email: {:?}",
        after.member
    );
    let shown = membersync::views::member_json(&after, at(T0));
    assert!(!shown.to_string().to_lowercase().contains(EMAIL), "{shown}");
}

#[tokio::test]
async fn a_flag_naming_the_email_is_erased_sqlite() {
    a_merge_flag(false).await;
}

#[tokio::test]
async fn a_flag_naming_the_email_is_erased_postgres() {
    a_merge_flag(true).await;
}

/// She comes back after her erasure as a new customer (a new member with her email), then
/// her old customer id is delivered with her email: the erased member must not take the
/// email, nor swallow the new member (whose access she just bought and who is found by
/// email).
async fn a_returning_customer(postgres: bool) {
    let (_dir, ctx) = ctx(postgres);
    let old = ada_subscribes(&ctx).await;
    erase(&ctx, &old).await;
    deliver_edited(&ctx, "stripe", "checkout_session_completed", |v| {
        v["id"] = "evt_new_ada".into();
        v["data"]["object"]["customer"] = "cus_NewAda".into();
        v["data"]["object"]["subscription"] = "sub_NewAda".into();
    })
    .await;
    let new = ada(&ctx).await.member.id;
    assert_ne!(new, old);
    deliver_edited(&ctx, "stripe", "invoice_paid", |v| v["id"] = "evt_old_customer_again".into()).await;
    let found = by_email(&ctx, EMAIL).await;
    assert_eq!(
        found.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        vec![new.as_str()],
        "the returning customer's member is no longer found by her email"
    );
    let erased = detail(&ctx, &old).await;
    let shown = membersync::views::member_json(&erased, at(T0)).to_string().to_lowercase();
    assert!(!shown.contains(EMAIL), "the erased member names her email again: {shown}");
}

#[tokio::test]
async fn an_erased_member_does_not_swallow_the_customers_new_member_sqlite() {
    a_returning_customer(false).await;
}

#[tokio::test]
async fn an_erased_member_does_not_swallow_the_customers_new_member_postgres() {
    a_returning_customer(true).await;
}

/// A customer names herself after a word the provider's payloads also use as a value
/// (`Unpaid`): erasing her must blank her name, not that value, or a re-derivation from
/// the rewritten bodies reads her unpaid checkout as a paid one and grants access.
#[tokio::test]
async fn a_name_made_of_payload_words_leaves_the_bodies_meaning_alone() {
    let (_dir, ctx) = ctx(false);
    let name = "Ada Unpaid";
    // Her subscription, then a one-time purchase she has not paid yet (ignored).
    for f in ["checkout_session_completed", "customer_subscription_created"] {
        deliver_edited(&ctx, "stripe", f, |v| {
            if v["data"]["object"].get("customer_details").is_some() {
                v["data"]["object"]["customer_details"]["name"] = name.into();
            }
        })
        .await;
    }
    let ack = deliver_edited(&ctx, "stripe", "checkout_session_completed_payment", |v| {
        let o = &mut v["data"]["object"];
        o["customer"] = "cus_QxDemo001".into();
        o["customer_details"]["email"] = EMAIL.into();
        o["customer_details"]["name"] = name.into();
        o["payment_status"] = "unpaid".into();
    })
    .await;
    assert_eq!(ack.status.as_str(), "ignored", "{:?}", ack.outcome);
    let d = ada(&ctx).await;
    assert_eq!(d.member.name.as_deref(), Some(name));
    let now = at(T0 + 86_400);
    let before = membersync::replay::dry_run(&ctx, &EventFilter::default(), now).await.unwrap();
    assert!(before.differences.is_empty(), "{:?}", before.differences);
    erase(&ctx, &d.member.id).await;
    assert_gone(&ctx, &[EMAIL, name]).await;
    let after = membersync::replay::dry_run(&ctx, &EventFilter::default(), now).await.unwrap();
    assert!(after.differences.is_empty(), "re-derived from the erased bodies: {:?}", after.differences);
    // An operator replays the ignored delivery (as one does once a payment is settled):
    // it is still the unpaid checkout it was.
    let event_id = ack.event_id.clone();
    let row = store::read(&ctx.store, move |s| Ok(s.events_by_event_id(&event_id)?.into_iter().next()))
        .await
        .unwrap()
        .unwrap();
    let raw: serde_json::Value = serde_json::from_slice(&row.raw).unwrap();
    assert_eq!(raw["data"]["object"]["payment_status"], "unpaid", "erasure changed what the delivery says");
    let replayed = membersync::replay::replay_one(&ctx, &row).await.unwrap();
    assert_eq!(replayed.status.as_str(), "ignored", "{:?}", replayed.outcome);
}

/// A guest's membership is keyed by product and email (`product:…@email:…`): erasure must
/// not leave the email in that key, and the guest buying again after it is a new member
/// with a membership of their own, not a purchase attached to the erased one.
#[tokio::test]
async fn a_guests_membership_key_loses_the_email_sqlite() {
    a_guests_membership_key(false).await;
}

#[tokio::test]
async fn a_guests_membership_key_loses_the_email_postgres() {
    a_guests_membership_key(true).await;
}

async fn a_guests_membership_key(postgres: bool) {
    let (_dir, ctx) = ctx(postgres);
    let guest_buys = |id: &'static str| {
        let ctx = ctx.clone();
        async move {
            deliver_edited(&ctx, "stripe", "checkout_session_completed_payment", |v| {
                v["id"] = id.into();
                v["data"]["object"]["customer"] = Value::Null;
                v["data"]["object"]["customer_creation"] = "if_required".into();
            })
            .await
        }
    };
    guest_buys("evt_guest_1").await;
    let guest = by_email(&ctx, "linus@example.com").await.into_iter().next().expect("a member by email").id;
    erase(&ctx, &guest).await;
    let d = detail(&ctx, &guest).await;
    assert!(!format!("{:?}", d.memberships).contains("linus@"), "a membership keeps the email: {:?}", d.memberships);
    let shown = membersync::views::member_json(&d, at(T0)).to_string();
    assert!(!shown.contains("linus@"), "{shown}");

    guest_buys("evt_guest_2").await;
    let again = by_email(&ctx, "linus@example.com").await.into_iter().next().expect("a new member by email").id;
    assert_ne!(again, guest);
    let d = detail(&ctx, &again).await;
    assert_eq!(d.memberships.len(), 1, "the new purchase went elsewhere: {:?}", d.memberships);
    assert!(d.memberships[0].has_access(at(T0)), "{:?}", d.memberships);
}
