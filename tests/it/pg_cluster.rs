//! A throwaway PostgreSQL cluster for the tests of the shared store, on loopback: Debian's
//! `postgresql` (installed as `.ci/run` does when missing), `initdb` into a temporary
//! directory (as the `postgres` user when running as root: initdb refuses root), one
//! server for the whole test binary with `fsync=off` (tests only: nothing here outlives
//! the run), one migrated template database, and a fresh database cloned from it per test.
//! The server stops when the test binary ends (it is told by the kernel: the thread that
//! started it lives as long as the process). `MEMBERSYNC_TEST_POSTGRES=postgres://…`
//! names a server of one's own instead (its user must be able to create databases).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The server: how to reach it as its superuser.
struct Cluster {
    /// `postgres://user@host:port` (no database).
    base: String,
    /// The certificate the server presents (self-signed, for 127.0.0.1), when it offers TLS.
    ca: Option<PathBuf>,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

const TEMPLATE: &str = "membersync_template";

/// The cluster, started by the first test that asks (on a thread of its own: tests run
/// inside tokio, and the blocking client runs a runtime of its own).
fn cluster() -> &'static Cluster {
    CLUSTER
        .get_or_init(|| {
            std::thread::spawn(start).join().unwrap_or_else(|_| Err("starting the cluster panicked".into()))
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The URL of a new, migrated, empty database of its own.
pub fn fresh_database() -> String {
    create_database("t", TEMPLATE)
}

/// A second server of its own (started by the first test that asks) whose shared lock
/// table is small: `max_connections=20`, `max_locks_per_transaction=10` (room for a few
/// hundred locks, where a production default holds some thousands): what a job that locks
/// more than the table holds meets, without starving the other tests' server. The URL of a
/// new, migrated, empty database on it.
pub fn small_lock_table_database() -> String {
    static SMALL: OnceLock<Result<String, String>> = OnceLock::new();
    let base = SMALL
        .get_or_init(|| {
            std::thread::spawn(|| {
                let (base, _) = start_own(
                    "-small",
                    &["max_connections=20", "max_locks_per_transaction=10", "max_wal_senders=0", "wal_level=minimal"],
                )?;
                make_template(&base)?;
                Ok(base)
            })
            .join()
            .unwrap_or_else(|_| Err("starting the small cluster panicked".into()))
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let name = format!("s{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
    query(&format!("{base}/postgres?sslmode=disable"), |c| {
        c.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
    })
    .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e}"));
    format!("{base}/{name}?sslmode=disable")
}

/// The URL of a new database with nothing in it (not even the schema).
pub fn empty_database() -> String {
    create_database("e", "template0")
}

/// A new database's URL, without TLS (`tls_url` makes one that requires it).
fn create_database(prefix: &str, template: &str) -> String {
    let cluster = cluster();
    let name = format!("{prefix}{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
    let admin = format!("{}/postgres?sslmode=disable", cluster.base);
    query(&admin, |c| c.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}")))
        .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e}"));
    format!("{}/{name}?sslmode=disable", cluster.base)
}

/// `url` asking for TLS, and the certificate of the authority that signed the server's
/// (`MEMBERSYNC_TEST_POSTGRES_CA` with a server of one's own).
pub fn tls_url(url: &str) -> (String, PathBuf) {
    let ca = cluster().ca.clone().expect(
        "the test cluster offers TLS; with MEMBERSYNC_TEST_POSTGRES, set MEMBERSYNC_TEST_POSTGRES_CA to its authority's certificate",
    );
    (url.replace("sslmode=disable", "sslmode=require"), ca)
}

/// A blocking client on `url`, on a thread of its own (tests run inside tokio).
pub fn query<T: Send>(url: &str, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut c = postgres::Client::connect(url, postgres::NoTls).expect("the test database answers");
            f(&mut c)
        })
        .join()
        .unwrap()
    })
}

fn start() -> Result<Cluster, String> {
    let (base, ca) = match std::env::var("MEMBERSYNC_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => {
            (url.trim_end_matches('/').to_string(), std::env::var_os("MEMBERSYNC_TEST_POSTGRES_CA").map(PathBuf::from))
        }
        _ => start_own("", &[])?,
    };
    make_template(&base)?;
    Ok(Cluster { base, ca })
}

/// The directory of Debian's PostgreSQL binaries (the newest installed), installing
/// `postgresql` when there is none.
fn bin_dir() -> Result<PathBuf, String> {
    let find = || -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|d| d.join("initdb").exists() && d.join("postgres").exists())
            .collect();
        dirs.sort_by_key(|d| {
            d.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
        });
        dirs.pop()
    };
    if let Some(d) = find() {
        return Ok(d);
    }
    let root = unsafe { libc::geteuid() } == 0;
    let sudo = if root { "" } else { "sudo -n " };
    let script =
        format!("{sudo}apt-get update -q && DEBIAN_FRONTEND=noninteractive {sudo}apt-get install -y -q postgresql");
    let ok = Command::new("sh").args(["-c", &script]).stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    match (ok, find()) {
        (true, Some(d)) => Ok(d),
        _ => Err(format!("the shared-store tests need PostgreSQL: install Debian's `postgresql` (`{script}` failed)")),
    }
}

/// The uid and gid to run the server as: the `postgres` user when running as root (made
/// when missing), else none (the current user).
fn run_as() -> Result<Option<(u32, u32)>, String> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let lookup = || {
        let name = std::ffi::CString::new("postgres").unwrap();
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        (!pw.is_null()).then(|| unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
    };
    if lookup().is_none() {
        let _ = Command::new("useradd").args(["--system", "--no-create-home", "postgres"]).status();
    }
    lookup().map(Some).ok_or_else(|| "no `postgres` user to run the test cluster as".to_string())
}

fn as_user(cmd: &mut Command, who: Option<(u32, u32)>, die_with_parent: bool) {
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = who {
                if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the change of user, which clears it: the server gets SIGQUIT (an
            // immediate stop) when the thread that started it, alive as long as the test
            // binary, ends.
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Leftovers of earlier runs whose process is gone (a run killed before its end).
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("membersync-test-pg-")
            .map(|p| p.trim_end_matches(|c: char| !c.is_ascii_digit()))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A test authority and, signed by it, the server's certificate for 127.0.0.1 and its key
/// (`openssl`); returns the authority's certificate.
fn make_certificate(dir: &Path, who: Option<(u32, u32)>) -> Result<PathBuf, String> {
    let script = "set -e
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=membersync-test-ca -keyout ca.key -out ca.crt
        openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr
        printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > server.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.crt
        chmod 600 server.key";
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .map_err(|e| format!("openssl did not run: {e}"))?;
    if !out.status.success() {
        return Err(format!("making the test certificates failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    if let Some((uid, gid)) = who {
        for f in ["server.crt", "server.key"] {
            std::os::unix::fs::chown(dir.join(f), Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
    }
    Ok(dir.join("ca.crt"))
}

fn start_own(tag: &str, settings: &[&str]) -> Result<(String, Option<PathBuf>), String> {
    let bin = bin_dir()?;
    let who = run_as()?;
    let parent = std::env::temp_dir();
    remove_stale(&parent);
    let dir = parent.join(format!("membersync-test-pg-{}{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    if let Some((uid, gid)) = who {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| format!("cannot chown the cluster: {e}"))?;
    }
    let data = dir.join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "membersync", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_user(&mut initdb, who, false);
    let out = initdb.output().map_err(|e| format!("initdb did not run: {e}"))?;
    if !out.status.success() {
        return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?.port()
    };
    let ca = make_certificate(&dir, who)?;
    let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
    if let Some((uid, gid)) = who {
        let _ = std::os::unix::fs::chown(dir.join("server.log"), Some(uid), Some(gid));
    }
    let mut server = Command::new(bin.join("postgres"));
    server
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(&dir)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
        // Tests only: a crash of this machine loses nothing anyone needs.
        .args(["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=400"])
        .args(settings.iter().flat_map(|kv| ["-c", kv]))
        .args(["-c", "ssl=on", "-c"])
        .arg(format!("ssl_cert_file={}", dir.join("server.crt").display()))
        .arg("-c")
        .arg(format!("ssl_key_file={}", dir.join("server.key").display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    as_user(&mut server, who, true);
    let (started, wait) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-postgres".into())
        .spawn(move || {
            let child = server.spawn();
            let ok = child.is_ok();
            let _ = started.send(child.map(|_| ()).map_err(|e| e.to_string()));
            // Lives as long as the process: its end is the server's signal to stop.
            if ok {
                loop {
                    std::thread::park();
                }
            }
        })
        .map_err(|e| e.to_string())?;
    wait.recv().map_err(|e| e.to_string())?.map_err(|e| format!("the test PostgreSQL did not start: {e}"))?;
    let base = format!("postgres://membersync@127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match postgres::Client::connect(&format!("{base}/postgres?sslmode=disable"), postgres::NoTls) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                return Err(format!("the test PostgreSQL did not answer: {e}\n{log}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    Ok((base, Some(ca)))
}

/// The template every test's database is cloned from: migrated once, then left without
/// connections (a template in use cannot be cloned).
fn make_template(base: &str) -> Result<(), String> {
    let mut admin =
        postgres::Client::connect(&format!("{base}/postgres"), postgres::NoTls).map_err(|e| e.to_string())?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {TEMPLATE}")).map_err(|e| e.to_string())?;
    admin.batch_execute(&format!("CREATE DATABASE {TEMPLATE}")).map_err(|e| e.to_string())?;
    let url = format!("{base}/{TEMPLATE}?sslmode=disable");
    let mut c = postgres::Client::connect(&url, postgres::NoTls).map_err(|e| e.to_string())?;
    membersync::store::pg::migrate(&mut c).map_err(|e| e.to_string())?;
    drop(c);
    // Until the server has seen the connection go.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = admin
            .query_one("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1", &[&TEMPLATE])
            .map_err(|e| e.to_string())?
            .get(0);
        if n == 0 || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
