//! The three threads behind the store: the writer (group commit, one savepoint per job),
//! the syncer (an `fdatasync` of the WAL before any caller of a batch hears back) and the
//! checkpointer. It must never answer a job before its batch is committed and synced.

use super::*;

/// A committed (or failed) batch on its way to the syncer: its callers and its result.
pub(super) type Committed = (Vec<Done>, Result<()>);

/// Makes committed batches durable, in commit order: one `fdatasync` of the WAL covers
/// every batch committed before it started (SQLite wrote their frames with `pwrite`), and
/// only then are their callers told. This is the durability of `synchronous=FULL` — a
/// caller hears back only once its commit is on disk — without the writer waiting.
pub(super) struct Syncer {
    pub(super) wal: Option<std::path::PathBuf>,
    /// The WAL, opened when the store opened (if SQLite had created it by then).
    pub(super) wal_file: Option<std::fs::File>,
    pub(super) sync_wal: fn(&std::fs::File) -> std::io::Result<()>,
    pub(super) health: Health,
    pub(super) checkpoints: Option<std::sync::mpsc::SyncSender<()>>,
    /// Batches committed and not yet answered (the writer counts them up, this down).
    pub(super) unsynced: Arc<AtomicUsize>,
    /// Told when the syncer caught up; weak, so a dropped store still ends the writer.
    pub(super) writer: mpsc::WeakSender<Msg>,
}

impl Syncer {
    pub(super) fn run(mut self, rx: std::sync::mpsc::Receiver<Committed>) {
        let mut file = self.wal_file.take();
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

    /// One fdatasync of the WAL (opened now if it was not when the store opened). A
    /// failure marks the store failed and is reported to `on_failure` (which, by default,
    /// ends the process) before anyone hears back.
    pub(super) fn sync(&self, path: &std::path::Path, file: &mut Option<std::fs::File>) -> Result<()> {
        let result = (|| -> std::io::Result<()> {
            if file.is_none() {
                *file = Some(open_wal(path)?);
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

/// Opens the WAL for the syncer and syncs its directory, so that the file itself is there
/// after a power loss. Done when the store opens: a descriptor held from then on keeps
/// working whatever later happens to the path.
pub(super) fn open_wal(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(f)
}

/// Copies the WAL into the database file (a passive checkpoint: it never blocks the writer
/// or readers) after batches were made durable, at most every `interval`. Ends with the
/// syncer. After an I/O error it marks the store failed and checkpoints no more, but keeps
/// its connection open until the store ends (the connection's shared lock on the file is
/// what tells another process that the WAL is in use).
pub(super) fn run_checkpointer(
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
pub(super) fn run_writer(
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
            while let Some(mut work) = next.take() {
                let step = |e| storage_error(e, &health, "the writer's transaction failed");
                tx.st("SAVEPOINT job")?.execute([]).map_err(step)?;
                // One writer: nothing else holds a member, so every job runs once.
                let ok = (work.run)(&mut tx);
                let done = work.done;
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
