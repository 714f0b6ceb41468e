//! Commit: what a decided event changes in the store — the member (created on first sight,
//! details learnt), the membership (created, the provider's data, the rule's effects,
//! access through the product mapping, flags), timers, leads — and the access granted or
//! revoked that the outcome reports.
//!
//! What this module must never do: decide (the rules and the machine have, before it is
//! called) or grant access to a product the config does not map: unmapped grants nothing
//! and is flagged.

use super::outcome::push_flag;
use crate::canonical::{CanonicalEvent, EventKind};
use crate::config::Tenant;
use crate::effects::Effect;
use crate::machine::MState;
use crate::rules::MembershipView;
use crate::store::{self, LeadRow, MemberRow, MembershipRow, TimerRow, Tx};
use chrono::{DateTime, Utc};

/// A member-updated event: the member's email and name where the event's differ. A first
/// email another member has merges the two. A changed email is taken only when nothing else
/// rests on the old one: not when the member holds memberships at another provider (one
/// provider's profile edit must not move access bought elsewhere) or another member has the
/// new email; then the change is flagged, not applied. An erased member learns nothing.
pub(super) fn update_member_details(
    tx: &mut dyn Tx,
    ev: &CanonicalEvent,
    m: &mut MemberRow,
    now: DateTime<Utc>,
) -> store::Result<()> {
    if m.erased_at.is_some() {
        // Erased on request: it learns no email or name again (a new purchase with that
        // email is someone new to us), and is never merged by one.
        return Ok(());
    }
    let email = ev.member.email.clone().filter(|e| !m.email.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(e)));
    let name = ev.member.name.clone().filter(|n| m.name.as_deref() != Some(n.as_str()));
    if email.is_none() && name.is_none() {
        return Ok(());
    }
    m.name = name.or(m.name.take());
    m.updated_at = now;
    match (email, m.email.is_some()) {
        (Some(e), false) => {
            m.email = Some(e);
            *m = merge_same_email(tx, m.clone(), now)?;
        }
        (Some(e), true) => {
            let elsewhere = tx.memberships_of(&m.id)?.iter().any(|x| x.provider != ev.provider);
            let taken = tx.member_by_email(&m.tenant, &e)?.is_some_and(|o| o.id != m.id);
            if elsewhere || taken {
                let why = if taken {
                    "another member has that email"
                } else {
                    "the member holds memberships at other providers"
                };
                push_flag(&mut m.flags, &format!("email change at {} to {e} not applied: {why}", ev.provider));
            } else {
                m.email = Some(e);
            }
        }
        (None, _) => {}
    }
    tx.save_member(m)?;
    Ok(())
}

/// Member `m` has just learnt its email: another member of the tenant with the same email
/// is the same person (members are matched by email), so the two become one — the newer
/// merged into the older, which keeps every membership, customer link, event and lead and
/// is returned (flagged, so an operator sees it happened). Saved by the caller.
fn merge_same_email(tx: &mut dyn Tx, m: MemberRow, now: DateTime<Utc>) -> store::Result<MemberRow> {
    let Some(email) = m.email.clone() else { return Ok(m) };
    let Some(other) = tx.member_by_email(&m.tenant, &email)?.filter(|o| o.id != m.id) else {
        return Ok(m);
    };
    let (mut keep, gone) = if (other.created_at, &other.id) <= (m.created_at, &m.id) { (other, m) } else { (m, other) };
    keep.email = Some(email.clone());
    keep.name = keep.name.take().or(gone.name.clone());
    keep.updated_at = now;
    for f in &gone.flags {
        push_flag(&mut keep.flags, f);
    }
    push_flag(&mut keep.flags, &format!("merged member {} into this one: both had the email {email}", gone.id));
    tx.save_member(&keep)?;
    tx.merge_member(&gone.id, &keep.id)?;
    Ok(keep)
}

/// The member a transition belongs to: the stored one with details it lacked filled from
/// the event, or a new one; linked to the event's provider customer id. `None` when the
/// event names no member at all (no email, no customer id) and none is stored.
pub(super) fn member_for(
    tx: &mut dyn Tx,
    tenant: &str,
    provider: &str,
    ev: &CanonicalEvent,
    member: Option<MemberRow>,
    now: DateTime<Utc>,
) -> store::Result<Option<MemberRow>> {
    let mem = match member {
        // Erased on request: it learns no email or name again, and merges with no one.
        Some(m) if m.erased_at.is_some() => m,
        Some(mut m) => {
            let fills =
                (m.email.is_none() && ev.member.email.is_some()) || (m.name.is_none() && ev.member.name.is_some());
            if fills {
                let mut changed = false;
                let mut new_email = false;
                if m.email.is_none() && ev.member.email.is_some() {
                    m.email = ev.member.email.clone();
                    (changed, new_email) = (true, true);
                }
                if m.name.is_none() && ev.member.name.is_some() {
                    m.name = ev.member.name.clone();
                    changed = true;
                }
                if new_email {
                    m = merge_same_email(tx, m, now)?;
                }
                if changed {
                    m.updated_at = now;
                    tx.save_member(&m)?;
                }
            }
            m
        }
        None => {
            if ev.member.email.is_none() && ev.member.provider_customer_id.is_none() {
                return Ok(None);
            }
            // Ids are time-ordered (UUIDv7): new members' rows land at the end of every
            // index keyed by member id rather than on a random page each, so a batch of
            // new members dirties a few pages of the WAL, not one per member and index.
            let m = MemberRow {
                id: format!("mbr_{}", uuid::Uuid::now_v7().simple()),
                tenant: tenant.to_string(),
                email: ev.member.email.clone(),
                name: ev.member.name.clone(),
                flags: vec![],
                created_at: now,
                updated_at: now,
                erased_at: None,
            };
            tx.save_member(&m)?;
            m
        }
    };
    if let Some(cid) = &ev.member.provider_customer_id {
        tx.link_customer(tenant, provider, cid, &mem.id)?;
    }
    Ok(Some(mem))
}

/// One transition the machine allowed, `from` → `to`, for the event `ev`.
pub(super) struct Transition<'a> {
    pub tenant: &'a str,
    pub provider: &'a str,
    pub tenant_cfg: &'a Tenant,
    pub ev: &'a CanonicalEvent,
    /// Flags the provider file puts on events like this one (its mapping's `flags:`).
    pub mapping_flags: &'a [String],
    pub from: MState,
    pub to: MState,
    pub rank: i64,
    /// Where the rules want the membership's `renewal_due` timer (`Some(None)`: none;
    /// `None`: no rule manages it).
    pub renewal_due: Option<Option<DateTime<Utc>>>,
    pub now: DateTime<Utc>,
}

/// The timer that fires when a membership holding access saw no renewal by its period end
/// (and the rules' allowance after it).
pub const RENEWAL_TIMER: &str = "renewal_due";

/// Applies the transition to the membership (`None`: created under `mkey`) of `mem`:
/// the provider's data, the rule's `effects` (to which the access granted or revoked and
/// any new flags are added), access levels, timers and leads; saves it. Returns it, and
/// whether it was created.
pub(super) fn apply_transition(
    tx: &mut dyn Tx,
    t: &Transition<'_>,
    mkey: String,
    membership: Option<MembershipRow>,
    mem: &MemberRow,
    effects: &mut Vec<Effect>,
) -> store::Result<(MembershipRow, bool)> {
    let Transition { tenant, provider, tenant_cfg, ev, mapping_flags, from, to, rank, renewal_due, now } = *t;
    let created = membership.is_none();
    let mut ms = membership.unwrap_or_else(|| MembershipRow {
        id: format!("msp_{}", uuid::Uuid::now_v7().simple()), // time-ordered, like member ids
        tenant: tenant.to_string(),
        member_id: mem.id.clone(),
        provider: provider.to_string(),
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
        sync_status: crate::store::SyncState::NeverReconciled,
        created_at: now,
        updated_at: now,
        last_event_rank: 0,
    });
    // The member it belongs to (another member merged into it, by email, keeps it there).
    ms.member_id = mem.id.clone();
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
    let had_period_end = ms.period_end.is_some();
    ms.period_end = period_end_after(ev, ms.period_end);
    if ms.period_end.is_some() {
        ms.flags.retain(|f| f != PERIOD_UNKNOWN);
    } else if had_period_end {
        push_flag(&mut ms.flags, PERIOD_UNKNOWN);
    }
    // The state is the truth about a scheduled cancel; the event's flag only informs rules.
    ms.cancel_at_period_end = to == MState::Canceling;
    note_provider_time(&mut ms, ev, rank);
    ms.last_event_id = Some(ev.event_id.clone());
    ms.updated_at = now;

    // Flags the provider file puts on events like this one (its `flags:`), once each.
    for reason in mapping_flags {
        if !ms.flags.contains(reason) && !effects.iter().any(|e| matches!(e, Effect::Flag { reason: r } if r == reason))
        {
            effects.push(Effect::Flag { reason: reason.clone() });
        }
    }

    // Effects the rule asked for.
    for e in effects.iter() {
        match e {
            Effect::SetGrace { until } => ms.grace_until = *until,
            Effect::SetAccessUntil { until } => ms.access_until = *until,
            Effect::Flag { reason } => push_flag(&mut ms.flags, reason),
            Effect::ClearFlag { prefix } => ms.flags.retain(|f| !f.starts_with(prefix.as_str())),
            _ => {}
        }
    }
    if !to.holds_access() {
        ms.grace_until = None;
        ms.access_until = None;
    }

    // Access levels through the product mapping; unmapped grants nothing and is flagged.
    match tenant_cfg.access_levels(provider, ms.product_id.as_deref(), ms.plan_id.as_deref()) {
        Some(levels) => {
            ms.access_levels = levels;
            ms.flags.retain(|f| !f.starts_with("unmapped_product"));
        }
        None => {
            ms.access_levels = vec![];
            let reason = match ms.product_id.clone().or(ms.plan_id.clone()) {
                Some(id) => {
                    // The id as the sender wrote it, briefly: flags are read by operators and
                    // assistants (the whole id is on the membership and in `GET /products`).
                    let id = crate::extract::time::brief_text(&id);
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
    effects.extend(access_change(had_access, old_levels, &ms, now, || format!("{} → {}", from.as_str(), to.as_str())));
    if let Some(due) = renewal_due {
        let current = if created {
            None
        } else {
            tx.timers_of(&ms.id)?.into_iter().find(|x| x.name == RENEWAL_TIMER).map(|x| x.due_at)
        };
        match due {
            Some(at) if current != Some(at) => {
                effects.push(Effect::ScheduleTimer { timer: RENEWAL_TIMER.to_string(), at })
            }
            None if current.is_some() => effects.push(Effect::CancelTimer { timer: RENEWAL_TIMER.to_string() }),
            _ => {}
        }
    }
    tx.save_membership(&ms)?;
    for e in effects.iter() {
        match e {
            Effect::ScheduleTimer { timer, at } => tx.set_timer(&TimerRow {
                tenant: tenant.to_string(),
                membership_id: ms.id.clone(),
                name: timer.clone(),
                due_at: *at,
                set_by_event: ev.event_id.clone(),
            })?,
            Effect::CancelTimer { timer } => tx.cancel_timer(&ms.id, timer)?,
            _ => {}
        }
    }
    apply_member_effects(tx, tenant, provider, ev, Some(mem), effects, now)?;
    Ok((ms, created))
}

/// The flags a decision without a transition sets or clears on the membership, saved when
/// they change it.
pub(super) fn apply_flags(
    tx: &mut dyn Tx,
    ms: &mut MembershipRow,
    effects: &[Effect],
    now: DateTime<Utc>,
) -> store::Result<()> {
    let before = ms.flags.clone();
    for e in effects {
        match e {
            Effect::Flag { reason } => push_flag(&mut ms.flags, reason),
            Effect::ClearFlag { prefix } => ms.flags.retain(|f| !f.starts_with(prefix.as_str())),
            _ => {}
        }
    }
    if ms.flags != before {
        ms.updated_at = now;
        tx.save_membership(ms)?;
    }
    Ok(())
}

/// Ties the payment references `refs` that event `event_id` names to membership
/// `membership_id`; `counted`: the event counts as that payment (a purchase or renewal
/// applied).
pub(super) fn link_payments(
    tx: &mut dyn Tx,
    tenant: &str,
    provider: &str,
    refs: &[String],
    membership_id: &str,
    event_id: &str,
    counted: bool,
) -> store::Result<()> {
    for r in refs {
        // Only a bill is counted: a payment intent or a charge may stand for several.
        let counted = counted && r.starts_with("invoice:");
        tx.link_payment(tenant, provider, r, membership_id, event_id, counted)?;
    }
    Ok(())
}

/// Why a purchase or renewal changes nothing because its bill was already counted as a
/// payment of this membership by another event, if it was.
pub(super) fn counted_already(
    tx: &mut dyn Tx,
    tenant: &str,
    provider: &str,
    ev: &CanonicalEvent,
    membership: Option<&MembershipRow>,
) -> store::Result<Option<String>> {
    let (Some(EventKind::Renewed | EventKind::Purchased), Some(ms), Some(invoice)) =
        (ev.kind, membership, &ev.payment.invoice_id)
    else {
        return Ok(None);
    };
    Ok(tx.payment(tenant, provider, &format!("invoice:{invoice}"))?.and_then(|link| match link.counted_by {
        Some(by) if link.membership_id == ms.id && by != ev.event_id => {
            Some(format!("invoice {invoice} was already counted as a payment by event {by}"))
        }
        _ => None,
    }))
}

/// After a timer of `ms` fired and changed nothing: its `renewal_due` timer where the rules
/// want it, when that is later than the timer that fired and none is pending.
pub(super) fn keep_renewal_timer(
    loaded: &super::Loaded,
    tx: &mut dyn Tx,
    ms: &MembershipRow,
    fired: &CanonicalEvent,
) -> store::Result<()> {
    let due = match loaded.rules.renewal_due_at(&view_of(Some(ms)), &loaded.policy(&ms.tenant)) {
        Ok(Some(Some(due))) if due > fired.occurred_at => due,
        Ok(_) => return Ok(()),
        Err(e) => {
            tracing::warn!(membership = %ms.id, error = %e, "renewal_due_at failed; the renewal timer is left as it is.");
            return Ok(());
        }
    };
    if tx.timers_of(&ms.id)?.iter().any(|t| t.name == RENEWAL_TIMER) {
        return Ok(());
    }
    tx.set_timer(&TimerRow {
        tenant: ms.tenant.clone(),
        membership_id: ms.id.clone(),
        name: RENEWAL_TIMER.to_string(),
        due_at: due,
        set_by_event: fired.event_id.clone(),
    })
}

/// The period end a membership shows after `ev`: the event's, else the one it had — unless
/// the event is a renewal that names no new one (Whop's payments): it paid for a period
/// after the known end, early or late, whose end is not known. (Not guessed: the missed-
/// renewal timer then waits for a period end from a later event or reconciliation, and the
/// membership is flagged `PERIOD_UNKNOWN`.)
pub(super) fn period_end_after(ev: &CanonicalEvent, stored: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match ev.period_end {
        Some(t) => Some(t),
        None if ev.kind == Some(EventKind::Renewed) => None,
        None => stored,
    }
}

/// The flag of a membership renewed with no period end named: when the next renewal is due
/// is not known until an event or reconciliation says.
pub const PERIOD_UNKNOWN: &str =
    "period end unknown since a renewal that named none: reconciliation or a later event tells it";

/// The access granted or revoked by a membership's change: granted when it holds access
/// it did not (or other levels), revoked when it held access and holds none.
pub(super) fn access_change(
    had_access: bool,
    old_levels: Vec<String>,
    ms: &MembershipRow,
    now: DateTime<Utc>,
    revoke_reason: impl FnOnce() -> String,
) -> Option<Effect> {
    let has_access = ms.has_access(now);
    if has_access && (!had_access || ms.access_levels != old_levels) {
        Some(Effect::GrantAccess { levels: ms.access_levels.clone(), until: ms.access_until.or(ms.grace_until) })
    } else if had_access && !has_access {
        Some(Effect::RevokeAccess { levels: old_levels, reason: revoke_reason() })
    } else {
        None
    }
}

/// Records that the membership reflects the provider as of this event. A timer is our own
/// clock, not news from the provider, so a late provider event older than a fired timer
/// still counts.
pub(super) fn note_provider_time(ms: &mut MembershipRow, ev: &CanonicalEvent, rank: i64) {
    if ev.event_type.starts_with("timer.") {
        return;
    }
    // A dispute won gives back what the dispute took; it is news of the charge, not of the
    // subscription, so an older end of the subscription arriving after it still applies.
    if ev.kind == Some(EventKind::Disputed) && ms.state.holds_access() {
        return;
    }
    ms.last_event_rank = match ms.last_event_at {
        Some(t) if t > ev.occurred_at => ms.last_event_rank,
        Some(t) if t == ev.occurred_at => ms.last_event_rank.max(rank),
        _ => rank,
    };
    ms.last_event_at = Some(ms.last_event_at.map_or(ev.occurred_at, |t| t.max(ev.occurred_at)));
}

/// The membership as the rules see it.
pub fn view_of(m: Option<&MembershipRow>) -> MembershipView {
    match m {
        None => MembershipView::default(),
        Some(m) => MembershipView {
            exists: true,
            provider: Some(m.provider.clone()),
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
            flags: m.flags.clone(),
            member_email: None,
        },
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn apply_member_effects(
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
