//! What becomes of an event: its status and outcome (what `simulate` prints and the event
//! row stores), the answer to the caller, the writer's input, and the recording of the
//! event row and of flags an operator must see.
//!
//! What this module must never do: decide an outcome (the stages in `pipeline` do); it
//! only records one.

use crate::canonical::Source;
use crate::effects::Effect;
use crate::extract::{Extraction, Failure, Mapping};
use crate::machine::{Input, MState};
use crate::rules::RuleRef;
use crate::store::{self, EventRow, EventStatus, MemberRow, MembershipRow, TimerRow, Tx};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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

    pub(super) fn new(status: Status, source: Source) -> Outcome {
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

/// An event ready for the writer.
#[derive(Clone)]
pub enum Incoming {
    /// A delivery whose fields were extracted.
    Extracted(Box<Extraction>),
    /// A delivery whose fields could not be read: stored as a dead letter.
    Unreadable { provider: String, tenant: String, failure: Box<Failure> },
    /// A timer that fell due.
    Timer(TimerRow),
}

impl Incoming {
    /// A delivery taken in: its event, or a dead letter when its fields could not be read.
    pub fn of(tenant: &str, provider: &str, extracted: Result<Extraction, Box<Failure>>) -> Incoming {
        match extracted {
            Ok(x) => Incoming::Extracted(Box::new(x)),
            Err(failure) => {
                Incoming::Unreadable { provider: provider.to_string(), tenant: tenant.to_string(), failure }
            }
        }
    }
}

/// The raw request kept with the event.
#[derive(Clone)]
pub struct Raw {
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub source: Source,
    /// Whether it is a provider's request (counted in the event's `deliveries`): a
    /// webhook as it came in, not a replay, a timer or one membership's part of it.
    pub delivery: bool,
    /// What the event's enrichment (`enrich:` in the provider file) came to, when it has
    /// one: the items fetched, or why they could not be.
    pub enrichment: Option<Result<crate::enrich::Enriched, String>>,
}

/// Stores the event row with its outcome: the last step of every event, whatever became
/// of it.
pub(super) fn finish(tx: &mut dyn Tx, mut rec: EventRow, outcome: Outcome) -> store::Result<Ack> {
    rec.status = match outcome.status {
        Status::Applied => EventStatus::Applied,
        Status::Ignored => EventStatus::Ignored,
        Status::Stale => EventStatus::Stale,
        Status::Refused => EventStatus::Refused,
        Status::Failed => EventStatus::Failed,
        // A duplicate is answered from the row it repeats and never stored.
        Status::Duplicate => return Err(store::Error::Thread("a duplicate is never stored as an event".into())),
    };
    rec.reason = outcome.reason.clone();
    rec.outcome = store::stored_json(&outcome);
    tx.insert_event(&rec)?;
    Ok(Ack { event_id: rec.event_id, status: outcome.status, outcome })
}

/// Adds a flag (once; the oldest dropped past 20).
pub(super) fn push_flag(flags: &mut Vec<String>, reason: &str) {
    if !flags.iter().any(|f| f == reason) {
        flags.push(reason.to_string());
    }
    if flags.len() > 20 {
        flags.remove(0);
    }
}

/// Flags a membership with the outcome's status and reason, for an operator to see.
pub(super) fn flag_membership(
    tx: &mut dyn Tx,
    m: &mut MembershipRow,
    o: &Outcome,
    now: DateTime<Utc>,
) -> store::Result<()> {
    push_flag(&mut m.flags, &format!("{}: {}", o.status.as_str(), o.reason.clone().unwrap_or_default()));
    m.updated_at = now;
    tx.save_membership(m)
}

/// Flags a member with the outcome's status and reason (no membership to put it on).
pub(super) fn flag_member(tx: &mut dyn Tx, m: &MemberRow, o: &Outcome, now: DateTime<Utc>) -> store::Result<()> {
    let mut m = m.clone();
    push_flag(&mut m.flags, &format!("{}: {}", o.status.as_str(), o.reason.clone().unwrap_or_default()));
    m.updated_at = now;
    tx.save_member(&m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_is_kept_once_and_the_newest_twenty_are_kept() {
        let mut flags = vec![];
        push_flag(&mut flags, "a");
        push_flag(&mut flags, "b");
        push_flag(&mut flags, "a");
        assert_eq!(flags, ["a", "b"], "once each, a new one beside the others");
        for i in 0..25 {
            push_flag(&mut flags, &format!("f{i}"));
        }
        assert_eq!(flags.len(), 20);
        assert_eq!((flags[0].as_str(), flags[19].as_str()), ("f5", "f24"), "the oldest dropped first");
    }
}
