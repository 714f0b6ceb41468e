//! Replay: stored raw events run again through the rules in force. For dead letters
//! (`failed`) once a rule or mapping is fixed — the new outcome is a new row with source
//! `replay`, the old row stays as history, taken out of dedupe. And `dry_run`: re-derive
//! every membership from the stored deliveries under the current rules, on a scratch
//! in-memory store, and report what would differ — writing nothing.

use crate::canonical::{EventKind, Source};
use crate::clock::{Clock, FixedClock};
use crate::effects::Effect;
use crate::pipeline::{self, Ack, Ctx, Incoming, Raw, Status};
use crate::store::sqlite::{Options, SqliteStore};
use crate::store::{self, EventFilter, EventRow, Store};
use crate::timers;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why an event cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Only events that changed nothing may run again (applied ones would apply twice).
    #[error("event #{0} is {1}: only failed, refused or ignored events are replayed")]
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

fn incoming(ctx: &Ctx, e: &EventRow) -> Result<(Incoming, Raw), Error> {
    pipeline::incoming_from_row(&ctx.config(), e).ok_or_else(|| Error::NoProvider(e.provider.clone()))
}

/// Replays one stored event (failed, refused or ignored) through the current rules.
pub async fn replay_one(ctx: &Arc<Ctx>, e: &EventRow) -> Result<Ack, Error> {
    if !REPLAYABLE.contains(&e.status.as_str()) {
        return Err(Error::NotReplayable(e.seq, e.status.clone()));
    }
    let (incoming, raw) = incoming(ctx, e)?;
    let seq = e.seq;
    let note = format!("replayed under rules {}", ctx.rules().version);
    let now = ctx.clock.now();
    let loaded = ctx.loaded();
    let ack = ctx
        .store
        .write(move |tx| {
            tx.retire_event(seq, &note)?;
            pipeline::apply(&loaded, tx, incoming, raw, now)
        })
        .await?;
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
    let store = ctx.store.clone();
    let f = filter.clone();
    let rows = tokio::task::spawn_blocking(move || store.events_where(&f))
        .await
        .map_err(|e| store::Error::Db(e.to_string()))??;
    let mut out = Vec::new();
    for e in rows.iter().filter(|e| REPLAYABLE.contains(&e.status.as_str()) && e.source != "timer") {
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
    let store = ctx.store.clone();
    let mut f = filter.clone();
    f.deliveries_only = true;
    f.status = None;
    let rows = tokio::task::spawn_blocking(move || store.events_where(&f))
        .await
        .map_err(|e| store::Error::Db(e.to_string()))??;
    let scratch: Arc<dyn Store> = Arc::new(SqliteStore::open(":memory:", Options::default())?);
    let first = rows.first().map(|e| e.received_at).unwrap_or(now);
    let clock = Arc::new(FixedClock::new(first));
    let sim = Arc::new(Ctx::with_loaded(ctx.loaded(), scratch.clone(), clock.clone()));
    // Timers fire between events exactly when one is due: the earliest due time is kept
    // from the timers each event schedules (a cancelled one only causes a needless check),
    // and re-read from the scratch store after firing, after a member deletion or a new
    // membership (whose sub-events' and released events' effects are not in its outcome).
    let mut next_due = scratch.next_timer()?;
    for e in &rows {
        if e.received_at > clock.now() {
            clock.set(e.received_at);
        }
        if next_due.is_some_and(|t| t <= clock.now()) {
            timers::fire_due(&sim, clock.now()).await;
            next_due = scratch.next_timer()?;
        }
        let (incoming, mut raw) = incoming(&sim, e)?;
        let deletes = matches!(&incoming, Incoming::Extracted(x) if x.event.kind == Some(EventKind::MemberDeleted));
        raw.source = Source::Webhook;
        let ack = pipeline::process(&sim, incoming, raw).await?;
        // A membership just created may have released parked events, whose timers are
        // not in this outcome either.
        if deletes || ack.outcome.from == Some(crate::machine::MState::None) {
            next_due = scratch.next_timer()?;
        }
        for f in &ack.outcome.effects {
            if let Effect::ScheduleTimer { at, .. } = f {
                next_due = Some(next_due.map_or(*at, |t| t.min(*at)));
            }
        }
    }
    if now > clock.now() {
        clock.set(now);
    }
    timers::fire_due(&sim, now).await;
    let touched: Vec<String> = rows.iter().filter_map(|e| e.member_id.clone()).collect();
    let real = ctx.store.clone();
    let scratch2 = scratch.clone();
    let diffs = tokio::task::spawn_blocking(move || compare(&*real, &*scratch2, &touched, now))
        .await
        .map_err(|e| store::Error::Db(e.to_string()))??;
    Ok(diffs)
}

type View = BTreeMap<(String, String, String), (String, bool)>;

fn view(store: &dyn Store, member_ids: &[String], now: DateTime<Utc>) -> store::Result<View> {
    let mut out = View::new();
    for id in member_ids {
        // Only the memberships: `member_detail` also reads timers and sync detail per
        // membership, which the comparison does not use.
        if let Some(member) = store.member(id)? {
            let who = member.email.clone().unwrap_or_else(|| member.id.clone());
            for m in store.memberships_of(id)? {
                out.insert((who.clone(), m.provider.clone(), m.key.clone()), (m.state.to_string(), m.has_access(now)));
            }
        }
    }
    Ok(out)
}

fn compare(
    real: &dyn Store,
    scratch: &dyn Store,
    members: &[String],
    now: DateTime<Utc>,
) -> store::Result<Vec<Difference>> {
    let mut ids: Vec<String> = members.to_vec();
    ids.sort();
    ids.dedup();
    let stored = view(real, &ids, now)?;
    // The scratch store has its own member ids: find them by email.
    let mut scratch_ids = Vec::new();
    for d in stored.keys().map(|(who, _, _)| who.clone()).collect::<std::collections::BTreeSet<_>>() {
        scratch_ids.extend(scratch.members_by_email(&d)?.into_iter().map(|m| m.id));
    }
    let derived = view(scratch, &scratch_ids, now)?;
    let mut keys: Vec<_> = stored.keys().chain(derived.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (stored.get(&k).cloned(), derived.get(&k).cloned());
            (a != b).then_some(Difference { member: k.0, provider: k.1, membership: k.2, stored: a, derived: b })
        })
        .collect())
}
