//! The shared PostgreSQL store: what several replicas of membersync write to together.
//! `--database postgres://…` (or `database:` in `membersync.yaml`) chooses it.
//!
//! Each replica keeps one writer thread with group commit, as on SQLite: a batch of jobs is
//! one transaction, each job in its own savepoint, and no caller hears back before the
//! commit returned (`synchronous_commit = on`: PostgreSQL flushed its WAL). The batches of
//! several replicas run side by side, never on the same member at once: each batch locks
//! the members its jobs reach, and the keys they look records up by, until it commits, and
//! a job that reaches one another replica's batch holds runs again after it (`locks`).
//! Whatever a job reads (is this delivery stored? which member has this email? which
//! timers are due?) is therefore what the jobs before it, on whichever replica, committed.
//! Dedupe still has the unique key behind it (`ON CONFLICT DO NOTHING RETURNING`).
//!
//! Reads (the admin API, reports, the timer task's look) use a small pool of connections
//! and never write. Migrations run under a session advisory lock: replicas that start
//! together migrate once. A dry run's scratch store is a private SQLite database, as on
//! SQLite: it is never shared.
//!
//! Here: `PgStore` (open, the read pool, the writer). Beside it: `tx` (`Tx`: the writes and
//! lookups of a job, each under its locks), `locks` (what a batch holds), `read` (`Store`:
//! the reads) and `copy` (`migrate-store`).

mod copy;
mod locks;
mod read;
mod tx;

pub use copy::{copy_sqlite_to_pg, Copied};

use super::*;
use locks::Locks;
use postgres::Client;
use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::mpsc;
use tx::*;

const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/001_init.sql"),
    include_str!("../migrations/postgres/002_retention_erasure.sql"),
];

/// The advisory lock every writer batch holds: shared by batches that lock the members
/// they reach (several run at once), exclusively by one that runs alone (see `locks`).
pub const WRITER_LOCK: i64 = 0x6d73_796e_6377_7269; // "msyncwri"
/// The advisory lock migrations run under.
pub const MIGRATION_LOCK: i64 = 0x6d73_796e_636d_6967; // "msyncmig"

/// Tuning for the writer and the read pool.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Jobs that may wait for the writer before new ones are refused (503).
    pub queue_capacity: usize,
    /// Most jobs committed in one transaction.
    pub max_batch: usize,
    /// Most read connections open at once.
    pub max_readers: usize,
    /// Longest a write's caller waits for its commit before it is answered with an error
    /// (503; the provider delivers again, and dedupe makes a late commit harmless). Past it,
    /// `/healthz` answers 503 too while the batch is still waiting.
    pub write_deadline: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queue_capacity: 4096,
            max_batch: 32,
            max_readers: 8,
            write_deadline: std::time::Duration::from_secs(30),
        }
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    sender: mpsc::Sender<Work>,
    readers: Readers,
    url: String,
    write_deadline: std::time::Duration,
    /// When the batch the writer is running began (ms since the epoch; 0: none is).
    batch_since: Arc<std::sync::atomic::AtomicI64>,
    stats: Arc<Stats>,
}

/// The writer's counts (`WriterStats`).
#[derive(Default)]
struct Stats {
    keyed: std::sync::atomic::AtomicU64,
    exclusive: std::sync::atomic::AtomicU64,
    reruns: std::sync::atomic::AtomicU64,
}

impl Stats {
    fn add(n: &std::sync::atomic::AtomicU64) {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn read(&self) -> WriterStats {
        use std::sync::atomic::Ordering::Relaxed;
        WriterStats {
            keyed_batches: self.keyed.load(Relaxed),
            exclusive_batches: self.exclusive.load(Relaxed),
            reruns: self.reruns.load(Relaxed),
        }
    }
}

/// Whether `database` names a PostgreSQL database (`postgres://…` or `postgresql://…`).
pub fn is_postgres_url(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

/// The URL without its password, for logs and errors: the one in its user part
/// (`user:***@`) and a `password=` parameter (`password=***`).
pub fn redacted(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let head = match (head.find("://"), head.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match head[scheme + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &head[..scheme + 3], &head[at..]),
            None => head.to_string(),
        },
        _ => head.to_string(),
    };
    match query {
        None => head,
        Some(q) => {
            let q = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect::<Vec<_>>()
                .join("&");
            format!("{head}?{q}")
        }
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        let message = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        };
        Error::Db { code: None, message }
    }
}

/// Runs `f` on a thread of its own: the blocking client runs a runtime of its own, which
/// must not be started on a thread that is driving async tasks (opening the store happens
/// in `main`'s).
fn off_runtime<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(f).join().unwrap_or_else(|_| Err(Error::Thread("a PostgreSQL connection thread panicked".into())))
    })
}

/// The file of extra certificate authorities to trust for the server's certificate (PEM).
pub const CA_ENV: &str = "MEMBERSYNC_DATABASE_CA";

/// TLS as the URL's `sslmode` asks (`prefer`, the default: when the server offers it;
/// `require`; `disable`), the server's certificate checked against the system's
/// certificate store and the authorities in `MEMBERSYNC_DATABASE_CA`, if set.
fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert); // one the system store holds that rustls cannot use: left out
    }
    if let Some(path) = std::env::var_os(CA_ENV).filter(|p| !p.is_empty()) {
        let shown = std::path::Path::new(&path).display().to_string();
        let bad = |e: &dyn std::fmt::Display| Error::File { path: shown.clone(), message: format!("{CA_ENV}: {e}") };
        let certs = CertificateDer::pem_file_iter(&path).map_err(|e| bad(&e))?;
        let mut n = 0;
        for cert in certs {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad(&"no certificate in the file"));
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Thread(format!("TLS set-up failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A new connection: `synchronous_commit` on whatever the server's default; times in UTC;
/// a wait for a lock (the writers' lock, a member another replica's batch holds) given up
/// after 30 s (a replica cut off mid-batch holds its locks until the server drops it: after
/// 60 s idle in its transaction), so a stuck replica turns the others' requests into errors
/// their providers retry, never into a hang.
pub fn connect(url: &str) -> Result<Client> {
    use std::time::Duration;
    let mut config: postgres::Config = url.parse().map_err(|e| Error::Db {
        code: None,
        message: format!("cannot read the PostgreSQL URL {}: {e}", redacted(url)),
    })?;
    // A server gone silent (a partition, a dead host) is noticed: data unacknowledged for
    // 30 s, or an idle connection whose keepalives go unanswered for ~25 s, closes it.
    config.keepalives(true).keepalives_idle(Duration::from_secs(10)).keepalives_interval(Duration::from_secs(5));
    config.keepalives_retries(3).tcp_user_timeout(Duration::from_secs(30));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    let mut client = config.connect(tls()?).map_err(|e| {
        let why = std::error::Error::source(&e).map(|s| format!("{e}: {s}")).unwrap_or_else(|| e.to_string());
        let hint = if why.contains("certificate") || why.contains("Certificate") {
            format!(" (a server certificate not trusted here: {CA_ENV}=ca.pem names its authority)")
        } else {
            String::new()
        };
        Error::Db { code: None, message: format!("cannot connect to PostgreSQL at {}: {why}{hint}", redacted(url)) }
    })?;
    client.batch_execute(
        "SET synchronous_commit = on; SET TIME ZONE 'UTC'; SET lock_timeout = '30s';
         SET idle_in_transaction_session_timeout = '60s'",
    )?;
    Ok(client)
}

/// Applies the migrations not yet applied, under the migration lock: replicas starting at
/// once wait for the first, which migrates; the others find nothing left to do. Each
/// migration is recorded with when it was applied.
pub fn migrate(client: &mut Client) -> Result<usize> {
    // However long another replica's migration takes: wait for it (no `lock_timeout`).
    client.batch_execute("SET lock_timeout = 0")?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let result = (|| -> Result<usize> {
        client.batch_execute(
            "CREATE TABLE IF NOT EXISTS membersync_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )?;
        let done: i32 = client.query_one("SELECT COALESCE(MAX(version), 0) FROM membersync_migrations", &[])?.get(0);
        if done as usize > MIGRATIONS.len() {
            return Err(newer_schema(i64::from(done), MIGRATIONS.len()));
        }
        let mut applied = 0;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(done.max(0) as usize) {
            let mut tx = client.transaction()?;
            tx.batch_execute(sql)?;
            tx.execute("INSERT INTO membersync_migrations (version) VALUES ($1)", &[&((i + 1) as i32)])?;
            tx.commit()?;
            applied += 1;
            tracing::info!(version = i + 1, "Migrated the PostgreSQL database.");
        }
        Ok(applied)
    })();
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    let applied = result?;
    unlocked?;
    client.batch_execute("SET lock_timeout = '30s'")?;
    Ok(applied)
}

impl PgStore {
    /// Connects to `url`, migrates it (once across replicas) and starts the writer thread.
    pub fn open(url: &str, opts: Options) -> Result<PgStore> {
        let (writer, idle) = off_runtime(|| {
            let mut writer = connect(url)?;
            migrate(&mut writer)?;
            let idle = vec![connect(url)?];
            Ok((writer, idle))
        })?;
        let (sender, receiver) = mpsc::channel(opts.queue_capacity.max(1));
        let max_batch = opts.max_batch.max(1);
        let writer_url = url.to_string();
        let batch_since = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let since = batch_since.clone();
        let stats = Arc::new(Stats::default());
        let counts = stats.clone();
        std::thread::Builder::new()
            .name("membersync-writer".into())
            .spawn(move || run_writer(writer, &writer_url, receiver, max_batch, &since, &counts))
            .map_err(|e| Error::Thread(format!("cannot start writer: {e}")))?;
        let readers = Readers {
            pool: Mutex::new(Pool { open: idle.len(), idle }),
            freed: Condvar::new(),
            max: opts.max_readers.max(1),
        };
        Ok(PgStore { sender, readers, url: url.to_string(), write_deadline: opts.write_deadline, batch_since, stats })
    }

    /// Runs `f` on a read connection: an idle one, a new one while fewer than the most are
    /// open, else the next one freed. A connection that broke is dropped, not returned; a
    /// read that failed because its idle connection had been dropped by the server (a
    /// failover, a restart) runs once more on a new one: reads change nothing.
    fn read<T>(&self, f: impl Fn(&mut Client) -> Result<T>) -> Result<T> {
        match self.read_once(&f) {
            Err((e, true)) => {
                tracing::warn!(error = %e, "A read connection was gone; reading again on a new one.");
                self.read_once(&f).map_err(|(e, _)| e)
            }
            r => r.map_err(|(e, _)| e),
        }
    }

    /// One try of `read`; an error says whether the connection it ran on was found closed.
    fn read_once<T>(&self, f: &impl Fn(&mut Client) -> Result<T>) -> std::result::Result<T, (Error, bool)> {
        let conn = {
            let mut pool = self.readers.pool.lock().map_err(|_| (Error::Closed, false))?;
            loop {
                if let Some(c) = pool.idle.pop() {
                    break Some(c);
                }
                if pool.open < self.readers.max {
                    pool.open += 1;
                    break None;
                }
                pool = self.readers.freed.wait(pool).map_err(|_| (Error::Closed, false))?;
            }
        };
        let pooled = conn.is_some();
        let conn = match conn {
            Some(c) if !c.is_closed() => Ok(c),
            _ => connect(&self.url),
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                self.readers.give_back(None);
                return Err((e, false));
            }
        };
        let r = f(&mut conn);
        let closed = conn.is_closed();
        self.readers.give_back((!closed).then_some(conn));
        r.map_err(|e| (e, closed && pooled))
    }
}

/// The read connections: those idle, how many are open, and a wake-up when one is freed.
struct Readers {
    pool: Mutex<Pool>,
    freed: Condvar,
    max: usize,
}

impl Readers {
    fn give_back(&self, conn: Option<Client>) {
        if let Ok(mut pool) = self.pool.lock() {
            match conn {
                Some(c) => pool.idle.push(c),
                None => pool.open -= 1,
            }
        }
        self.freed.notify_one();
    }
}

struct Pool {
    idle: Vec<Client>,
    open: usize,
}

impl Drop for PgStore {
    /// Closing a connection blocks on the client's own runtime, which must not happen on a
    /// thread driving async tasks (where the last handle on a store is often dropped): the
    /// idle connections are closed on a thread of their own.
    fn drop(&mut self) {
        let idle = match self.readers.pool.lock() {
            Ok(mut pool) => std::mem::take(&mut pool.idle),
            Err(_) => return,
        };
        if !idle.is_empty() {
            let _ = std::thread::Builder::new().name("membersync-pg-close".into()).spawn(move || drop(idle));
        }
    }
}

/// A job waiting for its batch, with what an earlier run of it reached.
struct Pending {
    work: Work,
    /// The lock ids its last run claimed: taken, in order, before its next run.
    learned: Vec<i64>,
    /// How many runs were rolled back for a lock another batch held.
    deferred: u32,
    /// Its last run reached what only an exclusive batch may do.
    exclusive: bool,
    /// How many batches set it aside, before it ran, for what another batch held.
    set_aside: u32,
}

/// A job set aside this many times makes its batch wait for what it needs (and hold up the
/// rest of the batch meanwhile): it cannot be passed over for ever.
const MOST_SET_ASIDE: u32 = 8;

/// How long a batch all of whose jobs need what other batches hold waits for it before
/// they are set aside (and the writer looks for jobs that can run), until one of them was
/// set aside `MOST_SET_ASIDE` times.
const PATIENCE: &str = "SET LOCAL lock_timeout = '200ms'";
/// The wait every statement of a batch may make (as `connect` sets it), back after
/// `PATIENCE`.
const PATIENCE_OVER: &str = "SET LOCAL lock_timeout = '30s'";

/// Runs after this many runs were rolled back: in an exclusive batch, which always
/// completes.
const MOST_DEFERRALS: u32 = 4;

impl Pending {
    fn new(work: Work) -> Pending {
        Pending { work, learned: Vec::new(), deferred: 0, exclusive: false, set_aside: 0 }
    }

    fn needs_exclusive(&self) -> bool {
        !self.work.rerun || self.exclusive || self.deferred >= MOST_DEFERRALS
    }
}

/// Whether `e` is the server's lock table found full (`out of shared memory`).
fn lock_table_full(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::OUT_OF_MEMORY)
}

/// The server's lock table was full when a keyed batch took what its jobs need: they run
/// again alone, where they take no record lock (and are not counted as set aside).
fn alone(batch: &mut Vec<Pending>, aside: &mut Vec<Pending>) {
    for mut p in batch.drain(..) {
        p.exclusive = true;
        aside.push(p);
    }
}

/// Runs jobs in batches, one transaction each, every job in its own savepoint; each caller
/// hears back once the commit returned (or failed: then none hears `Ok`). A batch is
/// exclusive or keyed (see `locks`): a job a keyed batch cannot finish (another replica's
/// batch holds a member it reached) is rolled back and runs again in the next batch. A
/// lost connection fails its batch and is opened again for the next.
fn run_writer(
    client: Client,
    url: &str,
    mut rx: mpsc::Receiver<Work>,
    max_batch: usize,
    since: &std::sync::atomic::AtomicI64,
    stats: &Stats,
) {
    let mut client = Some(client);
    let mut prepared = Prepared::new();
    let mut waiting: Vec<Pending> = Vec::new();
    loop {
        if waiting.is_empty() {
            match rx.blocking_recv() {
                Some(work) => waiting.push(Pending::new(work)),
                None => return,
            }
        }
        while waiting.len() < max_batch {
            match rx.try_recv() {
                Ok(work) => waiting.push(Pending::new(work)),
                Err(_) => break,
            }
        }
        let mut batch = std::mem::take(&mut waiting);
        // A job that would start by taking more than a job's most runs alone, as it would
        // on reaching them.
        for p in batch.iter_mut() {
            if p.work.hint.len() + p.learned.len() > locks::MOST_JOB_LOCKS {
                p.exclusive = true;
            }
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            prepared.clear();
            client = match connect(url) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(error = %e, jobs = batch.len(), "The writer cannot reach PostgreSQL; the jobs are not acknowledged.");
                    for p in batch {
                        (p.work.done)(Err(Error::Closed));
                    }
                    continue;
                }
            };
        }
        let Some(conn) = client.as_mut() else { continue };
        since.store(Utc::now().timestamp_millis(), std::sync::atomic::Ordering::Release);
        let exclusive = batch.iter().any(Pending::needs_exclusive);
        if !exclusive {
            // What a keyed batch takes at its start is bounded as what its jobs reach is
            // (`MOST_BATCH_LOCKS`): jobs past it wait for the next batch. (Jobs run again
            // take what their rolled-back runs learned, which together may be far more.)
            let mut ids: HashSet<i64> = HashSet::new();
            for p in std::mem::take(&mut batch) {
                let wants: HashSet<i64> = p.work.hint.iter().chain(&p.learned).copied().collect();
                if batch.is_empty() || ids.union(&wants).count() <= locks::MOST_BATCH_LOCKS {
                    ids.extend(wants);
                    batch.push(p);
                } else {
                    waiting.push(p);
                }
            }
        }
        Stats::add(if exclusive { &stats.exclusive } else { &stats.keyed });
        let mut ran: Vec<(Pending, bool)> = Vec::with_capacity(batch.len());
        let mut aside: Vec<Pending> = Vec::new();
        let result = (|| -> Result<()> {
            conn.batch_execute("BEGIN")?;
            let mut locks = match exclusive {
                true => {
                    let lock = prepared.get(conn, "SELECT pg_advisory_xact_lock($1)")?;
                    conn.execute(&lock, &[&WRITER_LOCK])?;
                    Locks::new(true, [])
                }
                false => {
                    let shared = prepared.get(conn, "SELECT pg_advisory_xact_lock_shared($1)")?;
                    conn.execute(&shared, &[&WRITER_LOCK])?;
                    let wants = |p: &Pending| p.work.hint.iter().chain(&p.learned).copied().collect::<Vec<i64>>();
                    let mut ids: Vec<i64> = batch.iter().flat_map(wants).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    // First without waiting: the jobs that need something another batch
                    // holds wait for a later batch, and the others run now, held up by
                    // none of it. Only when none could run (or one was set aside too
                    // often) does the batch wait, in a transaction of its own holding
                    // nothing yet, for everything, sorted: batches taking theirs in the
                    // same order never wait on each other in a circle.
                    let mut wait = batch.iter().any(|p| p.set_aside >= MOST_SET_ASIDE);
                    let mut briefly = false;
                    if !wait {
                        let try_all = prepared.get(
                            conn,
                            "SELECT id FROM unnest($1::BIGINT[]) AS id WHERE NOT pg_try_advisory_xact_lock(id)",
                        )?;
                        let busy: HashSet<i64> = match conn.query(&try_all, &[&ids]) {
                            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
                            Err(e) if lock_table_full(&e) => {
                                conn.batch_execute("ROLLBACK")?;
                                alone(&mut batch, &mut aside);
                                return Ok(());
                            }
                            Err(e) => return Err(e.into()),
                        };
                        if !busy.is_empty() {
                            let (ready, held_up): (Vec<Pending>, Vec<Pending>) =
                                batch.drain(..).partition(|p| !wants(p).iter().any(|id| busy.contains(id)));
                            match ready.is_empty() {
                                true => {
                                    batch = held_up;
                                    wait = true;
                                    conn.batch_execute("ROLLBACK; BEGIN")?;
                                    conn.execute(&shared, &[&WRITER_LOCK])?;
                                    // Briefly, at first: jobs that arrive meanwhile run
                                    // in the next batch rather than wait behind these.
                                    conn.batch_execute(PATIENCE)?;
                                    briefly = true;
                                }
                                false => {
                                    batch = ready;
                                    for mut p in held_up {
                                        p.set_aside += 1;
                                        aside.push(p);
                                    }
                                    ids.retain(|id| !busy.contains(id));
                                }
                            }
                        }
                    }
                    if wait {
                        let take = prepared
                            .get(conn, "SELECT count(pg_advisory_xact_lock(id)) FROM unnest($1::BIGINT[]) AS id")?;
                        match conn.execute(&take, &[&ids]) {
                            // The jobs' own statements wait as long as any (a row another
                            // batch holds), not the brief wait's time.
                            Ok(_) if briefly => conn.batch_execute(PATIENCE_OVER)?,
                            Ok(_) => {}
                            Err(e) if briefly && e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                                conn.batch_execute("ROLLBACK")?;
                                for mut p in batch.drain(..) {
                                    p.set_aside += 1;
                                    aside.push(p);
                                }
                                return Ok(());
                            }
                            Err(e) if lock_table_full(&e) => {
                                conn.batch_execute("ROLLBACK")?;
                                alone(&mut batch, &mut aside);
                                return Ok(());
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Locks::new(false, ids)
                }
            };
            for mut p in batch.drain(..) {
                conn.batch_execute("SAVEPOINT job")?;
                locks.start_job();
                let ok = {
                    let mut tx = PgTx { conn: &mut *conn, prepared: &mut prepared, locks: Some(&mut locks) };
                    (p.work.run)(&mut tx)
                };
                let again = locks.job.contended || locks.job.needs_exclusive;
                if !ok || again {
                    conn.batch_execute("ROLLBACK TO SAVEPOINT job")?;
                }
                conn.batch_execute("RELEASE SAVEPOINT job")?;
                let job = locks.end_job(!ok || again);
                if again {
                    Stats::add(&stats.reruns);
                    p.learned = job.claimed;
                    p.deferred += 1;
                    p.exclusive |= job.needs_exclusive;
                }
                ran.push((p, again));
            }
            conn.batch_execute("COMMIT")?;
            Ok(())
        })();
        if let Err(e) = &result {
            tracing::error!(error = %e, jobs = ran.len(), "Batch failed to commit; none of its requests is acknowledged.");
            // Whatever state the connection is in, nothing of the batch stays.
            if conn.batch_execute("ROLLBACK").is_err() {
                client = None;
            }
        }
        since.store(0, std::sync::atomic::Ordering::Release);
        // Jobs the batch never reached (an error before them) are dropped: their callers
        // hear `Closed`.
        drop(batch);
        // Set aside before it ran (what it needs was held): it waits, whatever became of the
        // batch.
        waiting.append(&mut aside);
        for (p, again) in ran {
            match (&result, again) {
                (Ok(()), true) => waiting.push(p),
                _ => (p.work.done)(result.clone()),
            }
        }
        if !waiting.is_empty() {
            tracing::debug!(jobs = waiting.len(), "Jobs another replica's batch held a member of run again.");
        }
    }
}
