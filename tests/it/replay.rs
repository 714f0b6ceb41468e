//! Dead letters replay once their rule is fixed; a dry run re-derives state under edited
//! rules without writing; explain tells why a member has (no) access.

use crate::support::*;
use membersync::clock::{Clock, FixedClock};
use membersync::pipeline::Status;
use membersync::store::EventFilter;
use std::sync::Arc;

const START: i64 = 1_767_225_600;
const FAILED: i64 = 1_769_907_606;

#[tokio::test]
async fn rule_that_raises_dead_letters_and_the_event_applies_on_replay_after_the_fix() {
    let (dir, config) = editable_config();
    let clock = Arc::new(FixedClock::new(at(START)));
    let ctx = ctx_with(config, clock.clone());
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;

    // A rule edit with a typo that only shows at run time.
    let grace = dir.path().join("rules/grace.rhai");
    let good = std::fs::read_to_string(&grace).unwrap();
    std::fs::write(&grace, good.replace("ev.occurred_at + days", "ev.occured_at + days")).unwrap();
    membersync::reload::reload(&ctx, "test").expect("it compiles; it fails only when it runs");

    clock.set(at(FAILED));
    let ack = deliver(&ctx, "stripe", "invoice_payment_failed").await;
    assert_eq!(ack.status, Status::Failed);
    let reason = ack.outcome.reason.clone().unwrap();
    assert!(reason.contains("rules/grace.rhai:") && reason.contains("occured_at"), "{reason}");
    // Nothing moved, nothing lost: the event is stored as a dead letter.
    assert_eq!(member(&ctx, "ada@example.com").memberships[0].state.as_str(), "active");
    let dead = ctx.store.events(Some("failed"), None, 10).unwrap();
    assert_eq!(dead.len(), 1);

    // Fixed and reloaded: the dead letter applies on replay.
    std::fs::write(&grace, &good).unwrap();
    membersync::reload::reload(&ctx, "test").unwrap();
    let done = membersync::replay::replay(&ctx, &EventFilter { status: Some("failed".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].now, Status::Applied, "{:?}", done[0].reason);
    let m = &member(&ctx, "ada@example.com").memberships[0];
    assert_eq!(m.state.as_str(), "past_due");
    assert_eq!(m.grace_until, Some(at(FAILED + 7 * 86_400)));
    // History keeps both: the dead letter (retired from dedupe, marked `replayed`) and the
    // replay.
    let rows = ctx.store.events_by_event_id("evt_1QxqTxK7dEmoAc01LZbqVCbE").unwrap();
    let summary: Vec<(&str, &str)> = rows.iter().map(|e| (e.source.as_str(), e.status.as_str())).collect();
    assert_eq!(summary, vec![("webhook", "replayed"), ("replay", "applied")]);
    assert!(rows[0].reason.as_deref().unwrap().contains("replayed under rules"));
    // The same delivery again is still a duplicate.
    assert_eq!(deliver(&ctx, "stripe", "invoice_payment_failed").await.status, Status::Duplicate);
    // An applied event is not replayed, and the answer says why: it was applied.
    match membersync::replay::replay_one(&ctx, &rows[1]).await {
        Err(e @ membersync::replay::Error::NotReplayable(_, _)) => {
            assert!(e.to_string().contains("is applied: only failed, refused or ignored"), "{e}")
        }
        other => panic!("replayed an applied event: {other:?}"),
    }
}

#[tokio::test]
async fn dry_run_shows_what_edited_rules_would_change_and_writes_nothing() {
    let (dir, config) = editable_config();
    let clock = Arc::new(FixedClock::new(at(START)));
    let ctx = ctx_with(config, clock.clone());
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    clock.set(at(FAILED));
    deliver(&ctx, "stripe", "invoice_payment_failed").await;
    clock.set(at(FAILED + 3 * 86_400));

    let same = membersync::replay::dry_run(&ctx, &EventFilter::default(), clock.now()).await.unwrap();
    assert!(same.differences.is_empty(), "unchanged rules derive the stored state: {same:?}");
    assert_eq!((same.deliveries, same.compared), (3, 1));

    // One day of grace instead of seven.
    let yaml = dir.path().join("membersync.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(&yaml, text.replace("grace_days: 7", "grace_days: 1")).unwrap();
    membersync::reload::reload(&ctx, "test").unwrap();
    let before = ctx.store.events(None, None, 1000).unwrap().len();
    let diffs = membersync::replay::dry_run(&ctx, &EventFilter::default(), clock.now()).await.unwrap().differences;
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert_eq!(diffs[0].member, "ada@example.com");
    assert_eq!(diffs[0].member_id, member(&ctx, "ada@example.com").member.id);
    let (stored, derived) = (diffs[0].stored.clone().unwrap(), diffs[0].derived.clone().unwrap());
    assert_eq!((stored.state.as_str(), stored.has_access), ("past_due", true));
    assert_eq!((derived.state.as_str(), derived.has_access), ("expired", false));
    assert_eq!(
        diffs[0].changes,
        [
            "state past_due → expired",
            "access true → false",
            "levels [pro] → []",
            "grace_until 2026-02-08T01:00:06Z → none",
            "timers [grace_end@2026-02-08T01:00:06Z] → []"
        ],
        "{diffs:?}"
    );
    assert_eq!(ctx.store.events(None, None, 1000).unwrap().len(), before, "a dry run writes nothing");
    assert_eq!(member(&ctx, "ada@example.com").memberships[0].state.as_str(), "past_due");
}

/// The dry run finds a member by the provider customer id they are linked by when they have
/// no email (Memberstack's plan events carry none), and compares grace and access ends,
/// levels and flags, not only state and access.
// See: issue 18 (Memberstack members showed as "stored active → derived absent" under
// unchanged rules; grace 7 → 3 showed no difference).
#[tokio::test]
async fn dry_run_matches_members_without_email_and_sees_a_shorter_grace() {
    let (dir, config) = editable_config();
    let clock = Arc::new(FixedClock::new(at(START)));
    let ctx = ctx_with(config, clock.clone());
    clock.set(at(1_767_607_200));
    assert_eq!(deliver(&ctx, "memberstack", "member_plan_created").await.status, Status::Applied);
    clock.set(at(START));
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    clock.set(at(FAILED));
    deliver(&ctx, "stripe", "invoice_payment_failed").await;
    clock.set(at(FAILED + 86_400));

    let same = membersync::replay::dry_run(&ctx, &EventFilter::default(), clock.now()).await.unwrap();
    assert!(same.differences.is_empty(), "unchanged rules derive the stored state: {same:?}");
    assert_eq!(same.compared, 2, "the Memberstack membership and the Stripe one");

    let yaml = dir.path().join("membersync.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(&yaml, text.replace("grace_days: 7", "grace_days: 3")).unwrap();
    membersync::reload::reload(&ctx, "test").unwrap();
    let diffs = membersync::replay::dry_run(&ctx, &EventFilter::default(), clock.now()).await.unwrap().differences;
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert_eq!(
        diffs[0].changes,
        [
            "grace_until 2026-02-08T01:00:06Z → 2026-02-04T01:00:06Z",
            "timers [grace_end@2026-02-08T01:00:06Z] → [grace_end@2026-02-04T01:00:06Z]"
        ],
        "{diffs:?}"
    );
}

#[tokio::test]
async fn explain_names_the_event_mapping_rule_and_transition_behind_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FixedClock::new(at(START)));
    let ctx = ctx_on(&dir.path().join("m.db"), clock.clone());
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    clock.set(at(1_770_733_385));
    deliver(&ctx, "stripe", "customer_subscription_updated_cancel_scheduled").await;
    clock.set(at(1_772_323_200));
    membersync::timers::fire_due(&ctx, clock.now()).await;

    let d = membersync::explain::find(&*ctx.store, "ADA@example.com").unwrap().one("ADA@example.com").unwrap();
    let j = membersync::explain::explain_json(&*ctx.store, &d, clock.now()).unwrap();
    let text = membersync::explain::explain_text(&j);
    assert!(text.contains("Access as of 2026-03-01T00:00:00Z: NONE"), "{text}");
    assert!(text.contains("evt_1Qx6GuK7dEmoAc01IzpN8PVa"), "{text}");
    assert!(text.contains("mapping: rules/providers/stripe.yaml events.customer.subscription.updated, case \"cancel at period end scheduled\""), "{text}");
    assert!(text.contains("rule:    rules/cancel.rhai:"), "{text}");
    assert!(text.contains("active → canceling"), "{text}");
    assert!(text.contains("[timer] stripe"), "{text}");
    assert!(text.contains("canceling → canceled"), "{text}");
    assert!(text.contains("revoke_access"), "{text}");
    let history = j["history"].as_array().unwrap();
    assert_eq!(history.len(), 4);
    assert_eq!(history[3]["source"], "timer");
}

/// The dry run fires timers between deliveries at the moments they fell due: a cancel
/// reverted after the period ended must find the membership already canceled.
#[tokio::test]
async fn dry_run_interleaves_timers_with_deliveries_as_they_happened() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FixedClock::new(at(START)));
    let ctx = ctx_on(&dir.path().join("m.db"), clock.clone());
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    // The renewal (paid through 1 March) comes a day after the period end: the missed
    // renewal timer fired on 2 February first, as the dry run will fire it.
    clock.set(at(1_769_990_400));
    membersync::timers::fire_due(&ctx, clock.now()).await;
    clock.set(at(1_770_166_809));
    deliver(&ctx, "stripe", "invoice_paid_renewal").await;
    clock.set(at(1_770_733_385));
    deliver(&ctx, "stripe", "customer_subscription_updated_cancel_scheduled").await;
    clock.set(at(1_772_409_600)); // 2026-03-02, a day after the period end
    membersync::timers::fire_due(&ctx, clock.now()).await;
    let late_revert = String::from_utf8(fixture("stripe", "customer_subscription_updated_cancel_reverted"))
        .unwrap()
        .replace("\"created\": 1770889277", "\"created\": 1772409600");
    assert!(late_revert.contains("1772409600"));
    let body = late_revert.into_bytes();
    let headers = signed_headers(&ctx, "stripe", &body, clock.now());
    let ack = membersync::ingest::accept(&ctx, "demo", "stripe", headers, body).await.unwrap();
    assert_eq!(ack.status, Status::Ignored, "{:?}", ack.outcome.reason);
    assert_eq!(member(&ctx, "ada@example.com").memberships[0].state.as_str(), "canceled");

    let diffs = membersync::replay::dry_run(&ctx, &EventFilter::default(), clock.now()).await.unwrap().differences;
    assert!(diffs.is_empty(), "the timer fired before the late revert in the dry run too: {diffs:?}");
}

/// An event that arrived before its membership existed was parked and ran again once the
/// membership came to exist; the dry run does the same, from the body it stored for it.
#[tokio::test]
async fn dry_run_runs_parked_events_again_from_their_stored_body() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, clock) = parked_then_released(&dir).await;
    assert_eq!(member(&ctx, "ada@example.com").memberships[0].state.as_str(), "past_due");

    let diffs = membersync::replay::dry_run(&ctx, &EventFilter::default(), clock.now()).await.unwrap().differences;
    assert!(diffs.is_empty(), "the parked failure ran again in the dry run too: {diffs:?}");
}

/// One dead letter, its rule fixed, replayed again and again — over HTTP twice at once,
/// then once more, then by the command's path for every failed event: it applies once.
// See: issue 26 (applying one dead letter twice went unnoticed); issue 18 (three `replay`
// runs and one POST each printed `failed → applied`).
#[tokio::test]
async fn a_dead_letter_replayed_many_times_applies_once() {
    let (s, clock, rules_dir) = subscribed().await;
    let post = |name: &'static str| post_stripe(&s, &clock, name);
    let grace = rules_dir.join("grace.rhai");
    let good = std::fs::read_to_string(&grace).unwrap();
    std::fs::write(&grace, good.replace("ev.occurred_at + days", "ev.occured_at + days")).unwrap();
    s.state.reload("test").unwrap();
    clock.set(at(FAILED));
    assert_eq!(post("invoice_payment_failed").await["status"], "failed");
    std::fs::write(&grace, &good).unwrap();
    s.state.reload("test").unwrap();

    let id = "evt_1QxqTxK7dEmoAc01LZbqVCbE";
    let replay = || {
        let url = format!("{}/events/{id}/replay", s.url);
        async move {
            let resp = reqwest::Client::new().post(url).bearer_auth(TOKEN).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (a, b) = tokio::join!(replay(), replay());
    let mut codes = [a.0, b.0];
    codes.sort();
    assert_eq!(codes, [200, 409], "two replays at once: {a:?} {b:?}");
    let (code, again) = replay().await;
    assert_eq!(code, 409, "{again}");
    let done = membersync::replay::replay(&s.ctx, &EventFilter { status: Some("failed".into()), ..Default::default() })
        .await
        .unwrap();
    assert!(done.is_empty(), "nothing failed is left to replay: {done:?}");

    let rows = s.ctx.store.events_by_event_id(id).unwrap();
    let applied = rows.iter().filter(|e| e.status.as_str() == "applied").count();
    assert_eq!(applied, 1, "{:?}", rows.iter().map(|e| (&e.source, &e.status)).collect::<Vec<_>>());
    assert_eq!(rows[0].status.as_str(), "replayed");
    let metrics = s.get_text("/metrics").await;
    assert!(!metrics.contains("status=\"failed\""), "{metrics}");
    assert!(metrics.contains("membersync_events_stored{status=\"replayed\"} 1"), "{metrics}");
    s.stop().await;
}

/// A parked event (arrived before its membership) runs again once the membership exists;
/// its original row is then `replayed`, so a replay of refused events does not apply it a
/// second time.
// See: issue 26 (found on review: the released row stayed `refused` and applied twice).
#[tokio::test]
async fn a_released_parked_event_is_not_replayed_again() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, _) = parked_then_released(&dir).await;
    let id = "evt_1QxqTxK7dEmoAc01LZbqVCbE";
    let rows = || -> Vec<(String, String)> {
        let rows = ctx.store.events_by_event_id(id).unwrap();
        rows.iter().map(|e| (e.source.as_str().to_string(), e.status.to_string())).collect()
    };
    let before = rows();
    assert_eq!(before, [("webhook".to_string(), "replayed".to_string()), ("replay".into(), "applied".into())]);
    // The event already applied once (released). Replaying refused events must not apply it again.
    let done = membersync::replay::replay(&ctx, &EventFilter { status: Some("refused".into()), ..Default::default() })
        .await
        .unwrap();
    let after = rows();
    assert!(done.is_empty(), "an event that already ran again on release was replayed: {done:?}; rows {after:?}");
}

/// A timer's dead letter is not replayed as if it were a provider's delivery: the replay
/// answers 409 and names why, and the row stays as it was.
// See: issue 26 (found on review: it was re-parsed as a webhook, failed under a new id and
// was marked replayed, so the expiry it carried was lost).
#[tokio::test]
async fn a_timers_dead_letter_is_not_replayed_as_a_delivery() {
    let (s, clock, rules_dir) = subscribed().await;
    let post = |name: &'static str| post_stripe(&s, &clock, name);
    clock.set(at(FAILED));
    assert_eq!(post("invoice_payment_failed").await["status"], "applied");
    let timers = rules_dir.join("timers.rhai");
    let good = std::fs::read_to_string(&timers).unwrap();
    std::fs::write(&timers, good.replacen("clear_grace()", "clear_grace(ev.nope)", 1)).unwrap();
    s.state.reload("test").expect("compiles");
    membersync::timers::fire_due(&s.ctx, at(FAILED + 8 * 86_400)).await;
    let failed = s.ctx.store.events(Some("failed"), None, 10).unwrap();
    assert_eq!(failed.len(), 1, "the timer is a dead letter");
    assert_eq!(failed[0].source.as_str(), "timer");
    std::fs::write(&timers, &good).unwrap();
    s.state.reload("test").unwrap();
    let (code, body) = s.post_admin(&format!("/events/{}/replay", failed[0].event_id)).await;
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("a timer's event"), "{body}");
    let rows = s.ctx.store.events_by_event_id(&failed[0].event_id).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status.as_str(), "failed", "left as it was");
    s.stop().await;
}

/// A server on an editable copy of the config, with Ada subscribed; its clock and rules dir.
async fn subscribed() -> (Server, Arc<FixedClock>, std::path::PathBuf) {
    let (dir, config) = editable_config();
    let rules_dir = dir.path().join("rules");
    let clock = Arc::new(FixedClock::new(at(START)));
    let s = Server::start_with(config, clock.clone(), dir).await;
    post_stripe(&s, &clock, "checkout_session_completed").await;
    post_stripe(&s, &clock, "customer_subscription_created").await;
    (s, clock, rules_dir)
}

/// Posts a Stripe fixture signed at the clock's time; the answer's JSON.
async fn post_stripe(s: &Server, clock: &FixedClock, name: &str) -> serde_json::Value {
    let body = fixture("stripe", name);
    let headers = signed_headers(&s.ctx, "stripe", &body, clock.now());
    s.post("/webhooks/demo/stripe", &headers, body).await.1
}

/// A failed payment that arrives before the purchase (refused, parked), then the purchase:
/// the parked event runs again once the membership exists.
async fn parked_then_released(dir: &tempfile::TempDir) -> (Arc<membersync::pipeline::Ctx>, Arc<FixedClock>) {
    let clock = Arc::new(FixedClock::new(at(FAILED)));
    let ctx = ctx_on(&dir.path().join("m.db"), clock.clone());
    let early = deliver(&ctx, "stripe", "invoice_payment_failed").await;
    assert_eq!(early.status, Status::Refused, "{:?}", early.outcome.reason);
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    (ctx, clock)
}
