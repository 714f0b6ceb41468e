//! The store's health: the I/O errors that mark it failed (sticky: no write is taken
//! or acknowledged after one), and what a failed sync does (by default, end the process).
//! It must never let a write be answered after its storage failed.

use super::*;

pub(super) fn sync_data(f: &std::fs::File) -> std::io::Result<()> {
    f.sync_data()
}

/// The default `on_sync_failure`: a failed fsync cannot be retried safely (the kernel may
/// have dropped the dirty pages and cleared the error), so the process stops; a restart
/// recovers from what the WAL really holds, and the providers resend what was not answered.
pub(super) fn exit_on_sync_failure(error: &str) {
    tracing::error!(%error, "A sync of the database failed: stopping. Nothing since the last good sync was acknowledged; restart to recover from the WAL.");
    // Also where no log is set up (a library user, a test binary): the process ends here.
    eprintln!("membersync: a sync of the database failed, exiting with status {EXIT_SYNC_FAILED}: {error}");
    std::process::exit(EXIT_SYNC_FAILED);
}

/// Set once the store hits an I/O error (sticky): from then on it takes no writes, acks
/// nothing, and `/healthz` says so. A failed sync is also reported to `on_sync_failure`.
#[derive(Clone)]
pub(super) struct Health {
    /// The first failure's reason; set once, read without a lock on every submit.
    pub(super) failed: Arc<std::sync::OnceLock<String>>,
    pub(super) on_sync_failure: fn(&str),
}

impl Health {
    pub(super) fn fail(&self, why: &str) {
        let _ = self.failed.set(why.to_string());
    }

    /// A sync failed: the store is failed, and `on_sync_failure` hears of it (by default
    /// the process ends there).
    pub(super) fn sync_failed(&self, why: &str) {
        self.fail(why);
        (self.on_sync_failure)(why);
    }

    pub(super) fn check(&self) -> Result<()> {
        match self.failed.get() {
            Some(why) => Err(Error::Failed(why.clone())),
            None => Ok(()),
        }
    }
}

/// Whether an SQLite error means the storage itself failed (I/O, a full disk, damage), as
/// opposed to a statement's own error.
pub(super) fn is_storage_failure(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(SystemIoFailure | DiskFull | DatabaseCorrupt | NotADatabase | CannotOpen | ReadOnly)
    )
}

/// Whether an SQLite error is a failed fsync (of the WAL, the database or a directory).
pub(super) fn is_sync_failure(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error().map(|e| e.extended_code),
        Some(rusqlite::ffi::SQLITE_IOERR_FSYNC | rusqlite::ffi::SQLITE_IOERR_DIR_FSYNC)
    )
}

/// An error of the writer's transaction: one that means the storage failed marks the
/// store failed (and a failed sync is reported, which by default ends the process).
pub(super) fn storage_error(e: rusqlite::Error, health: &Health, what: &str) -> Error {
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
