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
use crate::store::{self, EventFilter, EventRow, MembershipRow};
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
    /// Retention dropped its body, which is what would run again.
    #[error("event #{0}'s raw body was pruned at {1} (retention.raw_body_days): it cannot run again; its canonical form and outcome are kept")]
    Pruned(i64, String),
    /// The provider has no YAML any more.
    #[error("no provider `{0}` in the rules")]
    NoProvider(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

fn incoming(config: &Config, e: &EventRow) -> Result<(Incoming, Raw), Error> {
    pipeline::incoming_from_row(config, e).ok_or_else(|| Error::NoProvider(e.provider.clone()))
}

/// Replays one stored event (failed, refused or ignored) through the current rules.
pub async fn replay_one(ctx: &Arc<Ctx>, e: &EventRow) -> Result<Ack, Error> {
    if !e.status.is_replayable() {
        return Err(Error::NotReplayable(e.seq, e.status.to_string()));
    }
    if e.source == Source::Timer {
        // Its stored body is the timer, not a provider's payload: run again as a delivery
        // it could only fail, and the timer itself is gone once it fired.
        return Err(Error::NotReplayable(e.seq, format!("{} (a timer's event)", e.status)));
    }
    if let Some(at) = e.body_pruned_at {
        return Err(Error::Pruned(e.seq, at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
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
    for e in rows.iter().filter(|e| e.status.is_replayable() && e.source != Source::Timer) {
        let ack = match replay_one(ctx, e).await {
            Err(why @ Error::Pruned(..)) => {
                tracing::warn!(seq = e.seq, event_id = %e.event_id, "{why}");
                continue;
            }
            other => other?,
        };
        out.push(Replayed {
            seq: e.seq,
            event_id: e.event_id.clone(),
            was: e.status.to_string(),
            now: ack.status,
            reason: ack.outcome.reason.clone(),
        });
    }
    Ok(out)
}

/// What the dry run compares of one membership.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Compared {
    pub state: String,
    pub has_access: bool,
    /// The levels it grants now (none without access).
    pub access_levels: Vec<String>,
    pub grace_until: Option<DateTime<Utc>>,
    pub access_until: Option<DateTime<Utc>>,
    pub flags: Vec<String>,
    /// Its pending timers, `name@time`, sorted: a rule that changed when a timer falls due
    /// (or a timer the rules now keep, such as `renewal_due`) is a difference too.
    pub timers: Vec<String>,
}

impl Compared {
    fn of(m: &MembershipRow, timers: &[store::TimerRow], now: DateTime<Utc>) -> Compared {
        let has_access = m.has_access(now);
        Compared {
            state: m.state.to_string(),
            has_access,
            access_levels: if has_access { m.access_levels.clone() } else { vec![] },
            grace_until: m.grace_until,
            access_until: m.access_until,
            flags: m.flags.clone(),
            timers: {
                let mut t: Vec<String> = timers
                    .iter()
                    .filter(|t| t.membership_id == m.id)
                    .map(|t| format!("{}@{}", t.name, t.due_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
                    .collect();
                t.sort();
                t
            },
        }
    }

    /// What differs from `other`, a phrase per field.
    fn changes_to(a: Option<&Compared>, b: Option<&Compared>) -> Vec<String> {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => return vec!["not derived: no delivery leads to it under these rules".into()],
            (None, Some(_)) => return vec!["derived, but not stored".into()],
            (None, None) => return vec![],
        };
        let t = |v: Option<DateTime<Utc>>| {
            v.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap_or_else(|| "none".into())
        };
        let mut out = Vec::new();
        if a.state != b.state {
            out.push(format!("state {} → {}", a.state, b.state));
        }
        if a.has_access != b.has_access {
            out.push(format!("access {} → {}", a.has_access, b.has_access));
        }
        if a.access_levels != b.access_levels {
            out.push(format!("levels [{}] → [{}]", a.access_levels.join(", "), b.access_levels.join(", ")));
        }
        if a.grace_until != b.grace_until {
            out.push(format!("grace_until {} → {}", t(a.grace_until), t(b.grace_until)));
        }
        if a.access_until != b.access_until {
            out.push(format!("access_until {} → {}", t(a.access_until), t(b.access_until)));
        }
        if a.flags != b.flags {
            out.push(format!("flags [{}] → [{}]", a.flags.join("; "), b.flags.join("; ")));
        }
        if a.timers != b.timers {
            out.push(format!("timers [{}] → [{}]", a.timers.join(", "), b.timers.join(", ")));
        }
        out
    }
}

/// One membership, stored vs re-derived, where they differ.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Difference {
    pub tenant: String,
    /// The stored member's email, or its id when it has none.
    pub member: String,
    /// Empty for a member the deliveries would create (not stored).
    pub member_id: String,
    pub provider: String,
    /// The membership key (`sub:…`, `product:…`).
    pub membership: String,
    pub stored: Option<Compared>,
    pub derived: Option<Compared>,
    /// What differs, a phrase per field ("state past_due → expired", …).
    pub changes: Vec<String>,
    /// The stored membership as compared, and the derived one with its timers (what
    /// `rederive` applies).
    #[serde(skip)]
    stored_row: Option<MembershipRow>,
    #[serde(skip)]
    derived_row: Option<(MembershipRow, Vec<store::TimerRow>)>,
}

/// What a dry run found: how many memberships it compared, and where they differ.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DryRun {
    pub deliveries: usize,
    pub compared: usize,
    pub differences: Vec<Difference>,
}

/// Re-derives memberships from the stored deliveries (all, or one member's, or since a
/// time) under the rules in force, on a scratch store, and compares each membership of the
/// members those deliveries touched — matched by member (email, else the provider customer
/// ids the member is linked by) and membership key — at `now`. Writes nothing.
pub async fn dry_run(ctx: &Arc<Ctx>, filter: &EventFilter, now: DateTime<Utc>) -> Result<DryRun, Error> {
    let (ctx, filter) = (ctx.clone(), filter.clone());
    tokio::task::spawn_blocking(move || dry_run_blocking(&ctx, &filter, now))
        .await
        .map_err(|e| store::Error::Thread(format!("the dry run failed: {e}")))?
}

/// A stored member, as the scratch store can find it again: its own ids differ there.
struct Person {
    tenant: String,
    id: String,
    email: Option<String>,
    /// (provider, customer id) links.
    links: Vec<(String, String)>,
}

impl Person {
    fn shown(&self) -> String {
        match (&self.email, self.id.is_empty()) {
            (Some(e), false) => e.clone(),
            (Some(e), true) => format!("{e} (not stored yet)"),
            (None, false) => self.id.clone(),
            (None, true) => "a member not stored yet".into(),
        }
    }
}

/// (tenant, provider, membership key) → (the stored member's index in `people`, what is
/// compared, the membership and — derived side only — its timers).
type View = BTreeMap<(String, String, String), (usize, Compared, MembershipRow, Vec<store::TimerRow>)>;

fn add_to_view(
    view: &mut View,
    person: usize,
    memberships: Vec<(MembershipRow, Vec<store::TimerRow>)>,
    now: DateTime<Utc>,
) {
    for (m, timers) in memberships {
        // An operator's grant comes from the admin API, not a delivery: never derived, so
        // never compared (and never reported as underived).
        if m.provider == crate::manual::PROVIDER {
            continue;
        }
        let key = (m.tenant.clone(), m.provider.clone(), m.key.clone());
        view.insert(key, (person, Compared::of(&m, &timers, now), m, timers));
    }
}

/// Deliveries read between two progress lines.
const PROGRESS_EVERY: usize = 20_000;

/// The dry run on two threads: one reads the stored deliveries a page at a time in
/// arrival order, decodes and extracts each again and works out what needs no stored
/// state (`Precomputed`); the other runs them, in that order,
/// through the pipeline into a scratch database in one transaction, firing the timers due
/// by a delivery's arrival just before it, so timers interleave with deliveries exactly as
/// they did in life. Then the timers due by `now`, and the comparison.
fn dry_run_blocking(ctx: &Ctx, filter: &EventFilter, now: DateTime<Utc>) -> Result<DryRun, Error> {
    let loaded = ctx.loaded();
    let mut page = filter.clone();
    page.deliveries_only = true;
    page.status = None;
    page.limit = Some(2000);
    // A page of deliveries at a time crosses between the threads (one wake-up per page).
    type Delivery = (DateTime<Utc>, Incoming, Raw, pipeline::Precomputed);
    let (to_apply, deliveries) = std::sync::mpsc::sync_channel::<Result<Vec<Delivery>, Error>>(2);
    type Side = (View, Vec<Person>, usize);
    let ((stored, people, read), derived) = std::thread::scope(|scope| {
        let reader_loaded = loaded.clone();
        let reader = scope.spawn(move || -> Result<Side, Error> {
            let mut touched = Vec::new();
            let mut at: Option<DateTime<Utc>> = None;
            let mut read = 0usize;
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
                        let before = read / PROGRESS_EVERY;
                        read += batch.len();
                        if read / PROGRESS_EVERY > before {
                            tracing::info!(deliveries = read, "Dry run: deliveries read so far.");
                        }
                        if to_apply.send(Ok(batch)).is_err() {
                            return Ok((View::new(), vec![], read));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = to_apply.send(Err(e));
                        return Ok((View::new(), vec![], read));
                    }
                }
            }
            drop(to_apply);
            // The stored side of the comparison, read while the other thread still works.
            touched.sort();
            touched.dedup();
            let mut stored = View::new();
            let mut people = Vec::new();
            for found in ctx.store.members_with_memberships(&touched)? {
                let crate::store::StoredMember { member, memberships, timers, customers: links } = found;
                let with_timers = memberships.into_iter().map(|m| (m, timers.clone())).collect();
                add_to_view(&mut stored, people.len(), with_timers, now);
                people.push(Person { tenant: member.tenant, id: member.id, email: member.email, links });
            }
            Ok((stored, people, read))
        });
        let mut result = None;
        let derive = |tx: &mut dyn store::Tx| -> Result<(Side, View), Error> {
            // The scratch members the deliveries reached: those no stored member matches
            // are members the deliveries would create (one whose first delivery failed).
            let mut reached = BTreeSet::new();
            for batch in deliveries {
                for (when, incoming, raw, pre) in batch? {
                    timers::fire_due_in_tx(&loaded, tx, when, FireAt::DueTime, usize::MAX)?;
                    let ack = pipeline::apply_with(&loaded, tx, incoming, raw, when, pre)?;
                    reached.extend(ack.outcome.member_id);
                }
            }
            timers::fire_due_in_tx(&loaded, tx, now, FireAt::DueTime, usize::MAX)?;
            let mut side =
                reader.join().map_err(|_| store::Error::Thread("the dry run's reader panicked".into()))??;
            // The scratch store has its own member ids: find each stored member there by
            // email, else by a provider customer id they are linked by.
            let mut derived = View::new();
            let mut matched = BTreeSet::new();
            for (i, p) in side.1.iter().enumerate() {
                let mut found = match &p.email {
                    Some(e) => tx.member_by_email(&p.tenant, e)?,
                    None => None,
                };
                for (provider, cid) in &p.links {
                    if found.is_some() {
                        break;
                    }
                    found = tx.member_by_customer(&p.tenant, provider, cid)?;
                }
                if let Some(m) = found {
                    matched.insert(m.id.clone());
                    let mut with_timers = Vec::new();
                    for ms in tx.memberships_of(&m.id)? {
                        let timers = tx.timers_of(&ms.id)?;
                        with_timers.push((ms, timers));
                    }
                    add_to_view(&mut derived, i, with_timers, now);
                }
            }
            for id in reached.difference(&matched) {
                let Some(m) = tx.member(id)? else { continue };
                let mut with_timers = Vec::new();
                for ms in tx.memberships_of(&m.id)? {
                    let timers = tx.timers_of(&ms.id)?;
                    with_timers.push((ms, timers));
                }
                // Not stored: no member id of ours to name it by.
                side.1.push(Person { tenant: m.tenant, id: String::new(), email: m.email, links: vec![] });
                add_to_view(&mut derived, side.1.len() - 1, with_timers, now);
            }
            Ok((side, derived))
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
    let compared = keys.len();
    let differences = keys
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (stored.get(&k), derived.get(&k));
            let changes = Compared::changes_to(a.map(|x| &x.1), b.map(|x| &x.1));
            let person = &people[a.or(b)?.0];
            (!changes.is_empty()).then(|| Difference {
                tenant: k.0,
                member: person.shown(),
                member_id: person.id.clone(),
                provider: k.1,
                membership: k.2,
                stored: a.map(|x| x.1.clone()),
                derived: b.map(|x| x.1.clone()),
                changes,
                stored_row: a.map(|x| x.2.clone()),
                derived_row: b.map(|x| (x.2.clone(), x.3.clone())),
            })
        })
        .collect();
    Ok(DryRun { deliveries: read, compared, differences })
}

/// What became of one membership in a re-derivation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rederived {
    pub member: String,
    pub member_id: String,
    pub provider: String,
    pub membership: String,
    pub changes: Vec<String>,
    /// `applied` (the event it was recorded as: `event_id`), `would apply` (a dry run), or
    /// `left` with why.
    pub result: String,
    pub event_id: Option<String>,
}

/// A re-derivation: the comparison, and what became of each difference.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rederivation {
    pub version: String,
    pub dry_run: bool,
    pub deliveries: usize,
    pub compared: usize,
    pub memberships: Vec<Rederived>,
}

/// Re-derives the memberships the stored deliveries (per `filter`) lead to under the rules
/// in force, and applies each difference (not with `dry_run`): the membership is set to
/// what the deliveries derive, with its timers, recorded as an event with source
/// `rederive`. A membership no delivery derives is left as it is, and said so; nothing is
/// created that is not stored. What a config or rule change means for earlier members
/// (a product mapped after they bought it) is applied this way.
pub async fn rederive(
    ctx: &Arc<Ctx>,
    filter: &EventFilter,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<Rederivation, Error> {
    // Only whole histories: a state derived from part of the deliveries (a time range, one
    // member's — a parked delivery is stored before it has a member) would be wrong, and
    // applying it worse. A member filter narrows what is applied, not what is run.
    let only = filter.member_id.clone();
    let version = ctx.rules().version.clone();
    let mut run = self::dry_run(ctx, &EventFilter::default(), now).await?;
    if let Some(id) = &only {
        run.differences.retain(|d| &d.member_id == id);
    }
    let mut out = Rederivation {
        version: version.clone(),
        dry_run,
        deliveries: run.deliveries,
        compared: run.compared,
        memberships: vec![],
    };
    for d in run.differences {
        let mut line = Rederived {
            member: d.member.clone(),
            member_id: d.member_id.clone(),
            provider: d.provider.clone(),
            membership: d.membership.clone(),
            changes: d.changes.clone(),
            result: String::new(),
            event_id: None,
        };
        line.result = match (d.stored_row, d.derived_row) {
            (Some(_), Some(_)) if dry_run => "would apply".into(),
            (Some(stored), Some((derived, timers))) => {
                let (version, changes) = (version.clone(), d.changes.clone());
                let done = ctx
                    .store
                    .write(move |tx| pipeline::apply_derived(tx, &stored, &derived, &timers, &changes, &version, now))
                    .await?;
                match done {
                    pipeline::Rederived::Applied(ack) => {
                        line.event_id = Some(ack.event_id);
                        "applied".into()
                    }
                    pipeline::Rederived::Left(why) => format!("left: {why}"),
                }
            }
            (Some(_), None) => {
                "left: no stored delivery derives this membership under these rules; see its events".into()
            }
            (None, _) => {
                "left: derived but not stored (its deliveries are stored refused or ignored); replay them".into()
            }
        };
        out.memberships.push(line);
    }
    if !dry_run {
        ctx.timers_changed.notify_one();
    }
    Ok(out)
}
