//! The pipeline: the one place the order of stages lives.
//!
//! ```text
//! ingest: verify → decode → extract ─┐
//! timers: due timer ─────────────────┼→ process (in the writer, one savepoint per event):
//! reconcile: status_synced ──────────┘   dedupe → resolve member → stale? → rules → machine → store
//! ```
//! A caller hears the outcome only after the batch holding its event has committed.

use crate::canonical::{CanonicalEvent, EventKind, MemberRef, Source};
use crate::clock::Clock;
use crate::config::Config;
use crate::effects::Effect;
use crate::extract::{Extraction, Failure, Mapping};
use crate::machine::{self, Input, MState, Step};
use crate::rules::{MembershipView, RuleRef, RuleSet};
use crate::store::{self, EventRow, LeadRow, MemberRow, MembershipRow, Store, TimerRow, Tx};
use chrono::{DateTime, Utc};
use rhai::Dynamic;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Applied,
    Duplicate,
    Ignored,
    Stale,
    Refused,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::Duplicate => "duplicate",
            Status::Ignored => "ignored",
            Status::Stale => "stale",
            Status::Refused => "refused",
            Status::Failed => "failed",
        }
    }
}

/// The outcome of one event: what `simulate` prints and the event row stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: Status,
    pub from: Option<MState>,
    pub to: Option<MState>,
    pub effects: Vec<Effect>,
    /// The machine input the rule chose.
    pub input: Option<Input>,
    /// Why the event was ignored, stale, refused or failed.
    pub reason: Option<String>,
    /// The YAML mapping that produced the canonical event.
    pub mapping: Option<Mapping>,
    /// The rule that decided (file, function, line, rule-set version).
    pub rule: Option<RuleRef>,
    pub source: Source,
    pub member_id: Option<String>,
    pub membership_id: Option<String>,
}

impl Outcome {
    /// A provider's URL check: nothing was stored.
    pub fn probe() -> Outcome {
        let mut o = Outcome::new(Status::Ignored, Source::Webhook);
        o.reason = Some("URL check (empty body): nothing stored".into());
        o
    }

    fn new(status: Status, source: Source) -> Outcome {
        Outcome {
            status,
            from: None,
            to: None,
            effects: vec![],
            input: None,
            reason: None,
            mapping: None,
            rule: None,
            source,
            member_id: None,
            membership_id: None,
        }
    }
}

/// The answer to the provider: the event id and its status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ack {
    pub event_id: String,
    pub status: Status,
    #[serde(skip)]
    pub outcome: Outcome,
}

/// One consistent snapshot of what operators edit: the config (tenants, provider YAML)
/// and the rule set. An event is processed under one snapshot from start to commit; a
/// reload swaps in a new one for the events after it.
pub struct Loaded {
    pub config: Arc<Config>,
    pub rules: Arc<RuleSet>,
    policies: HashMap<String, Dynamic>,
}

impl Loaded {
    pub fn new(config: Config, rules: RuleSet) -> Loaded {
        let policies = config
            .tenants
            .iter()
            .map(|(name, t)| {
                let d = rhai::serde::to_dynamic(&t.policy).unwrap_or_else(|_| Dynamic::from_map(rhai::Map::new()));
                (name.clone(), d)
            })
            .collect();
        Loaded { config: Arc::new(config), rules: Arc::new(rules), policies }
    }

    fn policy(&self, tenant: &str) -> Dynamic {
        self.policies.get(tenant).cloned().unwrap_or_else(|| Dynamic::from_map(rhai::Map::new()))
    }
}

/// Everything the pipeline needs: the store, the clock and the snapshot in force. Shared
/// by whatever drives it (the service's `AppState`, the timer task, the CLI).
pub struct Ctx {
    loaded: RwLock<Arc<Loaded>>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// Woken when a timer is scheduled, so the timer task re-reads the next due time.
    pub timers_changed: tokio::sync::Notify,
}

impl Ctx {
    pub fn new(config: Config, rules: RuleSet, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Ctx {
        Ctx {
            loaded: RwLock::new(Arc::new(Loaded::new(config, rules))),
            store,
            clock,
            timers_changed: tokio::sync::Notify::new(),
        }
    }

    /// A context sharing an existing snapshot (a scratch run under the rules in force).
    pub fn with_loaded(loaded: Arc<Loaded>, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Ctx {
        Ctx { loaded: RwLock::new(loaded), store, clock, timers_changed: tokio::sync::Notify::new() }
    }

    /// The snapshot in force.
    pub fn loaded(&self) -> Arc<Loaded> {
        self.loaded.read().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.loaded().config.clone()
    }

    /// The rule set in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.loaded().rules.clone()
    }

    /// Swaps in a new snapshot; events already in the writer finish under the old one.
    pub fn swap(&self, loaded: Loaded) {
        match self.loaded.write() {
            Ok(mut r) => *r = Arc::new(loaded),
            Err(p) => *p.into_inner() = Arc::new(loaded),
        }
    }
}

/// An event ready for the writer.
pub enum Incoming {
    /// A delivery whose fields were extracted.
    Extracted(Box<Extraction>),
    /// A delivery whose fields could not be read: stored as a dead letter.
    Unreadable { provider: String, tenant: String, failure: Box<Failure> },
    /// A timer that fell due.
    Timer(TimerRow),
}

/// The raw request kept with the event.
pub struct Raw {
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub source: Source,
    /// Whether it is a provider's request (counted in the event's `deliveries`): a
    /// webhook as it came in, not a replay, a timer or one membership's part of it.
    pub delivery: bool,
}

/// Runs one event through dedupe → rules → machine → store and waits for its commit.
pub async fn process(ctx: &Arc<Ctx>, incoming: Incoming, raw: Raw) -> store::Result<Ack> {
    let now = ctx.clock.now();
    let loaded = ctx.loaded();
    let pre = Precomputed::of(&loaded, &incoming, &raw);
    let ack = ctx.store.write(move |tx| apply_with(&loaded, tx, incoming, raw, now, pre)).await?;
    if ack.outcome.effects.iter().any(|e| matches!(e, Effect::ScheduleTimer { .. })) {
        ctx.timers_changed.notify_one();
    }
    Ok(ack)
}

/// What the writer would otherwise work out from the event alone — its rule view and rank,
/// its canonical JSON, the request headers' JSON — worked out before it, on the caller's
/// thread, under the same snapshot. None of it depends on stored state; the single writer
/// thread is what bounds ingest, so the less it does per event the better.
#[derive(Default)]
pub struct Precomputed {
    rank: Option<Result<i64, crate::rules::Error>>,
    canonical: Option<store::StoredJson>,
    headers: Option<store::StoredJson>,
    view: Option<crate::rules::EventView>,
}

impl Precomputed {
    pub fn of(loaded: &Loaded, incoming: &Incoming, raw: &Raw) -> Precomputed {
        let headers = Some(store::stored_json(&raw.headers));
        match incoming {
            Incoming::Extracted(x) => {
                let view = crate::rules::EventView::of(&x.event);
                Precomputed {
                    rank: Some(loaded.rules.rank_of(&view)),
                    canonical: Some(store::stored_json(&x.event)),
                    headers,
                    view: Some(view),
                }
            }
            _ => Precomputed { headers, ..Default::default() },
        }
    }
}

/// The job the writer runs for one event, inside its savepoint.
pub fn apply(loaded: &Loaded, tx: &mut dyn Tx, incoming: Incoming, raw: Raw, now: DateTime<Utc>) -> store::Result<Ack> {
    apply_with(loaded, tx, incoming, raw, now, Precomputed::default())
}

/// `apply`, with what `pre` already holds not worked out again.
pub fn apply_with(
    loaded: &Loaded,
    tx: &mut dyn Tx,
    incoming: Incoming,
    raw: Raw,
    now: DateTime<Utc>,
    mut pre: Precomputed,
) -> store::Result<Ack> {
    let source = raw.source;
    let (tenant, provider, key) = match &incoming {
        Incoming::Extracted(x) => (x.event.tenant.clone(), x.event.provider.clone(), x.idempotency_key.clone()),
        Incoming::Unreadable { provider, tenant, failure } => {
            (tenant.clone(), provider.clone(), failure.idempotency_key.clone())
        }
        Incoming::Timer(t) => (t.tenant.clone(), String::new(), String::new()),
    };

    // Timers become a canonical `expired` event for their membership.
    let incoming = match incoming {
        Incoming::Timer(t) => match timer_event(tx, &t)? {
            Some(x) => {
                tx.delete_timer_if_due(&t.membership_id, &t.name, t.due_at)?;
                Incoming::Extracted(Box::new(x))
            }
            None => {
                tx.cancel_timer(&t.membership_id, &t.name)?;
                let outcome = Outcome::new(Status::Ignored, source);
                return Ok(Ack {
                    event_id: format!("timer:{}:{}", t.membership_id, t.name),
                    status: Status::Ignored,
                    outcome,
                });
            }
        },
        other => other,
    };
    let (provider, key) = match &incoming {
        Incoming::Extracted(x) => (x.event.provider.clone(), x.idempotency_key.clone()),
        _ => (provider, key),
    };

    // Dedupe.
    if let Some(prev) = tx.event_by_key(&tenant, &provider, &key)? {
        tx.note_duplicate(prev.seq)?;
        let mut outcome = Outcome::new(Status::Duplicate, source);
        outcome.reason = Some(format!("already received as event #{} ({})", prev.seq, prev.status));
        outcome.member_id = prev.member_id.clone();
        outcome.membership_id = prev.membership_id.clone();
        return Ok(Ack { event_id: prev.event_id, status: Status::Duplicate, outcome });
    }

    let delivery = raw.delivery;
    let mut rec = EventRow {
        seq: 0,
        tenant: tenant.clone(),
        provider: provider.clone(),
        event_id: String::new(),
        idempotency_key: key,
        event_type: String::new(),
        kind: None,
        source: source.as_str().to_string(),
        received_at: now,
        occurred_at: None,
        member_id: None,
        membership_id: None,
        status: String::new(),
        reason: None,
        raw: raw.body,
        headers: pre.headers.take().unwrap_or_else(|| store::stored_json(&raw.headers)),
        canonical: None,
        outcome: store::null_json(),
        park_key: None,
        // A provider's request; a timer, replay or reconciliation is none.
        deliveries: i64::from(delivery),
    };

    let x = match incoming {
        Incoming::Unreadable { failure, .. } => {
            rec.event_id = failure.event_id.clone();
            rec.event_type = failure.event_type.clone();
            rec.occurred_at = failure.occurred_at;
            let mut outcome = Outcome::new(Status::Failed, source);
            outcome.reason = Some(failure.error.0.clone());
            return finish(tx, rec, outcome);
        }
        Incoming::Extracted(x) => x,
        Incoming::Timer(_) => unreachable!("timers were turned into events above"),
    };
    let ev = &x.event;
    rec.event_id = ev.event_id.clone();
    rec.event_type = ev.event_type.clone();
    rec.kind = ev.kind.map(|k| k.as_str().to_string());
    rec.occurred_at = Some(ev.occurred_at);
    rec.canonical = pre.canonical.take().or_else(|| Some(store::stored_json(ev)));
    let mut outcome = Outcome::new(Status::Applied, source);
    outcome.mapping = Some(x.mapping.clone());

    if ev.kind.is_none() {
        outcome.status = Status::Ignored;
        outcome.reason = x.mapping.ignored_because.clone().or(Some("unmapped event".into()));
        return finish(tx, rec, outcome);
    }
    let rules = &loaded.rules;
    let Some(tenant_cfg) = loaded.config.tenants.get(&tenant) else {
        outcome.status = Status::Refused;
        outcome.reason = Some(format!("unknown tenant `{tenant}`"));
        return finish(tx, rec, outcome);
    };

    // Resolve who and which membership.
    let mkey = membership_key(ev);
    let mut membership = match &mkey {
        Some(k) => tx.membership_by_key(&tenant, &provider, k)?,
        None => None,
    };
    let mut member = match &membership {
        Some(m) => tx.member(&m.member_id)?,
        None => find_member(tx, &tenant, &provider, &ev.member)?,
    };
    if membership.is_none() && mkey.is_none() {
        if let Some(mem) = &member {
            let mut mine: Vec<MembershipRow> =
                tx.memberships_of(&mem.id)?.into_iter().filter(|m| m.provider == provider).collect();
            match mine.len() {
                0 => {}
                1 => membership = mine.pop(),
                n => {
                    if needs_membership(ev.kind) {
                        outcome.status = Status::Refused;
                        outcome.member_id = Some(mem.id.clone());
                        outcome.reason = Some(format!(
                            "the event names no subscription or product and member has {n} {provider} memberships: not guessing which"
                        ));
                        rec.member_id = Some(mem.id.clone());
                        flag_member(tx, mem, &outcome, now)?;
                        return finish(tx, rec, outcome);
                    }
                }
            }
        }
    }
    outcome.member_id = member.as_ref().map(|m| m.id.clone());
    outcome.membership_id = membership.as_ref().map(|m| m.id.clone());
    rec.member_id = outcome.member_id.clone();
    rec.membership_id = outcome.membership_id.clone();

    // A member deleted at the provider: every membership of theirs there gets the event,
    // each logged as its own row (same event id), each through the rules and the machine.
    if ev.kind == Some(EventKind::MemberDeleted) && mkey.is_none() {
        if let Some(mem) = &member {
            let mine: Vec<MembershipRow> =
                tx.memberships_of(&mem.id)?.into_iter().filter(|m| m.provider == provider).collect();
            let mut parts = Vec::new();
            for ms in &mine {
                let mut sub = (*x).clone();
                sub.idempotency_key = format!("{}#{}", x.idempotency_key, ms.key);
                sub.event.subscription_id = ms.key.strip_prefix("sub:").map(str::to_string);
                sub.event.product_id = ms.key.strip_prefix("product:").map(str::to_string).or(ms.product_id.clone());
                let raw = Raw {
                    body: rec.raw.clone(),
                    headers: serde_json::from_str(rec.headers.get()).unwrap_or_default(),
                    source,
                    delivery: false,
                };
                let ack = apply(loaded, tx, Incoming::Extracted(Box::new(sub)), raw, now)?;
                let o = &ack.outcome;
                parts.push(format!(
                    "{} {}{}",
                    ms.key,
                    ack.status.as_str(),
                    match (o.from, o.to) {
                        (Some(f), Some(t)) => format!(" {f} → {t}"),
                        _ => String::new(),
                    }
                ));
            }
            outcome.reason = Some(if parts.is_empty() {
                "member deleted at the provider; no memberships there".to_string()
            } else {
                format!("member deleted at the provider; per membership: {}", parts.join("; "))
            });
            return finish(tx, rec, outcome);
        }
    }
    let view = view_of(membership.as_ref());
    let ev_view = pre.view.take().unwrap_or_else(|| crate::rules::EventView::of(ev));

    // Stale?
    if membership.is_some() {
        match rules.is_stale_of(&ev_view, &view) {
            Ok(true) => {
                outcome.status = Status::Stale;
                outcome.reason = Some(format!(
                    "occurred at {} but the membership already reflects {}",
                    ev.occurred_at.to_rfc3339(),
                    view.last_event_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                ));
                return finish(tx, rec, outcome);
            }
            Ok(false) => {}
            Err(e) => {
                outcome.status = Status::Failed;
                outcome.reason = Some(format!("rule error: {e}"));
                return finish(tx, rec, outcome);
            }
        }
    }

    // Rules. The rank first: the decision takes the event's view.
    let rank = match pre.rank.take().unwrap_or_else(|| rules.rank_of(&ev_view)) {
        Ok(r) => r,
        Err(e) => {
            outcome.status = Status::Failed;
            outcome.reason = Some(format!("rule error: {e}"));
            return finish(tx, rec, outcome);
        }
    };
    let decision = match rules.decide_of(ev, ev_view, &view, &loaded.policy(&tenant), now) {
        Ok(d) => d,
        Err(e) => {
            outcome.status = Status::Failed;
            outcome.reason = Some(format!("rule error: {e}"));
            return finish(tx, rec, outcome);
        }
    };
    outcome.rule = decision.rule.clone();
    outcome.input = decision.input;
    let from = membership.as_ref().map(|m| m.state).unwrap_or(MState::None);
    if let Some(reason) = decision.ignore {
        // The rule found the provider's view consistent with the state: the membership
        // now reflects the provider as of this event, so older ones are stale.
        if let Some(m) = membership.as_mut() {
            if !ev.event_type.starts_with("timer.") && m.last_event_at.is_none_or(|t| t <= ev.occurred_at) {
                note_provider_time(m, ev, rank);
                tx.save_membership(m)?;
            }
        } else if needs_membership(ev.kind) && !ev.event_type.starts_with("timer.") {
            // Nothing to act on yet; once the membership exists this may matter (a resume
            // that arrived before the purchase): parked, like a refused one.
            rec.park_key = Some(mkey.clone().unwrap_or_default());
        }
        outcome.status = Status::Ignored;
        outcome.reason = Some(reason);
        return finish(tx, rec, outcome);
    }
    if let Some(reason) = decision.refuse {
        outcome.status = Status::Refused;
        outcome.reason = Some(reason);
        outcome.from = Some(from);
        if let Some(m) = membership.as_mut() {
            flag_membership(tx, m, &outcome, now)?;
        }
        return finish(tx, rec, outcome);
    }

    // Machine.
    let mut effects = decision.effects;
    let Some(input) = decision.input else {
        // Effects only (a lead, a flag, new member details): no membership moves.
        if let (Some(EventKind::MemberUpdated), Some(m)) = (ev.kind, member.as_mut()) {
            let email = ev.member.email.clone().filter(|e| m.email.as_deref() != Some(e.as_str()));
            let name = ev.member.name.clone().filter(|n| m.name.as_deref() != Some(n.as_str()));
            if email.is_some() || name.is_some() {
                m.email = email.or(m.email.take());
                m.name = name.or(m.name.take());
                m.updated_at = now;
                tx.save_member(m)?;
            }
        }
        apply_member_effects(tx, &tenant, &provider, ev, member.as_ref(), &effects, now)?;
        outcome.effects = effects;
        return finish(tx, rec, outcome);
    };
    let to = match machine::step(from, input) {
        Step::Refused { .. } => {
            outcome.status = Status::Refused;
            outcome.from = Some(from);
            outcome.reason = Some(format!("the machine has no `{}` edge from `{}`", input.as_str(), from.as_str()));
            if membership.is_none() {
                // It arrived before the event that starts its membership: parked, and run
                // again when that membership comes to exist.
                rec.park_key = Some(mkey.clone().unwrap_or_default());
                outcome.reason =
                    Some(format!("{}; parked until the membership exists", outcome.reason.clone().unwrap_or_default()));
            }
            if let Some(m) = membership.as_mut() {
                flag_membership(tx, m, &outcome, now)?;
            }
            return finish(tx, rec, outcome);
        }
        Step::Moved { to, .. } => to,
    };
    outcome.from = Some(from);
    outcome.to = Some(to);

    // Who it is: create the member on first sight, learn new details.
    let mem = match member.take() {
        Some(mut m) => {
            let mut changed = false;
            if m.email.is_none() && ev.member.email.is_some() {
                m.email = ev.member.email.clone();
                changed = true;
            }
            if m.name.is_none() && ev.member.name.is_some() {
                m.name = ev.member.name.clone();
                changed = true;
            }
            if changed {
                m.updated_at = now;
                tx.save_member(&m)?;
            }
            m
        }
        None => {
            if ev.member.email.is_none() && ev.member.provider_customer_id.is_none() {
                outcome.status = Status::Refused;
                outcome.to = None;
                outcome.reason =
                    Some("the event names no member (no email, no customer id) and no known membership".into());
                return finish(tx, rec, outcome);
            }
            // Ids are time-ordered (UUIDv7): new members' rows land at the end of every
            // index keyed by member id rather than on a random page each, so a batch of
            // new members dirties a few pages of the WAL, not one per member and index.
            let m = MemberRow {
                id: format!("mbr_{}", uuid::Uuid::now_v7().simple()),
                tenant: tenant.clone(),
                email: ev.member.email.clone(),
                name: ev.member.name.clone(),
                flags: vec![],
                created_at: now,
                updated_at: now,
            };
            tx.save_member(&m)?;
            m
        }
    };
    if let Some(cid) = &ev.member.provider_customer_id {
        tx.link_customer(&tenant, &provider, cid, &mem.id)?;
    }
    let Some(mkey) = mkey.or_else(|| membership.as_ref().map(|m| m.key.clone())) else {
        outcome.status = Status::Refused;
        outcome.to = None;
        outcome.reason = Some(
            "the event names no subscription or product, so no membership can be started; parked until one exists"
                .into(),
        );
        rec.park_key = Some(String::new());
        return finish(tx, rec, outcome);
    };
    let created = membership.is_none();
    let mut ms = membership.unwrap_or_else(|| MembershipRow {
        id: format!("msp_{}", uuid::Uuid::now_v7().simple()), // time-ordered, like member ids
        tenant: tenant.clone(),
        member_id: mem.id.clone(),
        provider: provider.clone(),
        key: mkey,
        subscription_id: None,
        product_id: None,
        plan_id: None,
        status: None,
        state: MState::None,
        period_end: None,
        grace_until: None,
        access_until: None,
        cancel_at_period_end: false,
        access_levels: vec![],
        flags: vec![],
        last_event_at: None,
        last_event_id: None,
        last_reconciled_at: None,
        sync_status: "never_reconciled".into(),
        created_at: now,
        updated_at: now,
        last_event_rank: 0,
    });
    // Held by state (a grace or period end that just ran out still counts: the transition
    // that follows it is what revokes, and the log should say so).
    let had_access = ms.state.holds_access() && !ms.access_levels.is_empty();
    let old_levels = ms.access_levels.clone();

    // Data the provider reports.
    ms.state = to;
    if ev.subscription_id.is_some() {
        ms.subscription_id = ev.subscription_id.clone();
    }
    if ev.product_id.is_some() {
        ms.product_id = ev.product_id.clone();
    }
    if ev.plan_id.is_some() {
        ms.plan_id = ev.plan_id.clone();
    }
    if ev.status.is_some() && !ev.event_type.starts_with("timer.") {
        ms.status = ev.status.clone();
    }
    if ev.period_end.is_some() {
        ms.period_end = ev.period_end;
    }
    // The state is the truth about a scheduled cancel; the event's flag only informs rules.
    ms.cancel_at_period_end = to == MState::Canceling;
    note_provider_time(&mut ms, ev, rank);
    ms.last_event_id = Some(ev.event_id.clone());
    ms.updated_at = now;

    // Flags the provider file puts on events like this one (its `flags:`), once each.
    for reason in outcome.mapping.iter().flat_map(|m| &m.flags) {
        if !ms.flags.contains(reason) && !effects.iter().any(|e| matches!(e, Effect::Flag { reason: r } if r == reason))
        {
            effects.push(Effect::Flag { reason: reason.clone() });
        }
    }

    // Effects the rule asked for.
    for e in &effects {
        match e {
            Effect::SetGrace { until } => ms.grace_until = *until,
            Effect::SetAccessUntil { until } => ms.access_until = *until,
            Effect::Flag { reason } => push_flag(&mut ms.flags, reason),
            _ => {}
        }
    }
    if !to.holds_access() {
        ms.grace_until = None;
        ms.access_until = None;
    }

    // Access levels through the product mapping; unmapped grants nothing and is flagged.
    match tenant_cfg.access_levels(&provider, ms.product_id.as_deref(), ms.plan_id.as_deref()) {
        Some(levels) => {
            ms.access_levels = levels;
            ms.flags.retain(|f| !f.starts_with("unmapped_product"));
        }
        None => {
            ms.access_levels = vec![];
            let reason = match ms.product_id.clone().or(ms.plan_id.clone()) {
                Some(id) => {
                    format!("unmapped_product: {provider} product `{id}` maps to no access level in the config")
                }
                None => "unmapped_product: no product known for this membership yet".to_string(),
            };
            if !ms.flags.contains(&reason) {
                effects.push(Effect::Flag { reason: reason.clone() });
            }
            push_flag(&mut ms.flags, &reason);
        }
    }
    let has_access = ms.has_access(now);
    if has_access && (!had_access || ms.access_levels != old_levels) {
        effects
            .push(Effect::GrantAccess { levels: ms.access_levels.clone(), until: ms.access_until.or(ms.grace_until) });
    } else if had_access && !has_access {
        effects
            .push(Effect::RevokeAccess {
                levels: old_levels, reason: format!("{} → {}", from.as_str(), to.as_str())
            });
    }
    tx.save_membership(&ms)?;
    for e in &effects {
        match e {
            Effect::ScheduleTimer { timer, at } => tx.set_timer(&TimerRow {
                tenant: tenant.clone(),
                membership_id: ms.id.clone(),
                name: timer.clone(),
                due_at: *at,
                set_by_event: ev.event_id.clone(),
            })?,
            Effect::CancelTimer { timer } => tx.cancel_timer(&ms.id, timer)?,
            _ => {}
        }
    }
    apply_member_effects(tx, &tenant, &provider, ev, Some(&mem), &effects, now)?;
    outcome.member_id = Some(mem.id.clone());
    outcome.membership_id = Some(ms.id.clone());
    rec.member_id = outcome.member_id.clone();
    rec.membership_id = outcome.membership_id.clone();
    outcome.effects = effects;
    let ack = finish(tx, rec, outcome)?;
    if created {
        for note in release_parked(loaded, tx, &ms, &mem, now)? {
            tracing::info!(membership = %ms.id, parked = %note, "Parked event re-applied.");
        }
    }
    Ok(ack)
}

/// Records that the membership reflects the provider as of this event. A timer is our own
/// clock, not news from the provider, so a late provider event older than a fired timer
/// still counts.
fn note_provider_time(ms: &mut MembershipRow, ev: &CanonicalEvent, rank: i64) {
    if ev.event_type.starts_with("timer.") {
        return;
    }
    ms.last_event_rank = match ms.last_event_at {
        Some(t) if t > ev.occurred_at => ms.last_event_rank,
        Some(t) if t == ev.occurred_at => ms.last_event_rank.max(rank),
        _ => rank,
    };
    ms.last_event_at = Some(ms.last_event_at.map_or(ev.occurred_at, |t| t.max(ev.occurred_at)));
}

/// Kinds that act on one membership (a lead or a member update does not).
fn needs_membership(kind: Option<EventKind>) -> bool {
    !matches!(kind, None | Some(EventKind::LeadCaptured | EventKind::MemberUpdated | EventKind::MemberDeleted))
}

/// `sub:<id>` for subscriptions, `product:<id>` for one-time products.
pub fn membership_key(ev: &CanonicalEvent) -> Option<String> {
    if let Some(s) = &ev.subscription_id {
        return Some(format!("sub:{s}"));
    }
    ev.product_id.as_ref().map(|p| format!("product:{p}"))
}

fn find_member(tx: &mut dyn Tx, tenant: &str, provider: &str, who: &MemberRef) -> store::Result<Option<MemberRow>> {
    if let Some(cid) = &who.provider_customer_id {
        if let Some(m) = tx.member_by_customer(tenant, provider, cid)? {
            return Ok(Some(m));
        }
    }
    match &who.email {
        Some(e) => tx.member_by_email(tenant, e),
        None => Ok(None),
    }
}

/// The membership as the rules see it.
pub fn view_of(m: Option<&MembershipRow>) -> MembershipView {
    match m {
        None => MembershipView::default(),
        Some(m) => MembershipView {
            exists: true,
            state: Some(m.state),
            period_end: m.period_end,
            grace_until: m.grace_until,
            access_until: m.access_until,
            last_event_at: m.last_event_at,
            last_event_rank: m.last_event_rank,
            cancel_at_period_end: m.cancel_at_period_end,
            product_id: m.product_id.clone(),
            plan_id: m.plan_id.clone(),
            status: m.status.clone(),
        },
    }
}

fn push_flag(flags: &mut Vec<String>, reason: &str) {
    if !flags.iter().any(|f| f == reason) {
        flags.push(reason.to_string());
    }
    if flags.len() > 20 {
        flags.remove(0);
    }
}

fn flag_membership(tx: &mut dyn Tx, m: &mut MembershipRow, o: &Outcome, now: DateTime<Utc>) -> store::Result<()> {
    push_flag(&mut m.flags, &format!("{}: {}", o.status.as_str(), o.reason.clone().unwrap_or_default()));
    m.updated_at = now;
    tx.save_membership(m)
}

fn flag_member(tx: &mut dyn Tx, m: &MemberRow, o: &Outcome, now: DateTime<Utc>) -> store::Result<()> {
    let mut m = m.clone();
    push_flag(&mut m.flags, &format!("{}: {}", o.status.as_str(), o.reason.clone().unwrap_or_default()));
    m.updated_at = now;
    tx.save_member(&m)
}

#[allow(clippy::too_many_arguments)]
fn apply_member_effects(
    tx: &mut dyn Tx,
    tenant: &str,
    provider: &str,
    ev: &CanonicalEvent,
    member: Option<&MemberRow>,
    effects: &[Effect],
    now: DateTime<Utc>,
) -> store::Result<()> {
    for e in effects {
        match e {
            Effect::CaptureLead { email, name } => tx.capture_lead(&LeadRow {
                tenant: tenant.to_string(),
                email: email.clone(),
                name: name.clone(),
                provider: provider.to_string(),
                event_id: ev.event_id.clone(),
                captured_at: ev.occurred_at,
                converted_at: None,
                member_id: None,
            })?,
            Effect::ConvertLead { email } => {
                if let Some(m) = member {
                    tx.convert_lead(tenant, email, &m.id, now)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn finish(tx: &mut dyn Tx, mut rec: EventRow, outcome: Outcome) -> store::Result<Ack> {
    rec.status = outcome.status.as_str().to_string();
    rec.reason = outcome.reason.clone();
    rec.outcome = store::stored_json(&outcome);
    tx.insert_event(&rec)?;
    Ok(Ack { event_id: rec.event_id, status: outcome.status, outcome })
}

/// The canonical event a due timer stands for (`None` if its membership is gone).
fn timer_event(tx: &mut dyn Tx, t: &TimerRow) -> store::Result<Option<Extraction>> {
    let Some(m) = tx.membership(&t.membership_id)? else {
        return Ok(None);
    };
    let event_id = format!("timer:{}:{}:{}", t.membership_id, t.name, t.due_at.timestamp());
    Ok(Some(Extraction {
        event: CanonicalEvent {
            kind: Some(EventKind::Expired),
            provider: m.provider.clone(),
            tenant: m.tenant.clone(),
            event_id: event_id.clone(),
            event_type: format!("timer.{}", t.name),
            occurred_at: t.due_at,
            member: MemberRef::default(),
            subscription_id: m.subscription_id.clone(),
            product_id: if m.subscription_id.is_some() {
                m.product_id.clone()
            } else {
                m.key.strip_prefix("product:").map(str::to_string)
            },
            plan_id: m.plan_id.clone(),
            status: None,
            period_end: None,
            cancel_at_period_end: m.cancel_at_period_end,
            amount_cents: None,
            currency: None,
        },
        idempotency_key: event_id,
        mapping: Mapping {
            file: "timers".into(),
            event: Some(format!("timer.{}", t.name)),
            case: None,
            ignored_because: None,
            flags: vec![],
        },
    }))
}

/// Puts a member and membership in `state` for the event's membership, as if earlier
/// events had led there (`simulate --state`): lets a dry run show what one event does to
/// a membership that is, say, active or past_due.
pub fn seed_membership(tx: &mut dyn Tx, config: &Config, ev: &CanonicalEvent, state: MState) -> store::Result<()> {
    let at = ev.occurred_at;
    let member = MemberRow {
        id: "mbr_seeded".into(),
        tenant: ev.tenant.clone(),
        email: Some(ev.member.email.clone().unwrap_or_else(|| "seeded@example.invalid".into())),
        name: ev.member.name.clone(),
        flags: vec![],
        created_at: at,
        updated_at: at,
    };
    tx.save_member(&member)?;
    if let Some(cid) = &ev.member.provider_customer_id {
        tx.link_customer(&ev.tenant, &ev.provider, cid, &member.id)?;
    }
    let products = config.tenants.get(&ev.tenant).and_then(|t| t.providers.get(&ev.provider)).map(|p| &p.products);
    let product_id = ev.product_id.clone().or_else(|| products.and_then(|p| p.keys().next().cloned()));
    let levels = products.and_then(|p| product_id.as_ref().and_then(|id| p.get(id)).cloned()).unwrap_or_default();
    // Only what the event itself says: a made-up period end would change what rules decide.
    let period_end = ev.period_end;
    tx.save_membership(&MembershipRow {
        id: "msp_seeded".into(),
        tenant: ev.tenant.clone(),
        member_id: member.id.clone(),
        provider: ev.provider.clone(),
        key: membership_key(ev).unwrap_or_else(|| "sub:seeded".into()),
        subscription_id: ev.subscription_id.clone(),
        product_id,
        plan_id: ev.plan_id.clone(),
        status: None,
        state,
        period_end,
        grace_until: (state == MState::PastDue).then(|| at + chrono::Duration::days(3)),
        access_until: if state == MState::Canceling { period_end } else { None },
        cancel_at_period_end: state == MState::Canceling,
        access_levels: levels,
        flags: vec![],
        last_event_at: None,
        last_event_id: None,
        last_reconciled_at: None,
        sync_status: "never_reconciled".into(),
        created_at: at,
        updated_at: at,
        last_event_rank: 0,
    })
}

/// A stored event as the pipeline's input again (replay, release of parked events):
/// decoded and extracted from its raw body under the current provider YAML, keeping its
/// idempotency key. `None` if its provider has no YAML any more.
pub fn incoming_from_row(config: &Config, e: &EventRow) -> Option<(Incoming, Raw)> {
    let x = config.extractors.get(&e.provider)?;
    let headers: Vec<(String, String)> = serde_json::from_str(e.headers.get()).unwrap_or_default();
    let content_type = headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str());
    let raw = Raw { body: e.raw.clone(), headers: headers.clone(), source: Source::Replay, delivery: false };
    let unreadable = |error: String| Incoming::Unreadable {
        provider: e.provider.clone(),
        tenant: e.tenant.clone(),
        failure: Box::new(Failure {
            idempotency_key: e.idempotency_key.clone(),
            event_id: e.event_id.clone(),
            event_type: e.event_type.clone(),
            occurred_at: e.occurred_at,
            error: crate::extract::Error(error),
        }),
    };
    let incoming = match x.decode_captured(&e.raw, content_type) {
        Err(err) => unreadable(err.to_string()),
        Ok(decoded) => match x.extract(&e.tenant, &decoded, &e.raw, &headers, e.received_at) {
            Ok(mut ex) => {
                ex.idempotency_key = e.idempotency_key.clone();
                Incoming::Extracted(Box::new(ex))
            }
            Err(failure) => Incoming::Unreadable { provider: e.provider.clone(), tenant: e.tenant.clone(), failure },
        },
    };
    Some((incoming, raw))
}

/// Runs the events parked for a membership that now exists (they arrived before it),
/// oldest first, each through the whole pipeline again; returns a note per event.
fn release_parked(
    loaded: &Loaded,
    tx: &mut dyn Tx,
    ms: &MembershipRow,
    mem: &MemberRow,
    now: DateTime<Utc>,
) -> store::Result<Vec<String>> {
    let mut notes = Vec::new();
    for e in tx.parked(&ms.tenant, &ms.provider, &ms.key)? {
        if e.park_key.as_deref() == Some("") {
            // Waiting for "a membership of the member it names": is it this member?
            let canonical = e.canonical.as_deref().map(store::json_of);
            let who = canonical.as_ref().map(|c| &c["member"]);
            let cid = who.and_then(|w| w["provider_customer_id"].as_str());
            let email = who.and_then(|w| w["email"].as_str());
            let by_customer = match cid {
                Some(c) => tx.member_by_customer(&ms.tenant, &ms.provider, c)?.is_some_and(|m| m.id == mem.id),
                None => false,
            };
            let by_email = email.is_some_and(|e| mem.email.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(e)));
            if !by_customer && !by_email {
                continue;
            }
        }
        let Some((incoming, raw)) = incoming_from_row(&loaded.config, &e) else { continue };
        if !tx.mark_replayed(e.seq, "re-applied once its membership existed")? {
            continue;
        }
        let ack = apply(loaded, tx, incoming, raw, now)?;
        notes.push(format!("{} {}", e.event_id, ack.status.as_str()));
    }
    Ok(notes)
}
