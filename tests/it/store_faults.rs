//! The store when the disk fails it: a failed sync acknowledges nothing of its batch or
//! after it, marks the store failed (`/healthz` 503, writes refused) and, by default, ends
//! the process with status 74; a damaged database is refused at start with the steps to
//! recover.
// See: issue 16.

use crate::support::*;
use membersync::clock::{Clock, FixedClock, SystemClock};
use membersync::store::sqlite::{Options, SqliteStore, EXIT_SYNC_FAILED};
use membersync::store::{Error, Store};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

static FAIL_SYNCS: AtomicBool = AtomicBool::new(false);
static FAILURES_REPORTED: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SYNCS: AtomicUsize = AtomicUsize::new(0);

/// fdatasync, or EIO once `FAIL_SYNCS` is set (what the kernel answers when write-back failed).
fn flaky_sync(f: &std::fs::File) -> std::io::Result<()> {
    SYNCS.fetch_add(1, Ordering::SeqCst);
    if FAIL_SYNCS.load(Ordering::SeqCst) {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    f.sync_data()
}

fn record_failure(why: &str) {
    FAILURES_REPORTED.lock().unwrap().push(why.to_string());
}

async fn insert(store: &dyn Store, n: usize) -> membersync::store::Result<()> {
    store
        .write(move |tx| {
            tx.capture_lead(&membersync::store::LeadRow {
                tenant: "demo".into(),
                email: format!("lead{n}@example.com"),
                name: None,
                provider: "stripe".into(),
                event_id: format!("evt_lead_{n}"),
                captured_at: at(1_767_225_600),
                converted_at: None,
                member_id: None,
            })
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sync_acknowledges_nothing_after_it_and_healthz_is_503() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db").display().to_string();
    let opts = Options { sync_wal: flaky_sync, on_sync_failure: record_failure, ..Options::default() };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db, opts).unwrap());
    for n in 0..3 {
        insert(&*store, n).await.expect("acknowledged while syncs succeed");
    }
    assert!(SYNCS.load(Ordering::SeqCst) >= 1, "the syncer synced");
    assert!(store.health().is_ok());

    FAIL_SYNCS.store(true, Ordering::SeqCst);
    let err = insert(&*store, 3).await.expect_err("a batch whose sync failed is not acknowledged");
    assert!(matches!(err, Error::Failed(_)), "{err:?}");
    assert_eq!(FAILURES_REPORTED.lock().unwrap().len(), 1, "reported once");
    assert!(FAILURES_REPORTED.lock().unwrap()[0].contains("cannot sync the WAL"));

    // A sync that would succeed again proves nothing: nothing is acknowledged from now on.
    FAIL_SYNCS.store(false, Ordering::SeqCst);
    for n in 4..8 {
        assert!(insert(&*store, n).await.is_err(), "write {n} after a failed sync must not be acknowledged");
    }
    assert!(matches!(store.health(), Err(Error::Failed(_))));

    let (_, config) = editable_config();
    let ctx = Arc::new(membersync::pipeline::Ctx::new(
        config,
        rules(),
        store.clone(),
        Arc::new(FixedClock::new(at(1_767_225_600))),
    ));
    let req = axum::http::Request::get("/healthz").body(axum::body::Body::empty()).unwrap();
    let resp = membersync::app::router(ctx.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    // A webhook now is a 503 (the provider retries), not a 200.
    let body = fixture("stripe", "invoice_paid");
    let mut req = axum::http::Request::post("/webhooks/demo/stripe");
    for (k, v) in signed_headers(&ctx, "stripe", &body, ctx.clock.now()) {
        req = req.header(k, v);
    }
    let resp = membersync::app::router(ctx).oneshot(req.body(axum::body::Body::from(body)).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 503);
}

/// The default reaction to a failed sync: the process stops with status 74 before the
/// write is answered. Run in a child process (this test binary again, flagged by an
/// environment variable) since it ends the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sync_stops_the_process_with_status_74() {
    if std::env::var_os("MEMBERSYNC_SYNC_FAILURE_CHILD").is_some() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db").display().to_string();
        FAIL_SYNCS.store(true, Ordering::SeqCst);
        let store = SqliteStore::open(&db, Options { sync_wal: flaky_sync, ..Options::default() }).unwrap();
        let store: &dyn Store = &store;
        let r = insert(store, 0).await;
        println!("CHILD ANSWERED {r:?}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "store_faults::failed_sync_stops_the_process_with_status_74", "--nocapture"])
        .env("MEMBERSYNC_SYNC_FAILURE_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(EXIT_SYNC_FAILED), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("CHILD ANSWERED"), "the write was answered before the exit: {stdout}");
}

/// A database whose pages were overwritten: `serve` refuses to start, says why and how to
/// recover, and leaves the files as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_database_is_refused_at_start_with_recovery_steps() {
    let (dir, config) = editable_config();
    let signer = ctx_with(config, Arc::new(FixedClock::new(SystemClock.now())));
    let mut svc = spawn(dir.path(), free_port()).await;
    let client = reqwest::Client::new();
    for n in 0..300 {
        let body = String::from_utf8(fixture("stripe", "invoice_paid"))
            .unwrap()
            .replace("evt_1QxaZ1K7dEmoAc01GAm3W0e2", &format!("evt_dmg_{n}"))
            .replace("cus_QxDemo001", &format!("cus_dmg_{n}"))
            .replace("sub_1QxDemo001", &format!("sub_dmg_{n}"))
            .replace("ada@example.com", &format!("dmg{n}@example.com"));
        let mut req = client.post(format!("{}/webhooks/demo/stripe", svc.url)).body(body.clone());
        for (k, v) in signed_headers(&signer, "stripe", body.as_bytes(), SystemClock.now()) {
            req = req.header(k, v);
        }
        assert_eq!(req.send().await.unwrap().status(), 200);
    }
    let pid = svc.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert!(svc.child.wait().unwrap().success());

    // Overwrite the middle of the file (B-tree pages of the tables) with a pattern.
    let db = dir.path().join("membersync.db");
    let wal = std::fs::read(dir.path().join("membersync.db-wal")).ok();
    let mut bytes = std::fs::read(&db).unwrap();
    let len = bytes.len();
    assert!(len > 64 * 1024, "a database of several pages: {len} bytes");
    for b in &mut bytes[len / 3..len / 3 + 16 * 1024] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_membersync"))
        .args(["serve", "--config"])
        .arg(dir.path().join("membersync.yaml"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it refused to serve");
    assert!(stderr.contains("is damaged"), "{stderr}");
    assert!(stderr.contains(".recover"), "names the recovery: {stderr}");
    assert!(std::fs::read(&db).unwrap() == bytes, "the damaged file is left as it was");
    assert!(std::fs::read(dir.path().join("membersync.db-wal")).ok() == wal, "its WAL too");
}
