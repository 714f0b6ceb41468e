//! State and pending timers survive a restart; timers that fell due while the service was
//! down fire at start.

use crate::support::*;
use membersync::clock::{Clock, FixedClock};
use membersync::machine::MState;
use membersync::timers;
use std::sync::Arc;

#[tokio::test]
async fn restart_keeps_state_and_fires_timers_due_while_down() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    {
        let ctx = past_due_ada(&db, &clock).await;
        let d = member(&ctx, "ada@example.com");
        assert_eq!(d.timers.len(), 1);
    } // the service stops: store and writer dropped

    // Ten days later it starts again on the same file.
    clock.set(at(1_769_907_606 + 10 * 86_400));
    let ctx = ctx_on(&db, clock.clone());
    let d = member(&ctx, "ada@example.com");
    assert_eq!(d.memberships[0].state, MState::PastDue, "state survived");
    assert_eq!(d.timers.len(), 1, "pending timer survived");
    assert_eq!(d.timers[0].name, "grace_end");

    assert_eq!(timers::fire_due(&ctx, clock.now()).await, 1, "the overdue timer fires at start");
    let d = member(&ctx, "ada@example.com");
    assert_eq!(d.memberships[0].state, MState::Expired);
    assert!(d.timers.is_empty());
}

#[tokio::test]
async fn timer_task_fires_by_itself_after_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let ctx = ctx_on(&db, clock.clone());
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    clock.set(at(1_769_907_606));
    deliver(&ctx, "stripe", "invoice_payment_failed").await;
    clock.set(at(1_769_907_606 + 8 * 86_400));

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(timers::run(ctx.clone(), async move {
        let _ = rx.await;
    }));
    let mut expired = false;
    for _ in 0..200 {
        if member(&ctx, "ada@example.com").memberships[0].state == MState::Expired {
            expired = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let _ = tx.send(());
    task.await.unwrap();
    assert!(expired, "the timer task fired the overdue grace timer on its own");
}

/// `serve` started on a database holding a timer that fell due while it was down: nothing
/// is sent, and the member loses access by itself.
// See: issue 26 (the restart test above calls `fire_due` itself, so a timer task that
// skipped timers already due at start went unnoticed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_started_after_a_grace_end_expires_the_member_without_any_delivery() {
    let (dir, _) = editable_config();
    let db = dir.path().join("membersync.db");
    {
        let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
        let ctx = past_due_ada(&db, &clock).await;
        let d = member(&ctx, "ada@example.com");
        assert_eq!(d.memberships[0].state, MState::PastDue);
        assert_eq!(d.timers.len(), 1);
        assert!(d.timers[0].due_at < membersync::clock::SystemClock.now(), "the grace end is in the past");
    } // stopped, with the grace timer pending

    let svc = spawn(dir.path(), free_port()).await;
    let client = reqwest::Client::new();
    let mut seen = serde_json::Value::Null;
    for _ in 0..100 {
        seen = client
            .get(format!("{}/members?email=ada@example.com", svc.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if seen["members"][0]["memberships"][0]["state"] == "expired" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let m = &seen["members"][0];
    assert_eq!(m["memberships"][0]["state"], "expired", "{seen}");
    assert_eq!(m["memberships"][0]["has_access"], false);
    assert_eq!(m["access_levels"], serde_json::json!([]));
    assert_eq!(m["recent_events"][0]["source"], "timer", "{m}");
}

/// More timers due than one read returns (256): one `fire_due` fires them all and says how
/// many.
// See: issue 26 (mutants of the batch loop's end survived the suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_due_fires_every_due_timer_past_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FixedClock::new(at(1_769_907_606)));
    let ctx = ctx_on(&dir.path().join("m.db"), clock.clone());
    let n = 300;
    for i in 0..n {
        let (paid, failed) = (fixture("stripe", "invoice_paid"), fixture("stripe", "invoice_payment_failed"));
        for (body, id) in [(paid, "evt_1QxaZ1K7dEmoAc01GAm3W0e2"), (failed, "evt_1QxqTxK7dEmoAc01LZbqVCbE")] {
            let body = String::from_utf8(body)
                .unwrap()
                .replace(id, &format!("{id}_{i}"))
                .replace("sub_1QxDemo001", &format!("sub_batch_{i}"))
                .replace("cus_QxDemo001", &format!("cus_batch_{i}"))
                .replace("ada@example.com", &format!("batch{i}@example.com"))
                .into_bytes();
            let headers = signed_headers(&ctx, "stripe", &body, clock.now());
            membersync::ingest::accept(&ctx, "demo", "stripe", headers, body).await.unwrap();
        }
    }
    let later = at(1_769_907_606 + 30 * 86_400);
    assert_eq!(ctx.store.due_timers(later, 1000).unwrap().len(), n, "one grace timer each");
    assert_eq!(timers::fire_due(&ctx, later).await, n, "all fired in one call");
    assert!(ctx.store.due_timers(later, 1000).unwrap().is_empty());
}

/// Ada subscribed, then a failed payment: past due, with a grace timer (on `db`).
async fn past_due_ada(db: &std::path::Path, clock: &Arc<FixedClock>) -> Arc<membersync::pipeline::Ctx> {
    let ctx = ctx_on(db, clock.clone());
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    clock.set(at(1_769_907_606));
    deliver(&ctx, "stripe", "invoice_payment_failed").await;
    ctx
}

/// A missed renewal's timer is stored with the membership: the service stopped before the
/// period ended and started again days after it, with no webhook in between, still ends
/// the paid access (past_due with the grace and the flag, then expired).
// See: issue 19 (access never ran out without a webhook).
#[tokio::test]
async fn a_missed_renewal_timer_survives_a_restart_and_ends_access() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let period_end = at(1_769_904_000); // customer_subscription_created: items' current_period_end
    {
        let ctx = ctx_on(&db, clock.clone());
        deliver(&ctx, "stripe", "checkout_session_completed").await;
        deliver(&ctx, "stripe", "customer_subscription_created").await;
        let d = member(&ctx, "ada@example.com");
        assert_eq!(d.memberships[0].state, MState::Active);
        assert_eq!(d.memberships[0].period_end, Some(period_end));
        let renewal: Vec<_> = d.timers.iter().filter(|t| t.name == "renewal_due").collect();
        assert_eq!(renewal.len(), 1, "{:?}", d.timers);
        assert_eq!(renewal[0].due_at, period_end + chrono::Duration::hours(24));
    } // the service stops

    // Three days after the period end it starts again; no renewal webhook ever came.
    clock.set(period_end + chrono::Duration::days(3));
    let ctx = ctx_on(&db, clock.clone());
    assert!(member(&ctx, "ada@example.com").memberships[0].has_access(clock.now()), "not yet acted on");
    assert_eq!(timers::fire_due(&ctx, clock.now()).await, 1);
    let d = member(&ctx, "ada@example.com");
    let m = &d.memberships[0];
    assert_eq!(m.state, MState::PastDue);
    assert!(m.flags.iter().any(|f| f == "no renewal seen"), "{:?}", m.flags);
    assert!(m.has_access(clock.now()), "the usual grace runs");
    assert_eq!(d.timers.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["grace_end"]);

    clock.set(period_end + chrono::Duration::days(9));
    assert_eq!(timers::fire_due(&ctx, clock.now()).await, 1);
    let m = &member(&ctx, "ada@example.com").memberships[0];
    assert_eq!(m.state, MState::Expired);
    assert!(!m.has_access(clock.now()));
}

// See: issue 19 (found on review).
/// An operator raises missed_renewal_grace_hours 24 → 48 (a config reload, no rederive).
/// The pending renewal timer fires at the old time, is ignored ("period was extended
/// since") and the renewal timer is set again where the rules now want it (48 h after the
/// period end): the missed renewal is still seen.
#[tokio::test]
async fn raising_the_missed_renewal_allowance_moves_the_timer_instead_of_losing_it() {
    let (dir, config) = editable_config();
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let ctx = ctx_with(config, clock.clone());
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    drop(ctx);
    let path = dir.path().join("membersync.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("missed_renewal_grace_hours: 24", "missed_renewal_grace_hours: 48");
    std::fs::write(&path, text).unwrap();
    let mut c = membersync::config::Config::load(&path).unwrap();
    c.database = dir.path().join("m.db").display().to_string();
    let ctx = ctx_with(c, clock.clone());
    for day in [1_769_990_400i64, 1_770_076_800, 1_770_163_200, 1_772_000_000, 1_780_000_000] {
        clock.set(at(day));
        membersync::timers::fire_due(&ctx, at(day)).await;
        if day == 1_769_990_400 {
            // 2 February: the old timer fired early under the new allowance and was moved.
            let timers: Vec<_> =
                member(&ctx, "ada@example.com").timers.iter().map(|t| (t.name.clone(), t.due_at)).collect();
            assert_eq!(timers, [("renewal_due".to_string(), at(1_770_076_800))]);
        }
        if day == 1_770_076_800 {
            assert_eq!(
                member(&ctx, "ada@example.com").memberships[0].state,
                MState::PastDue,
                "48 h after the period end"
            );
        }
    }
    let d = member(&ctx, "ada@example.com");
    assert!(!d.memberships[0].has_access(at(1_780_000_000)), "no renewal in 4 months, access should be gone");
}
