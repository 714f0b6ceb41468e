//! Attacks on the shared store's per-member locks (`store::pg::locks`): what PostgreSQL
//! does with an advisory lock a rolled-back savepoint took, a timer one replica reads while
//! another holds its member, a lookup by an email another replica's batch is moving away,
//! one customer id linked by two replicas at once, and many replicas' jobs crossing the
//! same members by every lookup (deferred, run again alone, run once) — each job applied
//! exactly once, and only those answered `Ok`.

use crate::pg_cluster::*;
use crate::support::Rng;
use chrono::{Duration as CDuration, Utc};
use membersync::machine::MState;
use membersync::store::pg::{Options, PgStore};
use membersync::store::{MemberRow, MembershipRow, Store, TimerRow, Tx};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use crate::member_locks::open;

pub(crate) fn member(id: &str, email: &str) -> MemberRow {
    MemberRow {
        id: id.into(),
        tenant: "demo".into(),
        email: Some(email.into()),
        name: Some(String::new()),
        flags: vec![],
        created_at: Utc::now(),
        updated_at: Utc::now(),
        erased_at: None,
    }
}

/// A Stripe membership of tenant `demo`.
pub(crate) fn membership(id: &str, member_id: &str, key: &str) -> MembershipRow {
    crate::store_contract::membership(id, "demo", member_id, "stripe", key)
}

/// The lock ids the store takes, as the SQL the writer runs takes them, on two plain
/// connections: a `pg_try_advisory_xact_lock` taken inside a savepoint that is rolled back
/// is free for another session at once (the writer's `end_job` forgets it: it must, or a
/// later job of the batch would skip a lock it no longer holds); one taken inside a
/// savepoint that is released is held to the commit; one taken before the savepoint
/// survives its rollback.
#[test]
fn an_advisory_lock_a_rolled_back_savepoint_took_is_free_and_a_released_one_is_held() {
    let url = fresh_database();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut a = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let mut b = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let try_lock = |c: &mut postgres::Client, id: i64| -> bool {
                c.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&id]).unwrap().get(0)
            };
            let (before, rolled_back, released) = (71_i64, 72_i64, 73_i64);
            a.batch_execute("BEGIN").unwrap();
            assert!(try_lock(&mut a, before));
            a.batch_execute("SAVEPOINT job").unwrap();
            assert!(try_lock(&mut a, rolled_back));
            assert!(try_lock(&mut a, before), "re-entrant");
            a.batch_execute("ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job").unwrap();
            a.batch_execute("SAVEPOINT job").unwrap();
            assert!(try_lock(&mut a, released));
            a.batch_execute("RELEASE SAVEPOINT job").unwrap();

            b.batch_execute("BEGIN").unwrap();
            assert!(!try_lock(&mut b, before), "taken before the savepoint: held through its rollback");
            assert!(try_lock(&mut b, rolled_back), "taken in the rolled-back savepoint: gone with it");
            assert!(!try_lock(&mut b, released), "taken in a released savepoint: held to the commit");
            b.batch_execute("ROLLBACK").unwrap();
            a.batch_execute("COMMIT").unwrap();
            b.batch_execute("BEGIN").unwrap();
            assert!(try_lock(&mut b, before) && try_lock(&mut b, released), "all gone at the commit");
            b.batch_execute("COMMIT").unwrap();
        })
        .join()
        .unwrap()
    });
}

/// Replica A's batch holds member M (a delivery about it, mid-job) and is about to move
/// M's due timer T into the future. Replica B's timer look reads T (`FOR UPDATE SKIP
/// LOCKED`), reaches M, is rolled back and waits. A must not wait for B's row lock on T
/// (B's rollback freed it): A commits as soon as it is let go; B then finds T no longer
/// due and fires nothing. T is never fired for the due time A moved it from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_read_while_another_replica_holds_its_member_waits_and_never_holds_that_replica_up() {
    let url = fresh_database();
    let (a, b) = (open(&url), open(&url));
    let due = Utc::now() - CDuration::minutes(5);
    a.write(move |tx| {
        tx.save_member(&member("mbr_m", "m@example.com"))?;
        tx.save_membership(&membership("msp_m", "mbr_m", "sub:m"))?;
        tx.set_timer(&TimerRow {
            tenant: "demo".into(),
            membership_id: "msp_m".into(),
            name: "grace_end".into(),
            due_at: due,
            set_by_event: "evt_1".into(),
        })
    })
    .await
    .unwrap();

    let (at_tx, at) = channel();
    let (go, go_rx) = channel::<()>();
    let mut go_rx = Some(go_rx);
    let later = Utc::now() + CDuration::days(3);
    let a2 = a.clone();
    let held = tokio::spawn(async move {
        a2.write_again(vec![], move |tx| {
            let mut m = tx.member("mbr_m")?.expect("stored");
            m.name = Some("renewed".into());
            tx.save_member(&m)?;
            let _ = at_tx.send(());
            if let Some(go) = go_rx.take() {
                let _ = go.recv_timeout(Duration::from_secs(20));
            }
            tx.set_timer(&TimerRow {
                tenant: "demo".into(),
                membership_id: "msp_m".into(),
                name: "grace_end".into(),
                due_at: later,
                set_by_event: "evt_2".into(),
            })
        })
        .await
    });
    at.recv_timeout(Duration::from_secs(20)).expect("A's batch holds M");

    let b2 = b.clone();
    let fire = tokio::spawn(async move {
        b2.write_again(vec![], move |tx| {
            let taken = tx.due_timers_tx(Utc::now(), 1)?;
            for t in &taken {
                tx.delete_timer_if_due(&t.membership_id, &t.name, t.due_at)?;
            }
            Ok(taken)
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!fire.is_finished(), "B fired M's timer while A's batch held M");

    let let_go = Instant::now();
    go.send(()).unwrap();
    held.await.unwrap().expect("A commits");
    assert!(let_go.elapsed() < Duration::from_secs(5), "A waited {:?} for B's hold on T", let_go.elapsed());
    let fired = tokio::time::timeout(Duration::from_secs(20), fire).await.expect("B ends").unwrap().unwrap();
    assert!(fired.is_empty(), "B fired a timer A had moved into the future: {fired:?}");
    let timers = membersync::store::read(&b, |s| s.member_detail("mbr_m", 5)).await.unwrap().unwrap().timers;
    assert_eq!(timers.len(), 1);
    assert_eq!((timers[0].due_at.timestamp(), timers[0].set_by_event.as_str()), (later.timestamp(), "evt_2"));
}

/// A's batch moves member X's email from old@ to new@ (mid-job); B's job looks old@ up
/// meanwhile. B must not find X by an email it is losing and act on it: B waits, then
/// finds nobody by old@ (as after A) — never X.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_by_an_email_another_replica_is_moving_away_waits_and_then_finds_nobody() {
    let url = fresh_database();
    let (a, b) = (open(&url), open(&url));
    a.write(|tx| tx.save_member(&member("mbr_x", "old@example.com"))).await.unwrap();

    let (at_tx, at) = channel();
    let (go, go_rx) = channel::<()>();
    let mut go_rx = Some(go_rx);
    let a2 = a.clone();
    let held = tokio::spawn(async move {
        a2.write_again(vec![], move |tx| {
            let mut m = tx.member("mbr_x")?.expect("stored");
            m.email = Some("new@example.com".into());
            tx.save_member(&m)?;
            let _ = at_tx.send(());
            if let Some(go) = go_rx.take() {
                let _ = go.recv_timeout(Duration::from_secs(20));
            }
            Ok(())
        })
        .await
    });
    at.recv_timeout(Duration::from_secs(20)).expect("A's batch holds X");
    let b2 = b.clone();
    let look = tokio::spawn(async move {
        b2.write_again(vec![], |tx| {
            let found = tx.member_by_email("demo", "OLD@example.com")?;
            if let Some(mut m) = found.clone() {
                m.name = Some("found by old@".into());
                tx.save_member(&m)?;
            }
            Ok(found.map(|m| m.id))
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!look.is_finished(), "B looked old@ up while A was moving it away");
    go.send(()).unwrap();
    held.await.unwrap().unwrap();
    assert_eq!(look.await.unwrap().unwrap(), None, "B found X by an email A had taken from it");
    let x = membersync::store::read(&b, |s| s.member("mbr_x")).await.unwrap().unwrap();
    assert_eq!((x.email.as_deref(), x.name.as_deref()), (Some("new@example.com"), Some("")));
}

/// A's batch looked customer `cus_1` up, found nobody and is creating its member and the
/// link; B's job does the same meanwhile. One customer id is never linked to two members:
/// B waits, then finds A's member by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_both_link_one_customer_id_to_members_of_their_own() {
    let url = fresh_database();
    let (a, b) = (open(&url), open(&url));
    let create = |who: &'static str| {
        move |tx: &mut dyn Tx| -> membersync::store::Result<String> {
            match tx.member_by_customer("demo", "stripe", "cus_1")? {
                Some(m) => Ok(format!("found {}", m.id)),
                None => {
                    let id = format!("mbr_{who}");
                    tx.save_member(&member(&id, &format!("{who}@example.com")))?;
                    tx.link_customer("demo", "stripe", "cus_1", &id)?;
                    Ok("created".into())
                }
            }
        }
    };
    let (at_tx, at) = channel();
    let (go, go_rx) = channel::<()>();
    let mut go_rx = Some(go_rx);
    let first = create("a");
    let held = tokio::spawn(async move {
        a.write_again(vec![], move |tx| {
            let r = first(tx)?;
            let _ = at_tx.send(());
            if let Some(go) = go_rx.take() {
                let _ = go.recv_timeout(Duration::from_secs(20));
            }
            Ok(r)
        })
        .await
    });
    at.recv_timeout(Duration::from_secs(20)).expect("A's batch holds cus_1");
    let b2 = b.clone();
    let second = tokio::spawn(async move { b2.write_again(vec![], create("b")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "B looked cus_1 up while A was linking it");
    go.send(()).unwrap();
    assert_eq!(held.await.unwrap().unwrap(), "created");
    assert_eq!(second.await.unwrap().unwrap(), "found mbr_a");
    assert!(membersync::store::read(&b, |s| s.member("mbr_b")).await.unwrap().is_none(), "no second member");
}

/// Three replicas, three members (each with an email and a customer id), 150 jobs at once:
/// each appends a token of its own to one or two members' names, reaching each member by
/// a lookup picked at random (id, any-case email, customer id), some holding their batch a
/// moment (so others are rolled back and run again, some past `MOST_DEFERRALS`, alone),
/// some reaching what only an exclusive batch may do (run again alone), some run once
/// (`write`). Every job is answered `Ok`, and every token is stored exactly once, on each
/// member the job named: no update lost, none applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_three_replicas_crossing_the_same_members_each_apply_exactly_once() {
    let url = fresh_database();
    let replicas: Vec<Arc<dyn Store>> = (0..3)
        .map(|_| -> Arc<dyn Store> {
            Arc::new(PgStore::open(&url, Options { max_batch: 4, ..Options::default() }).expect("the store opens"))
        })
        .collect();
    let ids: [&'static str; 3] = ["mbr_0", "mbr_1", "mbr_2"];
    replicas[0]
        .write(move |tx| {
            for (i, id) in ids.iter().enumerate() {
                tx.save_member(&member(id, &format!("m{i}@example.com")))?;
                tx.link_customer("demo", "stripe", &format!("cus_{i}"), id)?;
            }
            Ok(())
        })
        .await
        .unwrap();

    /// Appends `token` to member `i`'s name, reached by lookup `how`.
    fn append(tx: &mut dyn Tx, i: usize, how: u64, token: &str) -> membersync::store::Result<()> {
        let found = match how % 3 {
            0 => tx.member(&format!("mbr_{i}"))?,
            1 => tx.member_by_email("demo", &format!("M{i}@EXAMPLE.com"))?,
            _ => tx.member_by_customer("demo", "stripe", &format!("cus_{i}"))?,
        };
        let mut m = found.expect("the member is stored");
        m.name = Some(format!("{}{token};", m.name.unwrap_or_default()));
        tx.save_member(&m)
    }

    let mut rng = Rng(0x5eed_1234);
    let mut tasks = Vec::new();
    let mut expected: Vec<Vec<String>> = vec![vec![]; 3];
    for n in 0..150u64 {
        let store = replicas[rng.below(3)].clone();
        let first = rng.below(3);
        let second = (rng.below(2) == 0).then(|| (first + 1 + rng.below(2)) % 3);
        let (how1, how2) = (rng.next(), rng.next());
        let slow = rng.below(6) == 0;
        let alone = rng.below(10) == 0;
        let once = rng.below(12) == 0;
        let token = format!("t{n}");
        expected[first].push(token.clone());
        if let Some(s) = second {
            expected[s].push(token.clone());
        }
        let job = move |tx: &mut dyn Tx| -> membersync::store::Result<()> {
            append(tx, first, how1, &token)?;
            if slow {
                std::thread::sleep(Duration::from_millis(30));
            }
            if let Some(s) = second {
                append(tx, s, how2, &token)?;
            }
            if alone {
                tx.last_event_seq()?; // only an exclusive batch may: run again alone
            }
            Ok(())
        };
        tasks.push(tokio::spawn(async move {
            let r = match once {
                true => store.write(job).await,
                false => store.write_again(vec![], job).await,
            };
            (n, r)
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(60), futures_join(tasks)).await.expect("every job ends");
    for (n, r) in &all {
        assert!(r.is_ok(), "job {n} answered {r:?}");
    }
    for (i, id) in ids.into_iter().enumerate() {
        let name = membersync::store::read(&replicas[0], move |s| s.member(id)).await.unwrap().unwrap().name.unwrap();
        let mut got: Vec<String> = name.split(';').filter(|t| !t.is_empty()).map(str::to_string).collect();
        got.sort();
        let mut want = expected[i].clone();
        want.sort();
        assert_eq!(got, want, "member {id}: tokens stored (lost or doubled ones differ)");
    }
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("the task ran"));
    }
    out
}

/// The tests on the server with a small lock table run one at a time: one filling the
/// table fails the other's statements (as it would any session's), which is what they show.
pub(crate) static SMALL_TABLE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A member deleted at the provider fans out to each of their memberships: the job reaches
/// each one by its key and stores an event of its own under a key of its own — two record
/// locks per membership, all held to the commit. A member with more memberships than
/// PostgreSQL's shared lock table holds locks for (here a small table: some hundreds;
/// production defaults: some thousands) is a job a keyed batch can never finish: each run
/// fails with `out of shared memory` (not `Contended`, so it is never run again alone, where
/// it needs no lock at all), and while it fills the table every other session that takes a
/// lock fails too. One SQLite node — or the same job run alone — commits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reaching_more_records_than_the_lock_table_holds_still_commits() {
    let _alone = SMALL_TABLE.lock().await;
    let url = small_lock_table_database();
    let store = open(&url);
    const N: usize = 1500;
    store
        .write(|tx| {
            tx.save_member(&member("mbr_big", "big@example.com"))?;
            for i in 0..N {
                tx.save_membership(&membership(&format!("msp_{i:05}"), "mbr_big", &format!("sub:{i:05}")))?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let fan_out = |tx: &mut dyn Tx| -> membersync::store::Result<usize> {
        let all = tx.memberships_of("mbr_big")?;
        for ms in &all {
            // The part's own delivery (dedupe), then its membership by key, as a fan-out does.
            tx.event_by_key("demo", "stripe", &format!("evt_deleted#{}", ms.key))?;
            let mut m = tx.membership_by_key("demo", "stripe", &ms.key)?.expect("stored");
            m.state = MState::Canceled;
            tx.save_membership(&m)?;
        }
        Ok(all.len())
    };
    let done = tokio::time::timeout(Duration::from_secs(30), store.write_again(vec![], fan_out)).await;
    assert!(matches!(done, Ok(Ok(N))), "the fan-out over {N} memberships is not stored: {done:?}");
    let canceled = membersync::store::read(&store, |s| s.member_detail("mbr_big", 1))
        .await
        .unwrap()
        .unwrap()
        .memberships
        .iter()
        .filter(|m| m.state == MState::Canceled)
        .count();
    assert_eq!(canceled, N);
}

/// Replica A's batch holds member X (mid-job). Replica B's job on X is rolled back and
/// waits for A's commit — as it should. B's next job, on member Y, which A's batch does not
/// hold, must not wait too ("one that reaches none of them does not wait",
/// `member_locks`): it should commit while A still holds X. (B's next batch starts by
/// taking, blocking, what its deferred job learned — X — so every job in it waits for A:
/// for as long as A holds X, and past `lock_timeout` the whole batch fails, Y's job with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_deferred_behind_another_replica_holds_up_no_job_on_another_member() {
    let url = fresh_database();
    let (a, b) = (open(&url), open(&url));
    a.write(|tx| {
        tx.save_member(&member("mbr_x", "x@example.com"))?;
        tx.save_member(&member("mbr_y", "y@example.com"))
    })
    .await
    .unwrap();
    let (at_tx, at) = channel();
    let (go, go_rx) = channel::<()>();
    let mut go_rx = Some(go_rx);
    let a2 = a.clone();
    let held = tokio::spawn(async move {
        a2.write_again(vec![], move |tx| {
            tx.member("mbr_x")?;
            let _ = at_tx.send(());
            if let Some(go) = go_rx.take() {
                let _ = go.recv_timeout(Duration::from_secs(20));
            }
            Ok(())
        })
        .await
    });
    at.recv_timeout(Duration::from_secs(20)).expect("A's batch holds X");
    let rename = |id: &'static str| {
        move |tx: &mut dyn Tx| -> membersync::store::Result<()> {
            let mut m = tx.member(id)?.expect("stored");
            m.name = Some("b".into());
            tx.save_member(&m)
        }
    };
    let b2 = b.clone();
    let on_x = tokio::spawn(async move { b2.write_again(vec![], rename("mbr_x")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!on_x.is_finished(), "B's job on X ran while A's batch held X");
    let b3 = b.clone();
    let on_y = tokio::time::timeout(Duration::from_secs(3), b3.write_again(vec![], rename("mbr_y"))).await;
    go.send(()).unwrap();
    held.await.unwrap().unwrap();
    on_x.await.unwrap().unwrap();
    assert!(matches!(on_y, Ok(Ok(()))), "B's job on Y waited for A's hold on X: {on_y:?}");
}

/// Eight members deleted at the provider at once, 100 memberships each, on one replica:
/// one batch whose jobs reach 1,600 records together, each job 200: fewer than a job's most.
/// The server's lock table (small here) fills before the batch's most is reached: the job
/// that finds it full is rolled back (freeing what it took) and runs again alone; every
/// fan-out is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_jobs_that_together_fill_the_lock_table_still_commits_each() {
    let _alone = SMALL_TABLE.lock().await;
    let url = small_lock_table_database();
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&url, Options::default()).expect("the store opens"));
    const MEMBERS: usize = 8;
    const EACH: usize = 100;
    store
        .write(|tx| {
            for j in 0..MEMBERS {
                let id = format!("mbr_{j}");
                tx.save_member(&member(&id, &format!("m{j}@example.com")))?;
                for i in 0..EACH {
                    tx.save_membership(&membership(&format!("msp_{j}_{i:03}"), &id, &format!("sub:{j}_{i:03}")))?;
                }
            }
            Ok(())
        })
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for j in 0..MEMBERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .write_again(vec![], move |tx| {
                    let all = tx.memberships_of(&format!("mbr_{j}"))?;
                    for ms in &all {
                        tx.event_by_key("demo", "stripe", &format!("evt_deleted_{j}#{}", ms.key))?;
                        let mut m = tx.membership_by_key("demo", "stripe", &ms.key)?.expect("stored");
                        m.state = MState::Canceled;
                        tx.save_membership(&m)?;
                    }
                    Ok(all.len())
                })
                .await
        }));
    }
    let done = tokio::time::timeout(Duration::from_secs(30), futures_join(tasks)).await.expect("every job ends");
    for (j, r) in done.iter().enumerate() {
        assert!(matches!(r, Ok(EACH)), "member {j}'s fan-out: {r:?}");
    }
}
