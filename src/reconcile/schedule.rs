//! The reconcile schedule: one background task started by `serve`. It walks the
//! memberships not asked within the interval, least recently asked first, each provider
//! in its own lane (its own rate limit, so a slow provider does not hold up the others),
//! then sleeps until more fall due or shutdown. The order lives in the store (the last
//! attempt time per membership), so a restart resumes where the last run stopped.
//!
//! What this module must never do: reconcile one provider's memberships in another's lane,
//! or ask a membership twice in one pass.

use super::{Reconciler, Reconciliation, Report, Summary};
use crate::pipeline::Ctx;
use crate::store::MembershipRow;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Longest sleep between looks at the queue.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The next memberships to ask, least recently asked first.
pub async fn next_batch(
    ctx: &Arc<Ctx>,
    reconciler: &Reconciler,
    asked_before: DateTime<Utc>,
    limit: usize,
) -> crate::store::Result<Vec<MembershipRow>> {
    let targets = reconciler.targets(&ctx.config());
    crate::store::read(&ctx.store, move |s| s.reconcile_queue(&targets, asked_before, limit)).await
}

/// How long a membership taken for a pass stays leased to the process that took it: past
/// this, one that died before asking is taken again by another.
pub const LEASE: chrono::Duration = chrono::Duration::minutes(15);

/// Takes the next memberships to ask, as [`next_batch`] orders them, leasing each to this
/// process: replicas (or a `membersync reconcile` beside `serve`) running passes at once
/// each take their own, and none asks a membership another has taken.
pub async fn lease_batch(
    ctx: &Arc<Ctx>,
    reconciler: &Reconciler,
    asked_before: DateTime<Utc>,
    limit: usize,
) -> crate::store::Result<Vec<MembershipRow>> {
    let targets = reconciler.targets(&ctx.config());
    let now = ctx.clock.now();
    ctx.store.write(move |tx| tx.lease_reconcile(&targets, asked_before, now, now + LEASE, limit)).await
}

/// Reconciles a batch: one lane per provider, in parallel; in order within a lane.
pub async fn reconcile_batch(ctx: &Arc<Ctx>, reconciler: &Arc<Reconciler>, batch: Vec<MembershipRow>) -> Vec<Report> {
    let mut lanes: BTreeMap<String, Vec<MembershipRow>> = BTreeMap::new();
    for m in batch {
        lanes.entry(m.provider.clone()).or_default().push(m);
    }
    let mut set = tokio::task::JoinSet::new();
    for (_, lane) in lanes {
        let (ctx, reconciler) = (ctx.clone(), reconciler.clone());
        set.spawn(async move {
            let mut out = Vec::with_capacity(lane.len());
            for m in &lane {
                out.push(reconciler.reconcile(&ctx, m).await);
            }
            out
        });
    }
    let mut reports = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(lane) => reports.extend(lane),
            Err(e) => tracing::error!(error = %e, "A reconcile lane failed."),
        }
    }
    reports
}

/// One pass over every reconcilable membership not asked since `asked_before`, least
/// recently asked first (`membersync reconcile` passes its start time; the schedule
/// passes now − interval). The order comes from the stored attempt times, so a pass cut
/// short by a restart continues where it stopped.
pub async fn run_pass(ctx: &Arc<Ctx>, reconciler: &Arc<Reconciler>, asked_before: DateTime<Utc>) -> Summary {
    const BATCH: usize = 64;
    // Events kept because what they left out could not be fetched (Stripe's line items)
    // are tried again first, and those that waited long enough for an invoice run without it.
    crate::enrich::retry_parked(ctx).await;
    release_overdue_invoice_waits(ctx).await;
    let mut summary = Summary::default();
    let mut seen = std::collections::HashSet::new();
    loop {
        let batch = match lease_batch(ctx, reconciler, asked_before, BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "Could not read the reconcile queue.");
                return summary;
            }
        };
        let full = batch.len() == BATCH;
        // What could not be recorded (our own failure) comes back; once is enough per pass.
        let fresh: Vec<MembershipRow> = batch.into_iter().filter(|m| seen.insert(m.id.clone())).collect();
        if fresh.is_empty() {
            return summary;
        }
        for r in reconcile_batch(ctx, reconciler, fresh).await {
            summary.add(r);
        }
        if !full {
            return summary;
        }
    }
}

/// How long an event naming an invoice that no stored event ties to a membership (a refund,
/// a dispute) waits for it — deliveries out of order arrive within minutes — before it is
/// matched without it: by its payment or charge, else the customer's memberships (one, or
/// the one holding access; several are refused and flagged, never guessed). Its invoice's
/// own webhook was lost, or the endpoint does not receive invoice events.
pub const INVOICE_WAIT: chrono::Duration = chrono::Duration::hours(1);

/// Runs again, without the invoice they named, the events that waited for it longer than
/// [`INVOICE_WAIT`]; each kept row is marked `replayed`. Returns how many ran.
pub async fn release_overdue_invoice_waits(ctx: &Arc<Ctx>) -> usize {
    let now = ctx.clock.now();
    let kept = match crate::store::read(&ctx.store, |s| s.events(Some("refused"), None, 500)).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "Could not read the events waiting for an invoice.");
            return 0;
        }
    };
    let mut ran = 0;
    for e in kept.into_iter().rev() {
        let Some(invoice) = e.park_key.as_deref().and_then(|k| k.strip_prefix("pay:invoice:")) else { continue };
        if e.received_at + INVOICE_WAIT > now {
            continue;
        }
        let Some((mut incoming, raw)) = crate::pipeline::incoming_from_row(&ctx.config(), &e) else { continue };
        if let crate::pipeline::Incoming::Extracted(x) = &mut incoming {
            x.event.payment.invoice_id = None;
            x.mapping.flags.push(format!("invoice {invoice} never arrived: matched without it"));
        }
        let (loaded, seq) = (ctx.loaded(), e.seq);
        let note = format!("invoice {invoice} not seen within {} min: run without it", INVOICE_WAIT.num_minutes());
        let done = ctx
            .store
            .write(move |tx| {
                if !tx.mark_replayed(seq, &note)? {
                    return Ok(None);
                }
                crate::pipeline::apply(&loaded, tx, incoming, raw, now).map(Some)
            })
            .await;
        match done {
            Ok(Some(ack)) => {
                ran += 1;
                tracing::info!(event = %e.event_id, status = ack.status.as_str(), "Ran without the invoice it waited for.");
            }
            Ok(None) => {}
            Err(err) => {
                tracing::error!(event = %e.event_id, error = %err, "Could not run an event without its invoice.")
            }
        }
    }
    ran
}

/// What `membersync reconcile` runs now: one member's memberships, or one pass over every
/// membership (all of them not asked since now). `None` when there is no such member.
pub async fn run_now(
    ctx: &Arc<Ctx>,
    reconciler: &Arc<Reconciler>,
    member: Option<&str>,
) -> crate::store::Result<Option<Summary>> {
    match member {
        Some(id) => super::resync_member(ctx, reconciler, id).await,
        None => Ok(Some(run_pass(ctx, reconciler, ctx.clock.now()).await)),
    }
}

/// The schedule: runs until `shutdown` resolves. A request in flight at shutdown is
/// dropped unrecorded, so that membership is simply first in line at the next start. Each
/// pass takes the config and the reconciler in force, so a reload that enables, disables
/// or retunes reconciliation takes effect from the next pass.
pub async fn run(ctx: Arc<Ctx>, reconciliation: Arc<Reconciliation>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    // The reconciler whose unreconcilable pairs were logged; whether "disabled" was.
    let mut announced: Option<Arc<Reconciler>> = None;
    let mut said_disabled = false;
    loop {
        let config = ctx.config();
        if config.reconcile.enabled {
            said_disabled = false;
            let reconciler = reconciliation.reconciler();
            if !announced.as_ref().is_some_and(|a| Arc::ptr_eq(a, &reconciler)) {
                for (tenant, provider) in
                    config.tenants.iter().flat_map(|(t, tc)| tc.providers.keys().map(move |p| (t, p)))
                {
                    if let Some(why) = reconciler.why_not(&config, tenant, provider) {
                        tracing::info!(%tenant, %provider, reason = %why, "Not reconciled.");
                    }
                }
                announced = Some(reconciler.clone());
            }
            let interval = chrono::Duration::from_std(config.reconcile.interval).unwrap_or(chrono::Duration::days(1));
            let pass = async {
                let due = ctx.clock.now() - interval;
                run_pass(&ctx, &reconciler, due).await
            };
            tokio::select! {
                s = pass => {
                    if s.checked > 0 {
                        tracing::info!(checked = s.checked, in_sync = s.in_sync, drift_corrected = s.drift_corrected,
                            drift_unresolved = s.drift_unresolved, provider_unreachable = s.provider_unreachable,
                            "Reconcile pass done.");
                    }
                }
                _ = &mut shutdown => return,
            }
        } else {
            // Kept events are tried again even with reconciliation off.
            crate::enrich::retry_parked(&ctx).await;
            release_overdue_invoice_waits(&ctx).await;
            if !said_disabled {
                tracing::info!("Reconciliation schedule disabled in the config.");
                said_disabled = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(MAX_SLEEP.min(config.reconcile.interval)) => {}
            _ = &mut shutdown => return,
        }
    }
}
