//! Re-derived: a membership set to what its stored deliveries derive under the rules in
//! force (the dry run ran them through rules → machine on a scratch store), recorded as an
//! event with source `rederive` that names the rule-set version and every change, so
//! `explain` tells why access changed.
//!
//! What this module must never do: apply over a membership that changed after the
//! comparison (a webhook that came in meanwhile wins; the operator runs it again), undo what
//! reconciliation learnt from the provider (its view is not among the deliveries), or
//! invent a membership the deliveries do not derive.

use super::commit::access_change;
use super::outcome::{finish, Ack, Outcome, Status};
use crate::canonical::Source;
use crate::effects::Effect;
use crate::extract::Mapping;
use crate::rules::RuleRef;
use crate::store::{self, EventRow, EventStatus, MembershipRow, TimerRow, Tx};
use chrono::{DateTime, Utc};

/// What became of one re-derivation.
pub enum Rederived {
    Applied(Box<Ack>),
    /// Not applied, and why.
    Left(String),
}

/// Sets membership `stored` (as the comparison read it) to `derived` and its timers to
/// `timers`, inside the caller's transaction, recording the change as an event.
pub fn apply_derived(
    tx: &mut dyn Tx,
    stored: &MembershipRow,
    derived: &MembershipRow,
    timers: &[TimerRow],
    changes: &[String],
    version: &str,
    now: DateTime<Utc>,
) -> store::Result<Rederived> {
    let Some(mut ms) = tx.membership(&stored.id)? else {
        return Ok(Rederived::Left("the membership is gone".into()));
    };
    // Anything but the time it was written: a webhook applied in the same second as the
    // comparison leaves that as it was, and must still win.
    if (MembershipRow { updated_at: stored.updated_at, ..ms.clone() }) != *stored {
        return Ok(Rederived::Left("it changed after the comparison; run it again".into()));
    }
    if tx.applied_from(&ms.id, Source::Reconcile)? {
        return Ok(Rederived::Left(
            "reconciliation corrected it from the provider's own view, which its deliveries do not \
             hold: re-deriving from them would undo that (resync it instead)"
                .into(),
        ));
    }
    // Unique per application; what keeps it from applying twice is the comparison above
    // (after it, stored and derived agree).
    let key = format!("rederive:{}:{}", ms.id, uuid::Uuid::now_v7().simple());
    let (from, had_access, old_levels) = (ms.state, ms.has_access(now), ms.access_levels.clone());
    ms.state = derived.state;
    ms.product_id = derived.product_id.clone();
    ms.plan_id = derived.plan_id.clone();
    ms.status = derived.status.clone();
    ms.period_end = derived.period_end;
    ms.grace_until = derived.grace_until;
    ms.access_until = derived.access_until;
    ms.cancel_at_period_end = derived.cancel_at_period_end;
    ms.access_levels = derived.access_levels.clone();
    ms.flags = derived.flags.clone();
    ms.updated_at = now;
    let mut effects: Vec<Effect> =
        access_change(had_access, old_levels, &ms, now, || format!("re-derived under rules {version}"))
            .into_iter()
            .collect();
    tx.save_membership(&ms)?;
    for t in tx.timers_of(&ms.id)? {
        tx.cancel_timer(&ms.id, &t.name)?;
    }
    for t in timers {
        tx.set_timer(&TimerRow {
            membership_id: ms.id.clone(),
            tenant: ms.tenant.clone(),
            set_by_event: key.clone(),
            ..t.clone()
        })?;
        effects.push(Effect::ScheduleTimer { timer: t.name.clone(), at: t.due_at });
    }
    let outcome = Outcome {
        status: Status::Applied,
        from: Some(from),
        to: Some(ms.state),
        effects,
        input: None,
        reason: Some(format!("re-derived under rules {version}: {}", changes.join("; "))),
        mapping: Some(Mapping::new("rederive", None)),
        rule: Some(RuleRef {
            file: "(the stored deliveries, run again through the rules)".into(),
            function: "rederive".into(),
            line: 0,
            version: version.to_string(),
        }),
        source: Source::Rederive,
        member_id: Some(ms.member_id.clone()),
        membership_id: Some(ms.id.clone()),
    };
    let rec = EventRow {
        seq: 0,
        tenant: ms.tenant.clone(),
        provider: ms.provider.clone(),
        event_id: key.clone(),
        idempotency_key: key,
        event_type: "rederive".into(),
        kind: None,
        source: Source::Rederive,
        received_at: now,
        occurred_at: Some(now),
        member_id: Some(ms.member_id.clone()),
        membership_id: Some(ms.id.clone()),
        status: EventStatus::Applied,
        reason: None,
        raw: vec![],
        headers: store::stored_json(&Vec::<(String, String)>::new()),
        canonical: None,
        outcome: store::null_json(),
        park_key: None,
        deliveries: 0,
        enrichment: None,
        body_pruned_at: None,
    };
    Ok(Rederived::Applied(Box::new(finish(tx, rec, outcome)?)))
}
