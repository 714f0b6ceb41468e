//! A member and membership seeded in a given state for a dry run (`simulate --state`).
//!
//! What this module must never do: run against a real store; it is for scratch stores.

use super::resolve::membership_key;
use crate::canonical::CanonicalEvent;
use crate::config::Config;
use crate::machine::MState;
use crate::store::{self, MemberRow, MembershipRow, Tx};

/// Puts a member and membership in `state` for the event's membership, as if earlier
/// events had led there (`simulate --state`): lets a dry run show what one event does to
/// a membership that is, say, active or past_due. The payments the event names are tied to
/// it.
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
        erased_at: None,
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
        sync_status: crate::store::SyncState::NeverReconciled,
        created_at: at,
        updated_at: at,
        last_event_rank: 0,
    })?;
    // The payments the event names are this membership's (as if the events that led here
    // named them).
    for r in ev.payment.refs() {
        tx.link_payment(&ev.tenant, &ev.provider, &r, "msp_seeded", "seeded", false)?;
    }
    Ok(())
}
