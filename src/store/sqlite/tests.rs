//! The SQLite store's own tests: batching, savepoints, WAL growth, query plans.
//!
//! What this module must never do: assert a timing; speed lives in the benchmarks.

use super::read::{events_where_sql, CUSTOMER_OF_MEMBER};
use super::*;

fn member(i: usize) -> MemberRow {
    MemberRow {
        id: format!("mbr_{i}"),
        tenant: "t".into(),
        email: Some(format!("m{i}@example.com")),
        name: None,
        flags: vec![],
        created_at: from_ts(1_700_000_000),
        updated_at: from_ts(1_700_000_000),
        erased_at: None,
    }
}

/// Every combination of an [`EventFilter`]'s fields selects exactly the rows the
/// filter describes, in `seq` order; and a filter on a member, a status or a `seq`
/// reaches the rows through an index, not by reading the whole table.
#[test]
fn event_filters_select_what_they_say_through_an_index() {
    let mut conn = Connection::open_in_memory().unwrap();
    migrate(&mut conn).unwrap();
    let statuses = ["applied", "failed", "ignored"];
    let members = [Some("m0"), Some("m1"), None];
    let mut all = Vec::new();
    for i in 0..60i64 {
        let (status, member, source) =
            (statuses[i as usize % 3], members[i as usize % 7 % 3], if i % 4 == 0 { "timer" } else { "webhook" });
        conn.execute(
            "INSERT INTO events (tenant, provider, event_id, idempotency_key, event_type, source, received_at,
             member_id, status, raw, outcome) VALUES ('t', 'stripe', ?1, ?1, 'x', ?2, ?3, ?4, ?5, x'7b7d', '{}')",
            params![format!("evt_{i}"), source, 1_000 + i * 10, member, status],
        )
        .unwrap();
        all.push((i + 1, status, member, source, 1_000 + i * 10));
    }
    for bits in 0..128u32 {
        let on = |b: u32| bits & (1 << b) != 0;
        let f = EventFilter {
            status: on(0).then(|| "failed".to_string()),
            since: on(1).then(|| from_ts(1_200)),
            member_id: on(2).then(|| "m1".to_string()),
            seq: on(3).then_some(29),
            deliveries_only: on(4),
            after_seq: on(5).then_some(20),
            limit: on(6).then_some(3),
            park_key: None,
        };
        let mut want: Vec<i64> = all
            .iter()
            .filter(|(seq, status, member, source, received)| {
                f.status.as_deref().is_none_or(|s| s == *status)
                    && f.since.is_none_or(|t| *received >= ts(t))
                    && f.member_id.as_deref().is_none_or(|m| Some(m) == *member)
                    && f.seq.is_none_or(|s| s == *seq)
                    && (!f.deliveries_only || *source == "webhook")
                    && f.after_seq.is_none_or(|s| *seq > s)
            })
            .map(|r| r.0)
            .collect();
        want.truncate(f.limit.unwrap_or(usize::MAX));
        let (sql, values) = events_where_sql(&f);
        let got: Vec<i64> = conn
            .prepare(&sql)
            .unwrap()
            .query_map(rusqlite::params_from_iter(values.clone()), event_row)
            .unwrap()
            .map(|r| r.unwrap().seq)
            .collect();
        assert_eq!(got, want, "{f:?}");

        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(rusqlite::params_from_iter(values), |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        if f.member_id.is_some() || f.status.is_some() || f.seq.is_some() || f.after_seq.is_some() {
            assert!(plan.iter().all(|p| !p.starts_with("SCAN events")), "{f:?}: {plan:?}");
        }
        if f.member_id.is_some() && f.seq.is_none() {
            assert!(plan.iter().any(|p| p.contains("events_member")) || f.status.is_some(), "{f:?}: {plan:?}");
        }
    }
}

/// Jobs that arrive while a batch is being synced join the open batch; a failing job
/// among them is rolled back alone and every caller hears its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_batch_together_and_a_failed_job_leaves_its_batch_mates_alone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("batch.db");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(db.to_str().unwrap(), Options { queue_capacity: 1024, max_batch: 64, ..Options::default() })
            .unwrap(),
    );
    let mut tasks = Vec::new();
    for i in 0..300 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .write(move |tx| {
                    tx.save_member(&member(i))?;
                    if i % 7 == 3 {
                        return Err(Error::Thread(format!("job {i} refused")));
                    }
                    Ok(i)
                })
                .await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(n) => assert_eq!(n, i),
            Err(e) => {
                assert_eq!(i % 7, 3, "job {i} failed: {e}");
                assert!(e.to_string().contains(&format!("job {i} refused")), "{e}");
            }
        }
    }
    let stored: Vec<bool> =
        store.write(|tx| (0..300).map(|i| Ok(tx.member(&format!("mbr_{i}"))?.is_some())).collect()).await.unwrap();
    for (i, present) in stored.into_iter().enumerate() {
        assert_eq!(present, i % 7 != 3, "member {i}");
    }
}

/// Under steady writes the WAL starts over near `wal_restart_pages`, not at SQLite's
/// own trigger (four times that), because the checkpointer hands the restart to the
/// writer between batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_starts_over_near_its_restart_size_under_steady_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("restart.db");
    let pages = 100;
    let opts = Options { wal_restart_pages: pages, ..Options::default() };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db.to_str().unwrap(), opts).unwrap());
    let wal = dir.path().join("restart.db-wal");
    let mut largest = 0;
    for wave in 0..60 {
        let mut tasks = Vec::new();
        for i in 0..20 {
            let store = store.clone();
            let mut m = member(wave * 20 + i);
            m.name = Some("n".repeat(3000)); // about a page per member
            tasks.push(tokio::spawn(async move { store.write(move |tx| tx.save_member(&m)).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        largest = largest.max(std::fs::metadata(&wal).unwrap().len());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let frame = 4096 + 24;
    assert!(largest > (pages as u64) * frame, "the writes should outgrow one restart size: {largest} bytes");
    // SQLite's own trigger alone lets it reach about 4 × 100 pages (429 when tried).
    assert!(largest < 3 * (pages as u64) * frame, "WAL grew to {largest} bytes ({} pages)", largest / frame);
}

static SYNC_FAILED: AtomicBool = AtomicBool::new(false);

fn note_sync_failure(_: &str) {
    SYNC_FAILED.store(true, Ordering::SeqCst);
}

/// The syncer holds the WAL open from the moment the store opens: a first write after
/// the database's directory was removed (a test's temporary directory, an operator's
/// mistake) still commits and syncs, rather than failing to open the WAL by its path
/// and stopping the process (it did, once in a few runs of the suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_write_after_the_directory_is_removed_still_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gone.db");
    let opts = Options { on_sync_failure: note_sync_failure, ..Options::default() };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db.to_str().unwrap(), opts).unwrap());
    std::fs::remove_dir_all(dir.path()).unwrap();
    let m = member(1);
    store.write(move |tx| tx.save_member(&m)).await.expect("committed and synced");
    assert!(!SYNC_FAILED.load(Ordering::SeqCst), "no sync failed");
    assert!(store.member("mbr_1").unwrap().is_some());
}

/// Storage failures (I/O, a full disk, damage, a read-only or unopenable file) are told
/// from a statement's own errors: only they put the store in its failed state.
#[test]
fn storage_failures_are_told_from_statement_errors() {
    let err = |code: i32| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
    for code in [
        rusqlite::ffi::SQLITE_IOERR,
        rusqlite::ffi::SQLITE_FULL,
        rusqlite::ffi::SQLITE_CORRUPT,
        rusqlite::ffi::SQLITE_NOTADB,
        rusqlite::ffi::SQLITE_CANTOPEN,
        rusqlite::ffi::SQLITE_READONLY,
    ] {
        assert!(is_storage_failure(&err(code)), "code {code}");
    }
    for code in [rusqlite::ffi::SQLITE_CONSTRAINT, rusqlite::ffi::SQLITE_ERROR, rusqlite::ffi::SQLITE_MISMATCH] {
        assert!(!is_storage_failure(&err(code)), "code {code}");
    }
    assert!(!is_storage_failure(&rusqlite::Error::QueryReturnedNoRows));
}

/// A locked database is waited for, but not for ever: the busy handler gives up after its
/// tries (a minute of half-millisecond waits), and the caller gets "database is locked".
#[test]
fn the_wait_for_a_lock_ends() {
    assert!(wait_for_lock(0), "the first attempts wait");
    assert!(!wait_for_lock(120_000), "and the last one gives up");
    assert!(!wait_for_lock(i32::MAX));
}

/// However many threads read at once, at most `MAX_READERS` reader connections are in use
/// (each holds open files); the others wait for one and every read completes.
// See: issue 20, review (each read beyond the idle pool opened a connection of its own:
// under load the service ran out of descriptors).
#[test]
fn concurrent_reads_share_at_most_max_readers_connections() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("m.db").display().to_string(), Options::default()).unwrap();
    let inside = std::sync::atomic::AtomicUsize::new(0);
    let most = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..32 {
            s.spawn(|| {
                store
                    .read(|_| {
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(30));
                        inside.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    assert_eq!(done.load(Ordering::SeqCst), 32, "every read completed");
    let most = most.load(Ordering::SeqCst);
    assert!(most <= MAX_READERS, "{most} connections in use at once");
    assert!(most > 1, "reads still run side by side ({most})");
}

/// A member's customer id is found through an index on the member, not by reading every
/// customer of the tenant and provider in order (what the primary key offered, and what
/// the planner chose for the `ORDER BY`): replay's comparison asks it once per member, so
/// the scan made a 100k-event dry run quadratic (983 events/s; BENCHMARKS.md).
#[test]
fn a_members_customer_id_is_read_through_its_index() {
    let mut conn = Connection::open_in_memory().unwrap();
    migrate(&mut conn).unwrap();
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {CUSTOMER_OF_MEMBER}"))
        .unwrap()
        .query_map(params!["t", "stripe", "mbr_1"], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(plan, ["SEARCH member_customers USING COVERING INDEX member_customers_member (member_id=? AND tenant=? AND provider=?)"]);
}

/// The lookup of parked events for a new (or newly paid) membership reads the events
/// parked under its key and, of those parked for "a membership of the member they name",
/// only the ones naming its member — by a customer id at this provider or by email in any
/// ASCII case — each part through its index. It read every member's such events before,
/// with their bodies, on every membership a provider created or tied to a payment.
#[test]
fn parked_events_are_read_for_their_own_member_only_through_indexes() {
    let mut conn = Connection::open_in_memory().unwrap();
    migrate(&mut conn).unwrap();
    let canonical = |cid: Option<&str>, email: Option<&str>| {
        serde_json::json!({"member": {"provider_customer_id": cid, "email": email}}).to_string()
    };
    let park = |conn: &Connection, id: &str, key: &str, canonical: String| {
        conn.execute(
            "INSERT INTO events (tenant, provider, event_id, idempotency_key, event_type, source, received_at,
             occurred_at, status, raw, canonical, outcome, park_key)
             VALUES ('t', 'stripe', ?1, ?1, 'x', 'webhook', 1000, 1000, 'refused', x'7b7d', ?2, '{}', ?3)",
            params![id, canonical, key],
        )
        .unwrap();
    };
    conn.execute_batch(
        "INSERT INTO members (id, tenant, email, email_lc, created_at, updated_at)
           VALUES ('mbr_ada', 't', 'Ada@Example.com', 'ada@example.com', 0, 0),
                  ('mbr_bob', 't', 'bob@example.com', 'bob@example.com', 0, 0);
         INSERT INTO member_customers VALUES ('t', 'stripe', 'cus_ada', 'mbr_ada'), ('t', 'whop', 'cus_ada_w', 'mbr_ada'),
                                             ('t', 'stripe', 'cus_bob', 'mbr_bob');
         INSERT INTO memberships (id, tenant, member_id, provider, key, state, created_at, updated_at)
           VALUES ('msp_ada', 't', 'mbr_ada', 'stripe', 'sub_ada', 'active', 0, 0);",
    )
    .unwrap();
    park(&conn, "evt_key", "sub_ada", canonical(None, None));
    park(&conn, "evt_by_customer", "", canonical(Some("cus_ada"), None));
    park(&conn, "evt_by_email", "", canonical(None, Some("ADA@example.COM")));
    park(&conn, "evt_both", "", canonical(Some("cus_ada"), Some("ada@example.com")));
    // Not Ada's: another member, Ada's customer id at another provider, another key.
    park(&conn, "evt_bob", "", canonical(Some("cus_bob"), Some("bob@example.com")));
    park(&conn, "evt_other_provider_id", "", canonical(Some("cus_ada_w"), None));
    park(&conn, "evt_nobody", "", canonical(None, None));
    park(&conn, "evt_other_key", "sub_bob", canonical(Some("cus_ada"), None));

    let mut prepared = Prepared::new();
    let mut tx = SqliteTx { conn: &conn, prepared: Some(&mut prepared), lean: false };
    let ids: Vec<String> =
        tx.parked("t", "stripe", "sub_ada", "msp_ada").unwrap().into_iter().map(|e| e.event_id).collect();
    assert_eq!(ids, ["evt_key", "evt_by_customer", "evt_by_email", "evt_both"]);

    // What that search depends on: the same until the member gets a customer id at this
    // provider (not another's), another email, or another member.
    let before = tx.parked_identity("t", "stripe", "msp_ada").unwrap();
    tx.link_customer("t", "whop", "cus_ada_w2", "mbr_ada").unwrap();
    assert_eq!(tx.parked_identity("t", "stripe", "msp_ada").unwrap(), before);
    tx.link_customer("t", "stripe", "cus_ada_2", "mbr_ada").unwrap();
    let linked = tx.parked_identity("t", "stripe", "msp_ada").unwrap();
    assert_ne!(linked, before);
    conn.execute("UPDATE members SET email = 'ada@example.org' WHERE id = 'mbr_ada'", []).unwrap();
    assert_ne!(tx.parked_identity("t", "stripe", "msp_ada").unwrap(), linked);

    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {}", *tx::PARKED))
        .unwrap()
        .query_map(params!["t", "stripe", "sub_ada", "msp_ada"], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let events: Vec<&String> = plan.iter().filter(|l| l.contains(" events ") || l.starts_with("SEARCH e ")).collect();
    assert_eq!(events.len(), 3, "{plan:#?}");
    for (line, index) in events.iter().zip(["events_parked ", "events_parked_customer ", "events_parked_email "]) {
        let searched = line.starts_with("SEARCH events USING INDEX ") || line.starts_with("SEARCH e USING INDEX ");
        assert!(searched && line.contains(index), "{plan:#?}");
        // By the whole key, the customer id or email included: not every such event of the
        // tenant's provider.
        assert!(line.contains("park_key=?)") || line.contains("<expr>=?)"), "{plan:#?}");
    }
    assert!(!plan.iter().any(|l| l.starts_with("SCAN")), "{plan:#?}");

    // Prepared once, run for key after key: SQLite does not prepare it again (a plan that
    // looked at a bound value would be re-prepared on each new value, as it once was). On
    // a store without statistics: `ANALYZE`'s make SQLite weigh bound values anyway.
    let mut st = conn.prepare(&tx::PARKED).unwrap();
    for key in ["sub_ada", "sub_bob", "sub_cy", ""] {
        st.query_map(params!["t", "stripe", key, "msp_ada"], |_| Ok(())).unwrap().for_each(drop);
    }
    assert_eq!(st.get_status(rusqlite::StatementStatus::RePrepare), 0);
}

/// A store parked events in before migration 009 finds them by member after it: the
/// indexes are built over the rows already there (their canonical JSON as it was stored).
#[test]
fn events_parked_before_the_member_indexes_are_found_by_member_after_the_upgrade() {
    let mut conn = Connection::open_in_memory().unwrap();
    for sql in &MIGRATIONS[..8] {
        conn.execute_batch(sql).unwrap();
    }
    conn.pragma_update(None, "user_version", 8).unwrap();
    conn.execute_batch(
        r#"INSERT INTO members (id, tenant, email, email_lc, created_at, updated_at)
             VALUES ('mbr_ada', 't', 'ada@example.com', 'ada@example.com', 0, 0);
           INSERT INTO member_customers VALUES ('t', 'stripe', 'cus_ada', 'mbr_ada');
           INSERT INTO memberships (id, tenant, member_id, provider, key, state, created_at, updated_at)
             VALUES ('msp_ada', 't', 'mbr_ada', 'stripe', 'sub_ada', 'active', 0, 0);
           INSERT INTO events (tenant, provider, event_id, idempotency_key, event_type, source, received_at,
             occurred_at, status, raw, canonical, outcome, park_key)
           VALUES ('t', 'stripe', 'evt_old', 'evt_old', 'x', 'webhook', 1, 1, 'refused', x'7b7d',
                   '{"member":{"provider_customer_id":"cus_ada","email":null}}', '{}', ''),
                  ('t', 'stripe', 'evt_lean', 'evt_lean', 'x', 'webhook', 1, 1, 'applied', x'', NULL, 'null', NULL);"#,
    )
    .unwrap();
    migrate(&mut conn).unwrap();
    assert_eq!(conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)).unwrap(), MIGRATIONS.len() as i64);
    let mut prepared = Prepared::new();
    let mut tx = SqliteTx { conn: &conn, prepared: Some(&mut prepared), lean: false };
    let ids: Vec<String> =
        tx.parked("t", "stripe", "sub_ada", "msp_ada").unwrap().into_iter().map(|e| e.event_id).collect();
    assert_eq!(ids, ["evt_old"]);
}
