//! The reconcile schedule: one background task started by `serve`. It walks the
//! memberships not asked within the interval, least recently asked first, each provider
//! in its own lane (its own rate limit, so a slow provider does not hold up the others),
//! then sleeps until more fall due or shutdown. The order lives in the store (the last
//! attempt time per membership), so a restart resumes where the last run stopped.

use super::{run_pass, Reconciler, Report};
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
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || store.reconcile_queue(&targets, asked_before, limit))
        .await
        .map_err(|e| crate::store::Error::Db(e.to_string()))?
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

/// The schedule: runs until `shutdown` resolves. A request in flight at shutdown is
/// dropped unrecorded, so that membership is simply first in line at the next start.
pub async fn run(ctx: Arc<Ctx>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    if !ctx.config().reconcile.enabled {
        tracing::info!("Reconciliation schedule disabled in the config.");
        return;
    }
    let reconciler = super::reconciler(&ctx);
    for (tenant, provider) in ctx.config().tenants.iter().flat_map(|(t, tc)| tc.providers.keys().map(move |p| (t, p))) {
        if let Some(why) = reconciler.why_not(&ctx.config(), tenant, provider) {
            tracing::info!(%tenant, %provider, reason = %why, "Not reconciled.");
        }
    }
    let interval = chrono::Duration::from_std(ctx.config().reconcile.interval).unwrap_or(chrono::Duration::days(1));
    loop {
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
        tokio::select! {
            _ = tokio::time::sleep(MAX_SLEEP.min(ctx.config().reconcile.interval)) => {}
            _ = &mut shutdown => return,
        }
    }
}
