//! Reconciliation: the safety net for missed webhooks. For one membership, ask the
//! provider for its current view (the `reconcile:` request of its YAML), read a status
//! snapshot with the same extractor language, compare it with what is stored, and feed a
//! difference through the same rules → machine → store path as a `status_synced` event
//! with source `reconcile`. Then record the membership's sync status.
//!
//! What this module must never do: change a membership itself (only the pipeline does),
//! decide what a status means (rules/status.rhai does), or let a provider error change
//! anything but the sync status. The API key never leaves a request header.

mod error;
mod fetch;
mod plan;
pub mod schedule;

pub use error::{MissingValue, Unreachable};
pub use fetch::parse_retry_after;
pub use plan::Snapshot;

use crate::canonical::{CanonicalEvent, EventKind, MemberRef, Source};
use crate::config::Config;
use crate::extract::{Extraction, Mapping};
use crate::machine::MState;
use crate::pipeline::{self, Ctx, Incoming, Raw, Status};
use crate::spec::{ReconcileMethod, ReconcileSpec};
use crate::store::{self, MembershipRow, SyncRecord, SyncState};
use chrono::{DateTime, SecondsFormat, Utc};
use fetch::{Limiter, Request};
use plan::{fill, fill_json, fill_with, Plan, Vars};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Reconciliation's counters for `/metrics` (since the process started).
#[derive(Debug, Default)]
pub struct Stats {
    in_sync: Counter,
    drift_corrected: Counter,
    drift_unresolved: Counter,
    errors: Counter,
}

impl Stats {
    fn count(&self, status: SyncStatus) {
        let c = match status {
            SyncStatus::InSync => &self.in_sync,
            SyncStatus::DriftCorrected => &self.drift_corrected,
            SyncStatus::DriftUnresolved => &self.drift_unresolved,
            SyncStatus::ProviderUnreachable => &self.errors,
            SyncStatus::Skipped | SyncStatus::Failed => return,
        };
        c.inc();
    }

    /// Adds these counters to `/metrics` (each name gains `_total`).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "membersync_reconcile_drift",
            "Differences found by reconciliation and corrected through the rules",
            self.drift_corrected.clone(),
        );
        registry.register(
            "membersync_reconcile_drift_unresolved",
            "Differences the rules did not resolve (refused, ignored, stale)",
            self.drift_unresolved.clone(),
        );
        registry.register("membersync_reconcile_in_sync", "Comparisons that found no difference", self.in_sync.clone());
        registry.register(
            "membersync_reconcile_errors",
            "Provider requests that failed (5xx, timeout, bad answer)",
            self.errors.clone(),
        );
    }
}

/// The reconciler in force and the counters every reconciler since start adds to: one per
/// service, shared by the schedule and resync so they share its rate limits; rebuilt from
/// the new config on a reload.
pub struct Reconciliation {
    stats: Arc<Stats>,
    current: std::sync::RwLock<Arc<Reconciler>>,
}

impl Reconciliation {
    pub fn new(config: &Config) -> Reconciliation {
        let stats = Arc::new(Stats::default());
        let current = std::sync::RwLock::new(Arc::new(Reconciler::new(config, stats.clone())));
        Reconciliation { stats, current }
    }

    /// The reconciler in force.
    pub fn reconciler(&self) -> Arc<Reconciler> {
        self.current.read().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Builds the reconciler anew from `config` (its plans, API bases, timeout and rate);
    /// passes already running finish with the old one.
    pub fn rebuild(&self, config: &Config) {
        let new = Arc::new(Reconciler::build(config, self.stats.clone(), Some(&self.reconciler())));
        match self.current.write() {
            Ok(mut r) => *r = new,
            Err(p) => *p.into_inner() = new,
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// What one attempt found. The first four are stored as the membership's `sync_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    InSync,
    DriftCorrected,
    /// A difference the rules did not act on (refused, ignored, stale): flagged for a human.
    DriftUnresolved,
    /// The provider could not be read; nothing changed.
    ProviderUnreachable,
    /// Not asked (no API for this provider, no API key, a one-time purchase). Where the
    /// provider could be asked, the attempt is recorded; the sync status is not changed.
    Skipped,
    /// Our side failed (store busy): not stored, retried next pass.
    Failed,
}

impl SyncStatus {
    /// The membership's stored sync status this outcome sets (`None`: it sets none).
    pub fn stored(self) -> Option<SyncState> {
        match self {
            SyncStatus::InSync => Some(SyncState::InSync),
            SyncStatus::DriftCorrected => Some(SyncState::DriftCorrected),
            SyncStatus::DriftUnresolved => Some(SyncState::DriftUnresolved),
            SyncStatus::ProviderUnreachable => Some(SyncState::ProviderUnreachable),
            SyncStatus::Skipped | SyncStatus::Failed => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::InSync => "in_sync",
            SyncStatus::DriftCorrected => "drift_corrected",
            SyncStatus::DriftUnresolved => "drift_unresolved",
            SyncStatus::ProviderUnreachable => "provider_unreachable",
            SyncStatus::Skipped => "skipped",
            SyncStatus::Failed => "failed",
        }
    }
}

/// One membership's reconciliation, as resync and the CLI report it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub membership_id: String,
    pub member_id: String,
    pub tenant: String,
    pub provider: String,
    pub sync_status: SyncStatus,
    pub detail: String,
    /// The `status_synced` event fed for a difference.
    pub event_id: Option<String>,
    pub from: Option<MState>,
    pub to: Option<MState>,
}

/// Compiled plans, one HTTP client, one rate limiter per provider.
pub struct Reconciler {
    client: reqwest::Client,
    plans: BTreeMap<String, Plan>,
    limiters: BTreeMap<String, Arc<Limiter>>,
    stats: Arc<Stats>,
}

impl Reconciler {
    /// A reconciler for `config`, counting what it finds into `stats`.
    pub fn new(config: &Config, stats: Arc<Stats>) -> Reconciler {
        Reconciler::build(config, stats, None)
    }

    /// A reconciler for `config` that keeps `previous`'s rate limiters where the rate did
    /// not change, so a reload neither forgets a provider's `Retry-After` nor lets a pass
    /// still running on the old one and a new one ask a provider at twice its rate.
    fn build(config: &Config, stats: Arc<Stats>, previous: Option<&Reconciler>) -> Reconciler {
        let plans: BTreeMap<String, Plan> = config
            .extractors
            .iter()
            .map(|(name, x)| {
                let plan = match &x.spec.reconcile {
                    Some(spec) => Plan::compile(x.file(), spec, config.api_bases.get(name)),
                    None => Plan::compile(
                        x.file(),
                        &ReconcileSpec {
                            unsupported: Some(format!("{} has no `reconcile:` section", x.file())),
                            ..Default::default()
                        },
                        None,
                    ),
                };
                (name.clone(), plan)
            })
            .collect();
        let rate = config.reconcile.rate_per_sec;
        let limiters = plans
            .keys()
            .map(|p| {
                let kept = previous.and_then(|r| r.limiters.get(p)).filter(|l| l.paces_as(rate)).cloned();
                (p.clone(), kept.unwrap_or_else(|| Arc::new(Limiter::new(rate))))
            })
            .collect::<BTreeMap<_, _>>();
        let client = reqwest::Client::builder()
            // Not followed: a redirect could carry the API key's header to another host.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.reconcile.timeout)
            .user_agent(concat!("membersync/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Reconciler { client, plans, limiters, stats }
    }

    /// Why this tenant's memberships at `provider` cannot be reconciled, if they cannot.
    pub fn why_not(&self, config: &Config, tenant: &str, provider: &str) -> Option<String> {
        let Some(plan) = self.plans.get(provider) else {
            return Some(format!("no provider file for `{provider}`"));
        };
        if let Some(why) = &plan.unsupported {
            return Some(format!("{provider} cannot be reconciled: {}", why.trim()));
        }
        if plan.api_base.is_none() && plan.url.contains("{api_base}") {
            let var = format!("{}_API_BASE", provider.to_ascii_uppercase());
            return Some(format!("no API root for {provider}: set {var}"));
        }
        let key = config.tenants.get(tenant).and_then(|t| t.providers.get(provider)).and_then(|p| p.api_key.as_ref());
        if key.is_none() && plan.headers.iter().any(|(_, v)| v.contains("{api_key}")) {
            return Some(format!("tenant `{tenant}` has no API key for {provider} (`api_key` in the config)"));
        }
        None
    }

    /// The (tenant, provider) pairs whose memberships can be reconciled.
    pub fn targets(&self, config: &Config) -> Vec<(String, String)> {
        config
            .tenants
            .iter()
            .flat_map(|(t, tc)| tc.providers.keys().map(move |p| (t.clone(), p.clone())))
            .filter(|(t, p)| self.why_not(config, t, p).is_none())
            .collect()
    }

    /// Reconciles one membership: ask, compare, correct through the pipeline, record.
    pub async fn reconcile(&self, ctx: &Arc<Ctx>, m: &MembershipRow) -> Report {
        let mut report = Report {
            membership_id: m.id.clone(),
            member_id: m.member_id.clone(),
            tenant: m.tenant.clone(),
            provider: m.provider.clone(),
            sync_status: SyncStatus::Skipped,
            detail: String::new(),
            event_id: None,
            from: None,
            to: None,
        };
        if let Some(why) = self.why_not(&ctx.config(), &m.tenant, &m.provider) {
            report.detail = why;
            return report;
        }
        let plan = &self.plans[&m.provider];
        let Some(subscription_id) = m.key.strip_prefix("sub:").map(str::to_string) else {
            let why = "a one-time purchase (no subscription at the provider): nothing to compare";
            return self.skip(ctx, report, m, why.into()).await;
        };
        let (t, p, mid) = (m.tenant.clone(), m.provider.clone(), m.member_id.clone());
        let customer_id = match store::read(&ctx.store, move |s| s.customer_id(&t, &p, &mid)).await {
            Ok(id) => id,
            // Only a request that names the customer id needs it.
            Err(e) if !plan.names("customer_id") => {
                tracing::warn!(membership = %m.id, error = %e, "Could not read the member's customer id; the request does not use it.");
                None
            }
            Err(e) => {
                report.sync_status = SyncStatus::Failed;
                report.detail = format!("could not read the member's customer id: {e}");
                return report;
            }
        };
        let vars = Vars {
            api_base: plan.api_base.as_ref().map(|b| b.trim_end_matches('/').to_string()),
            subscription_id: Some(subscription_id.clone()),
            customer_id,
            product_id: m.product_id.clone(),
        };
        let request = match self.request(ctx, plan, m, &vars) {
            Ok(r) => r,
            Err(why) => return self.skip(ctx, report, m, why.to_string()).await,
        };
        let settings = &ctx.config().reconcile;
        let limiter = &self.limiters[&m.provider];
        let asked_at = ctx.clock.now();
        let answer = fetch::send(&self.client, limiter, &request, settings.timeout, settings.max_retry_after).await;
        let snapshot = answer.and_then(|body| plan.snapshot(&body, &vars).map(|s| (s, body)));
        let (snapshot, body) = match snapshot {
            Ok(x) => x,
            Err(error) => {
                tracing::warn!(membership = %m.id, provider = %m.provider, %error, "Provider could not be read; nothing changed.");
                report.sync_status = SyncStatus::ProviderUnreachable;
                report.detail = error.to_string();
                let rec = SyncRecord {
                    membership_id: m.id.clone(),
                    sync_status: SyncState::ProviderUnreachable,
                    attempted_at: asked_at,
                    reconciled_at: None,
                    detail: Some(format!("provider unreachable: {error}")),
                    drift: None,
                    error: Some((asked_at, error.to_string())),
                };
                return self.finish(ctx, report, rec).await;
            }
        };

        let differences = match differences(ctx, &snapshot, m) {
            Ok(d) => d,
            Err(e) => {
                report.sync_status = SyncStatus::Failed;
                report.detail = format!("rule error: {e}");
                return report;
            }
        };
        let now = ctx.clock.now();
        if differences.is_empty() {
            report.sync_status = SyncStatus::InSync;
            report.detail = format!("in sync: provider says {}", describe(&snapshot));
            let rec = SyncRecord {
                membership_id: m.id.clone(),
                sync_status: SyncState::InSync,
                attempted_at: asked_at,
                reconciled_at: Some(now),
                detail: Some(report.detail.clone()),
                drift: None,
                error: None,
            };
            return self.finish(ctx, report, rec).await;
        }

        // A difference: the provider's view goes through rules → machine → store.
        let changed = differences.join("; ");
        let event = status_synced(plan, m, &subscription_id, &snapshot, now);
        let event_id = event.event.event_id.clone();
        let raw = Raw {
            body,
            headers: vec![("x-membersync-reconcile".into(), request.describe())],
            source: Source::Reconcile,
            delivery: false,
            enrichment: None,
        };
        let ack = match pipeline::process(ctx, Incoming::Extracted(Box::new(event)), raw).await {
            Ok(a) => a,
            Err(e) => {
                report.sync_status = SyncStatus::Failed;
                report.detail = format!("drift found ({changed}) but not stored: {e}; retried next pass");
                return report;
            }
        };
        let o = &ack.outcome;
        report.event_id = Some(event_id.clone());
        report.from = o.from;
        report.to = o.to;
        let rule = o.rule.as_ref().map(|r| format!(" by {}:{} {}", r.file, r.line, r.function)).unwrap_or_default();
        let (status, detail) = match ack.status {
            Status::Applied => {
                let moved = match (o.from, o.to) {
                    (Some(f), Some(t)) => format!("{f} → {t}"),
                    _ => "no state change".into(),
                };
                let input = o.input.map(|i| i.as_str().to_string()).unwrap_or_else(|| "effects only".into());
                (
                    SyncStatus::DriftCorrected,
                    format!("drift corrected: {changed}; {input}{rule}: {moved} (event {event_id})"),
                )
            }
            other => (
                SyncStatus::DriftUnresolved,
                format!(
                    "drift not resolved: {changed}; the event was {}{rule}: {} (event {event_id})",
                    other.as_str(),
                    o.reason.clone().unwrap_or_default()
                ),
            ),
        };
        tracing::info!(membership = %m.id, provider = %m.provider, status = status.as_str(), %detail, "Reconciled.");
        report.sync_status = status;
        report.detail = detail.clone();
        let rec = SyncRecord {
            membership_id: m.id.clone(),
            sync_status: status.stored().unwrap_or(SyncState::DriftUnresolved),
            attempted_at: asked_at,
            reconciled_at: Some(now),
            detail: Some(detail.clone()),
            drift: Some((now, detail)),
            error: None,
        };
        self.finish(ctx, report, rec).await
    }

    fn request(&self, ctx: &Ctx, plan: &Plan, m: &MembershipRow, vars: &Vars) -> Result<Request, MissingValue> {
        let url = fill(&plan.url, vars, true)?;
        let config = ctx.config();
        let key =
            config.tenants.get(&m.tenant).and_then(|t| t.providers.get(&m.provider)).and_then(|p| p.api_key.as_ref());
        let headers = plan
            .headers
            .iter()
            .map(|(k, v)| Ok((k.clone(), fill_with(v, vars, key.map(|k| k.expose()), false)?)))
            .collect::<Result<Vec<_>, MissingValue>>()?;
        let body = match &plan.body {
            Some(b) => Some(fill_json(b, vars)?.to_string().into_bytes()),
            None => None,
        };
        let method = match plan.method {
            ReconcileMethod::Get => reqwest::Method::GET,
            ReconcileMethod::Post => reqwest::Method::POST,
        };
        Ok(Request { method, url, headers, body })
    }

    /// A membership that cannot be asked: recorded as an attempt with its status unchanged,
    /// so the schedule moves past it instead of finding it first in line forever.
    async fn skip(&self, ctx: &Arc<Ctx>, mut report: Report, m: &MembershipRow, why: String) -> Report {
        report.detail = why;
        let rec = SyncRecord {
            membership_id: m.id.clone(),
            sync_status: m.sync_status,
            attempted_at: ctx.clock.now(),
            reconciled_at: None,
            detail: Some(format!("not asked: {}", report.detail)),
            drift: None,
            error: None,
        };
        self.finish(ctx, report, rec).await
    }

    async fn finish(&self, ctx: &Arc<Ctx>, mut report: Report, rec: SyncRecord) -> Report {
        match ctx.store.write(move |tx| tx.record_sync(&rec)).await {
            Ok(()) => self.stats.count(report.sync_status),
            Err(e) => {
                report.detail = format!("{} (could not record the sync status: {e})", report.detail);
                report.sync_status = SyncStatus::Failed;
            }
        }
        report
    }
}

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn describe(s: &Snapshot) -> String {
    let mut out = s.status.clone();
    if let Some(t) = s.period_end {
        out.push_str(&format!(", period end {}", rfc(t)));
    }
    if s.cancel_at_period_end == Some(true) {
        out.push_str(", cancels at period end");
    }
    if let Some(p) = &s.product_id {
        out.push_str(&format!(", product {p}"));
    }
    out
}

/// What differs between the provider's snapshot and the stored membership, in words.
/// Whether a status agrees with a state is the rules' call (`status_matches`); the other
/// fields are compared only while the membership holds (or the provider grants) access:
/// an ended membership whose provider also says it ended is in sync, whatever its dates.
fn differences(ctx: &Ctx, s: &Snapshot, m: &MembershipRow) -> Result<Vec<String>, crate::rules::Error> {
    let view = crate::pipeline::view_of(Some(m));
    let agrees = ctx.rules().status_matches(&s.status, &view)?.unwrap_or(s.status == m.state.as_str());
    let mut out = Vec::new();
    if !agrees {
        out.push(format!("status: provider says `{}`, membership is `{}`", s.status, m.state));
    }
    if agrees && m.state.is_end() {
        return Ok(out);
    }
    if let Some(pe) = s.period_end {
        let pe = chrono::DateTime::from_timestamp(pe.timestamp(), 0).unwrap_or(pe);
        if m.period_end != Some(pe) {
            let was = m.period_end.map(rfc).unwrap_or_else(|| "none".into());
            out.push(format!("period_end: {was} → {}", rfc(pe)));
        }
    }
    // Only an `active` status says anything about a scheduled cancel (status.rhai reads
    // cancel_at_period_end for `active` alone).
    if let (Some(c), "active") = (s.cancel_at_period_end, s.status.as_str()) {
        if c != m.cancel_at_period_end {
            out.push(format!("cancel_at_period_end: {} → {c}", m.cancel_at_period_end));
        }
    }
    if let Some(p) = &s.product_id {
        if m.product_id.as_deref() != Some(p.as_str()) && m.plan_id.as_deref() != Some(p.as_str()) {
            out.push(format!("product: {} → {p}", m.product_id.as_deref().unwrap_or("none")));
        }
    }
    Ok(out)
}

/// The synthetic event for a difference: the provider's current view, for this membership.
fn status_synced(
    plan: &Plan,
    m: &MembershipRow,
    subscription_id: &str,
    s: &Snapshot,
    now: DateTime<Utc>,
) -> Extraction {
    let event_id = format!("reconcile:{}:{}", m.id, now.timestamp());
    Extraction {
        event: CanonicalEvent {
            kind: Some(EventKind::StatusSynced),
            provider: m.provider.clone(),
            tenant: m.tenant.clone(),
            event_id: event_id.clone(),
            event_type: "reconcile".into(),
            occurred_at: now,
            member: MemberRef::default(),
            subscription_id: Some(subscription_id.to_string()),
            product_id: s.product_id.clone().or_else(|| m.product_id.clone()),
            plan_id: m.plan_id.clone(),
            status: Some(s.status.clone()),
            period_end: s.period_end,
            cancel_at_period_end: s.cancel_at_period_end.unwrap_or(m.cancel_at_period_end),
            amount_cents: None,
            currency: None,
            payment: Default::default(),
            note: None,
        },
        idempotency_key: event_id,
        mapping: Mapping::new(plan.file.clone(), Some("reconcile".into())),
        enrich: None,
    }
}

/// Totals of a pass, as the CLI prints them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub checked: usize,
    pub in_sync: usize,
    pub drift_corrected: usize,
    pub drift_unresolved: usize,
    pub provider_unreachable: usize,
    pub skipped: usize,
    pub failed: usize,
    pub reports: Vec<Report>,
}

impl Summary {
    /// As `membersync reconcile` prints it: a line per membership, then totals.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.reports {
            out.push_str(&format!(
                "{} {} {} {}: {}\n",
                r.member_id,
                r.membership_id,
                r.provider,
                r.sync_status.as_str(),
                r.detail
            ));
        }
        out.push_str(&format!(
            "checked {}: {} in sync, {} drift corrected, {} drift unresolved, {} provider unreachable, {} skipped, {} failed\n",
            self.checked, self.in_sync, self.drift_corrected, self.drift_unresolved, self.provider_unreachable, self.skipped, self.failed
        ));
        out
    }

    fn add(&mut self, r: Report) {
        self.checked += 1;
        match r.sync_status {
            SyncStatus::InSync => self.in_sync += 1,
            SyncStatus::DriftCorrected => self.drift_corrected += 1,
            SyncStatus::DriftUnresolved => self.drift_unresolved += 1,
            SyncStatus::ProviderUnreachable => self.provider_unreachable += 1,
            SyncStatus::Skipped => self.skipped += 1,
            SyncStatus::Failed => self.failed += 1,
        }
        self.reports.push(r);
    }
}

/// Reconciles every membership of one member now (`POST /members/{id}/resync`,
/// `membersync reconcile --member`). `None` when there is no such member.
pub async fn resync_member(ctx: &Arc<Ctx>, reconciler: &Reconciler, member_id: &str) -> store::Result<Option<Summary>> {
    let id = member_id.to_string();
    let Some(detail) = store::read(&ctx.store, move |s| s.member_detail(&id, 0)).await? else {
        return Ok(None);
    };
    let mut summary = Summary::default();
    // An operator's grant has no provider to ask (and nothing is recorded on it).
    for m in detail.memberships.iter().filter(|m| m.provider != crate::manual::PROVIDER) {
        summary.add(reconciler.reconcile(ctx, m).await);
    }
    Ok(Some(summary))
}

#[cfg(test)]
mod tests;
