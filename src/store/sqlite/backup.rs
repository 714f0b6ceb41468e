//! Store stage: copies of the SQLite database. `backup` takes one consistent snapshot of the
//! database while `serve` keeps writing to it (SQLite's online backup API), checks the copy
//! and only then gives it the backup's name; `restore` puts a checked backup in place of
//! the database of a stopped service and keeps the files it replaces aside. `ServeLock`
//! (beside, in `lock`) is how `restore` knows that a `serve` is running.
//!
//! What this module must never do: write to the database it backs up; leave a file under
//! the backup's name that did not pass `PRAGMA integrity_check`; replace a database while
//! a `serve` runs on it, or with a file that is damaged, not a membersync database, or of
//! a newer schema than this binary knows; delete the files a restore replaces (they are
//! renamed aside).

use super::lock::ServeLock;
use super::open::{connect, wait_for_lock};
use super::MIGRATIONS;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a backup or a restore was refused or failed. Nothing was put in place on any of
/// them: a backup leaves no file under its name, a restore leaves the database as it was
/// (or, for `Io` while setting files aside, names what was moved).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database is PostgreSQL, which its own tools copy.
    #[error(
        "{database} is a PostgreSQL database: back it up with `pg_dump --format=custom --file=FILE URL` \
         and restore it with `pg_restore --dbname=URL FILE` (or `psql URL < FILE` for a plain-text dump)"
    )]
    Postgres { database: String },
    /// `:memory:` has nothing on disk.
    #[error("`:memory:` is a private in-memory database: there is no file to back up or restore into")]
    Memory,
    /// The database to back up does not exist.
    #[error(
        "no database at {0}: nothing was stored there yet (`database:` in the config, \
         MEMBERSYNC_DATABASE or --database names another)"
    )]
    NoDatabase(String),
    /// The backup's file exists and replacing it was not asked for.
    #[error("{0} exists: pass --force to replace it, or name another file")]
    Exists(String),
    /// The file named is the database itself.
    #[error("{0} is the database itself: name another file")]
    SameFile(String),
    /// The destination is a file kept beside the database.
    #[error(
        "{0} is a file kept beside the database (its write-ahead log, shared memory, journal or \
         serve lock), which the live database depends on: name another file"
    )]
    BesideDatabase(String),
    /// A copy failed SQLite's integrity check.
    #[error("{file} failed SQLite's integrity check, so it was not used:\n{findings}")]
    Damaged { file: String, findings: String },
    /// The file is not a membersync database (not SQLite, or without the store's tables).
    #[error("{file} is not a membersync database ({why}): name a file written by `membersync backup`")]
    NotMembersync { file: String, why: String },
    /// The file was written by a newer membersync, whose schema this binary does not know.
    #[error(
        "{file} was written by a newer membersync (schema version {found}; this one knows up to {known}): \
         restore it with that version or a later one"
    )]
    Newer { file: String, found: i64, known: i64 },
    /// The file has a write-ahead log beside it: a live database, not a backup.
    #[error(
        "{file} has a write-ahead log beside it ({file}-wal), whose commits a copy of the file alone \
         would lose: take a backup with `membersync backup --to FILE` and restore that"
    )]
    LiveWal { file: String },
    /// A `serve`, or a command that writes, holds the lock beside the database.
    #[error(
        "a `membersync serve` is running on {database}, or a command that writes to it (reconcile, replay, \
         rederive, prune, erase, simulate --apply; it holds {lock}): let such a command finish, or \
         stop it, then restore; nothing was changed"
    )]
    ServeRunning { database: String, lock: String },
    /// A `restore` holds the lock beside the database.
    #[error("a `membersync restore` into {database} is in progress (it holds {lock}): run this once it has finished")]
    Restoring { database: String, lock: String },
    /// The source database stayed locked for a minute.
    #[error("{0} stayed locked for a minute; nothing was copied. Try again")]
    Busy(String),
    /// A file operation failed.
    #[error("cannot {action} {path}: {message}")]
    Io { action: &'static str, path: String, message: String },
    /// SQLite failed.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a copy holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Contents {
    /// `PRAGMA user_version`: the number of migrations applied.
    pub schema_version: i64,
    pub events: i64,
    /// The highest event `seq` (0 without events).
    pub highest_seq: i64,
}

/// A finished backup.
#[derive(Debug, Clone)]
pub struct Copied {
    /// The database copied.
    pub database: PathBuf,
    pub file: PathBuf,
    pub bytes: u64,
    pub contents: Contents,
    pub took: Duration,
}

/// A finished restore.
#[derive(Debug, Clone)]
pub struct Restored {
    pub database: PathBuf,
    /// Where the files it replaced went (none when there was no database).
    pub kept_aside: Vec<PathBuf>,
    pub contents: Contents,
    pub took: Duration,
}

/// The database file `database` names (`sqlite://PATH` or a path); PostgreSQL and
/// `:memory:` have none.
pub fn database_file(database: &str) -> Result<PathBuf> {
    if crate::store::pg::is_postgres_url(database) {
        return Err(Error::Postgres { database: crate::store::pg::redacted(database) });
    }
    if database == ":memory:" {
        return Err(Error::Memory);
    }
    Ok(PathBuf::from(database.strip_prefix("sqlite://").unwrap_or(database)))
}

/// Copies the database into `to` (replacing it only when `force`), beside a running
/// `serve` or not: one snapshot into `to.partial`, checked, synced, then renamed to `to`.
pub fn backup(database: &str, to: &Path, force: bool) -> Result<Copied> {
    let started = Instant::now();
    let db = database_file(database)?;
    if !db.is_file() {
        return Err(Error::NoDatabase(db.display().to_string()));
    }
    if beside(&db, to) {
        return Err(Error::BesideDatabase(to.display().to_string()));
    }
    if to.exists() {
        if same_file(&db, to) {
            return Err(Error::SameFile(to.display().to_string()));
        }
        if !force {
            return Err(Error::Exists(to.display().to_string()));
        }
    }
    let partial = with_suffix(to, ".partial");
    // A leftover of a backup that was interrupted: never a file anyone was given.
    remove_sqlite_files(&partial)?;
    let contents = match copy_checked(&db, &partial) {
        Ok(c) => c,
        Err(e) => {
            let _ = remove_sqlite_files(&partial);
            return Err(e);
        }
    };
    sync_file(&partial)?;
    std::fs::rename(&partial, to).map_err(io("rename", &partial))?;
    sync_dir(to)?;
    let bytes = std::fs::metadata(to).map_err(io("read", to))?.len();
    Ok(Copied { database: db, file: to.to_path_buf(), bytes, contents, took: started.elapsed() })
}

/// The snapshot of `db` in `partial`, made a single self-contained file (rollback journal,
/// no WAL beside it) and checked.
fn copy_checked(db: &Path, partial: &Path) -> Result<Contents> {
    let src = open_source(db)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut dst = Connection::open_with_flags(partial, flags)?;
    snapshot(&src, &mut dst, db)?;
    src.close().map_err(|(_, e)| Error::from(e))?;
    let contents = check(&dst, partial)?;
    dst.pragma_update(None, "journal_mode", "DELETE")?;
    dst.close().map_err(|(_, e)| Error::from(e))?;
    Ok(contents)
}

/// A connection that only reads `db`: it creates nothing, runs no write (`query_only`) and
/// does not checkpoint when it closes (closing the last connection to a database would
/// otherwise copy its WAL into the file and delete it).
fn open_source(db: &Path) -> Result<Connection> {
    use rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE as NO_CKPT_ON_CLOSE;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = connect(&db.display().to_string(), flags)?;
    conn.set_db_config(NO_CKPT_ON_CLOSE, true)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

/// Copies every page of `src` into `dst` in ONE step, that is in one read transaction.
///
/// Why one step: between two steps of a few pages each the source is unlocked, and when
/// another connection writes to it in between (here `serve`'s writer, committing every few
/// milliseconds under load) the next step starts the copy over from the first page
/// (<https://www.sqlite.org/backup.html>, "the backup will be restarted by the next call to
/// sqlite3_backup_step()"). Under steady load a copy in small steps may never finish.
///
/// Why one step does not stop `serve`: the store is in WAL mode, where a reader does not
/// block the writer (<https://www.sqlite.org/wal.html>: "readers do not block writers and
/// a writer does not block readers"). The step's read transaction sees the database as of
/// the last commit before it began — one consistent snapshot — while `serve` goes on
/// appending commits to the WAL. What the copy does hold back: the checkpointer (passive)
/// cannot copy WAL frames past that snapshot into the database file, nor start the WAL
/// over, until the step ends; the WAL grows by what is committed meanwhile.
fn snapshot(src: &Connection, dst: &mut Connection, db: &Path) -> Result<()> {
    let backup = Backup::new(src, dst)?;
    let mut attempt = 0;
    loop {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            // Starting the read transaction found the file locked (a WAL recovery, say):
            // wait as every connection of the store waits, up to a minute.
            _ if wait_for_lock(attempt) => attempt += 1,
            _ => return Err(Error::Busy(db.display().to_string())),
        }
    }
}

/// `PRAGMA integrity_check` of the database on `conn` (the file `file`), and what it holds.
fn check(conn: &Connection, file: &Path) -> Result<Contents> {
    let name = file.display().to_string();
    let findings = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut st| st.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>());
    match findings {
        Ok(lines) if lines == ["ok"] => {}
        Ok(lines) => return Err(Error::Damaged { file: name, findings: lines.join("\n") }),
        Err(e) => return Err(not_readable(name, e)),
    }
    let schema_version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let tables: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('members', 'memberships', 'events')",
        [],
        |r| r.get(0),
    )?;
    if schema_version == 0 || tables < 3 {
        let why = format!("schema version {schema_version}, {tables} of the tables members, memberships, events");
        return Err(Error::NotMembersync { file: name, why });
    }
    let (events, highest_seq) =
        conn.query_row("SELECT count(*), coalesce(max(seq), 0) FROM events", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(Contents { schema_version, events, highest_seq })
}

/// A file SQLite cannot read as a database is not a membersync database; any other error
/// (a damaged one) stays what it is.
fn not_readable(file: String, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => Error::NotMembersync { file, why: "SQLite cannot read it".into() },
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => Error::Damaged { file, findings: e.to_string() },
        _ => e.into(),
    }
}

/// Puts the backup `from` in place of the database, which no `serve` may be running on:
/// a copy staged beside the database and checked, the database's files renamed aside,
/// the copy renamed into place. The next `serve` migrates it as at every start.
pub fn restore(from: &Path, database: &str) -> Result<Restored> {
    let started = Instant::now();
    let db = database_file(database)?;
    if !from.is_file() {
        return Err(Error::Io { action: "read", path: from.display().to_string(), message: "no such file".into() });
    }
    if db.exists() && same_file(from, &db) {
        return Err(Error::SameFile(from.display().to_string()));
    }
    if std::fs::metadata(with_suffix(from, "-wal")).is_ok_and(|m| m.len() > 0) {
        return Err(Error::LiveWal { file: from.display().to_string() });
    }
    // Held until the copy is in place: a `serve` starting meanwhile is refused.
    let _lock = ServeLock::for_restore(&db)?;
    let staged = with_suffix(&db, ".restoring");
    remove_sqlite_files(&staged)?;
    let contents = match stage(from, &staged) {
        Ok(c) => c,
        Err(e) => {
            let _ = remove_sqlite_files(&staged);
            return Err(e);
        }
    };
    let kept_aside = match set_aside(&db) {
        Ok(k) => k,
        Err(e) => {
            let _ = remove_sqlite_files(&staged);
            return Err(e);
        }
    };
    std::fs::rename(&staged, &db).map_err(io("rename", &staged))?;
    sync_dir(&db)?;
    Ok(Restored { database: db, kept_aside, contents, took: started.elapsed() })
}

/// `from` copied to `staged`, checked (errors name `from`), made a single file and synced.
fn stage(from: &Path, staged: &Path) -> Result<Contents> {
    std::fs::copy(from, staged).map_err(io("copy", from))?;
    let conn =
        Connection::open_with_flags(staged, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    let contents = check(&conn, staged).map_err(|e| named(e, from))?;
    let known = MIGRATIONS.len() as i64;
    if contents.schema_version > known {
        return Err(Error::Newer { file: from.display().to_string(), found: contents.schema_version, known });
    }
    // A backup written by `backup` has no WAL; a copy of a stopped database may say WAL in
    // its header: either way the file put in place stands alone.
    conn.pragma_update(None, "journal_mode", "DELETE")?;
    conn.close().map_err(|(_, e)| Error::from(e))?;
    sync_file(staged)?;
    Ok(contents)
}

/// `e` about the staged copy, told about the file the operator named.
fn named(e: Error, from: &Path) -> Error {
    let file = from.display().to_string();
    match e {
        Error::Damaged { findings, .. } => Error::Damaged { file, findings },
        Error::NotMembersync { why, .. } => Error::NotMembersync { file, why },
        other => other,
    }
}

/// Renames the database and its `-wal` and `-shm` to `DB.before-restore-<UTC time>`
/// (with the same suffixes), the main file first: should the process stop halfway, what is
/// left is no database (a new empty one at the next start) rather than the old one without
/// the commits its WAL held.
fn set_aside(db: &Path) -> Result<Vec<PathBuf>> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let mut aside = with_suffix(db, &format!(".before-restore-{stamp}"));
    let mut n = 1;
    while ["", "-wal", "-shm"].iter().any(|s| with_suffix(&aside, s).exists()) {
        n += 1;
        aside = with_suffix(db, &format!(".before-restore-{stamp}-{n}"));
    }
    let mut moved = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let file = with_suffix(db, suffix);
        if std::fs::symlink_metadata(&file).is_err() {
            continue;
        }
        let to = with_suffix(&aside, suffix);
        if let Err(e) = std::fs::rename(&file, &to) {
            let done = moved.iter().map(|p: &PathBuf| p.display().to_string()).collect::<Vec<_>>();
            let message = match done.is_empty() {
                true => e.to_string(),
                false => format!("{e} (already renamed aside: {}; rename them back to retry)", done.join(", ")),
            };
            return Err(Error::Io { action: "rename aside", path: file.display().to_string(), message });
        }
        moved.push(to);
    }
    Ok(moved)
}

/// Whether `a` and `b` are the same file (both exist).
/// Whether `file` is one SQLite (or `serve`) keeps beside database `db`: `-wal`, `-shm`,
/// `-journal`, `.serve-lock`, or the file `restore` stages. Compared by
/// directory (resolved) and name, since the file need not exist.
fn beside(db: &Path, file: &Path) -> bool {
    let dir_of = |p: &Path| {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::canonicalize(parent).ok()
    };
    let (Some(name), Some(file_name)) = (db.file_name(), file.file_name()) else { return false };
    if dir_of(db).is_none() || dir_of(db) != dir_of(file) {
        return false;
    }
    ["-wal", "-shm", "-journal", ".serve-lock", ".restoring"].iter().any(|suffix| {
        let mut n = name.to_os_string();
        n.push(suffix);
        n == file_name
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `path` with `suffix` appended to its file name (`m.db` + `-wal` = `m.db-wal`).
pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Removes `path` and the journal, WAL and shared memory SQLite may have left beside it.
fn remove_sqlite_files(path: &Path) -> Result<()> {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let file = with_suffix(path, suffix);
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", &file)(e)),
            _ => {}
        }
    }
    Ok(())
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io("sync", path))
}

/// Syncs the directory holding `path`, so that a rename into it survives a power cut.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io("sync", dir))
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |e| Error::Io { action, path, message: e.to_string() }
}
