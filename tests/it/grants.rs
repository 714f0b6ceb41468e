//! Manual access: `POST /members/{id}/grants` and `DELETE /members/{id}/grants/{grant}` go
//! through the rules, the machine and the store as events with source `manual`; a grant
//! sits beside what the providers say and never hides or changes it; `explain` tells who
//! granted what, why and until when.

use crate::support::*;
use membersync::clock::{Clock, FixedClock};
use serde_json::{json, Value};
use std::sync::Arc;

const T0: i64 = 1_767_300_000; // after the fixtures' own times

/// Ada, who bought Pro on Stripe, on a server at a fixed clock.
async fn ada() -> (Server, Arc<FixedClock>, String) {
    let clock = Arc::new(FixedClock::new(at(T0)));
    let s = Server::start_tuned(clock.clone(), |_| {}).await;
    deliver(&s.ctx, "stripe", "checkout_session_completed").await;
    deliver(&s.ctx, "stripe", "customer_subscription_created").await;
    let id = member(&s.ctx, "ada@example.com").member.id;
    (s, clock, id)
}

fn manual(m: &Value) -> Vec<&Value> {
    m["memberships"].as_array().unwrap().iter().filter(|x| x["provider"] == "manual").collect()
}

fn stripe(m: &Value) -> &Value {
    m["memberships"].as_array().unwrap().iter().find(|x| x["provider"] == "stripe").expect("the Stripe membership")
}

#[tokio::test]
async fn a_grant_adds_access_beside_the_provider_and_a_revocation_takes_only_it_away() {
    let (s, clock, id) = ada().await;
    let (_, before) = s.get(&format!("/members/{id}"), Some(TOKEN)).await;
    let stripe_before = stripe(&before).clone();

    let (status, g) = s
        .post_json(
            &format!("/members/{id}/grants"),
            TOKEN,
            &json!({"levels": ["lifetime"], "reason": "speaker at the March webinar"}),
        )
        .await;
    assert_eq!(status, 201, "{g}");
    assert_eq!(g["status"], "applied", "{g}");
    let grant = g["grant_id"].as_str().unwrap().to_string();
    let m = &g["member"];
    assert_eq!(m["access_levels"], json!(["lifetime", "pro"]));
    let grants = manual(m);
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0]["state"].as_str(), grants[0]["subscription_id"].as_str()), (Some("active"), Some(&*grant)));
    assert_eq!(grants[0]["access_levels"], json!(["lifetime"]));
    assert_eq!(grants[0]["timers"], json!([]), "no renewal is expected of a grant");
    assert_eq!(stripe(m), &stripe_before, "the provider's membership is untouched");
    // The activity log says who and why.
    let event = m["recent_events"].as_array().unwrap().iter().find(|e| e["source"] == "manual").unwrap();
    assert_eq!(event["kind"], "access_granted");
    assert_eq!(event["reason"], "granted lifetime by the global admin token: speaker at the March webinar");
    assert_eq!(event["rule"]["file"], "rules/manual.rhai");

    // A provider's cancel ends the Stripe membership, not the grant.
    clock.set(at(T0 + 60));
    deliver(&s.ctx, "stripe", "customer_subscription_deleted").await;
    let (_, m) = s.get(&format!("/members/{id}"), Some(TOKEN)).await;
    assert_eq!(stripe(&m)["has_access"], false, "{m}");
    assert_eq!(m["access_levels"], json!(["lifetime"]));

    // Revoked: the grant ends at once; revoking again changes nothing.
    clock.set(at(T0 + 120));
    let (status, r) = s.delete(&format!("/members/{id}/grants/{grant}?reason=webinar%20cancelled"), TOKEN).await;
    assert_eq!((status, r["status"].as_str()), (200, Some("applied")), "{r}");
    assert_eq!(r["member"]["access_levels"], json!([]));
    assert_eq!(manual(&r["member"])[0]["state"], "canceled");
    assert_eq!(r["reason"], "revoked lifetime by the global admin token: webinar cancelled");
    let (status, again) = s.delete(&format!("/members/{id}/grants/{grant}"), TOKEN).await;
    assert_eq!((status, again["status"].as_str()), (200, Some("duplicate")), "{again}");

    // explain tells the whole story from what was stored.
    let d = member(&s.ctx, "ada@example.com");
    let story = membersync::explain::explain_json(&*s.ctx.store, &d, clock.now()).unwrap();
    let text = membersync::explain::explain_text(&story);
    assert!(text.contains("speaker at the March webinar") && text.contains("webinar cancelled"), "{text}");
    assert!(text.contains("manual.rhai"), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn a_grant_with_an_end_expires_by_itself_at_its_end() {
    let (s, clock, id) = ada().await;
    let until = at(T0 + 7 * 86_400);
    let (status, g) = s
        .post_json(
            &format!("/members/{id}/grants"),
            TOKEN,
            &json!({"levels": ["lifetime"], "until": until.to_rfc3339(), "reason": "a trial week"}),
        )
        .await;
    assert_eq!(status, 201, "{g}");
    let grant = &manual(&g["member"])[0].clone();
    assert_eq!(grant["access_until"], "2026-01-08T20:40:00Z", "{grant}");
    assert_eq!(grant["timers"][0]["name"], "grant_end");
    clock.set(at(T0 + 7 * 86_400 - 1));
    assert_eq!(membersync::timers::fire_due(&s.ctx, clock.now()).await, 0);
    clock.set(at(T0 + 7 * 86_400));
    assert_eq!(membersync::timers::fire_due(&s.ctx, clock.now()).await, 1);
    let (_, m) = s.get(&format!("/members/{id}"), Some(TOKEN)).await;
    assert_eq!(manual(&m)[0]["state"], "expired", "{m}");
    assert_eq!(m["access_levels"], json!(["pro"]), "the provider's access stays");
    s.stop().await;
}

#[tokio::test]
async fn a_grant_the_api_cannot_take_is_a_clear_400_and_stores_nothing() {
    let (s, _clock, id) = ada().await;
    let events_before = s.ctx.store.events(None, None, 100).unwrap().len();
    let path = format!("/members/{id}/grants");
    for (body, says) in [
        (json!({"levels": ["por"], "reason": "x"}), "no access level `por` (did you mean `pro`?)"),
        (json!({"levels": [], "reason": "x"}), "names no access level"),
        (json!({"levels": ["pro"], "reason": "  "}), "`reason` is required"),
        (json!({"levels": ["pro"], "reason": "x", "until": "2020-01-01T00:00:00Z"}), "not in the future"),
        (json!({"levels": ["pro"]}), "missing field `reason`"),
        (json!({"levels": ["pro"], "reason": "x", "by": "someone else"}), "unknown field `by`"),
        (json!({"levels": ["pro"], "reason": "r".repeat(501)}), "`reason` is 501 characters long; at most 500"),
    ] {
        let (status, e) = s.post_json(&path, TOKEN, &body).await;
        assert_eq!(status, 400, "{body}: {e}");
        assert!(e["error"].as_str().unwrap().contains(says), "{body}: {e}");
    }
    assert_eq!(s.ctx.store.events(None, None, 100).unwrap().len(), events_before, "nothing stored");
    let (status, _) =
        s.post_json("/members/mbr_nobody/grants", TOKEN, &json!({"levels": ["pro"], "reason": "x"})).await;
    assert_eq!(status, 404);
    assert_eq!(s.delete(&format!("/members/{id}/grants/grant_nothing"), TOKEN).await.0, 404);
    // Ada's Stripe membership is no grant of hers to revoke.
    let sub = member(&s.ctx, "ada@example.com").memberships[0].subscription_id.clone().unwrap();
    assert_eq!(s.delete(&format!("/members/{id}/grants/{sub}"), TOKEN).await.0, 404);
    // No webhook reaches the manual provider.
    assert_eq!(s.post("/webhooks/demo/manual", &[], b"{}".to_vec()).await.0, 404);
    s.stop().await;
}

#[tokio::test]
async fn another_tenants_token_cannot_grant_to_or_revoke_from_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let config = two_tenants(&dir.path().join("m.db"));
    let s = Server::start_with(config, Arc::new(membersync::clock::SystemClock), dir).await;
    deliver(&s.ctx, "stripe", "checkout_session_completed").await;
    let id = member(&s.ctx, "ada@example.com").member.id;
    let path = format!("/members/{id}/grants");
    let grant = json!({"levels": ["pro"], "reason": "x"});
    assert_eq!(s.post_json(&path, "acme-admin-token", &grant).await.0, 404);
    let (status, g) = s.post_json(&path, TOKEN, &grant).await;
    assert_eq!(status, 201, "{g}");
    let gid = g["grant_id"].as_str().unwrap();
    assert_eq!(s.delete(&format!("{path}/{gid}"), "acme-admin-token").await.0, 404);
    assert_eq!(s.post_json(&path, "wrong", &grant).await.0, 401);
    s.stop().await;
}

/// Rederive derives memberships from deliveries; an operator's grants are none of those, so
/// it neither reports them nor changes them.
#[tokio::test]
async fn rederive_leaves_grants_as_the_operator_left_them() {
    let (s, clock, id) = ada().await;
    let (_, g) =
        s.post_json(&format!("/members/{id}/grants"), TOKEN, &json!({"levels": ["lifetime"], "reason": "gift"})).await;
    let gid = g["grant_id"].as_str().unwrap().to_string();
    let (_, g2) =
        s.post_json(&format!("/members/{id}/grants"), TOKEN, &json!({"levels": ["pro"], "reason": "second"})).await;
    clock.set(at(T0 + 60));
    s.delete(&format!("/members/{id}/grants/{}", g2["grant_id"].as_str().unwrap()), TOKEN).await;
    let r = membersync::replay::rederive(&s.ctx, &Default::default(), clock.now(), true).await.unwrap();
    assert!(r.memberships.is_empty(), "nothing differs: {:?}", r.memberships);
    let (_, m) = s.get(&format!("/members/{id}"), Some(TOKEN)).await;
    let states: Vec<(&str, &str)> =
        manual(&m).iter().map(|g| (g["subscription_id"].as_str().unwrap(), g["state"].as_str().unwrap())).collect();
    assert!(states.contains(&(gid.as_str(), "active")), "{states:?}");
    s.stop().await;
}

/// A level whose name holds `+` (which joins a grant's levels) cannot be granted by hand:
/// granting it would grant the parts its name splits into.
// See: issue 21, review (`a+b` granted levels `a` and `b`, which no product maps to).
#[tokio::test]
async fn a_level_named_with_a_plus_is_refused_not_split() {
    let clock = Arc::new(FixedClock::new(at(T0)));
    let s = Server::start_tuned(clock, |c| {
        let stripe = c.tenants.get_mut("demo").unwrap().providers.get_mut("stripe").unwrap();
        stripe.products.insert("prod_Plus".into(), vec!["a+b".into()]);
    })
    .await;
    deliver(&s.ctx, "stripe", "checkout_session_completed").await;
    let id = member(&s.ctx, "ada@example.com").member.id;
    let (status, e) =
        s.post_json(&format!("/members/{id}/grants"), TOKEN, &json!({"levels": ["a+b"], "reason": "x"})).await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("cannot be granted by hand"), "{e}");
    let (status, _) =
        s.post_json(&format!("/members/{id}/grants"), TOKEN, &json!({"levels": ["a"], "reason": "x"})).await;
    assert_eq!(status, 400);
    s.stop().await;
}

/// A grant the rules do not apply is answered 422 (its event stored, with why), and one run
/// again for a member no longer stored is refused, never given to a member made for it.
// See: issue 21, review (a failed grant answered 201; replayed after its member merged into
// another, it created a new member with no email holding the grant).
#[tokio::test]
async fn a_grant_not_applied_is_422_and_never_creates_a_member() {
    let (s, clock, id) = ada().await;
    let mut sources = Vec::new();
    for e in std::fs::read_dir(root().join("rules")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rhai") {
            let src = std::fs::read_to_string(&p).unwrap().replace(
                "fn on_access_granted(ev, m, cfg) {",
                "fn on_access_granted(ev, m, cfg) {\n    throw \"broken on purpose\";",
            );
            sources.push((format!("rules/{}", p.file_name().unwrap().to_string_lossy()), src));
        }
    }
    let good = rules();
    let broken = membersync::rules::RuleSet::compile(sources, clock.now()).unwrap();
    s.ctx.swap(membersync::pipeline::Loaded::new((*s.ctx.config()).clone(), broken));
    let (status, g) =
        s.post_json(&format!("/members/{id}/grants"), TOKEN, &json!({"levels": ["lifetime"], "reason": "x"})).await;
    assert_eq!((status, g["status"].as_str()), (422, Some("failed")), "{g}");
    assert!(manual(&g["member"]).is_empty(), "no grant holds");
    s.ctx.swap(membersync::pipeline::Loaded::new((*s.ctx.config()).clone(), good));

    // The same grant for a member id no longer stored: refused, nobody created.
    let members_before = s.ctx.store.search_members(None, None, None, 100).unwrap().len();
    let body = membersync::manual::ManualBody {
        action: "grant".into(),
        grant_id: "grant_gone".into(),
        member_id: "mbr_gone".into(),
        levels: vec!["lifetime".into()],
        until: None,
        reason: "x".into(),
        by: "a test".into(),
        at: clock.now(),
    };
    let raw = membersync::pipeline::Raw {
        body: serde_json::to_vec(&body).unwrap(),
        headers: vec![],
        source: membersync::canonical::Source::Manual,
        delivery: false,
        enrichment: None,
    };
    let incoming = membersync::pipeline::Incoming::Extracted(Box::new(body.extraction("demo")));
    let ack = membersync::pipeline::process(&s.ctx, incoming, raw).await.unwrap();
    assert_eq!(ack.status.as_str(), "refused", "{:?}", ack.outcome.reason);
    assert!(ack.outcome.reason.as_deref().unwrap().contains("mbr_gone"), "{:?}", ack.outcome.reason);
    assert_eq!(s.ctx.store.search_members(None, None, None, 100).unwrap().len(), members_before);
    s.stop().await;
}
