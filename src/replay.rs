//! Replay: stored raw events run again through the rules in force. For dead letters
//! (`failed`) once a rule or mapping is fixed — the new outcome is a new row with source
//! `replay`, the old row stays as history, taken out of dedupe. And `dry_run`: re-derive
//! every membership from the stored deliveries under the current rules, on a scratch
//! store, and report what would differ — writing nothing.
//!
//! What this module must never do: apply an event twice: only failed, refused or ignored
//! events run again, each once; the dry run writes nothing.

use crate::canonical::Source;
use crate::config::Config;
use crate::pipeline::{self, Ack, Ctx, Incoming, Raw, Status};
use crate::store::{self, EventFilter, EventRow, MemberRow, MembershipRow};
use crate::timers::{self, FireAt};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Why an event cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Only events that changed nothing may run again (applied ones would apply twice).
    #[error("event #{0} is {1}: only failed, refused or ignored deliveries are replayed, each once")]
    NotReplayable(i64, String),
    /// The provider has no YAML any more.
    #[error("no provider `{0}` in the rules")]
    NoProvider(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Statuses that changed nothing, so running them again cannot apply anything twice.
pub const REPLAYABLE: [&str; 3] = ["failed", "refused", "ignored"];

fn incoming(config: &Config, e: &EventRow) -> Result<(Incoming, Raw), Error> {
    pipeline::incoming_from_row(config, e).ok_or_else(|| Error::NoProvider(e.provider.clone()))
}

/// Replays one stored event (failed, refused or ignored) through the current rules.
pub async fn replay_one(ctx: &Arc<Ctx>, e: &EventRow) -> Result<Ack, Error> {
    if !REPLAYABLE.contains(&e.status.as_str()) {
        return Err(Error::NotReplayable(e.seq, e.status.clone()));
    }
    if e.source == Source::Timer {
        // Its stored body is the timer, not a provider's payload: run again as a delivery
        // it could only fail, and the timer itself is gone once it fired.
        return Err(Error::NotReplayable(e.seq, format!("{} (a timer's event)", e.status)));
    }
    let (incoming, raw) = incoming(&ctx.config(), e)?;
    let seq = e.seq;
    let note = format!("replayed under rules {}", ctx.rules().version);
    let now = ctx.clock.now();
    let loaded = ctx.loaded();
    // The original is marked `replayed` in the same transaction as the new outcome, and
    // only if it still was replayable: two replays of one dead letter apply it once.
    let ack = ctx
        .store
        .write(move |tx| match tx.mark_replayed(seq, &note)? {
            true => pipeline::apply(&loaded, tx, incoming, raw, now).map(Some),
            false => Ok(None),
        })
        .await?
        .ok_or_else(|| Error::NotReplayable(e.seq, "replayed".into()))?;
    ctx.timers_changed.notify_one();
    Ok(ack)
}

/// One line of a replay report.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub seq: i64,
    pub event_id: String,
    pub was: String,
    pub now: Status,
    pub reason: Option<String>,
}

/// Replays every stored event matching `filter` whose status allows it.
pub async fn replay(ctx: &Arc<Ctx>, filter: &EventFilter) -> Result<Vec<Replayed>, Error> {
    let f = filter.clone();
    let rows = store::read(&ctx.store, move |s| s.events_where(&f)).await?;
    let mut out = Vec::new();
    for e in rows.iter().filter(|e| REPLAYABLE.contains(&e.status.as_str()) && e.source != Source::Timer) {
        let ack = replay_one(ctx, e).await?;
        out.push(Replayed {
            seq: e.seq,
            event_id: e.event_id.clone(),
            was: e.status.clone(),
            now: ack.status,
            reason: ack.outcome.reason.clone(),
        });
    }
    Ok(out)
}

/// One membership's state and access, stored vs re-derived.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Difference {
    pub member: String,
    pub provider: String,
    pub membership: String,
    pub stored: Option<(String, bool)>,
    pub derived: Option<(String, bool)>,
}

/// Re-derives memberships from the stored deliveries (all, or one member's, or since a
/// time) under the rules in force, on a scratch store; returns what differs from the
/// stored state at `now`. Writes nothing.
pub async fn dry_run(ctx: &Arc<Ctx>, filter: &EventFilter, now: DateTime<Utc>) -> Result<Vec<Difference>, Error> {
    let (ctx, filter) = (ctx.clone(), filter.clone());
    tokio::task::spawn_blocking(move || dry_run_blocking(&ctx, &filter, now))
        .await
        .map_err(|e| store::Error::Thread(format!("the dry run failed: {e}")))?
}

/// The dry run on two threads: one reads the stored deliveries a page at a time in
/// arrival order, decodes and extracts each again and works out what needs no stored
/// state (`Precomputed`); the other runs them, in that order,
/// through the pipeline into a scratch database in one transaction, firing the timers due
/// by a delivery's arrival just before it, so timers interleave with deliveries exactly as
/// they did in life. Then the timers due by `now`, and the comparison.
fn dry_run_blocking(ctx: &Ctx, filter: &EventFilter, now: DateTime<Utc>) -> Result<Vec<Difference>, Error> {
    let loaded = ctx.loaded();
    let mut page = filter.clone();
    page.deliveries_only = true;
    page.status = None;
    page.limit = Some(2000);
    // A page of deliveries at a time crosses between the threads (one wake-up per page).
    type Delivery = (DateTime<Utc>, Incoming, Raw, pipeline::Precomputed);
    let (to_apply, deliveries) = std::sync::mpsc::sync_channel::<Result<Vec<Delivery>, Error>>(2);
    let (stored, derived) = std::thread::scope(|scope| {
        let reader_loaded = loaded.clone();
        let reader = scope.spawn(move || -> Result<View, Error> {
            let mut touched = Vec::new();
            let mut at: Option<DateTime<Utc>> = None;
            loop {
                let next = (|| -> Result<Option<Vec<Delivery>>, Error> {
                    let rows = ctx.store.events_where(&page)?;
                    let Some(last) = rows.last() else { return Ok(None) };
                    page.after_seq = Some(last.seq);
                    let batch = rows.iter().map(|e| {
                        touched.extend(e.member_id.clone());
                        let when = at.map_or(e.received_at, |t| t.max(e.received_at));
                        at = Some(when);
                        let (incoming, mut raw) = incoming(&reader_loaded.config, e)?;
                        raw.source = Source::Webhook;
                        let pre = pipeline::Precomputed::of(&reader_loaded, &incoming, &raw);
                        Ok((when, incoming, raw, pre))
                    });
                    batch.collect::<Result<Vec<_>, Error>>().map(Some)
                })();
                // The applying thread stops early only on an error, which it reports.
                match next {
                    Ok(Some(batch)) => {
                        if to_apply.send(Ok(batch)).is_err() {
                            return Ok(View::new());
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = to_apply.send(Err(e));
                        return Ok(View::new());
                    }
                }
            }
            drop(to_apply);
            // The stored side of the comparison, read while the other thread still works.
            touched.sort();
            touched.dedup();
            let mut stored = View::new();
            for (member, memberships) in ctx.store.members_with_memberships(&touched)? {
                add_to_view(&mut stored, &member, memberships, now);
            }
            Ok(stored)
        });
        let mut result = None;
        let derive = |tx: &mut dyn store::Tx| -> Result<(View, View), Error> {
            for batch in deliveries {
                for (when, incoming, raw, pre) in batch? {
                    timers::fire_due_in_tx(&loaded, tx, when, FireAt::DueTime, usize::MAX)?;
                    pipeline::apply_with(&loaded, tx, incoming, raw, when, pre)?;
                }
            }
            timers::fire_due_in_tx(&loaded, tx, now, FireAt::DueTime, usize::MAX)?;
            let stored = reader.join().map_err(|_| store::Error::Thread("the dry run's reader panicked".into()))??;
            // The scratch store has its own member ids: find them by tenant and email.
            let mut derived = View::new();
            let people: BTreeSet<(String, String)> =
                stored.keys().map(|(t, who, _, _)| (t.clone(), who.clone())).collect();
            for (tenant, who) in people {
                if let Some(member) = tx.member_by_email(&tenant, &who)? {
                    let memberships = tx.memberships_of(&member.id)?;
                    add_to_view(&mut derived, &member, memberships, now);
                }
            }
            Ok((stored, derived))
        };
        ctx.store.scratch(Box::new(|tx| {
            result = Some(derive(tx));
            Ok(())
        }))?;
        result.unwrap_or_else(|| Err(store::Error::Thread("the dry run did not run".into()).into()))
    })?;
    let mut keys: Vec<_> = stored.keys().chain(derived.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (stored.get(&k).cloned(), derived.get(&k).cloned());
            (a != b).then_some(Difference { member: k.1, provider: k.2, membership: k.3, stored: a, derived: b })
        })
        .collect())
}

/// (tenant, member email or id, provider, membership key) → (state, has access).
type View = BTreeMap<(String, String, String, String), (String, bool)>;

fn add_to_view(view: &mut View, member: &MemberRow, memberships: Vec<MembershipRow>, now: DateTime<Utc>) {
    let who = member.email.clone().unwrap_or_else(|| member.id.clone());
    for m in memberships {
        view.insert(
            (member.tenant.clone(), who.clone(), m.provider.clone(), m.key.clone()),
            (m.state.to_string(), m.has_access(now)),
        );
    }
}
