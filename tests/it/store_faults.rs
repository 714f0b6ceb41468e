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

/// A webhook over real HTTP to a service whose store syncs through `sync`.
async fn server_syncing_with(sync: fn(&std::fs::File) -> std::io::Result<()>) -> Server {
    let (dir, config) = editable_config();
    let opts = Options { sync_wal: sync, on_sync_failure: record_failure, ..Options::default() };
    Server::start_with_options(config, Arc::new(SystemClock), dir, opts).await
}

/// A Stripe `invoice.paid` of its own (a new member each), paid far ahead: no renewal
/// timer falls due while the test runs (its write would be a second sync).
fn paid(n: usize) -> Vec<u8> {
    invoice_paid_far_ahead()
        .replace("evt_1QxaZ1K7dEmoAc01GAm3W0e2", &format!("evt_fault_{n}"))
        .replace("sub_1QxDemo001", &format!("sub_fault_{n}"))
        .replace("cus_QxDemo001", &format!("cus_fault_{n}"))
        .replace("ada@example.com", &format!("fault{n}@example.com"))
        .into_bytes()
}

async fn post_paid(s: &Server, n: usize) -> (u16, serde_json::Value) {
    let body = paid(n);
    let headers = signed_headers(&s.ctx, "stripe", &body, SystemClock.now());
    s.post("/webhooks/demo/stripe", &headers, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sync_acknowledges_nothing_after_it_and_healthz_is_503() {
    let s = server_syncing_with(flaky_sync).await;
    for n in 0..3 {
        assert_eq!(post_paid(&s, n).await.0, 200, "answered while syncs succeed");
    }
    assert!(SYNCS.load(Ordering::SeqCst) >= 1, "the syncer synced");
    assert_eq!(s.get("/healthz", None).await.0, 200);

    FAIL_SYNCS.store(true, Ordering::SeqCst);
    let (code, ack) = post_paid(&s, 3).await;
    assert_eq!(code, 503, "a delivery whose sync failed is not acknowledged: {ack}");
    assert_eq!(FAILURES_REPORTED.lock().unwrap().len(), 1, "reported once");
    assert!(FAILURES_REPORTED.lock().unwrap()[0].contains("cannot sync the WAL"));

    // A sync that would succeed again proves nothing: nothing is acknowledged from now on.
    FAIL_SYNCS.store(false, Ordering::SeqCst);
    for n in 4..8 {
        let (code, ack) = post_paid(&s, n).await;
        assert_eq!(code, 503, "delivery {n} after a failed sync must not be acknowledged: {ack}");
    }
    assert!(matches!(s.ctx.store.health(), Err(Error::Failed(_))));
    let (code, health) = s.get("/healthz", None).await;
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["status"], "failed");
    // The store, asked directly, refuses too.
    assert!(matches!(insert(&*s.ctx.store, 9).await, Err(Error::Failed(_))));
}

static HOLD_SYNC: AtomicBool = AtomicBool::new(false);

/// fdatasync, after waiting while `HOLD_SYNC` is set.
fn held_sync(f: &std::fs::File) -> std::io::Result<()> {
    while HOLD_SYNC.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    f.sync_data()
}

/// No answer leaves before the WAL sync that covers its commit has returned: with the sync
/// held, a delivery waits; released, it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_delivery_is_answered_before_its_sync_returns() {
    let s = Arc::new(server_syncing_with(held_sync).await);
    assert_eq!(post_paid(&s, 100).await.0, 200);
    // Let the syncer go idle, so that what is held next is the sync of the next commit.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    HOLD_SYNC.store(true, Ordering::SeqCst);
    let pending = {
        let s = s.clone();
        tokio::spawn(async move { post_paid(&s, 101).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let early = pending.is_finished();
    HOLD_SYNC.store(false, Ordering::SeqCst);
    assert!(!early, "answered while its sync was still held");
    let (code, ack) = pending.await.unwrap();
    assert_eq!(code, 200, "{ack}");
    assert_eq!(ack["status"], "applied");
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
        let body = invoice_paid_far_ahead()
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

    // Every page in the database file itself (none left only in the WAL, whose newer copy
    // would hide the damage), then the middle of it (B-tree pages of the tables) overwritten.
    let db = dir.path().join("membersync.db");
    rusqlite::Connection::open(&db).unwrap().pragma_update(None, "wal_checkpoint", "TRUNCATE").unwrap();
    let mut bytes = std::fs::read(&db).unwrap();
    let len = bytes.len();
    assert!(len > 64 * 1024, "a database of several pages: {len} bytes");
    for b in &mut bytes[len / 3..len / 3 + 16 * 1024] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();

    let stderr = serve_refuses_damaged(dir.path());
    assert!(stderr.contains(".recover"), "names the recovery: {stderr}");
    // (A WAL of committed frames beside a damaged file is left as it was: the next test.)
    assert!(std::fs::read(&db).unwrap() == bytes, "the damaged file is left as it was");
}

/// A damaged schema (a byte of an index's SQL) with a WAL of committed frames beside it:
/// refused at start, and neither file is changed — the refusing connection must not copy
/// the WAL into the damaged database as it closes.
// See: issue 16 (found on review: the WAL was merged and deleted by the refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_schema_is_refused_and_its_wal_left_as_it_was() {
    let (dir, config) = editable_config();
    let signer = ctx_with(config, Arc::new(FixedClock::new(SystemClock.now())));
    let post = |url: &str, signer: &membersync::pipeline::Ctx, body: Vec<u8>| {
        let (url, headers) = (url.to_string(), signed_headers(signer, "stripe", &body, SystemClock.now()));
        async move {
            let mut req = reqwest::Client::new().post(format!("{url}/webhooks/demo/stripe")).body(body);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    // Create and migrate the database, then close it cleanly (its WAL is checkpointed and
    // deleted): the schema pages now live only in the database file.
    let mut svc = spawn(dir.path(), free_port()).await;
    svc.kill9();
    let db = dir.path().join("membersync.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        let _: i64 = c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0)).unwrap();
    }
    assert!(!dir.path().join("membersync.db-wal").exists());
    // Serve, answer some deliveries, kill -9: a WAL with committed frames is left.
    let mut svc = spawn(dir.path(), free_port()).await;
    for n in 0..50 {
        let body = String::from_utf8(fixture("stripe", "customer_created"))
            .unwrap()
            .replace("evt_1QxTTTK7dEmoAc018TCMSFm8", &format!("evt_schema_{n}"));
        let (code, ack) = post(&svc.url, &signer, body.into_bytes()).await;
        assert_eq!(code, 200, "{ack}");
    }
    svc.kill9();
    let wal_before = std::fs::read(dir.path().join("membersync.db-wal")).expect("a WAL is left");
    assert!(wal_before.len() > 32, "the WAL holds frames");
    // One damaged byte in the schema text of an index (a schema leaf page, not in the WAL).
    let mut bytes = std::fs::read(&db).unwrap();
    let needle = b"CREATE INDEX events_status";
    let at = bytes.windows(needle.len()).rposition(|w| w == needle).expect("schema text in the file");
    bytes[at + 5] = b'X';
    std::fs::write(&db, &bytes).unwrap();

    serve_refuses_damaged(dir.path());
    let wal_after = std::fs::read(dir.path().join("membersync.db-wal")).ok();
    assert!(
        wal_after.as_ref() == Some(&wal_before),
        "its WAL is left as it was: now {:?} bytes",
        wal_after.map(|w| w.len())
    );
    assert!(std::fs::read(&db).unwrap() == bytes, "the damaged file is left as it was");
}

/// Runs `serve` on the config in `dir`, expecting it to refuse a damaged database; its
/// standard error.
fn serve_refuses_damaged(dir: &std::path::Path) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_membersync"))
        .args(["serve", "--config"])
        .arg(dir.join("membersync.yaml"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a service that starts on the damaged file is stopped and the test fails.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started on a damaged database");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "it refused to serve");
    assert!(stderr.contains("is damaged"), "{stderr}");
    stderr
}
