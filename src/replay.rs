//! Replay: stored raw events run again through the rules in force. For dead letters
//! (`failed`) once a rule or mapping is fixed — the new outcome is a new row with source
//! `replay`, the old row stays as history, taken out of dedupe. And `dry_run`: re-derive
//! every membership from the stored deliveries under the current rules, on a scratch
//! in-memory store, and report what would differ — writing nothing.

use crate::canonical::Source;
use crate::clock::FixedClock;
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
    let scratch: Arc<dyn Store> = Arc::new(SqliteStore::open(":memory:", Options::default())?);
    let clock = Arc::new(FixedClock::new(now));
    let sim = Arc::new(Ctx::with_loaded(ctx.loaded(), scratch.clone(), clock.clone()));
    // Every delivery is one writer job, submitted in order without waiting for the one
    // before (the writer runs jobs in submission order); each job first fires, inside the
    // same transaction, the timers due by the delivery's arrival, so timers interleave with
    // deliveries exactly as they did in life. Stored events are read a page at a time.
    let loaded = ctx.loaded();
    let mut waiting = std::collections::VecDeque::new();
    let mut at: Option<DateTime<Utc>> = None;
    let mut touched = Vec::new();
    let mut page = filter.clone();
    page.deliveries_only = true;
    page.status = None;
    page.limit = Some(2000);
    loop {
        let store = ctx.store.clone();
        let f = page.clone();
        let rows = tokio::task::spawn_blocking(move || store.events_where(&f))
            .await
            .map_err(|e| store::Error::Db(e.to_string()))??;
        let Some(last) = rows.last() else { break };
        page.after_seq = Some(last.seq);
        for e in &rows {
            touched.extend(e.member_id.clone());
            let when = at.map_or(e.received_at, |t| t.max(e.received_at));
            at = Some(when);
            let (incoming, mut raw) = incoming(&sim, e)?;
            raw.source = Source::Webhook;
            let l = loaded.clone();
            let mut job: Option<Job> = Some(Box::new(move |tx: &mut dyn crate::store::Tx| -> store::Result<()> {
                fire_due_in_tx(&l, tx, when)?;
                pipeline::apply(&l, tx, incoming, raw, when).map(|_| ())
            }));
            loop {
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                let f = job.take().expect("job is submitted once");
                let (submit, back) = one_shot_work(f, done_tx);
                match scratch.submit(submit) {
                    Ok(()) => {
                        waiting.push_back(done_rx);
                        break;
                    }
                    Err(store::Error::Busy) => {
                        job = back.lock().ok().and_then(|mut b| b.take());
                        if job.is_none() {
                            return Err(store::Error::Closed.into());
                        }
                        // Queue full: wait for the oldest half, then submit again.
                        for _ in 0..waiting.len().div_ceil(2) {
                            if let Some(rx) = waiting.pop_front() {
                                rx.await.map_err(|_| store::Error::Closed)??;
                            }
                        }
                    }
                    Err(other) => return Err(other.into()),
                }
            }
        }
    }
    for rx in waiting {
        rx.await.map_err(|_| store::Error::Closed)??;
    }
    clock.set(at.map_or(now, |t| t.max(now)));
    timers::fire_due(&sim, now).await;
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

type Job = Box<dyn FnOnce(&mut dyn crate::store::Tx) -> store::Result<()> + Send>;

/// A writer job that answers on `done`; if the store refuses it (queue full), the job comes
/// back through the returned slot so it can be submitted again.
fn one_shot_work(
    f: Job,
    done: tokio::sync::oneshot::Sender<store::Result<()>>,
) -> (crate::store::Work, Arc<std::sync::Mutex<Option<Job>>>) {
    let slot: Arc<std::sync::Mutex<Option<Job>>> = Arc::new(std::sync::Mutex::new(Some(f)));
    let mine = slot.clone();
    let work: crate::store::Work = Box::new(move |tx| {
        let f = mine.lock().ok().and_then(|mut s| s.take());
        let r = match f {
            Some(f) => f(tx),
            None => Ok(()),
        };
        let ok = r.is_ok();
        let finished: crate::store::Done = Box::new(move |commit| {
            let _ = done.send(commit.and(r));
        });
        (ok, finished)
    });
    (work, slot)
}

/// Fires, inside the caller's transaction, every timer due by `at`, oldest first.
fn fire_due_in_tx(loaded: &pipeline::Loaded, tx: &mut dyn crate::store::Tx, at: DateTime<Utc>) -> store::Result<()> {
    loop {
        let due = tx.due_timers_tx(at, 256)?;
        if due.is_empty() {
            return Ok(());
        }
        for t in due {
            let raw = Raw { body: serde_json::to_vec(&t).unwrap_or_default(), headers: vec![], source: Source::Timer };
            let when = t.due_at;
            pipeline::apply(loaded, tx, Incoming::Timer(t), raw, when)?;
        }
    }
}
