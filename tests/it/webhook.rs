//! End to end over a real port: real signatures, the real server, the admin API.

use crate::support::*;
use membersync::clock::{Clock, SystemClock};

#[tokio::test]
async fn signed_stripe_webhooks_grant_access_visible_in_admin_api() {
    let s = Server::start().await;
    let (status, body) = s.post_signed("checkout_session_completed").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, serde_json::json!({"event_id": "evt_1QxDVvK7dEmoAc01mEgKFGt6", "status": "applied"}));
    let (status, _) = s.post_signed("customer_subscription_created").await;
    assert_eq!(status, 200);

    let (status, found) = s.get("/members?email=ADA@example.com", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let members = found["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "email matched case-insensitively");
    let id = members[0]["id"].as_str().unwrap();
    let (status, m) = s.get(&format!("/members/{id}"), Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(m["access_levels"], serde_json::json!(["pro"]));
    assert_eq!(m["memberships"][0]["state"], "active");
    assert_eq!(m["memberships"][0]["has_access"], true);
    assert_eq!(m["memberships"][0]["subscription_id"], "sub_1QxDemo001");
    assert_eq!(m["memberships"][0]["sync_status"], "never_reconciled");
    assert_eq!(m["recent_events"].as_array().unwrap().len(), 2);

    // The stored event explains itself: raw body, canonical event, outcome, rule.
    let (status, e) = s.get("/events/evt_1QxT1KK7dEmoAc013Za9sRck", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(e["status"], "applied");
    assert_eq!(e["canonical"]["kind"], "purchased");
    assert_eq!(e["outcome"]["rule"]["file"], "rules/access.rhai");
    assert!(e["raw"]["body"].as_str().unwrap().contains("sub_1QxDemo001"));
    s.stop().await;
}

#[tokio::test]
async fn webhook_answers_each_bad_input_with_its_status() {
    let s = Server::start().await;
    let body = fixture("stripe", "invoice_paid");
    let good = signed_headers(&s.ctx, "stripe", &body, SystemClock.now());

    // Tampered body.
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    assert_eq!(s.post("/webhooks/demo/stripe", &good, tampered).await.0, 401);
    // Missing signature.
    let ct = vec![("content-type".to_string(), "application/json".to_string())];
    assert_eq!(s.post("/webhooks/demo/stripe", &ct, body.clone()).await.0, 401);
    // Expired timestamp (signed 10 minutes ago).
    let old = signed_headers(&s.ctx, "stripe", &body, SystemClock.now() - chrono::Duration::minutes(10));
    let (status, err) = s.post("/webhooks/demo/stripe", &old, body.clone()).await;
    assert_eq!(status, 401);
    assert!(err["error"].as_str().unwrap().contains("tolerance"), "{err}");
    // Unknown tenant / provider.
    assert_eq!(s.post("/webhooks/nobody/stripe", &good, body.clone()).await.0, 404);
    assert_eq!(s.post("/webhooks/demo/paypal", &good, body.clone()).await.0, 404);
    // Undecodable (correctly signed garbage).
    let junk = b"{not json".to_vec();
    let h = signed_headers(&s.ctx, "stripe", &junk, SystemClock.now());
    assert_eq!(s.post("/webhooks/demo/stripe", &h, junk).await.0, 400);
    // Too large.
    let big = vec![b' '; 2 * 1024 * 1024];
    let h = signed_headers(&s.ctx, "stripe", &big, SystemClock.now());
    assert_eq!(s.post("/webhooks/demo/stripe", &h, big).await.0, 413);
    // Nothing of the above was stored.
    assert!(s.ctx.store.events(None, 10).unwrap().is_empty());

    // The good one, twice: applied, then duplicate.
    assert_eq!(s.post("/webhooks/demo/stripe", &good, body.clone()).await.1["status"], "applied");
    assert_eq!(s.post("/webhooks/demo/stripe", &good, body.clone()).await.1["status"], "duplicate");
    // An event type nobody mapped: 200, stored as ignored.
    let (status, ack) = s.post_signed("customer_created").await;
    assert_eq!((status, ack["status"].as_str()), (200, Some("ignored")));
    let (_, ignored) = s.get("/events?status=ignored", Some(TOKEN)).await;
    assert_eq!(ignored["events"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn admin_api_needs_the_token_and_probe_answers_200() {
    let s = Server::start().await;
    assert_eq!(s.get("/members?email=a@b.c", None).await.0, 401);
    assert_eq!(s.get("/members?email=a@b.c", Some("wrong")).await.0, 401);
    assert_eq!(s.get("/members?email=a@b.c", Some(TOKEN)).await.0, 200);
    assert_eq!(s.get("/members/mbr_nope", Some(TOKEN)).await.0, 404);
    assert_eq!(s.get("/healthz", None).await, (200, serde_json::json!({"status": "ok"})));
    assert_eq!(s.get("/webhooks/demo/stripe", None).await.0, 200);
    s.stop().await;
}
