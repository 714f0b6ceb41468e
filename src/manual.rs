//! Manual access: an operator's grant (`POST /members/{id}/grants`) or revocation
//! (`DELETE /members/{id}/grants/{grant}`), taken in as an event like any delivery — the
//! request is its raw body, `rules/manual.rhai` decides, the machine moves, the store keeps
//! it with source `manual` — so `explain` tells who granted what, why and until when.
//!
//! A grant is a membership of its own at the provider `manual` (its key the grant id, its
//! product the levels it grants joined by `+`), beside the member's provider memberships:
//! it adds access and never hides or changes what a provider says.
//!
//! What this module must never do: change a provider's membership, or take an event from
//! anywhere but the admin API (no webhook reaches the provider `manual`).

use crate::canonical::{CanonicalEvent, EventKind, MemberRef, Source};
use crate::extract::{Extraction, Mapping};
use crate::pipeline::{self, Ack, Ctx, Incoming, Raw};
use crate::store::{self, EventRow};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The provider name manual grants are memberships of.
pub const PROVIDER: &str = "manual";

/// Joins a grant's levels into its product id (and splits them back): a level whose name
/// holds it cannot be granted by hand.
pub const LEVEL_SEPARATOR: char = '+';

/// The longest reason taken, in characters: it is shown in every list of events.
pub const MAX_REASON_CHARS: usize = 500;

/// What an operator asks for: levels, until when (none: until revoked), and why.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// Access levels the tenant's products map to.
    #[schema(min_items = 1)]
    pub levels: Vec<String>,
    /// When the grant ends (RFC 3339); without it, when it is revoked.
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// Why (required, at most 500 characters): the activity log and `explain` show it.
    #[schema(min_length = 1, max_length = 500)]
    pub reason: String,
}

/// A grant's or revocation's stored body: the request, who made it and when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManualBody {
    /// `grant` or `revoke`.
    pub action: String,
    pub grant_id: String,
    pub member_id: String,
    pub levels: Vec<String>,
    pub until: Option<DateTime<Utc>>,
    pub reason: String,
    /// Which token asked (never the token itself).
    pub by: String,
    pub at: DateTime<Utc>,
}

/// Why a grant or revocation was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong; the message says how (400).
    #[error("{0}")]
    Invalid(String),
    /// No such member, or no such grant of theirs (404).
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl ManualBody {
    /// The event this body stands for.
    pub fn extraction(&self, tenant: &str) -> Extraction {
        let (kind, event_type) = match self.action.as_str() {
            "grant" => (EventKind::AccessGranted, "manual.grant"),
            _ => (EventKind::AccessRevoked, "manual.revoke"),
        };
        let idempotency_key = format!("{}:{}", self.action, self.grant_id);
        let levels = self.levels.join(&LEVEL_SEPARATOR.to_string());
        let until = self.until.map(|t| format!(" until {}", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
        let note = format!(
            "{} {}{} by {}: {}",
            if kind == EventKind::AccessGranted { "granted" } else { "revoked" },
            if levels.is_empty() { "the grant".to_string() } else { levels.clone() },
            until.unwrap_or_default(),
            self.by,
            self.reason
        );
        Extraction {
            event: CanonicalEvent {
                kind: Some(kind),
                provider: PROVIDER.to_string(),
                tenant: tenant.to_string(),
                event_id: idempotency_key.clone(),
                event_type: event_type.to_string(),
                occurred_at: self.at,
                // A manual event names its member by id (resolve finds them by it).
                member: MemberRef { email: None, provider_customer_id: Some(self.member_id.clone()), name: None },
                subscription_id: Some(self.grant_id.clone()),
                product_id: (!levels.is_empty()).then_some(levels),
                plan_id: None,
                status: None,
                period_end: self.until,
                cancel_at_period_end: false,
                amount_cents: None,
                currency: None,
                payment: Default::default(),
                note: Some(note),
            },
            idempotency_key,
            mapping: Mapping::new("manual", Some(event_type.to_string())),
            enrich: None,
        }
    }

    fn raw(&self, source: Source) -> Raw {
        Raw {
            body: serde_json::to_vec(self).expect("a manual body serializes"),
            headers: vec![],
            source,
            delivery: false,
            enrichment: None,
        }
    }
}

/// A stored manual event, to run again (replay, the dry run): `None` if its body is not one.
pub fn incoming_from_row(e: &EventRow) -> Option<(Incoming, Raw)> {
    let body: ManualBody = serde_json::from_slice(&e.raw).ok()?;
    let mut x = body.extraction(&e.tenant);
    x.idempotency_key = e.idempotency_key.clone();
    Some((Incoming::Extracted(Box::new(x)), body.raw(Source::Replay)))
}

/// The access levels a tenant's products grant: what a manual grant may name (those whose
/// name holds the separator excepted).
pub fn known_levels(tenant: &crate::config::Tenant) -> Vec<String> {
    let mut levels: Vec<String> = tenant
        .providers
        .values()
        .flat_map(|p| p.products.values().flatten().cloned())
        .filter(|l| !l.contains(LEVEL_SEPARATOR))
        .collect();
    levels.sort();
    levels.dedup();
    levels
}

/// Grants `req` to the member `member_id` of `tenant`, as `by`: the stored event's ack and
/// the grant id.
pub async fn grant(
    ctx: &Arc<Ctx>,
    tenant: &str,
    member_id: &str,
    req: GrantRequest,
    by: &str,
) -> Result<(String, Ack), Error> {
    let config = ctx.config();
    let t = config.tenants.get(tenant).ok_or(Error::NotFound)?;
    let known = known_levels(t);
    let mut levels = req.levels.iter().map(|l| l.trim().to_string()).collect::<Vec<_>>();
    levels.sort();
    levels.dedup();
    if levels.is_empty() {
        return Err(Error::Invalid(format!("`levels` names no access level; known: {}", known.join(", "))));
    }
    if let Some(bad) = levels.iter().find(|l| l.contains(LEVEL_SEPARATOR)) {
        return Err(Error::Invalid(format!(
            "access level `{bad}` cannot be granted by hand: its name holds `{LEVEL_SEPARATOR}`"
        )));
    }
    if let Some(bad) = levels.iter().find(|l| !known.contains(l)) {
        let names: Vec<&str> = known.iter().map(String::as_str).collect();
        return Err(Error::Invalid(crate::diagnostic::unknown("access level", bad, &names)));
    }
    let reason = checked_reason(&req.reason)?;
    if reason.is_empty() {
        return Err(Error::Invalid("`reason` is required: say why this access is granted".into()));
    }
    let now = ctx.clock.now();
    if req.until.is_some_and(|u| u <= now) {
        return Err(Error::Invalid("`until` is not in the future".into()));
    }
    member_of(ctx, tenant, member_id).await?;
    let body = ManualBody {
        action: "grant".into(),
        grant_id: format!("grant_{}", uuid::Uuid::now_v7().simple()),
        member_id: member_id.to_string(),
        levels,
        until: req.until,
        reason: reason.to_string(),
        by: by.to_string(),
        at: now,
    };
    let ack = run(ctx, tenant, &body).await?;
    Ok((body.grant_id, ack))
}

/// Revokes the member's grant `grant_id`, as `by`, for `reason`. Revoking one already
/// revoked answers that first revocation again.
pub async fn revoke(
    ctx: &Arc<Ctx>,
    tenant: &str,
    member_id: &str,
    grant_id: &str,
    reason: &str,
    by: &str,
) -> Result<Ack, Error> {
    member_of(ctx, tenant, member_id).await?;
    let (t, key, who) = (tenant.to_string(), format!("sub:{grant_id}"), member_id.to_string());
    let ms = store::read(&ctx.store, move |s| {
        Ok(s.member_detail(&who, 0)?.and_then(|d| d.memberships.into_iter().find(|m| m.key == key && m.tenant == t)))
    })
    .await?;
    let ms = ms.filter(|m| m.provider == PROVIDER).ok_or(Error::NotFound)?;
    let reason = checked_reason(reason)?;
    let body = ManualBody {
        action: "revoke".into(),
        grant_id: grant_id.to_string(),
        member_id: member_id.to_string(),
        levels: ms.access_levels.clone(),
        until: None,
        reason: if reason.is_empty() { "no reason given".into() } else { reason.to_string() },
        by: by.to_string(),
        at: ctx.clock.now(),
    };
    run(ctx, tenant, &body).await
}

/// A reason trimmed, or why it cannot be taken (too long).
fn checked_reason(reason: &str) -> Result<&str, Error> {
    let reason = reason.trim();
    let n = reason.chars().count();
    if n > MAX_REASON_CHARS {
        return Err(Error::Invalid(format!("`reason` is {n} characters long; at most {MAX_REASON_CHARS} are taken")));
    }
    Ok(reason)
}

async fn member_of(ctx: &Arc<Ctx>, tenant: &str, member_id: &str) -> Result<(), Error> {
    let id = member_id.to_string();
    let m = store::read(&ctx.store, move |s| s.member_detail(&id, 0)).await?;
    match m {
        Some(d) if d.member.tenant == tenant => Ok(()),
        _ => Err(Error::NotFound),
    }
}

async fn run(ctx: &Arc<Ctx>, tenant: &str, body: &ManualBody) -> Result<Ack, Error> {
    let x = body.extraction(tenant);
    Ok(pipeline::process(ctx, Incoming::Extracted(Box::new(x)), body.raw(Source::Manual)).await?)
}
