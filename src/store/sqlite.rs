//! Embedded SQLite store: WAL, one writer thread with group commit, a syncer thread that
//! makes each committed batch durable (fdatasync of the WAL) before its requests hear back
//! — the guarantee of `synchronous=FULL`, with the next batch running during the sync —
//! and a small pool of read connections. `:memory:` opens a private shared-cache database
//! (used by `simulate`).
//!
//! SQLite is used as it ships: its own unix VFS, WAL and locking; nothing here writes a
//! database or WAL byte itself. It must never answer a write before the commit holding it
//! is on disk, and never answer one after a sync failed: a failed sync stops the process
//! (`Options::on_sync_failure`), because the kernel may have dropped the pages it could
//! not write and a later sync that succeeds proves nothing about them.

use super::*;
use chrono::TimeZone;
use rusqlite::{params, CachedStatement, Connection, OpenFlags, OptionalExtension, Row, Statement};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use tokio::sync::mpsc;

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/sqlite/001_init.sql"),
    include_str!("migrations/sqlite/002_reconcile.sql"),
    include_str!("migrations/sqlite/003_ordering.sql"),
    include_str!("migrations/sqlite/004_lookup_indexes.sql"),
];

/// Tuning for the writer.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Jobs that may wait for the writer before new ones are refused (503).
    pub queue_capacity: usize,
    /// Most jobs committed in one transaction.
    pub max_batch: usize,
    /// WAL pages after which the writer is asked to let the WAL start over (10,000,
    /// ≈40 MB; SQLite's own trigger, the backstop, is at four times that).
    pub wal_restart_pages: i64,
    /// Least time between two checkpointer passes (20 ms).
    pub checkpoint_interval: std::time::Duration,
    /// Most time the integrity check at open (`PRAGMA quick_check`) may take; past it the
    /// check is abandoned with a warning. Zero skips it.
    pub startup_check: std::time::Duration,
    /// How a committed batch is made durable: `File::sync_data` (fdatasync) of the WAL.
    /// Replaced only by tests that make it fail.
    pub sync_wal: fn(&std::fs::File) -> std::io::Result<()>,
    /// Called once when a sync fails (after the store has marked itself failed and before
    /// any caller of the batch hears back). The default logs and exits the process with
    /// status 74 (EX_IOERR); tests replace it to watch what the store does next.
    pub on_sync_failure: fn(&str),
}

/// Exit code of a process stopped by a failed sync (sysexits' EX_IOERR).
pub const EXIT_SYNC_FAILED: i32 = 74;

fn sync_data(f: &std::fs::File) -> std::io::Result<()> {
    f.sync_data()
}

/// The default `on_sync_failure`: a failed fsync cannot be retried safely (the kernel may
/// have dropped the dirty pages and cleared the error), so the process stops; a restart
/// recovers from what the WAL really holds, and the providers resend what was not answered.
fn exit_on_sync_failure(error: &str) {
    tracing::error!(%error, "A sync of the database failed: stopping. Nothing since the last good sync was acknowledged; restart to recover from the WAL.");
    std::process::exit(EXIT_SYNC_FAILED);
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queue_capacity: 4096,
            max_batch: 32,
            wal_restart_pages: 10_000,
            checkpoint_interval: std::time::Duration::from_millis(20),
            startup_check: std::time::Duration::from_secs(10),
            sync_wal: sync_data,
            on_sync_failure: exit_on_sync_failure,
        }
    }
}

/// What the writer thread is sent: a job, or word from the syncer that it caught up.
enum Msg {
    Job(Work),
    Synced,
}

/// The SQLite store.
pub struct SqliteStore {
    sender: mpsc::Sender<Msg>,
    readers: Mutex<Vec<Connection>>,
    uri: String,
    flags: OpenFlags,
    health: Health,
}

/// Set once the store hits an I/O error (sticky): from then on it takes no writes, acks
/// nothing, and `/healthz` says so. A failed sync is also reported to `on_sync_failure`.
#[derive(Clone)]
struct Health {
    failed: Arc<Mutex<Option<String>>>,
    on_sync_failure: fn(&str),
}

impl Health {
    fn fail(&self, why: &str) {
        if let Ok(mut h) = self.failed.lock() {
            if h.is_none() {
                *h = Some(why.to_string());
            }
        }
    }

    /// A sync failed: the store is failed, and `on_sync_failure` hears of it (by default
    /// the process ends there).
    fn sync_failed(&self, why: &str) {
        self.fail(why);
        (self.on_sync_failure)(why);
    }

    fn check(&self) -> Result<()> {
        match self.failed.lock() {
            Ok(h) => match h.as_ref() {
                Some(why) => Err(Error::Failed(why.clone())),
                None => Ok(()),
            },
            Err(_) => Err(Error::Failed("health lock poisoned".into())),
        }
    }
}

/// Whether an SQLite error means the storage itself failed (I/O, a full disk, damage), as
/// opposed to a statement's own error.
fn is_storage_failure(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(SystemIoFailure | DiskFull | DatabaseCorrupt | NotADatabase | CannotOpen | ReadOnly)
    )
}

/// Whether an SQLite error is a failed fsync (of the WAL, the database or a directory).
fn is_sync_failure(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error().map(|e| e.extended_code),
        Some(rusqlite::ffi::SQLITE_IOERR_FSYNC | rusqlite::ffi::SQLITE_IOERR_DIR_FSYNC)
    )
}

fn ts(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn opt_ts(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(ts)
}

fn from_ts(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(s, 0).single().unwrap_or_default()
}

fn opt_from(s: Option<i64>) -> Option<DateTime<Utc>> {
    s.map(from_ts)
}

fn json_list(s: String) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(&s)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

fn json_value(s: Option<String>) -> rusqlite::Result<Option<StoredJson>> {
    s.map(serde_json::value::RawValue::from_string)
        .transpose()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// Process-wide SQLite settings, made once before the first connection opens (SQLite
/// accepts them only before it initializes). Its allocator: mimalloc (below). Memory
/// statistics off: with them on, every SQLite allocation and free takes one process-wide
/// mutex, which the writer, the checkpointer and the readers then contend for — about a
/// tenth of the writer's time under load. Nothing here reads those statistics.
pub(super) fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: both calls are made before any connection opens in this process (or they
        // return SQLITE_MISUSE and change nothing); SQLITE_CONFIG_MALLOC copies the struct,
        // whose functions stay valid for the life of the process.
        let methods = mimalloc_methods();
        let rc = unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MALLOC, &methods) };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite was already initialized; it keeps its own allocator.");
        }
        let rc = unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int) };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite was already initialized; its memory statistics stay on.");
        }
    });
}

/// SQLite's allocations from mimalloc (the process's allocator) rather than the C
/// library's `malloc`, which took a tenth of the writer's time under load. It costs memory:
/// the server's peak RSS under the load benchmark rose from ≈71 to ≈90 MB (BENCHMARKS.md).
fn mimalloc_methods() -> rusqlite::ffi::sqlite3_mem_methods {
    rusqlite::ffi::sqlite3_mem_methods {
        xMalloc: Some(sqlite_malloc),
        xFree: Some(sqlite_free),
        xRealloc: Some(sqlite_realloc),
        xSize: Some(sqlite_size),
        xRoundup: Some(sqlite_roundup),
        xInit: Some(sqlite_mem_init),
        xShutdown: Some(sqlite_mem_shutdown),
        pAppData: std::ptr::null_mut(),
    }
}

// Part of mimalloc's C library (linked through `libmimalloc-sys`), not of its bindings'
// default set.
extern "C" {
    fn mi_usable_size(p: *const std::ffi::c_void) -> usize;
    fn mi_good_size(size: usize) -> usize;
}

// SAFETY (all of these): SQLite calls them as `sqlite3_mem_methods` says — sizes are
// positive, pointers came from these functions. mimalloc aligns to 16 bytes (SQLite needs 8).
unsafe extern "C" fn sqlite_malloc(n: std::ffi::c_int) -> *mut std::ffi::c_void {
    unsafe { libmimalloc_sys::mi_malloc(n.max(0) as usize) }
}

unsafe extern "C" fn sqlite_free(p: *mut std::ffi::c_void) {
    unsafe { libmimalloc_sys::mi_free(p) }
}

unsafe extern "C" fn sqlite_realloc(p: *mut std::ffi::c_void, n: std::ffi::c_int) -> *mut std::ffi::c_void {
    unsafe { libmimalloc_sys::mi_realloc(p, n.max(0) as usize) }
}

unsafe extern "C" fn sqlite_size(p: *mut std::ffi::c_void) -> std::ffi::c_int {
    let n = unsafe { mi_usable_size(p) };
    std::ffi::c_int::try_from(n).unwrap_or(std::ffi::c_int::MAX)
}

unsafe extern "C" fn sqlite_roundup(n: std::ffi::c_int) -> std::ffi::c_int {
    let rounded = unsafe { mi_good_size(n.max(0) as usize) };
    std::ffi::c_int::try_from(rounded).unwrap_or(n)
}

unsafe extern "C" fn sqlite_mem_init(_: *mut std::ffi::c_void) -> std::ffi::c_int {
    rusqlite::ffi::SQLITE_OK
}

unsafe extern "C" fn sqlite_mem_shutdown(_: *mut std::ffi::c_void) {}

fn open(uri: &str, flags: OpenFlags, memory: bool) -> Result<Connection> {
    let conn = connect(uri, flags)?;
    configure(&conn, memory)?;
    Ok(conn)
}

/// A connection, before any statement has run on it.
fn connect(uri: &str, flags: OpenFlags) -> Result<Connection> {
    configure_sqlite();
    let mut conn = Connection::open_with_flags(uri, flags)?;
    conn.busy_handler(Some(wait_for_lock))?;
    Ok(conn)
}

fn configure(conn: &Connection, memory: bool) -> Result<()> {
    if !memory {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// The first connection to a database file: checked (`startup_check`) before anything
/// else runs on it, and unable to checkpoint on close until it passed — closing a
/// connection copies the WAL into the database file and deletes it, which on a damaged
/// database would change the very files the operator is told to keep.
fn open_checked(uri: &str, flags: OpenFlags, budget: std::time::Duration) -> Result<Connection> {
    use rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE as NO_CKPT_ON_CLOSE;
    let conn = connect(uri, flags).map_err(|e| open_error(uri, e))?;
    conn.set_db_config(NO_CKPT_ON_CLOSE, true)?;
    if !startup_check(&conn, uri, budget)? {
        tracing::warn!(
            database = %uri,
            budget_secs = budget.as_secs_f64(),
            "The integrity check at start did not finish in time; serving unchecked (limits.startup_check_secs)."
        );
    }
    configure(&conn, false).map_err(|e| open_error(uri, e))?;
    conn.set_db_config(NO_CKPT_ON_CLOSE, false)?;
    Ok(conn)
}

/// Retries a locked database every half millisecond for up to a minute. Another process
/// writing the same file (`replay`, `reconcile`, `simulate --apply` beside `serve`) holds
/// the write lock in batches a few milliseconds long with gaps of microseconds between
/// them: SQLite's own busy timeout backs off to 100 ms sleeps and would mostly miss the
/// gaps, so a command beside a loaded server failed with "database is locked".
fn wait_for_lock(attempt: i32) -> bool {
    const TRIES: i32 = 120_000;
    if attempt >= TRIES {
        return false;
    }
    std::thread::sleep(std::time::Duration::from_micros(500));
    true
}

/// `PRAGMA quick_check` within `budget`: `Ok(true)` if it passed, `Ok(false)` if it ran out
/// of time, `Err(Damaged)` with the recovery steps if the database is damaged.
fn startup_check(conn: &Connection, db: &str, budget: std::time::Duration) -> Result<bool> {
    if budget.is_zero() {
        return Ok(true);
    }
    // A watchdog interrupts the check once the budget is spent.
    let out_of_time = Arc::new(AtomicBool::new(false));
    let (finished, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let (interrupt, flag) = (conn.get_interrupt_handle(), out_of_time.clone());
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(budget) {
                flag.store(true, Ordering::SeqCst);
                interrupt.interrupt();
            }
        })
    };
    let result = (|| -> rusqlite::Result<Vec<String>> {
        let mut st = conn.prepare("PRAGMA quick_check(20)")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    })();
    drop(finished);
    let _ = watchdog.join();
    match result {
        Ok(lines) if lines == ["ok"] => Ok(true),
        Ok(lines) => Err(damaged(db, &lines.join("\n"))),
        Err(_) if out_of_time.load(Ordering::SeqCst) => Ok(false),
        Err(e) => Err(damaged(db, &e.to_string())),
    }
}

/// The refusal to serve from a damaged database, with what to do about it.
fn damaged(db: &str, findings: &str) -> Error {
    Error::Damaged(format!(
        "the database {db} is damaged; membersync will not serve from it.\n\
         SQLite's integrity check found:\n{findings}\n\
         To recover:\n\
         1. Stop every process using it and copy {db}, {db}-wal and {db}-shm aside, as they are.\n\
         2. Restore the latest backup, or rebuild what SQLite can still read:\n\
         \x20    sqlite3 {db} \".recover\" | sqlite3 recovered.db\n\
         \x20  then point `database:` (or MEMBERSYNC_DATABASE) at recovered.db.\n\
         3. Start membersync again, then run `membersync reconcile` to compare every membership\n\
         \x20  with the providers; deliveries it did not answer while down are resent by them."
    ))
}

/// Errors opening a file that is not a database, or is damaged, refuse with the recovery
/// steps; anything else stays as it is.
fn open_error(db: &str, e: Error) -> Error {
    match &e {
        Error::Db(m) if m.contains("malformed") || m.contains("not a database") => damaged(db, m),
        _ => e,
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating) the database at `path` (`:memory:` for a private
    /// in-memory one) and starts the writer thread.
    pub fn open(path: &str, opts: Options) -> Result<SqliteStore> {
        let memory = path == ":memory:";
        let uri = if memory {
            format!("file:membersync-{}?mode=memory&cache=shared", uuid::Uuid::new_v4())
        } else {
            path.strip_prefix("sqlite://").unwrap_or(path).to_string()
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let writer = match memory {
            true => open(&uri, flags, memory)?,
            false => open_checked(&uri, flags, opts.startup_check)?,
        };
        migrate(&mut open(&uri, flags, memory)?)?;
        // Each event runs in its own savepoint: keep its page copies in memory, not in a
        // temporary file.
        writer.pragma_update(None, "temp_store", "MEMORY")?;
        // A 32 MiB page cache (SQLite's default is 2 MiB): index pages a batch revisits are
        // read from memory, not from the file.
        writer.pragma_update(None, "cache_size", -32_768)?;
        // The writer commits without waiting for the disk; the syncer thread makes each
        // batch durable (fdatasync of the WAL) before any of its requests hears back, so the
        // next batch runs during the sync. A `:memory:` database has nothing to sync.
        let journal: String = writer.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
        let wal = match writer.path() {
            Some(db) if !memory && !db.is_empty() && journal.eq_ignore_ascii_case("wal") => {
                writer.pragma_update(None, "synchronous", "NORMAL")?;
                Some(std::path::PathBuf::from(format!("{db}-wal")))
            }
            // Anything else keeps SQLite's own sync on every commit.
            _ => None,
        };
        // Checkpoints: a checkpointer thread copies committed WAL pages into the database
        // file, with its syncs, off the writer's thread, at most every `checkpoint_interval`
        // (20 ms) while batches commit. Only a checkpoint by the writer lets its next batch
        // start the WAL over, so once the WAL holds `wal_restart_pages` pages and the
        // checkpointer has caught up, it asks the writer for one between batches: a batch
        // or two is left to copy. (Left to SQLite's own trigger, the writer checkpointed at
        // a page count whatever the checkpointer had not yet copied, up to 20 ms of
        // commits: a stall of several milliseconds, which set the p99.) SQLite's own
        // trigger stays as a backstop.
        let restart = Arc::new(AtomicBool::new(false));
        let health = Health { failed: Default::default(), on_sync_failure: opts.on_sync_failure };
        let checkpoints = match &wal {
            Some(_) => {
                let restart_pages = opts.wal_restart_pages.max(1);
                writer.pragma_update(None, "wal_autocheckpoint", 4 * restart_pages)?;
                let conn = open(&uri, flags, memory)?;
                let (wake, woken) = std::sync::mpsc::sync_channel(1);
                let restart = restart.clone();
                let interval = opts.checkpoint_interval;
                let health = health.clone();
                std::thread::Builder::new()
                    .name("membersync-ckpt".into())
                    .spawn(move || run_checkpointer(conn, woken, restart, restart_pages, interval, health))
                    .map_err(|e| Error::Db(format!("cannot start checkpointer: {e}")))?;
                Some(wake)
            }
            None => None,
        };
        let (sender, receiver) = mpsc::channel(opts.queue_capacity.max(1));
        let max_batch = opts.max_batch.max(1);
        let (committed, to_sync) = std::sync::mpsc::channel();
        let unsynced = Arc::new(AtomicUsize::new(0));
        let syncer = Syncer {
            wal,
            sync_wal: opts.sync_wal,
            health: health.clone(),
            checkpoints,
            unsynced: unsynced.clone(),
            writer: sender.downgrade(),
        };
        std::thread::Builder::new()
            .name("membersync-sync".into())
            .spawn(move || syncer.run(to_sync))
            .map_err(|e| Error::Db(format!("cannot start syncer: {e}")))?;
        std::thread::Builder::new()
            .name("membersync-writer".into())
            .spawn({
                let health = health.clone();
                move || run_writer(writer, receiver, max_batch, committed, unsynced, restart, health)
            })
            .map_err(|e| Error::Db(format!("cannot start writer: {e}")))?;
        let mut readers = Vec::new();
        for _ in 0..2 {
            readers.push(open(&uri, flags, memory)?);
        }
        Ok(SqliteStore { sender, readers: Mutex::new(readers), uri, flags, health })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.readers.lock().map_err(|_| Error::Closed)?.pop();
        let conn = match conn {
            Some(c) => c,
            None => open(&self.uri, self.flags, self.uri.contains("mode=memory"))?,
        };
        let r = f(&conn);
        if let Ok(mut pool) = self.readers.lock() {
            if pool.len() < 8 {
                pool.push(conn);
            }
        }
        r
    }
}

/// A private scratch database worked by the calling thread directly: no writer thread, no
/// syncs, no rollback journal. SQLite's anonymous temporary database, so what does not fit
/// its page cache spills to a file deleted on close rather than growing the process. What
/// a dry run re-derives state into; dropped afterwards.
pub struct Scratch {
    conn: Connection,
}

impl Scratch {
    /// Opens and migrates an empty scratch database.
    pub fn open() -> Result<Scratch> {
        configure_sqlite();
        let mut conn = Connection::open("")?;
        conn.pragma_update(None, "journal_mode", "OFF")?;
        conn.pragma_update(None, "synchronous", "OFF")?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "cache_size", -65_536)?;
        migrate(&mut conn)?;
        // Indexes only the admin API and reports read: a scratch is never asked.
        conn.execute_batch(
            "DROP INDEX events_status; DROP INDEX events_member; DROP INDEX events_event_id;
             DROP INDEX events_membership; DROP INDEX members_email_any;",
        )?;
        Ok(Scratch { conn })
    }

    /// Runs `f` in one transaction with the writer's kept statements. Without a journal
    /// nothing is rolled back: on an error the scratch is to be dropped.
    pub fn session<T, E: From<Error>>(
        &mut self,
        f: impl FnOnce(&mut dyn Tx) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut prepared = Prepared::new();
        self.conn.execute_batch("BEGIN").map_err(Error::from)?;
        let r = f(&mut SqliteTx { conn: &self.conn, prepared: Some(&mut prepared), lean: true })?;
        drop(prepared);
        self.conn.execute_batch("COMMIT").map_err(Error::from)?;
        Ok(r)
    }
}

/// A committed (or failed) batch on its way to the syncer: its callers and its result.
type Committed = (Vec<Done>, Result<()>);

/// Makes committed batches durable, in commit order: one `fdatasync` of the WAL covers
/// every batch committed before it started (SQLite wrote their frames with `pwrite`), and
/// only then are their callers told. This is the durability of `synchronous=FULL` — a
/// caller hears back only once its commit is on disk — without the writer waiting.
struct Syncer {
    wal: Option<std::path::PathBuf>,
    sync_wal: fn(&std::fs::File) -> std::io::Result<()>,
    health: Health,
    checkpoints: Option<std::sync::mpsc::SyncSender<()>>,
    /// Batches committed and not yet answered (the writer counts them up, this down).
    unsynced: Arc<AtomicUsize>,
    /// Told when the syncer caught up; weak, so a dropped store still ends the writer.
    writer: mpsc::WeakSender<Msg>,
}

impl Syncer {
    fn run(self, rx: std::sync::mpsc::Receiver<Committed>) {
        let mut file: Option<std::fs::File> = None;
        while let Ok(first) = rx.recv() {
            let mut batches = vec![first];
            batches.extend(rx.try_iter());
            let synced = match &self.wal {
                None => Ok(()),
                Some(path) if batches.iter().any(|(_, r)| r.is_ok()) => self.sync(path, &mut file),
                Some(_) => Ok(()),
            };
            // Once a sync has failed nothing is acknowledged again, whatever later syncs say.
            let synced = synced.and(self.health.check());
            if let Err(e) = &synced {
                tracing::error!(error = %e, "Batch committed but not synced; none of its requests is acknowledged.");
            }
            let n = batches.len();
            for (dones, result) in batches {
                let result = result.and(synced.clone());
                for done in dones {
                    done(result.clone());
                }
            }
            // Caught up: a writer holding its batch open for this can commit it now. (If
            // its queue is full it has jobs to run and sees the count when it looks.)
            if self.unsynced.fetch_sub(n, Ordering::AcqRel) == n {
                if let Some(writer) = self.writer.upgrade() {
                    let _ = writer.try_send(Msg::Synced);
                }
            }
            if let Some(wake) = &self.checkpoints {
                let _ = wake.try_send(());
            }
        }
    }

    /// One fdatasync of the WAL. The first time, the WAL is opened and its directory
    /// synced too, so that the file itself (created by SQLite at the first write) is
    /// there after a power loss. A failure marks the store failed and is reported to
    /// `on_failure` (which, by default, ends the process) before anyone hears back.
    fn sync(&self, path: &std::path::Path, file: &mut Option<std::fs::File>) -> Result<()> {
        let result = (|| -> std::io::Result<()> {
            if file.is_none() {
                let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                *file = Some(f);
            }
            match file {
                Some(f) => (self.sync_wal)(f),
                None => Ok(()),
            }
        })();
        result.map_err(|e| {
            let why = format!("cannot sync the WAL {}: {e}", path.display());
            self.health.sync_failed(&why);
            Error::Failed(why)
        })
    }
}

/// Copies the WAL into the database file (a passive checkpoint: it never blocks the writer
/// or readers) after batches were made durable, at most every `interval`. Ends with the
/// syncer. After an I/O error it marks the store failed and checkpoints no more, but keeps
/// its connection open until the store ends (the connection's shared lock on the file is
/// what tells another process that the WAL is in use).
fn run_checkpointer(
    conn: Connection,
    woken: std::sync::mpsc::Receiver<()>,
    restart: Arc<AtomicBool>,
    restart_pages: i64,
    interval: std::time::Duration,
    health: Health,
) {
    while woken.recv().is_ok() {
        let started = std::time::Instant::now();
        // (busy, pages in the WAL, pages copied)
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match done {
            Ok((_, pages, copied)) if pages >= restart_pages && copied == pages => {
                restart.store(true, Ordering::Release);
            }
            Ok(_) => {}
            Err(e) if is_storage_failure(&e) => {
                let e = storage_error(e, &health, "WAL checkpoint failed");
                tracing::error!(error = %e, "WAL checkpoint failed on an I/O error; the store takes no more writes.");
                while woken.recv().is_ok() {}
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "WAL checkpoint failed; the writer checkpoints at four times the restart size.")
            }
        }
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// Runs jobs in batches, one transaction each, every job in its own savepoint. A batch is
/// committed once no job is waiting and the previous batch is on disk: while the syncer
/// is busy the writer keeps the batch open and adds what arrives, so commits come no
/// faster than syncs and each carries its share of the pages every commit rewrites (the
/// rightmost page of each index, the database header) instead of a few events' worth. A
/// batch also ends at `max_batch` jobs (32 by default): with a few dozen requests in
/// flight, an uncapped batch gathers nearly all of them, and the writer, the syncer and the
/// request threads then take turns instead of working side by side.
///
/// A batch takes the write lock when it begins (`BEGIN IMMEDIATE`): another process
/// writing the same file then waits for it (see [`wait_for_lock`]) instead of failing at
/// its first write with a stale snapshot. After an I/O error (`health`) it runs nothing.
fn run_writer(
    conn: Connection,
    mut rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    committed: std::sync::mpsc::Sender<Committed>,
    unsynced: Arc<AtomicUsize>,
    restart: Arc<AtomicBool>,
    health: Health,
) {
    let mut prepared = Prepared::new();
    while let Some(msg) = rx.blocking_recv() {
        let Msg::Job(first) = msg else { continue };
        if health.check().is_err() {
            // Dropped unrun: its caller hears `Closed` (503), never an acknowledgement.
            drop(first);
            continue;
        }
        if restart.swap(false, Ordering::AcqRel) {
            // The checkpointer has copied nearly all of the WAL: copy the rest, so that
            // this batch starts the WAL over.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                let e = storage_error(e, &health, "WAL checkpoint before a batch failed");
                tracing::warn!(error = %e, "WAL checkpoint before a batch failed.");
                if health.check().is_err() {
                    drop(first);
                    continue;
                }
            }
        }
        let mut dones = Vec::new();
        let result = (|| -> Result<()> {
            let txn = rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| storage_error(e, &health, "the writer's transaction failed"))?;
            let mut tx = SqliteTx { conn: &conn, prepared: Some(&mut prepared), lean: false };
            let mut next = Some(first);
            while let Some(work) = next.take() {
                let step = |e| storage_error(e, &health, "the writer's transaction failed");
                tx.st("SAVEPOINT job")?.execute([]).map_err(step)?;
                let (ok, done) = work(&mut tx);
                if !ok {
                    tx.st("ROLLBACK TO job")?.execute([]).map_err(step)?;
                }
                tx.st("RELEASE job")?.execute([]).map_err(step)?;
                dones.push(done);
                while next.is_none() && dones.len() < max_batch {
                    let msg = match rx.try_recv() {
                        Ok(msg) => msg,
                        Err(mpsc::error::TryRecvError::Empty) if unsynced.load(Ordering::Acquire) > 0 => {
                            match rx.blocking_recv() {
                                Some(msg) => msg,
                                None => break,
                            }
                        }
                        Err(_) => break,
                    };
                    if let Msg::Job(w) = msg {
                        next = Some(w);
                    }
                }
            }
            txn.commit().map_err(|e| storage_error(e, &health, "the writer's transaction failed"))?;
            Ok(())
        })();
        if let Err(e) = &result {
            tracing::error!(error = %e, jobs = dones.len(), "Batch failed to commit; none of its requests is acknowledged.");
        }
        unsynced.fetch_add(1, Ordering::AcqRel);
        if committed.send((dones, result)).is_err() {
            return;
        }
        // A job taken but not run (an error before it) is dropped: its caller sees `Closed`.
    }
}

/// An error of the writer's transaction: one that means the storage failed marks the
/// store failed (and a failed sync is reported, which by default ends the process).
fn storage_error(e: rusqlite::Error, health: &Health, what: &str) -> Error {
    if is_storage_failure(&e) {
        let why = format!("{what}: {e}");
        if is_sync_failure(&e) {
            health.sync_failed(&why);
        } else {
            health.fail(&why);
        }
        return Error::Failed(why);
    }
    Error::from(e)
}

/// Statements the writer keeps prepared for its whole life, bindings and plan included.
/// rusqlite's statement cache clears a statement's bindings when it takes it back, and
/// SQLite then re-plans, on its next run, any statement whose plan looked at a bound value
/// (the partial index of parked events, the join of `member_by_customer`, the
/// `ORDER BY … LIMIT` of `member_by_email`): a full re-prepare per event, a fifth of the
/// writer's time under load. Every run binds every parameter, so keeping them is safe.
/// Keyed by where the SQL text lives (a `'static` string never moves or changes), so a
/// lookup hashes two words rather than the whole statement.
type Prepared<'c> = HashMap<(usize, usize), Statement<'c>>;

/// A statement from the writer's own set or, on a read connection, rusqlite's cache.
enum Stmt<'s, 'c> {
    Kept(&'s mut Statement<'c>),
    Cached(CachedStatement<'c>),
}

impl<'c> Deref for Stmt<'_, 'c> {
    type Target = Statement<'c>;
    fn deref(&self) -> &Statement<'c> {
        match self {
            Stmt::Kept(s) => s,
            Stmt::Cached(s) => s,
        }
    }
}

impl DerefMut for Stmt<'_, '_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Stmt::Kept(s) => s,
            Stmt::Cached(s) => s,
        }
    }
}

/// The writer's transaction (with its kept statements), or a read connection.
struct SqliteTx<'a, 'c> {
    conn: &'c Connection,
    prepared: Option<&'a mut Prepared<'c>>,
    /// A scratch database: event rows keep their body, headers and outcome only when
    /// parked (a later event runs them again); nothing else reads them back.
    lean: bool,
}

impl<'c> SqliteTx<'_, 'c> {
    fn reader(conn: &'c Connection) -> SqliteTx<'c, 'c> {
        SqliteTx { conn, prepared: None, lean: false }
    }

    fn st(&mut self, sql: &'static str) -> Result<Stmt<'_, 'c>> {
        let conn = self.conn;
        match self.prepared.as_deref_mut() {
            Some(kept) => {
                let st = match kept.entry((sql.as_ptr() as usize, sql.len())) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(conn.prepare(sql)?),
                };
                Ok(Stmt::Kept(st))
            }
            None => Ok(Stmt::Cached(conn.prepare_cached(sql)?)),
        }
    }
}

const EVENT_COLS: &str = "seq, tenant, provider, event_id, idempotency_key, event_type, kind, source, received_at, occurred_at, member_id, membership_id, status, reason, raw, headers, canonical, outcome, park_key, deliveries";
const MEMBER_COLS: &str = "id, tenant, email, name, flags, created_at, updated_at";
const MEMBERSHIP_COLS: &str = "id, tenant, member_id, provider, key, subscription_id, product_id, plan_id, status, state, period_end, grace_until, access_until, cancel_at_period_end, access_levels, flags, last_event_at, last_event_id, last_reconciled_at, sync_status, created_at, updated_at, last_event_rank";

// The writer's lookups that name their columns (built once; kept prepared by the writer).
static EVENT_BY_KEY: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {EVENT_COLS} FROM events WHERE tenant = ?1 AND provider = ?2 AND idempotency_key = ?3")
});
static PARKED: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {EVENT_COLS} FROM events WHERE tenant = ?1 AND provider = ?2 AND park_key IN (?3, '')")
});
static MEMBER_BY_ID: LazyLock<String> = LazyLock::new(|| format!("SELECT {MEMBER_COLS} FROM members WHERE id = ?1"));
static MEMBER_BY_CUSTOMER: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM members m JOIN member_customers c ON c.member_id = m.id
         WHERE c.tenant = ?1 AND c.provider = ?2 AND c.customer_id = ?3",
        MEMBER_COLS.split(", ").map(|c| format!("m.{c}")).collect::<Vec<_>>().join(", ")
    )
});
static MEMBER_BY_EMAIL: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {MEMBER_COLS} FROM members WHERE tenant = ?1 AND email_lc = ?2 ORDER BY created_at LIMIT 1")
});
static MEMBERSHIP_BY_ID: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE id = ?1"));
static MEMBERSHIP_BY_KEY: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE tenant = ?1 AND provider = ?2 AND key = ?3")
});
static MEMBERSHIPS_OF: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE member_id = ?1 ORDER BY created_at, id"));

fn event_row(r: &Row) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        seq: r.get(0)?,
        tenant: r.get(1)?,
        provider: r.get(2)?,
        event_id: r.get(3)?,
        idempotency_key: r.get(4)?,
        event_type: r.get(5)?,
        kind: r.get(6)?,
        source: r.get(7)?,
        received_at: from_ts(r.get(8)?),
        occurred_at: opt_from(r.get(9)?),
        member_id: r.get(10)?,
        membership_id: r.get(11)?,
        status: r.get(12)?,
        reason: r.get(13)?,
        raw: r.get(14)?,
        headers: json_value(r.get(15)?)?.unwrap_or_else(null_json),
        canonical: json_value(r.get(16)?)?,
        outcome: json_value(r.get(17)?)?.unwrap_or_else(null_json),
        park_key: r.get(18)?,
        deliveries: r.get(19)?,
    })
}

fn member_row(r: &Row) -> rusqlite::Result<MemberRow> {
    Ok(MemberRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        email: r.get(2)?,
        name: r.get(3)?,
        flags: json_list(r.get(4)?)?,
        created_at: from_ts(r.get(5)?),
        updated_at: from_ts(r.get(6)?),
    })
}

fn membership_row(r: &Row) -> rusqlite::Result<MembershipRow> {
    let state: String = r.get(9)?;
    Ok(MembershipRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        member_id: r.get(2)?,
        provider: r.get(3)?,
        key: r.get(4)?,
        subscription_id: r.get(5)?,
        product_id: r.get(6)?,
        plan_id: r.get(7)?,
        status: r.get(8)?,
        state: MState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                9,
                rusqlite::types::Type::Text,
                format!("unknown state {state}").into(),
            )
        })?,
        period_end: opt_from(r.get(10)?),
        grace_until: opt_from(r.get(11)?),
        access_until: opt_from(r.get(12)?),
        cancel_at_period_end: r.get(13)?,
        access_levels: json_list(r.get(14)?)?,
        flags: json_list(r.get(15)?)?,
        last_event_at: opt_from(r.get(16)?),
        last_event_id: r.get(17)?,
        last_reconciled_at: opt_from(r.get(18)?),
        sync_status: r.get(19)?,
        created_at: from_ts(r.get(20)?),
        updated_at: from_ts(r.get(21)?),
        last_event_rank: r.get(22)?,
    })
}

fn lead_row(r: &Row) -> rusqlite::Result<LeadRow> {
    Ok(LeadRow {
        tenant: r.get(0)?,
        email: r.get(1)?,
        name: r.get(2)?,
        provider: r.get(3)?,
        event_id: r.get(4)?,
        captured_at: from_ts(r.get(5)?),
        converted_at: opt_from(r.get(6)?),
        member_id: r.get(7)?,
    })
}

fn timer_row(r: &Row) -> rusqlite::Result<TimerRow> {
    Ok(TimerRow {
        tenant: r.get(0)?,
        membership_id: r.get(1)?,
        name: r.get(2)?,
        due_at: from_ts(r.get(3)?),
        set_by_event: r.get(4)?,
    })
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

impl Tx for SqliteTx<'_, '_> {
    fn event_by_key(&mut self, tenant: &str, provider: &str, key: &str) -> Result<Option<EventRow>> {
        Ok(self.st(&EVENT_BY_KEY)?.query_row(params![tenant, provider, key], event_row).optional()?)
    }

    fn note_duplicate(&mut self, seq: i64) -> Result<()> {
        self.st("UPDATE events SET deliveries = deliveries + 1 WHERE seq = ?1")?.execute([seq])?;
        Ok(())
    }

    fn retire_event(&mut self, seq: i64, note: &str) -> Result<bool> {
        let n = self
            .st("UPDATE events SET idempotency_key = idempotency_key || '#retired@' || seq, park_key = NULL,
                   status = 'replayed', reason = COALESCE(reason || ' — ', '') || ?2 WHERE seq = ?1")?
            .execute(params![seq, note])?;
        Ok(n > 0)
    }

    fn mark_replayed(&mut self, seq: i64, note: &str) -> Result<bool> {
        let n = self
            .st("UPDATE events SET idempotency_key = idempotency_key || '#retired@' || seq, park_key = NULL,
                   status = 'replayed', reason = COALESCE(reason || ' — ', '') || ?2
                 WHERE seq = ?1 AND status IN ('failed', 'refused', 'ignored')")?
            .execute(params![seq, note])?;
        Ok(n > 0)
    }

    fn parked(&mut self, tenant: &str, provider: &str, key: &str) -> Result<Vec<EventRow>> {
        // Two lookups in the partial index, almost always empty: ordered here rather than
        // by SQL, whose ORDER BY built a temporary B-tree for every event (8% of the writer).
        let mut rows = self
            .st(&PARKED)?
            .query_map(params![tenant, provider, key], event_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.sort_by_key(|e| (e.occurred_at, e.seq));
        Ok(rows)
    }

    fn insert_event(&mut self, e: &EventRow) -> Result<i64> {
        // A scratch keeps the body only of events it may run again (parked ones).
        let lean = self.lean && e.park_key.is_none();
        self.st(
                "INSERT INTO events (tenant, provider, event_id, idempotency_key, event_type, kind, source, received_at, occurred_at, member_id, membership_id, status, reason, raw, headers, canonical, outcome, park_key, deliveries)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
            )?
            .execute(params![
                e.tenant,
                e.provider,
                e.event_id,
                e.idempotency_key,
                e.event_type,
                e.kind,
                e.source,
                ts(e.received_at),
                opt_ts(e.occurred_at),
                e.member_id,
                e.membership_id,
                e.status,
                e.reason,
                if lean { &[][..] } else { &e.raw[..] },
                if lean { "[]" } else { e.headers.get() },
                if lean { None } else { e.canonical.as_ref().map(|c| c.get()) },
                if lean { "null" } else { e.outcome.get() },
                e.park_key,
                e.deliveries,
            ])?;
        Ok(self.conn.last_insert_rowid())
    }

    fn member(&mut self, id: &str) -> Result<Option<MemberRow>> {
        Ok(self.st(&MEMBER_BY_ID)?.query_row([id], member_row).optional()?)
    }

    fn member_by_customer(&mut self, tenant: &str, provider: &str, customer_id: &str) -> Result<Option<MemberRow>> {
        Ok(self.st(&MEMBER_BY_CUSTOMER)?.query_row(params![tenant, provider, customer_id], member_row).optional()?)
    }

    fn member_by_email(&mut self, tenant: &str, email: &str) -> Result<Option<MemberRow>> {
        Ok(self.st(&MEMBER_BY_EMAIL)?.query_row(params![tenant, email.to_lowercase()], member_row).optional()?)
    }

    fn save_member(&mut self, m: &MemberRow) -> Result<()> {
        self.st("INSERT INTO members (id, tenant, email, email_lc, name, flags, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (id) DO UPDATE SET email = excluded.email, email_lc = excluded.email_lc,
                   name = excluded.name, flags = excluded.flags, updated_at = excluded.updated_at")?
            .execute(params![
                m.id,
                m.tenant,
                m.email,
                m.email.as_ref().map(|e| e.to_lowercase()),
                m.name,
                to_json(&m.flags),
                ts(m.created_at),
                ts(m.updated_at)
            ])?;
        Ok(())
    }

    fn link_customer(&mut self, tenant: &str, provider: &str, customer_id: &str, member_id: &str) -> Result<()> {
        self.st("INSERT INTO member_customers (tenant, provider, customer_id, member_id) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING")?
            .execute(params![tenant, provider, customer_id, member_id])?;
        Ok(())
    }

    fn membership(&mut self, id: &str) -> Result<Option<MembershipRow>> {
        Ok(self.st(&MEMBERSHIP_BY_ID)?.query_row([id], membership_row).optional()?)
    }

    fn membership_by_key(&mut self, tenant: &str, provider: &str, key: &str) -> Result<Option<MembershipRow>> {
        Ok(self.st(&MEMBERSHIP_BY_KEY)?.query_row(params![tenant, provider, key], membership_row).optional()?)
    }

    fn memberships_of(&mut self, member_id: &str) -> Result<Vec<MembershipRow>> {
        let mut st = self.st(&MEMBERSHIPS_OF)?;
        let rows = st.query_map([member_id], membership_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn save_membership(&mut self, m: &MembershipRow) -> Result<()> {
        self.st(
                "INSERT INTO memberships (id, tenant, member_id, provider, key, subscription_id, product_id, plan_id, status, state,
                   period_end, grace_until, access_until, cancel_at_period_end, access_levels, flags, last_event_at, last_event_id,
                   last_reconciled_at, sync_status, created_at, updated_at, last_event_rank)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)
                 ON CONFLICT (id) DO UPDATE SET member_id = excluded.member_id, subscription_id = excluded.subscription_id,
                   product_id = excluded.product_id, plan_id = excluded.plan_id, status = excluded.status, state = excluded.state,
                   period_end = excluded.period_end, grace_until = excluded.grace_until, access_until = excluded.access_until,
                   cancel_at_period_end = excluded.cancel_at_period_end, access_levels = excluded.access_levels,
                   flags = excluded.flags, last_event_at = excluded.last_event_at, last_event_id = excluded.last_event_id,
                   last_reconciled_at = excluded.last_reconciled_at, sync_status = excluded.sync_status,
                   updated_at = excluded.updated_at, last_event_rank = excluded.last_event_rank",
            )?
            .execute(params![
                m.id,
                m.tenant,
                m.member_id,
                m.provider,
                m.key,
                m.subscription_id,
                m.product_id,
                m.plan_id,
                m.status,
                m.state.as_str(),
                opt_ts(m.period_end),
                opt_ts(m.grace_until),
                opt_ts(m.access_until),
                m.cancel_at_period_end,
                to_json(&m.access_levels),
                to_json(&m.flags),
                opt_ts(m.last_event_at),
                m.last_event_id,
                opt_ts(m.last_reconciled_at),
                m.sync_status,
                ts(m.created_at),
                ts(m.updated_at),
                m.last_event_rank,
            ])?;
        Ok(())
    }

    fn capture_lead(&mut self, l: &LeadRow) -> Result<()> {
        self.st(
                "INSERT INTO leads (tenant, email_lc, email, name, provider, event_id, captured_at, converted_at, member_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, NULL)
                 ON CONFLICT (tenant, email_lc) DO UPDATE SET name = COALESCE(excluded.name, leads.name),
                   provider = excluded.provider, event_id = excluded.event_id, captured_at = excluded.captured_at
                 WHERE leads.converted_at IS NULL",
            )?
            .execute(params![l.tenant, l.email.to_lowercase(), l.email, l.name, l.provider, l.event_id, ts(l.captured_at)])?;
        Ok(())
    }

    fn convert_lead(&mut self, tenant: &str, email: &str, member_id: &str, at: DateTime<Utc>) -> Result<bool> {
        let n = self
            .st(
                "UPDATE leads SET converted_at = ?4, member_id = ?3 WHERE tenant = ?1 AND email_lc = ?2 AND converted_at IS NULL",
            )?
            .execute(params![tenant, email.to_lowercase(), member_id, ts(at)])?;
        Ok(n > 0)
    }

    fn set_timer(&mut self, t: &TimerRow) -> Result<()> {
        self.st(
                "INSERT INTO timers (membership_id, name, tenant, due_at, set_by_event) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (membership_id, name) DO UPDATE SET due_at = excluded.due_at, set_by_event = excluded.set_by_event",
            )?
            .execute(params![t.membership_id, t.name, t.tenant, ts(t.due_at), t.set_by_event])?;
        Ok(())
    }

    fn cancel_timer(&mut self, membership_id: &str, name: &str) -> Result<()> {
        self.st("DELETE FROM timers WHERE membership_id = ?1 AND name = ?2")?.execute(params![membership_id, name])?;
        Ok(())
    }

    fn due_timers_tx(&mut self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TimerRow>> {
        let rows = self
            .st("SELECT tenant, membership_id, name, due_at, set_by_event FROM timers WHERE due_at <= ?1
                 ORDER BY due_at, membership_id, name LIMIT ?2")?
            .query_map(params![ts(now), limit as i64], timer_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn delete_timer_if_due(&mut self, membership_id: &str, name: &str, due_at: DateTime<Utc>) -> Result<bool> {
        let n = self
            .st("DELETE FROM timers WHERE membership_id = ?1 AND name = ?2 AND due_at = ?3")?
            .execute(params![membership_id, name, ts(due_at)])?;
        Ok(n > 0)
    }

    fn record_sync(&mut self, r: &SyncRecord) -> Result<()> {
        // Only the sync columns: a webhook applied meanwhile keeps everything else.
        self.st("UPDATE memberships SET sync_status = ?2,
                   last_reconciled_at = COALESCE(?3, last_reconciled_at) WHERE id = ?1")?
            .execute(params![r.membership_id, r.sync_status, opt_ts(r.reconciled_at)])?;
        self.st(
                "INSERT INTO membership_sync (membership_id, attempted_at, detail, drift_at, drift, last_error, last_error_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (membership_id) DO UPDATE SET attempted_at = excluded.attempted_at,
                   detail = excluded.detail,
                   drift_at = COALESCE(excluded.drift_at, membership_sync.drift_at),
                   drift = COALESCE(excluded.drift, membership_sync.drift),
                   last_error = COALESCE(excluded.last_error, membership_sync.last_error),
                   last_error_at = COALESCE(excluded.last_error_at, membership_sync.last_error_at)",
            )?
            .execute(params![
                r.membership_id,
                ts(r.attempted_at),
                r.detail,
                opt_ts(r.drift.as_ref().map(|d| d.0)),
                r.drift.as_ref().map(|d| d.1.clone()),
                r.error.as_ref().map(|e| e.1.clone()),
                opt_ts(r.error.as_ref().map(|e| e.0)),
            ])?;
        Ok(())
    }
}

/// The reconciliation detail of one membership, with its last webhook time.
fn sync_row(c: &Connection, membership_id: &str) -> Result<SyncRow> {
    let last_webhook_at: Option<i64> = c
        .prepare_cached("SELECT MAX(received_at) FROM events WHERE membership_id = ?1 AND source = 'webhook'")?
        .query_row([membership_id], |r| r.get(0))?;
    let row = c
        .prepare_cached(
            "SELECT attempted_at, detail, drift_at, drift, last_error, last_error_at FROM membership_sync
             WHERE membership_id = ?1",
        )?
        .query_row([membership_id], |r| {
            Ok(SyncRow {
                membership_id: membership_id.to_string(),
                attempted_at: opt_from(r.get(0)?),
                detail: r.get(1)?,
                drift_at: opt_from(r.get(2)?),
                drift: r.get(3)?,
                last_error: r.get(4)?,
                last_error_at: opt_from(r.get(5)?),
                last_webhook_at: None,
            })
        })
        .optional()?;
    let mut row = row.unwrap_or_else(|| SyncRow { membership_id: membership_id.to_string(), ..Default::default() });
    row.last_webhook_at = opt_from(last_webhook_at);
    Ok(row)
}

impl Store for SqliteStore {
    fn submit(&self, work: Work) -> Result<()> {
        self.health.check()?;
        self.sender.try_send(Msg::Job(work)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Busy,
            mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })
    }

    fn health(&self) -> Result<()> {
        self.health.check()
    }

    fn member_detail(&self, id: &str, recent: usize) -> Result<Option<MemberDetail>> {
        self.read(|c| {
            let mut tx = SqliteTx::reader(c);
            let Some(member) = tx.member(id)? else { return Ok(None) };
            let memberships = tx.memberships_of(id)?;
            let sql = format!("SELECT {EVENT_COLS} FROM events WHERE member_id = ?1 ORDER BY seq DESC LIMIT ?2");
            let recent_events = c
                .prepare_cached(&sql)?
                .query_map(params![id, recent as i64], event_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut timers = Vec::new();
            for m in &memberships {
                let mut st = c.prepare_cached(
                    "SELECT tenant, membership_id, name, due_at, set_by_event FROM timers WHERE membership_id = ?1 ORDER BY due_at",
                )?;
                timers.extend(st.query_map([&m.id], timer_row)?.collect::<rusqlite::Result<Vec<_>>>()?);
            }
            let mut sync = Vec::new();
            for m in &memberships {
                sync.push(sync_row(c, &m.id)?);
            }
            Ok(Some(MemberDetail { member, memberships, recent_events, timers, sync }))
        })
    }

    fn member(&self, id: &str) -> Result<Option<MemberRow>> {
        self.read(|c| Tx::member(&mut SqliteTx::reader(c), id))
    }

    fn members_with_memberships(&self, ids: &[String]) -> Result<Vec<(MemberRow, Vec<MembershipRow>)>> {
        // Two statements prepared once for the whole list (the cached ones would be
        // re-planned on every run, see `Prepared`).
        self.read(|c| {
            let (mut member, mut of) = (c.prepare(&MEMBER_BY_ID)?, c.prepare(&MEMBERSHIPS_OF)?);
            let mut out = Vec::new();
            for id in ids {
                if let Some(m) = member.query_row([id], member_row).optional()? {
                    let ms = of.query_map([id], membership_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
                    out.push((m, ms));
                }
            }
            Ok(out)
        })
    }

    fn memberships_of(&self, member_id: &str) -> Result<Vec<MembershipRow>> {
        self.read(|c| Tx::memberships_of(&mut SqliteTx::reader(c), member_id))
    }

    fn members_by_email(&self, email: &str) -> Result<Vec<MemberRow>> {
        self.read(|c| {
            let sql = format!("SELECT {MEMBER_COLS} FROM members WHERE email_lc = ?1 ORDER BY created_at");
            let rows = c
                .prepare_cached(&sql)?
                .query_map([email.to_lowercase()], member_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn events(&self, status: Option<&str>, tenant: Option<&str>, limit: usize) -> Result<Vec<EventRow>> {
        self.read(|c| {
            let mut conds = Vec::new();
            if let Some(status) = status {
                conds.push(("status = ?", Some(status.to_string().into())));
            }
            if let Some(tenant) = tenant {
                conds.push(("tenant = ?", Some(tenant.to_string().into())));
            }
            let (sql, values) = events_sql(conds, "DESC", Some(limit));
            let rows = c
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(values), event_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn events_by_event_id(&self, event_id: &str) -> Result<Vec<EventRow>> {
        self.read(|c| {
            let sql = format!("SELECT {EVENT_COLS} FROM events WHERE event_id = ?1 ORDER BY seq");
            let rows =
                c.prepare_cached(&sql)?.query_map([event_id], event_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn events_where(&self, f: &EventFilter) -> Result<Vec<EventRow>> {
        self.read(|c| {
            let (sql, values) = events_where_sql(f);
            let rows = c
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(values), event_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn leads(&self, tenant: Option<&str>) -> Result<Vec<LeadRow>> {
        self.read(|c| {
            let rows = c
                .prepare_cached(
                    "SELECT tenant, email, name, provider, event_id, captured_at, converted_at, member_id FROM leads
                     WHERE (?1 IS NULL OR tenant = ?1) ORDER BY captured_at DESC",
                )?
                .query_map([tenant], lead_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn due_timers(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TimerRow>> {
        self.read(|c| {
            let rows = c
                .prepare_cached(
                    "SELECT tenant, membership_id, name, due_at, set_by_event FROM timers WHERE due_at <= ?1
                     ORDER BY due_at, membership_id, name LIMIT ?2",
                )?
                .query_map(params![ts(now), limit as i64], timer_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn next_timer(&self) -> Result<Option<DateTime<Utc>>> {
        self.read(|c| {
            let v: Option<i64> = c.prepare_cached("SELECT MIN(due_at) FROM timers")?.query_row([], |r| r.get(0))?;
            Ok(opt_from(v))
        })
    }

    fn reconcile_queue(
        &self,
        targets: &[(String, String)],
        attempted_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<MembershipRow>> {
        if targets.is_empty() {
            return Ok(vec![]);
        }
        self.read(|c| {
            let cols = MEMBERSHIP_COLS.split(", ").map(|c| format!("m.{c}")).collect::<Vec<_>>().join(", ");
            let which = (0..targets.len())
                .map(|i| format!("(m.tenant = ?{} AND m.provider = ?{})", 3 + 2 * i, 4 + 2 * i))
                .collect::<Vec<_>>()
                .join(" OR ");
            let sql = format!(
                "SELECT {cols} FROM memberships m LEFT JOIN membership_sync s ON s.membership_id = m.id
                 WHERE ({which}) AND (s.attempted_at IS NULL OR s.attempted_at < ?1)
                 ORDER BY COALESCE(s.attempted_at, -1), m.id LIMIT ?2"
            );
            let mut args: Vec<rusqlite::types::Value> = vec![ts(attempted_before).into(), (limit as i64).into()];
            for (t, p) in targets {
                args.push(t.clone().into());
                args.push(p.clone().into());
            }
            let rows = c
                .prepare(&sql)?
                .query_map(rusqlite::params_from_iter(args), membership_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn customer_id(&self, tenant: &str, provider: &str, member_id: &str) -> Result<Option<String>> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT customer_id FROM member_customers WHERE tenant = ?1 AND provider = ?2 AND member_id = ?3
                 ORDER BY customer_id LIMIT 1",
            )?
            .query_row(params![tenant, provider, member_id], |r| r.get(0))
            .optional()?)
        })
    }

    fn sync_status_counts(&self) -> Result<Vec<(String, i64)>> {
        self.read(|c| {
            let rows = c
                .prepare_cached(
                    "SELECT sync_status, COUNT(*) FROM memberships GROUP BY sync_status ORDER BY sync_status",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn event_counts(&self) -> Result<Vec<(String, i64)>> {
        self.read(|c| {
            let rows = c
                .prepare_cached("SELECT status, COUNT(*) FROM events GROUP BY status ORDER BY status")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }
}

/// `SELECT … FROM events` under `conds` (each a test, with the value for its `?` if it has
/// one), in `seq` order (`ASC` or `DESC`), at most `limit` rows; and the values to bind.
/// Callers pass only the filters that are set: a statement is planned before its
/// parameters are bound, so a generic `(?1 IS NULL OR member_id = ?1)` would keep every
/// filter off its index (`explain` of one member read the whole events table). Each
/// distinct statement is kept by the connection's statement cache.
fn events_sql(
    conds: Vec<(&'static str, Option<rusqlite::types::Value>)>,
    order: &str,
    limit: Option<usize>,
) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = format!("SELECT {EVENT_COLS} FROM events");
    let mut values = Vec::new();
    for (i, (test, value)) in conds.into_iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        sql.push_str(test);
        values.extend(value);
    }
    sql.push_str(" ORDER BY seq ");
    sql.push_str(order);
    if let Some(n) = limit {
        sql.push_str(" LIMIT ?");
        values.push(rusqlite::types::Value::Integer(n as i64));
    }
    (sql, values)
}

/// The statement for an [`EventFilter`]: [`events_sql`] with the filters it sets, oldest first.
fn events_where_sql(f: &EventFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let set = [
        ("status = ?", f.status.clone().map(Value::Text)),
        ("received_at >= ?", f.since.map(|t| Value::Integer(ts(t)))),
        ("member_id = ?", f.member_id.clone().map(Value::Text)),
        ("seq = ?", f.seq.map(Value::Integer)),
        ("seq > ?", f.after_seq.map(Value::Integer)),
    ];
    let mut conds: Vec<_> = set.into_iter().filter_map(|(test, v)| Some((test, Some(v?)))).collect();
    if f.deliveries_only {
        conds.push(("source = 'webhook'", None));
    }
    events_sql(conds, "ASC", f.limit)
}

#[cfg(test)]
mod tests {
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
        }
    }

    /// Every combination of an [`EventFilter`]'s fields selects exactly the rows the
    /// filter describes, in `seq` order; and a filter on a member, a status or a `seq`
    /// reaches the rows through an index, not by reading the whole table.
    #[test]
    fn event_filters_select_what_they_say_through_an_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let statuses = ["applied", "flagged", "duplicate"];
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
                status: on(0).then(|| "flagged".to_string()),
                since: on(1).then(|| from_ts(1_200)),
                member_id: on(2).then(|| "m1".to_string()),
                seq: on(3).then_some(29),
                deliveries_only: on(4),
                after_seq: on(5).then_some(20),
                limit: on(6).then_some(3),
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
            SqliteStore::open(
                db.to_str().unwrap(),
                Options { queue_capacity: 1024, max_batch: 64, ..Options::default() },
            )
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
                            return Err(Error::Db(format!("job {i} refused")));
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
}
