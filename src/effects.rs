//! Effects: what a decision does besides moving the machine, as values. They are
//! recorded (and applied to the store) in the same transaction as the event; nothing is
//! performed in a state's entry action.
//!
//! What this module must never do: perform an effect; the pipeline's commit applies them in
//! the event's transaction.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One side effect of a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Effect {
    /// The membership now holds these access levels (until `until`, when the rules set one).
    GrantAccess { levels: Vec<String>, until: Option<DateTime<Utc>> },
    /// The membership no longer holds these access levels.
    RevokeAccess { levels: Vec<String>, reason: String },
    /// Start (or clear, with `until: null`) the grace period.
    SetGrace { until: Option<DateTime<Utc>> },
    /// Access holds until this time (period end of a scheduled cancel), or clear it.
    SetAccessUntil { until: Option<DateTime<Utc>> },
    /// Fire timer `timer` for this membership at `at` (replaces one of the same name).
    ScheduleTimer { timer: String, at: DateTime<Utc> },
    /// Drop timer `timer` for this membership.
    CancelTimer { timer: String },
    /// Record a lead (abandoned checkout).
    CaptureLead { email: String, name: Option<String> },
    /// Mark the lead with this email converted.
    ConvertLead { email: String },
    /// Something an operator must look at (unmapped product, unknown status …).
    Flag { reason: String },
    /// The flags starting with `prefix` no longer hold (e.g. a renewal arrived after
    /// `no renewal seen`).
    ClearFlag { prefix: String },
}
