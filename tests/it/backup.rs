//! `membersync backup` beside a service under load and `membersync restore` for a stopped
//! one, through the real binary: the copy passes `PRAGMA integrity_check` and holds every
//! event acknowledged before the backup began, and a service started on the restored copy
//! answers each of them. And the refusals, each leaving what it was pointed at untouched:
//! a restore while `serve` runs, an existing backup file without `--force`, a damaged,
//! foreign or newer file, a PostgreSQL database.

use crate::durability::{customer_created, invoice_paid};
use crate::support::*;
use membersync::clock::{Clock, FixedClock, SystemClock};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs `membersync ARGS`: (exit code, stdout, stderr).
async fn membersync(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_membersync"));
    cmd.args(args).env("MEMBERSYNC_LOG", "warn").env_remove("MEMBERSYNC_DATABASE");
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output()).await.expect("bounded").unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `PRAGMA integrity_check` of `file`, and the event ids it holds.
fn open_copy(file: &Path) -> (Vec<String>, std::collections::HashSet<String>) {
    let conn = rusqlite::Connection::open_with_flags(file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let verdict: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| vec![e.to_string()]);
    let mut st = conn.prepare("SELECT event_id FROM events").unwrap();
    let ids = st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    (verdict, ids)
}

/// Which acknowledged events a loader recorded, each with the instant its 2xx arrived.
type Acked = Arc<Mutex<Vec<(String, Instant)>>>;

/// Delivers distinct signed webhooks (new members paying, customers created) until `stop`,
/// recording each one answered 2xx.
fn load(
    url: String,
    signer: Arc<membersync::pipeline::Ctx>,
    next: Arc<AtomicUsize>,
    acked: Acked,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        while !stop.load(Ordering::SeqCst) {
            let n = next.fetch_add(1, Ordering::SeqCst);
            let id = format!("evt_backup_{n}");
            let body = if n % 4 == 3 { customer_created(&id, n) } else { invoice_paid(&id, n) };
            let headers = signed_headers(&signer, "stripe", &body, SystemClock.now());
            let mut req =
                client.post(format!("{url}/webhooks/demo/stripe")).body(body).timeout(Duration::from_secs(10));
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Ok(resp) = req.send().await {
                if resp.status().is_success() {
                    acked.lock().unwrap().push((id, Instant::now()));
                }
            }
        }
    })
}

/// Waits (bounded) until `acked` holds `n` events answered after `since`.
async fn until_acked(acked: &Acked, since: Instant, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().iter().filter(|(_, t)| *t > since).count() < n {
        assert!(Instant::now() < deadline, "the service answered fewer than {n} deliveries in a minute");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The "done when": a backup taken under load restores into a service that
/// answers every acknowledged event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_holds_every_acknowledged_event_and_restores_into_a_service_that_answers_them() {
    tokio::time::timeout(Duration::from_secs(240), backup_under_load()).await.expect("bounded");
}

async fn backup_under_load() {
    let (dir, config) = editable_config();
    // A checkpointer pass at most every ten minutes: what the service acknowledges stays in
    // the WAL, not the database file, while the test runs — a copy that missed the WAL
    // would miss those events.
    let yaml = dir.path().join("membersync.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    assert!(text.contains("checkpoint_interval_ms: 20 "), "the config's checkpoint interval moved");
    std::fs::write(&yaml, text.replace("checkpoint_interval_ms: 20 ", "checkpoint_interval_ms: 600000 ")).unwrap();
    let signer = ctx_with(config, Arc::new(FixedClock::new(SystemClock.now())));
    let mut svc = spawn(dir.path(), free_port()).await;

    let acked: Acked = Default::default();
    let (stop, next) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let loaders: Vec<_> =
        (0..3).map(|_| load(svc.url.clone(), signer.clone(), next.clone(), acked.clone(), stop.clone())).collect();
    let start = Instant::now();
    until_acked(&acked, start, 400).await;

    // The backup, as a process of its own, while the loaders keep delivering.
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("membersync-backup.db");
    let began = Instant::now();
    let (code, stdout, stderr) = membersync(&["backup", "--to", s(&file), "--config", s(&yaml)]).await;
    let ended = Instant::now();
    assert_eq!(code, Some(0), "backup failed: {stderr}");
    until_acked(&acked, ended, 50).await;
    stop.store(true, Ordering::SeqCst);
    for l in loaders {
        l.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    let before: Vec<&String> = acked.iter().filter(|(_, t)| *t < began).map(|(id, _)| id).collect();
    let during = acked.iter().filter(|(_, t)| *t >= began && *t <= ended).count();
    eprintln!(
        "backup: {:.0} ms as a process; {} events acknowledged before it began, {during} while it ran, {} in all\n{stdout}",
        (ended - began).as_secs_f64() * 1000.0,
        before.len(),
        acked.len()
    );
    assert!(stdout.contains("Backed up") && stdout.contains("events (highest seq"), "{stdout}");
    assert!(!PathBuf::from(format!("{}.partial", file.display())).exists(), "the partial file was left behind");
    let (verdict, stored) = open_copy(&file);
    assert_eq!(verdict, ["ok"], "integrity check of the backup");
    let missing: Vec<&&String> = before.iter().filter(|id| !stored.contains(**id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} events acknowledged before the backup began are not in it, e.g. {:?}",
        missing.len(),
        before.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );

    // Stopped, restored into another directory's database, served from there.
    svc.kill9();
    let (dir2, _) = editable_config();
    let yaml2 = dir2.path().join("membersync.yaml");
    let (code, stdout, stderr) = membersync(&["restore", "--from", s(&file), "--config", s(&yaml2)]).await;
    assert_eq!(code, Some(0), "restore failed: {stderr}");
    assert!(stdout.contains("Restored") && !stdout.contains("Kept aside"), "{stdout}");
    let svc2 = spawn(dir2.path(), free_port()).await;
    let client = reqwest::Client::new();
    for id in &before {
        let resp = client.get(format!("{}/events/{id}", svc2.url)).bearer_auth(TOKEN).send().await.unwrap();
        let code = resp.status().as_u16();
        let e: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_eq!(code, 200, "GET /events/{id} on the restored service: {e}");
        assert_eq!(e["event_id"], id.as_str(), "{e}");
    }
}

/// A backup file holding one delivered event (`invoice_paid`'s), written by the real
/// command from a database the pipeline wrote, in `dir`.
async fn a_backup(dir: &Path) -> PathBuf {
    let db = dir.join("source.db");
    let ctx = ctx_on(&db, Arc::new(FixedClock::new(at(1_767_225_600))));
    deliver(&ctx, "stripe", "invoice_paid").await;
    let file = dir.join("backup.db");
    let (code, out, err) = membersync(&["backup", "--to", s(&file), "--database", s(&db)]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(", 1 events"), "{out}");
    file
}

const EVENT: &str = "evt_1QxaZ1K7dEmoAc01GAm3W0e2";

/// The names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_while_serve_runs_is_refused_and_leaves_the_database_as_it_was() {
    let (dir, _) = editable_config();
    let file = a_backup(dir.path()).await;
    let mut svc = spawn(dir.path(), free_port()).await;
    let (status, _) = svc_post_invoice_paid(&svc.url, dir.path()).await;
    assert_eq!(status, 200);
    let db = dir.path().join("membersync.db");
    let inode = std::fs::metadata(&db).unwrap().ino();
    let before = names(dir.path());

    let yaml = dir.path().join("membersync.yaml");
    let (code, out, err) = membersync(&["restore", "--from", s(&file), "--config", s(&yaml)]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(err.contains("a `membersync serve` is running on") && err.contains("stop it, then restore"), "{err}");
    assert_eq!(std::fs::metadata(&db).unwrap().ino(), inode, "the database was replaced");
    assert_eq!(names(dir.path()), before, "files were moved or left behind");
    let resp =
        reqwest::Client::new().get(format!("{}/events/{EVENT}", svc.url)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the service lost its event");

    // Killed (the kernel drops its lock), the restore goes through and keeps the old files.
    svc.kill9();
    let (code, out, err) = membersync(&["restore", "--from", s(&file), "--config", s(&yaml)]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("Kept aside:") && out.contains("membersync.db.before-restore-"), "{out}");
    assert_ne!(std::fs::metadata(&db).unwrap().ino(), inode);
}

/// Posts the `invoice_paid` fixture to a spawned service, signed with the config in `dir`.
async fn svc_post_invoice_paid(url: &str, dir: &Path) -> (u16, serde_json::Value) {
    let mut config = membersync::config::Config::load(&dir.join("membersync.yaml")).unwrap();
    config.database = ":memory:".into();
    let signer = ctx_with(config, Arc::new(FixedClock::new(SystemClock.now())));
    let body = fixture("stripe", "invoice_paid");
    let headers = signed_headers(&signer, "stripe", &body, SystemClock.now());
    let mut req = reqwest::Client::new().post(format!("{url}/webhooks/demo/stripe")).body(body);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or_default())
}

#[tokio::test]
async fn backup_to_an_existing_file_is_refused_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let file = a_backup(dir.path()).await;
    let db = dir.path().join("source.db");
    let taken = dir.path().join("taken.db");
    std::fs::write(&taken, b"someone else's file").unwrap();

    let (code, _, err) = membersync(&["backup", "--to", s(&taken), "--database", s(&db)]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("taken.db exists: pass --force to replace it"), "{err}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"someone else's file");

    let (code, _, err) = membersync(&["backup", "--to", s(&taken), "--database", s(&db), "--force"]).await;
    assert_eq!(code, Some(0), "{err}");
    let (verdict, ids) = open_copy(&taken);
    assert_eq!(verdict, ["ok"]);
    assert!(ids.contains(EVENT));

    // Nor is the database itself ever a backup's target, --force or not.
    let (code, _, err) = membersync(&["backup", "--to", s(&db), "--database", s(&db), "--force"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("is the database itself"), "{err}");
    // And a database that does not exist is not created.
    let nowhere = dir.path().join("nowhere.db");
    let (code, _, err) = membersync(&["backup", "--to", s(&file), "--database", s(&nowhere), "--force"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no database at") && !nowhere.exists(), "{err}");
}

#[tokio::test]
async fn restore_of_a_damaged_foreign_or_newer_file_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = a_backup(dir.path()).await;
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let db = target.join("membersync.db");
    std::fs::copy(&good, &db).unwrap();
    let kept = std::fs::read(&db).unwrap();

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"not a database at all\n".repeat(500)).unwrap();
    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE notes (body TEXT)").unwrap();
    // A page in the middle of a real backup overwritten.
    let damaged = dir.path().join("damaged.db");
    let mut bytes = std::fs::read(&good).unwrap();
    let page = 4096;
    assert!(bytes.len() >= 6 * page, "the backup is {} bytes", bytes.len());
    bytes[3 * page..4 * page].fill(0xA5);
    std::fs::write(&damaged, &bytes).unwrap();
    let newer = dir.path().join("newer.db");
    std::fs::copy(&good, &newer).unwrap();
    rusqlite::Connection::open(&newer).unwrap().pragma_update(None, "user_version", 999).unwrap();

    for (file, expected) in [
        (&garbage, "garbage.db is not a membersync database (SQLite cannot read it)"),
        (&foreign, "foreign.db is not a membersync database (schema version 0"),
        (&damaged, "damaged.db failed SQLite's integrity check"),
        (&newer, "newer.db was written by a newer membersync (schema version 999; this one knows up to"),
    ] {
        let (code, out, err) = membersync(&["restore", "--from", s(file), "--database", s(&db)]).await;
        assert_eq!(code, Some(1), "{}: {out}", file.display());
        assert!(err.contains(expected), "{}: {err}", file.display());
        assert_eq!(std::fs::read(&db).unwrap(), kept, "{}: the database changed", file.display());
        assert_eq!(names(&target), ["membersync.db", "membersync.db.serve-lock"], "{}", file.display());
    }
    // The good one goes in.
    let (code, _, err) = membersync(&["restore", "--from", s(&good), "--database", s(&db)]).await;
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test]
async fn backup_and_restore_of_a_postgres_database_name_pg_dump_and_pg_restore() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.db");
    let url = "postgres://membersync:hunter2@127.0.0.1:1/membersync";
    let (code, _, err) = membersync(&["backup", "--to", s(&file), "--database", url]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("is a PostgreSQL database: back it up with `pg_dump"), "{err}");
    assert!(err.contains("pg_restore") && !err.contains("hunter2"), "{err}");
    assert!(!file.exists());
    std::fs::write(&file, b"x").unwrap();
    let (code, _, err) = membersync(&["restore", "--from", s(&file), "--database", url]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("pg_restore"), "{err}");
}
