//! Opening connections: the first one checked (`PRAGMA quick_check`, bounded) before any
//! other statement and unable to checkpoint until it passed; the busy handler; the
//! migrations. It must never write to a database it has not checked.

use super::*;

pub(super) fn open(uri: &str, flags: OpenFlags, memory: bool) -> Result<Connection> {
    let conn = connect(uri, flags)?;
    configure(&conn, memory)?;
    Ok(conn)
}

/// A connection, before any statement has run on it.
pub(super) fn connect(uri: &str, flags: OpenFlags) -> Result<Connection> {
    configure_sqlite();
    let mut conn = Connection::open_with_flags(uri, flags)?;
    conn.busy_handler(Some(wait_for_lock))?;
    Ok(conn)
}

pub(super) fn configure(conn: &Connection, memory: bool) -> Result<()> {
    if !memory {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    add_functions(conn)?;
    Ok(())
}

/// `ms_lower(text)`: lower case as Rust knows it, every script (SQLite's `lower` knows
/// ASCII only), so a search matches `Émile` as it matches `emile`.
pub(super) fn add_functions(conn: &Connection) -> Result<()> {
    use rusqlite::functions::FunctionFlags;
    conn.create_scalar_function(
        "ms_lower",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| Ok(ctx.get::<Option<String>>(0)?.map(|s| s.to_lowercase())),
    )?;
    Ok(())
}

/// The first connection to a database file: checked (`startup_check`) before anything
/// else runs on it, and unable to checkpoint on close until it passed — closing a
/// connection copies the WAL into the database file and deletes it, which on a damaged
/// database would change the very files the operator is told to keep.
pub(super) fn open_checked(uri: &str, flags: OpenFlags, budget: std::time::Duration) -> Result<Connection> {
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
pub(super) fn wait_for_lock(attempt: i32) -> bool {
    const TRIES: i32 = 120_000;
    if attempt >= TRIES {
        return false;
    }
    std::thread::sleep(std::time::Duration::from_micros(500));
    true
}

/// `PRAGMA quick_check` within `budget`: `Ok(true)` if it passed, `Ok(false)` if it ran out
/// of time, `Err(Damaged)` with the recovery steps if the database is damaged.
pub(super) fn startup_check(conn: &Connection, db: &str, budget: std::time::Duration) -> Result<bool> {
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
pub(super) fn damaged(db: &str, findings: &str) -> Error {
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
pub(super) fn open_error(db: &str, e: Error) -> Error {
    match &e {
        // SQLITE_CORRUPT and SQLITE_NOTADB, with any extended code.
        Error::Db { code: Some(c), message } if matches!(c & 0xff, 11 | 26) => damaged(db, message),
        _ => e,
    }
}

pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > MIGRATIONS.len() as i64 {
        return Err(super::super::newer_schema(version, MIGRATIONS.len()));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
