//! The pipeline: the one place the order of stages lives.
//!
//! ```text
//! ingest: verify → decode → extract ─┐
//! timers: due timer ─────────────────┼→ process (in the writer, one savepoint per event):
//! reconcile: status_synced ──────────┘   dedupe → resolve → stale? → rules → machine → commit
//!                                          → release of events parked for a new membership
//! ```
//! A caller hears the outcome only after the batch holding its event has committed.
//!
//! The stages, each in a room of its own: `resolve` (which member and membership, the
//! fan-out of a member deleted at the provider, a timer as an event), the rules (`rules`)
//! and the machine (`machine`), `commit` (what a transition changes in the store),
//! `parked` (events that arrived before their membership), all under `context` (the
//! snapshot in force) and recorded through `outcome`. `seed` puts a membership in a given
//! state for dry runs.
//!
//! What this module must never do: know what drives it (HTTP, timers, reconciliation,
//! reload), or commit an event outside the writer's transaction.

mod commit;
mod context;
mod outcome;
mod parked;
mod rederive;
mod resolve;
mod seed;

pub use commit::view_of;
pub use context::{Ctx, Loaded};
pub use outcome::{Ack, Incoming, Outcome, Raw, Status};
pub use parked::{incoming_from_row, ENRICH_FLAG, ENRICH_KEY};
pub use rederive::{apply_derived, Rederived};
pub use resolve::membership_key;
pub use seed::seed_membership;

use crate::canonical::EventKind;
use crate::effects::Effect;
use crate::machine::{self, MState, Step};
use crate::store::{self, EventRow, Tx};
use chrono::{DateTime, Utc};
use commit::Transition;
use outcome::{finish, flag_member, flag_membership};
use std::sync::Arc;

/// Runs one event through dedupe → rules → machine → store and waits for its commit.
pub async fn process(ctx: &Arc<Ctx>, incoming: Incoming, raw: Raw) -> store::Result<Ack> {
    let now = ctx.clock.now();
    let loaded = ctx.loaded();
    let pre = Precomputed::of(&loaded, &incoming, &raw);
    let ack = match ctx.store.shared() {
        // On the shared store it may run again (another replica's batch held its member):
        // it runs on copies, and changes nothing but through `tx`; its hint names what it
        // will lock.
        true => {
            let mut hint = lock_hint(&incoming);
            hint.extend(members_named(ctx, &incoming).await.iter().map(|m| store::lock_keys::member(m)));
            let job = move |tx: &mut dyn Tx| apply_with(&loaded, tx, incoming.clone(), raw.clone(), now, pre.clone());
            ctx.store.write_again(hint, job).await?
        }
        // One writer runs every job once: no copies, no hint.
        false => ctx.store.write(move |tx| apply_with(&loaded, tx, incoming, raw, now, pre)).await?,
    };
    if ack.outcome.effects.iter().any(|e| matches!(e, Effect::ScheduleTimer { .. })) {
        ctx.timers_changed.notify_one();
    }
    Ok(ack)
}

/// What the job for `incoming` will lock on the shared store, as far as the event tells
/// (`store::lock_keys`): its delivery, the customer id, email and membership key it names,
/// the payments it names and what may be parked under them. The member it turns out to be
/// about is locked when it is found.
pub fn lock_hint(incoming: &Incoming) -> Vec<i64> {
    use store::lock_keys as k;
    let Incoming::Extracted(x) = incoming else { return vec![] };
    let (t, p, ev) = (&x.event.tenant, &x.event.provider, &x.event);
    let mut ids = vec![k::event(t, p, &x.idempotency_key)];
    if p == crate::manual::PROVIDER {
        ids.extend(ev.member.provider_customer_id.as_deref().map(k::member));
    } else {
        ids.extend(ev.member.provider_customer_id.as_deref().map(|c| k::customer(t, p, c)));
        ids.extend(ev.member.email.as_deref().map(|e| k::email(t, e)));
    }
    if let Some(key) = resolve::membership_key(ev) {
        ids.push(k::membership_key(t, p, &key));
        ids.push(k::parked(t, p, &key));
    }
    for r in ev.payment.refs() {
        ids.push(k::payment(t, p, &r));
        ids.push(k::parked(t, p, &parked::payment_key(&r)));
    }
    ids
}

/// The members an event is likely about, as stored now (`Store::members_named`): the
/// shared store takes their locks at the start of its batch, with the hint's, rather than
/// one by one as its job finds them. A guess that could not be read is no guess.
async fn members_named(ctx: &Arc<Ctx>, incoming: &Incoming) -> Vec<String> {
    let Incoming::Extracted(x) = incoming else { return vec![] };
    if x.event.provider == crate::manual::PROVIDER {
        return vec![]; // named by id: in the hint already
    }
    let ev = &x.event;
    let (t, p, mkey) = (ev.tenant.clone(), ev.provider.clone(), resolve::membership_key(ev));
    let (cid, email) = (ev.member.provider_customer_id.clone(), ev.member.email.clone());
    store::read(&ctx.store, move |s| s.members_named(&t, &p, mkey.as_deref(), cid.as_deref(), email.as_deref()))
        .await
        .unwrap_or_default()
}

/// What the writer would otherwise work out from the event alone — its rule view and rank,
/// its canonical JSON, the request headers' JSON — worked out before it, on the caller's
/// thread, under the same snapshot. None of it depends on stored state; the single writer
/// thread is what bounds ingest, so the less it does per event the better.
#[derive(Default, Clone)]
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
    pre: Precomputed,
) -> store::Result<Ack> {
    // The payments the event names are tied to the membership it was found to be about,
    // whatever it did to it (stale or ignored, the bill is still that membership's), and
    // the events parked for one of them run now.
    let payments = match &incoming {
        Incoming::Extracted(x) => x.event.payment.refs(),
        _ => vec![],
    };
    let (tenant, provider, event_id) = match &incoming {
        Incoming::Extracted(x) => (x.event.tenant.clone(), x.event.provider.clone(), x.event.event_id.clone()),
        _ => Default::default(),
    };
    let ack = apply_event(loaded, tx, incoming, raw, now, pre)?;
    if payments.is_empty() || ack.status == Status::Duplicate {
        return Ok(ack);
    }
    let Some(ms_id) = ack.outcome.membership_id.clone() else { return Ok(ack) };
    // A transition tied them already (before any parked event it released ran); any other
    // outcome ties them here.
    if !(ack.status == Status::Applied && ack.outcome.to.is_some()) {
        commit::link_payments(tx, &tenant, &provider, &payments, &ms_id, &event_id, false)?;
    }
    // Parked events are rare: the membership and member are read only for one that waits.
    let mut found = None;
    for r in &payments {
        let key = parked::payment_key(r);
        if tx.parked(&tenant, &provider, &key, &ms_id)?.is_empty() {
            continue;
        }
        if found.is_none() {
            let Some(ms) = tx.membership(&ms_id)? else { break };
            let Some(mem) = tx.member(&ms.member_id)? else { break };
            found = Some((ms, mem));
        }
        if let Some((ms, mem)) = &found {
            release_parked(loaded, tx, ms, mem, &key, now)?;
        }
    }
    Ok(ack)
}

/// One event through dedupe → resolve → stale → rules → machine → commit.
fn apply_event(
    loaded: &Loaded,
    tx: &mut dyn Tx,
    incoming: Incoming,
    mut raw: Raw,
    now: DateTime<Utc>,
    mut pre: Precomputed,
) -> store::Result<Ack> {
    let source = raw.source;
    let enrichment = raw.enrichment.take();

    // A due timer becomes a canonical `expired` event for its membership.
    let incoming = match incoming {
        Incoming::Timer(t) => match resolve::timer_event(tx, &t)? {
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
    let (tenant, provider, key) = match &incoming {
        Incoming::Extracted(x) => (x.event.tenant.clone(), x.event.provider.clone(), x.idempotency_key.clone()),
        Incoming::Unreadable { provider, tenant, failure } => {
            (tenant.clone(), provider.clone(), failure.idempotency_key.clone())
        }
        Incoming::Timer(_) => unreachable!("timers were turned into events above"),
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
        source,
        received_at: now,
        occurred_at: None,
        member_id: None,
        membership_id: None,
        status: store::EventStatus::Failed, // set by `finish`
        reason: None,
        raw: raw.body,
        headers: pre.headers.take().unwrap_or_else(|| store::stored_json(&raw.headers)),
        canonical: None,
        outcome: store::null_json(),
        park_key: None,
        // A provider's request; a timer, replay or reconciliation is none.
        deliveries: i64::from(delivery),
        enrichment: None,
        body_pruned_at: None,
    };

    let x = match incoming {
        Incoming::Unreadable { failure, .. } => {
            rec.event_id = failure.event_id.clone();
            rec.event_type = failure.event_type.clone();
            rec.occurred_at = failure.occurred_at;
            let mut outcome = Outcome::new(Status::Failed, source);
            // Without U+0000, which PostgreSQL's text cannot hold (see `intake`).
            outcome.reason = Some(failure.error.to_string().replace('\0', "\u{FFFD}"));
            return finish(tx, rec, outcome);
        }
        Incoming::Extracted(x) => x,
        Incoming::Timer(_) => unreachable!("timers were turned into events above"),
    };
    // What the delivery left out and an enrichment fetched (the products a checkout bought):
    // one item completes the event; several are one membership each, every one an event of
    // its own under this one.
    let mut x = x;
    let mut enrich_failed = None;
    if x.enrich.is_some() {
        match enrichment {
            Some(Ok(e)) if !e.items.is_empty() => {
                rec.enrichment = serde_json::to_string(&e).ok();
                x.mapping.enriched_by = Some(format!("{}: {}", e.name, e.request));
                pre = Precomputed::default(); // worked out before the products were known
                if e.items.len() > 1 {
                    return fan_out_items(loaded, tx, *x, rec, &e, now);
                }
                x.event.product_id = Some(e.items[0].product_id.clone());
                x.event.plan_id = e.items[0].plan_id.clone();
                if e.of > 1 {
                    // One product of a checkout of several: its payment is the checkout's.
                    x.event.payment = Default::default();
                }
            }
            Some(Ok(_)) => enrich_failed = Some("the answer lists no item".to_string()),
            Some(Err(why)) => enrich_failed = Some(why),
            None => enrich_failed = Some("not fetched yet".to_string()),
        }
    }
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
    let Some(tenant_cfg) = loaded.config.tenants.get(&tenant) else {
        outcome.status = Status::Refused;
        outcome.reason = Some(format!("unknown tenant `{tenant}`"));
        return finish(tx, rec, outcome);
    };

    // Resolve who and which membership.
    let resolve::Resolved { mkey, mut membership, mut member, unknown_invoice } = match resolve::resolve(
        tx, &tenant, &provider, ev,
    )? {
        Ok(r) => r,
        Err(resolve::Ambiguous { member: mem, .. }) if enrich_failed.is_some() => {
            let why = enrich_failed.take().unwrap_or_default();
            return keep_unenriched(tx, rec, outcome, Some(mem), &why, now);
        }
        Err(resolve::Ambiguous { member: mem, count }) => {
            outcome.status = Status::Refused;
            outcome.member_id = Some(mem.id.clone());
            outcome.reason = Some(format!(
                "the event names no subscription or product and member has {count} {provider} memberships: not guessing which"
            ));
            rec.member_id = Some(mem.id.clone());
            flag_member(tx, &mem, &outcome, now)?;
            return finish(tx, rec, outcome);
        }
    };
    outcome.member_id = member.as_ref().map(|m| m.id.clone());
    outcome.membership_id = membership.as_ref().map(|m| m.id.clone());
    rec.member_id = outcome.member_id.clone();
    rec.membership_id = outcome.membership_id.clone();
    if let Some(why) = enrich_failed {
        let mem = commit::member_for(tx, &tenant, &provider, ev, member.take(), now)?;
        return keep_unenriched(tx, rec, outcome, mem, &why, now);
    }
    if let Some(invoice) = unknown_invoice {
        // It names its bill, which no stored event ties to a membership yet: not guessed
        // from the member's memberships, waited for.
        outcome.status = Status::Refused;
        outcome.reason = Some(format!(
            "the event names invoice {invoice}, which no stored event ties to a membership; parked until one does"
        ));
        rec.park_key = Some(parked::payment_key(&format!("invoice:{invoice}")));
        if let Some(mem) = &member {
            flag_member(tx, mem, &outcome, now)?;
        }
        return finish(tx, rec, outcome);
    }

    // A member deleted at the provider: every membership of theirs there gets the event,
    // each logged as its own row (same event id), each through the rules and the machine.
    if ev.kind == Some(EventKind::MemberDeleted) && mkey.is_none() {
        if let Some(mem) = &member {
            outcome.reason = Some(fan_out_member_deleted(loaded, tx, &x, &rec, mem, now)?);
            return finish(tx, rec, outcome);
        }
    }

    // One payment announced twice (Stripe's invoice.paid and invoice.payment_succeeded)
    // counts once: the second is a no-op.
    if let Some(reason) = commit::counted_already(tx, &tenant, &provider, ev, membership.as_ref())? {
        outcome.status = Status::Ignored;
        outcome.reason = Some(reason);
        return finish(tx, rec, outcome);
    }

    // Stale? Then the rules: the rank, and the decision.
    let mut view = view_of(membership.as_ref());
    view.member_email = member.as_ref().and_then(|m| m.email.clone());
    let ev_view = pre.view.take().unwrap_or_else(|| crate::rules::EventView::of(ev));
    let (rank, decision) = match judge(loaded, &tenant, ev, ev_view, &view, membership.is_some(), pre.rank.take(), now)
    {
        Ok(judged) => judged,
        Err((status, reason)) => {
            outcome.status = status;
            outcome.reason = Some(reason);
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
            // A refund or a dispute the rules ignore (a dispute won that took nothing) says
            // nothing of the subscription's own state: it does not make older news of it stale.
            let about_the_charge = matches!(ev.kind, Some(EventKind::Refunded | EventKind::Disputed));
            if !ev.event_type.starts_with("timer.")
                && !about_the_charge
                && m.last_event_at.is_none_or(|t| t <= ev.occurred_at)
            {
                commit::note_provider_time(m, ev, rank);
                // A later period end is news even when the rule changes nothing (a payment
                // while paused: the resume then finds the period it paid for).
                if let Some(pe) = ev.period_end.filter(|pe| m.period_end.is_none_or(|p| *pe > p)) {
                    m.period_end = Some(pe);
                }
                tx.save_membership(m)?;
            }
            if ev.event_type.starts_with("timer.") {
                // A timer whose reason moved (a renewal timer under a raised allowance) leaves
                // the renewal timer where the rules now want it.
                commit::keep_renewal_timer(loaded, tx, m, ev)?;
            }
        } else if resolve::needs_membership(ev.kind) && !ev.event_type.starts_with("timer.") {
            // Nothing to act on yet; once the membership exists this may matter (a resume
            // that arrived before the purchase): parked, like a refused one.
            rec.park_key = Some(parked::park_key(mkey.as_deref(), ev));
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
        if ev.kind == Some(EventKind::MemberUpdated) {
            // A member is kept from any event that names one, in any order: a profile event
            // before any plan creates the member the later plan events attach to.
            member = match member.take() {
                Some(mut m) => {
                    commit::update_member_details(tx, ev, &mut m, now)?;
                    if let Some(cid) = &ev.member.provider_customer_id {
                        // Found by email: the provider's id for them is theirs from now on.
                        tx.link_customer(&tenant, &provider, cid, &m.id)?;
                    }
                    Some(m)
                }
                None => commit::member_for(tx, &tenant, &provider, ev, None, now)?,
            };
            outcome.member_id = member.as_ref().map(|m| m.id.clone());
            rec.member_id = outcome.member_id.clone();
        }
        commit::apply_member_effects(tx, &tenant, &provider, ev, member.as_ref(), &effects, now)?;
        if let Some(m) = membership.as_mut() {
            // A flag without a transition (a partial refund, a dispute kept by policy) is
            // still put where operators look.
            commit::apply_flags(tx, m, &effects, now)?;
        }
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
                rec.park_key = Some(parked::park_key(mkey.as_deref(), ev));
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

    // When the membership, as this leaves it, expects its next renewal at the latest (the
    // rules' `renewal_due_at`): its `renewal_due` timer is kept there.
    let mut after = view.clone();
    after.exists = true;
    after.state = Some(to);
    after.provider = Some(provider.clone());
    after.period_end = commit::period_end_after(ev, view.period_end);
    let renewal_due = match loaded.rules.renewal_due_at(&after, &loaded.policy(&tenant)) {
        Ok(due) => due,
        Err(e) => {
            outcome.status = Status::Failed;
            outcome.to = None;
            outcome.reason = Some(format!("rule error: {e}"));
            return finish(tx, rec, outcome);
        }
    };

    // An operator's grant is about a stored member, named by id: never one created for it.
    if provider == crate::manual::PROVIDER && member.is_none() {
        outcome.status = Status::Refused;
        outcome.to = None;
        outcome.reason = Some(format!(
            "the member this names ({}) is not stored (merged into another, or gone): grant on the member's page again",
            ev.member.provider_customer_id.clone().unwrap_or_default()
        ));
        return finish(tx, rec, outcome);
    }
    // Commit: who it is (created on first sight, new details learnt), then the membership.
    let Some(mem) = commit::member_for(tx, &tenant, &provider, ev, member.take(), now)? else {
        outcome.status = Status::Refused;
        outcome.to = None;
        outcome.reason = Some("the event names no member (no email, no customer id) and no known membership".into());
        return finish(tx, rec, outcome);
    };
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
    let transition = Transition {
        tenant: &tenant,
        provider: &provider,
        tenant_cfg,
        ev,
        mapping_flags: &x.mapping.flags,
        from,
        to,
        rank,
        renewal_due,
        now,
    };
    let (ms, created) = commit::apply_transition(tx, &transition, mkey, membership, &mem, &mut effects)?;
    // Tied before any parked event released below runs: a bill announced twice counts once.
    let counts = matches!(ev.kind, Some(EventKind::Renewed | EventKind::Purchased));
    commit::link_payments(tx, &tenant, &provider, &ev.payment.refs(), &ms.id, &ev.event_id, counts)?;
    outcome.member_id = Some(mem.id.clone());
    outcome.membership_id = Some(ms.id.clone());
    rec.member_id = outcome.member_id.clone();
    rec.membership_id = outcome.membership_id.clone();
    outcome.effects = effects;
    // What the source said in words (an operator's reason) stands as the reason of a change.
    if outcome.reason.is_none() {
        outcome.reason = ev.note.clone();
    }
    let ack = finish(tx, rec, outcome)?;

    // Events that arrived before this membership existed run now, oldest first, each
    // through the whole pipeline again.
    if created {
        release_parked(loaded, tx, &ms, &mem, &ms.key, now)?;
    }
    Ok(ack)
}

/// Runs again, oldest first, each through the whole pipeline, the events parked under `key`
/// that wait for `ms` (of `mem`), which now exists or is now tied to what they name.
fn release_parked(
    loaded: &Loaded,
    tx: &mut dyn Tx,
    ms: &store::MembershipRow,
    mem: &store::MemberRow,
    key: &str,
    now: DateTime<Utc>,
) -> store::Result<()> {
    let mut rows = tx.parked(&ms.tenant, &ms.provider, key, &ms.id)?;
    if rows.is_empty() {
        return Ok(());
    }
    // Each event is weighed against the store as it is at its turn: one that runs again
    // may tie another customer id (or merge a member) into this member, and make a later
    // one this member's. So after a run that changed who the member is, the list is read
    // again and taken up past the last one weighed (only then: a re-read after every run
    // made a release of many events read them all again each time); rows the runs store
    // (an event parked again) are not taken up.
    let stored = tx.last_event_seq()?;
    let mut identity = tx.parked_identity(&ms.tenant, &ms.provider, &ms.id)?;
    let mut weighed: Option<(Option<DateTime<Utc>>, i64)> = None;
    loop {
        let next = rows.iter().position(|e| e.seq <= stored && weighed.is_none_or(|w| (e.occurred_at, e.seq) > w));
        let Some(e) = next.map(|i| rows.remove(i)) else { break };
        weighed = Some((e.occurred_at, e.seq));
        if !parked::waits_for(tx, &e, ms, mem)? {
            continue;
        }
        let Some((incoming, raw)) = incoming_from_row(&loaded.config, &e) else { continue };
        if !tx.mark_replayed(e.seq, "re-applied once its membership existed")? {
            continue;
        }
        let parked = apply(loaded, tx, incoming, raw, now)?;
        tracing::info!(membership = %ms.id, parked = %format!("{} {}", e.event_id, parked.status.as_str()), "Parked event re-applied.");
        let now_identity = tx.parked_identity(&ms.tenant, &ms.provider, &ms.id)?;
        if now_identity != identity {
            identity = now_identity;
            rows = tx.parked(&ms.tenant, &ms.provider, key, &ms.id)?;
        }
    }
    Ok(())
}

/// Stale, then the rules: the event's rank (`pre`, if worked out already) and the rules'
/// decision. `Err`: the event is stale, or a rule failed (status and reason).
#[allow(clippy::too_many_arguments)]
fn judge(
    loaded: &Loaded,
    tenant: &str,
    ev: &crate::canonical::CanonicalEvent,
    ev_view: crate::rules::EventView,
    view: &crate::rules::MembershipView,
    has_membership: bool,
    pre: Option<Result<i64, crate::rules::Error>>,
    now: DateTime<Utc>,
) -> Result<(i64, crate::rules::Decision), (Status, String)> {
    let rules = &loaded.rules;
    let failed = |e: crate::rules::Error| (Status::Failed, format!("rule error: {e}"));
    if has_membership && rules.is_stale_of(&ev_view, view).map_err(failed)? {
        return Err((
            Status::Stale,
            format!(
                "occurred at {} but the membership already reflects {}",
                ev.occurred_at.to_rfc3339(),
                view.last_event_at.map(|t| t.to_rfc3339()).unwrap_or_default()
            ),
        ));
    }
    let rank = pre.unwrap_or_else(|| rules.rank_of(&ev_view)).map_err(failed)?;
    let decision = rules.decide_of(ev, ev_view, view, &loaded.policy(tenant), now).map_err(failed)?;
    Ok((rank, decision))
}

/// An event whose enrichment could not be made: kept (refused, parked under `enrich:`) and
/// its member flagged where an operator sees it; the reconcile schedule tries again. It is
/// tied to no membership: none is known to be the one it paid for. Never dropped, never
/// guessed.
fn keep_unenriched(
    tx: &mut dyn Tx,
    mut rec: EventRow,
    mut outcome: Outcome,
    mem: Option<store::MemberRow>,
    why: &str,
    now: DateTime<Utc>,
) -> store::Result<Ack> {
    outcome.status = Status::Refused;
    outcome.reason = Some(format!("{}: {why}; kept, and tried again by the reconcile schedule", parked::ENRICH_FLAG));
    outcome.membership_id = None;
    rec.membership_id = None;
    rec.park_key = Some(parked::ENRICH_KEY.to_string());
    outcome.member_id = mem.as_ref().map(|m| m.id.clone());
    rec.member_id = outcome.member_id.clone();
    if let Some(mem) = &mem {
        flag_member(tx, mem, &outcome, now)?;
    }
    finish(tx, rec, outcome)
}

/// An event whose enrichment fetched several items (a checkout buying several products):
/// each item is an event of its own (same event id, an idempotency key of its own), each
/// through the rules and the machine to a membership of its own. The event's row records
/// what became of each.
fn fan_out_items(
    loaded: &Loaded,
    tx: &mut dyn Tx,
    x: crate::extract::Extraction,
    mut rec: EventRow,
    e: &crate::enrich::Enriched,
    now: DateTime<Utc>,
) -> store::Result<Ack> {
    let source = rec.source;
    rec.event_id = x.event.event_id.clone();
    rec.event_type = x.event.event_type.clone();
    rec.kind = x.event.kind.map(|k| k.as_str().to_string());
    rec.occurred_at = Some(x.event.occurred_at);
    rec.canonical = Some(store::stored_json(&x.event));
    let mut parts = Vec::new();
    for item in &e.items {
        let mut sub = x.clone();
        sub.idempotency_key = format!("{}#product:{}", x.idempotency_key, item.product_id);
        // One payment for several memberships: it is tied to none of them (its refund is
        // for the checkout, not one product: matched by the member, or refused and flagged).
        sub.event.payment = Default::default();
        // The part carries its own item (stored with it): replayed alone, it is this product
        // only.
        let one = crate::enrich::Enriched { items: vec![item.clone()], of: e.items.len(), ..e.clone() };
        let raw = Raw {
            body: rec.raw.clone(),
            headers: serde_json::from_str(rec.headers.get()).unwrap_or_default(),
            source,
            delivery: false,
            enrichment: Some(Ok(one)),
        };
        let ack = apply(loaded, tx, Incoming::Extracted(Box::new(sub)), raw, now)?;
        parts.push(format!("product:{} {}", item.product_id, ack.status.as_str()));
        if rec.member_id.is_none() {
            rec.member_id = ack.outcome.member_id.clone();
        }
    }
    let mut outcome = Outcome::new(Status::Applied, source);
    outcome.mapping = Some(x.mapping.clone());
    outcome.member_id = rec.member_id.clone();
    outcome.reason = Some(format!("{} items, one membership each: {}", e.items.len(), parts.join("; ")));
    finish(tx, rec, outcome)
}

/// A member deleted at the provider: every membership of theirs there gets the event, each
/// logged as its own row (same event id), each through the rules and the machine. Returns
/// the reason the member's own row records (what became of each).
fn fan_out_member_deleted(
    loaded: &Loaded,
    tx: &mut dyn Tx,
    x: &crate::extract::Extraction,
    rec: &EventRow,
    mem: &crate::store::MemberRow,
    now: DateTime<Utc>,
) -> store::Result<String> {
    let source = rec.source;
    let mut parts = Vec::new();
    for (key, sub) in resolve::member_deleted_parts(tx, x, mem, &rec.provider)? {
        let raw = Raw {
            body: rec.raw.clone(),
            headers: serde_json::from_str(rec.headers.get()).unwrap_or_default(),
            source,
            delivery: false,
            enrichment: None,
        };
        let ack = apply(loaded, tx, Incoming::Extracted(Box::new(sub)), raw, now)?;
        let o = &ack.outcome;
        parts.push(format!(
            "{key} {}{}",
            ack.status.as_str(),
            match (o.from, o.to) {
                (Some(f), Some(t)) => format!(" {f} → {t}"),
                _ => String::new(),
            }
        ));
    }
    Ok(if parts.is_empty() {
        "member deleted at the provider; no memberships there".to_string()
    } else {
        format!("member deleted at the provider; per membership: {}", parts.join("; "))
    })
}
