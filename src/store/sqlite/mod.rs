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
//!
//! Here: `Options`, `SqliteStore` (open, the read pool) and `Scratch`. Beside it:
//! `open` (connections, the startup check, migrations), `writer` (writer, syncer and
//! checkpointer threads), `health` (I/O failures, a failed sync), `tx` (`Tx`: the writes
//! and lookups of a job), `read` (`Store`: the reads), `alloc` (SQLite's allocator),
//! `backup` (`membersync backup` and `restore`), `lock` (`serve`'s lock beside the file).

mod alloc;
pub mod backup;
mod health;
pub mod lock;
mod open;
mod read;
#[cfg(test)]
mod tests;
mod tx;
mod writer;

use super::*;
use alloc::*;
use health::*;
use open::*;
use rusqlite::{params, CachedStatement, Connection, OpenFlags, OptionalExtension, Row, Statement};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use tokio::sync::mpsc;
use tx::*;
use writer::*;

const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/001_init.sql"),
    include_str!("../migrations/sqlite/002_reconcile.sql"),
    include_str!("../migrations/sqlite/003_ordering.sql"),
    include_str!("../migrations/sqlite/004_lookup_indexes.sql"),
    include_str!("../migrations/sqlite/005_payments.sql"),
    include_str!("../migrations/sqlite/006_enrichment.sql"),
    include_str!("../migrations/sqlite/007_console_sessions.sql"),
    include_str!("../migrations/sqlite/008_member_customers_index.sql"),
    include_str!("../migrations/sqlite/009_parked_by_member.sql"),
    include_str!("../migrations/sqlite/010_reconcile_leases.sql"),
    include_str!("../migrations/sqlite/011_retention_erasure.sql"),
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
    readers: Readers,
    uri: String,
    flags: OpenFlags,
    health: Health,
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
        // An 8 MiB page cache (SQLite's default is 2 MiB): the pages a batch revisits (the
        // right edges of the tables and indexes, a member's rows) stay in memory. 32 MiB gave
        // the same throughput in every load workload and 29 MB more peak RSS (BENCHMARKS.md,
        // 2026-12-02 issue 23).
        writer.pragma_update(None, "cache_size", -8_192)?;
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
                    .map_err(|e| Error::Thread(format!("cannot start checkpointer: {e}")))?;
                Some(wake)
            }
            None => None,
        };
        let (sender, receiver) = mpsc::channel(opts.queue_capacity.max(1));
        let max_batch = opts.max_batch.max(1);
        let (committed, to_sync) = std::sync::mpsc::channel();
        let unsynced = Arc::new(AtomicUsize::new(0));
        let wal_file = match &wal {
            Some(path) if path.exists() => Some(
                open_wal(path).map_err(|e| Error::File { path: path.display().to_string(), message: e.to_string() })?,
            ),
            _ => None,
        };
        let syncer = Syncer {
            wal,
            wal_file,
            sync_wal: opts.sync_wal,
            health: health.clone(),
            checkpoints,
            unsynced: unsynced.clone(),
            writer: sender.downgrade(),
        };
        std::thread::Builder::new()
            .name("membersync-sync".into())
            .spawn(move || syncer.run(to_sync))
            .map_err(|e| Error::Thread(format!("cannot start syncer: {e}")))?;
        std::thread::Builder::new()
            .name("membersync-writer".into())
            .spawn({
                let health = health.clone();
                move || run_writer(writer, receiver, max_batch, committed, unsynced, restart, health)
            })
            .map_err(|e| Error::Thread(format!("cannot start writer: {e}")))?;
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(open(&uri, flags, memory)?);
        }
        let readers = Readers { pool: Mutex::new(Pool { open: idle.len(), idle }), freed: Condvar::new() };
        Ok(SqliteStore { sender, readers, uri, flags, health })
    }

    /// Runs `f` on a reader connection: an idle one, a new one while fewer than
    /// `MAX_READERS` are open, else the next one freed (each holds open files: under load,
    /// reads wait their turn rather than take the descriptors the service accepts with).
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = {
            let mut pool = self.readers.pool.lock().map_err(|_| Error::Closed)?;
            loop {
                if let Some(c) = pool.idle.pop() {
                    break Some(c);
                }
                if pool.open < MAX_READERS {
                    pool.open += 1;
                    break None;
                }
                pool = self.readers.freed.wait(pool).map_err(|_| Error::Closed)?;
            }
        };
        let conn = match conn {
            Some(c) => c,
            None => match open(&self.uri, self.flags, self.uri.contains("mode=memory")) {
                Ok(c) => c,
                Err(e) => {
                    if let Ok(mut pool) = self.readers.pool.lock() {
                        pool.open -= 1;
                    }
                    self.readers.freed.notify_one();
                    return Err(e);
                }
            },
        };
        let r = f(&conn);
        if let Ok(mut pool) = self.readers.pool.lock() {
            pool.idle.push(conn);
        }
        self.readers.freed.notify_one();
        r
    }
}

/// Most reader connections open at once (each holds the database's, its WAL's and its
/// shared memory's descriptors).
pub const MAX_READERS: usize = 8;

/// The reader connections: those idle, how many are open, and a wake-up when one is freed.
struct Readers {
    pool: Mutex<Pool>,
    freed: Condvar,
}

struct Pool {
    idle: Vec<Connection>,
    open: usize,
}

/// Runs `f` in one transaction on a new private scratch database, dropped afterwards
/// (`Store::scratch` of either store: a dry run's scratch is never shared).
pub(crate) fn scratch(f: ScratchJob<'_>) -> Result<()> {
    Scratch::open()?.session(f)
}

/// A private scratch database worked by the calling thread directly: no writer thread, no
/// syncs, no rollback journal. SQLite's anonymous temporary database, so what does not fit
/// its page cache spills to a file deleted on close rather than growing the process. What
/// a dry run re-derives state into; dropped afterwards.
pub(super) struct Scratch {
    conn: Connection,
}

impl Scratch {
    /// Opens and migrates an empty scratch database.
    pub(super) fn open() -> Result<Scratch> {
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
    pub(super) fn session<T, E: From<Error>>(
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
