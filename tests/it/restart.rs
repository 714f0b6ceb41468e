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
        let ctx = ctx_on(&db, clock.clone());
        deliver(&ctx, "stripe", "checkout_session_completed").await;
        deliver(&ctx, "stripe", "customer_subscription_created").await;
        clock.set(at(1_769_907_606));
        deliver(&ctx, "stripe", "invoice_payment_failed").await;
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
