//! Second round of attacks on the shared store's per-member locks (`store::pg::locks`):
//! what a batch takes at its start for jobs run again (what their rolled-back runs
//! learned), and the batch's cache of members' emails.

use crate::lock_attacks::SMALL_TABLE;
use crate::pg_cluster::*;
use chrono::Utc;
use membersync::canonical::Source;
use membersync::machine::MState;
use membersync::store::{stored_json, EventRow, EventStatus};
use serde_json::json;
use std::sync::mpsc::channel;
use std::time::Duration;

use crate::lock_attacks::{member, membership, open};

/// Replica A's batch holds member H (mid-job). Replica B runs fan-outs of four members,
/// 100 memberships each (200 record locks a job, under a job's most), each of which also
/// reads H at its end: each run is rolled back (H is held) and runs again, and its next
/// batch starts by taking what the run reached — 800 locks together, more than the
/// server's lock table (small here) holds. That start must not fail the batch (every job of
/// it answered an error, and again each time it is delivered while H is held): once A lets
/// H go, every fan-out commits, as on one SQLite node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_again_whose_learned_locks_overfill_the_lock_table_still_commit() {
    let _alone = SMALL_TABLE.lock().await;
    let url = small_lock_table_database();
    let (a, b) = (open(&url), open(&url));
    const MEMBERS: usize = 4;
    const EACH: usize = 100;
    a.write(|tx| {
        tx.save_member(&member("mbr_hot", "hot@example.com"))?;
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

    let (at_tx, at) = channel();
    let (go, go_rx) = channel::<()>();
    let mut go_rx = Some(go_rx);
    let a2 = a.clone();
    let held = tokio::spawn(async move {
        a2.write_again(vec![], move |tx| {
            tx.member("mbr_hot")?;
            let _ = at_tx.send(());
            if let Some(go) = go_rx.take() {
                let _ = go.recv_timeout(Duration::from_secs(20));
            }
            Ok(())
        })
        .await
    });
    at.recv_timeout(Duration::from_secs(20)).expect("A's batch holds H");

    let mut tasks = Vec::new();
    for j in 0..MEMBERS {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.write_again(vec![], move |tx| {
                let all = tx.memberships_of(&format!("mbr_{j}"))?;
                for ms in &all {
                    tx.event_by_key("demo", "stripe", &format!("evt_deleted_{j}#{}", ms.key))?;
                    let mut m = tx.membership_by_key("demo", "stripe", &ms.key)?.expect("stored");
                    m.state = MState::Canceled;
                    tx.save_membership(&m)?;
                }
                tx.member("mbr_hot")?;
                Ok(all.len())
            })
            .await
        }));
    }
    // B's jobs are run, rolled back and set aside meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    go.send(()).unwrap();
    held.await.unwrap().unwrap();
    let mut results = Vec::new();
    for t in tasks {
        results.push(tokio::time::timeout(Duration::from_secs(25), t).await.expect("every job ends").unwrap());
    }
    for (j, r) in results.iter().enumerate() {
        assert!(matches!(r, Ok(EACH)), "member {j}'s fan-out: {r:?}");
    }
}

/// An event parked by email `""` (for whichever membership of the member it names).
fn parked_by_email(key: &str, email: &str) -> EventRow {
    EventRow {
        seq: 0,
        tenant: "demo".into(),
        provider: "stripe".into(),
        event_id: key.into(),
        idempotency_key: key.into(),
        event_type: "invoice.paid".into(),
        kind: Some("payment_succeeded".into()),
        source: Source::Webhook,
        received_at: Utc::now(),
        occurred_at: Some(Utc::now()),
        member_id: None,
        membership_id: None,
        status: EventStatus::Refused,
        reason: None,
        raw: format!("{{\"id\":\"{key}\"}}").into_bytes(),
        headers: stored_json(&json!([])),
        canonical: Some(stored_json(&json!({"event_id": key, "member": {"email": email}}))),
        outcome: stored_json(&json!({})),
        park_key: Some(String::new()),
        deliveries: 1,
        enrichment: None,
        body_pruned_at: None,
    }
}

/// Replica B's job reads member M (its email is then known to the batch, and the search for
/// events parked for M's membership takes the email's lock from what the batch knows,
/// without reading it again), searches M's membership's parked events, and is held open.
/// Replica A stores an event parked by M's email (in another case): it must wait for B's
/// commit — else B's search and A's park would both run as if the other had not, an order
/// no serial node has — and the event is then found by a search after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_search_by_an_email_the_batch_knows_holds_back_a_park_by_that_email() {
    let url = fresh_database();
    let (a, b) = (open(&url), open(&url));
    a.write(|tx| {
        tx.save_member(&member("mbr_m", "m@example.com"))?;
        tx.save_membership(&membership("msp_m", "mbr_m", "sub:m"))
    })
    .await
    .unwrap();
    let (at_tx, at) = channel();
    let (go, go_rx) = channel::<()>();
    let mut go_rx = Some(go_rx);
    let b2 = b.clone();
    let searched = tokio::spawn(async move {
        b2.write_again(vec![], move |tx| {
            tx.member("mbr_m")?;
            tx.membership("msp_m")?;
            let found = tx.parked("demo", "stripe", "sub:m", "msp_m")?;
            let _ = at_tx.send(());
            if let Some(go) = go_rx.take() {
                let _ = go.recv_timeout(Duration::from_secs(20));
            }
            Ok(found.len())
        })
        .await
    });
    at.recv_timeout(Duration::from_secs(20)).expect("B's batch searched");
    let a2 = a.clone();
    let parked = tokio::spawn(async move {
        a2.write_again(vec![], |tx| tx.insert_event(&parked_by_email("evt_p", "M@Example.com"))).await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!parked.is_finished(), "A parked an event by M's email while B's search of it was open");
    go.send(()).unwrap();
    assert_eq!(searched.await.unwrap().unwrap(), 0);
    parked.await.unwrap().unwrap();
    let found = b.write_again(vec![], |tx| tx.parked("demo", "stripe", "sub:m", "msp_m")).await.unwrap();
    assert_eq!(found.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(), ["evt_p"]);
}
