//! Timers: grace end and period end fire by themselves. One task sleeps until the next
//! due time (or until a new timer is scheduled), then feeds each due timer through the
//! same rules → machine → store path as a webhook. Timers live in the store, so those that
//! fell due while the service was down fire at start.
//!
//! What this module must never do: change a membership itself: a due timer is an event
//! through the pipeline like any other.

use crate::canonical::Source;
use crate::pipeline::{self, Ctx, Incoming, Loaded, Raw, Status};
use crate::store::{self, Tx};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;

/// Longest sleep between checks, so a clock jump is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Due timers read at a time.
const BATCH: usize = 256;

/// One timer that fired, and what it came to.
pub struct Fired {
    pub membership: String,
    pub timer: String,
    pub due_at: DateTime<Utc>,
    pub status: Status,
}

impl Fired {
    fn key(&self) -> (String, String, DateTime<Utc>) {
        (self.membership.clone(), self.timer.clone(), self.due_at)
    }
}

/// When a fired timer's event is processed: now (the service), or at the time it fell due
/// (a dry run re-living the past).
#[derive(Debug, Clone, Copy)]
pub enum FireAt {
    Now(DateTime<Utc>),
    DueTime,
}

/// The one timer-firing path: fires, inside the caller's transaction, the timers due by
/// `at` (at most `limit` of them), oldest first, each through the whole pipeline as an
/// `expired` event of its membership.
pub fn fire_due_in_tx(
    loaded: &Loaded,
    tx: &mut dyn Tx,
    at: DateTime<Utc>,
    when: FireAt,
    limit: usize,
) -> store::Result<Vec<Fired>> {
    let mut fired = Vec::new();
    loop {
        let due = tx.due_timers_tx(at, BATCH.min(limit - fired.len()))?;
        if due.is_empty() {
            return Ok(fired);
        }
        for t in due {
            let raw = Raw {
                body: serde_json::to_vec(&t).unwrap_or_default(),
                headers: vec![],
                source: Source::Timer,
                delivery: false,
                enrichment: None,
            };
            let now = match when {
                FireAt::Now(now) => now,
                FireAt::DueTime => t.due_at,
            };
            let (membership, timer, due_at) = (t.membership_id.clone(), t.name.clone(), t.due_at);
            if fired.iter().any(|f: &Fired| f.membership == membership && f.timer == timer && f.due_at == due_at) {
                // Fired, yet still due: firing it again would loop for ever.
                tracing::error!(%membership, %timer, "A timer fired but stayed due; left for the next look.");
                return Ok(fired);
            }
            let ack = pipeline::apply(loaded, tx, Incoming::Timer(t), raw, now)?;
            fired.push(Fired { membership, timer, due_at, status: ack.status });
        }
        if fired.len() == limit {
            return Ok(fired);
        }
    }
}

/// Fires every timer due at `now`, oldest first, each in a write of its own (deliveries
/// are not held up behind a backlog, and one timer that cannot be stored holds back no
/// other that was); returns how many fired. One that cannot be stored is not: it stays due
/// and fires at the next look.
pub async fn fire_due(ctx: &Arc<Ctx>, now: DateTime<Utc>) -> usize {
    let mut seen = std::collections::HashSet::new();
    loop {
        let loaded = ctx.loaded();
        // It may run again on the shared store (another replica's batch held the member of
        // the timer it took): it changes nothing but through `tx`.
        match ctx.store.write_again(vec![], move |tx| fire_due_in_tx(&loaded, tx, now, FireAt::Now(now), 1)).await {
            Ok(fired) => {
                for f in &fired {
                    tracing::info!(membership = %f.membership, timer = %f.timer, status = f.status.as_str(), "Timer fired.");
                    if !seen.insert(f.key()) {
                        // Fired, yet still due: firing it again would loop for ever.
                        tracing::error!(membership = %f.membership, timer = %f.timer, "A timer fired but stayed due; left for the next look.");
                        return seen.len();
                    }
                }
                if fired.is_empty() {
                    return seen.len();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "Due timers could not be processed; they stay due.");
                return seen.len();
            }
        }
    }
}

/// The timer task: runs until `shutdown` resolves.
pub async fn run(ctx: Arc<Ctx>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let now = ctx.clock.now();
        fire_due(&ctx, now).await;
        let next = match store::read(&ctx.store, |s| s.next_timer()).await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "Could not read when the next timer is due; looking again shortly.");
                None
            }
        };
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
