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
//! Workloads (`cargo bench --bench http_load -- WORKLOAD…`, default `signups`; `all` runs
//! the three, each against a fresh `serve` and the same bare handler):
//! - `renewals`: Stripe `invoice.paid` (3.3 KB), each with its own event and subscription
//!   id, for one customer: the cheapest path, kept to compare with earlier runs.
//! - `signups`: each request a `customer.subscription.created` (3.2 KB) for a new customer
//!   and subscription: every request creates a member and a membership.
//! - `lifecycle`: per new customer, the five events of a subscription's life in order on
//!   one connection: created `incomplete` → updated `active` → `invoice.paid` →
//!   `invoice.payment_failed` → deleted.
//!
//! The full side's requests are built and signed (`Stripe-Signature`) by the load
//! generator as each is sent, in the timed window; its cost, on the same two cores, counts
//! against the full side. The bare side, which only reads the body, cycles 20,000 requests
//! made the same way before its first window, so its client costs as little as it can. A warm-up precedes
//! each timed window and is not counted. The full side's answers are tallied by the
//! outcome they report (`applied`, `ignored`, …); a `failed` or `refused` one is an error.
//!
//! Reported per side: requests/s, p50 and p99 latency, server CPU per request
//! (utime+stime from /proc/<pid>/stat over the timed window / requests answered in it),
//! and peak RSS (VmHWM from /proc/<pid>/status).
//!
//! Run: `cargo bench --bench http_load`. Environment:
//! `MEMBERSYNC_LOAD_SECS` (timed seconds per side, over all rounds; default 12),
//! `MEMBERSYNC_LOAD_ROUNDS` (default 3), `MEMBERSYNC_LOAD_WARMUP_SECS` (before each part;
//! default 1), `MEMBERSYNC_LOAD_CONNECTIONS` (default 64), `MEMBERSYNC_LOAD_CLIENT_THREADS`
//! (default 1), `MEMBERSYNC_LOAD_VS` (another `membersync` binary: its `serve` takes its
//! parts in the same rounds, and the report adds it and the ratio of the two — an A/B of
//! two builds in one run), `MEMBERSYNC_LOAD_CONFIG` (another `membersync.yaml`),
//! `MEMBERSYNC_LOAD_VS_CONFIG` (the config of the `MEMBERSYNC_LOAD_VS` build, when its
//! config or rules differ; default: the same as the full side's), `MEMBERSYNC_LOAD_PARKED`
//! (before the first part, this many checkouts that name a customer but no subscription,
//! parked for members that never come, as a store gathers them; default 0),
//! `MEMBERSYNC_LOAD_DATABASE` (a `postgres://` URL every `serve` runs on instead of its own
//! SQLite file, used as is: an empty database, one workload, no `MEMBERSYNC_LOAD_VS`; or
//! `throwaway`: a PostgreSQL of the bench's own, started as the tests' in
//! `tests/it/pg_cluster.rs` but with `fsync` and `full_page_writes` on, as shown by `SHOW`,
//! and a fresh migrated database per `serve` side and workload; the report adds the server's
//! CPU per request, its postmaster and backends), `MEMBERSYNC_LOAD_REPLICAS` (default 1: this
//! many `serve` processes per side on one PostgreSQL database, connection i to replica
//! i % N; CPU per request and peak RSS are then sums over the replicas).

// The tests' throwaway PostgreSQL: its template and fresh databases (`throwaway`).
#[path = "../tests/it/pg_cluster.rs"]
#[allow(dead_code)]
mod pg_cluster;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
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
}

/// The workloads, by the name the command line gives them.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Workload {
    Renewals,
    Signups,
    Lifecycle,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Renewals, Workload::Signups, Workload::Lifecycle];

    fn name(self) -> &'static str {
        match self {
            Workload::Renewals => "renewals",
            Workload::Signups => "signups",
            Workload::Lifecycle => "lifecycle",
        }
    }

    /// The target ratio to the bare handler, where the issue sets one.
    fn target(self) -> Option<f64> {
        match self {
            Workload::Renewals => None,
            Workload::Signups => Some(0.25),
            Workload::Lifecycle => Some(0.3),
        }
    }
}

/// How many requests the bare side cycles.
const BARE_POOL: usize = 20_000;

/// The period end the Stripe fixtures carry (2026-02-01).
const FIXTURE_PERIOD_END: &str = "1769904000";

/// Where a request's number goes in a template.
const MARK: &str = "@@N@@";

/// Builds and signs each workload's requests: a customer's number makes its ids.
struct Generator {
    /// One template per step of a customer's sequence.
    steps: Vec<String>,
    scheme: membersync::verify::Scheme,
    secret: membersync::secret::Secret,
    /// The bare side's requests, made before any window.
    pool: Vec<(Bytes, String)>,
    /// A checkout that names its customer but no subscription or product: parked until a
    /// membership of that customer exists, which never comes (`MEMBERSYNC_LOAD_PARKED`).
    parked: String,
}

impl Generator {
    fn new(workload: Workload) -> Generator {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let config = membersync::config::Config::load(&root.join("membersync.yaml")).expect("config");
        let fixture = |name: &str| -> serde_json::Value {
            let text =
                std::fs::read_to_string(root.join(format!("tests/fixtures/stripe/{name}.json"))).expect("fixture");
            serde_json::from_str(&text).expect("fixture JSON")
        };
        let now = chrono::Utc::now().timestamp();
        // Each step: the fixture, its own event id, a time after the step before, and the
        // customer's ids and email (a renewal keeps the fixture's customer: one member, many
        // subscriptions, as before).
        let step = |name: &str, i: usize, edit: &dyn Fn(&mut serde_json::Value)| -> String {
            let mut v = fixture(name);
            edit(&mut v);
            v["id"] = serde_json::json!(format!("evt_ld{i}_{MARK}"));
            v["created"] = serde_json::json!(now - 3_000 + 600 * i as i64);
            // The fixtures' period ends a month from now, as a new subscription's would: no
            // timer of the run falls due during it.
            let text = v
                .to_string()
                .replace("sub_1QxDemo001", &format!("sub_ld_{MARK}"))
                .replace(FIXTURE_PERIOD_END, &(now + 30 * 86_400).to_string());
            if workload == Workload::Renewals {
                text
            } else {
                let text = text
                    .replace("cus_QxDemo001", &format!("cus_ld_{MARK}"))
                    .replace("ada@example.com", &format!("m{MARK}@example.com"));
                // Invoice and charge ids of the fixtures, each the customer's own.
                ["in_1Qx", "ch_3Qx", "pi_3Qx"].iter().fold(text, |t, p| t.replace(p, &format!("{p}{MARK}_")))
            }
        };
        let keep = |_: &mut serde_json::Value| {};
        let steps = match workload {
            Workload::Renewals => vec![step("invoice_paid", 0, &keep)],
            Workload::Signups => vec![step("customer_subscription_created", 0, &keep)],
            Workload::Lifecycle => vec![
                step("customer_subscription_created", 0, &|v| v["data"]["object"]["status"] = "incomplete".into()),
                step("customer_subscription_updated_active", 1, &keep),
                step("invoice_paid", 2, &keep),
                step("invoice_payment_failed", 3, &keep),
                step("customer_subscription_deleted", 4, &keep),
            ],
        };
        let mut parked = fixture("checkout_session_completed");
        parked["id"] = serde_json::json!(format!("evt_parked_{MARK}"));
        parked["created"] = serde_json::json!(now - 86_400);
        let o = &mut parked["data"]["object"];
        o["subscription"] = serde_json::Value::Null;
        o["customer"] = serde_json::json!(format!("cus_parked_{MARK}"));
        o["customer_details"]["email"] = serde_json::json!(format!("parked{MARK}@example.com"));
        o["customer_email"] = serde_json::Value::Null;
        let mut g = Generator {
            steps,
            parked: parked.to_string(),
            scheme: membersync::verify::Scheme::compile(&config.extractors["stripe"].spec.verify),
            secret: membersync::secret::Secret::new(SECRET),
            pool: Vec::new(),
        };
        let per = g.steps.len();
        g.pool = (0..BARE_POOL).map(|i| g.request(u64::MAX / 2 + (i / per) as u64, i % per)).collect();
        g
    }

    /// The `n`th parked checkout: (body, Stripe-Signature), signed now.
    fn parked(&self, n: u64) -> (Bytes, String) {
        let body = self.parked.replace(MARK, &format!("{n:010}"));
        let headers = self.scheme.sign(&self.secret, body.as_bytes(), chrono::Utc::now());
        (Bytes::from(body), headers.into_iter().next().expect("signature header").1)
    }

    /// Step `step` of customer `n`: (body, Stripe-Signature), signed now.
    fn request(&self, n: u64, step: usize) -> (Bytes, String) {
        let body = self.steps[step].replace(MARK, &format!("{n:010}"));
        let headers = self.scheme.sign(&self.secret, body.as_bytes(), chrono::Utc::now());
        (Bytes::from(body), headers.into_iter().next().expect("signature header").1)
    }
}

/// What one side measured.
struct Side {
    name: &'static str,
    requests: u64,
    errors: u64,
    window: Duration,
    latencies_us: Vec<u32>,
    /// Summed over the side's processes (its replicas).
    cpu_ticks: u64,
    ticks_per_sec: u64,
    /// Summed over the side's processes, and the largest of them.
    peak_rss_kb: u64,
    peak_rss_max_kb: u64,
    /// `serve` processes (replicas) of the side.
    replicas: usize,
    /// The PostgreSQL server's (`throwaway`) over the side's timed windows.
    db_cpu_ticks: Option<u64>,
    /// The full side's answers by the outcome they report.
    outcomes: std::collections::BTreeMap<String, u64>,
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
            peak_rss_max_kb: 0,
            replicas: 1,
            db_cpu_ticks: None,
            outcomes: Default::default(),
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
    fn db_cpu_us_per_req(&self) -> Option<f64> {
        self.db_cpu_ticks.map(|t| t as f64 * 1e6 / self.ticks_per_sec as f64 / self.requests.max(1) as f64)
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

/// CPU ticks of a PostgreSQL server: its postmaster, the children it reaped, and its live
/// children (backends, WAL writer, checkpointer, …).
fn server_ticks(postmaster: u32) -> u64 {
    // From the state on: ppid [1], utime [11], stime [12], cutime [13], cstime [14].
    let fields = |pid: &str| -> Option<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
    };
    let mut ticks = fields(&postmaster.to_string()).map_or(0, |f| f[11] + f[12] + f[13] + f[14]);
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.bytes().all(|b| b.is_ascii_digit()) {
            if let Some(f) = fields(&name).filter(|f| f[1] == postmaster as u64) {
                ticks += f[11] + f[12];
            }
        }
    }
    ticks
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
    outcomes: std::collections::BTreeMap<String, u64>,
}

/// One keep-alive connection: customer after customer, each customer's steps in order.
async fn connection(
    addr: SocketAddr,
    generator: Arc<Generator>,
    next: Arc<AtomicU64>,
    full: bool,
    warm_until: Instant,
    deadline: Instant,
) -> ConnResult {
    let mut r = ConnResult { latencies_us: Vec::with_capacity(65_536), ok: 0, errors: 0, outcomes: Default::default() };
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let host = addr.to_string();
    'customers: while Instant::now() < deadline {
        let n = next.fetch_add(1, Ordering::Relaxed);
        for step in 0..generator.steps.len() {
            if Instant::now() >= deadline {
                break 'customers;
            }
            let (body, sig) = if full {
                generator.request(n, step)
            } else {
                generator.pool[((n as usize) * generator.steps.len() + step) % BARE_POOL].clone()
            };
            let req = Request::post(PATH)
                .header("host", &host)
                .header("content-type", "application/json")
                .header("stripe-signature", sig)
                .body(Full::new(body))
                .expect("request");
            if sender.ready().await.is_err() {
                r.errors += 1;
                break 'customers;
            }
            let t0 = Instant::now();
            let outcome = match sender.send_request(req).await {
                Ok(resp) if resp.status() == 200 => match resp.into_body().collect().await {
                    Ok(b) if full => outcome_of(&b.to_bytes()),
                    Ok(_) => Some("ok".to_string()),
                    Err(_) => None,
                },
                _ => None,
            };
            if t0 >= warm_until {
                r.latencies_us.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                let good = outcome.as_deref().is_some_and(|o| o != "failed" && o != "refused");
                if good {
                    r.ok += 1;
                } else {
                    r.errors += 1;
                }
                *r.outcomes.entry(outcome.unwrap_or_else(|| "error".into())).or_default() += 1;
            }
        }
    }
    r
}

/// The `status` of a webhook's answer (`{"event_id", "status", …}`).
fn outcome_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["status"].as_str().map(str::to_string)
}

/// A server under test: its child processes (replicas) and where each listens.
struct Server {
    name: &'static str,
    children: Vec<Child>,
    addrs: Vec<SocketAddr>,
    /// The postmaster of the PostgreSQL it runs on, when it is the bench's own.
    db_pid: Option<u32>,
    /// Customers begun so far (the full side never sees one twice, on any replica).
    next: Arc<AtomicU64>,
    side: Side,
}

impl Server {
    fn start(name: &'static str, replicas: Vec<(Child, u16)>, db_pid: Option<u32>) -> Server {
        let (children, ports): (Vec<Child>, Vec<u16>) = replicas.into_iter().unzip();
        let addrs: Vec<SocketAddr> = ports.into_iter().map(|p| SocketAddr::from(([127, 0, 0, 1], p))).collect();
        // Owned from here: a panic while waiting still stops the children (`Drop`).
        let mut server = Server {
            name,
            side: Side { ticks_per_sec: clock_ticks(), replicas: children.len(), ..Side::empty(name) },
            children,
            addrs,
            db_pid,
            next: Arc::new(AtomicU64::new(0)),
        };
        for (addr, child) in server.addrs.iter().zip(server.children.iter_mut()) {
            wait_ready(*addr, child);
        }
        server
    }

    fn cpu_ticks(&self) -> u64 {
        self.children.iter().map(|c| cpu_ticks(c.id())).sum()
    }

    /// One part: `warmup` untimed, then `secs` timed, on fresh connections.
    fn part(&mut self, s: &Settings, generator: &Arc<Generator>, secs: f64) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(s.client_threads)
            .enable_all()
            .build()
            .expect("client runtime");
        let full = self.name != "bare";
        let start = Instant::now();
        let warm_until = start + Duration::from_secs(s.warmup);
        let deadline = warm_until + Duration::from_secs_f64(secs);
        let tasks: Vec<_> = (0..s.connections)
            .map(|i| {
                let addr = self.addrs[i % self.addrs.len()];
                rt.spawn(connection(addr, generator.clone(), self.next.clone(), full, warm_until, deadline))
            })
            .collect();
        std::thread::sleep(warm_until.saturating_duration_since(Instant::now()));
        let cpu0 = self.cpu_ticks();
        let db0 = self.db_pid.map(server_ticks);
        let t0 = Instant::now();
        let results: Vec<ConnResult> = rt.block_on(async {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("connection task"));
            }
            out
        });
        let window = t0.elapsed();
        let cpu1 = self.cpu_ticks();
        let db1 = self.db_pid.map(server_ticks);
        drop(rt);
        let requests: u64 = results.iter().map(|r| r.ok).sum();
        let side = &mut self.side;
        side.rounds.push(requests as f64 / window.as_secs_f64());
        side.requests += requests;
        side.errors += results.iter().map(|r| r.errors).sum::<u64>();
        side.window += window;
        side.cpu_ticks += cpu1 - cpu0;
        if let (Some(a), Some(b)) = (db0, db1) {
            *side.db_cpu_ticks.get_or_insert(0) += b.saturating_sub(a);
        }
        for (k, v) in results.iter().flat_map(|r| r.outcomes.iter()) {
            *side.outcomes.entry(k.clone()).or_default() += v;
        }
        side.latencies_us.extend(results.iter().flat_map(|r| r.latencies_us.iter().copied()));
    }

    /// Stops the server (SIGTERM: `serve` finishes in-flight commits, then make sure) and
    /// returns what it measured.
    fn stop(mut self) -> Side {
        let peaks: Vec<u64> = self.children.iter().map(|c| peak_rss_kb(c.id())).collect();
        self.side.peak_rss_kb = peaks.iter().sum();
        self.side.peak_rss_max_kb = peaks.iter().copied().max().unwrap_or(0);
        for child in &self.children {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        let stop = Instant::now();
        while stop.elapsed() < Duration::from_secs(10) {
            if self.children.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_)))) {
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
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Posts `n` parked checkouts to a server before its first part (untimed), one at a time;
/// returns how many it answered `refused` (parked), as each must be.
fn seed_parked(addr: SocketAddr, generator: &Generator, n: u64) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("seed runtime");
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let mut parked = 0;
        for i in 0..n {
            let (body, sig) = generator.parked(i);
            let req = Request::post(PATH)
                .header("host", addr.to_string())
                .header("content-type", "application/json")
                .header("stripe-signature", sig)
                .body(Full::new(body))
                .expect("request");
            sender.ready().await.expect("ready");
            let resp = sender.send_request(req).await.expect("seed request");
            let body = resp.into_body().collect().await.expect("seed answer").to_bytes();
            if outcome_of(&body).as_deref() == Some("refused") {
                parked += 1;
            }
        }
        parked
    })
}

/// `MEMBERSYNC_LOAD_DATABASE=throwaway`: a PostgreSQL of the bench's own, started as the
/// tests' harness (`tests/it/pg_cluster.rs`) starts its own (Debian's binaries, `initdb` into a
/// temp dir, as the `postgres` user when root) but with its defaults for durability (`fsync`
/// and `full_page_writes` on): the harness passes `fsync=off` on the server's command line,
/// which outranks `ALTER SYSTEM`, and SQLite syncs every commit. The harness then makes its
/// template and the fresh databases on it (`MEMBERSYNC_TEST_POSTGRES`). Stopped (fast
/// shutdown) when dropped.
struct Postgres {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Postgres {
    fn start() -> Postgres {
        use std::os::unix::process::CommandExt;
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|d| d.join("initdb").exists() && d.join("postgres").exists())
            .max_by_key(|d| d.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()))
            .expect("MEMBERSYNC_LOAD_DATABASE=throwaway needs Debian's `postgresql` (apt-get install postgresql)");
        // initdb refuses root: as the `postgres` user then.
        let who = (unsafe { libc::geteuid() } == 0).then(|| {
            let name = std::ffi::CString::new("postgres").unwrap();
            let pw = unsafe { libc::getpwnam(name.as_ptr()) };
            assert!(!pw.is_null(), "MEMBERSYNC_LOAD_DATABASE=throwaway as root needs a `postgres` user");
            unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
        });
        let as_user = |cmd: &mut Command| {
            if let Some((uid, gid)) = who {
                cmd.uid(uid).gid(gid);
            }
        };
        let dir = tempfile::Builder::new().prefix("membersync-load-pg-").tempdir().expect("tempdir");
        if let Some((uid, gid)) = who {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args(["-U", "membersync", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]);
        as_user(&mut initdb);
        let done = initdb.stdout(Stdio::null()).output().expect("initdb");
        assert!(done.status.success(), "initdb failed: {}", String::from_utf8_lossy(&done.stderr));
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let mut server = Command::new(bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        as_user(&mut server);
        let mut pg = Postgres { child: server.spawn().expect("postgres"), _dir: dir };
        let base = format!("postgres://membersync@127.0.0.1:{port}");
        let start = Instant::now();
        while postgres::Client::connect(&format!("{base}/postgres"), postgres::NoTls).is_err() {
            if let Ok(Some(status)) = pg.child.try_wait() {
                panic!("the throwaway PostgreSQL exited: {status}");
            }
            assert!(start.elapsed() < Duration::from_secs(60), "the throwaway PostgreSQL did not answer within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::env::set_var("MEMBERSYNC_TEST_POSTGRES", &base);
        pg
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// What durability the PostgreSQL at `url` (a superuser's) has, as `SHOW` tells; with `set`,
/// `fsync` and `full_page_writes` are turned on first (`ALTER SYSTEM`) and must show on.
fn pg_durability(url: &str, set: bool) -> String {
    pg_cluster::query(url, |c| {
        if set {
            // One statement at a time: ALTER SYSTEM runs outside a transaction block.
            for sql in
                ["ALTER SYSTEM SET fsync = on", "ALTER SYSTEM SET full_page_writes = on", "SELECT pg_reload_conf()"]
            {
                c.batch_execute(sql).expect("ALTER SYSTEM (a superuser's URL)");
            }
            // The reload reaches this backend after the postmaster's signal.
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut show =
            |name: &str| -> String { c.query_one(&format!("SHOW {name}"), &[]).expect("SHOW").get::<_, String>(0) };
        let (version, fsync, fpw, sync) =
            (show("server_version"), show("fsync"), show("full_page_writes"), show("synchronous_commit"));
        if set {
            assert!(fsync == "on" && fpw == "on", "fsync {fsync}, full_page_writes {fpw}: no honest comparison");
        }
        format!(
            "PostgreSQL {version}: fsync {fsync}, full_page_writes {fpw}, synchronous_commit {sync} (SHOW; \
             membersync sets synchronous_commit on per connection)"
        )
    })
}

fn drive() {
    let secs = env_num("MEMBERSYNC_LOAD_SECS", 12);
    let s = Settings {
        secs,
        warmup: env_num("MEMBERSYNC_LOAD_WARMUP_SECS", 1),
        rounds: env_num("MEMBERSYNC_LOAD_ROUNDS", 3).max(1),
        connections: env_num("MEMBERSYNC_LOAD_CONNECTIONS", 64) as usize,
        client_threads: env_num("MEMBERSYNC_LOAD_CLIENT_THREADS", 1) as usize,
    };
    // `cargo bench` passes `--bench`; the words are ours.
    let words: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let workloads: Vec<Workload> = if words.iter().any(|w| w == "all") {
        Workload::ALL.to_vec()
    } else if words.is_empty() {
        vec![Workload::Signups]
    } else {
        words
            .iter()
            .map(|w| {
                Workload::ALL
                    .into_iter()
                    .find(|x| x.name() == w)
                    .unwrap_or_else(|| panic!("unknown workload `{w}`: one of renewals, signups, lifecycle, all"))
            })
            .collect()
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let replicas = env_num("MEMBERSYNC_LOAD_REPLICAS", 1).max(1) as usize;
    let database = std::env::var("MEMBERSYNC_LOAD_DATABASE").ok().filter(|d| !d.is_empty());
    assert!(
        replicas == 1 || database.is_some(),
        "MEMBERSYNC_LOAD_REPLICAS={replicas}: replicas share one PostgreSQL database, so set \
         MEMBERSYNC_LOAD_DATABASE (a postgres:// URL, or `throwaway`); on SQLite only one `serve` runs"
    );
    let throwaway = database.as_deref() == Some("throwaway");
    assert!(
        database.is_none() || throwaway || (workloads.len() == 1 && std::env::var_os("MEMBERSYNC_LOAD_VS").is_none()),
        "MEMBERSYNC_LOAD_DATABASE=URL is used as is by every `serve`: one workload and no MEMBERSYNC_LOAD_VS \
         (`throwaway` gives each a fresh database)"
    );
    // The bench's own PostgreSQL, unless MEMBERSYNC_TEST_POSTGRES names one, as for the tests.
    let own_pg =
        (throwaway && !std::env::var("MEMBERSYNC_TEST_POSTGRES").is_ok_and(|u| !u.is_empty())).then(Postgres::start);
    let db_pid = own_pg.as_ref().map(|pg| pg.child.id());
    let db_line = match database.as_deref() {
        None => "SQLite, a fresh file per `serve` side in a temp dir".to_string(),
        Some("throwaway") => {
            let base = std::env::var("MEMBERSYNC_TEST_POSTGRES").expect("the throwaway PostgreSQL");
            let base = base.trim_end_matches('/');
            format!("{} at {base}, a fresh database per side", pg_durability(&format!("{base}/postgres"), true))
        }
        Some(url) => format!("{} at {}", pg_durability(url, false), membersync::store::pg::redacted(url)),
    };

    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "http_load: {} connections, {} s timed per side in {} alternating parts (+{} s warm-up each), {} client thread(s), nproc {}",
        s.connections,
        s.secs,
        s.rounds,
        s.warmup,
        s.client_threads,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "database: {db_line}; {replicas} `serve` replica(s) per side{}",
        if replicas > 1 { " (CPU us/req and peak RSS: sums over the replicas)" } else { "" }
    );
    for workload in workloads {
        let generator = Arc::new(Generator::new(workload));

        // Bare handler: a fresh one per workload, so its peak RSS is the workload's.
        let port = free_port();
        let bare = Command::new(std::env::current_exe().expect("exe"))
            .env(ROLE_ENV, "bare")
            .env(PORT_ENV, port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("bare server");
        let mut bare = Server::start("bare", vec![(bare, port)], None);

        // Full ingest: the real `serve`, fresh database, its default log to a file. With
        // `MEMBERSYNC_LOAD_VS=BIN`, a second `serve` (another build) takes its parts too, in
        // the same rounds: an A/B in one stretch of time.
        let dir = tempfile::tempdir().expect("tempdir");
        // With `MEMBERSYNC_LOAD_DATABASE`, on PostgreSQL, `MEMBERSYNC_LOAD_REPLICAS` of them.
        let serve = |name: &'static str, bin: &std::ffi::OsStr, config: PathBuf| {
            let database: std::ffi::OsString = match database.as_deref() {
                None => dir.path().join(format!("{name}.db")).into(),
                Some("throwaway") => pg_cluster::fresh_database().into(),
                Some(url) => url.into(),
            };
            let children = (0..replicas)
                .map(|r| {
                    let port = free_port();
                    let log = std::fs::File::create(dir.path().join(format!("{name}-{r}.log"))).expect("log");
                    let child = Command::new(bin)
                        .arg("serve")
                        .arg("--config")
                        .arg(&config)
                        .arg("--listen")
                        .arg(format!("127.0.0.1:{port}"))
                        .arg("--database")
                        .arg(&database)
                        .env("STRIPE_WEBHOOK_SECRET", SECRET)
                        .env_remove("STRIPE_API_KEY")
                        .env_remove("MEMBERSYNC_LOG")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .expect("membersync serve");
                    (child, port)
                })
                .collect();
            Server::start(name, children, db_pid)
        };
        let mut full = serve("full", std::ffi::OsStr::new(env!("CARGO_BIN_EXE_membersync")), config_path(&root));
        let vs_config =
            std::env::var_os("MEMBERSYNC_LOAD_VS_CONFIG").map(PathBuf::from).unwrap_or_else(|| config_path(&root));
        let mut vs = std::env::var_os("MEMBERSYNC_LOAD_VS").map(|bin| serve("vs", &bin, vs_config.clone()));

        // Events parked for members that never come, as a store gathers them over months.
        let seed = env_num("MEMBERSYNC_LOAD_PARKED", 0);
        if seed > 0 {
            for server in std::iter::once(&full).chain(vs.as_ref()) {
                let parked = seed_parked(server.addrs[0], &generator, seed);
                let _ =
                    writeln!(out, "{}: {parked} of {seed} checkouts parked for members that never come", server.name);
            }
        }

        // The servers are up; the load alternates between them, so each side's parts are
        // spread over the same stretch of time and a change in the machine meets both.
        let part = s.secs as f64 / s.rounds as f64;
        for _ in 0..s.rounds {
            bare.part(&s, &generator, part);
            full.part(&s, &generator, part);
            if let Some(vs) = vs.as_mut() {
                vs.part(&s, &generator, part);
            }
        }
        let (bare, full) = (bare.stop(), full.stop());
        report(&mut out, workload, &bare, &full);
        if let Some(vs) = vs.map(Server::stop) {
            let _ = writeln!(out, "-- vs {}", std::env::var("MEMBERSYNC_LOAD_VS").unwrap_or_default());
            report(&mut out, workload, &bare, &vs);
            let each: Vec<String> = full.rounds.iter().zip(&vs.rounds).map(|(a, b)| format!("{:.3}", a / b)).collect();
            let _ = writeln!(
                out,
                "full / vs = {:.3} req/s (rounds {}), CPU/req {:.1} / {:.1} us",
                full.rps() / vs.rps(),
                each.join(", "),
                full.cpu_us_per_req(),
                vs.cpu_us_per_req()
            );
        }
    }
}

/// The config both `serve`s read: `MEMBERSYNC_LOAD_CONFIG`, or the checked-in one.
fn config_path(root: &std::path::Path) -> PathBuf {
    std::env::var_os("MEMBERSYNC_LOAD_CONFIG").map(PathBuf::from).unwrap_or_else(|| root.join("membersync.yaml"))
}

fn report(out: &mut impl Write, workload: Workload, bare: &Side, full: &Side) {
    let _ =
        writeln!(out, "\n== {} ({} request(s) per customer)", workload.name(), Generator::new(workload).steps.len());
    let _ = writeln!(
        out,
        "{:<6} {:>10} {:>8} {:>9} {:>9} {:>12} {:>10}",
        "side", "req/s", "errors", "p50 ms", "p99 ms", "CPU us/req", "peak RSS"
    );
    for side in [bare, full] {
        let _ = writeln!(
            out,
            "{:<6} {:>10.0} {:>8} {:>9.2} {:>9.2} {:>12.1} {:>7.1} MB",
            side.name,
            side.rps(),
            side.errors,
            side.pct(0.50),
            side.pct(0.99),
            side.cpu_us_per_req(),
            side.peak_rss_kb as f64 / 1024.0,
        );
    }
    if full.replicas > 1 {
        let _ = writeln!(
            out,
            "{}: {} replicas on one database; its CPU us/req and peak RSS are sums over the {} processes",
            full.name, full.replicas, full.replicas
        );
    }
    if let Some(db) = full.db_cpu_us_per_req() {
        let _ = writeln!(
            out,
            "{}: PostgreSQL's CPU us/req (postmaster and backends) {db:.1}; serve's and PostgreSQL's {:.1}",
            full.name,
            db + full.cpu_us_per_req()
        );
    }
    let mix: Vec<String> = full.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(out, "full answers: {}", mix.join(", "));
    let each: Vec<String> =
        bare.rounds.iter().zip(&full.rounds).map(|(b, f)| format!("{:.0}/{:.0} = {:.3}", f, b, f / b)).collect();
    let _ = writeln!(out, "rounds (full/bare req/s): {}", each.join(", "));
    let ratio = full.rps() / bare.rps();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    match workload.target() {
        Some(t) => {
            let _ = writeln!(out, "full / bare = {ratio:.3}  (target >= {t}: {})", verdict(ratio >= t));
        }
        None => {
            let _ = writeln!(out, "full / bare = {ratio:.3}");
        }
    }
    let p99 = full.pct(0.99);
    let _ = writeln!(out, "full p99 = {p99:.2} ms  (target <= 10 ms: {})", verdict(p99 <= 10.0));
    let rss = full.peak_rss_kb as f64 / 1024.0;
    if full.replicas > 1 {
        let max = full.peak_rss_max_kb as f64 / 1024.0;
        let _ = writeln!(
            out,
            "full peak RSS = {rss:.1} MB over {} replicas, largest {max:.1} MB  (target <= 64 MB each: {})",
            full.replicas,
            verdict(max <= 64.0)
        );
    } else {
        let _ = writeln!(out, "full peak RSS = {rss:.1} MB  (target <= 64 MB: {})", verdict(rss <= 64.0));
    }
}
