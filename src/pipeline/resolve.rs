//! Resolution: which member and which membership an event is about, as stored — by the
//! membership key the event names, else by the payment it names (a charge, payment or
//! invoice an earlier event tied to its membership), else by the member it names (provider
//! customer id, then email) and that member's one membership at the provider — for a
//! refund or a dispute, their one membership there that holds access; a member deleted at
//! the provider stands for one event per membership of theirs there; a due timer stands
//! for an `expired` event of its membership.
//!
//! What this module must never do: change anything stored, or guess: a member with
//! several memberships at the provider and an event that names none of them is reported
//! as ambiguous, never matched to one.

use crate::canonical::{CanonicalEvent, EventKind, MemberRef};
use crate::extract::{Extraction, Mapping};
use crate::store::{self, MemberRow, MembershipRow, TimerRow, Tx};

/// Who and which membership an event is about.
pub(super) struct Resolved {
    /// The membership key the event names (`sub:…`, `product:…`), if any.
    pub mkey: Option<String>,
    pub membership: Option<MembershipRow>,
    pub member: Option<MemberRow>,
    /// The invoice the event names and no stored event ties to a membership, when the event
    /// names no membership: it is waited for, not guessed from the member's memberships.
    pub unknown_invoice: Option<String>,
}

/// The member an event names and how many memberships they hold at its provider, when the
/// event names no membership and acts on one: not guessing which.
pub(super) struct Ambiguous {
    pub member: MemberRow,
    pub count: usize,
}

/// The stored member and membership `ev` is about.
pub(super) fn resolve(
    tx: &mut dyn Tx,
    tenant: &str,
    provider: &str,
    ev: &CanonicalEvent,
) -> store::Result<Result<Resolved, Ambiguous>> {
    let mkey = membership_key(ev);
    let mut membership = match &mkey {
        Some(k) => match tx.membership_by_key(tenant, provider, k)? {
            Some(m) => Some(m),
            // Stored before product keys named their buyer: `product:<id>`, if it is this
            // buyer's.
            None => legacy_product_membership(tx, tenant, provider, k, &ev.member)?,
        },
        None => by_payment(tx, tenant, provider, ev)?,
    };
    let member = match &membership {
        Some(m) => tx.member(&m.member_id)?,
        None => find_member(tx, tenant, provider, &ev.member)?,
    };
    // An event that names its bill is about the membership the bill paid for: while no
    // stored event ties the bill to one, it waits for it (never matched by the member's
    // memberships, which may not include the right one yet).
    let unknown_invoice = match (&membership, &mkey, &ev.payment.invoice_id) {
        (None, None, Some(invoice)) if needs_membership(ev.kind) => Some(invoice.clone()),
        _ => None,
    };
    if membership.is_none() && mkey.is_none() && unknown_invoice.is_none() {
        if let Some(mem) = &member {
            let mut mine = memberships_at(tx, mem, provider)?;
            if mine.len() > 1 && matches!(ev.kind, Some(EventKind::Refunded | EventKind::Disputed)) {
                // Money going back is for something the member holds: their one membership
                // there that holds access, if exactly one does.
                let holding: Vec<_> = mine.iter().filter(|m| m.state.holds_access()).cloned().collect();
                if holding.len() == 1 {
                    mine = holding;
                }
            }
            match mine.len() {
                0 => {}
                1 => membership = mine.pop(),
                count if needs_membership(ev.kind) => {
                    return Ok(Err(Ambiguous { member: mem.clone(), count }));
                }
                _ => {}
            }
        }
    }
    Ok(Ok(Resolved { mkey, membership, member, unknown_invoice }))
}

/// A member deleted at the provider: the event once per membership of theirs there (its
/// key, and the event aimed at it under an idempotency key of its own).
pub(super) fn member_deleted_parts(
    tx: &mut dyn Tx,
    x: &Extraction,
    member: &MemberRow,
    provider: &str,
) -> store::Result<Vec<(String, Extraction)>> {
    Ok(memberships_at(tx, member, provider)?
        .into_iter()
        .map(|ms| {
            let mut sub = x.clone();
            sub.idempotency_key = format!("{}#{}", x.idempotency_key, ms.key);
            sub.event.subscription_id = ms.key.strip_prefix("sub:").map(str::to_string);
            match product_key_parts(&ms.key) {
                Some((product, who)) => {
                    sub.event.product_id = Some(product);
                    sub.event.member = who; // the key names its buyer: the part finds this membership
                }
                None => sub.event.product_id = sub.event.product_id.take().or(ms.product_id.clone()),
            }
            (ms.key, sub)
        })
        .collect())
}

/// A `product:<id>` membership (the key before it named its buyer) that belongs to the
/// member `who` names, for a key `product:<id>@…`.
fn legacy_product_membership(
    tx: &mut dyn Tx,
    tenant: &str,
    provider: &str,
    key: &str,
    who: &MemberRef,
) -> store::Result<Option<MembershipRow>> {
    let Some((product, _)) = product_key_parts(key).filter(|_| key.contains('@')) else { return Ok(None) };
    let Some(m) = tx.membership_by_key(tenant, provider, &format!("product:{product}"))? else { return Ok(None) };
    let buyer = find_member(tx, tenant, provider, who)?;
    Ok(buyer.filter(|b| b.id == m.member_id).map(|_| m))
}

/// The membership an earlier event tied the event's payment to: the charge first, then the
/// payment, then the invoice (the most specific first).
fn by_payment(
    tx: &mut dyn Tx,
    tenant: &str,
    provider: &str,
    ev: &CanonicalEvent,
) -> store::Result<Option<MembershipRow>> {
    let mut refs = ev.payment.refs();
    refs.reverse();
    for r in refs {
        if let Some(link) = tx.payment(tenant, provider, &r)? {
            if let Some(m) = tx.membership(&link.membership_id)? {
                return Ok(Some(m));
            }
        }
    }
    Ok(None)
}

fn memberships_at(tx: &mut dyn Tx, member: &MemberRow, provider: &str) -> store::Result<Vec<MembershipRow>> {
    Ok(tx.memberships_of(&member.id)?.into_iter().filter(|m| m.provider == provider).collect())
}

/// Kinds that act on one membership (a lead or a member update does not).
pub(super) fn needs_membership(kind: Option<EventKind>) -> bool {
    !matches!(kind, None | Some(EventKind::LeadCaptured | EventKind::MemberUpdated | EventKind::MemberDeleted))
}

/// `sub:<id>` for subscriptions; for one-time products, one membership per buyer:
/// `product:<id>@cid:<provider customer id>` or `product:<id>@email:<email>` (as the event
/// names the buyer), `product:<id>` when it names none (and for memberships stored before
/// keys named their buyer).
pub fn membership_key(ev: &CanonicalEvent) -> Option<String> {
    if let Some(s) = &ev.subscription_id {
        return Some(format!("sub:{s}"));
    }
    let p = ev.product_id.as_ref()?;
    Some(match (&ev.member.provider_customer_id, &ev.member.email) {
        (Some(cid), _) => format!("product:{p}@cid:{cid}"),
        (None, Some(email)) => format!("product:{p}@email:{}", email.to_lowercase()),
        (None, None) => format!("product:{p}"),
    })
}

/// The product a `product:` key names, and its buyer as a member reference.
pub(super) fn product_key_parts(key: &str) -> Option<(String, MemberRef)> {
    let rest = key.strip_prefix("product:")?;
    let mut who = MemberRef::default();
    let product = if let Some(i) = rest.find("@cid:") {
        who.provider_customer_id = Some(rest[i + 5..].to_string());
        &rest[..i]
    } else if let Some(i) = rest.find("@email:") {
        who.email = Some(rest[i + 7..].to_string());
        &rest[..i]
    } else {
        rest
    };
    Some((product.to_string(), who))
}

fn find_member(tx: &mut dyn Tx, tenant: &str, provider: &str, who: &MemberRef) -> store::Result<Option<MemberRow>> {
    if provider == crate::manual::PROVIDER {
        // A manual event names its member by id, in its tenant; never by email.
        let Some(id) = &who.provider_customer_id else { return Ok(None) };
        return Ok(tx.member(id)?.filter(|m| m.tenant == tenant));
    }
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

/// The canonical event a due timer stands for (`None` if its membership is gone).
pub(super) fn timer_event(tx: &mut dyn Tx, t: &TimerRow) -> store::Result<Option<Extraction>> {
    let Some(m) = tx.membership(&t.membership_id)? else {
        return Ok(None);
    };
    // The event that set it is part of its identity: the same timer set again at the same
    // due time by a later event (a resume putting a missed renewal's timer back) fires
    // again, while one row fired twice (two writers racing) is still one event.
    let event_id = format!("timer:{}:{}:{}:{}", t.membership_id, t.name, t.due_at.timestamp(), t.set_by_event);
    Ok(Some(Extraction {
        event: CanonicalEvent {
            kind: Some(EventKind::Expired),
            provider: m.provider.clone(),
            tenant: m.tenant.clone(),
            event_id: event_id.clone(),
            event_type: format!("timer.{}", t.name),
            occurred_at: t.due_at,
            // A product membership's key names its buyer: the timer's event finds it by that.
            member: product_key_parts(&m.key).map(|(_, who)| who).unwrap_or_default(),
            subscription_id: m.subscription_id.clone(),
            product_id: if m.subscription_id.is_some() {
                m.product_id.clone()
            } else {
                product_key_parts(&m.key).map(|(p, _)| p)
            },
            plan_id: m.plan_id.clone(),
            status: None,
            period_end: None,
            cancel_at_period_end: m.cancel_at_period_end,
            amount_cents: None,
            currency: None,
            payment: Default::default(),
            note: None,
        },
        idempotency_key: event_id,
        mapping: Mapping::new("timers", Some(format!("timer.{}", t.name))),
        enrich: None,
    }))
}
