//! Retention: the raw bodies (and headers) of deliveries older than
//! `retention.raw_body_days` are dropped, by `membersync prune` and by `serve` once a day.
//! Each event's canonical form, outcome, rule, rule-set version and transition stay, so
//! `explain` still tells the story; `GET /events/{id}` says when the body went; the dry run
//! and re-derivation run such an event from its stored canonical form; a replay of one is
//! refused (its body is what would run again).
//!
//! Kept whatever their age: the bodies of events still parked (they run again from their
//! body when their membership arrives), manual grants' and timers' (the record itself).
//!
//! What this module must never do: drop a body younger than the setting, or one that
//! still has work to do.

use crate::pipeline::Ctx;
use crate::store::{self, Pruned, Store};
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use std::sync::Arc;

/// Events pruned per write: each batch is one short job for the writer, so deliveries
/// arriving meanwhile wait for at most one of them.
const BATCH: usize = 500;

/// How often `serve` prunes when `retention.raw_body_days` is set.
pub const EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// What a prune did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub raw_body_days: u32,
    /// Bodies of deliveries received before this are dropped.
    pub received_before: DateTime<Utc>,
    pub dry_run: bool,
    pub events: u64,
    pub bytes: u64,
}

impl Report {
    pub fn render(&self) -> String {
        format!(
            "{} {} raw bod{} ({}) of deliveries received before {} (retention.raw_body_days: {}){}\n",
            if self.dry_run { "would drop" } else { "dropped" },
            self.events,
            if self.events == 1 { "y" } else { "ies" },
            human_bytes(self.bytes),
            self.received_before.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.raw_body_days,
            if self.dry_run { "; nothing written" } else { "" },
        )
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 10 * 1024 * 1024 => format!("{} MiB", b / (1024 * 1024)),
        b if b >= 10 * 1024 => format!("{} KiB", b / 1024),
        b => format!("{b} bytes"),
    }
}

/// The instant before which bodies are dropped, `days` before `now`.
pub fn cutoff(now: DateTime<Utc>, days: u32) -> DateTime<Utc> {
    now - Duration::days(i64::from(days))
}

/// Drops (or, with `dry_run`, counts) the bodies received more than `days` before `now`,
/// a batch per write.
pub async fn prune(store: &Arc<dyn Store>, days: u32, now: DateTime<Utc>, dry_run: bool) -> store::Result<Report> {
    let before = cutoff(now, days);
    let total = if dry_run {
        store::read(store, move |s| s.prunable(before)).await?
    } else {
        let mut total = Pruned::default();
        loop {
            let p = store.write(move |tx| tx.prune_bodies(before, now, BATCH)).await?;
            total.events += p.events;
            total.bytes += p.bytes;
            if p.events < BATCH as u64 {
                break;
            }
        }
        total
    };
    Ok(Report { raw_body_days: days, received_before: before, dry_run, events: total.events, bytes: total.bytes })
}

/// `serve`'s schedule: a prune at start and then every [`EVERY`], while
/// `retention.raw_body_days` is set; until `shutdown` resolves.
pub async fn run(ctx: Arc<Ctx>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        if let Some(days) = ctx.config().raw_body_days {
            let prune = prune(&ctx.store, days, ctx.clock.now(), false);
            tokio::select! {
                r = prune => match r {
                    Ok(r) if r.events > 0 => {
                        tracing::info!(events = r.events, bytes = r.bytes, raw_body_days = days, "Pruned raw bodies.")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "Could not prune raw bodies; trying again at the next run."),
                },
                _ = &mut shutdown => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = &mut shutdown => return,
        }
    }
}
