//! HTTP load benchmark, loopback only, bounded in time: the full durable ingest path
//! (`membersync serve`, the real binary, answering 200 only after the group commit holding
//! the event) against a bare axum handler that only reads the body, **in the same run**,
//! so the ratio holds on a noisy machine.
//!
//! Both servers run for the whole benchmark and the load alternates between them in
//! rounds (bare, full, bare, full, …; three by default), each part on fresh connections
//! after its own warm-up: the two sides' timed windows are spread over the same stretch
//! of time, so a change in the machine's speed meets both. The report gives each round's
//! ratio as well as the whole.
//!
//! Each side is a child process (so its CPU time and peak RSS are its own): the full side
//! is `membersync serve` on a fresh SQLite file in a temp dir, with its default `info` log
//! to a file; the bare side is this binary re-executed with `MEMBERSYNC_LOAD_ROLE=bare`.
//! The client is hyper HTTP/1.1 on its own tokio runtime in this process, one task per
//! keep-alive connection, one request in flight per connection (like `wrk`).
//!
//! Payloads: Stripe `invoice.paid` (tests/fixtures/stripe/invoice_paid.json, 3.3 KB), each
//! with its own event id and subscription id, signed with `Stripe-Signature` **before**
//! the timed window. A warm-up precedes each timed window and is not counted.
//!
//! Reported per side: requests/s, p50 and p99 latency, server CPU per request
//! (utime+stime from /proc/<pid>/stat over the timed window / requests answered in it),
//! and peak RSS (VmHWM from /proc/<pid>/status).
//!
//! Run: `cargo bench --bench http_load`. Environment:
//! `MEMBERSYNC_LOAD_SECS` (timed seconds per side, over all rounds; default 12),
//! `MEMBERSYNC_LOAD_ROUNDS` (default 3), `MEMBERSYNC_LOAD_WARMUP_SECS` (before each part;
//! default 1), `MEMBERSYNC_LOAD_CONNECTIONS` (default 64), `MEMBERSYNC_LOAD_CLIENT_THREADS`
//! (default 1), `MEMBERSYNC_LOAD_POOL` (distinct signed payloads; default 25k per second
//! of run — when the full side uses them all up, its window ends early and says so).

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROLE_ENV: &str = "MEMBERSYNC_LOAD_ROLE";
const PORT_ENV: &str = "MEMBERSYNC_LOAD_PORT";
const SECRET: &str = "whsec_load_bench_local_only";
const PATH: &str = "/webhooks/demo/stripe";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::var(ROLE_ENV).as_deref() == Ok("bare") {
        serve_bare();
        return;
    }
    drive();
}

/// The bare side: an axum handler that reads the body and answers 200, on the same kind
/// of runtime `membersync serve` uses (multi-thread, one worker per core).
fn serve_bare() {
    use axum::routing::post;
    let port: u16 = std::env::var(PORT_ENV).expect("port").parse().expect("port");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let app = axum::Router::new().route(
            "/webhooks/{tenant}/{provider}",
            post(|body: Bytes| async move {
                std::hint::black_box(body.len());
                axum::http::StatusCode::OK
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        axum::serve(listener, app).await.expect("serve");
    });
}

struct Settings {
    /// Timed seconds per side, over all rounds.
    secs: u64,
    /// Untimed seconds before each timed part.
    warmup: u64,
    /// Parts per side, alternated bare, full, bare, full, …
    rounds: u64,
    connections: usize,
    client_threads: usize,
    pool: usize,
}

/// Signed requests: (body, Stripe-Signature), each with its own event and subscription id.
struct Pool {
    items: Vec<(Bytes, String)>,
}

fn build_pool(n: usize) -> Pool {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = membersync::config::Config::load(&root.join("membersync.yaml")).expect("config");
    let scheme = membersync::verify::Scheme::compile(&config.extractors["stripe"].spec.verify);
    let secret = membersync::secret::Secret::new(SECRET);
    let template = std::fs::read_to_string(root.join("tests/fixtures/stripe/invoice_paid.json")).expect("fixture");
    let now = chrono::Utc::now();
    let items = (0..n)
        .map(|i| {
            let body = template
                .replace("evt_1QxaZ1K7dEmoAc01GAm3W0e2", &format!("evt_load_{i:09}"))
                .replace("sub_1QxDemo001", &format!("sub_load_{i:09}"));
            let headers = scheme.sign(&secret, body.as_bytes(), now);
            (Bytes::from(body), headers.into_iter().next().expect("signature header").1)
        })
        .collect();
    Pool { items }
}

/// What one side measured.
struct Side {
    name: &'static str,
    requests: u64,
    errors: u64,
    window: Duration,
    latencies_us: Vec<u32>,
    cpu_ticks: u64,
    ticks_per_sec: u64,
    peak_rss_kb: u64,
    exhausted: bool,
    /// Requests per second of each round's part.
    rounds: Vec<f64>,
}

impl Side {
    fn empty(name: &'static str) -> Side {
        Side {
            name,
            requests: 0,
            errors: 0,
            window: Duration::ZERO,
            latencies_us: Vec::new(),
            cpu_ticks: 0,
            ticks_per_sec: 0,
            peak_rss_kb: 0,
            exhausted: false,
            rounds: Vec::new(),
        }
    }

    fn rps(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }
    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
    fn cpu_us_per_req(&self) -> f64 {
        self.cpu_ticks as f64 * 1e6 / self.ticks_per_sec as f64 / self.requests.max(1) as f64
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn wait_ready(addr: SocketAddr, child: &mut Child) {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited before listening: {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "server did not listen within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The command name may hold spaces: fields count from the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

struct ConnResult {
    latencies_us: Vec<u32>,
    ok: u64,
    errors: u64,
    exhausted: bool,
}

async fn connection(
    addr: SocketAddr,
    pool: Arc<Pool>,
    next: Arc<AtomicUsize>,
    cycle: bool,
    warm_until: Instant,
    deadline: Instant,
) -> ConnResult {
    let mut r = ConnResult { latencies_us: Vec::with_capacity(65_536), ok: 0, errors: 0, exhausted: false };
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let host = addr.to_string();
    loop {
        if Instant::now() >= deadline {
            break;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        if !cycle && i >= pool.items.len() {
            r.exhausted = true;
            break;
        }
        let (body, sig) = &pool.items[i % pool.items.len()];
        let req = Request::post(PATH)
            .header("host", &host)
            .header("content-type", "application/json")
            .header("stripe-signature", sig)
            .body(Full::new(body.clone()))
            .expect("request");
        if sender.ready().await.is_err() {
            r.errors += 1;
            break;
        }
        let t0 = Instant::now();
        let ok = match sender.send_request(req).await {
            Ok(resp) => {
                let good = resp.status() == 200;
                match resp.into_body().collect().await {
                    Ok(b) => good && (cycle || contains(&b.to_bytes(), b"\"status\":\"applied\"")),
                    Err(_) => false,
                }
            }
            Err(_) => false,
        };
        if t0 >= warm_until {
            r.latencies_us.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
            if ok {
                r.ok += 1;
            } else {
                r.errors += 1;
            }
        }
    }
    r
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A server under test: a child process and where it listens.
struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    /// Payloads handed out so far (the full side never sends one twice).
    next: Arc<AtomicUsize>,
    side: Side,
}

impl Server {
    fn start(name: &'static str, child: Child, port: u16) -> Server {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Owned from here: a panic while waiting still stops the child (`Drop`).
        let mut server = Server {
            name,
            child,
            addr,
            next: Arc::new(AtomicUsize::new(0)),
            side: Side { ticks_per_sec: clock_ticks(), ..Side::empty(name) },
        };
        wait_ready(addr, &mut server.child);
        server
    }

    /// One part: `warmup` untimed, then `secs` timed, on fresh connections.
    fn part(&mut self, s: &Settings, pool: &Arc<Pool>, secs: f64) {
        let pid = self.child.id();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(s.client_threads)
            .enable_all()
            .build()
            .expect("client runtime");
        let cycle = self.name == "bare";
        let start = Instant::now();
        let warm_until = start + Duration::from_secs(s.warmup);
        let deadline = warm_until + Duration::from_secs_f64(secs);
        let tasks: Vec<_> = (0..s.connections)
            .map(|_| rt.spawn(connection(self.addr, pool.clone(), self.next.clone(), cycle, warm_until, deadline)))
            .collect();
        std::thread::sleep(warm_until.saturating_duration_since(Instant::now()));
        let cpu0 = cpu_ticks(pid);
        let t0 = Instant::now();
        let results: Vec<ConnResult> = rt.block_on(async {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("connection task"));
            }
            out
        });
        let window = t0.elapsed();
        let cpu1 = cpu_ticks(pid);
        drop(rt);
        let requests: u64 = results.iter().map(|r| r.ok).sum();
        let side = &mut self.side;
        side.rounds.push(requests as f64 / window.as_secs_f64());
        side.requests += requests;
        side.errors += results.iter().map(|r| r.errors).sum::<u64>();
        side.window += window;
        side.cpu_ticks += cpu1 - cpu0;
        side.exhausted |= results.iter().any(|r| r.exhausted);
        side.latencies_us.extend(results.iter().flat_map(|r| r.latencies_us.iter().copied()));
    }

    /// Stops the server (SIGTERM: `serve` finishes in-flight commits, then make sure) and
    /// returns what it measured.
    fn stop(mut self) -> Side {
        let pid = self.child.id();
        self.side.peak_rss_kb = peak_rss_kb(pid);
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        let stop = Instant::now();
        while stop.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut side = std::mem::replace(&mut self.side, Side::empty(self.name));
        side.latencies_us.sort_unstable();
        side
    }
}

/// Whatever happened — a finished run or a panic in between — no server outlives the bench.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drive() {
    let secs = env_num("MEMBERSYNC_LOAD_SECS", 12);
    let warmup = env_num("MEMBERSYNC_LOAD_WARMUP_SECS", 1);
    let rounds = env_num("MEMBERSYNC_LOAD_ROUNDS", 3).max(1);
    let s = Settings {
        secs,
        warmup,
        rounds,
        connections: env_num("MEMBERSYNC_LOAD_CONNECTIONS", 64) as usize,
        client_threads: env_num("MEMBERSYNC_LOAD_CLIENT_THREADS", 1) as usize,
        pool: env_num("MEMBERSYNC_LOAD_POOL", 25_000 * (secs + warmup * rounds)) as usize,
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let signing = Instant::now();
    let pool = Arc::new(build_pool(s.pool));
    eprintln!("signed {} payloads in {:.1} s (before any timed window)", s.pool, signing.elapsed().as_secs_f64());

    // Bare handler.
    let port = free_port();
    let bare = Command::new(std::env::current_exe().expect("exe"))
        .env(ROLE_ENV, "bare")
        .env(PORT_ENV, port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("bare server");
    let mut bare = Server::start("bare", bare, port);

    // Full ingest: the real `serve`, fresh database, its default log to a file.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
    let full = Command::new(env!("CARGO_BIN_EXE_membersync"))
        .arg("serve")
        .arg("--config")
        .arg(root.join("membersync.yaml"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--database")
        .arg(dir.path().join("load.db"))
        .env("STRIPE_WEBHOOK_SECRET", SECRET)
        .env_remove("STRIPE_API_KEY")
        .env_remove("MEMBERSYNC_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("membersync serve");
    let mut full = Server::start("full", full, port);

    // Both servers are up; the load alternates between them, so each side's parts are
    // spread over the same stretch of time and a change in the machine meets both.
    let part = s.secs as f64 / s.rounds as f64;
    for _ in 0..s.rounds {
        bare.part(&s, &pool, part);
        full.part(&s, &pool, part);
    }
    let (bare, full) = (bare.stop(), full.stop());

    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nhttp_load: {} connections, {} s timed per side in {} alternating parts (+{} s warm-up each), {} client thread(s), nproc {}",
        s.connections,
        s.secs,
        s.rounds,
        s.warmup,
        s.client_threads,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "{:<6} {:>10} {:>8} {:>9} {:>9} {:>12} {:>10}",
        "side", "req/s", "errors", "p50 ms", "p99 ms", "CPU us/req", "peak RSS"
    );
    for side in [&bare, &full] {
        let _ = writeln!(
            out,
            "{:<6} {:>10.0} {:>8} {:>9.2} {:>9.2} {:>12.1} {:>7.1} MB{}",
            side.name,
            side.rps(),
            side.errors,
            side.pct(0.50),
            side.pct(0.99),
            side.cpu_us_per_req(),
            side.peak_rss_kb as f64 / 1024.0,
            if side.exhausted {
                format!("  (payload pool used up after {:.1} s; raise MEMBERSYNC_LOAD_POOL)", side.window.as_secs_f64())
            } else {
                String::new()
            }
        );
    }
    let each: Vec<String> =
        bare.rounds.iter().zip(&full.rounds).map(|(b, f)| format!("{:.0}/{:.0} = {:.3}", f, b, f / b)).collect();
    let _ = writeln!(out, "rounds (full/bare req/s): {}", each.join(", "));
    let ratio = full.rps() / bare.rps();
    let _ = writeln!(out, "full / bare = {ratio:.3}  (target >= 0.25)");
    let _ = writeln!(out, "full p99 = {:.2} ms  (target <= 20 ms)", full.pct(0.99));
    let _ = writeln!(out, "full peak RSS = {:.1} MB  (target <= 100 MB)", full.peak_rss_kb as f64 / 1024.0);
}
