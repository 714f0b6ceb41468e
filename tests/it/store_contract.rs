//! The `Store` contract, one suite for both stores: every test runs the same operations on
//! the embedded SQLite store and on the shared PostgreSQL store (a fresh database cloned
//! from the migrated template, on the test cluster of `pg_cluster`) and asserts what each
//! must answer, and that both answer alike.

use chrono::{DateTime, TimeZone, Utc};
use membersync::canonical::Source;
use membersync::machine::MState;
use membersync::store::{
    self, pg::PgStore, sqlite::SqliteStore, stored_json, EventFilter, EventRow, EventStatus, LeadRow, MemberRow,
    MembershipRow, PaymentLink, ProductSeen, Store, SyncRecord, SyncRow, SyncState, TimerRow, Tx,
};
use serde_json::json;
use std::sync::Arc;

/// Both stores, empty: (name, store, what keeps the SQLite file alive).
pub fn both() -> Vec<(&'static str, Arc<dyn Store>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(dir.path().join("m.db").to_str().unwrap(), Default::default()).unwrap();
    let url = crate::pg_cluster::fresh_database();
    let pg = std::thread::spawn(move || PgStore::open(&url, Default::default()).unwrap()).join().unwrap();
    vec![("sqlite", Arc::new(sqlite), Some(dir)), ("postgres", Arc::new(pg), None)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_store_reads_as_empty() {
    for (kind, s, _dir) in both() {
        let counts = store::read(&s, |s| s.event_counts()).await.unwrap();
        assert!(counts.is_empty(), "{kind}: {counts:?}");
        let seq = s.write(|tx| tx.last_event_seq()).await.unwrap();
        assert_eq!(seq, 0, "{kind}");
    }
}

// ---------------------------------------------------------------------------------------
// Helpers: the stores under test, and rows built from a few values.
// ---------------------------------------------------------------------------------------

/// One store under test, named for the messages.
struct Db {
    kind: &'static str,
    s: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    /// A write that must commit.
    async fn w<T: Send + 'static>(&self, f: impl FnOnce(&mut dyn Tx) -> store::Result<T> + Send + 'static) -> T {
        self.s.write(f).await.unwrap_or_else(|e| panic!("{}: a write failed: {e}", self.kind))
    }

    /// A read that must succeed.
    async fn r<T: Send + 'static>(&self, f: impl FnOnce(&dyn Store) -> store::Result<T> + Send + 'static) -> T {
        store::read(&self.s, f).await.unwrap_or_else(|e| panic!("{}: a read failed: {e}", self.kind))
    }
}

fn stores() -> Vec<Db> {
    both().into_iter().map(|(kind, s, _dir)| Db { kind, s, _dir }).collect()
}

/// Asserts that every store gave the same answer (its debug form) to the same question.
fn alike<T: std::fmt::Debug>(what: &str, answers: &[(&'static str, T)]) {
    let first = format!("{:?}", answers[0].1);
    for (kind, a) in &answers[1..] {
        assert_eq!(format!("{a:?}"), first, "{what}: {kind} answered otherwise than {}", answers[0].0);
    }
}

const T0: i64 = 1_700_000_000;

/// `s` seconds after a fixed instant.
fn at(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(T0 + s, 0).unwrap()
}

fn member(id: &str, tenant: &str, email: Option<&str>, name: Option<&str>, created: i64) -> MemberRow {
    MemberRow {
        id: id.into(),
        tenant: tenant.into(),
        email: email.map(Into::into),
        name: name.map(Into::into),
        flags: vec![],
        created_at: at(created),
        updated_at: at(created),
        erased_at: None,
    }
}

pub(crate) fn membership(id: &str, tenant: &str, member_id: &str, provider: &str, key: &str) -> MembershipRow {
    MembershipRow {
        id: id.into(),
        tenant: tenant.into(),
        member_id: member_id.into(),
        provider: provider.into(),
        key: key.into(),
        subscription_id: key.strip_prefix("sub:").map(Into::into),
        product_id: None,
        plan_id: None,
        status: None,
        state: MState::Active,
        period_end: None,
        grace_until: None,
        access_until: None,
        cancel_at_period_end: false,
        access_levels: vec![],
        flags: vec![],
        last_event_at: None,
        last_event_id: None,
        last_reconciled_at: None,
        sync_status: SyncState::NeverReconciled,
        created_at: at(0),
        updated_at: at(0),
        last_event_rank: 0,
    }
}

fn event(tenant: &str, provider: &str, key: &str) -> EventRow {
    EventRow {
        seq: 0,
        tenant: tenant.into(),
        provider: provider.into(),
        event_id: key.into(),
        idempotency_key: key.into(),
        event_type: "customer.subscription.updated".into(),
        kind: Some("subscription_updated".into()),
        source: Source::Webhook,
        received_at: at(0),
        occurred_at: Some(at(0)),
        member_id: None,
        membership_id: None,
        status: EventStatus::Applied,
        reason: None,
        raw: format!("{{\"id\":\"{key}\",\"tenant\":\"{tenant}\"}}").into_bytes(),
        headers: stored_json(&json!([["stripe-signature", format!("t=1,v1={key}")]])),
        canonical: Some(stored_json(&json!({"event_id": key}))),
        outcome: stored_json(&json!({"changed": true, "key": key})),
        park_key: None,
        deliveries: 1,
        enrichment: None,
        body_pruned_at: None,
    }
}

/// An event parked under `park_key`, naming its member by customer id and/or email.
fn parked_event(
    tenant: &str,
    provider: &str,
    key: &str,
    park_key: &str,
    cid: Option<&str>,
    email: Option<&str>,
    occurred: i64,
) -> EventRow {
    EventRow {
        status: EventStatus::Refused,
        occurred_at: Some(at(occurred)),
        park_key: Some(park_key.into()),
        canonical: Some(stored_json(&json!({"member": {"provider_customer_id": cid, "email": email}}))),
        ..event(tenant, provider, key)
    }
}

fn timer(membership_id: &str, name: &str, due: i64, by: &str) -> TimerRow {
    TimerRow {
        tenant: "t".into(),
        membership_id: membership_id.into(),
        name: name.into(),
        due_at: at(due),
        set_by_event: by.into(),
    }
}

fn lead(tenant: &str, email: &str, name: Option<&str>, provider: &str, event_id: &str, captured: i64) -> LeadRow {
    LeadRow {
        tenant: tenant.into(),
        email: email.into(),
        name: name.map(Into::into),
        provider: provider.into(),
        event_id: event_id.into(),
        captured_at: at(captured),
        converted_at: None,
        member_id: None,
    }
}

fn sync(membership_id: &str, status: SyncState, attempted: i64) -> SyncRecord {
    SyncRecord {
        membership_id: membership_id.into(),
        sync_status: status,
        attempted_at: at(attempted),
        reconciled_at: None,
        detail: None,
        drift: None,
        error: None,
    }
}

/// An event as a read that leaves out raw bodies and headers returns it.
fn light(e: &EventRow) -> EventRow {
    EventRow { raw: vec![], headers: stored_json(&json!([])), ..e.clone() }
}

fn view(e: &EventRow) -> String {
    format!("{e:?}")
}

fn views(es: &[EventRow]) -> Vec<String> {
    es.iter().map(view).collect()
}

fn seqs(es: &[EventRow]) -> Vec<i64> {
    es.iter().map(|e| e.seq).collect()
}

fn ids(ms: &[MemberRow]) -> Vec<String> {
    ms.iter().map(|m| m.id.clone()).collect()
}

/// Inserts events in one write; returns them with their sequence numbers.
async fn insert(db: &Db, rows: Vec<EventRow>) -> Vec<EventRow> {
    db.w(move |tx| {
        rows.into_iter()
            .map(|mut e| {
                e.seq = tx.insert_event(&e)?;
                Ok(e)
            })
            .collect()
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 1. Events
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_get_increasing_seqs_and_are_found_by_key_within_their_tenant_and_provider() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let stored = insert(
            &db,
            vec![
                event("t", "stripe", "evt_1"),
                EventRow {
                    reason: Some("why".into()),
                    enrichment: Some("{\"a\":1}".into()),
                    ..event("u", "stripe", "evt_1")
                },
                EventRow { canonical: None, occurred_at: None, kind: None, ..event("t", "whop", "evt_1") },
            ],
        )
        .await;
        let mut last = 0;
        for e in &stored {
            assert!(e.seq > last, "{k}: {:?}", seqs(&stored));
            last = e.seq;
        }
        // Written one job at a time, they keep increasing.
        let next = db.w(|tx| tx.insert_event(&event("t", "stripe", "evt_2"))).await;
        assert!(next > last, "{k}: {next} after {last}");
        assert_eq!(db.w(|tx| tx.last_event_seq()).await, next, "{k}");

        let found = db
            .w(|tx| {
                Ok([
                    tx.event_by_key("t", "stripe", "evt_1")?,
                    tx.event_by_key("u", "stripe", "evt_1")?,
                    tx.event_by_key("t", "whop", "evt_1")?,
                    tx.event_by_key("v", "stripe", "evt_1")?,
                    tx.event_by_key("t", "paddle", "evt_1")?,
                    tx.event_by_key("t", "stripe", "EVT_1")?,
                ])
            })
            .await;
        // Every field as it was written, the raw body and JSON included.
        for (i, e) in stored.iter().enumerate() {
            assert_eq!(found[i].as_ref().map(view), Some(view(e)), "{k}: event {i}");
        }
        assert!(found[3].is_none() && found[4].is_none() && found[5].is_none(), "{k}: {:?}", &found[3..]);
        answers.push((k, found.iter().map(|e| e.as_ref().map(view)).collect::<Vec<_>>()));

        // A second delivery of the same key is not stored again.
        let dup = db.s.write(|tx| tx.insert_event(&event("t", "stripe", "evt_1"))).await;
        assert!(dup.is_err(), "{k}: a duplicate key was stored: {dup:?}");
        let all = db.r(|s| s.events(None, None, 100)).await;
        assert_eq!(all.len(), 4, "{k}");
    }
    alike("event_by_key", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_counted_and_enrichment_is_kept_with_its_event() {
    for db in stores() {
        let k = db.kind;
        let e = insert(&db, vec![event("t", "stripe", "evt_1"), event("t", "stripe", "evt_2")]).await;
        let (s1, s2) = (e[0].seq, e[1].seq);
        db.w(move |tx| {
            tx.note_duplicate(s1)?;
            tx.note_duplicate(s1)?;
            tx.set_enrichment(s2, "{\"line_items\":[\"prod_a\"]}")
        })
        .await;
        db.w(move |tx| tx.note_duplicate(s1)).await;
        let got = db.r(|s| s.events_by_event_id("evt_1")).await;
        assert_eq!(got.len(), 1, "{k}");
        assert_eq!(got[0].deliveries, 4, "{k}");
        let got = db.w(|tx| tx.event_by_key("t", "stripe", "evt_2")).await.unwrap();
        assert_eq!(got.enrichment.as_deref(), Some("{\"line_items\":[\"prod_a\"]}"), "{k}");
        assert_eq!(got.deliveries, 1, "{k}");
        // Nothing else of it changed.
        assert_eq!(view(&EventRow { enrichment: None, ..got }), view(&e[1]), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_failed_refused_or_ignored_events_are_marked_replayed_and_only_once() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let e = insert(
            &db,
            vec![
                event("t", "stripe", "evt_applied"),
                EventRow {
                    status: EventStatus::Failed,
                    reason: Some("boom".into()),
                    ..event("t", "stripe", "evt_failed")
                },
                EventRow {
                    status: EventStatus::Refused,
                    park_key: Some("sub:a".into()),
                    ..event("t", "stripe", "evt_refused")
                },
                EventRow { status: EventStatus::Ignored, ..event("t", "stripe", "evt_ignored") },
                EventRow { status: EventStatus::Stale, ..event("t", "stripe", "evt_stale") },
            ],
        )
        .await;
        let s: Vec<i64> = seqs(&e);
        let s2 = s.clone();
        let first: Vec<bool> =
            db.w(move |tx| s2.iter().map(|&q| tx.mark_replayed(q, "replayed by op")).collect()).await;
        assert_eq!(first, [false, true, true, true, false], "{k}");
        let s2 = s.clone();
        let again: Vec<bool> = db.w(move |tx| s2.iter().map(|&q| tx.mark_replayed(q, "again")).collect()).await;
        assert_eq!(again, [false; 5], "{k}");

        let now = db.r(|s| s.events_where(&EventFilter::default())).await;
        assert_eq!(seqs(&now), s, "{k}");
        let statuses: Vec<EventStatus> = now.iter().map(|e| e.status).collect();
        use EventStatus::*;
        assert_eq!(statuses, [Applied, Replayed, Replayed, Replayed, Stale], "{k}");
        let keys: Vec<String> = now.iter().map(|e| e.idempotency_key.clone()).collect();
        assert_eq!(
            keys,
            [
                "evt_applied".to_string(),
                format!("evt_failed#retired@{}", s[1]),
                format!("evt_refused#retired@{}", s[2]),
                format!("evt_ignored#retired@{}", s[3]),
                "evt_stale".to_string(),
            ],
            "{k}"
        );
        let reasons: Vec<Option<&str>> = now.iter().map(|e| e.reason.as_deref()).collect();
        assert_eq!(
            reasons,
            [None, Some("boom — replayed by op"), Some("replayed by op"), Some("replayed by op"), None],
            "{k}"
        );
        assert!(now.iter().all(|e| e.park_key.is_none()), "{k}: a replayed event stays parked");
        // Untouched: the applied and the stale one.
        assert_eq!(view(&now[0]), view(&e[0]), "{k}");
        assert_eq!(view(&now[4]), view(&e[4]), "{k}");

        // Out of dedupe: its key finds nothing, and a new delivery of it is stored.
        let found = db
            .w(|tx| Ok((tx.event_by_key("t", "stripe", "evt_failed")?, tx.event_by_key("t", "stripe", "evt_applied")?)))
            .await;
        assert!(found.0.is_none(), "{k}: {:?}", found.0);
        assert_eq!(found.1.map(|e| e.seq), Some(s[0]), "{k}");
        let again = db.w(|tx| tx.insert_event(&event("t", "stripe", "evt_failed"))).await;
        assert!(again > s[4], "{k}");
        let counts = db.r(|s| s.event_counts()).await;
        let want: Vec<(String, i64)> = vec![("applied".into(), 2), ("replayed".into(), 3), ("stale".into(), 1)];
        assert_eq!(counts, want, "{k}");
        answers.push((k, views(&now)));
    }
    alike("events after mark_replayed", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_combination_of_event_filters_selects_exactly_the_events_it_describes() {
    let statuses = [EventStatus::Applied, EventStatus::Failed, EventStatus::Ignored, EventStatus::Refused];
    let members = [Some("m0"), Some("m1"), None];
    let rows: Vec<EventRow> = (0..48usize)
        .map(|i| EventRow {
            status: statuses[i % 4],
            member_id: members[i % 7 % 3].map(Into::into),
            source: match (i % 5, i % 11) {
                (0, _) => Source::Timer,
                (_, 3) => Source::Replay,
                _ => Source::Webhook,
            },
            received_at: at((i as i64 * 37) % 480),
            park_key: match i % 6 {
                0 => Some("sub:a".into()),
                1 => Some("".into()),
                _ => None,
            },
            ..event(if i % 9 == 4 { "u" } else { "t" }, "stripe", &format!("evt_{i}"))
        })
        .collect();
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let all = insert(&db, rows.clone()).await;
        let mut got_all = Vec::new();
        for bits in 0..384u32 {
            let on = |b: u32| bits & (1 << b) != 0;
            let f = EventFilter {
                status: on(0).then(|| "failed".to_string()),
                since: on(1).then(|| at(200)),
                member_id: on(2).then(|| "m1".to_string()),
                seq: on(3).then_some(all[29].seq),
                deliveries_only: on(4),
                after_seq: on(5).then_some(all[20].seq),
                limit: on(6).then_some(3),
                park_key: match bits >> 7 {
                    0 => None,
                    1 => Some("sub:a".into()),
                    _ => Some("".into()),
                },
            };
            let mut want: Vec<i64> = all
                .iter()
                .filter(|e| {
                    f.status.as_deref().is_none_or(|s| s == e.status.as_str())
                        && f.since.is_none_or(|t| e.received_at >= t)
                        && f.member_id.as_deref().is_none_or(|m| Some(m) == e.member_id.as_deref())
                        && f.seq.is_none_or(|s| s == e.seq)
                        && (!f.deliveries_only || e.source == Source::Webhook)
                        && f.after_seq.is_none_or(|s| e.seq > s)
                        && f.park_key.as_deref().is_none_or(|p| Some(p) == e.park_key.as_deref())
                })
                .map(|e| e.seq)
                .collect();
            want.truncate(f.limit.unwrap_or(usize::MAX));
            let f2 = f.clone();
            let got = db.r(move |s| s.events_where(&f2)).await;
            assert_eq!(seqs(&got), want, "{k}: {f:?}");
            // Whole rows, bodies included.
            for e in &got {
                assert_eq!(view(e), view(all.iter().find(|a| a.seq == e.seq).unwrap()), "{k}");
            }
            got_all.push(seqs(&got));
        }
        answers.push((k, got_all));
    }
    alike("events_where", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_lists_page_newest_first_without_bodies_while_events_keep_them() {
    let rows: Vec<EventRow> = (0..8usize)
        .map(|i| EventRow {
            status: if i % 3 == 1 { EventStatus::Failed } else { EventStatus::Applied },
            event_id: if i == 2 || i == 5 { "evt_shared".into() } else { format!("evt_{i}") },
            ..event(if i % 2 == 0 { "t" } else { "u" }, "stripe", &format!("key_{i}"))
        })
        .collect();
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let all = insert(&db, rows.clone()).await;
        let newest: Vec<EventRow> = all.iter().rev().cloned().collect();
        let pick = |f: &dyn Fn(&EventRow) -> bool, n: usize| -> Vec<EventRow> {
            newest.iter().filter(|e| f(e)).take(n).cloned().collect()
        };

        let list = db.r(|s| s.event_list(None, None, None, 3)).await;
        assert_eq!(views(&list), views(&pick(&|_| true, 3).iter().map(light).collect::<Vec<_>>()), "{k}");
        assert!(list.iter().all(|e| e.raw.is_empty() && e.headers.get() == "[]"), "{k}");
        let before = list[2].seq;
        let page = db.r(move |s| s.event_list(None, None, Some(before), 3)).await;
        assert_eq!(seqs(&page), seqs(&pick(&|e| e.seq < before, 3)), "{k}");
        let first_seq = all[0].seq;
        let last = db.r(move |s| s.event_list(None, None, Some(first_seq), 100)).await;
        assert!(last.is_empty(), "{k}: {:?}", seqs(&last));
        let filtered = db.r(|s| s.event_list(Some("failed"), Some("u"), None, 10)).await;
        let want = pick(&|e| e.status == EventStatus::Failed && e.tenant == "u", 10);
        assert_eq!(views(&filtered), views(&want.iter().map(light).collect::<Vec<_>>()), "{k}");
        assert!(!want.is_empty());
        let applied_t = db.r(|s| s.event_list(Some("applied"), Some("t"), None, 2)).await;
        assert_eq!(seqs(&applied_t), seqs(&pick(&|e| e.status == EventStatus::Applied && e.tenant == "t", 2)), "{k}");

        // `events`: newest first, bodies and headers included.
        let whole = db.r(|s| s.events(None, None, 3)).await;
        assert_eq!(views(&whole), views(&pick(&|_| true, 3)), "{k}");
        let whole = db.r(|s| s.events(Some("applied"), Some("t"), 100)).await;
        assert_eq!(views(&whole), views(&pick(&|e| e.status == EventStatus::Applied && e.tenant == "t", 100)), "{k}");
        let whole = db.r(|s| s.events(None, Some("nobody"), 100)).await;
        assert!(whole.is_empty(), "{k}");

        // By provider event id, oldest first, whole.
        let shared = db.r(|s| s.events_by_event_id("evt_shared")).await;
        assert_eq!(views(&shared), views(&[all[2].clone(), all[5].clone()]), "{k}");
        assert!(db.r(|s| s.events_by_event_id("evt_none")).await.is_empty(), "{k}");
        answers.push((k, (views(&list), views(&page), views(&shared))));
    }
    alike("event lists", &answers);
}

// ---------------------------------------------------------------------------------------
// 2. Members
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_upserted_and_found_by_customer_id_and_by_email_in_any_case() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let ann = member("mbr_ann", "t", Some("Ann@Example.com"), Some("Ann"), 10);
        let a2 = ann.clone();
        db.w(move |tx| tx.save_member(&a2)).await;
        assert_eq!(db.r(|s| s.member("mbr_ann")).await, Some(ann.clone()), "{k}");
        // Upsert: email, name, flags and updated_at change; id, tenant and created_at stay.
        let changed = MemberRow {
            email: Some("ann@NEW.example".into()),
            name: None,
            flags: vec!["vip".into(), "beta".into()],
            updated_at: at(50),
            erased_at: None,
            created_at: at(40),
            tenant: "other".into(),
            ..ann.clone()
        };
        let c2 = changed.clone();
        db.w(move |tx| tx.save_member(&c2)).await;
        let want = MemberRow { created_at: at(10), tenant: "t".into(), ..changed.clone() };
        assert_eq!(db.w(|tx| tx.member("mbr_ann")).await, Some(want.clone()), "{k}");
        assert_eq!(db.r(|s| s.member("mbr_ann")).await, Some(want.clone()), "{k}");
        assert_eq!(db.r(|s| s.member("mbr_none")).await, None, "{k}");
        // The old email finds nothing any more; the new one does, in any ASCII case.
        let by_email = db
            .w(|tx| {
                Ok((
                    tx.member_by_email("t", "ann@example.com")?,
                    tx.member_by_email("t", "ANN@new.EXAMPLE")?,
                    tx.member_by_email("other", "ann@new.example")?,
                ))
            })
            .await;
        assert_eq!(by_email, (None, Some(want.clone()), None), "{k}");

        // Customer ids: the first link is kept.
        let (bob, cy) = (member("mbr_bob", "t", None, None, 20), member("mbr_cy", "t", None, None, 21));
        let found = db
            .w(move |tx| {
                tx.save_member(&bob)?;
                tx.save_member(&cy)?;
                tx.link_customer("t", "stripe", "cus_1", "mbr_bob")?;
                tx.link_customer("t", "stripe", "cus_1", "mbr_cy")?;
                tx.link_customer("t", "stripe", "cus_0", "mbr_cy")?;
                tx.link_customer("t", "whop", "cus_w", "mbr_bob")?;
                Ok([
                    tx.member_by_customer("t", "stripe", "cus_1")?.map(|m| m.id),
                    tx.member_by_customer("t", "stripe", "cus_0")?.map(|m| m.id),
                    tx.member_by_customer("u", "stripe", "cus_1")?.map(|m| m.id),
                    tx.member_by_customer("t", "whop", "cus_1")?.map(|m| m.id),
                    tx.member_by_customer("t", "whop", "cus_w")?.map(|m| m.id),
                    tx.member_by_customer("t", "stripe", "CUS_1")?.map(|m| m.id),
                ])
            })
            .await;
        let some = |s: &str| Some(s.to_string());
        assert_eq!(found, [some("mbr_bob"), some("mbr_cy"), None, None, some("mbr_bob"), None], "{k}");
        // A member's customer id at a provider: the first in order.
        db.w(|tx| tx.link_customer("t", "stripe", "cus_00", "mbr_cy")).await;
        let cid = db
            .r(|s| {
                Ok((
                    s.customer_id("t", "stripe", "mbr_cy")?,
                    s.customer_id("t", "whop", "mbr_cy")?,
                    s.customer_id("t", "whop", "mbr_bob")?,
                ))
            })
            .await;
        assert_eq!(cid, (some("cus_0"), None, some("cus_w")), "{k}");

        // Two members share an email: the oldest is the one found, whatever the order saved.
        let newer = member("mbr_a_newer", "t", Some("dup@example.com"), None, 300);
        let older = member("mbr_z_older", "t", Some("DUP@example.com"), None, 100);
        let elsewhere = member("mbr_u", "u", Some("Dup@Example.com"), None, 200);
        let (n2, o2, e2) = (newer.clone(), older.clone(), elsewhere.clone());
        let oldest = db
            .w(move |tx| {
                tx.save_member(&n2)?;
                tx.save_member(&o2)?;
                tx.save_member(&e2)?;
                Ok((tx.member_by_email("t", "Dup@EXAMPLE.com")?, tx.member_by_email("u", "dup@example.com")?))
            })
            .await;
        assert_eq!(oldest, (Some(older.clone()), Some(elsewhere.clone())), "{k}");
        // Every tenant's, oldest first.
        let all = db.r(|s| s.members_by_email("dUp@example.COM")).await;
        assert_eq!(all, vec![older.clone(), elsewhere.clone(), newer.clone()], "{k}");
        assert!(db.r(|s| s.members_by_email("nobody@example.com")).await.is_empty(), "{k}");
        answers.push((k, (all, found)));
    }
    alike("members", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merging_a_member_moves_memberships_customers_events_and_leads_then_deletes_it() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let (from, into) = (
            member("mbr_from", "t", Some("x@example.com"), None, 10),
            member("mbr_into", "t", Some("x@example.com"), None, 5),
        );
        let (f2, i2) = (from.clone(), into.clone());
        let evs = db
            .w(move |tx| {
                tx.save_member(&f2)?;
                tx.save_member(&i2)?;
                tx.save_membership(&membership("ms_from", "t", "mbr_from", "stripe", "sub:1"))?;
                tx.save_membership(&membership("ms_into", "t", "mbr_into", "whop", "sub:2"))?;
                tx.link_customer("t", "stripe", "cus_from", "mbr_from")?;
                tx.link_customer("t", "whop", "cus_into", "mbr_into")?;
                let e1 =
                    tx.insert_event(&EventRow { member_id: Some("mbr_from".into()), ..event("t", "stripe", "e1") })?;
                let e2 =
                    tx.insert_event(&EventRow { member_id: Some("mbr_into".into()), ..event("t", "whop", "e2") })?;
                let e3 =
                    tx.insert_event(&EventRow { member_id: Some("mbr_other".into()), ..event("t", "whop", "e3") })?;
                tx.capture_lead(&lead("t", "x@example.com", None, "stripe", "e0", 1))?;
                tx.convert_lead("t", "x@example.com", "mbr_from", at(2))?;
                Ok([e1, e2, e3])
            })
            .await;
        db.w(|tx| tx.merge_member("mbr_from", "mbr_into")).await;
        let after = db
            .w(|tx| {
                Ok((
                    tx.member("mbr_from")?,
                    tx.memberships_of("mbr_from")?,
                    tx.memberships_of("mbr_into")?.into_iter().map(|m| (m.id, m.member_id)).collect::<Vec<_>>(),
                    tx.member_by_customer("t", "stripe", "cus_from")?.map(|m| m.id),
                    tx.member_by_customer("t", "whop", "cus_into")?.map(|m| m.id),
                    tx.member_by_email("t", "x@example.com")?.map(|m| m.id),
                ))
            })
            .await;
        let s = |x: &str| x.to_string();
        assert_eq!(after.0, None, "{k}");
        assert!(after.1.is_empty(), "{k}");
        assert_eq!(after.2, [(s("ms_from"), s("mbr_into")), (s("ms_into"), s("mbr_into"))], "{k}");
        assert_eq!(
            (after.3.as_deref(), after.4.as_deref(), after.5.as_deref()),
            (Some("mbr_into"), Some("mbr_into"), Some("mbr_into")),
            "{k}"
        );
        let moved =
            db.r(|s| s.events_where(&EventFilter { member_id: Some("mbr_into".into()), ..Default::default() })).await;
        assert_eq!(seqs(&moved), evs[..2], "{k}");
        let left =
            db.r(|s| s.events_where(&EventFilter { member_id: Some("mbr_from".into()), ..Default::default() })).await;
        assert!(left.is_empty(), "{k}");
        let leads = db.r(|s| s.leads(Some("t"))).await;
        assert_eq!(leads.iter().map(|l| l.member_id.clone()).collect::<Vec<_>>(), [Some(s("mbr_into"))], "{k}");
        assert!(db.r(|s| s.member_detail("mbr_from", 10)).await.is_none(), "{k}");
        assert_eq!(db.r(|s| s.members_by_email("x@example.com")).await, vec![into.clone()], "{k}");
        answers.push((k, after));
    }
    alike("merge", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_search_matches_ids_customer_and_subscription_ids_exactly_and_emails_and_names_in_part_literally() {
    let members = [
        member("mbr_01", "t", Some("ann@example.com"), Some("Ann Smith"), 1),
        member("mbr_02", "t", Some("bob@Example.org"), Some("Émile Zola"), 2),
        member("mbr_03", "t", Some("100%_real@example.com"), Some("Percent"), 3),
        member("mbr_04", "u", Some("ann@other.com"), Some("Annie"), 4),
        member("mbr_05", "t", Some("carl@example.com"), None, 5),
        member("mbr_06", "t", Some("x1yz@example.com"), Some("back\\slash"), 6),
        member("mbr_07", "u", None, Some("ÅSA ÖBERG"), 7),
    ];
    /// (tenant, q, before, limit, the ids expected).
    type Search<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, usize, Vec<&'a str>);
    let queries: Vec<Search> = vec![
        (None, None, None, 100, vec!["mbr_07", "mbr_06", "mbr_05", "mbr_04", "mbr_03", "mbr_02", "mbr_01"]),
        (None, Some("   "), None, 100, vec!["mbr_07", "mbr_06", "mbr_05", "mbr_04", "mbr_03", "mbr_02", "mbr_01"]),
        (None, Some("mbr_03"), None, 100, vec!["mbr_03"]),
        (None, Some("  mbr_03 "), None, 100, vec!["mbr_03"]),
        (None, Some("mbr_0"), None, 100, vec![]),
        (Some("t"), Some("EXAMPLE.COM"), None, 100, vec!["mbr_06", "mbr_05", "mbr_03", "mbr_01"]),
        (None, Some("ann"), None, 100, vec!["mbr_04", "mbr_01"]),
        (Some("u"), Some("ann"), None, 100, vec!["mbr_04"]),
        (Some("t"), Some("ann"), None, 100, vec!["mbr_01"]),
        (None, Some("SMITH"), None, 100, vec!["mbr_01"]),
        (None, Some("émile"), None, 100, vec!["mbr_02"]),
        (None, Some("ÉMILE zo"), None, 100, vec!["mbr_02"]),
        (None, Some("åsa ö"), None, 100, vec!["mbr_07"]),
        (None, Some("cus_55"), None, 100, vec!["mbr_05"]),
        (None, Some("cus_5"), None, 100, vec![]),
        (None, Some("sub_77"), None, 100, vec!["mbr_05"]),
        (None, Some("sub_7"), None, 100, vec![]),
        (Some("u"), Some("sub_77"), None, 100, vec![]),
        (None, Some("%"), None, 100, vec!["mbr_03"]),
        (None, Some("_"), None, 100, vec!["mbr_03"]),
        (None, Some("x_y"), None, 100, vec![]),
        (None, Some("0%_r"), None, 100, vec!["mbr_03"]),
        (None, Some("\\"), None, 100, vec!["mbr_06"]),
        (None, Some("k\\s"), None, 100, vec!["mbr_06"]),
        (None, None, None, 2, vec!["mbr_07", "mbr_06"]),
        (None, None, Some("mbr_06"), 2, vec!["mbr_05", "mbr_04"]),
        (None, None, Some("mbr_04"), 100, vec!["mbr_03", "mbr_02", "mbr_01"]),
        (Some("t"), None, Some("mbr_05"), 2, vec!["mbr_03", "mbr_02"]),
        (Some("t"), Some("example"), Some("mbr_05"), 100, vec!["mbr_03", "mbr_02", "mbr_01"]),
        (None, None, Some("mbr_01"), 100, vec![]),
    ];
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let ms = members.to_vec();
        db.w(move |tx| {
            for m in &ms {
                tx.save_member(m)?;
            }
            tx.link_customer("t", "stripe", "cus_55", "mbr_05")?;
            tx.save_membership(&membership("ms_5", "t", "mbr_05", "stripe", "sub:sub_77"))
        })
        .await;
        let mut got_all = Vec::new();
        for (tenant, q, before, limit, want) in &queries {
            let (t2, q2, b2, l2) = (tenant.map(String::from), q.map(String::from), before.map(String::from), *limit);
            let got = db.r(move |s| s.search_members(t2.as_deref(), q2.as_deref(), b2.as_deref(), l2)).await;
            assert_eq!(ids(&got), *want, "{k}: search {tenant:?} {q:?} before {before:?} limit {limit}");
            // Whole rows.
            for m in &got {
                assert_eq!(Some(m), members.iter().find(|x| x.id == m.id), "{k}");
            }
            got_all.push(ids(&got));
        }
        answers.push((k, got_all));
    }
    alike("search_members", &answers);
}

// ---------------------------------------------------------------------------------------
// 3. Memberships
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberships_round_trip_every_field_on_insert_and_update() {
    let first = MembershipRow {
        product_id: Some("prod_a".into()),
        plan_id: Some("plan_1".into()),
        status: Some("past_due".into()),
        state: MState::PastDue,
        period_end: Some(at(1000)),
        grace_until: Some(at(1100)),
        access_until: Some(at(1200)),
        cancel_at_period_end: true,
        access_levels: vec!["pro".into(), "chat".into()],
        flags: vec!["manual_review".into()],
        last_event_at: Some(at(900)),
        last_event_id: Some("evt_9".into()),
        last_reconciled_at: Some(at(950)),
        sync_status: SyncState::DriftUnresolved,
        created_at: at(100),
        updated_at: at(900),
        last_event_rank: 7,
        ..membership("ms_1", "t", "mbr_1", "stripe", "sub:1")
    };
    // Every field that may change changes; id, tenant, provider, key and created_at stay.
    let second = MembershipRow {
        member_id: "mbr_2".into(),
        subscription_id: Some("sub_other".into()),
        product_id: None,
        plan_id: Some("plan_2".into()),
        status: None,
        state: MState::Canceling,
        period_end: None,
        grace_until: None,
        access_until: None,
        cancel_at_period_end: false,
        access_levels: vec![],
        flags: vec!["a".into(), "b".into(), "c".into()],
        last_event_at: None,
        last_event_id: None,
        last_reconciled_at: None,
        sync_status: SyncState::InSync,
        updated_at: at(2000),
        last_event_rank: -3,
        ..first.clone()
    };
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let (a, b) = (first.clone(), second.clone());
        let got = db
            .w(move |tx| {
                tx.save_member(&member("mbr_1", "t", None, None, 0))?;
                tx.save_member(&member("mbr_2", "t", None, None, 0))?;
                tx.save_membership(&a)?;
                let one = tx.membership("ms_1")?;
                tx.save_membership(&MembershipRow {
                    tenant: "moved".into(),
                    provider: "whop".into(),
                    key: "sub:moved".into(),
                    created_at: at(5000),
                    ..b
                })?;
                Ok((one, tx.membership("ms_1")?))
            })
            .await;
        assert_eq!(got.0.as_ref(), Some(&first), "{k}: inserted");
        assert_eq!(got.1.as_ref(), Some(&second), "{k}: updated");
        let by_key = db
            .w(|tx| {
                Ok((
                    tx.membership_by_key("t", "stripe", "sub:1")?,
                    tx.membership_by_key("t", "stripe", "sub:moved")?,
                    tx.membership_by_key("u", "stripe", "sub:1")?,
                    tx.membership_by_key("t", "whop", "sub:1")?,
                    tx.membership("ms_none")?,
                ))
            })
            .await;
        assert_eq!(by_key, (Some(second.clone()), None, None, None, None), "{k}");

        // Every state and sync status is read back as written.
        let rows: Vec<MembershipRow> = MState::ALL
            .iter()
            .enumerate()
            .map(|(i, &state)| MembershipRow {
                state,
                sync_status: SyncState::ALL[i % SyncState::ALL.len()],
                created_at: at(10 - i as i64 / 3),
                ..membership(&format!("ms_s{}", 9 - i), "t", "mbr_1", "stripe", &format!("product:p{i}"))
            })
            .collect();
        let r2 = rows.clone();
        let of = db
            .w(move |tx| {
                for r in &r2 {
                    tx.save_membership(r)?;
                }
                tx.memberships_of("mbr_1")
            })
            .await;
        // Oldest first, then by id.
        let mut want = rows.clone();
        want.sort_by(|x, y| (x.created_at, &x.id).cmp(&(y.created_at, &y.id)));
        assert_eq!(of, want, "{k}");
        assert_eq!(db.w(|tx| tx.memberships_of("mbr_2")).await, vec![second.clone()], "{k}");
        assert!(db.w(|tx| tx.memberships_of("mbr_none")).await.is_empty(), "{k}");
        answers.push((k, of));
    }
    alike("memberships", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_detail_shows_memberships_timers_recent_events_without_bodies_and_sync_rows() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let ann = member("mbr_ann", "t", Some("ann@example.com"), None, 0);
        let a2 = ann.clone();
        let (ms1, ms2) = (
            MembershipRow { created_at: at(1), ..membership("ms_1", "t", "mbr_ann", "stripe", "sub:1") },
            MembershipRow { created_at: at(2), ..membership("ms_2", "t", "mbr_ann", "whop", "sub:2") },
        );
        let (m1, m2) = (ms1.clone(), ms2.clone());
        db.w(move |tx| {
            tx.save_member(&a2)?;
            tx.save_member(&member("mbr_bob", "t", None, None, 0))?;
            tx.save_membership(&m1)?;
            tx.save_membership(&m2)?;
            tx.save_membership(&membership("ms_bob", "t", "mbr_bob", "stripe", "sub:3"))?;
            tx.set_timer(&timer("ms_1", "grace_end", 500, "e1"))?;
            tx.set_timer(&timer("ms_1", "access_end", 300, "e1"))?;
            tx.set_timer(&timer("ms_2", "trial_end", 100, "e2"))?;
            tx.set_timer(&timer("ms_bob", "trial_end", 100, "e3"))
        })
        .await;
        let stored = insert(
            &db,
            vec![
                EventRow {
                    member_id: Some("mbr_ann".into()),
                    membership_id: Some("ms_1".into()),
                    received_at: at(40),
                    ..event("t", "stripe", "e1")
                },
                EventRow {
                    member_id: Some("mbr_ann".into()),
                    membership_id: Some("ms_1".into()),
                    received_at: at(70),
                    ..event("t", "stripe", "e2")
                },
                EventRow {
                    member_id: Some("mbr_ann".into()),
                    membership_id: Some("ms_1".into()),
                    received_at: at(90),
                    source: Source::Timer,
                    ..event("t", "stripe", "e3")
                },
                EventRow {
                    member_id: Some("mbr_bob".into()),
                    membership_id: Some("ms_bob".into()),
                    received_at: at(95),
                    ..event("t", "stripe", "e4")
                },
                EventRow {
                    member_id: Some("mbr_ann".into()),
                    membership_id: Some("ms_2".into()),
                    received_at: at(20),
                    source: Source::Reconcile,
                    ..event("t", "whop", "e5")
                },
            ],
        )
        .await;
        db.w(|tx| {
            tx.record_sync(&SyncRecord {
                reconciled_at: Some(at(60)),
                detail: Some("plan differed".into()),
                drift: Some((at(60), "plan_1 -> plan_2".into())),
                ..sync("ms_1", SyncState::DriftCorrected, 60)
            })
        })
        .await;
        let d = db.r(|s| s.member_detail("mbr_ann", 3)).await.unwrap_or_else(|| panic!("{k}: no detail"));
        assert_eq!(d.member, ann, "{k}");
        let ms1 =
            MembershipRow { sync_status: SyncState::DriftCorrected, last_reconciled_at: Some(at(60)), ..ms1.clone() };
        assert_eq!(d.memberships, vec![ms1.clone(), ms2.clone()], "{k}");
        let want_events: Vec<EventRow> = [&stored[4], &stored[2], &stored[1]].into_iter().map(light).collect();
        assert_eq!(views(&d.recent_events), views(&want_events), "{k}");
        assert_eq!(
            d.timers,
            vec![
                timer("ms_1", "access_end", 300, "e1"),
                timer("ms_1", "grace_end", 500, "e1"),
                timer("ms_2", "trial_end", 100, "e2")
            ],
            "{k}"
        );
        assert_eq!(
            d.sync,
            vec![
                SyncRow {
                    membership_id: "ms_1".into(),
                    attempted_at: Some(at(60)),
                    detail: Some("plan differed".into()),
                    drift_at: Some(at(60)),
                    drift: Some("plan_1 -> plan_2".into()),
                    last_error: None,
                    last_error_at: None,
                    // The newest webhook about it: not the timer event.
                    last_webhook_at: Some(at(70)),
                },
                SyncRow { membership_id: "ms_2".into(), ..Default::default() },
            ],
            "{k}"
        );
        assert!(db.r(|s| s.member_detail("mbr_none", 3)).await.is_none(), "{k}");
        let all = db.r(|s| s.member_detail("mbr_ann", 100)).await.unwrap();
        assert_eq!(seqs(&all.recent_events), [stored[4].seq, stored[2].seq, stored[1].seq, stored[0].seq], "{k}");

        // Replay's comparison reads the same members in one go.
        let with = db.r(|s| s.members_with_memberships(&["mbr_none".into(), "mbr_ann".into(), "mbr_bob".into()])).await;
        assert_eq!(with.iter().map(|m| m.member.id.clone()).collect::<Vec<_>>(), ["mbr_ann", "mbr_bob"], "{k}");
        assert_eq!(with[0].memberships, vec![ms1, ms2], "{k}");
        assert_eq!(with[0].timers, d.timers, "{k}");
        assert!(with[0].customers.is_empty(), "{k}");
        answers.push((k, format!("{d:?}")));
    }
    alike("member_detail", &answers);
}

// ---------------------------------------------------------------------------------------
// 4. Timers
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_are_upserted_cancelled_and_fire_oldest_first_only_at_their_exact_due_time() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        assert_eq!(db.r(|s| s.next_timer()).await, None, "{k}");
        db.w(|tx| {
            tx.save_member(&member("mbr_1", "t", None, None, 0))?;
            for id in ["ms_a", "ms_b", "ms_c"] {
                tx.save_membership(&membership(id, "t", "mbr_1", "stripe", &format!("sub:{id}")))?;
            }
            tx.set_timer(&timer("ms_b", "grace_end", 100, "e1"))?;
            // A second set moves it.
            tx.set_timer(&timer("ms_b", "grace_end", 200, "e2"))?;
            tx.set_timer(&timer("ms_b", "trial_end", 50, "e1"))?;
            tx.set_timer(&timer("ms_c", "b_timer", 150, "e3"))?;
            tx.set_timer(&timer("ms_c", "a_timer", 150, "e3"))?;
            tx.set_timer(&timer("ms_a", "z_timer", 150, "e4"))
        })
        .await;
        let of_b = db.w(|tx| tx.timers_of("ms_b")).await;
        assert_eq!(of_b, vec![timer("ms_b", "trial_end", 50, "e1"), timer("ms_b", "grace_end", 200, "e2")], "{k}");
        assert_eq!(db.r(|s| s.next_timer()).await, Some(at(50)), "{k}");
        let want_due = vec![
            timer("ms_b", "trial_end", 50, "e1"),
            timer("ms_a", "z_timer", 150, "e4"),
            timer("ms_c", "a_timer", 150, "e3"),
            timer("ms_c", "b_timer", 150, "e3"),
        ];
        assert_eq!(db.r(|s| s.due_timers(at(150), 10)).await, want_due, "{k}");
        assert_eq!(db.r(|s| s.due_timers(at(150), 2)).await, want_due[..2], "{k}");
        assert_eq!(db.r(|s| s.due_timers(at(149), 10)).await, want_due[..1], "{k}");
        assert!(db.r(|s| s.due_timers(at(49), 10)).await.is_empty(), "{k}");
        assert_eq!(db.w(|tx| tx.due_timers_tx(at(150), 10)).await, want_due, "{k}");
        assert_eq!(db.w(|tx| tx.due_timers_tx(at(150), 3)).await, want_due[..3], "{k}");
        assert_eq!(db.w(|tx| tx.due_timers_tx(at(500), 100)).await.len(), 5, "{k}");

        // Deleted only at the due time it has now.
        let deleted = db
            .w(|tx| {
                Ok([
                    tx.delete_timer_if_due("ms_b", "grace_end", at(100))?,
                    tx.delete_timer_if_due("ms_b", "grace_end", at(201))?,
                    tx.delete_timer_if_due("ms_a", "grace_end", at(200))?,
                    tx.delete_timer_if_due("ms_b", "grace_end", at(200))?,
                    tx.delete_timer_if_due("ms_b", "grace_end", at(200))?,
                ])
            })
            .await;
        assert_eq!(deleted, [false, false, false, true, false], "{k}");
        db.w(|tx| {
            tx.cancel_timer("ms_b", "trial_end")?;
            tx.cancel_timer("ms_b", "never_set")?;
            tx.cancel_timer("ms_none", "trial_end")
        })
        .await;
        assert!(db.w(|tx| tx.timers_of("ms_b")).await.is_empty(), "{k}");
        assert_eq!(db.r(|s| s.next_timer()).await, Some(at(150)), "{k}");
        let of_c = db.w(|tx| tx.timers_of("ms_c")).await;
        assert_eq!(of_c, want_due[2..], "{k}");
        answers.push((k, of_c));
    }
    alike("timers", &answers);
}

// ---------------------------------------------------------------------------------------
// 5. Leads
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leads_are_updated_by_a_second_capture_until_they_convert_and_stay_converted() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        db.w(|tx| {
            tx.capture_lead(&lead("t", "Ann@Example.com", Some("Ann"), "stripe", "e1", 10))?;
            tx.capture_lead(&lead("u", "ann@example.com", Some("Ann U"), "stripe", "e9", 15))
        })
        .await;
        let first = lead("t", "Ann@Example.com", Some("Ann"), "stripe", "e1", 10);
        assert_eq!(db.r(|s| s.leads(Some("t"))).await, vec![first.clone()], "{k}");
        // Same email in another case: name, provider, event and time change; the email as first written stays.
        db.w(|tx| tx.capture_lead(&lead("t", "ann@EXAMPLE.com", Some("Annie"), "whop", "e2", 20))).await;
        let second = LeadRow {
            name: Some("Annie".into()),
            provider: "whop".into(),
            event_id: "e2".into(),
            captured_at: at(20),
            ..first.clone()
        };
        assert_eq!(db.r(|s| s.leads(Some("t"))).await, vec![second.clone()], "{k}");
        // No name this time: the one known is kept.
        db.w(|tx| tx.capture_lead(&lead("t", "ANN@example.com", None, "stripe", "e3", 25))).await;
        let third = LeadRow { provider: "stripe".into(), event_id: "e3".into(), captured_at: at(25), ..second.clone() };
        assert_eq!(db.r(|s| s.leads(Some("t"))).await, vec![third.clone()], "{k}");

        db.w(|tx| {
            tx.convert_lead("t", "aNN@example.COM", "mbr_1", at(30))?;
            tx.convert_lead("t", "nobody@example.com", "mbr_x", at(30))
        })
        .await;
        let converted = LeadRow { converted_at: Some(at(30)), member_id: Some("mbr_1".into()), ..third.clone() };
        assert_eq!(db.r(|s| s.leads(Some("t"))).await, vec![converted.clone()], "{k}");
        // Neither a later capture nor a second conversion changes a converted lead.
        db.w(|tx| {
            tx.capture_lead(&lead("t", "ann@example.com", Some("Late"), "whop", "e4", 40))?;
            tx.convert_lead("t", "ann@example.com", "mbr_2", at(50))
        })
        .await;
        assert_eq!(db.r(|s| s.leads(Some("t"))).await, vec![converted.clone()], "{k}");
        let other = lead("u", "ann@example.com", Some("Ann U"), "stripe", "e9", 15);
        assert_eq!(db.r(|s| s.leads(Some("u"))).await, vec![other.clone()], "{k}");
        // Every tenant's, newest capture first.
        let all = db.r(|s| s.leads(None)).await;
        assert_eq!(all, vec![converted, other], "{k}");
        assert!(db.r(|s| s.leads(Some("nobody"))).await.is_empty(), "{k}");
        answers.push((k, all));
    }
    alike("leads", &answers);
}

// ---------------------------------------------------------------------------------------
// 6. Payments
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_keeps_its_first_membership_and_the_first_event_that_counted_it() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let got = db
            .w(|tx| {
                tx.save_member(&member("mbr_1", "t", None, None, 0))?;
                tx.save_membership(&membership("ms_1", "t", "mbr_1", "stripe", "sub:1"))?;
                tx.save_membership(&membership("ms_2", "t", "mbr_1", "stripe", "sub:2"))?;
                let mut seen = vec![tx.payment("t", "stripe", "invoice:1")?];
                tx.link_payment("t", "stripe", "invoice:1", "ms_1", "evt_a", false)?;
                seen.push(tx.payment("t", "stripe", "invoice:1")?);
                tx.link_payment("t", "stripe", "invoice:1", "ms_2", "evt_b", true)?;
                seen.push(tx.payment("t", "stripe", "invoice:1")?);
                tx.link_payment("t", "stripe", "invoice:1", "ms_2", "evt_c", true)?;
                seen.push(tx.payment("t", "stripe", "invoice:1")?);
                tx.link_payment("t", "stripe", "charge:9", "ms_2", "evt_d", true)?;
                seen.push(tx.payment("t", "stripe", "charge:9")?);
                seen.push(tx.payment("u", "stripe", "invoice:1")?);
                seen.push(tx.payment("t", "whop", "invoice:1")?);
                Ok(seen)
            })
            .await;
        let link = |ms: &str, ev: &str, counted: Option<&str>| {
            Some(PaymentLink { membership_id: ms.into(), event_id: ev.into(), counted_by: counted.map(Into::into) })
        };
        assert_eq!(
            got,
            vec![
                None,
                link("ms_1", "evt_a", None),
                link("ms_1", "evt_a", Some("evt_b")),
                link("ms_1", "evt_a", Some("evt_b")),
                link("ms_2", "evt_d", Some("evt_d")),
                None,
                None,
            ],
            "{k}"
        );
        // Read again in a later transaction: committed as seen.
        let later = db.w(|tx| tx.payment("t", "stripe", "invoice:1")).await;
        assert_eq!(later, link("ms_1", "evt_a", Some("evt_b")), "{k}");
        answers.push((k, got));
    }
    alike("payments", &answers);
}

// ---------------------------------------------------------------------------------------
// 7. Parked events
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_are_those_under_the_key_and_those_naming_the_member_oldest_first_once_each() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        db.w(|tx| {
            tx.save_member(&member("mbr_ada", "t", Some("Ada@Example.com"), None, 0))?;
            tx.save_member(&member("mbr_bob", "t", Some("bob@example.com"), None, 0))?;
            tx.save_member(&member("mbr_ada_u", "u", Some("ada@example.com"), None, 0))?;
            tx.link_customer("t", "stripe", "cus_ada", "mbr_ada")?;
            tx.link_customer("t", "whop", "cus_ada_w", "mbr_ada")?;
            tx.link_customer("t", "stripe", "cus_bob", "mbr_bob")?;
            tx.link_customer("u", "stripe", "cus_ada", "mbr_ada_u")?;
            tx.save_membership(&membership("msp_ada", "t", "mbr_ada", "stripe", "sub:ada"))?;
            tx.save_membership(&membership("msp_bob", "t", "mbr_bob", "stripe", "sub:bob"))
        })
        .await;
        let p = parked_event;
        let stored = insert(
            &db,
            vec![
                p("t", "stripe", "evt_key", "sub:ada", None, None, 300),
                p("t", "stripe", "evt_by_customer", "", Some("cus_ada"), None, 100),
                p("t", "stripe", "evt_by_email", "", None, Some("ADA@example.COM"), 200),
                p("t", "stripe", "evt_both", "", Some("cus_ada"), Some("ada@example.com"), 100),
                p("t", "stripe", "evt_early", "", Some("cus_ada"), None, 50),
                // Not Ada's: another member, Ada's customer id at another provider, another
                // key, another tenant, another provider, not parked, or a non-ASCII case fold.
                p("t", "stripe", "evt_bob", "", Some("cus_bob"), Some("bob@example.com"), 10),
                p("t", "stripe", "evt_other_provider_id", "", Some("cus_ada_w"), None, 10),
                p("t", "stripe", "evt_nobody", "", None, None, 10),
                p("t", "stripe", "evt_other_key", "sub:bob", Some("cus_ada"), None, 10),
                p("u", "stripe", "evt_other_tenant", "", Some("cus_ada"), Some("ada@example.com"), 10),
                p("t", "whop", "evt_other_provider", "", Some("cus_ada_w"), Some("ada@example.com"), 10),
                EventRow { park_key: None, ..p("t", "stripe", "evt_not_parked", "", Some("cus_ada"), None, 10) },
                p("t", "stripe", "evt_other_email", "", None, Some("ada@example.org"), 10),
            ],
        )
        .await;
        let by_id = |id: &str| stored.iter().find(|e| e.event_id == id).unwrap().clone();
        let got = db.w(|tx| tx.parked("t", "stripe", "sub:ada", "msp_ada")).await;
        let want: Vec<EventRow> =
            ["evt_early", "evt_by_customer", "evt_both", "evt_by_email", "evt_key"].into_iter().map(by_id).collect();
        assert_eq!(views(&got), views(&want), "{k}");
        // Under another key, only those naming the member.
        let got2 = db.w(|tx| tx.parked("t", "stripe", "sub:none", "msp_ada")).await;
        assert_eq!(seqs(&got2), seqs(&want[..4]), "{k}");
        // Bob's membership: his events by customer or email, and those under his key.
        let bob = db.w(|tx| tx.parked("t", "stripe", "sub:bob", "msp_bob")).await;
        assert_eq!(seqs(&bob), seqs(&[by_id("evt_bob"), by_id("evt_other_key")]), "{k}");
        // The other tenant's member finds its own.
        let other = db.w(|tx| tx.parked("u", "stripe", "sub:x", "msp_none")).await;
        assert!(other.is_empty(), "{k}: {:?}", seqs(&other));
        // An event marked replayed is parked no more.
        let s = by_id("evt_by_email").seq;
        db.w(move |tx| tx.mark_replayed(s, "ran")).await;
        let after = db.w(|tx| tx.parked("t", "stripe", "sub:ada", "msp_ada")).await;
        assert_eq!(seqs(&after), seqs(&[&want[..3], &want[4..]].concat()), "{k}");
        // `park_key` filter of events_where reads the same rows under a key.
        let under =
            db.r(|s| s.events_where(&EventFilter { park_key: Some("sub:ada".into()), ..Default::default() })).await;
        assert_eq!(seqs(&under), [by_id("evt_key").seq], "{k}");
        answers.push((k, (views(&got), seqs(&bob))));
    }
    alike("parked", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_identity_changes_exactly_when_the_parked_search_for_the_member_may_change() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let ids = db
            .w(|tx| {
                tx.save_member(&member("mbr_ada", "t", Some("Ada@Example.com"), None, 0))?;
                tx.save_member(&member("mbr_bob", "t", Some("bob@example.com"), None, 0))?;
                tx.link_customer("t", "stripe", "cus_ada", "mbr_ada")?;
                tx.save_membership(&membership("msp_ada", "t", "mbr_ada", "stripe", "sub:ada"))?;
                let mut ids = vec![tx.parked_identity("t", "stripe", "msp_ada")?];
                // A customer id at another provider, or another member's: the same.
                tx.link_customer("t", "whop", "cus_ada_w", "mbr_ada")?;
                tx.link_customer("t", "stripe", "cus_bob", "mbr_bob")?;
                ids.push(tx.parked_identity("t", "stripe", "msp_ada")?);
                // The same email in another ASCII case: the same search, the same value.
                tx.save_member(&member("mbr_ada", "t", Some("ADA@example.COM"), None, 0))?;
                ids.push(tx.parked_identity("t", "stripe", "msp_ada")?);
                // A customer id at this provider: another.
                tx.link_customer("t", "stripe", "cus_ada_2", "mbr_ada")?;
                ids.push(tx.parked_identity("t", "stripe", "msp_ada")?);
                // Another email: another.
                tx.save_member(&member("mbr_ada", "t", Some("ada@example.org"), None, 0))?;
                ids.push(tx.parked_identity("t", "stripe", "msp_ada")?);
                // No email: another.
                tx.save_member(&member("mbr_ada", "t", None, None, 0))?;
                ids.push(tx.parked_identity("t", "stripe", "msp_ada")?);
                // Another member: another.
                tx.save_membership(&membership("msp_ada", "t", "mbr_bob", "stripe", "sub:ada"))?;
                ids.push(tx.parked_identity("t", "stripe", "msp_ada")?);
                // No such membership.
                ids.push(tx.parked_identity("t", "stripe", "msp_none")?);
                Ok(ids)
            })
            .await;
        assert_eq!(ids[0], ids[1], "{k}");
        assert_eq!(ids[1], ids[2], "{k}");
        for w in ids[2..7].windows(2) {
            assert_ne!(w[0], w[1], "{k}: {ids:?}");
        }
        assert_eq!(ids[7], "", "{k}");
        answers.push((k, ids));
    }
    alike("parked_identity", &answers);
}

/// The search folds ASCII case only (as SQLite's `lower` and the parked-event indexes do):
/// an email that differs only in the case of a non-ASCII letter names someone else, so
/// changing the member's email that way changes both the search and its identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_search_and_identity_fold_ascii_case_only() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let seq = db
            .w(|tx| {
                tx.save_member(&member("mbr_e", "t", Some("élise@example.com"), None, 0))?;
                tx.save_membership(&membership("msp_e", "t", "mbr_e", "stripe", "sub:e"))?;
                tx.insert_event(&parked_event("t", "stripe", "evt_upper", "", None, Some("ÉLISE@EXAMPLE.com"), 1))
            })
            .await;
        let got = db
            .w(|tx| {
                let before = (tx.parked("t", "stripe", "sub:e", "msp_e")?, tx.parked_identity("t", "stripe", "msp_e")?);
                tx.save_member(&member("mbr_e", "t", Some("ÉLISE@example.com"), None, 0))?;
                let after = (tx.parked("t", "stripe", "sub:e", "msp_e")?, tx.parked_identity("t", "stripe", "msp_e")?);
                Ok((before, after))
            })
            .await;
        let ((before, id_before), (after, id_after)) = got;
        assert!(before.is_empty(), "{k}: {:?}", seqs(&before));
        assert_eq!(seqs(&after), [seq], "{k}");
        assert_ne!(id_before, id_after, "{k}: the parked search changed, its identity did not");
        answers.push((k, (id_before, id_after)));
    }
    alike("parked identity (non-ASCII)", &answers);
}

// ---------------------------------------------------------------------------------------
// 8. Reconciliation
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_a_sync_touches_only_sync_columns_and_keeps_earlier_drift_and_errors() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        let ms =
            MembershipRow { product_id: Some("prod".into()), ..membership("ms_1", "t", "mbr_1", "stripe", "sub:1") };
        let m2 = ms.clone();
        db.w(move |tx| {
            tx.save_member(&member("mbr_1", "t", None, None, 0))?;
            tx.save_membership(&m2)
        })
        .await;
        // A webhook applied meanwhile: its state is kept by the sync record after it.
        let webhook = MembershipRow {
            state: MState::Canceled,
            status: Some("canceled".into()),
            last_event_id: Some("evt_w".into()),
            updated_at: at(70),
            ..ms.clone()
        };
        let w2 = webhook.clone();
        let row = db
            .w(move |tx| {
                tx.save_membership(&w2)?;
                tx.record_sync(&SyncRecord {
                    reconciled_at: Some(at(80)),
                    detail: Some("plan differed".into()),
                    drift: Some((at(80), "plan a -> b".into())),
                    ..sync("ms_1", SyncState::DriftCorrected, 80)
                })?;
                tx.membership("ms_1")
            })
            .await;
        let synced = MembershipRow {
            sync_status: SyncState::DriftCorrected,
            last_reconciled_at: Some(at(80)),
            ..webhook.clone()
        };
        assert_eq!(row, Some(synced.clone()), "{k}");
        let detail = |db: &Db| {
            let s = db.s.clone();
            async move { store::read(&s, |s| s.member_detail("mbr_1", 0)).await.unwrap().unwrap().sync }
        };
        let first = SyncRow {
            membership_id: "ms_1".into(),
            attempted_at: Some(at(80)),
            detail: Some("plan differed".into()),
            drift_at: Some(at(80)),
            drift: Some("plan a -> b".into()),
            ..Default::default()
        };
        assert_eq!(detail(&db).await, vec![first.clone()], "{k}");

        // The provider cannot be read: the error is noted, the drift kept, the last
        // reconciliation time kept, the detail replaced.
        let row = db
            .w(|tx| {
                tx.record_sync(&SyncRecord {
                    error: Some((at(90), "HTTP 503".into())),
                    ..sync("ms_1", SyncState::ProviderUnreachable, 90)
                })?;
                tx.membership("ms_1")
            })
            .await;
        assert_eq!(row, Some(MembershipRow { sync_status: SyncState::ProviderUnreachable, ..synced.clone() }), "{k}");
        let second = SyncRow {
            attempted_at: Some(at(90)),
            detail: None,
            last_error: Some("HTTP 503".into()),
            last_error_at: Some(at(90)),
            ..first.clone()
        };
        assert_eq!(detail(&db).await, vec![second.clone()], "{k}");
        // In sync again: drift and error stay as they were.
        let row = db
            .w(|tx| {
                tx.record_sync(&SyncRecord {
                    reconciled_at: Some(at(100)),
                    detail: Some("in sync".into()),
                    ..sync("ms_1", SyncState::InSync, 100)
                })?;
                tx.membership("ms_1")
            })
            .await;
        assert_eq!(
            row,
            Some(MembershipRow { sync_status: SyncState::InSync, last_reconciled_at: Some(at(100)), ..synced.clone() }),
            "{k}"
        );
        let third = SyncRow { attempted_at: Some(at(100)), detail: Some("in sync".into()), ..second.clone() };
        let got = detail(&db).await;
        assert_eq!(got, vec![third], "{k}");
        answers.push((k, got));
    }
    alike("record_sync", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconcile_queue_puts_never_asked_first_then_least_recently_asked_of_its_targets() {
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        db.w(|tx| {
            tx.save_member(&member("mbr_1", "t", None, None, 0))?;
            tx.save_member(&member("mbr_u", "u", None, None, 0))?;
            for id in ["ms_b", "ms_a", "ms_c", "ms_d", "ms_e"] {
                tx.save_membership(&membership(id, "t", "mbr_1", "stripe", &format!("sub:{id}")))?;
            }
            tx.save_membership(&membership("ms_w", "t", "mbr_1", "whop", "sub:w"))?;
            tx.save_membership(&membership("ms_u", "u", "mbr_u", "stripe", "sub:u"))?;
            tx.save_membership(&membership("ms_0", "u", "mbr_u", "whop", "sub:0"))?;
            tx.record_sync(&SyncRecord { reconciled_at: Some(at(100)), ..sync("ms_a", SyncState::InSync, 100) })?;
            tx.record_sync(&sync("ms_b", SyncState::ProviderUnreachable, 50))?;
            tx.record_sync(&SyncRecord {
                reconciled_at: Some(at(300)),
                ..sync("ms_c", SyncState::DriftCorrected, 300)
            })?;
            tx.record_sync(&SyncRecord {
                reconciled_at: Some(at(199)),
                ..sync("ms_w", SyncState::DriftUnresolved, 199)
            })
        })
        .await;
        let q = |targets: &[(&str, &str)], before: i64, limit: usize| {
            let s = db.s.clone();
            let targets: Vec<(String, String)> = targets.iter().map(|(t, p)| (t.to_string(), p.to_string())).collect();
            async move {
                store::read(&s, move |s| s.reconcile_queue(&targets, at(before), limit))
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|m| m.id)
                    .collect::<Vec<_>>()
            }
        };
        let ts = [("t", "stripe")];
        assert_eq!(q(&ts, 200, 10).await, ["ms_d", "ms_e", "ms_b", "ms_a"], "{k}");
        assert_eq!(q(&ts, 200, 3).await, ["ms_d", "ms_e", "ms_b"], "{k}");
        assert_eq!(q(&ts, 100, 10).await, ["ms_d", "ms_e", "ms_b"], "{k}");
        assert_eq!(q(&ts, 301, 10).await, ["ms_d", "ms_e", "ms_b", "ms_a", "ms_c"], "{k}");
        assert_eq!(
            q(&[("t", "stripe"), ("u", "stripe")], 200, 10).await,
            ["ms_d", "ms_e", "ms_u", "ms_b", "ms_a"],
            "{k}"
        );
        assert_eq!(q(&[("t", "whop"), ("u", "whop")], 200, 10).await, ["ms_0", "ms_w"], "{k}");
        assert_eq!(q(&[("t", "whop")], 199, 10).await, Vec::<String>::new(), "{k}");
        assert_eq!(q(&[("u", "paddle")], 200, 10).await, Vec::<String>::new(), "{k}");
        assert_eq!(q(&[], 200, 10).await, Vec::<String>::new(), "{k}");
        // Whole rows.
        let s = db.s.clone();
        let rows = store::read(&s, |s| s.reconcile_queue(&[("t".into(), "stripe".into())], at(200), 10)).await.unwrap();
        let a = db.w(|tx| tx.membership("ms_a")).await.unwrap();
        assert_eq!(rows[3], a, "{k}");
        assert_eq!((a.sync_status, a.last_reconciled_at), (SyncState::InSync, Some(at(100))), "{k}");

        let counts = db.r(|s| s.sync_status_counts()).await;
        let want: Vec<(String, i64)> = vec![
            ("drift_corrected".into(), 1),
            ("drift_unresolved".into(), 1),
            ("in_sync".into(), 1),
            ("never_reconciled".into(), 4),
            ("provider_unreachable".into(), 1),
        ];
        assert_eq!(counts, want, "{k}");
        answers.push((k, q(&[("t", "stripe"), ("u", "stripe"), ("t", "whop")], 1000, 100).await));
    }
    alike("reconcile_queue", &answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_from_tells_whether_an_applied_event_of_a_source_reached_the_membership() {
    for db in stores() {
        let k = db.kind;
        insert(
            &db,
            vec![
                EventRow {
                    membership_id: Some("ms_1".into()),
                    source: Source::Reconcile,
                    ..event("t", "stripe", "e1")
                },
                EventRow {
                    membership_id: Some("ms_1".into()),
                    source: Source::Timer,
                    status: EventStatus::Failed,
                    ..event("t", "stripe", "e2")
                },
                EventRow { membership_id: Some("ms_2".into()), source: Source::Timer, ..event("t", "stripe", "e3") },
            ],
        )
        .await;
        let got = db
            .w(|tx| {
                Ok([
                    tx.applied_from("ms_1", Source::Reconcile)?,
                    tx.applied_from("ms_1", Source::Timer)?,
                    tx.applied_from("ms_1", Source::Webhook)?,
                    tx.applied_from("ms_2", Source::Timer)?,
                    tx.applied_from("ms_3", Source::Reconcile)?,
                ])
            })
            .await;
        assert_eq!(got, [true, false, false, true, false], "{k}");
    }
}

// ---------------------------------------------------------------------------------------
// 9. Console sessions, 10. Products
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_console_session_stays_ended_until_its_time_then_is_forgotten() {
    for db in stores() {
        let k = db.kind;
        assert!(!db.r(|s| s.console_session_ended("n1")).await, "{k}");
        db.w(|tx| tx.end_console_session("n1", at(100), at(0))).await;
        db.w(|tx| tx.end_console_session("n1", at(100), at(0))).await;
        db.w(|tx| tx.end_console_session("n2", at(300), at(50))).await;
        let seen = db
            .r(|s| Ok([s.console_session_ended("n1")?, s.console_session_ended("n2")?, s.console_session_ended("n3")?]))
            .await;
        assert_eq!(seen, [true, true, false], "{k}");
        // At 100, n1's time is over: forgotten when the next session ends.
        db.w(|tx| tx.end_console_session("n3", at(400), at(100))).await;
        let seen = db
            .r(|s| Ok([s.console_session_ended("n1")?, s.console_session_ended("n2")?, s.console_session_ended("n3")?]))
            .await;
        assert_eq!(seen, [false, true, true], "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn products_seen_counts_memberships_access_and_recent_events_per_product_and_plan_without_manual_grants() {
    let with =
        |product: Option<&str>, plan: Option<&str>| Some(stored_json(&json!({"product_id": product, "plan_id": plan})));
    let events = vec![
        EventRow { canonical: with(Some("prod_old"), None), ..event("t", "stripe", "e0") },
        EventRow { canonical: with(Some("prod_x"), Some("plan_9")), ..event("t", "stripe", "e1") },
        EventRow { canonical: with(Some("prod_a"), None), ..event("t", "stripe", "e2") },
        EventRow { canonical: None, ..event("t", "stripe", "e3") },
        EventRow { canonical: with(Some("prod_m2"), None), ..event("t", "manual", "e4") },
        EventRow { canonical: with(Some("prod_w"), None), ..event("t", "whop", "e5") },
        EventRow { canonical: with(Some("prod_x"), None), ..event("t", "stripe", "e6") },
        EventRow { canonical: with(Some("prod_u"), None), ..event("u", "stripe", "e7") },
    ];
    let p = |t: &str, pr: &str, kind: &str, id: &str, memberships: i64, holding: i64, events: i64| ProductSeen {
        tenant: t.into(),
        provider: pr.into(),
        kind: kind.into(),
        id: id.into(),
        memberships,
        holding_access: holding,
        events,
    };
    let mut answers = Vec::new();
    for db in stores() {
        let k = db.kind;
        db.w(|tx| {
            tx.save_member(&member("mbr_1", "t", None, None, 0))?;
            tx.save_member(&member("mbr_u", "u", None, None, 0))?;
            let ms =
                |id: &str, tenant: &str, m: &str, provider: &str, product: &str, plan: Option<&str>, state: MState| {
                    MembershipRow {
                        product_id: Some(product.into()),
                        plan_id: plan.map(Into::into),
                        state,
                        ..membership(id, tenant, m, provider, &format!("sub:{id}"))
                    }
                };
            tx.save_membership(&ms("ms_1", "t", "mbr_1", "stripe", "prod_a", Some("plan_1"), MState::Active))?;
            tx.save_membership(&ms("ms_2", "t", "mbr_1", "stripe", "prod_a", Some("plan_2"), MState::Canceled))?;
            tx.save_membership(&ms("ms_3", "t", "mbr_1", "stripe", "prod_b", None, MState::Trialing))?;
            tx.save_membership(&ms("ms_4", "t", "mbr_1", "stripe", "prod_a", Some("plan_1"), MState::PastDue))?;
            tx.save_membership(&ms("ms_5", "t", "mbr_1", "stripe", "prod_c", None, MState::Canceling))?;
            tx.save_membership(&ms("ms_6", "t", "mbr_1", "stripe", "prod_c", None, MState::Expired))?;
            tx.save_membership(&ms("ms_m", "t", "mbr_1", "manual", "prod_m", Some("plan_m"), MState::Active))?;
            tx.save_membership(&ms("ms_u", "u", "mbr_u", "stripe", "prod_a", None, MState::Active))
        })
        .await;
        insert(&db, events.clone()).await;
        let t_rows = |old: i64, prod_x: i64| {
            let mut v = vec![
                p("t", "stripe", "plan", "plan_1", 2, 2, 0),
                p("t", "stripe", "plan", "plan_2", 1, 0, 0),
                p("t", "stripe", "plan", "plan_9", 0, 0, 1),
                p("t", "stripe", "product", "prod_a", 3, 2, 1),
                p("t", "stripe", "product", "prod_b", 1, 1, 0),
                p("t", "stripe", "product", "prod_c", 2, 1, 0),
            ];
            if old > 0 {
                v.push(p("t", "stripe", "product", "prod_old", 0, 0, old));
            }
            v.push(p("t", "stripe", "product", "prod_x", 0, 0, prod_x));
            v.push(p("t", "whop", "product", "prod_w", 0, 0, 1));
            v
        };
        // Tenant t's newest 6 events: e1..e6 (not e0).
        let got = db.r(|s| s.products_seen(Some("t"), 6)).await;
        assert_eq!(got, t_rows(0, 2), "{k}");
        let got7 = db.r(|s| s.products_seen(Some("t"), 7)).await;
        assert_eq!(got7, t_rows(1, 2), "{k}");
        // Every tenant's, the newest event of all (u's).
        let all = db.r(|s| s.products_seen(None, 1)).await;
        let mut want: Vec<ProductSeen> = t_rows(0, 0)
            .into_iter()
            .filter(|r| r.memberships > 0)
            .map(|r| ProductSeen { events: 0, ..r })
            .chain([p("u", "stripe", "product", "prod_a", 1, 1, 0), p("u", "stripe", "product", "prod_u", 0, 0, 1)])
            .collect();
        want.sort_by(|a, b| (&a.tenant, &a.provider, &a.kind, &a.id).cmp(&(&b.tenant, &b.provider, &b.kind, &b.id)));
        assert_eq!(all, want, "{k}");
        let none = db.r(|s| s.products_seen(Some("nobody"), 100)).await;
        assert!(none.is_empty(), "{k}");
        answers.push((k, (got, got7, all)));
    }
    alike("products_seen", &answers);
}

// ---------------------------------------------------------------------------------------
// 11. The writer, 12. scratch
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_rolled_back_alone_while_its_batch_mates_commit() {
    for db in stores() {
        let k = db.kind;
        let mut tasks = Vec::new();
        for i in 0..24usize {
            let s = db.s.clone();
            tasks.push(tokio::spawn(async move {
                s.write(move |tx| {
                    let id = format!("mbr_{i:02}");
                    tx.save_member(&member(&id, "t", Some(&format!("{id}@example.com")), None, i as i64))?;
                    tx.insert_event(&EventRow {
                        member_id: Some(id.clone()),
                        ..event("t", "stripe", &format!("evt_{i:02}"))
                    })?;
                    match i {
                        // Wrote, then gave up.
                        7 => Err(store::Error::Thread(format!("job {i} gave up"))),
                        // A statement the database refuses (no such member), after writing.
                        13 => tx
                            .save_membership(&membership("ms_ghost", "t", "mbr_ghost", "stripe", "sub:ghost"))
                            .map(|_| i),
                        // The same key twice in one job.
                        19 => tx.insert_event(&event("t", "stripe", "evt_19")).map(|_| i),
                        _ => Ok(i),
                    }
                })
                .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            match i {
                7 | 13 | 19 => assert!(r.is_err(), "{k}: job {i} should have failed: {r:?}"),
                _ => assert_eq!(r.unwrap_or_else(|e| panic!("{k}: job {i} failed: {e}")), i, "{k}"),
            }
        }
        let present: Vec<(bool, bool)> = db
            .w(|tx| {
                (0..24)
                    .map(|i| {
                        Ok((
                            tx.member(&format!("mbr_{i:02}"))?.is_some(),
                            tx.event_by_key("t", "stripe", &format!("evt_{i:02}"))?.is_some(),
                        ))
                    })
                    .collect()
            })
            .await;
        for (i, p) in present.into_iter().enumerate() {
            let kept = ![7, 13, 19].contains(&i);
            assert_eq!(p, (kept, kept), "{k}: job {i}");
        }
        assert!(db.w(|tx| tx.membership("ms_ghost")).await.is_none(), "{k}");
        let n = db.r(|s| s.events(None, None, 100)).await.len();
        assert_eq!(n, 21, "{k}");
        // The writer goes on after failures.
        db.w(|tx| tx.save_member(&member("mbr_after", "t", None, None, 0))).await;
        assert!(db.r(|s| s.member("mbr_after")).await.is_some(), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_answered_only_after_it_committed_so_a_read_right_after_sees_it() {
    for db in stores() {
        let k = db.kind;
        for i in 0..20i64 {
            let id = format!("mbr_{i}");
            let m = member(&id, "t", Some(&format!("{id}@example.com")), None, i);
            let m2 = m.clone();
            let seq = db
                .w(move |tx| {
                    tx.save_member(&m2)?;
                    tx.insert_event(&EventRow { member_id: Some(m2.id.clone()), ..event("t", "stripe", &m2.id) })
                })
                .await;
            let id2 = id.clone();
            let (got, evs) = db.r(move |s| Ok((s.member(&id2)?, s.events_by_event_id(&id2)?))).await;
            assert_eq!(got, Some(m), "{k}: write {i}");
            assert_eq!(seqs(&evs), [seq], "{k}: write {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_runs_a_job_on_an_empty_store_and_nothing_reaches_the_real_one() {
    for db in stores() {
        let k = db.kind;
        let real = db
            .w(|tx| {
                tx.save_member(&member("mbr_real", "t", None, None, 0))?;
                tx.insert_event(&event("t", "stripe", "evt_real"))
            })
            .await;
        let s = db.s.clone();
        let seen = tokio::task::spawn_blocking(move || {
            let mut seen = None;
            s.scratch(Box::new(|tx| {
                let empty = (
                    tx.member("mbr_real")?.is_none(),
                    tx.last_event_seq()?,
                    tx.event_by_key("t", "stripe", "evt_real")?.is_none(),
                );
                tx.save_member(&member("mbr_scratch", "t", Some("s@example.com"), None, 0))?;
                tx.save_membership(&membership("ms_scratch", "t", "mbr_scratch", "stripe", "sub:s"))?;
                let seq = tx.insert_event(&event("t", "stripe", "evt_scratch"))?;
                tx.set_timer(&timer("ms_scratch", "trial_end", 10, "evt_scratch"))?;
                let inside = (
                    tx.member_by_email("t", "S@example.com")?.map(|m| m.id),
                    tx.event_by_key("t", "stripe", "evt_scratch")?.map(|e| e.seq),
                    tx.timers_of("ms_scratch")?.len(),
                );
                seen = Some((empty, seq, inside));
                Ok(())
            }))
            .map(|_| seen)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{k}: scratch failed: {e}"))
        .unwrap();
        let (empty, seq, inside) = seen;
        assert_eq!(empty, (true, 0, true), "{k}: the scratch store was not empty");
        assert_eq!(inside, (Some("mbr_scratch".to_string()), Some(seq), 1), "{k}");
        // Nothing of it in the real store.
        let after = db
            .w(|tx| {
                Ok((
                    tx.member("mbr_scratch")?,
                    tx.event_by_key("t", "stripe", "evt_scratch")?.is_some(),
                    tx.last_event_seq()?,
                ))
            })
            .await;
        assert_eq!(after, (None, false, real), "{k}");
        assert_eq!(db.r(|s| s.next_timer()).await, None, "{k}");
        assert!(db.r(|s| s.member("mbr_real")).await.is_some(), "{k}");
        // A job that fails: its error comes back.
        let s = db.s.clone();
        let failed =
            tokio::task::spawn_blocking(move || s.scratch(Box::new(|_| Err(store::Error::Thread("nope".into())))))
                .await
                .unwrap();
        assert!(failed.is_err(), "{k}");
    }
}

// ---------------------------------------------------------------------------------------
// Retention and erasure.
// ---------------------------------------------------------------------------------------

/// Only old deliveries from a provider lose their body: not a young one, a parked one, a
/// manual grant's or a timer's; a second prune finds nothing; the dry run counts what the
/// prune drops, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_drops_only_old_unparked_provider_bodies() {
    let mut answers = Vec::new();
    for db in stores() {
        db.w(|tx| {
            let old = |k: &str| EventRow { received_at: at(100), ..event("t", "stripe", k) };
            tx.insert_event(&old("old_webhook"))?;
            tx.insert_event(&EventRow { source: Source::Replay, ..old("old_replay") })?;
            tx.insert_event(&EventRow { source: Source::Reconcile, ..old("old_reconcile") })?;
            tx.insert_event(&EventRow { park_key: Some("sub:x".into()), ..old("old_parked") })?;
            tx.insert_event(&EventRow { source: Source::Timer, ..old("old_timer") })?;
            tx.insert_event(&EventRow { provider: "manual".into(), source: Source::Manual, ..old("old_manual") })?;
            tx.insert_event(&EventRow { received_at: at(1000), ..event("t", "stripe", "young") })?;
            Ok(())
        })
        .await;
        let counted = db.r(|s| s.prunable(at(500))).await;
        let pruned = db.w(|tx| tx.prune_bodies(at(500), at(2000), 2)).await;
        assert_eq!(pruned.events, 2, "{}: the limit", db.kind);
        let rest = db.w(|tx| tx.prune_bodies(at(500), at(2000), 100)).await;
        assert_eq!(pruned.events + rest.events, 3, "{}", db.kind);
        assert_eq!(pruned.bytes + rest.bytes, counted.bytes, "{}: dry run and prune disagree", db.kind);
        assert_eq!(counted.events, 3, "{}", db.kind);
        assert_eq!(db.w(|tx| tx.prune_bodies(at(500), at(2000), 100)).await.events, 0, "{}: twice", db.kind);
        assert_eq!(db.r(|s| s.prunable(at(500))).await.events, 0, "{}", db.kind);
        let rows = db.r(|s| s.events_where(&EventFilter::default())).await;
        let shown: Vec<(String, bool, usize, String)> = rows
            .iter()
            .map(|e| (e.event_id.clone(), e.body_pruned_at == Some(at(2000)), e.raw.len(), e.headers.get().to_string()))
            .collect();
        for (id, pruned, raw, headers) in &shown {
            let should = matches!(id.as_str(), "old_webhook" | "old_replay" | "old_reconcile");
            assert_eq!(*pruned, should, "{}: {id}", db.kind);
            assert_eq!(*raw == 0 && headers == "[]", should, "{}: {id}", db.kind);
        }
        answers.push((db.kind, (counted, shown)));
    }
    alike("prune", &answers);
}

/// An erased member keeps no email or name whatever is saved over it, matches no email,
/// and its leads and the events naming it (under its id, or under none by its email) are
/// found and rewritten; the erasure is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_member_takes_no_personal_data_again() {
    let mut answers = Vec::new();
    for db in stores() {
        let ada = member("mbr_ada", "t", Some("Ada@Example.com"), Some("Ada"), 0);
        let kept = ada.clone();
        db.w(move |tx| {
            tx.save_member(&kept)?;
            tx.save_member(&member("mbr_bob", "t", Some("bob@example.com"), None, 0))?;
            tx.insert_event(&EventRow { member_id: Some("mbr_ada".into()), ..event("t", "stripe", "e_ada") })?;
            tx.insert_event(&EventRow {
                canonical: Some(stored_json(&json!({"member": {"email": "ADA@example.com"}}))),
                ..event("t", "stripe", "e_lead")
            })?;
            tx.insert_event(&EventRow {
                canonical: Some(stored_json(&json!({"member": {"email": "ada@example.com"}}))),
                ..event("u", "stripe", "e_other_tenant")
            })?;
            tx.insert_event(&EventRow { member_id: Some("mbr_bob".into()), ..event("t", "stripe", "e_bob") })?;
            tx.capture_lead(&lead("t", "ada@example.com", Some("Ada"), "stripe", "e_lead", 5))?;
            tx.capture_lead(&lead("t", "bob@example.com", None, "stripe", "e_bob", 5))?;
            Ok(())
        })
        .await;
        let naming = db.w(|tx| tx.events_naming("t", "mbr_ada", Some("ada@example.com"))).await;
        let named: Vec<String> = naming.iter().map(|e| e.event_id.clone()).collect();
        assert_eq!(named, ["e_ada", "e_lead"], "{}", db.kind);
        let mut rewritten = naming[1].clone();
        rewritten.raw = b"{}".to_vec();
        rewritten.canonical = Some(stored_json(&json!({"member": {"email": null}})));
        rewritten.reason = Some("[erased]".into());
        let deleted = db
            .w(move |tx| {
                tx.rewrite_event(&rewritten)?;
                tx.erase_member_row("mbr_ada", &["kept".to_string()], at(50))?;
                let n = tx.delete_leads("t", Some("ada@example.com"), "mbr_ada")?;
                tx.record_erasure(&store::ErasureRow {
                    tenant: "t".into(),
                    member_id: "mbr_ada".into(),
                    erased_by: "dpo".into(),
                    erased_at: at(50),
                    detail: json!({"events_rewritten": 1}),
                })?;
                // The pipeline saves the member again with what a later delivery said.
                tx.save_member(&ada)?;
                Ok(n)
            })
            .await;
        assert_eq!(deleted, 1, "{}", db.kind);
        let m = db.r(|s| s.member("mbr_ada")).await.unwrap();
        assert_eq!((m.email.clone(), m.name.clone()), (None, None), "{}", db.kind);
        assert!(db.r(|s| s.members_by_email("ada@example.com")).await.is_empty(), "{}", db.kind);
        assert!(db.w(|tx| tx.member_by_email("t", "ada@example.com")).await.is_none(), "{}", db.kind);
        let leads = db.r(|s| s.leads(Some("t"))).await;
        assert_eq!(leads.iter().map(|l| l.email.as_str()).collect::<Vec<_>>(), ["bob@example.com"], "{}", db.kind);
        let d = db.r(|s| s.member_detail("mbr_ada", 10)).await.unwrap();
        assert_eq!(d.erasures.len(), 1, "{}", db.kind);
        assert_eq!(d.erasures[0].erased_by, "dpo");
        let e = db.r(|s| s.events_by_event_id("e_lead")).await.remove(0);
        assert_eq!((e.raw.clone(), e.reason.clone()), (b"{}".to_vec(), Some("[erased]".to_string())), "{}", db.kind);
        // Bob is untouched.
        let bob = db.r(|s| s.member("mbr_bob")).await.unwrap();
        assert_eq!(bob.email.as_deref(), Some("bob@example.com"), "{}", db.kind);
        answers.push((db.kind, (named, m, d.erasures)));
    }
    alike("erasure", &answers);
}

/// A database a newer release migrated is refused at open, on both stores, rather than
/// written by a binary that does not know what the newer schema holds (an erased member
/// whose email an older `save_member` would write back).
#[test]
fn a_database_migrated_by_a_newer_release_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    drop(SqliteStore::open(path.to_str().unwrap(), Default::default()).unwrap());
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let err = SqliteStore::open(path.to_str().unwrap(), Default::default()).err().expect("refused").to_string();
    assert!(err.contains("schema version 99, newer than this membersync knows"), "{err}");

    let url = crate::pg_cluster::fresh_database();
    crate::pg_cluster::query(&url, |c| {
        c.execute("INSERT INTO membersync_migrations (version) VALUES (99)", &[]).unwrap();
    });
    let u = url.clone();
    let err = std::thread::spawn(move || PgStore::open(&u, Default::default()).err().expect("refused").to_string())
        .join()
        .unwrap();
    assert!(err.contains("schema version 99, newer than this membersync knows"), "{err}");
}
