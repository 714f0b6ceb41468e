//! Several replicas on one PostgreSQL: each with its own writer, reads and timer task,
//! sharing one database. What one SQLite node guarantees holds across them: a delivery
//! sent to two at once is applied once, a due timer fires once, replicas starting together
//! migrate once, and a replica killed mid-batch loses no acknowledged event.

use crate::ordering::{deliver_burst, one_node, scenarios, shuffled};
use crate::pg_cluster::*;
use crate::support::*;
use chrono::{DateTime, Utc};
use membersync::canonical::Source;
use membersync::clock::{Clock, FixedClock, SystemClock};
use membersync::pipeline::Ctx;
use membersync::scenario::Scenario;
use membersync::store::pg::{Options, PgStore};
use membersync::store::EventStatus;
use std::path::Path;
use std::sync::Arc;

/// Three stores opening an empty database at the same moment: one migrates, the others
/// wait for it and find nothing left to do; each migration is applied (and recorded) once
/// and every store opens.
#[test]
fn three_replicas_opening_an_empty_database_at_once_migrate_it_once() {
    let url = empty_database();
    let start = std::sync::Arc::new(std::sync::Barrier::new(3));
    let opened: Vec<_> = (0..3)
        .map(|_| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                PgStore::open(&url, Options::default()).map(drop).map_err(|e| e.to_string())
            })
        })
        .collect();
    for o in opened {
        o.join().unwrap().expect("every replica opens");
    }
    let (versions, tables): (Vec<i32>, i64) = query(&url, |c| {
        let v = c.query("SELECT version FROM membersync_migrations ORDER BY version", &[]).unwrap();
        let t = c
            .query_one("SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'events'", &[])
            .unwrap()
            .get(0);
        (v.iter().map(|r| r.get(0)).collect(), t)
    });
    assert_eq!(versions, vec![1, 2], "each migration recorded once");
    assert_eq!(tables, 1);
}

/// A replica: its own store (writer, reads), rules and clock on the shared database `url`.
fn replica(url: &str, clock: Arc<FixedClock>) -> Arc<Ctx> {
    ctx_with(config(url), clock)
}

/// The provider event id each of a scenario's files delivers (what its stored row names).
async fn event_ids(sc: &Scenario, fixtures: &Path, sends: &[String], end: DateTime<Utc>) -> Vec<(String, String)> {
    let mut ids = Vec::new();
    for f in sends {
        let node = one_node(end);
        deliver_burst(sc, fixtures, std::slice::from_ref(f), end, &node).await;
        let stored = membersync::store::read(&node[0].store, |s| s.events(None, None, 100)).await.unwrap();
        let first = stored.iter().filter(|e| e.source == Source::Webhook).min_by_key(|e| e.seq).unwrap();
        ids.push((f.clone(), first.event_id.clone()));
    }
    ids
}

/// Every scenario's deliveries, shuffled and some sent twice, all at once to three
/// replicas (one file to each in turn), then every replica firing what is due at once:
/// each membership ends in the state, and with the access, that one SQLite node gives when
/// the same deliveries arrive in the order the replicas took them (their stored order).
/// Which order that is, is the race's; that every order ends as the in-order story does
/// is the ordering guarantee, tried on one node by `ordering::`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_fed_shuffled_and_duplicated_lifecycles_end_where_one_sqlite_node_does() {
    let mut failures = Vec::new();
    for (name, sc, fixtures, sends, end) in scenarios() {
        let ids = event_ids(&sc, &fixtures, &sends, end).await;
        for seed in 1..=2u64 {
            let order = shuffled(&sends, seed);
            let url = fresh_database();
            let replicas: Vec<_> = (0..3).map(|_| replica(&url, Arc::new(FixedClock::new(end)))).collect();
            let got = deliver_burst(&sc, &fixtures, &order, end, &replicas).await;
            let stored = membersync::store::read(&replicas[0].store, |s| s.events(None, None, 1000)).await.unwrap();
            let mut arrived: Vec<_> = stored.iter().filter(|e| e.source == Source::Webhook).collect();
            arrived.sort_by_key(|e| e.seq);
            let as_taken: Vec<String> = arrived
                .iter()
                .map(|e| ids.iter().find(|(_, id)| *id == e.event_id).expect("a file's event").0.clone())
                .collect();
            assert_eq!(as_taken.len(), sends.len(), "{name}: each delivery stored once: {as_taken:?}");
            let expected = deliver_burst(&sc, &fixtures, &as_taken, end, &one_node(end)).await;
            if got != expected {
                failures.push(format!(
                    "{name} seed {seed}: taken as {as_taken:?}\n  one node {expected:?}\n  replicas {got:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} burst(s) ended elsewhere:\n{}", failures.len(), failures.join("\n"));
}

/// Twenty deliveries, each sent to two replicas (two HTTP servers on one database) at the
/// same moment: every one is answered 2xx by both, applied by exactly one and a duplicate
/// at the other, and stored once with both deliveries counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_delivery_sent_to_two_replicas_at_once_is_applied_once() {
    let url = fresh_database();
    let start = |url: String| async move {
        let (dir, mut config) = editable_config();
        config.database = url;
        Server::start_with(config, Arc::new(SystemClock), dir).await
    };
    let (a, b) = (start(url.clone()).await, start(url.clone()).await);
    let n = 20;
    for i in 0..n {
        let (_, body) = crate::crash::event(i);
        let headers = signed_headers(&a.ctx, "stripe", &body, SystemClock.now());
        let ((sa, ra), (sb, rb)) = tokio::join!(
            a.post("/webhooks/demo/stripe", &headers, body.clone()),
            b.post("/webhooks/demo/stripe", &headers, body)
        );
        assert_eq!((sa, sb), (200, 200), "{ra} {rb}");
        let mut statuses = [ra["status"].as_str().unwrap().to_string(), rb["status"].as_str().unwrap().to_string()];
        statuses.sort();
        assert_eq!(statuses, ["applied", "duplicate"], "event {i}");
    }
    let events = membersync::store::read(&a.ctx.store, |s| s.events(None, None, 1000)).await.unwrap();
    assert_eq!(events.len(), n);
    assert!(events.iter().all(|e| e.deliveries == 2 && e.status == EventStatus::Applied), "{events:?}");
    // Each replica's writer ran its batches beside the other's, and says so.
    for r in [&a, &b] {
        let metrics = r.get_text("/metrics").await;
        let keyed = metrics.lines().find(|l| l.starts_with("membersync_writer_batches_total{kind=\"keyed\"}"));
        assert!(keyed.is_some_and(|l| !l.ends_with(" 0")), "{metrics}");
        assert!(metrics.contains("membersync_writer_reruns_total "), "{metrics}");
    }
    a.stop().await;
    b.stop().await;
}

/// Twelve memberships whose renewal timers (and the timers those set) fall due, and three
/// replicas firing what is due at the same moment: each timer fires exactly once (no two
/// `timer` events for the same timer and due time), as many fire as on one SQLite node
/// doing the same alone, and none is left due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_timer_fires_once_across_three_replicas() {
    let url = fresh_database();
    let now = SystemClock.now();
    let later = chrono::DateTime::parse_from_rfc3339("2101-01-01T00:00:00Z").unwrap().to_utc();
    let replicas: Vec<_> = (0..3).map(|_| replica(&url, Arc::new(FixedClock::new(now)))).collect();
    let alone = ctx_on(std::path::Path::new(":memory:"), Arc::new(FixedClock::new(now)));
    for i in 0..12 {
        let (_, body) = crate::crash::event(i);
        let headers = signed_headers(&alone, "stripe", &body, now);
        for ctx in [&replicas[i % 3], &alone] {
            let ack = membersync::ingest::accept(ctx, "demo", "stripe", headers.clone(), body.clone()).await.unwrap();
            assert_eq!(ack.status, membersync::pipeline::Status::Applied);
        }
    }
    let due = membersync::store::read(&replicas[0].store, move |s| s.due_timers(later, 1000)).await.unwrap();
    assert_eq!(due.len(), 12, "each membership has its renewal timer: {due:?}");
    let fired: Vec<_> = replicas
        .iter()
        .map(|ctx| {
            let ctx = ctx.clone();
            tokio::spawn(async move { membersync::timers::fire_due(&ctx, later).await })
        })
        .collect();
    let mut total = 0;
    for f in fired {
        total += f.await.unwrap();
    }
    let expected = membersync::timers::fire_due(&alone, later).await;
    assert!(expected > 12, "firing a renewal timer sets another: {expected}");
    assert_eq!(total, expected, "three replicas fired {total} timers, one node {expected}");
    let events = membersync::store::read(&replicas[0].store, |s| s.events(None, None, 1000)).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for e in events.iter().filter(|e| e.source == Source::Timer) {
        let t: serde_json::Value = serde_json::from_slice(&e.raw).unwrap();
        let key = (t["membership_id"].to_string(), t["name"].to_string(), t["due_at"].to_string());
        assert!(seen.insert(key.clone()), "timer {key:?} fired twice");
    }
    assert_eq!(seen.len(), expected);
    let left = membersync::store::read(&replicas[0].store, move |s| s.due_timers(later, 1000)).await.unwrap();
    assert!(left.is_empty(), "still due: {left:?}");
}

/// A replica told to require TLS, and given the authority of the server's certificate
/// (`MEMBERSYNC_DATABASE_CA`), serves over TLS connections only: it starts, applies a
/// delivery, and every connection it holds to the database is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_requiring_tls_speaks_it_to_a_server_whose_authority_it_is_given() {
    let plain = fresh_database();
    let (url, ca) = tls_url(&plain);
    let (dir, config) = editable_config();
    let signer = ctx_with(config, Arc::new(FixedClock::new(SystemClock.now())));
    let ca = ca.display().to_string();
    let env = [("MEMBERSYNC_DATABASE", url.as_str()), ("MEMBERSYNC_DATABASE_CA", ca.as_str())];
    let mut svc = spawn_env(dir.path(), free_port(), None, "warn", &env).await;
    let (_, body) = crate::crash::event(0);
    let headers = signed_headers(&signer, "stripe", &body, SystemClock.now());
    let mut req = reqwest::Client::new().post(format!("{}/webhooks/demo/stripe", svc.url)).body(body);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let ack: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
    assert_eq!(ack["status"], "applied", "{ack}");
    let name = plain.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let (tls, total): (i64, i64) = query(&plain, move |c| {
        let r = c
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE s.ssl), COUNT(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
                &[&name],
            )
            .unwrap();
        (r.get(0), r.get(1))
    });
    assert!(total >= 2 && tls == total, "{tls} of the replica's {total} connections use TLS");
    svc.kill9();
}

/// A server whose certificate nothing here vouches for is refused at start, with what to do
/// about it; nothing is served unchecked.
#[test]
fn a_server_certificate_no_authority_here_vouches_for_is_refused_at_start() {
    let (url, _) = tls_url(&fresh_database());
    let err = PgStore::open(&url, Options::default()).map(drop).unwrap_err().to_string();
    assert!(err.contains("cannot connect to PostgreSQL") && err.contains("MEMBERSYNC_DATABASE_CA"), "{err}");
}

/// The database drops a replica's connections (a failover, an operator's
/// `pg_terminate_backend`): the write caught on the dead connection is answered with an
/// error, never as stored, and nothing of it is stored; the next write opens a new
/// connection and is stored; a read on a dropped connection is read again on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_connections_are_dropped_answers_no_write_as_stored_and_reconnects() {
    let url = fresh_database();
    let store = membersync::store::open_database(&url, Default::default(), Default::default()).unwrap();
    let member = |id: &str| membersync::store::MemberRow {
        id: id.to_string(),
        tenant: "demo".into(),
        email: Some(format!("{id}@example.com")),
        name: None,
        flags: vec![],
        created_at: SystemClock.now(),
        updated_at: SystemClock.now(),
        erased_at: None,
    };
    let m0 = member("mbr_before");
    store.write(move |tx| tx.save_member(&m0)).await.unwrap();
    assert!(membersync::store::read(&store, |s| s.member("mbr_before")).await.unwrap().is_some());
    let name = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let killed: i64 = query(&url, move |c| {
        c.query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .unwrap()
        .get(0)
    });
    assert!(killed >= 2, "the writer's and a reader's connections: {killed}");
    let m1 = member("mbr_lost");
    let lost = store.write(move |tx| tx.save_member(&m1)).await;
    assert!(lost.is_err(), "a write on a dropped connection is not answered as stored");
    let m2 = member("mbr_after");
    store.write(move |tx| tx.save_member(&m2)).await.expect("the next write reconnects");
    // The read meets its dropped connection, and reads again on a new one.
    let (lost, after) = membersync::store::read(&store, |s| Ok((s.member("mbr_lost")?, s.member("mbr_after")?)))
        .await
        .expect("a read on a dropped connection is read again");
    assert!(lost.is_none(), "the failed write stored nothing");
    assert!(after.is_some());
}

/// `/healthz` says whether the replica can reach its database: 200 while it can, 503 once
/// the database is gone (a load balancer then sends elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_503_while_the_database_cannot_be_reached() {
    let url = fresh_database();
    let (dir, mut config) = editable_config();
    config.database = url.clone();
    let s = Server::start_with(config, Arc::new(SystemClock), dir).await;
    assert_eq!(s.get("/healthz", None).await.0, 200);
    let name = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let admin = url.replace(&format!("/{name}?"), "/postgres?");
    query(&admin, move |c| c.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).unwrap());
    let (status, body) = s.get("/healthz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.to_string().contains("cannot be reached"), "{body}");
}

/// A TCP proxy to the test cluster that can go silent: nothing forwarded, nothing closed
/// (a partition, or a server hung on its disk, as the replica sees it).
struct Proxy {
    silent: Arc<std::sync::atomic::AtomicBool>,
}

fn proxy(url: &str) -> (Proxy, String) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let rest = url.strip_prefix("postgres://").unwrap();
    let (userhost, db) = rest.split_once('/').unwrap();
    let (user, hostport) = userhost.rsplit_once('@').unwrap();
    let target = hostport.to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = silent.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = std::net::TcpStream::connect(&target) else { continue };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server.try_clone().unwrap(), client.try_clone().unwrap()),
            ] {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while s.load(Ordering::SeqCst) {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (Proxy { silent }, format!("postgres://{user}@127.0.0.1:{port}/{db}"))
}

/// The database goes silent under a replica (nothing answers, nothing closes): a write is
/// answered 503 by its deadline rather than hanging, and the replica's health says it is
/// stuck, so a load balancer sends elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_database_goes_silent_answers_writes_by_their_deadline_and_says_it_is_unhealthy() {
    let (p, url) = proxy(&fresh_database());
    let deadline = std::time::Duration::from_secs(2);
    let store: Arc<dyn membersync::store::Store> = Arc::new(
        std::thread::spawn(move || PgStore::open(&url, Options { write_deadline: deadline, ..Options::default() }))
            .join()
            .unwrap()
            .unwrap(),
    );
    store.write(|tx| tx.last_event_seq()).await.expect("a write through the proxy");
    p.silent.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(std::time::Duration::from_secs(20), store.write(|tx| tx.last_event_seq())).await;
    let waited = started.elapsed();
    assert!(matches!(r, Ok(Err(membersync::store::Error::Busy))), "{r:?} after {waited:?}");
    assert!(waited < deadline + std::time::Duration::from_secs(3), "answered after {waited:?}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let health =
        tokio::time::timeout(std::time::Duration::from_secs(5), membersync::store::read(&store, |s| s.health()))
            .await
            .expect("health answers at once when the writer is stuck");
    assert!(health.unwrap_err().to_string().contains("waited"), "the stuck writer is reported");
}

/// A password never reaches a log or an error: neither the one in the URL's user part nor
/// one given as a parameter.
#[test]
fn a_database_password_is_never_shown() {
    use membersync::store::pg::redacted;
    for url in [
        "postgres://membersync@db.internal:5432/ms?password=hunter2",
        "postgres://db.internal/ms?user=membersync&PASSWORD=hunter2&sslmode=require",
        "postgresql://membersync:hunter2@db.internal/ms",
        "postgres://membersync:hunter2@db.internal/ms?application_name=a@b",
    ] {
        let r = redacted(url);
        assert!(!r.contains("hunter2") && r.contains("db.internal"), "{url} -> {r}");
    }
    let url = "postgres://membersync@127.0.0.1:1/ms?password=hunter2&connect_timeout=2";
    let err = PgStore::open(url, Options::default()).map(drop).unwrap_err().to_string();
    assert!(!err.contains("hunter2") && err.contains("cannot connect"), "{err}");
}

/// A delivery carrying U+0000 in its fields (a customer's name, the event id — escaped in
/// JSON as `\u0000`): PostgreSQL's text cannot hold it, SQLite's can. Both stores take it
/// alike — applied, U+FFFD in its place, the raw body kept as sent — so a provider's field
/// never decides whether a cancellation or a refund can be stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_carrying_nul_is_taken_alike_by_both_stores() {
    let now = SystemClock.now();
    let pg = replica(&fresh_database(), Arc::new(FixedClock::new(now)));
    let sqlite = ctx_on(std::path::Path::new(":memory:"), Arc::new(FixedClock::new(now)));
    let mut v: serde_json::Value = serde_json::from_str(&invoice_paid_far_ahead()).unwrap();
    v["id"] = "evt_nul_\u{0}x".into();
    v["data"]["object"]["customer_name"] = "Ada\u{0}Lovelace".into();
    let body = serde_json::to_vec(&v).unwrap();
    assert!(body.windows(6).any(|w| w == b"\\u0000"));
    let mut seen = Vec::new();
    for ctx in [&sqlite, &pg] {
        let headers = signed_headers(ctx, "stripe", &body, now);
        let ack = membersync::ingest::accept(ctx, "demo", "stripe", headers, body.clone()).await.unwrap();
        assert_eq!(ack.status, membersync::pipeline::Status::Applied);
        assert_eq!(ack.event_id, "evt_nul_\u{FFFD}x");
        let stored = membersync::store::read(&ctx.store, |s| {
            let e = s.events(None, None, 1)?.remove(0);
            let m = s.member(e.member_id.as_deref().unwrap())?.unwrap();
            Ok((e.raw, m.name))
        })
        .await
        .unwrap();
        assert_eq!(stored.0, body, "the raw body as sent");
        seen.push(stored.1);
    }
    assert_eq!(seen[0].as_deref(), Some("Ada\u{FFFD}Lovelace"));
    assert_eq!(seen[0], seen[1]);
}
