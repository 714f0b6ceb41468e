//! Retention: old raw bodies dropped by `membersync prune` and by `serve`'s daily run,
//! with the story kept: `explain` tells the same history, `GET /events/{id}` says the body
//! went, the dry run re-derives the same state from the canonical forms, and a replay of
//! a pruned event is refused rather than run from nothing.

use crate::support::*;
use membersync::clock::FixedClock;
use membersync::store::{self, EventFilter, EventRow};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

fn run(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_membersync")).args(args).current_dir(dir).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// 2026-01-01: the fixtures' time.
const T0: i64 = 1_767_225_600;

/// Ada's Stripe lifecycle (checkout, subscription, a paid invoice) delivered at `T0` into
/// `config`'s database, plus a dead letter (an invoice whose fields cannot be read) and, a day later, someone else's
/// abandoned checkout.
async fn lifecycle(config: membersync::config::Config) -> Arc<membersync::pipeline::Ctx> {
    let clock = Arc::new(FixedClock::new(at(T0)));
    let ctx = ctx_with(config, clock.clone());
    for f in ["checkout_session_completed", "customer_subscription_created", "invoice_paid"] {
        deliver(&ctx, "stripe", f).await;
    }
    let body = br#"{"id": "evt_broken", "type": "invoice.paid", "created": "yesterday"}"#.to_vec();
    let headers = signed_headers(&ctx, "stripe", &body, ctx.clock.now());
    membersync::ingest::accept(&ctx, "demo", "stripe", headers, body).await.expect("stored as a dead letter");
    clock.advance(chrono::Duration::days(1));
    deliver_edited(&ctx, "stripe", "checkout_session_expired", |v| v["id"] = "evt_later".into()).await;
    ctx
}

fn events(ctx: &membersync::pipeline::Ctx) -> Vec<EventRow> {
    ctx.store.events_where(&EventFilter::default()).unwrap()
}

/// Explain's history without what pruning changes (`body_pruned_at`).
fn story(ctx: &membersync::pipeline::Ctx, email: &str, now: i64) -> Value {
    let d = member(ctx, email);
    let mut j = membersync::explain::explain_json(&*ctx.store, &d, at(now)).unwrap();
    for e in j["history"].as_array_mut().unwrap() {
        e.as_object_mut().unwrap().remove("body_pruned_at");
    }
    j
}

#[tokio::test]
async fn prune_drops_old_bodies_and_explain_tells_the_same_story() {
    let (dir, mut config) = editable_config();
    config.database = dir.path().join("membersync.db").display().to_string();
    let ctx = lifecycle(config).await;
    let before = story(&ctx, "ada@example.com", T0 + 40 * 86_400);
    let all = events(&ctx);
    let dead = all
        .iter()
        .find(|e| e.status == store::EventStatus::Failed)
        .unwrap_or_else(|| {
            panic!(
                "no dead letter: {:?}",
                all.iter().map(|e| (&e.event_id, e.status, &e.park_key, e.source)).collect::<Vec<_>>()
            )
        })
        .clone();
    drop(ctx);

    // Nothing is set: prune says so and drops nothing.
    let (code, _, err) = run(dir.path(), &["prune"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("retention.raw_body_days is not set") && err.contains("--days"), "{err}");

    // Received 2026-01-01 and 2026-01-02; today is later than 2026-11: a year keeps all.
    let (code, out, err) = run(dir.path(), &["prune", "--days", "400", "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("would drop 0 raw bodies"), "{out}");

    // Keeping one day more than the whole days since the second day's delivery drops the
    // first day's deliveries only, not the later invoice.
    let keep = ((chrono::Utc::now() - at(T0 + 86_400)).num_days() + 1).to_string();
    let (code, out, err) = run(dir.path(), &["prune", "--days", &keep, "--dry-run", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let dry: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dry["events"], 4, "{out}");
    assert!(dry["bytes"].as_u64().unwrap() > 1000, "{out}");
    assert_eq!(dry["dry_run"], true);
    let ctx = ctx_on(&dir.path().join("membersync.db"), Arc::new(FixedClock::new(at(T0 + 40 * 86_400))));
    assert!(events(&ctx).iter().all(|e| e.body_pruned_at.is_none()), "a dry run wrote");
    drop(ctx);

    // The index a prune reads by costs every delivery an entry: it is made by the first
    // prune, not before (the default keeps bodies forever).
    let has_index = || {
        let c = rusqlite::Connection::open(dir.path().join("membersync.db")).unwrap();
        let n: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'events_unpruned'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        n == 1
    };
    assert!(!has_index(), "made before any prune");
    let (code, out, err) = run(dir.path(), &["prune", "--days", &keep]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("dropped 4 raw bodies"), "{out}");
    assert!(has_index(), "the first prune made no index");
    let (code, out, _) = run(dir.path(), &["prune", "--days", &keep]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("dropped 0 raw bodies"), "a second prune found more: {out}");

    let ctx = ctx_on(&dir.path().join("membersync.db"), Arc::new(FixedClock::new(at(T0 + 40 * 86_400))));
    let after = events(&ctx);
    assert_eq!(after.len(), all.len(), "prune deleted events");
    for (a, b) in all.iter().zip(&after) {
        let later = a.event_id == "evt_later";
        assert_eq!(b.body_pruned_at.is_some(), !later, "{}", a.event_id);
        if later {
            assert_eq!(a.raw, b.raw);
            continue;
        }
        assert!(b.raw.is_empty() && b.headers.get() == "[]", "{}: body or headers kept", a.event_id);
        // What decided stays as it was.
        assert_eq!(a.canonical.as_ref().map(|c| c.get()), b.canonical.as_ref().map(|c| c.get()));
        assert_eq!(a.outcome.get(), b.outcome.get());
        assert_eq!((a.status, &a.reason, &a.kind), (b.status, &b.reason, &b.kind));
        let shown = membersync::views::event_json(b);
        assert_eq!(shown["raw"]["encoding"], "pruned");
        assert_eq!(shown["raw"]["body"], Value::Null);
        assert!(shown["body_pruned_at"].is_string(), "{shown}");
    }
    assert_eq!(story(&ctx, "ada@example.com", T0 + 40 * 86_400), before, "explain changed its story");
    let text = membersync::explain::explain_text(
        &membersync::explain::explain_json(&*ctx.store, &member(&ctx, "ada@example.com"), at(T0 + 40 * 86_400))
            .unwrap(),
    );
    assert!(text.contains("body:    pruned at"), "{text}");

    // The dry run re-derives from the canonical forms and finds the state as stored (as of
    // the day after the last delivery: no service ran the timers due since).
    let run_ = membersync::replay::dry_run(&ctx, &EventFilter::default(), at(T0 + 2 * 86_400)).await.unwrap();
    assert!(run_.deliveries >= 4, "{}", run_.deliveries);
    assert_eq!(run_.compared, 1, "Ada's membership compared");
    assert!(run_.differences.is_empty(), "{:?}", run_.differences);

    // A pruned dead letter is not replayed from nothing: refused, saying why, unchanged.
    let dead_now = after.iter().find(|e| e.seq == dead.seq).unwrap();
    let err = membersync::replay::replay_one(&ctx, dead_now).await.unwrap_err().to_string();
    assert!(err.contains("raw body was pruned"), "{err}");
    let again = events(&ctx).into_iter().find(|e| e.seq == dead.seq).unwrap();
    assert_eq!(again.status, store::EventStatus::Failed);
}

#[tokio::test]
async fn serve_prunes_by_itself_when_retention_is_set() {
    let (dir, mut config) = editable_config();
    drop(lifecycle(config.clone()).await);
    // Forty days on, with 30 days kept: the service drops the old bodies at start.
    config.raw_body_days = Some(30);
    let server = Server::start_with(config, Arc::new(FixedClock::new(at(T0 + 40 * 86_400))), dir).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, body) = server.get("/events/evt_later", Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        if body["raw"]["encoding"] == "pruned" {
            assert!(body["body_pruned_at"].is_string(), "{body}");
            assert!(body["canonical"].is_object(), "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not pruned: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pruned = events(&server.ctx).iter().filter(|e| e.body_pruned_at.is_some()).count();
    assert_eq!(pruned, 5, "every delivery received 39 or 40 days ago");
    server.stop().await;
}

#[tokio::test]
async fn the_service_keeps_bodies_forever_unless_told() {
    let (dir, config) = editable_config();
    drop(lifecycle(config.clone()).await);
    assert_eq!(config.raw_body_days, None, "the shipped config keeps bodies");
    let server = Server::start_with(config, Arc::new(FixedClock::new(at(T0 + 4000 * 86_400))), dir).await;
    let (status, body) = server.get("/events/evt_later", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(body["raw"]["encoding"], "utf-8", "{body}");
    assert_eq!(body["body_pruned_at"], Value::Null);
    server.stop().await;
}
