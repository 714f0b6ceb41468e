//! Timers: grace end and period end fire by themselves. One task sleeps until the next
//! due time (or until a new timer is scheduled), then feeds each due timer through the
//! same rules → machine → store path as a webhook. Timers live in the store, so those that
//! fell due while the service was down fire at start.

use crate::canonical::Source;
use crate::pipeline::{self, Ctx, Incoming, Raw};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;

/// Longest sleep between checks, so a clock jump is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Fires every timer due at `now`; returns how many fired.
pub async fn fire_due(ctx: &Arc<Ctx>, now: DateTime<Utc>) -> usize {
    let mut fired = 0;
    loop {
        let store = ctx.store.clone();
        let due = match tokio::task::spawn_blocking(move || store.due_timers(now, 256)).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "Could not read due timers.");
                return fired;
            }
            Err(e) => {
                tracing::error!(error = %e, "Timer read task failed.");
                return fired;
            }
        };
        if due.is_empty() {
            return fired;
        }
        let batch = due.len();
        for t in due {
            let body = serde_json::to_vec(&t).unwrap_or_default();
            let raw = Raw { body, headers: vec![], source: Source::Timer, delivery: false };
            let (name, membership) = (t.name.clone(), t.membership_id.clone());
            match pipeline::process(ctx, Incoming::Timer(t), raw).await {
                Ok(ack) => {
                    fired += 1;
                    tracing::info!(%membership, timer = %name, status = ack.status.as_str(), "Timer fired.");
                }
                Err(e) => {
                    tracing::error!(%membership, timer = %name, error = %e, "Timer could not be processed; it stays due.");
                    return fired;
                }
            }
        }
        if batch < 256 {
            return fired;
        }
    }
}

/// The timer task: runs until `shutdown` resolves.
pub async fn run(ctx: Arc<Ctx>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let now = ctx.clock.now();
        fire_due(&ctx, now).await;
        let store = ctx.store.clone();
        let next = tokio::task::spawn_blocking(move || store.next_timer()).await.ok().and_then(Result::ok).flatten();
        let wait = match next {
            Some(t) => (t - ctx.clock.now()).to_std().unwrap_or(Duration::ZERO).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
            _ = ctx.timers_changed.notified() => {}
            _ = &mut shutdown => return,
        }
    }
}
