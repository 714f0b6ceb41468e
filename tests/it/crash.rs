//! The service as a child process: killed with SIGKILL mid-stream, every event answered 2xx
//! is stored and applied after restart, and the unanswered ones are accepted when resent;
//! timers due while it was down fire at start. SIGTERM finishes requests in flight.

use crate::support::*;
use membersync::clock::{Clock, SystemClock};
use membersync::store::Store;
use serde_json::Value;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A distinct `invoice.paid` per index (its own event and subscription), paid far ahead
/// (its renewal is not missed while the test runs).
pub(crate) fn event(i: usize) -> (String, Vec<u8>) {
    let id = format!("evt_crash_{i}");
    let body = invoice_paid_far_ahead()
        .replace("evt_1QxaZ1K7dEmoAc01GAm3W0e2", &id)
        .replace("sub_1QxDemo001", &format!("sub_crash_{i}"))
        .replace("cus_QxDemo001", &format!("cus_crash_{i}"))
        .replace("ada@example.com", &format!("buyer{i}@example.com"));
    (id, body.into_bytes())
}

async fn send(client: &reqwest::Client, url: &str, ctx: &membersync::pipeline::Ctx, body: Vec<u8>) -> Option<Value> {
    let headers = signed_headers(ctx, "stripe", &body, SystemClock.now());
    let mut req = client.post(format!("{url}/webhooks/demo/stripe")).body(body).timeout(Duration::from_secs(5));
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_event_and_timers_fire_after_restart() {
    sigkill_mid_stream(None).await;
}

/// The same on the shared PostgreSQL store: a replica killed mid-batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_replica_on_postgres_mid_stream_loses_no_acknowledged_event() {
    sigkill_mid_stream(Some(crate::pg_cluster::fresh_database())).await;
}

/// Events streamed to the service, SIGKILL once a hundred are acknowledged, a restart on
/// the same database (`database`, else the SQLite file beside the config): every
/// acknowledged event is there, applied; the rest are accepted when resent; the timer
/// that fell due while it was down fires at start; each event was applied once.
async fn sigkill_mid_stream(database: Option<String>) {
    let (dir, mut config) = editable_config();
    if let Some(db) = &database {
        config.database = db.clone();
    }
    let signer = ctx_with(config, Arc::new(membersync::clock::FixedClock::new(SystemClock.now())));
    let port = free_port();
    let db = database.as_deref();
    let mut svc = spawn_on(dir.path(), port, None, "warn", db).await;
    let client = reqwest::Client::new();

    // A subscription whose period ends 3 s from now, cancel scheduled: its timer falls due
    // while the service is down.
    let now = SystemClock.now().timestamp();
    for file in ["1_checkout_completed.json", "2_subscription_created.json", "5_cancel_at_period_end.json"] {
        let raw = std::fs::read(root().join("examples/stripe").join(file)).unwrap();
        let raw = String::from_utf8(raw).unwrap().replace("${now+2m}", "${now+3s}");
        let body = membersync::simulate::expand_time(raw.as_bytes(), now).unwrap();
        let ack = send(&client, &svc.url, &signer, body).await.expect("accepted");
        assert_eq!(ack["status"], "applied", "{file}: {ack}");
    }

    // Stream 300 events from 16 senders; kill the service once 100 are acknowledged.
    let total = 300;
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..16 {
        let (client, url, signer, acked, next) =
            (client.clone(), svc.url.clone(), signer.clone(), acked.clone(), next.clone());
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= total {
                    return;
                }
                let (id, body) = event(i);
                match send(&client, &url, &signer, body).await {
                    Some(ack) if ack["status"] == "applied" => acked.lock().unwrap().push(id),
                    Some(ack) => panic!("unexpected answer {ack}"),
                    None => {} // unanswered: the service died under it
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    svc.child.kill().unwrap(); // SIGKILL
    svc.child.wait().unwrap();
    for s in senders {
        s.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(acked.len() >= 100 && acked.len() < total, "killed mid-stream: {} acknowledged", acked.len());

    // Down past the period end; then up again on the same database.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut svc = spawn_on(dir.path(), port, None, "warn", db).await;

    // Every acknowledged event is stored and applied.
    for id in &acked {
        let (status, e) = get(&svc.url, &format!("/events/{id}")).await;
        assert_eq!(status, 200, "{id} lost");
        assert_eq!(e["status"], "applied", "{id}: {e}");
    }
    // The unanswered ones are accepted when resent (some may have committed before the kill).
    for i in 0..total {
        let (id, body) = event(i);
        let ack = send(&client, &svc.url, &signer, body).await.expect("accepted after restart");
        let expected: &[&str] = if acked.contains(&id) { &["duplicate"] } else { &["applied", "duplicate"] };
        assert!(expected.contains(&ack["status"].as_str().unwrap()), "{id}: {ack}");
    }
    // The timer that fell due during the outage fired at start.
    let mut state = Value::Null;
    for _ in 0..100 {
        let (_, found) = get(&svc.url, "/members?email=ada@example.com").await;
        state = found["members"][0]["memberships"][0]["state"].clone();
        if state == "canceled" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, "canceled");
    svc.child.kill().unwrap();
    svc.child.wait().unwrap();
    let path = database.unwrap_or_else(|| dir.path().join("membersync.db").display().to_string());
    let store = membersync::store::open_database(&path, Default::default(), Default::default()).unwrap();
    let counts = membersync::store::read(&store, |s| s.event_counts()).await.unwrap();
    let applied = counts.into_iter().find(|(s, _)| s == "applied").map(|(_, n)| n).unwrap();
    assert_eq!(applied as usize, total + 3 + 1, "every event applied exactly once (+3 setup +1 timer)");
}

async fn get(url: &str, path: &str) -> (u16, Value) {
    let resp = reqwest::Client::new().get(format!("{url}{path}")).bearer_auth(TOKEN).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_then_exits() {
    let (dir, config) = editable_config();
    let signer = ctx_with(config, Arc::new(membersync::clock::FixedClock::new(SystemClock.now())));
    let mut svc = spawn(dir.path(), free_port()).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (client, url, signer) = (client.clone(), svc.url.clone(), signer.clone());
        tasks.push(tokio::spawn(async move {
            let (id, body) = event(i);
            (id, send(&client, &url, &signer, body).await)
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let pid = svc.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = svc.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the service did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "clean exit: {status}");
    let mut answered = Vec::new();
    for t in tasks {
        let (id, ack) = t.await.unwrap();
        if let Some(ack) = ack {
            assert_eq!(ack["status"], "applied");
            answered.push(id);
        }
    }
    let store = membersync::store::sqlite::SqliteStore::open(
        &dir.path().join("membersync.db").display().to_string(),
        Default::default(),
    )
    .unwrap();
    for id in &answered {
        assert_eq!(store.events_by_event_id(id).unwrap().len(), 1, "{id} answered but not stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_rules() {
    let (dir, _) = editable_config();
    let svc = spawn(dir.path(), free_port()).await;
    let (_, before) = get(&svc.url, "/admin/rules").await;
    assert!(before["last_reload"]["trigger"].is_null(), "{before}");
    let pid = svc.child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let mut after = Value::Null;
    for _ in 0..100 {
        after = get(&svc.url, "/admin/rules").await.1;
        if after["last_reload"]["trigger"] == "sighup" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(after["last_reload"]["trigger"], "sighup", "{after}");
    assert_eq!(after["last_reload"]["ok"], true);
}
