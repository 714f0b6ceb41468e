//! The shared store's writers run side by side, never on the same member at once: a batch
//! of one replica holds each member (and each key it looked one up by) it reaches until it
//! commits; another replica's job that reaches one of them runs after that commit and sees
//! what it wrote; one that reaches none of them does not wait. Jobs that run once
//! (operators' writes, replays, prunes) run alone. Each test holds one replica's batch open
//! mid-job, as a slow batch would, and sends the other replica what would break it.

use crate::pg_cluster::*;
use chrono::Utc;
use membersync::store::pg::{Options, PgStore};
use membersync::store::{MemberRow, Store, Tx};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn open(url: &str) -> Arc<dyn Store> {
    Arc::new(PgStore::open(url, Options::default()).expect("the store opens"))
}

fn member(id: &str, email: &str, name: &str) -> MemberRow {
    MemberRow {
        id: id.into(),
        tenant: "demo".into(),
        email: Some(email.into()),
        name: Some(name.into()),
        flags: vec![],
        created_at: Utc::now(),
        updated_at: Utc::now(),
        erased_at: None,
    }
}

/// Two replicas on a fresh database holding members `mbr_x` and `mbr_y`.
async fn two_replicas() -> (Arc<dyn Store>, Arc<dyn Store>) {
    let url = fresh_database();
    let (a, b) = (open(&url), open(&url));
    a.write(|tx| {
        tx.save_member(&member("mbr_x", "x@example.com", "x"))?;
        tx.save_member(&member("mbr_y", "y@example.com", "y"))
    })
    .await
    .unwrap();
    (a, b)
}

/// A hold on a replica's writer: `job` runs in its batch up to the point where it says so,
/// then waits to be let go; the rest of the job runs after.
struct Hold {
    at: Receiver<()>,
    go: Sender<()>,
}

fn hold() -> (Hold, Sender<()>, Receiver<()>) {
    let (at_tx, at) = channel();
    let (go, go_rx) = channel();
    (Hold { at, go }, at_tx, go_rx)
}

impl Hold {
    fn reached(&self) {
        self.at.recv_timeout(Duration::from_secs(20)).expect("the held batch reached its hold");
    }
}

/// Appends `suffix` to member `id`'s name, read in the same job: a lost update shows as a
/// name missing a suffix.
fn append(tx: &mut dyn Tx, id: &str, suffix: &str) -> membersync::store::Result<()> {
    let mut m = tx.member(id)?.expect("the member is stored");
    m.name = Some(format!("{}{suffix}", m.name.unwrap_or_default()));
    tx.save_member(&m)
}

/// Runs on `store` a job (one that may run again) appending `suffix` to member `id` and
/// then holding its batch open until let go; returns once it holds.
fn held_append(
    store: &Arc<dyn Store>,
    id: &'static str,
    suffix: &'static str,
) -> (Hold, tokio::task::JoinHandle<membersync::store::Result<()>>) {
    let (h, at, go) = hold();
    let mut go = Some(go);
    let store = store.clone();
    let task = tokio::spawn(async move {
        store
            .write_again(vec![], move |tx| {
                append(tx, id, suffix)?;
                let _ = at.send(());
                if let Some(go) = go.take() {
                    let _ = go.recv_timeout(Duration::from_secs(30));
                }
                Ok(())
            })
            .await
    });
    h.reached();
    (h, task)
}

/// Whether `task` is still waiting, after giving it every chance to finish.
async fn still_waiting<T>(task: &tokio::task::JoinHandle<T>) -> bool {
    tokio::time::sleep(Duration::from_millis(500)).await;
    !task.is_finished()
}

async fn name_of(store: &Arc<dyn Store>, id: &'static str) -> Option<String> {
    membersync::store::read(store, move |s| s.member(id)).await.unwrap().and_then(|m| m.name)
}

/// Replica A's batch holds member X mid-job. Replica B's job on member Y commits meanwhile
/// (the writers run side by side); B's job on X waits for A's commit and then builds on
/// what A wrote: X's name carries both suffixes, in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_writing_a_member_holds_back_another_on_that_member_and_no_other() {
    let (a, b) = two_replicas().await;
    let (h, held) = held_append(&a, "mbr_x", "+a");

    let other =
        tokio::time::timeout(Duration::from_secs(20), b.write_again(vec![], |tx| append(tx, "mbr_y", "+b"))).await;
    assert!(matches!(other, Ok(Ok(()))), "a job on another member commits while A's batch is open: {other:?}");

    let b2 = b.clone();
    let same = tokio::spawn(async move { b2.write_again(vec![], |tx| append(tx, "mbr_x", "+b")).await });
    assert!(still_waiting(&same).await, "B's job on X ran while A's batch held X");
    h.go.send(()).unwrap();
    held.await.unwrap().expect("A's batch commits");
    same.await.unwrap().expect("B's job on X commits once A's did");
    assert_eq!(name_of(&b, "mbr_x").await.as_deref(), Some("x+a+b"), "B's job saw what A's wrote");
    assert_eq!(name_of(&b, "mbr_y").await.as_deref(), Some("y+b"));
    let stats = b.writer_stats();
    assert!(stats.reruns >= 1 && stats.exclusive_batches == 0, "B's job on X was rolled back and run again: {stats:?}");
}

/// A's batch looked an email up, found nobody and is about to create its member; B's job
/// looks the same email up meanwhile. It must not find it free too and create a second
/// member: it waits, then finds A's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_both_create_the_member_of_one_email() {
    let (a, b) = two_replicas().await;
    let create = |who: &'static str| {
        move |tx: &mut dyn Tx| -> membersync::store::Result<&'static str> {
            match tx.member_by_email("demo", "New@Example.com")? {
                Some(_) => Ok("found"),
                None => {
                    tx.save_member(&member(&format!("mbr_{who}"), "new@example.com", who))?;
                    Ok("created")
                }
            }
        }
    };
    let (h, at, go) = hold();
    let mut go = Some(go);
    let first = create("a");
    let held = tokio::spawn(async move {
        a.write_again(vec![], move |tx| {
            let r = first(tx)?;
            let _ = at.send(());
            if let Some(go) = go.take() {
                let _ = go.recv_timeout(Duration::from_secs(30));
            }
            Ok(r)
        })
        .await
    });
    h.reached();
    let b2 = b.clone();
    let second = tokio::spawn(async move { b2.write_again(vec![], create("b")).await });
    assert!(still_waiting(&second).await, "B looked the email up while A was creating its member");
    h.go.send(()).unwrap();
    assert_eq!(held.await.unwrap().unwrap(), "created");
    assert_eq!(second.await.unwrap().unwrap(), "found", "B found A's member");
    let members = membersync::store::read(&b, |s| s.members_by_email("new@example.com")).await.unwrap();
    assert_eq!(members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["mbr_a"]);
}

/// A job that runs once (an operator's write, a replay, a prune) runs alone: while one
/// holds A's writer, B's job on another member waits for it; while B's keyed batch holds a
/// member, A's job that runs once waits for that batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_runs_once_runs_with_no_other_batch_beside_it() {
    let (a, b) = two_replicas().await;

    let (h, at, go) = hold();
    let a2 = a.clone();
    let alone = tokio::spawn(async move {
        a2.write(move |tx| {
            append(tx, "mbr_x", "+once")?;
            let _ = at.send(());
            let _ = go.recv_timeout(Duration::from_secs(30));
            Ok(())
        })
        .await
    });
    h.reached();
    let b2 = b.clone();
    let keyed = tokio::spawn(async move { b2.write_again(vec![], |tx| append(tx, "mbr_y", "+b")).await });
    assert!(still_waiting(&keyed).await, "B's batch ran beside a job that runs once");
    h.go.send(()).unwrap();
    alone.await.unwrap().unwrap();
    keyed.await.unwrap().unwrap();

    let (h, keyed) = held_append(&b, "mbr_y", "+b2");
    let a2 = a.clone();
    let alone = tokio::spawn(async move { a2.write(|tx| append(tx, "mbr_x", "+once2")).await });
    assert!(still_waiting(&alone).await, "a job that runs once ran beside B's batch");
    h.go.send(()).unwrap();
    keyed.await.unwrap().unwrap();
    alone.await.unwrap().unwrap();
    assert_eq!(name_of(&a, "mbr_x").await.as_deref(), Some("x+once+once2"));
    assert_eq!(name_of(&a, "mbr_y").await.as_deref(), Some("y+b+b2"));
}

/// A job whose batch must run alone (it merges two members) started in a batch beside
/// others is rolled back there and runs in one of its own: its result is what it returns,
/// once, and nothing of the first try stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_must_run_alone_is_run_again_alone_and_counted_once() {
    let (a, _b) = two_replicas().await;
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = runs.clone();
    a.write_again(vec![], move |tx| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        append(tx, "mbr_y", "+merged")?;
        tx.merge_member("mbr_x", "mbr_y")
    })
    .await
    .expect("the merge commits");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2, "tried beside others, then alone");
    assert_eq!(name_of(&a, "mbr_y").await.as_deref(), Some("y+merged"), "one suffix: the first try left nothing");
    assert_eq!(name_of(&a, "mbr_x").await, None, "merged away");
}
