//! Store stage: the lock that tells `restore` a `serve` (or a command that writes) is
//! running on a database. An advisory `flock(2)` on a file beside it, `DB.serve-lock`:
//! every `serve` holds it shared for its whole life, and so does each command that writes
//! (`reconcile`, `replay`, `rederive`, `prune`, `erase`, `simulate --apply`) while it runs,
//! since a file swapped under it would take its writes into the copy set aside; `restore`
//! takes it exclusive (without waiting) for as long as it replaces files. The kernel drops a
//! lock when its process ends, however it ends (even by `kill -9`), so a stale lock never
//! stops a restore.
//!
//! Shared rather than exclusive: the lock is there to keep `restore` away, not to decide
//! how many processes may use one file, which SQLite's own locking governs. Commands that
//! only read (`explain`, `mcp`, `backup`, dry runs) do not take it.
//!
//! What this module must never do: wait for the lock (a refusal names the reason at once),
//! or remove the lock file (a process holding it would then lock a file nobody else sees).

use super::backup::{database_file, with_suffix, Error, Result};
use std::path::{Path, PathBuf};

/// A held lock on `DB.serve-lock`; released when dropped, or when the process ends.
#[derive(Debug)]
pub struct ServeLock {
    _file: std::fs::File,
    pub path: PathBuf,
}

impl ServeLock {
    /// `serve`'s shared lock on `database`'s lock file; `None` for a database without a
    /// file (PostgreSQL, `:memory:`). Refused while a `restore` into it is in progress.
    pub fn for_serve(database: &str) -> Result<Option<ServeLock>> {
        let db = match database_file(database) {
            Ok(db) => db,
            Err(Error::Postgres { .. } | Error::Memory) => return Ok(None),
            Err(e) => return Err(e),
        };
        match take(&db, Mode::Shared)? {
            Some(lock) => Ok(Some(lock)),
            None => {
                Err(Error::Restoring { database: db.display().to_string(), lock: lock_path(&db).display().to_string() })
            }
        }
    }

    /// `restore`'s exclusive lock on `db`'s lock file; refused while any `serve` holds it.
    pub(super) fn for_restore(db: &Path) -> Result<ServeLock> {
        take(db, Mode::Exclusive)?.ok_or_else(|| Error::ServeRunning {
            database: db.display().to_string(),
            lock: lock_path(db).display().to_string(),
        })
    }
}

/// `DB.serve-lock`.
pub fn lock_path(db: &Path) -> PathBuf {
    with_suffix(db, ".serve-lock")
}

enum Mode {
    Shared,
    Exclusive,
}

/// The lock, or `None` when another process holds it in a mode that excludes `mode`.
fn take(db: &Path, mode: Mode) -> Result<Option<ServeLock>> {
    let path = lock_path(db);
    let io = |action, e: std::io::Error| Error::Io { action, path: path.display().to_string(), message: e.to_string() };
    // Opened close-on-exec (as std opens every file): a child process never inherits it.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io("create", e))?;
    if !flock(&file, mode).map_err(|e| io("lock", e))? {
        return Ok(None);
    }
    Ok(Some(ServeLock { _file: file, path }))
}

/// `flock(fd, LOCK_SH|LOCK_EX | LOCK_NB)`: `Ok(false)` when it would have to wait.
#[cfg(unix)]
fn flock(file: &std::fs::File, mode: Mode) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    };
    loop {
        // SAFETY: flock on a descriptor this function's caller owns for the call's length.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(false),
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Without `flock` there is no lock: `restore` cannot tell that a `serve` is running.
#[cfg(not(unix))]
fn flock(_file: &std::fs::File, _mode: Mode) -> std::io::Result<bool> {
    Ok(true)
}
