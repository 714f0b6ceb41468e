//! Canonical model: the one event shape every provider's payload is mapped onto.
//!
//! Nothing here knows about a provider's wire format; `extract` builds these values and
//! `rules` reads them. The JSON shape is part of the public contract (`schemas/canonical-event.schema.json`).
//!
//! What this module must never do: know a provider's wire format or a rule; it is data both
//! sides agree on.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What happened, in provider-neutral terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    LeadCaptured,
    TrialStarted,
    Purchased,
    Renewed,
    PaymentFailed,
    CancelScheduled,
    CancelReverted,
    Canceled,
    Expired,
    Paused,
    Resumed,
    Refunded,
    Disputed,
    PlanChanged,
    StatusSynced,
    MemberUpdated,
    MemberDeleted,
    /// An operator granted access by hand (`POST /members/{id}/grants`).
    AccessGranted,
    /// An operator revoked a grant of theirs (`DELETE /members/{id}/grants/{grant}`).
    AccessRevoked,
}

impl EventKind {
    /// Every kind, in declaration order (for `check` hints and schema docs).
    pub const ALL: [EventKind; 19] = [
        EventKind::LeadCaptured,
        EventKind::TrialStarted,
        EventKind::Purchased,
        EventKind::Renewed,
        EventKind::PaymentFailed,
        EventKind::CancelScheduled,
        EventKind::CancelReverted,
        EventKind::Canceled,
        EventKind::Expired,
        EventKind::Paused,
        EventKind::Resumed,
        EventKind::Refunded,
        EventKind::Disputed,
        EventKind::PlanChanged,
        EventKind::StatusSynced,
        EventKind::MemberUpdated,
        EventKind::MemberDeleted,
        EventKind::AccessGranted,
        EventKind::AccessRevoked,
    ];

    /// The snake_case name used in YAML, Rhai and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::LeadCaptured => "lead_captured",
            EventKind::TrialStarted => "trial_started",
            EventKind::Purchased => "purchased",
            EventKind::Renewed => "renewed",
            EventKind::PaymentFailed => "payment_failed",
            EventKind::CancelScheduled => "cancel_scheduled",
            EventKind::CancelReverted => "cancel_reverted",
            EventKind::Canceled => "canceled",
            EventKind::Expired => "expired",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Refunded => "refunded",
            EventKind::Disputed => "disputed",
            EventKind::PlanChanged => "plan_changed",
            EventKind::StatusSynced => "status_synced",
            EventKind::MemberUpdated => "member_updated",
            EventKind::MemberDeleted => "member_deleted",
            EventKind::AccessGranted => "access_granted",
            EventKind::AccessRevoked => "access_revoked",
        }
    }

    /// Parses a snake_case name.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who the event is about, as the provider names them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MemberRef {
    pub email: Option<String>,
    pub provider_customer_id: Option<String>,
    pub name: Option<String>,
}

/// One provider event mapped onto the canonical model.
///
/// `kind` is `None` when no mapping in the provider's YAML covers the event type (or no
/// case of it matched): such an event is stored as `ignored`, never guessed at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CanonicalEvent {
    pub kind: Option<EventKind>,
    pub provider: String,
    pub tenant: String,
    pub event_id: String,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub member: MemberRef,
    pub subscription_id: Option<String>,
    pub product_id: Option<String>,
    pub plan_id: Option<String>,
    pub status: Option<String>,
    pub period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    /// The payment the event is about, where it names one: how a refund or a dispute that
    /// names no subscription finds its membership, and how one payment announced twice
    /// counts once.
    #[serde(default)]
    pub payment: PaymentRef,
    /// What the source said about the event in words: the operator and their reason for a
    /// manual grant or revocation. Shown as the event's reason when the rules give none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A payment as the provider names it. Any may be absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PaymentRef {
    /// The bill: a Stripe invoice (`in_…`), a ThriveCart invoice, a Memberful order.
    pub invoice_id: Option<String>,
    /// The payment: a Stripe payment intent (`pi_…`), a Whop payment (`pay_…`).
    pub payment_id: Option<String>,
    /// The card charge: a Stripe charge (`ch_…`).
    pub charge_id: Option<String>,
    /// What was paid, in cents (a refund's `amount_cents` is compared with it).
    pub amount_paid_cents: Option<i64>,
}

impl PaymentRef {
    /// The references it holds, as stored: `invoice:…`, `payment:…`, `charge:…`.
    pub fn refs(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, id) in [("invoice", &self.invoice_id), ("payment", &self.payment_id), ("charge", &self.charge_id)] {
            if let Some(id) = id {
                out.push(format!("{kind}:{id}"));
            }
        }
        out
    }
}

/// Where an event entered the pipeline; recorded in the activity log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Webhook,
    Timer,
    Reconcile,
    Replay,
    Admin,
    Simulate,
    /// A membership re-derived from its stored deliveries under rules that changed.
    Rederive,
    /// An operator's grant or revocation of access by hand.
    Manual,
}

impl Source {
    pub const ALL: [Source; 8] = [
        Source::Webhook,
        Source::Timer,
        Source::Reconcile,
        Source::Replay,
        Source::Admin,
        Source::Simulate,
        Source::Rederive,
        Source::Manual,
    ];

    /// The source named `s` (as `as_str` writes it).
    pub fn parse(s: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Timer => "timer",
            Source::Reconcile => "reconcile",
            Source::Replay => "replay",
            Source::Admin => "admin",
            Source::Simulate => "simulate",
            Source::Rederive => "rederive",
            Source::Manual => "manual",
        }
    }
}
